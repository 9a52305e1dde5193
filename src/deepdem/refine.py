"""Tiled inference: overlapping chips, blended, into one GeoTIFF on the Scene's grid.

Chips overlap by half; each chip's residual is weighted by a smooth window (sin², highest in
the chip centre, small but positive at its edges) and the sum is normalised by the sum of the
weights, so there are no seams where chips meet. Edge chips are placed to end exactly at the
scene's edge rather than running past it (the seed's edge chips ran off the scene and turned
half of a small scene into NaN); a scene smaller than a chip is padded with nodata.

Only the residual is blended; the DSM is added once at the end, so a model that predicts a zero
residual returns the input DSM bit for bit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import grid_positions, normalise_chip
from .errors import CheckpointError
from .io import write_raster
from .models import DeepDEMRegressionTask, load_checkpoint, scale_for
from .scene import FLOAT_NODATA, Scene

log = logging.getLogger(__name__)


def blend_window(chip_size: int, floor: float = 1e-3) -> np.ndarray:
    """2-D separable sin² weights; the floor keeps pixels covered by one chip only defined."""
    ramp = np.sin(np.pi * (np.arange(chip_size) + 0.5) / chip_size) ** 2
    ramp = np.maximum(ramp, floor)
    return np.outer(ramp, ramp).astype(np.float32)


def _pad_chip(stack: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad a chip cut at a small scene's edge to ``size`` with nodata (NaN, mask 0)."""
    out = {}
    for band, array in stack.items():
        if array.shape == (size, size):
            out[band] = array
            continue
        fill = 0.0 if band == "nodata_mask" else np.nan
        padded = np.full((size, size), fill, dtype=np.float32)
        padded[: array.shape[0], : array.shape[1]] = array
        out[band] = padded
    return out


def _device(requested: str | None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def refine(
    checkpoint: str | os.PathLike | DeepDEMRegressionTask,
    scene: str | os.PathLike | Scene,
    out: str | os.PathLike,
    batch_size: int = 8,
    overlap: float = 0.5,
    fill: bool = False,
    device: str | None = "auto",
    bf16: bool = True,
    progress: bool = True,
) -> Path:
    """Refine a scene's DSM with a trained model and write a float32 GeoTIFF at ``out``.

    Pixels where the scene has no valid input are nodata unless ``fill`` is set, in which case
    the model's prediction (on the chip-mean base) is kept there too.
    """
    task = checkpoint if isinstance(checkpoint, DeepDEMRegressionTask) else load_checkpoint(checkpoint)
    scene = scene if isinstance(scene, Scene) else Scene.open(scene)
    kwargs = task.model_kwargs
    bands, chip = list(kwargs["bands"]), int(kwargs["chip_size"])
    missing = [b for b in bands if not scene.has(b)]
    if missing:
        raise CheckpointError(
            f"scene lacks band(s) {', '.join(missing)} that the checkpoint was trained on "
            f"(checkpoint bands: {', '.join(bands)}; scene bands: {', '.join(scene.bands)})",
            scene.path,
        )
    scale = scale_for(kwargs, scene.scale_factors, chip)
    needed = list(dict.fromkeys([*bands, "dsm", "nodata_mask"]))
    arrays = scene.read_stack(needed)
    dsm, mask = arrays["dsm"], arrays["nodata_mask"] > 0
    fallback_mean = float(scene.statistics("dsm").get("median", 0.0))

    height, width = scene.shape
    stride = max(1, int(round(chip * (1 - overlap))))
    positions = [(r, c) for r in grid_positions(height, chip, stride) for c in grid_positions(width, chip, stride)]
    window = blend_window(chip)
    residual_sum = np.zeros(scene.shape, dtype=np.float64)
    base_sum = np.zeros(scene.shape, dtype=np.float64)  # chip-mean base, only used where dsm is nodata
    weight_sum = np.zeros(scene.shape, dtype=np.float64)

    device_ = _device(device)
    task = task.to(device_).eval()
    use_bf16 = bf16 and (device_.type == "cpu" or torch.cuda.is_bf16_supported())
    with torch.inference_mode(), tqdm(total=len(positions), desc="refine", unit="chip", disable=not progress) as bar:
        for start in range(0, len(positions), batch_size):
            batch_positions = positions[start : start + batch_size]
            chips = []
            for row, col in batch_positions:
                stack = _pad_chip({b: a[row : row + chip, col : col + chip] for b, a in arrays.items()}, chip)
                chips.append(normalise_chip(stack, bands, scale, fallback_mean))
            inputs = torch.from_numpy(np.stack([c.inputs for c in chips])).to(device_)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_.type, dtype=torch.bfloat16, enabled=use_bf16):
                residual = task(inputs)
            residual = (residual.float() * scale).cpu().numpy()[:, 0]
            for (row, col), res, c in zip(batch_positions, residual, chips):
                h, w = min(chip, height - row), min(chip, width - col)
                wgt = window[:h, :w]
                residual_sum[row : row + h, col : col + w] += wgt * res[:h, :w]
                base_sum[row : row + h, col : col + w] += wgt * c.base[:h, :w]
                weight_sum[row : row + h, col : col + w] += wgt
            bar.update(len(batch_positions))

    residual = residual_sum / weight_sum
    refined = np.where(np.isfinite(dsm), dsm + residual, base_sum / weight_sum + residual).astype(np.float32)
    keep = np.ones(scene.shape, dtype=bool) if fill else mask
    output = np.where(keep & np.isfinite(refined), refined, FLOAT_NODATA).astype(np.float32)
    target = kwargs.get("target", "dsm")
    return write_raster(out, output, scene.transform, scene.crs, FLOAT_NODATA,
                        description=f"refined {target.upper()} (m)", overviews=True)
