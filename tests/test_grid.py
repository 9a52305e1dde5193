"""The one raster grid type: the Scene contract's grid and LIDAR gridding's are the same."""

import json

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

import deepdem.lidar
import deepdem.scene
from deepdem.errors import InputError
from deepdem.grid import Grid


def test_scene_and_lidar_export_the_same_grid():
    assert deepdem.scene.Grid is Grid and deepdem.lidar.Grid is Grid


def test_from_bounds_snaps_edges_to_the_resolution_and_holds_a_rasterio_crs():
    grid = Grid.from_bounds((10.2, 20.7, 14.9, 23.0), 0.5, pyproj.CRS.from_epsg(2154))
    assert isinstance(grid.crs, CRS) and grid.crs.to_epsg() == 2154
    assert grid.bounds == (10.0, 20.5, 15.0, 23.0)
    assert grid.shape == (5, 10) and grid.size == 50 and grid.res == 0.5
    shifted = Grid.from_bounds((10.2, 20.7, 14.9, 23.0), 0.5, "EPSG:2154", anchor=(0.25, 0.25))
    assert shifted.bounds == (9.75, 20.25, 15.25, 23.25)
    with pytest.raises(InputError, match="resolution must be positive"):
        Grid.from_bounds((0, 0, 1, 1), 0, "EPSG:2154")


def test_scene_json_round_trip_is_unchanged():
    stored = {"crs": CRS.from_epsg(32610).to_wkt(), "transform": [0.5, 0.0, 590000.0, 0.0, -0.5, 5400000.0],
              "height": 96, "width": 80}
    grid = Grid.from_json(stored)
    assert json.dumps(grid.to_json()) == json.dumps(stored)
    assert grid.resolution == (0.5, 0.5) and grid.shape == (96, 80)


def test_res_needs_north_up_square_pixels_but_resolution_does_not():
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1.0, 2.0), 10, 10)
    assert grid.resolution == (1.0, 2.0)
    with pytest.raises(InputError, match="north-up with square pixels"):
        grid.res


def test_pixel_size_is_in_metres_whatever_the_crs_unit():
    assert Grid(CRS.from_epsg(32610), from_origin(0, 100, 0.5, 0.5), 10, 10).pixel_size_m == 0.5
    # EPSG:2903 (New Mexico) is in US survey feet: 3 ft = 0.9144 m
    assert Grid(CRS.from_epsg(2903), from_origin(0, 100, 3.0, 3.0), 10, 10).pixel_size_m == pytest.approx(0.9144018)
    assert Grid(CRS.from_epsg(32610), from_origin(0, 100, 1.0, 4.0), 10, 10).pixel_size_m == 2.0  # geometric mean
    assert Grid(CRS.from_epsg(4326), from_origin(0, 1, 0.001, 0.001), 10, 10).pixel_size_m is None  # degrees
    assert Grid(None, from_origin(0, 100, 1.0, 1.0), 10, 10).pixel_size_m is None


def test_like_copies_a_rasters_grid_and_refuses_other_pixels(tmp_path):
    profile = dict(driver="GTiff", width=8, height=6, count=1, dtype="float32", crs="EPSG:32631")
    with rasterio.open(tmp_path / "a.tif", "w", transform=from_origin(100, 200, 2, 2), **profile) as dst:
        dst.write(np.zeros((1, 6, 8), np.float32))
    grid = Grid.like(tmp_path / "a.tif")
    assert grid.crs.to_epsg() == 32631 and grid.shape == (6, 8) and grid.bounds == (100, 188, 116, 200)
    with rasterio.open(tmp_path / "b.tif", "w", transform=from_origin(100, 200, 2, 1), **profile) as dst:
        dst.write(np.zeros((1, 6, 8), np.float32))
    with pytest.raises(InputError, match="b.tif: --like raster must be north-up with square pixels"):
        Grid.like(tmp_path / "b.tif")
