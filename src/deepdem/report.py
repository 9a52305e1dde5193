"""The evaluation report: ``report.md`` with tables, ``metrics.json`` and PNG figures.

Figures (matplotlib, Agg backend):

* ``panel.png`` — the seed's panel: both orthoimages, the initial DSM and its valid-pixel mask,
  the refined DEM and the truth as hillshades, and the error maps of the initial and refined DEM;
* ``error_maps.png`` — ``DEM − truth`` of every compared DEM, on one diverging scale centred on 0;
* ``error_histograms.png`` — the error distributions on the common pixels (core and log tails);
* ``metrics_by_stratum.png`` and ``metrics_by_slope.png`` — NMAD and median error per stratum
  and per slope bin, the compared DEMs side by side;
* with a per-pixel σ of the refined DEM: ``reliability.png`` — observed against nominal coverage
  of σ's central intervals, overall and on tall vegetation, bare ground and buildings (a
  calibrated σ follows the diagonal), and ``sigma_map.png`` — σ beside the refined DEM's |error|
  on one colour scale, to see whether σ is large where the errors are.

Every figure function returns a :class:`FigureInfo` with the panel titles, so callers (and the
tests) can tell what was drawn without reading pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .evaluate import (CALIBRATION_LABELS, METRIC_LABELS, PERCENT_KEYS, Evaluation, sigma_owner, format_metric,
                       format_calibration)
from .io import atomic_directory
from .products import hillshade

ERROR_CMAP = "RdBu_r"  # red: DEM above the truth, blue: below
NODATA_COLOUR = "#d9d9d9"  # on error maps: neutral, away from both ends of the diverging scale
HILLSHADE_NODATA = "#e6ab02"  # on grey hillshades a grey hole would pass for flat ground


@dataclass
class FigureInfo:
    """A written figure: its path and the titles of its panels, in drawing order."""

    path: Path
    titles: list[str]


@dataclass
class Report:
    """A written report directory and what it holds."""

    path: Path
    figures: list[FigureInfo] = field(default_factory=list)

    @property
    def markdown(self) -> Path:
        return self.path / "report.md"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cmap(name: str, bad: str = NODATA_COLOUR):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _grey():
    return dict(cmap=_cmap("gray", HILLSHADE_NODATA), vmin=0, vmax=1)


def error_limit(errors: np.ndarray, q: float = 95.0) -> float:
    """Symmetric colour/histogram limit: the ``q``-th percentile of |error| (1 m if none)."""
    e = np.abs(np.asarray(errors, dtype=np.float64))
    e = e[np.isfinite(e)]
    value = float(np.percentile(e, q)) if e.size else 1.0
    return value if value > 1e-6 else 1.0


def _colours(names):
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    fixed = {"refined": palette[3], "initial": palette[7], "idw_median": palette[0],
             "idw_gaussian": palette[2], "smrf_ground": palette[4]}
    spare = iter(c for c in palette if c not in fixed.values())
    return {n: fixed.get(n) or next(spare, palette[1]) for n in names}


def _save(fig, out: Path, dpi: int = 80) -> Path:
    out = Path(out)
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    return out


# -- maps ------------------------------------------------------------------------------------
def panel_figure(
    out: str | os.PathLike,
    truth: np.ndarray,
    initial: np.ndarray,
    refined: np.ndarray,
    resolution: float | tuple[float, float],
    ortho_left: np.ndarray | None = None,
    ortho_right: np.ndarray | None = None,
    nodata_mask: np.ndarray | None = None,
    truth_label: str = "truth",
) -> FigureInfo:
    """The seed-style panel: the two orthos and the mask when given, the initial DSM, refined
    DEM and truth as hillshades (no data in yellow), and the errors of the initial and refined
    DEM (diverging, centred on 0, one scale: the initial DSM's p95 |error|; no data in grey)."""
    plt = _pyplot()
    err_initial, err_refined = initial - truth, refined - truth
    limit = error_limit(err_initial)
    panels = []
    if ortho_left is not None:
        panels.append((ortho_left, "left ortho (equalised)", _grey()))
    if ortho_right is not None:
        panels.append((ortho_right, "right ortho (equalised)", _grey()))
    panels.append((hillshade(initial, resolution), "initial DSM (hillshade, yellow = no data)", _grey()))
    if nodata_mask is not None:
        panels.append((nodata_mask, "valid-pixel mask (white = valid)", _grey()))
    panels += [
        (hillshade(refined, resolution), "refined DEM (hillshade)", _grey()),
        (hillshade(truth, resolution), f"{truth_label} (hillshade)", _grey()),
        (err_initial, f"initial − {truth_label} (m)", dict(cmap=_cmap(ERROR_CMAP), vmin=-limit, vmax=limit)),
        (err_refined, f"refined − {truth_label} (m)", dict(cmap=_cmap(ERROR_CMAP), vmin=-limit, vmax=limit)),
    ]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    error_axes, handle = [], None
    for ax, (image, title, style) in zip(axes.ravel(), panels):
        shown = ax.imshow(image, interpolation="nearest", **style)
        ax.set_title(title)
        if title.endswith("(m)"):
            error_axes.append(ax)
            handle = shown
    # One colour bar for both error maps: per-map bars would squeeze one column out of line.
    fig.colorbar(handle, ax=error_axes, shrink=0.7, extend="both", label="m")
    return FigureInfo(_save(fig, out), [title for _, title, _ in panels])


def error_maps_figure(out: str | os.PathLike, errors: dict[str, np.ndarray], limit: float | None = None,
                      truth_label: str = "truth") -> FigureInfo:
    """``DEM − truth`` of every compared DEM on one diverging scale centred on 0 (grey: no data)."""
    plt = _pyplot()
    names = list(errors)
    if limit is None:
        limit = error_limit(errors.get("initial", next(iter(errors.values()))))
    cols = 2 if len(names) in (2, 4) else min(len(names), 3)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 5 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    titles = []
    handle = None
    for ax, name in zip(axes.ravel(), names):
        handle = ax.imshow(errors[name], interpolation="nearest", cmap=_cmap(ERROR_CMAP), vmin=-limit, vmax=limit)
        titles.append(f"{name} − {truth_label}")
        ax.set_title(titles[-1])
    fig.colorbar(handle, ax=axes.ravel().tolist(), shrink=0.6, extend="both",
                 label=f"DEM − {truth_label} (m), ±p95 |initial error|")
    return FigureInfo(_save(fig, out), titles)


# -- distributions ---------------------------------------------------------------------------
def histogram_figure(out: str | os.PathLike, errors: dict[str, np.ndarray], common: np.ndarray | None = None,
                     truth_label: str = "truth") -> FigureInfo:
    """Error histograms on the common pixels: the core (linear counts, ±p95 |initial error|) and
    the tails (log counts, ±p99.9), with median and NMAD in the legend. Values beyond an axis
    are left out rather than piled into the end bins, which would look like a mode."""
    from .evaluate import error_metrics

    plt = _pyplot()
    colours = _colours(errors)
    values = {n: (e[common] if common is not None else e.ravel()) for n, e in errors.items()}
    values = {n: v[np.isfinite(v)] for n, v in values.items()}
    reference = values.get("initial", next(iter(values.values())))
    core, tail = error_limit(reference, 95), error_limit(reference, 99.9)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    titles = [f"error distribution (DEM − {truth_label}), ±p95 of initial |e|",
              "tails (log scale), ±p99.9 of initial |e|"]
    for ax, limit, log, title in zip(axes, (core, tail), (False, True), titles):
        bins = np.linspace(-limit, limit, 121)
        for name, v in values.items():
            m = error_metrics(v)
            label = f"{name}: median {m['median']:+.2f} m, NMAD {m['nmad']:.2f} m"
            ax.hist(v, bins=bins, histtype="step", linewidth=1.6,
                    color=colours[name], label=label, log=log)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("error (m)")
        ax.set_xlim(-limit, limit)
        ax.set_ylabel("pixels")
        ax.set_title(title)
    axes[0].legend(fontsize=8, loc="upper left")
    return FigureInfo(_save(fig, out), titles)


def strata_figure(out: str | os.PathLike, evaluation: Evaluation, kind: str = "cover",
                  metrics: tuple[str, ...] = ("nmad", "median")) -> FigureInfo:
    """Grouped bars of ``metrics`` per stratum of ``kind`` ("cover": land cover and holes, with
    "all" first; "slope": slope bins), one bar per compared DEM."""
    plt = _pyplot()
    strata = {name: entry for name, entry in evaluation.strata.items()
              if entry["kind"] == kind or (kind == "cover" and entry["kind"] == "all")}
    names = evaluation.methods
    colours = _colours(names)
    labels = [f"{s.removeprefix('slope ')}\n{entry['pixels']:,} px" for s, entry in strata.items()]
    x = np.arange(len(strata))
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8, 1.6 * len(strata) + 3), 4 * len(metrics)),
                             constrained_layout=True, squeeze=False)
    what = "land cover" if kind == "cover" else f"slope of the {evaluation.slope_source}"
    titles = []
    for ax, metric in zip(axes[:, 0], metrics):
        values = {}
        for name in names:
            heights = np.array([entry["metrics"].get(name, {}).get(metric, np.nan) for entry in strata.values()],
                               dtype=np.float64)
            values[name] = 100 * heights if metric in PERCENT_KEYS else heights
        # A DEM far worse than the initial one (e.g. an undertrained model) would flatten every
        # other bar: the axis stops at 3× the initial DSM's largest value and longer bars are
        # cut there, with their value written on them.
        cap = None
        if "initial" in values and np.isfinite(values["initial"]).any():
            cap = 3 * float(np.nanmax(np.abs(values["initial"])))
            if cap <= 0 or np.nanmax([np.nanmax(np.abs(v)) if np.isfinite(v).any() else 0 for v in values.values()]) <= cap:
                cap = None
        for i, name in enumerate(names):
            heights = values[name]
            offsets = x + (i - (len(names) - 1) / 2) * width
            drawn = heights if cap is None else np.clip(heights, -cap, cap)
            bars = ax.bar(offsets, drawn, width, label=name, color=colours[name])
            for bar, xpos, h, d in zip(bars, offsets, heights, drawn):
                if not np.isfinite(h):  # e.g. the initial DSM in its own holes
                    ax.text(xpos, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=8, color="0.4")
                elif h != d:
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
                    ax.text(xpos, d / 2, f"{h:.3g} (cut)", rotation=90, ha="center", va="center", fontsize=8,
                            color="black", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        if cap is not None:
            ax.set_ylim(min(-0.05 * cap, ax.get_ylim()[0]), max(0.05 * cap, ax.get_ylim()[1]))
        if metric in ("median", "mean"):
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, labels, fontsize=9)
        ax.set_ylabel(METRIC_LABELS[metric])
        titles.append(f"{METRIC_LABELS[metric]} by {what}")
        ax.set_title(titles[-1])
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper center", ncol=min(len(names), 6),
               fontsize=9, frameon=False)
    return FigureInfo(_save(fig, out), titles)


# -- uncertainty -----------------------------------------------------------------------------
#: the strata drawn on the reliability diagram besides "all", when the evaluation has them
RELIABILITY_STRATA = ("tall vegetation", "bare", "buildings")


def reliability_figure(out: str | os.PathLike, evaluation: Evaluation) -> FigureInfo:
    """Observed coverage of σ's central intervals against their nominal level, overall and per
    stratum of :data:`RELIABILITY_STRATA`, with the diagonal a calibrated σ would follow."""
    from .uncertainty import reliability_curve

    plt = _pyplot()
    data = evaluation.data
    errors = data.errors[sigma_owner(data.dems)]
    curves = {"all": data.common}
    curves.update({name: data.common & data.strata[name] for name in RELIABILITY_STRATA
                   if name in data.strata and evaluation.calibration.get(name, {}).get("count", 0)})
    fig, ax = plt.subplots(figsize=(6, 6), constrained_layout=True)
    ax.plot([0, 100], [0, 100], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for name, where in curves.items():
        nominal, observed = reliability_curve(errors[where], data.sigma[where], evaluation.sigma_distribution)
        count = evaluation.calibration[name]["count"]
        ax.plot(100 * nominal, 100 * observed, marker="o", markersize=3,
                linewidth=2.2 if name == "all" else 1.4, label=f"{name} ({count:,} px)")
    title = f"coverage of σ's central intervals ({evaluation.sigma_distribution})"
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="nominal coverage (%)", ylabel="observed coverage (%)",
           title=title, aspect="equal")
    ax.text(3, 95, "above: σ too large\nbelow: σ too small", va="top", fontsize=8, color="0.35")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return FigureInfo(_save(fig, out), [title])


def sigma_map_figure(out: str | os.PathLike, sigma: np.ndarray, errors: np.ndarray,
                     truth_label: str = "truth") -> FigureInfo:
    """σ beside |error| of the refined DEM, on one scale from 0 to the larger of their 95th
    percentiles so that the two maps compare pixel by pixel (grey: no data)."""
    plt = _pyplot()
    magnitude = np.abs(errors)
    limit = max(error_limit(sigma), error_limit(magnitude))
    titles = ["σ of the refined DEM (m)", f"|refined − {truth_label}| (m)"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    handle = None
    for ax, image, title in zip(axes, (sigma, magnitude), titles):
        handle = ax.imshow(image, interpolation="nearest", cmap=_cmap("magma"), vmin=0, vmax=limit)
        ax.set_title(title)
        ax.set_axis_off()
    fig.colorbar(handle, ax=axes.tolist(), shrink=0.7, extend="max", label="m")
    return FigureInfo(_save(fig, out), titles)


def _uncertainty_markdown(evaluation: Evaluation) -> list[str]:
    """The "Uncertainty (σ)" section: what the intervals are, and the calibration table."""
    from .uncertainty import LEVELS, fit_temperature, interval_half_width

    distribution = evaluation.sigma_distribution
    widths = ", ".join(f"±{interval_half_width(1.0, lv, distribution):.2f} σ" for lv in LEVELS)
    shape = "Laplace distribution (scale σ/√2)" if distribution == "laplace" else "Gaussian distribution"
    rows = [[name, f"{m['count']:,}"] + [format_calibration(m[k], k) for k in CALIBRATION_LABELS]
            for name, m in evaluation.calibration.items()]
    header = ["stratum", "pixels"] + [f"within {round(100 * lv)} % interval (%)" for lv in LEVELS] + [
        "sharpness: median σ (m)", "Spearman σ vs |error|", "Spearman if σ were exact"]
    out = ["## Uncertainty (σ)", "",
           f"σ is read as the standard deviation of a {shape} of the refined DEM's error, so its central "
           f"68, 90 and 95 % intervals are {widths}; a calibrated σ holds 68, 90 and 95 % of the errors "
           "(more: σ too large, less: too small). Sharpness is the median σ (smaller is better at equal "
           "coverage); Spearman is the rank correlation of σ with |error| (1: σ orders the pixels by error). "
           "Even a σ exactly right does not reach 1: read it beside the Spearman such a σ would reach "
           "(errors drawn from σ itself). Below that, σ misses where the errors are; above it, σ ranks "
           "them but spreads too little.",
           "", _md_table(header, rows), ""]
    data = evaluation.data
    if data is not None and data.sigma is not None:
        errors = data.errors[sigma_owner(data.dems)][data.common]
        try:
            t = fit_temperature(errors, data.sigma[data.common], distribution)
            out += [f"Multiplying σ by **{t:.3f}** would make its 68 % and 90 % intervals hold their share overall.", ""]
        except ValueError:  # no σ on the common pixels: nothing to fit
            pass
    return out


# -- the report ------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A Markdown table; ``|`` in cells (as in "|error|") is escaped, numbers right-aligned."""
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    align = "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|"
    return "\n".join([cells(header), align] + [cells(row) for row in rows])


STRATA_METRICS = ("nmad", "median", "mae", "p95_abs", "within_1m")
OVERALL_METRICS = ("mae", "rmse", "mean", "median", "nmad", "p68_abs", "p90_abs", "p95_abs", "p99_abs",
                   "le90", "within_0.5m", "within_1m", "within_2m")


def report_markdown(evaluation: Evaluation, figures: list[FigureInfo], sources: dict | None = None) -> str:
    """The text of ``report.md``: inputs, compared DEMs, co-registration, overall and per-stratum
    tables, the calibration of σ when there is one, and the figures."""
    names = evaluation.methods
    truth = f"truth {evaluation.target.upper()}"
    out = ["# DEM evaluation", ""]
    if sources:
        out += [f"- **{k}**: `{v}`" for k, v in sources.items() if v] + [""]
    out += [f"Errors are DEM − {truth} in metres (positive: the DEM is above the truth). Every DEM is "
            f"compared on the same {evaluation.pixels:,} pixels, valid in the truth and in every DEM, "
            f"except in the stratum *DSM holes (filled)* (see the notes).", "",
            "## Compared DEMs", "",
            _md_table(["name", "what it is"], [[f"`{n}`", evaluation.descriptions.get(n, n)] for n in names],
                      numeric=False), ""]
    if evaluation.coregistration:
        rows = [[f"`{n}`", f"{c['shift_x']:+.3f}", f"{c['shift_y']:+.3f}", f"{c['shift_z']:+.3f}",
                 f"{c['nmad_before']:.3f}", f"{c['nmad_after']:.3f}", f"{c['stable_pixels']:,}"]
                for n, c in evaluation.coregistration.items()]
        out += ["## Co-registration", "",
                "Each DEM was shifted onto the truth (xdem Nuth & Kääb + vertical shift, fitted on stable "
                "ground: low NDVI, no water, no object, slope ≤ 40°) before the metrics below.", "",
                _md_table(["DEM", "x (m)", "y (m)", "z (m)", "NMAD before (m)", "NMAD after (m)", "stable px"], rows), ""]
    overall = [[METRIC_LABELS[k]] + [format_metric(evaluation.metrics[n][k], k) for n in names] for k in OVERALL_METRICS]
    out += ["## Overall", "", _md_table(["metric"] + [f"`{n}`" for n in names], overall), ""]
    if "initial" in evaluation.metrics and "refined" in evaluation.metrics and evaluation.metrics["initial"]["mae"] > 0:
        ratio = evaluation.metrics["refined"]["mae"] / evaluation.metrics["initial"]["mae"]
        out += [f"refined / initial MAE: **{ratio:.3f}**", ""]
    out += ["## By land cover and slope", ""]
    for metric in STRATA_METRICS:
        rows = [[name, f"{entry['pixels']:,}"] + [format_metric(entry["metrics"].get(n, {}).get(metric, np.nan), metric) for n in names]
                for name, entry in evaluation.strata.items()]
        out += [f"### {METRIC_LABELS[metric]}", "",
                _md_table(["stratum", "pixels"] + [f"`{n}`" for n in names], rows), ""]
    if evaluation.calibration:
        out += _uncertainty_markdown(evaluation)
    out += ["## Figures", ""]
    for figure in figures:
        out += [f"![{', '.join(figure.titles)}]({figure.path.name})", ""]
    out += ["## Notes", "",
            "- Strata: *vegetation* NDVI ≥ 0.3; *water* NDVI < 0; with a truth DTM, *tall vegetation* is "
            "vegetation more than 2 m above it, *buildings* are low-NDVI pixels more than 2 m above it and "
            "*bare* the low-NDVI ground left. Slope bins use the slope of the "
            f"{evaluation.slope_source}. Strata may overlap.",
            "- *DSM holes (filled)*: pixels where the initial DSM had no data. The initial DSM cannot be "
            "scored there (—); the DEMs covering at least half of them are compared on the pixels they all "
            "cover (a refined DEM takes part when refined with `--fill`).",
            "- NMAD = 1.4826 · median |e − median e|; LE90 = 90th percentile of |e|; percentages are the "
            "share of pixels within the tolerance.", ""]
    return "\n".join(out)


def write_report(evaluation: Evaluation, out: str | os.PathLike, sources: dict | None = None) -> Report:
    """Write ``out/`` (``report.md``, ``metrics.json``, figures) atomically: the directory appears
    only when complete, replacing an older report. ``sources`` (the files compared) defaults to
    what :func:`deepdem.evaluate.evaluate` recorded."""
    sources = sources if sources is not None else (evaluation.sources or None)
    data = evaluation.data
    if data is None:
        raise ValueError("the evaluation holds no arrays (evaluate with evaluate() or evaluate_arrays())")
    truth_label = f"truth {evaluation.target.upper()}"
    out = Path(out)
    with atomic_directory(out) as tmp:
        figures = []
        errors = data.errors
        if "initial" in data.dems:
            figures.append(panel_figure(
                tmp / "panel.png", data.truth, data.dems["initial"], data.dems["refined"], data.grid.resolution,
                ortho_left=data.images.get("ortho_left"), ortho_right=data.images.get("ortho_right"),
                nodata_mask=data.images.get("nodata_mask"), truth_label=truth_label))
        figures.append(error_maps_figure(tmp / "error_maps.png", errors, truth_label=truth_label))
        figures.append(histogram_figure(tmp / "error_histograms.png", errors, data.common, truth_label=truth_label))
        figures.append(strata_figure(tmp / "metrics_by_stratum.png", evaluation, "cover"))
        figures.append(strata_figure(tmp / "metrics_by_slope.png", evaluation, "slope"))
        if evaluation.calibration and data.sigma is not None:
            figures.append(reliability_figure(tmp / "reliability.png", evaluation))
            figures.append(sigma_map_figure(tmp / "sigma_map.png", data.sigma, errors[sigma_owner(data.dems)],
                                            truth_label=truth_label))
        (tmp / "metrics.json").write_text(json.dumps({**evaluation.to_json(), "sources": sources or {}}, indent=2))
        (tmp / "report.md").write_text(report_markdown(evaluation, figures, sources))
    return Report(out, [FigureInfo(out / f.path.name, f.titles) for f in figures])


def demo_figure(scene, refined_path: str | os.PathLike, out: str | os.PathLike, truth_band: str = "truth_dsm") -> Path:
    """The seed-style panel (:func:`panel_figure`) of a Scene and a refined GeoTIFF on its grid."""
    import rasterio

    with rasterio.open(refined_path) as src:
        refined = src.read(1, masked=True).filled(np.nan).astype(np.float64)
    info = panel_figure(
        out, scene.read(truth_band).astype(np.float64), scene.read("dsm").astype(np.float64), refined,
        scene.grid.resolution, ortho_left=scene.read("ortho_left"), ortho_right=scene.read("ortho_right"),
        nodata_mask=scene.read("nodata_mask"), truth_label="truth")
    return info.path
