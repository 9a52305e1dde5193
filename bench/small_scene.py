"""The small-scene transfer check, as a user runs it: one ~100 m scene, the public CLI, 8 minutes.

The protocol of the check that issue 13 describes (and that is run again outside this
repository): ``deepdem train --chip-size 64 --max-minutes 8`` on one scene of about 100 × 100 m,
then ``deepdem refine`` at its defaults on scenes it never saw, scored by the MAE ratio
refined ÷ initial DSM on the pixels valid in the truth and the inputs. Here the training scene is
a 200 × 200 px (100 m) crop of Delft tile 1 of ``bench/real_terrain.py``, and the unseen scenes
are that benchmark's held-out sites: a tile of the same city (Delft tile 2), a forest in another
country (Coromandel), and Montpellier and Autzen. Each error kind (``model``: the generator's
statistical model; ``sgbm``: views matched by OpenCV's semi-global matcher) trains and is tested
on its own. Training is limited by wall-clock minutes, as in the protocol: run it on a quiet
machine.

    python bench/small_scene.py [--seeds 0 1 2] [--minutes 8] [--write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from deepdem.flags import positive
from deepdem.grid import Grid
from deepdem.scene import Scene, write_scene

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402
from real_terrain import ERRORS, SITES, build_scenes, default_work, read_refined, score  # noqa: E402

TRAINING_SITE = "Delft tile 1 (NL)"
CROP = Window(col_off=100, row_off=100, width=200, height=200)  # 100 m at 0.5 m, away from the tile's edges
CHIP = 64


def crop_scene(scene: Scene, window: Window, out: Path) -> Scene:
    """The window of every band of ``scene`` as a scene of its own (written once, kept)."""
    if not (out / "scene.json").exists():
        grid = Grid(scene.crs, scene.transform * scene.transform.translation(window.col_off, window.row_off),
                    int(window.height), int(window.width))
        write_scene(out, grid, {band: scene.read(band, window) for band in scene.bands})
    return Scene.open(out)


def deepdem(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "deepdem", *args], check=True, stdout=subprocess.DEVNULL)


def run(work: Path, seeds: list[int], minutes: float) -> dict:
    scenes = build_scenes(work)
    if not any(site == TRAINING_SITE for site, _ in scenes):
        print(f"small_scene.py: error: the training site {TRAINING_SITE} is missing (set DEEPDEM_DATA)", file=sys.stderr)
        raise SystemExit(2)
    results: dict = {"ratio": {}, "worse_strata": {}, "epochs": {}}
    for errors in ERRORS:
        training = crop_scene(scenes[(TRAINING_SITE, errors)], CROP, work / f"small-scene-{errors}")
        for seed in seeds:
            run_dir = work / f"small-run-{errors}-{seed}"
            deepdem("train", "--scene", str(training.path), "--out", str(run_dir), "--chip-size", str(CHIP),
                    "--max-minutes", str(minutes), "--seed", str(seed), "--no-progress")
            results["epochs"].setdefault(errors, []).append(json.loads((run_dir / "train.json").read_text())["epochs"])
            for (site, kind), scene in scenes.items():
                if kind != errors or SITES[site][1] != "test":
                    continue
                refined = run_dir / f"refined-{list(SITES).index(site)}.tif"
                deepdem("refine", "--checkpoint", str(run_dir / "best.ckpt"), "--scene", str(scene.path),
                        "--out", str(refined), "--quiet")
                evaluation = score(scene, {"deepdem": read_refined(refined),
                                           "initial DSM": scene.read("dsm").astype(np.float64)})
                mae = {name: evaluation.metrics[name]["mae"] for name in ("deepdem", "initial DSM")}
                worse = [stratum for stratum, entry in evaluation.strata.items()
                         if entry.get("pixels", 0) >= 1000 and "metrics" in entry
                         and entry["metrics"]["deepdem"]["mae"] > entry["metrics"]["initial DSM"]["mae"]]
                key = f"{site}|{errors}"
                results["ratio"].setdefault(key, []).append(mae["deepdem"] / mae["initial DSM"])
                results["worse_strata"].setdefault(key, []).append(worse)
            print(f"{errors} seed {seed}: " + ", ".join(
                f"{k.split('|')[0]} {v[-1]:.3f}" for k, v in results["ratio"].items() if k.endswith(errors)), flush=True)
    return results


def tables(results: dict, seeds: list[int], minutes: float) -> list[str]:
    rows = ["| unseen site | errors | refined ÷ initial MAE, median (min–max) | strata (≥ 1,000 px) worse than the initial DSM, per seed |",
            "|---|---|---:|---|"]
    for key, ratios in results["ratio"].items():
        site, errors = key.split("|")
        worse = "; ".join(", ".join(w) or "none" for w in results["worse_strata"][key])
        rows.append(f"| {site} | {errors} | {np.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | {worse} |")
    epochs = ", ".join(f"{errors} {np.median(e):.0f}" for errors, e in results["epochs"].items())
    rows += ["", f"Training: a 100 × 100 m crop of {TRAINING_SITE}, `deepdem train --chip-size {CHIP} "
             f"--max-minutes {minutes:g}` (median epochs: {epochs}), seeds {', '.join(map(str, seeds))}; "
             "`deepdem refine` at its defaults. The check asks for a ratio ≤ 0.60 on both unseen scenes "
             "(the tile of the same city and the forest) and no scene above 1.0."]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=positive, default=8.0, help="training's wall-clock limit (--max-minutes)")
    parser.add_argument("--work", default=str(default_work()),
                        help="working folder, shared with bench/real_terrain.py (its scenes are reused)")
    parser.add_argument("--tables-only", action="store_true", help="print (and --write) the tables of the last run")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "small-scene.json"
    if args.tables_only:
        if not results_file.exists():
            parser.error(f"--tables-only: no earlier run in {work} ({results_file.name} is missing)")
        results = json.loads(results_file.read_text())
    else:
        results = run(work, args.seeds, args.minutes)
        results_file.write_text(json.dumps(results, indent=1))
    rows = tables(results, args.seeds, args.minutes)
    print("\n".join(rows))
    if args.write:
        update_benchmarks("Small-scene transfer check",
                          f"python bench/small_scene.py --seeds {' '.join(map(str, args.seeds))} "
                          f"--minutes {args.minutes:g} --write", rows)


if __name__ == "__main__":
    main()
