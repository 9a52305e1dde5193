import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

import deepdem.products as products
from deepdem.cli import main
from deepdem.io import write_raster

NODATA = -9999.0


@pytest.fixture
def dem(tmp_path):
    rows, cols = np.mgrid[0:300, 0:280].astype(np.float32)
    data = (50 + 0.2 * cols + 5 * np.sin(rows / 20.0)).astype(np.float32)
    data[100:110, 50:60] = NODATA
    return write_raster(tmp_path / "dem.tif", data, from_origin(0, 300, 1, 1), CRS.from_epsg(32610), NODATA), data


def test_flat_dem_hillshade_is_the_sine_of_the_sun_altitude():
    flat = np.zeros((20, 20))
    assert products.hillshade(flat, 1.0, altitude=30.0) == pytest.approx(np.full((20, 20), 0.5))
    assert products.slope_degrees(flat, 1.0).max() == 0.0


def test_slope_of_a_plane_in_degrees():
    plane = np.tile(np.arange(10.0), (10, 1))  # rises 1 m per 1 m eastwards
    assert products.slope_degrees(plane, 1.0) == pytest.approx(np.full((10, 10), 45.0))
    assert products.slope_degrees(plane, 2.0) == pytest.approx(np.full((10, 10), np.degrees(np.arctan(0.5))))


def test_streamed_hillshade_equals_the_whole_array(dem, tmp_path, monkeypatch):
    path, data = dem
    monkeypatch.setattr(products, "PRODUCT_BLOCK", 64)  # many windows on a small raster
    for multi in (False, True):
        out = products.hillshade_raster(path, tmp_path / f"hs{multi}.tif", multidirectional=multi)
        arr = np.where(data == NODATA, np.nan, data)
        whole = products.multidirectional_hillshade(arr, 1.0) if multi else products.hillshade(arr, 1.0)
        with rasterio.open(out) as src:
            shade = src.read(1)
            assert src.nodata == 0 and src.dtypes == ("uint8",) and src.transform == from_origin(0, 300, 1, 1)
        np.testing.assert_array_equal(shade, products._to_byte(whole))
        assert (shade[100:110, 50:60] == 0).all() and shade[150, 150] > 0


def test_streamed_slope_and_canopy_height(dem, tmp_path, monkeypatch):
    path, data = dem
    monkeypatch.setattr(products, "PRODUCT_BLOCK", 64)
    with rasterio.open(products.slope_raster(path, tmp_path / "slope.tif")) as src:
        slope = src.read(1)
    expected = products.slope_degrees(np.where(data == NODATA, np.nan, data), 1.0)
    np.testing.assert_allclose(slope, np.where(np.isfinite(expected), expected, NODATA), atol=1e-4)
    dtm = write_raster(tmp_path / "dtm.tif", np.where(data == NODATA, NODATA, data - 12.5).astype(np.float32),
                       from_origin(0, 300, 1, 1), CRS.from_epsg(32610), NODATA)
    with rasterio.open(products.canopy_height_raster(path, dtm, tmp_path / "chm.tif")) as src:
        chm = src.read(1)
    assert (chm[data != NODATA] == 12.5).all() and (chm[data == NODATA] == NODATA).all()


def test_hillshade_command(dem, tmp_path, capsys):
    path, _ = dem
    assert main(["hillshade", "--dem", str(path), "--out", str(tmp_path / "h.tif"), "--multidirectional",
                 "--slope", str(tmp_path / "s.tif")]) == 0
    assert (tmp_path / "h.tif").exists() and (tmp_path / "s.tif").exists()
