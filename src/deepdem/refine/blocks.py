"""The per-block computation: read a block with its halo, run its chips, blend them."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from rasterio.windows import Window

from ..data import chip_means, fill_dsm_holes, normalise_band_into, normalise_dsm
from ..models import DeepDEMRegressionTask
from ..scene import FLOAT_NODATA, Scene
from .layout import Block, RefineSettings, blend_ramp, blend_window, chip_starts


def device_for(requested: str | None) -> torch.device:
    """The device refine runs on: the one asked for, else CUDA where there is one."""
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BlockRefiner:
    """A model on a device, ready to refine blocks of one scene (one per process or worker)."""

    def __init__(self, task: DeepDEMRegressionTask, scene: Scene, settings: RefineSettings):
        self.scene, self.settings = scene, settings
        self.device = device_for(settings.device)
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
        # this one runs (see loaded_blocks), one where a thread loads a block and then runs it.
        self.buffer_slots = 1 if self.device.type == "cpu" else 2
        # Per-thread scratch (pinned staging, input buffers): a threaded Dask worker may run
        # several blocks on one refiner at once.
        self._scratch = threading.local()

    def _forward(self, inputs: np.ndarray) -> np.ndarray:
        """Blend-weighted residuals in metres (B, T, H, W) float32 for normalised inputs (B, C, H, W),
        followed by T blend-weighted σ channels (m) for a model with σ.

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
                output = self._outputs(batch)
            else:
                output = self._symmetry_mixture(batch)
        weights = getattr(self._scratch, "weights", None)
        if weights is None or weights.device != output.device:
            weights = self._scratch.weights = torch.from_numpy(self.window_weights * np.float32(s.scale)).to(output.device)
        return (output * weights).cpu().numpy()

    def _symmetry_mixture(self, batch: torch.Tensor) -> torch.Tensor:
        """The outputs averaged over the 8 symmetries of the square (4 rotations × optional
        flip), each undone on the output; training augments with the same group.

        σ is that of the equal mixture of the 8 predicted distributions (law of total variance):
        √(mean of the 8 σ² + variance of the 8 residuals), so the views' disagreement widens it.
        """
        n = len(self.task.targets)
        total = squares = None
        for k in range(4):
            for flip in (False, True):
                x = torch.rot90(batch, k, dims=(2, 3))
                x = torch.flip(x, dims=(3,)) if flip else x
                y = self._outputs(x.contiguous(memory_format=torch.channels_last))
                y = torch.flip(y, dims=(3,)) if flip else y
                y = torch.rot90(y, -k, dims=(2, 3))
                total = y if total is None else total + y
                if self.task.has_sigma:
                    squares = y * y if squares is None else squares + y * y
        mean = total / 8.0
        if squares is None:
            return mean
        second_moment = squares / 8.0  # per channel: E[r²] for residuals, E[σ²] for σ
        spread = (second_moment[:, :n] - mean[:, :n] ** 2).clamp_min(0.0)
        return torch.cat([mean[:, :n], torch.sqrt(second_moment[:, n:] + spread)], dim=1)

    def _outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised residuals, then σ in normalised units when the model has them (float32)."""
        residual, sigma = self.task.split_output(self.task(batch))
        return residual if sigma is None else torch.cat([residual, sigma], dim=1)

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
        """Read a block with its halo (the I/O half of :meth:`refine_block`).

        Every band is read straight into its plane of one reused buffer, and given its fill
        values there; the DSM stays in metres, holes filled, for :meth:`refine_block`.
        ``threads`` > 1 decodes and normalises the bands in parallel (GDAL and numpy release
        the GIL), for when nothing else needs the cores.
        """
        s, chip = self.settings, self.settings.chip
        height, width = self.scene.shape
        rows = chip_starts(height, chip, s.stride, block.row0, block.row1)
        cols = chip_starts(width, chip, s.stride, block.col0, block.col1)
        wr0, wc0 = rows[0], cols[0]
        halo = Window(wc0, wr0, cols[-1] + chip - wc0, rows[-1] + chip - wr0)
        # Planes: the input channels (the DSM's in metres: each chip is normalised on its own
        # in refine_block), and the mask when it is no input.
        mask_is_input = "nodata_mask" in s.bands
        planes = self._block_buffer((len(s.bands) + 1 - mask_is_input, int(halo.height), int(halo.width)))
        inputs = planes[: len(s.bands)]
        channels = dict(zip(s.bands, inputs))
        dsm = channels["dsm"]
        mask = channels["nodata_mask"] if mask_is_input else planes[-1]

        def read(band: str) -> None:
            # Boundless reads pad scenes smaller than a chip.
            plane = channels.get(band, mask)  # the mask is the one band that may be no input
            self.scene.read(band, halo, out=plane)
            if band != "dsm":
                normalise_band_into(band, plane, plane)
            elif s.fill_holes:
                fill_dsm_holes(dsm, out=dsm)  # within the block and its halo (training: scene-wide)

        if threads > 1:
            with ThreadPoolExecutor(min(threads, len(self.needed))) as pool:
                list(pool.map(read, self.needed))
        else:
            for band in self.needed:
                read(band)
        dsm_valid = ~np.isnan(dsm)
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
        res_sum = np.zeros((s.channels, bh, bw), np.float32)
        inner = (slice(block.row0 - wr0, block.row1 - wr0), slice(block.col0 - wc0, block.col1 - wc0))
        need_base = not dsm_valid[inner].all()
        base_sum = np.zeros((bh, bw), np.float32) if need_base else None

        positions = [(r, c) for r in rows for c in cols]
        buffer = np.empty((min(s.batch_size, len(positions)), inputs.shape[0], chip, chip), np.float32)
        for start in range(0, len(positions), s.batch_size):
            batch = positions[start : start + s.batch_size]
            for i, (r, c) in enumerate(batch):
                y, x = r - wr0, c - wc0
                buffer[i] = inputs[:, y : y + chip, x : x + chip]
            chips = buffer[: len(batch), dsm_channel]
            means = chip_means(chips, s.fallback_mean)
            normalise_dsm(chips, means, s.scale, chips)  # as training does (data.normalise_dsm)
            residual = self._forward(buffer[: len(batch)])
            for (r, c), res, mean in zip(batch, residual, means.astype(np.float32)):
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
        n = len(s.targets)
        heights = res_sum[:n]  # σ, blended like the residual, follows in res_sum[n:]
        if base_sum is None:
            heights += dsm[inner]
        else:
            base_sum *= inv_rows[:, None]
            base_sum *= inv_cols
            heights += np.where(dsm_valid[inner], dsm[inner], base_sum)
        invalid = ~np.isfinite(heights)
        if not s.fill:
            invalid |= d["mask"][inner] <= 0
        if s.sigma:
            invalid |= ~np.isfinite(res_sum[n:])
            if s.max_sigma is not None:
                invalid = self._initial_dsm_where(res_sum, invalid, res_sum[n:] > np.float32(s.max_sigma),
                                                  dsm[inner], dsm_valid[inner], keep=s.above_max_sigma == "initial")
        if s.keep_initial_dsm:  # the parallax check failed: the DSM heads everywhere
            dsm_heads = np.array([target == "dsm" for target in s.targets])[:, None, None]
            invalid = self._initial_dsm_where(res_sum, invalid, np.broadcast_to(dsm_heads, invalid.shape),
                                              dsm[inner], dsm_valid[inner])
        if s.sigma:
            invalid = np.concatenate([invalid, invalid])
        np.putmask(res_sum, invalid, np.float32(FLOAT_NODATA))
        return res_sum

    def _initial_dsm_where(self, planes: np.ndarray, invalid: np.ndarray, where: np.ndarray, dsm: np.ndarray,
                           dsm_valid: np.ndarray, keep: bool = True) -> np.ndarray:
        """Where ``where`` (a plane per target): DSM heads get the initial DSM if ``keep`` (where
        it has data and the output would have some), nodata otherwise; other heads nodata; σ is
        nodata there either way (the model's σ does not describe the initial DSM). Used by
        ``max_sigma`` and by the parallax check. Returns the heads' pixels to write as nodata."""
        s = self.settings
        n = len(s.targets)
        kept = np.zeros(where.shape, dtype=bool)
        if keep:
            for i, target in enumerate(s.targets):
                if target == "dsm":
                    kept[i] = where[i] & dsm_valid & ~invalid[i]
                    np.copyto(planes[i], dsm, where=kept[i])
        if s.sigma:
            planes[n:][where] = np.float32(FLOAT_NODATA)
        return invalid | (where & ~kept)


def loaded_blocks(refiner: BlockRefiner, blocks: Sequence[Block]):
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
