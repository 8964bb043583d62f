"""Weight transfer: exactly the encoder and stem tensors move, multi-channel stems, Primus position
embeddings, and nnssl's checkpoint layout (wrapper prefixes, misspelt key, no plan)."""

import pytest
import torch

from openmind_bench import nets
from openmind_bench.downstream import transfer

PATCH = [32, 32, 32]


def pretrained_checkpoint(path, arch_name, patch=PATCH, seed=1, prefix="", plan_edit=None):
    """A checkpoint in the nnssl layout with random weights (so a copied tensor is recognisable)."""
    arch = nets.resolve(arch_name)
    torch.manual_seed(seed)
    net = arch.build(patch)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    plan = {
        "architecture_plans": nets.nnssl_architecture_plans(arch),
        "pretrain_plan": {"configurations": {"onemmiso": {"patch_size": list(patch), "spacing": [1.0, 1.0, 1.0]}}},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": list(patch),
        **nets.adaptation_keys(net),
    }
    if plan_edit:
        plan = plan_edit(plan)
    state = {"network_weights": {prefix + k: v.clone() for k, v in net.state_dict().items()},
             "nnssl_adaptation_plan": plan, "current_epoch": 1}
    torch.save(state, path)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _fresh(arch_name, patch, channels, classes, seed=2):
    torch.manual_seed(seed)
    net = nets.resolve(arch_name).build(patch, channels, classes)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


def _check_only_encoder_moved(net, before, pretrained, expected_keys):
    after = net.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    # Keys that alias a transferred tensor (the ResEnc decoder keeps a reference to the encoder).
    transferred_storage = {after[k].data_ptr() for k in expected_keys}
    aliases = {k for k in after if after[k].data_ptr() in transferred_storage}
    assert moved <= aliases, f"tensors outside the encoder/stem changed: {sorted(moved - aliases)[:5]}"
    for k in expected_keys:
        if k in pretrained and pretrained[k].shape == after[k].shape:
            assert torch.equal(after[k], pretrained[k]), k
    untouched = set(after) - aliases
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)


@pytest.mark.parametrize("prefix", ["", "module._orig_mod."])
def test_resenc_transfer_moves_exactly_encoder_and_stem(tmp_path, prefix):
    pre = pretrained_checkpoint(tmp_path / "ckpt.pt", "ResEncTiny", prefix=prefix)
    ckpt = transfer.read_pretrained(tmp_path / "ckpt.pt")
    net, before = _fresh("ResEncTiny", PATCH, 1, 3)
    loaded = transfer.transfer(ckpt, net, PATCH)
    expected = {k for k in before if k.startswith("encoder.")}  # stages and stem, nothing else
    assert set(loaded) == expected
    _check_only_encoder_moved(net, before, pre, expected)
    decoder_keys = [k for k in before if k.startswith("decoder.stages") or k.startswith("decoder.seg_layers")]
    assert decoder_keys and all(torch.equal(net.state_dict()[k], before[k]) for k in decoder_keys)


def test_multi_channel_stem_repeats_weights_divided_by_channel_count(tmp_path):
    pre = pretrained_checkpoint(tmp_path / "ckpt.pt", "ResEncTiny")
    net, _ = _fresh("ResEncTiny", PATCH, 3, 2)
    transfer.transfer(transfer.read_pretrained(tmp_path / "ckpt.pt"), net, PATCH)
    key = "encoder.stem.convs.0.conv.weight"
    w = net.state_dict()[key]
    assert w.shape[1] == 3
    for c in range(3):
        assert torch.allclose(w[:, c], pre[key][:, 0] / 3)
    # The stem's response to three copies of an image is the pre-trained response to the image.
    x = torch.randn(1, 1, 8, 8, 8)
    conv = net.encoder.stem.convs[0].conv
    expected = torch.nn.functional.conv3d(x, pre[key], pre["encoder.stem.convs.0.conv.bias"], padding=1)
    assert torch.allclose(conv(x.repeat(1, 3, 1, 1, 1)), expected, atol=1e-5)
    with pytest.raises(transfer.TransferError, match="cannot be spread"):
        transfer.repeat_input_channels(torch.zeros(4, 2, 3, 3, 3), 3, key)


def test_primus_transfer_and_position_embedding_interpolation(tmp_path):
    pre = pretrained_checkpoint(tmp_path / "ckpt.pt", "PrimusTiny")
    ckpt = transfer.read_pretrained(tmp_path / "ckpt.pt")
    patch = [64, 32, 32]  # token grid 8x4x4 instead of the pre-training 4x4x4
    net, before = _fresh("PrimusTiny", patch, 2, 3)
    loaded = transfer.transfer(ckpt, net, patch)
    assert set(loaded) == {k for k in before if k.startswith(("eva.", "down_projection."))}
    assert net.state_dict()["eva.pos_embed"].shape == (1, 8 * 4 * 4, 96)
    _check_only_encoder_moved(net, before, pre, set(loaded))
    assert not any(k.startswith("up_projection") or k == "mask_token" for k in loaded)
    w = net.state_dict()["down_projection.proj.weight"]
    assert torch.allclose(w, pre["down_projection.proj.weight"].repeat(1, 2, 1, 1, 1) / 2)


def test_position_embedding_interpolation_rules():
    grid = torch.randn(1, 4 * 4 * 4, 8)
    assert torch.equal(transfer.interpolate_position_embedding(grid, [4, 4, 4], [4, 4, 4]), grid)
    constant = torch.ones(1, 1 + 64, 8) * torch.arange(8.0)
    constant[:, 0] = -1.0  # a prefix token stays as it is
    out = transfer.interpolate_position_embedding(constant, [4, 4, 4], [8, 2, 6])
    assert out.shape == (1, 1 + 96, 8)
    assert torch.equal(out[:, 0], constant[:, 0])
    assert torch.allclose(out[:, 1:], torch.arange(8.0).expand(1, 96, 8))
    # A ramp along the first grid axis stays a ramp: token order is (w h d).
    ramp = torch.arange(4.0).repeat_interleave(16).reshape(1, 64, 1)
    up = transfer.interpolate_position_embedding(ramp, [4, 4, 4], [8, 4, 4]).reshape(8, 4, 4)
    assert torch.all(up[1:] >= up[:-1]) and torch.allclose(up[:, 0, 0], up[:, 3, 3])


def test_nnssl_misspelt_in_proj_key_and_planless_checkpoint(tmp_path):
    def misspell(plan):
        plan["key_to_in_proj"] = plan.pop("keys_to_in_proj")[0]
        return plan

    pre = pretrained_checkpoint(tmp_path / "a.pt", "PrimusTiny", plan_edit=misspell)
    net, _ = _fresh("PrimusTiny", PATCH, 2, 2)
    transfer.transfer(transfer.read_pretrained(tmp_path / "a.pt"), net, PATCH)
    assert torch.allclose(net.state_dict()["down_projection.proj.weight"],
                          pre["down_projection.proj.weight"].repeat(1, 2, 1, 1, 1) / 2)

    pretrained_checkpoint(tmp_path / "b.pt", "ResEncTiny", plan_edit=lambda plan: None)  # nnssl Spark: no plan
    ckpt = transfer.read_pretrained(tmp_path / "b.pt")
    with pytest.raises(transfer.TransferError, match="name the architecture"):
        transfer.build_network(ckpt, None, PATCH, 1, 2)
    net = transfer.build_network(ckpt, nets.resolve("ResEncTiny"), PATCH, 1, 2)
    assert len(transfer.transfer(ckpt, net, PATCH)) > 0


def test_wrong_architecture_is_a_clear_error(tmp_path):
    pretrained_checkpoint(tmp_path / "ckpt.pt", "PrimusTiny")
    net = nets.resolve("ResEncTiny").build(PATCH)
    ckpt = transfer.read_pretrained(tmp_path / "ckpt.pt")
    ckpt = transfer.Pretrained(ckpt.path, ckpt.weights, None, {})
    with pytest.raises(transfer.TransferError, match="lacks"):
        transfer.transfer(ckpt, net, PATCH)
    with pytest.raises(transfer.TransferError, match="does not exist"):
        transfer.read_pretrained(tmp_path / "missing.pt")
