"""The parallax band: the DSM error measured as residual parallax between the two orthos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from scipy import ndimage

from deepdem.errors import InputError
from deepdem.parallax import (fit_scene_geometry, fit_shift_per_metre, height_error_from_parallax, local_correlation,
                              shift_per_metre)
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
        shift_per_metre((View(90.0, 20.0), View(90.0, 20.0)))
    with pytest.raises(InputError, match="off-nadir"):
        shift_per_metre((View(90.0, 75.0), View(270.0, 20.0)))


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


def test_cli_views_from_worldview_metadata_match_the_same_angles_given(synth_dir, tmp_path, capsys):
    from deepdem.cli import main

    base = ["prepare", "--asp-prefix", str(synth_dir / "run")]
    for side, azimuth, elevation in (("left", 250.0, 68.0), ("right", 80.0, 72.0)):
        (tmp_path / f"{side}.XML").write_text(
            f"<isd><IMD><IMAGE><MEANSATAZ>{azimuth}</MEANSATAZ><MEANSATEL>{elevation}</MEANSATEL>"
            "<MEANOFFNADIRVIEWANGLE>19.0</MEANOFFNADIRVIEWANGLE></IMAGE></IMD></isd>")
    metadata = [str(tmp_path / "left.XML"), str(tmp_path / "right.XML")]
    assert main([*base, "--views-from", *metadata, "--out", str(tmp_path / "from")]) == 0
    assert "left 250.0°, 22.0°, right 80.0°, 18.0°" in capsys.readouterr().out
    assert main([*base, "--views", "250", "22", "80", "18", "--out", str(tmp_path / "given")]) == 0
    from_metadata, given = Scene.open(tmp_path / "from"), Scene.open(tmp_path / "given")
    assert from_metadata.manifest["provenance"]["parallax"]["views"] == given.manifest["provenance"]["parallax"]["views"]
    np.testing.assert_allclose(from_metadata.read("parallax"), given.read("parallax"), rtol=1e-5, equal_nan=True)
    # not both ways at once, and a file without the angles says so
    with pytest.raises(SystemExit) as both:
        main([*base, "--views", "250", "22", "80", "18", "--views-from", *metadata, "--out", str(tmp_path / "both")])
    assert both.value.code == 2 and "not allowed with" in capsys.readouterr().err
    (tmp_path / "other.XML").write_text("<Dimap_Document/>")
    assert main([*base, "--views-from", str(tmp_path / "other.XML"), metadata[1], "--out", str(tmp_path / "bad")]) == 2
    assert "other.XML: no meanSatAz or meanSatEl" in capsys.readouterr().err
    assert not (tmp_path / "both").exists() and not (tmp_path / "bad").exists()


def test_blocks_give_the_whole_scene_estimate_away_from_their_seams():
    dz = _smooth_error((300, 300))
    left, right = _textured_pair(dz)
    whole = height_error_from_parallax(left, right, VIEWS, RESOLUTION, block=1024)
    blocks = height_error_from_parallax(left, right, VIEWS, RESOLUTION, block=128)
    assert np.isfinite(blocks).all()
    # each block sees 64 px around it: the same flow, but for the pyramid's depth
    assert np.mean(np.abs(blocks - whole)) < 0.05 * np.mean(np.abs(dz))


# -- the orthos' local correlation ---------------------------------------------------------------

def test_the_orthos_correlate_where_the_dsm_is_right_and_not_where_it_is_wrong():
    dz = np.zeros((120, 120))
    dz[40:80, 40:80] = 8.0  # a block 8 m too high: 11.7 px of parallax for the generator's pair
    left, right = _textured_pair(dz)
    correlation = local_correlation(left, right)
    assert correlation.dtype == np.float32 and np.nanmin(correlation) >= -1 and np.nanmax(correlation) <= 1
    right_dsm, wrong_dsm = correlation[5:30, 5:30], correlation[45:75, 45:75]
    assert np.median(right_dsm) > 0.95
    assert np.median(wrong_dsm) < 0.4
    # a gain and an offset between the acquisitions change nothing
    np.testing.assert_allclose(local_correlation(left, 1.7 * right + 40.0), correlation, atol=1e-3)


def test_a_textureless_patch_is_not_read_as_agreement():
    rng = np.random.default_rng(0)
    left, right = _textured_pair(np.zeros((64, 64)))
    flat = np.full((64, 64), 0.3) + 1e-4 * rng.normal(size=(64, 64))  # water: noise alone
    left[20:44, 20:44], right[20:44, 20:44] = flat[20:44, 20:44], 0.3 + 1e-4 * rng.normal(size=(24, 24))
    assert np.abs(np.median(local_correlation(left, right)[25:39, 25:39])) < 0.1


def test_the_correlation_is_nodata_where_an_ortho_is_and_the_same_in_blocks():
    dz = _smooth_error((150, 150), amplitude=4.0)
    left, right = _textured_pair(dz)
    left[:10] = np.nan
    right[:, -7:] = np.nan
    whole = local_correlation(left, right, block=1024)
    assert np.isnan(whole[:10]).all() and np.isnan(whole[:, -7:]).all() and np.isfinite(whole[10:, :-7]).all()
    # each block reads its window's margin: the same values, seams included
    np.testing.assert_allclose(local_correlation(left, right, block=32), whole, atol=1e-5, equal_nan=True)


def test_the_correlation_of_a_scene_whose_valid_pixels_a_sample_would_miss_is_defined():
    left = np.full((2100, 2100), np.nan, dtype=np.float32)  # sampled every 2nd pixel for the floor
    right = left.copy()
    left[1001, 1001], right[1001, 1001] = 0.4, 0.6
    correlation = local_correlation(left, right)
    assert abs(correlation[1001, 1001]) < 1e-3 and np.isnan(correlation).sum() == correlation.size - 1


def test_prepare_stores_the_correlation_from_the_stored_orthos(prepared_scene):
    stored = prepared_scene.read("ortho_correlation")
    remade = local_correlation(prepared_scene.read("ortho_left"), prepared_scene.read("ortho_right"))
    np.testing.assert_allclose(stored, remade, atol=1e-6, equal_nan=True)
    dz = np.abs(prepared_scene.read("dsm") - prepared_scene.read("truth_dsm"))
    ok = np.isfinite(dz) & np.isfinite(stored)
    # the generated scene's largest errors are where the orthos disagree most
    large = dz[ok] > np.percentile(dz[ok], 90)
    assert np.median(stored[ok][large]) < np.median(stored[ok][~large]) - 0.1


# -- a pair whose angles were not given: the geometry fitted on the truth ---------------------

def test_the_pairs_geometry_is_recovered_from_shifts_that_follow_the_error():
    dz = _smooth_error((200, 200)).ravel()
    geometry = shift_per_metre(VIEWS)
    exact = fit_shift_per_metre(dz * geometry[0], dz * geometry[1], dz + 5.0)  # an offset shows no parallax
    assert exact == pytest.approx(geometry, rel=1e-6)
    # the flow's noise is correlated between its two components, as along edges
    rng = np.random.default_rng(2)
    along_edges = rng.normal(size=dz.size)
    noisy = fit_shift_per_metre(dz * geometry[0] + 0.8 * along_edges, dz * geometry[1] - 0.6 * along_edges, dz)
    angle = np.degrees(np.arctan2(noisy[1], noisy[0]) - np.arctan2(geometry[1], geometry[0]))
    assert abs(angle) < 5.0
    # the band is the best linear estimate: shrunk by the noise, so the vector is longer
    assert np.hypot(*noisy) > np.hypot(*geometry)


def test_shifts_that_do_not_follow_the_error_are_refused():
    rng = np.random.default_rng(3)
    dz = _smooth_error((120, 120)).ravel()
    with pytest.raises(InputError, match="does not follow"):
        fit_shift_per_metre(rng.normal(size=dz.size), rng.normal(size=dz.size), dz)
    with pytest.raises(InputError, match="at least"):
        fit_shift_per_metre(dz[:10], dz[:10], dz[:10])


@pytest.fixture(scope="module")
def scene_without_views(synth_dir, tmp_path_factory):
    from deepdem.prepare import prepare_from_asp_prefix

    return prepare_from_asp_prefix(synth_dir / "run", tmp_path_factory.mktemp("noviews") / "scene",
                                   truth=synth_dir / "truth_dsm.tif")


def test_a_scene_without_views_derives_the_band_from_its_shift(scene_without_views, prepared_scene):
    assert scene_without_views.stores_parallax_shift and not scene_without_views.has("parallax")
    assert scene_without_views.manifest["provenance"]["parallax"]["views"] is None
    geometry = fit_scene_geometry(scene_without_views)
    derived = scene_without_views.with_parallax_geometry(geometry)
    assert derived.has("parallax") and derived.sources("parallax") == ["parallax_shift_x", "parallax_shift_y"]
    dz = derived.read("dsm") - derived.read("truth_dsm")
    band, from_views = derived.read("parallax"), prepared_scene.read("parallax")
    ok = np.isfinite(dz) & np.isfinite(band) & np.isfinite(from_views)
    fitted_r = np.corrcoef(dz[ok], band[ok])[0, 1]
    # as good an estimate of the error as the band the views' angles give
    assert fitted_r > 0.4 and fitted_r > np.corrcoef(dz[ok], from_views[ok])[0, 1] - 0.03
    window = Window(20, 30, 64, 48)
    out = np.empty((48, 64), np.float32)
    assert derived.read("parallax", window, out=out) is out
    np.testing.assert_array_equal(out, band[30:78, 20:84])


def test_train_fits_the_geometry_and_refine_reads_an_unseen_scene_with_it(scene_without_views, synth_dir, tmp_path,
                                                                          caplog):
    from deepdem.models import load_checkpoint
    from deepdem.prepare import prepare_from_asp_prefix
    from deepdem.refine import refine
    from deepdem.train import train

    result = train([scene_without_views], tmp_path / "run", chip_size=64, batch_size=4, max_epochs=1,
                   samples_per_epoch=8, progress=False)
    kwargs = load_checkpoint(result.checkpoint).model_kwargs
    assert "parallax" in kwargs["bands"]
    assert kwargs["parallax_geometry"] == pytest.approx(fit_scene_geometry(scene_without_views))
    unseen = prepare_from_asp_prefix(synth_dir / "run", tmp_path / "unseen")  # no truth: refine's case
    with caplog.at_level("WARNING"):
        out = refine(result.checkpoint, unseen.path, tmp_path / "refined.tif", progress=False)
    assert "training pair's geometry" in caplog.text
    with rasterio.open(out) as refined:
        written = np.isfinite(refined.read(1, masked=True).filled(np.nan))
    np.testing.assert_array_equal(written, unseen.read("nodata_mask") > 0)


def test_no_parallax_stores_neither_band_and_refuses_views(synth_dir, tmp_path, capsys):
    from deepdem.cli import main

    base = ["prepare", "--asp-prefix", str(synth_dir / "run"), "--no-parallax"]
    assert main([*base, "--out", str(tmp_path / "scene")]) == 0
    scene = Scene.open(tmp_path / "scene")
    assert not scene.has("parallax") and not scene.stores_parallax_shift
    assert main([*base, "--views", "250", "22", "80", "18", "--out", str(tmp_path / "both")]) == 2
    assert "not both" in capsys.readouterr().err and not (tmp_path / "both").exists()


def test_training_records_the_geometry_a_caller_derived_the_band_with(scene_without_views, prepared_scene):
    from deepdem.train import _derive_parallax

    chosen = (0.8, -0.1)
    scenes, _, geometry = _derive_parallax([scene_without_views.with_parallax_geometry(chosen)], [])
    assert geometry == pytest.approx(list(chosen)) and scenes[0].has("parallax")
    # a scene that stores the band brings the geometry of the views it was measured with
    _, _, geometry = _derive_parallax([prepared_scene], [])
    assert geometry == pytest.approx(list(shift_per_metre(VIEWS)))
