"""The Scene contract: an aligned stack of single-band GeoTIFFs plus a ``scene.json`` manifest.

Every stage after ``prepare`` reads scenes and nothing else, so this module is the one place
that knows the band names, their kinds, their nodata convention and how the DSM's global scale
factors are computed.

A scene directory looks like::

    scene/
      scene.json            grid (CRS WKT, transform, shape), bands, statistics, scale factors
      dsm.tif               initial (stereo) DSM, metres, float32, nodata -9999
      ortho_left.tif        equalised image in [0, 1], float32, nodata -9999
      ortho_right.tif
      triangulation_error.tif   metres
      ndvi.tif              [-1, 1]
      parallax.tif          metres the DSM is too high, from the orthos' residual parallax
                            (when the views' geometry is known)
      ortho_correlation.tif [-1, 1], the orthos' local correlation: low where the DSM is wrong
      nodata_mask.tif       uint8, 1 where every input band is valid, 0 elsewhere
      truth_dsm.tif         optional targets, metres
      truth_dtm.tif
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from . import __version__
from .errors import InputError
from .grid import Grid
from .io import atomic_directory, invalid_mask, write_raster
from .parallax import PARALLAX_SHIFTS, height_error_from_shift

SCENE_FORMAT = "deepdem-scene"
SCENE_VERSION = 1
MANIFEST = "scene.json"
FLOAT_NODATA = -9999.0
CHIP_SIZES = (64, 128, 256, 512, 1024)
#: Pixel sizes within this factor of each other count as the same one (refine then uses the
#: scene as it is). A margin, not a measured threshold: the measured case is 1 m against a
#: model trained at 0.5 m, where refining at 0.5 m lowered the MAE (see docs/refine.md).
PIXEL_SIZE_TOLERANCE = 1.2


@dataclass(frozen=True)
class BandSpec:
    """What a band is: its physical kind decides resampling, fill value and normalisation."""

    name: str
    kind: str  # "height", "image", "error", "index", "mask"
    description: str
    resampling: str  # rasterio Resampling name used when aligning inputs onto the grid
    fill: float  # value the model sees where the band has no data

    @property
    def dtype(self) -> str:
        return "uint8" if self.kind == "mask" else "float32"

    @property
    def nodata(self) -> float | None:
        return None if self.kind == "mask" else FLOAT_NODATA

    @property
    def predictor(self) -> int:
        """TIFF predictor on disk: horizontal differencing for the mask's integers, none for
        equalised images, the floating-point predictor for smooth fields. On equalised images
        (IGN orthophoto, generated scenes) the floating-point predictor made files 10 % larger
        and decoded 1.5x slower; on DSMs it makes them 15-25 % smaller."""
        return {"mask": 2, "image": 1}.get(self.kind, 3)


BANDS: dict[str, BandSpec] = {
    spec.name: spec
    for spec in (
        BandSpec("dsm", "height", "initial stereo DSM (m)", "bilinear", 0.0),
        BandSpec("ortho_left", "image", "left orthoimage, equalised [0, 1]", "bilinear", 0.0),
        BandSpec("ortho_right", "image", "right orthoimage, equalised [0, 1]", "bilinear", 0.0),
        BandSpec("triangulation_error", "error", "stereo triangulation error (m)", "bilinear", -1.0),
        BandSpec("ndvi", "index", "NDVI [-1, 1]", "bilinear", 0.0),
        BandSpec("parallax", "height error", "DSM error seen as parallax between the orthos (m)", "bilinear", 0.0),
        BandSpec("ortho_correlation", "index", "local correlation of the two equalised orthos (5 x 5 px) [-1, 1]",
                 "bilinear", 0.0),
        BandSpec("parallax_shift_x", "shift", "shift carrying the right ortho onto the left, along columns (m)",
                 "bilinear", 0.0),
        BandSpec("parallax_shift_y", "shift", "shift carrying the right ortho onto the left, along rows (m)",
                 "bilinear", 0.0),
        BandSpec("nodata_mask", "mask", "1 where every input band is valid", "nearest", 0.0),
        BandSpec("truth_dsm", "height", "reference (LIDAR) DSM (m)", "bilinear", 0.0),
        BandSpec("truth_dtm", "height", "reference (LIDAR) DTM (m)", "bilinear", 0.0),
    )
}
INPUT_BANDS = ("dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "parallax", "ortho_correlation",
               "nodata_mask")
TARGET_BANDS = ("truth_dsm", "truth_dtm")
#: How a scene gets an input band that prepare makes only in some cases, for the messages of
#: train (which leaves the band out) and refine (which refuses the scene).
BAND_HINTS = {
    "parallax": "prepare the scene with --views (or with both orthos and a truth DSM) for the parallax band",
    "ortho_correlation": "prepare it again with this version, for ortho_correlation (both orthos needed)",
}


def missing_band_hints(missing: Iterable[str]) -> str:
    """'; '-joined :data:`BAND_HINTS` of the bands in ``missing`` ('' when none has one)."""
    missing = set(missing)
    return "; ".join(hint for band, hint in BAND_HINTS.items() if band in missing)


def band_statistics(data: np.ndarray, valid: np.ndarray) -> dict:
    """Summary statistics of the valid pixels of one band (JSON-ready floats)."""
    values = data[valid].astype(np.float64)
    stats = {"valid_fraction": float(valid.mean()) if valid.size else 0.0, "count": int(values.size)}
    if values.size:
        p2, p50, p98 = np.percentile(values, [2, 50, 98])
        stats.update(
            min=float(values.min()), max=float(values.max()), mean=float(values.mean()),
            std=float(values.std()), p2=float(p2), median=float(p50), p98=float(p98),
        )
    return stats


def _box_sums(image: np.ndarray, size: int) -> np.ndarray:
    """Sum over every ``size``×``size`` window (top-left indexed) through a summed-area table."""
    table = np.zeros((image.shape[0] + 1, image.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(image, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


def chip_std_samples(
    dsm: np.ndarray,
    valid: np.ndarray,
    chip_size: int,
    n_chips: int = 5000,
    min_valid_fraction: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Std of the valid DSM (after removing the chip's valid mean) in random chips.

    Summed-area tables give every chip's valid count, sum and sum of squares in O(1), so 5,000
    chips cost one pass over the raster instead of 5,000 reads. Chips with less than
    ``min_valid_fraction`` valid pixels are not drawn.
    """
    height, width = dsm.shape
    if chip_size > height or chip_size > width:
        return np.empty(0)
    offset = float(np.mean(dsm[valid])) if valid.any() else 0.0  # keeps the squares small
    centred = np.where(valid, dsm.astype(np.float64) - offset, 0.0)
    count = _box_sums(valid.astype(np.float64), chip_size)
    total = _box_sums(centred, chip_size)
    total_sq = _box_sums(centred * centred, chip_size)
    candidates = np.flatnonzero(count.ravel() >= min_valid_fraction * chip_size * chip_size)
    if candidates.size == 0:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    picks = rng.choice(candidates, size=n_chips, replace=True)
    n = count.ravel()[picks]
    mean = total.ravel()[picks] / n
    var = np.maximum(total_sq.ravel()[picks] / n - mean * mean, 0.0)
    return np.sqrt(var)


def global_scale_factor(stds: np.ndarray) -> float | None:
    """Mean of the per-chip stds between their 5th and 95th percentiles (DeepDEM's GSF)."""
    if stds.size == 0:
        return None
    lo, hi = np.percentile(stds, [5, 95])
    kept = stds[(stds >= lo) & (stds <= hi)]
    value = float(kept.mean()) if kept.size else float(stds.mean())
    # A perfectly flat DSM has no spread; 1 m keeps the normalisation finite and in metres.
    return value if value > 1e-6 else 1.0


def compute_scale_factors(
    dsm: np.ndarray,
    valid: np.ndarray,
    chip_sizes: Iterable[int] = CHIP_SIZES,
    n_chips: int = 5000,
    seed: int = 0,
) -> dict[int, float]:
    """Global scale factor per chip size; chip sizes larger than the DSM are left out."""
    factors = {}
    for size in chip_sizes:
        value = global_scale_factor(chip_std_samples(dsm, valid, size, n_chips, seed=seed))
        if value is not None:
            factors[int(size)] = value
    return factors


class Scene:
    """An opened scene directory: its grid, bands, statistics and scale factors.

    >>> scene = Scene.open("scenes/train")             # doctest: +SKIP
    >>> dsm = scene.read("dsm")                        # float32, NaN where no data
    >>> scene.scale_factor(256)
    """

    def __init__(self, path: Path, manifest: dict, parallax_geometry: Sequence[float] | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.grid = Grid.from_json(manifest["grid"])
        #: the pair's shift per metre of DSM error from which the parallax band is derived, when
        #: the scene stores the orthos' shift instead of the band (its views were not given)
        self.parallax_geometry = None if parallax_geometry is None else tuple(map(float, parallax_geometry))

    def with_parallax_geometry(self, shift_per_metre: Sequence[float]) -> "Scene":
        """This scene with a ``parallax`` band derived from the orthos' shift (the
        :data:`PARALLAX_SHIFTS` bands that ``prepare`` stores when the views' angles are not
        given) and the pair's geometry: metres of shift along columns and rows per metre of DSM
        error (:func:`deepdem.parallax.shift_per_metre`). A scene that stores the band keeps it."""
        if "parallax" in self.manifest["bands"]:
            return self
        missing = [b for b in PARALLAX_SHIFTS if b not in self.manifest["bands"]]
        if missing:
            raise InputError(f"no parallax band can be derived: the scene lacks {', '.join(missing)} "
                             "(prepare it with both orthos)", self.path)
        if len(shift_per_metre) != 2 or not np.all(np.isfinite(shift_per_metre)):
            raise InputError(f"the pair's shift per metre of DSM error must be two finite numbers, got {shift_per_metre!r}")
        return Scene(self.path, self.manifest, shift_per_metre)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Scene":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise InputError("scene directory not found", path)
        if not manifest_path.exists():
            raise InputError(f"not a scene: no {MANIFEST} (build one with 'deepdem prepare')", path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"unreadable manifest ({exc})", manifest_path) from None
        if manifest.get("format") != SCENE_FORMAT:
            raise InputError(f"not a deepdem scene manifest (format={manifest.get('format')!r})", manifest_path)
        scene = cls(path, manifest)
        for name in scene.bands:
            if not scene.band_path(name).exists():
                raise InputError(f"band '{name}' listed in {MANIFEST} is missing", scene.band_path(name))
        return scene

    # -- description ---------------------------------------------------------------------
    @property
    def bands(self) -> list[str]:
        return list(self.manifest["bands"])

    @property
    def crs(self) -> CRS:
        return self.grid.crs

    @property
    def transform(self) -> Affine:
        return self.grid.transform

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def scale_factors(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in self.manifest.get("scale_factors", {}).items()}

    def scale_factor(self, chip_size: int) -> float:
        factors = self.scale_factors
        if chip_size not in factors:
            fitting = [s for s in factors if s <= min(self.shape)]
            raise InputError(
                f"no scale factor for chip size {chip_size} (scene is {self.shape[0]}x{self.shape[1]} px; "
                f"largest chip size that fits: {max(fitting) if fitting else 'none'})",
                self.path,
            )
        return factors[chip_size]

    def statistics(self, band: str) -> dict:
        return self.manifest["bands"][band].get("stats", {})

    def has(self, band: str) -> bool:
        return band in self.manifest["bands"] or (band == "parallax" and self.parallax_geometry is not None)

    @property
    def stores_parallax_shift(self) -> bool:
        """Whether the scene stores the orthos' shift instead of the parallax band (its views'
        angles were not given): :meth:`with_parallax_geometry` derives the band."""
        return "parallax" not in self.manifest["bands"] and all(b in self.manifest["bands"] for b in PARALLAX_SHIFTS)

    def sources(self, band: str) -> list[str]:
        """The stored bands that ``band`` is read from: itself, or the shifts of a derived parallax band."""
        if band == "parallax" and "parallax" not in self.manifest["bands"] and self.parallax_geometry is not None:
            return list(PARALLAX_SHIFTS)
        return [band]

    def band_path(self, band: str) -> Path:
        if band not in self.manifest["bands"]:
            raise InputError(f"scene has no band '{band}' (it has: {', '.join(self.bands)})", self.path)
        return self.path / self.manifest["bands"][band]["file"]

    def nodata(self, band: str) -> float | None:
        return self.manifest["bands"][band].get("nodata")

    # -- reading -------------------------------------------------------------------------
    def read(self, band: str, window: Window | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Read a band (or a window of it) as float32 with NaN where it has no data.

        The mask band is returned as 0/1 float32 with no NaNs. ``out``, a float32 array of the
        window's shape, receives the values instead of a new array (refine reads each band
        straight into its input buffer: a fresh array costs its page faults on every block).
        """
        if out is not None and out.dtype != np.float32:
            raise ValueError(f"out must be float32, got {out.dtype}")
        if self.sources(band) == list(PARALLAX_SHIFTS):
            derived = height_error_from_shift(*(self.read(b, window) for b in PARALLAX_SHIFTS), self.parallax_geometry)
            if out is None:
                return derived
            if out.shape != derived.shape:
                raise ValueError(f"{self.path}: out has shape {out.shape}, the window {derived.shape}")
            np.copyto(out, derived)
            return out
        with rasterio.open(self.band_path(band)) as src:
            # Boundless reads go through a VRT (~1.6x slower): only for windows that leave the raster.
            outside = window is not None and (
                window.col_off < 0 or window.row_off < 0
                or window.col_off + window.width > src.width or window.row_off + window.height > src.height)
            if out is None:
                data = src.read(1, window=window, boundless=outside, fill_value=src.nodata or 0)
            else:
                expected = src.shape if window is None else (int(window.height), int(window.width))
                if out.shape != expected:  # rasterio would resample the band to fit ``out``
                    raise ValueError(f"{src.name}: out has shape {out.shape}, the window {expected}")
                # A 3-D view: given a 2-D ``out``, rasterio reshapes the caller's array in place.
                src.read([1], window=window, boundless=outside, fill_value=src.nodata or 0,
                         out=out[np.newaxis], out_dtype=np.float32)
                data = out
            nodata = src.nodata
        if BANDS.get(band, BANDS["dsm"]).kind == "mask":
            return data if data.dtype == np.float32 else data.astype(np.float32)
        data = data.astype(np.float32, copy=False)  # out, or a fresh array from rasterio: no copy
        invalid = invalid_mask(data, nodata)
        if invalid.any():
            np.putmask(data, invalid, np.float32(np.nan))
        return data

    def read_stack(self, bands: Iterable[str], window: Window | None = None) -> dict[str, np.ndarray]:
        return {band: self.read(band, window) for band in bands}

    def __repr__(self) -> str:
        h, w = self.shape
        return f"Scene({str(self.path)!r}, {h}x{w} px, bands={self.bands})"


def nodata_mask(bands: Mapping[str, np.ndarray]) -> np.ndarray:
    """The Scene's mask rule: True where every input band present (NaN = no data) has a value."""
    present = [bands[name] for name in INPUT_BANDS if name in bands and name != "nodata_mask"]
    mask = np.ones(present[0].shape, dtype=bool)
    for values in present:
        mask &= np.isfinite(values)
    return mask


def write_scene(
    out: str | os.PathLike,
    grid: Grid,
    bands: Mapping[str, np.ndarray],
    provenance: Mapping | None = None,
    n_chips: int = 5000,
    seed: int = 0,
) -> Scene:
    """Write arrays (NaN = no data) as a scene directory, atomically.

    ``nodata_mask`` is derived here (valid in every input band present) unless given, so the
    contract "mask = valid in every input" cannot drift between callers.
    """
    unknown = set(bands) - set(BANDS)
    if unknown:
        raise ValueError(f"unknown band(s): {sorted(unknown)}")
    if "dsm" not in bands:
        raise ValueError("a scene needs a 'dsm' band")
    arrays = {name: np.asarray(bands[name]) for name in BANDS if name in bands}
    for name, array in arrays.items():
        if array.shape != grid.shape:
            raise ValueError(f"band {name} has shape {array.shape}, grid is {grid.shape}")
    if "nodata_mask" not in arrays:
        arrays["nodata_mask"] = nodata_mask(arrays).astype(np.uint8)

    manifest_bands = {}
    dsm = arrays["dsm"].astype(np.float32)
    dsm_valid = np.isfinite(dsm)
    with atomic_directory(out) as tmp:
        for name, array in arrays.items():
            spec = BANDS[name]
            if spec.kind == "mask":
                data = (np.asarray(array) > 0).astype(np.uint8)
                valid = np.ones(grid.shape, dtype=bool)
            else:
                valid = np.isfinite(array)
                data = np.where(valid, array, spec.nodata).astype(np.float32)
            # Tiled, compressed, with internal overviews (averaged for continuous bands, nearest
            # for masks) so that every band opens quickly in QGIS/GDAL.
            write_raster(tmp / f"{name}.tif", data, grid.transform, grid.crs, spec.nodata, spec.description,
                         predictor=spec.predictor, overviews=True, overview_resampling="nearest" if spec.kind == "mask" else "average")
            manifest_bands[name] = {
                "file": f"{name}.tif",
                "kind": spec.kind,
                "dtype": spec.dtype,
                "nodata": spec.nodata,
                "description": spec.description,
                "stats": band_statistics(data, valid),
            }
        factors = compute_scale_factors(dsm, dsm_valid, n_chips=n_chips, seed=seed)
        manifest = {
            "format": SCENE_FORMAT,
            "version": SCENE_VERSION,
            "grid": grid.to_json(),
            "bands": manifest_bands,
            "scale_factors": {str(k): v for k, v in factors.items()},
            "scale_factor_method": {
                "n_chips": n_chips,
                "seed": seed,
                "statistic": "mean over random chips (>=50% valid) of the std of the valid DSM "
                "minus its chip mean, chips between the 5th and 95th percentile of that std",
            },
            "provenance": {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "deepdem_version": __version__,
                **(dict(provenance) if provenance else {}),
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Scene.open(out)
