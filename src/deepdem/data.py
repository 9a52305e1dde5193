"""From Scene bands to model tensors: normalisation, chips, augmentation, spatial hold-out.

The normalisation lives in one function, :func:`normalise_chip`, used by training and by
``refine`` alike, so that the two can never disagree:

* DSM: minus the chip's valid-pixel mean, divided by the scene's global scale factor for the
  chip size; no-data pixels become 0 (the chip mean);
* other bands: raw (orthos are already equalised to [0, 1] by ``prepare``), with each band
  kind's fill value where they have no data (−1 for the triangulation error, 0 otherwise);
* the base the network's residual is added to: the DSM, with its chip mean where it has none.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import InputError
from .io import atomic_path
from .scene import BANDS, Scene

TARGET_BANDS = {"dsm": "truth_dsm", "dtm": "truth_dtm"}


@dataclass
class NormalisedChip:
    inputs: np.ndarray  # (C, H, W) float32
    base: np.ndarray  # (H, W) float32, metres
    valid: np.ndarray  # (H, W) bool, pixels valid in every input band


def normalise_chip(
    stack: dict[str, np.ndarray], bands: Sequence[str], scale: float, fallback_mean: float = 0.0
) -> NormalisedChip:
    """Turn a chip of Scene bands (NaN = no data) into the network's input channels."""
    dsm = stack["dsm"]
    dsm_valid = np.isfinite(dsm)
    mean = float(dsm[dsm_valid].mean()) if dsm_valid.any() else fallback_mean
    channels = []
    for band in bands:
        if band == "dsm":
            channels.append(np.where(dsm_valid, (dsm - mean) / scale, 0.0))
        elif band == "nodata_mask":
            channels.append(stack["nodata_mask"])
        else:
            values = stack[band]
            channels.append(np.where(np.isfinite(values), values, BANDS[band].fill))
    valid = stack["nodata_mask"] > 0 if "nodata_mask" in stack else dsm_valid
    return NormalisedChip(
        inputs=np.stack(channels).astype(np.float32),
        base=np.where(dsm_valid, dsm, mean).astype(np.float32),
        valid=valid & dsm_valid,
    )


@dataclass(frozen=True)
class Region:
    """A rectangle of pixel rows/cols ``[row0, row1) × [col0, col1)`` of one scene."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0


def spatial_split(shape: tuple[int, int], chip_size: int, holdout_fraction: float = 0.2) -> tuple[Region, Region]:
    """Split a scene into a training area and a validation stripe along its longer axis.

    The stripe is at least one chip wide (the seed's 0.8 split crashed when it was not), and
    the training area must hold at least one chip too.
    """
    height, width = shape
    along_cols = width >= height
    length = width if along_cols else height
    stripe = max(chip_size, int(round(length * holdout_fraction)))
    if length - stripe < chip_size or min(shape) < chip_size:
        raise InputError(
            f"scene of {height}x{width} px is too small for a training area and a validation stripe "
            f"of chip size {chip_size}; largest chip size that fits: {largest_fitting_chip(shape, split=True)}"
        )
    if along_cols:
        return Region(0, height, 0, width - stripe), Region(0, height, width - stripe, width)
    return Region(0, height - stripe, 0, width), Region(height - stripe, height, 0, width)


def largest_fitting_chip(shape: tuple[int, int], split: bool = False, sizes=(64, 128, 256, 512, 1024)) -> int | str:
    """Largest standard chip size that fits ``shape`` (twice along the long axis if ``split``)."""
    fitting = [s for s in sizes if min(shape) >= s and (not split or max(shape) >= 2 * s)]
    return max(fitting) if fitting else "none (the scene is smaller than 64 px)"


def grid_positions(length: int, chip_size: int, stride: int) -> list[int]:
    """Chip starts covering ``[0, length)``; the last chip ends exactly at the edge."""
    if length <= chip_size:
        return [0]
    starts = list(range(0, length - chip_size + 1, stride))
    if starts[-1] != length - chip_size:
        starts.append(length - chip_size)
    return starts


class SceneArrays:
    """A scene's bands as memory-mapped float32 arrays (NaN = no data), with its scale factor.

    The GeoTIFFs are decoded once into ``.npy`` files (``<scene>/.cache/``, or a temporary
    directory when the scene is read-only); chips are then slices of memory maps: no raster is
    reopened or decompressed per chip (the seed opened 7 files per chip), and the page cache
    is shared by data-loader workers.
    """

    def __init__(
        self,
        scene: Scene,
        bands: Sequence[str],
        target: str | Sequence[str] | None,
        chip_size: int,
        scale: float | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.scene = scene
        targets = [target] if isinstance(target, str) else list(target or [])
        self.target_bands = [TARGET_BANDS[t] for t in targets]
        needed = list(dict.fromkeys([*bands, "dsm", "nodata_mask", *self.target_bands]))
        missing = [b for b in needed if not scene.has(b)]
        if missing:
            raise InputError(f"scene lacks band(s) {', '.join(missing)} (it has: {', '.join(scene.bands)})", scene.path)
        self.arrays = {band: band_memmap(scene, band, cache_dir) for band in needed}
        self.scale = scale if scale is not None else scene.scale_factor(chip_size)
        self.fallback_mean = float(scene.statistics("dsm").get("median", 0.0))

    def chip(self, row: int, col: int, size: int) -> dict[str, np.ndarray]:
        return {band: np.asarray(array[row : row + size, col : col + size]) for band, array in self.arrays.items()}


def band_memmap(scene: Scene, band: str, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """A read-only memory map of one band as float32 (NaN = no data), decoded once and cached.

    The cache file is keyed by the band file's size and modification time, so a re-prepared
    scene is never served stale arrays.
    """
    source = scene.band_path(band)
    stat = source.stat()
    key = f"{band}-{stat.st_size}-{int(stat.st_mtime_ns)}.npy"
    directories = [Path(cache_dir)] if cache_dir else [scene.path / ".cache", Path(tempfile.gettempdir()) / "deepdem-cache" / scene.path.resolve().as_posix().strip("/").replace("/", "_")]
    for directory in directories:
        cached = directory / key
        if cached.exists():
            return np.load(cached, mmap_mode="r")
    data = scene.read(band)
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(f"{band}-*.npy"):
                stale.unlink(missing_ok=True)
            with atomic_path(directory / key) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, data)
            return np.load(directory / key, mmap_mode="r")
        except OSError:
            continue  # read-only scene directory: try the next place
    return data


def _augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip and 90° rotation applied to every array (last two axes)."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        out.append(np.ascontiguousarray(a))
    return out


class ChipDataset(Dataset):
    """Chips of one or more scenes for training (random, augmented) or validation (fixed grid).

    Each item is a dict of tensors: ``inputs`` (C, H, W), ``base`` (1, H, W) metres, ``scale``
    (1, 1, 1), ``target`` (T, H, W) metres and ``valid`` (T, H, W) — pixels valid in the inputs
    and in each truth, the only ones the loss sees. Training chips get a random flip, 90°
    rotation and (``swap_images``) a swap of the two orthoimages.
    """

    def __init__(
        self,
        scenes: Sequence[SceneArrays],
        regions: Sequence[Region],
        bands: Sequence[str],
        chip_size: int,
        mode: str = "train",
        samples: int = 1024,
        seed: int = 0,
        swap_images: bool = True,
    ):
        if mode not in ("train", "val"):
            raise ValueError(mode)
        self.scenes, self.regions, self.bands = list(scenes), list(regions), list(bands)
        self.chip_size, self.mode, self.seed = chip_size, mode, seed
        self.epoch = 0
        self.swap_channels = (
            (self.bands.index("ortho_left"), self.bands.index("ortho_right"))
            if swap_images and {"ortho_left", "ortho_right"} <= set(self.bands) else None
        )
        if mode == "val":
            stride = chip_size // 2
            self.positions = [
                (i, region.row0 + r, region.col0 + c)
                for i, region in enumerate(self.regions)
                for r in grid_positions(region.height, chip_size, stride)
                for c in grid_positions(region.width, chip_size, stride)
            ]
            self.samples = len(self.positions)
        else:
            self.samples = samples
            areas = np.array([(r.height - chip_size + 1) * (r.width - chip_size + 1) for r in self.regions], float)
            self.scene_weights = areas / areas.sum()

    def __len__(self) -> int:
        return self.samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        size = self.chip_size
        if self.mode == "val":
            scene_index, row, col = self.positions[index]
            rng = None
        else:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            scene_index = int(rng.choice(len(self.scenes), p=self.scene_weights))
            region = self.regions[scene_index]
            row = region.row0 + int(rng.integers(region.height - size + 1))
            col = region.col0 + int(rng.integers(region.width - size + 1))
        data = self.scenes[scene_index]
        stack = data.chip(row, col, size)
        chip = normalise_chip(stack, self.bands, data.scale, data.fallback_mean)
        target = np.stack([stack[band] for band in data.target_bands])
        valid = chip.valid[None] & np.isfinite(target)
        inputs = chip.inputs
        swap = rng is not None and bool(rng.integers(2))  # drawn always: same chips with swapping off
        if swap and self.swap_channels is not None:
            # Left and right play the same role: swapping them is a free, physically valid sample.
            left, right = self.swap_channels
            inputs = inputs.copy()
            inputs[[left, right]] = inputs[[right, left]]
        arrays = [inputs, chip.base[None], np.nan_to_num(target, nan=0.0), valid]
        if rng is not None:
            arrays = _augment(arrays, rng)
        inputs, base, target, valid = arrays
        return {
            "inputs": torch.from_numpy(inputs),
            "base": torch.from_numpy(base),
            "scale": torch.full((1, 1, 1), float(data.scale)),
            "target": torch.from_numpy(target.astype(np.float32)),
            "valid": torch.from_numpy(valid),
        }
