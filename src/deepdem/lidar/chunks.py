"""The types points travel in, from a source to the grid: raw chunks, filtered points, sources.

Kept apart from the readers so that the local and the remote (HTTP) readers both build them
without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import laspy
import numpy as np

from ..errors import InputError
from .crs import SourceCRS

DEFAULT_CHUNK = 1_000_000


@dataclass
class RawChunk:
    """Points of one chunk, in the source CRS and units."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    classification: np.ndarray
    return_number: np.ndarray
    number_of_returns: np.ndarray
    withheld: np.ndarray
    overlap: np.ndarray

    @classmethod
    def from_points(cls, pts) -> "RawChunk":
        """Build from a laspy point record (ScaleAwarePointRecord or LasData)."""
        names = set(pts.point_format.dimension_names)
        n = len(pts)
        scales, offsets = pts.scales, pts.offsets
        # Scaling the integer arrays ourselves is ~3x faster than laspy's scaled views.
        x = np.asarray(pts.X, dtype=np.float64) * scales[0] + offsets[0]
        y = np.asarray(pts.Y, dtype=np.float64) * scales[1] + offsets[1]
        z = np.asarray(pts.Z, dtype=np.float64) * scales[2] + offsets[2]
        overlap = np.asarray(pts.overlap, dtype=bool) if "overlap" in names else np.zeros(n, bool)
        return cls(
            x=x, y=y, z=z,
            classification=np.asarray(pts.classification, dtype=np.uint8),
            return_number=np.asarray(pts.return_number, dtype=np.uint8),
            number_of_returns=np.asarray(pts.number_of_returns, dtype=np.uint8),
            withheld=np.asarray(pts.withheld, dtype=bool),
            overlap=overlap,
        )

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Points:
    """Filtered points in the output CRS and units."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    classification: np.ndarray
    first: np.ndarray  # first-or-only return

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, mask: np.ndarray) -> "Points":
        return Points(self.x[mask], self.y[mask], self.z[mask], self.classification[mask],
                      self.first[mask])


@dataclass
class PointSource:
    """One readable point dataset: a LAS/LAZ/COPC file, a COPC URL, or an EPT endpoint."""

    location: str
    kind: str  # "las", "copc", "ept"
    crs: SourceCRS | None
    bounds: tuple[float, float, float, float]
    count: int
    reader_options: dict = field(default_factory=dict)
    #: chunk iterator of a remote source, ``reader(source, chunk_size, query)``, set by whoever
    #: opened it (:mod:`deepdem.lidar.remote`): the types do not depend on the HTTP readers
    reader: Callable[..., Iterator[RawChunk]] | None = None

    def chunks(self, chunk_size: int = DEFAULT_CHUNK,
               query: tuple[float, float, float, float] | None = None) -> Iterator[RawChunk]:
        """Raw chunks, optionally limited to ``query`` bounds (source CRS) where cheap."""
        if self.reader is not None:
            yield from self.reader(self, chunk_size, query)
        elif self.kind == "las":
            yield from las_chunks(self.location, chunk_size)
        else:
            raise InputError(f"no reader for a {self.kind!r} source", self.location)


def las_chunks(path: str, chunk_size: int) -> Iterator[RawChunk]:
    try:
        with laspy.open(path) as reader:
            for pts in reader.chunk_iterator(chunk_size):
                if len(pts):
                    yield RawChunk.from_points(pts)
    except (laspy.errors.LaspyException, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read points ({first_line(exc)})", path) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
