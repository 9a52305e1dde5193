"""Generated scenes: a truth surface, and the stereo products ASP would make of it.

The generator builds the ground truth first (fractal terrain, a lake, roads, buildings with flat
and gabled roofs, trees), then simulates what a satellite stereo pair and ASP turn it into:

* an initial DSM with ASP's errors: smoothing across height steps (correlation window and edge
  fattening), canopy heights underestimated, noise that grows on low texture and steep slopes,
  holes in shadows, occlusions and water, a few blunders, a small horizontal and vertical shift;
* two orthoimages rendered from the *true* surface (albedo × illumination with cast shadows
  and texture) and orthorectified through the *erroneous* DSM, so that a height error ``dz``
  appears as a horizontal displacement ``-dz·tan(off-nadir)`` along each view's azimuth, i.e.
  as parallax between left and right, exactly as in ASP's mapprojected images;
* a triangulation-error map (ASP's ray-intersection distance) drawn from the error's causes, which
  sees the across-epipolar part of a mismatch but not the height error itself, and an NDVI at
  coarser resolution.

Files are written with ASP's names and nodata conventions (float32-min) so that ``prepare``
is exercised on the same path as real data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_origin
from scipy import ndimage

from .errors import InputError
from .io import FLOAT32_MIN, atomic_directory, write_raster
from .lidar.ground import fill_nearest

ASP_FILES = {
    "dsm": "run-DEM.tif",
    "triangulation_error": "run-IntersectionErr.tif",
    "ortho_left": "left_ortho.tif",
    "ortho_right": "right_ortho.tif",
    "ndvi": "ndvi.tif",
    "truth_dsm": "truth_dsm.tif",
    "truth_dtm": "truth_dtm.tif",
}
ORTHO_NODATA = -32768.0
TRUTH_NODATA = -9999.0

# Land-cover codes used while generating (written to landcover.tif for evaluation strata).
BARE, GRASS, ROAD, BUILDING, TREE, WATER = range(6)
ERROR_MODES = ("model", "sgbm")


@dataclass(frozen=True)
class View:
    """A satellite view: azimuth (degrees clockwise from north, ground → satellite) and off-nadir angle."""

    azimuth: float
    off_nadir: float

    def displacement_per_metre(self) -> tuple[float, float]:
        """(dx, dy) in map units of ground displacement per metre of height error."""
        k = math.tan(math.radians(self.off_nadir))
        az = math.radians(self.azimuth)
        return (k * math.sin(az), k * math.cos(az))


@dataclass
class SynthConfig:
    """Parameters of a generated scene; every random draw comes from ``seed``."""

    size: int = 512
    resolution: float = 1.0
    seed: int = 0
    relief: float = 40.0  # metres, std of the fractal terrain ≈ relief / 4
    building_density: float = 160.0  # per km² in the built-up part
    forest_fraction: float = 0.2
    sun_azimuth: float = 135.0
    sun_elevation: float = 50.0
    views: tuple[View, View] = field(default_factory=lambda: (View(250.0, 22.0), View(80.0, 18.0)))
    noise_base: float = 0.35  # metres, stereo noise on well-textured flat ground
    blunders_per_km2: float | None = None  # None: 3 to 6 per scene, whatever its size
    crs: str = "EPSG:32610"


@dataclass
class SynthScene:
    """Arrays of a generated scene (NaN = no data) and its georeferencing."""

    config: SynthConfig
    transform: object
    crs: CRS
    truth_dsm: np.ndarray
    truth_dtm: np.ndarray
    dsm: np.ndarray
    ortho_left: np.ndarray
    ortho_right: np.ndarray
    triangulation_error: np.ndarray
    ndvi: np.ndarray  # at the DSM resolution; written coarser
    landcover: np.ndarray
    shifts: dict


# -- surfaces -------------------------------------------------------------------------------
def fractal_surface(rng: np.random.Generator, shape: tuple[int, int], beta: float = 2.2) -> np.ndarray:
    """Zero-mean, unit-std fractional Brownian surface by spectral synthesis (power ∝ f^-beta)."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) * f ** (-beta / 2)
    spectrum[0, 0] = 0.0
    surface = np.fft.irfft2(spectrum, s=shape)
    return (surface - surface.mean()) / (surface.std() + 1e-12)


def _rotated_coords(cols, rows, cx, cy, angle):
    """Coordinates along and across a rectangle's axes."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = cols - cx, rows - cy
    return dx * c + dy * s, -dx * s + dy * c


def cast_shadow(surface: np.ndarray, resolution: float, azimuth: float, elevation: float) -> np.ndarray:
    """Boolean map of pixels hidden from a direction (sun for shadows, satellite for occlusions).

    Marches along the direction in one-pixel steps: a pixel is hidden when some surface point
    towards the source rises above the line of sight. Heights above the local minimum bound the
    march length, so a tall building costs a few dozen shifts, not a full ray per pixel.
    """
    az = math.radians(azimuth)
    step_x, step_y = math.sin(az), -math.cos(az)  # map north is row -1
    tan_e = math.tan(math.radians(elevation))
    relief = float(np.nanmax(surface) - np.nanmin(surface))
    n_steps = int(min(relief / (tan_e * resolution) + 1, max(surface.shape)))
    hidden = np.zeros(surface.shape, dtype=bool)
    rows, cols = np.mgrid[0 : surface.shape[0], 0 : surface.shape[1]].astype(np.float32)
    for k in range(1, n_steps + 1):
        ahead = ndimage.map_coordinates(
            surface, [rows + k * step_y, cols + k * step_x], order=1, mode="nearest"
        )
        hidden |= ahead > surface + k * resolution * tan_e + 0.05
    return hidden


def _stamp_buildings(rng, terrain, cover, config, res):
    """Buildings with flat and gabled roofs in a built-up region; returns roof heights (NaN off roofs)."""
    h, w = terrain.shape
    roofs = np.full(terrain.shape, np.nan, dtype=np.float64)
    area_km2 = h * w * res * res / 1e6
    town = ndimage.gaussian_filter(rng.normal(size=terrain.shape), sigma=max(h, w) / 8) > 0
    n = rng.poisson(config.building_density * area_km2 * max(town.mean(), 0.2) * 2)
    rows, cols = np.mgrid[0:h, 0:w]
    placed, attempts = 0, 0
    while placed < n and attempts < n * 20:
        attempts += 1
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if not town[int(cy), int(cx)]:
            continue
        length, width = rng.uniform(10, 32) / res, rng.uniform(8, 16) / res
        angle = rng.uniform(0, math.pi) if rng.random() < 0.6 else rng.choice([0.0, math.pi / 2])
        half = int(math.hypot(length, width) / 2) + 2
        r0, r1, c0, c1 = max(int(cy) - half, 0), min(int(cy) + half, h), max(int(cx) - half, 0), min(int(cx) + half, w)
        if r1 - r0 < 4 or c1 - c0 < 4:
            continue
        along, across = _rotated_coords(cols[r0:r1, c0:c1], rows[r0:r1, c0:c1], cx, cy, angle)
        footprint = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        margin = ndimage.binary_dilation(footprint, iterations=max(int(3 / res), 1))
        if not footprint.any() or np.isin(cover[r0:r1, c0:c1][margin], (BUILDING, WATER, ROAD)).any():
            continue
        base = float(np.median(terrain[r0:r1, c0:c1][footprint]))
        if rng.random() < 0.45:  # gabled: ridge along the long axis
            eave = rng.uniform(3, 9)
            rise = rng.uniform(2, 5)
            height = eave + rise * (1 - np.abs(across) / (width / 2))
        else:
            height = np.full(footprint.shape, rng.uniform(3.5, 18))
        window = roofs[r0:r1, c0:c1]
        window[footprint] = base + height[footprint]
        cover[r0:r1, c0:c1][footprint] = BUILDING
        placed += 1
    return roofs


def _stamp_trees(rng, terrain, cover, config, res):
    """Tree crowns (half-ellipsoids) in forest patches and scattered; returns canopy top heights."""
    h, w = terrain.shape
    canopy = np.full(terrain.shape, np.nan, dtype=np.float64)
    patches = fractal_surface(rng, terrain.shape, beta=3.0)
    forest = patches > np.quantile(patches, 1 - config.forest_fraction)
    allowed = np.isin(cover, (GRASS, BARE))
    n_forest = int(forest.sum() * res * res / 40.0)  # one crown per ~40 m² of forest
    n_scattered = int(h * w * res * res / 4000.0)
    candidates_forest = np.flatnonzero((forest & allowed).ravel())
    candidates_open = np.flatnonzero(allowed.ravel())
    picks = []
    if candidates_forest.size:
        picks.append(rng.choice(candidates_forest, size=n_forest))
    if candidates_open.size:
        picks.append(rng.choice(candidates_open, size=n_scattered))
    for flat in np.concatenate(picks) if picks else []:
        cy, cx = divmod(int(flat), w)
        if not allowed[cy, cx]:
            continue
        tree_h = rng.uniform(8, 26)
        radius = rng.uniform(2.0, 5.5) / res
        r = int(radius) + 1
        r0, r1, c0, c1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        yy, xx = np.mgrid[r0:r1, c0:c1]
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
        inside = (d2 < 1) & allowed[r0:r1, c0:c1]
        top = terrain[cy, cx] + tree_h * (0.55 + 0.45 * np.sqrt(np.clip(1 - d2, 0, 1)))
        window = canopy[r0:r1, c0:c1]
        window[inside] = np.fmax(window[inside], top[inside])
        cover[r0:r1, c0:c1][inside] = TREE
    return canopy


def generate(config: SynthConfig | None = None, terrain: np.ndarray | None = None) -> SynthScene:
    """Generate a scene in memory (see the module docstring for what it models).

    ``terrain`` (``size`` × ``size`` heights in metres, e.g. a real DEM resampled to the scene's
    resolution) replaces the fractal terrain; everything else is generated on top of it.
    """
    config = config or SynthConfig()
    if terrain is not None and terrain.shape != (config.size, config.size):
        raise InputError(f"terrain of shape {terrain.shape} does not match a {config.size} px scene")
    if terrain is not None and not np.isfinite(terrain).all():
        raise InputError("terrain has no-data pixels: fill them before generating a scene on it")
    if config.size < 32:
        raise InputError(f"--size {config.size} is too small: a scene needs at least 32 px")
    if config.resolution <= 0:
        raise InputError(f"--resolution must be positive, got {config.resolution}")
    rng = np.random.default_rng(config.seed)
    res = config.resolution
    shape = (config.size, config.size)
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)

    # Terrain: fractal relief on a gentle regional tilt, scaled in metres.
    if terrain is None:
        terrain = 200.0 + config.relief / 4 * fractal_surface(rng, shape, beta=3.2)
        terrain += rng.uniform(-0.02, 0.02) * cols * res + rng.uniform(-0.02, 0.02) * rows * res
    else:
        terrain = np.asarray(terrain, dtype=np.float64).copy()
    cover = np.full(shape, GRASS, dtype=np.uint8)
    cover[fractal_surface(rng, shape, beta=2.0) > 0.6] = BARE

    # Lake: flat water in a noisy ellipse, its banks blended into the terrain.
    cy, cx = rng.uniform(0.2, 0.8, size=2) * np.array(shape)
    ry, rx = rng.uniform(0.06, 0.12, size=2) * np.array(shape)
    lake_field = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
    lake_field += 0.3 * fractal_surface(rng, shape, beta=2.0)
    water = lake_field < 1.0
    if water.any():
        level = float(np.percentile(terrain[water], 10))
        bank = np.clip((lake_field - 1.0) / 0.6, 0, 1)
        terrain = np.where(water, level, level + (terrain - level) * (bank * bank * (3 - 2 * bank)))
        terrain = np.where(water, level, np.maximum(terrain, level + 0.3 * bank))
        cover[water] = WATER

    # Roads: straight, 7 m wide, on the terrain.
    for _ in range(rng.integers(1, 3)):
        angle = rng.uniform(0, math.pi)
        oy, ox = rng.uniform(0.2, 0.8, size=2) * np.array(shape)
        _, across = _rotated_coords(cols, rows, ox, oy, angle)
        road = (np.abs(across) < 3.5 / res) & ~water
        cover[road] = ROAD

    roofs = _stamp_buildings(rng, terrain, cover, config, res)
    canopy = _stamp_trees(rng, terrain, cover, config, res)
    truth_dtm = terrain
    truth_dsm = np.fmax(np.fmax(terrain, np.nan_to_num(roofs, nan=-np.inf)), np.nan_to_num(canopy, nan=-np.inf))
    x0 = 590000.0 + 5000.0 * (config.seed % 50)
    y0 = 5400000.0 + 5000.0 * (config.seed // 50 % 50)
    return observe(truth_dsm, truth_dtm, cover, config, rng, from_origin(x0, y0, res, res))


def observe(truth_dsm: np.ndarray, truth_dtm: np.ndarray, cover: np.ndarray, config: SynthConfig,
            rng: np.random.Generator, transform, errors: str = "model", albedo: np.ndarray | None = None) -> SynthScene:
    """The stereo products of a true surface: radiance, orthos, initial DSM, error map, NDVI.

    ``errors`` is 'model' (ASP's errors drawn from a statistical model of them, see the module
    docstring) or 'sgbm' (two views rendered and matched by a real semi-global matcher, see
    :mod:`deepdem.stereo`). ``albedo`` (0–1, e.g. from a real orthophoto) replaces the albedo
    drawn from the land cover.
    """
    if errors not in ERROR_MODES:
        raise InputError(f"errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
    if albedo is None:
        albedo = _albedo(cover, config.resolution, rng)
    radiance, shadow = _radiance(truth_dsm, albedo, config)
    if errors == "sgbm":
        return _observe_by_matching(truth_dsm, truth_dtm, cover, radiance, shadow, config, rng, transform)

    texture = _texture(radiance)
    dsm, spread, blunders, shift_px, shift_z = _modelled_dsm(truth_dsm, truth_dtm, cover, texture, config, rng)
    orthos, occluded = _modelled_orthos(radiance, dsm - truth_dsm, truth_dsm, config, rng)
    holes = _modelled_holes(cover, shadow, texture, occluded, config.resolution, rng)
    dsm = np.where(holes, np.nan, dsm)
    tri = np.where(holes, np.nan, _modelled_triangulation_error(truth_dsm - truth_dtm, spread, blunders, rng))

    return SynthScene(
        config=config,
        transform=transform,
        crs=CRS.from_user_input(config.crs),
        truth_dsm=truth_dsm.astype(np.float32),
        truth_dtm=truth_dtm.astype(np.float32),
        dsm=dsm.astype(np.float32),
        ortho_left=orthos[0].astype(np.float32),
        ortho_right=orthos[1].astype(np.float32),
        triangulation_error=tri.astype(np.float32),
        ndvi=_ndvi(cover, rng).astype(np.float32),
        landcover=cover,
        shifts={"dx_px": float(shift_px[1]), "dy_px": float(shift_px[0]), "dz_m": shift_z},
    )


def _albedo(cover: np.ndarray, res: float, rng: np.random.Generator) -> np.ndarray:
    """Observe, step 1: the ground's albedo from its land cover, one per building, textured."""
    shape = cover.shape
    albedo = np.choose(cover, [0.34, 0.22, 0.17, 0.0, 0.10, 0.05]).astype(np.float64)
    labels, _ = ndimage.label(cover == BUILDING)
    if labels.max():
        per_building = rng.uniform(0.15, 0.6, size=labels.max() + 1)
        albedo = np.where(cover == BUILDING, per_building[labels], albedo)
    fine = ndimage.gaussian_filter(rng.normal(size=shape), 0.7)
    medium = ndimage.gaussian_filter(rng.normal(size=shape), 3.0 / res)
    texture_strength = np.choose(cover, [0.25, 0.3, 0.1, 0.04, 0.45, 0.03])
    return albedo * np.clip(1 + texture_strength * (fine / (fine.std() + 1e-9) * 0.6 + medium / (medium.std() + 1e-9) * 0.6), 0.2, 3)


def _radiance(truth_dsm: np.ndarray, albedo: np.ndarray, config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Observe, step 2: the true surface's radiance under the sun (Lambert, cast shadows), and its shadows."""
    res = config.resolution
    gy, gx = np.gradient(truth_dsm, res)
    sun_az, sun_el = math.radians(config.sun_azimuth), math.radians(config.sun_elevation)
    sun = np.array([math.sin(sun_az) * math.cos(sun_el), math.cos(sun_az) * math.cos(sun_el), math.sin(sun_el)])
    # Normal of z(x, y) with rows running south: (-dz/dx, +dz/drow·(-1) → north), up.
    normal = np.stack([-gx, gy, np.ones_like(gx)])
    normal /= np.linalg.norm(normal, axis=0)
    lambert = np.clip(np.tensordot(sun, normal, axes=1), 0, 1)
    shadow = cast_shadow(truth_dsm, res, config.sun_azimuth, config.sun_elevation)
    return albedo * (0.18 + 0.82 * lambert * ~shadow), shadow


def _texture(radiance: np.ndarray) -> np.ndarray:
    """Observe, step 3: the radiance's local contrast (in units of its 75th percentile), which matching needs."""
    texture = ndimage.gaussian_filter(np.abs(ndimage.laplace(ndimage.gaussian_filter(radiance, 0.8))), 2.0)
    texture /= np.percentile(texture, 75) + 1e-9
    return texture


def _modelled_dsm(truth_dsm: np.ndarray, truth_dtm: np.ndarray, cover: np.ndarray, texture: np.ndarray,
                  config: SynthConfig, rng: np.random.Generator):
    """Observe, step 4: the stereo DSM with ASP's errors (no holes yet).

    Returns the DSM, the matching noise's standard deviation per pixel (m), each pixel's height
    error from blunders (m), the horizontal shift (px) and the vertical shift (m).
    """
    res = config.resolution
    shape = truth_dsm.shape
    h, w = shape
    canopy_height = np.where(cover == TREE, truth_dsm - truth_dtm, 0.0)
    underestimate = np.clip(0.7 + 0.15 * fractal_surface(rng, shape, beta=2.5), 0.4, 0.95)
    surface = truth_dsm - canopy_height * (1 - underestimate)
    fattened = ndimage.grey_dilation(surface, size=(3, 3))
    smoothed = 0.6 * ndimage.gaussian_filter(surface, 1.5) + 0.4 * ndimage.gaussian_filter(fattened, 1.0)

    slope = np.hypot(*np.gradient(truth_dtm, res))
    spread = config.noise_base * (1 + 2.5 * np.exp(-3 * texture) + 1.5 * np.clip(slope, 0, 2))
    dsm = smoothed + spread * _unit_correlated_noise(rng, shape)

    count = int(rng.integers(3, 7))
    if config.blunders_per_km2 is not None:
        count = int(rng.poisson(config.blunders_per_km2 * h * w * res * res / 1e6))
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    blunders = np.zeros(shape)
    for _ in range(count):  # blunders: smooth bumps and pits of 5–25 m
        by, bx = rng.uniform(0, h), rng.uniform(0, w)
        radius = rng.uniform(3, 10) / res
        blunders += rng.choice([-1, 1]) * rng.uniform(5, 25) * np.exp(-((rows - by) ** 2 + (cols - bx) ** 2) / (2 * radius**2))
    dsm += blunders

    shift_px = rng.uniform(-0.8, 0.8, size=2)
    shift_z = float(rng.uniform(-0.6, 0.6))
    dsm = ndimage.shift(dsm, shift_px, order=1, mode="nearest") + shift_z
    return dsm, spread, blunders, shift_px, shift_z


def _unit_correlated_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Gaussian noise correlated over about a pixel (a matcher's window), scaled to unit variance."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    return noise / (noise.std() + 1e-12)


def _modelled_triangulation_error(raised: np.ndarray, spread: np.ndarray, blunders: np.ndarray,
                                  rng: np.random.Generator) -> np.ndarray:
    """Observe, step 7: ASP's ray-intersection distance (m), made from the error's causes, not from the error.

    A mismatch along the epipolar line moves the height but the two rays still meet, so this map
    cannot see it. It sees the mismatch's across-epipolar part, drawn here independently of the
    height error: with the matching noise's spread (larger on low texture and steep slopes),
    larger where the correlation window straddles the edge of a building or a tree (``raised``:
    height above the ground; the match is ambiguous in both directions there), and for a blunder
    a fraction of its size; plus the cameras' residual misalignment, smooth over the scene. A map
    made from the realised error would tell a model where the DSM is wrong far better than a
    matcher can: bench/synth_errors.py compares both generators' maps with the error.
    """
    shape = spread.shape
    cameras = rng.uniform(0.05, 0.15) * np.exp(0.3 * fractal_surface(rng, shape, beta=3.0))
    step = ndimage.maximum_filter(raised, size=5) - ndimage.minimum_filter(raised, size=5)
    across = (0.5 * spread + 0.05 * step) * np.abs(_unit_correlated_noise(rng, shape))
    blunder_share = rng.uniform(0.05, 0.3)
    return cameras + across + blunder_share * np.abs(blunders)


def _modelled_orthos(radiance: np.ndarray, dz: np.ndarray, truth_dsm: np.ndarray, config: SynthConfig,
                     rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Observe, step 5: both orthoimages through the erroneous DSM (in DN), and what the views cannot see."""
    # Each view's ray through the erroneous DSM meets the true surface displaced by
    # -dz·tan(off-nadir) along the azimuth: the ortho samples the true radiance there.
    res = config.resolution
    orthos = []
    occluded = np.zeros(truth_dsm.shape, dtype=bool)
    for view in config.views:
        ortho = render_ortho(radiance, dz, view, res)
        gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-0.01, 0.01)
        ortho = ortho * gain + offset + rng.normal(0, 0.006, size=truth_dsm.shape)
        orthos.append(np.clip(ortho, 0.0, None) * 2000.0)  # 11-bit-like digital numbers
        occluded |= cast_shadow(truth_dsm, res, view.azimuth, 90.0 - view.off_nadir)
    return orthos, occluded


def _modelled_holes(cover: np.ndarray, shadow: np.ndarray, texture: np.ndarray, occluded: np.ndarray, res: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Observe, step 6: where ASP finds no match: water, dark untextured shadows, occlusions, scattered failures."""
    holes = (cover == WATER) & (rng.random(cover.shape) < 0.97)
    holes |= shadow & (texture < 0.2)
    holes |= ndimage.binary_opening(occluded, iterations=1)
    failures = ndimage.gaussian_filter(rng.normal(size=cover.shape), 4.0 / res)
    holes |= failures > 2.5 * failures.std()
    return ndimage.binary_opening(holes, iterations=1)


def _ndvi(cover: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ndvi_values = np.choose(cover, [0.15, 0.45, 0.08, 0.05, 0.75, -0.25]).astype(np.float64)
    return np.clip(ndimage.gaussian_filter(ndvi_values, 1.0) + rng.normal(0, 0.03, size=cover.shape), -1, 1)


def _observe_by_matching(truth_dsm, truth_dtm, cover, radiance, shadow, config, rng, transform) -> SynthScene:
    """``observe`` with errors='sgbm': views rendered and matched, then water as ASP sees it."""
    from .stereo import simulate_stereo

    result = simulate_stereo(truth_dsm, radiance, config.resolution, config.views, rng)
    dsm = result.dsm.astype(np.float64)
    # Specular, moving water gives the matcher nothing stable: ASP leaves it empty almost always.
    water = (cover == WATER) & (rng.random(cover.shape) < 0.97)
    dsm[water] = np.nan
    tri = np.where(np.isnan(dsm), np.nan, result.triangulation_error)
    return SynthScene(
        config=config, transform=transform, crs=CRS.from_user_input(config.crs),
        truth_dsm=truth_dsm.astype(np.float32), truth_dtm=truth_dtm.astype(np.float32), dsm=dsm.astype(np.float32),
        ortho_left=result.ortho_left.astype(np.float32), ortho_right=result.ortho_right.astype(np.float32),
        triangulation_error=tri.astype(np.float32), ndvi=_ndvi(cover, rng).astype(np.float32),
        landcover=cover, shifts={"dx_px": 0.0, "dy_px": 0.0, "dz_m": 0.0},
    )


def render_ortho(radiance: np.ndarray, dz: np.ndarray, view: View, resolution: float) -> np.ndarray:
    """Orthorectify a view of ``radiance`` through a DSM that is wrong by ``dz`` metres.

    The ray through (x, y, z + dz) meets the true surface ``dz·tan(off-nadir)`` away from
    (x, y), on the side opposite to the satellite; nodata in ``dz`` is treated as no error.
    """
    px, py = view.displacement_per_metre()
    dz = np.nan_to_num(dz, nan=0.0)
    rows, cols = np.mgrid[0 : radiance.shape[0], 0 : radiance.shape[1]].astype(np.float64)
    sample_cols = cols - dz * px / resolution
    sample_rows = rows + dz * py / resolution  # north is up: +y is row -1
    # cubic: bilinear sampling blurs by a shift-dependent amount and biases sub-pixel parallax
    return ndimage.map_coordinates(radiance, [sample_rows, sample_cols], order=3, mode="reflect")


def synth_scene(
    out: str | os.PathLike,
    seed: int = 0,
    size: int = 512,
    resolution: float = 1.0,
    config: SynthConfig | None = None,
    terrain: np.ndarray | None = None,
    crs: str | None = None,
    origin: tuple[float, float] | None = None,
) -> dict[str, Path]:
    """Generate a scene and write it as ASP-named rasters plus truth into ``out``.

    Returns the written paths by band name (``dsm``, ``ortho_left``, …, ``truth_dtm``). The
    NDVI is written at twice the pixel size, as a coarser multispectral product would be.
    ``terrain`` (see :func:`generate`), ``crs`` and ``origin`` (upper-left x, y) place the scene
    on real ground.
    """
    config = config or SynthConfig(size=size, resolution=resolution, seed=seed)
    scene = generate(config, terrain)
    if crs is not None:
        scene.crs = CRS.from_user_input(crs)
    if origin is not None:
        scene.transform = from_origin(origin[0], origin[1], config.resolution, config.resolution)
    return write_asp_run(out, scene, {"generator": "deepdem.synth"})


#: Smallest patch without LIDAR returns that ``lidar_landcover`` calls water (m²): a pond.
#: Smaller gaps are dropouts of a sparse or absorbing surface, not water.
WATER_MIN_AREA_M2 = 100.0


def lidar_landcover(truth_dsm: np.ndarray, truth_dtm: np.ndarray, resolution: float,
                    water_min_area_m2: float = WATER_MIN_AREA_M2, object_class: np.ndarray | None = None) -> np.ndarray:
    """Land cover of a LIDAR-gridded surface, for radiometry and strata: trees and buildings
    above 2.5 m, grass elsewhere, and water where the LIDAR has no return over at least
    ``water_min_area_m2`` inside the survey.

    Objects are told apart by the points' classes where the survey classified them
    (``object_class``, ``deepdem lidar``'s object_class.tif), else by their roughness: crowns are
    rough at the metre scale, roofs are planes. Roughness alone is a poor judge of real roofs: on
    the two AHN3 Delft tiles and an IGN Montpellier tile, whose points are classified, it called
    0.2–2.7 % of the cells buildings where the classes make 19–39 % of them buildings (gridded at
    0.5 m), the rest trees: return noise and small roofs make a city's curvature rough.

    A gap that reaches the raster's edge is outside the survey (a trimmed or irregular
    footprint), and a smaller gap is a dropout: both take the cover of the nearest surveyed cell.
    Calling them water would give the stereo DSM holes a real one does not have, and a rim of
    "water" along the survey's edge (a lake cut by the raster's edge is missed, the lesser harm).
    """
    cover = np.full(truth_dsm.shape, GRASS, np.uint8)
    height = np.nan_to_num(truth_dsm - truth_dtm, nan=0.0)
    # Crowns are rough at the metre scale, roofs are planes: the curvature tells them apart.
    roughness = ndimage.gaussian_filter(np.abs(ndimage.laplace(fill_nearest(truth_dsm))), 1.0 / resolution)
    raised = height > 2.5
    cover[raised & (roughness > 0.35 * resolution)] = TREE
    cover[raised & (roughness <= 0.35 * resolution)] = BUILDING
    if object_class is not None:
        from .lidar.products import OBJECT_BUILDING, OBJECT_VEGETATION

        cover[raised & (object_class == OBJECT_BUILDING)] = BUILDING
        cover[raised & (object_class == OBJECT_VEGETATION)] = TREE
    missing = ~np.isfinite(truth_dsm)
    if not missing.any():
        return cover
    nearest = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    cover = cover[tuple(nearest)]
    gaps, _ = ndimage.label(missing)
    is_water = np.bincount(gaps.ravel()) * resolution**2 >= water_min_area_m2
    is_water[0] = False
    is_water[np.concatenate([gaps[0], gaps[-1], gaps[:, 0], gaps[:, -1]])] = False
    cover[is_water[gaps]] = WATER
    return cover


def synth_from_lidar(
    out: str | os.PathLike,
    truth_dsm: str | os.PathLike,
    truth_dtm: str | os.PathLike,
    errors: str = "model",
    seed: int = 0,
    views: tuple[View, View] | None = None,
    object_class: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """An ASP-like run made from a real LIDAR truth (e.g. ``deepdem lidar``'s dsm.tif/dtm.tif,
    and its object_class.tif where the points are classified).

    The land cover comes from :func:`lidar_landcover`, the radiometry from it and the surface's
    shading, the stereo errors from ``errors`` ('model' or 'sgbm', see :func:`observe`). The
    truth is written unchanged (NaN where the LIDAR has none); the stereo products are made from
    it with its gaps filled by the nearest value.
    """
    from .align import read_grid  # nodata to NaN and a usable CRS, as for every input raster

    grid, dsm = read_grid(truth_dsm)
    dtm_grid, dtm = read_grid(truth_dtm)
    transform, crs = grid.transform, grid.crs
    if dtm.shape != dsm.shape or dtm_grid.transform != transform:
        raise InputError(f"DTM grid {dtm.shape} is not the DSM's {dsm.shape}: grid both with the same bounds", truth_dtm)
    if not np.isfinite(dsm).any():
        raise InputError("truth DSM has no valid pixel", truth_dsm)
    resolution = abs(transform.a)
    if not math.isclose(resolution, abs(transform.e), rel_tol=1e-6):
        raise InputError(f"truth DSM pixels are not square ({transform.a} x {transform.e})", truth_dsm)
    # Blunders by area: a small LIDAR patch must not get a whole generated scene's worth.
    config = SynthConfig(size=max(dsm.shape), resolution=resolution, seed=seed, crs=crs.to_wkt(),
                         blunders_per_km2=15.0, **({"views": views} if views else {}))
    rng = np.random.default_rng(seed)
    classes = None
    if object_class is not None:
        class_grid, classes = read_grid(object_class)
        if classes.shape != dsm.shape or class_grid.transform != transform:
            raise InputError(f"object class grid {classes.shape} is not the DSM's {dsm.shape}", object_class)
    cover = lidar_landcover(dsm, dtm, resolution, object_class=classes)
    surface = fill_nearest(dsm.astype(np.float64))
    ground = np.fmin(fill_nearest(np.where(np.isfinite(dtm), dtm, dsm).astype(np.float64)), surface)
    scene = observe(surface, ground, cover, config, rng, transform, errors=errors)
    scene.truth_dsm, scene.truth_dtm = dsm.astype(np.float32), dtm.astype(np.float32)
    return write_asp_run(out, scene, {"generator": "deepdem.synth.synth_from_lidar", "errors": errors,
                                      "truth": [str(Path(truth_dsm).resolve()), str(Path(truth_dtm).resolve())],
                                      "object_class": str(Path(object_class).resolve()) if object_class else None})


def write_asp_run(out: str | os.PathLike, scene: SynthScene, meta: dict) -> dict[str, Path]:
    """Write a scene as ASP-named rasters plus truth, land cover and ``synth.json`` into ``out``."""
    config = scene.config
    t, crs = scene.transform, scene.crs
    h, w = scene.ndvi.shape
    even = h % 2 == 0 and w % 2 == 0
    ndvi_coarse = scene.ndvi.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) if even else scene.ndvi
    ndvi_transform = t @ t.scale(2, 2) if even else t

    def asp(values):
        return np.where(np.isfinite(values), values, FLOAT32_MIN).astype(np.float32)

    out = Path(out)
    with atomic_directory(out) as tmp:
        write_raster(tmp / ASP_FILES["dsm"], asp(scene.dsm), t, crs, FLOAT32_MIN, "stereo DSM")
        write_raster(tmp / ASP_FILES["triangulation_error"], asp(scene.triangulation_error), t, crs, FLOAT32_MIN, "intersection error")
        for band in ("ortho_left", "ortho_right"):
            write_raster(tmp / ASP_FILES[band], getattr(scene, band), t, crs, ORTHO_NODATA, band.replace("_", " "))
        write_raster(tmp / ASP_FILES["ndvi"], ndvi_coarse.astype(np.float32), ndvi_transform, crs, TRUTH_NODATA, "NDVI")
        write_raster(tmp / ASP_FILES["truth_dsm"], scene.truth_dsm, t, crs, TRUTH_NODATA, "truth DSM")
        write_raster(tmp / ASP_FILES["truth_dtm"], scene.truth_dtm, t, crs, TRUTH_NODATA, "truth DTM")
        write_raster(tmp / "landcover.tif", scene.landcover, t, crs, None, "0 bare 1 grass 2 road 3 building 4 tree 5 water")
        meta = {**meta, "config": asdict(config), "shifts": scene.shifts, "files": ASP_FILES}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2, default=str))
    return {band: out / name for band, name in ASP_FILES.items()}
