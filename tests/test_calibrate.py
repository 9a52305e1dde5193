import math

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from deepdem.calibrate import MIN_PIXELS, calibrate_to_reference
from deepdem.cli import main
from deepdem.errors import CheckpointError, InputError
from deepdem.models import DeepDEMRegressionTask, load_checkpoint, save_checkpoint
from deepdem.refine import refine, sigma_path
from deepdem.uncertainty import SIGMA_TAG, interval_half_width

BANDS = ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask"]


def sigma_task(seed=0, **extra):
    torch.manual_seed(seed)
    return DeepDEMRegressionTask({"bands": BANDS, "chip_size": 64, "GSF_DICT": {"64": 2.0},
                                  "uncertainty": "laplace", **extra}).eval()


def write(path, data, **tags):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                       dtype="float32", crs="EPSG:32610", transform=from_origin(500000, 4000100, 1, 1),
                       nodata=np.nan) as dst:
        dst.write(data.astype(np.float32), 1)
        dst.update_tags(**tags)
    return path


def test_factor_makes_sigma_cover_laplace_errors_twice_its_size_where_the_reference_has_data(tmp_path):
    rng = np.random.default_rng(0)
    dem = np.full((100, 100), 50.0)
    # Errors of a Laplace whose standard deviation is 2 m, under a σ raster of 1 m: σ is half the truth.
    errors = rng.laplace(0.0, 2.0 / math.sqrt(2), dem.shape)
    reference = dem - errors
    reference[:, 50:] = np.nan  # a reference over the left half only
    write(tmp_path / "r.tif", dem)
    write(tmp_path / "r_sigma.tif", np.ones_like(dem), **{SIGMA_TAG: "laplace"})
    write(tmp_path / "lidar.tif", reference)
    checkpoint = save_checkpoint(sigma_task(sigma_temperature=1.5), tmp_path / "model.ckpt")

    result = calibrate_to_reference(checkpoint, tmp_path / "r.tif", tmp_path / "lidar.tif", tmp_path / "site.ckpt")

    assert result.pixels == 5000
    assert result.factor == pytest.approx(2.0, rel=0.05)
    assert result.temperature == pytest.approx(1.5 * result.factor)
    # σ = 1 m: its 68 % interval, ±0.81 m, holds 1 − exp(−0.81 / b) of Laplace errors of scale b = √2 m (43 %).
    half_width = interval_half_width(1.0, 0.68)
    assert result.before["coverage_68"] == pytest.approx(1 - math.exp(-half_width / math.sqrt(2)), abs=0.02)
    assert result.after["coverage_68"] == pytest.approx(0.68, abs=0.01)
    assert result.after["coverage_90"] == pytest.approx(0.90, abs=0.01)
    written = load_checkpoint(tmp_path / "site.ckpt")
    assert written.sigma_temperature == pytest.approx(result.temperature)
    assert "site: coverage fit on 5000 pixels of lidar.tif" in written.model_kwargs["sigma_calibration"]


def test_refining_with_the_calibrated_copy_scales_sigma_and_keeps_the_heights(prepared_scene, tmp_path):
    checkpoint = save_checkpoint(sigma_task(seed=5), tmp_path / "model.ckpt")
    # one view per chip: the 8 views' spread, in σ by default on a scene this small, is not scaled
    first = refine(checkpoint, prepared_scene, tmp_path / "first.tif", bf16=False, tta=False, progress=False)
    truth = prepared_scene.band_path("truth_dsm")

    assert main(["calibrate", "--checkpoint", str(checkpoint), "--dem", str(first), "--reference", str(truth),
                 "--out", str(tmp_path / "site.ckpt")]) == 0
    factor = load_checkpoint(tmp_path / "site.ckpt").sigma_temperature / load_checkpoint(checkpoint).sigma_temperature
    second = refine(tmp_path / "site.ckpt", prepared_scene, tmp_path / "second.tif", bf16=False, tta=False,
                    progress=False)

    with rasterio.open(first) as a, rasterio.open(second) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    with rasterio.open(sigma_path(first)) as a, rasterio.open(sigma_path(second)) as b:
        before, after = a.read(1, masked=True), b.read(1, masked=True)
    np.testing.assert_array_equal(before.mask, after.mask)
    np.testing.assert_allclose(after.compressed(), factor * before.compressed(), rtol=1e-5)
    assert factor != pytest.approx(1.0, abs=0.05)  # an untrained σ is far from the scene's errors


def test_too_small_a_reference_a_model_without_sigma_and_a_tta_sigma_are_refused(tmp_path, capsys):
    dem = np.zeros((40, 40))
    reference = np.full_like(dem, np.nan)
    reference[:10, :10] = 0.5  # 100 pixels
    write(tmp_path / "r.tif", dem)
    write(tmp_path / "r_sigma.tif", np.ones_like(dem), **{SIGMA_TAG: "laplace"})
    write(tmp_path / "patch.tif", reference)
    checkpoint = save_checkpoint(sigma_task(), tmp_path / "model.ckpt")
    with pytest.raises(InputError, match=f"patch.tif: only 100 pixels .* at least {MIN_PIXELS}"):
        calibrate_to_reference(checkpoint, tmp_path / "r.tif", tmp_path / "patch.tif", tmp_path / "out.ckpt")
    no_sigma = DeepDEMRegressionTask({"bands": BANDS, "chip_size": 64, "GSF_DICT": {"64": 2.0}})
    with pytest.raises(CheckpointError, match="predicts no σ"):
        calibrate_to_reference(save_checkpoint(no_sigma, tmp_path / "plain.ckpt"), tmp_path / "r.tif",
                               tmp_path / "patch.tif", tmp_path / "out.ckpt")
    write(tmp_path / "r_sigma.tif", np.ones_like(dem), **{SIGMA_TAG: "laplace", "DEEPDEM_SIGMA_TTA": "yes"})
    with pytest.raises(InputError, match="r_sigma.tif: σ from refine's 8-view average .* refine with --no-tta"):
        calibrate_to_reference(checkpoint, tmp_path / "r.tif", tmp_path / "patch.tif", tmp_path / "out.ckpt")
    (tmp_path / "r_sigma.tif").unlink()
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--dem", str(tmp_path / "r.tif"),
                 "--reference", str(tmp_path / "patch.tif"), "--out", str(tmp_path / "out.ckpt")]) == 2
    assert "r_sigma.tif: σ raster not found" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()
