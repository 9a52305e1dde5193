"""Reading rasters and aligning them onto a grid: what every stage that takes a user's raster needs.

Nodata (the declared value, NaN, and ASP's float32-min sentinel) becomes NaN; CRSs are reduced
to their horizontal part; a source is resampled onto a grid with the resampling its band kind
wants (nearest for masks, average for much finer sources).
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.transform import from_origin
from rasterio.warp import Resampling, reproject, transform_bounds

from .errors import GridError, InputError
from .io import horizontal_crs, open_raster, valid_mask
from .scene import BANDS, Grid

log = logging.getLogger(__name__)

CONTINUOUS_UPSAMPLING = ("bilinear", "cubic")


def ndvi_from_bands(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """(NIR − red) / (NIR + red) as float32; NaN where either is NaN or the sum is not positive."""
    nir = np.asarray(nir, dtype=np.float32)
    red = np.asarray(red, dtype=np.float32)
    total = nir + red
    with np.errstate(invalid="ignore", divide="ignore"):
        ndvi = (nir - red) / total
    return np.where(np.isfinite(ndvi) & (total > 0), ndvi, np.nan).astype(np.float32)


def _check_crs(src, path) -> CRS:
    if src.crs is None:
        raise InputError("raster has no CRS", path)
    try:
        return horizontal_crs(src.crs)
    except Exception as exc:  # pyproj cannot parse it: the file's georeferencing is unusable
        raise InputError(f"unusable CRS ({exc})", path) from None


def target_grid(dsm: str | os.PathLike, crs: str | CRS | None = None, resolution: float | None = None) -> Grid:
    """The Scene's grid: the DSM's own, or its footprint in ``crs`` at ``resolution``.

    A new grid has its pixel edges on multiples of the resolution. Geographic CRSs are refused:
    heights are metres and slopes, chips and scale factors need metric pixels.
    """
    with open_raster(dsm) as src:
        if src.count != 1:
            raise InputError(f"DSM has {src.count} bands; expected 1", dsm)
        src_crs = _check_crs(src, dsm)
        try:
            dst_crs = CRS.from_user_input(crs) if crs else src_crs
        except CRSError as exc:
            raise InputError(f"--crs {crs!r} is not a CRS ({exc})", dsm) from None
        if dst_crs.is_geographic:
            raise InputError(f"DSM grid would be in a geographic CRS ({dst_crs.to_string()}, degrees): "
                             "pass --crs with a metric CRS (e.g. the UTM zone)", dsm)
        if crs is None and resolution is None:
            return Grid(src_crs, src.transform, src.height, src.width)
        left, bottom, right, top = transform_bounds(src_crs, dst_crs, *src.bounds)
        if resolution is None:
            # keep about the DSM's pixel count along x
            resolution = (right - left) / src.width
        if resolution <= 0:
            raise InputError(f"--resolution must be positive (got {resolution})", dsm)
        left = math.floor(left / resolution) * resolution
        top = math.ceil(top / resolution) * resolution
        width = max(1, math.ceil((right - left) / resolution - 1e-9))
        height = max(1, math.ceil((top - bottom) / resolution - 1e-9))
        return Grid(dst_crs, from_origin(left, top, resolution, resolution), height, width)


def resampling_for(band: str, source_resolution: tuple[float, float], grid: Grid, upsampling: str = "bilinear") -> Resampling:
    """Resampling for one band: nearest for masks; average when the source is ≥ 1.5× finer
    than the grid (anti-aliasing); ``upsampling`` (bilinear or cubic) otherwise."""
    if BANDS[band].kind == "mask":
        return Resampling.nearest
    ratio = min(grid.resolution) / max(min(source_resolution), 1e-12)
    if ratio >= 1.5:
        return Resampling.average
    return Resampling[upsampling if upsampling in CONTINUOUS_UPSAMPLING else BANDS[band].resampling]


def _source_resolution_in(meta: dict, grid: Grid) -> tuple[float, float]:
    """A source's pixel size expressed in the grid's CRS units."""
    if meta["crs"] == grid.crs:
        return meta["res"]
    left, bottom, right, top = transform_bounds(meta["crs"], grid.crs, *meta["bounds"])
    return ((right - left) / meta["width"], (top - bottom) / meta["height"])


def read_source(path: str | os.PathLike, band: str, indexes: list[int] | None = None,
                reduce: str | None = None) -> tuple[np.ndarray, object]:
    """Read band(s) of a raster as float32 with NaN for nodata (internal helper).

    ``reduce``: None (one band required), "mean" (mean of the bands: grayscale of an RGB
    image) or "ndvi" (``indexes`` = [nir, red]).
    """
    with open_raster(path) as src:
        crs = _check_crs(src, path)
        if indexes is None:
            if src.count != 1 and reduce is None:
                raise InputError(f"{band.replace('_', ' ')} has {src.count} bands; expected 1", path)
            indexes = list(range(1, src.count + 1))
        bad = [i for i in indexes if not 1 <= i <= src.count]
        if bad:
            raise InputError(f"band index {bad[0]} out of range (the raster has {src.count} bands)", path)
        try:
            raw = src.read(indexes)
        except RasterioError as exc:  # a truncated or corrupt file opens but fails to decode
            raise InputError(f"cannot read the raster's pixels ({str(exc).splitlines()[0]}): truncated or corrupt file?",
                             path) from None
        stack = raw.astype(np.float32)
        for i, index in enumerate(indexes):
            nodata = src.nodatavals[index - 1]
            stack[i][~valid_mask(raw[i], nodata)] = np.nan
        if reduce == "ndvi":
            data = ndvi_from_bands(nir=stack[0], red=stack[1])
        elif len(indexes) > 1:
            # grayscale of a multiband image: a pixel with one band missing is missing
            data = stack.mean(axis=0)
        else:
            data = stack[0]
        meta = dict(crs=crs, transform=src.transform, bounds=src.bounds, res=src.res,
                    width=src.width, height=src.height)
    return data, meta


def align_to_grid(path: str | os.PathLike, grid: Grid, band: str, indexes: list[int] | None = None,
                  reduce: str | None = None, upsampling: str = "bilinear") -> np.ndarray:
    """Reproject one input onto ``grid`` (NaN where it has no data or does not cover)."""
    data, meta = read_source(path, band, indexes, reduce)
    left, bottom, right, top = transform_bounds(meta["crs"], grid.crs, *meta["bounds"])
    g_left, g_bottom, g_right, g_top = grid.bounds
    if left >= g_right or right <= g_left or bottom >= g_top or top <= g_bottom:
        raise GridError(f"does not overlap the DSM (bounds {tuple(round(v, 3) for v in meta['bounds'])} "
                        f"in {meta['crs'].to_string()})", path)
    if not np.isfinite(data).any():
        raise InputError(f"{band.replace('_', ' ')} has no valid pixel (every value is nodata)", path)
    resampling = resampling_for(band, _source_resolution_in(meta, grid), grid, upsampling)
    destination = np.full(grid.shape, np.nan, dtype=np.float32)
    reproject(
        data, destination,
        src_transform=meta["transform"], src_crs=meta["crs"], src_nodata=np.nan,
        dst_transform=grid.transform, dst_crs=grid.crs, dst_nodata=np.nan,
        resampling=resampling,
    )
    if not np.isfinite(destination).any():
        raise InputError(f"{band.replace('_', ' ')} has no valid pixel over the DSM", path)
    log.info("aligned %s from %s (%s)", band, path, resampling.name)
    return destination


def read_grid(path: str | os.PathLike) -> tuple[Grid, np.ndarray]:
    """Read a single-band raster's grid and its data as float32 with NaN for nodata."""
    grid = target_grid(path)
    data, _ = read_source(path, "dsm")
    return grid, data
