"""Build a Scene from input rasters: common grid, nodata honoured, equalised images, statistics.

Every input is aligned onto the DSM's grid with rasterio's warp, resampled according to its
band kind (bilinear for continuous bands), with its own nodata honoured and areas it does not
cover left as nodata (never 0). The nodata mask is "valid in every input".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject, transform_bounds
from skimage import exposure

from .errors import GridError, InputError
from .io import open_raster, valid_mask
from .scene import BANDS, Grid, Scene, write_scene

log = logging.getLogger(__name__)


def read_grid(path: str | os.PathLike) -> tuple[Grid, np.ndarray]:
    """Read a single-band raster's grid and its data as float32 with NaN for nodata."""
    with open_raster(path) as src:
        if src.crs is None:
            raise InputError("raster has no CRS", path)
        data = src.read(1).astype(np.float32)
        valid = valid_mask(src.read(1), src.nodata)
        data[~valid] = np.nan
        return Grid(src.crs, src.transform, src.height, src.width), data


def align_to_grid(path: str | os.PathLike, grid: Grid, band: str) -> np.ndarray:
    """Reproject one input onto ``grid`` (NaN where it has no data or does not cover)."""
    resampling = Resampling[BANDS[band].resampling]
    with open_raster(path) as src:
        if src.crs is None:
            raise InputError("raster has no CRS", path)
        left, bottom, right, top = transform_bounds(src.crs, grid.crs, *src.bounds)
        g_left, g_bottom, g_right, g_top = grid.bounds
        if left >= g_right or right <= g_left or bottom >= g_top or top <= g_bottom:
            raise GridError(f"does not overlap the DSM (bounds {src.bounds} in {src.crs.to_string()})", path)
        raw = src.read(1)
        source = raw.astype(np.float32)
        source[~valid_mask(raw, src.nodata)] = np.nan
        destination = np.full(grid.shape, np.nan, dtype=np.float32)
        reproject(
            source, destination,
            src_transform=src.transform, src_crs=src.crs, src_nodata=np.nan,
            dst_transform=grid.transform, dst_crs=grid.crs, dst_nodata=np.nan,
            resampling=resampling,
        )
    if not np.isfinite(destination).any():
        raise InputError("has no valid pixel over the DSM", path)
    return destination


def equalize_image(image: np.ndarray, kernel_size: int | None = None, clip_limit: float = 0.01) -> np.ndarray:
    """Adaptive histogram equalisation (CLAHE) on valid pixels; returns [0, 1] with NaN kept.

    The image is stretched to [0, 1] between its 0.1 and 99.9 percentiles of valid pixels first,
    because skimage's CLAHE expects that range and a single bright outlier would otherwise
    compress the whole histogram. Invalid pixels get the median during CLAHE so that they do
    not distort the tile histograms, and are set back to NaN after.
    """
    valid = np.isfinite(image)
    if not valid.any():
        return image
    lo, hi = np.percentile(image[valid], [0.1, 99.9])
    stretched = np.clip((image - lo) / max(hi - lo, 1e-9), 0, 1)
    stretched[~valid] = np.median(stretched[valid])
    equalised = exposure.equalize_adapthist(stretched, kernel_size=kernel_size, clip_limit=clip_limit)
    return np.where(valid, equalised, np.nan).astype(np.float32)


def prepare_scene(
    dsm: str | os.PathLike,
    ortho_left: str | os.PathLike,
    ortho_right: str | os.PathLike,
    triangulation_error: str | os.PathLike,
    out: str | os.PathLike,
    ndvi: str | os.PathLike | None = None,
    truth: str | os.PathLike | None = None,
    truth_dtm: str | os.PathLike | None = None,
    clahe_kernel: int | None = None,
    clahe_clip: float = 0.01,
) -> Scene:
    """Align the inputs onto the DSM's grid and write a Scene directory at ``out``.

    Nothing is written at ``out`` unless every input is usable.
    """
    grid, dsm_data = read_grid(dsm)
    if not np.isfinite(dsm_data).any():
        raise InputError("DSM has no valid pixel (every value is nodata)", dsm)
    inputs = {"dsm": dsm, "ortho_left": ortho_left, "ortho_right": ortho_right,
              "triangulation_error": triangulation_error, "ndvi": ndvi,
              "truth_dsm": truth, "truth_dtm": truth_dtm}
    inputs = {band: Path(path) for band, path in inputs.items() if path is not None}
    for band, path in inputs.items():
        if not path.exists():
            raise InputError(f"{band.replace('_', ' ')} file not found", path)

    bands: dict[str, np.ndarray] = {"dsm": dsm_data}
    for band, path in inputs.items():
        if band == "dsm":
            continue
        log.info("aligning %s (%s)", band, path)
        bands[band] = align_to_grid(path, grid, band)
    if "ndvi" in bands:
        ndvi_values = bands["ndvi"]
        bands["ndvi"] = np.where(np.abs(ndvi_values) <= 1.0, ndvi_values, np.nan)
    for band in ("ortho_left", "ortho_right"):
        bands[band] = equalize_image(bands[band], clahe_kernel, clahe_clip)

    mask = np.ones(grid.shape, dtype=bool)
    for band in ("dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi"):
        if band in bands:
            mask &= np.isfinite(bands[band])
    if not mask.any():
        raise InputError("no pixel is valid in every input band (check the inputs' nodata and extents)", dsm)
    bands["nodata_mask"] = mask.astype(np.uint8)

    provenance = {
        "inputs": {band: str(path.resolve()) for band, path in inputs.items()},
        "clahe": {"kernel_size": clahe_kernel, "clip_limit": clahe_clip},
    }
    return write_scene(out, grid, bands, provenance)


def prepare_from_asp_dir(directory: str | os.PathLike, out: str | os.PathLike, with_truth: bool = True) -> Scene:
    """Prepare a scene from a directory written by ``deepdem synth`` (ASP file names)."""
    from .synth import ASP_FILES

    directory = Path(directory)
    files = {band: directory / name for band, name in ASP_FILES.items()}
    return prepare_scene(
        dsm=files["dsm"], ortho_left=files["ortho_left"], ortho_right=files["ortho_right"],
        triangulation_error=files["triangulation_error"], ndvi=files["ndvi"], out=out,
        truth=files["truth_dsm"] if with_truth else None,
        truth_dtm=files["truth_dtm"] if with_truth else None,
    )
