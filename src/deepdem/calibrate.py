"""Site calibration of σ: refit a checkpoint's σ factor on a reference DEM at the site.

Training calibrates σ with one factor fitted on its validation chips (see
:func:`deepdem.train.calibrate_sigma`). That factor does not hold at every site: on the held-out
scenes of the real-terrain benchmark the 68 % interval held 49-84 % of the errors
(BENCHMARKS.md). The level of stereo errors belongs to the site (its viewing geometry, its land
cover) more than to the model, and no input tells the model what it is; a reference patch at the
site does. Given refine's output over an area where a reference exists (a LIDAR patch, a
surveyed strip), :func:`calibrate_to_reference` fits one factor t on the pixels the reference
covers (:func:`deepdem.uncertainty.fit_temperature`) and writes a copy of the checkpoint whose σ is
t times larger. Refining the rest of the site with that copy gives σ fitted to the site; the
heights do not change.

σ scales with the factor exactly, except the spread term that ``refine --tta`` adds: a σ raster
tagged as coming from ``--tta`` is refused; fit on a refine run made without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, InputError
from .evaluate import read_on_grid
from .io import open_raster
from .uncertainty import TEMPERATURE_METHODS, calibration_metrics, fit_temperature, read_sigma_distribution

#: Fewer reference pixels than this give a factor that says more about the patch than the site.
MIN_PIXELS = 1000


@dataclass(frozen=True)
class SiteCalibration:
    """What :func:`calibrate_to_reference` fitted and wrote."""

    checkpoint: Path
    #: the new checkpoint's σ ÷ the old one's
    factor: float
    #: the new checkpoint's σ calibration factor (the old one × ``factor``)
    temperature: float
    #: pixels where the DEM, its σ and the reference all have data
    pixels: int
    #: :func:`deepdem.uncertainty.calibration_metrics` on those pixels, with the old and the new σ
    before: dict[str, float]
    after: dict[str, float]


def calibrate_to_reference(
    checkpoint: str | os.PathLike,
    dem: str | os.PathLike,
    reference: str | os.PathLike,
    out: str | os.PathLike,
    sigma: str | os.PathLike | None = None,
    target: str = "dsm",
    method: str = "coverage",
) -> SiteCalibration:
    """Fit ``checkpoint``'s σ to the errors of ``dem`` (refined with it) against ``reference``.

    ``sigma`` defaults to refine's ``<dem stem>_sigma.tif``. ``reference`` may be on any grid
    that overlaps ``dem`` (resampled bilinearly onto it); only the pixels where it has data
    count. ``target`` picks the band of a two-head model's rasters; the factor applies to all
    heads, as training's does. ``method``: see :func:`~deepdem.uncertainty.fit_temperature`.
    Writes the calibrated copy to ``out`` (``.safetensors`` or a torch checkpoint).
    """
    from .models import export_safetensors, load_checkpoint, save_checkpoint
    from .refine import sigma_path
    from .refine.output import SIGMA_TTA_TAG

    if method not in TEMPERATURE_METHODS:
        raise ValueError(f"method must be one of {', '.join(TEMPERATURE_METHODS)}, got {method!r}")
    sigma = Path(sigma) if sigma is not None else sigma_path(dem)
    if not sigma.exists():
        raise InputError("σ raster not found (refine writes it beside the DEM for a model with σ; or give --sigma)",
                         sigma)
    with open_raster(sigma) as src:
        if SIGMA_TTA_TAG in src.tags():
            raise InputError("σ from refine's 8-view average (--tta, the default on scenes of at most 2048 x 2048 "
                             "px), whose spread of the views does not scale with the factor: refine with --no-tta "
                             "to calibrate", sigma)
    task = load_checkpoint(checkpoint)
    if not task.has_sigma:
        raise CheckpointError("the model predicts no σ: there is nothing to calibrate", checkpoint)
    heights, grid = read_on_grid(dem, None, target)
    errors = heights - read_on_grid(reference, grid)[0]
    spread = read_on_grid(sigma, grid, target)[0]
    usable = np.isfinite(errors) & np.isfinite(spread) & (spread > 0)
    pixels = int(usable.sum())
    if pixels < MIN_PIXELS:
        raise InputError(f"only {pixels} pixels where the DEM, its σ and the reference all have data; "
                         f"calibration needs at least {MIN_PIXELS}", reference)
    errors, spread = errors[usable], spread[usable]
    distribution = read_sigma_distribution(sigma)
    factor = fit_temperature(errors, spread, distribution, method)
    previous = task.sigma_temperature
    task.model_kwargs.update(
        sigma_temperature=previous * factor,
        sigma_calibration=f"site: {method} fit on {pixels} pixels of {Path(reference).name} "
                          f"({factor:.4g} × the previous factor, {previous:.4g})")
    out = Path(out)
    if out.suffix == ".safetensors":
        export_safetensors(task, out)
    else:
        save_checkpoint(task, out)
    return SiteCalibration(
        checkpoint=out, factor=factor, temperature=previous * factor, pixels=pixels,
        before=calibration_metrics(errors, spread, distribution),
        after=calibration_metrics(errors, spread * factor, distribution))
