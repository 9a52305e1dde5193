import math
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from deepdem.errors import InputError
from deepdem.uncertainty import (LEVELS, SIGMA_TAG, calibration_metrics, coverage, difference_sigma, spearman_if_exact,
                                 fit_temperature, interval_half_width, read_sigma_distribution,
                                 reliability_curve)


def test_interval_half_widths_equal_the_closed_forms():
    # Laplace of σ = √2 has scale b = 1: the central 90 % interval is ±ln 10, 95 % ±ln 20.
    assert interval_half_width(math.sqrt(2), 0.90) == pytest.approx(math.log(10))
    assert interval_half_width(math.sqrt(2), 0.95, "laplace") == pytest.approx(math.log(20))
    assert interval_half_width(math.sqrt(2), 0.68) == pytest.approx(-math.log(0.32))
    assert interval_half_width(2.0, 0.95, "gaussian") == pytest.approx(2 * 1.959964, rel=1e-6)
    assert interval_half_width(1.0, 0.68, "gaussian") == pytest.approx(0.994458, rel=1e-5)
    widths = interval_half_width(np.array([1.0, 3.0]), 0.90, "gaussian")
    assert widths == pytest.approx([1.644854, 3 * 1.644854], rel=1e-6)
    with pytest.raises(ValueError):
        interval_half_width(1.0, 1.0)
    with pytest.raises(ValueError):
        interval_half_width(1.0, 0.5, "cauchy")


def _laplace(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.2, 3.0, n)  # a σ that varies from pixel to pixel, as refine's does
    return rng.laplace(0.0, sigma / math.sqrt(2)), sigma


def test_true_sigma_covers_the_nominal_share_and_halved_sigma_gets_temperature_2():
    errors, sigma = _laplace()
    m = calibration_metrics(errors, sigma, "laplace")
    assert m["count"] == errors.size
    for level in LEVELS:
        assert m[f"coverage_{round(100 * level)}"] == pytest.approx(level, abs=0.01)
    nominal, observed = reliability_curve(errors, sigma, "laplace")
    assert len(nominal) == 19 and np.max(np.abs(observed - nominal)) < 0.01
    for method in ("coverage", "likelihood"):
        assert fit_temperature(errors, sigma / 2, "laplace", method) == pytest.approx(2.0, rel=0.02)
        assert fit_temperature(errors, sigma, "laplace", method) == pytest.approx(1.0, rel=0.02)
    # Heavier tails than σ says (5 % of the errors ten times larger): the likelihood widens every
    # interval for them; the coverage fit keeps the 68 % and 90 % intervals at their share.
    heavy = np.where(np.random.default_rng(2).random(errors.size) < 0.05, 10 * errors, errors)
    t_likelihood, t_coverage = (fit_temperature(heavy, sigma, "laplace", m) for m in ("likelihood", "coverage"))
    assert t_likelihood > 1.4 and t_coverage < 1.15  # measured: 1.46 and 1.14
    for level in (0.68, 0.90):
        assert coverage(heavy, t_coverage * sigma, level) == pytest.approx(level, abs=0.03)
    # Read as Gaussian, Laplace errors over-fill the 68 % interval (peaked) and under-fill the 95 %
    # one (heavy tails): 1 − exp(−√2·z) at z = 0.9945 and 1.96.
    assert coverage(errors, sigma, 0.68, "gaussian") == pytest.approx(1 - math.exp(-math.sqrt(2) * 0.994458), abs=0.01)
    assert coverage(errors, sigma, 0.95, "gaussian") == pytest.approx(1 - math.exp(-math.sqrt(2) * 1.959964), abs=0.01)
    gaussian = np.random.default_rng(1).normal(0.0, sigma)
    for method in ("coverage", "likelihood"):
        assert fit_temperature(gaussian, sigma / 2, "gaussian", method) == pytest.approx(2.0, rel=0.02)


def test_spearman_is_one_for_proportional_sigma_and_near_zero_for_independent_sigma():
    errors, sigma = _laplace(50_000)
    assert calibration_metrics(errors, 0.7 * np.abs(errors) + 1e-9)["spearman"] == pytest.approx(1.0)
    independent = np.random.default_rng(5).uniform(0.5, 2.0, errors.size)
    assert abs(calibration_metrics(errors, independent)["spearman"]) < 0.02


def test_spearman_if_exact_is_what_errors_drawn_from_sigma_reach():
    # σ spread over a factor of 8: errors really drawn from it reach the reference, up to sampling
    sigma = np.random.default_rng(2).uniform(0.25, 2.0, 50_000)
    for distribution in ("laplace", "gaussian"):
        drawn = np.random.default_rng(3).laplace(0.0, sigma / math.sqrt(2)) if distribution == "laplace" \
            else np.random.default_rng(3).normal(0.0, sigma)
        m = calibration_metrics(drawn, sigma, distribution)
        assert 0.3 < m["spearman_if_exact"] < 0.6  # a single draw scatters: far from 1
        assert m["spearman"] == pytest.approx(m["spearman_if_exact"], abs=0.015)
        assert spearman_if_exact(sigma, distribution) == m["spearman_if_exact"]  # a fixed seed
    # the same σ beside errors it knows nothing about: the same reference, a Spearman of 0
    shuffled = calibration_metrics(np.random.default_rng(4).permutation(drawn), sigma, "gaussian")
    assert abs(shuffled["spearman"]) < 0.02 and shuffled["spearman_if_exact"] > 0.3
    # errors whose scale grows as σ³: σ ranks them, but spreads too little, and beats the reference
    steep = calibration_metrics(np.random.default_rng(3).normal(0.0, sigma ** 3), sigma, "gaussian")
    assert steep["spearman"] > steep["spearman_if_exact"] + 0.2
    # a σ that varies less has a lower reference: ranking needs spread
    narrow = np.random.default_rng(2).uniform(0.9, 1.1, 50_000)
    assert spearman_if_exact(narrow) < 0.1 < spearman_if_exact(sigma)
    # σ ≤ 0 and NaN are left out, as everywhere else
    assert spearman_if_exact(np.r_[sigma, 0.0, np.nan, -1.0]) == pytest.approx(spearman_if_exact(sigma), abs=0.01)


def test_empty_constant_and_invalid_inputs_give_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = calibration_metrics(np.array([np.nan, 1.0]), np.array([1.0, -1.0]))
        assert empty["count"] == 0
        assert all(np.isnan(empty[k]) for k in ("coverage_68", "coverage_90", "coverage_95", "sharpness",
                                                "spearman", "spearman_if_exact", "mean_sigma", "mae"))
        constant = calibration_metrics(np.array([0.5, -1.0, 2.0, 0.1]), np.full(4, 2.0))
        assert constant["count"] == 4 and np.isnan(constant["spearman"]) and np.isnan(constant["spearman_if_exact"])
        assert constant["sharpness"] == 2.0 and constant["mae"] == pytest.approx(0.9)
        # e = 0.5 is inside the 68 % interval of σ = 2 (±1.61 m); 2.0 is not.
        assert constant["coverage_68"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="no pixel"):
        fit_temperature(np.array([1.0, np.inf]), np.array([0.0, 1.0]))


def test_difference_sigma_adds_variances_less_the_covariance():
    assert difference_sigma(3.0, 4.0) == pytest.approx(5.0)
    assert difference_sigma(np.array([3.0, 1.0]), np.array([4.0, 1.0]), correlation=1.0) == pytest.approx([1.0, 0.0])
    assert difference_sigma(1.0, 1.0, correlation=-1.0) == pytest.approx(2.0)


def test_sigma_distribution_comes_from_the_tag(tmp_path):
    def write(name, **tags):
        path = tmp_path / name
        with rasterio.open(path, "w", driver="GTiff", height=4, width=4, count=1, dtype="float32",
                           crs="EPSG:32610", transform=from_origin(0, 4, 1, 1)) as dst:
            dst.write(np.ones((1, 4, 4), np.float32))
            dst.update_tags(**tags)
        return path

    assert read_sigma_distribution(write("refine.tif", **{SIGMA_TAG: "laplace"})) == "laplace"
    assert read_sigma_distribution(write("other.tif")) == "gaussian"
    with pytest.raises(InputError, match="odd.tif: unknown DEEPDEM_SIGMA_DISTRIBUTION 'student'"):
        read_sigma_distribution(write("odd.tif", **{SIGMA_TAG: "student"}))
