"""Training: Lightning around the residual UNet, on chips of one or more Scenes.

Validation uses a spatial hold-out (a stripe of each scene at least one chip wide) on a fixed
grid of chips with no augmentation, so the validation MAE is comparable between epochs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from .data import ChipDataset, SceneArrays, largest_fitting_chip, spatial_split
from .errors import InputError
from .models import DEFAULT_BANDS, DeepDEMRegressionTask, load_checkpoint, save_checkpoint
from .scene import Scene

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Path
    best_val_mae: float
    initial_val_mae: float
    epochs: int
    seconds: float


class _EpochSeeder(Callback):
    """Gives the training dataset a new epoch number so each epoch draws new chips."""

    def on_train_epoch_start(self, trainer, pl_module):
        dataset = trainer.train_dataloader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)


class _EpochPrinter(Callback):
    """One line per epoch when there is no progress bar (logs, CI, pipes)."""

    def __init__(self, every_seconds: float = 20.0):
        self.every_seconds, self.last = every_seconds, 0.0

    def on_validation_epoch_end(self, trainer, pl_module):
        now = time.time()
        if trainer.sanity_checking or now - self.last < self.every_seconds:
            return
        self.last = now
        m = trainer.callback_metrics
        train_l1 = f"train L1 {float(m['train_l1']):.3f} m, " if "train_l1" in m else ""
        print(f"  epoch {trainer.current_epoch}: {train_l1}val MAE {float(m['val_mae']):.3f} m "
              f"(initial DSM {float(m['val_initial_mae']):.3f} m)", flush=True)


def _check_scenes(scenes: Sequence[Scene], bands: Sequence[str], target_band: str, chip_size: int) -> None:
    for scene in scenes:
        missing = [b for b in (*bands, target_band) if not scene.has(b)]
        if missing:
            raise InputError(f"scene lacks band(s) {', '.join(missing)} (it has: {', '.join(scene.bands)})", scene.path)
        if min(scene.shape) < chip_size or max(scene.shape) < 2 * chip_size:
            raise InputError(
                f"scene of {scene.shape[0]}x{scene.shape[1]} px is too small to train with chip size {chip_size} "
                f"(a training area and a validation stripe of one chip each); largest chip size that fits: "
                f"{largest_fitting_chip(scene.shape, split=True)}",
                scene.path,
            )


def train(
    scenes: Sequence[str | os.PathLike | Scene],
    out: str | os.PathLike,
    bands: Sequence[str] | None = None,
    target: str = "dsm",
    chip_size: int = 256,
    batch_size: int = 16,
    max_minutes: float | None = None,
    max_epochs: int = 300,
    samples_per_epoch: int = 512,
    lr: float = 5e-4,
    arch: str = "Unet",
    encoder: str = "resnet18",
    precision: str = "auto",
    channels_last: bool = True,
    holdout_fraction: float = 0.2,
    early_stopping_patience: int = 75,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool | None = None,
) -> TrainResult:
    """Train a DeepDEM model on scenes and save ``out/best.ckpt`` (weights + metadata).

    ``precision='auto'`` uses bf16 autocast on CPU and GPU where supported (about twice as fast
    on CPU; the residual is added to the DSM in float32). ``max_minutes`` bounds wall time.
    """
    if target not in ("dsm", "dtm"):
        raise InputError(f"target must be 'dsm' or 'dtm', got {target!r}")
    opened = [s if isinstance(s, Scene) else Scene.open(s) for s in scenes]
    if not opened:
        raise InputError("no scene given (--scene DIR)")
    target_band = f"truth_{target}"
    if bands is None:
        bands = [b for b in DEFAULT_BANDS if all(s.has(b) for s in opened)]
        dropped = sorted(set(DEFAULT_BANDS) - set(bands))
        if dropped:
            log.warning("training without band(s) %s: not in every scene", ", ".join(dropped))
    bands = list(bands)
    if progress is None:
        progress = sys.stderr.isatty()
    if "dsm" not in bands:
        raise InputError("the bands must include 'dsm': the network refines it")
    _check_scenes(opened, bands, target_band, chip_size)

    L.seed_everything(seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    arrays = [SceneArrays(s, bands, target, chip_size) for s in opened]
    splits = [spatial_split(s.shape, chip_size, holdout_fraction) for s in opened]
    train_set = ChipDataset(arrays, [t for t, _ in splits], bands, chip_size, "train", samples_per_epoch, seed)
    val_set = ChipDataset(arrays, [v for _, v in splits], bands, chip_size, "val")

    gsf = {}
    for size in sorted({k for s in opened for k in s.scale_factors}):
        values = [s.scale_factors[size] for s in opened if size in s.scale_factors]
        gsf[str(size)] = float(np.mean(values))
    model_kwargs = {
        "bands": bands,
        "chip_size": chip_size,
        "target": target,
        "arch": arch,
        "encoder": encoder,
        "GSF_DICT": gsf,
        "scale_source": "scene",
        "normalisation": "dsm: (dsm - valid chip mean) / scene scale factor, nodata -> 0; "
        "orthos: CLAHE [0,1], nodata -> 0; triangulation_error: m, nodata -> -1; ndvi: nodata -> 0",
        "datapath": [str(s.path.resolve()) for s in opened],
        "scenes": [s.manifest.get("provenance", {}) for s in opened],
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "deepdem_version": __import__("deepdem").__version__,
    }
    task = DeepDEMRegressionTask(model_kwargs)
    if channels_last:
        task = task.to(memory_format=torch.channels_last)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if precision == "auto":
        precision = "bf16-mixed" if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else "16-mixed"
    checkpointing = ModelCheckpoint(dirpath=out / "checkpoints", filename="epoch{epoch:03d}", monitor="val_mae",
                                    mode="min", save_top_k=1, save_last=True, auto_insert_metric_name=False)
    callbacks = [
        checkpointing,
        EarlyStopping(monitor="val_mae", patience=early_stopping_patience, min_delta=0.005, mode="min"),
        _EpochSeeder(),
    ]
    if not progress:
        callbacks.append(_EpochPrinter())
    trainer = L.Trainer(
        max_epochs=max_epochs,
        max_time=timedelta(minutes=max_minutes) if max_minutes else None,
        accelerator="auto",
        devices=1,
        precision=precision,
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs"),
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    loader_args = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=False)
    started = time.time()
    trainer.fit(
        task,
        DataLoader(train_set, shuffle=False, drop_last=True, **loader_args),
        DataLoader(val_set, shuffle=False, **loader_args),
    )
    seconds = time.time() - started

    best_path = checkpointing.best_model_path or checkpointing.last_model_path
    if not best_path:
        raise InputError("training stopped before the first validation: give it more time (--max-minutes)", out)
    best = load_checkpoint_from_lightning(best_path, model_kwargs)
    checkpoint = save_checkpoint(best, out / "best.ckpt")
    metrics = trainer.callback_metrics
    best_score = float(checkpointing.best_model_score) if checkpointing.best_model_score is not None else float("nan")
    result = TrainResult(
        checkpoint=checkpoint,
        best_val_mae=best_score,
        initial_val_mae=float(metrics.get("val_initial_mae", float("nan"))),
        epochs=trainer.current_epoch,
        seconds=seconds,
    )
    (out / "train.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "best_val_mae_m": result.best_val_mae,
        "initial_val_mae_m": result.initial_val_mae, "epochs": result.epochs,
        "seconds": round(seconds, 1), "model_kwargs": model_kwargs,
    }, indent=2))
    return result


def load_checkpoint_from_lightning(path: str | os.PathLike, model_kwargs: dict) -> DeepDEMRegressionTask:
    """Load the best Lightning checkpoint's weights safely (``weights_only=True``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    task = DeepDEMRegressionTask(model_kwargs)
    task.load_state_dict(payload["state_dict"])
    return task.eval()


__all__ = ["train", "TrainResult", "load_checkpoint"]
