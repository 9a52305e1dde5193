"""Coordinate reference systems of LAS/LAZ files, and the mapping of points to an output CRS.

LAS files carry their CRS either as an OGC WKT VLR (LAS 1.4, record 2112) or as GeoTIFF keys
(GeoKeyDirectory 34735 + double 34736 + ASCII 34737 VLRs). ``laspy``'s ``parse_crs`` misses
several real-world layouts (ESRI WKT1 with feet, compound WKT in some versions, CRSs given only
as a citation string), so this module reads the VLRs itself and hands the pieces to pyproj.

Vertical units matter as much as horizontal ones: a LAS file in feet usually has its heights in
feet too, and a DTM that mixes feet and metres is silently wrong by a factor 3.28.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyproj
from pyproj.exceptions import CRSError

from ..errors import InputError

# EPSG unit-of-measure codes that LAS GeoKeys use for ProjLinearUnits (3076) and VerticalUnits
# (4099), in metres per unit.
LINEAR_UNITS_M = {
    9001: 1.0,  # metre
    9002: 0.3048,  # international foot
    9003: 1200.0 / 3937.0,  # US survey foot
    9005: 0.3047972654,  # Clarke's foot
    9014: 1.8288,  # fathom
    9036: 1000.0,  # kilometre
    9037: 0.9143917962,  # Clarke's yard
    9096: 0.9144,  # yard
}

_KEY_MODEL_TYPE = 1024
_KEY_CITATION = 1026
_KEY_GEOGRAPHIC = 2048
_KEY_PROJECTED = 3072
_KEY_PCS_CITATION = 3073
_KEY_PROJ_LINEAR_UNITS = 3076
_KEY_VERTICAL = 4096
_KEY_VERTICAL_UNITS = 4099
_USER_DEFINED = 32767


@dataclass(frozen=True)
class SourceCRS:
    """The CRS of one point file, with the metre factors of its x/y and z coordinates.

    ``crs`` is the full CRS (possibly compound); ``horizontal`` its 2-D part, used to move x/y.
    ``xy_to_m`` is 1 for geographic CRSs (degrees are not converted, they are reprojected).
    """

    crs: pyproj.CRS
    horizontal: pyproj.CRS
    xy_to_m: float
    z_to_m: float
    origin: str

    @property
    def name(self) -> str:
        return self.crs.name


def horizontal_part(crs: pyproj.CRS) -> pyproj.CRS:
    """The 2-D (projected or geographic) part of a CRS, dropping a vertical component."""
    if crs.is_compound:
        for sub in crs.sub_crs_list:
            if sub.is_projected or sub.is_geographic:
                return sub
    if crs.is_geographic and len(crs.axis_info) == 3:
        # A 3-D geographic CRS: heights are ellipsoidal; the 2-D part is what moves x/y.
        return crs.geodetic_crs if crs.geodetic_crs is not None else crs
    return crs


def linear_unit_m(crs: pyproj.CRS) -> float:
    """Metres per horizontal unit of ``crs`` (1.0 for geographic CRSs)."""
    h = horizontal_part(crs)
    if h.is_geographic:
        return 1.0
    factor = h.axis_info[0].unit_conversion_factor if h.axis_info else 1.0
    return float(factor or 1.0)


def vertical_unit_m(crs: pyproj.CRS, default: float | None = None) -> float:
    """Metres per height unit: the vertical axis of a compound CRS, else the default.

    Without a vertical CRS, the LAS convention (and PDAL's) is that heights share the
    horizontal linear unit; for geographic CRSs heights are metres.
    """
    if crs.is_compound:
        for sub in crs.sub_crs_list:
            if sub.is_vertical and sub.axis_info:
                return float(sub.axis_info[0].unit_conversion_factor)
    if default is not None:
        return float(default)
    h = horizontal_part(crs)
    return 1.0 if h.is_geographic else linear_unit_m(h)


def output_units(crs: pyproj.CRS) -> tuple[float, float]:
    """(xy metres per unit, z metres per unit) for an output CRS."""
    return linear_unit_m(crs), vertical_unit_m(crs)


def parse_user_crs(text: str, what: str = "--crs") -> pyproj.CRS:
    """Parse a user CRS (``EPSG:2154``, ``2154``, WKT, PROJ string) into a pyproj CRS."""
    text = str(text).strip()
    if text.isdigit():
        text = f"EPSG:{text}"
    try:
        return pyproj.CRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"{what}: not a CRS ({str(exc).splitlines()[0]})") from None


def _vlrs(header) -> list:
    return list(header.vlrs) + list(getattr(header, "evlrs", None) or [])


def _wkt_from_vlrs(header) -> str | None:
    for vlr in _vlrs(header):
        if vlr.user_id == "LASF_Projection" and vlr.record_id == 2112:
            text = getattr(vlr, "string", None)
            if text is None and hasattr(vlr, "record_data"):
                text = bytes(vlr.record_data).decode("utf-8", "replace")
            if text:
                text = text.strip("\x00 \n\r\t")
                if text:
                    return text
    return None


def _geokeys(header) -> dict[int, object]:
    """GeoKey id -> value (int, float or str), reading the double and ASCII params VLRs."""
    directory = doubles = ascii_text = None
    for vlr in _vlrs(header):
        if vlr.user_id != "LASF_Projection":
            continue
        if vlr.record_id == 34735:
            directory = getattr(vlr, "geo_keys", None)
        elif vlr.record_id == 34736:
            doubles = [float(getattr(d, "value", d)) for d in (getattr(vlr, "doubles", None) or [])]
        elif vlr.record_id == 34737:
            strings = getattr(vlr, "strings", None) or []
            # laspy splits the ASCII block on NUL; offsets index the original block.
            ascii_text = "\x00".join(s if isinstance(s, str) else s.decode("ascii", "replace")
                                     for s in strings)
    keys: dict[int, object] = {}
    for key in directory or []:
        if key.id == 0:
            continue
        if key.tiff_tag_location == 0:
            keys[key.id] = int(key.value_offset)
        elif key.tiff_tag_location == 34736 and doubles is not None:
            if key.value_offset < len(doubles):
                keys[key.id] = doubles[key.value_offset]
        elif key.tiff_tag_location == 34737 and ascii_text is not None:
            keys[key.id] = ascii_text[key.value_offset: key.value_offset + key.count].strip("|\x00 ")
    return keys


def _crs_from_citation(text: str) -> pyproj.CRS | None:
    """Look a CRS up by the name at the start of a GeoTIFF citation ("RGF93 / Lambert-93|...")."""
    for candidate in (text.split("|")[0].strip(), text.strip()):
        if not candidate or candidate.lower() in {"unknown", "unnamed", "user-defined"}:
            continue
        try:
            crs = pyproj.CRS.from_user_input(candidate)
        except CRSError:
            continue
        if crs.is_projected or crs.is_geographic or crs.is_compound:
            return crs
    return None


def _epsg(code: object) -> pyproj.CRS | None:
    if isinstance(code, int) and 0 < code < _USER_DEFINED:
        try:
            return pyproj.CRS.from_epsg(code)
        except CRSError:
            return None
    return None


def read_las_crs(header, path: str | None = None) -> SourceCRS | None:
    """The CRS of a LAS header, or None when the file carries no usable one.

    Order: the WKT VLR (authoritative in LAS 1.4), then GeoTIFF keys (EPSG codes, then the
    citation strings looked up by name in the PROJ database). Vertical units come from the
    compound CRS, else GeoKey 4099, else the horizontal unit.
    """
    keys = _geokeys(header)
    z_unit_key = LINEAR_UNITS_M.get(keys.get(_KEY_VERTICAL_UNITS))  # type: ignore[arg-type]

    wkt = _wkt_from_vlrs(header)
    if wkt:
        try:
            crs = pyproj.CRS.from_wkt(wkt)
        except CRSError:
            crs = None
        if crs is not None:
            return _make(crs, "WKT VLR", z_unit_key)

    if keys:
        crs = _epsg(keys.get(_KEY_PROJECTED))
        origin = "GeoTIFF keys (EPSG)"
        if crs is None:
            for key in (_KEY_PCS_CITATION, _KEY_CITATION):
                if isinstance(keys.get(key), str):
                    crs = _crs_from_citation(keys[key])  # type: ignore[arg-type]
                    if crs is not None:
                        origin = f"GeoTIFF citation {keys[key]!r}"
                        break
        if crs is None and keys.get(_KEY_MODEL_TYPE) == 2:
            crs = _epsg(keys.get(_KEY_GEOGRAPHIC))
        if crs is not None:
            unit = LINEAR_UNITS_M.get(keys.get(_KEY_PROJ_LINEAR_UNITS))  # type: ignore[arg-type]
            if crs.is_projected and unit is not None and not np.isclose(unit, linear_unit_m(crs)):
                # A name lookup can land on the metric variant of a feet CRS; the unit key
                # is the file's own statement and wins.
                raise InputError(
                    f"GeoTIFF keys disagree: CRS {crs.name!r} is in {linear_unit_m(crs)} m units "
                    f"but ProjLinearUnits says {unit} m", path)
            vertical = _epsg(keys.get(_KEY_VERTICAL))
            if vertical is not None and vertical.is_vertical and not crs.is_compound:
                try:
                    crs = pyproj.crs.CompoundCRS(
                        name=f"{crs.name} + {vertical.name}", components=[crs, vertical])
                except CRSError:
                    pass
            return _make(crs, origin, z_unit_key)
    return None


def _make(crs: pyproj.CRS, origin: str, z_unit_key: float | None) -> SourceCRS:
    horizontal = horizontal_part(crs)
    if crs.is_compound:
        z_to_m = vertical_unit_m(crs)
        if z_unit_key is not None and not crs.sub_crs_list[-1].axis_info:
            z_to_m = z_unit_key
    else:
        z_to_m = z_unit_key if z_unit_key is not None else vertical_unit_m(crs)
    return SourceCRS(crs=crs, horizontal=horizontal, xy_to_m=linear_unit_m(horizontal),
                     z_to_m=float(z_to_m), origin=origin)


def assumed_crs(crs: pyproj.CRS) -> SourceCRS:
    """A SourceCRS for files without one, taken to be in ``crs`` (the user's --crs)."""
    return _make(crs, "assumed from --crs", None)


class PointMapper:
    """Moves x, y, z from a source CRS into the output CRS (x/y reprojected, z rescaled).

    Only the horizontal part is reprojected and heights are only rescaled between units:
    vertical datum shifts need geoid grids that are usually not installed, and applying
    a partial transformation silently would be worse than none.
    """

    def __init__(self, source: SourceCRS, out_crs: pyproj.CRS):
        self.source = source
        out_h = horizontal_part(out_crs)
        self.identity = source.horizontal.equals(out_h, ignore_axis_order=True)
        self._transformer = None if self.identity else pyproj.Transformer.from_crs(
            source.horizontal, out_h, always_xy=True)
        self.z_scale = source.z_to_m / vertical_unit_m(out_crs)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        if self._transformer is not None:
            x, y = self._transformer.transform(x, y)
            x, y = np.asarray(x), np.asarray(y)
        if self.z_scale != 1.0:
            z = z * self.z_scale
        return x, y, z

    def bounds(self, xmin: float, ymin: float, xmax: float, ymax: float):
        """Source bounds mapped into the output CRS (densified so curved edges are covered)."""
        if self._transformer is None:
            return xmin, ymin, xmax, ymax
        return self._transformer.transform_bounds(xmin, ymin, xmax, ymax, densify_pts=21)

    def inverse_bounds(self, xmin: float, ymin: float, xmax: float, ymax: float):
        """Output-CRS bounds mapped back into the source CRS."""
        if self._transformer is None:
            return xmin, ymin, xmax, ymax
        return self._transformer.transform_bounds(xmin, ymin, xmax, ymax, densify_pts=21,
                                                  direction="INVERSE")
