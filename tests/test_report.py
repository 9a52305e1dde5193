import json

import numpy as np
import pytest
import rasterio

from deepdem.evaluate import HOLES, evaluate_arrays
from deepdem.report import (demo_figure, error_maps_figure, histogram_figure, panel_figure, strata_figure,
                            write_report)
from deepdem.scene import Grid, write_scene
from deepdem.synth import SynthConfig, generate

SIZE = 64


@pytest.fixture(scope="module")
def synth():
    return generate(SynthConfig(size=SIZE, seed=11))


@pytest.fixture(scope="module")
def evaluation(synth):
    grid = Grid(synth.crs, synth.transform, SIZE, SIZE)
    initial = synth.dsm.astype(np.float64)
    refined = np.where(np.isfinite(initial), 0.5 * (initial + synth.truth_dsm), np.nan)
    filled = np.where(np.isfinite(initial), initial, synth.truth_dsm + 1.0)
    return evaluate_arrays(
        synth.truth_dsm, {"refined": refined, "initial": initial, "filled": filled}, grid, ndvi=synth.ndvi,
        holes=~np.isfinite(initial), height=synth.truth_dsm - synth.truth_dtm, terrain=synth.truth_dtm,
        images={"ortho_left": synth.ortho_left, "ortho_right": synth.ortho_right,
                "nodata_mask": np.isfinite(initial).astype(float)})


def _png_size(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def test_report_directory_holds_tables_json_and_figures(evaluation, tmp_path):
    report = write_report(evaluation, tmp_path / "report", sources={"dem": "refined.tif"})
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["error_histograms.png", "error_maps.png", "metrics.json", "metrics_by_slope.png",
                     "metrics_by_stratum.png", "panel.png", "report.md"]
    titles = {f.path.name: f.titles for f in report.figures}
    assert len(titles["panel.png"]) == 8
    assert titles["error_maps.png"] == ["refined − truth DSM", "initial − truth DSM", "filled − truth DSM"]
    assert titles["metrics_by_stratum.png"] == ["NMAD (m) by land cover", "median error (m) by land cover"]
    assert titles["metrics_by_slope.png"] == ["NMAD (m) by slope of the terrain",
                                              "median error (m) by slope of the terrain"]
    assert _png_size(report.path / "panel.png") == (1600, 800)  # 2 rows of 4 panels, 5 in at 80 dpi
    assert _png_size(report.path / "error_histograms.png") == (1120, 400)
    md = report.markdown.read_text()
    for stratum in evaluation.strata:
        assert f"| {stratum} |" in md
    assert "| `refined` | `initial` | `filled` |" in md.replace("| pixels ", "")
    assert "![" in md and "(panel.png)" in md
    assert "| p95 \\|error\\| (m) |" in md  # a bare | would split the table cell
    saved = json.loads(report.metrics.read_text())
    assert saved["sources"] == {"dem": "refined.tif"}
    assert saved["strata"][HOLES]["metrics"]["filled"]["median"] == pytest.approx(1.0)
    assert saved["strata"][HOLES]["metrics"]["initial"]["count"] == 0
    assert saved["metrics"]["initial"]["within_1m"] == pytest.approx(evaluation.metrics["initial"]["within_1m"])


def test_report_is_atomic(evaluation, tmp_path, monkeypatch):
    import deepdem.report as report_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "strata_figure", broken)
    with pytest.raises(RuntimeError):
        write_report(evaluation, tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_figures_have_the_expected_panels(evaluation, tmp_path):
    data = evaluation.data
    info = panel_figure(tmp_path / "p.png", data.truth, data.dems["initial"], data.dems["refined"], 1.0)
    assert info.titles == ["initial DSM (hillshade, yellow = no data)", "refined DEM (hillshade)",
                           "truth (hillshade)", "initial − truth (m)", "refined − truth (m)"]
    assert _png_size(info.path) == (1600, 800)
    info = error_maps_figure(tmp_path / "e.png", {"a": data.truth * 0, "b": data.truth * 0 + 1})
    assert info.titles == ["a − truth", "b − truth"] and info.path.exists()
    info = histogram_figure(tmp_path / "h.png", data.errors, data.common)
    assert len(info.titles) == 2 and info.path.exists()
    info = strata_figure(tmp_path / "s.png", evaluation, "cover", metrics=("mae",))
    assert info.titles == ["MAE (m) by land cover"]


def test_demo_figure_draws_the_seed_panel(synth, tmp_path):
    grid = Grid(synth.crs, synth.transform, SIZE, SIZE)
    scene = write_scene(tmp_path / "scene", grid, {
        "dsm": synth.dsm, "ortho_left": synth.ortho_left, "ortho_right": synth.ortho_right,
        "triangulation_error": synth.triangulation_error, "ndvi": synth.ndvi, "truth_dsm": synth.truth_dsm},
        n_chips=50)
    with rasterio.open(tmp_path / "r.tif", "w", driver="GTiff", height=SIZE, width=SIZE, count=1, dtype="float32",
                       crs=synth.crs, transform=synth.transform, nodata=-9999.0) as dst:
        dst.write(np.nan_to_num(synth.dsm, nan=-9999.0).astype(np.float32), 1)
    out = demo_figure(scene, tmp_path / "r.tif", tmp_path / "demo.png")
    assert out == tmp_path / "demo.png" and _png_size(out) == (1600, 800)
    from deepdem.demo import demo_figure as from_demo

    assert from_demo is demo_figure


# -- the per-pixel σ ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluation_with_sigma(synth):
    grid = Grid(synth.crs, synth.transform, SIZE, SIZE)
    initial = synth.dsm.astype(np.float64)
    refined = np.where(np.isfinite(initial), 0.5 * (initial + synth.truth_dsm), np.nan)
    sigma = 0.2 + 1.5 * np.abs(refined - synth.truth_dsm)  # larger where the error is
    return evaluate_arrays(synth.truth_dsm, {"refined": refined, "initial": initial}, grid, ndvi=synth.ndvi,
                           holes=~np.isfinite(initial), height=synth.truth_dsm - synth.truth_dtm,
                           terrain=synth.truth_dtm, sigma=sigma, sigma_distribution="laplace")


def test_report_with_sigma_has_reliability_sigma_map_and_section(evaluation_with_sigma, tmp_path):
    from deepdem.report import RELIABILITY_STRATA
    from deepdem.uncertainty import fit_temperature

    ev = evaluation_with_sigma
    report = write_report(ev, tmp_path / "report")
    names = {p.name for p in report.path.iterdir()}
    assert {"reliability.png", "sigma_map.png"} <= names
    titles = {f.path.name: f.titles for f in report.figures}
    assert titles["reliability.png"] == ["coverage of σ's central intervals (laplace)"]
    assert titles["sigma_map.png"] == ["σ of the refined DEM (m)", "|refined − truth DSM| (m)"]
    assert _png_size(report.path / "sigma_map.png") == (880, 400)
    assert all(ev.calibration[name]["count"] > 0 for name in RELIABILITY_STRATA)  # all drawn
    md = report.markdown.read_text()
    section = md.split("## Uncertainty (σ)\n", 1)[1].split("\n## ", 1)[0]
    assert "Laplace distribution" in section and "±0.81 σ, ±1.63 σ, ±2.12 σ" in section
    assert "| Spearman σ vs \\|error\\| |" in section
    m = ev.calibration["all"]
    assert f"| all | {m['count']:,} | {100 * m['coverage_68']:.1f} | {100 * m['coverage_90']:.1f} |" in section
    assert m["spearman"] == pytest.approx(1.0)  # σ is an increasing function of |error|
    assert "(reliability.png)" in md and "(sigma_map.png)" in md
    data = ev.data
    t = fit_temperature(data.errors["refined"][data.common], data.sigma[data.common], "laplace")
    assert f"Multiplying σ by **{t:.3f}**" in section
    saved = json.loads(report.metrics.read_text())
    assert saved["sigma_distribution"] == "laplace" and saved["calibration"]["all"]["count"] == m["count"]
