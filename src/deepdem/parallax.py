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
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import InputError
from .synth import View

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


def parallax_per_metre(views: tuple[View, View], resolution: float) -> np.ndarray:
    """(columns, rows) of parallax between the right and the left ortho per metre of DSM error."""
    for view in views:
        if not (math.isfinite(view.azimuth) and 0.0 <= view.off_nadir < 60.0):
            raise InputError(f"view azimuth {view.azimuth}, off-nadir {view.off_nadir}: the off-nadir angle "
                             "must be in [0, 60) degrees")
    (lx, ly), (rx, ry) = (v.displacement_per_metre() for v in views)
    # An ortho through a DSM too high by dz samples the ground at (col − dz·dx, row + dz·dy):
    # rows grow southwards.
    relative = np.array([rx - lx, ly - ry]) / resolution
    if float(np.hypot(*relative)) * resolution < 0.05:
        raise InputError(f"views {views[0]} and {views[1]} have a base-to-height ratio below 0.05: "
                         "their parallax says nothing about height")
    return relative


def _locally_normalised(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    filled = np.where(valid, image, np.mean(image[valid])).astype(np.float64)
    size = 2 * NORMALISATION_RADIUS + 1
    mean = ndimage.uniform_filter(filled, size)
    variance = np.maximum(ndimage.uniform_filter(filled * filled, size) - mean * mean, 0.0)
    # The floor keeps flat, textureless patches (water, shadows) at zero rather than amplified noise.
    return (filled - mean) / np.sqrt(variance + 1e-3 * np.var(filled[valid]))


def height_error_from_parallax(left: np.ndarray, right: np.ndarray, views: tuple[View, View],
                               resolution: float, block: int = BLOCK, progress: bool | None = None) -> np.ndarray:
    """Per-pixel estimate (m, float32) of how much the DSM the orthos were mapprojected through
    is too high; NaN where either ortho has no data. ``block``: see :data:`BLOCK`; ``progress``:
    a bar over the blocks (default: on a terminal, when there is more than one)."""
    import sys

    from skimage.registration import optical_flow_ilk
    from tqdm.auto import tqdm

    if left.shape != right.shape:
        raise InputError(f"orthos of different shapes {left.shape} and {right.shape}")
    valid = np.isfinite(left) & np.isfinite(right)
    relative = parallax_per_metre(views, resolution)
    height_error = np.full(left.shape, np.nan, dtype=np.float32)
    height, width = left.shape
    corners = [(row, col) for row in range(0, height, block) for col in range(0, width, block)]
    if progress is None:
        progress = sys.stderr.isatty() and len(corners) > 1
    for row, col in tqdm(corners, desc="parallax", unit="block", disable=not progress, leave=False):
        # the block with its margin, and where the block lies inside it
        r0, c0 = max(row - MARGIN, 0), max(col - MARGIN, 0)
        r1, c1 = min(row + block + MARGIN, height), min(col + block + MARGIN, width)
        window = (slice(r0, r1), slice(c0, c1))
        inner = (slice(row - r0, min(row + block, height) - r0), slice(col - c0, min(col + block, width) - c0))
        ok = valid[window]
        if ok.sum() < 16:
            continue
        # The flow that warps the right ortho onto the left: (rows, columns).
        flow_rows, flow_cols = optical_flow_ilk(_locally_normalised(left[window], ok),
                                                _locally_normalised(right[window], ok),
                                                radius=FLOW_RADIUS, gaussian=True)
        estimate = (flow_cols * relative[0] + flow_rows * relative[1]) / float(relative @ relative)
        height_error[row:row + block, col:col + block] = np.where(ok, estimate, np.nan)[inner]
    return height_error
