"""Refine at the pixel size the model was trained at, for a scene of another pixel size.

A convolutional model learns features of a given size in pixels: a roof edge, a crown, a gully.
Fed a 1 m scene, a model trained at 0.5 m sees every object at half the size it learned. So the
scene is resampled to the model's pixel size (:func:`deepdem.prepare.resample_scene`), refined
there, and the result (heights and σ) brought back onto the scene's grid with the resampling
``prepare`` would choose (:func:`deepdem.align.resampling_for`: averaged from much finer pixels,
bilinear otherwise). Measured on the
real-terrain benchmark's 1 m scene with models trained at 0.5 m: see docs/refine.md.

The resampled scene and its refinement live in a hidden folder beside the output, kept until the
output is published, so that ``resume`` continues the refinement there.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from ..align import resampling_for
from ..scene import FLOAT_NODATA, MANIFEST, PIXEL_SIZE_TOLERANCE, Scene
from .agreement import check_failed
from .output import WORK_PROFILE, publish, sigma_path, work_paths

log = logging.getLogger(__name__)

#: rows of the scene's grid written at a time when bringing the result back
ROWS_PER_WRITE = 1024


def model_pixel_size(model_kwargs: dict, scene: Scene) -> float | None:
    """The pixel size (m) to refine ``scene`` at when it is not its own: the model's training
    pixel size when the two differ by more than :data:`PIXEL_SIZE_TOLERANCE`, else None.
    None too for a model or scene without a pixel size in metres (older checkpoints, no CRS)."""
    trained, own = model_kwargs.get("pixel_size_m"), scene.grid.pixel_size_m
    if not trained or own is None:
        return None
    return float(trained) if max(trained, own) > PIXEL_SIZE_TOLERANCE * min(trained, own) else None


def refine_resampled(refine, task, scene: Scene, out: Path, pixel_size: float, resume: bool, fill: bool,
                     **settings) -> Path:
    """``refine`` (the function) run on ``scene`` resampled to ``pixel_size`` m, its output
    brought back onto the scene's grid at ``out`` (and σ beside it), as one COG each."""
    hidden = out.with_name(f".{out.name}.at-{pixel_size:g}m")
    scene_dir = hidden / "scene"
    if resume and (scene_dir / MANIFEST).exists():
        resampled = Scene.open(scene_dir)
    else:
        shutil.rmtree(hidden, ignore_errors=True)
        hidden.mkdir(parents=True)
        log.info("the model was trained at %.3g m pixels, the scene has %.3g m: refining at %.3g m",
                 pixel_size, scene.grid.pixel_size_m, pixel_size)
        from ..prepare import resample_scene  # prepare's imports (scikit-image) only when needed

        bands = dict.fromkeys(["dsm", *task.model_kwargs["bands"]])
        resampled = resample_scene(scene, pixel_size, scene_dir, bands=bands)
    if scene.parallax_geometry is not None:
        resampled = resampled.with_parallax_geometry(scene.parallax_geometry)
    refined = refine(task, resampled, hidden / "refined.tif", resume=resume, fill=fill, at_model_pixel_size=False,
                     **settings)
    # A scene pixel gets the mean of the model's finer heights (and σ) over it, as a coarser DEM
    # would be made from a finer one: prepare's rule for a height band.
    method = resampling_for("dsm", resampled.grid.resolution, scene.grid)
    height_work, sigma_work, journal = work_paths(out)
    works = [height_work]
    with rasterio.open(refined) as src:
        kept = check_failed(src.tags())
    # Where the parallax check kept the initial DSM, it is the scene's own, not one resampled
    # there and back (which smooths it: measured worse than the input on a tree stratum).
    initial_bands = [i for i, target in enumerate(task.targets) if target == "dsm"] if kept else []
    _bring_back(refined, height_work, scene, method, fill, initial_bands)
    if sigma_path(refined).exists():
        _bring_back(sigma_path(refined), sigma_work, scene, method, fill)
        works.append(sigma_work)
    elif sigma_path(out).exists():
        sigma_path(out).unlink()  # an earlier model's σ would pass for this DSM's
    publish(works, journal, out)
    shutil.rmtree(hidden)
    return out


def _bring_back(source: Path, work: Path, scene: Scene, method: Resampling, fill: bool,
                initial_bands: Sequence[int] = ()) -> None:
    """``source`` resampled onto the scene's grid into the uncompressed work file ``work``, with
    its band descriptions and tags, and nodata where the scene has no input (unless ``fill``).
    The bands of ``initial_bands`` (0-based) are the scene's DSM wherever they have a value and
    the DSM has one, nodata elsewhere."""
    grid = scene.grid
    with rasterio.open(source) as src, WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                                  height=grid.height, resampling=method, src_nodata=FLOAT_NODATA,
                                                  nodata=FLOAT_NODATA) as vrt:
        profile = dict(WORK_PROFILE, height=grid.height, width=grid.width, count=src.count, dtype="float32",
                       crs=grid.crs, transform=grid.transform, nodata=FLOAT_NODATA)
        work.unlink(missing_ok=True)
        with rasterio.open(work, "w", **profile) as dst:
            dst.update_tags(**src.tags())
            for band, description in enumerate(src.descriptions, start=1):
                if description:
                    dst.set_band_description(band, description)
            for row in range(0, grid.height, ROWS_PER_WRITE):
                window = Window(0, row, grid.width, min(ROWS_PER_WRITE, grid.height - row))
                data = vrt.read(window=window).astype(np.float32, copy=False)
                if not fill:
                    data[:, scene.read("nodata_mask", window) <= 0] = np.float32(FLOAT_NODATA)
                if initial_bands:
                    dsm = scene.read("dsm", window)
                    for band in initial_bands:
                        keep = (data[band] != np.float32(FLOAT_NODATA)) & np.isfinite(dsm)
                        data[band] = np.where(keep, dsm, np.float32(FLOAT_NODATA))
                dst.write(data, window=window)
