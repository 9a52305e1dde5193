"""The command line: one-line errors naming the file, exit status 2, no partial output."""

import subprocess
import sys

import numpy as np
import pytest

from deepdem.cli import main
from deepdem.models import save_checkpoint
from deepdem.scene import Grid, write_scene


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_input_file(capsys, synth_dir, tmp_path):
    code, _, err = run(capsys, "prepare", "--dsm", str(tmp_path / "missing.tif"),
                       "--ortho-left", str(synth_dir / "left_ortho.tif"), "--ortho-right", str(synth_dir / "right_ortho.tif"),
                       "--triangulation-error", str(synth_dir / "run-IntersectionErr.tif"), "--out", str(tmp_path / "s"))
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "missing.tif" in err and "not found" in err
    assert not (tmp_path / "s").exists()


def test_checkpoint_bands_missing_from_scene(capsys, tmp_path):
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from deepdem.models import DeepDEMRegressionTask

    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 64, 64)
    write_scene(tmp_path / "scene", grid, {"dsm": np.full(grid.shape, 1.0, np.float32)})
    task = DeepDEMRegressionTask({"bands": ["dsm", "ndvi"], "chip_size": 64})
    save_checkpoint(task, tmp_path / "m.ckpt")
    code, _, err = run(capsys, "refine", "--checkpoint", str(tmp_path / "m.ckpt"), "--scene", str(tmp_path / "scene"),
                       "--out", str(tmp_path / "out.tif"), "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert "scene lacks band(s) ndvi" in err
    assert not (tmp_path / "out.tif").exists()


def test_synth_writes_a_scene(capsys, tmp_path):
    code, out, _ = run(capsys, "synth", "--out", str(tmp_path / "raw"), "--seed", "4", "--size", "64")
    assert code == 0 and (tmp_path / "raw" / "run-DEM.tif").exists()


def test_console_entry_point_exits_2_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deepdem", "evaluate", "--dem", str(tmp_path / "x.tif"),
                           "--truth", str(tmp_path / "y.tif")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"deepdem: error: {tmp_path / 'x.tif'}: file not found"


def test_demo_too_small_is_refused_before_writing(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--size", "100", "--chip-size", "64", "--out", str(tmp_path / "demo"))
    assert code == 2 and "needs at least 128 px" in err
    assert not (tmp_path / "demo").exists()


def test_synth_from_a_lidar_truth_with_matched_errors(capsys, tmp_path):
    from rasterio.transform import from_origin

    from deepdem.io import write_raster

    rng = np.random.default_rng(1)
    heights = 30.0 + np.cumsum(rng.normal(0, 0.05, (96, 96)), axis=1).astype(np.float32)
    transform = from_origin(500000.0, 5000000.0, 0.5, 0.5)
    write_raster(tmp_path / "dsm.tif", heights, transform, "EPSG:32631", -9999.0, "dsm")
    write_raster(tmp_path / "dtm.tif", heights, transform, "EPSG:32631", -9999.0, "dtm")
    code, out, _ = run(capsys, "synth", "--truth-dsm", str(tmp_path / "dsm.tif"), "--truth-dtm", str(tmp_path / "dtm.tif"),
                       "--errors", "sgbm", "--out", str(tmp_path / "run"))
    assert code == 0 and "sgbm errors" in out
    assert (tmp_path / "run" / "run-DEM.tif").exists()
    code, _, err = run(capsys, "synth", "--errors", "sgbm", "--out", str(tmp_path / "gen"))
    assert code == 2 and "needs a real truth" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "gen").exists()
    code, _, err = run(capsys, "synth", "--object-class", str(tmp_path / "dsm.tif"), "--out", str(tmp_path / "gen"))
    assert code == 2 and err.strip() == "deepdem: error: --object-class needs --truth-dsm"
    assert not (tmp_path / "gen").exists()
    # an object class raster on another grid is refused with its name
    write_raster(tmp_path / "classes.tif", np.zeros((48, 48), np.uint8), transform, "EPSG:32631")
    code, _, err = run(capsys, "synth", "--truth-dsm", str(tmp_path / "dsm.tif"), "--truth-dtm", str(tmp_path / "dtm.tif"),
                       "--object-class", str(tmp_path / "classes.tif"), "--out", str(tmp_path / "other"))
    assert code == 2 and "classes.tif" in err and "is not the DSM's" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("argv, flag", [
    (["refine", "--checkpoint", "m.ckpt", "--scene", "s", "--out", "o.tif", "--overlap", "1"], "--overlap"),
    (["refine", "--checkpoint", "m.ckpt", "--scene", "s", "--out", "o.tif", "--batch-size", "0"], "--batch-size"),
    (["refine", "--checkpoint", "m.ckpt", "--scene", "s", "--out", "o.tif", "--workers", "-1"], "--workers"),
    (["prepare", "--asp-prefix", "run", "--out", "s", "--clahe-clip", "0"], "--clahe-clip"),
    (["prepare", "--asp-prefix", "run", "--out", "s", "--resolution", "nan"], "--resolution"),
    (["train", "--scene", "s", "--chip-size", "0"], "--chip-size"),
    (["train", "--scene", "s", "--holdout-fraction", "1.5"], "--holdout-fraction"),
    (["train", "--scene", "s", "--lr", "-1"], "--lr"),
    (["train", "--scene", "s", "--target", "chm"], "--target"),
    (["hillshade", "--dem", "d.tif", "--out", "h.tif", "--altitude", "95"], "--altitude"),
    (["calibrate", "--checkpoint", "m.ckpt", "--dem", "d.tif", "--reference", "r.tif", "--out", "o.ckpt",
      "--method", "mean"], "--method"),
    (["lidar", "x.laz", "--out", "t", "--resolution", "0"], "--resolution"),
    (["demo", "--minutes", "0"], "--minutes"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["train", "--scene", "s", "--encoder-depth", "6"], "--encoder-depth"),
])
def test_out_of_range_flags_are_one_line_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("deepdem: error:") and err.strip().count("\n") == 0
    assert f"argument {flag}" in err


def test_out_of_range_values_from_a_training_config_are_one_line(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("batch_size: 0\n")
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "c.yaml"), "--scene", str(tmp_path))
    assert code == 2 and "batch_size: must be in [1, inf), got 0" in err and err.strip().count("\n") == 0


def test_truncated_geotiff_is_one_line_naming_the_file(capsys, synth_dir, tmp_path):
    data = (synth_dir / "run-DEM.tif").read_bytes()
    (tmp_path / "cut-DEM.tif").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "prepare", "--dsm", str(tmp_path / "cut-DEM.tif"),
                       "--ortho-left", str(synth_dir / "left_ortho.tif"), "--ortho-right", str(synth_dir / "right_ortho.tif"),
                       "--triangulation-error", str(synth_dir / "run-IntersectionErr.tif"), "--out", str(tmp_path / "s"))
    assert code == 2 and "cut-DEM.tif" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "s").exists()


def test_refine_passes_no_parallax_check_to_the_library(capsys, monkeypatch, tmp_path):
    import importlib

    asked = []  # the package exports refine(), which hides the module of the same name
    monkeypatch.setattr(importlib.import_module("deepdem.refine"), "refine",
                        lambda *args, **kwargs: asked.append(kwargs["parallax_check"]) or tmp_path / "out.tif")
    for flags in ((), ("--no-parallax-check",)):
        code, out, _ = run(capsys, "refine", "--checkpoint", str(tmp_path / "m.ckpt"), "--scene", str(tmp_path / "s"),
                           "--out", str(tmp_path / "out.tif"), "--quiet", *flags)
        assert code == 0 and "wrote" in out
    assert asked == [True, False]
