"""From point clouds to truth rasters: DSM, DTM, density (and CHM), written atomically.

The points are streamed (see :mod:`.read`); each pass keeps only per-cell accumulators, so a
survey of any size fits in memory as long as its output grid does.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyproj

from ..errors import InputError
from ..grid import Grid
from ..io import atomic_directory, write_raster
from .chunks import DEFAULT_CHUNK, PointSource
from .crs import horizontal_part, output_units, parse_user_crs
from .grid import CellStats, GroundCells, fill_small_gaps, tin_interpolate
from .ground import GroundClassifier, OutlierFilter, OutlierParams, SMRFParams, smrf_surface
from .read import PointFilter, open_sources, stream_points

NODATA = -9999.0
#: ASPRS classes of the above-ground returns that tell a cell's objects apart (LAS 1.4 table 17)
VEGETATION_CLASSES = (3, 4, 5)
BUILDING_CLASS = 6
#: object_class.tif's values: the cell's classified objects, or none classified
OBJECT_NONE, OBJECT_VEGETATION, OBJECT_BUILDING = 0, 5, 6
GROUND_MODES = ("auto", "class", "filter")


@dataclass
class LidarProducts:
    """Rasters made from the points (float arrays, NaN = no data) and how they were made."""

    grid: Grid
    dsm: np.ndarray
    dtm: np.ndarray
    density: np.ndarray
    chm: np.ndarray | None
    #: per cell, OBJECT_BUILDING or OBJECT_VEGETATION by the class most of its building and
    #: vegetation returns have, OBJECT_NONE where it has neither; None where no point has these classes
    object_class: np.ndarray | None
    ground_source: str
    points_read: int
    points_gridded: int
    ground_points: int
    outliers_removed: int
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def transform(self):
        return self.grid.transform


class _Progress:
    """A tqdm bar over points read, shown only on a terminal (or when forced)."""

    def __init__(self, total: int, enabled: bool | None, desc: str):
        self.bar = None
        if enabled or (enabled is None and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="pt", unit_scale=True, desc=desc, leave=False)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _resolve_crs(sources: Sequence[PointSource], crs, like_grid: Grid | None) -> pyproj.CRS:
    if like_grid is not None:
        out = pyproj.CRS.from_user_input(like_grid.crs)
        if crs is not None and not horizontal_part(crs).equals(horizontal_part(out),
                                                                 ignore_axis_order=True):
            raise InputError("--crs differs from the CRS of the --like raster; give one of them")
    elif crs is not None:
        out = crs
    else:
        out = sources[0].crs.crs
    if horizontal_part(out).is_geographic:
        raise InputError(f"output CRS {out.name!r} is geographic; give a projected --crs "
                         "(resolution and gap lengths are distances)")
    return out


def grid_lidar(
    inputs: Sequence[str | Path | PointSource],
    resolution: float | None = None,
    out_dir: str | Path | None = None,
    crs=None,
    bounds: Sequence[float] | None = None,
    like: str | Path | None = None,
    max_gap: float = 20.0,
    dsm_fill_gap: float = 1.0,
    chm: bool = False,
    ground: str = "auto",
    ground_classes: Sequence[int] = (2,),
    smrf: SMRFParams | None = None,
    outliers: OutlierParams | None = None,
    point_filter: PointFilter | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool | None = None,
) -> LidarProducts:
    """Grid LIDAR points into a DSM, a DTM and a point density (and optionally a CHM).

    Parameters
    ----------
    inputs
        LAS/LAZ/COPC files, folders, http(s) URLs (COPC files or EPT ``ept.json``), or
        :class:`PointSource` objects (e.g. from :func:`deepdem.lidar.remote.find_3dep`).
    resolution
        Cell size in output-CRS units (taken from ``like`` when given).
    crs
        Output CRS; points are reprojected and their heights converted to its units.
        Files without a CRS are assumed to be in it. Default: the first file's CRS.
    bounds
        (xmin, ymin, xmax, ymax) in the output CRS. Default: the union of the inputs.
    like
        A raster whose grid (origin, resolution, size, CRS) the outputs copy.
    max_gap
        Longest triangle edge (metres) the DTM interpolation may bridge; wider gaps stay
        nodata. Points this far around the grid are read too, so edges interpolate across
        tile borders.
    dsm_fill_gap
        DSM cells without a first return are filled by TIN only within this distance (m).
    ground
        ``"class"``: ground is ``ground_classes``; ``"filter"``: SMRF ground filter, classes
        ignored; ``"auto"``: classes, or the filter when no point is classified ground.
    outliers
        Enables the relief-aware outlier filter (an extra pass over the points).
    """
    # Long only by its 15 documented parameters: the body is its steps, named below.
    if ground not in GROUND_MODES:
        raise InputError(f"ground must be one of {GROUND_MODES}, got {ground!r}")
    smrf = smrf or SMRFParams()
    point_filter = point_filter or PointFilter()
    if isinstance(crs, str):
        crs = parse_user_crs(crs)
    like_grid = Grid.like(like) if like is not None else None
    sources = _open_inputs(inputs, crs)
    out_crs = _resolve_crs(sources, crs, like_grid)
    xy_m, z_m = output_units(out_crs)
    grid = _output_grid(sources, out_crs, resolution, bounds, like_grid)

    # The work grid is the output grid plus a halo of up to max_gap, so that the DTM's TIN
    # interpolates across tile borders from the points beyond them.
    gap = max_gap / xy_m
    halo = int(min(math.ceil(gap / grid.res), 256))
    points = _PointPasses(sources, out_crs, point_filter, grid.padded(halo), chunk_size, progress)
    if outliers is not None:
        points.outlier_filter = points.outlier_statistics(outliers, z_m)
    location = sources[0].location if len(sources) == 1 else None
    smrf_in_units = SMRFParams(cell=smrf.cell / xy_m, slope=smrf.slope * xy_m / z_m,
                               window=smrf.window / xy_m, threshold=smrf.threshold / z_m,
                               scalar=smrf.scalar * xy_m / z_m)

    classifier = points.smrf_classifier(smrf_in_units, location) if ground == "filter" else None
    binned = points.bin(classifier, ground_classes)
    ground_source = "SMRF ground filter" if classifier is not None else f"classes {list(ground_classes)}"
    if binned.n_read == 0:
        raise InputError("no points fall inside the output grid", location)
    if binned.cells.total == 0 and ground == "auto":
        binned = points.bin(points.smrf_classifier(smrf_in_units, location), ground_classes)
        ground_source = f"SMRF ground filter (no point of classes {list(ground_classes)})"
    if binned.cells.total == 0:
        raise InputError(f"no ground points ({ground_source}); try --ground filter", location)

    core = (slice(halo, halo + grid.height), slice(halo, halo + grid.width))
    dsm = binned.dsm.reshape(points.work.shape)
    dsm = np.where(np.isfinite(dsm), dsm, np.nan)
    if dsm_fill_gap > 0:
        dsm = fill_small_gaps(dsm, points.work, dsm_fill_gap / xy_m)
    dsm_core = dsm[core]
    gx, gy, gz = binned.cells.points()
    dtm_core = tin_interpolate(gx, gy, gz, grid, gap)
    cell_area_m2 = (grid.res * xy_m) ** 2
    density = binned.count.reshape(points.work.shape)[core] / cell_area_m2
    object_class = None
    if binned.buildings.any() or binned.vegetation.any():
        buildings, vegetation = (a.reshape(points.work.shape)[core] for a in (binned.buildings, binned.vegetation))
        object_class = np.where(buildings > vegetation, OBJECT_BUILDING,
                                np.where(vegetation > 0, OBJECT_VEGETATION, OBJECT_NONE)).astype(np.uint8)

    products = LidarProducts(
        grid=grid, dsm=dsm_core, dtm=dtm_core, density=density, chm=dsm_core - dtm_core if chm else None,
        object_class=object_class,
        ground_source=ground_source, points_read=points.total, points_gridded=binned.n_read - binned.n_out,
        ground_points=binned.cells.total, outliers_removed=binned.n_out,
    )
    if out_dir is not None:
        write_products(products, out_dir, sources=sources, params=dict(
            resolution=grid.res, max_gap_m=max_gap, dsm_fill_gap_m=dsm_fill_gap, ground=ground,
            ground_classes=list(ground_classes), smrf=asdict(smrf),
            outliers=asdict(outliers) if outliers else None,
            point_filter=asdict(point_filter)))
    return products


def _open_inputs(inputs: Sequence, crs: pyproj.CRS | None) -> list[PointSource]:
    """Grid LIDAR, step 1: the inputs as point sources, each with a CRS (``crs`` where a file has none)."""
    strings = [str(i) for i in inputs if not isinstance(i, PointSource)]
    sources = [i for i in inputs if isinstance(i, PointSource)]
    if strings:
        sources = open_sources(strings, assign_crs=crs) + sources
    if not sources:
        raise InputError("no LIDAR input given")
    for src in sources:
        if src.crs is None:
            if crs is None:
                raise InputError("no usable CRS; give --crs to assign one", src.location)
            from .crs import assumed_crs

            src.crs = assumed_crs(crs)
    return sources


def _output_grid(sources: Sequence[PointSource], out_crs: pyproj.CRS, resolution: float | None,
                 bounds, like_grid: Grid | None) -> Grid:
    """Grid LIDAR, step 2: the output grid: the ``like`` raster's, or ``bounds`` (default: the
    inputs' union) at ``resolution``."""
    if like_grid is not None:
        if resolution is not None and not math.isclose(resolution, like_grid.res, rel_tol=1e-9):
            raise InputError(f"--resolution {resolution} differs from the --like raster's "
                             f"{like_grid.res}; give one of them")
        return like_grid
    if resolution is None:
        raise InputError("--resolution is required unless --like is given")
    if bounds is None:
        if any(s.kind != "las" for s in sources):
            raise InputError("remote inputs need --bounds or --like (their extent is a "
                             "whole survey)")
        from .crs import PointMapper

        boxes = [PointMapper(s.crs, out_crs).bounds(*s.bounds) for s in sources]
        bounds = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                  max(b[2] for b in boxes), max(b[3] for b in boxes))
    if len(bounds) != 4 or not (bounds[0] < bounds[2] and bounds[1] < bounds[3]):
        raise InputError(f"--bounds must be xmin ymin xmax ymax, got {list(bounds)}")
    return Grid.from_bounds(bounds, float(resolution), out_crs)


@dataclass
class _Binned:
    """What the gridding pass keeps per work-grid cell (flat arrays) and its point counts."""

    dsm: np.ndarray
    count: np.ndarray
    buildings: np.ndarray  # returns of the building class
    vegetation: np.ndarray  # returns of the vegetation classes
    cells: GroundCells
    n_read: int
    n_out: int


class _PointPasses:
    """Grid LIDAR, steps 3-5: passes over the points inside the work grid (the output grid and
    its halo), each streamed in chunks with its own progress bar."""

    def __init__(self, sources, out_crs, point_filter: PointFilter, work: Grid, chunk_size: int,
                 progress: bool | None):
        self.sources, self.out_crs, self.point_filter = sources, out_crs, point_filter
        self.work, self.chunk_size, self.progress = work, chunk_size, progress
        self.total = sum(s.count for s in sources)
        self.outlier_filter: OutlierFilter | None = None

    def passes(self, label: str):
        """Every chunk of points inside the work grid, with each point's flat cell index."""
        bar = _Progress(self.total, self.progress, label)
        try:
            for pts in stream_points(self.sources, self.out_crs, self.point_filter, self.work.bounds,
                                     self.chunk_size, bar):
                idx, inside = self.work.cell_index(pts.x, pts.y)
                if not inside.all():
                    pts, idx = pts.subset(inside), idx[inside]
                if len(pts):
                    yield pts, idx
        finally:
            bar.close()

    def outlier_statistics(self, params: OutlierParams, z_m: float) -> OutlierFilter:
        """Step 3 (optional): the outlier filter, from every cell's highest and lowest point."""
        stats = CellStats(self.work)
        for pts, idx in self.passes("outlier stats"):
            stats.add(idx, pts.z)
        return OutlierFilter(stats.max_grid(), stats.min_grid(), self.work, params, z_m)

    def smrf_classifier(self, params: SMRFParams, location) -> GroundClassifier:
        """Step 4 (ground filter only): SMRF on its own, coarser grid, from the per-cell minimum
        of the kept points; ``params`` are in the output CRS's units."""
        sgrid = Grid.from_bounds(self.work.bounds, params.cell, self.out_crs)
        zmin = np.full(sgrid.size, np.inf)
        for pts, idx in self.passes("ground filter"):
            if self.outlier_filter is not None:
                pts = pts.subset(self.outlier_filter.keep(idx, pts.z))
            sidx, inside = sgrid.cell_index(pts.x, pts.y)
            np.minimum.at(zmin, sidx[inside], pts.z[inside])
        zmin = zmin.reshape(sgrid.shape)
        zmin[~np.isfinite(zmin)] = np.nan
        if np.isfinite(zmin).sum() < 3:
            raise InputError("too few points for the ground filter", location)
        return GroundClassifier(smrf_surface(zmin, sgrid, params), sgrid, params)

    def bin(self, classifier: GroundClassifier | None, ground_classes) -> _Binned:
        """Step 5: the highest first return and the point count of every cell, its returns of the
        building and vegetation classes, and the ground points (by ``classifier``, else by class)
        kept per cell for the TIN."""
        dsm = np.full(self.work.size, -np.inf)
        count = np.zeros(self.work.size, dtype=np.int64)
        buildings = np.zeros(self.work.size, dtype=np.int64)
        vegetation = np.zeros(self.work.size, dtype=np.int64)
        is_vegetation = np.zeros(256, dtype=bool)
        is_vegetation[list(VEGETATION_CLASSES)] = True
        cells = GroundCells(self.work)
        n_read = n_out = 0
        lut = np.zeros(256, dtype=bool)
        lut[list(ground_classes)] = True
        for pts, idx in self.passes("gridding"):
            n_read += len(pts)
            if self.outlier_filter is not None:
                keep = self.outlier_filter.keep(idx, pts.z)
                n_out += int((~keep).sum())
                pts, idx = pts.subset(keep), idx[keep]
            count += np.bincount(idx, minlength=self.work.size)
            # ufunc.at, not bincount(minlength=...): a sparse subset, with no grid-sized array per chunk
            np.add.at(buildings, idx[pts.classification == BUILDING_CLASS], 1)
            np.add.at(vegetation, idx[is_vegetation[pts.classification]], 1)
            f = pts.first
            np.maximum.at(dsm, idx[f], pts.z[f])
            g = classifier(pts.x, pts.y, pts.z) if classifier is not None else lut[pts.classification]
            cells.add(idx[g], pts.x[g], pts.y[g], pts.z[g])
        return _Binned(dsm, count, buildings, vegetation, cells, n_read, n_out)


def write_products(products: LidarProducts, out_dir: str | Path, sources=(), params=None) -> dict:
    """Write dsm.tif, dtm.tif, density.tif (and chm.tif, object_class.tif) plus lidar.json, all or nothing."""
    out_dir = Path(out_dir)
    g = products.grid
    layers = {"dsm": (products.dsm, "highest first-or-only return per cell"),
              "dtm": (products.dtm, f"ground ({products.ground_source}), TIN-interpolated"),
              "density": (products.density, "points per square metre (all kept returns)")}
    if products.chm is not None:
        layers["chm"] = (products.chm, "DSM - DTM")
    files = {}
    with atomic_directory(out_dir) as tmp:
        for name, (arr, desc) in layers.items():
            data = np.where(np.isfinite(arr), arr, NODATA).astype(np.float32)
            write_raster(tmp / f"{name}.tif", data, g.transform, g.crs, nodata=NODATA,
                         description=desc)
            files[name] = out_dir / f"{name}.tif"
        if products.object_class is not None:
            write_raster(tmp / "object_class.tif", products.object_class, g.transform, g.crs, dtype="uint8",
                         description=f"objects of the cell's classified returns: {OBJECT_BUILDING} building "
                                     f"(class {BUILDING_CLASS}), {OBJECT_VEGETATION} vegetation (classes "
                                     f"{', '.join(map(str, VEGETATION_CLASSES))}), {OBJECT_NONE} neither")
            files["object_class"] = out_dir / "object_class.tif"
        meta = dict(
            crs=pyproj.CRS.from_user_input(g.crs).name, resolution=g.res, bounds=list(g.bounds),
            width=g.width, height=g.height, ground_source=products.ground_source,
            points_read=products.points_read, points_gridded=products.points_gridded,
            ground_points=products.ground_points, outliers_removed=products.outliers_removed,
            object_class="object_class.tif" if products.object_class is not None else None,
            inputs=[dict(location=s.location, crs=s.crs.name if s.crs else None,
                         crs_from=s.crs.origin if s.crs else None, points=s.count)
                    for s in sources],
            params=params or {},
        )
        (tmp / "lidar.json").write_text(json.dumps(meta, indent=2, default=str))
    products.files = files
    return files
