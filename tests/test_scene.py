import json

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from deepdem.errors import InputError
from deepdem.scene import FLOAT_NODATA, Grid, Scene, compute_scale_factors, write_scene


def plane(shape, slope, resolution=1.0):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (100.0 + slope * cols * resolution).astype(np.float32)


def test_scale_factor_of_a_plane_is_its_known_std():
    # Every chip of z = a·x has the std of a uniform ramp of n samples: a·sqrt((n²−1)/12).
    dsm = plane((300, 300), slope=0.5)
    factors = compute_scale_factors(dsm, np.ones(dsm.shape, bool), chip_sizes=(64, 128, 256))
    for n in (64, 128, 256):
        assert factors[n] == pytest.approx(0.5 * np.sqrt((n * n - 1) / 12), rel=1e-6)


def test_scale_factor_ignores_nodata_and_skips_chips_larger_than_the_scene():
    dsm = plane((200, 200), slope=0.25)
    valid = np.ones(dsm.shape, bool)
    dsm[:, 150:] = -1e6  # garbage under nodata must not count
    valid[:, 150:] = False
    factors = compute_scale_factors(dsm, valid, chip_sizes=(64, 128, 256))
    assert set(factors) == {64, 128}
    # chips are >= 50 % valid: the valid part of a chip is a ramp of at most n columns
    assert 0 < factors[64] <= 0.25 * np.sqrt((64**2 - 1) / 12) + 1e-6


def test_scale_factor_trims_outlier_chips():
    rng = np.random.default_rng(0)
    dsm = rng.normal(0, 1.0, size=(512, 512)).astype(np.float32)
    dsm[:64, :64] += rng.normal(0, 50.0, size=(64, 64)).astype(np.float32)  # a blunder field
    factors = compute_scale_factors(dsm, np.ones(dsm.shape, bool), chip_sizes=(64,))
    assert factors[64] == pytest.approx(1.0, abs=0.02)


def test_scene_round_trip_keeps_crs_transform_and_nodata(tmp_path):
    crs = CRS.from_epsg(32610)
    transform = from_origin(590000.0, 5400000.0, 0.5, 0.5)
    grid = Grid(crs, transform, 96, 80)
    dsm = plane(grid.shape, 0.1)
    dsm[10:20, 10:20] = np.nan
    write_scene(tmp_path / "s", grid, {"dsm": dsm, "ortho_left": np.full(grid.shape, 0.5, np.float32)})

    reopened = Scene.open(tmp_path / "s")
    assert reopened.crs == crs
    assert reopened.transform == transform
    assert reopened.shape == (96, 80)
    with rasterio.open(reopened.band_path("dsm")) as src:
        assert src.nodata == FLOAT_NODATA
        assert src.crs == crs and src.transform == transform
        assert (src.read(1) == FLOAT_NODATA).sum() == 100
    data = reopened.read("dsm")
    assert np.isnan(data).sum() == 100
    np.testing.assert_array_equal(data[30:40, 30:40], dsm[30:40, 30:40])
    mask = reopened.read("nodata_mask")
    assert mask.sum() == 96 * 80 - 100  # mask = valid in every input band
    assert reopened.statistics("dsm")["count"] == 96 * 80 - 100
    assert set(reopened.scale_factors) == {64}
    manifest = json.loads((tmp_path / "s" / "scene.json").read_text())
    assert CRS.from_wkt(manifest["grid"]["crs"]) == crs


def test_scene_windowed_read_past_the_edge_is_nodata(tmp_path):
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 70, 70)
    scene = write_scene(tmp_path / "s", grid, {"dsm": plane(grid.shape, 1.0)})
    window = scene.read("dsm", Window(60, 60, 20, 20))
    assert window.shape == (20, 20)
    assert np.isfinite(window[:10, :10]).all() and np.isnan(window[10:, :]).all()


def test_reading_into_a_buffer_fills_it_like_a_fresh_read(tmp_path):
    """Refine reads bands into planes of one buffer: same values, NaN, padding and shape."""
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 70, 70)
    dsm = plane(grid.shape, 1.0)
    dsm[5:9, 5:9] = np.nan
    scene = write_scene(tmp_path / "s", grid, {"dsm": dsm, "ortho_left": np.full(grid.shape, 0.25, np.float32)})
    buffer = np.full((2, 30, 30), 7.0, np.float32)
    for band, plane_ in (("dsm", buffer[0]), ("nodata_mask", buffer[1])):
        for window in (Window(0, 0, 30, 30), Window(50, 50, 30, 30)):  # inside, and past the edge
            returned = scene.read(band, window, out=plane_)
            assert returned is plane_ and plane_.shape == (30, 30)
            np.testing.assert_array_equal(plane_, scene.read(band, window))
    assert np.isnan(buffer[0]).sum() == 30 * 30 - 20 * 20  # the padding: the window's last read
    assert buffer[1].sum() == 20 * 20
    with pytest.raises(ValueError, match="float32"):
        scene.read("dsm", Window(0, 0, 30, 30), out=np.empty((30, 30)))
    with pytest.raises(ValueError, match=r"dsm.tif: out has shape \(15, 15\), the window \(30, 30\)"):
        scene.read("dsm", Window(0, 0, 30, 30), out=buffer[0, :15, :15])


def test_opening_a_directory_that_is_not_a_scene_names_it(tmp_path):
    with pytest.raises(InputError, match="no scene.json"):
        Scene.open(tmp_path)
    with pytest.raises(InputError, match="not found"):
        Scene.open(tmp_path / "missing")


def test_bands_are_stored_with_the_predictor_of_their_kind(prepared_scene):
    """Equalised images without a predictor, smooth fields with the floating-point one."""
    expected = {"dsm": "3", "ortho_left": "1", "ortho_right": "1", "triangulation_error": "3", "ndvi": "3",
                "nodata_mask": "2"}
    for band, predictor in expected.items():
        with rasterio.open(prepared_scene.band_path(band)) as src:
            structure = src.tags(ns="IMAGE_STRUCTURE")
        assert (band, structure.get("COMPRESSION"), structure.get("PREDICTOR", "1")) == (band, "ZSTD", predictor)

