"""Evaluating external checkpoints (issue 20): their run names, settings and provenance, the scratch
baseline their check finds, the hub cache the demo serves an exported run from (read back offline by
huggingface_hub itself, a moved branch fetched again) and `openmind-bench evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from openmind_bench import cli, nets
from openmind_bench import config as omb_config
from openmind_bench.checkpoints import evaluate, hub_cache
from openmind_bench.checkpoints import settings as ckpt_settings
from openmind_bench.checkpoints.check import check_checkpoint
from openmind_bench.checkpoints.sources import fetch_checkpoint
from openmind_bench.config import ConfigError
from openmind_bench.downstream import settings as ft_settings
from openmind_bench.downstream import transfer
from openmind_bench.engine import checkpoint
from openmind_bench.names import InvalidName, parse_run
from conftest import REPO, registry_folders
from test_checkpoints import spark_without_plan, tiny_run  # noqa: F401 (a fixture)
from test_transfer import PATCH, pretrained_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("run, parts", [
    ("mine__sawtooth__150", ("mine", "sawtooth", 150, None)),
    ("mae-openmind.v2__frozen__50__n10", ("mae-openmind.v2", "frozen", 50, 10)),
])
def test_external_run_names_parse_apart_from_ours_and_scratch(run, parts):
    name = parse_run(run)
    assert (name.checkpoint, name.schedule, name.epochs, name.low_data_n) == parts
    assert name.external and name.pretrained and name.pretrain_run is None and name.architecture is None
    assert name.method == parts[0] and str(name) == run
    assert not parse_run("scratch__ResEncL__150").external  # `scratch` is never a checkpoint name
    assert parse_run("mae__ResEncL__all__default__150__n10").pretrain_run == "mae__ResEncL__all"
    with pytest.raises(InvalidName):
        parse_run("mine__sawtooth")


def _config(**overrides) -> dict:
    config = omb_config.load(REPO / "config" / "demo.yaml")
    return omb_config.deep_update(config, overrides)


def test_every_schedule_epoch_and_low_data_size_applies_to_an_external_checkpoint():
    config = _config(downstream={"low_data_n": [4], "schedules": ["default", "frozen"]}, checkpoints=[])
    entries = {"mine": {"name": "mine", "source": "/x.pth"}}
    ours = ["simclr__ResEncTiny__demo", "mae__PrimusTiny__demo"]
    runs = ft_settings.run_names(config, ours, entries)
    assert [r for r in runs if r.startswith("mine")] == [
        "mine__default__6", "mine__frozen__6", "mine__default__6__n4", "mine__frozen__6__n4"]
    # the scratch baselines of other architectures come after the checks, with the same sizes
    assert ft_settings.scratch_runs(config, ["PrimusM"]) == ["scratch__PrimusM__6", "scratch__PrimusM__6__n4"]
    with pytest.raises(ConfigError, match=r"checkpoints\[0\].name': 'simclr' is also a pre-training method"):
        ft_settings.run_names(config, ours, {"simclr": {"name": "simclr", "source": "/x"}})
    # an entry's own schedules narrow its runs, and only its runs
    narrowed = ft_settings.run_names(config, ours, {"mine": {"name": "mine", "source": "/x.pth", "schedules": ["frozen"]}})
    assert [r for r in narrowed if r.startswith("mine")] == ["mine__frozen__6", "mine__frozen__6__n4"]
    assert [r for r in narrowed if not r.startswith("mine")] == [r for r in runs if not r.startswith("mine")]
    with pytest.raises(ConfigError, match=r"'checkpoints\[0\].schedules\[1\]': 'sawtooth' is not one of "
                                          r"downstream.schedules \['default', 'frozen'\]"):
        ft_settings.run_names(config, ours, {"mine": {"name": "mine", "source": "/x.pth",
                                                      "schedules": ["frozen", "sawtooth"]}})


def test_an_external_run_needs_its_provenance_and_a_planless_one_reads_with_its_preset(tmp_path):
    config = _config()
    kwargs = dict(split="s.json")
    with pytest.raises(ValueError, match="provenance is needed"):
        ft_settings.resolve(config, "DemoLesionT1", "spark__default__6", "test", **kwargs)
    provenance = {"name": "spark", "adaptation_plan": False,
                  "architecture": {"class": "ResEncTiny", "preset": "ResEncTiny", "family": "cnn"}}
    s = ft_settings.resolve(config, "DemoLesionT1", "spark__default__6", "test", pretrained_checkpoint="c.pth",
                            external_checkpoint=provenance, **kwargs)
    assert ft_settings.checkpoint_architecture(s) == "ResEncTiny" and s.external_checkpoint == provenance
    with_plan = ft_settings.resolve(config, "DemoLesionT1", "spark__default__6", "test", pretrained_checkpoint="c.pth",
                                    external_checkpoint={**provenance, "adaptation_plan": True}, **kwargs)
    assert ft_settings.checkpoint_architecture(with_plan) is None  # the plan says


def test_the_scratch_baseline_is_the_preset_whose_network_is_the_checkpoints(tmp_path):
    pretrained_checkpoint(tmp_path / "tiny.pth", "ResEncTiny", plan_edit=_nnssl_plan)
    assert check_checkpoint(tmp_path / "tiny.pth")["architecture"]["scratch_architecture"] == "ResEncTiny"

    def wider(plan):
        plan = _nnssl_plan(plan)
        plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 48]
        return plan

    # a variant no preset builds: no baseline, unless the config names a preset that is this network
    arch = nets.Architecture("Wide", "residual_encoder_unet",
                             {**nets.PRESETS["ResEncTiny"]["kwargs"], "features_per_stage": [4, 8, 16, 48]})
    torch.manual_seed(0)
    net = arch.build(PATCH)
    plan = wider({"architecture_plans": nets.nnssl_architecture_plans(nets.resolve("ResEncTiny")),
                  "pretrain_plan": {"configurations": {"onemmiso": {"patch_size": PATCH, "spacing": [1, 1, 1]}}},
                  "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": PATCH,
                  **nets.adaptation_keys(net)})
    torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": plan}, tmp_path / "wide.pth")
    assert check_checkpoint(tmp_path / "wide.pth")["architecture"]["scratch_architecture"] is None
    presets = {"ResEncWide": {"constructor": "residual_encoder_unet", "kwargs": arch.kwargs}}
    report = check_checkpoint(tmp_path / "wide.pth", presets=presets)
    assert report["architecture"]["scratch_architecture"] == "ResEncWide"

    spark_without_plan(tmp_path / "spark.pth", "ResEncTiny")  # nnssl's Spark: a CNN without a plan
    report = check_checkpoint(tmp_path / "spark.pth", architecture="ResEncTiny", patch_size=PATCH)
    assert report["adaptation_plan"] is False and report["architecture"]["scratch_architecture"] == "ResEncTiny"


def _nnssl_plan(plan: dict) -> dict:
    """The plan as nnssl writes it: no openmind_bench entry (the published models, SSL3D submissions)."""
    plan["architecture_plans"].pop("openmind_bench", None)
    return plan


def test_an_exported_run_served_from_a_hub_cache_fetches_offline_and_transfers_identically(tiny_run, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the entry's `offline` alone keeps the hub away
    cache, repo = tmp_path / "hub", "openmind-demo/ResEncTiny-demo-MAE"
    commit = hub_cache.publish_run(tiny_run, cache, repo)
    assert (cache / "models--openmind-demo--ResEncTiny-demo-MAE" / "refs" / "main").read_text() == commit
    assert hub_cache.publish_run(tiny_run, cache, repo) == commit  # the same folder is the same commit
    assert not list(cache.glob(".export-*"))

    dest = tmp_path / "results" / "checkpoints" / "demo"
    record = fetch_checkpoint("demo", f"hf://{repo}", dest, cache_dir=cache, offline=True)
    assert record["commit"] == commit and record["checkpoint_file"] == "checkpoint_final.pth"
    assert sorted(record["files"]) == ["README.md", "adaptation_plan.json", "checkpoint_final.pth", "config.json"]
    ours = transfer.read_pretrained(tiny_run / checkpoint.FINAL)
    theirs = transfer.read_pretrained(ckpt_settings.fetched_path(dest))
    assert theirs.plan == ours.plan
    assert ours.weights.keys() == theirs.weights.keys()
    assert all(torch.equal(ours.weights[k], theirs.weights[k]) for k in ours.weights)

    # the same request again: nothing fetched; after the branch moved to another commit: fetched again
    assert fetch_checkpoint("demo", f"hf://{repo}", dest, cache_dir=cache, offline=True) == record
    moved = tmp_path / "other"
    moved.mkdir()
    for f in (dest / "checkpoint_final.pth", dest / "adaptation_plan.json"):
        (moved / f.name).write_bytes(f.read_bytes())
    (moved / "config.json").write_text('{"retrained": true}')
    new_commit = hub_cache.place_in_cache(moved, cache, repo)
    assert new_commit != commit
    again = fetch_checkpoint("demo", f"hf://{repo}", dest, cache_dir=cache, offline=True)
    assert again["commit"] == new_commit and json.loads((dest / "config.json").read_text()) == {"retrained": True}
    # a pinned commit stays where it is
    pinned = fetch_checkpoint("demo", f"hf://{repo}@{commit}", dest, cache_dir=cache, offline=True)
    assert pinned["commit"] == commit


def test_provenance_is_read_from_the_fetch_and_check_records(tmp_path):
    pretrained_checkpoint(tmp_path / "mine.pth", "ResEncTiny")
    dest = tmp_path / "results" / "checkpoints" / "mine"
    record = fetch_checkpoint("mine", str(tmp_path / "mine.pth"), dest)
    (dest / ckpt_settings.CHECK_REPORT).write_text(json.dumps(check_checkpoint(dest / "mine.pth",
                                                                               channel_counts=(1, 2))))
    out = ckpt_settings.provenance(dest, channels=2)
    assert (out["name"], out["kind"], out["sha256"], out["source"]) == ("mine", "local", record["sha256"],
                                                                         str(tmp_path / "mine.pth"))
    assert out["adaptation_plan"] and out["architecture"]["scratch_architecture"] == "ResEncTiny"
    assert out["check"]["input_channels"] == 2 and out["check"]["in_proj_repeated"] and out["check"]["moved"] > 0
    assert ckpt_settings.fetched_path(dest) == dest / "mine.pth"


def test_an_external_runs_metrics_json_records_source_revision_sha256_and_the_check(tiny_run, tmp_path):
    """The provenance a fine-tuning job of an external checkpoint writes into metrics.json: read from
    its fetch (hf:// at a branch, the commit it resolved to) and its check, through the run's settings."""
    from openmind_bench.aggregate.collect import read_metrics_json
    from openmind_bench.downstream import inference
    from openmind_bench.metrics import segmentation_document, write_metrics

    cache = tmp_path / "hub"
    commit = hub_cache.publish_run(tiny_run, cache, "org/tiny-mae")
    dest = tmp_path / "results" / "checkpoints" / "tiny-mae"
    record = fetch_checkpoint("tiny-mae", "hf://org/tiny-mae@main", dest, cache_dir=cache, offline=True)
    report = check_checkpoint(ckpt_settings.fetched_path(dest), channel_counts=(1, 2))
    (dest / ckpt_settings.CHECK_REPORT).write_text(json.dumps(report))
    provenance = ckpt_settings.provenance(dest, channels=2)
    run = "tiny-mae__default__6"
    s = ft_settings.resolve(_config(), "DemoLesionT1", run, "test", split="s.json",
                            pretrained_checkpoint=str(ckpt_settings.fetched_path(dest)), external_checkpoint=provenance)
    identity = inference.identity("DemoLesionT1", parse_run(run), s.fold, s.external_checkpoint)
    case = {"DSC": 0.5, "NSD": 0.6, "per_class": {"lesion": {"DSC": 0.5, "NSD": 0.6}}}
    write_metrics(segmentation_document(identity, {"case1": case}, 2.0), tmp_path / "metrics.json")

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert (written["method"], written["architecture"]) == ("tiny-mae", "ResEncTiny")  # its scratch baseline's
    external = written["external_checkpoint"]
    collected = read_metrics_json(tmp_path / "metrics.json")["run"]["external_checkpoint"]  # what the tables list
    assert (collected["source"], collected["commit"], collected["sha256"]) == (external["source"], commit,
                                                                              record["sha256"])
    assert (external["source"], external["kind"], external["revision"], external["commit"]) == (
        "hf://org/tiny-mae@main", "hf", "main", commit)
    assert external["sha256"] == record["sha256"] == record["files"]["checkpoint_final.pth"]["sha256"]
    assert external["format"] == "published repository" and external["architecture"]["family"] == "cnn"
    assert external["check"] == {**{k: report["transfers"][1][k] for k in ("moved", "left_new", "unexpected",
                                                                             "in_proj_repeated")},
                                 "input_channels": 2, "finetune_patch_size": report["finetune_patch_size"],
                                 "pretrain_patch_size": report["pretrain_patch_size"], "position_embedding": None}
    assert external["check"]["moved"] > 0 and external["check"]["in_proj_repeated"]


def test_checkpoint_entries_are_checked_before_any_job_naming_their_key():
    """Names follow the schema's pattern, are unique and are not `scratch`; sources must parse."""
    def entries(*items):
        return omb_config.deep_update(_config(), {"checkpoints": list(items)})

    for bad in ("a__b", "my ckpt", "../x", "-x"):
        with pytest.raises(ConfigError, match=r"'checkpoints.0.name'"):
            omb_config.validate(entries({"name": bad, "source": "/x.pth"}), omb_config.SCHEMA_PATH)
    good = {"name": "mine", "source": "/x.pth"}
    assert list(ckpt_settings.configured_checkpoints(entries(good, {"name": "hub", "source": "hf://o/r"}))) == [
        "mine", "hub"]
    with pytest.raises(ConfigError, match=r"'checkpoints\[1\].name': 'mine' is also the name of checkpoints\[0\]"):
        ckpt_settings.configured_checkpoints(entries(good, {"name": "mine", "source": "hf://o/r"}))
    with pytest.raises(ConfigError, match=r"'checkpoints\[0\].name': 'scratch' names the from-scratch"):
        ckpt_settings.configured_checkpoints(entries({"name": "scratch", "source": "/x.pth"}))
    with pytest.raises(ConfigError, match=r"'checkpoints\[0\].source'.*'web'.*needs a sha256"):
        ckpt_settings.configured_checkpoints(entries({"name": "web", "source": "https://example.org/c.pth"}))
    with pytest.raises(ConfigError, match=r"'checkpoints.0.schedules'"):  # the schema: at least one
        omb_config.validate(entries({**good, "schedules": []}), omb_config.SCHEMA_PATH)


@pytest.mark.parametrize("spec, entry", [
    ("hf://AnonRes/ResEncL-OpenMind-MAE@abc", {"name": "ResEncL-OpenMind-MAE",
                                               "source": "hf://AnonRes/ResEncL-OpenMind-MAE@abc"}),
    ("https://zenodo.org/r/1/files/mae_final.pth,sha256=" + "a" * 64,
     {"name": "mae-final", "source": "https://zenodo.org/r/1/files/mae_final.pth", "sha256": "a" * 64}),
    ("spark=/data/ssl/checkpoint_final.pth,architecture=ResEncL",
     {"name": "spark", "source": "/data/ssl/checkpoint_final.pth", "architecture": "ResEncL"}),
    ("/data/ssl/run7/checkpoint_final.pth", {"name": "run7", "source": "/data/ssl/run7/checkpoint_final.pth"}),
])
def test_evaluate_sources_become_config_entries(spec, entry):
    assert evaluate.parse_entry(spec) == entry


def test_evaluate_refuses_unknown_keys_and_one_name_twice():
    with pytest.raises(ValueError, match="'colour=red' is not one of sha256"):
        evaluate.parse_entry("/a.pth,colour=red")
    with pytest.raises(ValueError, match=r"\['a'\] given twice"):
        evaluate.overlay(["/x/a.pth", "/y/a.pth"])


def test_evaluate_writes_the_overlay_and_plans_the_workflow(tmp_path, monkeypatch, capfd):
    pretrained_checkpoint(tmp_path / "mine.pth", "ResEncTiny")
    (tmp_path / "config").symlink_to(REPO / "config")
    registry_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", "mine.pth", "--datasets", "ATL", "COS", "--dry-run"]) == 0
    overlay = yaml.safe_load((tmp_path / evaluate.DEFAULT_OVERLAY).read_text())
    assert overlay == {"checkpoints": [{"name": "mine", "source": str(tmp_path / "mine.pth")}],
                       "finetune": {"datasets": ["ATL", "COS"]}}
    out = capfd.readouterr()
    text = out.out + out.err
    assert "fetch_checkpoint" in text and "results/downstream/COS/mine__sawtooth__150/fold_test/metrics.json" in text
    assert "rule pretrain:" not in text and "fetch_dataset" not in text


def test_check_checkpoint_cli_fetches_a_hub_source_first(tiny_run, tmp_path):
    cache = tmp_path / "hub"
    commit = hub_cache.publish_run(tiny_run, cache, "org/tiny-mae")
    out = tmp_path / "check.json"
    assert cli.main(["check-checkpoint", "hf://org/tiny-mae", "--cache-dir", str(cache), "--offline",
                     "--channels", "1", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "hf://org/tiny-mae" and report["format"] == "published repository"
    assert [t["input_channels"] for t in report["transfers"]] == [1, 2]
    assert cli.main(["check-checkpoint", f"hf://org/tiny-mae@{'0' * 40}", "--cache-dir", str(cache), "--offline",
                     "--out", str(tmp_path / "absent.json")]) == 1  # a revision the cache lacks
    assert not (tmp_path / "absent.json").exists() and commit


def test_a_classification_warm_start_longer_than_its_run_is_a_config_error():
    config = _config(downstream={"classification": {"epochs": 10, "warmup_epochs": 12}})
    with pytest.raises(ConfigError, match=r"'downstream.classification.warmup_epochs' \(12\) at 10"):
        ft_settings.check_schedules(config, [])
    ft_settings.check_schedules(_config(), ["simclr__ResEncTiny__demo"])  # the demo's own: 50 passes, 5 warm-up
