"""Training-data throughput: deepdem's chip pipeline vs TorchGeo 0.8 RasterDataset + RandomGeoSampler.

Both read the same prepared scene (six input bands + truth, 256-px chips) and deliver the same
number of chips per epoch in batches of 16 float32 chips, side by side, alternating, several
times; ratios are taken pair by pair. Two states, like for like:

* **cold**: a loader built from the GeoTIFFs and run for one epoch, everything timed: ours
  decodes the scene into its memory-mapped cache (a fresh cache directory each run), TorchGeo
  opens and decodes its files;
* **warm**: the same loaders' next epoch (new random chips): ours reads its cache, TorchGeo has
  its open-file cache and GDAL's block cache.

The model's own consumption (chips/s of a training step of smp Unet-resnet18, bf16 autocast +
channels-last, as `deepdem train` runs it) gives the headroom.

    python bench/train_data.py [--runs 5] [--chips 160] [--size 1024] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from deepdem.data import ChipDataset, SceneArrays, collate_chips, spatial_split
from deepdem.models import DEFAULT_BANDS, DeepDEMRegressionTask
from deepdem.prepare import prepare_from_asp_dir
from deepdem.synth import synth_scene

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402

CHIP, BATCH = 256, 16


def our_loader(scene, chips: int, cache_dir):
    arrays = SceneArrays(scene, list(DEFAULT_BANDS), "dsm", CHIP, cache_dir=cache_dir)
    region, _ = spatial_split(scene.shape, CHIP)
    dataset = ChipDataset([arrays], [region], list(DEFAULT_BANDS), CHIP, "train", samples=chips, seed=int(time.time()))
    return DataLoader(dataset, batch_size=BATCH, num_workers=0, collate_fn=collate_chips)


def torchgeo_loader(scene, chips: int):
    """The seed's data path: a RasterDataset over one GeoTIFF per band, sampled at random."""
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomGeoSampler

    bands = [*DEFAULT_BANDS, "truth_dsm"]

    class SceneBands(RasterDataset):
        filename_glob = "dsm.tif"
        filename_regex = r"^(?P<band>dsm)\.tif$"
        separate_files = True
        is_image = True
        all_bands = tuple(bands)

    dataset = SceneBands(paths=str(scene.path), bands=bands)
    sampler = RandomGeoSampler(dataset, size=CHIP, length=chips)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=stack_samples, num_workers=0)


def chips_per_second(loader, epoch: int, started: float | None = None) -> float:
    """One pass over the loader (a new epoch: new random chips), as a training epoch runs it;
    timed from ``started`` when given (to include building the loader)."""
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    chips = 0
    start = time.perf_counter() if started is None else started
    for batch in loader:
        data = batch["inputs"] if "inputs" in batch else batch["image"]
        assert data.shape[1] >= 6 and data.shape[-1] == CHIP
        chips += len(data)
    return chips / (time.perf_counter() - start)


def model_chips_per_second(steps: int = 4) -> float:
    torch.manual_seed(0)
    task = DeepDEMRegressionTask({"bands": list(DEFAULT_BANDS), "chip_size": CHIP}).to(memory_format=torch.channels_last)
    optimizer = task.configure_optimizers()["optimizer"]  # deepdem train's own (fused) Adam
    x = torch.randn(BATCH, 6, CHIP, CHIP).contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = task(x).float().abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times[1:])


def cold_and_warm(build) -> tuple[float, float]:
    """Chips/s of a loader's first epoch, its construction included, then of its next epoch."""
    start = time.perf_counter()
    loader = build()
    chips = chips_per_second(loader, 0, started=start)
    return chips, chips_per_second(loader, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chips", type=int, default=160, help="chips per epoch, both loaders")
    parser.add_argument("--size", type=int, default=1024, help="generated scene side in pixels")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    results = {key: [] for key in ("ours cold", "theirs cold", "ours warm", "theirs warm")}
    with tempfile.TemporaryDirectory() as tmp:
        synth_scene(Path(tmp) / "raw", seed=11, size=args.size)
        scene = prepare_from_asp_dir(Path(tmp) / "raw", Path(tmp) / "scene")
        for run in range(args.runs):
            cache = Path(tmp) / f"cache-{run}"  # a cold cache each run
            ours = cold_and_warm(lambda: our_loader(scene, args.chips, cache))
            theirs = cold_and_warm(lambda: torchgeo_loader(scene, args.chips))
            for state, a, b in (("cold", ours[0], theirs[0]), ("warm", ours[1], theirs[1])):
                results[f"ours {state}"].append(a)
                results[f"theirs {state}"].append(b)
            print(f"run {run + 1}: cold deepdem {ours[0]:7.1f} torchgeo {theirs[0]:6.1f} chips/s | "
                  f"warm deepdem {ours[1]:7.1f} torchgeo {theirs[1]:6.1f} chips/s", flush=True)
        model = model_chips_per_second()
    med = {key: statistics.median(values) for key, values in results.items()}
    ratio = {state: [a / b for a, b in zip(results[f"ours {state}"], results[f"theirs {state}"])]
             for state in ("cold", "warm")}
    print(f"model training step consumes {model:.1f} chips/s")
    rows = [
        "| pipeline | cold: first epoch, chips/s | warm: next epoch, chips/s |",
        "|---|---:|---:|",
        f"| deepdem `ChipDataset` (memory-mapped cache) | {med['ours cold']:.1f} | {med['ours warm']:.1f} |",
        f"| TorchGeo 0.8 `RasterDataset` + `RandomGeoSampler` | {med['theirs cold']:.1f} | {med['theirs warm']:.1f} |",
        f"| deepdem ÷ TorchGeo (median of {args.runs} paired runs, min–max) | "
        f"**{statistics.median(ratio['cold']):.1f}×** ({min(ratio['cold']):.1f}–{max(ratio['cold']):.1f}) | "
        f"**{statistics.median(ratio['warm']):.1f}×** ({min(ratio['warm']):.1f}–{max(ratio['warm']):.1f}) |",
        f"| model training step (smp Unet-resnet18, bf16, channels-last) | {model:.1f} | {model:.1f} |",
        "",
        f"- deepdem loader ÷ model consumption: cold **{med['ours cold'] / model:.1f}×**, warm "
        f"**{med['ours warm'] / model:.1f}×**.",
        f"- Scene: generated, {args.size}×{args.size} px, six input bands + truth, {args.chips} chips of {CHIP} px "
        f"per epoch on both sides, batches of {BATCH}, one process (`num_workers=0`), CPU. Cold: the loader "
        "built and its first epoch run, all timed (ours writes its cache into a new directory each run); warm: "
        "the same loader's next epoch, new random chips.",
    ]
    if args.write:
        update_benchmarks("Training data", f"python bench/train_data.py --runs {args.runs} --write", rows)


if __name__ == "__main__":
    main()
