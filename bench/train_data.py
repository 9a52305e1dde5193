"""Training-data throughput: deepdem's chip pipeline vs TorchGeo 0.8 RasterDataset + RandomGeoSampler.

Both read the same prepared scene (six input bands + truth, 256-px chips) and deliver batches of
16 float32 chips; the comparison runs side by side, alternating, several times, and the ratio is
taken pair by pair. Each loader is built once and iterated epoch after epoch (new random chips
each time), as a training run does. The model's own consumption (chips/s of a training step of
smp Unet-resnet18, bf16 autocast + channels-last, as `deepdem train` runs it) gives the headroom.

    python bench/train_data.py [--runs 5] [--chips 640] [--size 1024] [--write]
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


def our_loader(scene, chips: int):
    arrays = SceneArrays(scene, list(DEFAULT_BANDS), "dsm", CHIP)
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


def chips_per_second(loader, epoch: int) -> float:
    """One pass over the loader (a new epoch: new random chips), as a training epoch runs it."""
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    chips = 0
    start = time.perf_counter()
    for batch in loader:
        data = batch["inputs"] if "inputs" in batch else batch["image"]
        assert data.shape[1] >= 6 and data.shape[-1] == CHIP
        chips += len(data)
    return chips / (time.perf_counter() - start)


def model_chips_per_second(steps: int = 4) -> float:
    torch.manual_seed(0)
    task = DeepDEMRegressionTask({"bands": list(DEFAULT_BANDS), "chip_size": CHIP}).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(task.parameters(), 5e-4)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chips", type=int, default=640, help="chips per epoch (TorchGeo: at most 160)")
    parser.add_argument("--size", type=int, default=1024, help="generated scene side in pixels")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        synth_scene(Path(tmp) / "raw", seed=11, size=args.size)
        scene = prepare_from_asp_dir(Path(tmp) / "raw", Path(tmp) / "scene")
        # Each loader is built once and iterated epoch after epoch, as in training; one warm-up
        # epoch each (ours decodes the scene into its memory-mapped cache there).
        ours_loader, theirs_loader = our_loader(scene, args.chips), torchgeo_loader(scene, min(args.chips, 160))
        chips_per_second(ours_loader, 0), chips_per_second(theirs_loader, 0)
        ours, theirs, ratios = [], [], []
        for run in range(args.runs):
            a = chips_per_second(ours_loader, run + 1)
            b = chips_per_second(theirs_loader, run + 1)
            ours.append(a), theirs.append(b), ratios.append(a / b)
            print(f"run {run + 1}: deepdem {a:8.1f} chips/s   torchgeo {b:6.1f} chips/s   ratio {a / b:6.1f}", flush=True)
        model = model_chips_per_second()
    headroom = statistics.median(ours) / model
    print(f"model training step consumes {model:.1f} chips/s; loader headroom {headroom:.1f}x")
    rows = [
        "| pipeline | chips/s (median) | min | max |",
        "|---|---:|---:|---:|",
        f"| deepdem `ChipDataset` (memory-mapped scene) | {statistics.median(ours):.1f} | {min(ours):.1f} | {max(ours):.1f} |",
        f"| TorchGeo 0.8 `RasterDataset` + `RandomGeoSampler` | {statistics.median(theirs):.1f} | {min(theirs):.1f} | {max(theirs):.1f} |",
        f"| model training step (smp Unet-resnet18, bf16, channels-last) | {model:.1f} | | |",
        "",
        f"- deepdem ÷ TorchGeo, median of {args.runs} paired runs: **{statistics.median(ratios):.1f}×** "
        f"(min {min(ratios):.1f}×, max {max(ratios):.1f}×); target ≥ 20×.",
        f"- deepdem loader ÷ model consumption: **{headroom:.1f}×**; target ≥ 5×.",
        f"- Scene: generated, {args.size}×{args.size} px, six input bands + truth, chips of {CHIP} px, batches of {BATCH}, "
        "one process (`num_workers=0`), CPU.",
        f"- Each loader is built once and iterated epoch after epoch ({args.chips} chips per epoch for deepdem, "
        f"{min(args.chips, 160)} for TorchGeo), as training runs them; one warm-up epoch each is not timed.",
    ]
    if args.write:
        update_benchmarks("Training data", f"python bench/train_data.py --runs {args.runs} --write", rows)


if __name__ == "__main__":
    main()
