import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from deepdem.data import (ChipDataset, Region, SceneArrays, chip_means, fill_dsm_holes, normalise_chip, normalise_dsm,
                          spatial_split)
from deepdem.errors import InputError
from deepdem.models import DeepDEMRegressionTask, load_checkpoint
from deepdem.scene import Scene
from deepdem.train import TrainConfig, train


def test_normalisation_is_chip_mean_over_scale():
    dsm = np.array([[10.0, 12.0], [np.nan, 14.0]], np.float32)
    stack = {"dsm": dsm, "ndvi": np.array([[0.5, np.nan], [0.1, 0.2]], np.float32),
             "triangulation_error": np.array([[np.nan, 1.0], [1.0, 1.0]], np.float32),
             "nodata_mask": np.array([[1, 1], [0, 1]], np.float32)}
    chip = normalise_chip(stack, ["dsm", "ndvi", "triangulation_error", "nodata_mask"], scale=2.0)
    np.testing.assert_allclose(chip.inputs[0], [[-1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(chip.inputs[1], [[0.5, 0.0], [0.1, 0.2]])
    assert chip.inputs[2][0, 0] == -1.0  # triangulation error nodata -> -1
    np.testing.assert_allclose(chip.base, [[10, 12], [12, 14]])  # chip mean where no data
    assert chip.valid.tolist() == [[True, True], [False, True]]


def test_spatial_split_holds_out_a_stripe_of_at_least_one_chip():
    train_region, val_region = spatial_split((192, 300), 64, 0.2)
    assert val_region.width == 64 and train_region.col1 == val_region.col0 == 236
    with pytest.raises(InputError, match="largest chip size that fits: 64"):
        spatial_split((100, 150), 128)


def test_training_chips_are_augmented_and_validation_chips_are_fixed(prepared_scene):
    bands = ["dsm", "ortho_left", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    tr, va = spatial_split(prepared_scene.shape, 64)
    val = ChipDataset([arrays], [va], bands, 64, "val")
    a, b = val[0], val[0]
    assert torch.equal(a["inputs"], b["inputs"]) and len(val) == 3  # 192 rows: chips at rows 0, 64 and 128
    train_set = ChipDataset([arrays], [tr], bands, 64, "train", samples=4, seed=1)
    item = train_set[0]
    assert item["inputs"].shape == (3, 64, 64) and item["valid"].dtype == torch.bool
    train_set.set_epoch(1)
    assert not torch.equal(train_set[0]["inputs"], item["inputs"])


def test_validation_chips_cover_their_region_side_by_side(prepared_scene):
    bands = ["dsm", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    region = Region(10, 10 + 150, 20, 20 + 140)  # neither side a multiple of the chip
    val = ChipDataset([arrays], [region], bands, 64, "val")
    assert sorted({r for _, r, _ in val.positions}) == [10, 74, 96]  # the last chip flush with the edge
    assert sorted({c for _, _, c in val.positions}) == [20, 84, 96]
    times_scored = np.zeros(prepared_scene.shape, int)
    for _, row, col in val.positions:
        times_scored[row : row + 64, col : col + 64] += 1
    inside = times_scored[10:160, 20:160]
    # every pixel once, twice where the last row or column of chips overlaps the one before
    assert inside.min() == 1 and inside.max() == 4 and times_scored.sum() == inside.sum()
    assert (inside == 1).sum() == (150 - 42) * (140 - 52)  # the last chips overlap 42 rows and 52 columns


def test_short_training_run_writes_a_checkpoint_refine_can_use(prepared_scene, tmp_path):
    result = train([prepared_scene], tmp_path / "run", chip_size=64, batch_size=4, max_epochs=2,
                   samples_per_epoch=8, progress=False)
    assert result.checkpoint.exists()
    assert result.checkpoint.stat().st_size < 80e6  # weights and metadata, no optimiser state
    task = load_checkpoint(result.checkpoint)
    kwargs = task.model_kwargs
    assert kwargs["bands"] == ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "parallax",
                               "ortho_correlation", "nodata_mask"]
    assert kwargs["chip_size"] == 64 and kwargs["target"] == "dsm"
    assert float(kwargs["GSF_DICT"]["64"]) == pytest.approx(prepared_scene.scale_factor(64))
    assert str(prepared_scene.path.resolve()) in kwargs["datapath"]
    # defaults that transfer to unseen scenes: the training scale factor, filled holes, no hold-out
    assert kwargs["scale_source"] == "checkpoint" and kwargs["dsm_holes"] == "idw"
    assert kwargs["validation"] == "the training scenes (fit)"
    # DeepDEM users' API
    legacy = DeepDEMRegressionTask.load_from_checkpoint(result.checkpoint, map_location="cpu")
    assert legacy.model_kwargs["bands"] == kwargs["bands"]
    assert np.isfinite(result.best_val_mae)


def test_training_leaves_the_callers_random_streams_and_precision_as_they_were(prepared_scene, tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
    previous_precision = torch.get_float32_matmul_precision()

    def seed_the_caller():
        random.seed(11)
        np.random.seed(11)
        torch.manual_seed(11)

    seed_the_caller()
    expected = (random.random(), np.random.rand(3), torch.rand(3))  # what the caller's streams give next
    seed_the_caller()
    torch.set_float32_matmul_precision("highest")
    try:
        train([prepared_scene], tmp_path / "run", chip_size=64, batch_size=4, max_epochs=1, samples_per_epoch=4,
              progress=False, seed=3)
        after = (random.random(), np.random.rand(3), torch.rand(3))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(previous_precision)
    assert after[0] == expected[0]
    np.testing.assert_array_equal(after[1], expected[1])
    assert torch.equal(after[2], expected[2])
    assert "PL_GLOBAL_SEED" not in os.environ and "PL_SEED_WORKERS" not in os.environ


def test_scene_smaller_than_the_chip_is_refused_naming_the_largest_that_fits(prepared_scene, tmp_path):
    with pytest.raises(InputError, match="largest chip size that fits: 128"):
        train([prepared_scene], tmp_path / "run", chip_size=256)
    # with a hold-out stripe, the scene must hold two chips along its long axis
    with pytest.raises(InputError, match="largest chip size that fits: 64"):
        train([prepared_scene], tmp_path / "run", chip_size=128, holdout_fraction=0.2)
    assert not (tmp_path / "run").exists()


def test_chips_come_from_memory_maps_without_reopening_rasters(prepared_scene, monkeypatch):
    import rasterio

    bands = ["dsm", "ortho_left", "ortho_right", "nodata_mask"]
    expected_dsm = fill_dsm_holes(prepared_scene.read("dsm"))
    arrays = SceneArrays(prepared_scene, bands, ["dsm", "dtm"], 64)
    assert all(isinstance(a, np.memmap) for a in arrays.arrays.values())

    def no_open(*args, **kwargs):
        raise AssertionError("a raster was opened per chip")

    monkeypatch.setattr(rasterio, "open", no_open)
    tr, _ = spatial_split(prepared_scene.shape, 64)
    dataset = ChipDataset([arrays], [tr], bands, 64, "train", samples=8)
    item = dataset[3]
    assert item["target"].shape == (2, 64, 64)  # DSM and DTM targets
    np.testing.assert_array_equal(arrays.arrays["dsm"], expected_dsm)


def test_training_swaps_the_two_images_sometimes(prepared_scene):
    bands = ["dsm", "ortho_left", "ortho_right", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    tr, _ = spatial_split(prepared_scene.shape, 64)
    plain = ChipDataset([arrays], [tr], bands, 64, "train", samples=16, seed=2, swap_images=False)
    swapping = ChipDataset([arrays], [tr], bands, 64, "train", samples=16, seed=2)
    swapped = 0
    for i in range(16):
        a, b = plain[i]["inputs"], swapping[i]["inputs"]
        if torch.equal(a, b):
            continue
        assert torch.equal(a[1], b[2]) and torch.equal(a[2], b[1])
        swapped += 1
    assert 2 <= swapped <= 14


def test_config_yaml_round_trip_and_unknown_keys(tmp_path):
    from deepdem.train import TrainConfig

    config = TrainConfig(scenes=["a", "b"], chip_size=128, bands=["dsm", "ndvi"], arch="ResDepth", max_minutes=2.5)
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config
    assert TrainConfig.from_yaml(tmp_path / "c.yaml", lr=0.01).lr == 0.01
    (tmp_path / "bad.yaml").write_text("chip_sise: 64\n")
    with pytest.raises(InputError, match="bad.yaml: unknown parameter\\(s\\) chip_sise"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "switch.yaml").write_text("weight_averaging: maybe\nuncertainty: no\n")
    with pytest.raises(InputError, match="switch.yaml: expected true or false: weight_averaging: 'maybe'$"):
        TrainConfig.from_yaml(tmp_path / "switch.yaml")
    (tmp_path / "progress.yaml").write_text("progress: sometimes\n")
    with pytest.raises(InputError, match="expected true or false: progress: 'sometimes'$"):
        TrainConfig.from_yaml(tmp_path / "progress.yaml")
    (tmp_path / "null.yaml").write_text("progress: null\n")
    assert TrainConfig.from_yaml(tmp_path / "null.yaml").progress is None


def test_dsm_only_resdepth_and_two_heads_train(prepared_scene, tmp_path):
    result = train([prepared_scene], tmp_path / "resdepth", arch="ResDepth", bands=["dsm"], chip_size=64,
                   batch_size=4, max_epochs=1, samples_per_epoch=4, progress=False)
    kwargs = load_checkpoint(result.checkpoint).model_kwargs
    assert kwargs["bands"] == ["dsm"]
    assert kwargs["pixel_size_m"] == pytest.approx(prepared_scene.grid.pixel_size_m)  # refine resamples to it
    both = train([prepared_scene], tmp_path / "both", target="both", chip_size=64, batch_size=4,
                 max_epochs=1, samples_per_epoch=4, progress=False)
    task = load_checkpoint(both.checkpoint)
    assert task.targets == ("dsm", "dtm")
    with torch.no_grad():
        residual, sigma = task.split_output(task(torch.zeros(1, len(task.model_kwargs["bands"]), 64, 64)))
    assert residual.shape == sigma.shape == (1, 2, 64, 64) and (sigma > 0).all()  # a σ per head
    logged = (tmp_path / "both" / "logs" / "metrics.csv").read_text().splitlines()[0]
    for column in ("val_mae", "val_rmse", "val_nmad", "val_bias", "lr", "val_nll", "val_coverage_68"):
        assert column in logged
    assert list((tmp_path / "both" / "tensorboard").glob("events.out.tfevents.*"))

    # refine describes each head's band, and evaluate reads the one its target names, σ alike
    import importlib

    import rasterio

    from deepdem.evaluate import evaluate

    refine = importlib.import_module("deepdem.refine")
    out = refine.refine(both.checkpoint, prepared_scene, tmp_path / "both.tif", progress=False)
    with rasterio.open(out) as dem, rasterio.open(refine.sigma_path(out)) as sigma:
        assert dem.descriptions == ("refined DSM (m)", "refined DTM (m)")
        assert sigma.descriptions == ("sigma of the refined DSM (m)", "sigma of the refined DTM (m)")
        profile = dict(dem.profile, count=1, driver="GTiff")
        for name, src in (("dtm_only.tif", dem), ("dtm_sigma.tif", sigma)):
            with rasterio.open(tmp_path / name, "w", **profile) as dst:
                dst.write(src.read(2), 1)
                dst.update_tags(**src.tags())
    two_band = evaluate(out, scene=prepared_scene, target="dtm", sigma=refine.sigma_path(out))
    one_band = evaluate(tmp_path / "dtm_only.tif", scene=prepared_scene, target="dtm", sigma=tmp_path / "dtm_sigma.tif")
    assert two_band.metrics["refined"]["mae"] == one_band.metrics["refined"]["mae"]
    assert two_band.calibration["all"] == one_band.calibration["all"]


def _cli(*args):
    import os
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "deepdem", "train", *args], env


def test_resume_after_kill_9_ends_at_the_same_epoch_count(prepared_scene, tmp_path):
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    args = ["--scene", str(prepared_scene.path), "--out", str(run), "--chip-size", "64", "--batch-size", "2",
            "--samples-per-epoch", "2", "--max-epochs", "40", "--arch", "ResDepth", "--bands", "dsm", "--no-progress"]
    command, env = _cli(*args)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < 39 and not (run / "best.ckpt").exists()

    done = subprocess.run(_cli(*args, "--resume")[0], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    summary = json.loads((run / "train.json").read_text())
    assert summary["resumed_after_epoch"] == killed_at  # continued, not restarted
    assert summary["epochs"] == 40  # the same count as an unbroken run
    assert load_checkpoint(run / "best.ckpt").model_kwargs["bands"] == ["dsm"]


def test_two_process_ddp_on_cpu_completes(prepared_scene, tmp_path):
    import subprocess

    args = ["--scene", str(prepared_scene.path), "--out", str(tmp_path / "ddp"), "--chip-size", "64",
            "--batch-size", "2", "--samples-per-epoch", "8", "--max-epochs", "2", "--arch", "ResDepth",
            "--bands", "dsm", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress"]
    command, env = _cli(*args)
    command.insert(command.index("train"), "--verbose")  # Lightning logs each rank's start at INFO
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Two processes trained: Lightning's world size as rank 0 recorded it, and one log line per rank.
    assert json.loads((tmp_path / "ddp" / "train.json").read_text())["world_size"] == 2
    assert "GLOBAL_RANK: 0" in done.stderr and "GLOBAL_RANK: 1" in done.stderr
    assert load_checkpoint(tmp_path / "ddp" / "best.ckpt").model_kwargs["chip_size"] == 64


def test_rotated_chips_equal_numpy_rotations(prepared_scene):
    arrays = SceneArrays(prepared_scene, ["dsm", "ortho_left"], "dsm", 64)
    plain = arrays.chip(10, 20, 64)
    for k in range(4):
        for flip in (False, True):
            got = arrays.chip(10, 20, 64, k, flip)
            for band, values in plain.items():
                expected = np.rot90(values, k)
                expected = expected[:, ::-1] if flip else expected
                np.testing.assert_array_equal(got[band], expected)


def test_training_chips_equal_normalise_chip_of_the_same_rotated_pixels(prepared_scene):
    """The batch path (cached fills, flips from the map, the batch normalised at once) against the
    reference normalisation that refine uses, for all eight orientations."""
    bands = ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    tr, _ = spatial_split(prepared_scene.shape, 64)
    dataset = ChipDataset([arrays], [tr], bands, 64, "train", samples=64, seed=4, swap_images=False)
    raw = {b: prepared_scene.read(b) for b in [*bands, "truth_dsm"]}
    unfilled = raw["dsm"].copy()
    raw["dsm"] = fill_dsm_holes(raw["dsm"])  # training and refine fill the holes before normalising
    assert np.isnan(unfilled).sum() > 100 and not np.isnan(raw["dsm"]).any()
    orientations, holes = set(), 0
    for index in range(64):
        _, row, col, k, flip, _ = dataset._draw(index)
        orientations.add((k, flip))
        stack = {}
        for band, values in raw.items():
            chip = np.rot90(values[row : row + 64, col : col + 64], k)
            stack[band] = np.ascontiguousarray(chip[:, ::-1] if flip else chip)
        expected = normalise_chip(stack, bands, arrays.scale, arrays.fallback_mean)
        holes += int(np.isnan(np.rot90(unfilled[row : row + 64, col : col + 64], k)).sum())
        item = dataset[index]
        np.testing.assert_allclose(item["inputs"].numpy(), expected.inputs, atol=2e-6)
        np.testing.assert_allclose(item["base"][0].numpy(), expected.base, atol=1e-4)
        truth_valid = expected.valid & ~np.isnan(stack["truth_dsm"])
        np.testing.assert_array_equal(item["valid"][0].numpy(), truth_valid)
        np.testing.assert_array_equal(item["target"][0].numpy()[truth_valid], stack["truth_dsm"][truth_valid])
        assert np.all(item["target"][0].numpy()[~truth_valid] == 0)
    assert len(orientations) == 8
    assert holes > 100  # DSM no-data was exercised, not only full chips


def test_scene_arrays_travel_to_worker_processes_as_maps_not_copies(prepared_scene):
    import pickle

    arrays = SceneArrays(prepared_scene, ["dsm", "ortho_left", "nodata_mask"], "dsm", 64)
    payload = pickle.dumps(arrays)
    assert len(payload) < 20_000  # the arrays themselves would be several MB
    copy = pickle.loads(payload)
    assert isinstance(copy.arrays["dsm"], np.memmap)
    np.testing.assert_array_equal(copy.view("truth_dsm", 5, 7, 64, 3, True), arrays.view("truth_dsm", 5, 7, 64, 3, True))
    np.testing.assert_array_equal(copy.view("dsm", 5, 7, 64), fill_dsm_holes(prepared_scene.read("dsm"))[5:69, 7:71])
    unfilled = SceneArrays(prepared_scene, ["dsm", "nodata_mask"], "dsm", 64, fill_holes=False)
    np.testing.assert_array_equal(unfilled.view("dsm", 5, 7, 64), prepared_scene.read("dsm")[5:69, 7:71])


def test_chip_means_and_normalise_dsm_on_a_hand_made_batch():
    dsm = np.array([[[10.0, 12.0], [np.nan, 14.0]], [[np.nan, np.nan], [np.nan, np.nan]]], np.float32)
    means = chip_means(dsm, fallback=np.array([0.0, 7.0]))
    np.testing.assert_allclose(means, [12.0, 7.0])  # the valid mean; the fallback for an empty chip
    channel, base = np.empty_like(dsm), np.empty_like(dsm)
    valid = normalise_dsm(dsm, means, np.array([2.0, 4.0]), channel, base)
    np.testing.assert_allclose(channel[0], [[-1.0, 0.0], [0.0, 1.0]])  # (h − 12) / 2, 0 where no data
    np.testing.assert_allclose(channel[1], 0.0)
    np.testing.assert_allclose(base[0], [[10, 12], [12, 14]])
    np.testing.assert_allclose(base[1], 7.0)
    assert valid.sum() == 3


def test_one_scale_factor_for_every_training_scene_and_a_validation_scene(prepared_scene, tmp_path):
    """Two scenes of different relief train on their mean factor (what refine applies to an
    unseen scene); --val-scene validates on a scene of its own instead of a hold-out."""
    import shutil

    other_path = tmp_path / "other"
    shutil.copytree(prepared_scene.path, other_path, ignore=shutil.ignore_patterns(".cache"))
    manifest = json.loads((other_path / "scene.json").read_text())
    manifest["scale_factors"] = {k: 3 * v for k, v in manifest["scale_factors"].items()}
    (other_path / "scene.json").write_text(json.dumps(manifest))
    other = Scene.open(other_path)
    result = train([prepared_scene, other], tmp_path / "run", chip_size=64, batch_size=4, max_epochs=1,
                   samples_per_epoch=4, progress=False, val_scenes=[prepared_scene.path])
    kwargs = load_checkpoint(result.checkpoint).model_kwargs
    assert kwargs["GSF_DICT"]["64"] == pytest.approx(2 * prepared_scene.scale_factor(64))
    assert kwargs["validation"] == [str(prepared_scene.path.resolve())]
    arrays = SceneArrays(other, ["dsm", "nodata_mask"], "dsm", 64, scale=kwargs["GSF_DICT"]["64"])
    assert arrays.scale == pytest.approx(2 * prepared_scene.scale_factor(64))


def test_scale_source_of_refine_defaults_to_the_checkpoint_and_can_be_overridden():
    from deepdem.models import scale_for

    trained = {"GSF_DICT": {"128": 4.0}, "scale_source": "checkpoint"}
    assert scale_for(trained, {128: 9.0}, 128) == 4.0
    assert scale_for(trained, {128: 9.0}, 128, "scene") == 9.0
    assert scale_for({"GSF_DICT": {"128": 4.0}}, {128: 9.0}, 128) == 9.0  # checkpoints before the change
    with pytest.raises(ValueError, match="scale source must be one of checkpoint, scene"):
        scale_for(trained, {}, 128, "median")


def test_fine_tuning_starts_from_the_checkpoint_and_keeps_its_scale_factor(prepared_scene, tmp_path):
    from deepdem.models import output_layer

    first = train([prepared_scene], tmp_path / "first", chip_size=64, batch_size=4, max_epochs=1,
                  samples_per_epoch=4, progress=False, identity_init=False)
    pretrained = load_checkpoint(first.checkpoint)
    # Fake a checkpoint trained elsewhere, with another scale factor.
    pretrained.model_kwargs["GSF_DICT"] = {"64": 7.5}
    from deepdem.models import save_checkpoint

    save_checkpoint(pretrained, tmp_path / "elsewhere.ckpt")
    tuned = train([prepared_scene], tmp_path / "tuned", chip_size=64, batch_size=4, max_epochs=1,
                  samples_per_epoch=4, progress=False, lr=1e-12, init=str(tmp_path / "elsewhere.ckpt"))
    task = load_checkpoint(tuned.checkpoint)
    assert task.model_kwargs["GSF_DICT"]["64"] == 7.5
    # no depth asked for: the checkpoint's (3, the default of a run without --init)
    assert pretrained.model_kwargs["encoder_depth"] == task.model_kwargs["encoder_depth"] == 3
    assert task.model_kwargs["init"] == str((tmp_path / "elsewhere.ckpt").resolve())
    # a negligible learning rate: the weights are the pretrained ones
    assert torch.allclose(output_layer(task.model).weight, output_layer(pretrained.model).weight, atol=1e-8)
    # an earlier checkpoint, whose σ shares the residuals' output layer: fine-tuning keeps that head
    joint = {key: value for key, value in pretrained.model_kwargs.items() if key != "sigma_head"}
    save_checkpoint(DeepDEMRegressionTask(joint), tmp_path / "joint.ckpt")
    from_joint = train([prepared_scene], tmp_path / "from-joint", chip_size=64, batch_size=4, max_epochs=1,
                       samples_per_epoch=4, progress=False, init=str(tmp_path / "joint.ckpt"))
    assert load_checkpoint(from_joint.checkpoint).sigma_branch is None
    with pytest.raises(InputError, match="elsewhere.ckpt: cannot fine-tune from this checkpoint: bands"):
        train([prepared_scene], tmp_path / "other", chip_size=64, bands=["dsm", "ndvi"], max_epochs=1,
              progress=False, init=str(tmp_path / "elsewhere.ckpt"))
    with pytest.raises(InputError, match="uncertainty laplace \\(this run: None\\)"):
        train([prepared_scene], tmp_path / "other", chip_size=64, max_epochs=1, progress=False,
              uncertainty=False, init=str(tmp_path / "elsewhere.ckpt"))
    with pytest.raises(InputError, match="encoder_depth 3 \\(this run: 4\\)"):
        train([prepared_scene], tmp_path / "other", chip_size=64, max_epochs=1, progress=False,
              encoder_depth=4, init=str(tmp_path / "elsewhere.ckpt"))


def test_the_default_batch_is_8_chips_for_the_dsm_and_16_for_a_dtm(prepared_scene, tmp_path):
    common = dict(chip_size=64, samples_per_epoch=32, max_epochs=1, progress=False)
    for target, batch, steps in (("dsm", 8, 4), ("dtm", 16, 2)):
        result = train([prepared_scene], tmp_path / target, target=target, **common)
        assert load_checkpoint(result.checkpoint).model_kwargs["batch_size"] == batch
        assert f"batch_size: {batch}" in (tmp_path / target / "config.yaml").read_text()
        resume_point = torch.load(tmp_path / target / "checkpoints" / "last.ckpt", weights_only=False)
        assert resume_point["global_step"] == steps  # an epoch is 32 chips
    asked = train([prepared_scene], tmp_path / "asked", target="dtm", batch_size=4, **common)
    assert load_checkpoint(asked.checkpoint).model_kwargs["batch_size"] == 4


def test_a_resumed_run_keeps_its_network_and_refuses_another(prepared_scene, tmp_path, caplog, monkeypatch):
    common = dict(chip_size=64, batch_size=2, samples_per_epoch=2, progress=False)
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(caplog.handler)  # Lightning's logger does not propagate to caplog's
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            train([prepared_scene], tmp_path / "run", max_epochs=1, encoder_depth=4, **common)
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert "weights_only" not in caplog.text  # the resume point says what it saves
    # no depth asked for: the run's, not the default 3 (a run begun before depth 3 was the default);
    # the scene spelled relative to the working folder is the same scene
    monkeypatch.chdir(prepared_scene.path.parent)
    with caplog.at_level(logging.WARNING, logger="deepdem"):
        resumed = train([prepared_scene.path.name], tmp_path / "run", max_epochs=2, resume=True, **common)
    assert resumed.epochs == 2 and load_checkpoint(resumed.checkpoint).model_kwargs["encoder_depth"] == 4
    assert "settings other than the run's" not in caplog.text  # a longer run is no change of recipe
    assert f"scenes: [{prepared_scene.path.resolve()}]" in (tmp_path / "run" / "config.yaml").read_text()
    # another batch or learning rate is allowed, and said: the rest of the run differs from an unbroken one
    with caplog.at_level(logging.WARNING, logger="deepdem"):
        train([prepared_scene], tmp_path / "run", max_epochs=3, resume=True, **{**common, "batch_size": 1, "lr": 1e-3})
    assert "resuming with settings other than the run's: batch_size 2 → 1; lr 0.0005 → 0.001" in caplog.text
    (tmp_path / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "broken" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="last.ckpt: cannot read the resume point"):
        train([prepared_scene], tmp_path / "broken", max_epochs=2, resume=True, **common)
    with pytest.raises(InputError, match="last.ckpt: cannot resume this run with another network: encoder_depth 4 "
                                         "\\(this run: 5\\)"):
        train([prepared_scene], tmp_path / "run", max_epochs=3, resume=True, encoder_depth=5, **common)


def test_relief_augmentation_stretches_and_tilts_dsm_and_truth_alike(prepared_scene):
    bands = ["dsm", "ortho_left", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    region, _ = spatial_split(prepared_scene.shape, 64, 0.0)
    plain = ChipDataset([arrays], [region], bands, 64, "train", samples=32, seed=3)
    shaped = ChipDataset([arrays], [region], bands, 64, "train", samples=32, seed=3, relief_share=0.5)
    changed = 0
    for i in range(32):
        a, b = plain[i], shaped[i]
        stretch, east, south = shaped._relief(i)
        valid = a["valid"][0].numpy()
        assert np.array_equal(valid, b["valid"][0].numpy())
        # the correction to learn is stretched with the relief, and a plane does not change it
        correction_a = (a["target"] - a["base"])[0].numpy()[valid]
        correction_b = (b["target"] - b["base"])[0].numpy()[valid]
        np.testing.assert_allclose(correction_b, stretch * correction_a, atol=2e-3)
        assert np.allclose(a["base"], b["base"]) == (stretch == 1.0 and east == 0.0 and south == 0.0)
        changed += stretch != 1.0
    assert 8 <= changed <= 24  # about half the chips
    validation = ChipDataset([arrays], [region], bands, 64, "val", relief_share=0.5)
    assert not validation.relief_augmentation  # validation chips are never augmented


def test_relief_share_sets_the_share_of_reshaped_chips_and_keeps_the_chips(prepared_scene):
    bands = ["dsm", "ortho_left", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    region, _ = spatial_split(prepared_scene.shape, 64, 0.0)
    counts = {}
    for share in (0.0, 0.25, 0.5, 1.0):
        dataset = ChipDataset([arrays], [region], bands, 64, "train", samples=2000, seed=3, relief_share=share)
        table = dataset._epoch_draws().copy()
        reshaped = np.array([dataset._relief(i)[0] != 1.0 for i in range(2000)])
        counts[share] = int(reshaped.sum())
        if share == 0.0:
            first_table = table
        assert np.array_equal(table, first_table)  # the share changes the relief, not which chips
    assert counts[0.0] == 0 and counts[1.0] == 2000
    assert 440 <= counts[0.25] <= 560 and 930 <= counts[0.5] <= 1070
    with pytest.raises(ValueError, match="relief_share"):
        ChipDataset([arrays], [region], bands, 64, "train", relief_share=1.5)


def test_sigma_ranks_the_noisy_half_above_the_quiet_one(tmp_path):
    """A scene whose initial DSM is 10x noisier in its right half (and says so in its
    triangulation error, as ASP's does): the trained σ must be larger there, and calibrated."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from deepdem.refine import refine, sigma_path
    from deepdem.scene import FLOAT_NODATA, Grid, write_scene

    rng = np.random.default_rng(0)
    height, width = 96, 192
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    truth = 50 + 3 * np.sin(rows / 11.0) * np.cos(cols / 17.0)
    noise_level = np.where(cols < width // 2, 0.1, 1.0).astype(np.float32)
    dsm = truth + rng.laplace(0, 1, truth.shape) * noise_level
    grid = Grid(CRS.from_epsg(32610), from_origin(500000, 5200000, 1.0, 1.0), height, width)
    scene = write_scene(tmp_path / "scene", grid, {"dsm": dsm.astype(np.float32), "truth_dsm": truth.astype(np.float32),
                                                    "triangulation_error": noise_level}, n_chips=200)
    result = train([scene], tmp_path / "run", bands=["dsm", "triangulation_error", "nodata_mask"], chip_size=64,
                   batch_size=4, max_epochs=20, samples_per_epoch=32, lr=3e-3, relief_augmentation=False,
                   precision="32-true", progress=False)
    task = load_checkpoint(result.checkpoint)
    assert task.has_sigma and task.model_kwargs["sigma_temperature"] > 0
    out = refine(task, scene, tmp_path / "refined.tif", bf16=False, progress=False)
    import rasterio

    with rasterio.open(sigma_path(out)) as src:
        sigma = src.read(1)
    with rasterio.open(out) as src:
        errors = src.read(1) - truth
    assert (sigma != FLOAT_NODATA).all()
    quiet, noisy = np.median(sigma[:, 8:80]), np.median(sigma[:, 112:184])
    assert noisy > 3 * quiet, (quiet, noisy)  # measured 4.5x; the noise is 10x, the refined errors 4.6x
    # A Laplace σ is √2 × the mean |error|: within a factor 1.5 in each half (measured: 0.14 and 0.63
    # against 0.14 and 0.64).
    for sigma_half, error_half in ((quiet, errors[:, 8:80]), (noisy, errors[:, 112:184])):
        assert 1 / 1.5 < sigma_half / (np.sqrt(2) * np.abs(error_half).mean()) < 1.5


def test_a_model_trained_with_sigma_refines_to_the_bytes_of_one_trained_without(prepared_scene, tmp_path):
    """σ's loss reaches only σ's own output weights: the heights cost nothing in MAE."""
    import rasterio

    from deepdem.refine import refine, sigma_path

    heights = {}
    for uncertainty in (True, False):
        result = train([prepared_scene], tmp_path / f"run-{uncertainty}", chip_size=64, batch_size=4, max_epochs=2,
                       samples_per_epoch=8, uncertainty=uncertainty, progress=False)
        # four steps do not make a model that passes refine's parallax check, which would keep the input DSM
        out = refine(result.checkpoint, prepared_scene, tmp_path / f"refined-{uncertainty}.tif", progress=False,
                     parallax_check=False)
        assert sigma_path(out).exists() == uncertainty
        with rasterio.open(out) as src:
            heights[uncertainty] = src.read(1)
    assert np.array_equal(heights[True], heights[False])
    assert np.nanmax(np.abs(heights[True] - prepared_scene.read("dsm"))) > 0.01  # trained: not the input DSM


def test_training_cache_holds_one_model_ready_copy_of_the_bands(prepared_scene, tmp_path):
    from deepdem.data import CACHE_BYTES_PER_PIXEL

    bands = ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "parallax", "ortho_correlation",
             "nodata_mask"]
    (tmp_path / "cache" / "dsm-v1-0.npy").parent.mkdir()
    (tmp_path / "cache" / "dsm-T-v3-0.npy").write_bytes(b"stale")  # an older layout's file
    SceneArrays(prepared_scene, bands, "dsm", 64, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 9 and not (tmp_path / "cache" / "dsm-T-v3-0.npy").exists()
    pixels = prepared_scene.shape[0] * prepared_scene.shape[1]
    size = sum(f.stat().st_size for f in files)
    assert CACHE_BYTES_PER_PIXEL == 33 and size <= pixels * CACHE_BYTES_PER_PIXEL + 9 * 128  # + .npy headers


def test_trailing_weight_average_leans_on_the_last_third_of_the_run():
    """Update t of T weighs t²: the average sits at 3/4 of the run, its last third holds 70 %."""
    from deepdem.train import TrailingWeightAverage

    averaging, steps = TrailingWeightAverage(), 600
    position = [torch.tensor([1.0])]
    last_third = [torch.tensor([0.0])]
    counter = [torch.tensor([1])]
    for t in range(2, steps + 1):
        updates = torch.tensor(t - 1)  # what AveragedModel passes: the updates so far
        averaging._lean_on_the_last_steps(position, [torch.tensor([float(t)])], updates)
        averaging._lean_on_the_last_steps(last_third, [torch.tensor([float(t > 2 * steps / 3)])], updates)
        averaging._lean_on_the_last_steps(counter, [torch.tensor([t])], updates)
    assert float(position[0]) / steps == pytest.approx(0.75, abs=0.01)
    assert float(last_third[0]) == pytest.approx(1 - (2 / 3) ** 3, abs=0.01)
    assert int(counter[0]) == steps  # counters are carried, not averaged


def test_the_checkpoint_holds_the_averaged_weights_not_the_last_ones(prepared_scene, tmp_path):
    # one epoch: the best epoch is the last one, whose average the resume point holds as its state_dict
    result = train([prepared_scene], tmp_path / "run", chip_size=64, batch_size=2, max_epochs=1, samples_per_epoch=16,
                   progress=False)
    resume_point = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    kept = load_checkpoint(result.checkpoint).state_dict()
    averaged, current = resume_point["state_dict"], resume_point["current_model_state"]
    name = next(k for k in kept if k.endswith(".weight") and kept[k].numel() > 1000)
    assert torch.equal(kept[name], averaged[name])
    assert not torch.equal(averaged[name], current[name])  # the weights moved since the average began
    assert load_checkpoint(result.checkpoint).model_kwargs["weight_averaging"]

    unaveraged = train([prepared_scene], tmp_path / "plain", chip_size=64, batch_size=2, max_epochs=1,
                       samples_per_epoch=4, weight_averaging=False, progress=False)
    resume_point = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "current_model_state" not in resume_point
    kept = load_checkpoint(unaveraged.checkpoint).state_dict()
    assert torch.equal(kept[name], resume_point["state_dict"][name])
    assert load_checkpoint(unaveraged.checkpoint).model_kwargs["weight_averaging"] is None


class _SaveCounter(Callback):
    def __init__(self):
        self.saved_after_epochs = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved_after_epochs.append(trainer.current_epoch)


def test_the_resume_point_is_written_after_the_first_epoch_and_at_the_end_not_every_epoch(prepared_scene, tmp_path):
    counter = _SaveCounter()
    result = train([prepared_scene], tmp_path / "run", chip_size=64, batch_size=2, max_epochs=4, samples_per_epoch=2,
                   arch="ResDepth", bands=["dsm"], progress=False, callbacks=[counter])
    assert counter.saved_after_epochs == [0, 4]  # epochs are seconds apart here, the interval a minute
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]
    resume_point = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    best = resume_point["callbacks"]["EpochCheckpoints"]
    assert best["best_score"] == pytest.approx(result.best_val_mae)
    kept = load_checkpoint(result.checkpoint).state_dict()
    assert all(torch.equal(kept[name], value) for name, value in best["best_state"].items())


def test_the_best_epoch_is_the_one_with_the_lowest_validation_mae():
    from types import SimpleNamespace

    from deepdem.train import EpochCheckpoints

    class _Strategy:
        @staticmethod
        def broadcast(value, src=0):
            return False  # no writes here

    keeper = EpochCheckpoints("unused")
    module = torch.nn.Linear(1, 1)
    for epoch, score in enumerate([0.9, 0.7, 0.8, float("nan"), 0.75]):
        with torch.no_grad():
            module.weight.fill_(epoch)
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val_mae": torch.tensor(score)},
                                  current_epoch=epoch, callbacks=[keeper], strategy=_Strategy())
        keeper.on_validation_end(trainer, module)
        keeper.on_train_epoch_end(trainer, module)
    assert keeper.best_epoch == 1 and keeper.best_score == pytest.approx(0.7)
    assert float(keeper.best_state["weight"]) == 1.0  # a copy: later epochs did not change it


def test_scene_sampling_shares_the_chips_by_area_or_equally(prepared_scene):
    from deepdem.data import Region

    bands = ["dsm", "nodata_mask"]
    arrays = SceneArrays(prepared_scene, bands, "dsm", 64)
    large, small = Region(0, 64 + 63, 0, 64 + 63), Region(0, 64, 0, 64 + 3)  # 64² and 4 chip positions
    counts = {}
    for sampling in ("area", "equal"):
        dataset = ChipDataset([arrays, arrays], [large, small], bands, 64, "train", samples=2000, seed=5,
                              scene_sampling=sampling)
        counts[sampling] = np.bincount(dataset._epoch_draws()[:, 0], minlength=2)
    assert 1900 < counts["area"][0] and counts["area"][1] < 100  # 4096 : 4 positions
    assert 900 < counts["equal"][1] < 1100
    with pytest.raises(ValueError, match="scene_sampling must be one of area, equal"):
        ChipDataset([arrays], [large], bands, 64, "train", scene_sampling="site")


def test_a_config_with_an_unknown_scene_sampling_is_refused_before_training(prepared_scene, tmp_path):
    (tmp_path / "config.yaml").write_text("scene_sampling: site\n")
    with pytest.raises(InputError, match="scene_sampling must be one of area, equal, got 'site'"):
        train([prepared_scene], tmp_path / "run", config=TrainConfig.from_yaml(tmp_path / "config.yaml"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_default_band_missing_from_a_scene_is_left_out_with_a_warning_that_says_how_to_make_it(tmp_path, caplog):
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from deepdem.scene import Grid, write_scene
    from deepdem.train import _input_bands

    grid = Grid(CRS.from_epsg(32610), from_origin(500000, 5200000, 1.0, 1.0), 32, 32)
    image = np.random.default_rng(0).uniform(0, 1, grid.shape).astype(np.float32)
    scene = write_scene(tmp_path / "before", grid, {"dsm": np.zeros(grid.shape, np.float32), "ortho_left": image,
                                                     "ortho_right": image}, n_chips=20)  # prepared before the band
    with caplog.at_level(logging.WARNING, logger="deepdem"):
        bands = _input_bands(TrainConfig(), [scene])
    assert bands == ["dsm", "ortho_left", "ortho_right", "nodata_mask"]
    assert "training without band(s) ndvi, ortho_correlation, parallax, triangulation_error" in caplog.text
    assert "with this version, for ortho_correlation" in caplog.text and "for the parallax band" in caplog.text
