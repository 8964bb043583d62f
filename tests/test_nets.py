"""Architectures: the papers' sizes, the keys fine-tuning relies on, presets and rebuilding from a plan.

Full-size networks are built on the meta device (shapes only): parameter counts and keys, no compute.
"""

from __future__ import annotations

import pytest
import torch

from openmind_bench import nets

PATCH = (160, 160, 160)


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        return {name: nets.resolve(name).build(PATCH) for name in ("ResEncL", "PrimusM")}


def n_params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def test_full_size_parameter_counts(full_size):
    assert n_params(full_size["ResEncL"]) == 102_348_965  # 102.35 M, as in the papers
    # Primus-M at 160^3, one input and one output channel (LayerScale, attention-inner norm).
    assert n_params(full_size["PrimusM"]) == 151_786_529
    assert full_size["PrimusM"].eva.pos_embed.shape == (1, 20**3, 864)


def test_resenc_l_is_the_papers_configuration(full_size):
    net = full_size["ResEncL"]
    assert [len(stage.blocks) for stage in net.encoder.stages] == [1, 3, 4, 6, 6, 6]
    assert net.encoder.output_channels == [32, 64, 128, 256, 320, 320]
    assert [list(s) for s in net.encoder.strides] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert not net.decoder.deep_supervision
    assert all(len(stage.convs) == 1 for stage in net.decoder.stages)
    norm = net.encoder.stem.convs[0].norm
    assert isinstance(norm, torch.nn.InstanceNorm3d) and norm.affine
    assert isinstance(net.encoder.stem.convs[0].nonlin, torch.nn.LeakyReLU)


def test_primus_m_is_the_papers_configuration(full_size):
    net = full_size["PrimusM"]
    assert len(net.eva.blocks) == 16
    block = net.eva.blocks[0]
    assert block.attn.num_heads == 12
    assert net.down_projection.proj.kernel_size == (8, 8, 8)
    assert block.gamma_1 is not None  # LayerScale
    assert block.mlp.fc1_g.out_features == int(864 * 4 * 2 / 3)  # SwiGLU, ratio 4 * 2/3
    assert net.eva.rope is not None and net.eva.pos_embed is not None
    # stochastic depth rising linearly to 0.2 over the blocks
    assert net.eva.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize(
    "name, encoder, stem, in_proj, lpe",
    [
        ("ResEncL", "encoder.stages", "encoder.stem", "encoder.stem.convs.0.conv", None),
        ("PrimusM", "eva", "down_projection", "down_projection.proj", "eva.pos_embed"),
    ],
)
def test_adaptation_keys_point_at_real_modules(full_size, name, encoder, stem, in_proj, lpe):
    net = full_size[name]
    keys = nets.adaptation_keys(net)
    assert keys["key_to_encoder"] == encoder and keys["key_to_stem"] == stem and keys["key_to_lpe"] == lpe
    assert in_proj in keys["keys_to_in_proj"]
    net.get_submodule(encoder)
    net.get_submodule(stem)
    for key in keys["keys_to_in_proj"]:
        assert net.get_submodule(key).weight.shape[1] == 1  # the input-channel dimension
    if lpe:
        assert net.get_parameter(lpe).shape[1] == 20**3


def test_patch_size_must_fit_the_network():
    with pytest.raises(ValueError, match="total stride"):
        nets.resolve("ResEncL").check_patch_size([100, 160, 160])
    with pytest.raises(ValueError, match="token size"):
        nets.resolve("PrimusM").check_patch_size([36, 36, 36])


def test_presets_are_config_values():
    small = nets.resolve("ResEncTiny", {"ResEncTiny": {"kwargs": {"features_per_stage": [2, 4, 8, 16]}}})
    assert small.build((32, 32, 32)).encoder.output_channels == [2, 4, 8, 16]
    added = nets.resolve("ResEncMini", {"ResEncMini": {"constructor": "residual_encoder_unet", "kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 8], "strides": [1, 2, 2], "n_blocks_per_stage": 1}}})
    assert added.family == "cnn"
    assert added.build((16, 16, 16))(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="known: .*PrimusM"):
        nets.resolve("ResEncXXL")
    with pytest.raises(ValueError, match="unknown \\['depth'\\]"):
        nets.resolve("PrimusTiny", {"PrimusTiny": {"kwargs": {"depth": 3}}})


@pytest.mark.parametrize("name", ["ResEncTiny", "PrimusTiny"])
def test_small_variants_reconstruct_at_32(name):
    torch.manual_seed(0)
    net = nets.resolve(name).build((32, 32, 32))
    assert n_params(net) < 600_000
    assert net(torch.randn(2, 1, 32, 32, 32)).shape == (2, 1, 32, 32, 32)


def test_rebuild_from_nnssl_style_plans():
    """nnssl's own plan forms rebuild the same networks: the ResEncL / PrimusM presets by name, and any
    ResEnc through the dynamic `ResidualEncoderUNet` kwargs our checkpoints record."""
    with torch.device("meta"):
        for name in ("ResEncL", "PrimusM"):
            plan = {"architecture_plans": {"arch_class_name": name, "arch_kwargs": None},
                    "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": list(PATCH)}
            assert n_params(nets.build_from_adaptation_plan(plan)) == n_params(nets.resolve(name).build(PATCH))
        arch = nets.resolve("ResEncTiny")
        plans = nets.nnssl_architecture_plans(arch)
        assert plans["arch_class_name"] == "ResidualEncoderUNet"
        assert plans["arch_kwargs"]["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm3d"
        dynamic = {k: v for k, v in plans.items() if k != "openmind_bench"}
        plan = {"architecture_plans": dynamic, "pretrain_num_input_channels": 1,
                "recommended_downstream_patchsize": [32, 32, 32]}
        rebuilt = nets.build_from_adaptation_plan(plan)
        reference = arch.build((32, 32, 32))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert nets.nnssl_architecture_plans(nets.resolve("PrimusM"))["arch_class_name"] == "PrimusM"
    assert nets.nnssl_architecture_plans(nets.resolve("PrimusTiny"))["arch_class_name"] == "Primus"
