"""Scene-scale refinement: streaming, seamless, resumable and distributed tiled inference.

The scene is cut into output *blocks* (``block_size`` px, a multiple of the 256-px GeoTIFF
tile). Each block is read with a halo so that every chip overlapping it is complete, its chips
are run in batches, their residuals are blended, and only the block's interior is written.
Memory is therefore bounded by one block and its halo, never by the scene.

Blending: chips overlap by ``overlap`` of their size; each chip's residual is weighted by a
window that is 1 in the chip's centre and ramps down as sin² across the overlap (at 50 % overlap
it is the classic sin² window), never quite to zero, and the sum is normalised by the sum of the
weights. Where two chips meet, the pixels near one chip's edge lie in the other chip's plateau,
so the edge effects of a convolutional network (zero padding, missing context) are weighted
away and no seam shows. Edge chips end exactly at the scene's edge; a scene smaller than a chip
is padded with nodata (boundless reads).

Only the residual is blended; the DSM is added once at the end, so a model that predicts a zero
residual returns the input DSM bit for bit.

Output: finished blocks go into a tiled GeoTIFF under a temporary name beside ``out`` with a
small JSON journal of finished blocks; ``resume=True`` continues from the journal. At the end
the temporary file gets average overviews and is copied to a Cloud-Optimised GeoTIFF (deflate)
under another temporary name and renamed onto ``out``. Every block is computed from the scene alone with a
fixed chip and batch layout, so an interrupted-and-resumed run, a single process and a Dask
cluster all give the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import os
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window
from tqdm.auto import tqdm

from .data import fill_dsm_holes, grid_positions, normalise_band_into
from .errors import CheckpointError, InputError
from .io import atomic_path
from .models import DeepDEMRegressionTask, load_checkpoint, scale_for
from .scene import FLOAT_NODATA, Scene

log = logging.getLogger(__name__)

TILE = 256
JOURNAL_FORMAT = "deepdem-refine-journal-1"

#: Temporary (work) GeoTIFF: uncompressed, because it is read once into the COG and any
#: compression there costs as much CPU as a fifth of the model (measured at 4096²).
WORK_PROFILE = dict(driver="GTiff", tiled=True, blockxsize=TILE, blockysize=TILE, BIGTIFF="YES",
                    interleave="band")
#: GDAL's block cache (MB) for refine's final overview and COG steps. At GDAL's default, 5 % of
#: RAM, those steps grew with the scene (1.25 GB more at 16384² than at 4096²) and ran 3-4x
#: slower; they go through the raster window by window, so a small cache loses nothing.
GDAL_CACHE_MB = 64
#: DEFLATE level 1 (libdeflate) + floating-point predictor: 3 % larger than level 6, half the time.
COG_OPTIONS = dict(COMPRESS="DEFLATE", LEVEL=1, PREDICTOR="YES", BLOCKSIZE=512, OVERVIEWS="AUTO",
                   RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS")


# -- chip layout and weights -----------------------------------------------------------------

def blend_window(chip_size: int, floor: float = 1e-3, overlap: float = 0.5) -> np.ndarray:
    """2-D separable blending weights: 1 in the centre, a sin² ramp across the overlap.

    At 50 % overlap the ramp spans half the chip and this is the sin² window, whose shifted
    copies sum to one. The floor keeps pixels covered by one chip only (scene edges) defined.
    """
    ramp = blend_ramp(chip_size, floor, overlap)
    return np.outer(ramp, ramp).astype(np.float32)


def blend_ramp(chip_size: int, floor: float = 1e-3, overlap: float = 0.5) -> np.ndarray:
    """The 1-D profile of :func:`blend_window` (float64)."""
    ramp_len = max(1, int(round(chip_size * overlap)))
    x = np.arange(chip_size, dtype=np.float64) + 0.5
    dist = np.minimum(x, chip_size - x)  # distance from the nearer edge
    ramp = np.where(dist < ramp_len, np.sin(0.5 * np.pi * np.minimum(dist / ramp_len, 1.0)) ** 2, 1.0)
    return np.maximum(ramp, floor)


@dataclass(frozen=True)
class Block:
    """One output block: rows ``[row0, row1)`` × cols ``[col0, col1)`` of the scene."""

    index: int
    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def window(self) -> Window:
        return Window(self.col0, self.row0, self.col1 - self.col0, self.row1 - self.row0)


def plan_blocks(shape: tuple[int, int], block_size: int) -> list[Block]:
    """Row-major blocks of ``block_size`` px covering the scene (the last ones are smaller)."""
    height, width = shape
    blocks = []
    for r in range(0, height, block_size):
        for c in range(0, width, block_size):
            blocks.append(Block(len(blocks), r, min(r + block_size, height), c, min(c + block_size, width)))
    return blocks


@dataclass(frozen=True)
class RefineSettings:
    """Everything a worker needs, besides the model and the scene, to refine a block."""

    bands: tuple[str, ...]
    chip: int
    stride: int
    overlap: float
    scale: float
    fallback_mean: float
    block_size: int
    batch_size: int = 8
    fill: bool = False
    fill_holes: bool = False
    tta: bool = False
    bf16: bool = True
    device: str = "auto"
    targets: tuple[str, ...] = ("dsm",)

    def fingerprint(self) -> dict:
        data = asdict(self)
        data.pop("batch_size")  # batch size does not change a chip's result on a given device
        data.pop("device")
        data["bands"] = list(self.bands)
        data["targets"] = list(self.targets)
        return data


def _chip_starts(length: int, chip: int, stride: int, lo: int, hi: int) -> list[int]:
    """Chip starts of the scene's grid whose chip overlaps ``[lo, hi)``."""
    return [p for p in grid_positions(length, chip, stride) if p < hi and p + chip > lo]


def _device(requested: str | None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the per-block computation -----------------------------------------------------------------

class BlockRefiner:
    """A model on a device, ready to refine blocks of one scene (one per process or worker)."""

    def __init__(self, task: DeepDEMRegressionTask, scene: Scene, settings: RefineSettings):
        self.scene, self.settings = scene, settings
        self.device = _device(settings.device)
        self.task = task.to(self.device).eval()
        if self.device.type == "cpu" or self.device.type == "cuda":
            self.task = self.task.to(memory_format=torch.channels_last)
        self.amp_dtype = torch.bfloat16
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.float16
        self.window_weights = blend_window(settings.chip, overlap=settings.overlap)
        self.ramp = blend_ramp(settings.chip, overlap=settings.overlap).astype(np.float32)
        self.needed = list(dict.fromkeys([*settings.bands, "dsm", "nodata_mask"]))
        # Block buffers per thread: two where a read-ahead thread loads the next block while
        # this one runs (see _loaded_blocks), one where a thread loads a block and then runs it.
        self.buffer_slots = 1 if self.device.type == "cpu" else 2
        # Per-thread scratch (pinned staging, input buffers): a threaded Dask worker may run
        # several blocks on one refiner at once.
        self._scratch = threading.local()

    def _forward(self, inputs: np.ndarray) -> np.ndarray:
        """Blend-weighted residual in metres (B, T, H, W) float32 for normalised inputs (B, C, H, W).

        The chip's blending window is applied here, fused with the scale factor into one
        multi-threaded multiply, rather than per chip in numpy.
        """
        s = self.settings
        batch = torch.from_numpy(inputs)
        if self.device.type == "cuda":
            # Pinned staging memory lets the copy to the GPU run asynchronously.
            pinned = getattr(self._scratch, "pinned", None)
            if pinned is None or pinned.shape[0] < batch.shape[0]:
                pinned = self._scratch.pinned = torch.empty((s.batch_size, *batch.shape[1:]),
                                                            dtype=torch.float32).pin_memory()
            staged = pinned[: batch.shape[0]]
            staged.copy_(batch)
            batch = staged.to(self.device, non_blocking=True)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=s.bf16):
            if not s.tta:
                residual = self.task(batch).float()
            else:
                # The 8 symmetries of the square (4 rotations × optional flip), each undone on the
                # output and averaged; training augments with the same group.
                residual = None
                for k in range(4):
                    for flip in (False, True):
                        x = torch.rot90(batch, k, dims=(2, 3))
                        x = torch.flip(x, dims=(3,)) if flip else x
                        y = self.task(x.contiguous(memory_format=torch.channels_last)).float()
                        y = torch.flip(y, dims=(3,)) if flip else y
                        y = torch.rot90(y, -k, dims=(2, 3))
                        residual = y if residual is None else residual + y
                residual = residual / 8.0
        weights = getattr(self._scratch, "weights", None)
        if weights is None or weights.device != residual.device:
            weights = self._scratch.weights = torch.from_numpy(self.window_weights * np.float32(s.scale)).to(residual.device)
        return (residual * weights).cpu().numpy()

    def _block_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array for a block's planes, from this thread's reused buffers.

        A fresh 100-MB array per block costs its page faults every time (on a VM, as much as the
        reading itself). One buffer per thread suffices where a thread loads a block and then
        computes it; with a read-ahead thread (GPU), that thread alternates between two.
        """
        size = int(np.prod(shape))
        scratch = self._scratch
        if not hasattr(scratch, "buffers"):
            scratch.buffers, scratch.turn = [None] * self.buffer_slots, 0
        scratch.turn = (scratch.turn + 1) % len(scratch.buffers)
        buffer = scratch.buffers[scratch.turn]
        if buffer is None or buffer.size < size:
            buffer = scratch.buffers[scratch.turn] = np.empty(size, np.float32)
        return buffer[:size].reshape(shape)

    def _weight_profile(self, starts: Sequence[int], lo: int, hi: int, length: int) -> np.ndarray:
        """Sum over the chips starting at ``starts`` of the window's 1-D ramp, on ``[lo, hi)``."""
        chip = self.settings.chip
        profile = np.zeros(hi - lo, np.float32)
        for start in starts:
            a, b = max(start, lo), min(start + chip, hi, length)
            profile[a - lo : b - lo] += self.ramp[a - start : b - start]
        return profile

    def load_block(self, block: Block, threads: int = 1) -> dict:
        """Read a block with its halo and normalise it (the I/O half of :meth:`refine_block`).

        Every band is read straight into its plane of one reused buffer and normalised there.
        ``threads`` > 1 decodes and normalises the bands in parallel (GDAL and numpy release
        the GIL), for when nothing else needs the cores.
        """
        s, chip = self.settings, self.settings.chip
        height, width = self.scene.shape
        rows = _chip_starts(height, chip, s.stride, block.row0, block.row1)
        cols = _chip_starts(width, chip, s.stride, block.col0, block.col1)
        wr0, wc0 = rows[0], cols[0]
        halo = Window(wc0, wr0, cols[-1] + chip - wc0, rows[-1] + chip - wr0)
        # Planes: the input channels, the DSM in metres, and the mask when it is no input.
        mask_is_input = "nodata_mask" in s.bands
        planes = self._block_buffer((len(s.bands) + 2 - mask_is_input, int(halo.height), int(halo.width)))
        inputs, dsm = planes[: len(s.bands)], planes[len(s.bands)]
        channels = dict(zip(s.bands, inputs))
        mask = channels["nodata_mask"] if mask_is_input else planes[-1]
        dsm_missing = np.empty(dsm.shape, bool)

        def read(band: str) -> None:
            # Boundless reads pad scenes smaller than a chip. The DSM channel is centred on the
            # scene's median height rather than the block's mean (no pass over the block for it;
            # float32 keeps millimetres at any height a scene spans); each chip then moves it to
            # its own mean.
            if band == "dsm":
                self.scene.read("dsm", halo, out=dsm)
                if s.fill_holes:
                    fill_dsm_holes(dsm, out=dsm)  # within the block and its halo (training: scene-wide)
                np.isnan(dsm, out=dsm_missing)
                normalise_band_into("dsm", dsm, channels["dsm"], s.scale, s.fallback_mean, dsm_missing)
            else:
                plane = channels.get(band, mask)  # the mask is the one band that may be no input
                self.scene.read(band, halo, out=plane)
                normalise_band_into(band, plane, plane, s.scale, s.fallback_mean)

        if threads > 1:
            with ThreadPoolExecutor(min(threads, len(self.needed))) as pool:
                list(pool.map(read, self.needed))
        else:
            for band in self.needed:
                read(band)
        dsm_valid = np.logical_not(dsm_missing, out=dsm_missing)
        return dict(block=block, rows=rows, cols=cols, wr0=wr0, wc0=wc0, inputs=inputs, dsm=dsm,
                    dsm_valid=dsm_valid, mask=mask)

    def refine_block(self, block: Block, on_chips: Callable[[int], None] | None = None,
                     loaded: dict | None = None) -> np.ndarray:
        """Refined heights of one block, (T, rows, cols) float32 with the nodata value applied."""
        s, chip = self.settings, self.settings.chip
        height, width = self.scene.shape
        d = loaded if loaded is not None else self.load_block(block)
        rows, cols, wr0, wc0, inputs, dsm = d["rows"], d["cols"], d["wr0"], d["wc0"], d["inputs"], d["dsm"]
        dsm_valid = d["dsm_valid"]
        dsm_channel = s.bands.index("dsm")

        bh, bw = block.row1 - block.row0, block.col1 - block.col0
        res_sum = np.zeros((len(s.targets), bh, bw), np.float32)
        inner = (slice(block.row0 - wr0, block.row1 - wr0), slice(block.col0 - wc0, block.col1 - wc0))
        need_base = not dsm_valid[inner].all()
        base_sum = np.zeros((bh, bw), np.float32) if need_base else None

        positions = [(r, c) for r in rows for c in cols]
        buffer = np.empty((min(s.batch_size, len(positions)), inputs.shape[0], chip, chip), np.float32)
        for start in range(0, len(positions), s.batch_size):
            batch = positions[start : start + s.batch_size]
            means = []
            for i, (r, c) in enumerate(batch):
                y, x = r - wr0, c - wc0
                buffer[i] = inputs[:, y : y + chip, x : x + chip]
                valid = dsm_valid[y : y + chip, x : x + chip]
                count = np.count_nonzero(valid)
                mean = s.fallback_mean  # the height load_block centred the DSM channel on
                if count:
                    # The channel is (DSM − centre) / scale, 0 where there is no DSM: its valid
                    # mean is the offset that moves it to the chip's own mean.
                    dsm_in = buffer[i, dsm_channel]
                    offset = float(dsm_in.sum(dtype=np.float64)) / count
                    np.subtract(dsm_in, np.float32(offset), out=dsm_in, where=valid)
                    mean += offset * s.scale
                means.append(mean)
            residual = self._forward(buffer[: len(batch)])
            for (r, c), res, mean in zip(batch, residual, means):
                # The part of the chip inside the block, in chip and in block coordinates.
                r0, r1 = max(r, block.row0), min(r + chip, block.row1, height)
                c0, c1 = max(c, block.col0), min(c + chip, block.col1, width)
                out = (slice(r0 - block.row0, r1 - block.row0), slice(c0 - block.col0, c1 - block.col0))
                res_sum[(slice(None), *out)] += res[:, r0 - r : r1 - r, c0 - c : c1 - c]  # weighted by _forward
                if base_sum is not None:
                    base_sum[out] += self.window_weights[r0 - r : r1 - r, c0 - c : c1 - c] * np.float32(mean)
            if on_chips:
                on_chips(len(batch))

        # The chips form a grid (row starts × column starts) and the window is separable, so
        # the sum of the weights is the outer product of two 1-D sums: divide by each in turn.
        inv_rows = (1.0 / self._weight_profile(rows, block.row0, block.row1, height)).astype(np.float32)
        inv_cols = (1.0 / self._weight_profile(cols, block.col0, block.col1, width)).astype(np.float32)
        res_sum *= inv_rows[:, None]
        res_sum *= inv_cols
        if base_sum is None:
            res_sum += dsm[inner]
        else:
            base_sum *= inv_rows[:, None]
            base_sum *= inv_cols
            res_sum += np.where(dsm_valid[inner], dsm[inner], base_sum)
        invalid = ~np.isfinite(res_sum)
        if not s.fill:
            invalid |= d["mask"][inner] <= 0
        np.putmask(res_sum, invalid, np.float32(FLOAT_NODATA))
        return res_sum


# -- glibc's heap ---------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def _glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _keep_heap(libc=None) -> bool:
    """Serve allocations up to 32 MB from a heap that is not handed back to the system."""
    libc = libc or _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return True


@contextlib.contextmanager
def steady_heap():
    """Keep glibc's heap while the model runs, and give the memory back afterwards.

    Process-wide, so the library never does it by itself: ``deepdem refine`` (the command, a
    process of its own) runs under it, and a caller who owns its process may too.

    Between two forward passes, refine's own small arrays disturb glibc's adaptive thresholds:
    the heap is then trimmed after each pass and the next pass's activations fault their pages
    in again, which made the model 17 % slower inside refine than in a bare loop (4096² bench,
    CPU). With the mmap threshold at its adaptive maximum (32 MB) and no trimming, the model
    runs at its bare speed. Process-wide, as the PyTorch CPU guide's jemalloc/tcmalloc advice
    is; on exit the trim threshold becomes 64 MB (twice the mmap threshold, glibc's own rule)
    and the heap is trimmed. Does nothing where the C library is not glibc.
    """
    libc = _glibc()
    kept = _keep_heap(libc)
    try:
        yield
    finally:
        if kept:
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)


# -- model sharing for Dask workers ------------------------------------------------------------

_WORKER_REFINERS: dict[str, BlockRefiner] = {}
_WORKER_LOCK = threading.Lock()


def _worker_refiner(key: str, payload: tuple[dict, dict], scene: Scene, settings: RefineSettings) -> BlockRefiner:
    """The worker's refiner for this model and scene, built once per worker process."""
    with _WORKER_LOCK:
        refiner = _WORKER_REFINERS.get(key)
        if refiner is None:
            model_kwargs, state = payload
            task = DeepDEMRegressionTask(model_kwargs)
            task.load_state_dict(state)
            refiner = BlockRefiner(task, scene, settings)
            _WORKER_REFINERS.clear()  # one model per worker: a new refine replaces the last
            _WORKER_REFINERS[key] = refiner
        return refiner


def _dask_refine_block(key, payload, scene, settings, block) -> tuple[int, np.ndarray]:
    return block.index, _worker_refiner(key, payload, scene, settings).refine_block(block)


# -- journal and output ------------------------------------------------------------------------

def _work_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(f".{out.name}.refine.tif"), out.with_name(f".{out.name}.refine.json")


def _weights_digest(task: DeepDEMRegressionTask) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(task.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_journal(path: Path, journal: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(journal))
    os.replace(tmp, path)


def _commit_block(work: Path, journal_path: Path, journal: dict, block: Block, data: np.ndarray) -> None:
    """Write a finished block into the work file, then record it in the journal.

    The file is closed (flushed) before the journal names the block, so a block the journal
    lists is always on disk; a block written but not journaled is simply recomputed on resume.
    """
    with rasterio.open(work, "r+") as dst:
        dst.write(data, window=block.window)
    journal["done"].append(block.index)
    _write_journal(journal_path, journal)


def refine(
    checkpoint: str | os.PathLike | DeepDEMRegressionTask,
    scene: str | os.PathLike | Scene,
    out: str | os.PathLike,
    batch_size: int = 8,
    overlap: float = 0.25,
    fill: bool = False,
    device: str | None = "auto",
    bf16: bool = True,
    progress: bool = True,
    tta: bool = False,
    block_size: int = 2048,
    resume: bool = False,
    workers: int = 0,
    scheduler: str | None = None,
    client=None,
    hillshade: str | None = None,
    slope: bool = False,
    chm: bool = False,
    scale_source: str | None = None,
) -> Path:
    """Refine a scene's DSM with a trained model and write a float32 Cloud-Optimised GeoTIFF.

    Pixels where the scene has no valid input are nodata unless ``fill`` is set, in which case
    the model's prediction (on the chip-mean base) is kept there too. A model with two heads
    (``target='both'``) writes two bands, DSM then DTM.

    ``block_size`` bounds memory (one block plus a chip-wide halo); ``overlap`` is the chips'
    overlap (0.25 by default; the blending hides chip edges at any overlap ≥ 1/8). ``tta``
    averages the 8 flips/rotations of each chip (8× the compute). ``resume`` continues an
    interrupted run with the same settings. ``workers`` > 0 starts a local Dask cluster of that
    many processes, ``scheduler`` connects to an existing one, ``client`` uses a Dask client.
    ``hillshade`` ('standard' or 'multidirectional'), ``slope`` and ``chm`` (two heads) write
    ``<out stem>_hillshade.tif``, ``_slope.tif`` and ``_chm.tif`` beside ``out``.
    ``scale_source`` overrides the checkpoint's choice of DSM scale factor: 'checkpoint' (the
    training scenes' factor, the default of models trained since 0.3) or 'scene' (the scene's own).
    """
    task = checkpoint if isinstance(checkpoint, DeepDEMRegressionTask) else load_checkpoint(checkpoint)
    scene = scene if isinstance(scene, Scene) else Scene.open(scene)
    out = Path(out)
    kwargs = task.model_kwargs
    bands, chip = list(kwargs["bands"]), int(kwargs["chip_size"])
    if "dsm" not in bands:
        raise CheckpointError(f"checkpoint bands {bands} lack 'dsm': deepdem models refine a DSM",
                              None if isinstance(checkpoint, DeepDEMRegressionTask) else checkpoint)
    missing = [b for b in bands if not scene.has(b)]
    if missing:
        raise CheckpointError(
            f"scene lacks band(s) {', '.join(missing)} that the checkpoint was trained on "
            f"(checkpoint bands: {', '.join(bands)}; scene bands: {', '.join(scene.bands)})",
            scene.path,
        )
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1 or block_size < 1 or workers < 0:
        raise InputError(f"batch_size and block_size must be ≥ 1 and workers ≥ 0 (got {batch_size}, {block_size}, {workers})")
    targets = tuple(task.targets)
    if chm and len(targets) < 2:
        raise CheckpointError("--chm needs a model with DSM and DTM heads (target 'both')")
    block_size = max(TILE, int(np.ceil(block_size / TILE)) * TILE)  # whole tiles per write
    settings = RefineSettings(
        bands=tuple(bands), chip=chip, stride=max(1, int(round(chip * (1 - overlap)))), overlap=overlap,
        scale=scale_for(kwargs, scene.scale_factors, chip, scale_source),
        fill_holes=kwargs.get("dsm_holes") == "idw",
        fallback_mean=float(scene.statistics("dsm").get("median", 0.0)),
        block_size=block_size, batch_size=batch_size, fill=fill, tta=tta, bf16=bf16,
        device=device or "auto", targets=targets,
    )
    blocks = plan_blocks(scene.shape, block_size)
    digest = _weights_digest(task)
    fingerprint = {
        "scene": str(scene.path.resolve()), "grid": scene.grid.to_json(), "weights": digest,
        "settings": settings.fingerprint(), "device": _device(settings.device).type,
    }
    work, journal_path = _work_paths(out)
    journal = None
    if resume and work.exists() and journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text())
        except json.JSONDecodeError:
            journal = None
        if journal and (journal.get("format") != JOURNAL_FORMAT or journal.get("fingerprint") != fingerprint):
            log.warning("%s: journal is for other inputs or settings; starting over", journal_path)
            journal = None
    if journal is None:
        journal = {"format": JOURNAL_FORMAT, "fingerprint": fingerprint, "done": []}
        work.unlink(missing_ok=True)
        profile = dict(WORK_PROFILE, height=scene.shape[0], width=scene.shape[1], count=len(targets),
                       dtype="float32", crs=scene.crs, transform=scene.transform, nodata=FLOAT_NODATA)
        with rasterio.open(work, "w", **profile) as dst:
            for i, target in enumerate(targets, start=1):
                dst.set_band_description(i, f"refined {target.upper()} (m)")
        _write_journal(journal_path, journal)
    done = set(journal["done"])
    todo = [b for b in blocks if b.index not in done]
    if done:
        log.info("resuming %s: %d of %d blocks already done", out, len(done), len(blocks))

    chips_per_block = {
        b.index: len(_chip_starts(scene.shape[0], chip, settings.stride, b.row0, b.row1))
        * len(_chip_starts(scene.shape[1], chip, settings.stride, b.col0, b.col1))
        for b in todo
    }
    with tqdm(total=sum(chips_per_block.values()), desc="refine", unit="chip", disable=not progress) as bar:
        if client is not None or workers or scheduler:
            _refine_distributed(task, digest, scene, settings, todo, work, journal_path, journal,
                                client, workers, scheduler, lambda b: bar.update(chips_per_block[b]))
        else:
            refiner = BlockRefiner(task, scene, settings)
            for block, loaded in _loaded_blocks(refiner, todo):
                data = refiner.refine_block(block, on_chips=bar.update, loaded=loaded)
                del loaded
                _commit_block(work, journal_path, journal, block, data)

    unfinished = {b.index for b in blocks} - set(journal["done"])
    if unfinished:  # a guard: never publish an output with blocks missing
        raise RuntimeError(f"refine finished with {len(unfinished)} block(s) not written; rerun with resume")
    # GDAL's block cache bounded (see GDAL_CACHE_MB) for the whole-raster steps. Not around the
    # block loop: its reads close their files (and free their cached tiles) block by block,
    # and an active rasterio.Env there slowed refine by 3 %.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        _build_overviews(work)
        with atomic_path(out) as tmp:
            rasterio.shutil.copy(work, tmp, driver="COG", **COG_OPTIONS)
        work.unlink(missing_ok=True)
        journal_path.unlink(missing_ok=True)

        from . import products

        stem = out.with_suffix("")
        if hillshade:
            products.hillshade_raster(out, f"{stem}_hillshade.tif", multidirectional=hillshade == "multidirectional")
        if slope:
            products.slope_raster(out, f"{stem}_slope.tif")
        if chm:
            products.canopy_height_raster(out, out, f"{stem}_chm.tif", dsm_band=1, dtm_band=2)
    return out


def _loaded_blocks(refiner: BlockRefiner, blocks: Sequence[Block]):
    """Yield ``(block, loaded)``: each block read and normalised, ready for the model.

    On a GPU, one thread reads the next block while the model runs on this one (GDAL's
    decompression and numpy release the GIL). On the CPU the model already keeps every core
    busy, and a reader beside it slowed the model by as much time as the reading took (measured
    at 4096²), so there blocks are read in turn, each with every core decoding its bands.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if refiner.device.type == "cpu":
        for block in blocks:
            yield block, refiner.load_block(block, threads=cores)
        return
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(refiner.load_block, blocks[0], cores) if blocks else None
        for i, block in enumerate(blocks):
            loaded = ahead.result()
            ahead = reader.submit(refiner.load_block, blocks[i + 1], cores) if i + 1 < len(blocks) else None
            yield block, loaded


def cog_overview_factors(shape: tuple[int, int], blocksize: int = COG_OPTIONS["BLOCKSIZE"]) -> list[int]:
    """The overview levels GDAL's COG driver makes by itself: halve until one block holds it."""
    factors, size = [], max(shape)
    while size > blocksize:
        factors.append(2 ** (len(factors) + 1))
        size = -(-size // 2)
    return factors


def _build_overviews(work: Path) -> None:
    """Average overviews (no data honoured) in the uncompressed work file, for the COG to copy.

    The COG driver uses a source's overviews when it has them; left to make its own, it writes
    them compressed to a temporary file and reads them back (measured at 4096²: 0.08 s here
    against 0.35 s there).
    """
    with rasterio.open(work, "r+") as dst:
        factors = cog_overview_factors(dst.shape)
        if factors:
            dst.build_overviews(factors, Resampling.average)


def _refine_distributed(task, digest, scene, settings, todo: Sequence[Block], work, journal_path, journal,
                        client, workers, scheduler, on_block) -> None:
    """Spread blocks over Dask workers; the client alone writes the file and the journal."""
    from dask.distributed import Client, LocalCluster, as_completed

    own_client = client is None
    cluster = None
    if own_client:
        if scheduler:
            client = Client(scheduler)
        else:
            # One single-threaded process per worker: torch then uses the cores it is given.
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            n_threads = max(1, (os.cpu_count() or 1) // workers)
            client.run(torch.set_num_threads, n_threads)
    try:
        state = {k: v.detach().cpu() for k, v in task.state_dict().items()}
        # Sent once to every worker; each builds its model from it once (see _worker_refiner).
        payload = client.scatter((dict(task.model_kwargs), state), broadcast=True)
        key = hashlib.sha256(json.dumps([digest, str(scene.path.resolve()), settings.fingerprint()]).encode()).hexdigest()
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        pending = iter(todo)
        by_index = {b.index: b for b in todo}

        def submit(block):
            return client.submit(_dask_refine_block, key, payload, scene, settings, block,
                                 key=f"deepdem-refine-{key[:16]}-{block.index}", pure=False)

        # A bounded number of blocks in flight keeps the client's memory bounded too.
        futures = as_completed([submit(b) for b in itertools.islice(pending, 2 * n_workers)])
        for future in futures:
            index, data = future.result()
            future.release()
            _commit_block(work, journal_path, journal, by_index[index], data)
            on_block(index)
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(submit(nxt))
    finally:
        if own_client:
            client.close()
            if cluster is not None:
                cluster.close()
