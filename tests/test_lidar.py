"""LIDAR truth rasters: accuracy against IGN's own DSM/DTM, CRS and units, odd files, errors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import laspy
import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.transform import from_origin

from deepdem.lidar import Grid, OutlierParams, grid_lidar, read_las_crs
from deepdem.lidar.cli import add_lidar_parser
from deepdem.lidar.grid import tin_interpolate
from deepdem.lidar.products import OBJECT_BUILDING, OBJECT_NONE, OBJECT_VEGETATION
from deepdem.lidar.ground import smrf_object_mask

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPDEM_DATA", REPO / ".." / "shared" / "data"))
IGN = DATA / "ign_montpellier"
REF_DTM = IGN / "ref_DTM_77055_627760_50CM.tif"
REF_DSM = IGN / "ref_DSM_77055_627760_50CM.tif"
FT_US = 1200.0 / 3937.0


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set DEEPDEM_DATA)")
    return path


def run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    add_lidar_parser(parser.add_subparsers())
    args = parser.parse_args(["lidar", *map(str, argv), "--no-progress"])
    return args.func(args)


def read(path):
    with rasterio.open(path) as src:
        return src.read(1, masked=True), src


def diff_stats(ours: np.ndarray, ref_path: Path):
    with rasterio.open(ref_path) as src:
        ref = src.read(1)
        nodata = src.nodata
    both = np.isfinite(ours) & (ref != nodata)
    d = ours[both] - ref[both]
    return np.abs(d).mean(), np.median(np.abs(d)), int(both.sum())


# ----------------------------------------------------------------------------- IGN accuracy


@pytest.fixture(scope="module")
def ign_products(tmp_path_factory):
    need(REF_DTM)
    out = tmp_path_factory.mktemp("ign") / "truth"
    # All six tiles, so that the reference tile's edges are interpolated across tile borders.
    code = run_cli([IGN, "--out", out, "--like", REF_DTM, "--chm"])
    assert code == 0
    return out


def test_ign_dtm_matches_reference(ign_products):
    dtm, src = read(ign_products / "dtm.tif")
    assert src.shape == (100, 100)
    assert src.transform.c == pytest.approx(770549.75) and src.transform.f == pytest.approx(6277600.25)
    mae, med, n = diff_stats(dtm.filled(np.nan), REF_DTM)
    assert n >= 9800  # nearly every cell: the edges are interpolated with the neighbour tiles
    assert mae <= 0.05, mae
    assert src.nodata == -9999


def test_ign_dsm_matches_reference(ign_products):
    dsm, _ = read(ign_products / "dsm.tif")
    mae, med, n = diff_stats(dsm.filled(np.nan), REF_DSM)
    assert n >= 9800
    assert med <= 0.10, med


def test_ign_density_and_chm(ign_products):
    density, _ = read(ign_products / "density.tif")
    # IGN LiDAR HD: ~24 points/m2 on this tile (all returns, noise-free classes).
    assert 15 < float(np.median(density.compressed())) < 60
    dsm, _ = read(ign_products / "dsm.tif")
    dtm, _ = read(ign_products / "dtm.tif")
    chm, _ = read(ign_products / "chm.tif")
    both = ~(dsm.mask | dtm.mask)
    np.testing.assert_allclose(chm[both], (dsm - dtm)[both], atol=1e-4)
    assert (ign_products / "lidar.json").exists()


def test_ground_filter_matches_ign_classes():
    """SMRF with the classes hidden, over the six-tile mosaic, vs IGN's own ground class."""
    need(IGN)
    by_class = grid_lidar([IGN], resolution=0.5, ground="class", progress=False)
    by_filter = grid_lidar([IGN], resolution=0.5, ground="filter", progress=False)
    both = np.isfinite(by_class.dtm) & np.isfinite(by_filter.dtm)
    assert both.sum() > 0.9 * both.size
    mae = np.abs(by_class.dtm[both] - by_filter.dtm[both]).mean()
    assert mae <= 0.15, mae
    assert by_filter.ground_source.startswith("SMRF")


def test_default_grid_edges_on_resolution_multiples():
    tile = need(IGN / "test_data_77055_627760_LA93_IGN69.laz")
    p = grid_lidar([tile], resolution=2.0, ground="class", progress=False)
    xmin, ymin, xmax, ymax = p.grid.bounds
    for v in (xmin, ymin, xmax, ymax):
        assert v / 2.0 == pytest.approx(round(v / 2.0))
    assert (xmin, ymax) == (770550.0, 6277600.0)
    assert p.grid.shape == (25, 25)


# ------------------------------------------------------------------------------- CRS, units


def test_crs_from_wkt_keys_and_citations():
    cases = {
        "coromandel_forest/points_test.laz": (2193, 1.0, 1.0, True),
        "autzen/autzen_trim.laz": (None, 0.3048, 0.3048, False),
        "odd_lidar/4_6_crop.las": (2903, FT_US, FT_US, False),
        "odd_lidar/subsampled_nimes.laz": (2154, 1.0, 1.0, False),
    }
    for rel, (epsg, xy, z, compound) in cases.items():
        path = need(DATA / rel)
        with laspy.open(path) as f:
            crs = read_las_crs(f.header, path)
        assert crs is not None, rel
        if epsg is not None:
            assert crs.horizontal.to_epsg() == epsg, rel
        assert crs.xy_to_m == pytest.approx(xy, rel=1e-9), rel
        assert crs.z_to_m == pytest.approx(z, rel=1e-9), rel
        assert crs.crs.is_compound == compound, rel


def test_autzen_feet_to_metres(tmp_path):
    path = need(DATA / "autzen" / "autzen_trim.laz")
    feet = grid_lidar([path], resolution=3.0, progress=False)
    metres = grid_lidar([path], resolution=1.0, crs="EPSG:32610", progress=False)
    assert pyproj.CRS(feet.grid.crs).axis_info[0].unit_name == "foot"
    with laspy.open(path) as f:
        zmax_ft = float(f.header.maxs[2])
    assert np.nanmax(feet.dsm) == pytest.approx(zmax_ft, abs=0.01)
    # Heights converted with the international foot.
    assert np.nanmax(metres.dsm) == pytest.approx(zmax_ft * 0.3048, abs=0.01)
    assert np.nanmedian(metres.dtm) == pytest.approx(np.nanmedian(feet.dtm) * 0.3048, abs=0.3)
    # Extent: ~1177 ft x 563 ft -> ~359 m x 171 m.
    w = metres.grid.bounds[2] - metres.grid.bounds[0]
    assert 355 < w < 372


def test_us_survey_feet_to_metres(tmp_path):
    path = need(DATA / "odd_lidar" / "4_6_crop.las")
    out = tmp_path / "nm"
    assert run_cli([path, "--out", out, "--resolution", 1, "--crs", "EPSG:26913"]) == 0
    dtm, src = read(out / "dtm.tif")
    assert src.crs.to_epsg() == 26913
    with laspy.open(path) as f:
        zmin, zmax = f.header.mins[2], f.header.maxs[2]
    # 7077.92..7139.70 US ft -> 2157.35..2176.18 m; the DTM lies within.
    assert dtm.min() >= zmin * FT_US - 0.05
    assert dtm.max() <= zmax * FT_US + 0.05
    assert dtm.min() == pytest.approx(zmin * FT_US, abs=0.5)
    # 200 ft square tile -> ~61 m (+1 cell of grid snapping and rotation).
    assert 60 <= src.width <= 64


# ----------------------------------------------------------------------------- odd files


@pytest.mark.parametrize("name", ["4_6_crop.las", "sample_lareunion_epsg2975.laz",
                                  "subsampled_nimes.laz"])
def test_odd_files(tmp_path, name):
    path = need(DATA / "odd_lidar" / name)
    out = tmp_path / "out"
    assert run_cli([path, "--out", out, "--resolution", 2]) == 0
    dtm, src = read(out / "dtm.tif")
    dsm, _ = read(out / "dsm.tif")
    assert dtm.count() > 0.8 * dtm.size
    both = ~(dtm.mask | dsm.mask)
    # A DTM never sits far above the highest return.
    assert np.percentile((dsm.data - dtm.data)[both], 1) > -0.5
    with laspy.open(path) as f:
        assert f.header.mins[2] - 1 <= dtm.min() and dtm.max() <= f.header.maxs[2] + 1


def test_nimes_ground_filter_is_used(tmp_path):
    path = need(DATA / "odd_lidar" / "subsampled_nimes.laz")
    p = grid_lidar([path], resolution=2.0, progress=False)
    assert "SMRF" in p.ground_source
    assert p.grid.crs.to_epsg() == 2154


def synthetic_las(path: Path, n=4000, crs=True, seed=0, spike=None):
    rng = np.random.default_rng(seed)
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([500000.0, 4000000.0, 0.0])
    if crs:
        header.add_crs(pyproj.CRS.from_epsg(32631))
    las = laspy.LasData(header)
    x = 500000 + rng.random(n) * 20
    y = 4000000 + rng.random(n) * 20
    z = 100 + 0.5 * (x - 500000) + rng.normal(0, 0.02, n)
    cls = np.full(n, 2, np.uint8)
    if spike is not None:
        x, y, z = np.r_[x, spike[0]], np.r_[y, spike[1]], np.r_[z, spike[2]]
        cls = np.r_[cls, 1].astype(np.uint8)
    las.x, las.y, las.z = x, y, z
    las.classification = cls
    las.return_number = np.ones(len(x), np.uint8)
    las.number_of_returns = np.ones(len(x), np.uint8)
    las.write(path)
    return path


def test_plane_dtm_is_exact_and_noise_classes_dropped(tmp_path):
    path = synthetic_las(tmp_path / "plane.las")
    las = laspy.read(path)
    # Mark a high point as noise (class 18): it must not reach the DSM.
    las.classification[0] = 18
    las.z[0] = 400.0
    las.write(path)
    p = grid_lidar([path], resolution=1.0, progress=False)
    gx, gy = p.grid.centres()
    truth = 100 + 0.5 * (gx - 500000)
    ok = np.isfinite(p.dtm)
    assert ok.sum() >= 0.9 * ok.size
    assert np.abs(p.dtm[ok] - truth[ok]).max() < 0.05
    assert np.nanmax(p.dsm) < 120


def test_object_class_tells_a_classified_roof_from_a_tree(tmp_path):
    path = synthetic_las(tmp_path / "plane.las", n=8000)
    las = laspy.read(path)
    x, y = np.asarray(las.x) - 500000, np.asarray(las.y) - 4000000
    roof, tree = (x < 8) & (y < 8), (x > 12) & (y > 12)
    classes = np.asarray(las.classification).copy()
    classes[roof], classes[tree] = 6, 5
    las.classification = classes
    las.write(path)
    p = grid_lidar([path], resolution=1.0, out_dir=tmp_path / "out", progress=False)
    gx, gy = p.grid.centres()
    gx, gy = gx - 500000, gy - 4000000
    inner_roof, inner_tree = (gx < 7) & (gy < 7), (gx > 13) & (gy > 13)  # cells wholly inside each
    assert (p.object_class[inner_roof] == OBJECT_BUILDING).all()
    assert (p.object_class[inner_tree] == OBJECT_VEGETATION).all()
    assert (p.object_class[(gx > 9) & (gx < 11)] == OBJECT_NONE).all()  # ground only
    assert (read(tmp_path / "out" / "object_class.tif")[0] == p.object_class).all()
    assert json.loads((tmp_path / "out" / "lidar.json").read_text())["object_class"] == "object_class.tif"
    # points classified ground and nothing else: no object class to tell, no raster
    unclassified = grid_lidar([synthetic_las(tmp_path / "ground.las")], resolution=1.0, out_dir=tmp_path / "g",
                              progress=False)
    assert unclassified.object_class is None and not (tmp_path / "g" / "object_class.tif").exists()


def test_relief_aware_outlier_filter(tmp_path):
    # A bird 60 m above a flat plane goes; the plane's own highest corner stays.
    path = synthetic_las(tmp_path / "bird.las", spike=(500010.2, 4000010.2, 170.0))
    plain = grid_lidar([path], resolution=1.0, progress=False)
    filt = grid_lidar([path], resolution=1.0, outliers=OutlierParams(), progress=False)
    assert np.nanmax(plain.dsm) == pytest.approx(170.0, abs=0.01)
    assert filt.outliers_removed == 1
    assert np.nanmax(filt.dsm) == pytest.approx(np.nanmax(plain.dsm[plain.dsm < 150]), abs=0.05)


def test_outlier_filter_keeps_real_peaks():
    # Steep real relief (Coromandel forest canopy): the local filter removes almost nothing
    # and keeps the tallest tree, where a global 3-sigma z-score cuts hundreds of real points.
    path = need(DATA / "coromandel_forest" / "points.laz")
    p = grid_lidar([path], resolution=1.0, outliers=OutlierParams(), progress=False)
    assert p.outliers_removed <= 0.001 * p.points_gridded
    pts = laspy.read(path)
    cls = np.asarray(pts.classification)
    keep = (cls != 7) & (cls != 18)
    z = np.asarray(pts.z)[keep]
    first = np.asarray(pts.return_number)[keep] <= 1
    global_cut = int(((z > z.mean() + 3 * z.std()) | (z < z.mean() - 3 * z.std())).sum())
    assert global_cut > 100
    assert np.nanmax(p.dsm) == pytest.approx(z[first].max(), abs=1e-3)


# -------------------------------------------------------------------------------- errors


def test_no_crs_is_an_error_unless_assigned(tmp_path, capsys):
    path = synthetic_las(tmp_path / "nocrs.las", crs=False)
    out = tmp_path / "out"
    assert run_cli([path, "--out", out, "--resolution", 1]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nocrs.las" in err and "CRS" in err
    assert not out.exists()
    assert run_cli([path, "--out", out, "--resolution", 1, "--crs", "EPSG:32631"]) == 0
    dtm, src = read(out / "dtm.tif")
    assert src.crs.to_epsg() == 32631 and dtm.count() > 300


@pytest.mark.parametrize("content", [b"", b"LASF" + b"\0" * 100, b"not a las file at all"])
def test_broken_files_give_one_line_errors(tmp_path, capsys, content):
    bad = tmp_path / "broken.laz"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert run_cli([bad, "--out", out, "--resolution", 1]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.laz" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_truncated_laz_no_partial_output(tmp_path, capsys):
    src = need(IGN / "test_data_77055_627760_LA93_IGN69.laz")
    bad = tmp_path / "truncated.laz"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out"
    assert run_cli([bad, "--out", out, "--resolution", 1]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated.laz" in err
    assert not out.exists()


def test_argument_errors(tmp_path, capsys):
    tile = need(IGN / "test_data_77055_627760_LA93_IGN69.laz")
    assert run_cli([tile, "--out", tmp_path / "a"]) == 2  # no resolution, no --like
    assert run_cli([tile, "--out", tmp_path / "b", "--resolution", 1, "--crs", "EPSG:4326"]) == 2
    assert run_cli([tmp_path / "missing.laz", "--out", tmp_path / "c", "--resolution", 1]) == 2
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert run_cli([empty, "--out", tmp_path / "d", "--resolution", 1]) == 2
    assert run_cli([tile, "--out", tmp_path / "e", "--resolution", 1,
                    "--bounds", 0, 0, 10, 10]) == 2  # no point inside
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5
    assert not any((tmp_path / n).exists() for n in "abcde")


# --------------------------------------------------------------------------------- pieces


def test_tin_respects_max_gap():
    grid = Grid(pyproj.CRS.from_epsg(32631), from_origin(0.0, 10.0, 1.0, 1.0), 10, 10)
    # Two point clusters 6 m apart: bridged with max_gap 8, not with max_gap 3.
    xs = np.r_[np.linspace(0, 2, 5).repeat(5), np.linspace(8, 10, 5).repeat(5)]
    ys = np.tile(np.linspace(0, 10, 5), 10)
    zs = xs * 1.0
    wide = tin_interpolate(xs, ys, zs, grid, max_gap=8)
    narrow = tin_interpolate(xs, ys, zs, grid, max_gap=3)
    assert np.isfinite(wide[:, 5]).all()
    np.testing.assert_allclose(wide[2:-2, 5], 5.5, atol=1e-9)
    assert np.isnan(narrow[:, 5]).all() and np.isfinite(narrow[2:-2, 1]).all()


def test_smrf_flags_a_building():
    z = np.zeros((60, 60)) + np.linspace(0, 3, 60)[None, :]  # 5 % slope ground
    z[20:35, 25:40] += 8.0  # 15 m building
    objects = smrf_object_mask(z, cell=1.0, slope=0.15, window=18.0)
    assert objects[20:35, 25:40].mean() > 0.95
    assert objects[:15].mean() < 0.01
