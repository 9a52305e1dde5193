import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from deepdem.errors import GridError, InputError
from deepdem.io import FLOAT32_MIN
from deepdem.prepare import equalize_image, prepare_scene


def test_prepared_scene_is_on_the_dsm_grid(prepared_scene, synth_dir):
    with rasterio.open(synth_dir / "run-DEM.tif") as dem:
        assert prepared_scene.crs == dem.crs
        assert prepared_scene.transform == dem.transform
        assert prepared_scene.shape == dem.shape
        dem_nodata = (dem.read(1) == FLOAT32_MIN).sum()
    # ASP's float32-min nodata is honoured, not read as a height
    assert np.isnan(prepared_scene.read("dsm")).sum() == dem_nodata
    assert prepared_scene.statistics("dsm")["min"] > 0


def test_mask_is_valid_in_every_input_band(prepared_scene):
    mask = prepared_scene.read("nodata_mask") > 0
    expected = np.ones(prepared_scene.shape, bool)
    for band in ("dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi"):
        expected &= np.isfinite(prepared_scene.read(band))
    np.testing.assert_array_equal(mask, expected)
    assert 0.5 < mask.mean() < 0.99


def test_bands_have_expected_ranges(prepared_scene):
    for band in ("ortho_left", "ortho_right"):
        values = prepared_scene.read(band)
        assert np.nanmin(values) >= 0 and np.nanmax(values) <= 1
        assert np.nanstd(values) > 0.15  # equalised
    ndvi = prepared_scene.read("ndvi")
    assert -1 <= np.nanmin(ndvi) and np.nanmax(ndvi) <= 1
    assert np.isfinite(ndvi).all()  # 2 m NDVI covers the whole 1 m grid after resampling
    assert prepared_scene.has("truth_dsm") and prepared_scene.has("truth_dtm")
    assert set(prepared_scene.scale_factors) == {64, 128}


def test_equalisation_keeps_nodata_and_ignores_it():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, size=(128, 128)).astype(np.float32)
    image[:10] = np.nan
    out = equalize_image(image)
    assert np.isnan(out[:10]).all() and np.isfinite(out[10:]).all()
    assert out[10:].min() >= 0 and out[10:].max() <= 1


def _write(path, data, transform, nodata=None, crs="EPSG:32610"):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data, 1)
    return path


def _inputs(synth_dir):
    return dict(dsm=synth_dir / "run-DEM.tif", ortho_left=synth_dir / "left_ortho.tif",
                ortho_right=synth_dir / "right_ortho.tif", triangulation_error=synth_dir / "run-IntersectionErr.tif")


def test_missing_file_is_named_and_nothing_is_written(synth_dir, tmp_path):
    inputs = _inputs(synth_dir) | {"ortho_right": tmp_path / "nope.tif"}
    with pytest.raises(InputError, match="nope.tif: ortho right file not found"):
        prepare_scene(**inputs, out=tmp_path / "scene")
    assert not (tmp_path / "scene").exists()


def test_all_nodata_dsm_is_refused(synth_dir, tmp_path):
    empty = _write(tmp_path / "empty.tif", np.full((50, 50), FLOAT32_MIN, np.float32), from_origin(590000, 5400000, 1, 1), FLOAT32_MIN)
    with pytest.raises(InputError, match="empty.tif: DSM has no valid pixel"):
        prepare_scene(**(_inputs(synth_dir) | {"dsm": empty}), out=tmp_path / "scene")
    assert not (tmp_path / "scene").exists()


def test_rasters_that_do_not_overlap_are_refused(synth_dir, tmp_path):
    far = _write(tmp_path / "far.tif", np.ones((50, 50), np.float32), from_origin(100000, 1000000, 1, 1))
    with pytest.raises(GridError, match="far.tif: does not overlap the DSM"):
        prepare_scene(**(_inputs(synth_dir) | {"triangulation_error": far}), out=tmp_path / "scene")
    assert not list(tmp_path.glob("scene*"))
