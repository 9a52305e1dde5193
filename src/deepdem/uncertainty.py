"""Per-pixel uncertainty σ: what it promises and how to check that promise.

``deepdem refine`` writes beside each refined DEM a raster ``<out stem>_sigma.tif``: for every
pixel σ, the standard deviation (m) of the predicted error distribution. The model's errors are
Laplace-distributed (heavy tails: stereo blunders, tree crowns), scale b = σ/√2; the raster says
so in its dataset tag :data:`SIGMA_TAG`. A σ raster from elsewhere (ASP, another model) is
usually a Gaussian standard deviation, so that is the default when the tag is missing.

Both readings share one number, σ, so that rasters can be compared and propagated the same way
(:func:`difference_sigma`); only the interval around a prediction depends on the distribution
(:func:`interval_half_width`). A σ is judged (:func:`calibration_metrics`) by:

* **coverage** — the share of errors inside the central 68/90/95 % intervals: a calibrated σ
  covers 68/90/95 %; more means σ is too large (pessimistic), less too small;
* **sharpness** — the median σ: among calibrated σs, the smaller the more useful;
* **Spearman** — the rank correlation of σ with |error|: does σ single out the bad pixels?
  Read it beside **Spearman if exact** (:func:`spearman_if_exact`): even a σ that is exactly
  right falls short of 1, by as much as the scatter of a single error drawn from it outweighs
  σ's spread across pixels. Below that reference, σ misses where the errors are; above it, σ
  ranks them but spreads too little (the errors grow faster from pixel to pixel than σ does).

This module is the one place of that math; numpy and scipy only.
"""

from __future__ import annotations

import math
import os

import numpy as np

DISTRIBUTIONS = ("laplace", "gaussian")
#: the GeoTIFF dataset tag naming the distribution a σ raster is the standard deviation of
SIGMA_TAG = "DEEPDEM_SIGMA_DISTRIBUTION"
#: the central intervals whose coverage is reported
LEVELS = (0.68, 0.90, 0.95)


def _check(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    return distribution


def interval_half_width(sigma, level: float, distribution: str = "laplace"):
    """Half-width of the central interval holding ``level`` of the mass of a zero-mean
    ``distribution`` whose standard deviation is ``sigma`` (scalar or array, same units).

    Laplace (scale b = σ/√2): −b·ln(1 − level); Gaussian: σ·Φ⁻¹((1 + level)/2).
    """
    _check(distribution)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if distribution == "laplace":
        factor = -math.log1p(-level) / math.sqrt(2)
    else:
        from scipy.special import ndtri

        factor = float(ndtri((1 + level) / 2))
    return np.asarray(sigma, dtype=np.float64) * factor if np.ndim(sigma) else float(sigma) * factor


def _pairs(errors, sigma) -> tuple[np.ndarray, np.ndarray]:
    """Errors and σ, flattened, where both are finite and σ > 0 (no distribution otherwise)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if e.shape != s.shape:
        raise ValueError(f"errors and sigma differ in size ({e.size} vs {s.size})")
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(e) & np.isfinite(s) & (s > 0)
    return e[keep], s[keep]


def _coverages(e: np.ndarray, s: np.ndarray, levels, distribution: str) -> np.ndarray:
    """Share of |e| ≤ half-width at each level, from the normalised error |e|/σ computed once."""
    if e.size == 0:
        return np.full(len(levels), np.nan)
    z = np.abs(e) / s
    return np.array([np.mean(z <= interval_half_width(1.0, float(lv), distribution)) for lv in levels])


def coverage(errors, sigma, level: float, distribution: str = "laplace") -> float:
    """Share (0–1) of pixels whose |error| lies within the central ``level`` interval of σ;
    NaN when no pixel has a finite error and a σ > 0."""
    e, s = _pairs(errors, sigma)
    return float(_coverages(e, s, (level,), _check(distribution))[0])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    # A rank correlation needs at least three points and variation on both sides; scipy would
    # warn and return NaN for constant input, and a report should not warn.
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def spearman_if_exact(sigma, distribution: str = "laplace", seed: int = 0) -> float:
    """The Spearman correlation of σ with |error| that σ would reach if it were exactly right.

    One error is drawn per pixel from a zero-mean ``distribution`` with standard deviation σ
    (a fixed ``seed``, so the value is reproducible), and ranked against σ. A single draw
    scatters around its σ (a Laplace error's |e| is exponential), so even the right σ stays well
    below 1, and only σ's spread between pixels sets how far: a σ that varies little has a low
    reference even when it is right. The measured ``spearman`` reads against it: close to it, σ
    ranks the pixels as a right σ would; below it, σ misses where the errors are; above it, the
    errors' scale varies more steeply than σ (σ ranks them but spreads too little).
    NaN as for ``spearman``; pixels with σ ≤ 0 or not finite are left out.
    """
    s = np.asarray(sigma, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore"):
        s = s[np.isfinite(s) & (s > 0)]
    return _spearman(s, np.abs(_draw_errors(s, _check(distribution), seed)))


def _draw_errors(sigma: np.ndarray, distribution: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # a local generator: numpy's global state stays the caller's
    if distribution == "laplace":
        return rng.laplace(0.0, sigma / math.sqrt(2))
    return rng.normal(0.0, sigma)


def calibration_metrics(errors, sigma, distribution: str = "laplace", levels=LEVELS) -> dict[str, float]:
    """How well σ describes the errors (DEM − truth), on pixels with a finite error and σ > 0.

    ``count``; ``coverage_68``, ``coverage_90``, ``coverage_95`` (one key per level, share 0–1
    of |e| within the central interval); ``sharpness`` (median σ, m); ``spearman`` (rank
    correlation of σ with |e|; NaN below 3 pixels or for constant input); ``spearman_if_exact``
    (what it would be if σ were exactly right, :func:`spearman_if_exact`); ``mean_sigma``; ``mae``. All NaN
    (count 0) when empty; never warns.
    """
    e, s = _pairs(errors, sigma)
    out: dict[str, float] = {"count": int(e.size)}
    for level, value in zip(levels, _coverages(e, s, levels, _check(distribution))):
        out[f"coverage_{round(100 * level)}"] = float(value)
    empty = e.size == 0
    out["sharpness"] = float("nan") if empty else float(np.median(s))
    out["spearman"] = _spearman(s, np.abs(e))
    out["spearman_if_exact"] = spearman_if_exact(s, distribution)
    out["mean_sigma"] = float("nan") if empty else float(np.mean(s))
    out["mae"] = float("nan") if empty else float(np.mean(np.abs(e)))
    return out


def reliability_curve(errors, sigma, distribution: str = "laplace",
                      levels=np.linspace(0.05, 0.95, 19)) -> tuple[np.ndarray, np.ndarray]:
    """(nominal, observed): the coverage of each central interval against its level; a
    calibrated σ lies on the diagonal. Observed is NaN when no pixel has a σ."""
    e, s = _pairs(errors, sigma)
    nominal = np.asarray(levels, dtype=np.float64)
    return nominal, _coverages(e, s, nominal, _check(distribution))


#: the ways of fitting the calibration factor (see :func:`fit_temperature`)
TEMPERATURE_METHODS = ("coverage", "likelihood")
#: the intervals whose coverage the "coverage" fit matches
CALIBRATION_LEVELS = (0.68, 0.90)


def fit_temperature(errors, sigma, distribution: str = "laplace", method: str = "coverage") -> float:
    """The single factor t that calibrates σ (t·σ) on these errors; t > 1: σ is too small.

    ``coverage`` (the default): t makes the central 68 % and 90 % intervals hold 68 % and 90 % of
    the errors (the geometric mean of the two factors that do so exactly, from quantiles of
    |e|/σ). ``likelihood``: the maximum-likelihood factor, t = mean(√2·|e|/σ) for a Laplace,
    sqrt(mean(e²/σ²)) for a Gaussian; real errors' tails are heavier than a Laplace's, so it
    widens every interval for the sake of the tails (on the real-terrain benchmark's held-out
    scenes its 68 % intervals held 53-86 % of the errors, over 73 % on 5 of 8 scenes).
    Pixels with a non-finite error or σ, or σ ≤ 0, are ignored; ValueError if none is left.
    """
    if method not in TEMPERATURE_METHODS:
        raise ValueError(f"method must be one of {', '.join(TEMPERATURE_METHODS)}, got {method!r}")
    e, s = _pairs(errors, sigma)
    if e.size == 0:
        raise ValueError("no pixel with a finite error and a σ > 0 to fit a temperature on")
    _check(distribution)
    if method == "coverage":
        z = np.abs(e) / s
        factors = [np.quantile(z, level) / interval_half_width(1.0, level, distribution) for level in CALIBRATION_LEVELS]
        return float(np.exp(np.mean(np.log(np.maximum(factors, np.finfo(float).tiny)))))
    if distribution == "laplace":
        return float(np.mean(math.sqrt(2) * np.abs(e) / s))
    return float(np.sqrt(np.mean((e / s) ** 2)))


def read_sigma_distribution(path: str | os.PathLike) -> str:
    """The distribution a σ GeoTIFF declares in :data:`SIGMA_TAG`, else "gaussian".

    An unknown value is an :class:`~deepdem.errors.InputError` naming the file: guessing would
    silently change every interval.
    """
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    from .errors import InputError
    from .io import open_raster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # only the tags are read here
        with open_raster(path) as src:
            value = src.tags().get(SIGMA_TAG)
    if value is None:
        return "gaussian"
    if value.strip().lower() not in DISTRIBUTIONS:
        raise InputError(f"unknown {SIGMA_TAG} {value!r} (expected {' or '.join(DISTRIBUTIONS)})", path)
    return value.strip().lower()


def difference_sigma(sigma_a, sigma_b, correlation: float = 0.0):
    """σ of the difference of two DEMs (elevation change dh = a − b) at each pixel:
    sqrt(σa² + σb² − 2ρ·σa·σb), ρ the correlation of their errors (0: independent).

    Per pixel only: the errors of neighbouring pixels are correlated, so the σ of an average
    over an area is larger than this divided by √n (use a variogram for that).
    """
    if not -1 <= correlation <= 1:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation!r}")
    a = np.asarray(sigma_a, dtype=np.float64)
    b = np.asarray(sigma_b, dtype=np.float64)
    # Rounding can leave a tiny negative variance when ρ = 1 and σa = σb.
    variance = np.maximum(a * a + b * b - 2 * correlation * a * b, 0.0)
    out = np.sqrt(variance)
    return out if out.ndim else float(out)
