"""The parallax check: a test of the model on the scene itself, without any truth.

The parallax band is a measurement of the DSM's error that does not come from the network: the
two orthos, mapprojected through the DSM, still show its error as a shift between them
(:mod:`deepdem.parallax`). A model that corrects the scene's DSM corrects it against that error:
its correction correlates positively with −parallax. A model that learnt a cue which does not
hold on this scene moves the DSM along its error instead, and makes it worse wherever it acts.

Measured on the small-scene check (``bench/small_scene.py``: models trained on one 100 m crop
for 8 minutes, 3 seeds × 2 kinds of stereo error, 4 unseen sites): on 22 of 24 (model, scene)
pairs the correlation was +0.20 to +0.82 (refined MAE 0.47–1.00× the input's); on the other two,
two seeds on the 1 m Autzen scene with modelled errors, −0.57 and −0.49, and the models moved
its open ground along the error: refined MAE 1.071× and 0.960× the input's (the second gained
on trees what it lost there). With the check both are 1.000: the scene's own initial DSM.

``refine`` runs the model on a sample of the scene first; where the correlation is below zero it
keeps the initial DSM (σ nodata), says so, and ``--no-parallax-check`` writes the model's
output anyway. The verdict is a tag of the output (:data:`CHECK_TAG`). Only the DSM is checked:
the parallax measures the DSM's error, not the DTM's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from ..scene import FLOAT_NODATA, Scene
from .blocks import BlockRefiner
from .layout import Block, RefineSettings

log = logging.getLogger(__name__)

#: The sample: windows of this many pixels a side, on a regular grid of at most this many a side.
SAMPLE_WINDOW, SAMPLE_GRID = 256, 4
#: Fewer sampled pixels (with data in the DSM, the output and the band) and the check says nothing.
MIN_PIXELS = 4096
#: Below this correlation of the correction with −parallax, refine keeps the initial DSM.
MIN_CORRELATION = 0.0


@dataclass(frozen=True)
class Agreement:
    """The Pearson correlation of the model's DSM correction with −parallax, on ``pixels`` pixels."""

    correlation: float
    pixels: int

    @property
    def passed(self) -> bool:
        return self.correlation >= MIN_CORRELATION


def sample_blocks(shape: tuple[int, int], size: int = SAMPLE_WINDOW, grid: int = SAMPLE_GRID) -> list[Block]:
    """Windows spread evenly over the scene: each axis covered once where the scene is small,
    ``grid`` windows of ``size`` px along it where it is large."""
    def starts(length: int) -> list[int]:
        side = min(size, length)
        count = min(grid, math.ceil(length / side))
        return sorted({int(round(v)) for v in np.linspace(0, length - side, count)})

    height, width = shape
    rows, cols = starts(height), starts(width)
    side_r, side_c = min(size, height), min(size, width)
    return [Block(-1, r, r + side_r, c, c + side_c) for r in rows for c in cols]


def correction_agreement(task, scene: Scene, settings: RefineSettings) -> Agreement | None:
    """How the model's DSM correction follows the parallax band, on a sample of ``scene``
    refined as ``settings`` would refine it (σ's threshold aside). None where the model reads no
    parallax band, has no DSM head, or the sample has too few pixels to say."""
    if "parallax" not in settings.bands or "dsm" not in settings.targets:
        return None
    plain = dataclasses.replace(settings, max_sigma=None, keep_initial_dsm=False, fill=False)
    refiner = BlockRefiner(task, scene, plain)
    head = settings.targets.index("dsm")
    corrections, parallax = [], []
    for block in sample_blocks(scene.shape):
        heights = refiner.refine_block(block)[head]
        dsm = scene.read("dsm", block.window)
        band = scene.read("parallax", block.window)
        ok = (heights != np.float32(FLOAT_NODATA)) & np.isfinite(dsm) & np.isfinite(band)
        corrections.append((heights - dsm)[ok])
        parallax.append(band[ok])
    correction, band = np.concatenate(corrections), np.concatenate(parallax)
    if correction.size < MIN_PIXELS or correction.std() == 0 or band.std() == 0:
        return None
    return Agreement(float(np.corrcoef(correction, -band)[0, 1]), int(correction.size))


#: Tag of refine's heights raster: the parallax check's verdict, where it ran.
CHECK_TAG = "DEEPDEM_PARALLAX_CHECK"
#: The start of that tag's value where the check failed and the DSM bands are the initial DSM.
FAILED = "failed"


def check_tag(agreement: Agreement | None) -> dict[str, str]:
    """The tag that records ``agreement`` in the output (none where the check did not run)."""
    if agreement is None:
        return {}
    verdict = ("passed" if agreement.passed
               else f"{FAILED}: the DSM bands are the initial DSM")
    return {CHECK_TAG: f"{verdict} (correlation of the model's DSM correction with -parallax "
                       f"{agreement.correlation:+.2f} on {agreement.pixels} sampled pixels)"}


def check_failed(tags: dict[str, str]) -> bool:
    """Whether a raster's tags say that the parallax check kept the initial DSM."""
    return tags.get(CHECK_TAG, "").startswith(FAILED)


def check_correction(task, scene: Scene, settings: RefineSettings) -> tuple[RefineSettings, Agreement | None]:
    """``settings`` to refine with: as given where the model's correction follows the parallax
    (or the check cannot tell), with the initial DSM kept where it does not; and the check's
    measurement (None where it cannot tell)."""
    agreement = correction_agreement(task, scene, settings)
    if agreement is None:
        return settings, None
    if agreement.passed:
        log.info("%s: the model's DSM correction follows the orthos' parallax (correlation %+.2f on %d sampled "
                 "pixels)", scene.path, agreement.correlation, agreement.pixels)
        return settings, agreement
    log.warning("%s: the model's DSM correction runs along the DSM error that the orthos' parallax shows "
                "(correlation %+.2f on %d sampled pixels): the model does not transfer to this scene, and the "
                "initial DSM is kept (sigma nodata). Train on scenes like this one, or give --no-parallax-check "
                "to write the model's output anyway", scene.path, agreement.correlation, agreement.pixels)
    return dataclasses.replace(settings, keep_initial_dsm=True), agreement
