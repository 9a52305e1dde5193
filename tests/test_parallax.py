"""The parallax band: the DSM error measured as residual parallax between the two orthos."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from deepdem.errors import InputError
from deepdem.parallax import height_error_from_parallax, parallax_per_metre
from deepdem.scene import Scene
from deepdem.synth import View, fractal_surface, render_ortho

VIEWS = (View(250.0, 22.0), View(80.0, 18.0))  # the generator's default pair
RESOLUTION = 0.5


def _textured_pair(dz: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    radiance = 0.3 + 0.1 * fractal_surface(rng, dz.shape, beta=1.5) + 0.02 * rng.normal(size=dz.shape)
    return [render_ortho(radiance, dz, view, RESOLUTION) for view in VIEWS]


def _smooth_error(shape, seed=1, amplitude=2.0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 12)
    return amplitude * field / field.std()


def test_a_smooth_height_error_is_recovered_in_metres():
    dz = _smooth_error((160, 160))
    left, right = _textured_pair(dz)
    estimate = height_error_from_parallax(left, right, VIEWS, RESOLUTION)
    inner = (slice(16, -16), slice(16, -16))  # the flow's pyramid is unreliable at the border
    error = np.abs(estimate[inner] - dz[inner])
    assert np.mean(np.abs(dz[inner])) > 1.2
    assert np.mean(error) < 0.15 * np.mean(np.abs(dz[inner]))
    # the scale is right: a regression of the truth on the estimate has a slope of 1
    slope = np.polyfit(estimate[inner].ravel(), dz[inner].ravel(), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)


def test_no_error_no_parallax_whatever_the_gain_between_images():
    left, right = _textured_pair(np.zeros((96, 96)))
    estimate = height_error_from_parallax(left, 1.7 * right + 40.0, VIEWS, RESOLUTION)
    assert np.max(np.abs(estimate)) < 0.05


def test_nodata_in_either_image_is_nodata():
    left, right = _textured_pair(np.zeros((96, 96)))
    left[:10] = np.nan
    right[:, -7:] = np.nan
    estimate = height_error_from_parallax(left, right, VIEWS, RESOLUTION)
    assert np.isnan(estimate[:10]).all() and np.isnan(estimate[:, -7:]).all()
    assert np.isfinite(estimate[10:, :-7]).all()


def test_views_without_a_base_are_refused():
    with pytest.raises(InputError, match="base-to-height"):
        parallax_per_metre((View(90.0, 20.0), View(90.0, 20.0)), RESOLUTION)
    with pytest.raises(InputError, match="off-nadir"):
        parallax_per_metre((View(90.0, 75.0), View(270.0, 20.0)), RESOLUTION)


def test_prepare_adds_the_band_from_the_views_synth_recorded(prepared_scene, synth_dir):
    assert prepared_scene.has("parallax")
    views = json.loads((synth_dir / "synth.json").read_text())["config"]["views"]
    assert prepared_scene.manifest["provenance"]["parallax"]["views"] == views
    dz = prepared_scene.read("dsm") - prepared_scene.read("truth_dsm")
    parallax = prepared_scene.read("parallax")
    ok = np.isfinite(dz) & np.isfinite(parallax)
    # the band explains part of the generated error (holes, occlusions and blunders it cannot see)
    assert np.mean(np.abs(dz[ok] - parallax[ok])) < 0.85 * np.mean(np.abs(dz[ok]))
    assert np.corrcoef(dz[ok], parallax[ok])[0, 1] > 0.4


def test_cli_views_flag_adds_the_band_and_bad_angles_exit_2(synth_dir, tmp_path, capsys):
    from deepdem.cli import main

    base = ["prepare", "--asp-prefix", str(synth_dir / "run"), "--truth", str(synth_dir / "truth_dsm.tif")]
    assert main([*base, "--views", "250", "22", "80", "18", "--out", str(tmp_path / "scene")]) == 0
    assert Scene.open(tmp_path / "scene").has("parallax")
    assert main([*base, "--views", "250", "80", "80", "18", "--out", str(tmp_path / "bad")]) == 2
    assert "off-nadir" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_blocks_give_the_whole_scene_estimate_away_from_their_seams():
    dz = _smooth_error((300, 300))
    left, right = _textured_pair(dz)
    whole = height_error_from_parallax(left, right, VIEWS, RESOLUTION, block=1024)
    blocks = height_error_from_parallax(left, right, VIEWS, RESOLUTION, block=128)
    assert np.isfinite(blocks).all()
    # each block sees 64 px around it: the same flow, but for the pyramid's depth
    assert np.mean(np.abs(blocks - whole)) < 0.05 * np.mean(np.abs(dz))
