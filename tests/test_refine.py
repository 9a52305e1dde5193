import importlib
import os

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from deepdem.data import grid_positions
from deepdem.cli import main
from deepdem.errors import CheckpointError
from deepdem.models import DeepDEMRegressionTask, load_checkpoint, save_checkpoint
from deepdem.refine import blend_window, refine, sigma_path
from deepdem.prepare import resample_scene
from deepdem.scene import FLOAT_NODATA, Grid, write_scene

BANDS = ["dsm", "ortho_left", "ortho_right", "triangulation_error", "ndvi", "nodata_mask"]


def zero_residual_task(bands=BANDS, chip_size=64):
    task = DeepDEMRegressionTask({"bands": list(bands), "chip_size": chip_size, "GSF_DICT": {"64": 2.0}})
    head = task.model.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return task.eval()


def read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def test_zero_residual_model_returns_the_input_dsm_exactly(prepared_scene, tmp_path):
    checkpoint = save_checkpoint(zero_residual_task(), tmp_path / "zero.ckpt")
    out = refine(checkpoint, prepared_scene, tmp_path / "refined.tif", progress=False)
    data, profile = read(out)
    dsm = prepared_scene.read("dsm")
    mask = prepared_scene.read("nodata_mask") > 0
    np.testing.assert_array_equal(data[mask], dsm[mask])  # bit for bit
    assert (data[~mask] == FLOAT_NODATA).all()
    assert profile["crs"] == prepared_scene.crs
    assert profile["transform"] == prepared_scene.transform
    assert profile["nodata"] == FLOAT_NODATA and profile["dtype"] == "float32"


def test_fill_gives_every_pixel_a_finite_value(prepared_scene, tmp_path):
    out = refine(zero_residual_task(), prepared_scene, tmp_path / "filled.tif", fill=True, progress=False)
    data, _ = read(out)
    assert (data != FLOAT_NODATA).all() and np.isfinite(data).all()


def test_scene_smaller_than_a_chip_is_padded_and_fully_refined(tmp_path):
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 40, 50)
    rng = np.random.default_rng(0)
    bands = {b: rng.uniform(0, 1, grid.shape).astype(np.float32) for b in BANDS if b != "nodata_mask"}
    bands["dsm"] = 100 + bands["dsm"]
    scene = write_scene(tmp_path / "small", grid, bands)
    task = DeepDEMRegressionTask({"bands": BANDS, "chip_size": 64, "GSF_DICT": {"64": 2.0}}).eval()
    data, _ = read(refine(task, scene, tmp_path / "small.tif", progress=False))
    assert data.shape == (40, 50)
    assert np.isfinite(data).all() and (data != FLOAT_NODATA).all()


def test_edge_chips_stay_inside_the_scene():
    assert grid_positions(200, 64, 32) == [0, 32, 64, 96, 128, 136]
    assert grid_positions(64, 64, 32) == [0]
    assert grid_positions(30, 64, 32) == [0]
    window = blend_window(64)
    assert window.min() > 0 and window.max() == pytest.approx(window[31, 31])


def test_checkpoint_whose_bands_the_scene_lacks_is_refused(tmp_path):
    grid = Grid(CRS.from_epsg(32610), from_origin(0, 100, 1, 1), 64, 64)
    scene = write_scene(tmp_path / "dsm_only", grid, {"dsm": np.full(grid.shape, 5.0, np.float32)})
    with pytest.raises(CheckpointError, match="dsm_only: scene lacks band\\(s\\) ortho_left"):
        refine(zero_residual_task(), scene, tmp_path / "out.tif", progress=False)
    with pytest.raises(CheckpointError, match="lack 'dsm'"):
        refine(zero_residual_task(bands=["ortho_left"]), scene, tmp_path / "out.tif", progress=False)
    with pytest.raises(CheckpointError, match="lacks band\\(s\\) parallax .*prepare the scene with --views"):
        refine(zero_residual_task(bands=["dsm", "parallax"]), scene, tmp_path / "out.tif", progress=False)
    with pytest.raises(CheckpointError, match="lacks band\\(s\\) ortho_correlation .*prepare it again with this version"):
        refine(zero_residual_task(bands=["dsm", "ortho_correlation"]), scene, tmp_path / "out.tif", progress=False)
    assert not (tmp_path / "out.tif").exists()
    no_dsm = save_checkpoint(zero_residual_task(bands=["ortho_left"]), tmp_path / "no_dsm.ckpt")
    with pytest.raises(CheckpointError, match="no_dsm.ckpt: checkpoint bands \\['ortho_left'\\] lack 'dsm'"):
        refine(no_dsm, scene, tmp_path / "out.tif", progress=False)
    assert not (tmp_path / "out.tif").exists()


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_marker",))


def test_checkpoint_with_a_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"hyper_parameters": _Exploit(), "state_dict": {}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt: not a loadable deepdem checkpoint"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned_marker").exists()


# -- scene-scale refinement: streaming, seams, COG, resume, TTA, Dask ----------------------------

from rasterio.transform import Affine  # noqa: E402

from deepdem.data import normalise_chip  # noqa: E402

refine_module = importlib.import_module("deepdem.refine")  # the package (deepdem.refine is the function)


def random_task(seed=0, chip_size=64, **extra):
    torch.manual_seed(seed)
    kwargs = {"bands": BANDS, "chip_size": chip_size, "GSF_DICT": {"64": 2.0}, **extra}
    return DeepDEMRegressionTask(kwargs).eval()


def smooth_scene(path, height, width, seed=0, holes=True, pixel=0.5):
    """A cheap multi-block scene: smooth relief plus noise, and a few nodata holes."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    dsm = 100 + 10 * np.sin(rows / 37.0) * np.cos(cols / 23.0) + rng.normal(0, 0.5, (height, width))
    bands = {
        "dsm": dsm.astype(np.float32),
        "ortho_left": rng.uniform(0, 1, (height, width)).astype(np.float32),
        "ortho_right": rng.uniform(0, 1, (height, width)).astype(np.float32),
        "triangulation_error": rng.uniform(0, 2, (height, width)).astype(np.float32),
        "ndvi": rng.uniform(-1, 1, (height, width)).astype(np.float32),
    }
    if holes:
        bands["dsm"][40:70, 300:340] = np.nan
        bands["ndvi"][500:520, 10:30] = np.nan
    grid = Grid(CRS.from_epsg(32610), from_origin(500000, 5200000, pixel, pixel), height, width)
    return write_scene(path, grid, bands, n_chips=500)


def reference_refine(task, scene, overlap=0.25):
    """The whole scene in memory, chip by chip through ``normalise_chip`` (the seed's scheme)."""
    chip = task.model_kwargs["chip_size"]
    scale = scene.scale_factor(chip)
    arrays = scene.read_stack(BANDS)
    h, w = scene.shape
    stride = int(round(chip * (1 - overlap)))
    weights = blend_window(chip, overlap=overlap)
    res_sum, w_sum = np.zeros((h, w)), np.zeros((h, w))
    for r in grid_positions(h, chip, stride):
        for c in grid_positions(w, chip, stride):
            norm = normalise_chip({b: a[r : r + chip, c : c + chip] for b, a in arrays.items()}, BANDS, scale)
            with torch.inference_mode():
                res = task(torch.from_numpy(norm.inputs[None]))[0, 0].numpy() * scale
            res_sum[r : r + chip, c : c + chip] += weights * res
            w_sum[r : r + chip, c : c + chip] += weights
    out = arrays["dsm"] + res_sum / w_sum
    return np.where(arrays["nodata_mask"] > 0, out, FLOAT_NODATA)


@pytest.fixture(scope="module")
def multi_block_scene(tmp_path_factory):
    return smooth_scene(tmp_path_factory.mktemp("mb") / "scene", 600, 530)


def test_streaming_blocks_equal_the_whole_scene_in_memory(multi_block_scene, tmp_path):
    task = random_task()
    out = refine(task, multi_block_scene, tmp_path / "r.tif", block_size=256, bf16=False, tta=False, progress=False)
    data, _ = read(out)
    expected = reference_refine(task, multi_block_scene)
    assert len(refine_module.plan_blocks(multi_block_scene.shape, 256)) == 9
    np.testing.assert_allclose(data, expected, atol=2e-4)


def test_output_is_a_cloud_optimised_geotiff_on_the_scene_grid(multi_block_scene, tmp_path):
    out = refine(zero_residual_task(), multi_block_scene, tmp_path / "cog.tif", block_size=256, progress=False)
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile["tiled"] and src.compression is not None
        assert src.overviews(1) == [2]
        assert src.descriptions == ("refined DSM (m)",)
        assert (src.crs, src.transform, src.shape) == (multi_block_scene.crs, multi_block_scene.transform, (600, 530))
        assert src.nodata == FLOAT_NODATA and src.dtypes == ("float32",)
        data = src.read(1)
        overview = src.read(1, out_shape=(300, 265))  # served by the overview level
    mask = multi_block_scene.read("nodata_mask") > 0
    heights = multi_block_scene.read("dsm")[mask]
    averaged = overview[overview != FLOAT_NODATA]
    assert averaged.size > 0.9 * 300 * 265 and heights.min() <= averaged.min() and averaged.max() <= heights.max()
    assert (data[~mask] == FLOAT_NODATA).all() and (~mask).sum() == 30 * 40 + 20 * 20
    np.testing.assert_array_equal(data[mask], multi_block_scene.read("dsm")[mask])
    assert not list(tmp_path.glob(".*"))  # no work file or journal left behind


def test_block_chips_are_normalised_like_normalise_chip(multi_block_scene):
    """The per-block shortcut (one normalise_chip call per halo, then a per-chip DSM shift)."""
    chip, scale = 64, multi_block_scene.scale_factor(64)
    settings = refine_module.RefineSettings(bands=tuple(BANDS), chip=chip, stride=48, overlap=0.25, scale=scale,
                                            fallback_mean=0.0, block_size=256, batch_size=4, bf16=False)
    refiner = refine_module.BlockRefiner(random_task(), multi_block_scene, settings)
    seen = []
    refiner._forward = lambda inputs: (seen.append(inputs.copy()), np.zeros((len(inputs), 1, chip, chip), np.float32))[1]
    block = refine_module.plan_blocks(multi_block_scene.shape, 256)[1]  # rows 0-256, cols 256-512: has a hole
    refiner.refine_block(block)
    arrays = multi_block_scene.read_stack(BANDS)
    rows = refine_module.chip_starts(600, chip, 48, block.row0, block.row1)
    cols = refine_module.chip_starts(530, chip, 48, block.col0, block.col1)
    chips = np.concatenate(seen)
    assert len(chips) == len(rows) * len(cols) == 6 * 6
    for i, (r, c) in enumerate((r, c) for r in rows for c in cols):
        expected = normalise_chip({b: a[r : r + chip, c : c + chip] for b, a in arrays.items()}, BANDS, scale).inputs
        np.testing.assert_allclose(chips[i], expected, atol=2e-5)


def test_blocks_are_read_into_one_buffer_per_thread(multi_block_scene):
    """On the CPU a thread loads a block, then runs it: every block reuses the same planes, so
    no block pays the page faults of fresh 100-MB arrays."""
    settings = refine_module.RefineSettings(bands=tuple(BANDS), chip=64, stride=48, overlap=0.25, scale=2.0,
                                            fallback_mean=100.0, block_size=256, device="cpu")
    refiner = refine_module.BlockRefiner(random_task(), multi_block_scene, settings)
    first, second = (refiner.load_block(b, threads=2) for b in refine_module.plan_blocks(multi_block_scene.shape, 256)[:2])
    assert np.shares_memory(first["inputs"], second["inputs"]) and np.shares_memory(first["dsm"], second["dsm"])
    # Block 1 (rows 0-256, cols 256-512) with the chips overlapping it: rows 0-240 and columns
    # 240-432 at the 48-px stride, and 466, the chip that ends on the scene's edge.
    assert second["inputs"].shape == (len(BANDS), 240 + 64, 530 - 240)
    np.testing.assert_array_equal(second["dsm"], multi_block_scene.read("dsm", Window(240, 0, 290, 304)))


def test_one_refiner_shared_by_threads_gives_the_sequential_blocks(multi_block_scene):
    """A threaded Dask worker runs several blocks on its one refiner at once: no shared scratch."""
    from concurrent.futures import ThreadPoolExecutor

    chip, scale = 64, multi_block_scene.scale_factor(64)
    settings = refine_module.RefineSettings(bands=tuple(BANDS), chip=chip, stride=48, overlap=0.25, scale=scale,
                                            fallback_mean=0.0, block_size=256, batch_size=4, bf16=False)
    refiner = refine_module.BlockRefiner(random_task(seed=3), multi_block_scene, settings)
    blocks = refine_module.plan_blocks(multi_block_scene.shape, 256)
    sequential = [refiner.refine_block(b) for b in blocks]
    with ThreadPoolExecutor(3) as pool:
        threaded = list(pool.map(refiner.refine_block, blocks))
    for a, b in zip(sequential, threaded):
        np.testing.assert_array_equal(a, b)


class _Blur(torch.nn.Module):
    """A denoiser with zero padding: residual = blur(dsm channel) − dsm channel.

    Its error grows near chip edges (the padding pulls the blur towards the chip mean): the
    edge effect of a convolutional network that blending has to hide.
    """

    def __init__(self, sigma=1.0, radius=3):
        super().__init__()
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = torch.outer(g, g) / torch.outer(g, g).sum()
        self.conv = torch.nn.Conv2d(1, 1, 2 * radius + 1, padding=radius, bias=False)
        self.conv.weight.data[:] = kernel

    def forward(self, x):
        dsm = x[:, :1]
        return self.conv(dsm) - dsm


def _near_chip_edges(length, chip, stride, width=4):
    idx, dist = np.arange(length), np.full(length, 10**9)
    for p in grid_positions(length, chip, stride):
        for edge in (p, p + chip):
            if 0 < edge < length:  # chip edges inside the scene; the scene's own edges are no seam
                dist = np.minimum(dist, np.minimum(abs(idx - edge), abs(idx - (edge - 1))))
    return dist < width


def seam_ratio(task, scene, tmp_path, overlap, width=4):
    """Error within ``width`` px of chip edges ÷ error at the same pixels when they are chip interiors.

    The scene is refined twice: as it is, and shifted by half a stride (a cropped copy), which
    puts the first run's chip edges in the second run's chip interiors. Comparing the same
    pixels removes the scene's content from the ratio; only the chip layout differs.
    """
    chip = task.model_kwargs["chip_size"]
    stride = int(round(chip * (1 - overlap)))
    off = stride // 2
    arrays = {b: scene.read(b)[off:, off:] for b in scene.bands if b != "nodata_mask"}
    h, w = arrays["dsm"].shape
    shifted = write_scene(tmp_path / f"shifted{overlap}", Grid(scene.crs, scene.transform @ Affine.translation(off, off), h, w),
                          arrays, n_chips=200)
    errors = []
    for name, sc, truth in (("a", scene, scene.read("truth_dsm")[off:, off:]), ("b", shifted, arrays["truth_dsm"])):
        data, _ = read(refine(task, sc, tmp_path / f"{name}{overlap}.tif", overlap=overlap, bf16=False, progress=False))
        data = np.where(data == FLOAT_NODATA, np.nan, data)
        errors.append(np.abs((data[off:, off:] if name == "a" else data) - truth))
    near_a = _near_chip_edges(scene.shape[0], chip, stride, width)[off:, None] | _near_chip_edges(scene.shape[1], chip, stride, width)[None, off:]
    near_b = _near_chip_edges(h, chip, stride, width)[:, None] | _near_chip_edges(w, chip, stride, width)[None, :]
    inside = np.zeros((h, w), bool)
    inside[2 * width : -2 * width, 2 * width : -2 * width] = True
    pixels = near_a & ~near_b & inside & np.isfinite(errors[0]) & np.isfinite(errors[1])
    assert pixels.sum() > 1000
    return float(errors[0][pixels].mean() / errors[1][pixels].mean())


def test_no_seams_error_at_chip_edges_matches_the_interior(prepared_scene, tmp_path):
    task = DeepDEMRegressionTask({"bands": BANDS, "chip_size": 64, "scale_source": "checkpoint", "GSF_DICT": {"64": 1.0}})
    task.model = _Blur()
    task.eval()
    assert seam_ratio(task, prepared_scene, tmp_path, overlap=0.25) <= 1.02
    assert seam_ratio(task, prepared_scene, tmp_path, overlap=0.5) <= 1.02
    assert seam_ratio(task, prepared_scene, tmp_path, overlap=0.0) > 1.05  # unblended: the ratio sees the seams


def kill_after_blocks(monkeypatch, n: int) -> list[int]:
    """Make refine's block commits raise KeyboardInterrupt (a kill) after ``n`` of them; the
    indices of the blocks committed are appended to the returned list."""
    commit, calls = refine_module.output.commit_block, []

    def killed(*args):
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        calls.append(args[3].index)
        commit(*args)

    monkeypatch.setattr(refine_module, "commit_block", killed)
    return calls


def count_blocks(monkeypatch, calls: list[int]) -> None:
    """Let refine commit every block again, appending their indices to ``calls``."""
    commit = refine_module.output.commit_block
    monkeypatch.setattr(refine_module, "commit_block", lambda *args: (calls.append(args[3].index), commit(*args)))


def test_resume_after_a_kill_gives_the_same_bytes(multi_block_scene, tmp_path, monkeypatch):
    task = random_task(seed=1, uncertainty="laplace")
    whole = refine(task, multi_block_scene, tmp_path / "whole.tif", block_size=256, progress=False)

    out = tmp_path / "killed.tif"
    calls = kill_after_blocks(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        refine(task, multi_block_scene, out, block_size=256, progress=False)
    assert not out.exists() and not sigma_path(out).exists()
    work, sigma_work, journal = refine_module.output.work_paths(out)
    assert work.exists() and sigma_work.exists() and len(__import__("json").loads(journal.read_text())["done"]) == 4

    count_blocks(monkeypatch, calls)
    refine(task, multi_block_scene, out, block_size=256, progress=False, resume=True)
    assert sorted(calls) == list(range(9)) and len(calls) == 9  # the 4 finished blocks were not redone
    assert out.read_bytes() == whole.read_bytes()
    assert sigma_path(out).read_bytes() == sigma_path(whole).read_bytes()  # σ survives the kill too
    assert not work.exists() and not sigma_work.exists() and not journal.exists()


def test_resume_with_other_settings_starts_over(multi_block_scene, tmp_path, monkeypatch):
    out = tmp_path / "o.tif"
    commit = refine_module.commit_block

    def fail_after_one(*args):
        commit(*args)
        raise RuntimeError("stop")

    monkeypatch.setattr(refine_module, "commit_block", fail_after_one)
    with pytest.raises(RuntimeError):
        refine(random_task(), multi_block_scene, out, block_size=256, progress=False)
    monkeypatch.setattr(refine_module, "commit_block", commit)
    refine(zero_residual_task(), multi_block_scene, out, block_size=256, progress=False, resume=True)
    data, _ = read(out)
    mask = multi_block_scene.read("nodata_mask") > 0
    np.testing.assert_array_equal(data[mask], multi_block_scene.read("dsm")[mask])


def test_tta_keeps_a_zero_residual_exact_and_changes_a_random_model(prepared_scene, tmp_path):
    out = refine(zero_residual_task(), prepared_scene, tmp_path / "z.tif", tta=True, progress=False)
    data, _ = read(out)
    mask = prepared_scene.read("nodata_mask") > 0
    np.testing.assert_array_equal(data[mask], prepared_scene.read("dsm")[mask])
    plain, _ = read(refine(random_task(), prepared_scene, tmp_path / "p.tif", tta=False, progress=False))
    tta, _ = read(refine(random_task(), prepared_scene, tmp_path / "t.tif", tta=True, progress=False))
    assert np.abs(plain[mask] - tta[mask]).mean() > 1e-3
    sigma_tta = refine(random_task(uncertainty="laplace"), prepared_scene, tmp_path / "s.tif", tta=True, progress=False)
    sigma, _ = read(sigma_path(sigma_tta))
    assert np.isfinite(sigma[mask]).all() and (sigma[mask] > 0).all()
    with rasterio.open(sigma_path(sigma_tta)) as src:
        assert "DEEPDEM_SIGMA_TTA" in src.tags()  # deepdem calibrate refuses it
    with rasterio.open(sigma_path(refine(random_task(uncertainty="laplace"), prepared_scene, tmp_path / "s.tif",
                                         tta=False, progress=False))) as src:
        assert "DEEPDEM_SIGMA_TTA" not in src.tags()


def test_the_eight_views_are_averaged_by_default_on_a_small_scene_only(prepared_scene, tmp_path, monkeypatch):
    task = random_task(uncertainty="laplace")
    for name, tta in (("on", True), ("off", False), ("auto", None)):
        refine(task, prepared_scene, tmp_path / f"{name}.tif", tta=tta, bf16=False, progress=False)
    assert (tmp_path / "auto.tif").read_bytes() == (tmp_path / "on.tif").read_bytes()  # this scene is small
    assert sigma_path(tmp_path / "auto.tif").read_bytes() == sigma_path(tmp_path / "on.tif").read_bytes()
    height, width = prepared_scene.shape
    monkeypatch.setattr(refine_module, "AUTO_TTA_MAX_PIXELS", height * width - 1)  # one pixel too many
    refine(task, prepared_scene, tmp_path / "large.tif", bf16=False, progress=False)
    assert (tmp_path / "large.tif").read_bytes() == (tmp_path / "off.tif").read_bytes()
    with rasterio.open(sigma_path(tmp_path / "large.tif")) as src:
        assert "DEEPDEM_SIGMA_TTA" not in src.tags()


def test_tta_sigma_is_that_of_the_mixture_of_the_eight_views():
    """√(mean σ² + variance of the residuals): views that disagree widen σ."""
    from types import SimpleNamespace

    from deepdem.refine.blocks import BlockRefiner

    residuals = [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]  # view by view, uniform over the chip
    sigmas = [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    views = iter(zip(residuals, sigmas))

    def outputs(x):
        residual, sigma = next(views)
        return torch.cat([torch.full_like(x[:, :1], residual), torch.full_like(x[:, :1], sigma)], dim=1)

    fake = SimpleNamespace(task=SimpleNamespace(targets=["dsm"], has_sigma=True), _outputs=outputs)
    mixed = BlockRefiner._symmetry_mixture(fake, torch.zeros(2, 3, 8, 8))
    assert mixed.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(mixed[:, 0].numpy(), 1.5)
    np.testing.assert_allclose(mixed[:, 1].numpy(), np.sqrt(2.5 + 1.25), rtol=1e-6)  # mean σ² 2.5, variance 1.25


def test_two_dask_workers_give_the_single_process_bytes(multi_block_scene, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    task = random_task(seed=2, uncertainty="laplace")
    single = refine(task, multi_block_scene, tmp_path / "single.tif", block_size=256, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
        spread = refine(task, multi_block_scene, tmp_path / "dask.tif", block_size=256, progress=False, client=client)
        pids = set(client.run(os.getpid).values())
    workers = {t["worker"] for t in stream.data if str(t["key"]).startswith("deepdem-refine-")}  # one task per block
    assert len(workers) == 2 and len(pids) == 2 and os.getpid() not in pids  # two worker processes ran blocks
    assert spread.read_bytes() == single.read_bytes()
    assert sigma_path(spread).read_bytes() == sigma_path(single).read_bytes()


def test_refine_command_writes_the_cog_and_its_hillshade(prepared_scene, tmp_path):
    checkpoint = save_checkpoint(zero_residual_task(), tmp_path / "zero.ckpt")
    out = tmp_path / "cli.tif"
    assert main(["refine", "--checkpoint", str(checkpoint), "--scene", str(prepared_scene.path), "--out", str(out),
                 "--quiet", "--resume", "--hillshade", "multidirectional", "--slope", "--block-size", "256"]) == 0
    with rasterio.open(tmp_path / "cli_hillshade.tif") as src:
        assert src.dtypes == ("uint8",) and src.shape == prepared_scene.shape
    assert (tmp_path / "cli_slope.tif").exists()
    assert main(["refine", "--checkpoint", str(checkpoint), "--scene", str(prepared_scene.path),
                 "--out", str(tmp_path / "chm.tif"), "--quiet", "--chm"]) == 2  # one head: refused


def test_sigma_raster_is_metres_on_the_dsm_grid_with_its_nodata(multi_block_scene, tmp_path):
    task = random_task(seed=3, uncertainty="laplace", sigma_temperature=2.0)
    # one view per chip here and in the next test: they are about σ's raster and threshold, at an
    # eighth of the model time of the 8 views that refine averages by default on a scene this small
    out = refine(task, multi_block_scene, tmp_path / "s.tif", block_size=256, bf16=False, tta=False, progress=False)
    heights, profile = read(out)
    sigma, sigma_profile = read(sigma_path(out))
    assert sigma_path(out).name == "s_sigma.tif"
    for key in ("crs", "transform", "width", "height", "nodata", "dtype"):
        assert sigma_profile[key] == profile[key]
    np.testing.assert_array_equal(sigma == FLOAT_NODATA, heights == FLOAT_NODATA)
    with rasterio.open(sigma_path(out)) as src:
        assert src.tags()["DEEPDEM_SIGMA_DISTRIBUTION"] == "laplace"
    valid = sigma != FLOAT_NODATA
    assert (sigma[valid] > 0).all()
    # A head with a constant σ channel: σ = √2 · (softplus(c) + 1e-3) · scale · temperature everywhere,
    # the blending of equal values changing nothing, and heights still the input DSM.
    constant = random_task(uncertainty="laplace", sigma_temperature=2.0, scale_source="checkpoint")  # scale 2 m
    head = constant.model.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[1] = 0.5
    sigma, _ = read(sigma_path(refine(constant, multi_block_scene, tmp_path / "c.tif", block_size=256, bf16=False,
                                      tta=False, progress=False)))
    expected = np.sqrt(2) * (np.log1p(np.exp(0.5)) + 1e-3) * 2.0 * 2.0
    np.testing.assert_allclose(sigma[valid], expected, rtol=1e-5)
    plain = random_task(seed=3)  # same seed, no σ head: no σ raster, and an old one is removed
    refine(plain, multi_block_scene, out, block_size=256, tta=False, progress=False)
    assert not sigma_path(out).exists()


def test_max_sigma_keeps_the_initial_dsm_or_writes_nodata(multi_block_scene, tmp_path):
    task = random_task(seed=4, uncertainty="laplace")
    base = refine(task, multi_block_scene, tmp_path / "b.tif", block_size=256, bf16=False, tta=False, progress=False)
    heights, _ = read(base)
    sigma, _ = read(sigma_path(base))
    valid = sigma != FLOAT_NODATA
    threshold = float(np.median(sigma[valid]))
    above = valid & (sigma > threshold)
    kept = refine(task, multi_block_scene, tmp_path / "k.tif", block_size=256, bf16=False, tta=False, progress=False,
                  max_sigma=threshold)
    k_heights, _ = read(kept)
    k_sigma, _ = read(sigma_path(kept))
    dsm = multi_block_scene.read("dsm")
    np.testing.assert_array_equal(k_heights[above], dsm[above])  # the initial DSM, bit for bit
    np.testing.assert_array_equal(k_heights[valid & ~above], heights[valid & ~above])
    assert (k_sigma[above] == FLOAT_NODATA).all() and (k_sigma[valid & ~above] == sigma[valid & ~above]).all()
    dropped = refine(task, multi_block_scene, tmp_path / "n.tif", block_size=256, bf16=False, tta=False, progress=False,
                     max_sigma=threshold, above_max_sigma="nodata")
    assert (read(dropped)[0][above] == FLOAT_NODATA).all()
    with pytest.raises(CheckpointError, match="sigma"):
        refine(random_task(), multi_block_scene, tmp_path / "x.tif", progress=False, max_sigma=1.0)


def test_a_scene_at_twice_the_model_pixel_size_is_refined_at_the_model_s(tmp_path):
    scene = smooth_scene(tmp_path / "scene", 150, 130, seed=2, pixel=1.0)  # 1 m pixels
    task = random_task(seed=5, uncertainty="laplace", pixel_size_m=0.5)  # trained at 0.5 m
    out = refine(task, scene, tmp_path / "r.tif", bf16=False, progress=False)
    heights, profile = read(out)
    sigma, sigma_profile = read(sigma_path(out))
    assert heights.shape == scene.shape and profile["transform"] == scene.transform and profile["crs"] == scene.crs
    assert sigma_profile["transform"] == scene.transform
    with rasterio.open(sigma_path(out)) as src:
        assert src.tags()["DEEPDEM_SIGMA_DISTRIBUTION"] == "laplace"
    assert not any(p.name.startswith(".r.tif") for p in tmp_path.iterdir())  # the work folder is gone
    mask = scene.read("nodata_mask") > 0
    assert (heights[~mask] == FLOAT_NODATA).all() and (sigma[~mask] == FLOAT_NODATA).all()

    # the same as resampling to 0.5 m, refining there and averaging each 2 x 2 back
    fine = resample_scene(scene, 0.5, tmp_path / "fine")
    at_half = refine(task, fine, tmp_path / "half.tif", bf16=False, progress=False)
    for ours, theirs in ((heights, read(at_half)[0]), (sigma, read(sigma_path(at_half))[0])):
        blocks = np.where(theirs == FLOAT_NODATA, np.nan, theirs).reshape(150, 2, 130, 2)
        counts = np.isfinite(blocks).sum(axis=(1, 3))
        back = np.nansum(blocks, axis=(1, 3)) / np.maximum(counts, 1)
        np.testing.assert_allclose(ours[mask], back[mask], rtol=1e-5, atol=1e-4)

    # at the scene's own pixel size on request, and always for a model without a pixel size
    own = read(refine(task, scene, tmp_path / "own.tif", bf16=False, progress=False, at_model_pixel_size=False))[0]
    assert np.abs(own[mask] - heights[mask]).mean() > 1e-3
    checkpoint = save_checkpoint(task, tmp_path / "half.ckpt")
    assert main(["refine", "--checkpoint", str(checkpoint), "--scene", str(scene.path), "--out", str(tmp_path / "cli.tif"),
                 "--scene-pixel-size", "--quiet"]) == 0
    own_bf16 = refine(task, scene, tmp_path / "own16.tif", progress=False, at_model_pixel_size=False)  # as the command
    np.testing.assert_array_equal(read(tmp_path / "cli.tif")[0], read(own_bf16)[0])
    task.model_kwargs.pop("pixel_size_m")
    np.testing.assert_array_equal(read(refine(task, scene, tmp_path / "old.tif", bf16=False, progress=False))[0], own)
    # within 20 % of the model's pixel size the scene is refined as it is
    task.model_kwargs["pixel_size_m"] = 0.9
    np.testing.assert_array_equal(read(refine(task, scene, tmp_path / "near.tif", bf16=False, progress=False))[0], own)


def test_a_killed_refine_at_the_model_pixel_size_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    scene = smooth_scene(tmp_path / "scene", 300, 140, seed=4, pixel=1.0)  # 600 x 280 at the model's 0.5 m
    task = random_task(seed=6, uncertainty="laplace", pixel_size_m=0.5)
    whole = refine(task, scene, tmp_path / "whole.tif", block_size=256, progress=False)

    out = tmp_path / "killed.tif"
    calls = kill_after_blocks(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        refine(task, scene, out, block_size=256, progress=False)
    hidden = tmp_path / ".killed.tif.at-0.5m"
    assert not out.exists() and (hidden / "scene" / "scene.json").exists()  # kept for the resume

    count_blocks(monkeypatch, calls)
    refine(task, scene, out, block_size=256, progress=False, resume=True)
    assert sorted(calls) == list(range(6)) and len(calls) == 6  # 3 x 2 blocks of 256 at 0.5 m, 2 not redone
    assert out.read_bytes() == whole.read_bytes()
    assert sigma_path(out).read_bytes() == sigma_path(whole).read_bytes()
    assert not hidden.exists()


class ParallaxEcho(torch.nn.Module):
    """A 'network' whose correction is ``sign`` × the parallax band: −1 corrects the DSM against
    the error the orthos show, +1 moves it along that error."""

    def __init__(self, channel: int, sign: float):
        super().__init__()
        self.channel, self.sign = channel, sign

    def forward(self, x):
        return self.sign * x[:, [self.channel]]


def parallax_echo_task(sign: float):
    bands = [*BANDS[:-1], "parallax", "nodata_mask"]
    task = zero_residual_task(bands=bands)
    task.model = ParallaxEcho(bands.index("parallax"), sign)
    return task


def test_parallax_check_measures_how_the_correction_follows_the_band(prepared_scene):
    from deepdem.refine import RefineSettings
    from deepdem.refine.agreement import correction_agreement

    bands = [*BANDS[:-1], "parallax", "nodata_mask"]
    settings = RefineSettings(bands=tuple(bands), chip=64, stride=48, overlap=0.25, scale=2.0, fallback_mean=0.0,
                              block_size=256, bf16=False, device="cpu")
    against = correction_agreement(parallax_echo_task(-1.0), prepared_scene, settings)
    along = correction_agreement(parallax_echo_task(1.0), prepared_scene, settings)
    assert against.correlation == pytest.approx(1.0, abs=1e-4) and along.correlation == pytest.approx(-1.0, abs=1e-4)
    assert against.passed and not along.passed
    # the sample is the whole of a scene this small: every pixel with a band and an output
    assert against.pixels == along.pixels > 0.8 * np.isfinite(prepared_scene.read("parallax")).sum()
    # a model without the band, or without a DSM head, is not checked
    without_band = RefineSettings(**{**settings.__dict__, "bands": tuple(BANDS)})
    assert correction_agreement(zero_residual_task(), prepared_scene, without_band) is None
    dtm_only = RefineSettings(**{**settings.__dict__, "targets": ("dtm",)})
    assert correction_agreement(parallax_echo_task(1.0), prepared_scene, dtm_only) is None


def test_parallax_check_keeps_the_initial_dsm_where_the_correction_runs_along_the_error(prepared_scene, tmp_path,
                                                                                        caplog):
    dsm, parallax = prepared_scene.read("dsm"), prepared_scene.read("parallax")
    following, _ = read(refine(parallax_echo_task(-1.0), prepared_scene, tmp_path / "f.tif", bf16=False,
                               progress=False))
    valid = following != FLOAT_NODATA
    ok = valid & np.isfinite(parallax)
    assert np.corrcoef((following - dsm)[ok], -parallax[ok])[0, 1] > 0.99  # written as the model gave it
    with caplog.at_level("WARNING", logger="deepdem.refine.agreement"):
        kept, _ = read(refine(parallax_echo_task(1.0), prepared_scene, tmp_path / "a.tif", bf16=False,
                              progress=False))
    assert "does not transfer" in caplog.text and "correlation -1.00" in caplog.text
    np.testing.assert_array_equal(kept != FLOAT_NODATA, valid)  # the same pixels written...
    np.testing.assert_array_equal(kept[valid], dsm[valid])  # ...with the initial DSM, bit for bit
    unchecked, _ = read(refine(parallax_echo_task(1.0), prepared_scene, tmp_path / "u.tif", bf16=False,
                               progress=False, parallax_check=False))
    assert np.corrcoef((unchecked - dsm)[ok], -parallax[ok])[0, 1] < -0.99
    # the verdict travels with the output, where the check ran
    from deepdem.refine.agreement import CHECK_TAG

    verdicts = {}
    for name in ("f", "a", "u"):
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            verdicts[name] = src.tags().get(CHECK_TAG, "")
    assert verdicts["f"].startswith("passed (correlation") and "+1.00" in verdicts["f"]
    assert verdicts["a"].startswith("failed: the DSM bands are the initial DSM (") and "-1.00 on" in verdicts["a"]
    assert verdicts["u"] == ""


def test_parallax_check_at_the_models_pixel_size_keeps_the_scenes_own_dsm(prepared_scene, tmp_path):
    """A scene refined at the model's pixel size and brought back: where the check fails, the
    output is the scene's DSM itself, not the DSM resampled there and back."""
    from deepdem.refine.agreement import CHECK_TAG

    task = parallax_echo_task(1.0)
    task.model_kwargs["pixel_size_m"] = prepared_scene.grid.pixel_size_m / 2  # trained at half the scene's
    out = refine(task, prepared_scene, tmp_path / "a.tif", bf16=False, progress=False)
    kept, profile = read(out)
    dsm = prepared_scene.read("dsm")
    valid = kept != FLOAT_NODATA
    assert profile["width"] == prepared_scene.shape[1] and valid.sum() > 0.8 * np.isfinite(dsm).sum()
    np.testing.assert_array_equal(kept[valid], dsm[valid])
    with rasterio.open(out) as src:
        assert src.tags()[CHECK_TAG].startswith("failed")


def test_parallax_check_samples_windows_inside_the_scene_and_over_all_of_a_small_one():
    from deepdem.refine.agreement import SAMPLE_GRID, sample_blocks

    assert [(b.row0, b.row1, b.col0, b.col1) for b in sample_blocks((192, 150))] == [(0, 192, 0, 150)]
    large = sample_blocks((10_000, 600))
    assert len(large) == SAMPLE_GRID * 3
    assert all(0 <= b.row0 < b.row1 <= 10_000 and 0 <= b.col0 < b.col1 <= 600 for b in large)
    assert {b.row0 for b in large} == {0, 3248, 6496, 9744} and {b.col0 for b in large} == {0, 172, 344}
