"""Error statistics of the two stereo-error generators on real LIDAR truths, side by side.

For every site of ``bench/real_terrain.py`` (its gridded truths and ASP-like runs are reused from
its working folder, or made there), the initial DSM of each generator — ``model`` (the
statistical model of ASP's errors) and ``sgbm`` (views rendered and matched by OpenCV's
semi-global matcher) — is compared with the truth: holes, how well the triangulation-error map
ranks the error (a network reads it as an input, so a map that knows where the DSM is wrong
flatters a model's scores), how much of the error the parallax band (the DSM error measured
between the two orthos by ``prepare``, :mod:`deepdem.parallax`) recovers on its own, how well
the orthos' correlation band and the triangulation error find the blunders, and the error's
median, NMAD and MAE on open ground by slope, under canopy and at building edges.

    python bench/synth_errors.py [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402
from real_terrain import ERRORS, build_scenes, default_work, generator_line, scenes_generator  # noqa: E402

from deepdem.evaluate import error_metrics  # noqa: E402
from deepdem.products import slope_degrees  # noqa: E402
from deepdem.uncertainty import calibration_metrics  # noqa: E402


def strata(scene) -> dict[str, np.ndarray]:
    truth, ground = scene.read("truth_dsm"), scene.read("truth_dtm")
    height = np.nan_to_num(truth - ground, nan=0.0)
    with np.errstate(invalid="ignore"):
        slope = slope_degrees(ground.astype(np.float64), scene.grid.resolution)
    raised = height > 2.5
    ndvi = scene.read("ndvi")
    canopy = raised & (np.nan_to_num(ndvi) >= 0.3)
    buildings = raised & ~canopy
    edges = ndimage.binary_dilation(buildings, iterations=2) & ~ndimage.binary_erosion(buildings, iterations=2)
    open_ground = ~raised & ~ndimage.binary_dilation(raised, iterations=2)
    return {
        "open, slope < 10°": open_ground & (slope < 10),
        "open, slope ≥ 10°": open_ground & (slope >= 10),
        "canopy": canopy,
        "building edges (±2 px)": edges,
    }


#: An error this large (m) is a blunder: what a map of where the DSM is wrong must find.
BLUNDER = 3.0
#: Pixels this close to a hole (px) border it: where a matcher's occlusions and blunders gather.
HOLE_BORDER = 3


def blunder_auc(error: np.ndarray, score: np.ndarray) -> float:
    """How well ``score`` ranks the blunders (|error| > :data:`BLUNDER`) above the other pixels:
    the area under the ROC curve (0.5: not at all; 1: every blunder above every other pixel), on
    the pixels where both are known."""
    ok = np.isfinite(error) & np.isfinite(score)
    blunder = np.abs(error[ok]) > BLUNDER
    if blunder.all() or not blunder.any():
        return float("nan")
    # the Mann-Whitney U of the blunders' scores against the others', per pair: the ROC's area
    u = stats.mannwhitneyu(score[ok][blunder], score[ok][~blunder], method="asymptotic").statistic
    return float(u / (blunder.sum() * (~blunder).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(default_work()))
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    scenes = build_scenes(Path(args.work))
    names = ["open, slope < 10°", "open, slope ≥ 10°", "canopy", "building edges (±2 px)"]
    rows = ["| site | errors | holes | triangulation error ~ abs(error), Spearman | parallax band ~ error, r | "
            f"MAE of DSM − parallax band ÷ MAE of DSM | |error| > {BLUNDER:.0f} m: share of pixels / of the error | "
            f"≤ {HOLE_BORDER} px from a hole: share of pixels / of the error | "
            "found by the triangulation error, AUC | found by 1 − ortho correlation, AUC | "
            + " | ".join(f"{n}: median / NMAD / MAE (m)" for n in names) + " |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    totals: dict[str, dict[str, list]] = {e: {n: [] for n in names} for e in ERRORS}
    for (site, errors), scene in scenes.items():
        truth, dsm = scene.read("truth_dsm"), scene.read("dsm")
        error = dsm - truth
        holes = np.isnan(dsm)[np.isfinite(truth)].mean()
        # The map read as a σ of the error: its rank correlation with |error| is what the
        # evaluation reports for a σ, on the pixels where the error and the map are both known.
        triangulation_error = scene.read("triangulation_error")
        ranking = calibration_metrics(error, triangulation_error)["spearman"]
        parallax = scene.read("parallax")
        both = np.isfinite(error) & np.isfinite(parallax)
        correlation = np.corrcoef(error[both], parallax[both])[0, 1]
        recovered = np.mean(np.abs(error[both] - parallax[both])) / np.mean(np.abs(error[both]))
        known = np.isfinite(error)
        blunders = np.abs(error[known]) > BLUNDER
        blunder_cell = f"{blunders.mean():.1%} / {np.abs(error[known])[blunders].sum() / np.abs(error[known]).sum():.0%}"
        # distance of each pixel with data to the nearest hole (the DSM's holes are its NaN)
        near_hole = (ndimage.distance_transform_edt(~np.isnan(dsm)) <= HOLE_BORDER)[known]
        border_cell = f"{near_hole.mean():.0%} / {np.abs(error[known])[near_hole].sum() / np.abs(error[known]).sum():.0%}"
        found_by = [blunder_auc(error, triangulation_error),
                    blunder_auc(error, 1.0 - scene.read("ortho_correlation"))]
        cells = []
        for name, mask in strata(scene).items():
            where = mask & np.isfinite(error)
            if where.sum() < 200:
                cells.append("")
                continue
            m = error_metrics(error[where])
            totals[errors][name].append(error[where])
            cells.append(f"{m['median']:+.2f} / {m['nmad']:.2f} / {m['mae']:.2f}")
        rows.append(f"| {site} | {errors} | {holes:.0%} | {ranking:.2f} | {correlation:.2f} | {recovered:.2f} | "
                    f"{blunder_cell} | {border_cell} | {found_by[0]:.2f} | {found_by[1]:.2f} | " + " | ".join(cells) + " |")
    for errors in ERRORS:
        cells = []
        for name in names:
            if totals[errors][name]:
                m = error_metrics(np.concatenate(totals[errors][name]))
                cells.append(f"{m['median']:+.2f} / {m['nmad']:.2f} / {m['mae']:.2f}")
            else:
                cells.append("")
        rows.append(f"| all sites | {errors} | | | | | | | | | " + " | ".join(cells) + " |")
    rows += ["", "Errors are initial DSM − LIDAR truth on the pixels where both have data; holes are the share of "
             "the truth's pixels the initial DSM leaves empty; the triangulation error's Spearman rank "
             "correlation with |error| is over every pixel where both are known and the map is above 0 (1: it "
             "ranks the errors exactly). The parallax band's Pearson correlation with the error, and the MAE left "
             "when the band is subtracted from the DSM, are over the pixels where both are known. The "
             f"blunders (|error| > {BLUNDER:.0f} m) are found by a map when it ranks them above the other pixels: AUC 0.5 "
             "is chance, 1 every blunder above every other pixel. A pixel borders a hole when the DSM has data "
             f"there and a hole at most {HOLE_BORDER} px away (Euclidean). Canopy: more than 2.5 m above the LIDAR DTM with "
             "NDVI ≥ 0.3; building edges: within 2 px of the boundary of the other raised objects; open ground: "
             "more than 2 px from any raised object, by the slope of the LIDAR DTM.",
             "", generator_line({"generator": scenes_generator(Path(args.work))})]
    print("\n".join(rows))
    if args.write:
        update_benchmarks("Stereo error generators on real LIDAR truths", "python bench/synth_errors.py --write", rows)


if __name__ == "__main__":
    main()
