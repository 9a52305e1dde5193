"""The height error that the two orthoimages still see: residual parallax, in metres.

ASP mapprojects both images through the initial DSM. Where that DSM is right, the two orthos
coincide; where it is wrong by ``dz``, each ortho is displaced by ``−dz·tan(off-nadir)`` along
its satellite's azimuth, so the pair shows a parallax of ``dz·(d_left − d_right)``. Matching the
two orthos again and dividing that parallax by the views' relative displacement per metre
measures ``dz`` directly: this is ASP's own second pass (stereo on mapprojected images) reduced
to a per-pixel estimate the network can read. A network that must discover the correlation
between two image channels on its own needs far more data than one scene offers.

The parallax is measured with scikit-image's iterative Lucas-Kanade optical flow (coarse to fine,
so displacements of several pixels are found) on images normalised to zero mean and unit
variance in a 15 × 15 window, which removes the gain and offset between the two acquisitions.
The estimate is a scalar in metres: it does not change when a chip is flipped or rotated, or
when the two images are swapped.

Where the views' angles are not given, ``prepare`` stores the measured shift itself (two bands,
metres along columns and rows); ``train`` fits the pair's geometry on each training scene's truth
(:func:`fit_shift_per_metre`), and the checkpoint carries it to ``refine``, which reads a scene
of unknown angles as if taken by a pair like the training one.

Where the DSM is wrong by more than that flow can follow (an occlusion one view cannot see, a
blunder a pixel or two wide, which is what a semi-global matcher leaves), the orthos simply
disagree. :func:`local_correlation` measures that, pixel by pixel, for the ``ortho_correlation``
band.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from scipy import ndimage

from .errors import InputError

#: The bands in which ``prepare`` stores the shift between the orthos where the views' angles are
#: unknown (metres along columns and along rows; :func:`shift_between`).
PARALLAX_SHIFTS = ("parallax_shift_x", "parallax_shift_y")


class View(Protocol):
    """A satellite view, as :class:`deepdem.synth.View`: (dx, dy) of ground displacement per
    metre of height error, from the satellite's azimuth and off-nadir angle (degrees)."""

    azimuth: float
    off_nadir: float

    def displacement_per_metre(self) -> tuple[float, float]: ...

#: Half-width (px) of the window in which each ortho is normalised to zero mean and unit variance.
NORMALISATION_RADIUS = 7
#: Half-width (px) of Lucas-Kanade's Gaussian window. On two of the benchmark's LIDAR sites with
#: modelled errors, 3 gave correlations with the true error of 0.54 and 0.77; 2 gave 0.53 and
#: 0.76, and 5 gave 0.50 and 0.78.
FLOW_RADIUS = 3
#: The flow is measured in blocks of this many pixels a side, each read with MARGIN more on every
#: side, so that a 10 km scene needs the memory of one block, not of the whole
#: scene. A block took 29 s on 2 CPU cores (7 s per million pixels), the process under 1 GB.
BLOCK, MARGIN = 2048, 64
#: Half-width (px) of the window in which :func:`local_correlation` compares the orthos.
CORRELATION_RADIUS = 2
#: A pair whose shift per metre of height is shorter than this sees too little parallax to measure height.
MIN_BASE_TO_HEIGHT = 0.05
#: Pixels needed to fit a pair's geometry where its angles are unknown.
MIN_FIT_PIXELS = 1000
#: Below this correlation with the DSM's error, the orthos' shift is taken for noise, not parallax.
MIN_FIT_CORRELATION = 0.1


def shift_per_metre(views: tuple[View, View]) -> np.ndarray:
    """(along columns, along rows): metres of shift between the orthos per metre of DSM error,
    from the views' angles (dimensionless; its length is the pair's base-to-height ratio)."""
    for view in views:
        if not (math.isfinite(view.azimuth) and 0.0 <= view.off_nadir < 60.0):
            raise InputError(f"view azimuth {view.azimuth}, off-nadir {view.off_nadir}: the off-nadir angle "
                             "must be in [0, 60) degrees")
    (lx, ly), (rx, ry) = (v.displacement_per_metre() for v in views)
    # An ortho through a DSM too high by dz samples the ground at (col − dz·dx, row + dz·dy):
    # rows grow southwards.
    relative = np.array([rx - lx, ly - ry])
    if float(np.hypot(*relative)) < MIN_BASE_TO_HEIGHT:
        raise InputError(f"views {views[0]} and {views[1]} have a base-to-height ratio below {MIN_BASE_TO_HEIGHT}: "
                         "their parallax says nothing about height")
    return relative


def fit_shift_per_metre(shift_x: np.ndarray, shift_y: np.ndarray, height_error: np.ndarray) -> np.ndarray:
    """A pair's geometry as :func:`shift_per_metre` gives it, fitted where the DSM's error is
    known (``height_error`` = DSM − truth; NaN where unknown): for a pair whose angles were not
    given.

    Two steps, each a regression with an intercept (a vertical offset of the whole DSM shows no
    parallax). The direction is the shifts' covariance with the error: the flow's noise is
    correlated between its two components (along edges it cannot tell them apart), so
    regressing the error on both shifts at once gave directions 72° apart on two generated scenes
    of one pair, and a band that transferred worse between them. The length is that of the
    regression of the error on the shift along that direction, so that the derived band is the
    best linear estimate of the error: a noisy shift is shrunk towards zero (on two generated
    scenes the fitted vector came out 1.3–1.4× as long as the views'). Raises
    :class:`InputError` when the orthos show no parallax that follows the DSM's error
    (correlation below :data:`MIN_FIT_CORRELATION`).
    """
    ok = np.isfinite(shift_x) & np.isfinite(shift_y) & np.isfinite(height_error)
    if ok.sum() < MIN_FIT_PIXELS:
        raise InputError(f"{int(ok.sum())} pixels where both the parallax and the DSM's error are known: "
                         f"at least {MIN_FIT_PIXELS} are needed to fit the pair's geometry")
    dz = height_error[ok].astype(np.float64)
    shifts = np.stack([shift_x[ok], shift_y[ok]]).astype(np.float64)
    dz -= dz.mean()
    shifts -= shifts.mean(axis=1, keepdims=True)
    direction = shifts @ dz
    if not np.any(direction):
        raise InputError("the orthos' parallax does not follow the DSM's error (no covariance)")
    direction /= np.hypot(*direction)
    along = direction @ shifts
    correlation = float(along @ dz / np.sqrt((along @ along) * (dz @ dz)))
    if not correlation >= MIN_FIT_CORRELATION:
        raise InputError(f"the orthos' parallax does not follow the DSM's error (correlation {correlation:.2f}, "
                         f"below {MIN_FIT_CORRELATION})")
    metres_per_shift = float(along @ dz / (along @ along))
    # the band is shift · v / |v|², so v along the direction has length 1 / metres_per_shift
    return direction / metres_per_shift


def height_error_from_shift(shift_x: np.ndarray, shift_y: np.ndarray, per_metre) -> np.ndarray:
    """Metres the DSM is too high (float32), from the shift between the orthos (metres along
    columns and rows, :func:`shift_between`) and the pair's shift per metre of error."""
    per_metre = np.asarray(per_metre, dtype=np.float64)
    norm = float(per_metre @ per_metre)
    return (shift_x * (per_metre[0] / norm) + shift_y * (per_metre[1] / norm)).astype(np.float32)


def _locally_normalised(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    filled = np.where(valid, image, np.mean(image[valid])).astype(np.float64)
    size = 2 * NORMALISATION_RADIUS + 1
    mean = ndimage.uniform_filter(filled, size)
    variance = np.maximum(ndimage.uniform_filter(filled * filled, size) - mean * mean, 0.0)
    # The floor keeps flat, textureless patches (water, shadows) at zero rather than amplified noise.
    return (filled - mean) / np.sqrt(variance + 1e-3 * np.var(filled[valid]))


def _blocks(shape: tuple[int, int], block: int, margin: int, desc: str, progress: bool | None):
    """(window, inner, target) for each ``block``-sized square of a raster of ``shape``: the
    block read with ``margin`` more pixels on every side, where the block lies inside that
    window, and where it lies in the raster. ``progress``: a bar over the blocks (default: on a
    terminal, when there is more than one)."""
    import sys

    from tqdm.auto import tqdm

    height, width = shape
    corners = [(row, col) for row in range(0, height, block) for col in range(0, width, block)]
    if progress is None:
        progress = sys.stderr.isatty() and len(corners) > 1
    for row, col in tqdm(corners, desc=desc, unit="block", disable=not progress, leave=False):
        r0, c0 = max(row - margin, 0), max(col - margin, 0)
        r1, c1 = min(row + block + margin, height), min(col + block + margin, width)
        window = (slice(r0, r1), slice(c0, c1))
        inner = (slice(row - r0, min(row + block, height) - r0), slice(col - c0, min(col + block, width) - c0))
        yield window, inner, (slice(row, row + block), slice(col, col + block))


def shift_between(left: np.ndarray, right: np.ndarray, resolution: float | tuple[float, float],
                  block: int = BLOCK, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shift (metres along columns, along rows; float32) that carries the right ortho onto
    the left at every pixel; NaN where either ortho has no data. ``resolution``: the pixel size
    (m), or its (column, row) sizes; ``block``: see :data:`BLOCK`; ``progress``: a bar over the
    blocks (default: on a terminal, when there is more than one)."""
    from skimage.registration import optical_flow_ilk

    if left.shape != right.shape:
        raise InputError(f"orthos of different shapes {left.shape} and {right.shape}")
    size_x, size_y = (resolution, resolution) if np.isscalar(resolution) else resolution
    valid = np.isfinite(left) & np.isfinite(right)
    shift_x = np.full(left.shape, np.nan, dtype=np.float32)
    shift_y = np.full(left.shape, np.nan, dtype=np.float32)
    for window, inner, target in _blocks(left.shape, block, MARGIN, "parallax", progress):
        ok = valid[window]
        if ok.sum() < 16:
            continue
        # The flow that warps the right ortho onto the left: (rows, columns).
        flow_rows, flow_cols = optical_flow_ilk(_locally_normalised(left[window], ok),
                                                _locally_normalised(right[window], ok),
                                                radius=FLOW_RADIUS, gaussian=True)
        shift_x[target] = np.where(ok, flow_cols * size_x, np.nan)[inner]
        shift_y[target] = np.where(ok, flow_rows * size_y, np.nan)[inner]
    return shift_x, shift_y


def local_correlation(left: np.ndarray, right: np.ndarray, radius: int = CORRELATION_RADIUS, block: int = BLOCK,
                      progress: bool | None = None) -> np.ndarray:
    """The zero-mean normalised cross-correlation of the two orthos in a (2·radius + 1)² window
    around every pixel (float32 in [−1, 1]); NaN where either ortho has no data.

    Near 1 where the orthos show the same ground, so where the DSM they were mapprojected through
    is right; low where it is wrong by more than the flow behind :func:`shift_between` can
    follow, and in occlusions that one view cannot see. Textureless patches (water, shadow) sit
    near 0: a variance floor of 1e-3 of each ortho's variance keeps their noise from reading as
    agreement. ``block``, ``progress``: as for :func:`shift_between`.
    """
    if left.shape != right.shape:
        raise InputError(f"orthos of different shapes {left.shape} and {right.shape}")
    valid = np.isfinite(left) & np.isfinite(right)
    correlation = np.full(left.shape, np.nan, dtype=np.float32)
    if not valid.any():
        return correlation
    size = 2 * radius + 1
    # each ortho's variance over the scene, from a sample (a 10 km scene has 4e8 pixels)
    step = max(1, int(math.sqrt(valid.size / 1e6)))
    if not valid[::step, ::step].any():  # valid pixels too few to be sampled
        step = 1
    floors = [1e-3 * float(np.var(image[::step, ::step][valid[::step, ::step]])) + 1e-12 for image in (left, right)]
    for window, inner, target in _blocks(left.shape, block, radius, "ortho correlation", progress):
        ok = valid[window]
        if not ok.any():
            continue
        # moments over the valid pixels of each window, so that no-data never enters a value
        weight = ok.astype(np.float64)
        a, b = (np.where(ok, image[window], 0.0).astype(np.float64) for image in (left, right))
        count = np.maximum(ndimage.uniform_filter(weight, size, mode="constant"), 1e-9)
        mean_a, mean_b = (ndimage.uniform_filter(x, size, mode="constant") / count for x in (a, b))
        var_a = ndimage.uniform_filter(a * a, size, mode="constant") / count - mean_a * mean_a
        var_b = ndimage.uniform_filter(b * b, size, mode="constant") / count - mean_b * mean_b
        covariance = ndimage.uniform_filter(a * b, size, mode="constant") / count - mean_a * mean_b
        ncc = covariance / np.sqrt(np.maximum(var_a, 0.0) + floors[0]) / np.sqrt(np.maximum(var_b, 0.0) + floors[1])
        correlation[target] = np.where(ok, np.clip(ncc, -1.0, 1.0), np.nan)[inner]
    return correlation


def height_error_from_parallax(left: np.ndarray, right: np.ndarray, views: tuple[View, View],
                               resolution: float | tuple[float, float], block: int = BLOCK, progress: bool | None = None) -> np.ndarray:
    """Per-pixel estimate (m, float32) of how much the DSM the orthos were mapprojected through
    is too high; NaN where either ortho has no data. ``resolution``, ``block``, ``progress``:
    see :func:`shift_between`."""
    per_metre = shift_per_metre(views)
    return height_error_from_shift(*shift_between(left, right, resolution, block, progress), per_metre)


def fit_scene_geometry(scene, max_samples: int = 4_000_000) -> np.ndarray:
    """The pair's shift per metre of DSM error (:func:`fit_shift_per_metre`) fitted on a
    :class:`~deepdem.scene.Scene`'s truth DSM and stored shift, from at most ``max_samples``
    pixels (a regular subsample of a large scene, read a strip at a time)."""
    from rasterio.windows import Window

    needed = ["dsm", "truth_dsm", "nodata_mask", *PARALLAX_SHIFTS]
    missing = [band for band in needed if not scene.has(band)]
    if missing:
        raise InputError(f"the pair's geometry cannot be fitted: the scene lacks {', '.join(missing)}", scene.path)
    height, width = scene.shape
    step = max(1, math.ceil(math.sqrt(height * width / max_samples)))
    strip = step * max(1, 1024 // step)
    samples: dict[str, list[np.ndarray]] = {band: [] for band in needed}
    for row in range(0, height, strip):
        window = Window(0, row, width, min(strip, height - row))
        for band in needed:
            samples[band].append(scene.read(band, window)[::step, ::step].ravel())
    data = {band: np.concatenate(values) for band, values in samples.items()}
    height_error = np.where(data["nodata_mask"] > 0, data["dsm"] - data["truth_dsm"], np.nan)
    try:
        return fit_shift_per_metre(data["parallax_shift_x"], data["parallax_shift_y"], height_error)
    except InputError as exc:
        raise InputError(str(exc), scene.path) from None
