"""Build a Scene from input rasters: common grid, nodata honoured, equalised images, statistics.

Every input is aligned onto one grid (the DSM's, or the DSM's footprint at ``resolution`` in
``crs``) with rasterio's warp, resampled according to its band kind: bilinear (or cubic) for
continuous bands when the source is as fine as the grid or coarser, *average* when the source
is much finer (bilinear would alias a 0.2 m image onto a 1 m grid), nearest for masks and
classes. Each file's own nodata is honoured, and areas an input does not cover stay nodata
(never 0). The nodata mask is "valid in every input".

Heights: compound and 3D CRSs (ASP writes WKT with ellipsoidal heights) are split into their
horizontal part (used for warping) and their vertical reference. When the DSM and the truth
declare different vertical references, the DSM is transformed into the truth's with pyproj, or
preparation stops naming both references when PROJ lacks the grid to do it.

Optionally the DSM (with the orthos and the error map, which share its geometry) is
co-registered to the truth on stable ground (:mod:`deepdem.coregister`), and NDVI is computed
from a multiband raster or from HLS (:mod:`deepdem.imagery`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from rasterio.crs import CRS
from skimage import exposure

# read_grid and resampling_for are imported from here by users of earlier versions
from .align import CONTINUOUS_UPSAMPLING, align_to_grid, read_grid, read_source, resampling_for, target_grid  # noqa: F401
from .errors import InputError
from .io import horizontal_crs, open_raster, vertical_reference
from .scene import INPUT_BANDS, Grid, Scene, nodata_mask, write_scene

log = logging.getLogger(__name__)

# How ``--asp-prefix PATH/run`` finds its files. ``{prefix}`` is PATH/run, ``{dir}`` is PATH.
# The first existing file of each list wins. ASP's own names come first (``run-DEM.tif`` from
# point2dem, ``run-IntersectionErr.tif`` from point2dem --errorimage); mapproject's output is
# named by the user, so the usual conventions are tried (ASP docs: ``left_mapproj.tif``;
# DeepDEM and ``deepdem synth``: ``left_ortho.tif``). ASP's ``run-L.tif`` is *not* a
# mapprojected image (it is the aligned raw image) and is never picked.
ASP_PATTERNS: dict[str, tuple[str, ...]] = {
    "dsm": ("{prefix}-DEM.tif",),
    "triangulation_error": ("{prefix}-IntersectionErr.tif",),
    "ortho_left": (
        "{prefix}-L-mapproj.tif", "{prefix}-left-mapproj.tif", "{prefix}-L_mapproj.tif",
        "{prefix}-left_ortho.tif", "{prefix}-L-ortho.tif",
        "{dir}/left_ortho.tif", "{dir}/left_mapproj.tif", "{dir}/left-mapproj.tif",
        "{dir}/left_map.tif", "{dir}/left_mp.tif", "{dir}/left.map.tif",
    ),
    "ortho_right": (
        "{prefix}-R-mapproj.tif", "{prefix}-right-mapproj.tif", "{prefix}-R_mapproj.tif",
        "{prefix}-right_ortho.tif", "{prefix}-R-ortho.tif",
        "{dir}/right_ortho.tif", "{dir}/right_mapproj.tif", "{dir}/right-mapproj.tif",
        "{dir}/right_map.tif", "{dir}/right_mp.tif", "{dir}/right.map.tif",
    ),
    "ndvi": ("{prefix}-NDVI.tif", "{dir}/ndvi.tif"),
}
REQUIRED_ASP = ("dsm", "triangulation_error", "ortho_left", "ortho_right")


def discover_asp_inputs(prefix: str | os.PathLike, required: tuple[str, ...] = REQUIRED_ASP) -> dict[str, Path]:
    """Find an ASP run's DSM, IntersectionErr, mapprojected images (and NDVI) from its prefix.

    ``prefix`` is what was given to ``parallel_stereo`` (``PATH/run``); a directory holding a
    single ``*-DEM.tif`` is accepted too. Raises :class:`InputError` naming the patterns tried
    for a missing required file.
    """
    prefix = Path(prefix)
    if prefix.is_dir():
        dems = sorted(prefix.glob("*-DEM.tif"))
        if len(dems) != 1 and "dsm" in required:
            raise InputError(f"is a directory with {len(dems)} *-DEM.tif files; give the run prefix (PATH/run)", prefix)
        prefix = dems[0].with_name(dems[0].name[: -len("-DEM.tif")]) if len(dems) == 1 else prefix / "run"
    found: dict[str, Path] = {}
    for band, patterns in ASP_PATTERNS.items():
        candidates = [Path(p.format(prefix=prefix, dir=prefix.parent)) for p in patterns]
        hit = next((c for c in candidates if c.exists()), None)
        if hit is not None:
            found[band] = hit
            log.info("asp-prefix: %s <- %s", band, hit)
        elif band in required:
            names = ", ".join(c.name for c in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            raise InputError(f"ASP run has no {band.replace('_', ' ')} (looked for {names}; "
                             f"see docs/prepare.md, or pass --{band.replace('_', '-')})", prefix)
    return found


def equalize_image(image: np.ndarray, kernel_size: int | None = None, clip_limit: float = 0.01) -> np.ndarray:
    """Adaptive histogram equalisation (CLAHE) on valid pixels; returns [0, 1] with NaN kept.

    ``kernel_size`` is the CLAHE tile in pixels (default: 1/8 of the image), ``clip_limit``
    the contrast limit in [0, 1] (higher: more contrast). The image is stretched to [0, 1]
    between its 0.1 and 99.9 percentiles of valid pixels first, because skimage's CLAHE expects
    that range and a single bright outlier would otherwise compress the whole histogram.
    Invalid pixels get the median during CLAHE so that they do not distort the tile
    histograms, and are set back to NaN after.
    """
    if not 0 < clip_limit <= 1:
        raise ValueError(f"clip limit must be in (0, 1], got {clip_limit}")
    valid = np.isfinite(image)
    if not valid.any():
        return image
    lo, hi = np.percentile(image[valid], [0.1, 99.9])
    stretched = np.clip((image - lo) / max(hi - lo, 1e-9), 0, 1)
    stretched[~valid] = np.median(stretched[valid])
    if kernel_size is not None:
        kernel_size = max(2, min(int(kernel_size), *image.shape))
    equalised = exposure.equalize_adapthist(stretched, kernel_size=kernel_size, clip_limit=clip_limit)
    return np.where(valid, equalised, np.nan).astype(np.float32)


def _full_crs(path) -> CRS | None:
    with open_raster(path) as src:
        return src.crs


def vertical_transform(dsm_data: np.ndarray, grid: Grid, dsm_path, truth_path) -> tuple[np.ndarray, dict | None]:
    """Express the DSM's heights in the truth's vertical reference (see the module docstring).

    Returns the heights and a provenance record (None when nothing was done).
    """
    import pyproj
    from pyproj.transformer import TransformerGroup

    src_crs, dst_crs = _full_crs(dsm_path), _full_crs(truth_path)
    src_ref, dst_ref = vertical_reference(src_crs), vertical_reference(dst_crs)
    if src_ref is None or dst_ref is None:
        if src_ref != dst_ref:
            log.warning("vertical reference: DSM %s, truth %s; the undeclared one is assumed to be the same",
                        src_ref or "undeclared", dst_ref or "undeclared")
        return dsm_data, {"dsm": src_ref, "truth": dst_ref, "transformed": False}
    if src_ref == dst_ref:
        return dsm_data, {"dsm": src_ref, "truth": dst_ref, "transformed": False}
    source = pyproj.CRS.from_wkt(src_crs.to_wkt())
    target = pyproj.CRS.from_wkt(dst_crs.to_wkt())
    if not target.is_compound and len(target.axis_info) != 3:
        target = target.to_3d()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyproj warns about missing grids; we report it below
        group = TransformerGroup(source, target, always_xy=True)
    if not group.best_available or not group.transformers:
        missing = sorted({g.short_name for op in group.unavailable_operations for g in op.grids if not g.available})
        raise InputError(
            f"vertical references differ: DSM heights are {src_ref}, truth heights are {dst_ref}, and PROJ "
            f"cannot transform them here (missing grid: {', '.join(missing) or 'no known transformation'}; "
            "install it with projsync, or convert one of them first)", dsm_path)
    transformer = group.transformers[0]
    # Heights transform as z' = a(x, y) + b(x, y)·z (geoid offsets vary slowly, unit changes
    # scale): evaluate a and b on a coarse lattice of the grid and interpolate them bilinearly.
    rows = np.linspace(0, grid.height - 1, min(grid.height, 33))
    cols = np.linspace(0, grid.width - 1, min(grid.width, 33))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    xs, ys = grid.transform @ (cc + 0.5, rr + 0.5)
    to_source = pyproj.Transformer.from_crs(
        pyproj.CRS.from_wkt(grid.crs.to_wkt()), pyproj.CRS.from_wkt(horizontal_crs(src_crs).to_wkt()), always_xy=True)
    sx, sy = to_source.transform(xs, ys)
    z0 = transformer.transform(sx, sy, np.zeros_like(sx))[2]
    z1 = transformer.transform(sx, sy, np.full_like(sx, 1000.0))[2]
    if not (np.isfinite(z0).all() and np.isfinite(z1).all()):
        raise InputError(f"vertical transformation {src_ref} -> {dst_ref} failed over the DSM", dsm_path)
    a, b = z0, (z1 - z0) / 1000.0
    from scipy.interpolate import RegularGridInterpolator

    full_r, full_c = np.mgrid[0 : grid.height, 0 : grid.width]
    points = np.stack([full_r.ravel(), full_c.ravel()], axis=1).astype(np.float64)

    def field(values):
        if len(rows) < 2 or len(cols) < 2:
            return np.full(grid.shape, float(values.mean()))
        return RegularGridInterpolator((rows, cols), values)(points).reshape(grid.shape)

    converted = (field(a) + field(b) * dsm_data).astype(np.float32)
    log.info("vertical: DSM %s -> %s (%s)", src_ref, dst_ref, transformer.description)
    return converted, {"dsm": src_ref, "truth": dst_ref, "transformed": True,
                       "operation": transformer.description,
                       "mean_offset_m": float(np.nanmean(converted - dsm_data))}


def prepare_scene(
    dsm: str | os.PathLike,
    ortho_left: str | os.PathLike,
    ortho_right: str | os.PathLike,
    triangulation_error: str | os.PathLike,
    out: str | os.PathLike,
    ndvi: str | os.PathLike | None = None,
    truth: str | os.PathLike | None = None,
    truth_dtm: str | os.PathLike | None = None,
    clahe_kernel: int | None = None,
    clahe_clip: float = 0.01,
    *,
    crs: str | CRS | None = None,
    resolution: float | None = None,
    upsampling: str = "bilinear",
    ndvi_bands: tuple[int, int] | None = None,
    image_band: int | None = None,
    coregister: bool = False,
    coregister_max_ndvi: float = 0.3,
    coregister_max_slope: float = 40.0,
    coregister_max_shift_px: float = 10.0,
    hls: dict | None = None,
    views: tuple | None = None,
    parallax: bool = True,
) -> Scene:
    """Align the inputs onto one grid and write a Scene directory at ``out``.

    ``crs``/``resolution`` choose a grid other than the DSM's. ``ndvi_bands=(nir, red)``
    (1-based) computes NDVI from a multiband ``ndvi`` raster (e.g. an IRC orthophoto: (1, 2)).
    ``image_band`` picks one band of multiband orthos (default: their mean). ``coregister``
    shifts the DSM, orthos and error map onto the truth (shifts in ``scene.json``; a shift that
    does not lower the NMAD on stable ground, or exceeds ``coregister_max_shift_px``, is
    reported but not applied). ``hls``
    (keyword arguments of :func:`deepdem.imagery.hls_ndvi`, e.g. ``{"start": ..., "end": ...}``)
    computes NDVI from HLS when no ``ndvi`` is given. ``views``, the two images' satellite
    (azimuth, off-nadir angle) in degrees (or :class:`deepdem.synth.View`), adds the ``parallax``
    band: the DSM's error as the orthos still see it (:mod:`deepdem.parallax`); without them the
    orthos' shift is stored, from which ``train`` derives the band. ``parallax=False`` measures
    neither (the flow costs about 7 s per million pixels on 2 CPU cores). Nothing is written at
    ``out`` unless every input is usable.
    """
    if views is not None and not parallax:
        raise InputError("the views' angles are for the parallax band: give --views or --no-parallax, not both")
    inputs = _checked_inputs({"dsm": dsm, "ortho_left": ortho_left, "ortho_right": ortho_right,
                              "triangulation_error": triangulation_error, "ndvi": ndvi,
                              "truth_dsm": truth, "truth_dtm": truth_dtm}, upsampling, coregister)
    grid = target_grid(dsm, crs, resolution)
    dsm_data = _read_dsm(dsm, grid, upsampling)
    provenance: dict = {
        "inputs": {band: str(path.resolve()) for band, path in inputs.items()},
        "grid": {"source": "dsm" if crs is None and resolution is None else "crs/resolution",
                 "crs": grid.crs.to_string(), "resolution": list(grid.resolution)},
        "clahe": {"kernel_size": clahe_kernel, "clip_limit": clahe_clip},
    }
    if truth is not None:
        dsm_data, provenance["vertical_reference"] = vertical_transform(dsm_data, grid, dsm, truth)

    bands = {"dsm": dsm_data, **_align_inputs(inputs, grid, upsampling, image_band, ndvi_bands)}
    if "ndvi" not in bands and hls:
        from .imagery import hls_ndvi

        bands["ndvi"], provenance["hls"] = hls_ndvi(grid, **hls)
        if not np.isfinite(bands["ndvi"]).any():
            raise InputError("HLS gave no clear observation over the scene (widen the date window)", dsm)
    if "ndvi" in bands:
        bands["ndvi"] = _ndvi_in_range(bands["ndvi"], inputs.get("ndvi", dsm))
    if coregister:
        provenance["coregistration"] = _coregister(bands, grid, dsm, coregister_max_ndvi, coregister_max_slope,
                                                   coregister_max_shift_px)

    if not parallax:
        provenance["parallax"] = {"views": None, "method": "not measured (parallax=False)"}
    elif views is not None:
        bands["parallax"], provenance["parallax"] = _parallax(bands, grid, views)
    elif "ortho_left" in bands and "ortho_right" in bands:
        provenance["parallax"] = _parallax_shift(bands, grid)
    for band in ("ortho_left", "ortho_right"):
        bands[band] = equalize_image(bands[band], clahe_kernel, clahe_clip)
    if "ortho_left" in bands and "ortho_right" in bands:
        from .parallax import local_correlation

        # on the equalised orthos, which the scene stores: the band can be remade from the scene alone
        bands["ortho_correlation"] = local_correlation(bands["ortho_left"], bands["ortho_right"])
    mask = nodata_mask(bands)
    if not mask.any():
        raise InputError("no pixel is valid in every input band (check the inputs' nodata and extents)", dsm)
    bands["nodata_mask"] = mask.astype(np.uint8)
    provenance["resampling"] = {
        "continuous": f"{upsampling} (average where the source is >= 1.5x finer than the grid)",
        "mask": "nearest",
    }
    return write_scene(out, grid, bands, provenance)


def _checked_inputs(files: dict, upsampling: str, coregister: bool) -> dict[str, Path]:
    """Prepare, step 1: the given input files by band, refused before any is read if one is missing."""
    if upsampling not in CONTINUOUS_UPSAMPLING:
        raise ValueError(f"upsampling must be one of {CONTINUOUS_UPSAMPLING}")
    inputs = {band: Path(path) for band, path in files.items() if path is not None}
    for band, path in inputs.items():
        if not path.exists():
            raise InputError(f"{band.replace('_', ' ')} file not found", path)
    if coregister and "truth_dsm" not in inputs:
        raise InputError("--coregister needs a truth DSM (--truth) to co-register to", files["dsm"])
    return inputs


def _read_dsm(dsm: str | os.PathLike, grid: Grid, upsampling: str) -> np.ndarray:
    """Prepare, step 2: the DSM on the grid (read as is when the grid is its own)."""
    with open_raster(dsm) as src:
        same_grid = horizontal_crs(src.crs) == grid.crs and src.transform == grid.transform and src.shape == grid.shape
    if same_grid:
        dsm_data, _ = read_source(dsm, "dsm")
    else:
        dsm_data = align_to_grid(dsm, grid, "dsm", upsampling=upsampling)
    if not np.isfinite(dsm_data).any():
        raise InputError("DSM has no valid pixel (every value is nodata)", dsm)
    return dsm_data


def _align_inputs(inputs: dict[str, Path], grid: Grid, upsampling: str, image_band: int | None,
                  ndvi_bands: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """Prepare, step 3: every input but the DSM aligned onto the grid, by band."""
    bands: dict[str, np.ndarray] = {}
    for band, path in inputs.items():
        if band == "dsm":
            continue
        kwargs: dict = {"upsampling": upsampling}
        if band in ("ortho_left", "ortho_right"):
            kwargs.update(indexes=[image_band] if image_band else None, reduce="mean")
        if band == "ndvi" and ndvi_bands is not None:
            kwargs.update(indexes=list(ndvi_bands), reduce="ndvi")
        if band == "ndvi" and ndvi_bands is None:
            with open_raster(path) as src:
                if src.count != 1:
                    raise InputError(f"NDVI raster has {src.count} bands: pass --ndvi-bands NIR,RED "
                                     "(1-based, e.g. 1,2 for an IRC orthophoto)", path)
        bands[band] = align_to_grid(path, grid, band, **kwargs)
    return bands


def _ndvi_in_range(ndvi_values: np.ndarray, source: Path) -> np.ndarray:
    """Prepare, step 4: the NDVI refused if mostly outside [-1, 1] (not NDVI), its stray values nodata."""
    finite = np.isfinite(ndvi_values)
    inside = finite & (np.abs(np.where(finite, ndvi_values, 0)) <= 1.0)
    if finite.any() and inside.sum() < 0.5 * finite.sum():
        raise InputError(f"NDVI values are outside [-1, 1] (range {np.nanmin(ndvi_values):.4g} to "
                         f"{np.nanmax(ndvi_values):.4g}): scaled NDVI or not an NDVI raster "
                         "(for a red/NIR image pass --ndvi-bands NIR,RED)", source)
    return np.where(inside, ndvi_values, np.nan).astype(np.float32)


def _coregister(bands: dict[str, np.ndarray], grid: Grid, dsm: str | os.PathLike, max_ndvi: float,
                max_slope: float, max_shift_px: float) -> dict:
    """Prepare, step 5: the DSM and its geometry's bands shifted onto the truth in ``bands``; returns the record."""
    from .coregister import apply_shift, coregister_arrays, stable_ground

    stable = stable_ground(bands["truth_dsm"], grid.resolution, bands.get("ndvi"),
                           max_ndvi=max_ndvi, max_slope=max_slope)
    try:
        result = coregister_arrays(bands["truth_dsm"], bands["dsm"], grid.transform, grid.crs, stable)
    except InputError as exc:
        raise InputError(f"cannot co-register the DSM to the truth: {exc}", dsm) from None
    record = result.to_json() | {
        "stable_ground": {"max_ndvi": max_ndvi, "min_ndvi": 0.0, "max_slope_deg": max_slope},
    }
    shift_px = float(np.hypot(result.shift_x_px, result.shift_y_px))
    if not result.nmad_after < result.nmad_before or shift_px > max_shift_px:
        # Nuth & Kääb can diverge on too little or too flat stable ground; a shift that does
        # not improve the fit (or is implausibly large) is reported, not applied.
        record |= {"applied_to": [], "not_applied": f"shift {shift_px:.2f} px, NMAD {result.nmad_before:.3f} -> "
                   f"{result.nmad_after:.3f} m (limit {max_shift_px} px, NMAD must decrease)"}
        log.warning("co-registration NOT applied: %s", record["not_applied"])
    else:
        bands["dsm"] = apply_shift(bands["dsm"], grid.transform, grid.crs, result, heights=True)
        # The orthos and the error map were made with the DSM's geometry: they move with it.
        for band in ("ortho_left", "ortho_right", "triangulation_error"):
            bands[band] = apply_shift(bands[band], grid.transform, grid.crs, result)
        record["applied_to"] = ["dsm", "ortho_left", "ortho_right", "triangulation_error"]
        log.info("co-registered the DSM to the truth: %s", result.summary())
    return record


def _pixel_size(grid: Grid) -> tuple[float, float]:
    return abs(grid.resolution[0]), abs(grid.resolution[1])


def _parallax_shift(bands: dict[str, np.ndarray], grid: Grid) -> dict:
    """The orthos' shift (the :data:`deepdem.scene.PARALLAX_SHIFTS` bands), from which train
    and refine derive the parallax band with the pair's geometry when its angles are unknown."""
    from .parallax import shift_between

    log.info("measuring the orthos' residual parallax (the views' angles are unknown: give --views "
             "to have it in metres of DSM error)")
    bands["parallax_shift_x"], bands["parallax_shift_y"] = shift_between(
        bands["ortho_left"], bands["ortho_right"], _pixel_size(grid))
    return {"views": None,
            "method": "deepdem.parallax: Lucas-Kanade optical flow between the orthos; the pair's geometry is "
                      "fitted on the training scenes' truth by train, and recorded in the checkpoint for refine"}


def _parallax(bands: dict[str, np.ndarray], grid: Grid, views) -> tuple[np.ndarray, dict]:
    """The parallax band from the aligned (co-registered, not yet equalised) orthos."""
    from .parallax import height_error_from_parallax
    from .synth import View

    if len(views) != 2 or not all(isinstance(v, View) or len(v) == 2 for v in views):
        raise InputError(f"views: two (azimuth, off-nadir) pairs expected, got {views!r}")
    views = tuple(v if isinstance(v, View) else View(*map(float, v)) for v in views)
    log.info("measuring the orthos' residual parallax (views %s, %s)", *views)
    height_error = height_error_from_parallax(bands["ortho_left"], bands["ortho_right"], views,
                                              _pixel_size(grid))
    record = {"views": [{"azimuth": v.azimuth, "off_nadir": v.off_nadir} for v in views],
              "method": "deepdem.parallax: Lucas-Kanade optical flow between the orthos, along the views' parallax"}
    return height_error, record


def prepare_from_asp_prefix(
    prefix: str | os.PathLike,
    out: str | os.PathLike,
    truth: str | os.PathLike | None = None,
    truth_dtm: str | os.PathLike | None = None,
    **overrides,
) -> Scene:
    """Prepare a Scene from an ASP run prefix (see :data:`ASP_PATTERNS`).

    ``overrides`` are :func:`prepare_scene` arguments; a file given there (``dsm``,
    ``ortho_left``, ...) replaces the discovered one, and a required file given there need not
    exist under the prefix.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    found = discover_asp_inputs(prefix, required=tuple(b for b in REQUIRED_ASP if b not in given))
    files = {**found, **{k: v for k, v in given.items() if k in ASP_PATTERNS}}
    options = {k: v for k, v in given.items() if k not in ASP_PATTERNS}
    return prepare_scene(out=out, truth=truth, truth_dtm=truth_dtm, **files, **options)


def prepare_from_asp_dir(directory: str | os.PathLike, out: str | os.PathLike, with_truth: bool = True) -> Scene:
    """Prepare a scene from a directory written by ``deepdem synth`` (ASP file names), with the
    views its ``synth.json`` records."""
    from .synth import ASP_FILES

    directory = Path(directory)
    record = directory / "synth.json"
    views = None
    if record.exists():
        views = [(v["azimuth"], v["off_nadir"]) for v in json.loads(record.read_text())["config"]["views"]]
    return prepare_from_asp_prefix(
        directory / ASP_FILES["dsm"][: -len("-DEM.tif")], out,
        truth=directory / ASP_FILES["truth_dsm"] if with_truth else None,
        truth_dtm=directory / ASP_FILES["truth_dtm"] if with_truth else None,
        views=views,
    )


def resample_scene(scene: Scene, pixel_size_m: float, out: str | os.PathLike,
                   bands: Iterable[str] | None = None) -> Scene:
    """The scene on a grid of ``pixel_size_m`` metres over the same extent, written at ``out``.

    For a model trained at another pixel size than the scene's (:func:`deepdem.refine.refine`
    does this by itself). Each band is aligned as ``prepare`` aligns an input
    (:func:`deepdem.align.align_to_grid`: bilinear onto a finer grid, averaged onto a much
    coarser one, nearest for the nodata mask), and the mask is cleared, as everywhere, where a
    band has no data. ``bands`` (default: every input band) chooses what to carry. Holds the
    resampled bands in memory, like ``prepare``.
    """
    source_size = scene.grid.pixel_size_m
    if source_size is None:
        raise InputError("the scene's grid has no pixel size in metres (no CRS, or a geographic one)", scene.path)
    if not pixel_size_m > 0:
        raise InputError(f"pixel size must be > 0 m, got {pixel_size_m}", scene.path)
    t = scene.transform
    grid = Grid.from_bounds(scene.grid.bounds, pixel_size_m * scene.grid.res / source_size, scene.crs,
                            anchor=(t.c, t.f))
    # a derived band (parallax from the orthos' shift) travels as what it is derived from
    stored = dict.fromkeys(source for name in (bands or INPUT_BANDS) if scene.has(name) for source in scene.sources(name))
    # the orthos' correlation is remade from the resampled orthos: a window of as many pixels as
    # prepare's, which is what a model trained at this pixel size read
    remade = "ortho_correlation" in stored and scene.has("ortho_left") and scene.has("ortho_right")
    arrays = {name: align_to_grid(scene.band_path(name), grid, name) for name in stored
              if not (remade and name == "ortho_correlation")}
    if remade:
        from .parallax import local_correlation

        orthos = [arrays[b] if b in arrays else align_to_grid(scene.band_path(b), grid, b) for b in ("ortho_left", "ortho_right")]
        arrays["ortho_correlation"] = local_correlation(*orthos)
    if "nodata_mask" in arrays:
        arrays["nodata_mask"] = ((np.nan_to_num(arrays["nodata_mask"]) > 0) & nodata_mask(arrays)).astype(np.uint8)
    return write_scene(out, grid, arrays, provenance={"resampled_from": str(scene.path.resolve()),
                                                      "pixel_size_m": pixel_size_m})
