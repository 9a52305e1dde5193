"""The raster grid every stage shares: CRS, affine transform and shape.

One type serves the Scene contract (``scene.json``), the alignment of inputs and LIDAR
gridding, so a grid made by one stage is used by another as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import rasterio.transform
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from .errors import InputError
from .io import open_raster


def _north_up_square(t: Affine) -> bool:
    return t.b == 0 and t.d == 0 and t.a > 0 and bool(np.isclose(t.a, -t.e))


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform and shape (rows, cols).

    ``crs`` is a rasterio CRS or None; any other CRS given (pyproj, WKT, "EPSG:...") is
    converted, so that code reading ``grid.crs`` meets one type.
    """

    crs: CRS | None
    transform: Affine
    height: int
    width: int

    def __post_init__(self):
        if self.crs is not None:
            object.__setattr__(self, "crs", CRS.from_user_input(self.crs))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def size(self) -> int:
        return self.height * self.width

    @property
    def resolution(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def res(self) -> float:
        """The pixel size, for code that needs north-up square pixels (cell indices, TINs)."""
        if not _north_up_square(self.transform):
            raise InputError("grid must be north-up with square pixels, got transform "
                             f"{tuple(self.transform)[:6]}")
        return float(self.transform.a)

    @property
    def pixel_size_m(self) -> float | None:
        """The pixel size in metres (the geometric mean of x and y, in the CRS's linear unit
        converted), or None where it has no meaning: no CRS, or a geographic one (degrees)."""
        if self.crs is None or not self.crs.is_projected:
            return None
        import pyproj

        from .lidar.crs import linear_unit_m

        x, y = self.resolution
        return math.sqrt(x * y) * linear_unit_m(pyproj.CRS.from_user_input(self.crs.to_wkt()))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)[:4]

    def to_json(self) -> dict:
        return {
            "crs": self.crs.to_wkt() if self.crs else None,
            "transform": list(self.transform)[:6],
            "height": self.height,
            "width": self.width,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "Grid":
        crs = CRS.from_wkt(data["crs"]) if data.get("crs") else None
        return cls(crs, Affine(*data["transform"]), int(data["height"]), int(data["width"]))

    @classmethod
    def from_bounds(cls, bounds, res: float, crs, anchor: tuple[float, float] = (0, 0)) -> "Grid":
        """Smallest north-up grid covering ``bounds`` with cell edges on ``anchor + k * res``.

        The default anchor puts pixel edges on multiples of the resolution, so that tiles
        gridded separately line up without resampling.
        """
        if not res > 0:
            raise InputError(f"resolution must be positive, got {res}")
        xmin, ymin, xmax, ymax = bounds
        ax, ay = anchor
        c0 = math.floor((xmin - ax) / res + 1e-9)
        c1 = math.ceil((xmax - ax) / res - 1e-9)
        r0 = math.floor((ymin - ay) / res + 1e-9)
        r1 = math.ceil((ymax - ay) / res - 1e-9)
        width, height = max(c1 - c0, 1), max(r1 - r0, 1)
        if width * height > 2_000_000_000:
            raise InputError(f"output grid of {width} x {height} cells is too large; "
                             "give --bounds or a coarser --resolution")
        return cls(crs, from_origin(ax + c0 * res, ay + r1 * res, float(res), float(res)),
                   int(height), int(width))

    @classmethod
    def like(cls, path) -> "Grid":
        """The grid of an existing raster (north-up, square pixels)."""
        with open_raster(path) as src:
            t = src.transform
            if not _north_up_square(t):
                raise InputError("--like raster must be north-up with square pixels", path)
            if src.crs is None:
                raise InputError("--like raster has no CRS", path)
            # The x size stands for both, so that cell centres and bounds agree with ``res``.
            return cls(src.crs, from_origin(t.c, t.f, t.a, t.a), src.height, src.width)

    def padded(self, cells: int) -> "Grid":
        """The same grid extended by ``cells`` on every side."""
        res, t = self.res, self.transform
        return Grid(self.crs, from_origin(t.c - cells * res, t.f + cells * res, res, res),
                    self.height + 2 * cells, self.width + 2 * cells)

    def cell_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat cell index of each point and the mask of points inside the grid.

        Points exactly on the right/bottom outer edge go to the last cell rather than being
        lost, so a tile whose max equals the grid edge keeps its edge points.
        """
        res, x0, y0 = self.res, self.transform.c, self.transform.f
        inv = 1.0 / res
        col = np.floor((x - x0) * inv)
        row = np.floor((y0 - y) * inv)
        col[(col == self.width) & (x <= x0 + self.width * res)] = self.width - 1
        row[(row == self.height) & (y >= y0 - self.height * res)] = self.height - 1
        inside = (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)
        idx = row.astype(np.int64) * self.width + col.astype(np.int64)
        return idx, inside

    def centres(self, rows: slice | None = None, cols: slice | None = None):
        """x, y coordinates of cell centres (2-D arrays) of a window."""
        rows = rows or slice(0, self.height)
        cols = cols or slice(0, self.width)
        res, x0, y0 = self.res, self.transform.c, self.transform.f
        xs = x0 + (np.arange(cols.start, cols.stop) + 0.5) * res
        ys = y0 - (np.arange(rows.start, rows.stop) + 0.5) * res
        return np.meshgrid(xs, ys)
