"""Simple baselines a refined DEM must beat, computed from the initial DSM alone.

* ``idw_median``: holes filled by inverse-distance weighting (what ASP ``dem_mosaic`` does with
  its hole-filling options), then a median filter — the usual "clean up the stereo DSM" step;
* ``idw_gaussian``: the same fill, then a Gaussian filter (``dem_mosaic --dem-blur-sigma``);
* ``smrf_ground`` (DTM targets only): a morphological ground filter applied to the DSM, the
  SMRF of :mod:`deepdem.lidar.ground` run on the raster instead of on LIDAR points.

A deep model that does not beat these on the same pixels has learnt nothing a filter cannot do.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .lidar.ground import fill_nearest

BASELINE_DESCRIPTIONS = {
    "idw_median": "initial DSM, holes filled by inverse-distance weighting, 5×5 median filter",
    "idw_gaussian": "initial DSM, holes filled by inverse-distance weighting, Gaussian filter σ = 1.5 px",
    "smrf_ground": "SMRF morphological ground filter applied to the initial DSM (DTM baseline)",
}


def idw_fill(dem: np.ndarray, max_search_distance: float = 100.0, smoothing_iterations: int = 0) -> np.ndarray:
    """Fill NaN holes by inverse-distance weighting of the valid pixels around them.

    GDAL's FillNodata (through ``rasterio.fill.fillnodata``) is the IDW interpolation ASP's
    ``dem_mosaic`` hole filling also uses; holes farther than ``max_search_distance`` px from
    any valid pixel stay NaN.
    """
    from rasterio.fill import fillnodata

    dem = np.asarray(dem, dtype=np.float64)
    valid = np.isfinite(dem)
    if valid.all() or not valid.any():
        return dem.copy()
    filled = fillnodata(np.where(valid, dem, np.nan).astype(np.float32), mask=valid.astype(np.uint8),
                        max_search_distance=max_search_distance, smoothing_iterations=smoothing_iterations)
    return filled.astype(np.float64)


def _filtered(dem: np.ndarray, apply) -> np.ndarray:
    """Run a filter that cannot take NaN: nearest-fill, filter, put the NaNs back."""
    valid = np.isfinite(dem)
    if not valid.any():
        return dem.copy()
    out = apply(fill_nearest(dem) if not valid.all() else dem)
    return np.where(valid, out, np.nan)


def median_baseline(dem: np.ndarray, size: int = 5, max_search_distance: float = 100.0) -> np.ndarray:
    """IDW hole fill, then a ``size``×``size`` median filter (removes blunders and speckle)."""
    return _filtered(idw_fill(dem, max_search_distance), lambda a: ndimage.median_filter(a, size=size, mode="nearest"))


def gaussian_baseline(dem: np.ndarray, sigma: float = 1.5, max_search_distance: float = 100.0) -> np.ndarray:
    """IDW hole fill, then a Gaussian filter of ``sigma`` px (smooths noise, blurs edges)."""
    return _filtered(idw_fill(dem, max_search_distance), lambda a: ndimage.gaussian_filter(a, sigma=sigma, mode="nearest"))


def ground_filter_baseline(dem: np.ndarray, transform, crs=None, slope: float = 0.15, window: float = 18.0) -> np.ndarray:
    """A DTM from a DSM: SMRF's object mask on the (IDW-filled) DSM, the remaining ground
    interpolated by TIN (``deepdem.lidar.ground.smrf_surface``, reused on a raster grid whose
    cells each hold one height instead of a per-cell LIDAR minimum).

    ``slope`` (m/m) and ``window`` (m) are PDAL's filters.smrf defaults; the transform must be
    north-up with square pixels in metres.
    """
    from .grid import Grid
    from .lidar.ground import SMRFParams, smrf_surface

    filled = idw_fill(dem)
    grid = Grid(crs, transform, *dem.shape)
    surface = smrf_surface(filled, grid, SMRFParams(cell=grid.res, slope=slope, window=window))
    return np.where(np.isfinite(filled), surface, np.nan)


def compute_baselines(initial: np.ndarray, transform, crs=None, target: str = "dsm") -> dict[str, np.ndarray]:
    """Every baseline for ``target`` ("dsm" or "dtm"), keyed as in :data:`BASELINE_DESCRIPTIONS`."""
    out = {"idw_median": median_baseline(initial), "idw_gaussian": gaussian_baseline(initial)}
    if target == "dtm":
        out["smrf_ground"] = ground_filter_baseline(initial, transform, crs)
    return out
