import re

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from scipy import ndimage

from deepdem.errors import GridError, InputError
from deepdem.io import FLOAT32_MIN
from deepdem.prepare import equalize_image, prepare_scene, resample_scene
from deepdem.scene import Grid, write_scene


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


# --- ASP prefix discovery, resampling by kind, GeoTIFF layout ---------------------------------

import shutil

import pyproj
from rasterio.enums import Resampling

from deepdem.cli import main
from deepdem.prepare import ASP_PATTERNS, discover_asp_inputs, prepare_from_asp_prefix
from deepdem.scene import Scene

from conftest import shared_data_dir


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_asp_prefix_and_truth_are_enough(capsys, synth_dir, tmp_path):
    code, out, err = _cli(capsys, "prepare", "--asp-prefix", synth_dir / "run", "--truth", synth_dir / "truth_dsm.tif",
                          "--out", tmp_path / "scene")
    assert code == 0, err
    scene = Scene.open(tmp_path / "scene")
    # no --views: the orthos' shift, from which train derives the parallax band
    assert set(scene.bands) == {"dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask",
                                "truth_dsm", "parallax_shift_x", "parallax_shift_y", "ortho_correlation"}
    assert scene.stores_parallax_shift and not scene.has("parallax")
    inputs = scene.manifest["provenance"]["inputs"]
    assert inputs["ortho_left"].endswith("left_ortho.tif") and inputs["triangulation_error"].endswith("run-IntersectionErr.tif")
    with rasterio.open(synth_dir / "run-DEM.tif") as dem:
        assert scene.transform == dem.transform and scene.shape == dem.shape


def test_asp_patterns_find_mapproject_names_and_flags_override(synth_dir, tmp_path):
    run = tmp_path / "asp"
    run.mkdir()
    shutil.copy(synth_dir / "run-DEM.tif", run / "out-DEM.tif")
    shutil.copy(synth_dir / "run-IntersectionErr.tif", run / "out-IntersectionErr.tif")
    shutil.copy(synth_dir / "left_ortho.tif", run / "out-L-mapproj.tif")
    shutil.copy(synth_dir / "right_ortho.tif", run / "right_map.tif")
    shutil.copy(synth_dir / "right_ortho.tif", run / "out-R.tif")  # ASP's raw aligned image: never picked
    found = discover_asp_inputs(run / "out")
    assert found == {"dsm": run / "out-DEM.tif", "triangulation_error": run / "out-IntersectionErr.tif",
                     "ortho_left": run / "out-L-mapproj.tif", "ortho_right": run / "right_map.tif"}
    assert discover_asp_inputs(run) == found  # a directory with one *-DEM.tif
    assert "{prefix}-L-mapproj.tif" in ASP_PATTERNS["ortho_left"]
    scene = prepare_from_asp_prefix(run / "out", tmp_path / "scene", ortho_right=synth_dir / "left_ortho.tif")
    assert scene.manifest["provenance"]["inputs"]["ortho_right"].endswith("left_ortho.tif")
    np.testing.assert_array_equal(scene.read("ortho_left"), scene.read("ortho_right"))


def test_uncovered_area_becomes_nodata_not_zero(synth_dir, tmp_path):
    with rasterio.open(synth_dir / "left_ortho.tif") as src:
        data, profile = src.read(1), src.profile
        half = src.width // 2
        window = rasterio.windows.Window(0, 0, half, src.height)
        profile.update(width=half, transform=src.window_transform(window))
    partial = _write(tmp_path / "left_half.tif", data[:, :half], profile["transform"], profile["nodata"], profile["crs"])
    scene = prepare_scene(**(_inputs(synth_dir) | {"ortho_left": partial}), out=tmp_path / "scene")
    left = scene.read("ortho_left")
    assert np.isnan(left[:, half + 1:]).all()  # nothing is invented beyond the input
    assert (scene.read("nodata_mask")[:, half + 1:] == 0).all()
    assert np.isfinite(left[:, : half - 1]).mean() > 0.95
    with rasterio.open(scene.band_path("ortho_left")) as src:
        assert (src.read(1)[:, half + 1:] == -9999).all()


def test_resampling_follows_band_kind(synth_dir, tmp_path):
    # NDVI at 2 m on a 1 m grid: bilinear gives intermediate values; a class raster would stay on its values.
    scene = prepare_scene(**_inputs(synth_dir), ndvi=synth_dir / "ndvi.tif", out=tmp_path / "scene")
    with rasterio.open(synth_dir / "ndvi.tif") as src:
        coarse = src.read(1)
        native = set(np.unique(coarse[coarse != src.nodata]).round(5))
    values = scene.read("ndvi")
    assert np.mean([round(float(v), 5) not in native for v in values[np.isfinite(values)][::97]]) > 0.5
    mask = scene.read("nodata_mask")
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # a 0.25 m image onto 1 m is averaged (anti-aliasing), not bilinear-sampled
    from deepdem.prepare import resampling_for
    assert resampling_for("ortho_left", (0.25, 0.25), scene.grid) == Resampling.average
    assert resampling_for("ortho_left", (2.0, 2.0), scene.grid, "cubic") == Resampling.cubic
    assert resampling_for("nodata_mask", (0.25, 0.25), scene.grid) == Resampling.nearest


def test_prepared_geotiffs_are_tiled_compressed_with_overviews(prepared_scene):
    for band in prepared_scene.bands:
        with rasterio.open(prepared_scene.band_path(band)) as src:
            assert src.profile["tiled"] and src.compression is not None
            assert src.overviews(1) == [2], band  # 192 px: one overview level down to >= 64 px
            assert src.crs == prepared_scene.crs and src.descriptions[0]
            assert (src.nodata is None) == (band == "nodata_mask")


def test_target_grid_from_crs_and_resolution(synth_dir, tmp_path):
    scene = prepare_scene(**_inputs(synth_dir), out=tmp_path / "scene", resolution=2.0)
    assert scene.grid.resolution == (2.0, 2.0)
    assert scene.transform.c % 2.0 == 0 and scene.transform.f % 2.0 == 0  # edges on multiples of 2 m
    assert abs(scene.shape[0] - 96) <= 1 and abs(scene.shape[1] - 96) <= 1
    with rasterio.open(synth_dir / "run-DEM.tif") as dem:
        full = dem.read(1)
    assert np.nanmax(scene.read("dsm")) <= full.max() + 1e-3  # averaging never overshoots


# --- vertical datums ------------------------------------------------------------------------

def _rewrite(src_path, dst_path, crs=None, data=None, nodata="keep", dtype=None, transform=None):
    with rasterio.open(src_path) as src:
        profile = src.profile
        values = src.read(1) if data is None else data
    profile.update(driver="GTiff", count=1)
    if crs is not None:
        profile["crs"] = crs
    if nodata != "keep":
        profile["nodata"] = nodata
    if dtype:
        profile["dtype"] = dtype
    if transform is not None:
        profile["transform"] = transform
    profile.update(height=values.shape[0], width=values.shape[1])
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(values.astype(profile["dtype"]), 1)
    return dst_path


def test_vertical_units_are_converted_between_declared_references(synth_dir, tmp_path):
    # DSM heights in NAVD88 feet, truth in NAVD88 metres: PROJ converts without any grid.
    with rasterio.open(synth_dir / "run-DEM.tif") as src:
        metres = src.read(1)
    feet = np.where(metres == FLOAT32_MIN, metres, metres.astype(np.float64) / 0.3048).astype(np.float32)
    dsm = _rewrite(synth_dir / "run-DEM.tif", tmp_path / "dsm_ft.tif", crs=rasterio.crs.CRS.from_user_input(
        pyproj.CRS("EPSG:32610+8228").to_wkt()), data=feet)
    truth = _rewrite(synth_dir / "truth_dsm.tif", tmp_path / "truth_m.tif",
                     crs=rasterio.crs.CRS.from_user_input(pyproj.CRS("EPSG:32610+5703").to_wkt()))
    scene = prepare_scene(**(_inputs(synth_dir) | {"dsm": dsm}), truth=truth, out=tmp_path / "scene")
    valid = metres != FLOAT32_MIN
    np.testing.assert_allclose(scene.read("dsm")[valid], metres[valid], atol=2e-3)
    vertical = scene.manifest["provenance"]["vertical_reference"]
    assert vertical["transformed"] and "ft" in vertical["dsm"] and "NAVD88" in vertical["truth"]


# --- the bad-input table (through the CLI) ----------------------------------------------------

def _ellipsoidal_utm10():
    return rasterio.crs.CRS.from_wkt(pyproj.CRS("EPSG:32610").to_3d().to_wkt())


def _case_files(case, synth, tmp):
    """Build the inputs of one case; returns (argv overrides, expected) — expected is a regex for
    errors or a callable checking the Scene."""
    files = {"--dsm": synth / "run-DEM.tif", "--ortho-left": synth / "left_ortho.tif",
             "--ortho-right": synth / "right_ortho.tif", "--triangulation-error": synth / "run-IntersectionErr.tif"}
    with rasterio.open(synth / "run-DEM.tif") as src:
        dem, dem_t = src.read(1), src.transform
    holes = dem == FLOAT32_MIN
    if case == "dsm without CRS":
        files["--dsm"] = _rewrite(synth / "run-DEM.tif", tmp / "nocrs.tif", crs="")
        return files, r"nocrs.tif: raster has no CRS"
    if case == "DSM in degrees":
        files["--dsm"] = _rewrite(synth / "run-DEM.tif", tmp / "deg.tif", crs="EPSG:4326",
                                  transform=from_origin(5.0, 45.0, 1e-5, 1e-5))
        return files, r"deg.tif: DSM grid would be in a geographic CRS"
    if case == "wrong CRS: no overlap":
        files["--triangulation-error"] = _rewrite(synth / "run-IntersectionErr.tif", tmp / "err31.tif", crs="EPSG:32631")
        return files, r"err31.tif: does not overlap the DSM"
    if case == "all-nodata band":
        files["--ortho-left"] = _rewrite(synth / "left_ortho.tif", tmp / "blank.tif",
                                         data=np.full(dem.shape, -32768, np.float32))
        return files, r"blank.tif: ortho left has no valid pixel"
    if case == "missing IntersectionErr":
        run = tmp / "asp"
        run.mkdir()
        for name in ("run-DEM.tif", "left_ortho.tif", "right_ortho.tif"):
            shutil.copy(synth / name, run / name)
        return {"--asp-prefix": run / "run"}, r"asp/run: ASP run has no triangulation error \(looked for run-IntersectionErr.tif"
    if case == "missing file":
        files["--ortho-right"] = tmp / "nope.tif"
        return files, r"nope.tif: ortho right file not found"
    if case == "not a raster":
        (tmp / "notes.tif").write_text("not a GeoTIFF")
        files["--dsm"] = tmp / "notes.tif"
        return files, r"notes.tif: not a readable raster"
    if case == "multiband DSM":
        path = tmp / "rgb_dsm.tif"
        with rasterio.open(path, "w", driver="GTiff", height=dem.shape[0], width=dem.shape[1], count=3,
                           dtype="float32", crs="EPSG:32610", transform=dem_t) as dst:
            dst.write(np.stack([dem] * 3))
        files["--dsm"] = path
        return files, r"rgb_dsm.tif: DSM has 3 bands; expected 1"
    if case == "NDVI scaled by 10000":
        with rasterio.open(synth / "ndvi.tif") as src:
            scaled = np.where(src.read(1) == src.nodata, -32768, src.read(1) * 10000)
        files["--ndvi"] = _rewrite(synth / "ndvi.tif", tmp / "ndvi_x10000.tif", data=scaled, dtype="int16", nodata=-32768)
        return files, r"ndvi_x10000.tif: NDVI values are outside \[-1, 1\]"
    if case == "multiband NDVI without --ndvi-bands":
        path = tmp / "irc.tif"
        with rasterio.open(path, "w", driver="GTiff", height=dem.shape[0], width=dem.shape[1], count=3,
                           dtype="uint8", crs="EPSG:32610", transform=dem_t) as dst:
            dst.write(np.full((3, *dem.shape), 100, np.uint8))
        files["--ndvi"] = path
        return files, r"irc.tif: NDVI raster has 3 bands: pass --ndvi-bands"
    if case == "no pixel valid in every band":
        top = np.where(np.arange(dem.shape[0])[:, None] < dem.shape[0] // 2, 1.0, FLOAT32_MIN) * np.ones(dem.shape)
        files["--triangulation-error"] = _rewrite(synth / "run-IntersectionErr.tif", tmp / "err_top.tif",
                                                  data=top.astype(np.float32))
        with rasterio.open(synth / "left_ortho.tif") as src:
            img = src.read(1)
        img[: dem.shape[0] // 2 + 2] = -32768
        files["--ortho-left"] = _rewrite(synth / "left_ortho.tif", tmp / "img_bottom.tif", data=img)
        return files, r"run-DEM.tif: no pixel is valid in every input band"
    if case == "--crs that is not a CRS":
        return files | {"--crs": "EPSG:999999"}, r"run-DEM.tif: --crs 'EPSG:999999' is not a CRS"
    if case == "vertical datums differ, no grid":
        files["--dsm"] = _rewrite(synth / "run-DEM.tif", tmp / "ellipsoidal.tif", crs=_ellipsoidal_utm10())
        truth = _rewrite(synth / "truth_dsm.tif", tmp / "egm96.tif",
                         crs=rasterio.crs.CRS.from_wkt(pyproj.CRS("EPSG:32610+5773").to_wkt()))
        return files | {"--truth": truth}, (r"ellipsoidal.tif: vertical references differ: DSM heights are "
                                            r"ellipsoidal height \(.*\), truth heights are EGM96 height")
    # --- valid inputs that must give a correct Scene ---
    if case == "images at another resolution":
        for flag, name in (("--ortho-left", "left_ortho.tif"), ("--ortho-right", "right_ortho.tif")):
            with rasterio.open(synth / name) as src:
                coarse = src.read(1, out_shape=(dem.shape[0] // 2, dem.shape[1] // 2), resampling=Resampling.average)
            files[flag] = _rewrite(synth / name, tmp / f"coarse_{name}", data=coarse, transform=dem_t @ dem_t.scale(2))

        def check(scene):
            assert scene.shape == dem.shape and scene.transform == dem_t
            assert np.isfinite(scene.read("ortho_left")).mean() > 0.95
        return files, check
    if case == "integer DSM with -9999":
        files["--dsm"] = _rewrite(synth / "run-DEM.tif", tmp / "int_dsm.tif",
                                  data=np.where(holes, -9999, np.round(dem)), dtype="int16", nodata=-9999)

        def check(scene):
            assert np.isnan(scene.read("dsm")).sum() == holes.sum()
            assert scene.statistics("dsm")["min"] > 0
        return files, check
    if case == "NaN nodata":
        files["--dsm"] = _rewrite(synth / "run-DEM.tif", tmp / "nan_dsm.tif", data=np.where(holes, np.nan, dem),
                                  nodata=float("nan"))

        def check(scene):
            assert np.isnan(scene.read("dsm")).sum() == holes.sum()
        return files, check
    if case == "ASP 3D CRS (ellipsoidal heights)":
        files["--dsm"] = _rewrite(synth / "run-DEM.tif", tmp / "dem3d.tif", crs=_ellipsoidal_utm10())

        def check(scene):
            assert scene.crs == rasterio.crs.CRS.from_epsg(32610)  # horizontal part
        return files, check
    if case == "truth in another CRS":
        path = tmp / "truth_3857.tif"
        from rasterio.warp import calculate_default_transform, reproject
        with rasterio.open(synth / "truth_dsm.tif") as src:
            t, w, h = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds)
            out = np.full((h, w), -9999, np.float32)
            reproject(src.read(1), out, src_transform=src.transform, src_crs=src.crs, src_nodata=-9999,
                      dst_transform=t, dst_crs="EPSG:3857", dst_nodata=-9999)
        _write(path, out, t, -9999, "EPSG:3857")

        def check(scene):
            truth = scene.read("truth_dsm")
            with rasterio.open(synth / "truth_dsm.tif") as src:
                ref = src.read(1)
            inner = np.s_[10:-10, 10:-10]
            assert np.nanmedian(np.abs(truth[inner] - ref[inner])) < 0.2
        return files | {"--truth": path}, check
    raise AssertionError(case)


BAD_INPUTS = [
    "dsm without CRS", "DSM in degrees", "wrong CRS: no overlap", "all-nodata band", "missing IntersectionErr",
    "missing file", "not a raster", "multiband DSM", "NDVI scaled by 10000", "multiband NDVI without --ndvi-bands",
    "no pixel valid in every band", "--crs that is not a CRS", "vertical datums differ, no grid",
]
VALID_ODD_INPUTS = ["images at another resolution", "integer DSM with -9999", "NaN nodata",
                    "ASP 3D CRS (ellipsoidal heights)", "truth in another CRS"]


@pytest.mark.parametrize("case", BAD_INPUTS + VALID_ODD_INPUTS)
def test_input_table(case, capsys, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJ_NETWORK", "OFF")
    if case == "vertical datums differ, no grid":
        from pyproj.transformer import TransformerGroup
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if TransformerGroup("EPSG:4979", "EPSG:4326+5773").best_available:
                pytest.skip("the EGM96 grid is installed here, so this transformation succeeds")
    work = tmp_path / "in"
    work.mkdir()
    flags, expected = _case_files(case, synth_dir, work)
    argv = ["prepare", *[str(x) for kv in flags.items() for x in kv], "--out", tmp_path / "out" / "scene"]
    code, out, err = _cli(capsys, *argv)
    if callable(expected):
        assert code == 0, err
        expected(Scene.open(tmp_path / "out" / "scene"))
        return
    assert code == 2, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepdem: error: "), err
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out" / "scene").exists()
    assert not list((tmp_path / "out").glob("*partial*")) if (tmp_path / "out").exists() else True


# --- real data: IGN LiDAR HD tile 77055_627760 ------------------------------------------------

def test_real_scene_from_ign_tile(tmp_path):
    """A Scene from real IGN data near Montpellier (tile 77055_627760, EPSG:2154, 0.5 m).

    There is no real stereo DSM of this tile, so the "initial DSM" is IGN's own ref_DSM blurred
    (Gaussian, sigma 2 px, as a stereo correlation window would) and written as float32 with
    ASP's float32-min nodata; the triangulation error is a constant 0.4 m raster written by the
    test. The truth is IGN's ref_DSM/ref_DTM, both images
    are the RGB BD ORTHO (0.2 m, averaged onto 0.5 m), NDVI comes from the IRC BD ORTHO (bands
    NIR 1, red 2) whose CRS is an unnamed Lambert-93 WKT.
    """
    data = shared_data_dir() / "ign_montpellier"
    if not (data / "ref_DSM_77055_627760_50CM.tif").exists():
        pytest.skip(f"real data not found in {data} (set DEEPDEM_DATA)")
    from scipy import ndimage

    with rasterio.open(data / "ref_DSM_77055_627760_50CM.tif") as src:
        ref, t, crs = src.read(1), src.transform, src.crs
    valid = ref != -9999
    blurred = ndimage.gaussian_filter(np.where(valid, ref, np.median(ref[valid])), 2.0)
    initial = np.where(valid, blurred, FLOAT32_MIN).astype(np.float32)
    dsm = _write(tmp_path / "run-DEM.tif", initial, t, FLOAT32_MIN, crs)
    err = _write(tmp_path / "run-IntersectionErr.tif", np.full(ref.shape, 0.4, np.float32), t, FLOAT32_MIN, crs)
    rgb, irc = data / "test_data_rgb.tif", data / "test_data_irc.tif"
    code = main(["prepare", "--dsm", str(dsm), "--triangulation-error", str(err), "--ortho-left", str(rgb),
                 "--ortho-right", str(rgb), "--ndvi", str(irc), "--ndvi-bands", "1,2",
                 "--truth", str(data / "ref_DSM_77055_627760_50CM.tif"),
                 "--truth-dtm", str(data / "ref_DTM_77055_627760_50CM.tif"), "--out", str(tmp_path / "scene")])
    assert code == 0
    scene = Scene.open(tmp_path / "scene")
    assert scene.crs == rasterio.crs.CRS.from_epsg(2154)
    assert scene.transform == t and scene.shape == (100, 100)
    assert scene.transform.c == 770549.75 and scene.transform.f == 6277600.25
    dsm_values, truth = scene.read("dsm"), scene.read("truth_dsm")
    assert 0 < np.nanmin(truth) and np.nanmax(truth) < 45  # metres, NGF-IGN69
    assert np.nanmedian(np.abs(dsm_values - truth)) < 1.0
    ndvi = scene.read("ndvi")
    assert np.isfinite(ndvi).all() and -1 <= np.nanmin(ndvi) and np.nanmax(ndvi) <= 1
    # Above 3 m the tile has trees (rough in the LIDAR DSM) and tiled roofs (smooth): NDVI must
    # tell them apart, which it only does if the IRC image is registered on the grid.
    chm = scene.read("truth_dsm") - scene.read("truth_dtm")
    rough = ndimage.generic_filter(np.nan_to_num(truth), np.std, size=3)
    trees, roofs = (chm > 3) & (rough > 0.5), (chm > 3) & (rough < 0.2)
    assert trees.sum() > 1000 and roofs.sum() > 500
    assert np.median(ndvi[trees]) > 0.1 and np.median(ndvi[roofs]) < -0.05
    for band in ("ortho_left", "ortho_right"):
        image = scene.read(band)
        assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    assert scene.read("nodata_mask").mean() > 0.95
    assert set(scene.scale_factors) == {64}


def test_resampling_keeps_the_extent_a_plane_and_the_nodata(tmp_path):
    grid = Grid(CRS.from_epsg(32631), from_origin(1000.0, 2000.0, 1.0, 1.0), 40, 60)
    rows, cols = np.mgrid[0:40, 0:60].astype(np.float32)
    dsm = 100.0 + 0.5 * cols - 0.25 * rows  # a plane, in metres per pixel of 1 m
    dsm[10:14, 20:26] = np.nan
    rng = np.random.default_rng(0)
    bands = {"dsm": dsm, "ortho_left": rng.uniform(0, 1, grid.shape).astype(np.float32),
             "ortho_right": rng.uniform(0, 1, grid.shape).astype(np.float32),
             "triangulation_error": np.full(grid.shape, 0.3, np.float32), "ndvi": np.zeros(grid.shape, np.float32)}
    scene = write_scene(tmp_path / "scene", grid, bands, n_chips=50)

    fine = resample_scene(scene, 0.5, tmp_path / "fine")
    assert fine.shape == (80, 120) and fine.grid.bounds == scene.grid.bounds and fine.crs == scene.crs
    assert fine.manifest["provenance"]["resampled_from"] == str(scene.path.resolve())
    # bilinear interpolation keeps a plane: the fine pixel centred at (x, y) has the plane's height there
    fine_dsm = fine.read("dsm")
    r, c = np.mgrid[0:80, 0:120]
    plane_there = 100.0 + 0.5 * ((c + 0.5) / 2 - 0.5) - 0.25 * ((r + 0.5) / 2 - 0.5)
    interior = np.ones(fine.shape, dtype=bool)  # away from the edges and the hole, where no neighbour is missing
    interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
    interior[18:30, 38:54] = False
    np.testing.assert_allclose(fine_dsm[interior], plane_there[interior], atol=1e-3)
    # the hole is a hole at both sizes, and the mask follows it
    assert np.isnan(fine_dsm[22:26, 42:50]).all() and (fine.read("nodata_mask")[22:26, 42:50] == 0).all()
    assert fine.read("nodata_mask")[interior].all()

    coarse = resample_scene(scene, 2.0, tmp_path / "coarse", bands=["dsm"])
    assert coarse.shape == (20, 30) and coarse.bands == ["dsm", "nodata_mask"]
    # averaging onto an aligned grid of 2 x 2 pixels: their mean, the hole's pixels left out
    blocks = dsm.reshape(20, 2, 30, 2)
    counts = np.isfinite(blocks).sum(axis=(1, 3))
    expected = np.where(counts > 0, np.nansum(blocks, axis=(1, 3)) / np.maximum(counts, 1), np.nan)
    assert (counts == 0).sum() == 6  # the 2 x 3 pixels wholly in the hole stay nodata
    np.testing.assert_allclose(coarse.read("dsm"), expected, atol=1e-4)
    with pytest.raises(InputError, match="pixel size must be > 0"):
        resample_scene(scene, 0.0, tmp_path / "zero")


def test_resampling_remakes_the_orthos_correlation_from_the_resampled_orthos(tmp_path):
    from deepdem.parallax import local_correlation

    grid = Grid(CRS.from_epsg(32631), from_origin(1000.0, 2000.0, 1.0, 1.0), 40, 60)
    rng = np.random.default_rng(0)
    left = ndimage.gaussian_filter(rng.uniform(0, 1, grid.shape), 1.5).astype(np.float32)
    right = np.where(np.arange(60) < 30, left, rng.uniform(0, 1, grid.shape)).astype(np.float32)  # they differ on the east
    bands = {"dsm": np.zeros(grid.shape, np.float32), "ortho_left": left, "ortho_right": right,
             "ortho_correlation": local_correlation(left, right)}
    scene = write_scene(tmp_path / "scene", grid, bands, n_chips=50)
    fine = resample_scene(scene, 0.5, tmp_path / "fine", bands=["dsm", "ortho_correlation"])
    assert fine.bands == ["dsm", "ortho_correlation", "nodata_mask"]  # the orthos are read, not carried
    correlation = fine.read("ortho_correlation")
    np.testing.assert_allclose(correlation, local_correlation(*(resample_scene(scene, 0.5, tmp_path / "orthos").read(b)
                                                                for b in ("ortho_left", "ortho_right"))), atol=1e-6)
    assert np.median(correlation[:, :50]) > 0.95 and np.median(correlation[:, 70:]) < 0.5
