import numpy as np
import pytest
import rasterio
from scipy import ndimage
from scipy.stats import spearmanr
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
    # The triangulation error ranks the errors about as well as a real matcher's map does
    # (Spearman 0.27-0.64 on the LIDAR sites of bench/synth_errors.py), not as well as the error
    # itself would: it is drawn from the error's causes.
    valid = ~holes
    rho = spearmanr(np.abs(error[valid]), scene.triangulation_error[valid])[0]
    assert 0.2 < rho < 0.6
    raised = scene.truth_dsm - scene.truth_dtm
    edges = ndimage.morphological_gradient(raised, size=3) > 2.0
    open_flat = (scene.landcover <= 1) & ~ndimage.binary_dilation(edges, iterations=3)
    tri = scene.triangulation_error
    assert np.nanmedian(tri[edges & valid]) > 2 * np.nanmedian(tri[open_flat & valid])


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


def _lidar_like_truth(tmp_path, size=128, resolution=0.5):
    """A gridded-LIDAR-like truth: a gentle slope, a 9 m flat-roofed building, a rough tree
    crown, a patch without returns (water) and a strip outside the survey, written as dsm.tif/dtm.tif."""
    from rasterio.transform import from_origin

    from deepdem.io import write_raster

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size].astype(float)
    dtm = 50.0 + 0.05 * cols * resolution
    dsm = dtm.copy()
    dsm[20:50, 20:60] = dtm[20:50, 20:60].max() + 9.0
    crown = (rows - 90) ** 2 + (cols - 90) ** 2 < 15**2
    dsm[crown] = dtm[crown] + 12.0 + rng.normal(0, 1.5, crown.sum())
    dsm[100:120, 10:40] = np.nan
    dsm[:, -6:] = np.nan  # outside the survey
    transform = from_origin(700000.0, 6600000.0, resolution, resolution)
    for name, values in (("dsm", dsm), ("dtm", dtm)):
        write_raster(tmp_path / f"{name}.tif", np.where(np.isfinite(values), values, -9999.0).astype(np.float32),
                     transform, "EPSG:2154", -9999.0, name)
    return dsm, dtm


@pytest.mark.parametrize("errors", ["model", "sgbm"])
def test_synth_from_lidar_keeps_the_truth_and_degrades_it(tmp_path, errors):
    from deepdem.prepare import read_grid
    from deepdem.synth import synth_from_lidar

    dsm, dtm = _lidar_like_truth(tmp_path)
    paths = synth_from_lidar(tmp_path / "run", tmp_path / "dsm.tif", tmp_path / "dtm.tif", errors=errors, seed=1)
    grid, truth = read_grid(paths["truth_dsm"])
    assert grid.crs.to_epsg() == 2154 and grid.shape == dsm.shape
    np.testing.assert_allclose(truth, dsm.astype(np.float32), equal_nan=True)  # the truth is written unchanged
    _, initial = read_grid(paths["dsm"])
    _, tri = read_grid(paths["triangulation_error"])
    error = initial - dsm
    valid = np.isfinite(error)
    assert np.isnan(initial[100:120, 10:40]).mean() > 0.9  # no LIDAR return: water, no match either
    assert np.isnan(initial[:, -6:]).mean() < 0.5  # outside the survey: no truth, but no water either
    assert 0.02 < np.isnan(initial).mean() < 0.6
    assert np.array_equal(np.isnan(tri), np.isnan(initial))
    flat = valid & (dsm - dtm < 0.5)
    flat[:, :8] = flat[:, -8:] = False
    assert np.median(np.abs(error[flat])) < 1.0  # open ground: matching noise, not blunders
    cover = rasterio.open(paths["dsm"].parent / "landcover.tif").read(1)
    assert (cover[25:45, 25:55] == BUILDING).mean() > 0.8
    assert (cover[85:95, 85:95] == TREE).mean() > 0.8


def test_lidar_landcover_calls_only_a_large_gap_inside_the_survey_water():
    from deepdem.synth import GRASS, lidar_landcover

    dtm = np.full((100, 100), 10.0)
    dsm = dtm.copy()
    dsm[35:75, 35:75] = 20.0  # a flat roof
    dsm[:, 90:] = np.nan  # outside the survey: 0.5 m × 10 px along the edge
    dsm[10:30, 10:30] = np.nan  # a pond, 100 m² at 0.5 m
    dsm[80:84, 20:24] = np.nan  # a dropout, 4 m²
    dsm[54:57, 54:57] = np.nan  # a dropout on the roof
    cover = lidar_landcover(dsm, dtm, 0.5)
    assert (cover == WATER).sum() == 400 and (cover[10:30, 10:30] == WATER).all()
    assert (cover[:, 90:] == GRASS).all() and (cover[80:84, 20:24] == GRASS).all()
    assert (cover[54:57, 54:57] == BUILDING).all()  # the nearest surveyed cell's cover
    assert (lidar_landcover(dsm, dtm, 0.5, water_min_area_m2=101.0) == WATER).sum() == 0


def test_lidar_landcover_takes_the_points_classes_over_roughness():
    from deepdem.lidar.products import OBJECT_BUILDING, OBJECT_NONE, OBJECT_VEGETATION
    from deepdem.synth import GRASS, lidar_landcover

    rng = np.random.default_rng(0)
    dtm = np.full((80, 80), 10.0)
    dsm = dtm.copy()
    dsm[10:30, 10:30] = 20.0 + rng.normal(0, 0.3, (20, 20))  # a roof whose returns are noisy
    dsm[50:70, 50:70] = 18.0  # a smooth hedge top
    dsm[10:30, 50:70] = 20.0 + rng.normal(0, 0.3, (20, 20))  # rough, unclassified
    classes = np.full(dsm.shape, OBJECT_NONE, np.uint8)
    classes[10:30, 10:30], classes[50:70, 50:70] = OBJECT_BUILDING, OBJECT_VEGETATION
    by_roughness = lidar_landcover(dsm, dtm, 0.5)
    assert (by_roughness[12:28, 12:28] == TREE).mean() > 0.9 and (by_roughness[56:64, 56:64] == BUILDING).all()
    cover = lidar_landcover(dsm, dtm, 0.5, object_class=classes)
    assert (cover[10:30, 10:30] == BUILDING).all() and (cover[50:70, 50:70] == TREE).all()
    assert (cover[12:28, 52:68] == by_roughness[12:28, 52:68]).all()  # no class: roughness decides
    assert (cover[dsm - dtm < 2.5] == GRASS).all()  # a class on the ground changes nothing
    classes[40:45, 0:5] = OBJECT_BUILDING
    assert (lidar_landcover(dsm, dtm, 0.5, object_class=classes)[40:45, 0:5] == GRASS).all()


def test_synth_from_lidar_refuses_mismatched_grids(tmp_path):
    from rasterio.transform import from_origin

    from deepdem.errors import InputError
    from deepdem.io import write_raster
    from deepdem.synth import synth_from_lidar

    _lidar_like_truth(tmp_path)
    write_raster(tmp_path / "small.tif", np.zeros((64, 64), np.float32), from_origin(700000.0, 6600000.0, 0.5, 0.5),
                 "EPSG:2154", -9999.0, "dtm")
    with pytest.raises(InputError, match="small.tif: DTM grid"):
        synth_from_lidar(tmp_path / "run", tmp_path / "dsm.tif", tmp_path / "small.tif")
    with pytest.raises(InputError, match="errors must be one of model, sgbm"):
        synth_from_lidar(tmp_path / "run", tmp_path / "dsm.tif", tmp_path / "dsm.tif", errors="noise")
    assert not (tmp_path / "run").exists()
