"""External checkpoints (issue 20): every format reads and transfers exactly the encoder and stem,
the check's report and errors, and the export of our runs in the published layout (round trip)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch

from openmind_bench import cli, nets
from openmind_bench.checkpoints import check, export
from openmind_bench.checkpoints.check import CheckpointError, check_checkpoint
from openmind_bench.digests import file_digest
from openmind_bench.downstream import transfer
from openmind_bench.engine import checkpoint
from openmind_bench.pretrain import settings as run_settings, trainer
from test_trainer import small_settings
from test_transfer import PATCH, pretrained_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def published_folder(folder: Path, arch_name: str, **kwargs) -> dict:
    """A repository folder as the openmind-models ones: checkpoint_final.pth and adaptation_plan.json
    (here the plan is only in the JSON, so the reader must take it from there)."""
    folder.mkdir(parents=True)
    weights = pretrained_checkpoint(folder / "source.pt", arch_name, **kwargs)
    state = torch.load(folder / "source.pt", weights_only=True)
    (folder / "source.pt").unlink()
    plan = state.pop("nnssl_adaptation_plan")
    torch.save({**state, "trainer_name": "BaseMAETrainer"}, folder / "checkpoint_final.pth")
    (folder / "adaptation_plan.json").write_text(json.dumps({**plan, "trainer_name": "BaseMAETrainer"}))
    (folder / "config.json").write_text("{}")
    return weights


def spark_without_plan(path: Path, arch_name: str) -> dict:
    weights = pretrained_checkpoint(path, arch_name, prefix="module.")
    state = torch.load(path, weights_only=True)
    del state["nnssl_adaptation_plan"]
    torch.save(state, path)
    return weights


def assert_exact_transfer(source, arch_name: str, weights: dict, patch=PATCH, channels=1, architecture=None):
    """Encoder and stem (and nothing else) arrive bit-identical; everything else is as freshly built."""
    pretrained = transfer.read_pretrained(source, architecture)
    torch.manual_seed(5)
    fresh = {k: v.clone() for k, v in nets.resolve(arch_name).build(patch, channels, 2).state_dict().items()}
    torch.manual_seed(5)
    net = transfer.build_network(pretrained, None, patch, channels, 2)
    moved = set(transfer.transfer(pretrained, net, patch))
    prefixes = ("encoder.",) if arch_name.startswith("ResEnc") else ("eva.", "down_projection.")
    assert moved == {k for k in fresh if k.startswith(prefixes)}
    after = net.state_dict()
    for key in moved:
        if after[key].shape == weights[key].shape:
            assert torch.equal(after[key], weights[key]), key
    moved_storage = {after[k].data_ptr() for k in moved}
    new = [k for k in after if k not in moved and after[k].data_ptr() not in moved_storage]
    assert new and all(torch.equal(after[k], fresh[k]) for k in new)
    assert any(k.startswith(("decoder.", "up_projection.")) for k in new)
    return moved


@pytest.mark.parametrize("arch_name", ["ResEncTiny", "PrimusTiny"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_nnssl_layout_with_wrapper_prefixes(tmp_path, arch_name, prefix):
    weights = pretrained_checkpoint(tmp_path / "ckpt.pth", arch_name, prefix=prefix)
    moved = assert_exact_transfer(tmp_path / "ckpt.pth", arch_name, weights)
    report = check_checkpoint(tmp_path / "ckpt.pth", channel_counts=(1, 2))
    assert report["format"] == "nnssl"
    assert [t["moved"] for t in report["transfers"]] == [len(moved), len(moved)]
    assert report["transfers"][1]["in_proj_repeated"] and not report["transfers"][0]["in_proj_repeated"]


def _wrapped_primus_plan(plan: dict) -> dict:
    """nnssl's SimCLR / VoCo Primus plans (`SimCLREvaTrainer`): the backbone sits under `encoder.` of
    a wrapper, the plan names it so, and spells `key_to_in_proj`."""
    plan["architecture_plans"] = {"arch_class_name": "PrimusM", "arch_kwargs": None,
                                  "arch_kwargs_requiring_import": None}
    for key in ("key_to_encoder", "key_to_stem", "key_to_lpe"):
        plan[key] = f"encoder.{plan[key]}"
    plan["key_to_in_proj"] = [f"encoder.{k}" for k in plan.pop("keys_to_in_proj")]
    return plan


def test_nnssl_primus_checkpoint_whose_backbone_is_wrapped_transfers_exactly(tmp_path):
    """The plan's key prefixes are renamed to the network's, as the fine-tuning branch loads them."""
    weights = pretrained_checkpoint(tmp_path / "plain.pth", "PrimusTiny")
    state = torch.load(tmp_path / "plain.pth", weights_only=True)
    state["network_weights"] = {f"encoder.{k}": v for k, v in state["network_weights"].items()}
    state["nnssl_adaptation_plan"] = _wrapped_primus_plan(state["nnssl_adaptation_plan"])
    # the plan names nnssl's PrimusM; the tiny tensors are rebuilt from our preset to keep the test small
    state["nnssl_adaptation_plan"]["architecture_plans"]["openmind_bench"] = nets.resolve("PrimusTiny").as_dict()
    torch.save(state, tmp_path / "wrapped.pth")
    moved = assert_exact_transfer(tmp_path / "wrapped.pth", "PrimusTiny", weights)
    report = check_checkpoint(tmp_path / "wrapped.pth", channel_counts=(1, 2))
    assert [t["moved"] for t in report["transfers"]] == [len(moved)] * 2
    assert report["transfers"][0]["unexpected"] == 0 and report["transfers"][1]["in_proj_repeated"]


@pytest.mark.parametrize("arch_name", ["ResEncTiny", "PrimusTiny"])
def test_published_folder_and_its_checkpoint_file(tmp_path, arch_name):
    weights = published_folder(tmp_path / "repo", arch_name)
    for source in (tmp_path / "repo", tmp_path / "repo" / "checkpoint_final.pth"):
        assert_exact_transfer(source, arch_name, weights)
    report = check_checkpoint(tmp_path / "repo")
    assert report["format"] == "published repository"
    assert report["trainer_name"] == "BaseMAETrainer"
    assert report["pretrain_patch_size"] == PATCH and report["pretrain_spacing"] == [1.0, 1.0, 1.0]
    files = {Path(f).name: h for f, h in report["sha256"].items()}
    assert set(files) == {"checkpoint_final.pth", "adaptation_plan.json"}
    assert files["checkpoint_final.pth"] == file_digest(tmp_path / "repo" / "checkpoint_final.pth")


def test_spark_checkpoint_without_plan_needs_the_architecture(tmp_path):
    weights = spark_without_plan(tmp_path / "spark.pt", "ResEncTiny")
    assert_exact_transfer(tmp_path / "spark.pt", "ResEncTiny", weights, architecture="ResEncTiny")
    report = check_checkpoint(tmp_path / "spark.pt", architecture="ResEncTiny", patch_size=PATCH)
    assert report["format"] == "nnssl, no adaptation plan"
    assert report["architecture"] == {"class": "ResEncTiny", "family": "cnn", "constructor": "residual_encoder_unet",
                                      "preset": "ResEncTiny", "scratch_architecture": "ResEncTiny"}
    assert report["pretrain_patch_size"] is None
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'spark.pt'}.*no adaptation plan.*architecture"):
        check_checkpoint(tmp_path / "spark.pt")


def test_report_names_architecture_from_the_plan_and_the_position_embedding_interpolation(tmp_path):
    weights = pretrained_checkpoint(tmp_path / "primus-named-like-a-resenc.pt", "PrimusTiny")
    report = check_checkpoint(tmp_path / "primus-named-like-a-resenc.pt", channel_counts=(1, 4),
                              patch_size=[64, 32, 32])
    assert report["architecture"] == {"class": "Primus", "family": "transformer", "constructor": "primus",
                                      "preset": "PrimusTiny", "scratch_architecture": "PrimusTiny"}
    lpe = report["transfers"][0]["position_embedding"]
    assert lpe == {"key": "eva.pos_embed", "pretrain_grid": [4, 4, 4], "finetune_grid": [8, 4, 4],
                   "interpolated": True, "how": "trilinear over the token grid, prefix tokens kept"}
    net = nets.resolve("PrimusTiny").build([64, 32, 32], 4, 2)
    assert report["transfers"][1]["parameters"] == sum(p.numel() for p in net.parameters())
    assert report["transfers"][1]["left_new"] == len(net.state_dict()) - report["transfers"][1]["moved"]
    assert report["checkpoint_tensors"] == len(weights)
    unchanged = check_checkpoint(tmp_path / "primus-named-like-a-resenc.pt")["transfers"][0]["position_embedding"]
    assert not unchanged["interpolated"] and unchanged["how"] == "copied"


def _edit_weights(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state["network_weights"])
    torch.save(state, path)


def _unknown_class(plan):
    plan["architecture_plans"] = {"arch_class_name": "SwinUNETR", "arch_kwargs": None,
                                  "arch_kwargs_requiring_import": []}
    return plan


BAD = {
    "not a torch file": (lambda p: p.write_bytes(b"not a checkpoint at all"), "not a readable torch file"),
    "pickle needing code": (lambda p: torch.save({"network_weights": {}, "init_args": argparse.Namespace(a=1)}, p),
                            "weights_only=True\\) refuses it.*argparse.Namespace.*run code"),
    "no network weights": (lambda p: torch.save({"state_dict": {}}, p), "has no network_weights"),
    "unknown architecture class": (lambda p: pretrained_checkpoint(p, "ResEncTiny", plan_edit=_unknown_class),
                                   "architecture class 'SwinUNETR'"),
    "encoder key missing": (lambda p: (pretrained_checkpoint(p, "ResEncTiny"), _edit_weights(
        p, lambda w: w.pop("encoder.stages.1.blocks.0.conv1.conv.weight"))), "lacks 1 encoder/stem tensor"),
    "shape mismatch": (lambda p: (pretrained_checkpoint(p, "ResEncTiny"), _edit_weights(
        p, lambda w: w.__setitem__("encoder.stages.2.blocks.0.conv1.conv.weight", torch.zeros(3, 3, 3, 3, 3)))),
        r"has shape \(3, 3, 3, 3, 3\), the network"),
    "NaN weights": (lambda p: (pretrained_checkpoint(p, "PrimusTiny"), _edit_weights(
        p, lambda w: w["eva.blocks.0.attn.q_proj.weight"].view(-1)[0].fill_(float("nan")))), "NaN or Inf"),
    "plan of another architecture": (lambda p: (pretrained_checkpoint(p, "PrimusTiny"), _edit_weights(
        p, lambda w: w.clear() or w.update(nets.resolve("ResEncTiny").build(PATCH).state_dict()))), "lacks"),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_a_checkpoint_that_cannot_be_used_is_named_with_its_problem(tmp_path, problem):
    make, message = BAD[problem]
    path = tmp_path / f"{problem.replace(' ', '_')}.pth"
    make(path)
    with pytest.raises(CheckpointError, match=message) as error:
        check_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_paths_and_folders_without_a_checkpoint_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'absent.pth'} does not exist"):
        check_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "repo").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'repo'} is a folder without checkpoint_final.pth"):
        check_checkpoint(tmp_path / "repo")
    pretrained_checkpoint(tmp_path / "x.pt", "ResEncTiny")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'x.pt'}.*unknown architecture 'NoSuchNet'"):
        check_checkpoint(tmp_path / "x.pt", architecture="NoSuchNet")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished pre-training run of ours (one epoch of one step) in results/pretrain/{run}/."""
    root = tmp_path_factory.mktemp("results_tree")
    run_dir = root / "results" / "pretrain" / "mae__ResEncTiny__openmind"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = small_settings(run_dir, "mae", "ResEncTiny", epochs=1, steps_per_epoch=1)
        s.selection = "openmind"
        assert trainer.run(s).status == "finished"
    finally:
        torch.set_num_threads(previous)
    return run_dir


def test_our_checkpoint_loads_and_transfers_exactly(tiny_run):
    weights = checkpoint.load(tiny_run / checkpoint.FINAL)["network_weights"]
    assert_exact_transfer(tiny_run / checkpoint.FINAL, "ResEncTiny", weights)
    report = check_checkpoint(tiny_run / checkpoint.FINAL)
    assert report["format"] == "openmind_bench" and report["architecture"]["family"] == "cnn"


def test_export_round_trip_and_model_card(tiny_run, tmp_path):
    benchmark = tiny_run.parents[1] / "benchmark"
    benchmark.mkdir(exist_ok=True)
    (benchmark / "results_long.csv").write_text(
        "method,architecture,schedule,dataset,metric,value,fold,case\n"
        "mae,ResEncTiny,sawtooth,D1,DSC,0.5,0,a\nmae,ResEncTiny,sawtooth,D1,DSC,0.7,0,b\n"
        "simclr,ResEncTiny,sawtooth,D1,DSC,0.1,0,a\n")
    out = tmp_path / "hub" / "ResEncTiny-OpenMind-MAE"
    assert cli.main(["export-checkpoint", str(tiny_run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adaptation_plan.json", "checkpoint_final.pth",
                                                     "config.json"]
    assert not list(out.parent.glob(".*tmp*"))
    published = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert set(published) == {"network_weights", "nnssl_adaptation_plan", "trainer_name"}
    plan_json = json.loads((out / "adaptation_plan.json").read_text())
    assert plan_json == {**published["nnssl_adaptation_plan"], "trainer_name": "openmind_bench:mae"}
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["architecture_preset"], config["selection"]) == ("mae", "ResEncTiny", "openmind")
    assert (config["epochs"], config["steps_per_epoch"]) == (1, 1)
    assert config["architecture"] == {"class": "ResidualEncoderUNet", "family": "cnn",
                                      "constructor": "residual_encoder_unet", "preset": "ResEncTiny"}
    card = (out / "README.md").read_text()
    assert "\n# ResEncTiny pre-trained with mae (openmind data)\n" in card
    assert "A ResidualEncoderUNet (cnn) backbone" in card and "on the `openmind` selection" in card
    assert "1 of 1 epochs x 1 steps" in card
    assert "| ResEncTiny | sawtooth | D1 | DSC | 0.6000 | 2 |" in card and "0.1000" not in card

    # An exported folder is an external checkpoint with identical transferred tensors.
    ours, theirs = transfer.read_pretrained(tiny_run / checkpoint.FINAL), transfer.read_pretrained(out)
    nets_after = []
    for pretrained in (ours, theirs):
        torch.manual_seed(3)
        net = transfer.build_network(pretrained, None, PATCH, 2, 3)
        moved = transfer.transfer(pretrained, net, PATCH)
        nets_after.append((moved, net.state_dict()))
    (moved_a, a), (moved_b, b) = nets_after
    assert moved_a == moved_b and moved_a
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = check_checkpoint(out, channel_counts=(1, 2))
    assert report["format"] == "published repository"
    assert report["transfers"][1]["moved"] == len(moved_a)

    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export.export_checkpoint(tiny_run, out)
    export.export_checkpoint(tiny_run, out, overwrite=True, results_long=tmp_path / "absent.csv")
    assert "No benchmark rows" in (out / "README.md").read_text()


def test_export_refuses_a_folder_without_our_final_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no checkpoint_final.pt"):
        export.export_checkpoint(tmp_path, tmp_path / "out")


def test_check_checkpoint_cli_writes_the_report(tmp_path):
    published_folder(tmp_path / "repo", "ResEncTiny")
    out = tmp_path / "check.json"
    assert cli.main(["check-checkpoint", str(tmp_path / "repo"), "--channels", "1", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [t["input_channels"] for t in report["transfers"]] == [1, 2]
    (tmp_path / "bad.pth").write_bytes(b"junk")
    assert cli.main(["check-checkpoint", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "bad.json")]) == 1
    assert not (tmp_path / "bad.json").exists()


def full_size_checkpoint(path: Path, arch_name: str, *, plan: bool = True, plan_beside: bool = False,
                         nnssl_plan: bool = False, prefix: str = "") -> None:
    """A full-size backbone at the papers' 160^3, distinct values per tensor, saved like ours; or as
    nnssl writes it (`nnssl_plan`: no openmind_bench entry in the plan, as the published models and
    SSL3D submissions), with the plan in adaptation_plan.json beside it (`plan_beside`, the published
    layout), or with no plan at all (`plan=False`, nnssl's Spark); `prefix` before every weight's key
    (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    s = run_settings.resolve({}, "mae", arch_name, out_dir=str(path.parent))
    arch = s.arch()
    with torch.device("meta"):  # skip the slow random initialisation of 100+ M parameters
        net = arch.build(s.patch_size)
    net.to_empty(device="cpu")
    with torch.no_grad():
        for i, tensor in enumerate(net.state_dict().values()):
            tensor.fill_((i + 1) * 1e-4)  # a weight landing on another key shows
    adaptation = checkpoint.adaptation_plan(arch, net, s)
    if nnssl_plan or plan_beside:
        del adaptation["architecture_plans"]["openmind_bench"]
    ours = plan and not (nnssl_plan or plan_beside)
    state = {"network_weights": {prefix + k: v for k, v in net.state_dict().items()},
             "trainer_name": "openmind_bench:mae" if ours else "BaseMAETrainer"}
    if plan and not plan_beside:
        state["nnssl_adaptation_plan"] = adaptation
    torch.save(state, path)
    if plan_beside:
        path.with_name("adaptation_plan.json").write_text(json.dumps(adaptation))


SENTINEL = -7.0  # what the fine-tuning network holds before the transfer; the checkpoint's values are > 0

# (architecture, layout, full_size_checkpoint arguments, the check's format): the published folder and
# nnssl's own file (a DDP-of-compiled prefix) with the plan as nnssl writes it, nnssl's plan-less Spark
# (ours at full size: tests/test_checkpoint.py)
FULL_SIZE = {
    ("ResEncL", "published"): ({"plan_beside": True}, "published repository"),
    ("PrimusM", "nnssl"): ({"nnssl_plan": True, "prefix": "module._orig_mod."}, "nnssl"),
    ("ResEncL", "spark"): ({"plan": False, "prefix": "module."}, "nnssl, no adaptation plan"),
}


@pytest.mark.parametrize("arch_name, layout", sorted(FULL_SIZE))
def test_full_size_checkpoints_check_and_move_exactly_encoder_and_stem(tmp_path, arch_name, layout, capsys):
    """Full-size ResEnc-L / Primus-M at 160^3 in each format: the check passes on CPU, and the transfer
    moves exactly the encoder and stem tensors, bit-identical, leaving every other tensor as built."""
    kwargs, fmt = FULL_SIZE[arch_name, layout]
    path = tmp_path / ("checkpoint_final.pth" if layout == "published" else f"{arch_name}.pth")
    full_size_checkpoint(path, arch_name, **kwargs)
    architecture = arch_name if layout == "spark" else None
    started = time.perf_counter()
    report = check_checkpoint(path, architecture=architecture, channel_counts=(1, 4))
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\ncheck_checkpoint {arch_name} ({layout}): {elapsed:.1f} s, {report['parameters']:,} parameters")
    assert report["format"] == fmt and report["parameters"] > 100_000_000
    assert report["architecture"]["family"] == nets.resolve(arch_name).family
    assert report["architecture"]["scratch_architecture"] == arch_name
    assert report["transfers"][0]["moved"] > 0 and report["transfers"][0]["unexpected"] == 0
    assert report["pretrain_patch_size"] == (None if layout == "spark" else [160, 160, 160])

    prefix = kwargs.get("prefix", "")
    saved = {k.removeprefix(prefix): v for k, v in torch.load(path, weights_only=True)["network_weights"].items()}
    pretrained = transfer.read_pretrained(path, architecture)
    with torch.device("meta"):
        net = transfer.build_network(pretrained, None, [160, 160, 160], 1, 2)
    net.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in net.state_dict().values():
            tensor.fill_(SENTINEL)
    moved = set(transfer.transfer(pretrained, net, [160, 160, 160]))
    after = net.state_dict()
    prefixes = ("encoder.",) if arch_name.startswith("ResEnc") else ("eva.", "down_projection.")
    assert moved == {k for k in after if k.startswith(prefixes)} and len(moved) == report["transfers"][0]["moved"]
    assert all(torch.equal(after[k], saved[k]) for k in moved)
    moved_storage = {after[k].data_ptr() for k in moved}  # the ResEnc decoder's references to the encoder
    new = [k for k in after if k not in moved and after[k].data_ptr() not in moved_storage]
    assert any(k.startswith(("decoder.", "up_projection.")) for k in new)
    assert all(bool((after[k] == SENTINEL).all()) for k in new)


def test_simclr_plan_whose_patch_is_the_region_not_the_crop(tmp_path):
    """nnssl SimCLR: the loader's region is (192, 192, 64), the network saw crops; a plan that records the
    region disagrees with the position embedding, whose own token count gives the crops' grid."""
    def region_patch(plan):
        plan["pretrain_plan"]["configurations"]["onemmiso"]["patch_size"] = [192, 192, 64]
        return plan

    weights = pretrained_checkpoint(tmp_path / "simclr.pth", "PrimusTiny", plan_edit=region_patch)
    report = check_checkpoint(tmp_path / "simclr.pth", patch_size=[64, 32, 32])
    lpe = report["transfers"][0]["position_embedding"]
    assert lpe["pretrain_grid"] == [4, 4, 4] and lpe["finetune_grid"] == [8, 4, 4] and lpe["interpolated"]
    same = check_checkpoint(tmp_path / "simclr.pth", patch_size=PATCH)["transfers"][0]["position_embedding"]
    assert same["interpolated"] is False and same["how"] == "copied"
    assert_exact_transfer(tmp_path / "simclr.pth", "PrimusTiny", weights)


def test_the_plans_recommended_downstream_patch_is_the_fine_tuning_patch(tmp_path):
    """A plan recommending another patch than it pre-trained on: the check (and every fine-tuning job,
    through transfer.finetuning_patch) fine-tunes at the recommended one, unless a patch is configured."""
    def recommends_wider(plan):
        plan["recommended_downstream_patchsize"] = [64, 32, 32]
        return plan

    weights = pretrained_checkpoint(tmp_path / "primus.pth", "PrimusTiny", plan_edit=recommends_wider)
    report = check_checkpoint(tmp_path / "primus.pth")
    assert report["recommended_downstream_patch_size"] == report["finetune_patch_size"] == [64, 32, 32]
    lpe = report["transfers"][0]["position_embedding"]
    assert lpe["pretrain_grid"] == [4, 4, 4] and lpe["finetune_grid"] == [8, 4, 4] and lpe["interpolated"]
    pretrained = transfer.read_pretrained(tmp_path / "primus.pth")
    assert transfer.finetuning_patch(None, [16, 16, 16], pretrained) == [64, 32, 32]
    assert transfer.finetuning_patch([32, 32, 32], [16, 16, 16], pretrained) == [32, 32, 32]
    assert check_checkpoint(tmp_path / "primus.pth", patch_size=PATCH)["finetune_patch_size"] == PATCH
    assert_exact_transfer(tmp_path / "primus.pth", "PrimusTiny", weights, patch=[64, 32, 32])
