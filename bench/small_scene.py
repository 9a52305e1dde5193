"""The small-scene transfer check, as a user runs it: one ~100 m scene, the public CLI, 8 minutes.

The protocol of the check that issue 13 describes (and that is run again outside this
repository): ``deepdem train --chip-size 64 --max-minutes 8`` on one scene of about 100 × 100 m,
then ``deepdem refine`` at its defaults on scenes it never saw, scored by the MAE ratio
refined ÷ initial DSM on the pixels valid in the truth and the inputs. Here the training scene is
a 200 × 200 px (100 m) crop of Delft tile 1 of ``bench/real_terrain.py``, and the unseen scenes
are that benchmark's held-out sites: a tile of the same city (Delft tile 2), a forest in another
country (Coromandel), and Montpellier and Autzen. Every scene is prepared as the check's
``deepdem prepare`` command prepares it, without the views' angles: ``train`` fits the pair's
geometry on the crop's truth and ``refine`` reads the unseen scenes with it. Each error kind
(``model``: the generator's statistical model; ``sgbm``: views matched by OpenCV's semi-global
matcher) trains and is tested on its own. Training is limited by wall-clock minutes, as in the protocol: run it on a quiet
machine.

Beside deepdem, the plain smp Unet-resnet18 of ``bench/real_terrain.py`` trains on the same crop
for the same wall-clock minutes, the simplest alternative a user could write. ``--variant FLAGS``
runs deepdem again with extra ``deepdem train`` flags (a default under test) and adds a table of
it against the defaults, seed by seed.

``--fine-tune`` measures what a checkpoint trained elsewhere gives a user of the check: one model
is trained on the benchmark's other training sites (both error kinds, the same chip and minutes),
then ``deepdem train --init`` fine-tunes it on the crop for the check's minutes, beside the
defaults seed by seed; the fine-tuned model, the defaults and the checkpoint alone refine the
unseen scenes. It keeps its own results and writes its own BENCHMARKS.md section.

``--refine-only`` refines the unseen scenes again with each seed's saved defaults checkpoint,
at today's ``refine`` defaults, and keeps the plain UNet's results: a change to ``refine`` alone
is measured on the same trained models.

``--tta`` measures ``deepdem refine --tta`` (the 8 flips and rotations of each chip averaged, 8×
the compute): each seed's defaults run refines the unseen scenes twice, at the defaults and with
``--tta``, so the two differ only in the refining. Its own results and section too.

    python bench/small_scene.py [--seeds 0 1 2] [--minutes 8] [--only deepdem plain] [--write]
    python bench/small_scene.py --variant="--relief-share 0.25" --write
    python bench/small_scene.py --fine-tune --write
    python bench/small_scene.py --tta --write
    python bench/small_scene.py --refine-only --write
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from deepdem.flags import positive
from deepdem.grid import Grid
from deepdem.scene import Scene, write_scene

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402
from real_terrain import (ERRORS, SITES, build_scenes, build_scenes_without_views, default_work,  # noqa: E402
                          made_by_current_generator, plain_unet_predict, plain_unet_train, range_cell, read_refined,
                          score, stamp_generator)

TRAINING_SITE = "Delft tile 1 (NL)"
CROP = Window(col_off=100, row_off=100, width=200, height=200)  # 100 m at 0.5 m, away from the tile's edges
CHIP = 64
METHODS = ("deepdem", "plain")
VARIANT = "deepdem "  # a variant's results are kept under "deepdem <its train flags>"
FINE_TUNED, PRETRAINED = "fine-tuned", "pretrained"  # --fine-tune's results
TTA_REFINED = "refined with --tta"  # --tta's results: the defaults' checkpoints refined again


def crop_scene(scene: Scene, window: Window, out: Path) -> Scene:
    """The window of every band of ``scene`` as a scene of its own (written once, kept until the generator changes)."""
    if not made_by_current_generator(out):
        grid = Grid(scene.crs, scene.transform * scene.transform.translation(window.col_off, window.row_off),
                    int(window.height), int(window.width))
        write_scene(out, grid, {band: scene.read(band, window) for band in scene.bands})
        stamp_generator(out)
    return Scene.open(out)


def deepdem(*args: str) -> None:
    """Run a deepdem command; its own one-line error has gone to stderr when it fails."""
    done = subprocess.run([sys.executable, "-m", "deepdem", *args], stdout=subprocess.DEVNULL)
    if done.returncode:
        print(f"small_scene.py: error: 'deepdem {args[0]}' failed (exit {done.returncode}); no results written",
              file=sys.stderr)
        raise SystemExit(2)


def deepdem_run(training: Scene | list[Scene], tests: dict[str, Scene], run_dir: Path, seed: int, minutes: float,
                train_flags: tuple[str, ...] = ()):
    """deepdem through its CLI: train (with ``train_flags`` added), then refine each unseen scene at the defaults."""
    scene_flags = [arg for scene in (training if isinstance(training, list) else [training])
                   for arg in ("--scene", str(scene.path))]
    deepdem("train", *scene_flags, "--out", str(run_dir), "--chip-size", str(CHIP),
            "--max-minutes", str(minutes), "--seed", str(seed), "--no-progress", *train_flags)
    return refine_all(run_dir, tests), json.loads((run_dir / "train.json").read_text())["epochs"]


def refine_all(run_dir: Path, tests: dict[str, Scene], refine_flags: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """``deepdem refine`` at its defaults (with ``refine_flags`` added) and the run's best checkpoint, on each unseen scene."""
    refined = {}
    suffix = flags_slug(" ".join(refine_flags))
    for site, scene in tests.items():
        out = run_dir / f"refined-{list(SITES).index(site)}-{scene.path.name}{'-' + suffix if suffix else ''}.tif"
        deepdem("refine", "--checkpoint", str(run_dir / "best.ckpt"), "--scene", str(scene.path),
                "--out", str(out), "--quiet", *refine_flags)
        refined[site] = read_refined(out)
    return refined


def flags_slug(flags: str) -> str:
    """Command-line flags as a file-name part (run folders, refined files): '--relief-share 0.25' -> 'relief_share_0.25'."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", flags).strip("_")


def pretraining_sites(scenes: dict) -> list[Scene]:
    """The benchmark's training scenes of the sites other than the crop's: what 'trained elsewhere' means here."""
    return [scene for (site, _), scene in scenes.items() if SITES[site][1] == "train" and site != TRAINING_SITE]


def plain_run(training: Scene, tests: dict[str, Scene], seed: int, minutes: float):
    """The plain smp Unet-resnet18 of bench/real_terrain.py, for the same wall-clock minutes."""
    model, scale, steps = plain_unet_train([training], minutes * 60, seed, chip=CHIP, clock=time.monotonic)
    refined = {site: plain_unet_predict(model, scale, scene, chip=CHIP) for site, scene in tests.items()}
    return refined, round(steps * 16 / 512, 1)


def run(work: Path, seeds: list[int], minutes: float, methods: list[str], results: dict,
        refine_only: bool = False) -> dict:
    scenes = build_scenes_without_views(work, build_scenes(work))
    if not any(site == TRAINING_SITE for site, _ in scenes):
        print(f"small_scene.py: error: the training site {TRAINING_SITE} is missing (set DEEPDEM_DATA)", file=sys.stderr)
        raise SystemExit(2)
    if "deepdem" in methods:  # variants are compared seed by seed with the defaults run they followed
        for stale in [m for m in results if m.startswith(VARIANT)]:
            del results[stale]
    for method in methods:
        results[method] = {"ratio": {}, "worse_strata": {}, "epochs": {}, "seeds": seeds, "minutes": minutes}
    if refine_only:
        results["deepdem"]["refined_again"] = True
    if FINE_TUNED in methods:  # one checkpoint for every seed and error kind, as a user downloads one
        results[PRETRAINED] = {"ratio": {}, "worse_strata": {}, "epochs": {}, "seeds": [0], "minutes": minutes,
                               "sites": sorted({site for (site, _) in scenes if SITES[site][1] == "train"} - {TRAINING_SITE})}
        pretrained = work / "small-run-pretrained"
        deepdem_run(pretraining_sites(scenes), {}, pretrained, 0, minutes)
    for errors in ERRORS:
        training = crop_scene(scenes[(TRAINING_SITE, errors)], CROP, work / f"small-scene-{errors}-views-unknown")
        tests = {site: scene for (site, kind), scene in scenes.items() if kind == errors and SITES[site][1] == "test"}
        if FINE_TUNED in methods:
            record(results[PRETRAINED], errors, tests, refine_all(pretrained, tests),
                   json.loads((pretrained / "train.json").read_text())["epochs"])
        for seed in seeds:
            for method in [m for m in methods if m != TTA_REFINED]:  # the defaults' runs refine for --tta
                if method == "deepdem" and refine_only:
                    run_dir = work / f"small-run-{errors}-{seed}"
                    if not (run_dir / "best.ckpt").exists():
                        print(f"small_scene.py: error: --refine-only: no checkpoint in {run_dir}; run the check "
                              "first", file=sys.stderr)
                        raise SystemExit(2)
                    refined = refine_all(run_dir, tests)
                    epochs = json.loads((run_dir / "train.json").read_text())["epochs"]
                elif method == "deepdem":
                    run_dir = work / f"small-run-{errors}-{seed}"
                    refined, epochs = deepdem_run(training, tests, run_dir, seed, minutes)
                    if TTA_REFINED in methods:
                        record(results[TTA_REFINED], errors, tests, refine_all(run_dir, tests, ("--tta",)), epochs)
                elif method.startswith(VARIANT):
                    flags = method[len(VARIANT):]
                    run_dir = work / f"small-run-{flags_slug(flags)}-{errors}-{seed}"
                    refined, epochs = deepdem_run(training, tests, run_dir, seed, minutes, tuple(shlex.split(flags)))
                elif method == FINE_TUNED:
                    refined, epochs = deepdem_run(training, tests, work / f"small-run-fine-tuned-{errors}-{seed}", seed,
                                                  minutes, ("--init", str(pretrained / "best.ckpt")))
                else:
                    refined, epochs = plain_run(training, tests, seed, minutes)
                record(results[method], errors, tests, refined, epochs)
                print(f"{method}, {errors} seed {seed}: " + ", ".join(
                    f"{k.split('|')[0]} {v[-1]:.3f}" for k, v in results[method]["ratio"].items() if k.endswith(errors)),
                    flush=True)
    return results


def record(results: dict, errors: str, tests: dict[str, Scene], refined: dict[str, np.ndarray], epochs: float) -> None:
    """The MAE ratio refined ÷ initial of each unseen scene, and its strata worse than the input."""
    results["epochs"].setdefault(errors, []).append(epochs)
    for site, scene in tests.items():
        evaluation = score(scene, {"refined": refined[site], "initial DSM": scene.read("dsm").astype(np.float64)})
        worse = [stratum for stratum, entry in evaluation.strata.items()
                 if entry.get("pixels", 0) >= 1000 and "metrics" in entry
                 and entry["metrics"]["refined"]["mae"] > entry["metrics"]["initial DSM"]["mae"]]
        key = f"{site}|{errors}"
        results["ratio"].setdefault(key, []).append(evaluation.metrics["refined"]["mae"]
                                                    / evaluation.metrics["initial DSM"]["mae"])
        results["worse_strata"].setdefault(key, []).append(worse)


def tables(results: dict) -> list[str]:
    ours, plain = results["deepdem"], results.get("plain")
    seeds, minutes = ours["seeds"], ours["minutes"]
    rows = ["| unseen site | errors | deepdem ÷ initial MAE, median (min–max) | plain UNet ÷ initial | "
            "deepdem ÷ plain UNet | strata (≥ 1,000 px) where deepdem is worse than the initial DSM, per seed | "
            "plain UNet: number of such strata, per seed |",
            "|---|---|---:|---:|---:|---|---|"]
    for key, ratios in ours["ratio"].items():
        site, errors = key.split("|")
        worse = "; ".join(", ".join(w) or "none" for w in ours["worse_strata"][key])
        if plain and key in plain["ratio"]:
            theirs = plain["ratio"][key]
            against = f"{range_cell(theirs)} | {np.median(ratios) / np.median(theirs):.3f}"
            plain_worse = "; ".join(str(len(w)) for w in plain["worse_strata"][key])
        else:
            against, plain_worse = "not run | –", "–"
        rows.append(f"| {site} | {errors} | {range_cell(ratios)} | {against} | {worse} | {plain_worse} |")
    epochs = "; ".join(f"{name} " + ", ".join(f"{errors} {np.median(e):.0f}" for errors, e in r["epochs"].items())
                       for name, r in (("deepdem", ours), ("plain UNet", plain)) if r)
    rows += ["", f"Training: a 100 × 100 m crop of {TRAINING_SITE}, `deepdem train --chip-size {CHIP} "
             f"--max-minutes {minutes:g}`, seeds {', '.join(map(str, seeds))}; `deepdem refine` at its defaults (on "
             "scenes this small they average each chip's 8 flips and rotations, `--tta`); every "
             "scene prepared without the views' angles, as the check's `deepdem prepare` command (the pair's "
             "geometry fitted by `train` on the crop). "
             f"The plain UNet is the one of the real-terrain benchmark (all bands, L1, random chips, no "
             f"hold-out, the training scene's scale factor, 50 % overlap with a Hann window), trained on the "
             f"same crop for the same {minutes:g} wall-clock minutes at chip {CHIP}. "
             + ("deepdem's checkpoints were refined again at today's `deepdem refine` defaults (`--refine-only`). "
                if ours.get("refined_again") else "")
             + f"Median epochs of 512 chips: "
             f"{epochs}. The check asks for a ratio ≤ 0.60 on both unseen scenes (the tile of the same city "
             "and the forest) and no scene above 1.0."]
    for method in sorted(m for m in results if m.startswith(VARIANT)):
        flags = method[len(VARIANT):]
        rows += ["", f"deepdem with `{flags}` against the defaults of the table above (same seeds, minutes and "
                 "crop; trained after them, on the same quiet machine):", "",
                 *variant_table(f"`{flags}`", results[method], ours)]
    return rows


def fine_tune_tables(results: dict) -> list[str]:
    """--fine-tune's run: the fine-tuned model against the defaults trained beside it, and the checkpoint alone."""
    ours, pretrained = results["deepdem"], results[PRETRAINED]
    seeds, minutes = ours["seeds"], ours["minutes"]
    epochs = "; ".join(f"{name} " + ", ".join(f"{errors} {np.median(e):.0f}" for errors, e in results[key]["epochs"].items())
                       for name, key in (("defaults", "deepdem"), ("fine-tuned", FINE_TUNED)))
    return [*variant_table("fine-tuned", results[FINE_TUNED], ours, {"checkpoint alone ÷ initial": pretrained}), "",
            f"The checkpoint: `deepdem train` on {' and '.join(pretrained['sites'])} (both error kinds, chip {CHIP}, "
            f"{minutes:g} wall-clock minutes, seed 0; {np.median(sum(pretrained['epochs'].values(), [])):.0f} epochs "
            f"of 512 chips), trained elsewhere as far as the check is concerned: neither the crop's site nor an "
            f"unseen one. Fine-tuned: `deepdem train --init` from it with the check's `--chip-size {CHIP} "
            f"--max-minutes {minutes:g}` on the 100 × 100 m crop of {TRAINING_SITE}; defaults: the same command "
            f"without `--init`, run beside it seed by seed (seeds {', '.join(map(str, seeds))}) on the same quiet "
            f"machine. Both refine at the defaults. Median epochs of 512 chips on the crop: {epochs}. The "
            "checkpoint alone refines the unseen scenes without fine-tuning."]


def tta_tables(results: dict) -> list[str]:
    """--tta's run: the defaults' checkpoints refined with --tta against the same refined at the defaults."""
    ours = results["deepdem"]
    epochs = ", ".join(f"{errors} {np.median(e):.0f}" for errors, e in ours["epochs"].items())
    return [*variant_table("`refine --tta`", results[TTA_REFINED], ours), "",
            f"Each seed's checkpoint (seeds {', '.join(map(str, ours['seeds']))}) of `deepdem train --chip-size {CHIP} "
            f"--max-minutes {ours['minutes']:g}` on the 100 × 100 m crop of {TRAINING_SITE} refines every unseen "
            f"scene twice: `deepdem refine` at its defaults and `deepdem refine --tta`; the ratios compare the two "
            f"refinings of the same model. Median epochs of 512 chips: {epochs}."]


def variant_table(label: str, variant: dict, ours: dict, references: dict[str, dict] | None = None) -> list[str]:
    """A deepdem variant against the defaults: medians, and the ratio seed by seed (same seed, same chips).

    ``references`` adds a column of ratios ÷ initial per named result (e.g. the checkpoint a variant
    starts from).
    """
    references = references or {}
    rows = [f"| unseen site | errors | {label} ÷ initial MAE, median (min–max) | defaults ÷ initial | "
            f"{label} ÷ defaults, seed by seed | strata worse than the initial DSM, per seed |"
            + "".join(f" {name} |" for name in references),
            "|---|---|---:|---:|---|---|" + "---:|" * len(references)]
    better = total = 0
    for key, ratios in variant["ratio"].items():
        site, errors = key.split("|")
        defaults = ours["ratio"][key]
        paired = [f"{v / d:.3f}" for v, d in zip(ratios, defaults)]
        better += sum(v < d for v, d in zip(ratios, defaults))
        total += len(paired)
        worse = "; ".join(str(len(w)) for w in variant["worse_strata"][key])
        extra = "".join(f" {range_cell(ref['ratio'][key])} |" for ref in references.values())
        rows.append(f"| {site} | {errors} | {range_cell(ratios)} | {range_cell(defaults)} | {', '.join(paired)} | "
                    f"{worse} |{extra}")
    rows += ["", f"{label[0].upper()}{label[1:]} has the lower MAE in {better} of {total} (scene, seed) pairs."]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=positive, default=8.0, help="training's wall-clock limit (--max-minutes)")
    parser.add_argument("--work", default=str(default_work()),
                        help="working folder, shared with bench/real_terrain.py (its scenes are reused)")
    parser.add_argument("--only", choices=METHODS, nargs="+", default=list(METHODS),
                        help="run these methods only; the others keep the results of the last run")
    parser.add_argument("--variant", metavar="FLAGS",
                        help="run only deepdem with these extra 'deepdem train' flags (quoted, e.g. "
                        "--variant=\"--relief-share 0.25\") and compare it with the last defaults run")
    parser.add_argument("--fine-tune", action="store_true",
                        help="run deepdem fine-tuned (--init) from a model trained on the other training sites, "
                        "beside the defaults, seed by seed (its own results and BENCHMARKS.md section)")
    parser.add_argument("--tta", action="store_true",
                        help="refine each defaults run again with 'deepdem refine --tta' and compare, seed by seed "
                        "(its own results and BENCHMARKS.md section)")
    parser.add_argument("--refine-only", action="store_true",
                        help="refine the unseen scenes again with the last run's deepdem checkpoints (same seeds and "
                        "minutes), keeping the plain UNet's results: for a change to refine alone")
    parser.add_argument("--tables-only", action="store_true", help="print (and --write) the tables of the last run")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.refine_only:
        if args.fine_tune or args.tta or args.variant is not None or args.tables_only:
            parser.error("--refine-only re-refines the defaults' checkpoints: give it alone")
        args.only = ["deepdem"]
    if args.fine_tune and args.tta:
        parser.error("--fine-tune and --tta are two comparisons: run them one after the other")
    for flag, given in (("--fine-tune", args.fine_tune), ("--tta", args.tta)):
        if given and (args.variant is not None or args.tables_only):
            parser.error(f"{flag} runs its own comparison: give it without --variant or --tables-only")
    if args.variant is not None:
        if not args.variant.strip():
            parser.error("--variant: give the extra 'deepdem train' flags")
        args.only = [VARIANT + " ".join(shlex.split(args.variant))]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for flag, given, method, name, make_tables, title in (
            ("--fine-tune", args.fine_tune, FINE_TUNED, "fine-tune", fine_tune_tables,
             "Small-scene check: fine-tuning from a checkpoint trained elsewhere"),
            ("--tta", args.tta, TTA_REFINED, "tta", tta_tables,
             "Small-scene check: refine --tta against the defaults")):
        if given:
            results = run(work, args.seeds, args.minutes, ["deepdem", method], {})
            (work / f"small-scene-{name}.json").write_text(json.dumps(results, indent=1))
            rows = make_tables(results)
            print("\n".join(rows))
            if args.write:
                update_benchmarks(title, f"python bench/small_scene.py --seeds {' '.join(map(str, args.seeds))} "
                                  f"--minutes {args.minutes:g} {flag} --write", rows)
            return
    results_file = work / "small-scene.json"
    earlier = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.tables_only or args.refine_only or "deepdem" not in args.only:
        flag = ("--tables-only" if args.tables_only else "--refine-only" if args.refine_only
                else "--variant" if args.variant else "--only")
        if "deepdem" not in earlier:
            parser.error(f"{flag}: no earlier deepdem run in {work} "
                         f"({results_file.name} is missing or has none)")
        if not args.tables_only and (earlier["deepdem"]["seeds"], earlier["deepdem"]["minutes"]) != (args.seeds, args.minutes):
            parser.error(f"{flag}: the last deepdem run had seeds {earlier['deepdem']['seeds']} and "
                         f"{earlier['deepdem']['minutes']:g} minutes; use the same to compare like with like")
    if args.tables_only:
        results = earlier
    else:
        results = run(work, args.seeds, args.minutes, args.only, earlier, refine_only=args.refine_only)
        results_file.write_text(json.dumps(results, indent=1))
    rows = tables(results)
    print("\n".join(rows))
    if args.write:
        seeds, minutes = results["deepdem"]["seeds"], results["deepdem"]["minutes"]
        base = f"python bench/small_scene.py --seeds {' '.join(map(str, seeds))} --minutes {minutes:g}"
        commands = [f"{base} --write"] + ([f"{base} --refine-only --write"] if results["deepdem"].get("refined_again")
                                          else []) + [f"{base} --variant=\"{method[len(VARIANT):]}\" --write"
                                          for method in sorted(m for m in results if m.startswith(VARIANT))]
        update_benchmarks("Small-scene transfer check", "`, then `".join(commands), rows)


if __name__ == "__main__":
    main()
