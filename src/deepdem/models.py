"""The DeepDEM network and its Lightning task.

The network predicts a normalised residual; heights are ``net(x) × scale + base`` where
``base`` is the initial DSM (its chip mean where it has no data). Everything ``refine`` needs is
stored in the checkpoint's ``model_kwargs`` — the attribute DeepDEM's users read
(``DeepDEMRegressionTask.load_from_checkpoint(p).model_kwargs['bands']``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import segmentation_models_pytorch as smp
import torch
from torch import nn

from .errors import CheckpointError

DEFAULT_BANDS = ("dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask")
CHECKPOINT_FORMAT = "deepdem-checkpoint-1"


def build_network(arch: str = "Unet", encoder: str = "resnet18", in_channels: int = 6) -> nn.Module:
    """A segmentation-models-pytorch network with one output channel and no pretrained weights.

    ImageNet weights are not used: the inputs are heights and equalised panchromatic images,
    not RGB, and runs must not download anything.
    """
    try:
        model_class = getattr(smp, arch)
    except AttributeError:
        raise CheckpointError(f"unknown segmentation-models-pytorch architecture '{arch}'") from None
    return model_class(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=1)


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in metres over valid pixels (0 when a batch has none)."""
    valid = valid.to(prediction.dtype)
    return (torch.abs(prediction - target) * valid).sum() / valid.sum().clamp_min(1.0)


class DeepDEMRegressionTask(L.LightningModule):
    """Residual refinement of a DSM: L1 in metres against LIDAR truth on valid pixels.

    ``model_kwargs`` (JSON-like) carries: ``bands``, ``chip_size``, ``target`` ('dsm'/'dtm'),
    ``arch``, ``encoder``, ``GSF_DICT`` (training scale factor per chip size), ``scale_source``,
    ``datapath`` (training scenes), ``normalisation`` and the optimiser settings.
    """

    def __init__(self, model_kwargs: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.model_kwargs = dict(model_kwargs)
        self.model = build_network(
            self.model_kwargs.get("arch", "Unet"),
            self.model_kwargs.get("encoder", "resnet18"),
            len(self.model_kwargs["bands"]),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised residual for normalised inputs (B, C, H, W) → (B, 1, H, W)."""
        return self.model(inputs)

    def predict_heights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        residual = self(batch["inputs"]).float()  # the addition stays in float32 under autocast
        return residual * batch["scale"] + batch["base"]

    def _shared_step(self, batch, stage: str):
        prediction = self.predict_heights(batch)
        loss = masked_l1(prediction, batch["target"], batch["valid"])
        batch_size = batch["inputs"].shape[0]
        self.log(f"{stage}_l1", loss, prog_bar=True, batch_size=batch_size, on_epoch=True, on_step=False)
        if stage == "val":
            valid = batch["valid"]
            errors = (prediction - batch["target"])[valid]
            initial = (batch["base"] - batch["target"])[valid]
            self.log("val_mae", errors.abs().mean(), prog_bar=True, batch_size=batch_size)
            self.log("val_bias", errors.mean(), batch_size=batch_size)
            self.log("val_initial_mae", initial.abs().mean(), batch_size=batch_size)
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def configure_optimizers(self):
        lr = float(self.model_kwargs.get("lr", 5e-4))
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=int(self.model_kwargs.get("lr_patience", 10))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_mae"}}


def save_checkpoint(task: DeepDEMRegressionTask, path: str | os.PathLike) -> Path:
    """Save the weights and ``model_kwargs`` only (no optimiser state), loadable without pickle code."""
    from .io import atomic_path

    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {"model_kwargs": task.model_kwargs},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DeepDEMRegressionTask:
    """Load a deepdem (or Lightning) checkpoint with ``weights_only=True``: no code runs on load."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint not found", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle payloads, truncated files and non-torch files all land here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"not a loadable deepdem checkpoint ({first_line[:200]})", path) from None
    try:
        model_kwargs = payload["hyper_parameters"]["model_kwargs"]
        state_dict = payload["state_dict"]
    except (KeyError, TypeError):
        raise CheckpointError("checkpoint has no deepdem model_kwargs/state_dict", path) from None
    for key in ("bands", "chip_size"):
        if key not in model_kwargs:
            raise CheckpointError(f"checkpoint metadata lacks '{key}'", path)
    task = DeepDEMRegressionTask(model_kwargs)
    try:
        task.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the model in its metadata ({str(exc).splitlines()[0]})", path) from None
    task.eval()
    return task


def scale_for(model_kwargs: dict, scene_factors: dict[int, float], chip_size: int) -> float:
    """The DSM scale factor for a scene: its own (default) or the checkpoint's training value."""
    trained = {int(k): float(v) for k, v in model_kwargs.get("GSF_DICT", {}).items()}
    if model_kwargs.get("scale_source", "scene") == "scene" and chip_size in scene_factors:
        return scene_factors[chip_size]
    if chip_size in trained:
        return trained[chip_size]
    if scene_factors:  # a scene smaller than the chip: extrapolate with DeepDEM's chip^0.88 law
        size, value = max(scene_factors.items())
        return value * math.pow(chip_size / size, 0.88)
    raise CheckpointError(f"no scale factor for chip size {chip_size}")
