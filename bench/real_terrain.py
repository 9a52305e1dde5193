"""Accuracy on real LIDAR terrain, across sites: does a model trained here improve a DSM there?

Every real LIDAR set of the shared data is gridded by ``deepdem lidar`` (0.5 m; Autzen's 1.6
points/m² at 1 m) into a truth DSM and DTM. Each truth gets two initial DSMs with their orthos,
error map and NDVI (``deepdem.synth.synth_from_lidar``): ``model`` errors (the generator's
statistical model of ASP) and ``sgbm`` errors (two views rendered and matched by OpenCV's
semi-global matcher). Models train on the training sites (both error kinds) and are scored on
the other sites and on a held-out tile of a training site:

* the initial DSM and the filters of :mod:`deepdem.baselines`;
* a plain smp Unet-resnet18 written here the simple way (the six bands a user has, holes filled by nearest
  neighbour, the training scenes' scale factor, L1, random flipped chips, constant Adam 5e-4,
  no hold-out, 50 % overlap with a Hann window);
* both ResDepth baselines (ResDepth's UNet on the DSM alone, and on the DSM and both images);
* deepdem at its defaults (which read the parallax band that ``prepare`` measures between the
  orthos from the views ``synth`` records), and deepdem with the training defaults before this
  benchmark (each scene's own scale factor, holes at the chip mean, a 20 % hold-out, a randomly
  initialised output layer, no relief augmentation or weight averaging, chips drawn by scene
  area; today's input bands, the parallax band among them) to measure what those changes
  bought; with ``--ablations``, each change
  undone on its own, candidate defaults, and three inputs each left out (the triangulation
  error, NDVI, the parallax band) beside them;
* for the terrain under vegetation, deepdem ``--target dtm`` against the SMRF ground filter;
* on a held-out scene of another pixel size than the training scenes' (Autzen, 1 m), deepdem as refine
  does by default (at the training pixel size, the result averaged back) beside ``--scene-pixel-size``.

Every model gets the same budget of process CPU seconds, the same chips of 128 px, the same
batch (deepdem's default for the DSM, 8; "previous defaults" keeps its 16; the DTM model trains at its default, 16) and the same precision (bf16 autocast on a CPU with native bf16, float32 on others); each
runs with several seeds and the tables give the median and the range. CPU seconds resist a busy machine better than wall time, but not wholly: torch's
threads spin while they wait for a core, and that counts. With a test suite running beside it,
the defaults trained 4 epochs in their budget instead of 8, so run it on a quiet machine.

    python bench/real_terrain.py [--seeds 0 1 2] [--cpu-seconds 240] [--write]

``--views-unknown`` trains and refines deepdem's defaults on the scenes prepared with the views'
angles and on the same inputs prepared without them (the pair's geometry then fitted by train).

Then, on the checkpoints it saved: ``--recalibrate`` refits σ's calibration factors with the
current training code, and ``--epistemic`` scores σ with the models' disagreement added (refine's
``--tta``, the ensemble of the seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from lightning.pytorch.callbacks import Callback
from scipy import ndimage

from deepdem import stereo, synth
from deepdem.baselines import compute_baselines
from deepdem.evaluate import evaluate_arrays
from deepdem.lidar import grid_lidar, write_products
from deepdem.models import DEFAULT_BANDS, autocast_is_fast
from deepdem.prepare import prepare_from_asp_dir, prepare_from_asp_prefix
from deepdem.refine import refine, sigma_path
from deepdem.scene import Scene
from deepdem.synth import ASP_FILES, synth_from_lidar
from deepdem.train import TrainConfig, default_batch_size, train

sys.path.insert(0, str(Path(__file__).parent))
from _report import update_benchmarks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPDEM_DATA", REPO.parent / "shared" / "data"))
MONTPELLIER = [f"ign_montpellier/test_data_{tile}_LA93_IGN69.laz" for tile in
               ("77050_627755", "77050_627760", "77055_627755", "77055_627760", "77060_627755", "77060_627760")]
#: name: (LIDAR files under the data folder, role, gridding options)
SITES = {
    "IGN fields (FR)": (["ign_lidarhd_rgbnir/las_with_several_extra_byte_bloc.laz"], "train", {}),
    "Delft tile 1 (NL)": (["ahn3_delft/ahn3_cropped_1.laz"], "train", {"crs": "EPSG:28992"}),
    "NEON woodland (US)": (["neon_osbs/osbs_200m.laz"], "train", {"dsm_fill_gap": 1.5}),
    "Delft tile 2 (NL, held-out tile)": (["ahn3_delft/ahn3_cropped_2.laz"], "test", {"crs": "EPSG:28992"}),
    "IGN Montpellier (FR)": (MONTPELLIER, "test", {}),
    "Coromandel forest (NZ)": (["coromandel_forest/points.laz"], "test", {}),
    "Autzen (US, 1 m)": (["autzen/autzen_trim.laz"], "test", {"crs": "EPSG:32610", "resolution": 1.0}),
}
ERRORS = ("model", "sgbm")
CHIP = 128
# every DSM model trains on batches of this many chips: deepdem's default for the DSM, which the plain UNet and
# ResDepth share (deepdem --target dtm trains at its own default)
BATCH = default_batch_size("dsm")
#: bf16 autocast where deepdem's defaults use it (a CPU with native bf16), float32 elsewhere
AUTOCAST = autocast_is_fast("cpu")
DEEPDEM = "deepdem (defaults)"
BEFORE = "deepdem, previous defaults"
PLAIN = "plain smp Unet-resnet18"
NO_SIGMA = "deepdem, no σ head"
DSM_MODELS = {
    DEEPDEM: {},
    # the price of σ: the same defaults without σ's branch. The network trains alike either way,
    # so what differs is the branch's share of the CPU budget (fewer steps in it)
    NO_SIGMA: dict(uncertainty=False),
    BEFORE: dict(scale_source="scene", fill_holes=False, holdout_fraction=0.2, identity_init=False,
                 relief_augmentation=False, weight_averaging=False, scene_sampling="area", encoder_depth=5,
                 batch_size=16),
    # ResDepth's network as published (randomly initialised, no relief augmentation or weight averaging),
    # in deepdem's pipeline
    "ResDepth-UNet, DSM only": dict(arch="ResDepth", bands=["dsm"], identity_init=False, relief_augmentation=False,
                                    weight_averaging=False),
    "ResDepth-UNet, stereo": dict(arch="ResDepth", bands=["dsm", "ortho_left", "ortho_right"], identity_init=False,
                                  relief_augmentation=False, weight_averaging=False),
}
DTM = "deepdem --target dtm"
#: changes to the DTM's defaults, trained with --ablations beside the DTM at its defaults
DTM_ABLATIONS = {
    # the DSM's default batch: the DTM keeps 16 (deepdem.train.DEFAULT_BATCH_SIZE)
    f"{DTM}, batch 8": dict(batch_size=8),
}
CALIBRATION_KEYS = ("coverage_68", "coverage_90", "coverage_95", "spearman", "spearman_if_exact", "sharpness", "mae")
OWN_SCALE = "deepdem, refined with the scene's own scale factor"
ABLATIONS = {
    "deepdem, no relief augmentation": dict(relief_augmentation=False),
    "deepdem, random output layer": dict(identity_init=False),
    "deepdem, holes at the chip mean": dict(fill_holes=False),
    "deepdem, 20 % hold-out": dict(holdout_fraction=0.2),
    "deepdem, no weight averaging": dict(weight_averaging=False),
    # not an undone change but a candidate default: the relief changed on a quarter of the chips, not half
    "deepdem, relief on a quarter of the chips": dict(relief_share=0.25),
    # candidates: capacity (a deeper encoder, fewer steps in the budget), and an edge term in the loss
    "deepdem, resnet34 encoder": dict(encoder="resnet34"),
    "deepdem, gradient loss 1": dict(gradient_loss=1.0),
    # the default network is resnet18 at depth 3: the deeper ones have more capacity and take
    # fewer steps in the budget (depth 5 is smp's, and was the default before)
    "deepdem, encoder depth 4": dict(encoder_depth=4),
    "deepdem, encoder depth 5": dict(encoder_depth=5),
    "deepdem, chips by scene area": dict(scene_sampling="area"),
    # the batch before the default became 8: half the steps in the budget
    "deepdem, batch 16": dict(batch_size=16),
    # candidates: Adam's learning rate (5e-4 by default, constant over a run this short: the
    # plateau schedule waits 50 epochs), twice and half of it
    "deepdem, lr 1e-3": dict(lr=1e-3),
    "deepdem, lr 2.5e-4": dict(lr=2.5e-4),
    # two inputs whose values depend on the sensor and the site, each left out: what does the
    # network take from the triangulation error (metres, unscaled) and from NDVI?
    "deepdem, no triangulation error": dict(bands=[b for b in DEFAULT_BANDS if b != "triangulation_error"]),
    "deepdem, no NDVI": dict(bands=[b for b in DEFAULT_BANDS if b != "ndvi"]),
    # the orthos' residual parallax, which prepare measures from the views synth records
    "deepdem, no parallax band": dict(bands=[b for b in DEFAULT_BANDS if b != "parallax"]),
    # the orthos' local correlation, which prepare measures: where they disagree, the DSM is wrong
    "deepdem, no ortho correlation": dict(bands=[b for b in DEFAULT_BANDS if b != "ortho_correlation"]),
}


class CpuBudget(Callback):
    """Stops training once the process has used ``seconds`` of CPU time since fit started."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_fit_start(self, trainer, pl_module):
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, *args):
        if time.process_time() - self.start > self.seconds:
            trainer.should_stop = True


# -- data ---------------------------------------------------------------------------------------

GENERATOR_STAMP = "generator.txt"


def generator_fingerprint() -> str:
    """A digest of the code that degrades a truth into ASP-like products."""
    code = b"".join(Path(module.__file__).read_bytes() for module in (synth, stereo))
    return hashlib.sha256(code).hexdigest()[:16]


def made_by_current_generator(folder: Path) -> bool:
    """Whether ``folder`` holds a scene made by today's generator (a changed one remakes it)."""
    stamp = folder / GENERATOR_STAMP
    return (folder / "scene.json").exists() and stamp.exists() and stamp.read_text() == generator_fingerprint()


def stamp_generator(folder: Path) -> None:
    (folder / GENERATOR_STAMP).write_text(generator_fingerprint())


def scenes_generator(work: Path) -> str:
    """The fingerprint stamped on the scenes in ``work`` (several, comma-separated, if they differ).

    Only the scenes every section reads (``scene<i>-<errors>``): a stale copy prepared another way
    (``-views-unknown``, remade when its section runs) says nothing of the others.
    """
    stamps = sorted({p.read_text() for errors in ERRORS for p in work.glob(f"scene*-{errors}/{GENERATOR_STAMP}")})
    return ", ".join(stamps) if stamps else "unknown"


def generator_line(results: dict) -> str:
    """Which generator made a run's scenes: two sections' figures compare only when it is the same."""
    return (f"Scenes made by `deepdem.synth` and `deepdem.stereo` with source digest {results.get('generator', 'unknown')} "
            "(`generator_fingerprint` in bench/real_terrain.py; the scenes are remade when it changes).")


def build_scenes(work: Path) -> dict[tuple[str, str], Scene]:
    """Grid, degrade and prepare every site once (kept in ``work`` between runs, until the generator changes)."""
    scenes = {}
    for index, (site, (files, _, options)) in enumerate(SITES.items()):
        paths = [DATA / f for f in files]
        if not all(p.exists() for p in paths):
            print(f"skipping {site}: {paths[0]} not found (set DEEPDEM_DATA)")
            continue
        truth_dir = work / f"truth{index}"
        if "object_class" not in (json.loads((truth_dir / "lidar.json").read_text())
                                  if (truth_dir / "lidar.json").exists() else {}):  # gridded before it was made
            products = grid_lidar(paths, resolution=options.get("resolution", 0.5), crs=options.get("crs"),
                                  dsm_fill_gap=options.get("dsm_fill_gap", 1.0), progress=False)
            write_products(products, truth_dir)
        for errors in ERRORS:
            raw, prepared = work / f"raw{index}-{errors}", work / f"scene{index}-{errors}"
            if not made_by_current_generator(prepared):
                object_class = truth_dir / "object_class.tif"
                synth_from_lidar(raw, truth_dir / "dsm.tif", truth_dir / "dtm.tif", errors=errors, seed=100 + index,
                                 object_class=object_class if object_class.exists() else None)
                prepare_from_asp_dir(raw, prepared)
                stamp_generator(prepared)
            elif not all(Scene.open(prepared).has(b) for b in DEFAULT_BANDS):  # prepared before prepare made a band
                prepare_from_asp_dir(raw, prepared)
                stamp_generator(prepared)
            scenes[(site, errors)] = Scene.open(prepared)
    return scenes


def build_scenes_without_views(work: Path, scenes: dict[tuple[str, str], Scene]) -> dict[tuple[str, str], Scene]:
    """The same generated inputs prepared without the views' angles, as the prepare command of a
    user who has ASP's rasters and not the cameras: each stores the orthos' shift, train fits the
    pair's geometry on the training scenes' truth, refine reads the held-out scenes with it."""
    blind = {}
    for site, errors in scenes:
        index = list(SITES).index(site)
        raw, prepared = work / f"raw{index}-{errors}", work / f"scene{index}-{errors}-views-unknown"
        if not made_by_current_generator(prepared) or not all(Scene.open(prepared).has(b) for b in DEFAULT_BANDS
                                                               if b != "parallax"):
            prepare_from_asp_prefix(raw / ASP_FILES["dsm"][: -len("-DEM.tif")], prepared,
                                    truth=raw / ASP_FILES["truth_dsm"], truth_dtm=raw / ASP_FILES["truth_dtm"])
            stamp_generator(prepared)
        blind[(site, errors)] = Scene.open(prepared)
    return blind


def model_inputs(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Plain UNet: the six bands (DSM holes nearest-filled, NaN → 0) and the valid mask."""
    dsm = scene.read("dsm")
    missing = np.isnan(dsm)
    nearest = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    dsm = dsm[tuple(nearest)]
    bands = [dsm] + [np.nan_to_num(scene.read(b), nan=0.0) for b in
                     ("ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask")]
    return np.stack(bands).astype(np.float32), ~missing & (scene.read("nodata_mask") > 0)


# -- the plain UNet, written the way a user would ------------------------------------------------

def plain_unet_train(scenes: list[Scene], seconds: float, seed: int, target: str = "truth_dsm",
                     chip: int = CHIP, clock=time.process_time, batch: int = BATCH):
    """Adam 5e-4, ``batch`` random chips a step, L1 on valid pixels, until ``clock`` has run ``seconds``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = [(*model_inputs(s), s.read(target)) for s in scenes]
    scale = float(np.mean([s.scale_factor(chip) for s in scenes]))
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=6, classes=1).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-4)
    start, steps = clock(), 0
    while clock() - start < seconds:
        inputs, targets, bases = [], [], []
        for _ in range(batch):
            x, valid, truth = data[rng.integers(len(data))]
            r, c = rng.integers(0, x.shape[1] - chip + 1), rng.integers(0, x.shape[2] - chip + 1)
            window = np.s_[r : r + chip, c : c + chip]
            sample, ok, t = x[(slice(None), *window)].copy(), valid[window], truth[window]
            mean = sample[0].mean()
            base = sample[0].copy()
            sample[0] = (sample[0] - mean) / scale
            t = np.where(ok & np.isfinite(t), t, np.nan)
            if rng.random() < 0.5:
                sample, base, t = sample[:, :, ::-1], base[:, ::-1], t[:, ::-1]
            if rng.random() < 0.5:
                sample, base, t = sample[:, ::-1], base[::-1], t[::-1]
            inputs.append(sample.copy()), bases.append(base.copy()), targets.append(t.copy())
        x = torch.from_numpy(np.stack(inputs)).contiguous(memory_format=torch.channels_last)
        base, t = torch.from_numpy(np.stack(bases))[:, None], torch.from_numpy(np.stack(targets))[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
            prediction = model(x).float() * scale + base
        valid = torch.isfinite(t)
        loss = (prediction - torch.nan_to_num(t))[valid].abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    return model.eval(), scale, steps


def plain_unet_predict(model, scale: float, scene: Scene, chip: int = CHIP) -> np.ndarray:
    x, valid = model_inputs(scene)
    _, h, w = x.shape
    window = np.outer(np.hanning(chip + 2)[1:-1], np.hanning(chip + 2)[1:-1]).astype(np.float32)
    total, weight = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    stride = chip // 2
    rows = sorted({*range(0, max(h - chip, 0) + 1, stride), max(h - chip, 0)})
    cols = sorted({*range(0, max(w - chip, 0) + 1, stride), max(w - chip, 0)})
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
        for r in rows:
            for c in cols:
                sample = x[:, r : r + chip, c : c + chip].copy()
                mean = sample[0].mean()
                base = sample[0].copy()
                sample[0] = (sample[0] - mean) / scale
                out = model(torch.from_numpy(sample)[None]).float()[0, 0].numpy() * scale + base
                total[r : r + chip, c : c + chip] += out * window
                weight[r : r + chip, c : c + chip] += window
    return np.where(valid, total / np.maximum(weight, 1e-6), np.nan)


# -- scoring ------------------------------------------------------------------------------------

def read_refined(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1, masked=True).filled(np.nan).astype(np.float64)


def score(scene: Scene, dems: dict[str, np.ndarray], target: str = "dsm", sigma: np.ndarray | None = None):
    """Evaluation on the pixels valid in the truth, the inputs and every DEM (σ: of the first DEM)."""
    valid = scene.read("nodata_mask") > 0
    truth = np.where(valid, scene.read(f"truth_{target}"), np.nan)
    height = scene.read("truth_dsm") - scene.read("truth_dtm")
    return evaluate_arrays(truth, dems, scene.grid, ndvi=scene.read("ndvi"), height=height,
                           terrain=scene.read("truth_dtm"), target=target, sigma=sigma)


def record_calibration(results: dict, kind: str, key: tuple[str, str], evaluation) -> None:
    """σ's calibration on a held-out scene, overall and under tall vegetation, for the tables."""
    for stratum in ("all", "tall vegetation", "bare"):
        metrics = evaluation.calibration.get(stratum)
        if metrics and metrics["count"] >= 1000:
            results.setdefault(kind, {}).setdefault(f"{key[0]}|{key[1]}|{stratum}", []).append(
                {k: metrics[k] for k in CALIBRATION_KEYS})


def record_pixel_size(results: dict, checkpoint: Path, scene: Scene, key: tuple[str, str], target: str,
                      ours: float, out: Path) -> None:
    """For a scene of another pixel size than the training scenes': the MAE of refine's default
    (at the model's pixel size) beside the same model refined at the scene's own."""
    from deepdem.models import load_checkpoint
    from deepdem.refine.resampled import model_pixel_size

    if model_pixel_size(load_checkpoint(checkpoint).model_kwargs, scene) is None:
        return
    own = read_refined(refine(checkpoint, scene, out, progress=False, at_model_pixel_size=False))
    name = "own pixel size"
    mae = score(scene, {name: own, **initial_and_baselines(scene, target)}, target).metrics[name]["mae"]
    results.setdefault("pixel_size", {}).setdefault(f"{key[0]}|{key[1]}|{target}", []).append((ours, mae))


def pixel_size_table(results: dict) -> list[str]:
    per_scene = results.get("pixel_size") or {}
    if not per_scene:
        return []
    rows = ["", "### Held-out scenes at another pixel size than the training scenes': refined at the model's "
            "pixel size (the default) or at the scene's own", "",
            "| site | errors | target | MAE (m), at the model's pixel size | MAE (m), at the scene's | ratio |",
            "|---|---|---|---:|---:|---:|"]
    for key, pairs in per_scene.items():
        ours, own = [a for a, _ in pairs], [b for _, b in pairs]
        rows.append(f"| {' | '.join(key.split('|'))} | {range_cell(ours)} | {range_cell(own)} | "
                    f"{range_cell([a / b for a, b in pairs])} |")
    rows += ["", "The same checkpoints, refined twice: `deepdem refine` (the scene resampled to the training scenes' "
             "pixel size, the result averaged back) and `deepdem refine --scene-pixel-size`. Ratio: seed by seed, "
             "median (min–max)."]
    return rows


def initial_and_baselines(scene: Scene, target: str = "dsm") -> dict[str, np.ndarray]:
    dsm = scene.read("dsm").astype(np.float64)
    out = {"initial DSM": dsm}
    for name, values in compute_baselines(dsm, scene.transform, scene.crs, target).items():
        out[name] = values
    return out


def run(work: Path, seeds: list[int], seconds: float, ablations: bool, only: list[str] | None = None) -> dict:
    scenes = build_scenes(work)
    train_scenes = [s for (site, _), s in scenes.items() if SITES[site][1] == "train"]
    tests = {key: s for key, s in scenes.items() if SITES[key[0]][1] == "test"}
    results: dict = {"dsm": {}, "dtm": {}, "strata": {}, "epochs": {}, "calibration": {}, "calibration_dtm": {},
                     "generator": scenes_generator(work)}
    models = {DEEPDEM: {}, **ABLATIONS} if ablations else DSM_MODELS
    if ablations and not only:
        only = [DEEPDEM, *ABLATIONS, DTM]
    wanted = (lambda name: any(o in name for o in only)) if only else (lambda name: True)
    models = {name: overrides for name, overrides in models.items() if wanted(name)}

    def record(kind, key, evaluation, methods):
        for name in methods:
            results[kind].setdefault(f"{key[0]}|{key[1]}", {}).setdefault(name, []).append(evaluation.metrics[name]["mae"])

    for key, scene in tests.items():
        base = initial_and_baselines(scene)
        record("dsm", key, score(scene, base), base)
    for seed in seeds:
        for name, overrides in models.items():
            started = time.time()
            run_dir = work / f"run-{seed}-{list(models).index(name)}"
            config = TrainConfig(chip_size=CHIP, max_epochs=100_000, seed=seed, progress=False, **overrides)
            result = train(train_scenes, run_dir, config=config, callbacks=[CpuBudget(seconds)])
            results["epochs"].setdefault(name, []).append(result.epochs)
            for key, scene in tests.items():
                refined = refine(result.checkpoint, scene, run_dir / "refined.tif", progress=False)
                sigma = read_refined(sigma_path(refined)) if sigma_path(refined).exists() else None
                dems = {name: read_refined(refined), **initial_and_baselines(scene)}
                evaluation = score(scene, dems, sigma=sigma)
                record("dsm", key, evaluation, [name])
                if name == DEEPDEM and sigma is not None:
                    record_calibration(results, "calibration", key, evaluation)
                if name == DEEPDEM:
                    record_pixel_size(results, result.checkpoint, scene, key, "dsm", evaluation.metrics[name]["mae"],
                                      run_dir / "own-pixel-size.tif")
                    for stratum, entry in evaluation.strata.items():
                        if entry.get("pixels", 0) >= 1000 and "metrics" in entry:
                            m = entry["metrics"]
                            results["strata"].setdefault(f"{key[0]}|{key[1]}|{stratum}", []).append(
                                (m[name]["mae"], m["initial DSM"]["mae"]))
                if name == DEEPDEM and ablations:  # the refine side of the scale factor needs no retraining
                    own = refine(result.checkpoint, scene, run_dir / "own.tif", progress=False, scale_source="scene")
                    record("dsm", key, score(scene, {**dems, OWN_SCALE: read_refined(own)}), [OWN_SCALE])
            print(f"seed {seed} | {name}: {result.epochs} epochs, {time.time() - started:.0f} s", flush=True)
        if wanted(PLAIN):
            plain_unet(train_scenes, tests, seconds, seed, results)
        for name, overrides in {DTM: {}, **(DTM_ABLATIONS if ablations else {})}.items():
            if wanted(name):
                train_dtm(train_scenes, tests, seconds, seed, results, work, name, overrides)
        (work / "partial.json").write_text(json.dumps(results, indent=1))  # a crash keeps the seeds done
    return results


VIEWS_GIVEN, VIEWS_UNKNOWN = "deepdem, views' angles given", "deepdem, views' angles unknown"


def views_unknown(work: Path, seeds: list[int], seconds: float) -> dict:
    """deepdem at its defaults trained and refined twice per seed: on the scenes prepared with the
    views' angles, and on the same inputs prepared without them (:func:`build_scenes_without_views`)."""
    from deepdem.models import load_checkpoint
    from deepdem.parallax import shift_per_metre

    scenes = build_scenes(work)
    results: dict = {"dsm": {}, "geometry": {}, "generator": scenes_generator(work)}
    views = json.loads(next(work.glob("raw*-model/synth.json")).read_text())["config"]["views"]
    results["views_geometry"] = shift_per_metre(tuple(synth.View(v["azimuth"], v["off_nadir"]) for v in views)).tolist()
    for variant, (name, chosen) in enumerate(((VIEWS_GIVEN, scenes), (VIEWS_UNKNOWN, build_scenes_without_views(work, scenes)))):
        train_scenes = [s for (site, _), s in chosen.items() if SITES[site][1] == "train"]
        tests = {key: s for key, s in chosen.items() if SITES[key[0]][1] == "test"}
        for seed in seeds:
            started = time.time()
            run_dir = work / f"views-{seed}-{variant}"
            result = train(train_scenes, run_dir, config=TrainConfig(chip_size=CHIP, max_epochs=100_000, seed=seed,
                                                                     progress=False), callbacks=[CpuBudget(seconds)])
            results["geometry"].setdefault(name, []).append(load_checkpoint(result.checkpoint).model_kwargs.get("parallax_geometry"))
            results.setdefault("epochs", {}).setdefault(name, []).append(result.epochs)
            for key, scene in tests.items():
                refined = refine(result.checkpoint, scene, run_dir / "refined.tif", progress=False)
                maes = score(scene, {name: read_refined(refined), **initial_and_baselines(scene)}).metrics
                per = results["dsm"].setdefault(f"{key[0]}|{key[1]}", {})
                per.setdefault(name, []).append(maes[name]["mae"])
                per["initial DSM"] = [maes["initial DSM"]["mae"]]
            print(f"seed {seed} | {name}: {result.epochs} epochs, {time.time() - started:.0f} s", flush=True)
    return results


def views_unknown_tables(results: dict, seeds: list[int], seconds: float) -> list[str]:
    rows = ["| site | errors | initial MAE (m) | MAE ÷ initial, angles given | MAE ÷ initial, angles unknown | "
            "unknown ÷ given |", "|---|---|---:|---:|---:|---:|"]
    for key, per in results["dsm"].items():
        initial = per["initial DSM"][0]
        given, unknown = per[VIEWS_GIVEN], per[VIEWS_UNKNOWN]
        rows.append(f"| {' | '.join(key.split('|'))} | {initial:.3f} | {range_cell([m / initial for m in given])} | "
                    f"{range_cell([m / initial for m in unknown])} | "
                    f"{range_cell([u / g for u, g in zip(unknown, given)])} |")
    fitted = results["geometry"][VIEWS_UNKNOWN]
    given_geometry = results["views_geometry"]
    rows += ["", f"deepdem at its defaults, trained {seconds:.0f} CPU s per seed (seeds {', '.join(map(str, seeds))}) on the "
             "training sites' scenes prepared with `--views` (the angles `synth` used) and on the same inputs prepared "
             "without them, then refined on the held-out scenes prepared the same way. Without the angles, `prepare` "
             "stores the orthos' shift, `train` fits the pair's shift per metre of DSM error on each training scene's "
             "truth, and `refine` reads the held-out scenes with the training scenes' median. Ratios: median over "
             "seeds (min–max); the last column seed by seed. "
             f"{'bf16 autocast' if AUTOCAST else 'float32 (this CPU has no native bf16)'}; epochs of 512 chips per "
             "seed: " + "; ".join(f"{name}: {', '.join(map(str, epochs))}"
                                  for name, epochs in results.get("epochs", {}).items()) + ".", "",
             f"Shift per metre of DSM error (along columns, rows): from the views' angles ({given_geometry[0]:.3f}, "
             f"{given_geometry[1]:.3f}); fitted, per seed: "
             + ", ".join(f"({g[0]:.3f}, {g[1]:.3f})" if g else "none" for g in fitted) + "."]
    return rows


def plain_unet(train_scenes, tests, seconds, seed, results):
    started = time.time()
    model, scale, steps = plain_unet_train(train_scenes, seconds, seed)
    for key, scene in tests.items():
        evaluation = score(scene, {**initial_and_baselines(scene), PLAIN: plain_unet_predict(model, scale, scene)})
        results["dsm"].setdefault(f"{key[0]}|{key[1]}", {}).setdefault(PLAIN, []).append(evaluation.metrics[PLAIN]["mae"])
    results["epochs"].setdefault(PLAIN, []).append(round(steps * BATCH / 512, 1))
    print(f"seed {seed} | {PLAIN}: {steps} steps, {time.time() - started:.0f} s", flush=True)


def train_dtm(train_scenes, tests, seconds, seed, results, work, name=DTM, overrides=None):
    started = time.time()
    run_dir = work / (f"run-{seed}-dtm" if name == DTM else f"run-{seed}-dtm-{list(DTM_ABLATIONS).index(name)}")
    result = train(train_scenes, run_dir, config=TrainConfig(chip_size=CHIP, max_epochs=100_000, seed=seed,
                                                             progress=False, target="dtm", **(overrides or {})),
                   callbacks=[CpuBudget(seconds)])
    results["epochs"].setdefault(name, []).append(result.epochs)
    for key, scene in tests.items():
        refined = refine(result.checkpoint, scene, run_dir / "refined.tif", progress=False)
        sigma = read_refined(sigma_path(refined)) if sigma_path(refined).exists() else None
        dems = {name: read_refined(refined), **initial_and_baselines(scene, "dtm")}
        evaluation = score(scene, dems, "dtm", sigma=sigma)
        if name == DTM:
            if sigma is not None:
                record_calibration(results, "calibration_dtm", key, evaluation)
            record_pixel_size(results, result.checkpoint, scene, key, "dtm", evaluation.metrics[name]["mae"],
                              run_dir / "own-pixel-size.tif")
        for stratum in ("tall vegetation", "buildings", "bare", "all"):
            entry = evaluation.strata.get(stratum)
            if entry and entry["pixels"]:
                for method in (name, "smrf_ground", "initial DSM"):
                    results["dtm"].setdefault(f"{key[0]}|{key[1]}|{stratum}", {}).setdefault(method, []).append(
                        entry["metrics"][method]["mae"])
    print(f"seed {seed} | {name}: {result.epochs} epochs, {time.time() - started:.0f} s", flush=True)


def recalibrate(work: Path, seeds: list[int], results: dict) -> dict:
    """Refit σ's calibration factor of the saved deepdem checkpoints (defaults, DTM) with
    training's own step (:func:`deepdem.train.calibrate_sigma` on the training scenes'
    validation chips, as ``train`` builds them), then score σ on the held-out scenes again.

    For a change of the calibration alone: the weights, hence every height and MAE, stay the
    same (checked against the recorded MAEs, to float32 rounding).
    """
    from deepdem.data import ChipDataset, SceneArrays, collate_chips, spatial_split
    from deepdem.models import load_checkpoint, save_checkpoint
    from deepdem.train import calibrate_sigma
    from torch.utils.data import DataLoader

    scenes = build_scenes(work)
    train_scenes = [s for (site, _), s in scenes.items() if SITES[site][1] == "train"]
    tests = {key: s for key, s in scenes.items() if SITES[key[0]][1] == "test"}
    results["calibration"], results["calibration_dtm"] = {}, {}
    for i, seed in enumerate(seeds):
        for run, target, name, kind in ((f"run-{seed}-0", "dsm", DEEPDEM, "calibration"),
                                        (f"run-{seed}-dtm", "dtm", DTM, "calibration_dtm")):
            checkpoint = work / run / "best.ckpt"
            task = load_checkpoint(checkpoint)
            kwargs = task.model_kwargs
            arrays = [SceneArrays(s, kwargs["bands"], [target], CHIP, scale=float(kwargs["GSF_DICT"][str(CHIP)]),
                                  fill_holes=kwargs.get("dsm_holes") == "idw") for s in train_scenes]
            validation = ChipDataset(arrays, [spatial_split(s.shape, CHIP, 0.0)[1] for s in train_scenes],
                                     kwargs["bands"], CHIP, "val")
            loader = DataLoader(validation, batch_size=16, collate_fn=collate_chips)
            kwargs["sigma_temperature"] = calibrate_sigma(task, loader, "cpu", autocast=AUTOCAST)
            save_checkpoint(task, checkpoint)
            for key, scene in tests.items():
                refined = refine(checkpoint, scene, work / run / "recalibrated.tif", progress=False)
                dems = {name: read_refined(refined), **initial_and_baselines(scene, target)}
                evaluation = score(scene, dems, target, sigma=read_refined(sigma_path(refined)))
                record_calibration(results, kind, key, evaluation)
                if target == "dsm":
                    recorded = results["dsm"][f"{key[0]}|{key[1]}"][DEEPDEM][i]
                    # The same weights: the same heights, up to float32 rounding in refine.
                    assert abs(evaluation.metrics[name]["mae"] - recorded) < 1e-4 * recorded, \
                        (key, recorded, evaluation.metrics[name]["mae"])
            print(f"seed {seed} | {name}: σ factor {kwargs['sigma_temperature']:.3f}", flush=True)
    results["calibration_refit"] = "σ factors refitted on the same checkpoints (--recalibrate)"
    return results


EPISTEMIC = ("one model", "one model, --tta", "ensemble of the seeds", "ensemble of the seeds, --tta")


def epistemic(work: Path, seeds: list[int]) -> dict:
    """σ with the models' own disagreement added, on the saved deepdem checkpoints: refine's
    ``--tta`` (σ of the 8 views' mixture) and the ensemble of the seeds' models (the mixture of
    their refined DSMs: mean heights, σ² = mean of the σ² + variance of the heights, by the law of
    total variance). Nothing is retrained; the calibration factors are the checkpoints' own.
    """
    scenes = build_scenes(work)
    tests = {key: s for key, s in scenes.items() if SITES[key[0]][1] == "test"}
    results: dict = {"generator": scenes_generator(work)}
    for key, scene in tests.items():
        for tta in (False, True):
            outputs = []
            for seed in seeds:
                refined = refine(work / f"run-{seed}-0" / "best.ckpt", scene, work / f"run-{seed}-0" / "epistemic.tif",
                                 tta=tta, progress=False)
                outputs.append((read_refined(refined), read_refined(sigma_path(refined))))
            heights, sigmas = np.stack([h for h, _ in outputs]), np.stack([s for _, s in outputs])
            ensemble = (heights.mean(axis=0), np.sqrt((sigmas ** 2).mean(axis=0) + heights.var(axis=0)))
            for name, members in ((EPISTEMIC[tta], outputs), (EPISTEMIC[2 + tta], [ensemble])):
                for dem, sigma in members:
                    evaluation = score(scene, {name: dem, **initial_and_baselines(scene)}, sigma=sigma)
                    metrics = evaluation.calibration["all"]
                    results.setdefault(f"{key[0]}|{key[1]}", {}).setdefault(name, []).append(
                        {k: metrics[k] for k in CALIBRATION_KEYS})
        print(f"{key[0]} | {key[1]}: done", flush=True)
    return results


def epistemic_tables(results: dict, seeds: list[int]) -> list[str]:
    rows = ["| site | errors | σ from | 68 % interval covers (%) | 90 % covers (%) | Spearman σ vs abs(error) | "
            "median σ (m) | MAE (m) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, per in results.items():
        if key == "generator":
            continue
        for name in EPISTEMIC:
            values = per[name]
            cells = [range_cell([100.0 * v["coverage_68"] for v in values], 1), range_cell([100.0 * v["coverage_90"] for v in values], 1),
                     range_cell([v["spearman"] for v in values], 2), range_cell([v["sharpness"] for v in values], 2),
                     range_cell([v["mae"] for v in values], 3)]
            rows.append(f"| {' | '.join(key.split('|'))} | {name} | " + " | ".join(cells) + " |")
    rows += ["", f"The deepdem (defaults) checkpoints of the section above (seeds {', '.join(map(str, seeds))}), "
             "refined again: one model (median over seeds, min–max), with `--tta`, and the ensemble of the seeds' "
             "models (one value). All pixels of each held-out scene."]
    return rows


def default_work() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "deepdem-real-terrain"


# -- tables -------------------------------------------------------------------------------------

def range_cell(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    # The range at the median's precision: one digit fewer once printed 0.35 (0.2–0.3).
    return f"{np.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def cell_by_seed(change: list[float], ours: list[float]) -> str:
    """The ratio of the seed-median MAEs; in brackets, the range of the seeds' own ratios."""
    text = f"{np.median(change) / np.median(ours):.3f}"
    if 1 < len(change) == len(ours):  # the same seeds on both sides
        by_seed = np.asarray(change) / np.asarray(ours)
        text += f" ({by_seed.min():.2f}–{by_seed.max():.2f})"
    return text


def ablation_tables(results: dict, seeds: list[int], seconds: float) -> list[str]:
    """One change at a time against the defaults: MAE ÷ the defaults' MAE per held-out scene."""
    dsm = results["dsm"]
    changes = [m for m in [*ABLATIONS, OWN_SCALE] if any(m in per for per in dsm.values())]
    rows = ["| site | errors | deepdem (defaults) MAE (m) | " + " | ".join(f"{c} ÷ defaults" for c in changes) + " |",
            "|---|---|---:|" + "---:|" * len(changes)]

    for key, per in dsm.items():
        if DEEPDEM not in per:
            continue
        rows.append(f"| {' | '.join(key.split('|'))} | {range_cell(per[DEEPDEM])} | "
                    + " | ".join(cell_by_seed(per[c], per[DEEPDEM]) if c in per else "" for c in changes) + " |")
    rows += ["", "Ratio of the seed-median MAEs; in brackets, the range of the seed-by-seed ratios. Above 1: the "
             "change makes the refined DSM worse than the defaults (for the ablations: the default it undoes helps). "
             f"Seeds {', '.join(map(str, seeds))}; {seconds:.0f} s of process CPU time per model; training and "
             "held-out scenes as in the section above."]
    if results.get("epochs"):
        # A CPU-time budget buys more epochs on a faster machine, and a short run's ablation can change
        # sign with its length: the epochs say which regime the table measured.
        rows[-1] += f" Median epochs of 512 chips: {median_epochs(results)}."
    return rows + dtm_ablation_table(results)


def dtm_ablation_table(results: dict) -> list[str]:
    """The DTM's changes against the DTM at its defaults, stratum by stratum (tall vegetation, buildings)."""
    dtm = {key: per for key, per in results.get("dtm", {}).items() if DTM in per and not key.endswith("|all")}
    changes = [m for m in DTM_ABLATIONS if any(m in per for per in dtm.values())]
    if not changes:
        return []
    rows = ["", "### DTM: MAE against the LIDAR DTM ÷ the DTM's defaults", "",
            "| site | errors | stratum | deepdem --target dtm MAE (m) | ÷ SMRF | "
            + " | ".join(f"{c} ÷ defaults" for c in changes) + " | " + " | ".join(f"{c} ÷ SMRF" for c in changes) + " |",
            "|---|---|---|---:|---:|" + "---:|" * (2 * len(changes))]
    for key, per in dtm.items():
        ours, smrf = np.median(per[DTM]), np.median(per["smrf_ground"])
        rows.append(f"| {' | '.join(key.split('|'))} | {range_cell(per[DTM])} | {ours / smrf:.3f} | "
                    + " | ".join(cell_by_seed(per[c], per[DTM]) if c in per else "" for c in changes) + " | "
                    + " | ".join(f"{np.median(per[c]) / smrf:.3f}" if c in per else "" for c in changes) + " |")
    rows += ["", f"Ratios of the seed-median MAEs, as above; the DTM trains at batch {default_batch_size('dtm')} by "
             "default. SMRF: the ground filter run on the initial DSM (`deepdem.baselines`)."]
    return rows


def median_epochs(results: dict) -> str:
    """Each model's median number of epochs over the seeds, as one phrase."""
    return ", ".join(f"{m} {np.median(v):g}" for m, v in results["epochs"].items())


def tables(results: dict, seeds: list[int], seconds: float) -> list[str]:
    dsm = results["dsm"]
    methods = list(dict.fromkeys(m for per in dsm.values() for m in per))
    order = ["initial DSM", "idw_median", "idw_gaussian", PLAIN, "ResDepth-UNet, DSM only", "ResDepth-UNet, stereo",
             BEFORE, NO_SIGMA, DEEPDEM]
    methods = [m for m in order if m in methods] + [m for m in methods if m not in order]
    rows = ["### DSM: MAE (m) on each held-out scene, median over seeds (min–max)", "",
            "| site | errors | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
    for key, per in dsm.items():
        site, errors = key.split("|")
        rows.append(f"| {site} | {errors} | " + " | ".join(range_cell(per.get(m, [])) for m in methods) + " |")
    rows += ["", "### DSM: ratios of the seed-median MAEs", "",
             "| site | errors | deepdem ÷ initial | plain UNet ÷ initial | deepdem ÷ plain UNet | deepdem ÷ best ResDepth | previous defaults ÷ initial | deepdem ÷ no σ head |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for key, per in dsm.items():
        site, errors = key.split("|")
        med = {m: float(np.median(v)) for m, v in per.items() if v}
        if DEEPDEM not in med:
            continue
        resdepth = min(med.get("ResDepth-UNet, DSM only", np.inf), med.get("ResDepth-UNet, stereo", np.inf))
        ratio = med[DEEPDEM] / med["initial DSM"]
        ratios.append(ratio)
        cells = [ratio, med.get(PLAIN, np.nan) / med["initial DSM"], med[DEEPDEM] / med.get(PLAIN, np.nan),
                 med[DEEPDEM] / resdepth, med.get(BEFORE, np.nan) / med["initial DSM"],
                 med[DEEPDEM] / med.get(NO_SIGMA, np.nan)]
        rows.append(f"| {site} | {errors} | " + " | ".join(f"{c:.3f}" if 0 < c < np.inf else "" for c in cells) + " |")
    if ratios:
        rows += ["", f"Median over the held-out scenes of deepdem's MAE ÷ initial: **{np.median(ratios):.3f}**."]
    sigma_costs = [np.median(per[DEEPDEM]) / np.median(per[NO_SIGMA]) for per in dsm.values()
                   if per.get(DEEPDEM) and per.get(NO_SIGMA)]
    if sigma_costs:
        rows += [f"Median over the held-out scenes of deepdem's MAE ÷ the same model without its σ head: "
                 f"**{np.median(sigma_costs):.3f}**."]
    rows += calibration_tables(results)
    rows += pixel_size_table(results)
    if results["dtm"]:
        rows += ["", "### DTM under vegetation and buildings: MAE (m) against the LIDAR DTM, median over seeds (min–max)", "",
                 "| site | errors | stratum | deepdem --target dtm | SMRF ground filter | initial DSM | deepdem ÷ SMRF |",
                 "|---|---|---|---:|---:|---:|---:|"]
        for key, per in results["dtm"].items():
            site, errors, stratum = key.split("|")
            ours, smrf = np.median(per[DTM]), np.median(per["smrf_ground"])
            rows.append(f"| {site} | {errors} | {stratum} | {range_cell(per[DTM])} | "
                        f"{range_cell(per['smrf_ground'])} | {range_cell(per['initial DSM'])} | {ours / smrf:.3f} |")
    worse = [(k, np.median([a for a, _ in v]), np.median([b for _, b in v])) for k, v in results["strata"].items()]
    worse = sorted((w for w in worse if w[1] > w[2]), key=lambda w: w[2] / w[1])
    rows += ["", f"### Strata (≥ 1,000 px) where deepdem's seed-median MAE is above the initial DSM's: "
             f"{len(worse)} of {len(results['strata'])}", ""]
    if worse:
        rows += ["| site | errors | stratum | deepdem MAE | initial MAE |", "|---|---|---|---:|---:|"]
        rows += [f"| {' | '.join(k.split('|'))} | {a:.3f} | {b:.3f} |" for k, a, b in worse[:15]]
        if len(worse) > 15:
            rows.append(f"| … {len(worse) - 15} more (`results.json` in the working folder) | | | | |")
    rows += ["", f"Training: sites {', '.join(s for s, v in SITES.items() if v[1] == 'train')}, both error kinds "
             f"(6 scenes); seeds {', '.join(map(str, seeds))}; {seconds:.0f} s of process CPU time per model; chips of "
             f"{CHIP} px, batch {BATCH} (DTM {default_batch_size('dtm')}), {'bf16 autocast' if AUTOCAST else 'float32 (this CPU has no native bf16)'}. Median epochs of 512 chips: {median_epochs(results)}. Scores on the pixels valid "
             "in the truth and in the inputs (refine's output mask)."]
    return rows


def calibration_tables(results: dict) -> list[str]:
    """σ on the held-out scenes: coverage of its central intervals, rank correlation, sharpness."""
    rows = []
    for kind, title in (("calibration", "DSM"), ("calibration_dtm", "DTM (deepdem --target dtm)")):
        per_scene = results.get(kind) or {}
        if not per_scene:
            continue
        rows += ["", f"### Uncertainty σ of the refined {title} on the held-out scenes, median over seeds (min–max)", "",
                 "| site | errors | stratum | 68 % interval covers (%) | 90 % covers (%) | 95 % covers (%) | "
                 "Spearman σ vs abs(error) | Spearman if σ were exact | median σ (m) | MAE (m) |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, seeds in per_scene.items():
            cells = []
            for metric in CALIBRATION_KEYS:
                values = [float(s[metric]) for s in seeds if s.get(metric) is not None]
                coverage = metric.startswith("coverage")
                cells.append(range_cell([100.0 * v for v in values], 1) if coverage else range_cell(values, 2))
            rows.append(f"| {' | '.join(key.split('|'))} | " + " | ".join(cells) + " |")
        overall = {m: [float(np.median([s.get(m, np.nan) for s in seeds])) for k, seeds in per_scene.items()
                       if k.endswith("|all")] for m in ("coverage_68", "coverage_90", "spearman", "spearman_if_exact")}
        if overall["coverage_68"]:
            rows += ["", f"Over the held-out scenes (all pixels): the 68 % interval covers "
                     f"{100 * min(overall['coverage_68']):.1f}–{100 * max(overall['coverage_68']):.1f} %, the 90 % "
                     f"interval {100 * min(overall['coverage_90']):.1f}–{100 * max(overall['coverage_90']):.1f} %; "
                     f"Spearman {min(overall['spearman']):.2f}–{max(overall['spearman']):.2f}, where a σ exactly right "
                     f"would reach {min(overall['spearman_if_exact']):.2f}–{max(overall['spearman_if_exact']):.2f} "
                     "(one error drawn from σ per pixel; below it σ misses where the errors are, above it σ ranks "
                     "them but spreads too little). σ is the standard "
                     "deviation of a Laplace error (intervals ±0.81σ, ±1.63σ, ±2.12σ), calibrated by one factor "
                     "fitted on the training scenes' validation chips (their 68 % and 90 % intervals' coverage)"
                     + (f"; {results['calibration_refit']}." if results.get("calibration_refit") else ".")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cpu-seconds", type=float, default=240.0, help="training budget per model (process CPU s)")
    parser.add_argument("--work", default=str(default_work()),
                        help="working folder (gridded truths and scenes are kept there between runs)")
    parser.add_argument("--ablations", action="store_true",
                        help="train the defaults and each change undone on its own (a section of its own)")
    parser.add_argument("--tables-only", action="store_true", help="print (and --write) the tables of the last run")
    parser.add_argument("--only", nargs="+", help="run only the models whose name contains one of these")
    parser.add_argument("--recalibrate", action="store_true",
                        help="refit σ's calibration factor of the last run's checkpoints with the current "
                        "training code and score σ again (the heights and MAEs do not change)")
    parser.add_argument("--epistemic", action="store_true",
                        help="score σ with the models' disagreement added (--tta, the seeds' ensemble) on the "
                        "last run's checkpoints (a section of its own)")
    parser.add_argument("--views-unknown", action="store_true",
                        help="deepdem's defaults on scenes prepared with and without the views' angles "
                        "(a section of its own)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.write and args.only:
        parser.error("--write needs every model: drop --only")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.views_unknown:
        results_file = work / "views-unknown.json"
        results = (json.loads(results_file.read_text()) if args.tables_only
                   else views_unknown(work, args.seeds, args.cpu_seconds))
        results_file.write_text(json.dumps(results, indent=1))
        rows = views_unknown_tables(results, args.seeds, args.cpu_seconds) + ["", generator_line(results)]
        print("\n".join(rows))
        if args.write:
            update_benchmarks("The parallax band when the views' angles are unknown",
                              f"python bench/real_terrain.py --seeds {' '.join(map(str, args.seeds))} "
                              f"--cpu-seconds {args.cpu_seconds:.0f} --views-unknown --write", rows)
        return
    if args.epistemic:
        results_file = work / "epistemic.json"
        wanted = [results_file] if args.tables_only else [work / f"run-{seed}-0" / "best.ckpt" for seed in args.seeds]
        missing = [str(path) for path in wanted if not path.exists()]
        if missing:
            parser.error(f"--epistemic needs an earlier run's results; missing: {', '.join(missing)}")
        results = json.loads(results_file.read_text()) if args.tables_only else epistemic(work, args.seeds)
        results_file.write_text(json.dumps(results, indent=1))
        rows = epistemic_tables(results, args.seeds) + ["", generator_line(results)]
        print("\n".join(rows))
        if args.write:
            update_benchmarks("Uncertainty σ with TTA and seed ensembles",
                              f"python bench/real_terrain.py --seeds {' '.join(map(str, args.seeds))} --epistemic --write",
                              rows)
        return
    results_file = work / ("ablations.json" if args.ablations else "results.json")
    if args.tables_only:
        results = json.loads(results_file.read_text())
    elif args.recalibrate:
        results = recalibrate(work, args.seeds, json.loads(results_file.read_text()))
        results_file.write_text(json.dumps(results, indent=1))
    else:
        results = run(work, args.seeds, args.cpu_seconds, args.ablations, args.only)
        results_file.write_text(json.dumps(results, indent=1))
    make = ablation_tables if args.ablations else tables
    rows = make(results, args.seeds, args.cpu_seconds) + ["", generator_line(results)]
    print("\n".join(rows))
    if args.write:
        command = (f"python bench/real_terrain.py --seeds {' '.join(map(str, args.seeds))} "
                   f"--cpu-seconds {args.cpu_seconds:.0f}{' --ablations' if args.ablations else ''} --write")
        if results.get("calibration_refit"):
            command += "`, then `" + command.replace(" --write", " --recalibrate --write")
        section = "Ablations on real LIDAR terrain" if args.ablations else "Accuracy on real LIDAR terrain, across sites"
        update_benchmarks(section, command, rows)


if __name__ == "__main__":
    main()
