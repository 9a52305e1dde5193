import json

import numpy as np
import pytest
import rasterio

from conftest import shared_data_dir
from deepdem.cli import main
from deepdem.coregister import (coregister_arrays, coregister_dems, nmad, reproject_dem, shift_on_grid,
                                stable_ground)
from deepdem.scene import Scene

DEMS = shared_data_dir() / "dems"
COPERNICUS = DEMS / "Copernicus_DSM_10_N45_00_E005_00_DEM.tif"
BLURRED = DEMS / "Copernicus_blurred_and_shifted.tif"
needs_dems = pytest.mark.skipif(not COPERNICUS.exists(), reason=f"real DEMs not found in {DEMS} (set DEEPDEM_DATA)")


@needs_dems
def test_known_shift_of_a_real_dem_is_recovered_within_a_tenth_of_a_pixel():
    # The Copernicus tile is in EPSG:4326: Nuth & Kääb relates dh to tan(slope), which needs
    # horizontal and vertical units alike, so it is reprojected to UTM 31N (200 m) first.
    ref, transform, crs = reproject_dem(COPERNICUS, "EPSG:32631", resolution=200.0)
    applied = (0.37 * 200.0, -0.52 * 200.0, 3.0)  # metres east, north, up
    moved = shift_on_grid(ref, transform, crs, applied[0], applied[1], "cubic") + applied[2]
    result = coregister_arrays(ref, moved, transform, crs)
    # the correction is the opposite of the displacement
    assert result.shift_x_px == pytest.approx(-0.37, abs=0.1)
    assert result.shift_y_px == pytest.approx(0.52, abs=0.1)
    assert result.shift_z == pytest.approx(-3.0, abs=0.5)
    assert result.nmad_after < result.nmad_before / 2
    print("applied", applied, "recovered", result.summary())


@needs_dems
def test_blurred_and_shifted_copernicus_gets_closer_to_its_reference():
    # demcompare's authors filled the shifted border with 0 m: not a height.
    result = coregister_dems(COPERNICUS, BLURRED, crs="EPSG:32631", resolution=200.0, dem_nodata=0)
    print(result.summary())
    assert result.nmad_after < 0.3 * result.nmad_before
    assert np.hypot(result.shift_x_px, result.shift_y_px) > 1.0  # a real, several-pixel shift
    assert json.loads(json.dumps(result.to_json()))["shift_x"] == pytest.approx(result.shift_x)


def test_stable_ground_excludes_vegetation_water_and_steep_slopes():
    dem = np.zeros((40, 40), np.float32)
    dem[:, 30:] = np.arange(10, dtype=np.float32) * 5.0  # 5 m per 1 m pixel: 79 degrees
    ndvi = np.full(dem.shape, 0.1, np.float32)
    ndvi[:10] = 0.7  # trees
    ndvi[10:15] = -0.3  # water
    ndvi[15:20] = np.nan  # unknown: kept on slope alone
    mask = stable_ground(dem, (1.0, 1.0), ndvi)
    assert not mask[:15].any() and mask[15:, :28].all() and not mask[:, 31:].any()


def test_nmad_of_a_normal_sample():
    rng = np.random.default_rng(1)
    assert nmad(rng.normal(5, 2.0, 200_000)) == pytest.approx(2.0, rel=0.02)


def test_prepare_coregister_recovers_the_synthetic_shift(capsys, synth_dir, tmp_path):
    code = main(["prepare", "--asp-prefix", str(synth_dir / "run"), "--truth", str(synth_dir / "truth_dsm.tif"),
                 "--coregister", "--out", str(tmp_path / "scene")])
    out = capsys.readouterr().out
    assert code == 0 and "co-registration shift" in out
    shifts = json.loads((synth_dir / "synth.json").read_text())["shifts"]
    coreg = Scene.open(tmp_path / "scene").manifest["provenance"]["coregistration"]
    # synth moved the DSM by +dx px (east) and +dy px (down the rows); the correction undoes it.
    # 0.35 px: a 192 px scene whose stereo DSM has fattened building edges and missed canopy
    # (not a pure shift), with ~5,000 stable pixels; the pure-shift case is tested above to 0.1 px.
    assert coreg["shift_x_px"] == pytest.approx(-shifts["dx_px"], abs=0.35)
    assert coreg["shift_y_px"] == pytest.approx(shifts["dy_px"], abs=0.35)
    assert coreg["nmad_after"] < coreg["nmad_before"]
    assert coreg["applied_to"] == ["dsm", "ortho_left", "ortho_right", "triangulation_error"]
    print(coreg, shifts)


def test_a_diverging_coregistration_is_reported_not_applied(capsys, synth_dir, tmp_path):
    # Almost no stable ground (slope < 12 degrees by Horn's method and NDVI < 0.2): Nuth & Kääb runs away.
    code = main(["prepare", "--asp-prefix", str(synth_dir / "run"), "--truth", str(synth_dir / "truth_dsm.tif"),
                 "--coregister", "--coregister-max-slope", "12", "--coregister-max-ndvi", "0.2",
                 "--out", str(tmp_path / "scene")])
    assert code == 0
    scene = Scene.open(tmp_path / "scene")
    coreg = scene.manifest["provenance"]["coregistration"]
    assert coreg["applied_to"] == [] and coreg["nmad_after"] > coreg["nmad_before"]
    assert "NOT applied" in capsys.readouterr().out
    with rasterio.open(synth_dir / "run-DEM.tif") as src:
        original = src.read(1)
    valid = np.isfinite(scene.read("dsm"))
    np.testing.assert_allclose(scene.read("dsm")[valid], original[valid], atol=1e-4)
