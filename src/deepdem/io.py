"""Small raster I/O helpers shared by every stage.

Outputs are written to a temporary name beside the target and renamed at the end, so a failed
run never leaves a partial file where a user (or a later stage) would take it for a result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from .errors import InputError

# ASP (and GDAL's float32 "no data" convention) writes the most negative float32 as nodata.
FLOAT32_MIN = float(np.finfo(np.float32).min)

#: ZSTD (level 9) + predictor: as small as DEFLATE level 6 on DSMs, images and NDVI, and decodes
#: 2-3x faster, which matters because refine decodes every band of the scene while the model runs.
#: Any GDAL since 2.3 built with zstd reads it (rasterio's wheels, conda, QGIS, Debian).
GTIFF_PROFILE = dict(
    driver="GTiff",
    tiled=True,
    blockxsize=256,
    blockysize=256,
    compress="zstd",
    predictor=3,
    zstd_level=9,
    BIGTIFF="IF_SAFER",
)


#: Creation options of every Cloud-Optimised GeoTIFF deepdem publishes (refined DSM, σ, products).
#: DEFLATE level 1 (libdeflate) + predictor: 3 % larger than level 6 on refined DSMs, half the time.
COG_OPTIONS = dict(COMPRESS="DEFLATE", LEVEL=1, PREDICTOR="YES", BLOCKSIZE=512, OVERVIEWS="AUTO",
                   RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS")


def gtiff_profile(**overrides) -> dict:
    """:data:`GTIFF_PROFILE` with ``overrides``; an override of None removes that creation option."""
    return {key: value for key, value in {**GTIFF_PROFILE, **overrides}.items() if value is not None}


def open_raster(path: str | os.PathLike):
    """Open a raster for reading, turning rasterio's errors into one-line input errors."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"not a readable raster ({str(exc).splitlines()[0]})", path) from None


def horizontal_crs(crs: CRS | None) -> CRS | None:
    """The 2D (horizontal) part of a CRS: compound and 3D CRSs (ASP writes WKT with
    ellipsoidal heights) are reduced to their horizontal component for warping, because the
    grid is horizontal and GDAL would otherwise try a vertical transformation too.
    """
    if crs is None:
        return None
    import pyproj

    proj = pyproj.CRS.from_user_input(crs.to_wkt() if isinstance(crs, CRS) else crs)
    if proj.is_compound:
        proj = proj.sub_crs_list[0]
    if len(proj.axis_info) == 3:
        proj = proj.to_2d()
    epsg = proj.to_epsg()
    return CRS.from_epsg(epsg) if epsg else CRS.from_wkt(proj.to_wkt())


def vertical_reference(crs: CRS | None) -> str | None:
    """Name of the vertical reference a CRS declares, or None when it declares none.

    A compound CRS names its vertical CRS (e.g. "NAVD88 height"); a 3D CRS has ellipsoidal
    heights ("ellipsoidal height (WGS 84)"); a 2D CRS says nothing about heights.
    """
    if crs is None:
        return None
    import pyproj

    proj = pyproj.CRS.from_user_input(crs.to_wkt() if isinstance(crs, CRS) else crs)
    if proj.is_compound:
        vertical = proj.sub_crs_list[1]
        unit = vertical.axis_info[0].unit_name if vertical.axis_info else "metre"
        return f"{vertical.name} [{unit}]"
    if len(proj.axis_info) == 3:
        datum = proj.geodetic_crs.datum.name if proj.geodetic_crs else "unknown datum"
        return f"ellipsoidal height ({datum})"
    return None


def valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels that hold data: finite, and not equal to the declared nodata value.

    Values at or below float32-min are treated as nodata even when undeclared, because ASP
    DEMs sometimes lose their nodata tag in conversions while keeping the sentinel.
    """
    return ~invalid_mask(data, nodata)


def invalid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """The complement of :func:`valid_mask`, in as few passes over ``data`` as it takes.

    ``not data > float32-min`` is one comparison that catches NaN, −inf and the ASP sentinel
    at once (refine runs this on every band of the scene while the model runs).
    """
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        invalid = np.zeros(data.shape, dtype=bool)
    else:
        invalid = np.logical_not(data > FLOAT32_MIN * 0.999)
        invalid |= data == np.inf
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        if not np.issubdtype(data.dtype, np.floating) or nodata > FLOAT32_MIN * 0.999:
            invalid |= data == nodata
    return invalid


def write_raster(
    path: str | os.PathLike,
    array: np.ndarray,
    transform: Affine,
    crs: CRS | str | None,
    nodata: float | None = None,
    description: str | None = None,
    dtype: str | None = None,
    predictor: int | None = None,
    overviews: bool = False,
    overview_resampling: str = "average",
) -> Path:
    """Write a single-band tiled, compressed GeoTIFF atomically (temp file, then rename).

    With ``overviews``, internal overviews are built (``overview_resampling``: "average" for
    continuous data, "nearest" for masks and classes) down to about 64 px, so QGIS and GDAL
    display even a small raster without reading it whole. ``predictor`` overrides the TIFF
    predictor (default: floating-point for floats, horizontal differencing for integers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    dtype = dtype or str(array.dtype)
    profile = gtiff_profile()
    if predictor is not None:
        profile["predictor"] = predictor
    elif not np.issubdtype(np.dtype(dtype), np.floating):
        profile["predictor"] = 2
    height, width = array.shape
    if height < 256 or width < 256:
        # GeoTIFF tiles must be multiples of 16: a small raster gets the largest power-of-two
        # tile below its size rather than strips, so every output has the same (tiled) layout.
        block = 16
        while block * 2 < min(height, width) and block < 128:
            block *= 2
        profile["blockxsize"] = profile["blockysize"] = block
    profile.update(
        height=height, width=width, count=1, dtype=dtype, transform=transform,
        crs=CRS.from_user_input(crs) if crs else None, nodata=nodata,
    )
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array.astype(dtype, copy=False), 1)
            if description:
                dst.set_band_description(1, description)
            factors = [f for f in (2, 4, 8, 16, 32, 64) if min(height, width) // f >= 64]
            if overviews and factors:
                dst.build_overviews(factors, rasterio.enums.Resampling[overview_resampling])
                dst.update_tags(ns="rio_overview", resampling=overview_resampling)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; it appears at ``path`` only when complete.

    An existing directory at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
    try:
        yield tmp
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
