"""A satellite stereo pair rendered from a true surface, and a real semi-global matcher run on it.

``simulate_stereo`` turns a true DSM and a ground radiance into the products ASP would make of
them — an initial DSM with holes, two orthoimages mapprojected through that DSM, and a
triangulation-error map — by actually rendering two views and matching them with OpenCV's
StereoSGBM, so that the errors (edge fattening at height steps, occlusion holes, failures on
low texture and water, sub-pixel matching noise) come from a matcher rather than from a model of
one.

What is modelled
    * Each view is an affine (parallel-projection) camera, which is what a pushbroom scene looks
      like over a few hundred metres: a ground point (x, z) appears at image column
      ``u = x − z·kx / resolution`` with ``kx = tan(off_nadir)·sin(azimuth)``, i.e. displaced
      *away* from the satellite, as relief displacement does (tall objects lean away from the
      sensor). This is the sign ``synth.render_ortho`` uses: mapprojecting through a DSM that is
      wrong by ``dz`` displaces the ortho by ``−dz·tan(off_nadir)`` along the azimuth.
    * Occlusions are real: the views are forward-projected with a z-buffer, so the higher surface
      hides the ground behind it and walls facing a view are seen (stretched) by that view only.
    * Sensor noise, a gain/offset difference between the two images, 8-bit quantisation.
    * Matching is OpenCV's SGBM in both directions with a left-right consistency check;
      triangulation, resampling to the ground grid and mapprojection follow ASP's order.

What is simplified
    * Epipolar lines are image rows: only the x (east) component of each view's displacement is
      kept, so the pair is already rectified and parallax is purely along columns. The base-to-
      height ratio is ``B/H = |kx_left − kx_right|``.
    * No lens or sensor model, no jitter, no bundle adjustment, no y-parallax; the cameras are
      exact, so there is no misregistration beyond what matching makes.
    * The disparity search range is taken from the true surface's height range plus a margin
      (ASP gets it from a low-resolution seed; the result is the same range).
    * The radiance is the same for both views (Lambertian ground, no view-dependent
      reflectance); walls get a smear between their foot and their top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from .lidar.ground import fill_nearest

# Sub-samples per pixel when forward-projecting: splatting to the nearest of S sub-columns and
# box-averaging keeps the rendering's position error ≤ 1/(2S) px, below what SGBM's sub-pixel
# fit resolves, so the parallax errors measured are the matcher's, not the renderer's.
_SUPERSAMPLE = 4
_LR_MAX_DIFF = 1.0  # px, left-right consistency tolerance
_MAX_GROUND_GAP = 2  # px, gaps in the ground grid bridged by interpolation; longer ones are holes
_DN_SCALE = 2000.0  # radiance 0–1 → 11-bit-like digital numbers, as synth's orthos


@dataclass
class StereoResult:
    """Products of ``simulate_stereo``, all (H, W) float32 on the ground grid unless noted."""

    dsm: np.ndarray  # metres, NaN = no match (holes)
    ortho_left: np.ndarray  # left image mapprojected through ``dsm`` (NaN-filled), DN, NaN-free
    ortho_right: np.ndarray  # right image, likewise
    triangulation_error: np.ndarray  # metres, NaN exactly where ``dsm`` is NaN
    disparity_px: np.ndarray  # in the left (epipolar) image frame, after the LR check; NaN = invalid


def x_displacement_per_metre(view) -> float:
    """East (x) component of ``view.displacement_per_metre()``: ``tan θ · sin az``, map m per m.

    Duck-typed on ``view.azimuth`` / ``view.off_nadir`` so that this module needs nothing from
    ``synth``.
    """
    return math.tan(math.radians(view.off_nadir)) * math.sin(math.radians(view.azimuth))


def base_to_height(views) -> float:
    """``B/H`` of the pair along the epipolar (x) direction: ``|kx_left − kx_right|``."""
    return abs(x_displacement_per_metre(views[0]) - x_displacement_per_metre(views[1]))


def simulate_stereo(
    truth_dsm: np.ndarray,
    radiance: np.ndarray,
    resolution: float,
    views,
    rng: np.random.Generator,
    *,
    block_size: int = 5,
    noise: float = 0.01,
) -> StereoResult:
    """Render ``views`` of the surface ``truth_dsm`` (metres) coloured by ``radiance`` and run SGBM.

    ``resolution`` is the ground sampling distance in metres; ``views`` is (left, right), each
    with ``azimuth`` (deg clockwise from north, ground → satellite) and ``off_nadir`` (deg);
    ``noise`` is the sensor noise std relative to the radiance's 1–99 % range; ``block_size`` is
    SGBM's (odd) window. ``radiance`` is expected in reflectance-like units (about 0–1): the
    orthos come back as 2000 × radiance, clipped at 0, like ``synth``'s 11-bit-like DN.
    Pairs without east–west parallax (B/H < 0.05 along x) raise ``ValueError``, since the pair
    is rectified along x only. Returns a ``StereoResult``.
    """
    truth = np.asarray(truth_dsm, dtype=np.float64)
    rad = np.asarray(radiance, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != rad.shape:
        raise ValueError(f"truth_dsm {truth.shape} and radiance {rad.shape} must be equal 2-D shapes")
    if not (np.isfinite(truth).all() and np.isfinite(rad).all()):
        raise ValueError("truth_dsm and radiance must be finite everywhere")
    if block_size < 1 or block_size % 2 == 0:
        raise ValueError(f"block_size must be odd and positive, got {block_size}")
    k_left, k_right = (x_displacement_per_metre(v) / resolution for v in views)  # px per metre
    parallax = k_right - k_left  # px of disparity (x_left − x_right) per metre above the reference
    if abs(parallax) * resolution < 0.05:
        raise ValueError(f"base-to-height ratio {abs(parallax) * resolution:.3f} is too small to triangulate")

    # Heights relative to the median keep disparities small and centred on zero, as matching
    # against a seed DEM does.
    z_ref = float(np.median(truth))
    z_rel = truth - z_ref
    left, right = _render_pair(z_rel, rad, k_left, k_right, rng, noise)
    disparity, valid, lr_diff, confidence = _match_pair(left, right, z_rel, parallax, block_size)
    # Step 3, triangulation in the left frame: the cameras are exact, so it is one division.
    height_left = z_ref + disparity / parallax
    tri_left = _triangulation_error(valid, lr_diff, confidence, parallax)
    dsm, tri = _to_ground_grid(height_left, tri_left, k_left, z_ref)
    orthos = _mapproject((left, right), (k_left, k_right), dsm, z_ref)
    return StereoResult(
        dsm=dsm.astype(np.float32),
        ortho_left=orthos[0].astype(np.float32),
        ortho_right=orthos[1].astype(np.float32),
        triangulation_error=tri.astype(np.float32),
        disparity_px=disparity.astype(np.float32),
    )


def _render_pair(z_rel: np.ndarray, rad: np.ndarray, k_left: float, k_right: float, rng: np.random.Generator,
                 noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Stereo, step 1: the two views rendered, the right one with its own gain and offset, both with noise."""
    lo, hi = np.percentile(rad, [1, 99])
    span = max(float(hi - lo), 1e-6)
    images = []
    for i, k in enumerate((k_left, k_right)):
        img = _render_view(z_rel, rad, k)
        gain = 1.0 if i == 0 else rng.uniform(0.95, 1.05)
        offset = 0.0 if i == 0 else rng.uniform(-0.01, 0.01) * span
        images.append(img * gain + offset + rng.normal(0.0, noise * span, size=img.shape))
    return images[0], images[1]


def _match_pair(left: np.ndarray, right: np.ndarray, z_rel: np.ndarray, parallax: float,
                block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stereo, step 2: SGBM both ways; the left disparity (NaN = no match), its mask, the LR disagreement, the NCC."""
    # 8-bit with one stretch for both, so the gain difference survives into the matcher.
    both = np.concatenate([left.ravel(), right.ravel()])
    s_lo, s_hi = np.percentile(both, [0.5, 99.5])
    left8, right8 = (_to_uint8(a, s_lo, s_hi) for a in (left, right))

    d_lo, d_hi = sorted((float(z_rel.min()) * parallax, float(z_rel.max()) * parallax))
    margin = 8.0 + 0.1 * (d_hi - d_lo)
    min_disp = int(math.floor(d_lo - margin))
    num_disp = int(math.ceil((d_hi + margin - min_disp) / 16.0)) * 16
    disp_left = _sgbm(left8, right8, min_disp, num_disp, block_size)
    # Right-view disparity: match the mirrored pair (mirrored right as reference); mirroring back
    # gives, at each right pixel, x_left − x_right in the same sign convention as the left one.
    disp_right = _sgbm(right8[:, ::-1].copy(), left8[:, ::-1].copy(), min_disp, num_disp, block_size)[:, ::-1]

    w = left.shape[1]
    cols = np.arange(w, dtype=np.float64)[None, :]
    x_right = cols - disp_left
    inside = (x_right >= 0) & (x_right <= w - 1)  # the match must lie in the right image
    back = _sample_rows(disp_right, np.where(inside, x_right, 0.0), order=0)
    lr_diff = np.abs(disp_left - back)
    valid = np.isfinite(disp_left) & inside & np.isfinite(lr_diff) & (lr_diff <= _LR_MAX_DIFF)
    disparity = np.where(valid, disp_left, np.nan)

    # Confidence = normalised cross-correlation of the left window with the right image warped
    # onto it by the matched disparity, as ASP's correlator scores a match.
    warped = _sample_rows(right, np.where(valid, x_right, cols), order=1)
    confidence = np.clip(_local_ncc(left, warped, block_size), 0.0, 1.0)
    return disparity, valid, lr_diff, confidence


def _triangulation_error(valid: np.ndarray, lr_diff: np.ndarray, confidence: np.ndarray,
                         parallax: float) -> np.ndarray:
    """Stereo, step 4: the triangulation error of each left pixel (m), NaN where it has no match."""
    # Intersection error stand-in: ASP's ray miss-distance grows with matching inconsistency;
    # a disparity error of δ px is δ·resolution/(B/H) metres of height, so express the LR
    # disagreement and the lack of correlation in those units:
    #     tri = resolution / (B/H) · (|d_LR − d_RL| + 0.25·(1 − NCC))
    px_to_m = 1.0 / abs(parallax)
    return np.where(valid, px_to_m * (lr_diff + 0.25 * (1.0 - confidence)), np.nan)


def _to_ground_grid(height_left: np.ndarray, tri_left: np.ndarray, k_left: float,
                    z_ref: float) -> tuple[np.ndarray, np.ndarray]:
    """Stereo, step 5: left-frame heights and errors resampled onto the ground grid, as point2dem does."""
    w = height_left.shape[1]
    cols = np.arange(w, dtype=np.float64)[None, :]
    ground_x = cols + (height_left - z_ref) * k_left  # the ground point the left pixel sees
    dsm, tri = _splat_to_ground(ground_x, height_left, tri_left, w)
    return _fill_short_gaps(dsm, tri, _MAX_GROUND_GAP)


def _mapproject(images: tuple[np.ndarray, np.ndarray], ks: tuple[float, float], dsm: np.ndarray,
                z_ref: float) -> list[np.ndarray]:
    """Stereo, step 6: each image mapprojected through the matched DSM (its holes filled), in DN."""
    filled = fill_nearest(dsm) if np.isfinite(dsm).any() else np.full_like(dsm, z_ref)
    ground = np.arange(dsm.shape[1], dtype=np.float64)[None, :]
    orthos = []
    for img, k in zip(images, ks):
        sampled = _sample_rows(img, ground - (filled - z_ref) * k, order=1)
        orthos.append(np.clip(sampled, 0.0, None) * _DN_SCALE)
    return orthos


def _to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.rint((a - lo) / max(hi - lo, 1e-9) * 255.0), 0, 255).astype(np.uint8)


def _render_view(z_rel: np.ndarray, rad: np.ndarray, k: float) -> np.ndarray:
    """Forward-project the surface to the view with column shift ``−z·k`` px, with a z-buffer.

    For one image column the ground points along the ray differ only by height, and the higher
    one is nearer the satellite, so "highest wins" is the exact visibility rule here.
    """
    h, w = z_rel.shape
    s = _SUPERSAMPLE
    # Sub-samples at the centres of S equal parts of each pixel, surface linearly interpolated
    # between cells, so that a wall becomes a steep ramp that a facing view sees stretched.
    xs = (np.arange(w * s) + 0.5) / s - 0.5
    x0 = np.clip(np.floor(xs).astype(np.intp), 0, w - 2)
    f = np.clip(xs - x0, 0.0, 1.0)
    zs = z_rel[:, x0] * (1 - f) + z_rel[:, x0 + 1] * f
    rs = rad[:, x0] * (1 - f) + rad[:, x0 + 1] * f
    target = np.rint((xs - zs * k + 0.5) * s - 0.5).astype(np.intp)
    keep = (target >= 0) & (target < w * s)
    rows = np.broadcast_to(np.arange(h)[:, None], zs.shape)
    flat = (rows * (w * s) + target)[keep]
    fine = np.full(h * w * s, np.nan)
    _zbuffer_assign(fine, flat, zs[keep], rs[keep])
    fine = _interp_rows(fine.reshape(h, w * s))[0]
    # A detector integrates over its pixel: box-average the sub-columns.
    return fine.reshape(h, w, s).mean(axis=2)


def _zbuffer_assign(out: np.ndarray, index: np.ndarray, depth: np.ndarray, *values) -> None:
    """``out[i][index] = values[i]`` keeping, for each repeated index, the entry of largest depth.

    ``out`` may be one array (for one value) or a tuple of arrays (one per value).
    """
    order = np.lexsort((depth, index))
    idx = index[order]
    last = np.ones(idx.size, dtype=bool)
    last[:-1] = idx[1:] != idx[:-1]
    outs = out if isinstance(out, tuple) else (out,)
    for o, v in zip(outs, values):
        o[idx[last]] = v[order][last]


def _interp_rows(a: np.ndarray, max_gap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill NaN runs along each row by linear interpolation between their two valid ends.

    Runs touching a row end take the nearest valid value; with ``max_gap`` only interior runs of
    at most that many pixels are filled. Returns the filled array and the filled mask.
    """
    h, w = a.shape
    valid = ~np.isnan(a)
    cols = np.broadcast_to(np.arange(w), a.shape)
    prev = np.maximum.accumulate(np.where(valid, cols, -1), axis=1)
    nxt = np.minimum.accumulate(np.where(valid, cols, w)[:, ::-1], axis=1)[:, ::-1]
    has_prev, has_next = prev >= 0, nxt < w
    a_prev = np.take_along_axis(a, np.clip(prev, 0, w - 1), axis=1)
    a_next = np.take_along_axis(a, np.clip(nxt, 0, w - 1), axis=1)
    t = (cols - prev) / np.maximum(nxt - prev, 1)
    both = has_prev & has_next
    value = np.where(both, a_prev + t * (a_next - a_prev), np.where(has_prev, a_prev, a_next))
    fill = ~valid & (has_prev | has_next)
    if max_gap is not None:
        fill &= both & (nxt - prev - 1 <= max_gap)
    return np.where(fill, value, a), fill


def _sgbm(ref: np.ndarray, other: np.ndarray, min_disp: int, num_disp: int, block_size: int) -> np.ndarray:
    """SGBM disparity (x_ref − x_other, px) of ``ref``; NaN where the matcher gives none."""
    # Pad so that SGBM's border band (where the search would leave the image) falls outside the
    # scene; pixels whose match falls off the other image are rejected by the caller.
    pad = max(abs(min_disp), abs(min_disp + num_disp)) + block_size
    ref_p = cv2.copyMakeBorder(ref, 0, 0, pad, pad, cv2.BORDER_REFLECT_101)
    other_p = cv2.copyMakeBorder(other, 0, 0, pad, pad, cv2.BORDER_REFLECT_101)
    area = block_size * block_size
    matcher = cv2.StereoSGBM_create(
        minDisparity=min_disp,
        numDisparities=num_disp,
        blockSize=block_size,
        P1=8 * area,
        P2=32 * area,
        disp12MaxDiff=1,
        uniquenessRatio=10,
        speckleWindowSize=80,
        speckleRange=2,
        mode=cv2.STEREO_SGBM_MODE_SGBM,
    )
    raw = matcher.compute(ref_p, other_p)[:, pad:-pad]
    # Fixed point ×16; invalid pixels come back as (minDisparity − 1)·16.
    return np.where(raw >= min_disp * 16, raw.astype(np.float64) / 16.0, np.nan)


def _sample_rows(img: np.ndarray, x: np.ndarray, order: int) -> np.ndarray:
    """``img[r, x[r, c]]`` along each row (clamped at the borders); NaN propagates with order 0."""
    rows = np.broadcast_to(np.arange(img.shape[0], dtype=np.float64)[:, None], x.shape)
    if order == 0:
        c = np.clip(np.rint(x), 0, img.shape[1] - 1).astype(np.intp)
        return img[rows.astype(np.intp), c]
    return ndimage.map_coordinates(img, [rows, x], order=order, mode="nearest")


def _local_ncc(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """Normalised cross-correlation of ``a`` and ``b`` in a ``size``² window around each pixel."""
    def mean(x):
        return ndimage.uniform_filter(x, size, mode="nearest")

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    var_a = np.maximum(mean(a * a) - ma * ma, 0.0)
    var_b = np.maximum(mean(b * b) - mb * mb, 0.0)
    return cov / np.sqrt(var_a * var_b + 1e-12)


def _splat_to_ground(ground_x: np.ndarray, height: np.ndarray, tri: np.ndarray, w: int):
    """Resample left-frame heights (and tri) at ground columns ``ground_x`` onto the integer grid.

    Between neighbouring valid left pixels whose ground positions advance by at most
    ``_MAX_GROUND_GAP + 1`` px the heights are linearly interpolated onto the integer columns
    they span; longer jumps are occlusions seen from the left and stay holes. Where several
    samples land on one cell (walls facing the left view, folds) the highest wins, as the DSM is
    the top surface. Isolated valid pixels are splatted to their nearest cell.
    """
    h = ground_x.shape[0]
    ok = np.isfinite(height)
    xa, xb = ground_x[:, :-1], ground_x[:, 1:]
    span = xb - xa
    segment = ok[:, :-1] & ok[:, 1:] & (span >= 0) & (span <= _MAX_GROUND_GAP + 1)
    rows = np.broadcast_to(np.arange(h)[:, None], xa.shape)
    za, zb, ta, tb = height[:, :-1], height[:, 1:], tri[:, :-1], tri[:, 1:]
    idx, zs, ts = [], [], []
    start = np.ceil(xa)
    for step in range(_MAX_GROUND_GAP + 2):
        p = start + step
        m = segment & (p <= xb) & (p >= 0) & (p <= w - 1)
        t = np.where(span > 0, (p - xa) / np.where(span > 0, span, 1.0), 0.0)[m]
        idx.append(rows[m] * w + p[m].astype(np.intp))
        zs.append(za[m] + t * (zb[m] - za[m]))
        ts.append(ta[m] + t * (tb[m] - ta[m]))
    linked = np.zeros_like(ok)
    linked[:, :-1] |= segment
    linked[:, 1:] |= segment
    lone = ok & ~linked
    p = np.rint(ground_x[lone])
    m = (p >= 0) & (p <= w - 1)
    idx.append((np.nonzero(lone)[0][m] * w + p[m].astype(np.intp)))
    zs.append(height[lone][m])
    ts.append(tri[lone][m])

    dsm = np.full(h * w, np.nan)
    err = np.full(h * w, np.nan)
    _zbuffer_assign((dsm, err), np.concatenate(idx), np.concatenate(zs), np.concatenate(zs), np.concatenate(ts))
    return dsm.reshape(h, w), err.reshape(h, w)


def _fill_short_gaps(dsm: np.ndarray, tri: np.ndarray, max_gap: int):
    """Bridge holes of at most ``max_gap`` px along rows in both maps, leaving longer holes NaN."""
    dsm, filled = _interp_rows(dsm, max_gap)
    tri_filled = _interp_rows(tri, max_gap)[0]
    tri = np.where(filled, tri_filled, tri)
    # Both maps are splatted together, so their NaNs coincide; enforce it anyway.
    tri = np.where(np.isnan(dsm), np.nan, tri)
    dsm = np.where(np.isnan(tri), np.nan, dsm)
    return dsm, tri
