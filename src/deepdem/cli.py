"""The ``deepdem`` command line: a thin layer over the library API.

Every subcommand maps its flags onto one library call. Problems with the user's input are
printed as one line ``deepdem: error: <file>: <problem>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import DeepDEMError


def _synth(args) -> int:
    from .synth import synth_scene

    paths = synth_scene(args.out, seed=args.seed, size=args.size, resolution=args.resolution)
    print(f"wrote generated scene (seed {args.seed}) to {Path(args.out)}: {', '.join(p.name for p in paths.values())}")
    return 0


def _prepare(args) -> int:
    from .prepare import prepare_scene

    scene = prepare_scene(
        dsm=args.dsm, ortho_left=args.ortho_left, ortho_right=args.ortho_right,
        triangulation_error=args.triangulation_error, ndvi=args.ndvi, truth=args.truth,
        truth_dtm=args.truth_dtm, out=args.out, clahe_kernel=args.clahe_kernel, clahe_clip=args.clahe_clip,
    )
    factors = ", ".join(f"{k}: {v:.2f}" for k, v in scene.scale_factors.items())
    print(f"wrote {scene}; scale factors (m) {factors}")
    return 0


def _train(args) -> int:
    from .train import config_from_args, train

    config = config_from_args(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if not config.scenes:
        raise DeepDEMError("no scene given: --scene DIR (or 'scenes:' in --config)")
    result = train(config=config)
    if result.checkpoint.exists():
        print(f"best checkpoint {result.checkpoint}: validation MAE {result.best_val_mae:.3f} m "
              f"(initial DSM {result.initial_val_mae:.3f} m) after {result.epochs} epochs, {result.seconds:.0f} s")
    return 0


def _export(args) -> int:
    from .models import export_safetensors, load_checkpoint

    weights, meta = export_safetensors(load_checkpoint(args.checkpoint), args.out)
    print(f"wrote {weights} and {meta}")
    return 0


def _refine(args) -> int:
    from .refine import refine

    path = refine(args.checkpoint, args.scene, args.out, batch_size=args.batch_size, fill=args.fill,
                  device=args.device, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.dem, args.truth, initial=args.initial, json_path=args.json)
    print(result.table())
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.out, train_minutes=args.minutes, size=args.size, chip_size=args.chip_size)
    ratio = result.evaluation.metrics["refined"]["mae"] / result.evaluation.metrics["initial"]["mae"]
    print(f"demo finished in {result.seconds:.0f} s: held-out MAE ratio refined/initial = {ratio:.3f}; "
          f"figure {result.figure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepdem",
        description="Refine a satellite-stereo DSM into an accurate DSM or DTM with deep learning.",
        epilog="Run 'deepdem COMMAND --help' for the flags of a command.",
    )
    parser.add_argument("--version", action="version", version=f"deepdem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate a realistic scene with ASP-like inputs and truth")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="pixels on a side (default 512)")
    p.add_argument("--resolution", type=float, default=1.0, help="metres per pixel (default 1)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="build a Scene from input rasters (aligned on the DSM grid)")
    p.add_argument("--dsm", required=True, help="initial DSM (e.g. ASP run-DEM.tif)")
    p.add_argument("--ortho-left", required=True, help="left orthorectified image")
    p.add_argument("--ortho-right", required=True, help="right orthorectified image")
    p.add_argument("--triangulation-error", required=True, help="triangulation error (ASP run-IntersectionErr.tif)")
    p.add_argument("--ndvi", help="NDVI raster (any resolution; resampled)")
    p.add_argument("--truth", help="reference DSM (e.g. from LIDAR)")
    p.add_argument("--truth-dtm", help="reference DTM")
    p.add_argument("--clahe-kernel", type=int, default=None, help="CLAHE kernel size in px (default 1/8 of the image)")
    p.add_argument("--clahe-clip", type=float, default=0.01, help="CLAHE clip limit (default 0.01)")
    p.add_argument("--out", required=True, help="scene directory to write")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train a refinement model on one or more scenes",
                       description="Train a refinement model. Every flag is also a key of the YAML --config.")
    from .train import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="export a checkpoint as safetensors + JSON (no pickle)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output path without suffix: OUT.safetensors and OUT.json")
    p.set_defaults(func=_export)

    p = sub.add_parser("refine", help="refine a scene's DSM with a trained checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--scene", required=True)
    p.add_argument("--out", required=True, help="output GeoTIFF")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fill", action="store_true", help="keep predictions where the scene has no data")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_refine)

    p = sub.add_parser("evaluate", help="accuracy of a DEM (and the initial DSM) against a truth")
    p.add_argument("--dem", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--initial", help="initial DSM, compared on the same pixels")
    p.add_argument("--json", help="write the metrics as JSON")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="synth → prepare → train → refine → evaluate on generated scenes")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--chip-size", type=int, default=128)
    p.set_defaults(func=_demo)

    from .lidar.cli import add_lidar_parser

    add_lidar_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Lightning's banner (GPU/TPU availability, tips) is noise for a command-line user.
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module=r"lightning\..*")
    try:
        return int(args.func(args) or 0)
    except DeepDEMError as exc:
        print(f"deepdem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepdem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
