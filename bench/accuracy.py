"""Accuracy at equal CPU budget: ResDepth baselines vs the full DeepDEM configuration.

For each data set (generated scenes; real terrain from the Copernicus GLO-30 DSM of the
Grenoble Alps with generated buildings, trees and stereo errors), three models are trained
with the same seed and the same budget of *process CPU seconds* (less sensitive to a busy
machine than wall time, not immune: threads waiting for a core spin and count), then refine a
held-out scene and are evaluated against its truth:

* ResDepth-UNet, DSM only;
* ResDepth-UNet, stereo (DSM + both orthoimages);
* smp Unet-resnet18 with all six DeepDEM bands.

    python bench/accuracy.py [--cpu-seconds 600] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject

from deepdem.evaluate import evaluate
from deepdem.prepare import prepare_from_asp_dir
from deepdem.refine import refine
from deepdem.synth import SynthConfig, synth_scene
from deepdem.train import TrainConfig, default_batch_size, train

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402
from real_terrain import CpuBudget  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPDEM_DATA", REPO.parent / "shared" / "data"))
CONFIGS = {
    "ResDepth-UNet, DSM only": dict(arch="ResDepth", bands=["dsm"]),
    "ResDepth-UNet, stereo": dict(arch="ResDepth", bands=["dsm", "ortho_left", "ortho_right"]),
    "smp Unet-resnet18, all bands (DeepDEM)": dict(arch="Unet", encoder="resnet18", bands=None),
}


def real_terrain(size: int, resolution: float, east_offset_m: float) -> tuple[np.ndarray, str, tuple[float, float]]:
    """A crop of the Copernicus DSM (degrees) reprojected to UTM 31N at ``resolution`` (cubic)."""
    path = DATA / "dems" / "Copernicus_DSM_10_N45_00_E005_00_DEM.tif"
    if not path.exists():
        raise FileNotFoundError(f"shared data not found: {path} (set DEEPDEM_DATA)")
    crs = "EPSG:32631"
    with rasterio.open(path) as src:
        west, south, east, north = rasterio.warp.transform_bounds(src.crs, crs, *src.bounds)
        x0 = (west + east) / 2 - size * resolution + east_offset_m
        y0 = (south + north) / 2 + size * resolution / 2
        transform = rasterio.transform.from_origin(x0, y0, resolution, resolution)
        out = np.full((size, size), np.nan, dtype=np.float32)
        source = src.read(1).astype(np.float32)
        source[source == src.nodata] = np.nan
        reproject(source, out, src_transform=src.transform, src_crs=src.crs, src_nodata=np.nan,
                  dst_transform=transform, dst_crs=crs, dst_nodata=np.nan, resampling=Resampling.cubic)
    return out, crs, (x0, y0)


def make_scenes(root: Path, kind: str, size: int) -> tuple:
    if kind == "generated":
        synth_scene(root / "raw_train", seed=21, size=size)
        synth_scene(root / "raw_test", seed=22, size=size)
    else:
        resolution = 2.0
        for name, seed, offset in (("raw_train", 31, 0.0), ("raw_test", 32, size * resolution + 200.0)):
            terrain, crs, origin = real_terrain(size, resolution, offset)
            synth_scene(root / name, config=SynthConfig(size=size, resolution=resolution, seed=seed),
                        terrain=terrain, crs=crs, origin=origin)
    return prepare_from_asp_dir(root / "raw_train", root / "train"), prepare_from_asp_dir(root / "raw_test", root / "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds", type=float, default=600.0, help="training budget per model (process CPU s)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chip-size", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    rows = ["| data | model | MAE (m) | RMSE (m) | NMAD (m) | epochs |", "|---|---|---:|---:|---:|---:|"]
    for kind in ("generated", "real terrain (Copernicus, Grenoble)"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            try:
                train_scene, test_scene = make_scenes(root, "generated" if kind == "generated" else "real", args.size)
            except FileNotFoundError as exc:
                print(f"skipping {kind}: {exc}")
                continue
            initial = None
            for name, overrides in CONFIGS.items():
                config = TrainConfig(chip_size=args.chip_size, max_epochs=10_000, samples_per_epoch=256, lr=1e-3,
                                     seed=0, progress=False, **overrides)
                started = time.time()
                run = root / f"run{len(rows)}"
                result = train([train_scene], run, config=config, callbacks=[CpuBudget(args.cpu_seconds)])
                refined = refine(result.checkpoint, test_scene, root / "refined.tif", progress=False)
                metrics = evaluate(refined, test_scene.band_path("truth_dsm"), initial=test_scene.band_path("dsm")).metrics
                initial = metrics["initial"]
                m = metrics["refined"]
                print(f"{kind} | {name}: MAE {m['mae']:.3f} RMSE {m['rmse']:.3f} NMAD {m['nmad']:.3f} "
                      f"({result.epochs} epochs, {time.time() - started:.0f} s wall)", flush=True)
                rows.append(f"| {kind} | {name} | {m['mae']:.3f} | {m['rmse']:.3f} | {m['nmad']:.3f} | {result.epochs} |")
            if initial:
                rows.append(f"| {kind} | initial DSM | {initial['mae']:.3f} | {initial['rmse']:.3f} | {initial['nmad']:.3f} | |")
    rows += ["", f"Each model: seed 0, chips of {args.chip_size} px, batch {default_batch_size('dsm')}, Adam 1e-3, "
             f"{args.cpu_seconds:.0f} s of process CPU time; held-out scene ({args.size}×{args.size} px, another seed "
             "and, for real terrain, another part of the DEM) refined and compared with its truth on the same pixels."]
    print("\n".join(rows))
    if args.write:
        update_benchmarks("Accuracy at equal CPU budget", f"python bench/accuracy.py --cpu-seconds {args.cpu_seconds:.0f} --write", rows)


if __name__ == "__main__":
    main()
