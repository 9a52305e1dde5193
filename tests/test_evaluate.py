import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from deepdem.errors import InputError
from deepdem.evaluate import error_metrics, evaluate


def test_metrics_equal_hand_computed_values():
    e = np.array([-2.0, -1.0, 0.0, 1.0, 5.0])
    m = error_metrics(e)
    assert m["count"] == 5
    assert m["mae"] == pytest.approx(9 / 5)
    assert m["rmse"] == pytest.approx(np.sqrt(31 / 5))
    assert m["mean"] == pytest.approx(0.6)
    assert m["median"] == 0.0
    # |e - median| = 2, 1, 0, 1, 5 -> median 1 -> NMAD 1.4826
    assert m["nmad"] == pytest.approx(1.4826)
    # numpy's linear percentile of |e| = 0,1,1,2,5 at 95 %: 2 + 0.8·3
    assert m["p95_abs"] == pytest.approx(4.4)


def test_metrics_ignore_nan():
    m = error_metrics(np.array([1.0, np.nan, -1.0]))
    assert m["count"] == 2 and m["mae"] == 1.0


def _write(path, data, nodata=-9999.0):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                       dtype="float32", crs="EPSG:32610", transform=from_origin(0, 10, 1, 1), nodata=nodata) as dst:
        dst.write(data.astype(np.float32), 1)
    return path


def test_refined_and_initial_are_compared_on_the_same_pixels(tmp_path):
    truth = np.zeros((4, 4))
    refined = np.full((4, 4), 1.0)
    initial = np.full((4, 4), 2.0)
    initial[0, :] = -9999.0  # a hole in the initial DSM: those pixels leave both comparisons
    refined[1, 0] = 100.0
    t, r, i = _write(tmp_path / "t.tif", truth), _write(tmp_path / "r.tif", refined), _write(tmp_path / "i.tif", initial)
    result = evaluate(r, t, initial=i)
    result.write_json(tmp_path / "m.json")
    assert result.pixels == 12
    assert result.metrics["initial"]["mae"] == pytest.approx(2.0)
    assert result.metrics["refined"]["mae"] == pytest.approx((11 * 1.0 + 100.0) / 12)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["pixels"] == 12
    assert "refined / initial MAE" in result.table()


def test_dem_without_valid_pixels_is_refused(tmp_path):
    t = _write(tmp_path / "t.tif", np.zeros((4, 4)))
    d = _write(tmp_path / "d.tif", np.full((4, 4), -9999.0))
    with pytest.raises(InputError, match="d.tif: DEM has no valid pixel"):
        evaluate(d, t)


# -- the extended metrics, strata, baselines and the evaluate command --------------------------
from deepdem.evaluate import (HOLES, evaluate_arrays, landcover_strata, slope_bin_labels,  # noqa: E402
                              slope_binned_metrics)
from deepdem.scene import Grid, write_scene  # noqa: E402

GRID = Grid(rasterio.crs.CRS.from_epsg(32610), from_origin(500000, 4000064, 1, 1), 64, 64)


def test_new_metrics_equal_hand_computed_values():
    m = error_metrics(np.array([-2.0, -1.0, 0.0, 1.0, 5.0]))
    # |e| sorted: 0, 1, 1, 2, 5; numpy's linear percentile at q sits at index 4·q
    assert m["p68_abs"] == pytest.approx(1 + 0.72 * 1)  # index 2.72
    assert m["p90_abs"] == pytest.approx(2 + 0.6 * 3)  # index 3.6
    assert m["p99_abs"] == pytest.approx(2 + 0.96 * 3)  # index 3.96
    assert m["le90"] == pytest.approx(3.8)
    assert m["within_0.5m"] == pytest.approx(1 / 5)
    assert m["within_1m"] == pytest.approx(3 / 5)
    assert m["within_2m"] == pytest.approx(4 / 5)
    assert set(m) >= {"count", "mae", "rmse", "mean", "median", "nmad", "p95_abs"}
    empty = error_metrics(np.array([np.nan]))
    assert empty["count"] == 0 and np.isnan(empty["nmad"]) and np.isnan(empty["within_1m"])


def test_slope_bins_through_xdem_match_hand_computed_subsets():
    slope = np.array([1.0, 4.9, 5.0, 10.0, 20.0, 29.0, 44.0, 50.0, 80.0, np.nan])
    errors = np.array([1.0, -1.0, 2.0, 4.0, -3.0, -1.0, 0.5, 10.0, -2.0, 100.0])
    binned = slope_binned_metrics(errors, slope)
    assert list(binned) == slope_bin_labels() == ["0–5°", "5–15°", "15–30°", "30–45°", ">45°"]
    assert [binned[b]["count"] for b in binned] == [2, 2, 2, 1, 2]  # 5° is in 5–15 (closed left); NaN slope out
    assert binned["5–15°"]["mae"] == pytest.approx(3.0)
    assert binned["15–30°"]["median"] == pytest.approx(-2.0)
    assert binned[">45°"]["rmse"] == pytest.approx(np.sqrt((100 + 4) / 2))
    for b, subset in [("0–5°", [1.0, -1.0]), ("30–45°", [0.5])]:
        expected = error_metrics(np.array(subset))
        assert binned[b] == pytest.approx(expected)
    assert binned["30–45°"]["nmad"] == 0.0


def test_landcover_strata_from_ndvi_height_and_holes():
    ndvi = np.array([[-0.2, 0.1, 0.1, 0.6],
                     [0.1, 0.05, 0.7, 0.29],
                     [np.nan, 0.3, 0.1, 0.1]])
    height = np.array([[0.0, 0.0, 5.0, 12.0],
                       [0.0, 6.0, 1.0, 0.5],
                       [0.0, 0.0, 0.0, np.nan]])
    holes = np.zeros(ndvi.shape, bool)
    holes[0, 0] = holes[2, 3] = True
    s = landcover_strata(ndvi, height, holes)
    assert list(s) == ["vegetation", "tall vegetation", "bare", "buildings", "water", HOLES]
    assert np.argwhere(s["water"]).tolist() == [[0, 0]]
    assert np.argwhere(s["vegetation"]).tolist() == [[0, 3], [1, 2], [2, 1]]  # NDVI ≥ 0.3
    assert np.argwhere(s["tall vegetation"]).tolist() == [[0, 3]]
    assert np.argwhere(s["buildings"]).tolist() == [[0, 2], [1, 1]]  # > 2 m and low NDVI
    assert np.argwhere(s["bare"]).tolist() == [[0, 1], [1, 0], [1, 3], [2, 2]]  # NaN NDVI/height: none
    assert s[HOLES].sum() == 2
    # Without a height, bare cannot be told from roofs; without NDVI, only the height speaks.
    assert "low NDVI (bare or built)" in landcover_strata(ndvi)
    assert landcover_strata(None, height)["objects (> 2 m)"].sum() == 3


def test_holes_are_scored_only_for_dems_that_cover_them():
    truth = np.zeros((8, 8))
    initial = np.full((8, 8), 1.0)
    initial[:2, :] = np.nan  # 16 holes
    filled = np.full((8, 8), 0.5)
    refined = np.where(np.isfinite(initial), -0.25, np.nan)
    ev = evaluate_arrays(truth, {"refined": refined, "initial": initial, "filled": filled}, GRID_SMALL,
                         holes=~np.isfinite(initial))
    assert ev.pixels == 48
    assert ev.metrics["filled"]["mae"] == pytest.approx(0.5) and ev.metrics["initial"]["mae"] == 1.0
    holes = ev.strata[HOLES]
    assert holes["pixels"] == 16
    assert holes["metrics"]["filled"]["count"] == 16 and holes["metrics"]["filled"]["median"] == 0.5
    assert holes["metrics"]["initial"]["count"] == 0 and holes["metrics"]["refined"]["count"] == 0
    assert "—" in ev.strata_table("nmad")
    saved = ev.to_json()
    assert saved["strata"][HOLES]["metrics"]["initial"]["mae"] is None  # NaN → null in JSON
    json.dumps(saved, allow_nan=False)


GRID_SMALL = Grid(rasterio.crs.CRS.from_epsg(32610), from_origin(500000, 4000008, 1, 1), 8, 8)


def test_baselines_fill_holes_and_filter():
    from deepdem.baselines import gaussian_baseline, ground_filter_baseline, idw_fill, median_baseline

    flat = np.full((20, 20), 7.0)
    flat[5:9, 5:9] = np.nan
    assert np.allclose(idw_fill(flat), 7.0)
    spiky = np.full((20, 20), 7.0)
    spiky[10, 10] = 50.0
    spiky[0:3, 0:3] = np.nan
    assert np.allclose(median_baseline(spiky), 7.0)  # the blunder is gone, the hole filled
    assert np.allclose(gaussian_baseline(np.full((20, 20), 3.0)), 3.0)
    # A ground filter takes a 6 m building off a tilted plane (within SMRF's 0.5 m threshold).
    rows, cols = np.mgrid[0:48, 0:48].astype(float)
    ground = 100 + 0.05 * cols
    dsm = ground.copy()
    dsm[20:28, 20:28] += 6.0
    dtm = ground_filter_baseline(dsm, from_origin(0, 48, 1, 1))
    assert np.nanmax(np.abs(dtm - ground)) < 0.5


def _scene(tmp_path, holes=True):
    """A 64×64 scene built by hand: water on the left, a 6 m building, a 12 m tree stand, bare ground."""
    rows, cols = np.mgrid[0:64, 0:64].astype(float)
    dtm = 200 + 0.1 * cols + 0.05 * rows
    ndvi = np.full((64, 64), 0.1)
    ndvi[:, :8] = -0.3  # water
    ndvi[40:56, 40:56] = 0.8  # trees
    ndvi[10:20, 30:40] = 0.05  # roof
    dsm_truth = dtm.copy()
    dsm_truth[40:56, 40:56] += 12.0
    dsm_truth[10:20, 30:40] += 6.0
    rng = np.random.default_rng(0)
    initial = dsm_truth + rng.normal(0, 0.5, dtm.shape)
    if holes:
        initial[30:34, 10:20] = np.nan  # 40 holes on bare ground
    images = rng.uniform(0, 1, dtm.shape)
    scene = write_scene(tmp_path / "scene", GRID, {
        "dsm": initial, "ortho_left": images, "ortho_right": images, "triangulation_error": np.ones(dtm.shape),
        "ndvi": ndvi, "truth_dsm": dsm_truth, "truth_dtm": dtm}, n_chips=50)
    refined = np.where(np.isfinite(initial), dsm_truth + 0.2, np.nan)
    return scene, _write_grid(tmp_path / "refined.tif", refined)


def _write_grid(path, data):
    with rasterio.open(path, "w", driver="GTiff", height=64, width=64, count=1, dtype="float32", crs=GRID.crs,
                       transform=GRID.transform, nodata=-9999.0) as dst:
        dst.write(np.where(np.isfinite(data), data, -9999.0).astype(np.float32), 1)
    return path


def test_strata_on_a_constructed_scene(tmp_path):
    scene, refined = _scene(tmp_path)
    ev = evaluate(refined, scene=scene.path)
    assert ev.methods == ["refined", "initial", "idw_median", "idw_gaussian"]
    assert ev.pixels == 64 * 64 - 40
    px = {name: entry["pixels"] for name, entry in ev.strata.items()}
    assert px["water"] == 64 * 8
    assert px["buildings"] == 100
    assert px["vegetation"] == px["tall vegetation"] == 256
    assert px["bare"] == 64 * 64 - 512 - 100 - 256 - 40
    assert px[HOLES] == 40
    # The refined DEM is the truth + 0.2 m everywhere it is valid.
    assert ev.strata["buildings"]["metrics"]["refined"]["median"] == pytest.approx(0.2, abs=1e-4)
    assert ev.strata[HOLES]["metrics"]["idw_median"]["count"] == 40
    assert ev.strata[HOLES]["metrics"]["refined"]["count"] == 0
    # Slope bins come from the truth DTM, a plane of slope atan(hypot(0.1, 0.05)) = 6.4°.
    assert ev.slope_source == "truth DTM"
    assert px["slope 5–15°"] == ev.pixels
    # As a DTM target the ground filter joins, and roofs and trees show as bias.
    dtm = evaluate(refined, scene=scene.path, target="dtm", baselines=True)
    assert "smrf_ground" in dtm.methods
    assert dtm.strata["buildings"]["metrics"]["initial"]["median"] == pytest.approx(6.0, abs=0.3)
    assert abs(dtm.strata["buildings"]["metrics"]["smrf_ground"]["median"]) < 1.0


def test_coregistration_removes_a_vertical_shift(tmp_path):
    from deepdem.synth import fractal_surface

    truth = 300 + 8 * fractal_surface(np.random.default_rng(1), (64, 64), beta=3.0)
    dem = truth + 1.5 + np.random.default_rng(2).normal(0, 0.1, truth.shape)
    ev = evaluate_arrays(truth, {"refined": dem}, GRID, coregister=True)
    shift = ev.coregistration["refined"]
    assert shift["shift_z"] == pytest.approx(-1.5, abs=0.1)
    assert abs(shift["shift_x"]) < 0.2 and abs(shift["shift_y"]) < 0.2
    assert abs(ev.metrics["refined"]["median"]) < 0.05


def test_cli_evaluate_scene_report(tmp_path, capsys):
    from deepdem.cli import main

    scene, refined = _scene(tmp_path)
    code = main(["evaluate", "--dem", str(refined), "--scene", str(scene.path), "--report", str(tmp_path / "rep"),
                 "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "idw_median" in out and "NMAD (m) by stratum" in out and "slope >45°" in out
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "metrics.json").exists()
    assert json.loads((tmp_path / "m.json").read_text())["strata"]["buildings"]["pixels"] == 100


def test_cli_evaluate_bad_input_leaves_no_report(tmp_path, capsys):
    from deepdem.cli import main

    scene, refined = _scene(tmp_path)
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    code = main(["evaluate", "--dem", str(refined), "--truth", str(bad), "--report", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{bad}: not a readable raster" in err
    code = main(["evaluate", "--dem", str(refined), "--scene", str(tmp_path / "nope"), "--report", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"deepdem: error: {tmp_path / 'nope'}: scene directory not found"
    assert not (tmp_path / "rep").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep")]


# -- the calibration of a per-pixel σ (evaluate --sigma) --------------------------------------
import warnings  # noqa: E402

from rasterio.errors import NotGeoreferencedWarning  # noqa: E402

SQRT2 = float(np.sqrt(2))


def _sigma_case(tmp_path, tag="laplace"):
    """10×10 errors chosen row by row against σ = √2 (Laplace scale 1: the 68/90/95 % intervals
    are ±1.139, ±2.303, ±2.996 m; Gaussian ±1.406, ±2.326, ±2.772 m). Row 0 has no σ (0 or nodata)."""
    rows = [0.5] * 4 + [1.3] + [2.0] * 2 + [2.5] + [4.0] * 2
    signs = np.where(np.arange(10) % 2, -1.0, 1.0)
    refined = np.array([[r * sign for sign in signs] for r in rows])
    sigma = np.full((10, 10), SQRT2)
    sigma[0, :5] = 0.0
    sigma[0, 5:] = -9999.0
    tmp_path.mkdir(exist_ok=True)
    t, r = _write(tmp_path / "t.tif", np.zeros((10, 10))), _write(tmp_path / "r.tif", refined)
    s = _write(tmp_path / "s.tif", sigma)
    if tag:
        with rasterio.open(s, "r+") as dst:
            dst.update_tags(DEEPDEM_SIGMA_DISTRIBUTION=tag)
    return t, r, s


def test_sigma_calibration_equals_hand_counts(tmp_path):
    t, r, s = _sigma_case(tmp_path)
    ev = evaluate(r, t, sigma=s)
    assert ev.sigma_distribution == "laplace"  # from the file's tag
    m = ev.calibration["all"]
    # 90 pixels with σ: 30 at 0.5 m, 10 at 1.3, 20 at 2.0, 10 at 2.5, 20 at 4.0
    assert m["count"] == 90
    assert m["coverage_68"] == pytest.approx(30 / 90)
    assert m["coverage_90"] == pytest.approx(60 / 90)
    assert m["coverage_95"] == pytest.approx(70 / 90)
    assert m["sharpness"] == pytest.approx(SQRT2) and m["mean_sigma"] == pytest.approx(SQRT2)
    assert m["mae"] == pytest.approx(173 / 90)
    assert np.isnan(m["spearman"])  # a constant σ ranks nothing
    assert ev.metrics["refined"]["count"] == 100  # σ does not change the other metrics' pixels
    saved = ev.to_json()
    assert saved["calibration"]["all"]["coverage_90"] == pytest.approx(2 / 3)
    assert saved["calibration"]["all"]["spearman"] is None and saved["sigma_distribution"] == "laplace"
    assert ev.sources["sigma"] == str(s)
    # Without a tag σ is read as Gaussian: 1.3 m now falls inside the 68 % interval.
    _, _, plain = _sigma_case(tmp_path / "plain", tag=None)
    gaussian = evaluate(r, t, sigma=plain)
    assert gaussian.sigma_distribution == "gaussian"
    assert gaussian.calibration["all"]["coverage_68"] == pytest.approx(40 / 90)
    assert gaussian.calibration["all"]["coverage_95"] == pytest.approx(70 / 90)


def test_cli_evaluate_sigma_prints_the_calibration(tmp_path, capsys):
    from deepdem.cli import main

    t, r, s = _sigma_case(tmp_path)
    code = main(["evaluate", "--dem", str(r), "--truth", str(t), "--sigma", str(s), "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "calibration of σ (laplace)" in out
    row = next(line for line in out.splitlines() if line.startswith("all "))
    assert row.split() == ["all", "90", "33.3", "66.7", "77.8", "1.414", "—", "—"]  # a constant σ ranks nothing
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["calibration"]["all"]["coverage_68"] == pytest.approx(1 / 3)
    code = main(["evaluate", "--dem", str(r), "--truth", str(t), "--sigma", str(s), "--sigma-distribution", "gaussian"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("all "))
    assert code == 0 and "calibration of σ (gaussian)" in out
    assert row.split()[2:5] == ["44.4", "66.7", "77.8"]


def test_cli_evaluate_bad_sigma_is_one_line_naming_the_file(tmp_path, capsys):
    from deepdem.cli import main

    t, r, _ = _sigma_case(tmp_path)
    empty = _write(tmp_path / "empty.tif", np.full((10, 10), -9999.0))
    code = main(["evaluate", "--dem", str(r), "--truth", str(t), "--sigma", str(empty), "--report", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.strip() == f"deepdem: error: {empty}: σ raster has no valid pixel (finite and > 0)"
    assert not (tmp_path / "rep").exists()
    elsewhere = tmp_path / "nocrs.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(elsewhere, "w", driver="GTiff", height=5, width=5, count=1, dtype="float32") as dst:
            dst.write(np.ones((1, 5, 5), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)  # a warning line would break the one-line error
        code = main(["evaluate", "--dem", str(r), "--truth", str(t), "--sigma", str(elsewhere)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.strip() == f"deepdem: error: {elsewhere}: raster has no CRS and is not on the evaluated DEM's grid"


def test_sigma_calibration_per_stratum_uses_the_same_pixels(tmp_path):
    scene, refined = _scene(tmp_path)
    rng = np.random.default_rng(3)
    sigma = _write_grid(tmp_path / "sigma.tif", rng.uniform(0.1, 0.5, (64, 64)))
    ev = evaluate(refined, scene=scene.path, sigma=sigma, sigma_distribution="gaussian")
    assert list(ev.calibration) == list(ev.strata)  # "all", land cover, holes, slope bins
    for name, entry in ev.strata.items():
        expected = 0 if name == HOLES else entry["pixels"]  # the refined DEM has no value in the holes
        assert ev.calibration[name]["count"] == expected, name
    # The refined DEM is the truth + 0.2 m: inside the Gaussian 68 % interval (±0.99 σ) iff σ > 0.201.
    with rasterio.open(sigma) as src:
        s = src.read(1).astype(np.float64)
    common = ev.data.common
    assert ev.calibration["all"]["coverage_68"] == pytest.approx(np.mean(0.2 <= 0.994458 * s[common]), abs=1e-3)
    assert "buildings" in ev.calibration_table() and "σ med (m)" in ev.calibration_table()


def test_sigma_calibration_in_holes_covers_the_refined_dem_there():
    truth = np.zeros((8, 8))
    initial = np.full((8, 8), 1.0)
    initial[:2, :] = np.nan  # 16 holes, filled by the refined DEM
    refined = np.full((8, 8), 0.5)
    sigma = np.full((8, 8), 1.0)
    sigma[0, :4] = np.nan
    ev = evaluate_arrays(truth, {"refined": refined, "initial": initial}, GRID_SMALL,
                         holes=~np.isfinite(initial), sigma=sigma)
    assert ev.calibration["all"]["count"] == 48
    assert ev.calibration[HOLES]["count"] == 12
    assert ev.calibration[HOLES]["coverage_68"] == 1.0  # 0.5 m < 0.81 m, the Laplace 68 % of σ = 1
    assert ev.data.sigma is not None and ev.sigma_distribution == "laplace"
    assert evaluate_arrays(truth, {"refined": refined}, GRID_SMALL).calibration == {}


def _write_bands(path, bands: dict[str, np.ndarray]):
    """A multi-band raster whose bands are described as ``deepdem refine`` describes them."""
    first = next(iter(bands.values()))
    with rasterio.open(path, "w", driver="GTiff", height=first.shape[0], width=first.shape[1], count=len(bands),
                       dtype="float32", crs="EPSG:32610", transform=from_origin(0, 10, 1, 1), nodata=-9999.0) as dst:
        for i, (description, data) in enumerate(bands.items(), start=1):
            dst.write(data.astype(np.float32), i)
            dst.set_band_description(i, description)
    return path


def test_two_head_outputs_are_read_at_the_target_band(tmp_path):
    t, r, s = _sigma_case(tmp_path)
    with rasterio.open(r) as src:
        dtm_errors = src.read(1)
    with rasterio.open(s) as src:
        dtm_sigma = src.read(1)
    # DSM band: errors of 10 m everywhere, σ of 100 m; the DTM band is the hand case above.
    both = _write_bands(tmp_path / "both.tif", {"refined DSM (m)": np.full((10, 10), 10.0),
                                                "refined DTM (m)": dtm_errors})
    sigma = _write_bands(tmp_path / "both_sigma.tif", {"sigma of the refined DSM (m)": np.full((10, 10), 100.0),
                                                       "sigma of the refined DTM (m)": dtm_sigma})
    dtm = evaluate(both, t, target="dtm", sigma=sigma, sigma_distribution="laplace")
    assert dtm.metrics["refined"]["mae"] == pytest.approx(evaluate(r, t).metrics["refined"]["mae"])
    assert dtm.calibration["all"]["count"] == 90
    assert dtm.calibration["all"]["coverage_68"] == pytest.approx(30 / 90)
    dsm = evaluate(both, t, target="dsm", sigma=sigma, sigma_distribution="laplace")
    assert dsm.metrics["refined"]["mae"] == pytest.approx(10.0)
    assert dsm.calibration["all"]["coverage_68"] == 1.0

    unnamed = _write(tmp_path / "one.tif", np.zeros((10, 10)))
    with rasterio.open(unnamed) as src:
        profile = src.profile
    profile.update(count=2)
    with rasterio.open(tmp_path / "two.tif", "w", **profile) as dst:
        dst.write(np.zeros((2, 10, 10), dtype=np.float32))
    with pytest.raises(InputError, match="2 bands and none described as the DTM"):
        evaluate(tmp_path / "two.tif", t, target="dtm")
