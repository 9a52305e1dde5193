import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin

from deepdem.data import grid_positions
from deepdem.errors import CheckpointError
from deepdem.models import DeepDEMRegressionTask, load_checkpoint, save_checkpoint
from deepdem.refine import blend_window, refine
from deepdem.scene import FLOAT_NODATA, Grid, write_scene

BANDS = ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask"]


def zero_residual_task(bands=BANDS, chip_size=64):
    task = DeepDEMRegressionTask({"bands": list(bands), "chip_size": chip_size, "GSF_DICT": {"64": 2.0}})
    head = task.model.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return task.eval()


def read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def test_zero_residual_model_returns_the_input_dsm_exactly(prepared_scene, tmp_path):
    checkpoint = save_checkpoint(zero_residual_task(), tmp_path / "zero.ckpt")
    out = refine(checkpoint, prepared_scene, tmp_path / "refined.tif", progress=False)
    data, profile = read(out)
    dsm = prepared_scene.read("dsm")
    mask = prepared_scene.read("nodata_mask") > 0
    np.testing.assert_array_equal(data[mask], dsm[mask])  # bit for bit
    assert (data[~mask] == FLOAT_NODATA).all()
    assert profile["crs"] == prepared_scene.crs
    assert profile["transform"] == prepared_scene.transform
    assert profile["nodata"] == FLOAT_NODATA and profile["dtype"] == "float32"


def test_fill_gives_every_pixel_a_finite_value(prepared_scene, tmp_path):
    out = refine(zero_residual_task(), prepared_scene, tmp_path / "filled.tif", fill=True, progress=False)
    data, _ = read(out)
    assert (data != FLOAT_NODATA).all() and np.isfinite(data).all()


def test_scene_smaller_than_a_chip_is_padded_and_fully_refined(tmp_path):
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 40, 50)
    rng = np.random.default_rng(0)
    bands = {b: rng.uniform(0, 1, grid.shape).astype(np.float32) for b in BANDS if b != "nodata_mask"}
    bands["dsm"] = 100 + bands["dsm"]
    scene = write_scene(tmp_path / "small", grid, bands)
    task = DeepDEMRegressionTask({"bands": BANDS, "chip_size": 64, "GSF_DICT": {"64": 2.0}}).eval()
    data, _ = read(refine(task, scene, tmp_path / "small.tif", progress=False))
    assert data.shape == (40, 50)
    assert np.isfinite(data).all() and (data != FLOAT_NODATA).all()


def test_edge_chips_stay_inside_the_scene():
    assert grid_positions(200, 64, 32) == [0, 32, 64, 96, 128, 136]
    assert grid_positions(64, 64, 32) == [0]
    assert grid_positions(30, 64, 32) == [0]
    window = blend_window(64)
    assert window.min() > 0 and window.max() == pytest.approx(window[31, 31])


def test_checkpoint_whose_bands_the_scene_lacks_is_refused(tmp_path):
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 64, 64)
    scene = write_scene(tmp_path / "dsm_only", grid, {"dsm": np.full(grid.shape, 5.0, np.float32)})
    with pytest.raises(CheckpointError, match="dsm_only: scene lacks band\\(s\\) ortho_left"):
        refine(zero_residual_task(), scene, tmp_path / "out.tif", progress=False)
    assert not (tmp_path / "out.tif").exists()


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_marker",))


def test_checkpoint_with_a_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"hyper_parameters": _Exploit(), "state_dict": {}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt: not a loadable deepdem checkpoint"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned_marker").exists()
