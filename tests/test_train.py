import numpy as np
import pytest
import torch

from deepdem.data import ChipDataset, SceneArrays, normalise_chip, spatial_split
from deepdem.errors import InputError
from deepdem.models import DeepDEMRegressionTask, load_checkpoint
from deepdem.train import train


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
    assert torch.equal(a["inputs"], b["inputs"]) and len(val) == 5  # 192 rows, stride 32 -> 5 chips
    train_set = ChipDataset([arrays], [tr], bands, 64, "train", samples=4, seed=1)
    item = train_set[0]
    assert item["inputs"].shape == (3, 64, 64) and item["valid"].dtype == torch.bool
    train_set.set_epoch(1)
    assert not torch.equal(train_set[0]["inputs"], item["inputs"])


def test_short_training_run_writes_a_checkpoint_refine_can_use(prepared_scene, tmp_path):
    result = train([prepared_scene], tmp_path / "run", chip_size=64, batch_size=4, max_epochs=2,
                   samples_per_epoch=8, progress=False)
    assert result.checkpoint.exists()
    assert result.checkpoint.stat().st_size < 80e6  # weights and metadata, no optimiser state
    task = load_checkpoint(result.checkpoint)
    kwargs = task.model_kwargs
    assert kwargs["bands"] == ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask"]
    assert kwargs["chip_size"] == 64 and kwargs["target"] == "dsm"
    assert float(kwargs["GSF_DICT"]["64"]) == pytest.approx(prepared_scene.scale_factor(64))
    assert str(prepared_scene.path.resolve()) in kwargs["datapath"]
    # DeepDEM users' API
    legacy = DeepDEMRegressionTask.load_from_checkpoint(result.checkpoint, map_location="cpu")
    assert legacy.model_kwargs["bands"] == kwargs["bands"]
    assert np.isfinite(result.best_val_mae)


def test_scene_smaller_than_the_chip_is_refused_naming_the_largest_that_fits(prepared_scene, tmp_path):
    with pytest.raises(InputError, match="largest chip size that fits: 64"):
        train([prepared_scene], tmp_path / "run", chip_size=256)
    assert not (tmp_path / "run").exists()
