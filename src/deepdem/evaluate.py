"""Accuracy of a DEM against a reference: MAE, RMSE, median, NMAD and tails, side by side.

The refined DEM and the initial DSM are always compared on the *same* pixels (valid in the
truth and in every DEM compared), otherwise a method that drops hard pixels looks better.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.warp import Resampling, reproject

from .errors import GridError, InputError
from .io import atomic_path, open_raster, valid_mask
from .scene import Grid


def error_metrics(errors: np.ndarray) -> dict[str, float]:
    """Metrics of signed errors (DEM − truth), in the errors' units.

    NMAD = 1.4826 · median(|e − median(e)|), robust to blunders.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {"count": 0, "mae": np.nan, "rmse": np.nan, "mean": np.nan, "median": np.nan, "nmad": np.nan, "p95_abs": np.nan}
    median = float(np.median(e))
    return {
        "count": int(e.size),
        "mae": float(np.mean(np.abs(e))),
        "rmse": float(np.sqrt(np.mean(e * e))),
        "mean": float(np.mean(e)),
        "median": median,
        "nmad": float(1.4826 * np.median(np.abs(e - median))),
        "p95_abs": float(np.percentile(np.abs(e), 95)),
    }


@dataclass
class Evaluation:
    """Metrics per compared DEM (``refined``, ``initial``) on a common set of pixels."""

    metrics: dict[str, dict[str, float]]
    pixels: int

    def table(self) -> str:
        names = list(self.metrics)
        rows = [("MAE (m)", "mae"), ("RMSE (m)", "rmse"), ("median error (m)", "median"),
                ("NMAD (m)", "nmad"), ("p95 |error| (m)", "p95_abs")]
        width = max(len(n) for n in names) + 2
        lines = [f"{'metric':<18}" + "".join(f"{n:>{max(width, 10)}}" for n in names)]
        for label, key in rows:
            lines.append(f"{label:<18}" + "".join(f"{self.metrics[n][key]:>{max(width, 10)}.3f}" for n in names))
        if "initial" in self.metrics and "refined" in self.metrics and self.metrics["initial"]["mae"] > 0:
            ratio = self.metrics["refined"]["mae"] / self.metrics["initial"]["mae"]
            lines.append(f"refined / initial MAE: {ratio:.3f} on {self.pixels} pixels")
        else:
            lines.append(f"on {self.pixels} pixels")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"pixels": self.pixels, "metrics": self.metrics}


def _read_on_grid(path: str | os.PathLike, grid: Grid | None) -> tuple[np.ndarray, Grid]:
    """Read a DEM as float64 with NaN nodata, resampled bilinearly onto ``grid`` if given."""
    with open_raster(path) as src:
        raw = src.read(1)
        data = raw.astype(np.float64)
        data[~valid_mask(raw, src.nodata)] = np.nan
        own = Grid(src.crs, src.transform, src.height, src.width)
        if grid is None or (own.crs == grid.crs and own.transform == grid.transform and own.shape == grid.shape):
            return data, own
        if src.crs is None or grid.crs is None:
            raise GridError("raster has no CRS and is not on the evaluated DEM's grid", path)
        out = np.full(grid.shape, np.nan)
        reproject(data, out, src_transform=src.transform, src_crs=src.crs, src_nodata=np.nan,
                  dst_transform=grid.transform, dst_crs=grid.crs, dst_nodata=np.nan,
                  resampling=Resampling.bilinear)
        if not np.isfinite(out).any():
            raise GridError("does not overlap the evaluated DEM", path)
        return out, grid


def evaluate(
    dem: str | os.PathLike,
    truth: str | os.PathLike,
    initial: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
) -> Evaluation:
    """Compare ``dem`` (and ``initial``) with ``truth`` on the pixels valid in all of them."""
    dem_data, grid = _read_on_grid(dem, None)
    if not np.isfinite(dem_data).any():
        raise InputError("DEM has no valid pixel", dem)
    truth_data, _ = _read_on_grid(truth, grid)
    compared = {"refined": dem_data}
    if initial is not None:
        compared["initial"] = _read_on_grid(initial, grid)[0]
    common = np.isfinite(truth_data)
    for values in compared.values():
        common &= np.isfinite(values)
    if not common.any():
        raise InputError("no pixel is valid in both the DEM and the truth", truth)
    metrics = {name: error_metrics(values[common] - truth_data[common]) for name, values in compared.items()}
    result = Evaluation(metrics=metrics, pixels=int(common.sum()))
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json.dumps(result.to_json(), indent=2))
    return result
