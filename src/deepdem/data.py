"""From Scene bands to model tensors: normalisation, chips, augmentation, spatial hold-out.

The DSM's normalisation lives in one function, :func:`normalise_dsm` (vectorised over a batch
of chips, with :func:`chip_means`), called by training, by ``refine`` and by the single-chip
:func:`normalise_chip` alike, so that they cannot disagree:

* DSM: holes first filled by inverse-distance weighting (:func:`fill_dsm_holes`, GDAL's
  FillNodata as ASP users' ``dem_mosaic`` fill), then minus the chip's mean, divided by the
  global scale factor of the chip size (the training scenes' by default, so that an unseen
  scene is read in the units the model learnt); pixels still without data become 0;
* other bands: raw (orthos are already equalised to [0, 1] by ``prepare``), with each band
  kind's fill value where they have no data (−1 for the triangulation error, 0 otherwise);
* the base the network's residual is added to: the filled DSM, with its chip mean where it
  has none.

The loss never looks at the filled pixels (see :func:`_loss_target`): the fill only gives the
network a plausible surface instead of a step to the chip mean at every hole's edge.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import InputError
from .baselines import idw_fill
from .io import atomic_path
from .scene import BANDS, PARALLAX_SHIFTS, Scene

TARGET_BANDS = {"dsm": "truth_dsm", "dtm": "truth_dtm"}
#: Training cache per pixel of a scene: seven float32 inputs, the uint8 mask and one float32 truth.
CACHE_BYTES_PER_PIXEL = 7 * 4 + 1 + 4
#: how far (px) the DSM's holes are filled before normalisation; farther pixels stay no data
HOLE_FILL_DISTANCE = 100.0


def fill_dsm_holes(dsm: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The DSM with its NaN holes filled by inverse-distance weighting (float32).

    Training and refine both call this before normalising; ``out`` may be ``dsm`` itself.
    """
    out = dsm if out is None else out
    if out is not dsm:
        np.copyto(out, dsm)
    missing = np.isnan(dsm)
    if missing.any() and not missing.all():
        np.copyto(out, idw_fill(dsm, HOLE_FILL_DISTANCE).astype(np.float32), where=missing)
    return out


@dataclass
class NormalisedChip:
    inputs: np.ndarray  # (C, H, W) float32
    base: np.ndarray  # (H, W) float32, metres
    valid: np.ndarray  # (H, W) bool, pixels valid in every input band


def chip_means(dsm: np.ndarray, fallback: float | np.ndarray) -> np.ndarray:
    """Mean of each chip's valid (non-NaN) heights, for a (B, H, W) stack: (B,) float64.

    ``fallback`` (a scalar or one value per chip; the scene's median height) stands for a chip
    without any valid height. Sums in float64: heights of a few thousand metres keep their
    millimetres over a 1024² chip.
    """
    flat = dsm.reshape(len(dsm), -1)
    missing = np.isnan(flat)
    counts = flat.shape[1] - np.count_nonzero(missing, axis=1)
    sums = np.add.reduce(np.where(missing, np.float32(0.0), flat), axis=1, dtype=np.float64)
    return np.where(counts > 0, sums / np.maximum(counts, 1), fallback)


def normalise_dsm(dsm: np.ndarray, means: np.ndarray, scale: float | np.ndarray, channel: np.ndarray,
                  base: np.ndarray | None = None) -> np.ndarray:
    """The DSM's normalisation, for a batch of chips (B, H, W): the one used by training and refine.

    ``channel`` ← (DSM − chip mean) / scale, 0 where the DSM has no data; ``base`` (optional) ←
    the DSM in metres, its chip mean where it has no data: what the network's residual is added
    to. ``means`` come from :func:`chip_means`; ``scale`` is one factor or one per chip.
    ``channel`` or ``base`` may be ``dsm`` itself. Returns where the DSM has data.
    """
    missing = np.isnan(dsm)
    centre = np.asarray(means, dtype=np.float32).reshape(-1, 1, 1)
    inverse = (np.float32(1.0) / np.asarray(scale, dtype=np.float32)).reshape(-1, 1, 1)
    if base is not None and base is not dsm:
        np.copyto(base, dsm)
    np.subtract(dsm, centre, out=channel)
    channel *= inverse
    np.putmask(channel, missing, np.float32(0.0))
    if base is not None:
        np.copyto(base, np.broadcast_to(centre, base.shape), where=missing)
    return ~missing


def normalise_band_into(band: str, values: np.ndarray, channel: np.ndarray) -> None:
    """Any input band but the DSM: its values with the band kind's fill value where they have
    no data (−1 for the triangulation error, 0 otherwise; the mask as it is). ``channel`` may
    be ``values`` itself."""
    if band == "dsm":
        raise ValueError("the DSM is normalised per chip: see normalise_dsm")
    if values is not channel:
        np.copyto(channel, values)
    if band != "nodata_mask":
        missing = np.isnan(channel)
        if missing.any():
            np.putmask(channel, missing, np.float32(BANDS[band].fill))


def normalise_chip(
    stack: dict[str, np.ndarray], bands: Sequence[str], scale: float, fallback_mean: float = 0.0
) -> NormalisedChip:
    """Turn a chip of Scene bands (NaN = no data; the DSM's holes already filled, see
    :func:`fill_dsm_holes`) into the network's input channels, its base and its valid pixels."""
    height, width = stack["dsm"].shape
    inputs = np.empty((len(bands), height, width), dtype=np.float32)
    base = np.empty((1, height, width), dtype=np.float32)
    dsm = stack["dsm"][None]
    means = chip_means(dsm, fallback_mean)
    for channel, band in zip(inputs, bands):
        if band != "dsm":
            normalise_band_into(band, stack[band], channel)
    channel = inputs[list(bands).index("dsm")][None] if "dsm" in bands else np.empty_like(base)
    valid = normalise_dsm(dsm, means, scale, channel, base)[0]
    if "nodata_mask" in stack:
        valid &= stack["nodata_mask"] > 0
    return NormalisedChip(inputs=inputs, base=base[0], valid=valid)


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
    the training area must hold at least one chip too. ``holdout_fraction`` 0 holds nothing
    out: both regions are the whole scene (validation then measures the fit, not transfer).
    """
    height, width = shape
    if holdout_fraction <= 0:
        if min(shape) < chip_size:
            raise InputError(f"scene of {height}x{width} px is smaller than chip size {chip_size}; largest chip "
                             f"size that fits: {largest_fitting_chip(shape)}")
        whole = Region(0, height, 0, width)
        return whole, whole
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
    """A scene's bands as model-ready memory maps, decoded once, with its scale factor.

    The GeoTIFFs are decoded once into ``.npy`` files (``<scene>/.cache/``, or a temporary
    directory when the scene is read-only), one per band, that already hold what a chip needs,
    so that building a chip is one copy per band (the seed opened 7 rasters per chip):

    * ``dsm``: float32 in metres, holes filled (:func:`fill_dsm_holes`; NaN where still without
      data, or everywhere when ``fill_holes`` is off): chips are normalised per batch by
      :func:`normalise_dsm`, as refine normalises its chips;
    * other input bands: float32 with each band kind's fill value already in place of no data
      (the mask band as uint8);
    * each truth band: float32, NaN wherever the loss must not look: where the truth or the
      inputs (DSM, mask) have no data.

    That is :data:`CACHE_BYTES_PER_PIXEL` bytes per pixel for the eight inputs and one truth. A
    rotated or mirrored chip is a strided copy from the map: slower than a straight one, and
    still far faster than the model consumes chips (``bench/train_data.py``), so no rotated
    copies of the scene are kept.
    """

    def __init__(
        self,
        scene: Scene,
        bands: Sequence[str],
        target: str | Sequence[str] | None,
        chip_size: int,
        scale: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        fill_holes: bool = True,
    ):
        self._arguments = dict(scene=scene, bands=list(bands), target=target, chip_size=chip_size,
                               scale=scale, cache_dir=cache_dir, fill_holes=fill_holes)
        self.scene = scene
        targets = [target] if isinstance(target, str) else list(target or [])
        self.target_bands = [TARGET_BANDS[t] for t in targets]
        needed = list(dict.fromkeys([*bands, "dsm", "nodata_mask", *self.target_bands]))
        missing = [b for b in needed if not scene.has(b)]
        if missing:
            raise InputError(f"scene lacks band(s) {', '.join(missing)} (it has: {', '.join(scene.bands)})", scene.path)
        self._cache = _ArrayCache(scene, cache_dir)
        self.arrays: dict[str, np.ndarray] = {}
        for band in needed:
            if band in self.target_bands:
                self._add(band, ["dsm", "nodata_mask", band], lambda band=band: _loss_target(scene, band))
            else:
                self._add(band, scene.sources(band), lambda band=band: _model_ready(scene.read(band), band, fill_holes),
                          cache_name=f"{band}-holes" if band == "dsm" and not fill_holes else band)
        self.scale = scale if scale is not None else scene.scale_factor(chip_size)
        self.resolution = float(min(scene.grid.resolution))
        self.fallback_mean = float(scene.statistics("dsm").get("median", 0.0))

    def __getstate__(self):
        # Maps reopen in the receiving process instead of travelling as copies of the scene.
        return self._arguments

    def __setstate__(self, arguments):
        self.__init__(**arguments)

    def _add(self, name: str, sources: list[str], build, cache_name: str | None = None) -> None:
        self.arrays[name] = self._cache.get(cache_name or name, sources, build)

    def view(self, name: str, row: int, col: int, size: int, k: int = 0, flip: bool = False) -> np.ndarray:
        """One array's chip, rotated by ``k``·90° (as ``np.rot90``) and then mirrored if ``flip``
        (a view of the map)."""
        view = np.rot90(self.arrays[name][row : row + size, col : col + size], k)
        return view[:, ::-1] if flip else view

    def copy_chip(self, name: str, row: int, col: int, size: int, k: int, flip: bool, out: np.ndarray) -> None:
        """Write :meth:`view` into ``out``, casting to its dtype."""
        np.copyto(out, self.view(name, row, col, size, k, flip), casting="unsafe")

    def chip(self, row: int, col: int, size: int, k: int = 0, flip: bool = False) -> dict[str, np.ndarray]:
        """Views of every cached array for one chip (see :meth:`view`)."""
        return {name: self.view(name, row, col, size, k, flip) for name in self.arrays}


def _loss_target(scene: Scene, truth: str) -> np.ndarray:
    """A truth band with NaN wherever the loss must not look (no truth, or no input data)."""
    data = scene.read(truth)
    data[np.isnan(scene.read("dsm")) | (scene.read("nodata_mask") == 0)] = np.nan
    return data


def _model_ready(data: np.ndarray, band: str, fill_holes: bool = True) -> np.ndarray:
    """A band as the model consumes it: fill values in place of NaN; the DSM's holes filled
    (:func:`fill_dsm_holes`) when ``fill_holes``, NaN where they are not."""
    kind = BANDS[band]
    if kind.kind == "mask":
        return (data > 0).astype(np.uint8)
    if band == "dsm":
        return fill_dsm_holes(data) if fill_holes else data
    normalise_band_into(band, data, data)
    return data


class _ArrayCache:
    """``.npy`` files derived from a scene's bands, keyed by the sources' size and mtime.

    A re-prepared scene is therefore never served stale arrays; stale files are removed.
    """

    VERSION = "v4"

    def __init__(self, scene: Scene, cache_dir: str | os.PathLike | None):
        self.scene = scene
        self.directories = [Path(cache_dir)] if cache_dir else [
            scene.path / ".cache",
            Path(tempfile.gettempdir()) / "deepdem-cache" / scene.path.resolve().as_posix().strip("/").replace("/", "_"),
        ]

    def _key(self, name: str, sources: list[str]) -> str:
        stats = [(s, self.scene.band_path(s).stat()) for s in sources]
        # a band derived from the orthos' shift also depends on the geometry it was derived with
        derivation = self.scene.parallax_geometry if set(sources) & set(PARALLAX_SHIFTS) else None
        digest = hashlib.sha1(repr([(s, st.st_size, st.st_mtime_ns) for s, st in stats] + [derivation]).encode()
                              ).hexdigest()[:16]
        return f"{name}-{self.VERSION}-{digest}.npy"

    def _load(self, key: str) -> np.ndarray | None:
        for directory in self.directories:
            if (directory / key).exists():
                return np.load(directory / key, mmap_mode="c")
        return None

    def _save(self, name: str, key: str, shape: tuple[int, ...], dtype, fill) -> np.ndarray:
        """Create the array with ``fill(out)`` straight into its ``.npy`` map, then rename it."""
        for directory in self.directories:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                # This array's older keys, and anything an older cache layout left here.
                stale = [*directory.glob(f"{name}-v*.npy"), *directory.glob(f"{name}-[0-9]*.npy"),
                         *(p for p in directory.glob("*.npy") if f"-{self.VERSION}-" not in p.name)]
                for path in stale:
                    path.unlink(missing_ok=True)
                with atomic_path(directory / key) as tmp:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                    fill(out)
                    out.flush()
                    del out
                return np.load(directory / key, mmap_mode="c")
            except OSError:
                continue  # read-only scene directory: try the next place
        out = np.empty(shape, dtype)
        fill(out)
        return out

    def get(self, name: str, sources: list[str], build) -> np.ndarray:
        """The cached array ``name`` made from ``sources`` by ``build()``, built on first use."""
        key = self._key(name, sources)
        cached = self._load(key)
        if cached is not None:
            return cached
        data = build()
        return self._save(name, key, data.shape, data.dtype, lambda out: np.copyto(out, data))


def collate_chips(data):
    """Collate for :class:`ChipDataset`: batches arrive already stacked from ``__getitems__``."""
    if isinstance(data, dict):
        return data
    return torch.utils.data.default_collate(data)


@dataclass
class _Batch:
    inputs: np.ndarray
    base: np.ndarray
    target: np.ndarray
    valid: np.ndarray
    scale: np.ndarray


#: How training chips are shared among the scenes (see :class:`ChipDataset`).
SCENE_SAMPLING = ("area", "equal")


class ChipDataset(Dataset):
    """Chips of one or more scenes for training (random, augmented) or validation (fixed grid).

    Each item is a dict of tensors: ``inputs`` (C, H, W), ``base`` (1, H, W) metres, ``scale``
    (1, 1, 1), ``target`` (T, H, W) metres and ``valid`` (T, H, W) — pixels valid in the inputs
    and in each truth, the only ones the loss sees. Inputs and base equal :func:`normalise_chip`
    of the same pixels. Training chips get a random flip, 90° rotation and (``swap_images``) a
    swap of the two orthoimages; chip ``i`` of epoch ``e`` is the same in every process.

    ``relief_share`` gives that share of the training chips another relief: the DSM and the truth
    stretched about the chip mean by a factor of 0.7 to 3 and tilted by a plane of up to 40°
    (the same transform on both, so the correction to learn is stretched with the relief).
    Training sites are often flatter than the scenes a model is used on; without it, a model
    trained on flat ground and cities made a steep forest's DSM worse (BENCHMARKS.md).

    ``scene_sampling`` picks each training chip's scene with equal odds (``"equal"``: every scene
    alike, so that a large, easy site does not take most of the chips) or in proportion to the
    scene's area (``"area"``: every pixel alike). On the real-terrain benchmark, where the largest
    training scene is mostly flat fields (69 % of the chips by area), equal odds lowered the
    held-out MAE on 6 of 8 scenes (docs/training.md).
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
        relief_share: float = 0.0,
        scene_sampling: str = "equal",
    ):
        if mode not in ("train", "val"):
            raise ValueError(mode)
        if scene_sampling not in SCENE_SAMPLING:
            raise ValueError(f"scene_sampling must be one of {', '.join(SCENE_SAMPLING)}, got {scene_sampling!r}")
        if not 0.0 <= relief_share <= 1.0:
            raise ValueError(f"relief_share must lie in [0, 1], got {relief_share}")
        self.relief_share = relief_share if mode == "train" else 0.0
        self.relief_augmentation = self.relief_share > 0
        # Pixel offsets from the chip centre, for the tilts of the relief augmentation.
        self._offsets = np.arange(chip_size, dtype=np.float32) - np.float32((chip_size - 1) / 2)
        self.scenes, self.regions, self.bands = list(scenes), list(regions), list(bands)
        self.chip_size, self.mode, self.seed = chip_size, mode, seed
        self.epoch = 0
        self.swap_channels = (
            (self.bands.index("ortho_left"), self.bands.index("ortho_right"))
            if swap_images and {"ortho_left", "ortho_right"} <= set(self.bands) else None
        )
        self._draws: tuple[int, np.ndarray, np.ndarray] | None = None
        if mode == "val":
            # Chips side by side (the last one of a row or column flush with the region's edge):
            # every pixel is scored once, more only where that last row or column overlaps the
            # one before. Half-overlapping chips scored every pixel about four times, and cost a fifth of a CPU run's training time (docs/training.md).
            self.positions = [
                (i, region.row0 + r, region.col0 + c)
                for i, region in enumerate(self.regions)
                for r in grid_positions(region.height, chip_size, chip_size)
                for c in grid_positions(region.width, chip_size, chip_size)
            ]
            self.samples = len(self.positions)
        else:
            self.samples = samples
            areas = np.array([(r.height - chip_size + 1) * (r.width - chip_size + 1) for r in self.regions], float)
            weights = areas if scene_sampling == "area" else (areas > 0).astype(float)
            self.scene_weights = weights / weights.sum()

    def __len__(self) -> int:
        return self.samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_draws(self) -> np.ndarray:
        """(samples, 6) scene, row, col, rotation, mirror, image swap of every chip of this epoch.

        One generator per (seed, epoch), drawn for all chips at once: a generator per chip cost
        more than copying the chip. The swap is drawn always, so the same chips come whether
        swapping is on or off.
        """
        if self._draws is None or self._draws[0] != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            n, size = self.samples, self.chip_size
            scene = rng.choice(len(self.scenes), size=n, p=self.scene_weights)
            row0 = np.array([r.row0 for r in self.regions])[scene]
            col0 = np.array([r.col0 for r in self.regions])[scene]
            rows = np.array([r.height - size + 1 for r in self.regions])[scene]
            cols = np.array([r.width - size + 1 for r in self.regions])[scene]
            position = rng.random((n, 2))
            table = np.stack([
                scene, row0 + (position[:, 0] * rows).astype(int), col0 + (position[:, 1] * cols).astype(int),
                rng.integers(4, size=n), rng.integers(2, size=n), rng.integers(2, size=n),
            ], axis=1)
            # Relief: stretch factor, and the tilt's east and south gradients (m per m); chips
            # outside the share keep their own relief. Drawn after the table, so the chips stay the same.
            stretch = np.exp(rng.uniform(np.log(0.7), np.log(3.0), size=n))
            slope = np.tan(np.radians(rng.uniform(0.0, 40.0, size=n)))
            azimuth = rng.uniform(0.0, 2 * np.pi, size=n)
            keep = rng.random(n) < 1.0 - self.relief_share
            relief = np.stack([np.where(keep, 1.0, stretch), np.where(keep, 0.0, slope * np.cos(azimuth)),
                               np.where(keep, 0.0, slope * np.sin(azimuth))], axis=1).astype(np.float32)
            self._draws = (self.epoch, table, relief)
        return self._draws[1]

    def _relief(self, index: int) -> np.ndarray:
        """Stretch, east and south gradient of training chip ``index`` (see the class docstring)."""
        self._epoch_draws()
        return self._draws[2][index]

    def _draw(self, index: int) -> tuple[int, int, int, int, bool, bool]:
        """Scene, row, col, rotation, mirror and image swap of chip ``index`` (deterministic)."""
        if self.mode == "val":
            scene_index, row, col = self.positions[index]
            return scene_index, row, col, 0, False, False
        scene_index, row, col, k, flip, swap = (int(v) for v in self._epoch_draws()[index])
        return scene_index, row, col, k, bool(flip), bool(swap)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch, written straight into its tensors (use with :func:`collate_chips`).

        Per chip, each array is copied once from its memory map, already in the chip's
        orientation (see :meth:`SceneArrays.copy_chip`); the DSM is then normalised for the
        whole batch (:func:`normalise_dsm`).
        """
        n, size = len(indices), self.chip_size
        n_targets = len(self.scenes[0].target_bands)
        batch = _Batch(
            inputs=np.empty((n, len(self.bands), size, size), dtype=np.float32),
            base=np.empty((n, 1, size, size), dtype=np.float32),
            target=np.empty((n, n_targets, size, size), dtype=np.float32),
            valid=np.empty((n, n_targets, size, size), dtype=bool),
            scale=np.empty((n, 1, 1, 1), dtype=np.float32),
        )
        self._fill(batch, indices)
        return {"inputs": torch.from_numpy(batch.inputs), "base": torch.from_numpy(batch.base),
                "scale": torch.from_numpy(batch.scale), "target": torch.from_numpy(batch.target),
                "valid": torch.from_numpy(batch.valid)}

    def _fill(self, batch: "_Batch", indices: Sequence[int]) -> None:
        """Write the chips ``indices`` into ``batch``: a copy per band, then the batch's DSM
        normalised at once by :func:`normalise_dsm`, as refine does."""
        size = self.chip_size
        dsm_channel = self.bands.index("dsm") if "dsm" in self.bands else None
        fallback, resolution = np.empty(len(indices)), np.empty(len(indices))
        for slot, index in enumerate(indices):
            scene_index, row, col, k, flip, swap = self._draw(index)
            data = self.scenes[scene_index]
            resolution[slot] = data.resolution
            fallback[slot], batch.scale[slot] = data.fallback_mean, data.scale
            data.copy_chip("dsm", row, col, size, k, flip, batch.base[slot, 0])
            for channel, band in enumerate(self.bands):
                if channel == dsm_channel:
                    continue
                if swap and self.swap_channels is not None and band in ("ortho_left", "ortho_right"):
                    # Left and right play the same role: swapping them is a free, physically valid sample.
                    band = "ortho_right" if band == "ortho_left" else "ortho_left"
                data.copy_chip(band, row, col, size, k, flip, batch.inputs[slot, channel])
            for t, truth in enumerate(data.target_bands):
                data.copy_chip(truth, row, col, size, k, flip, batch.target[slot, t])
        dsm = batch.base[:, 0]
        means = chip_means(dsm, fallback)
        if self.relief_augmentation:
            for slot, index in enumerate(indices):
                self._reshape_relief(dsm[slot], batch.target[slot], np.float32(means[slot]), self._relief(index),
                                     float(resolution[slot]))
        channel = batch.inputs[:, dsm_channel] if dsm_channel is not None else np.empty_like(dsm)
        normalise_dsm(dsm, means, batch.scale[:, 0, 0, 0], channel, base=dsm)
        # NaN in a target (no truth, or no input there) -> not valid; the loss never sees it.
        np.isnan(batch.target, out=batch.valid)
        np.logical_not(batch.valid, out=batch.valid)
        torch.from_numpy(batch.target).nan_to_num_(0.0)

    def _reshape_relief(self, dsm: np.ndarray, target: np.ndarray, mean: np.float32,
                        relief: np.ndarray, resolution: float) -> None:
        """Stretch a chip's relief about its DSM ``mean`` and tilt it, in place: the DSM and its
        truth alike (the chip is still normalised with ``mean``, as refine would its own).

        The parallax band, a measure of the DSM's error in metres, is left as it is, although
        the stretch changes that error: stretched with it, the held-out MAE of the real-terrain
        benchmark rose on 6 of 8 scenes (up to 5 %, Autzen with modelled errors; docs/training.md)."""
        stretch, east, south = (float(v) for v in relief)
        if stretch == 1.0 and east == 0.0 and south == 0.0:
            return
        plane = np.add.outer(self._offsets * np.float32(south * resolution), self._offsets * np.float32(east * resolution))
        for heights in (dsm, target):
            heights -= mean
            heights *= np.float32(stretch)
            heights += plane
            heights += mean

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}
