"""``deepdem lidar``: LIDAR files, folders, URLs or USGS 3DEP to DSM/DTM/density rasters."""

from __future__ import annotations

import argparse
import sys

from ..errors import DeepDEMError, InputError
from ..flags import OneLineParser, number, positive
from .ground import OutlierParams, SMRFParams
from .read import NOISE_CLASSES, PointFilter


def add_lidar_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``lidar`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "lidar",
        help="grid LIDAR (LAS/LAZ/COPC/EPT, USGS 3DEP) into truth DSM, DTM and density",
        description="Grid LIDAR points into dsm.tif (highest first return per cell), dtm.tif "
                    "(ground points, TIN-interpolated within --max-gap) and density.tif. "
                    "DIR appears only when every output is complete.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="LAS/LAZ/COPC files, folders, or http(s) URLs (COPC or EPT ept.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--resolution", type=positive, help="cell size in output CRS units")
    p.add_argument("--crs", help="output CRS (e.g. EPSG:32631): points are reprojected and "
                                 "heights converted to its units; assigned to files without one")
    p.add_argument("--bounds", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="output extent in the output CRS (default: union of the inputs)")
    p.add_argument("--like", metavar="RASTER", help="copy the grid of this raster")
    p.add_argument("--chm", action="store_true", help="also write chm.tif = DSM - DTM")
    p.add_argument("--max-gap", type=number(float, 0), default=20.0, metavar="M",
                   help="longest gap (m) the DTM triangulation may bridge (default 20)")
    p.add_argument("--dsm-fill-gap", type=number(float, 0), default=1.0, metavar="M",
                   help="fill DSM cells without returns within this distance (m, default 1; "
                        "0 disables)")
    g = p.add_argument_group("ground")
    g.add_argument("--ground", choices=("auto", "class", "filter"), default="auto",
                   help="ground from classes, from the SMRF filter, or auto (filter only when "
                        "no point is classified ground)")
    g.add_argument("--ground-classes", type=int, nargs="+", default=[2], metavar="C")
    d = SMRFParams()
    g.add_argument("--smrf-cell", type=positive, default=d.cell, metavar="M")
    g.add_argument("--smrf-slope", type=number(float, 0), default=d.slope)
    g.add_argument("--smrf-window", type=positive, default=d.window, metavar="M")
    g.add_argument("--smrf-threshold", type=positive, default=d.threshold, metavar="M")
    g.add_argument("--smrf-scalar", type=number(float, 0), default=d.scalar)
    f = p.add_argument_group("point filters")
    f.add_argument("--exclude-classes", type=int, nargs="*", default=list(NOISE_CLASSES),
                   metavar="C", help="classes dropped (default: 7 18, the noise classes)")
    f.add_argument("--drop-overlap", action="store_true",
                   help="drop overlap points (class 12 and the LAS 1.4 overlap flag)")
    f.add_argument("--outlier-filter", action="store_true",
                   help="drop isolated high/low points (relief-aware, local)")
    o = OutlierParams()
    f.add_argument("--outlier-threshold", type=positive, default=o.threshold, metavar="M")
    f.add_argument("--outlier-relief-factor", type=positive, default=o.relief_factor)
    r = p.add_argument_group("USGS 3DEP")
    r.add_argument("--3dep", dest="usgs_3dep", action="store_true",
                   help="fetch USGS 3DEP points over --bounds (in --crs) or the --like grid")
    r.add_argument("--3dep-index", dest="index_url", default=None, metavar="URL",
                   help="3DEP boundaries GeoJSON (default: the hobuinc/usgs-lidar index)")
    r.add_argument("--date", help="pick the 3DEP survey nearest this date (YYYY or YYYY-MM-DD)")
    r.add_argument("--all-surveys", action="store_true",
                   help="use every intersecting 3DEP survey, not only the nearest/newest")
    r.add_argument("--buffer", type=number(float, 0), default=None, metavar="M",
                   help="extra margin read around the grid (default: --max-gap)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_lidar)
    return p


def run_lidar(args) -> int:
    """Run the ``lidar`` subcommand; user errors print one line and return 2."""
    import pyproj

    from .products import grid_lidar

    try:
        inputs = list(args.inputs)
        if args.usgs_3dep:
            from ..grid import Grid
            from .crs import parse_user_crs
            from .remote import DEFAULT_3DEP_INDEX, find_3dep

            if args.like:
                gs = Grid.like(args.like)
                bounds, crs = gs.bounds, gs.crs
            elif args.bounds and args.crs:
                bounds, crs = args.bounds, parse_user_crs(args.crs)
            else:
                raise InputError("--3dep needs --bounds with --crs, or --like")
            buffer = args.max_gap if args.buffer is None else args.buffer
            inputs += find_3dep(bounds, crs, date=args.date, index_url=args.index_url or
                                DEFAULT_3DEP_INDEX, buffer=buffer, all_surveys=args.all_surveys)
        if not inputs:
            raise InputError("no INPUT given (files, folders, URLs or --3dep)")
        smrf = SMRFParams(cell=args.smrf_cell, slope=args.smrf_slope, window=args.smrf_window,
                          threshold=args.smrf_threshold, scalar=args.smrf_scalar)
        outliers = OutlierParams(threshold=args.outlier_threshold,
                                 relief_factor=args.outlier_relief_factor) \
            if args.outlier_filter else None
        products = grid_lidar(
            inputs, resolution=args.resolution, out_dir=args.out, crs=args.crs,
            bounds=args.bounds, like=args.like, max_gap=args.max_gap,
            dsm_fill_gap=args.dsm_fill_gap, chm=args.chm, ground=args.ground,
            ground_classes=tuple(args.ground_classes), smrf=smrf, outliers=outliers,
            point_filter=PointFilter(exclude_classes=tuple(args.exclude_classes),
                                     drop_overlap=args.drop_overlap),
            progress=False if args.no_progress else None,
        )
    except DeepDEMError as exc:
        print(f"deepdem: error: {exc}", file=sys.stderr)
        return 2
    g = products.grid
    print(f"{args.out}: {g.width} x {g.height} cells at {g.res} "
          f"({pyproj.CRS.from_user_input(g.crs).name}); "
          f"{products.points_gridded} points, {products.ground_points} ground "
          f"({products.ground_source})")
    return 0


def main(argv=None) -> int:
    """Standalone entry point (``python -m deepdem.lidar.cli``) for use before wiring."""
    parser = OneLineParser(prog="deepdem")
    sub = parser.add_subparsers(dest="command", required=True)
    add_lidar_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
