"""Benchmark: LIDAR gridding speed (points per second) on the shared IGN and Coromandel data.

Reports, as medians of several runs on one core:
  * binning   - cell indexing + DSM max + density count + ground sums on points in memory
                (the part this module controls; target >= 5 M points/s per core),
  * sort      - the same DSM max by sort + ``np.maximum.reduceat``, for comparison,
  * end-to-end - ``grid_lidar`` from LAZ files to rasters in memory (LAZ decoding included).

Usage:  python bench/lidar_gridding.py [--runs 5] [--no-write]
Writes/updates the "## LIDAR gridding" section of BENCHMARKS.md at the repository root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# One core: the figures are per core, and BLAS/laz threads would blur them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
DATA = Path(os.environ.get("DEEPDEM_DATA", REPO / ".." / "shared" / "data"))
SECTION = "## LIDAR gridding"
COMMAND = "python bench/lidar_gridding.py --runs 5"


def load(paths, resolution):
    from deepdem.lidar import Grid
    from deepdem.lidar.read import open_sources, stream_points

    sources = open_sources([str(p) for p in paths])
    crs = sources[0].crs.crs
    chunks = list(stream_points(sources, crs))
    x = np.concatenate([c.x for c in chunks])
    y = np.concatenate([c.y for c in chunks])
    z = np.concatenate([c.z for c in chunks])
    cls = np.concatenate([c.classification for c in chunks])
    first = np.concatenate([c.first for c in chunks])
    bounds = (x.min(), y.min(), x.max(), y.max())
    grid = Grid.from_bounds(bounds, resolution, crs)
    return grid, x, y, z, cls, first


def bin_ufunc(grid, x, y, z, cls, first):
    from deepdem.lidar.grid import GroundCells

    idx, inside = grid.cell_index(x, y)
    dsm = np.full(grid.size, -np.inf)
    np.maximum.at(dsm, idx[first], z[first])
    count = np.bincount(idx, minlength=grid.size)
    g = cls == 2
    cells = GroundCells(grid)
    cells.add(idx[g], x[g], y[g], z[g])
    return dsm, count, inside


def bin_sort(grid, x, y, z, cls, first):
    idx, _ = grid.cell_index(x, y)
    i, v = idx[first], z[first]
    order = np.argsort(i, kind="stable")
    si, sv = i[order], v[order]
    starts = np.flatnonzero(np.r_[True, si[1:] != si[:-1]])
    dsm = np.full(grid.size, -np.inf)
    dsm[si[starts]] = np.maximum.reduceat(sv, starts)
    return dsm


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from deepdem.lidar import grid_lidar

    cases = {
        "IGN Montpellier, 6 tiles, 0.5 m": (sorted((DATA / "ign_montpellier").glob("*.laz")), 0.5),
        "Coromandel forest, 0.5 m": ([DATA / "coromandel_forest" / "points.laz"], 0.5),
    }
    rows = []
    for name, (paths, res) in cases.items():
        if not paths or not all(p.exists() for p in paths):
            print(f"skip {name}: data not found under {DATA}", file=sys.stderr)
            continue
        grid, x, y, z, cls, first = load(paths, res)
        n = len(x)
        t_bin = timed(lambda: bin_ufunc(grid, x, y, z, cls, first), args.runs)
        t_sort = timed(lambda: bin_sort(grid, x, y, z, cls, first), args.runs)
        t_e2e = timed(lambda: grid_lidar(paths, resolution=res, progress=False), args.runs)
        rows.append((name, n, grid.width * grid.height, n / t_bin, n / t_sort, n / t_e2e))
        print(f"{name}: {n} points, binning {n / t_bin / 1e6:.1f} M/s, sort+reduceat "
              f"{n / t_sort / 1e6:.1f} M/s, end-to-end {n / t_e2e / 1e6:.2f} M/s")
    if not rows:
        return 1
    if not args.no_write:
        write_section(rows, args.runs)
    return 0


def write_section(rows, runs) -> None:
    import laspy

    from _report import update_benchmarks

    lines = [
        f"Medians of {runs} runs, one thread; numpy {np.__version__}, laspy {laspy.__version__}. "
        "Data from `$DEEPDEM_DATA` (default `../shared/data`).",
        "",
        "| case | points | cells | binning (M pts/s) | sort + reduceat (M pts/s) | "
        "end-to-end incl. LAZ decode (M pts/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, cells, b, s_, e in rows:
        lines.append(f"| {name} | {n:,} | {cells:,} | {b / 1e6:.1f} | {s_ / 1e6:.1f} | {e / 1e6:.2f} |")
    lines += [
        "",
        "Binning = cell index + highest first return (`np.maximum.at`) + density (`np.bincount`) "
        "+ ground sums (`np.bincount` with weights). End-to-end = `grid_lidar` on the LAZ files "
        "(decode, noise filter, binning, TIN DTM), rasters kept in memory.",
    ]
    update_benchmarks(SECTION.removeprefix("## "), COMMAND, lines)


if __name__ == "__main__":
    sys.exit(main())
