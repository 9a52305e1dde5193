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

GTIFF_PROFILE = dict(
    driver="GTiff",
    tiled=True,
    blockxsize=256,
    blockysize=256,
    compress="deflate",
    predictor=3,
    zlevel=6,
    BIGTIFF="IF_SAFER",
)


def open_raster(path: str | os.PathLike):
    """Open a raster for reading, turning rasterio's errors into one-line input errors."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"not a readable raster ({str(exc).splitlines()[0]})", path) from None


def valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels that hold data: finite, and not equal to the declared nodata value.

    Values at or below float32-min are treated as nodata even when undeclared, because ASP
    DEMs sometimes lose their nodata tag in conversions while keeping the sentinel.
    """
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        mask = np.ones(data.shape, dtype=bool)
    else:
        mask = np.isfinite(data) & (data > FLOAT32_MIN * 0.999)
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        mask &= data != nodata
    return mask


def write_raster(
    path: str | os.PathLike,
    array: np.ndarray,
    transform: Affine,
    crs: CRS | str | None,
    nodata: float | None = None,
    description: str | None = None,
    dtype: str | None = None,
    overviews: bool = False,
) -> Path:
    """Write a single-band tiled, compressed GeoTIFF atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    dtype = dtype or str(array.dtype)
    profile = dict(GTIFF_PROFILE)
    if not np.issubdtype(np.dtype(dtype), np.floating):
        profile["predictor"] = 2
    height, width = array.shape
    if height < 256 or width < 256:
        profile.pop("blockxsize"), profile.pop("blockysize")
        profile["tiled"] = False
    profile.update(
        height=height, width=width, count=1, dtype=dtype, transform=transform,
        crs=CRS.from_user_input(crs) if crs else None, nodata=nodata,
    )
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array.astype(dtype, copy=False), 1)
            if description:
                dst.set_band_description(1, description)
            if overviews and min(height, width) >= 512:
                factors = [f for f in (2, 4, 8, 16, 32) if min(height, width) // f >= 128]
                dst.build_overviews(factors, rasterio.enums.Resampling.average)
                dst.update_tags(ns="rio_overview", resampling="average")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
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
