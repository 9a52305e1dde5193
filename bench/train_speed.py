"""Training speed at a small chip: epochs per minute of ``deepdem train``, beside the plain loop.

The small-scene protocol of issue 13 trains for a fixed wall-clock time (``--max-minutes 8`` at
64-px chips), so each epoch that the framework's own work costs (validation, checkpoints, the
optimiser, augmentation) is an epoch the model does not learn from. In each round, one after the
other on the same generated scene:

  * ours - ``deepdem train --chip-size 64 --batch-size B``, B the default batch (given so that an
           older revision does the same work), otherwise at its defaults, for
           ``--seconds`` of training (its ``--max-minutes``);
  * then - with ``--against REV``, the package at another git revision (``git archive``), the
           same command;
  * plain - the plain smp Unet-resnet18 loop of ``bench/real_terrain.py`` (the same chips and
           batch, bf16 autocast, channels-last, Adam 5e-4; no validation, checkpoint, σ head or
           weight average) for the same seconds.

The work counted is training chips (an epoch is 512 of them): deepdem's from the optimiser steps
in its CSV log (logged every 10 steps, so at most 160 chips short), the plain loop's from its
step count. Ratios are taken within each round; the table gives their medians and ranges.

    python bench/train_speed.py [--rounds 3] [--seconds 90] [--against REV] [--write]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402
from real_terrain import plain_unet_train  # noqa: E402
from refine import export_source  # noqa: E402

from deepdem.flags import number, positive_int  # noqa: E402
from deepdem.models import default_encoder_depth  # noqa: E402
from deepdem.prepare import prepare_from_asp_dir  # noqa: E402
from deepdem.scene import Scene  # noqa: E402
from deepdem.synth import synth_scene  # noqa: E402
from deepdem.train import default_batch_size  # noqa: E402

CHIP, EPOCH_CHIPS = 64, 512
# given to both sides explicitly, so that a revision with another default batch (--against) does the same work
BATCH = default_batch_size("dsm")


def deepdem_epochs_per_minute(scene: Scene, run_dir: Path, seconds: float, source: Path | None = None) -> float:
    """Epochs of 512 chips per minute of ``deepdem train`` (the package in ``source``, or the installed one)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-m", "deepdem", "train", "--scene", str(scene.path), "--out", str(run_dir),
                           "--chip-size", str(CHIP), "--batch-size", str(BATCH), "--max-minutes", str(seconds / 60), "--seed", "0", "--no-progress"],
                          env=env, stdout=subprocess.DEVNULL)
    if done.returncode:  # deepdem's own one-line error has gone to stderr
        print(f"train_speed.py: error: 'deepdem train' failed (exit {done.returncode}) with the package in "
              f"{source or 'the environment'}; no results written", file=sys.stderr)
        raise SystemExit(2)
    with open(run_dir / "logs" / "metrics.csv") as f:
        steps = max(int(row["step"]) for row in csv.DictReader(f) if row["step"])
    return steps * BATCH / EPOCH_CHIPS / (seconds / 60)


def plain_epochs_per_minute(scene: Scene, seconds: float) -> float:
    _, _, steps = plain_unet_train([scene], seconds, seed=0, chip=CHIP, clock=time.monotonic, batch=BATCH)
    return steps * BATCH / EPOCH_CHIPS / (seconds / 60)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--seconds", type=number(float, 10), default=90.0,
                        help="training seconds of each run (at least 10: a few epochs to count)")
    parser.add_argument("--against", metavar="REV", help="also time the package at this git revision")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.against and subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--verify", "--quiet",
                                        f"{args.against}^{{commit}}"], capture_output=True).returncode:
        parser.error(f"--against: {args.against!r} is not a commit of this repository")

    speeds: dict[str, list[float]] = {"ours": [], "then": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synth_scene(work / "raw", seed=3, size=200, resolution=0.5)  # 100 m, the small-scene check's size
        scene = prepare_from_asp_dir(work / "raw", work / "scene")
        then = export_source(args.against, work) if args.against else None
        for round_ in range(args.rounds):
            speeds["ours"].append(deepdem_epochs_per_minute(scene, work / f"ours-{round_}", args.seconds))
            if then is not None:
                speeds["then"].append(deepdem_epochs_per_minute(scene, work / f"then-{round_}", args.seconds, then))
            speeds["plain"].append(plain_epochs_per_minute(scene, args.seconds))
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in speeds.items() if v), flush=True)

    def ratios(of: str) -> list[float]:
        return [a / b for a, b in zip(speeds[of], speeds["ours"])]

    rows = ["| run | epochs per minute of training, median (min–max) | its speed ÷ ours, median (min–max) |",
            "|---|---:|---:|",
            f"| ours: `deepdem train --chip-size 64 --batch-size {BATCH}`, otherwise its defaults (resnet18 at depth "
            f"{default_encoder_depth('Unet')}) | {spread(speeds['ours'])} | 1.00 |"]
    if then is not None:
        rows.append(f"| ours at `{args.against}` (`git archive`), the same command | {spread(speeds['then'])} "
                    f"| {spread(ratios('then'))} |")
    rows.append(f"| the plain loop of `bench/real_terrain.py` (smp's Unet-resnet18 at its depth, 5; no validation, "
                "checkpoints, σ head or weight average) "
                f"| {spread(speeds['plain'])} | {spread(ratios('plain'))} |")
    rows += ["", f"A generated 200 × 200 px scene (100 m at 0.5 m), chips of {CHIP} px, batch {BATCH}, bf16 autocast; "
             f"an epoch is {EPOCH_CHIPS} training chips. {args.rounds} rounds of {args.seconds:g} s of training per run, "
             "the runs of a round one after the other; ratios within each round. deepdem's time includes its "
             "validation on the fit after every epoch and its checkpoints; the plain loop does neither."]
    command = (f"python bench/train_speed.py --rounds {args.rounds} --seconds {args.seconds:g}"
               + (f" --against {args.against}" if args.against else "") + " --write")
    print("\n".join(rows))
    if args.write:
        update_benchmarks("Training speed at 64-px chips", command, rows)


if __name__ == "__main__":
    main()
