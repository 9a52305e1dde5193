"""The chip and block layout of refine, and its blending weights.

The scene is cut into output *blocks*; each block's chips lie on one global grid (the last
chip of a row or column ends on the scene's edge), so a block's result does not depend on which
other blocks run, or where.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from rasterio.windows import Window

from ..data import grid_positions

#: the GeoTIFF tile (px); blocks are whole tiles
TILE = 256
#: what refine writes where σ exceeds ``max_sigma``
ABOVE_MAX_SIGMA = ("initial", "nodata")


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
    sigma: bool = False
    max_sigma: float | None = None
    above_max_sigma: str = "initial"
    #: the parallax check failed (:mod:`.agreement`): DSM heads keep the initial DSM, σ nodata
    keep_initial_dsm: bool = False

    @property
    def channels(self) -> int:
        """Output planes of a block: one height per target, then one σ per target."""
        return len(self.targets) * (2 if self.sigma else 1)

    def fingerprint(self) -> dict:
        data = asdict(self)
        data.pop("batch_size")  # batch size does not change a chip's result on a given device
        data.pop("device")
        data["bands"] = list(self.bands)
        data["targets"] = list(self.targets)
        return data


def chip_starts(length: int, chip: int, stride: int, lo: int, hi: int) -> list[int]:
    """Chip starts of the scene's grid whose chip overlaps ``[lo, hi)``."""
    return [p for p in grid_positions(length, chip, stride) if p < hi and p + chip > lo]
