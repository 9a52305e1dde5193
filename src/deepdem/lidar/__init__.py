"""LIDAR ground truth: LAS/LAZ/COPC files, folders, EPT/COPC URLs and USGS 3DEP to truth rasters.

Main entry point: :func:`grid_lidar` (DSM, DTM, density, optional CHM). Lower-level pieces:
:func:`open_sources` / :func:`stream_points` (chunked reading, noise removal, CRS mapping),
:func:`read_las_crs` (CRS and units of a LAS header), :class:`~deepdem.grid.Grid`,
:func:`tin_interpolate`, the SMRF ground filter (:func:`smrf_surface`, :class:`SMRFParams`),
the relief-aware outlier filter (:class:`OutlierParams`), and remote access
(:func:`find_3dep`, :func:`open_remote`).
"""

from ..grid import Grid
from .chunks import PointSource
from .crs import PointMapper, SourceCRS, read_las_crs
from .grid import tin_interpolate
from .ground import OutlierParams, SMRFParams, smrf_object_mask, smrf_surface
from .products import LidarProducts, grid_lidar, write_products
from .read import PointFilter, open_sources, stream_points
from .remote import DEFAULT_3DEP_INDEX, find_3dep, open_remote

__all__ = [
    "DEFAULT_3DEP_INDEX", "Grid", "LidarProducts", "OutlierParams", "PointFilter",
    "PointMapper", "PointSource", "SMRFParams", "SourceCRS", "find_3dep", "grid_lidar",
    "open_remote", "open_sources", "read_las_crs", "smrf_object_mask", "smrf_surface",
    "stream_points", "tin_interpolate", "write_products",
]
