"""The end-to-end demo: synth → prepare → train → refine → evaluate → figure.

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

import numpy as np

from .evaluate import Evaluation, evaluate
from .prepare import prepare_from_asp_dir
from .products import hillshade
from .refine import refine
from .scene import Scene
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


def run_demo(
    out: str | Path = "demo_output",
    train_minutes: float = 5.0,
    size: int = 512,
    chip_size: int = 128,
    train_seed: int = 1,
    heldout_seed: int = 2,
    progress: bool | None = None,
) -> DemoResult:
    """Run the whole workflow on generated data and write everything under ``out``."""
    started = time.time()
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def step(message):
        print(f"[deepdem demo {time.time() - started:6.1f} s] {message}", flush=True)

    step(f"generating a training scene (seed {train_seed}) and a held-out scene (seed {heldout_seed}), {size}x{size} px")
    synth_scene(out / "raw_train", seed=train_seed, size=size)
    synth_scene(out / "raw_heldout", seed=heldout_seed, size=size)
    step("preparing scenes (alignment, nodata mask, CLAHE, scale factors)")
    train_scene = prepare_from_asp_dir(out / "raw_train", out / "scene_train")
    heldout_scene = prepare_from_asp_dir(out / "raw_heldout", out / "scene_heldout")
    step(f"training for at most {train_minutes:g} min (chip {chip_size}, scale factor {train_scene.scale_factor(chip_size):.2f} m)")
    result = train([train_scene], out / "run", chip_size=chip_size, max_minutes=train_minutes,
                   samples_per_epoch=256, lr=1e-3, progress=progress)
    step(f"trained {result.epochs} epochs; best validation MAE {result.best_val_mae:.3f} m "
         f"(initial {result.initial_val_mae:.3f} m)")
    step("refining the held-out scene")
    refined = refine(result.checkpoint, heldout_scene, out / "heldout_refined.tif", progress=progress)
    step("evaluating against the held-out truth")
    evaluation = evaluate(refined, heldout_scene.band_path("truth_dsm"), initial=heldout_scene.band_path("dsm"),
                          json_path=out / "heldout_metrics.json")
    print(evaluation.table(), flush=True)
    figure = demo_figure(heldout_scene, refined, out / "demo.png")
    step(f"figure written to {figure}")
    seconds = time.time() - started
    (out / "demo.json").write_text(json.dumps({**evaluation.to_json(), "seconds": round(seconds, 1)}, indent=2))
    return DemoResult(evaluation, figure, refined, result.checkpoint, seconds)


def demo_figure(scene: Scene, refined_path: str | Path, out: str | Path, truth_band: str = "truth_dsm") -> Path:
    """The seed-style panel: the two orthos, initial DSM and mask, refined and truth as
    hillshades, and the error maps of the initial and refined DSM (diverging, centred on 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    res = scene.grid.resolution
    with rasterio.open(refined_path) as src:
        refined = src.read(1, masked=True).filled(np.nan).astype(np.float64)
    dsm, truth = scene.read("dsm"), scene.read(truth_band)
    mask = scene.read("nodata_mask")
    err_initial, err_refined = dsm - truth, refined - truth
    limit = float(np.nanpercentile(np.abs(err_initial), 95)) if np.isfinite(err_initial).any() else 1.0

    fig, axes = plt.subplots(2, 4, figsize=(20, 10), constrained_layout=True)
    panels = [
        (scene.read("ortho_left"), "left ortho (equalised)", dict(cmap="gray", vmin=0, vmax=1)),
        (scene.read("ortho_right"), "right ortho (equalised)", dict(cmap="gray", vmin=0, vmax=1)),
        (hillshade(dsm, res), "initial DSM (hillshade)", dict(cmap="gray", vmin=0, vmax=1)),
        (mask, "valid-pixel mask", dict(cmap="gray", vmin=0, vmax=1)),
        (hillshade(refined, res), "refined DSM (hillshade)", dict(cmap="gray", vmin=0, vmax=1)),
        (hillshade(truth, res), "truth (hillshade)", dict(cmap="gray", vmin=0, vmax=1)),
        (err_initial, "initial − truth (m)", dict(cmap="RdBu_r", vmin=-limit, vmax=limit)),
        (err_refined, "refined − truth (m)", dict(cmap="RdBu_r", vmin=-limit, vmax=limit)),
    ]
    for ax, (image, title, style) in zip(axes.ravel(), panels):
        handle = ax.imshow(image, interpolation="nearest", **style)
        ax.set_title(title)
        ax.set_axis_off()
        if "m)" in title:
            fig.colorbar(handle, ax=ax, shrink=0.7)
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
