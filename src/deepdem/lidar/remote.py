"""Remote points: EPT (Entwine Point Tiles), COPC over HTTP, and the USGS 3DEP index.

Only the octree nodes that intersect the query box are downloaded (EPT: whole ``.laz`` nodes;
COPC: HTTP range requests through laspy's ``CopcReader``), with retries and a tqdm progress
bar. Everything goes through the standard library's ``urllib`` so that no extra dependency
(``requests``, which laspy's own HTTP reader needs) is required.

The 3DEP search reads the public boundaries index of the ``usgs-lidar-public`` EPT bucket;
its URL is :data:`DEFAULT_3DEP_INDEX` and can be overridden (tests serve their own).
"""

from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date as _date
from typing import Iterator, Sequence

import laspy
import numpy as np
import pyproj

from ..errors import InputError
from .chunks import PointSource, RawChunk
from .crs import SourceCRS, _make, read_las_crs

DEFAULT_3DEP_INDEX = "https://raw.githubusercontent.com/hobuinc/usgs-lidar/master/boundaries/resources.geojson"
DEFAULT_3DEP_BUCKET = "https://s3-us-west-2.amazonaws.com/usgs-lidar-public"
USER_AGENT = "deepdem-lidar/0.1"


def fetch(url: str, byte_range: tuple[int, int] | None = None, retries: int = 4,
          timeout: float = 60.0, backoff: float = 0.5) -> bytes:
    """GET ``url`` (optionally a byte range, inclusive), retrying transient failures.

    4xx answers other than 408/429 are not retried: the resource is missing or forbidden.
    """
    headers = {"User-Agent": USER_AGENT}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=timeout) as resp:
                data = resp.read()
                if byte_range is not None and resp.status == 200:
                    # Server ignored the Range header: cut the slice ourselves.
                    data = data[byte_range[0]: byte_range[1] + 1]
                return data
        except urllib.error.HTTPError as exc:
            last = exc
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = exc
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise InputError(f"download failed ({last})", url)


def fetch_json(url: str, **kw) -> dict:
    try:
        return json.loads(fetch(url, **kw))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", url) from None


class HttpRangeFile(io.RawIOBase):
    """A read-only, seekable file over HTTP range requests, for laspy's CopcReader.

    Reads are served from aligned blocks so that the many small header/VLR reads cost a few
    requests, while large node reads go straight to the server.
    """

    def __init__(self, url: str, block: int = 1 << 16, retries: int = 4):
        super().__init__()
        self.url, self.block, self.retries = url, block, retries
        self.pos = 0
        self._cache: dict[int, bytes] = {}
        self._size: int | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        if self._size is None:
            req = urllib.request.Request(self.url, method="HEAD",
                                         headers={"User-Agent": USER_AGENT})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    self._size = int(resp.headers["Content-Length"])
            except (urllib.error.URLError, OSError, TypeError, ValueError) as exc:
                raise InputError(f"cannot get the size ({exc})", self.url) from None
        return self._size

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: None}[whence]
        self.pos = (self.size if base is None else base) + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        if n == 0:
            return b""
        if n >= 4 * self.block:
            data = fetch(self.url, (self.pos, self.pos + n - 1), retries=self.retries)
        else:
            first, last = self.pos // self.block, (self.pos + n - 1) // self.block
            parts = []
            for b in range(first, last + 1):
                if b not in self._cache:
                    self._cache[b] = fetch(self.url, (b * self.block, (b + 1) * self.block - 1),
                                           retries=self.retries)
                parts.append(self._cache[b])
            buf = b"".join(parts)
            off = self.pos - first * self.block
            data = buf[off: off + n]
        self.pos += len(data)
        return data


def _progress(total: int, desc: str, enabled: bool | None):
    import sys

    from tqdm import tqdm

    disable = not (enabled or (enabled is None and sys.stderr.isatty()))
    return tqdm(total=total, desc=desc, unit="node", disable=disable, leave=False)


# --------------------------------------------------------------------------------------- EPT


@dataclass(frozen=True)
class EptNode:
    key: tuple[int, int, int, int]  # depth, x, y, z
    count: int
    bounds: tuple[float, float, float, float, float, float]

    @property
    def name(self) -> str:
        return "-".join(str(k) for k in self.key)


class EptDataset:
    """An EPT dataset (``ept.json``) whose intersecting nodes can be listed and read."""

    def __init__(self, url: str, retries: int = 4, workers: int = 8):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.base = urllib.parse.urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0],
                                                           query="", fragment=""))
        self.retries, self.workers = retries, workers
        self.info = fetch_json(url, retries=retries)
        try:
            self.cube = tuple(float(v) for v in self.info["bounds"])
            self.points = int(self.info.get("points", 0))
            self.data_type = self.info.get("dataType", "laszip")
            conforming = self.info.get("boundsConforming", self.cube)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not an EPT ept.json ({exc})", url) from None
        if self.data_type not in ("laszip", "las"):
            raise InputError(f"EPT dataType {self.data_type!r} is not supported "
                             "(laszip or las only)", url)
        self.bounds = (conforming[0], conforming[1], conforming[3], conforming[4])
        self.crs = ept_crs(self.info.get("srs") or {}, url)

    def node_bounds(self, key) -> tuple[float, ...]:
        d, x, y, z = key
        xmin, ymin, zmin, xmax, ymax, zmax = self.cube
        sx, sy, sz = ((xmax - xmin) / 2 ** d, (ymax - ymin) / 2 ** d, (zmax - zmin) / 2 ** d)
        return (xmin + x * sx, ymin + y * sy, zmin + z * sz,
                xmin + (x + 1) * sx, ymin + (y + 1) * sy, zmin + (z + 1) * sz)

    def nodes(self, query: Sequence[float] | None = None) -> list[EptNode]:
        """Nodes with points that intersect ``query`` (xmin, ymin, xmax, ymax), all depths.

        Sub-hierarchy files (count -1) are fetched only when their root node intersects.
        """
        out: list[EptNode] = []
        pending = ["0-0-0-0"]
        while pending:
            name = pending.pop()
            hier = fetch_json(f"{self.base}/ept-hierarchy/{name}.json", retries=self.retries)
            for k, count in hier.items():
                key = tuple(int(v) for v in k.split("-"))
                b = self.node_bounds(key)
                if query is not None and (b[0] > query[2] or b[3] < query[0] or
                                          b[1] > query[3] or b[4] < query[1]):
                    continue
                if count == -1:
                    if k != name:
                        pending.append(k)
                elif count > 0:
                    out.append(EptNode(key, int(count), b))
        return sorted(out, key=lambda n: n.key)

    def read_node(self, node: EptNode) -> laspy.LasData:
        ext = "laz" if self.data_type == "laszip" else "las"
        url = f"{self.base}/ept-data/{node.name}.{ext}"
        data = fetch(url, retries=self.retries)
        try:
            return laspy.read(io.BytesIO(data))
        except Exception as exc:  # laspy/lazrs raise various types for corrupt data
            raise InputError(f"corrupt EPT node ({exc})", url) from None

    def chunks(self, query=None, progress: bool | None = None) -> Iterator:

        nodes = self.nodes(query)
        bar = _progress(len(nodes), "EPT nodes", progress)
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                # map() keeps order and downloads ahead of the consumer.
                for las in pool.map(self.read_node, nodes):
                    bar.update(1)
                    chunk = RawChunk.from_points(las.points)
                    if query is not None:
                        m = (chunk.x >= query[0]) & (chunk.x <= query[2]) & \
                            (chunk.y >= query[1]) & (chunk.y <= query[3])
                        if not m.any():
                            continue
                        chunk = _subset_chunk(chunk, m)
                    yield chunk
        finally:
            bar.close()


def _subset_chunk(chunk, m):
    return RawChunk(**{k: v[m] for k, v in vars(chunk).items()})


def ept_crs(srs: dict, url: str) -> SourceCRS | None:
    """CRS of an EPT dataset from its ``srs`` object (WKT, else authority codes)."""
    try:
        if srs.get("wkt"):
            return _make(pyproj.CRS.from_wkt(srs["wkt"]), "EPT srs wkt", None)
        if srs.get("horizontal"):
            auth = srs.get("authority", "EPSG")
            h = pyproj.CRS.from_user_input(f"{auth}:{srs['horizontal']}")
            if srs.get("vertical"):
                v = pyproj.CRS.from_user_input(f"{auth}:{srs['vertical']}")
                h = pyproj.crs.CompoundCRS(name=f"{h.name} + {v.name}", components=[h, v])
            return _make(h, "EPT srs codes", None)
    except pyproj.exceptions.CRSError as exc:
        raise InputError(f"EPT srs is not a usable CRS ({exc})", url) from None
    return None


# -------------------------------------------------------------------------------------- COPC


def copc_chunks(url: str, query=None, retries: int = 4) -> Iterator:
    stream = HttpRangeFile(url, retries=retries)
    try:
        with laspy.CopcReader(stream, close_fd=True) as reader:
            bounds = None
            if query is not None:
                bounds = laspy.copc.Bounds(mins=np.array(query[:2], dtype=float),
                                           maxs=np.array(query[2:], dtype=float))
            pts = reader.query(bounds=bounds)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read COPC points ({exc})", url) from None
    if len(pts):
        yield RawChunk.from_points(pts)


# ----------------------------------------------------------------------------------- sources


def open_remote(url: str, assign_crs=None, retries: int = 4, **_):
    """A :class:`PointSource` for an http(s) EPT ``ept.json`` or COPC ``.copc.laz`` URL."""
    from .crs import assumed_crs

    if urllib.parse.urlsplit(url).path.rstrip("/").endswith("ept.json"):
        ds = EptDataset(url, retries=retries)
        crs = ds.crs
        if crs is None:
            if assign_crs is None:
                raise InputError("EPT has no srs; give --crs to assign one", url)
            crs = assumed_crs(assign_crs)
        return PointSource(url, "ept", crs, ds.bounds, ds.points, {"dataset": ds}, reader=source_chunks)
    stream = HttpRangeFile(url, retries=retries)
    try:
        reader = laspy.CopcReader(stream, close_fd=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a COPC file or EPT ept.json URL ({exc}); plain LAS/LAZ files "
                         "must be downloaded first", url) from None
    with reader:
        header = reader.header
        crs = read_las_crs(header, url)
        count = int(header.point_count)
        b = (float(header.mins[0]), float(header.mins[1]), float(header.maxs[0]),
             float(header.maxs[1]))
    if crs is None:
        if assign_crs is None:
            raise InputError("no usable CRS in the file; give --crs to assign one", url)
        crs = assumed_crs(assign_crs)
    return PointSource(url, "copc", crs, b, count, reader=source_chunks)


def source_chunks(source, chunk_size: int, query=None) -> Iterator:
    """Raw chunks of a remote :class:`PointSource` (called by ``PointSource.chunks``)."""
    if source.kind == "ept":
        ds = source.reader_options.get("dataset") or EptDataset(source.location)
        yield from ds.chunks(query, progress=source.reader_options.get("progress"))
    elif source.kind == "copc":
        yield from copc_chunks(source.location, query)
    else:
        raise InputError(f"unknown source kind {source.kind!r}", source.location)


# -------------------------------------------------------------------------------------- 3DEP


def _ring_contains(ring, x, y) -> bool:
    inside = False
    n = len(ring)
    for i in range(n):
        x1, y1 = ring[i][:2]
        x2, y2 = ring[(i + 1) % n][:2]
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


def _segments_cross(p1, p2, q1, q2) -> bool:
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    d1, d2 = orient(q1, q2, p1), orient(q1, q2, p2)
    d3, d4 = orient(p1, p2, q1), orient(p1, p2, q2)
    return (d1 * d2 < 0) and (d3 * d4 < 0)


def polygon_intersects_box(geometry: dict, box: Sequence[float]) -> bool:
    """Whether a GeoJSON (Multi)Polygon intersects an axis-aligned box (same CRS).

    A few lines of geometry instead of a shapely dependency for one predicate.
    """
    xmin, ymin, xmax, ymax = box
    corners = [(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax)]
    polys = geometry.get("coordinates", [])
    if geometry.get("type") == "Polygon":
        polys = [polys]
    elif geometry.get("type") != "MultiPolygon":
        return False
    for poly in polys:
        if not poly:
            continue
        outer = poly[0]
        xs = [p[0] for p in outer]
        ys = [p[1] for p in outer]
        if min(xs) > xmax or max(xs) < xmin or min(ys) > ymax or max(ys) < ymin:
            continue
        if any(xmin <= p[0] <= xmax and ymin <= p[1] <= ymax for p in outer):
            return True
        if any(_ring_contains(outer, cx, cy) and
               not any(_ring_contains(h, cx, cy) for h in poly[1:]) for cx, cy in corners):
            return True
        edges = list(zip(corners, corners[1:] + corners[:1]))
        for a, b in zip(outer, outer[1:] + outer[:1]):
            if any(_segments_cross(a, b, c, d) for c, d in edges):
                return True
    return False


def survey_year(name: str) -> int | None:
    """Acquisition year from a 3DEP survey name (``..._2018``, ``..._2016_2017`` -> last)."""
    years = re.findall(r"(?<!\d)(19[89]\d|20\d\d)(?!\d)", name)
    return int(years[-1]) if years else None


@dataclass
class Survey:
    name: str
    url: str
    count: int
    year: int | None


def search_3dep(bounds: Sequence[float], crs, index_url: str = DEFAULT_3DEP_INDEX,
                buffer: float = 0.0, retries: int = 4) -> list[Survey]:
    """3DEP surveys whose boundary intersects ``bounds`` (in ``crs``) grown by ``buffer``."""
    crs = pyproj.CRS.from_user_input(crs)
    from .crs import horizontal_part, linear_unit_m

    b = float(buffer) / linear_unit_m(crs)
    xmin, ymin, xmax, ymax = bounds
    t = pyproj.Transformer.from_crs(horizontal_part(crs), "EPSG:4326", always_xy=True)
    box = t.transform_bounds(xmin - b, ymin - b, xmax + b, ymax + b, densify_pts=21)
    index = fetch_json(index_url, retries=retries)
    out = []
    for feat in index.get("features", []):
        props = feat.get("properties") or {}
        name = props.get("name")
        if not name or not polygon_intersects_box(feat.get("geometry") or {}, box):
            continue
        url = props.get("url") or f"{DEFAULT_3DEP_BUCKET}/{name}/ept.json"
        out.append(Survey(name, url, int(props.get("count") or 0), survey_year(name)))
    return out


def find_3dep(bounds: Sequence[float], crs, date: str | _date | None = None,
              index_url: str = DEFAULT_3DEP_INDEX, buffer: float = 0.0,
              all_surveys: bool = False, retries: int = 4) -> list:
    """Point sources for the 3DEP survey(s) covering ``bounds`` (in ``crs``).

    Without ``all_surveys`` one survey is kept: the one whose year is nearest ``date``, or the
    newest when no date is given (ties: the most points).
    """
    surveys = search_3dep(bounds, crs, index_url=index_url, buffer=buffer, retries=retries)
    if not surveys:
        raise InputError(f"no 3DEP survey intersects bounds {list(bounds)}", index_url)
    if not all_surveys:
        if date is not None:
            year = date.year if isinstance(date, _date) else int(str(date)[:4])
            key = (lambda s: (abs((s.year or -9999) - year), -s.count))
        else:
            key = (lambda s: (-(s.year or -9999), -s.count))
        surveys = [min(surveys, key=key)]
    return [open_remote(s.url, retries=retries) for s in surveys]


__all__ = ["DEFAULT_3DEP_INDEX", "EptDataset", "HttpRangeFile", "Survey", "fetch",
           "find_3dep", "open_remote", "polygon_intersects_box", "search_3dep", "survey_year"]
