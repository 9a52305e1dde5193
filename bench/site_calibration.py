"""σ fitted to each held-out site on a reference patch (``deepdem calibrate``), scored on the rest.

Training's σ factor, fitted on the training scenes' validation chips, misses the nominal coverage
on some held-out sites of ``bench/real_terrain.py`` by up to 18 points. This benchmark plays a
user who has a reference DEM over a strip of the site (a LIDAR patch): on each held-out scene
of that benchmark and each seed's checkpoint (``run-{seed}-0/best.ckpt``), it

1. refines the scene with the checkpoint;
2. runs :func:`deepdem.calibrate.calibrate_to_reference` against the LIDAR truth of the scene's
   west strip only (10 % or 25 % of its columns);
3. refines again with the calibrated copy;

and scores σ on the east 75 % of the scene, which no calibration saw, for the training factor
and each site factor. Nothing is retrained: run ``bench/real_terrain.py`` first.

    python bench/site_calibration.py [--seeds 0 1 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from deepdem.calibrate import calibrate_to_reference
from deepdem.io import write_raster
from deepdem.refine import refine, sigma_path

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402
from real_terrain import (SITES, build_scenes, default_work, generator_line, range_cell, read_refined,  # noqa: E402
                          scenes_generator, score)

#: the west strips the reference covers, as shares of the scene's columns
PATCHES = (0.10, 0.25)
#: σ is scored east of the widest strip
SCORED_FROM = max(PATCHES)
TRAINING = "training's factor"


def run(work: Path, seeds: list[int]) -> dict:
    scenes = build_scenes(work)
    tests = {key: scene for key, scene in scenes.items() if SITES[key[0]][1] == "test"}
    results: dict = {"generator": scenes_generator(work)}
    for (site, errors), scene in tests.items():
        truth = scene.read("truth_dsm")
        first_scored = int(round(truth.shape[1] * SCORED_FROM))
        references = {}
        for share in PATCHES:
            patch = np.full_like(truth, np.nan)
            columns = int(round(truth.shape[1] * share))
            patch[:, :columns] = truth[:, :columns]
            references[share] = write_raster(work / f"site-reference-{list(SITES).index(site)}-{errors}-{share:g}.tif",
                                             patch, scene.transform, scene.crs, nodata=float("nan"))
        for seed in seeds:
            run_dir = work / f"run-{seed}-0"
            # one view per chip (--no-tta), as calibrate needs: the views' spread does not scale with its factor
            refined = {TRAINING: refine(run_dir / "best.ckpt", scene, run_dir / "site.tif", tta=False, progress=False)}
            factors = {}
            for share, reference in references.items():
                name = f"site factor, {100 * share:.0f} % strip"
                site_checkpoint = run_dir / f"site-{share:g}.ckpt"
                fitted = calibrate_to_reference(run_dir / "best.ckpt", refined[TRAINING], reference, site_checkpoint)
                factors[name] = fitted.factor
                refined[name] = refine(site_checkpoint, scene, run_dir / f"site-{share:g}.tif", tta=False,
                                       progress=False)
            for name, path in refined.items():
                heights = read_refined(path)
                heights[:, :first_scored] = np.nan  # scored where no calibration looked
                metrics = score(scene, {name: heights, "initial DSM": scene.read("dsm").astype(np.float64)},
                                sigma=read_refined(sigma_path(path))).calibration["all"]
                entry = results.setdefault(f"{site}|{errors}", {}).setdefault(name, [])
                entry.append({"coverage_68": metrics["coverage_68"], "coverage_90": metrics["coverage_90"],
                              "spearman": metrics["spearman"], "sharpness": metrics["sharpness"],
                              "factor": factors.get(name, 1.0)})
        print(f"{site} | {errors}: done", flush=True)
    return results


def tables(results: dict, seeds: list[int]) -> list[str]:
    rows = ["| site | errors | σ factor | fitted factor | 68 % interval covers (%) | 90 % covers (%) | "
            "Spearman σ vs abs(error) | median σ (m) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    within = {}
    for key, per in results.items():
        if key == "generator":
            continue
        for name, values in per.items():
            c68, c90 = [100 * v["coverage_68"] for v in values], [100 * v["coverage_90"] for v in values]
            within.setdefault(name, []).append(abs(np.median(c68) - 68) <= 5 and abs(np.median(c90) - 90) <= 5)
            factor = "–" if name == TRAINING else range_cell([v["factor"] for v in values], 2)
            rows.append(f"| {' | '.join(key.split('|'))} | {name} | {factor} | {range_cell(c68, 1)} | "
                        f"{range_cell(c90, 1)} | {range_cell([v['spearman'] for v in values], 2)} | "
                        f"{range_cell([v['sharpness'] for v in values], 2)} |")
    summary = "; ".join(f"{name}: {sum(ok)} of {len(ok)}" for name, ok in within.items())
    rows += ["", f"Held-out scenes whose seed-median 68 % and 90 % coverages are both within ±5 points: {summary}.",
             "", f"Checkpoints: deepdem (defaults) of `bench/real_terrain.py`, seeds {', '.join(map(str, seeds))} "
             "(median over seeds, min–max). The site factor is `deepdem calibrate` fitted on the LIDAR truth of the "
             f"scene's west strip; σ is scored on its east {100 * (1 - SCORED_FROM):.0f} % for every row. Spearman "
             "is the same for every factor: one factor does not change σ's ranks.", "", generator_line(results)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=str(default_work()), help="bench/real_terrain.py's working folder")
    parser.add_argument("--tables-only", action="store_true", help="print (and --write) the tables of the last run")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(args.work)
    results_file = work / "site-calibration.json"
    wanted = [results_file] if args.tables_only else [work / f"run-{seed}-0" / "best.ckpt" for seed in args.seeds]
    missing = [str(path) for path in wanted if not path.exists()]
    if missing:
        parser.error(f"needs an earlier bench/real_terrain.py run; missing: {', '.join(missing)}")
    if args.tables_only:
        results = json.loads(results_file.read_text())
    else:
        results = run(work, args.seeds)
        results_file.write_text(json.dumps(results, indent=1))
    rows = tables(results, args.seeds)
    print("\n".join(rows))
    if args.write:
        update_benchmarks("Uncertainty σ calibrated at the site",
                          f"python bench/site_calibration.py --seeds {' '.join(map(str, args.seeds))} --write", rows)


if __name__ == "__main__":
    main()
