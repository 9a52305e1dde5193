"""Ground classification (SMRF-like) and a relief-aware outlier filter, both grid-based.

PDAL's ``filters.smrf`` and ``filters.outlier`` are not installable here, so both are written
in numpy/scipy. Both work on per-cell statistics gathered in a first pass over the points, then
decide per point in a second pass, so memory stays bounded by the grid.

SMRF (Pingel, Clarke & McBride 2013): a minimum surface is opened morphologically with growing
windows; cells that drop by more than ``slope * window`` are objects. The surviving cells are
interpolated into a provisional ground surface, and a point is ground when it lies within
``threshold + scalar * local slope`` of that surface. Square windows replace the paper's disks
because scipy's square min/max filters are separable (O(1) per cell in the window size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..grid import Grid
from .grid import tin_interpolate


@dataclass
class SMRFParams:
    """Parameters of the ground filter, in metres (converted to the CRS units by the caller).

    Defaults follow PDAL's filters.smrf (cell 1 m, slope 0.15, window 18 m, threshold 0.5 m,
    scalar 1.25).
    """

    cell: float = 1.0
    slope: float = 0.15
    window: float = 18.0
    threshold: float = 0.5
    scalar: float = 1.25


def fill_nearest(values: np.ndarray) -> np.ndarray:
    """Fill NaN cells with the nearest valid cell's value (for the opening steps only)."""
    invalid = ~np.isfinite(values)
    if not invalid.any() or invalid.all():
        return values
    _, (ri, ci) = ndimage.distance_transform_edt(invalid, return_indices=True)
    return values[ri, ci]


def smrf_object_mask(zmin: np.ndarray, cell: float, slope: float, window: float) -> np.ndarray:
    """Cells of a minimum surface that belong to objects (buildings, vegetation).

    ``zmin`` holds NaN where a cell has no point.
    """
    surface = fill_nearest(zmin)
    objects = np.zeros(zmin.shape, dtype=bool)
    max_radius = max(int(np.ceil(window / cell)), 1)
    last = surface
    for radius in range(1, max_radius + 1):
        size = 2 * radius + 1
        opened = ndimage.maximum_filter(ndimage.minimum_filter(last, size=size, mode="nearest"),
                                        size=size, mode="nearest")
        objects |= (last - opened) > slope * radius * cell
        last = opened
    return objects & np.isfinite(zmin)


def smrf_surface(zmin: np.ndarray, grid: Grid, params: SMRFParams) -> np.ndarray:
    """Provisional ground surface on ``grid`` from the per-cell minimum ``zmin``.

    ``params`` must already be in the grid's CRS units.
    """
    objects = smrf_object_mask(zmin, grid.res, params.slope, params.window)
    ground = np.isfinite(zmin) & ~objects
    if ground.sum() < 3:
        return np.full(zmin.shape, np.nan)
    gx, gy = grid.centres()
    # A gap of the whole window can be bridged: objects up to that size were removed.
    surface = tin_interpolate(gx[ground], gy[ground], zmin[ground], grid,
                              max_gap=2 * params.window + 2 * grid.res)
    return fill_nearest(surface)


class GroundClassifier:
    """Labels points ground when they lie close to a provisional SMRF ground surface."""

    def __init__(self, surface: np.ndarray, grid: Grid, params: SMRFParams):
        self.surface = surface
        self.grid = grid
        self.params = params
        gy, gx = np.gradient(surface, grid.res)
        self.slope = np.hypot(gx, gy)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        res, t = self.grid.res, self.grid.transform
        # Fractional (row, col) of each point relative to the cell centres.
        col = (x - t.c) / res - 0.5
        row = (t.f - y) / res - 0.5
        coords = np.vstack([row, col])
        ref = ndimage.map_coordinates(self.surface, coords, order=1, mode="nearest")
        slope = ndimage.map_coordinates(self.slope, coords, order=1, mode="nearest")
        tol = self.params.threshold + self.params.scalar * slope
        return np.abs(z - ref) <= tol


@dataclass
class OutlierParams:
    """Relief-aware outlier filter parameters, in metres.

    A point is an outlier when it rises above every neighbouring cell's highest point (or
    falls below every neighbour's lowest point) by more than
    ``threshold + relief_factor * local relief``, where local relief is the spread of the
    neighbours' heights. A steep real peak has neighbours nearly as high, and its local relief
    is large, so it stays; a bird or multipath return hangs alone above flat ground.
    A global z-score instead removes the highest true summits of mountainous scenes.
    """

    threshold: float = 3.0
    relief_factor: float = 1.0
    radius: int = 1  # neighbourhood half-size in cells


class OutlierFilter:
    """Point test built from per-cell max/min grids of a first pass."""

    def __init__(self, zmax: np.ndarray, zmin: np.ndarray, grid: Grid,
                 params: OutlierParams, z_unit_m: float = 1.0):
        size = 2 * params.radius + 1
        ring = np.ones((size, size), dtype=bool)
        ring[params.radius, params.radius] = False
        hi = np.where(np.isfinite(zmax), zmax, -np.inf)
        lo = np.where(np.isfinite(zmin), zmin, np.inf)
        n_max = ndimage.maximum_filter(hi, footprint=ring, mode="constant", cval=-np.inf)
        n_min = ndimage.minimum_filter(lo, footprint=ring, mode="constant", cval=np.inf)
        with np.errstate(invalid="ignore"):
            relief = n_max - n_min
        relief = np.where(np.isfinite(relief), relief, 0.0)
        tol = params.threshold / z_unit_m + params.relief_factor * relief
        # Cells without neighbours cannot be judged: never flag them.
        self.upper = np.where(np.isfinite(n_max), n_max + tol, np.inf).ravel()
        self.lower = np.where(np.isfinite(n_min), n_min - tol, -np.inf).ravel()
        self.grid = grid

    def keep(self, idx: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (z <= self.upper[idx]) & (z >= self.lower[idx])
