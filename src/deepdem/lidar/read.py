"""Point sources (LAS/LAZ/COPC files, folders, URLs) streamed in bounded chunks.

Every source yields :class:`RawChunk` objects in its own CRS; :func:`stream_points` drops noise
and withheld points and maps the rest into the output CRS. Nothing here holds more than one
chunk of points at a time, so memory is bounded by the chunk size and the output grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import laspy
import numpy as np

from ..errors import InputError
# RawChunk and Points are imported from here by callers of the reader: they stay importable here.
from .chunks import DEFAULT_CHUNK, Points, PointSource, RawChunk  # noqa: F401
from .chunks import first_line as _first_line
from .crs import PointMapper, SourceCRS, assumed_crs, read_las_crs

LAS_SUFFIXES = (".las", ".laz")
NOISE_CLASSES = (7, 18)  # ASPRS low noise, high noise
OVERLAP_CLASS = 12  # LAS <= 1.3 "overlap points"


@dataclass
class PointFilter:
    """Which points to drop before gridding.

    ``exclude_classes`` defaults to the ASPRS noise classes (7 low noise, 18 high noise);
    withheld points are always dropped; overlap points (class 12 or the LAS 1.4 overlap
    flag) only when ``drop_overlap`` is set, since many surveys flag useful points as overlap.
    """

    exclude_classes: tuple[int, ...] = NOISE_CLASSES
    drop_withheld: bool = True
    drop_overlap: bool = False

    def mask(self, chunk: RawChunk) -> np.ndarray:
        keep = np.isfinite(chunk.z)
        if self.exclude_classes:
            lut = np.zeros(256, dtype=bool)
            lut[list(self.exclude_classes)] = True
            keep &= ~lut[chunk.classification]
        if self.drop_withheld:
            keep &= ~chunk.withheld
        if self.drop_overlap:
            keep &= ~chunk.overlap & (chunk.classification != OVERLAP_CLASS)
        return keep


def is_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files, folders (searched recursively for .las/.laz) and URLs, in a stable order."""
    out: list[str] = []
    for item in inputs:
        text = str(item)
        if is_url(text):
            out.append(text)
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in LAS_SUFFIXES
                           and p.is_file())
            if not found:
                raise InputError("folder holds no .las/.laz files", path)
            out.extend(str(p) for p in found)
        elif path.exists():
            out.append(str(path))
        else:
            raise InputError("file not found", path)
    if not out:
        raise InputError("no LIDAR input given")
    return out


def open_source(location: str, assign_crs=None, **reader_options) -> PointSource:
    """Read the header of one input and check that it can be used."""
    if is_url(location):
        from . import remote

        return remote.open_remote(location, assign_crs=assign_crs, **reader_options)
    path = Path(location)
    try:
        with laspy.open(path) as reader:
            header = reader.header
            count = int(header.point_count)
            mins, maxs = header.mins, header.maxs
    except (laspy.errors.LaspyException, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"not a readable LAS/LAZ file ({_first_line(exc)})", path) from None
    crs = _checked_crs(header, str(path), assign_crs)
    if count == 0:
        raise InputError("file holds no points", path)
    bounds = (float(mins[0]), float(mins[1]), float(maxs[0]), float(maxs[1]))
    if not all(np.isfinite(bounds)) or bounds[0] > bounds[2] or bounds[1] > bounds[3]:
        raise InputError(f"header bounds are invalid {bounds}", path)
    # A local COPC file is an ordinary LAZ file: reading it sequentially is fastest.
    return PointSource(str(path), "las", crs, bounds, count, reader_options)


def _checked_crs(header, path: str, assign_crs) -> SourceCRS:
    try:
        crs = read_las_crs(header, path)
    except InputError:
        raise
    except Exception as exc:  # pyproj raises several types for broken WKT/keys
        crs = None
        reason = _first_line(exc)
    else:
        reason = "no WKT or GeoTIFF-key CRS"
    if crs is None:
        if assign_crs is None:
            raise InputError(f"no usable CRS in the file ({reason}); give --crs to assign one",
                             path)
        return assumed_crs(assign_crs)
    return crs


def open_sources(inputs: Sequence[str], assign_crs=None, **reader_options) -> list[PointSource]:
    """Expand and open every input, failing on the first one that cannot be used."""
    return [open_source(loc, assign_crs=assign_crs, **reader_options)
            for loc in expand_inputs(inputs)]


def stream_points(
    sources: Sequence[PointSource],
    out_crs,
    point_filter: PointFilter | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Points]:
    """Filtered points of every source, in ``out_crs``, clipped to ``bounds`` (output CRS)."""
    point_filter = point_filter or PointFilter()
    for src in sources:
        mapper = PointMapper(src.crs, out_crs)
        query = None
        if bounds is not None:
            sb = mapper.bounds(*src.bounds)
            if sb[0] > bounds[2] or sb[2] < bounds[0] or sb[1] > bounds[3] or sb[3] < bounds[1]:
                continue  # this tile is outside the output grid: skip without reading it
            query = mapper.inverse_bounds(*bounds)
        for raw in src.chunks(chunk_size, query):
            if progress is not None:
                progress(len(raw))
            keep = point_filter.mask(raw)
            x, y, z = mapper(raw.x[keep], raw.y[keep], raw.z[keep])
            rn = raw.return_number[keep]
            pts = Points(x, y, z, raw.classification[keep], rn <= 1)
            if bounds is not None:
                inside = (pts.x >= bounds[0]) & (pts.x <= bounds[2]) & \
                         (pts.y >= bounds[1]) & (pts.y <= bounds[3])
                if not inside.all():
                    pts = pts.subset(inside)
            if len(pts):
                yield pts
