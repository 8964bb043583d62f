"""Checkpoints: nnssl's layout, `torch.load(weights_only=True)`, the adaptation plan of every method, and
loading the encoder of a pre-trained model into a fresh ResEnc-L / Primus-M through the plan's keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openmind_bench import nets, ssl
from openmind_bench.engine import checkpoint
from openmind_bench.pretrain import settings as run_settings, trainer

NNSSL_KEYS = {"network_weights", "optimizer_state", "grad_scaler_state", "current_epoch", "nnssl_adaptation_plan"}
PLAN_KEYS = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
             "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"}


pytestmark = pytest.mark.usefixtures("one_thread")


def encoder_and_stem(state_dict: dict, plan: dict) -> dict:
    """What fine-tuning transfers: the encoder, the stem and (Primus) the position embedding."""
    prefixes = [plan["key_to_encoder"], plan["key_to_stem"]] + ([plan["key_to_lpe"]] if plan["key_to_lpe"] else [])
    return {k: v for k, v in state_dict.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small Spark3D run (nnssl's Spark trainer forgets the adaptation plan; ours keeps it)."""
    out = tmp_path_factory.mktemp("ckpt") / "spark3d__ResEncTiny__demo"
    section = {"patch_size": [32, 32, 32], "epochs": 1, "steps_per_epoch": 2, "val_steps": 1, "total_batch_size": 2,
               "method_settings": {"spark3d": {"block_size": 8}}}
    s = run_settings.resolve(section, "spark3d", "ResEncTiny", out_dir=str(out), selection="demo")
    s.batch_source, s.threads = "openmind_bench.pretrain.batches:template_batches", 1
    assert trainer.run(s).status == "finished"
    return out / checkpoint.FINAL


def test_layout_is_nnssl_and_loads_weights_only(trained):
    state = torch.load(trained, map_location="cpu", weights_only=True)
    assert NNSSL_KEYS <= set(state)
    assert state["current_epoch"] == 1 and state["grad_scaler_state"] is None  # CPU: no autocast, no scaler
    # The densifying norms have no affine parameters (nnssl's InstanceNorm1d(affine=False)).
    assert {k.split(".")[0] for k in state["pretext_weights"]} == {"mask_tokens", "densify_projs"}
    assert state["optimizer_state"]["param_groups"][0]["nesterov"] is True
    assert state["method_settings"] == {"mask_ratio_range": [0.6, 0.9], "block_size": 8}
    plan = state["nnssl_adaptation_plan"]
    assert PLAN_KEYS <= set(plan)
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert plan["recommended_downstream_patchsize"] == [160, 160, 160]
    config = plan["pretrain_plan"]["configurations"]["onemmiso"]
    assert config["patch_size"] == [32, 32, 32] and config["spacing"] == [1.0, 1.0, 1.0]
    assert config["normalization_schemes"] == ["ZScoreNormalization"]
    assert plan["pretrain_plan"]["dataset_name"] == "demo"
    assert plan["architecture_plans"]["arch_class_name"] == "ResidualEncoderUNet"
    json.dumps(plan)  # plain JSON: nnssl writes it to adaptation_plan.json


def test_pretrained_backbone_loads_into_a_fresh_network(trained):
    net, plan = checkpoint.load_backbone(trained)
    state = checkpoint.load(trained)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state["network_weights"][key]), key
    # A plain module: the sparse-convolution twins never leave the pre-training model.
    assert type(net.encoder.stem.convs[0].conv) is torch.nn.Conv3d
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


@pytest.mark.parametrize("method, arch", [("spark3d_anon", "ResEncL"), ("mae", "PrimusM")])
def test_full_size_checkpoint_loads_into_fresh_network_via_plan_keys(tmp_path, method, arch):
    """Full-size ResEnc-L (Spark3D) and Primus-M (MAE) at 160^3: the encoder, stem and position
    embedding of a checkpoint load into fresh networks rebuilt from the plan, key for key."""
    s = run_settings.resolve({}, method, arch, out_dir=str(tmp_path))
    spec = s.arch()
    with torch.device("meta"):  # skip the (slow) random initialisation of 100+ M parameters
        backbone = spec.build(s.patch_size)
        model = ssl.build(method, backbone, spec, s.patch_size, s.method_settings)
    model.to_empty(device="cpu")
    with torch.no_grad():  # a distinct value per tensor: a weight landing on another key shows
        for i, tensor in enumerate(model.state_dict().values()):
            tensor.fill_(i + 1)
    # read back: ResEnc registers each stem/encoder conv under two names (conv, all_modules.0)
    fill = {k.removeprefix("backbone."): float(t.reshape(-1)[0]) for k, t in model.state_dict().items() if t.numel()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = checkpoint.adaptation_plan(spec, backbone, s)
    path = tmp_path / checkpoint.FINAL
    checkpoint.save(path, method=model, optimizer=optimizer, grad_scaler=None, current_epoch=0, step_in_epoch=0,
                    plan=plan, settings=s, history=[])
    del model, backbone, optimizer

    state = torch.load(path, map_location="cpu", weights_only=True)
    plan = state["nnssl_adaptation_plan"]
    with torch.device("meta"):
        fresh = nets.build_from_adaptation_plan(plan, patch_size=checkpoint.pretrain_patch_size(plan))
    transfer = encoder_and_stem(state["network_weights"], plan)
    result = fresh.load_state_dict(transfer, strict=False, assign=True)
    assert not result.unexpected_keys
    assert all(encoder_and_stem({k: None}, plan) == {} for k in result.missing_keys)  # only decoder keys left
    assert transfer and set(transfer) == set(encoder_and_stem(fresh.state_dict(), plan))
    loaded = fresh.state_dict()
    for key in transfer:
        assert bool((loaded[key] == fill[key]).all()), key
    for key in plan["keys_to_in_proj"]:
        assert fresh.get_submodule(key).weight.shape[1] == plan["pretrain_num_input_channels"] == 1
    if arch == "PrimusM":
        assert plan["architecture_plans"]["arch_class_name"] == "PrimusM"
        assert plan["key_to_lpe"] == "eva.pos_embed" and fresh.eva.pos_embed.shape == (1, 8000, 864)
        assert {k.split(".")[0] for k in state["pretext_weights"]} == {"decoder", "mask_token"}
    else:
        assert plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256, 320, 320]


def test_a_torn_checkpoint_is_named(tmp_path):
    bad = tmp_path / checkpoint.LATEST
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(bad)):
        checkpoint.load(bad)


def test_saving_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves neither a checkpoint nor a temporary file behind."""
    s = run_settings.resolve({"patch_size": [32, 32, 32]}, "mae", "ResEncTiny", out_dir=str(tmp_path))
    spec = s.arch()
    model = ssl.build("mae", spec.build(s.patch_size), spec, s.patch_size, s.method_settings)

    def dies(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path / checkpoint.LATEST, method=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                        grad_scaler=None, current_epoch=0, step_in_epoch=0, plan={}, settings=s, history=[])
    assert list(tmp_path.iterdir()) == []
