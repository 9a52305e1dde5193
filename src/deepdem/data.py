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


def normalise_into(
    stack: dict[str, np.ndarray], bands: Sequence[str], scale: float, fallback_mean: float,
    inputs: np.ndarray, base: np.ndarray,
) -> np.ndarray:
    """Write the network's input channels into ``inputs`` (C, H, W) and the base into ``base``.

    Works on views (flipped/rotated memory-map slices) and writes each output value once, so a
    batch is assembled without intermediate copies. Returns the valid-pixel mask.
    """
    dsm = stack["dsm"]
    dsm_valid = ~np.isnan(dsm)  # NaN is the only no-data value in a Scene array
    count = int(np.count_nonzero(dsm_valid))
    mean = float(np.sum(dsm, where=dsm_valid, dtype=np.float64) / count) if count else fallback_mean
    for channel, band in zip(inputs, bands):
        if band == "dsm":
            np.subtract(dsm, mean, out=channel)
            channel *= 1.0 / scale
            np.copyto(channel, 0.0, where=~dsm_valid)
        else:
            np.copyto(channel, stack[band])
            if band != "nodata_mask":
                np.copyto(channel, BANDS[band].fill, where=np.isnan(channel))
    np.copyto(base, dsm)
    np.copyto(base, mean, where=~dsm_valid)
    return dsm_valid & (stack["nodata_mask"] > 0) if "nodata_mask" in stack else dsm_valid


def normalise_chip(
    stack: dict[str, np.ndarray], bands: Sequence[str], scale: float, fallback_mean: float = 0.0
) -> NormalisedChip:
    """Turn a chip of Scene bands (NaN = no data) into the network's input channels."""
    height, width = stack["dsm"].shape
    inputs = np.empty((len(bands), height, width), dtype=np.float32)
    base = np.empty((height, width), dtype=np.float32)
    valid = normalise_into(stack, bands, scale, fallback_mean, inputs, base)
    return NormalisedChip(inputs=inputs, base=base, valid=valid)


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
        # Transposed twins make 90° rotations contiguous reads: copying a rotated view of a
        # 256-px chip costs ~25x a straight copy, and would dominate the data pipeline.
        self._transposed = {band: band_memmap(scene, band, cache_dir, transposed=True) for band in needed}
        self.scale = scale if scale is not None else scene.scale_factor(chip_size)
        self.fallback_mean = float(scene.statistics("dsm").get("median", 0.0))

    def chip(self, row: int, col: int, size: int, k: int = 0, flip: bool = False) -> dict[str, np.ndarray]:
        """Views of a chip, rotated by ``k``·90° (as ``np.rot90``) and then mirrored if ``flip``."""
        if k % 2:
            views = {band: a[col : col + size, row : row + size] for band, a in self._transposed.items()}
            views = {band: (v[::-1, :] if k % 4 == 1 else v[:, ::-1]) for band, v in views.items()}
        else:
            views = {band: a[row : row + size, col : col + size] for band, a in self.arrays.items()}
            if k % 4 == 2:
                views = {band: v[::-1, ::-1] for band, v in views.items()}
        if flip:
            views = {band: v[:, ::-1] for band, v in views.items()}
        return {band: np.asarray(v) for band, v in views.items()}


def band_memmap(scene: Scene, band: str, cache_dir: str | os.PathLike | None = None, transposed: bool = False) -> np.ndarray:
    """A read-only memory map of one band as float32 (NaN = no data), decoded once and cached.

    The cache file is keyed by the band file's size and modification time, so a re-prepared
    scene is never served stale arrays.
    """
    source = scene.band_path(band)
    stat = source.stat()
    key = f"{band}{'-T' if transposed else ''}-{stat.st_size}-{int(stat.st_mtime_ns)}.npy"
    directories = [Path(cache_dir)] if cache_dir else [scene.path / ".cache", Path(tempfile.gettempdir()) / "deepdem-cache" / scene.path.resolve().as_posix().strip("/").replace("/", "_")]
    for directory in directories:
        cached = directory / key
        if cached.exists():
            return np.load(cached, mmap_mode="r")
    data = scene.read(band)
    if transposed:
        data = np.ascontiguousarray(data.T)
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(f"{band}{'-T' if transposed else ''}-[0-9]*.npy"):
                stale.unlink(missing_ok=True)
            with atomic_path(directory / key) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, data)
            return np.load(directory / key, mmap_mode="r")
        except OSError:
            continue  # read-only scene directory: try the next place
    return data


def collate_chips(data):
    """Collate for :class:`ChipDataset`: batches arrive already stacked from ``__getitems__``."""
    if isinstance(data, dict):
        return data
    return torch.utils.data.default_collate(data)


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

    def _draw(self, index: int) -> tuple[int, int, int, int, bool, bool]:
        """Scene, row, col, rotation, mirror and image swap of chip ``index`` (deterministic)."""
        size = self.chip_size
        if self.mode == "val":
            scene_index, row, col = self.positions[index]
            return scene_index, row, col, 0, False, False
        rng = np.random.default_rng((self.seed, self.epoch, index))
        scene_index = int(rng.choice(len(self.scenes), p=self.scene_weights))
        region = self.regions[scene_index]
        row = region.row0 + int(rng.integers(region.height - size + 1))
        col = region.col0 + int(rng.integers(region.width - size + 1))
        swap = bool(rng.integers(2))  # drawn always: the same chips whether swapping is on or off
        return scene_index, row, col, int(rng.integers(4)), bool(rng.integers(2)), swap

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch, written straight into its tensors (use with :func:`collate_chips`)."""
        n, size = len(indices), self.chip_size
        n_targets = len(self.scenes[0].target_bands)
        inputs = np.empty((n, len(self.bands), size, size), dtype=np.float32)
        base = np.empty((n, 1, size, size), dtype=np.float32)
        target = np.empty((n, n_targets, size, size), dtype=np.float32)
        valid = np.empty((n, n_targets, size, size), dtype=bool)
        scale = np.empty((n, 1, 1, 1), dtype=np.float32)
        bands = list(self.bands)
        for slot, index in enumerate(indices):
            scene_index, row, col, k, flip, swap = self._draw(index)
            data = self.scenes[scene_index]
            stack = data.chip(row, col, size, k, flip)
            if swap and self.swap_channels is not None:
                # Left and right play the same role: swapping them is a free, physically valid sample.
                stack["ortho_left"], stack["ortho_right"] = stack["ortho_right"], stack["ortho_left"]
            chip_valid = normalise_into(stack, bands, data.scale, data.fallback_mean, inputs[slot], base[slot, 0])
            for t, band in enumerate(data.target_bands):
                np.copyto(target[slot, t], stack[band])
                missing = np.isnan(target[slot, t])
                np.logical_and(chip_valid, ~missing, out=valid[slot, t])
                np.copyto(target[slot, t], 0.0, where=missing)
            scale[slot] = data.scale
        return {"inputs": torch.from_numpy(inputs), "base": torch.from_numpy(base), "scale": torch.from_numpy(scale),
                "target": torch.from_numpy(target), "valid": torch.from_numpy(valid)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}
