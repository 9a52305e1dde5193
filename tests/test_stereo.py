"""Stereo simulation: rendering with occlusions, SGBM matching, triangulation, mapprojection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage, stats

from deepdem.stereo import StereoResult, base_to_height, simulate_stereo

RES = 0.5  # metres
MARGIN = 16  # px of scene border left out of the statistics (SGBM's and the renderer's edges)


@dataclass(frozen=True)
class View:
    """Stand-in for ``deepdem.synth.View``: ``simulate_stereo`` only reads these two attributes."""

    azimuth: float
    off_nadir: float


VIEWS = (View(250.0, 22.0), View(80.0, 18.0))


def kx(view) -> float:
    """Image columns of displacement per metre of height (a ground point appears at x − z·kx)."""
    return math.tan(math.radians(view.off_nadir)) * math.sin(math.radians(view.azimuth)) / RES


K_LEFT, K_RIGHT = kx(VIEWS[0]), kx(VIEWS[1])
PARALLAX = K_RIGHT - K_LEFT  # px of disparity per metre above the reference height
BH = abs(PARALLAX) * RES
MATCH_NOISE_M = RES / BH * 0.25  # a quarter-pixel of disparity, in metres of height


def texture(shape, seed=0) -> np.ndarray:
    """Strong-contrast texture in 0–1: gaussian-filtered white noise (sigma 1 px)."""
    t = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.0)
    return (t - t.min()) / (t.max() - t.min())


def interior(a: np.ndarray) -> np.ndarray:
    return a[MARGIN:-MARGIN, MARGIN:-MARGIN]


def box_scene(box, height, texture_seed, noise_seed, size=200):
    """Flat ground at 100 m with a box ``height`` m high on ``box``, and its simulated pair."""
    truth = np.full((size, size), 100.0)
    truth[box] += height
    return truth, simulate_stereo(truth, texture(truth.shape, texture_seed), RES, VIEWS, np.random.default_rng(noise_seed))


@pytest.fixture(scope="module")
def flat():
    truth = np.full((192, 192), 100.0)
    return truth, simulate_stereo(truth, texture(truth.shape), RES, VIEWS, np.random.default_rng(1))


# A 20 × 20 m block, 10 m high, on flat ground at 100 m.
BLOCK = (slice(80, 120), slice(80, 120))
BLOCK_HEIGHT = 10.0


@pytest.fixture(scope="module")
def block():
    return box_scene(BLOCK, BLOCK_HEIGHT, 2, 3)


def test_geometry_of_the_default_pair():
    assert base_to_height(VIEWS) == pytest.approx(BH)
    assert BH == pytest.approx(0.6996, abs=1e-3)
    assert MATCH_NOISE_M == pytest.approx(0.179, abs=1e-3)


def test_flat_plane_is_matched_within_matching_noise(flat):
    truth, r = flat
    assert isinstance(r, StereoResult)
    for name in ("dsm", "ortho_left", "ortho_right", "triangulation_error", "disparity_px"):
        a = getattr(r, name)
        assert a.shape == truth.shape and a.dtype == np.float32, name
    dsm = interior(r.dsm)
    matched = np.isfinite(dsm).mean()
    err = np.abs(dsm - 100.0)
    assert matched >= 0.9
    assert np.nanmedian(err) < MATCH_NOISE_M
    assert np.nanmean(err) < MATCH_NOISE_M
    assert np.nanmedian(np.abs(interior(r.disparity_px))) < 0.25


def test_orthos_are_nan_free_dn_and_registered_to_the_ground(flat, block):
    for truth, r in (flat, block):
        for ortho in (r.ortho_left, r.ortho_right):
            assert np.isfinite(ortho).all()
            assert 0.0 <= ortho.min() and ortho.max() <= 2200.0 and ortho.max() > 1000.0
    # Through the matched DSM both views land on the ground where the radiance is, roof included:
    # a wrong projection sign would shift the roof by 2·10 m·tan θ ≈ 15 px and decorrelate it.
    truth, r = block
    rad = texture(truth.shape, 2)
    roof = (slice(86, 114), slice(86, 114))
    for ortho in (r.ortho_left, r.ortho_right):
        assert np.corrcoef(ortho[roof].ravel(), rad[roof].ravel())[0, 1] > 0.9
    assert np.corrcoef(interior(r.ortho_left).ravel(), interior(r.ortho_right).ravel())[0, 1] > 0.8


def test_parallax_of_a_block_matches_its_height(block):
    truth, r = block
    # Left-frame columns of the roof's interior: a roof point x appears at x − 10 m·kx_left.
    shift = BLOCK_HEIGHT * K_LEFT
    c0, c1 = int(math.ceil(86 - shift)), int(math.floor(113 - shift))
    roof_disp = r.disparity_px[86:114, c0 : c1 + 1]
    assert np.isfinite(roof_disp).mean() > 0.95
    assert np.nanmedian(np.abs(roof_disp - BLOCK_HEIGHT * PARALLAX)) < 0.5
    assert BLOCK_HEIGHT * PARALLAX == pytest.approx(14.0, abs=0.05)

    open_ground = np.ones(truth.shape, dtype=bool)
    open_ground[50:150, 50:150] = False
    open_ground[:MARGIN] = open_ground[-MARGIN:] = False
    open_ground[:, :MARGIN] = open_ground[:, -MARGIN:] = False
    assert np.nanmedian(np.abs(r.disparity_px[open_ground])) < 0.5

    err = np.abs(r.dsm - truth)
    roof = np.zeros(truth.shape, dtype=bool)
    roof[86:114, 86:114] = True
    assert np.isfinite(r.dsm[roof]).mean() > 0.95
    assert np.nanmedian(err[roof]) < 0.5
    assert np.nanmedian(err[open_ground]) < 0.5
    assert np.nanmean(err[roof]) < MATCH_NOISE_M


def test_tilted_plane_gives_sub_pixel_heights():
    rows, cols = np.mgrid[0:160, 0:160]
    truth = 100.0 + 0.06 * cols + 0.02 * rows  # parallax varies continuously, off the pixel grid
    r = simulate_stereo(truth, texture(truth.shape, 4), RES, VIEWS, np.random.default_rng(5))
    err = interior(r.dsm - truth)
    assert np.isfinite(err).mean() > 0.95
    assert abs(np.nanmedian(err)) < 0.05  # no bias from the renderer or the triangulation sign
    assert np.nanmedian(np.abs(err)) < MATCH_NOISE_M


# A 25 m tower: the left satellite (west) cannot see ~19 px of ground east of it, the right one
# (east) ~16 px west of it.
TOWER = (slice(70, 130), slice(90, 110))
TOWER_HEIGHT = 25.0


@pytest.fixture(scope="module")
def tower():
    return box_scene(TOWER, TOWER_HEIGHT, 6, 7)


def test_occluded_ground_next_to_a_wall_is_a_hole_or_an_error(tower):
    truth, r = tower
    bad = np.isnan(r.dsm) | (np.abs(r.dsm - truth) > 0.5)
    rows = slice(75, 125)
    east_band = bad[rows, 110:113]  # 3 px beside the east wall, hidden from the left view
    west_band = bad[rows, 87:90]  # 3 px beside the west wall, hidden from the right view
    open_ground = bad[MARGIN:60, MARGIN:-MARGIN]
    assert open_ground.mean() < 0.05
    assert east_band.mean() > 0.5 and west_band.mean() > 0.5
    # The east hole is as wide as the occlusion: 25 m · |kx_left| ≈ 19 px.
    hidden = TOWER_HEIGHT * abs(K_LEFT)
    hole = np.isnan(r.dsm[rows, 110 : 110 + 40]).sum(axis=1)
    assert abs(np.median(hole) - hidden) <= 3


@pytest.fixture(scope="module")
def town():
    rng = np.random.default_rng(8)
    n = 256
    truth = 100.0 + 80.0 * ndimage.gaussian_filter(rng.normal(size=(n, n)), 25.0)
    for _ in range(25):
        y, x = rng.integers(10, n - 50, size=2)
        a, b = rng.integers(12, 40, size=2)
        truth[y : y + a, x : x + b] += rng.uniform(4.0, 25.0)
    radiance = texture((n, n), 9)
    radiance[180:230, 20:120] = 0.3  # water: no texture, only sensor noise
    return truth, radiance, simulate_stereo(truth, radiance, RES, VIEWS, np.random.default_rng(10))


def test_triangulation_error_marks_the_bad_matches(town):
    truth, _, r = town
    tri = r.triangulation_error
    valid = np.isfinite(r.dsm)
    np.testing.assert_array_equal(np.isnan(tri), ~valid)
    assert (tri[valid] >= 0).all()
    err = np.abs(r.dsm - truth)
    rho, p = stats.spearmanr(tri[valid], err[valid])
    assert rho > 0.1 and p < 1e-6
    # The worst tenth by tri is worse than the best tenth.
    t = tri[valid]
    e = err[valid]
    assert np.median(e[t >= np.quantile(t, 0.9)]) > 2 * np.median(e[t <= np.quantile(t, 0.1)])


def test_water_and_occlusions_leave_holes(town):
    truth, _, r = town
    valid = np.isfinite(r.dsm)
    assert np.isfinite(r.disparity_px).mean() < 0.95
    water = valid[185:225, 25:115]
    assert water.mean() < 0.7  # textureless: most of it fails
    assert valid[MARGIN:-MARGIN, MARGIN:-MARGIN].mean() > 0.6  # 25 buildings up to 25 m tall
    assert np.nanmedian(np.abs(r.dsm - truth)) < MATCH_NOISE_M


def test_deterministic_for_a_seed(block):
    truth, r = block
    again = simulate_stereo(truth, texture(truth.shape, 2), RES, VIEWS, np.random.default_rng(3))
    np.testing.assert_array_equal(again.dsm, r.dsm)
    np.testing.assert_array_equal(again.ortho_right, r.ortho_right)


def test_rejects_bad_input():
    truth = np.full((64, 64), 10.0)
    tex = texture(truth.shape)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shape"):
        simulate_stereo(truth, tex[:-1], RES, VIEWS, rng)
    with pytest.raises(ValueError, match="block_size"):
        simulate_stereo(truth, tex, RES, VIEWS, rng, block_size=4)
    with pytest.raises(ValueError, match="base-to-height"):  # a north–south pair: no x parallax
        simulate_stereo(truth, tex, RES, (View(0.0, 20.0), View(180.0, 20.0)), rng)
    with pytest.raises(ValueError, match="finite"):
        bad = truth.copy()
        bad[3, 3] = np.nan
        simulate_stereo(bad, tex, RES, VIEWS, rng)
