"""Accuracy of a DEM against a reference, the way glaciologists and foresters judge one.

Errors are ``DEM − truth`` in metres. For every compared DEM (the refined one, the initial DSM
and simple baselines, see :mod:`deepdem.baselines`) the metrics of :func:`error_metrics` are
computed overall, per land-cover stratum (vegetation, bare, buildings, water, the DSM's filled
holes) and per slope bin, optionally after co-registration to the truth (Nuth & Kääb + a
vertical shift) so that a shift is not mistaken for noise.

All DEMs are compared on the *same* pixels (valid in the truth and in every DEM compared),
otherwise a method that drops hard pixels looks better. The one exception is the stratum of
the initial DSM's holes, where the initial DSM has no value by definition: there, the DEMs that
cover the holes (hole-filled baselines, a refined DEM written with ``--fill``) are compared on
the pixels they all cover.

Given a per-pixel uncertainty σ of the evaluated DEM (``refine``'s ``<out>_sigma.tif``), the
same strata also report how well σ describes the refined DEM's errors (coverage of its central
intervals, sharpness, rank correlation; see :mod:`deepdem.uncertainty`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import Resampling, reproject

from .errors import GridError, InputError
from .io import atomic_path, open_raster, valid_mask
from .scene import Grid
from .uncertainty import DISTRIBUTIONS, LEVELS, calibration_metrics

# -- metrics ---------------------------------------------------------------------------------
NMAD_FACTOR = 1.4826
WITHIN_M = (0.5, 1.0, 2.0)


def _pct_abs(q: float):
    return lambda e: float(np.percentile(np.abs(e), q))


def _within(tol: float):
    return lambda e: float(np.mean(np.abs(e) <= tol))


def _nmad(e: np.ndarray) -> float:
    from geoutils.stats import nmad  # xdem's own NMAD (it points there); imported when first needed

    return float(nmad(e, NMAD_FACTOR))


# Each metric of a non-empty array of finite errors; the same functions serve error_metrics
# and xdem's binning (which wants one scalar statistic per callable).
METRIC_FUNCTIONS = {
    "mae": lambda e: float(np.mean(np.abs(e))),
    "rmse": lambda e: float(np.sqrt(np.mean(e * e))),
    "mean": lambda e: float(np.mean(e)),
    "median": lambda e: float(np.median(e)),
    "nmad": _nmad,
    "p68_abs": _pct_abs(68),
    "p90_abs": _pct_abs(90),
    "p95_abs": _pct_abs(95),
    "p99_abs": _pct_abs(99),
    # LE90, the linear error at 90 % confidence of DEM specifications, taken empirically
    # (90th percentile of |e|, so the same number as p90_abs) rather than as 1.6449·RMSE,
    # which assumes unbiased normal errors that stereo DSMs do not have.
    "le90": _pct_abs(90),
    **{f"within_{tol:g}m": _within(tol) for tol in WITHIN_M},
}
METRIC_KEYS = ("count",) + tuple(METRIC_FUNCTIONS)
METRIC_LABELS = {
    "count": "pixels", "mae": "MAE (m)", "rmse": "RMSE (m)", "mean": "mean error (m)",
    "median": "median error (m)", "nmad": "NMAD (m)", "p68_abs": "p68 |error| (m)",
    "p90_abs": "p90 |error| (m)", "p95_abs": "p95 |error| (m)", "p99_abs": "p99 |error| (m)",
    "le90": "LE90 (m)", "within_0.5m": "|error| ≤ 0.5 m (%)", "within_1m": "|error| ≤ 1 m (%)",
    "within_2m": "|error| ≤ 2 m (%)",
}
PERCENT_KEYS = tuple(f"within_{tol:g}m" for tol in WITHIN_M)


def error_metrics(errors: np.ndarray) -> dict[str, float]:
    """Metrics of signed errors (DEM − truth), in the errors' units; NaNs are ignored.

    ``count``; ``mae``, ``rmse``; ``mean`` and ``median`` (bias); ``nmad`` = 1.4826 ·
    median(|e − median(e)|), the robust spread; ``p68_abs`` … ``p99_abs``, percentiles of |e|
    (numpy's linear interpolation); ``le90`` (= p90 |e|); ``within_0.5m``, ``within_1m``,
    ``within_2m``: the fraction (0–1) of pixels with |e| ≤ 0.5, 1, 2 m. NaN when empty.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {"count": 0, **{key: np.nan for key in METRIC_FUNCTIONS}}
    return {"count": int(e.size), **{key: fn(e) for key, fn in METRIC_FUNCTIONS.items()}}


# -- strata ----------------------------------------------------------------------------------
SLOPE_BINS = (0.0, 5.0, 15.0, 30.0, 45.0, 90.0)
VEGETATION_NDVI = 0.3  # NDVI at or above: vegetation (grass, crops, trees)
WATER_NDVI = 0.0  # NDVI below: open water
OBJECT_HEIGHT = 2.0  # m above the truth DTM: buildings (low NDVI) and tall vegetation
HOLES = "DSM holes (filled)"


def slope_bin_labels(bins=SLOPE_BINS) -> list[str]:
    """Names of the slope bins: '0–5°', …, '>45°' for the last bin when it ends at 90°."""
    labels = [f"{lo:g}–{hi:g}°" for lo, hi in zip(bins[:-1], bins[1:])]
    if bins[-1] >= 90:
        labels[-1] = f">{bins[-2]:g}°"
    return labels


def landcover_strata(
    ndvi: np.ndarray | None = None,
    height: np.ndarray | None = None,
    holes: np.ndarray | None = None,
    vegetation_ndvi: float = VEGETATION_NDVI,
    water_ndvi: float = WATER_NDVI,
    object_height: float = OBJECT_HEIGHT,
) -> dict[str, np.ndarray]:
    """Boolean masks of the land-cover strata (they may overlap: holes cut across the others).

    From NDVI: ``water`` (NDVI < ``water_ndvi``), ``vegetation`` (NDVI ≥ ``vegetation_ndvi``)
    and, with the object ``height`` (truth DSM − truth DTM), ``tall vegetation`` (vegetation
    higher than ``object_height``), ``buildings`` (higher, NDVI low, not water) and ``bare``
    (the low-NDVI ground left). Without a height, ``bare`` cannot be told from roofs and is
    called ``low NDVI (bare or built)``; without NDVI, the height alone gives ``objects`` and
    ``ground``. ``holes`` (pixels where the initial DSM had no data) becomes the stratum
    :data:`HOLES`.
    """
    strata: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore"):
        tall = None if height is None else (np.isfinite(height) & (height > object_height))
        if ndvi is not None:
            known = np.isfinite(ndvi)
            water = known & (ndvi < water_ndvi)
            vegetation = known & (ndvi >= vegetation_ndvi)
            low = known & ~water & ~vegetation
            strata["vegetation"] = vegetation
            if tall is not None:
                strata["tall vegetation"] = vegetation & tall
                strata["bare"] = low & ~tall & np.isfinite(height)
                strata["buildings"] = low & tall
            else:
                strata["low NDVI (bare or built)"] = low
            strata["water"] = water
        elif tall is not None:
            strata["objects (> 2 m)"] = tall
            strata["ground"] = np.isfinite(height) & ~tall
    if holes is not None:
        strata[HOLES] = np.asarray(holes, dtype=bool)
    return strata


def slope_binned_metrics(errors: np.ndarray, slope: np.ndarray, bins=SLOPE_BINS) -> dict[str, dict[str, float]]:
    """:func:`error_metrics` per slope bin, computed by ``xdem.spatialstats.nd_binning``.

    ``errors`` and ``slope`` are arrays of the same shape (NaN = excluded); bins are closed on
    the left, the last one on both sides.
    """
    from xdem.spatialstats import nd_binning

    labels = slope_bin_labels(bins)
    e = np.asarray(errors, dtype=np.float64).ravel()
    s = np.asarray(slope, dtype=np.float64).ravel()
    keep = np.isfinite(e) & np.isfinite(s)
    if not keep.any():
        return {label: error_metrics(np.empty(0)) for label in labels}
    statistics = []
    for key, fn in METRIC_FUNCTIONS.items():
        def stat(v, fn=fn):
            return fn(v) if len(v) else np.nan
        stat.__name__ = key
        statistics.append(stat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty bins: scipy probes the statistics on []
        table = nd_binning(e[keep], [s[keep]], ["slope"], list_var_bins=[np.asarray(bins, dtype=float)],
                           statistics=statistics)
    out = {}
    for label, (_, row) in zip(labels, table.iterrows()):
        count = int(row["count"]) if np.isfinite(row["count"]) else 0
        out[label] = {"count": count, **{key: (float(row[key]) if count else np.nan) for key in METRIC_FUNCTIONS}}
    return out


# -- results ---------------------------------------------------------------------------------
@dataclass
class EvaluationData:
    """The arrays behind an evaluation (one grid, NaN = no data), kept for the report figures."""

    grid: Grid
    truth: np.ndarray
    dems: dict[str, np.ndarray]
    common: np.ndarray
    strata: dict[str, np.ndarray]
    slope: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)  # ortho_left, ortho_right, nodata_mask
    sigma: np.ndarray | None = None  # per-pixel σ of the refined DEM (m), NaN where none

    @property
    def errors(self) -> dict[str, np.ndarray]:
        return {name: values - self.truth for name, values in self.dems.items()}


def _clean(value):
    """JSON-ready: NaN → null, numpy scalars → Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_metric(value: float, key: str) -> str:
    """A metric as the text tables print it (percentages for shares, 3 decimals for metres)."""
    if value is None or not np.isfinite(value):
        return "—"
    if key == "count":
        return f"{int(value)}"
    if key in PERCENT_KEYS:
        return f"{100 * value:.1f}"
    return f"{value:.3f}"


@dataclass
class Evaluation:
    """Metrics per compared DEM on a common set of pixels, overall and per stratum.

    ``metrics[dem][key]``: overall; ``strata[name] = {"kind": "all"|"cover"|"slope",
    "pixels": n, "metrics": {dem: {key: value}}}``; ``coregistration[dem]``: the shifts
    applied (empty unless asked for); ``descriptions[dem]``: what each compared DEM is.
    ``calibration[stratum]``: :func:`deepdem.uncertainty.calibration_metrics` of the refined
    DEM's σ ("all" first, then the strata), read as the standard deviation of a
    ``sigma_distribution``; empty without σ.
    """

    metrics: dict[str, dict[str, float]]
    pixels: int
    strata: dict[str, dict] = field(default_factory=dict)
    coregistration: dict[str, dict] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    target: str = "dsm"
    slope_source: str = "truth DSM"
    data: EvaluationData | None = field(default=None, repr=False, compare=False)
    #: the files compared (dem, truth, initial, scene, sigma), where they came from files
    sources: dict[str, str | None] = field(default_factory=dict, compare=False)
    calibration: dict[str, dict] = field(default_factory=dict)
    sigma_distribution: str | None = None

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_json(), indent=2))
        return Path(path)

    @property
    def methods(self) -> list[str]:
        return list(self.metrics)

    def table(self, methods: list[str] | None = None, rows: tuple[str, ...] | None = None) -> str:
        """The overall metrics, one column per compared DEM (all of them by default)."""
        names = [n for n in (methods or self.methods) if n in self.metrics]
        rows = rows or ("mae", "rmse", "median", "nmad", "p95_abs")
        width = max(max(len(n) for n in names) + 2, 10)
        label_width = max(18, max(len(METRIC_LABELS[k]) for k in rows) + 1)
        lines = [f"{'metric':<{label_width}}" + "".join(f"{n:>{width}}" for n in names)]
        for key in rows:
            lines.append(f"{METRIC_LABELS[key]:<{label_width}}"
                         + "".join(f"{format_metric(self.metrics[n][key], key):>{width}}" for n in names))
        if "initial" in self.metrics and "refined" in self.metrics and self.metrics["initial"]["mae"] > 0:
            ratio = self.metrics["refined"]["mae"] / self.metrics["initial"]["mae"]
            lines.append(f"refined / initial MAE: {ratio:.3f} on {self.pixels} pixels")
        else:
            lines.append(f"on {self.pixels} pixels")
        return "\n".join(lines)

    def strata_table(self, metric: str = "nmad", methods: list[str] | None = None) -> str:
        """One metric per stratum (rows) and compared DEM (columns), with the pixel count."""
        if not self.strata:
            return ""
        names = [n for n in (methods or self.methods) if n in self.metrics]
        width = max(max(len(n) for n in names) + 2, 10)
        label_width = max(len(s) for s in self.strata) + 2
        lines = [f"{METRIC_LABELS[metric]} by stratum",
                 f"{'stratum':<{label_width}}{'pixels':>9}" + "".join(f"{n:>{width}}" for n in names)]
        for stratum, entry in self.strata.items():
            cells = "".join(f"{format_metric(entry['metrics'].get(n, {}).get(metric, np.nan), metric):>{width}}"
                            for n in names)
            lines.append(f"{stratum:<{label_width}}{entry['pixels']:>9}" + cells)
        return "\n".join(lines)

    def main_table(self, metrics: tuple[str, ...] = ("nmad", "median", "mae")) -> str:
        """Noise (NMAD), bias (median) and MAE by stratum and slope bin, one block each."""
        return "\n\n".join(self.strata_table(m) for m in metrics)

    def calibration_table(self) -> str:
        """Calibration of σ per stratum: pixels, coverage of the central 68/90/95 % intervals
        (%), sharpness (median σ, m), the Spearman correlation of σ with |error| and its
        value if σ were exactly right (:func:`deepdem.uncertainty.spearman_if_exact`)."""
        if not self.calibration:
            return ""
        label_width = max(len(s) for s in self.calibration) + 2
        head = f"{'pixels':>9}" + "".join(f"{h:>11}" for h in CALIBRATION_LABELS.values())
        lines = [f"calibration of σ ({self.sigma_distribution}): share of |error| within its central intervals; "
                 "Spearman of σ with |error|, and the Spearman a σ exactly right would reach",
                 f"{'stratum':<{label_width}}{head}"]
        for stratum, m in self.calibration.items():
            lines.append(f"{stratum:<{label_width}}{m['count']:>9}"
                         + "".join(f"{format_calibration(m[k], k):>11}" for k in CALIBRATION_LABELS))
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = {"pixels": self.pixels, "metrics": self.metrics}
        if self.strata:
            out.update(target=self.target, slope_source=self.slope_source, descriptions=self.descriptions,
                       strata=self.strata,
                       coregistration=self.coregistration)
        if self.calibration:
            out.update(sigma_distribution=self.sigma_distribution, calibration=self.calibration)
        return _clean(out)


#: the columns of the calibration tables (text and report), after the pixel count
CALIBRATION_LABELS = {**{f"coverage_{round(100 * lv)}": f"{round(100 * lv)} %" for lv in LEVELS},
                      "sharpness": "σ med (m)", "spearman": "Spearman", "spearman_if_exact": "if exact"}


def format_calibration(value: float, key: str) -> str:
    """A calibration metric as the text tables print it (coverages in percent)."""
    if value is None or not np.isfinite(value):
        return "—"
    return f"{100 * value:.1f}" if key.startswith("coverage_") else f"{value:.3f}"


# -- computation on arrays -------------------------------------------------------------------
DESCRIPTIONS = {"refined": "the evaluated (refined) DEM", "initial": "the initial stereo DSM"}


def evaluate_arrays(
    truth: np.ndarray,
    dems: Mapping[str, np.ndarray],
    grid: Grid,
    ndvi: np.ndarray | None = None,
    holes: np.ndarray | None = None,
    height: np.ndarray | None = None,
    coregister: bool = False,
    images: Mapping[str, np.ndarray] | None = None,
    descriptions: Mapping[str, str] | None = None,
    target: str = "dsm",
    slope_bins=SLOPE_BINS,
    terrain: np.ndarray | None = None,
    slope_source: str | None = None,
    sigma: np.ndarray | None = None,
    sigma_distribution: str = "laplace",
) -> Evaluation:
    """Evaluate DEM arrays (NaN = no data) against ``truth`` on one ``grid``.

    ``ndvi``, ``height`` (truth DSM − truth DTM) and ``holes`` (where the initial DSM had no
    data) define the land-cover strata (:func:`landcover_strata`); slope bins use the slope of
    ``terrain`` (the truth DTM, so that tree crowns and roof edges do not count as steep
    terrain), else of the truth; ``slope_source`` names it in the report. With ``coregister``,
    each DEM is first shifted onto the truth by xdem's Nuth & Kääb and a vertical shift fitted
    on stable ground (low NDVI, not water, no object, slope ≤ 40°).

    ``sigma`` (the refined DEM's per-pixel σ in m; NaN or ≤ 0 = none) adds
    :attr:`Evaluation.calibration`, σ read as the standard deviation of a
    ``sigma_distribution`` (see :mod:`deepdem.uncertainty`).
    """
    from .products import slope_degrees

    if sigma_distribution not in DISTRIBUTIONS:
        raise InputError(f"σ distribution must be one of {', '.join(DISTRIBUTIONS)}, got {sigma_distribution!r}")
    truth = np.asarray(truth, dtype=np.float64)
    dems = {name: np.asarray(values, dtype=np.float64) for name, values in dems.items()}
    coregistration: dict[str, dict] = {}
    if coregister:
        dems, coregistration = _coregister_all(truth, dems, grid, ndvi, height, holes)
    common = np.isfinite(truth)
    for values in dems.values():
        common &= np.isfinite(values)
    if not common.any():
        raise InputError("no pixel is valid in both the DEM and the truth")
    errors = {name: values - truth for name, values in dems.items()}
    metrics = {name: error_metrics(e[common]) for name, e in errors.items()}
    pixels = int(common.sum())

    masks = landcover_strata(ndvi=ndvi, height=height, holes=holes)
    with np.errstate(invalid="ignore"):
        slope = slope_degrees(truth if terrain is None else np.asarray(terrain, dtype=np.float64), grid.resolution)
    strata = {"all": {"kind": "all", "pixels": pixels, "metrics": metrics}}
    for name, mask in masks.items():
        if name == HOLES:
            strata[name] = _holes_stratum(mask, truth, errors)
            continue
        where = common & mask
        strata[name] = {"kind": "cover", "pixels": int(where.sum()),
                        "metrics": {m: error_metrics(e[where]) for m, e in errors.items()}}
    binned = {m: slope_binned_metrics(np.where(common, e, np.nan), slope, slope_bins) for m, e in errors.items()}
    for label in slope_bin_labels(slope_bins):
        per_method = {m: binned[m][label] for m in errors}
        strata[f"slope {label}"] = {"kind": "slope", "pixels": next(iter(per_method.values()))["count"],
                                    "metrics": per_method}
    calibration = {}
    if sigma is not None:
        sigma = _positive(sigma, truth.shape)
        calibration = _calibration(errors[sigma_owner(dems)], sigma, common, masks, slope, slope_bins,
                                   sigma_distribution)
    data = EvaluationData(grid=grid, truth=truth, dems=dems, common=common, strata=masks, slope=slope,
                          images=dict(images or {}), sigma=sigma)
    described = {name: (descriptions or {}).get(name, DESCRIPTIONS.get(name, name)) for name in dems}
    if slope_source is None:
        slope_source = f"truth {target.upper()}" if terrain is None else "terrain"
    return Evaluation(metrics=metrics, pixels=pixels, strata=strata, coregistration=coregistration,
                      descriptions=described, target=target, slope_source=slope_source, data=data,
                      calibration=calibration, sigma_distribution=sigma_distribution if calibration else None)


def sigma_owner(dems: Mapping[str, np.ndarray]) -> str:
    """The DEM that σ belongs to: ``refined``, else the first one compared."""
    return "refined" if "refined" in dems else next(iter(dems))


def _positive(sigma: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """σ as float64 with NaN where it is no standard deviation (nodata, ≤ 0)."""
    sigma = np.array(sigma, dtype=np.float64)
    if sigma.shape != shape:
        raise InputError(f"σ has shape {sigma.shape}, the DEM {shape}")
    with np.errstate(invalid="ignore"):
        sigma[~(sigma > 0)] = np.nan
    return sigma


def _slope_masks(slope: np.ndarray, bins) -> dict[str, np.ndarray]:
    """The slope bins as masks, closed on the left and the last on both sides (as nd_binning).

    The error metrics go through xdem's nd_binning, which bins one array's statistics; σ's
    calibration is a statistic of two arrays (|error| against σ), so it needs the masks.
    """
    masks = {}
    edges = list(zip(bins[:-1], bins[1:]))
    with np.errstate(invalid="ignore"):
        for i, (label, (lo, hi)) in enumerate(zip(slope_bin_labels(bins), edges)):
            masks[label] = (slope >= lo) & ((slope <= hi) if i == len(edges) - 1 else (slope < hi))
    return masks


def _calibration(errors: np.ndarray, sigma: np.ndarray, common: np.ndarray, masks: dict[str, np.ndarray],
                 slope: np.ndarray, slope_bins, distribution: str) -> dict[str, dict]:
    """Calibration of σ against the evaluated DEM's errors on the pixels the other metrics use:
    the common pixels, per land-cover stratum and slope bin; in the holes, wherever the
    evaluated DEM has a value (it is the only DEM σ speaks for)."""
    def metrics(where):
        return calibration_metrics(errors[where], sigma[where], distribution)

    out = {"all": metrics(common)}
    for name, mask in masks.items():
        out[name] = metrics((mask & np.isfinite(errors)) if name == HOLES else (common & mask))
    for label, mask in _slope_masks(slope, slope_bins).items():
        out[f"slope {label}"] = metrics(common & mask)
    return out


def _holes_stratum(holes: np.ndarray, truth: np.ndarray, errors: dict[str, np.ndarray]) -> dict:
    """Metrics where the initial DSM had no data, for the DEMs that cover those pixels.

    A DEM takes part when it covers at least half of the holes' truth pixels (hole-filled
    baselines do, the initial DSM cannot); they are compared on the pixels all of them cover.
    """
    target = holes & np.isfinite(truth)
    n = int(target.sum())
    taking_part = [m for m, e in errors.items() if n and np.isfinite(e[target]).sum() >= 0.5 * n]
    where = target.copy()
    for m in taking_part:
        where &= np.isfinite(errors[m])
    empty = error_metrics(np.empty(0))
    return {"kind": "cover", "pixels": int(where.sum()) if taking_part else 0,
            "metrics": {m: (error_metrics(e[where]) if m in taking_part else dict(empty)) for m, e in errors.items()}}


def _coregister_all(truth, dems, grid, ndvi, height, holes):
    """Shift every DEM onto the truth (see :mod:`deepdem.coregister`); returns the shifted DEMs
    and each DEM's shifts."""
    from .coregister import apply_shift, coregister_arrays, stable_ground

    if grid.crs is None:
        raise InputError("co-registration needs a CRS (the DEM has none)")
    exclude = None if height is None else (np.isfinite(height) & (height > OBJECT_HEIGHT))
    stable = stable_ground(truth, grid.resolution, ndvi=ndvi, exclude=exclude)
    shifted, shifts = {}, {}
    for name, values in dems.items():
        result = coregister_arrays(truth, values, grid.transform, grid.crs, stable)
        shifted[name] = apply_shift(values.astype(np.float32), grid.transform, grid.crs, result,
                                    heights=True).astype(np.float64)
        shifts[name] = result.to_json()
    return shifted, shifts


# -- files -----------------------------------------------------------------------------------
def read_on_grid(path: str | os.PathLike, grid: Grid | None, target: str | None = None) -> tuple[np.ndarray, Grid]:
    """Read a DEM as float64 with NaN nodata, resampled bilinearly onto ``grid`` if given.

    With ``target``, a raster of several bands (a two-head refine's DSM and DTM, or their σ)
    gives the band its description names for that target; otherwise band 1 is read.
    """
    with warnings.catch_warnings():
        # A raster without georeferencing is fine on the DEM's own grid and refused below
        # otherwise; rasterio's warning would only break the one-line error.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        src = open_raster(path)
    with src:
        raw = src.read(_target_band(src, target, path) if target else 1)
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
            raise GridError("does not overlap the DEM it is compared with", path)
        return out, grid


def _target_band(src, target: str, path) -> int:
    """The 1-based band of ``src`` holding ``target`` ('dsm' or 'dtm'): the only band, or the
    one whose description names it (``deepdem refine`` describes each band of a two-head model)."""
    if src.count == 1:
        return 1
    named = [i for i, text in enumerate(src.descriptions, start=1) if text and target.upper() in text.upper().split()]
    if len(named) != 1:
        raise InputError(f"has {src.count} bands and {'none' if not named else 'several'} described as the "
                         f"{target.upper()} (band descriptions: {list(src.descriptions)})", path)
    return named[0]


def evaluate(
    dem: str | os.PathLike,
    truth: str | os.PathLike | None = None,
    initial: str | os.PathLike | None = None,
    scene=None,
    coregister: bool = False,
    target: str = "dsm",
    baselines: bool | None = None,
    sigma: str | os.PathLike | None = None,
    sigma_distribution: str | None = None,
) -> Evaluation:
    """Compare ``dem`` (and ``initial``, and baselines made from it) with ``truth``.

    ``scene`` (a :class:`deepdem.scene.Scene` or its directory) supplies the orthoimages, NDVI,
    nodata mask and truth DTM for strata and figures, and defaults ``initial`` to its DSM and
    ``truth`` to its ``truth_<target>``. ``baselines`` (default: whenever there is an initial
    DSM) adds the filters of :mod:`deepdem.baselines`. A two-band ``dem`` (a two-head refine's DSM
    and DTM) is read at the band its description names for ``target``. ``sigma``, a raster of the
    DEM's per-pixel σ (read on the DEM's grid, at ``target``'s band the same way), adds :attr:`Evaluation.calibration`; ``sigma_distribution``
    defaults to the raster's own tag (:func:`deepdem.uncertainty.read_sigma_distribution`). The
    result is data: write it with :meth:`Evaluation.write_json` and
    :func:`deepdem.report.write_report`.
    """
    from .scene import Scene

    if target not in ("dsm", "dtm"):
        raise InputError(f"target must be 'dsm' or 'dtm', got {target!r}")
    if scene is not None and not isinstance(scene, Scene):
        scene = Scene.open(scene)
    if truth is None:
        if scene is None or not scene.has(f"truth_{target}"):
            raise InputError(f"no truth given and the scene has no truth_{target} band",
                             scene.path if scene is not None else dem)
        truth = scene.band_path(f"truth_{target}")
    if initial is None and scene is not None:
        initial = scene.band_path("dsm")

    dem_data, grid = read_on_grid(dem, None, target)
    if not np.isfinite(dem_data).any():
        raise InputError("DEM has no valid pixel", dem)
    truth_data, _ = read_on_grid(truth, grid)
    if not np.isfinite(truth_data).any():
        raise InputError("truth has no valid pixel", truth)
    # σ before the baselines: a bad σ file should fail fast
    sigma_data = None
    if sigma is not None:
        sigma_data, sigma_distribution = _read_sigma(sigma, sigma_distribution, grid, dem_data, truth_data, target)
    dems = {"refined": dem_data}
    descriptions = dict(DESCRIPTIONS)
    initial_data = None
    if initial is not None:
        initial_data = read_on_grid(initial, grid)[0]
        dems["initial"] = initial_data
        if baselines is None or baselines:
            from .baselines import BASELINE_DESCRIPTIONS, compute_baselines

            dems.update(compute_baselines(initial_data, grid.transform, grid.crs, target))
            descriptions.update(BASELINE_DESCRIPTIONS)
    if not (np.isfinite(truth_data) & np.isfinite(dem_data)).any():
        raise InputError("no pixel is valid in both the DEM and the truth", truth)

    layers = _scene_layers(scene, grid, truth_data, target) if scene is not None else {}
    holes = None if initial_data is None else ~np.isfinite(initial_data)

    try:
        result = evaluate_arrays(truth_data, dems, grid, holes=holes, coregister=coregister,
                                 descriptions=descriptions, target=target, **layers,
                                 sigma=sigma_data, sigma_distribution=sigma_distribution or "laplace")
    except InputError as exc:
        if exc.path is None:
            raise InputError(str(exc), truth) from None
        raise
    result.sources = {"dem": str(dem), "truth": str(truth), "initial": None if initial is None else str(initial),
                      "scene": None if scene is None else str(scene.path)}
    if sigma is not None:
        result.sources["sigma"] = str(sigma)
    return result


def _scene_layers(scene, grid: Grid, truth: np.ndarray, target: str) -> dict:
    """The scene's layers on the DEM's grid, as keyword arguments of :func:`evaluate_arrays`:
    NDVI, object height (truth DSM − truth DTM), terrain for the slope, and the images."""
    def band(name):
        return read_on_grid(scene.band_path(name), grid)[0]

    layers: dict = {"ndvi": band("ndvi") if scene.has("ndvi") else None,
                    "images": {name: band(name) for name in ("ortho_left", "ortho_right", "nodata_mask")
                               if scene.has(name)}}
    if scene.has("truth_dtm"):
        terrain = truth if target == "dtm" else band("truth_dtm")
        layers.update(terrain=terrain, slope_source="truth DTM")
        surface = truth if target == "dsm" else (band("truth_dsm") if scene.has("truth_dsm") else None)
        if surface is not None:
            layers["height"] = surface - terrain
    return layers


def _read_sigma(path, distribution: str | None, grid: Grid, dem: np.ndarray, truth: np.ndarray, target: str):
    """σ on the DEM's grid (NaN where ≤ 0 or no data) and the distribution it is read as (the
    file's tag unless given); refused, naming the file, when it has nothing to evaluate."""
    from .uncertainty import read_sigma_distribution

    if distribution is None:
        distribution = read_sigma_distribution(path)
    elif distribution not in DISTRIBUTIONS:
        raise InputError(f"σ distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}", path)
    data = _positive(read_on_grid(path, grid, target)[0], grid.shape)
    valid = np.isfinite(data)
    if not valid.any():
        raise InputError("σ raster has no valid pixel (finite and > 0)", path)
    if not (valid & np.isfinite(dem) & np.isfinite(truth)).any():
        raise InputError("σ raster has no valid pixel where the DEM and the truth both have data", path)
    return data, distribution
