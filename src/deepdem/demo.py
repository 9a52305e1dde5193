"""The end-to-end demo: synth → prepare → train → refine → evaluate → report and figure.

A training scene and a held-out scene (another seed, so other terrain, buildings and trees)
are generated, prepared into Scenes, a model is trained within a CPU budget, and the held-out
scene is refined and evaluated against its truth.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .evaluate import Evaluation, evaluate
from .prepare import prepare_from_asp_dir
from .refine import refine, sigma_path
from .report import demo_figure, write_report
from .synth import synth_scene
from .train import train

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    evaluation: Evaluation
    figure: Path
    refined: Path
    checkpoint: Path
    seconds: float
    report: Path | None = None  # the held-out scene's evaluation report directory


#: The demo's training: epochs of 256 chips, and the time limit in minutes that stops it sooner.
DEMO_EPOCHS, DEMO_MINUTES = 62, 10.0


def run_demo(
    out: str | Path = "demo_output",
    train_epochs: int = DEMO_EPOCHS,
    train_minutes: float = DEMO_MINUTES,
    size: int = 512,
    chip_size: int = 128,
    train_seed: int = 1,
    heldout_seed: int = 2,
    progress: bool | None = None,
    relief_augmentation: bool = False,
) -> DemoResult:
    """Run the whole workflow on generated data and write everything under ``out``.

    Training runs ``train_epochs`` epochs (on 2 CPU cores 3.5 minutes with native bf16, 7.7 in float32), so
    that the demo's result is the same on every machine, unless ``train_minutes`` runs out first:
    10 minutes keep ``make demo`` within 15 minutes with the install on the slower CPUs, which then
    train fewer epochs.

    The held-out scene comes from the same generator as the training scene, so the model trains
    without relief augmentation (which buys transfer to steeper terrain than the training
    scenes', at a cost on terrain like them: see BENCHMARKS.md, ablations).
    """
    started = time.time()
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(out)
    if size < 2 * chip_size:
        # Checked before anything is written: training needs a chip for training and one held out.
        raise InputError(f"--size {size} is too small for --chip-size {chip_size}: the demo needs at least {2 * chip_size} px")
    out.mkdir(parents=True, exist_ok=True)

    def step(message):
        print(f"[deepdem demo {time.time() - started:6.1f} s] {message}", flush=True)

    step(f"generating a training scene (seed {train_seed}) and a held-out scene (seed {heldout_seed}), {size}x{size} px")
    synth_scene(out / "raw_train", seed=train_seed, size=size)
    synth_scene(out / "raw_heldout", seed=heldout_seed, size=size)
    step("preparing scenes (alignment, nodata mask, parallax between the orthos, CLAHE, scale factors)")
    train_scene = prepare_from_asp_dir(out / "raw_train", out / "scene_train")
    heldout_scene = prepare_from_asp_dir(out / "raw_heldout", out / "scene_heldout")
    step(f"training {train_epochs} epochs, for at most {train_minutes:g} min (chip {chip_size}, "
         f"scale factor {train_scene.scale_factor(chip_size):.2f} m)")
    result = train([train_scene], out / "run", chip_size=chip_size, max_epochs=train_epochs, max_minutes=train_minutes,
                   samples_per_epoch=256, lr=1e-3, progress=progress, relief_augmentation=relief_augmentation)
    step(f"trained {result.epochs} epochs; best validation MAE {result.best_val_mae:.3f} m "
         f"(initial {result.initial_val_mae:.3f} m)")
    step("refining the held-out scene")
    refined = refine(result.checkpoint, heldout_scene, out / "heldout_refined.tif", progress=progress)
    step("evaluating against the held-out truth")
    sigma = sigma_path(refined)
    evaluation = evaluate(refined, heldout_scene.band_path("truth_dsm"), initial=heldout_scene.band_path("dsm"),
                          scene=heldout_scene, sigma=sigma if sigma.exists() else None)
    evaluation.write_json(out / "heldout_metrics.json")
    write_report(evaluation, out / "report")
    print(evaluation.table(["refined", "initial"]), flush=True)
    print(flush=True)
    print(evaluation.main_table(), flush=True)
    if evaluation.calibration:
        print(flush=True)
        print(evaluation.calibration_table(), flush=True)
    step(f"report (tables, metrics by stratum and slope, figures) written to {out / 'report' / 'report.md'}")
    figure = demo_figure(heldout_scene, refined, out / "demo.png")
    step(f"figure written to {figure}")
    seconds = time.time() - started
    (out / "demo.json").write_text(json.dumps({**evaluation.to_json(), "seconds": round(seconds, 1)}, indent=2))
    return DemoResult(evaluation, figure, refined, result.checkpoint, seconds, out / "report")

