"""NDVI for a Scene: from any red/NIR raster, or from NASA's Harmonized Landsat Sentinel-2 (HLS);
and the stereo images' views from their metadata (:func:`read_view`).

HLS (https://lpdaac.usgs.gov/products/hlsl30v002/, .../hlss30v002/) gives 30 m surface
reflectance from Landsat 8/9 (HLSL30) and Sentinel-2 (HLSS30) on the MGRS tiles, as one
Cloud-Optimised GeoTIFF per band. :func:`hls_ndvi` searches NASA's CMR-STAC with pystac-client
over the scene's footprint and a date window, reads only the needed blocks of red, NIR and
Fmask through GDAL, warped onto the scene's grid, and returns the per-pixel median NDVI of the
clear observations.

Bands: red is B04 for both sensors; NIR is **B05 for L30 but B8A for S30** — Sentinel-2's
B05 is a red-edge band (705 nm), and NDVI computed with it (as DeepDEM did for S30) is biased
low over vegetation. Reflectances are stored as int16 × 0.0001 (nodata −9999). Fmask bits
masked: 1 cloud, 2 adjacent to cloud/shadow, 3 cloud shadow, 4 snow/ice, 5 water (bit 0 is
cirrus, reserved in v2.0; bits 6–7 the aerosol level, kept).

Credentials: NASA Earthdata login from ``~/.netrc`` (machine urs.earthdata.nasa.gov), or a
bearer token in ``$EARTHDATA_TOKEN``. They are handed to GDAL, never logged.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ElementTree
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds

from .align import align_to_grid, ndvi_from_bands, read_source  # noqa: F401 (ndvi_from_bands: public here)
from .errors import InputError
from .scene import Grid

log = logging.getLogger(__name__)

CMR_STAC_URL = "https://cmr.earthdata.nasa.gov/stac/LPCLOUD"
HLS_COLLECTIONS = ("HLSL30_2.0", "HLSS30_2.0")
# Asset keys of red and NIR per sensor (see the module docstring for B8A vs B05).
HLS_BANDS = {"L30": {"red": "B04", "nir": "B05"}, "S30": {"red": "B04", "nir": "B8A"}}
HLS_SCALE = 0.0001
HLS_NODATA = -9999
FMASK_ASSET = "Fmask"
FMASK_NODATA = 255
FMASK_BITS = {"cloud": 1, "adjacent_cloud_shadow": 2, "cloud_shadow": 3, "snow_ice": 4, "water": 5}
FMASK_REJECT = sum(1 << bit for bit in FMASK_BITS.values())
TOKEN_ENV = "EARTHDATA_TOKEN"


def ndvi_from_raster(path: str | os.PathLike, nir_band: int, red_band: int, grid: Grid | None = None) -> tuple[np.ndarray, Grid]:
    """NDVI from a multiband raster with 1-based band indices (IGN IRC orthophoto: nir 1, red 2).

    Computed at the raster's resolution, then (with ``grid``) averaged/resampled onto ``grid``.
    """
    if grid is None:
        data, meta = read_source(path, "ndvi", [nir_band, red_band], reduce="ndvi")
        return data, Grid(meta["crs"], meta["transform"], meta["height"], meta["width"])
    return align_to_grid(path, grid, "ndvi", [nir_band, red_band], reduce="ndvi"), grid


def fmask_clear(fmask: np.ndarray) -> np.ndarray:
    """True where an HLS Fmask value is valid and flags no cloud, shadow, adjacency, snow or water."""
    fmask = np.asarray(fmask)
    return (fmask != FMASK_NODATA) & ((fmask.astype(np.uint16) & FMASK_REJECT) == 0)


def grid_footprint_lonlat(grid: Grid) -> tuple[float, float, float, float]:
    """The grid's bounds as (west, south, east, north) in WGS 84 degrees."""
    return transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21)


def sensor_of(item) -> str:
    """"L30" or "S30" from an HLS item's collection or id."""
    text = f"{item.collection_id or ''} {item.id}"
    for sensor in HLS_BANDS:
        if sensor in text:
            return sensor
    raise InputError(f"not an HLS L30/S30 item (collection {item.collection_id!r})", item.id)


def search_hls(
    bbox: tuple[float, float, float, float],
    start: str,
    end: str,
    stac_url: str = CMR_STAC_URL,
    collections: tuple[str, ...] = HLS_COLLECTIONS,
    max_cloud: float | None = None,
    max_items: int = 200,
) -> list:
    """HLS items over a lon/lat box between two dates (ISO ``YYYY-MM-DD``), oldest first."""
    from pystac_client import Client

    try:
        client = Client.open(stac_url)
        search = client.search(collections=list(collections), bbox=list(bbox), datetime=f"{start}/{end}",
                               max_items=max_items)
        items = list(search.items())
    except Exception as exc:  # network, HTTP and STAC errors all mean "could not search"
        raise InputError(f"STAC search failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                         stac_url) from None
    if max_cloud is not None:
        items = [i for i in items if i.properties.get("eo:cloud_cover", 0) <= max_cloud]
    return sorted(items, key=lambda i: (str(i.datetime), i.id))


@dataclass
class _Auth:
    env: dict
    source: str


def earthdata_auth() -> _Auth:
    """GDAL options that authenticate to Earthdata: a bearer token or ``~/.netrc`` (+ cookies)."""
    cookie = Path(tempfile.gettempdir()) / f"deepdem-earthdata-cookies-{os.getuid() if hasattr(os, 'getuid') else 0}"
    env = {"GDAL_HTTP_COOKIEFILE": str(cookie), "GDAL_HTTP_COOKIEJAR": str(cookie),
           "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MAX_RETRY": "3",
           "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff"}
    token = os.environ.get(TOKEN_ENV)
    if token:
        env["GDAL_HTTP_HEADERS"] = f"Authorization: Bearer {token}"
        return _Auth(env, f"${TOKEN_ENV}")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists():
        env.update(GDAL_HTTP_NETRC="YES", GDAL_HTTP_NETRC_FILE=str(netrc))
        return _Auth(env, str(netrc))
    return _Auth(env, "none")


def _read_native(href: str, grid: Grid, nodata: float):
    """The window of a granule band that covers ``grid`` (plus a 2-pixel margin for bilinear
    resampling), at its own resolution: float32 with NaN for nodata, its transform and CRS."""
    from rasterio.windows import Window, from_bounds

    with rasterio.open(href) as src:
        left, bottom, right, top = transform_bounds(grid.crs, src.crs, *grid.bounds, densify_pts=21)
        window = from_bounds(left, bottom, right, top, src.transform)
        col0, row0 = int(np.floor(window.col_off)) - 2, int(np.floor(window.row_off)) - 2
        col1 = int(np.ceil(window.col_off + window.width)) + 2
        row1 = int(np.ceil(window.row_off + window.height)) + 2
        col0, row0 = max(col0, 0), max(row0, 0)
        col1, row1 = min(col1, src.width), min(row1, src.height)
        if col1 <= col0 or row1 <= row0:
            return None, None, None
        window = Window(col0, row0, col1 - col0, row1 - row0)
        raw = src.read(1, window=window)
        src_nodata = src.nodata if src.nodata is not None else nodata
        data = raw.astype(np.float32)
        data[raw == src_nodata] = np.nan
        return data, src.window_transform(window), src.crs


def item_ndvi(item, grid: Grid) -> np.ndarray:
    """One HLS observation's NDVI on ``grid``: NaN where not clear or not covered.

    Clouds are masked at the granule's own 30 m resolution *before* resampling, so a cloudy
    pixel never leaks into its clear neighbours through bilinear interpolation.
    """
    sensor = sensor_of(item)
    bands = HLS_BANDS[sensor]
    for key in (bands["red"], bands["nir"], FMASK_ASSET):
        if key not in item.assets:
            raise InputError(f"HLS item has no asset {key!r} (assets: {', '.join(sorted(item.assets))})", item.id)
    red, transform, crs = _read_native(item.assets[bands["red"]].href, grid, HLS_NODATA)
    if red is None:
        return np.full(grid.shape, np.nan, np.float32)
    nir, nir_transform, _ = _read_native(item.assets[bands["nir"]].href, grid, HLS_NODATA)
    fmask, fmask_transform, _ = _read_native(item.assets[FMASK_ASSET].href, grid, FMASK_NODATA)
    if nir_transform != transform or fmask_transform != transform or nir.shape != red.shape or fmask.shape != red.shape:
        raise InputError("HLS granule bands are not on one grid (red, NIR and Fmask differ)", item.id)
    red, nir = red * HLS_SCALE, nir * HLS_SCALE
    clear = np.isfinite(fmask) & fmask_clear(np.nan_to_num(fmask, nan=FMASK_NODATA).astype(np.uint8))
    with np.errstate(invalid="ignore"):
        # reflectances outside [0, 1] are saturated or failed retrievals
        ok = clear & (red >= 0) & (red <= 1) & (nir >= 0) & (nir <= 1)
    native = np.where(ok, ndvi_from_bands(nir, red), np.nan).astype(np.float32)
    out = np.full(grid.shape, np.nan, np.float32)
    reproject(native, out, src_transform=transform, src_crs=crs, src_nodata=np.nan,
              dst_transform=grid.transform, dst_crs=grid.crs, dst_nodata=np.nan, resampling=Resampling.bilinear)
    return out


def hls_ndvi(
    grid: Grid,
    start: str,
    end: str,
    stac_url: str = CMR_STAC_URL,
    collections: tuple[str, ...] = HLS_COLLECTIONS,
    max_cloud: float | None = None,
    max_items: int = 200,
) -> tuple[np.ndarray, dict]:
    """Median NDVI of the clear HLS observations between ``start`` and ``end`` on ``grid``.

    Returns the NDVI (NaN where no clear observation) and a provenance record (items used,
    sensors, bands, clear observations per pixel).
    """
    bbox = grid_footprint_lonlat(grid)
    items = search_hls(bbox, start, end, stac_url, collections, max_cloud, max_items)
    if not items:
        raise InputError(f"no HLS granule over {tuple(round(v, 4) for v in bbox)} between {start} and {end}", stac_url)
    auth = earthdata_auth()
    log.info("HLS: %d granules, Earthdata credentials from %s", len(items), auth.source)
    stack = []
    used = []
    with rasterio.Env(**auth.env):
        for item in items:
            try:
                ndvi = item_ndvi(item, grid)
            except rasterio.errors.RasterioIOError as exc:
                raise InputError(f"cannot read HLS granule ({str(exc).splitlines()[0]}); check the Earthdata "
                                 f"login in ~/.netrc or ${TOKEN_ENV}", item.id) from None
            if np.isfinite(ndvi).any():
                stack.append(ndvi)
                used.append({"id": item.id, "sensor": sensor_of(item), "bands": HLS_BANDS[sensor_of(item)],
                             "datetime": item.datetime.isoformat() if item.datetime else None})
            log.info("HLS %s: %d clear pixels", item.id, int(np.isfinite(ndvi).sum()))
    if not stack:
        return np.full(grid.shape, np.nan, np.float32), {"items": [], "stac_url": stac_url}
    cube = np.stack(stack)
    counts = np.isfinite(cube).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": pixels never clear
        median = np.nanmedian(cube, axis=0).astype(np.float32)
    provenance = {
        "stac_url": stac_url, "collections": list(collections), "start": start, "end": end,
        "items": used, "fmask_rejected_bits": FMASK_BITS, "scale": HLS_SCALE,
        "clear_observations": {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())},
    }
    return median, provenance


def grid_like(path: str | os.PathLike) -> Grid:
    """The grid of a raster or of a Scene directory."""
    path = Path(path)
    if path.is_dir():
        from .scene import Scene

        return Scene.open(path).grid
    from .io import horizontal_crs, open_raster

    with open_raster(path) as src:
        if src.crs is None:
            raise InputError("raster has no CRS", path)
        return Grid(horizontal_crs(src.crs), src.transform, src.height, src.width)


#: WorldView/Maxar metadata: the XML that ASP reads as the camera (isd/IMD/IMAGE/MEANSATAZ...) and
#: the IMD text file beside the image (meanSatAz = 312.9;).
_VIEW_KEYS = {"azimuth": ("MEANSATAZ", "meanSatAz"), "elevation": ("MEANSATEL", "meanSatEl")}
_IMD_VALUE = r"^\s*{key}\s*=\s*([-+0-9.eE]+)\s*;"


def read_view(path: str | os.PathLike):
    """The view of a WorldView (or other Maxar) image, from its metadata (``.XML`` or ``.IMD``).

    Returns a :class:`deepdem.synth.View`: the azimuth from the ground to the satellite
    (``meanSatAz``) and, as the off-nadir angle, the line of sight's zenith angle at the ground,
    90° − ``meanSatEl``. That angle sets how far a height error displaces the ortho
    (dz·tan(angle)); ``meanOffNadirViewAngle`` is measured at the satellite and is smaller by the
    Earth's curvature (14.4° against 16.3° at 73.7° elevation), which would shrink the parallax
    band's heights by 12 %.
    """
    from .synth import View

    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise InputError("view metadata not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read view metadata ({exc.strerror})", path) from None
    values = {}
    if text.lstrip("\ufeff \t\r\n").startswith("<"):  # XML, perhaps after a byte-order mark
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError as exc:
            raise InputError(f"not valid XML ({exc})", path) from None
        for name, (tag, _) in _VIEW_KEYS.items():
            element = root.find(f".//IMD/IMAGE/{tag}")
            if element is not None and element.text:
                values[name] = element.text
    else:
        for name, (_, key) in _VIEW_KEYS.items():
            found = re.search(_IMD_VALUE.format(key=key), text, flags=re.MULTILINE)
            if found:
                values[name] = found.group(1)
    missing = [keys[1] for name, keys in _VIEW_KEYS.items() if name not in values]
    if missing:
        raise InputError(f"no {' or '.join(missing)} in it: give a WorldView/Maxar image's .XML or .IMD, "
                         "or the angles with --views", path)
    try:
        azimuth, elevation = float(values["azimuth"]), float(values["elevation"])
    except ValueError:
        raise InputError(f"satellite azimuth/elevation are not numbers: {values}", path) from None
    if not 0.0 < elevation <= 90.0:
        raise InputError(f"satellite elevation {elevation}° is outside (0, 90]", path)
    return View(azimuth % 360.0, 90.0 - elevation)


def write_ndvi(path: str | os.PathLike, ndvi: np.ndarray, grid: Grid, description: str = "NDVI [-1, 1]") -> Path:
    """Write an NDVI raster (float32, nodata −9999, tiled, compressed, overviews)."""
    from .io import write_raster
    from .scene import FLOAT_NODATA

    data = np.where(np.isfinite(ndvi), ndvi, FLOAT_NODATA).astype(np.float32)
    return write_raster(path, data, grid.transform, grid.crs, FLOAT_NODATA, description, overviews=True)


__all__ = [
    "CMR_STAC_URL", "FMASK_BITS", "HLS_BANDS", "HLS_COLLECTIONS", "earthdata_auth", "fmask_clear",
    "grid_like", "hls_ndvi", "item_ndvi", "ndvi_from_bands", "ndvi_from_raster", "read_view", "search_hls",
    "write_ndvi",
]
