from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepdem.errors import CheckpointError
from deepdem.models import (DeepDEMRegressionTask, ResDepthUNet, build_network, default_encoder_depth, export_safetensors,
                            load_checkpoint, masked_gradient_l1, output_layer, save_checkpoint)


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "ResDepth"])
def test_networks_by_name_map_chips_to_one_residual_per_target(arch):
    net = build_network(arch, "resnet18", in_channels=3, classes=2).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2, 64, 64)


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
def test_a_shallower_encoder_drops_the_deepest_stage_and_keeps_the_output(arch):
    full = build_network(arch, "resnet18", in_channels=3, classes=2)
    shallow = build_network(arch, "resnet18", in_channels=3, classes=2, encoder_depth=4).eval()
    # resnet18's last stage alone holds 8.4 M of its 11.2 M weights
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in shallow.parameters()) > 5_000_000
    with torch.no_grad():
        assert shallow(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    if arch == "Unet":  # the finest decoder blocks keep their widths: the output layer reads 16 channels
        assert output_layer(shallow).in_channels == output_layer(full).in_channels == 16


def test_a_shallower_encoder_is_refused_where_the_decoder_would_change_the_chip_size():
    with pytest.raises(CheckpointError, match="encoder depth 4 needs a decoder of one block per encoder stage"):
        build_network("FPN", encoder_depth=4)


def test_the_default_encoder_depth_is_shallow_only_where_the_decoder_can_follow():
    assert default_encoder_depth("Unet") == default_encoder_depth("UnetPlusPlus") == 3
    assert default_encoder_depth("FPN") == default_encoder_depth("DeepLabV3Plus") == default_encoder_depth("ResDepth") == 5
    # each one builds, and keeps the chip's size
    for arch in ("UnetPlusPlus", "FPN"):
        net = build_network(arch, in_channels=3, encoder_depth=default_encoder_depth(arch)).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_checkpoints_rebuild_the_encoder_depth_they_were_trained_with(tmp_path):
    task = _task(encoder_depth=4, uncertainty="laplace", sigma_head="branch").eval()
    loaded = load_checkpoint(save_checkpoint(task, tmp_path / "m.ckpt")).eval()
    inputs = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), task(inputs))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in task.parameters())


def test_resdepth_has_five_levels_of_64_to_512_filters_and_any_chip_size():
    net = ResDepthUNet(in_channels=1).eval()
    widths = [level[0].out_channels for level in net.encoder]
    assert widths == [64, 128, 256, 512, 512]
    assert all(isinstance(level[1], torch.nn.BatchNorm2d) for level in net.encoder)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 72, 40)).shape == (2, 1, 72, 40)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown architecture 'Nope'"):
        build_network("Nope")


def _task(**extra):
    return DeepDEMRegressionTask({"bands": ["dsm", "ortho_left"], "chip_size": 64, **extra})


def test_safetensors_export_loads_without_pickle(tmp_path, monkeypatch):
    task = _task(target="both")
    weights, meta = export_safetensors(task, tmp_path / "model")
    assert weights.name == "model.safetensors" and meta.name == "model.json"

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used for safetensors")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_checkpoint(weights)
    assert loaded.model_kwargs["target"] == "both"
    for (name, a), b in zip(task.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_pickle_payload_planted_in_a_real_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(_task(), tmp_path / "good.ckpt")
    payload = torch.load(path, weights_only=True)
    payload["hyper_parameters"]["model_kwargs"]["extra"] = _Exploit()
    torch.save(payload, tmp_path / "planted.ckpt")
    marker = tmp_path / "ran"
    _Exploit.marker = str(marker)
    with pytest.raises(CheckpointError, match="planted.ckpt: not a loadable deepdem checkpoint"):
        load_checkpoint(tmp_path / "planted.ckpt")
    assert not marker.exists()
    assert load_checkpoint(path).model_kwargs["bands"] == ["dsm", "ortho_left"]


class _Exploit:
    marker = "ran"

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(_task(), tmp_path / "m.ckpt")
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        load_checkpoint(tmp_path / "cut.ckpt")


def test_residual_is_added_to_the_dsm_in_metres():
    task = _task().eval()
    batch = {"inputs": torch.zeros(1, 2, 64, 64), "base": torch.full((1, 1, 64, 64), 100.0),
             "scale": torch.full((1, 1, 1, 1), 4.0)}
    with torch.no_grad():
        residual = task(batch["inputs"])
        heights = task.predict_heights(batch)
    np.testing.assert_allclose(heights.numpy(), (residual * 4.0 + 100.0).numpy(), rtol=1e-6)


@pytest.mark.parametrize("arch", ["Unet", "ResDepth"])
def test_identity_init_returns_the_input_dsm_until_trained(arch):
    task = DeepDEMRegressionTask({"bands": ["dsm", "ortho_left"], "chip_size": 64, "arch": arch,
                                  "identity_init": True}).eval()
    batch = {"inputs": torch.randn(2, 2, 64, 64), "base": torch.full((2, 1, 64, 64), 100.0),
             "scale": torch.full((2, 1, 1, 1), 4.0)}
    with torch.no_grad():
        assert torch.equal(task.predict_heights(batch), batch["base"])
    random_head = DeepDEMRegressionTask({"bands": ["dsm", "ortho_left"], "chip_size": 64, "arch": arch}).eval()
    with torch.no_grad():
        assert (random_head.predict_heights(batch) - batch["base"]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["Unet", "ResDepth"])
def test_sigma_branch_trains_alone_and_leaves_the_network_of_a_model_without_sigma(arch):
    torch.manual_seed(0)
    with_sigma = _task(arch=arch, target="both", uncertainty="laplace", sigma_head="branch", identity_init=True)
    torch.manual_seed(0)
    without = _task(arch=arch, target="both", identity_init=True)
    # Same seed, same network: the branch draws its weights from a generator of its own.
    shared = without.state_dict()
    assert all(torch.equal(with_sigma.state_dict()[name], weights) for name, weights in shared.items())
    assert {n.split(".")[0] for n in with_sigma.state_dict()} - {n.split(".")[0] for n in shared} == {"sigma_branch"}
    inputs = torch.randn(2, 2, 96, 96)  # not a multiple of 32: ResDepth pads and crops
    with_sigma.eval()
    without.eval()
    raw = with_sigma(inputs)
    assert raw.shape == (2, 4, 96, 96)  # two residuals, then two σ
    assert torch.equal(raw[:, :2], without(inputs))
    # identity init: the heights are the input DSM and σ starts at b = ln 2 (softplus of 0)
    assert torch.equal(raw[:, 2:], torch.zeros_like(raw[:, 2:]))
    with torch.no_grad():
        with_sigma.sigma_branch.layers[-1].weight.normal_()  # a σ that depends on its inputs
    with_sigma(inputs)[:, 2:].square().sum().backward()
    moved = {n for n, p in with_sigma.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("sigma_branch.") for n in moved), moved


def test_sigma_branch_trains_on_a_quarter_of_the_batch_and_validates_on_all_of_it():
    """The σ branch's cost comes out of the network's training steps: it sees ceil(B/4) chips
    of a training batch, every chip in validation and inference; the heights see every chip."""
    from deepdem.models import SIGMA_TRAINING_SHARE

    torch.manual_seed(0)
    task = _task(target="dsm", uncertainty="laplace", sigma_head="branch")
    seen = []
    task.sigma_branch.register_forward_hook(lambda module, args, output: seen.append(output.shape[0]))
    task._trainer = SimpleNamespace(world_size=1)
    task.log = lambda *args, **kwargs: None
    batch = {"inputs": torch.randn(10, 2, 64, 64), "base": torch.zeros(10, 1, 64, 64),
             "scale": torch.full((10, 1, 1, 1), 2.0), "target": torch.randn(10, 1, 64, 64),
             "valid": torch.ones(10, 1, 64, 64, dtype=torch.bool)}
    assert SIGMA_TRAINING_SHARE == 0.25
    loss = task._shared_step(batch, "train")
    loss.backward()
    assert seen == [3]  # ceil(10 / 4)
    assert all(p.grad is not None for p in task.sigma_branch.parameters())
    # the L1 of all 10 chips reaches the network: its gradient differs from that of the first 3 alone
    whole = output_layer(task.model).weight.grad.clone()
    task.zero_grad()
    task._shared_step({key: value[:3] for key, value in batch.items()}, "train").backward()
    assert not torch.allclose(whole, output_layer(task.model).weight.grad)
    task.eval()
    with torch.no_grad():
        heights, sigma = task.predict(batch)
    assert seen[-1] == 10 and sigma.shape == heights.shape == (10, 1, 64, 64)


def test_checkpoints_keep_their_sigma_head_joint_from_before_the_branch_or_branched(tmp_path):
    inputs = torch.randn(1, 2, 64, 64)
    joint = _task(uncertainty="laplace")  # a checkpoint from before the branch: no "sigma_head"
    assert joint.sigma_branch is None and joint(inputs).shape[1] == 2  # one output layer for both
    branched = _task(uncertainty="laplace", sigma_head="branch")
    for task in (joint, branched):
        loaded = load_checkpoint(save_checkpoint(task, tmp_path / "m.ckpt")).eval()
        with torch.no_grad():
            assert torch.equal(loaded(inputs), task.eval()(inputs))


def test_gradient_term_is_the_mean_step_error_over_pairs_of_valid_pixels():
    target = torch.arange(16.0).reshape(1, 1, 4, 4)  # steps of 1 m to the right, 4 m downward
    valid = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert masked_gradient_l1(torch.zeros_like(target), target, valid).item() == pytest.approx((12 * 1 + 12 * 4) / 24)
    valid[0, 0, 0, 0] = False  # its right and downward pairs drop out: 11 of each remain
    assert masked_gradient_l1(torch.zeros_like(target), target, valid).item() == pytest.approx((11 * 1 + 11 * 4) / 22)
    assert masked_gradient_l1(target + 7.0, target, valid).item() == 0.0  # an offset has the right edges


def test_gradient_loss_adds_its_weighted_term_to_the_training_loss_only():
    torch.manual_seed(0)
    plain = _task(identity_init=True)
    weighted = _task(identity_init=True, gradient_loss=0.5)
    weighted.load_state_dict(plain.state_dict())
    batch = {"inputs": torch.zeros(1, 2, 64, 64), "base": torch.zeros(1, 1, 64, 64),
             "scale": torch.ones(1, 1, 1, 1), "valid": torch.ones(1, 1, 64, 64, dtype=torch.bool),
             "target": torch.arange(64.0).expand(1, 1, 64, 64).clone()}  # 1 m steps along rows
    step = masked_gradient_l1(torch.zeros(1, 1, 64, 64), batch["target"], batch["valid"]).item()
    assert step == pytest.approx(0.5)  # half the pairs step 1 m, half 0 m
    for task in (plain, weighted):  # a step outside a Trainer: one process, nothing logged
        task._trainer = SimpleNamespace(world_size=1)
        task.log = lambda *args, **kwargs: None
    assert weighted._shared_step(batch, "train").item() == pytest.approx(plain._shared_step(batch, "train").item() + 0.5 * step)
    assert weighted._shared_step(batch, "val").item() == pytest.approx(plain._shared_step(batch, "val").item())


def test_adam_uses_the_fused_kernel_on_the_cpu():
    task = DeepDEMRegressionTask({"bands": ["dsm"], "chip_size": 64, "arch": "ResDepth"})
    optimizer = task.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True


def test_sigma_level_learns_faster_than_every_other_weight():
    """Adam's first step moves each weight by about its learning rate: σ's output bias (its
    level over the scene) by SIGMA_LEVEL_LR_FACTOR times the rate, every other weight by the rate."""
    from deepdem.models import SIGMA_LEVEL_LR_FACTOR

    torch.manual_seed(0)
    task = _task(target="dsm", uncertainty="laplace", sigma_head="branch", lr=1e-3)
    optimizer = task.configure_optimizers()["optimizer"]
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(list(task.parameters()))  # each weight in exactly one group
    assert len({id(p) for p in grouped}) == len(grouped)
    with torch.no_grad():
        task.sigma_branch.layers[-1].weight.normal_()  # a σ that depends on its inputs
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    task.train()
    task(torch.randn(2, 2, 64, 64)).sum().backward()
    optimizer.step()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in task.named_parameters()
             if p.grad is not None and p.grad.abs().sum() > 0}
    level = moved.pop("sigma_branch.layers.%d.bias" % (len(task.sigma_branch.layers) - 1))
    assert level == pytest.approx(SIGMA_LEVEL_LR_FACTOR * 1e-3, rel=0.01)
    assert max(moved.values()) == pytest.approx(1e-3, rel=0.01)


def test_autocast_only_where_the_hardware_makes_it_fast(monkeypatch, tmp_path):
    from deepdem.models import autocast_is_fast
    from deepdem.train import TrainConfig, _trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, precision in ((False, "32-true"), (True, "bf16-mixed")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert autocast_is_fast("cpu") is native
        trainer, _ = _trainer(TrainConfig(max_epochs=1), tmp_path / str(native), progress=False, extra_callbacks=[])
        assert str(trainer.precision) == precision
    assert autocast_is_fast("cuda")
