"""Scene-scale refinement: streaming, seamless, resumable and distributed tiled inference.

The scene is cut into output *blocks* (``block_size`` px, a multiple of the 256-px GeoTIFF
tile). Each block is read with a halo so that every chip overlapping it is complete, its chips
are run in batches, their residuals are blended, and only the block's interior is written.
Memory is therefore bounded by one block and its halo, never by the scene.

Blending: chips overlap by ``overlap`` of their size; each chip's residual is weighted by a
window that is 1 in the chip's centre and ramps down as sin² across the overlap (at 50 % overlap
it is the classic sin² window), never quite to zero, and the sum is normalised by the sum of the
weights. Where two chips meet, the pixels near one chip's edge lie in the other chip's plateau,
so the edge effects of a convolutional network (zero padding, missing context) are weighted
away and no seam shows. Edge chips end exactly at the scene's edge; a scene smaller than a chip
is padded with nodata (boundless reads). Only the residual (and σ) is blended; the DSM is added
once at the end, so a model that predicts a zero residual returns the input DSM bit for bit.

Every block is computed from the scene alone with a fixed chip and batch layout, so an
interrupted-and-resumed run, a single process and a Dask cluster all give the same bytes.

The package, in the order a block travels:

* :mod:`.layout` — the block plan, the chip grid and the blending window;
* :mod:`.agreement` — the parallax check: does the model's correction, on a sample of the
  scene, go against the DSM error the orthos show (or else keep the initial DSM)?
* :mod:`.blocks` — :class:`BlockRefiner`: read a block with its halo, normalise and run its
  chips, blend them (heights and σ);
* :mod:`.output` — the work files, the resume journal and the Cloud-Optimised GeoTIFFs;
* :mod:`.distributed` — blocks spread over Dask workers;
* :mod:`.resampled` — a scene of another pixel size than the model's, refined at the model's;
* :mod:`.heap` — the ``deepdem refine`` command's heap policy (:func:`steady_heap`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import CheckpointError, InputError
from ..models import DeepDEMRegressionTask, autocast_is_fast, load_checkpoint, scale_for
from ..scene import Scene, missing_band_hints
from .agreement import check_correction, check_tag
from .blocks import BlockRefiner, device_for, loaded_blocks
from .distributed import refine_distributed
from .heap import steady_heap
from .layout import ABOVE_MAX_SIGMA, TILE, Block, RefineSettings, blend_ramp, blend_window, chip_starts, plan_blocks
from .output import COG_OPTIONS, cog_overview_factors, commit_block, open_journal, publish, sigma_path, weights_digest
from .resampled import model_pixel_size, refine_resampled

log = logging.getLogger(__name__)

#: ``tta=None`` (the default) averages the 8 views of each chip for scenes of at most this many
#: pixels (at the pixel size refined at): 2048 × 2048, a square km at 0.5 m. There the 8× model
#: time is seconds to a minute on a CPU, and on the small-scene check (``bench/small_scene.py``,
#: 6 models × 4 unseen scenes) the 8 views lowered the MAE by 0.5–4.6 % (median 3.4 %) in 21
#: of the 22 pairs where the model ran, +0.1 % in the other. A region-scale scene keeps one view
#: per chip.
AUTO_TTA_MAX_PIXELS = 2048 * 2048

__all__ = ["refine", "scene_for_model", "AUTO_TTA_MAX_PIXELS", "sigma_path", "steady_heap", "BlockRefiner",
           "RefineSettings", "Block", "plan_blocks", "blend_window", "blend_ramp", "cog_overview_factors", "COG_OPTIONS",
           "ABOVE_MAX_SIGMA", "TILE"]


# Long only by its signature and docstring (18 documented arguments); the body is the run's steps in order.
def refine(
    checkpoint: str | os.PathLike | DeepDEMRegressionTask,
    scene: str | os.PathLike | Scene,
    out: str | os.PathLike,
    batch_size: int = 8,
    overlap: float = 0.25,
    fill: bool = False,
    device: str | None = "auto",
    bf16: bool | None = None,
    progress: bool = True,
    tta: bool | None = None,
    block_size: int = 2048,
    resume: bool = False,
    workers: int = 0,
    scheduler: str | None = None,
    client=None,
    scale_source: str | None = None,
    max_sigma: float | None = None,
    above_max_sigma: str = "initial",
    at_model_pixel_size: bool = True,
    parallax_check: bool = True,
) -> Path:
    """Refine a scene's DSM with a trained model and write a float32 Cloud-Optimised GeoTIFF.

    Pixels where the scene has no valid input are nodata unless ``fill`` is set, in which case
    the model's prediction (on the chip-mean base) is kept there too. A model with two heads
    (``target='both'``) writes two bands, DSM then DTM.

    ``block_size`` bounds memory (one block plus a chip-wide halo); ``overlap`` is the chips'
    overlap (0.25 by default; the blending hides chip edges at any overlap ≥ 1/8). ``tta``
    averages the 8 flips/rotations of each chip (8× the compute); σ is then that of the 8 views'
    mixture, widened by their disagreement. ``tta=None`` turns it on for a scene of at most
    :data:`AUTO_TTA_MAX_PIXELS` pixels. ``resume`` continues an
    interrupted run with the same settings. ``workers`` > 0 starts a local Dask cluster of that
    many processes, ``scheduler`` connects to an existing one, ``client`` uses a Dask client.
    ``scale_source`` overrides the checkpoint's choice of DSM scale factor: 'checkpoint' (the
    training scenes' factor, the default of models trained since 0.3) or 'scene' (the scene's own).
    ``bf16`` autocasts the network (default: where that is fast, a GPU or a CPU with native bf16:
    :func:`deepdem.models.autocast_is_fast`).

    A model with σ (trained with ``uncertainty``) also writes :func:`sigma_path` (``<out
    stem>_sigma.tif``): per pixel, the standard deviation in metres of the predicted (Laplace)
    error of each band, blended across chips like the heights. ``max_sigma`` (m): where σ
    exceeds it, ``above_max_sigma`` 'initial' keeps the initial DSM (DSM bands, where it has
    data; nodata elsewhere) and 'nodata' writes nodata; σ is nodata there.

    A scene whose pixel size differs from the model's training pixel size by more than 20 %
    (:data:`deepdem.scene.PIXEL_SIZE_TOLERANCE`) is refined at the model's pixel size and the
    result brought back onto the scene's grid (:mod:`.resampled`), unless
    ``at_model_pixel_size`` is False. A checkpoint that does not record its pixel size (trained
    before it did) refines every scene as it is.

    ``parallax_check`` (:mod:`.agreement`): a model that reads the parallax band first refines a
    sample of the scene; where its DSM correction runs along the error the orthos' parallax shows
    (a negative correlation with −parallax) instead of against it, the model does not transfer
    to the scene, and the DSM heads keep the initial DSM (σ nodata), with a warning.

    Hillshade, slope and canopy height are products of the written DEM:
    :mod:`deepdem.products` (``deepdem refine --hillshade/--slope/--chm`` runs them after).
    """
    task = checkpoint if isinstance(checkpoint, DeepDEMRegressionTask) else load_checkpoint(checkpoint)
    source = None if isinstance(checkpoint, DeepDEMRegressionTask) else checkpoint
    scene = scene_for_model(scene if isinstance(scene, Scene) else Scene.open(scene), task.model_kwargs)
    out = Path(out)
    _check(task, scene, source, overlap, batch_size, block_size, workers, max_sigma, above_max_sigma)
    if bf16 is None:
        bf16 = autocast_is_fast(device_for(device or "auto"))
    pixel_size = model_pixel_size(task.model_kwargs, scene) if at_model_pixel_size else None
    if pixel_size is not None:
        return refine_resampled(refine, task, scene, out, pixel_size, resume, fill, batch_size=batch_size,
                                overlap=overlap, device=device, bf16=bf16, progress=progress, tta=tta,
                                block_size=block_size, workers=workers, scheduler=scheduler, client=client,
                                scale_source=scale_source, max_sigma=max_sigma, above_max_sigma=above_max_sigma,
                                parallax_check=parallax_check)
    if tta is None:
        tta = scene.shape[0] * scene.shape[1] <= AUTO_TTA_MAX_PIXELS
        if tta:
            log.info("%s: %d x %d px, at most %d px: each chip's 8 flips and rotations are averaged (8x the model "
                     "time; --no-tta for one view)", scene.path, *scene.shape, AUTO_TTA_MAX_PIXELS)
    kwargs, chip = task.model_kwargs, int(task.model_kwargs["chip_size"])
    settings = RefineSettings(
        bands=tuple(kwargs["bands"]), chip=chip, stride=max(1, int(round(chip * (1 - overlap)))), overlap=overlap,
        scale=scale_for(kwargs, scene.scale_factors, chip, scale_source),
        fill_holes=kwargs.get("dsm_holes") == "idw",
        fallback_mean=float(scene.statistics("dsm").get("median", 0.0)),
        block_size=max(TILE, int(np.ceil(block_size / TILE)) * TILE),  # whole tiles per write
        batch_size=batch_size, fill=fill, tta=tta, bf16=bf16, device=device or "auto", targets=tuple(task.targets),
        sigma=task.has_sigma, max_sigma=None if max_sigma is None else float(max_sigma),
        above_max_sigma=above_max_sigma,
    )
    agreement = None
    if parallax_check:
        settings, agreement = check_correction(task, scene, settings)
    blocks = plan_blocks(scene.shape, settings.block_size)
    digest = weights_digest(task)
    fingerprint = {
        "scene": str(scene.path.resolve()), "grid": scene.grid.to_json(), "weights": digest,
        "settings": settings.fingerprint(), "device": device_for(settings.device).type,
    }
    works, journal_path, journal = open_journal(out, scene, settings.targets, settings.sigma, fingerprint, resume,
                                                tta=settings.tta, tags=check_tag(agreement))
    todo = [b for b in blocks if b.index not in set(journal["done"])]
    if len(todo) < len(blocks):
        log.info("resuming %s: %d of %d blocks already done", out, len(blocks) - len(todo), len(blocks))

    chips_per_block = {
        b.index: len(chip_starts(scene.shape[0], chip, settings.stride, b.row0, b.row1))
        * len(chip_starts(scene.shape[1], chip, settings.stride, b.col0, b.col1))
        for b in todo
    }
    with tqdm(total=sum(chips_per_block.values()), desc="refine", unit="chip", disable=not progress) as bar:
        if client is not None or workers or scheduler:
            refine_distributed(task, digest, scene, settings, todo, works, journal_path, journal,
                               client, workers, scheduler, lambda b: bar.update(chips_per_block[b]))
        else:
            refiner = BlockRefiner(task, scene, settings)
            for block, loaded in loaded_blocks(refiner, todo):
                data = refiner.refine_block(block, on_chips=bar.update, loaded=loaded)
                del loaded
                commit_block(works, journal_path, journal, block, data)

    unfinished = {b.index for b in blocks} - set(journal["done"])
    if unfinished:  # a guard: never publish an output with blocks missing
        raise RuntimeError(f"refine finished with {len(unfinished)} block(s) not written; rerun with resume")
    publish(works, journal_path, out)
    return out


def scene_for_model(scene: Scene, model_kwargs: dict) -> Scene:
    """The scene as a model reads it: where the model reads the parallax band and the scene
    stores only the orthos' shift (prepared without the views' angles), the band is derived with
    the training pairs' geometry that the checkpoint records, which assumes the same kind of pair."""
    geometry = model_kwargs.get("parallax_geometry")
    if "parallax" not in model_kwargs.get("bands", ()) or not scene.stores_parallax_shift or scene.has("parallax"):
        return scene
    if geometry is None:
        return scene  # _check names what is missing
    log.warning("%s: the views' angles are unknown; its parallax is read with the training pair's geometry "
                "(%.3f, %.3f m of shift per m of DSM error): prepare with --views if the pairs differ",
                scene.path, *geometry)
    return scene.with_parallax_geometry(geometry)


def _check(task: DeepDEMRegressionTask, scene: Scene, source, overlap: float, batch_size: int, block_size: int,
           workers: int, max_sigma: float | None, above_max_sigma: str) -> None:
    """Refuse, in one line naming the file, a model and scene or settings that cannot work."""
    bands = list(task.model_kwargs["bands"])
    if "dsm" not in bands:
        raise CheckpointError(f"checkpoint bands {bands} lack 'dsm': deepdem models refine a DSM", source)
    missing = [b for b in bands if not scene.has(b)]
    if missing:
        hints = missing_band_hints(missing)
        raise CheckpointError(
            f"scene lacks band(s) {', '.join(missing)} that the checkpoint was trained on "
            f"(checkpoint bands: {', '.join(bands)}; scene bands: {', '.join(scene.bands)})"
            + (f"; {hints}" if hints else ""),
            scene.path,
        )
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1 or block_size < 1 or workers < 0:
        raise InputError(f"batch_size and block_size must be ≥ 1 and workers ≥ 0 (got {batch_size}, {block_size}, {workers})")
    if max_sigma is not None and not task.has_sigma:
        raise CheckpointError("--max-sigma needs a model trained with uncertainty (this one predicts no sigma)", source)
    if max_sigma is not None and not max_sigma > 0:
        raise InputError(f"max_sigma must be > 0 m, got {max_sigma}")
    if above_max_sigma not in ABOVE_MAX_SIGMA:
        raise InputError(f"above_max_sigma must be one of {', '.join(ABOVE_MAX_SIGMA)}, got {above_max_sigma!r}")
