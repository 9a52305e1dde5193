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
from .errors import CheckpointError, DeepDEMError
from .flags import OneLineParser, fraction, non_negative_int, number, positive, positive_int


def _synth(args) -> int:
    from .errors import InputError
    from .synth import synth_from_lidar, synth_scene

    if (args.truth_dtm or args.object_class) and not args.truth_dsm:
        raise InputError(f"{'--truth-dtm' if args.truth_dtm else '--object-class'} needs --truth-dsm")
    if args.truth_dsm:
        if not args.truth_dtm:
            raise InputError("--truth-dsm needs --truth-dtm (deepdem lidar writes both)")
        paths = synth_from_lidar(args.out, args.truth_dsm, args.truth_dtm, errors=args.errors, seed=args.seed,
                                 object_class=args.object_class)
        what = f"stereo products ({args.errors} errors) of {args.truth_dsm}"
    else:
        if args.errors != "model":
            raise InputError("--errors sgbm needs a real truth (--truth-dsm/--truth-dtm); generated scenes use the model")
        paths = synth_scene(args.out, seed=args.seed, size=args.size, resolution=args.resolution)
        what = f"generated scene (seed {args.seed})"
    print(f"wrote {what} to {Path(args.out)}: {', '.join(p.name for p in paths.values())}")
    return 0


def _prepare(args) -> int:
    from .errors import InputError
    from .prepare import prepare_from_asp_prefix, prepare_scene

    def pair(text, flag):
        try:
            nir, red = (int(v) for v in text.split(","))
            return nir, red
        except ValueError:
            raise InputError(f"{flag} expects two 1-based band indices NIR,RED (e.g. 1,2), got {text!r}") from None

    views = ((args.views[0], args.views[1]), (args.views[2], args.views[3])) if args.views else None
    if args.views_from:
        from .imagery import read_view

        views = tuple(read_view(path) for path in args.views_from)
        print("views from the metadata (azimuth, off-nadir at the ground): "
              + ", ".join(f"{side} {v.azimuth:.1f}°, {v.off_nadir:.1f}°" for side, v in zip(("left", "right"), views)))
    hls = None
    if args.hls:
        start, sep, end = args.hls.partition("/")
        if not sep or not start or not end:
            raise InputError(f"--hls expects a date window START/END (e.g. 2023-06-01/2023-08-31), got {args.hls!r}")
        hls = {"start": start, "end": end, "stac_url": args.stac_url, "max_cloud": args.max_cloud}
    options = dict(
        ndvi=args.ndvi, clahe_kernel=args.clahe_kernel, clahe_clip=args.clahe_clip, crs=args.crs,
        resolution=args.resolution, upsampling=args.resampling,
        ndvi_bands=pair(args.ndvi_bands, "--ndvi-bands") if args.ndvi_bands else None,
        image_band=args.image_band, coregister=args.coregister, coregister_max_ndvi=args.coregister_max_ndvi,
        coregister_max_slope=args.coregister_max_slope, hls=hls,
        views=views, parallax=not args.no_parallax,
    )
    files = dict(dsm=args.dsm, ortho_left=args.ortho_left, ortho_right=args.ortho_right,
                 triangulation_error=args.triangulation_error)
    if args.asp_prefix:
        scene = prepare_from_asp_prefix(args.asp_prefix, args.out, truth=args.truth, truth_dtm=args.truth_dtm,
                                        **files, **options)
    else:
        missing = [f"--{k.replace('_', '-')}" for k, v in files.items() if v is None]
        if missing:
            raise InputError(f"{', '.join(missing)} required (or give --asp-prefix PATH/run)")
        scene = prepare_scene(out=args.out, truth=args.truth, truth_dtm=args.truth_dtm, **files, **options)
    factors = ", ".join(f"{k}: {v:.2f}" for k, v in scene.scale_factors.items())
    print(f"wrote {scene}; scale factors (m) {factors}")
    coreg = scene.manifest["provenance"].get("coregistration")
    if coreg:
        print(f"co-registration shift: x {coreg['shift_x']:+.3f} m, y {coreg['shift_y']:+.3f} m, "
              f"z {coreg['shift_z']:+.3f} m; NMAD on stable ground {coreg['nmad_before']:.3f} -> {coreg['nmad_after']:.3f} m"
              + ("" if coreg["applied_to"] else " (NOT applied: " + coreg["not_applied"] + ")"))
    return 0


def _ndvi(args) -> int:
    from .errors import InputError
    from .imagery import grid_like, hls_ndvi, ndvi_from_raster, write_ndvi

    grid = grid_like(args.like) if args.like else None
    if args.raster:
        try:
            nir, red = (int(v) for v in args.bands.split(","))
        except ValueError:
            raise InputError(f"--bands expects NIR,RED (1-based), got {args.bands!r}") from None
        ndvi, grid = ndvi_from_raster(args.raster, nir, red, grid)
        source = f"{args.raster} bands NIR {nir}, red {red}"
    else:
        if grid is None or not (args.start and args.end):
            raise InputError("HLS NDVI needs --like (raster or scene) and --start/--end (or give --raster)")
        ndvi, provenance = hls_ndvi(grid, args.start, args.end, stac_url=args.stac_url, max_cloud=args.max_cloud)
        source = f"{len(provenance['items'])} HLS granules"
    path = write_ndvi(args.out, ndvi, grid)
    print(f"wrote {path} ({source}; {100 * float((ndvi == ndvi).mean()):.1f} % valid)")
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
    from . import products
    from .models import load_checkpoint
    from .refine import refine, sigma_path, steady_heap

    if args.chm and len(load_checkpoint(args.checkpoint).targets) < 2:  # refused before refining
        raise CheckpointError("--chm needs a model with DSM and DTM heads (target 'both')", args.checkpoint)
    with steady_heap():  # this process is the command's own: see steady_heap for the measured gain
        path = refine(args.checkpoint, args.scene, args.out, batch_size=args.batch_size, fill=args.fill,
                      device=args.device, progress=not args.quiet, overlap=args.overlap, tta=args.tta,
                      block_size=args.block_size, resume=args.resume, workers=args.workers,
                      scheduler=args.scheduler, scale_source=args.scale_source, max_sigma=args.max_sigma,
                      above_max_sigma=args.above_max_sigma, at_model_pixel_size=not args.scene_pixel_size,
                      parallax_check=not args.no_parallax_check)
    print(f"wrote {path}")
    if sigma_path(path).exists():
        print(f"wrote {sigma_path(path)}")
    stem = path.with_suffix("")
    if args.hillshade:
        print(f"wrote {products.hillshade_raster(path, f'{stem}_hillshade.tif', multidirectional=args.hillshade == 'multidirectional')}")
    if args.slope:
        print(f"wrote {products.slope_raster(path, f'{stem}_slope.tif')}")
    if args.chm:
        print(f"wrote {products.canopy_height_raster(path, path, f'{stem}_chm.tif', dsm_band=1, dtm_band=2)}")
    return 0


def _hillshade(args) -> int:
    from .products import hillshade_raster, slope_raster

    path = hillshade_raster(args.dem, args.out, multidirectional=args.multidirectional, azimuth=args.azimuth,
                            altitude=args.altitude, z_factor=args.z_factor)
    print(f"wrote {path}")
    if args.slope:
        print(f"wrote {slope_raster(args.dem, args.slope)}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate

    if args.truth is None and args.scene is None:
        raise DeepDEMError("no truth given: --truth FILE, or --scene DIR with a truth band")
    result = evaluate(args.dem, args.truth, initial=args.initial, scene=args.scene, coregister=args.coregister,
                      target=args.target, sigma=args.sigma, sigma_distribution=args.sigma_distribution)
    if args.json:
        result.write_json(args.json)
    if args.report:
        from .report import write_report

        write_report(result, args.report)
    for name, shift in result.coregistration.items():
        print(f"co-registered {name}: x {shift['shift_x']:+.3f} m, y {shift['shift_y']:+.3f} m, "
              f"z {shift['shift_z']:+.3f} m")
    print(result.table())
    if args.scene is not None or args.report is not None:
        print()
        print(result.main_table())
    if result.calibration:
        print()
        print(result.calibration_table())
    if args.report is not None:
        print(f"report written to {Path(args.report) / 'report.md'}")
    return 0


def _calibrate(args) -> int:
    from .calibrate import calibrate_to_reference

    result = calibrate_to_reference(args.checkpoint, args.dem, args.reference, args.out, sigma=args.sigma,
                                    target=args.target, method=args.method)
    print(f"σ factor {result.factor:.3f} fitted on {result.pixels} reference pixels "
          f"(checkpoint factor {result.temperature:.3f})")
    print("| σ | 68 % interval covers | 90 % covers | 95 % covers | median σ (m) |")
    print("|---|---:|---:|---:|---:|")
    for name, metrics in (("before", result.before), ("after", result.after)):
        print(f"| {name} | {100 * metrics['coverage_68']:.1f} % | {100 * metrics['coverage_90']:.1f} % | "
              f"{100 * metrics['coverage_95']:.1f} % | {metrics['sharpness']:.3f} |")
    print(f"wrote {result.checkpoint}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.out, train_epochs=args.epochs, train_minutes=args.minutes, size=args.size,
                      chip_size=args.chip_size)
    ratio = result.evaluation.metrics["refined"]["mae"] / result.evaluation.metrics["initial"]["mae"]
    print(f"demo finished in {result.seconds:.0f} s: held-out MAE ratio refined/initial = {ratio:.3f}; "
          f"figure {result.figure}")
    return 0


def _add_synth_parser(subparsers) -> None:
    """Add the ``synth`` subcommand."""
    p = subparsers.add_parser("synth", help="generate a realistic scene with ASP-like inputs and truth")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=number(int, 32), default=512, help="pixels on a side (default 512)")
    p.add_argument("--resolution", type=positive, default=1.0, help="metres per pixel (default 1)")
    p.add_argument("--truth-dsm", help="start from a real truth instead (e.g. deepdem lidar's dsm.tif) ...")
    p.add_argument("--truth-dtm", help="... and its DTM (dtm.tif) on the same grid")
    p.add_argument("--object-class", help="... and, where the points are classified, deepdem lidar's "
                   "object_class.tif: buildings and trees by class rather than by roughness")
    p.add_argument("--errors", choices=["model", "sgbm"], default="model",
                   help="ASP's errors from a statistical model of them, or from rendering two views and "
                        "matching them with OpenCV's semi-global matcher (needs --truth-dsm)")
    p.set_defaults(func=_synth)


def _add_prepare_parser(subparsers) -> None:
    """Add the ``prepare`` subcommand."""
    p = subparsers.add_parser("prepare", help="build a Scene from input rasters (aligned on the DSM grid)")
    p.add_argument("--asp-prefix", help="ASP run prefix PATH/run: finds run-DEM.tif, run-IntersectionErr.tif and the "
                   "mapprojected images (see docs/prepare.md); the file flags below override")
    p.add_argument("--dsm", help="initial DSM (e.g. ASP run-DEM.tif)")
    p.add_argument("--ortho-left", help="left orthorectified image")
    p.add_argument("--ortho-right", help="right orthorectified image")
    p.add_argument("--triangulation-error", help="triangulation error (ASP run-IntersectionErr.tif)")
    p.add_argument("--ndvi", help="NDVI raster (any resolution; resampled), or a red/NIR image with --ndvi-bands")
    p.add_argument("--ndvi-bands", metavar="NIR,RED", help="compute NDVI from these 1-based bands of --ndvi (IGN IRC: 1,2)")
    p.add_argument("--hls", metavar="START/END", help="NDVI from NASA HLS L30+S30 in this date window (YYYY-MM-DD/YYYY-MM-DD)")
    p.add_argument("--stac-url", default="https://cmr.earthdata.nasa.gov/stac/LPCLOUD", help="STAC API for --hls")
    p.add_argument("--max-cloud", type=number(float, 0, 100), default=None, help="skip HLS granules above this cloud cover (%%)")
    views = p.add_mutually_exclusive_group()
    views.add_argument("--views", nargs=4, type=number(float, -360, 360), metavar=("AZ_LEFT", "OFF_NADIR_LEFT", "AZ_RIGHT", "OFF_NADIR_RIGHT"),
                       help="each image's satellite azimuth and off-nadir angle at the ground in degrees (WorldView: "
                       "meanSatAz, 90 - meanSatEl): adds the parallax band, the DSM error the orthos still see (without "
                       "it, the orthos' shift is stored and train fits the pair's geometry on the truth)")
    views.add_argument("--views-from", nargs=2, metavar=("LEFT_METADATA", "RIGHT_METADATA"),
                       help="read --views from each image's WorldView/Maxar metadata (.XML, as ASP reads it, or .IMD)")
    p.add_argument("--no-parallax", action="store_true",
                   help="measure no parallax between the orthos (it takes about 7 s per million pixels on 2 cores)")
    p.add_argument("--image-band", type=positive_int, default=None, help="band of multiband orthos to use (default: mean of bands)")
    p.add_argument("--truth", help="reference DSM (e.g. from LIDAR)")
    p.add_argument("--truth-dtm", help="reference DTM")
    p.add_argument("--crs", help="grid CRS (default: the DSM's); metric CRSs only")
    p.add_argument("--resolution", type=positive, help="grid pixel size in CRS units (default: the DSM's)")
    p.add_argument("--resampling", choices=("bilinear", "cubic"), default="bilinear",
                   help="for continuous bands (masks use nearest; much finer sources are averaged)")
    p.add_argument("--coregister", action="store_true",
                   help="shift the DSM (and orthos, error) onto the truth on stable ground (Nuth & Kääb + vertical)")
    p.add_argument("--coregister-max-ndvi", type=number(float, -1, 1), default=0.3, help="stable ground: NDVI below (default 0.3)")
    p.add_argument("--coregister-max-slope", type=number(float, 0, 90, low_open=True), default=40.0, help="stable ground: slope below, degrees (default 40)")
    p.add_argument("--clahe-kernel", type=number(int, 2), default=None, help="CLAHE kernel size in px (default 1/8 of the image)")
    p.add_argument("--clahe-clip", type=number(float, 0, 1, low_open=True), default=0.01, help="CLAHE clip limit (default 0.01)")
    p.add_argument("--out", required=True, help="scene directory to write")
    p.set_defaults(func=_prepare)


def _add_ndvi_parser(subparsers) -> None:
    """Add the ``ndvi`` subcommand."""
    p = subparsers.add_parser("ndvi", help="NDVI raster from a red/NIR image or from NASA HLS (STAC)")
    p.add_argument("--out", required=True, help="output GeoTIFF")
    p.add_argument("--like", help="grid to produce NDVI on: a raster or a scene directory")
    p.add_argument("--raster", help="multiband image with red and NIR (instead of HLS)")
    p.add_argument("--bands", default="1,2", metavar="NIR,RED", help="1-based bands of --raster (default 1,2: IGN IRC)")
    p.add_argument("--start", help="HLS date window start (YYYY-MM-DD)")
    p.add_argument("--end", help="HLS date window end (YYYY-MM-DD)")
    p.add_argument("--stac-url", default="https://cmr.earthdata.nasa.gov/stac/LPCLOUD", help="STAC API (default: NASA CMR-STAC LPCLOUD)")
    p.add_argument("--max-cloud", type=number(float, 0, 100), default=None, help="skip granules above this cloud cover (%%)")
    p.set_defaults(func=_ndvi)


def _add_train_parser(subparsers) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", help="train a refinement model on one or more scenes",
                              description="Train a refinement model. Every flag is also a key of the YAML "
                              "--config. On first use each scene's bands are cached, model-ready, in "
                              "<scene>/.cache/ (or the temporary directory for a read-only scene): one file per "
                              "band, 33 bytes per pixel (a 10,000 x 10,000 px scene: 3.3 GB); delete it "
                              "freely, it is rebuilt.")
    from .train import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=_train)


def _add_export_parser(subparsers) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser("export", help="export a checkpoint as safetensors + JSON (no pickle)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output path without suffix: OUT.safetensors and OUT.json")
    p.set_defaults(func=_export)


def _add_refine_parser(subparsers) -> None:
    """Add the ``refine`` subcommand."""
    p = subparsers.add_parser("refine", help="refine a scene's DSM with a trained checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--scene", required=True)
    p.add_argument("--out", required=True, help="output GeoTIFF")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--fill", action="store_true", help="keep predictions where the scene has no data")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overlap", type=fraction, default=0.25, help="chip overlap fraction (default 0.25)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the 8 flips/rotations of each chip (8x compute); σ widens where they disagree "
                   "(default: on for scenes of at most 2048 x 2048 px at the model's pixel size)")
    p.add_argument("--block-size", type=positive_int, default=2048, help="output block (px); bounds memory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted refine of the same inputs")
    p.add_argument("--workers", type=non_negative_int, default=0, help="spread blocks over a local Dask cluster of N processes")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786)")
    p.add_argument("--hillshade", nargs="?", const="standard", choices=["standard", "multidirectional"],
                   help="also write <out>_hillshade.tif")
    p.add_argument("--slope", action="store_true", help="also write <out>_slope.tif (degrees)")
    p.add_argument("--chm", action="store_true", help="also write <out>_chm.tif = DSM - DTM (two-head models)")
    p.add_argument("--max-sigma", type=positive, metavar="S",
                   help="where the predicted sigma exceeds S metres, apply --above-max-sigma (models with sigma)")
    p.add_argument("--above-max-sigma", choices=["initial", "nodata"], default="initial",
                   help="above --max-sigma: keep the initial DSM (DSM bands; default) or write nodata")
    p.add_argument("--scene-pixel-size", action="store_true",
                   help="refine at the scene's own pixel size even where the model was trained at another "
                   "(default: refine at the model's and resample the result onto the scene's grid)")
    p.add_argument("--no-parallax-check", action="store_true",
                   help="write the model's DSM even where its correction runs along the error the orthos' "
                   "parallax shows (default: keep the initial DSM there, with a warning)")
    p.add_argument("--scale-source", choices=["checkpoint", "scene"],
                   help="DSM scale factor: the training scenes' (checkpoint) or the scene's own "
                        "(default: as the checkpoint was trained)")
    p.set_defaults(func=_refine)


def _add_hillshade_parser(subparsers) -> None:
    """Add the ``hillshade`` subcommand."""
    p = subparsers.add_parser("hillshade", help="hillshade (and slope) of a DEM GeoTIFF, as Cloud-Optimised GeoTIFFs")
    p.add_argument("--dem", required=True)
    p.add_argument("--out", required=True, help="output hillshade GeoTIFF (byte, 0 = nodata)")
    p.add_argument("--multidirectional", action="store_true", help="mean of light from 225, 270, 315 and 360 deg")
    p.add_argument("--azimuth", type=number(float, 0, 360), default=315.0)
    p.add_argument("--altitude", type=number(float, 0, 90, low_open=True), default=45.0)
    p.add_argument("--z-factor", type=positive, default=1.0)
    p.add_argument("--slope", help="also write the slope (degrees) to this GeoTIFF")
    p.set_defaults(func=_hillshade)


def _add_evaluate_parser(subparsers) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser("evaluate", help="accuracy of a DEM (and the initial DSM, baselines) against a truth",
                              description="Metrics (MAE, RMSE, bias, NMAD, |error| percentiles, LE90) of a DEM, the "
                              "initial DSM and filter baselines on the same pixels, by land cover and slope.")
    p.add_argument("--dem", required=True, help="the DEM to evaluate (e.g. deepdem refine's output)")
    p.add_argument("--truth", help="reference DEM (default with --scene: its truth_dsm or truth_dtm band)")
    p.add_argument("--initial", help="initial DSM, compared on the same pixels (default with --scene: its dsm)")
    p.add_argument("--scene", help="Scene directory: orthos, NDVI, mask and truth DTM for strata and figures")
    p.add_argument("--target", choices=("dsm", "dtm"), default="dsm",
                   help="what the truth is (dtm adds a ground-filter baseline; default dsm)")
    p.add_argument("--coregister", action="store_true",
                   help="shift each DEM onto the truth first (xdem Nuth & Kääb + vertical shift on stable ground)")
    p.add_argument("--report", help="write a report directory (report.md, metrics.json, PNG figures)")
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--sigma", metavar="FILE",
                   help="per-pixel σ raster of the DEM, e.g. refine's <out>_sigma.tif: coverage of its "
                        "68/90/95 %% intervals, sharpness, Spearman")
    p.add_argument("--sigma-distribution", choices=("laplace", "gaussian"), default=None,
                   help="σ is the standard deviation of this error distribution "
                        "(default: the raster's tag, else gaussian)")
    p.set_defaults(func=_evaluate)


def _add_calibrate_parser(subparsers) -> None:
    """Add the ``calibrate`` subcommand."""
    p = subparsers.add_parser(
        "calibrate", help="fit a checkpoint's sigma to a site, on a reference DEM over part of it",
        description="Fit one factor that makes the checkpoint's sigma cover 68 and 90 % of the errors of a DEM it "
                    "refined, against a reference (e.g. a LIDAR patch) where the reference has data, and write a "
                    "copy of the checkpoint with sigma times that factor. Refine the rest of the site with the copy. "
                    "Heights do not change. Use a refine run made with --no-tta (refine averages 8 views by default on "
                    "scenes of at most 2048 x 2048 px, and their spread does not scale with the factor).")
    p.add_argument("--checkpoint", required=True, help="the checkpoint that refined --dem")
    p.add_argument("--dem", required=True, help="its refined DEM (deepdem refine's output)")
    p.add_argument("--reference", required=True, help="reference DEM over part of --dem (any grid, resampled onto it)")
    p.add_argument("--out", required=True, help="the calibrated checkpoint to write (.ckpt or .safetensors)")
    p.add_argument("--sigma", help="sigma raster of --dem (default: refine's <dem stem>_sigma.tif)")
    p.add_argument("--target", choices=("dsm", "dtm"), default="dsm",
                   help="which band of a two-head model's rasters to fit on (default dsm)")
    p.add_argument("--method", choices=("coverage", "likelihood"), default="coverage",
                   help="match the 68 and 90 %% intervals' coverage (default), or maximise the likelihood")
    p.set_defaults(func=_calibrate)


def _add_demo_parser(subparsers) -> None:
    """Add the ``demo`` subcommand."""
    from .demo import DEMO_EPOCHS, DEMO_MINUTES

    p = subparsers.add_parser("demo", help="synth → prepare → train → refine → evaluate on generated scenes")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS,
                   help="training epochs of 256 chips (default %(default)s: on 2 CPU cores 3.5 min with native bf16, 7.7 min in float32)")
    p.add_argument("--minutes", type=positive, default=DEMO_MINUTES,
                   help="training time limit, minutes (default %(default)g)")
    p.add_argument("--size", type=number(int, 64), default=512)
    p.add_argument("--chip-size", type=number(int, 32), default=128)
    p.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="deepdem",
        description="Refine a satellite-stereo DSM into an accurate DSM or DTM with deep learning.",
        epilog="Run 'deepdem COMMAND --help' for the flags of a command.",
    )
    parser.add_argument("--version", action="version", version=f"deepdem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .lidar.cli import add_lidar_parser

    for add_parser in (_add_synth_parser, _add_prepare_parser, _add_ndvi_parser, _add_train_parser, _add_export_parser,
                       _add_refine_parser, _add_calibrate_parser, _add_hillshade_parser, _add_evaluate_parser,
                       _add_demo_parser, add_lidar_parser):
        add_parser(sub)
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
