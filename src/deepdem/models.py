"""Networks, the Lightning task, and checkpoints.

The network predicts a normalised residual per target; heights are ``net(x) × scale + base``
where ``base`` is the initial DSM (its chip mean where it has no data). Everything ``refine``
needs is stored in the checkpoint's ``model_kwargs`` — the attribute DeepDEM's users read
(``DeepDEMRegressionTask.load_from_checkpoint(p).model_kwargs['bands']``).

Networks: any segmentation-models-pytorch architecture and encoder by name (``arch='Unet'``,
``encoder='resnet18'``), or ``arch='ResDepth'``, the UNet of ResDepth (Stucker & Schindler 2022)
used as the baseline.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn

from .errors import CheckpointError

DEFAULT_BANDS = ("dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "parallax", "ortho_correlation",
                 "nodata_mask")
#: What a model's σ head predicts: the scale of a Laplace distribution of its error.
UNCERTAINTY_KINDS = ("laplace",)
#: Where σ comes from: one output layer shared with the residuals (earlier checkpoints), or a
#: branch beside the network (:class:`SigmaBranch`).
SIGMA_HEADS = ("joint", "branch")
#: The σ channel's floor in normalised units: keeps 1/b and log b finite for a saturated head.
MIN_SCALE = 1e-3
#: The share of each training batch's chips on which the σ branch is trained. The branch's cost
#: comes out of the network's budget of steps (``--max-minutes``); on a quarter of the chips it
#: gets an update every step for a quarter of that cost. Chips are drawn independently, so the
#: first ones of a batch are a random sample.
SIGMA_TRAINING_SHARE = 0.25
#: The σ branch's output bias, σ's level over the whole scene, learns this many times faster than
#: the rest. Adam moves a weight by about one learning rate per step, so at 5e-4 a few hundred
#: steps move the level by 0.2 where it must fall by 1.5 or more (b from ln 2, a few metres, to a
#: fraction of a metre): the hidden layers then took the level on by switching their units off,
#: and σ lost its spread across the pixels.
SIGMA_LEVEL_LR_FACTOR = 20.0
CHECKPOINT_FORMAT = "deepdem-checkpoint-1"
TARGETS = {"dsm": ("dsm",), "dtm": ("dtm",), "both": ("dsm", "dtm")}


class ResDepthUNet(nn.Module):
    """ResDepth's UNet: 5 levels, 64 → 512 filters, one conv + BN + ReLU per level, additive skips.

    Like the original, it predicts a residual that is added to the (normalised) input DSM; here
    the addition happens in :meth:`DeepDEMRegressionTask.predict_heights`, in metres, so the
    same residual convention serves every architecture.
    """

    def __init__(self, in_channels: int, classes: int = 1, filters: Sequence[int] = (64, 128, 256, 512, 512)):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in filters:
            self.encoder.append(block(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(filters[-1], filters[-1])
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width_below, width in zip(reversed(filters), list(reversed(filters))[1:] + [filters[0]]):
            self.up.append(nn.ConvTranspose2d(width_below, width_below, 2, stride=2))
            self.decoder.append(block(width_below, width))
        self.head = nn.Conv2d(filters[0], classes, 1)
        self.depth = len(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.depth
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % factor, (-w) % factor
        if pad_h or pad_w:  # any chip size works, not only multiples of 32
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, decode, skip in zip(self.up, self.decoder, reversed(skips)):
            x = decode(up(x) + skip)  # additive skip, as ResDepth
        return self.head(x)[..., :h, :w]


def autocast_is_fast(device: torch.device | str) -> bool:
    """Whether autocast to 16-bit floats speeds ``device`` up: a GPU, or a CPU with native
    bfloat16 (AVX-512 BF16 or AMX). On other CPUs oneDNN falls back to a slow path: a 64-channel
    3 × 3 convolution on 2 × 64² px took 76× as long under bf16 autocast as in float32 on an
    AMD EPYC with AVX2 only, while on a CPU with native bf16 autocast halves training's step."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    # torch has no public query of the CPU's bf16 support; these are what its compiler consults.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def build_network(arch: str = "Unet", encoder: str = "resnet18", in_channels: int = 6, classes: int = 1,
                  encoder_depth: int = 5) -> nn.Module:
    """A network by name with ``classes`` output channels and no pretrained weights.

    ImageNet weights are not used: the inputs are heights and equalised panchromatic images,
    not RGB, and runs must not download anything. ``encoder_depth`` below 5 (Unet and
    UnetPlusPlus only) drops the encoder's deepest stages and the decoder's widest blocks: the
    finest blocks keep smp's widths, so the output layer reads 16 channels.
    """
    if arch.lower() == "resdepth":
        return ResDepthUNet(in_channels, classes)
    try:
        model_class = getattr(smp, arch)
    except AttributeError:
        raise CheckpointError(f"unknown architecture '{arch}' (ResDepth or a segmentation-models-pytorch class such as Unet, UnetPlusPlus, FPN, DeepLabV3Plus)") from None
    try:
        options = {}
        if encoder_depth != 5:
            decoder_channels = _decoder_block_widths(model_class)
            if decoder_channels is None:
                raise CheckpointError(f"encoder depth {encoder_depth} needs a decoder of one block per encoder "
                                      f"stage (Unet, UnetPlusPlus), not {arch}")
            options["encoder_depth"] = encoder_depth
            options["decoder_channels"] = decoder_channels[-encoder_depth:]
        network = model_class(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes,
                              **options)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot build {arch} with encoder '{encoder}': {str(exc).splitlines()[0][:200]}") from None
    _drop_stages_never_run(network, encoder_depth)
    return network


#: The encoder depth of a network whose decoder has one block per encoder stage (Unet,
#: UnetPlusPlus) when none is asked for. At a CPU's budget a shallower network takes more steps
#: and its held-out error is lower (docs/training.md, "Models").
SHALLOW_ENCODER_DEPTH = 3


def default_encoder_depth(arch: str) -> int:
    """The encoder depth of ``arch`` when none is asked for: 3 where the decoder can follow it, else 5."""
    model_class = getattr(smp, arch, None)
    if arch.lower() == "resdepth" or model_class is None or _decoder_block_widths(model_class) is None:
        return 5
    return SHALLOW_ENCODER_DEPTH


def _decoder_block_widths(model_class) -> tuple[int, ...] | None:
    """smp's default widths of the decoder's blocks, one per encoder stage; None for a decoder
    that is not built that way.

    Only a decoder of one block per stage keeps the chip's size at another depth: smp's FPN, for
    one, upsamples a depth-4 encoder's output to twice the chip.
    """
    parameter = inspect.signature(model_class).parameters.get("decoder_channels")
    if parameter is None or not isinstance(parameter.default, (list, tuple)):
        return None
    return tuple(parameter.default)


def _drop_stages_never_run(network: nn.Module, encoder_depth: int) -> None:
    """Replace the encoder stages deeper than ``encoder_depth`` by identities.

    smp builds them whatever the depth and never runs them (resnet18's last stage is 8.4 M of its
    11.2 M weights): they would fill every checkpoint, and DDP refuses weights that get no gradient.
    """
    try:
        stages = network.encoder.get_stages()
    except (AttributeError, NotImplementedError):  # an encoder that does not list its stages keeps them
        return
    encoder = network.encoder
    never_run = {id(module) for stride, modules in stages.items() if stride > 2 ** encoder_depth for module in modules}
    for name, child in list(encoder.named_children()):
        if id(child) in never_run:
            setattr(encoder, name, nn.Identity())


def output_layer(network: nn.Module) -> nn.Conv2d:
    """The last convolution of a network built by :func:`build_network` (its residual head)."""
    convolutions = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    return convolutions[-1]


class SigmaBranch(nn.Module):
    """The σ head of a model: a small convolutional branch beside the network, not inside it.

    It reads the features the network's output layer reads, *detached*, with the network's
    inputs (the triangulation error among them), and predicts one raw Laplace scale per target
    (:func:`laplace_scale`). The Laplace NLL then trains the branch alone: the network, and so
    the heights, are trained by the L1 loss exactly as without σ, from the same initial weights
    (the branch draws its own from a forked generator). One output layer for heights and σ, as
    earlier checkpoints have, let σ's loss shape the shared features: on the real-terrain
    benchmark that cost up to 8 % of MAE on a held-out scene (median of 3 seeds; BENCHMARKS.md at
    commit eb56882, the run before the branch).
    """

    def __init__(self, in_channels: int, n_sigma: int, width: int = 16):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, n_sigma, 1),
        )

    def forward(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        # ResDepth pads odd sizes and crops its output: crop its features the same way.
        features = features[..., : inputs.shape[-2], : inputs.shape[-1]].detach()
        return self.layers(torch.cat([features, inputs.to(features.dtype)], dim=1))


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in metres over valid pixels (0 when a batch has none)."""
    valid = valid.to(prediction.dtype)
    return (torch.abs(prediction - target) * valid).sum() / valid.sum().clamp_min(1.0)


def masked_gradient_l1(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the height steps to the right and downward neighbour, in metres,
    over pairs of valid pixels (0 when a batch has none)."""
    total = prediction.new_zeros(())
    count = prediction.new_zeros(())
    for dim in (-1, -2):
        n = prediction.shape[dim] - 1
        pairs = (valid.narrow(dim, 1, n) & valid.narrow(dim, 0, n)).to(prediction.dtype)
        step = (prediction.narrow(dim, 1, n) - prediction.narrow(dim, 0, n)) - (target.narrow(dim, 1, n) - target.narrow(dim, 0, n))
        total = total + (step.abs() * pairs).sum()
        count = count + pairs.sum()
    return total / count.clamp_min(1.0)


def laplace_scale(raw: torch.Tensor) -> torch.Tensor:
    """The σ head's raw output → a Laplace scale b > 0 (normalised units).

    softplus rather than exp: its gradient stays bounded where the head saturates, and a zeroed
    head (identity init) starts at b = ln 2, a few metres, not at a scale it must climb from.
    """
    return nn.functional.softplus(raw.float()) + MIN_SCALE


def masked_laplace_nll(error: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Laplace negative log-likelihood |e|/b + log b (up to log 2) over valid pixels.

    ``error`` is detached by the caller, and the σ branch reads detached features
    (:class:`SigmaBranch`): the heights are trained by the L1 loss alone (the NLL's |e|/b
    term would otherwise down-weight hard pixels, and the MAE drift from the L1 model's).
    """
    valid = valid.to(scale.dtype)
    nll = error.abs() / scale + torch.log(scale)
    return (nll * valid).sum() / valid.sum().clamp_min(1.0)


class DeepDEMRegressionTask(L.LightningModule):
    """Residual refinement of a DSM: L1 in metres against LIDAR truth on valid pixels.

    ``model_kwargs`` (JSON-like) carries: ``bands``, ``chip_size``, ``target`` ('dsm', 'dtm' or
    'both' for two heads), ``arch``, ``encoder``, ``GSF_DICT`` (training scale factor per chip
    size), ``scale_source``, ``datapath`` (training scenes), ``normalisation``, the optimiser
    settings (``lr``, ``lr_patience``), ``gradient_loss`` (the weight of :func:`masked_gradient_l1`
    in the training loss; absent or 0: none), and for a model with σ ``uncertainty`` ('laplace') and
    ``sigma_head`` ('branch': a :class:`SigmaBranch`; absent in earlier checkpoints, whose one
    output layer gives the residuals and σ alike).
    """

    #: validation errors kept per epoch for the median-based NMAD (a random subsample)
    NMAD_SAMPLES = 200_000

    def __init__(self, model_kwargs: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.model_kwargs = dict(model_kwargs)
        self.targets = TARGETS[self.model_kwargs.get("target", "dsm")]
        self.uncertainty = self.model_kwargs.get("uncertainty")
        if self.uncertainty not in (None, *UNCERTAINTY_KINDS):
            raise CheckpointError(f"unknown uncertainty model {self.uncertainty!r} (this version knows {', '.join(UNCERTAINTY_KINDS)})")
        # Checkpoints from before the σ branch ("sigma_head" absent) have one output layer for the
        # residuals and σ alike.
        sigma_head = self.model_kwargs.get("sigma_head") or "joint"
        if sigma_head not in SIGMA_HEADS:
            raise CheckpointError(f"unknown sigma head {sigma_head!r} (this version knows {', '.join(SIGMA_HEADS)})")
        joint = self.has_sigma and sigma_head == "joint"
        self.model = build_network(
            self.model_kwargs.get("arch", "Unet"),
            self.model_kwargs.get("encoder", "resnet18"),
            len(self.model_kwargs["bands"]),
            classes=len(self.targets) * (2 if joint else 1),
            encoder_depth=int(self.model_kwargs.get("encoder_depth", 5)),
        )
        if self.model_kwargs.get("identity_init"):
            # The untrained model returns the input DSM unchanged: training starts from "leave it
            # alone" and learns corrections, instead of from a random residual it must unlearn.
            head = output_layer(self.model)
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        self.sigma_branch = None
        self._features = None
        if self.has_sigma and not joint:
            head = output_layer(self.model)
            with torch.random.fork_rng(devices=[]):  # the network's seed stream stays as without σ
                self.sigma_branch = SigmaBranch(head.in_channels + len(self.model_kwargs["bands"]), len(self.targets))
            if self.model_kwargs.get("identity_init"):  # σ starts where a joint head starts: b = ln 2
                nn.init.zeros_(self.sigma_branch.layers[-1].weight)
                nn.init.zeros_(self.sigma_branch.layers[-1].bias)
            head.register_forward_hook(self._keep_features)
        self._val_errors: list[torch.Tensor] = []

    @property
    def has_sigma(self) -> bool:
        """Whether the model predicts a per-pixel σ beside each height."""
        return self.uncertainty is not None

    @property
    def sigma_temperature(self) -> float:
        """The calibration factor of σ fitted after training (1 before; see train)."""
        return float(self.model_kwargs.get("sigma_temperature", 1.0))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's raw output for normalised inputs (B, C, H, W): (B, n_targets, H, W)
        normalised residuals, followed by n_targets raw σ channels when the model has them
        (see :meth:`split_output`)."""
        raw = self.model(inputs)
        if self.sigma_branch is None:
            return raw
        features, self._features = self._features, None
        return torch.cat([raw, self.sigma_branch(features, inputs).to(raw.dtype)], dim=1)

    def _keep_features(self, module, args, output) -> None:
        self._features = args[0]  # what the output layer read, for the σ branch

    def split_output(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised residuals and calibrated σ (normalised units: × the scale factor gives
        metres; None without σ), float32. σ is the standard deviation of the predicted Laplace,
        √2·b, times the checkpoint's calibration factor."""
        residual, scale = self._heads(raw)
        if scale is None:
            return residual, None
        return residual, scale * (math.sqrt(2.0) * self.sigma_temperature)

    def _heads(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised residuals and the uncalibrated Laplace scale b (None without σ), float32."""
        n = len(self.targets)
        return raw[:, :n].float(), (laplace_scale(raw[:, n:]) if self.has_sigma else None)

    def predict(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Heights and σ in metres (B, n_targets, H, W) each; σ is None for a model without it
        (see :meth:`split_output`). The addition to the base stays in float32 under autocast."""
        residual, sigma = self.split_output(self(batch["inputs"]))
        heights = residual * batch["scale"] + batch["base"]
        return heights, (None if sigma is None else sigma * batch["scale"])

    def predict_heights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Heights in metres (B, n_targets, H, W)."""
        return self.predict(batch)[0]

    def _training_heads(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised residuals of every chip, and the Laplace scale b of the first
        :data:`SIGMA_TRAINING_SHARE` of them only (the σ branch's training batch)."""
        n = len(self.targets)
        raw = self.model(inputs)
        features, self._features = self._features, None
        chips = max(1, math.ceil(inputs.shape[0] * SIGMA_TRAINING_SHARE))
        return raw[:, :n].float(), laplace_scale(self.sigma_branch(features[:chips], inputs[:chips]))

    def _shared_step(self, batch, stage: str):
        if stage == "train" and self.sigma_branch is not None:
            residual, scale = self._training_heads(batch["inputs"])
        else:
            residual, scale = self._heads(self(batch["inputs"]))  # b, before calibration
        prediction = residual * batch["scale"] + batch["base"]
        target, valid = batch["target"], batch["valid"]
        loss = sum(masked_l1(prediction[:, i : i + 1], target[:, i : i + 1], valid[:, i : i + 1])
                   for i in range(len(self.targets)))
        batch_size = batch["inputs"].shape[0]
        sync = self.trainer is not None and self.trainer.world_size > 1
        self.log(f"{stage}_l1", loss, prog_bar=True, batch_size=batch_size, on_epoch=True, on_step=False, sync_dist=sync)
        gradient_weight = float(self.model_kwargs.get("gradient_loss", 0.0))
        if gradient_weight and stage == "train":
            steps = sum(masked_gradient_l1(prediction[:, i : i + 1], target[:, i : i + 1], valid[:, i : i + 1])
                        for i in range(len(self.targets)))
            self.log("train_gradient_l1", steps, batch_size=batch_size, on_epoch=True, on_step=False, sync_dist=sync)
            loss = loss + gradient_weight * steps
        if scale is not None:
            # In metres, so that the NLL's log b is comparable between scenes of other scales.
            chips = scale.shape[0]  # all of them, or the σ branch's share in training
            scale_m = scale * batch["scale"][:chips]
            nll = masked_laplace_nll((prediction[:chips].detach() - target[:chips]), scale_m, valid[:chips])
            self.log(f"{stage}_nll", nll, batch_size=batch_size, on_epoch=True, on_step=False, sync_dist=sync)
            loss = loss + nll
        if stage == "val":
            errors = (prediction - target)[valid]
            initial = (batch["base"].expand_as(target) - target)[valid]
            self.log("val_mae", errors.abs().mean(), prog_bar=True, batch_size=batch_size, sync_dist=sync)
            self.log("val_rmse", errors.pow(2).mean().sqrt(), batch_size=batch_size, sync_dist=sync)
            self.log("val_bias", errors.mean(), batch_size=batch_size, sync_dist=sync)
            self.log("val_initial_mae", initial.abs().mean(), batch_size=batch_size, sync_dist=sync)
            if scale is not None:
                # Share within the central 68 % interval of the (uncalibrated) Laplace: −b·ln 0.32.
                inside = errors.abs() <= -math.log(0.32) * (scale * batch["scale"]).expand_as(target)[valid]
                self.log("val_coverage_68", inside.float().mean(), batch_size=batch_size, sync_dist=sync)
            self._val_errors.append(errors.detach().float().cpu())
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._shared_step(batch, "train")
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True, batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def on_validation_epoch_end(self):
        if not self._val_errors:
            return
        errors = torch.cat(self._val_errors)
        self._val_errors.clear()
        if errors.numel() > self.NMAD_SAMPLES:
            generator = torch.Generator().manual_seed(0)
            errors = errors[torch.randperm(errors.numel(), generator=generator)[: self.NMAD_SAMPLES]]
        if errors.numel():
            from geoutils.stats import nmad  # xdem's NMAD

            # Each process's NMAD over its own chips; DDP averages them (a median does not reduce).
            sync = self.trainer is not None and self.trainer.world_size > 1
            self.log("val_nmad", float(nmad(errors.numpy().astype(np.float64))), sync_dist=sync)

    def configure_optimizers(self):
        lr = float(self.model_kwargs.get("lr", 5e-4))
        parameters = list(self.parameters())
        level = [] if self.sigma_branch is None else [self.sigma_branch.layers[-1].bias]
        groups = [{"params": [p for p in parameters if all(p is not q for q in level)]}]
        if level:
            groups.append({"params": level, "lr": lr * SIGMA_LEVEL_LR_FACTOR})
        # The fused kernel updates every weight in one pass instead of a dozen per tensor: on 2 CPU
        # cores an Adam step of the resnet18 UNet (depth 5) took 18 ms instead of 31 ms inside a 64-px-chip
        # training step of about 170 ms. Devices without the kernel keep the per-tensor loop.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
        optimizer = torch.optim.Adam(groups, lr=lr, fused=fused or None)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=int(self.model_kwargs.get("lr_patience", 50))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_mae"}}


# -- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(task: DeepDEMRegressionTask, path: str | os.PathLike) -> Path:
    """Save the weights and ``model_kwargs`` only (no optimiser state; a few tens of MB)."""
    from .io import atomic_path

    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {"model_kwargs": task.model_kwargs},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def export_safetensors(task: DeepDEMRegressionTask, out: str | os.PathLike) -> tuple[Path, Path]:
    """Export as ``<out>.safetensors`` (weights) + ``<out>.json`` (model_kwargs): no pickle at all."""
    from safetensors.torch import save_file

    from .io import atomic_path

    out = Path(out)
    weights, meta = out.with_suffix(".safetensors"), out.with_suffix(".json")
    state = {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    with atomic_path(meta) as tmp:
        Path(tmp).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "model_kwargs": task.model_kwargs}, indent=2))
    return weights, meta


def _read_torch_checkpoint(path: Path, map_location) -> tuple[dict, dict]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle payloads, truncated files and non-torch files all land here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"not a loadable deepdem checkpoint ({first_line[:200]})", path) from None
    try:
        return payload["hyper_parameters"]["model_kwargs"], payload["state_dict"]
    except (KeyError, TypeError):
        raise CheckpointError("checkpoint has no deepdem model_kwargs/state_dict", path) from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise CheckpointError(f"metadata file {meta_path.name} is missing beside the weights", path)
    try:
        model_kwargs = json.loads(meta_path.read_text())["model_kwargs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError("unreadable deepdem metadata (expected JSON with 'model_kwargs')", meta_path) from None
    try:
        return model_kwargs, load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"unreadable safetensors file ({exc})", path) from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DeepDEMRegressionTask:
    """Load a model without running code from the file.

    ``.safetensors`` (+ ``.json`` beside it) or any torch/Lightning checkpoint, the latter with
    ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and
    plain containers.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint not found", path)
    if path.suffix == ".safetensors":
        model_kwargs, state_dict = _read_safetensors(path)
    else:
        model_kwargs, state_dict = _read_torch_checkpoint(path, map_location)
    for key in ("bands", "chip_size"):
        if key not in model_kwargs:
            raise CheckpointError(f"checkpoint metadata lacks '{key}'", path)
    try:
        task = DeepDEMRegressionTask(model_kwargs)
    except CheckpointError as exc:
        raise CheckpointError(str(exc), path) from None
    try:
        task.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the model in its metadata ({str(exc).splitlines()[0]})", path) from None
    return task.eval()


SCALE_SOURCES = ("checkpoint", "scene")


def scale_for(model_kwargs: dict, scene_factors: dict[int, float], chip_size: int, source: str | None = None) -> float:
    """The DSM scale factor for a scene: the checkpoint's training value or the scene's own.

    ``source`` overrides the checkpoint's ``scale_source`` (checkpoints that lack it were trained
    with each scene's own factor). The training value is the default since an unseen scene's own
    factor may be half or twice the training one: the network then reads its relief, and scales
    its residual, in units it never learnt (measured on real terrain in BENCHMARKS.md).
    """
    source = source or model_kwargs.get("scale_source", "scene")
    if source not in SCALE_SOURCES:
        raise ValueError(f"scale source must be one of {', '.join(SCALE_SOURCES)}, got {source!r}")
    trained = {int(k): float(v) for k, v in model_kwargs.get("GSF_DICT", {}).items()}
    if source == "scene" and chip_size in scene_factors:
        return scene_factors[chip_size]
    if chip_size in trained:
        return trained[chip_size]
    if scene_factors:  # a scene smaller than the chip: extrapolate with DeepDEM's chip^0.88 law
        size, value = max(scene_factors.items())
        return value * math.pow(chip_size / size, 0.88)
    raise CheckpointError(f"no scale factor for chip size {chip_size}")
