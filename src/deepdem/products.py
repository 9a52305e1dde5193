"""Derived products of a DEM: hillshade, slope and canopy height (numpy; there is no gdaldem here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def horn_gradients(dem: np.ndarray, resolution: float | tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """dz/dx (east) and dz/dy (north) by Horn's (1981) 3×3 weighted differences, as gdaldem.

    At the edges the DEM is extended linearly (odd reflection), so a plane keeps its slope up to
    the last pixel (gdaldem's ``-compute_edges`` extrapolates too); a NaN reaches the eight
    neighbours it is a weight of.
    """
    from scipy import ndimage

    res_x, res_y = (resolution, resolution) if np.isscalar(resolution) else resolution
    dem = np.asarray(dem, dtype=np.float64)
    padded = np.pad(dem, 1, mode="reflect", reflect_type="odd") if min(dem.shape) > 1 else np.pad(dem, 1, mode="edge")
    east = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / (8.0 * res_x)
    north = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / (8.0 * res_y)  # row 0 is north
    inner = (slice(1, -1), slice(1, -1))
    return ndimage.correlate(padded, east)[inner], ndimage.correlate(padded, north)[inner]


def slope_degrees(dem: np.ndarray, resolution: float | tuple[float, float]) -> np.ndarray:
    """Slope in degrees by Horn's method (see :func:`horn_gradients`); NaN where the DEM or a
    neighbour is NaN."""
    dzdx, dzdy = horn_gradients(dem, resolution)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy)))


def hillshade(
    dem: np.ndarray,
    resolution: float | tuple[float, float],
    azimuth: float = 315.0,
    altitude: float = 45.0,
    z_factor: float = 1.0,
) -> np.ndarray:
    """Hillshade in [0, 1] with gdaldem's conventions (Horn's gradients, azimuth clockwise from
    north, light from the north-west by default); NaN where the DEM has no data."""
    dzdx, dzdy = horn_gradients(np.asarray(dem, dtype=np.float64) * z_factor, resolution)
    az, alt = np.radians(azimuth), np.radians(altitude)
    light = np.array([np.sin(az) * np.cos(alt), np.cos(az) * np.cos(alt), np.sin(alt)])
    norm = np.sqrt(dzdx**2 + dzdy**2 + 1.0)
    shade = (-dzdx * light[0] - dzdy * light[1] + light[2]) / norm
    return np.clip(shade, 0.0, 1.0)


def multidirectional_hillshade(dem: np.ndarray, resolution, altitude: float = 45.0) -> np.ndarray:
    """Mean of hillshades lit from 225°, 270°, 315° and 360° (reveals relief in every direction)."""
    return np.mean([hillshade(dem, resolution, az, altitude) for az in (225.0, 270.0, 315.0, 360.0)], axis=0)


# -- streaming raster products -------------------------------------------------------------------
# xdem computes these on whole in-memory DEMs; refined scenes are larger than memory, so the
# products are computed window by window with a 1-px halo (exactly the whole-array result:
# Horn's 3×3 differences need one neighbour, and the scene's edges repeat their last row).

PRODUCT_BLOCK = 2048


def _read_valid(src, band: int, window) -> np.ndarray:
    data = src.read(band, window=window).astype(np.float64)
    nodata = src.nodatavals[band - 1]
    if nodata is not None:
        data[data == nodata] = np.nan
    return data


def _stream_product(sources, out, compute, dtype: str, nodata, description: str, halo: int,
                    resampling: str, predictor: str = "YES"):
    """Apply ``compute(arrays, resolution) -> array`` window by window; write a COG at ``out``."""
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    from .io import COG_OPTIONS, atomic_path, gtiff_profile, open_raster

    out = Path(out)
    handles = []
    try:
        for path, _ in sources:
            handles.append(open_raster(path))
    except Exception:
        for handle in handles:
            handle.close()
        raise
    try:
        ref = handles[0]
        height, width = ref.height, ref.width
        resolution = (abs(ref.transform.a), abs(ref.transform.e))
        work = out.with_name(f".{out.name}.work.tif")
        # The work file is read once into the COG: zstd's fastest level, and no predictor, as the
        # base's floating-point one does not apply to the byte hillshade.
        profile = dict(gtiff_profile(zstd_level=1, predictor=None), height=height, width=width, count=1,
                       dtype=dtype, crs=ref.crs, transform=ref.transform, nodata=nodata)
        try:
            with rasterio.open(work, "w", **profile) as dst:
                dst.set_band_description(1, description)
                for r in range(0, height, PRODUCT_BLOCK):
                    for c in range(0, width, PRODUCT_BLOCK):
                        r0, c0 = max(r - halo, 0), max(c - halo, 0)
                        r1, c1 = min(r + PRODUCT_BLOCK + halo, height), min(c + PRODUCT_BLOCK + halo, width)
                        window = Window(c0, r0, c1 - c0, r1 - r0)
                        arrays = [_read_valid(h, band, window) for h, (_, band) in zip(handles, sources)]
                        result = compute(arrays, resolution)
                        inner = result[r - r0 : r - r0 + min(PRODUCT_BLOCK, height - r),
                                       c - c0 : c - c0 + min(PRODUCT_BLOCK, width - c)]
                        dst.write(inner.astype(dtype), 1, window=Window(c, r, inner.shape[1], inner.shape[0]))
            with atomic_path(out) as tmp:
                rasterio.shutil.copy(work, tmp, driver="COG", **{**COG_OPTIONS, "RESAMPLING": resampling,
                                                                   "PREDICTOR": predictor})
        finally:
            work.unlink(missing_ok=True)
    finally:
        for h in handles:
            h.close()
    return out


def _to_byte(shade: np.ndarray) -> np.ndarray:
    """gdaldem's byte encoding: 1…255 for shade, 0 for nodata."""
    return np.where(np.isfinite(shade), 1 + np.round(np.nan_to_num(shade) * 254), 0).astype(np.uint8)


def hillshade_raster(dem, out, multidirectional: bool = False, azimuth: float = 315.0,
                     altitude: float = 45.0, z_factor: float = 1.0, band: int = 1):
    """Hillshade of a DEM GeoTIFF as a byte COG (1…255, 0 = nodata), computed window by window."""
    def compute(arrays, resolution):
        dem_ = arrays[0] * z_factor
        shade = (multidirectional_hillshade(dem_, resolution, altitude) if multidirectional
                 else hillshade(dem_, resolution, azimuth, altitude))
        return _to_byte(shade)

    kind = "multidirectional hillshade" if multidirectional else f"hillshade (azimuth {azimuth:g}°, altitude {altitude:g}°)"
    return _stream_product([(dem, band)], out, compute, "uint8", 0, kind, 1, "AVERAGE", predictor="NO")


def slope_raster(dem, out, band: int = 1):
    """Slope in degrees of a DEM GeoTIFF as a float32 COG (nodata −9999)."""
    def compute(arrays, resolution):
        result = slope_degrees(arrays[0], resolution)
        return np.where(np.isfinite(result), result, -9999.0)

    return _stream_product([(dem, band)], out, compute, "float32", -9999.0, "slope (degrees)", 1, "AVERAGE")


def canopy_height_raster(dsm, dtm, out, dsm_band: int = 1, dtm_band: int = 1):
    """Canopy height model CHM = DSM − DTM (metres, float32 COG, nodata −9999).

    ``dsm`` and ``dtm`` are two GeoTIFFs on the same grid (two models), or the same two-band
    file of a model with DSM and DTM heads.
    """
    import rasterio

    with rasterio.open(dsm) as a, rasterio.open(dtm) as b:
        if (a.shape, a.transform, a.crs) != (b.shape, b.transform, b.crs):
            from .errors import GridError

            raise GridError(f"DSM and DTM are not on the same grid ({a.shape} vs {b.shape})", dtm)

    def compute(arrays, resolution):
        chm = arrays[0] - arrays[1]
        return np.where(np.isfinite(chm), chm, -9999.0)

    return _stream_product([(dsm, dsm_band), (dtm, dtm_band)], out, compute, "float32", -9999.0,
                           "canopy height DSM - DTM (m)", 0, "AVERAGE")
