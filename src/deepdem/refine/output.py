"""Refine's output: the work GeoTIFFs, the resume journal, and the Cloud-Optimised GeoTIFFs.

Finished blocks go into tiled, uncompressed GeoTIFFs under temporary names beside ``out`` (the
heights, and σ for a model that predicts it), with a small JSON journal of finished blocks. At
the end each work file gets average overviews and is copied to a COG (deflate) under another
temporary name and renamed onto its final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling

from ..io import COG_OPTIONS, atomic_path, gtiff_profile
from ..models import DeepDEMRegressionTask
from ..scene import FLOAT_NODATA, Scene
from ..uncertainty import SIGMA_TAG
from .layout import TILE, Block

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "deepdem-refine-journal-1"
#: Tags of the σ raster: what its values are, read back by ``deepdem evaluate --sigma``.
SIGMA_TAGS = {SIGMA_TAG: "laplace",
              "DEEPDEM_SIGMA": "standard deviation (m) of the predicted Laplace error of each pixel"}
#: Tag of a σ raster written by ``refine --tta``: its spread term does not scale with the
#: model's calibration factor, so ``deepdem calibrate`` refuses it.
SIGMA_TTA_TAG = "DEEPDEM_SIGMA_TTA"

#: Temporary (work) GeoTIFF: uncompressed, because it is read once into the COG and any
#: compression there costs as much CPU as a fifth of the model (measured at 4096²). Its tiles are
#: the blocks' unit (TILE), so that each block writes whole tiles.
WORK_PROFILE = gtiff_profile(compress=None, predictor=None, zstd_level=None, blockxsize=TILE, blockysize=TILE,
                             BIGTIFF="YES", interleave="band")
#: GDAL's block cache (MB) for refine's final overview and COG steps. At GDAL's default, 5 % of
#: RAM, those steps grew with the scene (1.25 GB more at 16384² than at 4096²) and ran 3-4x
#: slower; they go through the raster window by window, so a small cache loses nothing.
GDAL_CACHE_MB = 64


def work_paths(out: Path) -> tuple[Path, Path, Path]:
    """The work GeoTIFFs of the heights and of σ, and the journal, hidden beside ``out``."""
    return (out.with_name(f".{out.name}.refine.tif"), out.with_name(f".{out.name}.refine-sigma.tif"),
            out.with_name(f".{out.name}.refine.json"))


def sigma_path(out: str | os.PathLike) -> Path:
    """Where refine writes the σ of ``out``: ``<out stem>_sigma.tif`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.with_suffix('').name}_sigma.tif")


def weights_digest(task: DeepDEMRegressionTask) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(task.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_journal(path: Path, journal: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(journal))
    os.replace(tmp, path)


def commit_block(works: Sequence[Path], journal_path: Path, journal: dict, block: Block, data: np.ndarray) -> None:
    """Write a finished block into the work file(s), then record it in the journal.

    ``data`` holds the heights, then σ when there is a second work file. The files are closed
    (flushed) before the journal names the block, so a block the journal lists is always on
    disk; a block written but not journaled is simply recomputed on resume.
    """
    for work, planes in zip(works, np.split(data, len(works))):
        with rasterio.open(work, "r+") as dst:
            dst.write(planes, window=block.window)
    journal["done"].append(block.index)
    write_journal(journal_path, journal)



def cog_overview_factors(shape: tuple[int, int], blocksize: int = COG_OPTIONS["BLOCKSIZE"]) -> list[int]:
    """The overview levels GDAL's COG driver makes by itself: halve until one block holds it."""
    factors, size = [], max(shape)
    while size > blocksize:
        factors.append(2 ** (len(factors) + 1))
        size = -(-size // 2)
    return factors


def build_overviews(work: Path) -> None:
    """Average overviews (no data honoured) in the uncompressed work file, for the COG to copy.

    The COG driver uses a source's overviews when it has them; left to make its own, it writes
    them compressed to a temporary file and reads them back (measured at 4096²: 0.08 s here
    against 0.35 s there).
    """
    with rasterio.open(work, "r+") as dst:
        factors = cog_overview_factors(dst.shape)
        if factors:
            dst.build_overviews(factors, Resampling.average)


def open_journal(out: Path, scene: Scene, targets: Sequence[str], sigma: bool, fingerprint: dict,
                 resume: bool, tta: bool = False, tags: dict[str, str] | None = None) -> tuple[list[Path], Path, dict]:
    """The work files and journal of ``out``: those of an interrupted run with the same
    ``fingerprint`` when ``resume``, else new ones (heights with ``tags``, then σ when
    ``sigma``, tagged :data:`SIGMA_TTA_TAG` when ``tta``)."""
    if not sigma and sigma_path(out).exists():
        # A σ left by an earlier model would pass for this DSM's.
        log.warning("removing %s: it belongs to an earlier refine (this model predicts no sigma)", sigma_path(out))
        sigma_path(out).unlink()
    work, sigma_work, journal_path = work_paths(out)
    works = [work, sigma_work] if sigma else [work]
    journal = None
    if resume and all(w.exists() for w in works) and journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text())
        except json.JSONDecodeError:
            journal = None
        if journal and (journal.get("format") != JOURNAL_FORMAT or journal.get("fingerprint") != fingerprint):
            log.warning("%s: journal is for other inputs or settings; starting over", journal_path)
            journal = None
    if journal is None:
        journal = {"format": JOURNAL_FORMAT, "fingerprint": fingerprint, "done": []}
        profile = dict(WORK_PROFILE, height=scene.shape[0], width=scene.shape[1], count=len(targets),
                       dtype="float32", crs=scene.crs, transform=scene.transform, nodata=FLOAT_NODATA)
        for path, label in zip(works, ("refined {} (m)", "sigma of the refined {} (m)")):
            path.unlink(missing_ok=True)
            with rasterio.open(path, "w", **profile) as dst:
                for i, target in enumerate(targets, start=1):
                    dst.set_band_description(i, label.format(target.upper()))
                if path == sigma_work:
                    dst.update_tags(**SIGMA_TAGS, **({SIGMA_TTA_TAG: "spread of the 8 views included"} if tta else {}))
                elif tags:
                    dst.update_tags(**tags)
        write_journal(journal_path, journal)
    return works, journal_path, journal


def publish(works: Sequence[Path], journal_path: Path, out: Path) -> None:
    """Each finished work file as a COG with overviews (the heights at ``out``, σ at
    :func:`sigma_path`), then the work files and the journal removed."""
    # GDAL's block cache bounded (see GDAL_CACHE_MB) for these whole-raster steps. Not around
    # the block loop: its reads close their files (and free their cached tiles) block by block,
    # and an active rasterio.Env there slowed refine by 3 %.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        for path, final in zip(works, (out, sigma_path(out))):
            build_overviews(path)
            with atomic_path(final) as tmp:
                rasterio.shutil.copy(path, tmp, driver="COG", **COG_OPTIONS)
            path.unlink(missing_ok=True)
    journal_path.unlink(missing_ok=True)
