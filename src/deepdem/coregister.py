"""Co-registration of an initial DSM to a reference (LIDAR truth) on stable ground.

The horizontal and vertical shift is estimated with xdem's Nuth & Kääb (2011) followed by a
vertical shift (median of the residual on stable ground), on pixels that should not have
changed between the two surveys and where both surfaces are well defined: low NDVI (no
vegetation that grew or moved), outside water (negative NDVI), and a slope below a threshold
(steep walls and cliffs are where sub-pixel interpolation errors dominate).

Nuth & Kääb works in the DEM's georeferenced units and relates the elevation difference to
``tan(slope)``: it needs a CRS whose horizontal unit is the vertical unit (metres). A DEM in
geographic degrees (e.g. Copernicus GLO-30 tiles) must be reprojected to a metric CRS first,
otherwise slopes are meaningless and shifts come out in degrees; :func:`coregister_dems` does
that (local UTM zone by default).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject

from .errors import InputError
from .products import slope_degrees

log = logging.getLogger(__name__)


def nmad(values: np.ndarray) -> float:
    """Normalised median absolute deviation of the finite values (NaN if there is none)."""
    from geoutils.stats import nmad as geoutils_nmad  # xdem's NMAD, with NaNs ignored

    values = np.asarray(values, dtype=np.float64)
    return float(geoutils_nmad(values)) if np.isfinite(values).any() else float("nan")


@dataclass
class CoregResult:
    """Shifts that move the DEM onto the reference (add them to the DEM's coordinates/heights)."""

    shift_x: float  # m, georeferenced (east)
    shift_y: float  # m, georeferenced (north)
    shift_z: float  # m
    shift_x_px: float
    shift_y_px: float
    nmad_before: float  # NMAD of reference − DEM on stable ground (m)
    nmad_after: float
    median_before: float
    median_after: float
    stable_pixels: int
    method: str = "xdem NuthKaab + VerticalShift"

    def to_json(self) -> dict:
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        return (f"shift x {self.shift_x:+.3f} m ({self.shift_x_px:+.3f} px), y {self.shift_y:+.3f} m "
                f"({self.shift_y_px:+.3f} px), z {self.shift_z:+.3f} m; NMAD on stable ground "
                f"{self.nmad_before:.3f} -> {self.nmad_after:.3f} m over {self.stable_pixels} px")


def stable_ground(
    reference: np.ndarray,
    resolution: tuple[float, float],
    ndvi: np.ndarray | None = None,
    max_ndvi: float = 0.3,
    min_ndvi: float = 0.0,
    max_slope: float = 40.0,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels used for co-registration: low NDVI, not water (NDVI < ``min_ndvi``), low slope.

    Where NDVI is unknown (NaN) the pixel is kept on the slope criterion alone.
    """
    mask = np.isfinite(reference)
    with np.errstate(invalid="ignore"):
        mask &= slope_degrees(reference, resolution) <= max_slope
        if ndvi is not None:
            known = np.isfinite(ndvi)
            mask &= ~known | ((ndvi <= max_ndvi) & (ndvi >= min_ndvi))
    if exclude is not None:
        mask &= ~exclude
    return mask


def shift_on_grid(
    array: np.ndarray, transform: Affine, crs: CRS, dx: float, dy: float, resampling: str = "bilinear"
) -> np.ndarray:
    """Translate a raster by (dx, dy) georeferenced units and resample it back onto its grid."""
    out = np.full(array.shape, np.nan, dtype=np.float32)
    reproject(
        array.astype(np.float32), out,
        src_transform=Affine.translation(dx, dy) @ transform, src_crs=crs, src_nodata=np.nan,
        dst_transform=transform, dst_crs=crs, dst_nodata=np.nan, resampling=Resampling[resampling],
    )
    return out


def coregister_arrays(
    reference: np.ndarray,
    dem: np.ndarray,
    transform: Affine,
    crs: CRS,
    stable: np.ndarray | None = None,
    subsample: int = 500_000,
    random_state: int = 0,
) -> CoregResult:
    """Estimate the shift of ``dem`` onto ``reference`` (same grid, metric CRS, NaN = nodata)."""
    import xdem

    if crs is not None and crs.is_geographic:
        raise InputError("co-registration needs a metric CRS (Nuth & Kääb relates dh to the slope in "
                         "metres per metre); reproject the DEMs first", None)
    valid = np.isfinite(reference) & np.isfinite(dem)
    stable = valid if stable is None else (stable & valid)
    n_stable = int(stable.sum())
    if n_stable < 100:
        raise InputError(f"only {n_stable} stable-ground pixels valid in both DEMs: too few to co-register")
    pipeline = xdem.coreg.NuthKaab(subsample=subsample) + xdem.coreg.VerticalShift(subsample=subsample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xdem warns about subsampling and nodata conventions
        pipeline.fit(reference.astype(np.float32), dem.astype(np.float32), inlier_mask=stable,
                     transform=transform, crs=crs, random_state=random_state)
    matrix = pipeline.to_matrix()
    dx, dy, dz = float(matrix[0, 3]), float(matrix[1, 3]), float(matrix[2, 3])
    before = (reference - dem)[stable]
    aligned = shift_on_grid(dem, transform, crs, dx, dy) + dz
    after = (reference - aligned)[stable & np.isfinite(aligned)]
    result = CoregResult(
        shift_x=dx, shift_y=dy, shift_z=dz,
        shift_x_px=dx / abs(transform.a), shift_y_px=dy / abs(transform.e),
        nmad_before=nmad(before), nmad_after=nmad(after),
        median_before=float(np.nanmedian(before)), median_after=float(np.nanmedian(after)),
        stable_pixels=n_stable,
    )
    log.info("co-registration: %s", result.summary())
    return result


def apply_shift(array: np.ndarray, transform: Affine, crs: CRS, result: CoregResult,
                heights: bool = False, resampling: str = "bilinear") -> np.ndarray:
    """Apply a co-registration result to a band on the DSM's grid (``heights`` adds shift_z)."""
    shifted = shift_on_grid(array, transform, crs, result.shift_x, result.shift_y, resampling)
    return shifted + np.float32(result.shift_z) if heights else shifted


def utm_crs_for(bounds_lonlat: tuple[float, float, float, float]) -> CRS:
    """The WGS 84 UTM zone of the centre of a lon/lat box."""
    lon = (bounds_lonlat[0] + bounds_lonlat[2]) / 2
    lat = (bounds_lonlat[1] + bounds_lonlat[3]) / 2
    zone = int((lon + 180) // 6) + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def reproject_dem(path: str | os.PathLike, crs: CRS | str | None = None, resolution: float | None = None,
                  like: tuple[Affine, CRS, tuple[int, int]] | None = None, nodata: float | None = None,
                  ) -> tuple[np.ndarray, Affine, CRS]:
    """Read a DEM (NaN nodata) onto a metric grid: ``like`` (transform, crs, shape), or ``crs``
    (default: the UTM zone of its centre) at ``resolution`` (default: about its own pixel size).
    ``nodata`` is an extra value to treat as no data (besides the file's own)."""
    from rasterio.warp import calculate_default_transform, transform_bounds

    from .io import horizontal_crs, open_raster, valid_mask

    with open_raster(path) as src:
        if src.crs is None:
            raise InputError("raster has no CRS", path)
        src_crs = horizontal_crs(src.crs)
        raw = src.read(1)
        data = raw.astype(np.float32)
        data[~valid_mask(raw, src.nodata)] = np.nan
        if nodata is not None:
            data[raw == nodata] = np.nan
        if like is not None:
            transform, dst_crs, shape = like
        else:
            if crs is None:
                crs = utm_crs_for(transform_bounds(src_crs, "EPSG:4326", *src.bounds)) if src_crs.is_geographic else src_crs
            dst_crs = CRS.from_user_input(crs)
            transform, width, height = calculate_default_transform(
                src_crs, dst_crs, src.width, src.height, *src.bounds, resolution=resolution)
            shape = (height, width)
        out = np.full(shape, np.nan, dtype=np.float32)
        reproject(data, out, src_transform=src.transform, src_crs=src_crs, src_nodata=np.nan,
                  dst_transform=transform, dst_crs=dst_crs, dst_nodata=np.nan, resampling=Resampling.bilinear)
    return out, transform, dst_crs


def coregister_dems(
    reference: str | os.PathLike,
    dem: str | os.PathLike,
    crs: CRS | str | None = None,
    resolution: float | None = None,
    max_slope: float = 40.0,
    dem_nodata: float | None = None,
) -> CoregResult:
    """Co-register a DEM file to a reference file, both read onto one metric grid.

    The reference defines the grid, reprojected to ``crs`` (default: its UTM zone when it is in
    degrees, see the module docstring for why) at ``resolution``. ``dem_nodata``: an extra
    value of ``dem`` to ignore.
    """
    ref, transform, dst_crs = reproject_dem(reference, crs, resolution)
    tba, _, _ = reproject_dem(dem, like=(transform, dst_crs, ref.shape), nodata=dem_nodata)
    stable = stable_ground(ref, (abs(transform.a), abs(transform.e)), max_slope=max_slope)
    return coregister_arrays(ref, tba, transform, dst_crs, stable)
