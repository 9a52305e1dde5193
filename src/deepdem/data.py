"""From Scene bands to model tensors: normalisation, chips, augmentation, spatial hold-out.

The normalisation lives in one function, :func:`normalise_chip`, used by training and by
``refine`` alike, so that the two can never disagree:

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
from .scene import BANDS, Scene

TARGET_BANDS = {"dsm": "truth_dsm", "dtm": "truth_dtm"}
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


def normalise_into(
    stack: dict[str, np.ndarray], bands: Sequence[str], scale: float, fallback_mean: float,
    inputs: np.ndarray, base: np.ndarray,
) -> np.ndarray:
    """Write the network's input channels into ``inputs`` (C, H, W) and the base into ``base``.

    Writes each output value once. Returns the valid-pixel mask.
    """
    dsm = stack["dsm"]
    dsm_missing = np.isnan(dsm)  # NaN is the only no-data value in a Scene array
    count = dsm_missing.size - int(np.count_nonzero(dsm_missing))
    if count:
        mean = float(np.add.reduce(np.where(dsm_missing, np.float32(0.0), dsm), axis=None, dtype=np.float64) / count)
    else:
        mean = fallback_mean
    for channel, band in zip(inputs, bands):
        normalise_band_into(band, stack[band], channel, scale, mean, dsm_missing if band == "dsm" else None)
    np.copyto(base, dsm)
    np.putmask(base, dsm_missing, np.float32(mean))
    dsm_valid = ~dsm_missing
    return dsm_valid & (stack["nodata_mask"] > 0) if "nodata_mask" in stack else dsm_valid


def normalise_band_into(
    band: str, values: np.ndarray, channel: np.ndarray, scale: float, centre: float, missing: np.ndarray | None = None,
) -> None:
    """One band's input channel (see the module's docstring); ``centre`` is the DSM's chip mean,
    ``missing`` the DSM's no-data pixels when already known."""
    if band == "dsm":
        np.subtract(values, np.float32(centre), out=channel)
        channel *= np.float32(1.0 / scale)
        np.putmask(channel, np.isnan(values) if missing is None else missing, np.float32(0.0))
    else:
        if values is not channel:  # refine reads bands straight into their channels
            np.copyto(channel, values)
        if band != "nodata_mask":
            missing = np.isnan(channel)
            if missing.any():
                np.putmask(channel, missing, np.float32(BANDS[band].fill))


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
    directory when the scene is read-only) that already hold what a chip needs, so that building
    a chip is a handful of plain copies (the seed opened 7 rasters per chip):

    * ``dsm``: float32, holes filled (:func:`fill_dsm_holes`; NaN where still without data, or
      everywhere when ``fill_holes`` is off), plus summed-area tables of its values and of its
      valid pixels, so that a chip's mean costs four lookups instead of a pass over the chip;
    * other input bands: float32 with each band kind's fill value already in place of no data
      (the mask band as uint8);
    * each truth band: float32, NaN wherever the loss must not look: where the truth or the
      inputs (DSM, mask) have no data;
    * for each of these, a transposed twin: 90° rotations become contiguous reads (copying a
      rotated view of a 256-px chip costs ~25x a straight copy). Of the eight flips and
      rotations, four are then plain copies (row order reversed at most) and four need their
      columns reversed, which :class:`ChipDataset` does with one vectorised flip per chip.
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
        self._transposed: dict[str, np.ndarray] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._tensors_transposed: dict[str, torch.Tensor] = {}
        for band in needed:
            if band in self.target_bands:
                self._add(band, ["dsm", "nodata_mask", band], lambda band=band: _loss_target(scene, band))
            else:
                self._add(band, [band], lambda band=band: _model_ready(scene.read(band), band, fill_holes),
                          cache_name=f"{band}-holes" if band == "dsm" and not fill_holes else band)
        height, width = scene.shape
        self._dsm_sums = self._cache.get("dsm-sums" if fill_holes else "dsm-holes-sums", ["dsm"], (2, height + 1, width + 1), np.float64,
                                         lambda out: _summed_area_tables(self.arrays["dsm"], out)).view(np.ndarray)
        self.scale = scale if scale is not None else scene.scale_factor(chip_size)
        self.resolution = float(min(scene.grid.resolution))
        self.fallback_mean = float(scene.statistics("dsm").get("median", 0.0))

    def __getstate__(self):
        # Maps reopen in the receiving process instead of travelling as copies of the scene.
        return self._arguments

    def __setstate__(self, arguments):
        self.__init__(**arguments)

    def _add(self, name: str, sources: list[str], build, cache_name: str | None = None) -> None:
        self.arrays[name], self._transposed[name] = self._cache.get_with_twin(cache_name or name, sources, build)
        # Tensors over the maps: slicing an np.memmap runs Python code per slice, and torch.flip
        # reads a chip straight from the map. The maps are private copy-on-write ones, writable
        # as torch.from_numpy wants; nothing ever writes to them.
        self._tensors[name] = torch.from_numpy(self.arrays[name].view(np.ndarray))
        self._tensors_transposed[name] = torch.from_numpy(self._transposed[name].view(np.ndarray))

    def dsm_mean(self, row: int, col: int, size: int) -> float:
        """Mean of the valid DSM pixels of a chip (the scene median if it has none), in O(1)."""
        sums = self._dsm_sums
        r1, c1 = row + size, col + size
        total, count = sums[:, r1, c1] - sums[:, row, c1] - sums[:, r1, col] + sums[:, row, col]
        return float(total / count) if count >= 0.5 else self.fallback_mean

    def _source(self, name: str, row: int, col: int, size: int, k: int) -> tuple[torch.Tensor, bool]:
        """The chip's pixels in the plain or transposed map, and whether its rows run backwards."""
        if k % 2:
            return self._tensors_transposed[name][col : col + size, row : row + size], k % 4 == 1
        return self._tensors[name][row : row + size, col : col + size], k % 4 == 2

    def view(self, name: str, row: int, col: int, size: int, k: int = 0, flip: bool = False) -> np.ndarray:
        """One array's chip, rotated by ``k``·90° (as ``np.rot90``) and then mirrored if ``flip``."""
        source, rows_reversed = self._source(name, row, col, size, k)
        view = source.numpy()
        view = view[::-1] if rows_reversed else view
        return view[:, ::-1] if mirrored_columns(k, flip) else view

    def copy_chip(self, name: str, row: int, col: int, size: int, k: int, flip: bool, out: np.ndarray) -> None:
        """Write :meth:`view` into ``out`` (casting to its dtype) with the fastest copy for it.

        numpy copies a column-reversed view element by element (~4x slower than torch.flip),
        and torch has no negative strides: orientations that reverse columns go through
        ``torch.flip``, those that only reverse rows through numpy, plain ones through torch.
        """
        source, rows_reversed = self._source(name, row, col, size, k)
        if mirrored_columns(k, flip):
            torch.from_numpy(out).copy_(source.flip((0, 1) if rows_reversed else (1,)))
        elif rows_reversed:
            np.copyto(out, source.numpy()[::-1])
        else:
            torch.from_numpy(out).copy_(source)

    def chip(self, row: int, col: int, size: int, k: int = 0, flip: bool = False) -> dict[str, np.ndarray]:
        """Views of every cached array for one chip (see :meth:`view`)."""
        return {name: self.view(name, row, col, size, k, flip) for name in self.arrays}


def mirrored_columns(k: int, flip: bool) -> bool:
    """Whether rotation ``k`` then mirror ``flip`` reverses the columns of the plain/transposed chip.

    rot90 by 1 is the transposed chip with rows reversed, by 2 rows and columns reversed, by 3
    the transposed chip with columns reversed; a mirror reverses the columns once more.
    """
    return (k % 4 in (2, 3)) != bool(flip)


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
    return np.where(np.isnan(data), np.float32(kind.fill), data)


def _summed_area_tables(dsm: np.ndarray, out: np.ndarray, rows_per_block: int = 1024) -> None:
    """Write (2, H+1, W+1) float64 integral images of the valid DSM heights and of the valid-pixel
    count into ``out`` (a memory map: a 16k² scene's tables are 4 GB).

    Built in row blocks so that memory stays bounded on large scenes; float64 keeps the sum of
    10⁸ heights exact to well under a millimetre per chip.
    """
    height, width = dsm.shape
    out[:, 0, :] = 0.0
    out[:, :, 0] = 0.0
    carry = np.zeros((2, width), np.float64)
    for row0 in range(0, height, rows_per_block):
        block = np.asarray(dsm[row0 : row0 + rows_per_block], dtype=np.float64)
        valid = ~np.isnan(block)
        for i, values in enumerate((np.where(valid, block, 0.0), valid.astype(np.float64))):
            cumulative = np.cumsum(np.cumsum(values, axis=1), axis=0) + carry[i]
            out[i, row0 + 1 : row0 + 1 + len(block), 1:] = cumulative
            carry[i] = cumulative[-1]


class _ArrayCache:
    """``.npy`` files derived from a scene's bands, keyed by the sources' size and mtime.

    A re-prepared scene is therefore never served stale arrays; stale files are removed.
    """

    VERSION = "v3"

    def __init__(self, scene: Scene, cache_dir: str | os.PathLike | None):
        self.scene = scene
        self.directories = [Path(cache_dir)] if cache_dir else [
            scene.path / ".cache",
            Path(tempfile.gettempdir()) / "deepdem-cache" / scene.path.resolve().as_posix().strip("/").replace("/", "_"),
        ]

    def _key(self, name: str, sources: list[str]) -> str:
        stats = [(s, self.scene.band_path(s).stat()) for s in sources]
        digest = hashlib.sha1(repr([(s, st.st_size, st.st_mtime_ns) for s, st in stats]).encode()).hexdigest()[:16]
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
                for stale in [*directory.glob(f"{name}-v*.npy"), *directory.glob(f"{name}-[0-9]*.npy")]:
                    stale.unlink(missing_ok=True)
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

    def get(self, name: str, sources: list[str], shape: tuple[int, ...], dtype, fill) -> np.ndarray:
        key = self._key(name, sources)
        cached = self._load(key)
        return cached if cached is not None else self._save(name, key, shape, dtype, fill)

    def get_with_twin(self, name: str, sources: list[str], build) -> tuple[np.ndarray, np.ndarray]:
        """An array from ``build()`` and its transposed twin."""
        key, key_t = self._key(name, sources), self._key(f"{name}-T", sources)
        array, twin = self._load(key), self._load(key_t)
        if array is None or twin is None:
            data = build()
            array = self._save(name, key, data.shape, data.dtype, lambda out: np.copyto(out, data))
            twin = self._save(f"{name}-T", key_t, data.shape[::-1], data.dtype, lambda out: np.copyto(out, data.T))
        return array, twin


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


class ChipDataset(Dataset):
    """Chips of one or more scenes for training (random, augmented) or validation (fixed grid).

    Each item is a dict of tensors: ``inputs`` (C, H, W), ``base`` (1, H, W) metres, ``scale``
    (1, 1, 1), ``target`` (T, H, W) metres and ``valid`` (T, H, W) — pixels valid in the inputs
    and in each truth, the only ones the loss sees. Inputs and base equal :func:`normalise_chip`
    of the same pixels. Training chips get a random flip, 90° rotation and (``swap_images``) a
    swap of the two orthoimages; chip ``i`` of epoch ``e`` is the same in every process.

    ``relief_augmentation`` gives half the training chips another relief: the DSM and the truth
    stretched about the chip mean by a factor of 0.7 to 3 and tilted by a plane of up to 40°
    (the same transform on both, so the correction to learn is stretched with the relief).
    Training sites are often flatter than the scenes a model is used on; without it, a model
    trained on flat ground and cities made a steep forest's DSM worse (BENCHMARKS.md).
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
        relief_augmentation: bool = False,
    ):
        if mode not in ("train", "val"):
            raise ValueError(mode)
        self.relief_augmentation = relief_augmentation and mode == "train"
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
            # Relief: stretch factor, and the tilt's east and south gradients (m per m); half the
            # chips keep their own relief. Drawn after the table, so the chips stay the same.
            stretch = np.exp(rng.uniform(np.log(0.7), np.log(3.0), size=n))
            slope = np.tan(np.radians(rng.uniform(0.0, 40.0, size=n)))
            azimuth = rng.uniform(0.0, 2 * np.pi, size=n)
            keep = rng.random(n) < 0.5
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
        orientation (see :meth:`SceneArrays.copy_chip`); the DSM's normalisation (as
        :func:`normalise_into`) and the valid mask are then computed while the chip is in cache.
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
        self._fill(batch, range(n), indices)
        return {"inputs": torch.from_numpy(batch.inputs), "base": torch.from_numpy(batch.base),
                "scale": torch.from_numpy(batch.scale), "target": torch.from_numpy(batch.target),
                "valid": torch.from_numpy(batch.valid)}

    def _fill(self, batch: "_Batch", slots: Sequence[int], indices: Sequence[int]) -> None:
        """Write the chips of ``slots`` (positions in the batch) into ``batch``."""
        size = self.chip_size
        dsm_channel = self.bands.index("dsm") if "dsm" in self.bands else None
        for slot in slots:
            scene_index, row, col, k, flip, swap = self._draw(indices[slot])
            data = self.scenes[scene_index]
            mean = np.float32(data.dsm_mean(row, col, size))
            base, target = batch.base[slot], batch.target[slot]
            data.copy_chip("dsm", row, col, size, k, flip, base[0])
            base -= mean
            for channel, band in enumerate(self.bands):
                if channel == dsm_channel:
                    continue
                if swap and self.swap_channels is not None and band in ("ortho_left", "ortho_right"):
                    # Left and right play the same role: swapping them is a free, physically valid sample.
                    band = "ortho_right" if band == "ortho_left" else "ortho_left"
                data.copy_chip(band, row, col, size, k, flip, batch.inputs[slot, channel])
            for t, truth in enumerate(data.target_bands):
                data.copy_chip(truth, row, col, size, k, flip, target[t])
            if self.relief_augmentation:
                self._reshape_relief(base[0], target, mean, self._relief(indices[slot]), data.resolution)
            # No DSM data -> the chip mean (0 once centred); NaN in a target -> not valid.
            torch.from_numpy(base).nan_to_num_(0.0)
            if dsm_channel is not None:
                np.multiply(base[0], np.float32(1.0 / data.scale), out=batch.inputs[slot, dsm_channel])
            base += mean
            np.isnan(target, out=batch.valid[slot])
            np.logical_not(batch.valid[slot], out=batch.valid[slot])
            torch.from_numpy(target).nan_to_num_(0.0)
            batch.scale[slot] = data.scale

    def _reshape_relief(self, centred_dsm: np.ndarray, target: np.ndarray, mean: np.float32,
                        relief: np.ndarray, resolution: float) -> None:
        """Stretch and tilt a chip's relief in place: the DSM (already minus ``mean``) and its truth."""
        stretch, east, south = (float(v) for v in relief)
        if stretch == 1.0 and east == 0.0 and south == 0.0:
            return
        plane = np.add.outer(self._offsets * np.float32(south * resolution), self._offsets * np.float32(east * resolution))
        centred_dsm *= np.float32(stretch)
        centred_dsm += plane
        target -= mean
        target *= np.float32(stretch)
        target += plane
        target += mean

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}
