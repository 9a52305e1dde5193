"""Benchmark: scene-scale refinement speed and memory.

In one run, on the same generated scene and the same (untrained, resnet18 UNet, 256-px) model:
  * ours     - ``deepdem.refine.refine`` end to end at its defaults (overlap 0.25, batch 8, bf16):
               read, normalise, forward, blend, write the Cloud-Optimised GeoTIFF (overviews
               included); also with a σ head (a second COG), and with one setting changed at a
               time (overlap 0.5, batch 1, float32) to price each on its own;
  * forward  - the bare model forward (same batch size, bf16 autocast, channels-last, same heap
               policy), measured on the chips ``refine`` runs (block halos included) and on the
               scene's unique chip grid;
  * deepdem  - a DeepDEM-style pipeline (one chip read and written as its own GeoTIFF, merged
               with ``rasterio.merge``, first wins), at ours' settings (overlap 0.25, batch 8, bf16:
               the cost of a file per chip alone) and as its notebook runs it (overlap 0.5, batch 1,
               float32);
  * fresh    - ours in a fresh process as the ``deepdem refine`` command runs it, the same without
               its heap policy (``steady_heap``: the gain of the allocator setting), and with
               ``--against REV`` the package at another git revision: time and peak RSS side by
               side in each round;
  * peak RSS - of a fresh process refining a 16384² scene end to end (COG and its overviews
               included; ``--rss-blocks N`` stops every fresh run after N blocks, for a quick look).
Speeds are scene Mpx per second; the ratios are taken side by side in each round. Every row is a
measurement.

Usage:  python bench/refine.py [--size 4096] [--rounds 3] [--big 16384] [--rss-blocks 0] [--against REV] [--no-write]
Writes/updates the "## Refine" section of BENCHMARKS.md at the repository root.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Refine"
BANDS = ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask"]
CHIP = 256


# -- a large scene, written window by window ---------------------------------------------------

def tile_scene(tile_dir: Path, out: Path, size: int) -> Path:
    """A ``size``² scene made by tiling a small generated scene, written one tile row at a time.

    Only one tile row of one band is in memory at once, so building a 16384² scene does not
    need the scene in memory. The manifest is the tile's, with the grid enlarged (the tile's
    scale factors and statistics describe the tiled scene as well).
    """
    import rasterio
    from rasterio.windows import Window

    from deepdem.io import GTIFF_PROFILE
    from deepdem.scene import BANDS as SPECS
    from deepdem.scene import MANIFEST, Scene

    tile = Scene.open(tile_dir)
    if (out / MANIFEST).exists() and Scene.open(out).shape == (size, size):
        return out
    out.mkdir(parents=True, exist_ok=True)
    th, tw = tile.shape
    for band in tile.bands:
        if band not in BANDS:
            continue
        with rasterio.open(tile.band_path(band)) as src:
            data, profile, description = src.read(1), src.profile, src.descriptions[0]
        # The same tiling and compression as the scenes 'prepare' writes (deepdem.io.GTIFF_PROFILE).
        profile.update(GTIFF_PROFILE, height=size, width=size, BIGTIFF="YES", predictor=SPECS[band].predictor)
        row = np.tile(data, (1, -(-size // tw)))[:, :size]
        with rasterio.open(out / f"{band}.tif", "w", **profile) as dst:
            dst.set_band_description(1, description or band)
            for r in range(0, size, th):
                h = min(th, size - r)
                dst.write(row[:h], 1, window=Window(0, r, size, h))
    manifest = json.loads((tile_dir / MANIFEST).read_text())
    manifest["bands"] = {b: v for b, v in manifest["bands"].items() if b in BANDS}
    manifest["grid"]["height"] = manifest["grid"]["width"] = size
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def base_tile(work: Path) -> Path:
    from deepdem.prepare import prepare_from_asp_dir
    from deepdem.synth import synth_scene

    scene = work / "tile_scene"
    if not (scene / "scene.json").exists():
        synth_scene(work / "tile_raw", seed=7, size=512)
        prepare_from_asp_dir(work / "tile_raw", scene)
    return scene


def model(**extra):
    import torch

    from deepdem.models import DeepDEMRegressionTask

    torch.manual_seed(0)
    return DeepDEMRegressionTask({"bands": BANDS, "chip_size": CHIP, **extra}).eval()


# -- the three pipelines -----------------------------------------------------------------------

def run_ours(task, scene, out: Path, **kw) -> float:
    """``refine`` as the ``deepdem refine`` command runs it: under its heap policy."""
    from deepdem.refine import refine, steady_heap

    t0 = time.perf_counter()
    with steady_heap():
        refine(task, scene, out, progress=False, **kw)
    return time.perf_counter() - t0


def chip_counts(shape, overlap=0.25, block_size=2048):
    from deepdem.data import grid_positions
    from deepdem.refine import chip_starts, plan_blocks

    stride = int(round(CHIP * (1 - overlap)))
    unique = len(grid_positions(shape[0], CHIP, stride)) * len(grid_positions(shape[1], CHIP, stride))
    with_halo = sum(
        len(chip_starts(shape[0], CHIP, stride, b.row0, b.row1)) * len(chip_starts(shape[1], CHIP, stride, b.col0, b.col1))
        for b in plan_blocks(shape, block_size)
    )
    return unique, with_halo


def run_forward(task, n_chips: int, batch_size: int = 8) -> float:
    """Seconds for the bare forward of ``n_chips`` chips, as ``refine`` batches them.

    Under refine's heap policy (``steady_heap``): outside it, glibc hands the activations back
    to the system after each batch and the next batch faults them in again, which made this
    loop 17-40 % slower (by the machine's page-fault cost) and would flatter ours ÷ forward.
    """
    import torch

    from deepdem.refine import steady_heap

    net = task.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, len(BANDS), CHIP, CHIP).contiguous(memory_format=torch.channels_last)
    with steady_heap(), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)  # warm-up
        t0 = time.perf_counter()
        for start in range(0, n_chips, batch_size):
            net(x[: min(batch_size, n_chips - start)])
    return time.perf_counter() - t0


def run_deepdem_style(task, scene, out: Path, work: Path, overlap: float = 0.5, batch_size: int = 1,
                      bf16: bool = False) -> float:
    """DeepDEM's inference notebook: a chip grid, each chip read with its own windowed reads,
    its prediction written as its own GeoTIFF, then ``rasterio.merge`` (first wins). As the
    notebook runs it: 50 % overlap, one chip at a time in float32; ``overlap``, ``batch_size``
    and ``bf16`` set it to ours' settings to price the file per chip alone."""
    import rasterio
    import torch
    from rasterio.merge import merge
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    from deepdem.data import grid_positions, normalise_chip
    from deepdem.io import write_raster

    t0 = time.perf_counter()
    chips_dir = Path(tempfile.mkdtemp(dir=work, prefix="deepdem_style_chips"))
    net = task.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    scale = scene.scale_factor(CHIP)
    stride = int(round(CHIP * (1 - overlap)))
    h, w = scene.shape
    positions = [(r, c) for r in grid_positions(h, CHIP, stride) for c in grid_positions(w, CHIP, stride)]
    paths = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(positions), batch_size):
            batch = positions[start : start + batch_size]
            chips = [normalise_chip(scene.read_stack(BANDS, Window(c, r, CHIP, CHIP)), BANDS, scale) for r, c in batch]
            inputs = torch.from_numpy(np.stack([chip.inputs for chip in chips]))
            if bf16:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            residuals = net(inputs)[:, 0].float().numpy() * scale
            for (r, c), chip, res in zip(batch, chips, residuals):
                window = Window(c, r, CHIP, CHIP)
                pred = np.where(chip.valid, chip.base + res, -9999.0).astype(np.float32)
                path = chips_dir / f"chip_{r}_{c}.tif"
                write_raster(path, pred, window_transform(window, scene.transform), scene.crs, -9999.0)
                paths.append(path)
    sources = [rasterio.open(p) for p in paths]
    mosaic, transform = merge(sources, nodata=-9999.0)
    for s in sources:
        s.close()
    write_raster(out, mosaic[0], transform, scene.crs, -9999.0)
    elapsed = time.perf_counter() - t0
    for p in paths:
        p.unlink()
    chips_dir.rmdir()
    return elapsed


# -- peak memory in a fresh process ------------------------------------------------------------

# Peak RSS from /proc (VmHWM): getrusage's ru_maxrss survives exec, so a child started by a
# large parent would report the parent's peak.
HWM = "def hwm():\n    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024\n"

CHILD = HWM + r"""
import contextlib, importlib, json, sys, time
sys.path[:0] = [{src!r}, {bench!r}]
rm = importlib.import_module("deepdem.refine")
from refine import model
from deepdem.scene import Scene
scene, out, blocks = Scene.open({scene!r}), {out!r}, {blocks}
class Stop(Exception):
    pass
done = []
if blocks:
    commit = rm.commit_block
    def limited(*a):
        commit(*a); done.append(1)
        if len(done) >= blocks:
            raise Stop
    rm.commit_block = limited
task = model()
t0 = time.perf_counter()
try:
    with rm.steady_heap() if {heap} else contextlib.nullcontext():
        rm.refine(task, scene, out, progress=False)
except Stop:
    pass
print(json.dumps({{"rss_mb": hwm(), "blocks": len(done), "seconds": time.perf_counter() - t0}}))
"""


def child(src: Path, scene: Path, out: Path, blocks: int = 0, heap: bool = True) -> dict:
    """Refine in a fresh process with the package under ``src``: peak RSS and refine seconds.

    ``heap=True`` runs under ``steady_heap`` as the ``deepdem refine`` command does; a fresh
    process is the only clean way to time without it, since glibc keeps a fixed mmap threshold
    once it has been set.
    """
    code = CHILD.format(src=str(src), bench=str(Path(__file__).parent), scene=str(scene), out=str(out),
                        blocks=blocks, heap=heap)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_source(rev: str, work: Path) -> Path:
    """The ``src`` folder of the package at git revision ``rev``, for a side-by-side run."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True,
                         text=True, check=True).stdout.strip()
    dest = work / f"src-{sha}"
    if not dest.exists():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


# -- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=16384, help="scene size for the RSS comparison (0: skip)")
    parser.add_argument("--rss-blocks", type=int, default=0, help="stop the RSS runs after N blocks (0: refine all)")
    parser.add_argument("--against", default=None, metavar="REV",
                        help="also refine with the package at git revision REV, side by side in each round")
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from deepdem.scene import Scene

    work = Path(args.work or tempfile.mkdtemp(prefix="deepdem_bench_refine_"))
    work.mkdir(parents=True, exist_ok=True)
    tile = base_tile(work)
    scene_dir = tile_scene(tile, work / f"scene_{args.size}", args.size)
    scene = Scene.open(scene_dir)
    task = model()
    unique, with_halo = chip_counts(scene.shape)
    mpx = args.size * args.size / 1e6
    print(f"scene {args.size}² ({mpx:.1f} Mpx), chips: {unique} unique, {with_halo} with block halos", flush=True)

    sigma_task = model(uncertainty="laplace")
    # name: (what it is, seconds for one round); ours at its defaults comes first.
    pipelines = {
        "ours": ("ours: `refine` end to end at its defaults (overlap 0.25, batch 8, bf16; COG with overviews)",
                 lambda: run_ours(task, scene, work / "ours.tif")),
        "sigma": ("ours with a σ head: the DSM and `<out>_sigma.tif`, two COGs",
                  lambda: run_ours(sigma_task, scene, work / "sigma.tif")),
        "fwd_halo": (f"bare forward, the chips `refine` runs ({with_halo}, block halos included)",
                     lambda: run_forward(task, with_halo)),
        "fwd_unique": (f"bare forward, the unique chip grid ({unique})", lambda: run_forward(task, unique)),
        "overlap": ("ours, overlap 0.5 (the only change)", lambda: run_ours(task, scene, work / "o.tif", overlap=0.5)),
        "batch1": ("ours, batch 1 (the only change)", lambda: run_ours(task, scene, work / "b.tif", batch_size=1)),
        "fp32": ("ours, float32 (the only change)", lambda: run_ours(task, scene, work / "f.tif", bf16=False)),
        "deepdem_same": ("DeepDEM-style at ours' settings (overlap 0.25, batch 8, bf16): a GeoTIFF per chip, "
                         "`rasterio.merge`", lambda: run_deepdem_style(task, scene, work / "dd.tif", work, 0.25, 8, True)),
        "deepdem": ("DeepDEM-style as its notebook runs it: overlap 0.5, batch 1, float32, a GeoTIFF per chip, "
                    "`rasterio.merge`", lambda: run_deepdem_style(task, scene, work / "dd.tif", work)),
    }
    here = REPO / "src"
    then = export_source(args.against, work) if args.against else None
    # Fresh processes, as the command runs: this tree, this tree without the heap policy, and REV.
    fresh = {"cli": lambda: child(here, scene_dir, work / "cli.tif", args.rss_blocks),
             "no_heap": lambda: child(here, scene_dir, work / "no_heap.tif", args.rss_blocks, heap=False)}
    if then:
        fresh["then"] = lambda: child(then, scene_dir, work / "then.tif", args.rss_blocks)
    rows, fresh_rows = [], []
    for i in range(args.rounds):
        seconds = {name: run() for name, (_, run) in pipelines.items()}
        row = {name: t / seconds["ours"] for name, t in seconds.items()}
        rows.append((seconds, row))
        fresh_rows.append({name: run() for name, run in fresh.items()})
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
              + " | fresh: " + ", ".join(f"{k} {v['seconds']:.1f} s {v['rss_mb']:.0f} MB" for k, v in fresh_rows[-1].items()),
              flush=True)
    speed = {k: statistics.median(mpx / s[k] for s, _ in rows) for k in pipelines}
    med = {k: statistics.median(r[k] for _, r in rows) for k in pipelines}
    lo = {k: min(r[k] for _, r in rows) for k in pipelines}
    hi = {k: max(r[k] for _, r in rows) for k in pipelines}

    def fresh_stat(name, key):
        return statistics.median(r[name][key] for r in fresh_rows)

    def fresh_ratio(name, key):
        ratios = [r[name][key] / r["cli"][key] for r in fresh_rows]
        return statistics.median(ratios), min(ratios), max(ratios)

    mem = {"small": {"rss_mb": fresh_stat("cli", "rss_mb")}}
    if args.big:
        big = tile_scene(tile, work / f"scene_{args.big}", args.big)
        mem["big"] = child(here, big, work / "rss_big.tif", args.rss_blocks)
        print(f"rss {args.big}²: {mem['big']}", flush=True)
        if then:
            mem["big_then"] = child(then, big, work / "rss_big.tif", args.rss_blocks)
            print(f"rss {args.big}² at {args.against}: {mem['big_then']}", flush=True)
        (work / "rss_big.tif").unlink(missing_ok=True)

    env = (f"Machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores (shared); "
           f"Python {platform.python_version()}, torch {torch.__version__}.")
    lines = [
        SECTION, "",
        f"Command: `python bench/refine.py --size {args.size} --rounds {args.rounds} --big {args.big} "
        f"--rss-blocks {args.rss_blocks}" + (f" --against {args.against}" if args.against else "") + f"`. {env}",
        f"Scene: {args.size}² px (a 512² generated scene tiled), untrained resnet18 UNet, 256-px chips, "
        f"the bare forward under refine's heap policy (`steady_heap`), ours at 2048-px blocks. "
        f"Medians of {args.rounds} rounds; in each round every pipeline runs once, one after the other, and "
        f"the time ratios are taken within the round.",
        "",
        "| pipeline | scene Mpx/s | its time ÷ ours | min–max of the rounds |",
        "|---|---:|---:|---:|",
    ]
    for name, (label, _) in pipelines.items():
        spread = "" if name == "ours" else f"{lo[name]:.2f}–{hi[name]:.2f}"
        lines.append(f"| {label} | {speed[name]:.3f} | {med[name]:.2f} | {spread} |")
    lines += [
        "",
        f"Block halos: a chip row or column crossing a block boundary runs for both blocks "
        f"({with_halo - unique} of {with_halo} chips here), the price of blocks computed from the scene alone "
        f"(resume and Dask give the same bytes). The rest of ours ÷ forward is reading and normalising "
        f"the 6 bands, blending, and writing the COG with overviews; on the CPU the model already uses every core. "
        f"Each 'only change' row is ours with that one setting of DeepDEM's notebook; the DeepDEM-style row at "
        f"ours' settings isolates a file per chip and the merge.",
        "",
    ]
    labels = {"cli": "ours, as `deepdem refine` runs it (under `steady_heap`)",
              "no_heap": "ours without `steady_heap` (glibc's default heap policy)"}
    if then:
        labels["then"] = f"ours at `{args.against}` (`git archive`), as its command runs it"
    lines += [
        f"Fresh processes ({args.size}², the same model; "
        + (f"the first {args.rss_blocks} blocks" if args.rss_blocks else "refine end to end") + "), "
        "one of each per round, ratios within the round:",
        "",
        "| run | refine seconds | time ÷ ours | min–max | peak RSS (MB) | RSS ÷ ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in labels.items():
        t, t_lo, t_hi = fresh_ratio(name, "seconds")
        m = fresh_ratio(name, "rss_mb")[0]
        spread = "" if name == "cli" else f"{t_lo:.2f}–{t_hi:.2f}"
        lines.append(f"| {label} | {fresh_stat(name, 'seconds'):.1f} | {t:.2f} | {spread} | "
                     f"{fresh_stat(name, 'rss_mb'):.0f} | {m:.3f} |")
    lines.append("")
    if args.big:
        ratio = mem["big"]["rss_mb"] / mem["small"]["rss_mb"]
        scope = (f"the first {args.rss_blocks} blocks of each" if args.rss_blocks
                 else "each scene refined end to end, COG and overviews included")
        lines += [
            f"Peak RSS (fresh process, model and libraries included; {scope}): {args.size}² "
            f"{mem['small']['rss_mb']:.0f} MB, {args.big}² {mem['big']['rss_mb']:.0f} MB: "
            f"ratio {ratio:.3f}, for {(args.big / args.size) ** 2:.0f}× the pixels "
            f"({mem['big']['seconds']:.0f} s for the {args.big}² refine)"
            + (f"; at `{args.against}`: {mem['big_then']['rss_mb']:.0f} MB, {mem['big_then']['seconds']:.0f} s "
               f"(ours ÷ it: RSS {mem['big']['rss_mb'] / mem['big_then']['rss_mb']:.3f}, "
               f"time {mem['big']['seconds'] / mem['big_then']['seconds']:.3f})" if then else "") + ".",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = REPO / "BENCHMARKS.md"
        current = path.read_text() if path.exists() else "# Benchmarks\n"
        pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        current = pattern.sub(lambda m: text + "\n", current) if pattern.search(current) else current.rstrip() + "\n\n" + text + "\n"
        path.write_text(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
