"""Derived products of a DEM: hillshade and slope (numpy; there is no gdaldem here)."""

from __future__ import annotations

import numpy as np


def slope_degrees(dem: np.ndarray, resolution: float | tuple[float, float]) -> np.ndarray:
    """Slope in degrees by central differences; NaN where the DEM or a neighbour is NaN."""
    res_x, res_y = (resolution, resolution) if np.isscalar(resolution) else resolution
    dzdy, dzdx = np.gradient(np.asarray(dem, dtype=np.float64), res_y, res_x)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy)))


def hillshade(
    dem: np.ndarray,
    resolution: float | tuple[float, float],
    azimuth: float = 315.0,
    altitude: float = 45.0,
    z_factor: float = 1.0,
) -> np.ndarray:
    """Hillshade in [0, 1] with gdaldem's conventions (azimuth clockwise from north, light
    from the north-west by default); NaN where the DEM has no data."""
    res_x, res_y = (resolution, resolution) if np.isscalar(resolution) else resolution
    dem = np.asarray(dem, dtype=np.float64) * z_factor
    dzdrow, dzdx = np.gradient(dem, res_y, res_x)
    dzdy = -dzdrow  # rows run south
    az, alt = np.radians(azimuth), np.radians(altitude)
    light = np.array([np.sin(az) * np.cos(alt), np.cos(az) * np.cos(alt), np.sin(alt)])
    norm = np.sqrt(dzdx**2 + dzdy**2 + 1.0)
    shade = (-dzdx * light[0] - dzdy * light[1] + light[2]) / norm
    return np.clip(shade, 0.0, 1.0)


def multidirectional_hillshade(dem: np.ndarray, resolution, altitude: float = 45.0) -> np.ndarray:
    """Mean of hillshades lit from 225°, 270°, 315° and 360° (reveals relief in every direction)."""
    return np.mean([hillshade(dem, resolution, az, altitude) for az in (225.0, 270.0, 315.0, 360.0)], axis=0)
