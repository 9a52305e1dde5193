import numpy as np
import pytest
import rasterio
from skimage.registration import phase_cross_correlation

from deepdem.io import FLOAT32_MIN
from deepdem.synth import BUILDING, TREE, WATER, SynthConfig, View, fractal_surface, generate, render_ortho


@pytest.fixture(scope="module")
def scene():
    return generate(SynthConfig(seed=5, size=192))


def test_generation_is_deterministic_per_seed(scene):
    again = generate(SynthConfig(seed=5, size=192))
    np.testing.assert_array_equal(again.dsm, scene.dsm)
    np.testing.assert_array_equal(again.ortho_left, scene.ortho_left)
    other = generate(SynthConfig(seed=6, size=192))
    assert not np.allclose(np.nan_to_num(other.truth_dsm), np.nan_to_num(scene.truth_dsm))


def test_truth_has_buildings_trees_and_water_above_or_on_the_terrain(scene):
    cover = scene.landcover
    for code in (BUILDING, TREE, WATER):
        assert (cover == code).sum() > 50
    assert (scene.truth_dsm >= scene.truth_dtm - 1e-4).all()
    height = scene.truth_dsm - scene.truth_dtm
    assert np.median(height[cover == BUILDING]) > 3.0
    assert np.median(height[cover == TREE]) > 5.0
    water = scene.truth_dtm[cover == WATER]
    assert water.max() - water.min() < 1e-3  # a lake is flat


def test_initial_dsm_has_asp_like_errors(scene):
    error = scene.dsm - scene.truth_dsm
    holes = np.isnan(scene.dsm)
    assert 0.03 < holes.mean() < 0.35
    assert holes[scene.landcover == WATER].mean() > 0.9  # stereo fails on water
    trees = (scene.landcover == TREE) & ~holes
    assert np.median(error[trees]) < -1.0  # canopies are underestimated
    bare = (scene.landcover <= 1) & ~holes
    assert 0.2 < np.nanmedian(np.abs(error[bare])) < 3.0
    assert np.isnan(scene.triangulation_error[holes]).all()
    # the triangulation error tracks the true error
    valid = ~holes
    rho = np.corrcoef(np.abs(error[valid]), scene.triangulation_error[valid])[0, 1]
    assert rho > 0.3


def test_parallax_between_orthos_grows_with_height_error():
    rng = np.random.default_rng(0)
    radiance = 0.3 + 0.1 * fractal_surface(rng, (128, 128), beta=1.5)
    left, right = View(270.0, 20.0), View(90.0, 20.0)  # an across-track pair: parallax along x
    expected_per_metre = (np.tan(np.radians(20.0)) * 2)  # px per metre at 1 m resolution
    measured = []
    for dz in (0.0, 1.0, 2.0, 4.0):
        a = render_ortho(radiance, np.full(radiance.shape, dz), left, 1.0)
        b = render_ortho(radiance, np.full(radiance.shape, dz), right, 1.0)
        shift, _, _ = phase_cross_correlation(a[16:-16, 16:-16], b[16:-16, 16:-16], upsample_factor=20)
        measured.append(abs(shift[1]))
        assert abs(shift[0]) < 0.1  # no parallax across the baseline
        # phase correlation's sub-pixel estimate is good to about 0.2 px
        assert abs(shift[1]) == pytest.approx(dz * expected_per_metre, abs=0.25)
    assert measured == sorted(measured) and measured[0] < 0.05


def test_files_use_asp_names_and_nodata(synth_dir):
    with rasterio.open(synth_dir / "run-DEM.tif") as src:
        assert src.nodata == FLOAT32_MIN
        data = src.read(1)
        assert (data == FLOAT32_MIN).any()
        assert src.crs.to_epsg() == 32610
    with rasterio.open(synth_dir / "ndvi.tif") as src, rasterio.open(synth_dir / "run-DEM.tif") as dem:
        assert src.res == (2 * dem.res[0], 2 * dem.res[1])  # coarser NDVI, resampled by prepare
