"""Training: Lightning around the residual network, on chips of one or more Scenes.

Validation runs on a fixed grid of chips with no augmentation, so its metrics are comparable
between epochs: of the training scenes themselves by default (the fit), of a hold-out stripe of
each (``--holdout-fraction``), or of other scenes (``--val-scene``).
Every run parameter is a field of :class:`TrainConfig`, settable from YAML (``--config``),
printable (``--print_config``) and stored in the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, WeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from .data import SCENE_SAMPLING, ChipDataset, SceneArrays, collate_chips, largest_fitting_chip, spatial_split
from .errors import InputError
from .flags import fraction, non_negative_int, number, positive, positive_int, share
from .models import (DEFAULT_BANDS, SCALE_SOURCES, TARGETS, DeepDEMRegressionTask, autocast_is_fast,
                     default_encoder_depth, load_checkpoint, save_checkpoint)
from .scene import PIXEL_SIZE_TOLERANCE, Scene, missing_band_hints

log = logging.getLogger(__name__)


#: Chips per batch when none is given. At a CPU's budget the DSM gains from more, smaller steps:
#: batch 8 against 16 gave 0.970-0.987 of the MAE on 7 of 8 held-out real-terrain scenes. The DTM
#: under canopy lost from them: 1.11-1.23 under tall vegetation on 5 of 8 (0.89-0.98 on the other 3).
#: "both" trains a DTM head too, and keeps its batch (not measured on its own).
DEFAULT_BATCH_SIZE = {"dsm": 8, "dtm": 16, "both": 16}


def default_batch_size(target: str) -> int:
    """Chips per batch for ``target`` (dsm, dtm or both) when none is asked for."""
    return DEFAULT_BATCH_SIZE[target]


def _is_switch(f: dataclasses.Field) -> bool:
    """A TrainConfig field that is on or off (``progress``: None means "when stderr is a terminal")."""
    return isinstance(f.default, bool) or f.name == "progress"


@dataclass
class TrainConfig:
    """Every parameter of a training run (YAML keys have the same names)."""

    scenes: list[str] = field(default_factory=list, metadata={"help": "scene directories to train on"})
    out: str = field(default="run", metadata={"help": "run directory: best.ckpt, checkpoints/, logs/"})
    bands: list[str] | None = field(default=None, metadata={"help": "input bands by name; default: those of the seven default bands (the six DeepDEM bands and parallax) present in every scene"})
    target: str = field(default="dsm", metadata={"help": "dsm, dtm, or both (two heads)"})
    arch: str = field(default="Unet", metadata={"help": "ResDepth or a segmentation-models-pytorch class (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...)"})
    encoder: str = field(default="resnet18", metadata={"help": "smp encoder name (ignored by ResDepth)"})
    encoder_depth: int | None = field(default=None, metadata={"help": "smp encoder stages, 3 to 5 (below 5: Unet and UnetPlusPlus only; ignored by ResDepth): each one fewer drops the deepest stage and the decoder's widest block, so more steps fit in a time budget; default: the --init checkpoint's, else 3 for Unet and UnetPlusPlus and 5 for other decoders"})
    chip_size: int = field(default=256, metadata={"help": "chip side in pixels"})
    batch_size: int | None = field(default=None, metadata={"help": "chips per batch (per device); default: 8 for --target dsm, 16 for dtm and both (the better of the two for each target at equal CPU time on real terrain)"})
    samples_per_epoch: int = field(default=512, metadata={"help": "random training chips per epoch"})
    max_epochs: int = field(default=300, metadata={"help": "epoch limit"})
    max_minutes: float | None = field(default=None, metadata={"help": "wall-clock limit in minutes"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    lr_patience: int = field(default=50, metadata={"help": "epochs without val MAE gain before the LR halves"})
    early_stopping_patience: int = field(default=75, metadata={"help": "epochs without val MAE gain (0.005 m) before stopping"})
    holdout_fraction: float = field(default=0.0, metadata={"help": "share of each scene's long axis held out for validation (at least one chip); 0: train on every pixel and validate on the fit (or on --val-scene)"})
    val_scenes: list[str] = field(default_factory=list, metadata={"help": "scene directories to validate on (instead of a hold-out)"})
    scale_source: str = field(default="checkpoint", metadata={"help": "DSM scale factor of every scene, in training and refine: checkpoint (the training scenes' mean) or scene (each scene's own)"})
    init: str | None = field(default=None, metadata={"help": "checkpoint to fine-tune from (same bands, target and architecture); its scale factor is kept"})
    identity_init: bool = field(default=True, metadata={"help": "start from a network that returns the input DSM unchanged (zeroed output layer)"})
    fill_holes: bool = field(default=True, metadata={"help": "fill the DSM's holes by inverse-distance weighting before normalising"})
    relief_augmentation: bool = field(default=True, metadata={"help": "stretch (0.7-3x) and tilt (up to 40 deg) the relief of a share of the training chips (--relief-share), DSM and truth alike"})
    relief_share: float = field(default=0.5, metadata={"help": "share of the training chips whose relief is changed, with --relief-augmentation (0-1)"})
    scene_sampling: str = field(default="equal", metadata={"help": "training chips per scene: as many from each (equal) or in proportion to its area (area)"})
    gradient_loss: float = field(default=0.0, metadata={"help": "weight of an L1 term on the height differences between neighbouring pixels (edges), beside the L1 on heights"})
    uncertainty: bool = field(default=True, metadata={"help": "learn a per-pixel sigma beside each height (Laplace NLL, the mean still trained by L1) and calibrate it on the validation chips; refine then writes <out>_sigma.tif"})
    weight_averaging: bool = field(default=True, metadata={"help": "validate, keep and refine with a running average of the weights that leans on the run's last steps (TrailingWeightAverage)"})
    swap_images: bool = field(default=True, metadata={"help": "randomly swap the left and right images while training"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16-mixed on a GPU and on a CPU with native bf16, else 32-true), 32-true, bf16-mixed, 16-mixed"})
    channels_last: bool = field(default=True, metadata={"help": "channels-last memory format (about 1.4x faster on CPU)"})
    accelerator: str = field(default="auto", metadata={"help": "auto, cpu, gpu"})
    devices: int | str = field(default=1, metadata={"help": "devices per node (processes with --strategy ddp on CPU)"})
    num_nodes: int = field(default=1, metadata={"help": "nodes for distributed training"})
    strategy: str = field(default="auto", metadata={"help": "auto, ddp, ddp_spawn, ... (Lightning strategies)"})
    num_workers: int = field(default=0, metadata={"help": "data-loader worker processes"})
    seed: int = field(default=0, metadata={"help": "seed of weights, chips and augmentation"})
    resume: bool = field(default=False, metadata={"help": "continue from out/checkpoints/last.ckpt"})
    progress: bool | None = field(default=None, metadata={"help": "progress bar (default: when stderr is a terminal)"})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            raise InputError("config file not found", path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
        data = data.get("train", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise InputError("a training config must be a mapping of parameter: value", path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown parameter(s) {', '.join(unknown)} (see 'deepdem train --print_config')", path)
        # YAML reads yes/no/true/false as booleans; anything else in a switch is a mistake, not "on"
        not_switches = [f"{f.name}: {data[f.name]!r}" for f in dataclasses.fields(cls)
                        if _is_switch(f) and f.name in data and not isinstance(data[f.name], bool)
                        and not (data[f.name] is None and f.default is None)]
        if not_switches:
            raise InputError(f"expected true or false: {', '.join(not_switches)}", path)
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})

    def to_yaml(self, comments: bool = True) -> str:
        lines = ["# deepdem train configuration (deepdem train --config this.yaml)"] if comments else []
        for f in dataclasses.fields(self):
            if comments:
                lines.append(f"# {f.metadata.get('help', '')}")
            value = yaml.safe_dump(getattr(self, f.name), default_flow_style=True).replace("\n...\n", "").strip()
            lines.append(f"{f.name}: {value}")
        return "\n".join(lines) + "\n"


def add_train_arguments(parser) -> None:
    """One command-line flag per :class:`TrainConfig` field (``chip_size`` → ``--chip-size``).

    Flags default to None so that, with ``--config``, only what is given on the command line
    overrides the file.
    """
    import argparse

    parser.add_argument("--config", help="YAML file of parameters (see --print_config)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved configuration as YAML and exit")
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{f.metadata.get('help', '')} (default: {_default_of(f)})"
        if f.name == "scenes":
            parser.add_argument("--scene", dest="scenes", action="append", help="scene directory (repeat for several)")
        elif f.name == "val_scenes":
            parser.add_argument("--val-scene", dest="val_scenes", action="append", help=help_text)
        elif f.name == "scale_source":
            parser.add_argument("--scale-source", choices=list(SCALE_SOURCES), default=None, help=help_text)
        elif f.name == "out":
            parser.add_argument("--out", help=help_text)
        elif f.name == "bands":
            parser.add_argument("--bands", nargs="+", help=help_text)
        elif _is_switch(f):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = type(f.default) if f.default is not None and not isinstance(f.default, str) else str
            kind = FLAG_TYPES.get(f.name, kind)
            choices = FLAG_CHOICES.get(f.name)
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, choices=choices, help=help_text)


def _int_or_str(value: str):
    return int(value) if value.isdigit() else value


#: Command-line types of the numeric fields: out of range is one line naming the flag, exit 2.
FLAG_TYPES = {
    "chip_size": number(int, 32), "batch_size": positive_int, "samples_per_epoch": positive_int,
    "max_epochs": positive_int, "max_minutes": positive, "lr": positive, "lr_patience": non_negative_int,
    "early_stopping_patience": non_negative_int, "holdout_fraction": fraction, "relief_share": share,
    "gradient_loss": number(float, 0), "encoder_depth": number(int, 3, 5),
    "num_nodes": positive_int, "num_workers": non_negative_int, "devices": _int_or_str,
}
FLAG_CHOICES = {
    "target": list(TARGETS), "scene_sampling": list(SCENE_SAMPLING), "precision": ["auto", "32-true", "bf16-mixed", "16-mixed", "64-true", "32", "16", "bf16"],
    "accelerator": ["auto", "cpu", "gpu", "cuda", "mps", "tpu"],
}


def _default_of(f) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_from_args(args) -> TrainConfig:
    """The configuration from ``--config`` (if given) overridden by the flags given."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.config:
        return TrainConfig.from_yaml(args.config, **given)
    return TrainConfig(**given)


@dataclass
class TrainResult:
    checkpoint: Path
    best_val_mae: float
    initial_val_mae: float
    epochs: int
    seconds: float


class _EpochSeeder(Callback):
    """Gives the training dataset a new epoch number so each epoch draws new chips."""

    def on_train_epoch_start(self, trainer, pl_module):
        dataset = trainer.train_dataloader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)


class TrailingWeightAverage(WeightAveraging):
    """A running average of the weights that leans on the last part of the run, whatever its length.

    After ``n`` updates the average moves toward the current weights by ``(power - 1) / (power + n)``,
    so the weights of update ``t`` of ``T`` count in proportion to ``t ** (power - 2)``: with the
    default ``power`` of 4, the last third of the run holds 70 % of the average. A fixed EMA decay,
    or SWA's start epoch, would need the run's length, which a ``--max-minutes`` run does not know.
    Why average: the error on scenes never seen moves a lot from one epoch to the next while the
    fit barely does, so the epoch picked on the fit is close to a random draw among them.
    Lightning's callback validates and checkpoints the average and resumes it.
    """

    def __init__(self, power: float = 4.0, every_n_steps: int = 4):
        # every few steps: updating at every step cost a 64-px-chip run on 2 CPU cores a quarter of its epochs
        super().__init__(use_buffers=True, multi_avg_fn=self._lean_on_the_last_steps)
        self.power, self.every_n_steps = power, every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0

    def averaged_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The averaged weights under the module's own names (what validation scored), None before fitting."""
        if self._average_model is None:
            return None
        prefix = "module."  # AveragedModel's wrapper; its own counters have no prefix
        return {name[len(prefix):]: value for name, value in self._average_model.state_dict().items()
                if name.startswith(prefix)}

    @torch.no_grad()
    def _lean_on_the_last_steps(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                                updates: torch.Tensor) -> None:
        weight = (self.power - 1) / (self.power + float(updates))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # counters (batch norm's batches seen) are not averaged
            for a, c in zip(averaged, current):
                a.copy_(c)


#: Where a run directory keeps the full training state that ``--resume`` continues from.
RESUME_POINT = Path("checkpoints") / "last.ckpt"


class EpochCheckpoints(Callback):
    """The best epoch's weights kept in memory, and the resume point (``path``) written at most
    every ``every_seconds`` and when training ends.

    Lightning's ``ModelCheckpoint`` writes the whole trainer state (weights, their average and
    Adam's moments: 220 MB for a resnet18 UNet of depth 5) in every epoch that improves the monitored
    metric, which with weight averaging is nearly every epoch: 1.0 s of each 6.5-s epoch of a
    64-px-chip run on 2 CPU cores. Here an improving epoch costs a copy in memory; a ``kill -9``
    loses at most ``every_seconds`` of training, and the resume point carries the best weights.
    """

    def __init__(self, path: str | os.PathLike, monitor: str = "val_mae", every_seconds: float = 60.0):
        self.path, self.monitor, self.every_seconds = Path(path), monitor, every_seconds
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._saved_at: float | None = None  # time.monotonic() of this process's last write
        self._saved_step: int | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and bool(torch.isfinite(score)) and (self.best_score is None or float(score) < self.best_score):
            self.best_score, self.best_epoch = float(score), trainer.current_epoch
            validated = next((c.averaged_state_dict() for c in trainer.callbacks if isinstance(c, TrailingWeightAverage)),
                             None) or pl_module.state_dict()
            self.best_state = {name: value.detach().to("cpu", copy=True) for name, value in validated.items()}

    def on_train_epoch_end(self, trainer, pl_module):
        # at the epoch's end, as Lightning's own callback does: a resume then starts the next epoch
        due = self._saved_at is None or time.monotonic() - self._saved_at >= self.every_seconds
        if trainer.strategy.broadcast(due, src=0):  # every rank joins a save, so rank 0 decides for all
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        # before the weight average's own on_train_end puts the average into the model (see _trainer)
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    def _save(self, trainer) -> None:
        # the full state (optimiser, loops, callbacks): a resume point, not weights to refine with.
        # Said, since Lightning logs its default on every save otherwise
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state_dict["best_score"], state_dict["best_epoch"]
        self.best_state = state_dict["best_state"]


class _EpochPrinter(Callback):
    """One line per epoch (at most every ``every_seconds``) when there is no progress bar."""

    def __init__(self, every_seconds: float = 20.0):
        self.every_seconds, self.last = every_seconds, 0.0

    def on_validation_epoch_end(self, trainer, pl_module):
        now = time.time()
        if trainer.sanity_checking or not trainer.is_global_zero or now - self.last < self.every_seconds:
            return
        self.last = now
        m = trainer.callback_metrics
        train_l1 = f"train L1 {float(m['train_l1']):.3f} m, " if "train_l1" in m else ""
        nmad = f", NMAD {float(m['val_nmad']):.3f} m" if "val_nmad" in m else ""
        print(f"  epoch {trainer.current_epoch}: {train_l1}val MAE {float(m['val_mae']):.3f} m{nmad} "
              f"(initial DSM {float(m['val_initial_mae']):.3f} m)", flush=True)


def _check_scenes(scenes: Sequence[Scene], bands: Sequence[str], target_bands: Sequence[str], chip_size: int,
                  split: bool = True) -> None:
    for scene in scenes:
        missing = [b for b in (*bands, *target_bands) if not scene.has(b)]
        if missing:
            raise InputError(f"scene lacks band(s) {', '.join(missing)} (it has: {', '.join(scene.bands)})", scene.path)
        if min(scene.shape) < chip_size:
            raise InputError(f"scene of {scene.shape[0]}x{scene.shape[1]} px is smaller than chip size {chip_size}; "
                             f"largest chip size that fits: {largest_fitting_chip(scene.shape)}", scene.path)
        if split and max(scene.shape) < 2 * chip_size:
            raise InputError(
                f"scene of {scene.shape[0]}x{scene.shape[1]} px is too small to train with chip size {chip_size} "
                f"(a training area and a validation stripe of one chip each); largest chip size that fits: "
                f"{largest_fitting_chip(scene.shape, split=True)}",
                scene.path,
            )


def train(scenes: Sequence[str | os.PathLike | Scene] | None = None, out: str | os.PathLike | None = None,
          config: TrainConfig | None = None, callbacks: Sequence[Callback] = (), **kwargs: Any) -> TrainResult:
    """Train a DeepDEM model on scenes and save ``out/best.ckpt`` (weights + metadata).

    Parameters are those of :class:`TrainConfig`, given as a config or as keywords, e.g.
    ``train(["scenes/a"], "runs/a", chip_size=128, max_minutes=5)``; ``callbacks`` are extra
    Lightning callbacks.
    """
    config = dataclasses.replace(config or TrainConfig(), **kwargs)
    if scenes is not None:
        config.scenes = [s if isinstance(s, Scene) else str(s) for s in scenes]
    if out is not None:
        config.out = str(out)
    with _callers_process_state():
        return _train(config, list(callbacks))


#: What Lightning's ``seed_everything`` leaves in the environment for its data-loader workers.
_SEED_ENVIRONMENT = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def _callers_process_state():
    """Puts back what a run sets for the whole process: the random generators (seeded for the
    run), the seed's environment variables and torch's float32 matmul precision. A notebook or
    script that calls :func:`train` goes on with its own random streams and precision."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # A CUDA generator not yet initialised has no state of the caller's to keep.
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    environment = {name: os.environ.get(name) for name in _SEED_ENVIRONMENT}
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_float32_matmul_precision(precision)


def _check_values(config: TrainConfig) -> None:
    """The command line's range checks, for values from YAML or the library too."""
    import argparse

    for name, parse in FLAG_TYPES.items():
        value = getattr(config, name)
        if value is not None and name != "devices":
            try:
                parse(str(value))
            except argparse.ArgumentTypeError as exc:
                raise InputError(f"{name}: {exc}") from None


def _train(config: TrainConfig, extra_callbacks: list[Callback]) -> TrainResult:
    _check_values(config)
    if config.target not in TARGETS:
        raise InputError(f"target must be one of {', '.join(TARGETS)}, got {config.target!r}")
    if config.scale_source not in SCALE_SOURCES:
        raise InputError(f"scale_source must be one of {', '.join(SCALE_SOURCES)}, got {config.scale_source!r}")
    if config.scene_sampling not in SCENE_SAMPLING:
        raise InputError(f"scene_sampling must be one of {', '.join(SCENE_SAMPLING)}, got {config.scene_sampling!r}")
    opened = [s if isinstance(s, Scene) else Scene.open(s) for s in config.scenes]
    if not opened:
        raise InputError("no scene given (--scene DIR)")
    val_opened = [s if isinstance(s, Scene) else Scene.open(s) for s in config.val_scenes]
    opened, val_opened, parallax_geometry = _derive_parallax(opened, val_opened)
    bands = _input_bands(config, opened)
    chip_size = config.chip_size
    target_bands = [f"truth_{t}" for t in TARGETS[config.target]]
    holdout = config.holdout_fraction if not val_opened else 0.0
    _check_scenes(opened, bands, target_bands, chip_size, split=holdout > 0)
    _check_scenes(val_opened, bands, target_bands, chip_size, split=False)
    progress = sys.stderr.isatty() if config.progress is None else config.progress

    L.seed_everything(config.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    initial = _fine_tuning_start(config, bands) if config.init else None
    out = Path(config.out)
    resume_from = out / RESUME_POINT
    if config.resume and not resume_from.exists():
        raise InputError(f"nothing to resume: no {RESUME_POINT.as_posix()} in the run directory", out)
    resumed = None
    if config.resume:
        try:
            resumed = torch.load(resume_from, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
            raise InputError(f"cannot read the resume point ({str(exc).splitlines()[0][:200]})", resume_from) from None
    resumed_kwargs = (resumed or {}).get("hyper_parameters", {}).get("model_kwargs")
    if resumed_kwargs is not None:
        different = _network_differences(config, bands, resumed_kwargs)
        if different:
            raise InputError(f"cannot resume this run with another network: {'; '.join(different)}", resume_from)
    if config.batch_size is None:
        config.batch_size = default_batch_size(config.target)
    if config.encoder_depth is None:
        # not asked for: the network's the run continues (a checkpoint's, or a run's from before
        # depth 3 became the default), else the architecture's default
        start = initial.model_kwargs if initial is not None else resumed_kwargs
        config.encoder_depth = (int(start.get("encoder_depth", 5)) if start is not None
                                else default_encoder_depth(config.arch))
    gsf = _scale_factors(opened, chip_size, initial)
    # One factor for every scene (the training mean), as refine applies it to scenes never seen.
    shared_scale = gsf[str(chip_size)] if config.scale_source == "checkpoint" else None
    targets = list(TARGETS[config.target])

    def scene_arrays(scene):
        return SceneArrays(scene, bands, targets, chip_size, scale=shared_scale, fill_holes=config.fill_holes)

    arrays = [scene_arrays(s) for s in opened]
    splits = [spatial_split(s.shape, chip_size, holdout) for s in opened]
    train_set = ChipDataset(arrays, [t for t, _ in splits], bands, chip_size, "train",
                            config.samples_per_epoch, config.seed, swap_images=config.swap_images,
                            relief_share=config.relief_share if config.relief_augmentation else 0.0,
                            scene_sampling=config.scene_sampling)
    if val_opened:
        val_set = ChipDataset([scene_arrays(s) for s in val_opened],
                              [spatial_split(s.shape, chip_size, 0.0)[1] for s in val_opened], bands, chip_size, "val")
    else:
        val_set = ChipDataset(arrays, [v for _, v in splits], bands, chip_size, "val")
    model_kwargs = _model_kwargs(config, bands, gsf, opened, val_opened, holdout)
    if "parallax" in bands:
        model_kwargs["parallax_geometry"] = parallax_geometry
    if initial is not None and initial.has_sigma:  # its weights fit its own σ head (earlier: joint)
        model_kwargs["sigma_head"] = initial.model_kwargs.get("sigma_head", "joint")
    task = DeepDEMRegressionTask(model_kwargs)
    if initial is not None:
        task.load_state_dict(initial.state_dict())
    if config.channels_last:
        task = task.to(memory_format=torch.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    resumed_epoch = None
    if resumed is not None:
        resumed_epoch = int(resumed.get("epoch", -1))
        del resumed  # Lightning loads it again, with the optimiser's state
        print(f"resuming {out} after epoch {resumed_epoch}", flush=True)
    if not config.resume and resume_from.exists():
        log.warning("%s holds an earlier run; starting afresh (use --resume to continue it)", out)
    # absolute, so that `--config <run>/config.yaml` reads the same scenes from any folder
    stored = dataclasses.replace(config, scenes=[str(s.path.resolve()) for s in opened],
                                 val_scenes=[str(s.path.resolve()) for s in val_opened],
                                 init=str(Path(config.init).resolve()) if config.init else None)
    if config.resume:
        changed = _setting_changes(out / "config.yaml", stored)
        if changed:
            # allowed (a lower learning rate, say), but the rest of the run then differs from an
            # unbroken one; a default that changed since the run began shows up here too
            log.warning("%s: resuming with settings other than the run's: %s (give the run's to continue it "
                        "as it began: --config %s)", out, "; ".join(changed), out / "config.yaml")
    (out / "config.yaml").write_text(stored.to_yaml())

    trainer, checkpointing = _trainer(config, out, progress, extra_callbacks)
    loader_args = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate_chips,
                       persistent_workers=False, pin_memory=torch.cuda.is_available())
    started = time.time()
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    trainer.fit(
        task,
        DataLoader(train_set, shuffle=False, drop_last=True, **loader_args),
        val_loader,
        ckpt_path=str(resume_from) if config.resume else None,
        weights_only=True,
    )
    seconds = time.time() - started
    if not trainer.is_global_zero:
        return TrainResult(out / "best.ckpt", float("nan"), float("nan"), trainer.current_epoch, seconds)
    return _save_best(trainer, checkpointing, model_kwargs, val_loader, out, seconds, resumed_epoch)


def _derive_parallax(opened: Sequence[Scene], val_opened: Sequence[Scene]
                     ) -> tuple[list[Scene], list[Scene], list[float] | None]:
    """Scenes prepared without the views' angles store the orthos' shift, not the parallax band.
    Each such training scene gets its pair's geometry fitted on its truth DSM; the validation
    scenes, as refine's scenes, are read with the training pairs' median geometry, which the
    checkpoint records (``parallax_geometry``). Returns the scenes and that geometry (None
    when no training scene has parallax)."""
    from .parallax import fit_scene_geometry, shift_per_metre
    from .synth import View

    derived, geometries = [], []
    for scene in opened:
        views = (scene.manifest.get("provenance", {}).get("parallax") or {}).get("views")
        if scene.parallax_geometry is not None:  # derived by the caller (Scene.with_parallax_geometry)
            geometries.append(np.asarray(scene.parallax_geometry))
        elif scene.has("parallax") and views:
            geometries.append(shift_per_metre(tuple(View(v["azimuth"], v["off_nadir"]) for v in views)))
        elif scene.stores_parallax_shift:  # and no geometry yet: the first branch takes a given one
            try:
                geometry = fit_scene_geometry(scene)
            except InputError as exc:
                log.warning("training without the parallax band of %s: %s", scene.path, exc)
            else:
                log.info("%s: the pair's shift per metre of DSM error, fitted on the truth: (%.3f, %.3f)",
                         scene.path, *geometry)
                geometries.append(geometry)
                scene = scene.with_parallax_geometry(geometry)
        derived.append(scene)
    if not geometries:
        return derived, list(val_opened), None
    median = [float(v) for v in np.median(geometries, axis=0)]
    return derived, [s.with_parallax_geometry(median) if s.stores_parallax_shift else s for s in val_opened], median


def _input_bands(config: TrainConfig, opened: Sequence[Scene]) -> list[str]:
    """The input bands: the configured ones, or the default bands present in every scene."""
    bands = config.bands
    if bands is None:
        bands = [b for b in DEFAULT_BANDS if all(s.has(b) for s in opened)]
        dropped = sorted(set(DEFAULT_BANDS) - set(bands))
        if dropped:
            hints = missing_band_hints(dropped)
            log.warning("training without band(s) %s: not in every scene%s", ", ".join(dropped),
                        f" ({hints})" if hints else "")
    bands = list(bands)
    if "dsm" not in bands:
        raise InputError("the bands must include 'dsm': the network refines it")
    unknown = [b for b in bands if b not in DEFAULT_BANDS]
    if unknown:
        raise InputError(f"unknown input band(s) {', '.join(unknown)} (choose from {', '.join(DEFAULT_BANDS)})")
    return bands


def _scale_factors(opened: Sequence[Scene], chip_size: int, initial: DeepDEMRegressionTask | None) -> dict[str, float]:
    """The checkpoint's ``GSF_DICT``: the training scenes' mean factor per chip size (a
    fine-tuned checkpoint's own at the training chip size)."""
    gsf = {str(chip_size): float(np.mean([s.scale_factor(chip_size) for s in opened]))}
    for size in sorted({k for s in opened for k in s.scale_factors} - {chip_size}):
        gsf[str(size)] = float(np.mean([s.scale_factors[size] for s in opened if size in s.scale_factors]))
    if initial is not None and str(chip_size) in initial.model_kwargs.get("GSF_DICT", {}):
        # The network learnt its weights in the units of this factor: fine-tuning keeps them.
        gsf[str(chip_size)] = float(initial.model_kwargs["GSF_DICT"][str(chip_size)])
    return dict(sorted(gsf.items(), key=lambda item: int(item[0])))


def _model_kwargs(config: TrainConfig, bands: list[str], gsf: dict[str, float], opened: Sequence[Scene],
                  val_opened: Sequence[Scene], holdout: float) -> dict[str, Any]:
    """Everything refine needs, and what a reader of the checkpoint wants to know, as JSON."""
    kwargs = {
        "bands": bands,
        "chip_size": config.chip_size,
        "target": config.target,
        "arch": config.arch,
        "encoder": config.encoder,
        "encoder_depth": config.encoder_depth,
        "GSF_DICT": gsf,
        # refine resamples a scene of another pixel size to this one (None: not in metres)
        "pixel_size_m": _training_pixel_size(opened),
        "scale_source": config.scale_source,
        "dsm_holes": "idw" if config.fill_holes else "mean",
        "identity_init": config.identity_init,
        "gradient_loss": config.gradient_loss,
        "relief_augmentation": config.relief_augmentation,
        "relief_share": config.relief_share if config.relief_augmentation else 0.0,
        "scene_sampling": config.scene_sampling,
        "uncertainty": "laplace" if config.uncertainty else None,
        "weight_averaging": "trailing, update t of T weighs t^2" if config.weight_averaging else None,
        # σ from a branch beside the network (models.SigmaBranch), which leaves the heights alone
        "sigma_head": "branch" if config.uncertainty else None,
        "normalisation": f"dsm: holes {'filled by IDW, ' if config.fill_holes else ''}(dsm - chip mean) / "
        f"{'training' if config.scale_source == 'checkpoint' else 'scene'} scale factor, nodata -> 0; "
        "orthos: CLAHE [0,1], nodata -> 0; triangulation_error: m, nodata -> -1; ndvi: nodata -> 0; "
        "parallax: m, nodata -> 0",
        "datapath": [str(s.path.resolve()) for s in opened],
        "validation": ([str(s.path.resolve()) for s in val_opened] if val_opened
                       else f"hold-out stripe {holdout:g}" if holdout > 0 else "the training scenes (fit)"),
        "scenes": [s.manifest.get("provenance", {}) for s in opened],
        "lr": config.lr,
        "lr_patience": config.lr_patience,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "deepdem_version": __import__("deepdem").__version__,
    }
    if config.init:
        kwargs["init"] = str(Path(config.init).resolve())
    return kwargs


def _training_pixel_size(scenes: Sequence[Scene]) -> float | None:
    """The training scenes' pixel size in metres (their median), or None when one has none."""
    sizes = [s.grid.pixel_size_m for s in scenes]
    if any(size is None for size in sizes):
        return None
    if max(sizes) > PIXEL_SIZE_TOLERANCE * min(sizes):
        log.warning("training scenes have pixel sizes from %.3g to %.3g m: the model learns features of "
                    "several sizes at once; refine resamples other scenes to their median, %.3g m",
                    min(sizes), max(sizes), float(np.median(sizes)))
    return float(np.median(sizes))


def _trainer(config: TrainConfig, out: Path, progress: bool, extra_callbacks: list[Callback]):
    """The Lightning trainer of a run, and its checkpoint callback (which knows the best epoch)."""
    precision = config.precision
    if precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            precision = "bf16-mixed" if autocast_is_fast("cpu") else "32-true"
    checkpointing = EpochCheckpoints(out / RESUME_POINT, monitor="val_mae")
    callbacks = [
        checkpointing,
        EarlyStopping(monitor="val_mae", patience=config.early_stopping_patience, min_delta=0.005, mode="min"),
        _EpochSeeder(),
        *extra_callbacks,
    ]
    if config.weight_averaging:
        callbacks.insert(0, TrailingWeightAverage())
        # hooks run in this order: the resume point is written at the end before the average replaces the weights
        callbacks.insert(0, callbacks.pop(callbacks.index(checkpointing)))
    if not progress:
        callbacks.append(_EpochPrinter())
    trainer = L.Trainer(
        max_epochs=config.max_epochs,
        max_time=timedelta(minutes=config.max_minutes) if config.max_minutes else None,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=precision,
        callbacks=callbacks,
        logger=[CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="tensorboard", version="")],
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,  # EpochCheckpoints writes the run's checkpoints, not Lightning's default one
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    return trainer, checkpointing


def _save_best(trainer, checkpointing: EpochCheckpoints, model_kwargs: dict, val_loader: DataLoader, out: Path,
               seconds: float, resumed_epoch: int | None) -> TrainResult:
    """``best.ckpt`` from the best epoch (σ calibrated on the validation chips) and ``train.json``."""
    if checkpointing.best_state is None:
        raise InputError("training stopped before the first validation: give it more time (--max-minutes)", out)
    best = DeepDEMRegressionTask(model_kwargs)
    best.load_state_dict(checkpointing.best_state)
    best.eval()
    if best.has_sigma:
        autocast = str(trainer.precision).startswith("bf16")
        temperature = calibrate_sigma(best, val_loader, trainer.strategy.root_device, autocast=autocast)
        best.model_kwargs.update(sigma_temperature=temperature, sigma_calibration="one factor: the 68 and 90 % intervals' coverage on the validation chips")
        log.info("sigma calibration factor %.3f (fitted on the validation chips)", temperature)
    checkpoint = save_checkpoint(best, out / "best.ckpt")
    metrics = trainer.callback_metrics
    result = TrainResult(
        checkpoint=checkpoint,
        best_val_mae=checkpointing.best_score,
        initial_val_mae=float(metrics.get("val_initial_mae", float("nan"))),
        epochs=trainer.current_epoch,
        seconds=seconds,
    )
    (out / "train.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "best_val_mae_m": result.best_val_mae,
        "initial_val_mae_m": result.initial_val_mae, "epochs": result.epochs,
        "seconds": round(seconds, 1), "resumed_after_epoch": resumed_epoch, "world_size": trainer.world_size,
        "model_kwargs": best.model_kwargs,
    }, indent=2))
    return result


#: Validation pixels per batch kept for the σ calibration (a random subsample bounds memory).
CALIBRATION_SAMPLES_PER_BATCH = 65_536


def calibrate_sigma(task: DeepDEMRegressionTask, loader: DataLoader, device: torch.device | str = "cpu",
                    autocast: bool = False, seed: int = 0) -> float:
    """The factor that calibrates a model's σ on ``loader``'s chips (temperature scaling).

    One number per model: the factor that makes σ's central 68 % and 90 % intervals hold their
    share of the errors it makes on the validation chips (:func:`deepdem.uncertainty.fit_temperature`,
    ``method="coverage"``). A single factor cannot reshape σ, only make its intervals as wide as
    the errors need.
    """
    from .uncertainty import fit_temperature

    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    model = task.to(device).eval()
    model.model_kwargs.pop("sigma_temperature", None)  # fit the raw σ
    errors, sigmas = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            heights, sigma = model.predict(batch)
            valid = batch["valid"]
            e, s = (heights - batch["target"])[valid].float().cpu(), sigma[valid].float().cpu()
            if e.numel() > CALIBRATION_SAMPLES_PER_BATCH:
                keep = torch.randperm(e.numel(), generator=generator)[:CALIBRATION_SAMPLES_PER_BATCH]
                e, s = e[keep], s[keep]
            errors.append(e)
            sigmas.append(s)
    model.cpu()
    if not errors or not sum(e.numel() for e in errors):
        raise InputError("no valid validation pixel to calibrate sigma on")
    return float(fit_temperature(torch.cat(errors).numpy(), torch.cat(sigmas).numpy(), "laplace", "coverage"))


def _fine_tuning_start(config: TrainConfig, bands: list[str]) -> DeepDEMRegressionTask:
    """The checkpoint to fine-tune from, refused unless its network is the one being trained."""
    initial = load_checkpoint(config.init)
    different = _network_differences(config, bands, initial.model_kwargs)
    if different:
        raise InputError(f"cannot fine-tune from this checkpoint: {'; '.join(different)}", config.init)
    return initial


#: settings a resumed run may change without a word: where and how long it runs, not what it learns
_SETTINGS_FREE_ON_RESUME = frozenset({"out", "resume", "progress", "max_epochs", "max_minutes", "accelerator",
                                      "devices", "num_nodes", "strategy", "num_workers", "precision"})


def _setting_changes(run_config: Path, config: TrainConfig) -> list[str]:
    """The training settings of ``config`` that differ from a run's ``config.yaml``, as "key theirs →
    ours" (none where the file is missing or unreadable: the resume point decides, not this file)."""
    try:
        earlier = yaml.safe_load(run_config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(earlier, dict):
        return []
    return [f"{f.name} {earlier[f.name]} → {getattr(config, f.name)}" for f in dataclasses.fields(config)
            if f.name in earlier and f.name not in _SETTINGS_FREE_ON_RESUME
            and _as_compared(f.name, earlier[f.name]) != _as_compared(f.name, getattr(config, f.name))]


def _as_compared(name: str, value: Any) -> Any:
    """A setting as :func:`_setting_changes` compares it: paths resolved, as one scene spelled
    relative or absolute is the same scene (a run's config.yaml from before paths were stored
    absolute holds them as given, relative to the folder it ran from)."""
    if name in ("scenes", "val_scenes") and isinstance(value, list):
        return [str(Path(v).resolve()) for v in value]
    if name == "init" and isinstance(value, str):
        return str(Path(value).resolve())
    return value


def _network_differences(config: TrainConfig, bands: list[str], kwargs: dict[str, Any]) -> list[str]:
    """How the network ``config`` trains differs from the one a checkpoint's ``model_kwargs``
    describe, as "key theirs (this run: ours)"; an encoder depth not asked for differs from none."""
    wanted = {"bands": bands, "target": config.target, "arch": config.arch, "encoder": config.encoder,
              "encoder_depth": config.encoder_depth, "uncertainty": "laplace" if config.uncertainty else None}
    if config.encoder_depth is None:
        del wanted["encoder_depth"]
    have = {"bands": list(kwargs["bands"]), "target": kwargs.get("target", "dsm"), "arch": kwargs.get("arch", "Unet"),
            "encoder": kwargs.get("encoder", "resnet18"), "encoder_depth": int(kwargs.get("encoder_depth", 5)),
            "uncertainty": kwargs.get("uncertainty")}
    return [f"{key} {have[key]} (this run: {wanted[key]})" for key in wanted
            if have[key] != wanted[key] and not (key.startswith("encoder") and config.arch.lower() == "resdepth")]


__all__ = ["train", "TrainConfig", "default_batch_size", "TrainResult", "TrailingWeightAverage", "EpochCheckpoints", "load_checkpoint"]
