"""The Snakemake workflow itself: lint, dry runs with exact job counts, config errors naming the key,
and (slow) a real run of the demo: resumable, re-run exactly where a setting changed, and reported."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import registry_folders, run_snakemake
from openmind_bench.registry import load_registry

# Jobs per rule of `snakemake -n all` on the demo config.
DEMO_JOBS = {
    "all": 1, "demo_mirror": 1, "fetch_dataset": 3, "index_dataset": 3, "gather_index": 1, "dwi_shard": 6, "dwi_gather": 1, "masks_shard": 6,
    "merge_masks": 1, "quality_shard": 6, "quality_gather": 1, "preprocess_shard": 6,
    "select_pretrain_data": 2, "pretrain": 5, "demo_downstream": 1, "downstream_split": 3, "finetune": 25,
    "qc_rejected": 1, "benchmark_table_of_config": 1,
    "fingerprint_shard": 6, "downstream_fingerprints": 3, "curate_content": 1,
    # finetune: 3 datasets x (2 checkpoints x 2 schedules + 2 scratch) + 1 lora + 3 linear_probe runs (classification
    # only); the demo's MAE run served from a local hub cache and evaluated as an external checkpoint: 3 default runs
    # (its entry's schedules: default and linear_probe)
    "demo_hub": 1, "fetch_checkpoint": 1, "check_checkpoint": 1, "checkpoint_scores": 1,
}
# A second config: selection names with '.', '-' and '_', two methods x the papers' architectures
# (spark3d has no Primus implementation), two schedules, two datasets of the full table.
NAMES_CONFIG = {
    "datasets": ["ds000001", "ds000002"],
    "selections": [{"name": "t1.v2", "modalities": ["T1w"]}, {"name": "t2-only", "modalities": ["T2w"]},
                   {"name": "all_images"}],
    "pretrain": {"methods": ["mae", "spark3d"], "selections": ["t1.v2", "t2-only", "all_images"]},
    "finetune": {"datasets": ["ATL", "COS"]},
}


def _workdir(tmp_path: Path, repo: Path, overrides: dict | None = None) -> Path:
    """A fresh working directory: the repository's config/, plus an overlay config file."""
    (tmp_path / "config").symlink_to(repo / "config")
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overrides or {}))
    registry_folders(tmp_path)
    return tmp_path


def _job_counts(proc) -> dict[str, int]:
    """The `Job stats:` table of a (dry) run: rule -> jobs."""
    out = proc.stdout + proc.stderr
    if "Job stats:" not in out:
        return {}
    counts = {}
    for line in out.split("Job stats:", 1)[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_lint_clean(tmp_path, repo):
    work = _workdir(tmp_path, repo)
    for extra in ([], ["--configfile", str(repo / "config/demo.yaml")]):
        proc = run_snakemake(work, "--lint", *extra)
        assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_dry_run_demo_job_counts(tmp_path, repo):
    work = _workdir(tmp_path, repo)
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), "-n", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_counts(proc) == DEMO_JOBS


def test_dry_run_names_with_dots_dashes_underscores(tmp_path, repo):
    work = _workdir(tmp_path, repo, NAMES_CONFIG)
    proc = run_snakemake(work, "--configfile", str(work / "overlay.yaml"), "-n", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(repo / "config" / "openneuro_datasets.tsv", sep="\t", comment="#").set_index("dataset_id")
    shards = sum(-(-int(table.loc[d, "expected_images"]) // 200) for d in NAMES_CONFIG["datasets"])
    pretrain_runs = 3 * 3  # selections x (mae on ResEncL and PrimusM, spark3d on ResEncL)
    schedules, epochs = 3, 1  # sawtooth, warmup, lora at 150 epochs
    runs = pretrain_runs * schedules * epochs + 2  # + scratch ResEncL and PrimusM
    # every registry set with data present is checked for leakage, not only the two fine-tuned on
    present = len(load_registry(repo / "config/downstream_datasets.yaml", work / "data/downstream").names())
    assert _job_counts(proc) == {
        "all": 1, "fetch_dataset": 2, "index_dataset": 2, "gather_index": 1, "dwi_shard": shards, "dwi_gather": 1,
        "masks_shard": shards, "merge_masks": 1,
        "quality_shard": shards, "quality_gather": 1, "preprocess_shard": shards,
        "select_pretrain_data": 3, "pretrain": pretrain_runs, "downstream_split": present, "finetune": 2 * runs,
        "qc_rejected": 1, "benchmark_table_of_config": 1,
        "fingerprint_shard": shards, "downstream_fingerprints": present, "curate_content": 1,
    }
    out = proc.stdout + proc.stderr
    assert "results/pretrain/mae__PrimusM__t1.v2/checkpoint_final.pt" in out
    assert "results/downstream/COS/spark3d__ResEncL__t2-only__sawtooth__150/fold_test/metrics.json" in out


def test_dry_run_full_config_has_every_method_on_both_architectures(tmp_path, repo):
    work = _workdir(tmp_path, repo)
    proc = run_snakemake(work, "-n", "all", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = _job_counts(proc)
    n = len(pd.read_csv(repo / "config" / "openneuro_datasets.tsv", sep="\t", comment="#"))
    assert counts["fetch_dataset"] == n and counts["index_dataset"] == n and counts["gather_index"] == 1
    # 10 methods x 2 architectures - spark3d (CNN only) - simmim (Primus only)
    assert counts["pretrain"] == 18 and counts["benchmark_table_of_config"] == 1


@pytest.mark.parametrize("overrides, key", [
    ({"shard_size": -3}, "config key 'shard_size'"),
    ({"selections": [{"name": "t1__v2"}]}, "config key 'selections.0.name'"),
    ({"pretrain": {"methods": ["maee"]}}, "config key 'pretrain.methods[0]'"),
    ({"pretrain": {"architectures": ["ResEncXL"]}}, "config key 'pretrain.architectures[0]'"),
    ({"pretrain": {"selections": ["t1"]}}, "config key 'pretrain.selections[0]'"),
    ({"finetune": {"scratch_architectures": ["Swin"]}}, "config key 'finetune.scratch_architectures[0]'"),
    ({"datasets_table": "config/absent.tsv"}, "datasets table config/absent.tsv does not exist"),
    # two selections with one name: the last used to win silently
    ({"selections": [{"name": "demo"}, {"name": "demo", "modalities": ["T1w"]}],
      "pretrain": {"selections": ["demo"]}},
     "config key 'selections[1].name': 'demo' is also the name of selections[0]"),
    ({"downstream": {"schedules": ["sawtoth"]}}, "config key 'downstream.schedules[0]': unknown schedule 'sawtoth'"),
    # the demo probes DemoPatientCls during pre-training: its folder is the first one checked
    ({"downstream": {"build_demo": False, "root": "absent"}},
     "config key 'pretrain.probe_datasets[0]': probe dataset 'DemoPatientCls' has no folder absent/DemoPatientCls"),
])
def test_bad_config_stops_with_key_named(tmp_path, repo, overrides, key):
    work = _workdir(tmp_path, repo, overrides)
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-n", "all")
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_registry_dataset_name_that_is_a_path_is_a_registry_error(tmp_path, repo):
    registry = yaml.safe_load((repo / "config/downstream_demo.yaml").read_text())
    registry["datasets"]["../../evil"] = dict(registry["datasets"]["DemoLesionT1"])
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    work = _workdir(tmp_path, repo, {"downstream_registry": str(tmp_path / "registry.yaml"),
                                     "finetune": {"datasets": ["DemoLesionT1", "../../evil"]}})
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-n", "all")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "MissingInputException" not in out
    assert "datasets.../../evil: '../../evil' is not a valid dataset name" in out, out[-3000:]


@pytest.mark.slow
# the whole demo (25 fine-tuning jobs) and a dozen Snakemake runs: ~7 min alone on 2 cores, ~17 under load
@pytest.mark.timeout(1800)
def test_demo_all_runs_is_resumable_reruns_changed_settings_and_reports(tmp_path, repo, demo_mirror, demo_truth):
    # the demo as shipped, with 2 x 10 instead of 6 x 100 nnU-Net iterations: this test is about the
    # workflow (README's demo command runs the full demo; benchmarks/nnunet_finetune.py its learning)
    registry = tmp_path / "downstream_registry.yaml"  # a copy, edited below
    registry.write_text((repo / "config/downstream_demo.yaml").read_text())
    work = _workdir(tmp_path, repo, {"source": {"kind": "local", "root": str(demo_mirror), "build_demo": False},
                                     "downstream": {"epochs": [2], "steps_per_epoch": 10,
                                                    "classification": {"epochs": 2, "warmup_epochs": 1}},
                                     "downstream_registry": str(registry)})
    configs = ["--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml")]
    proc = run_snakemake(work, *configs, "-c2", "all", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    images = pd.read_parquet(work / "results/index/images.parquet")
    assert len(images) == len(demo_truth["images"])
    rejected = pd.read_csv(work / "results/qc/rejected.tsv", sep="\t")
    before_curation = rejected[rejected.stage != "curation"]
    assert sorted(before_curation.image) == sorted(f["path"] for f in demo_truth["expected_rejections"])
    # dipy's 10^3 example DWI: their maps are too small for a fingerprint (curation.fingerprint.min_extent_mm)
    real_dwi = [k for k, v in demo_truth["images"].items() if v.get("origin", "").startswith("real DWI")]
    too_small = rejected[rejected.stage == "curation"]
    assert len(too_small) == 3 * len(real_dwi) and too_small.reason.str.contains("too small").all(), too_small
    # the planted near-duplicates, exactly: one cluster each
    clusters = pd.read_parquet(work / "results/curation/duplicates.parquet")
    by_path = images.set_index("image_id").path.str.split("/raw/local/").str[1]
    found = {frozenset(by_path[g.image_id]) for _, g in clusters.groupby("cluster")}
    assert found == {frozenset((p["original"], p["copy"])) for p in demo_truth["planted_duplicates"]}
    # every indexed DWI scan became T2w/ADC/FA index rows, and those reached the pre-training store
    dwi_maps = pd.read_parquet(work / "results/index/dwi.parquet")
    dwi_scans = images[images.modality == "DWI"]
    assert sorted(dwi_maps.modality) == sorted(["ADC", "FA", "T2w"] * len(dwi_scans))
    assert set(dwi_maps.derived_from) == set(dwi_scans.image_id)
    stored = pd.concat([pd.read_csv(p, sep="\t") for p in (work / "results/preprocessed").rglob("shard-*.tsv")])
    assert set(dwi_maps.image_id) <= set(stored.image_id)
    # scratch (ResEnc, Primus) + simclr on ResEnc and mae on Primus x {default, frozen} + the hub-served MAE
    # (ResEnc) x default on the three demo downstream sets, + lora and linear_probe runs, per-case metrics each
    assert len(list((work / "results/downstream").rglob("metrics.json"))) == 25
    # `all` ends in the benchmark tables, the external checkpoint's rows marked, its source listed
    table = pd.read_csv(work / "results/benchmark/benchmark_table.csv")
    assert {"scratch", "simclr", "mae", "demo-hub-mae"} <= set(table.method)
    assert {"ResEncTiny", "PrimusTiny"} <= set(table.architecture)
    assert set(table[table.external].method) == {"demo-hub-mae"} and len(list((work / "results/benchmark/plots").glob("*.png")))
    # ... read back through huggingface_hub from the demo's hub cache, at the commit placed there
    commit = (work / "results/demo_hub/models--openmind-demo--ResEncTiny-demo-MAE/refs/main").read_text()
    assert f"commit `{commit}`" in (work / "results/benchmark/benchmark_table.md").read_text()
    external = json.loads((work / "results/downstream/DemoLesionT1/demo-hub-mae__default__2/fold_test/metrics.json")
                          .read_text())["external_checkpoint"]
    record = json.loads((work / "results/checkpoints/demo-hub-mae/source.json").read_text())
    assert (external["kind"], external["commit"], external["sha256"]) == ("hf", commit, record["sha256"])
    assert external["architecture"]["scratch_architecture"] == "ResEncTiny" and external["check"]["moved"] > 0
    assert "Δ scratch" in (work / "results/checkpoints/demo-hub-mae/scores.md").read_text()
    # masks and quality ran: every 3D image has masks and a score, and preprocessing used the masks
    n_3d = sum(1 for t in demo_truth["images"].values() if t["modality"] != "DWI")
    iqs = pd.read_parquet(work / "results/quality/iqs.parquet")
    assert len(iqs) == n_3d + len(dwi_maps) and iqs.quality_score.between(1, 5).all()
    masked = pd.read_parquet(work / "results/index/images_masked.parquet")
    assert (masked[masked.n_volumes == 1].anon_mask.str.endswith("_mask-anonymization.nii.gz")).all()
    for rule in ("fetch", "index", "dwi", "masks", "quality", "pretrain", "downstream", "aggregate"):
        assert list((work / "logs" / rule).rglob("*.log")), rule
        assert list((work / "logs/benchmarks" / rule).rglob("*.tsv")), rule

    # nothing left to do on a second run
    proc = run_snakemake(work, *configs, "-c2", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr

    # a store file deleted after real pre-training and fine-tuning runs: `all` re-makes it alone,
    # byte-identical, and none of those runs (their params, code and input provenance all recorded)
    image = work / stored.image.iloc[0]
    before = image.read_bytes()
    image.unlink()
    proc = run_snakemake(work, *configs, "-n", "all")
    assert _job_counts(proc) == {"all": 1, "preprocess_image": 1}, (proc.stdout + proc.stderr)[-3000:]
    proc = run_snakemake(work, *configs, "-c1", "all")
    assert proc.returncode == 0 and image.read_bytes() == before, proc.stderr[-3000:]
    proc = run_snakemake(work, *configs, "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    # a changed setting re-runs exactly the jobs it shapes, and those after them
    def jobs_after(change: dict) -> dict:
        (work / "change.yaml").write_text(yaml.safe_dump(change))
        proc = run_snakemake(work, *configs, str(work / "change.yaml"), "-n", "all")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _job_counts(proc)

    # pre-training epochs: the five pre-training runs, the 15 fine-tuning runs from the two checkpoints (with
    # lora and linear_probe), and the MAE ResEnc run's way through the hub: export, fetch, check, its 4 runs, scores
    scores = {"checkpoint_scores": 1, "benchmark_table_of_config": 1}
    assert jobs_after({"pretrain": {"epochs": 3}}) == {
        "all": 1, "pretrain": 5, "finetune": 19, "demo_hub": 1, "fetch_checkpoint": 1, "check_checkpoint": 1, **scores}
    # the sliding-window overlap: every segmentation run (classification has no sliding window)
    assert jobs_after({"finetune": {"sliding_window_overlap": 0.5}}) == {"all": 1, "finetune": 15, **scores}

    # params carry what each job uses and nothing else: nnU-Net's steps re-run the segmentation jobs
    # (15 of 25, the lora run among them), not classification; a manual quality score the gather, not the shards
    assert jobs_after({"downstream": {"steps_per_epoch": 5}}) == {"all": 1, "finetune": 15, **scores}
    manual = jobs_after({"quality": {"manual_scores": [{"dataset": "ds990001", "modality": "T1w", "score": 1.0}]}})
    assert manual.get("quality_gather") == 1 and "quality_shard" not in manual, manual
    # a registry edit re-runs the jobs that read the edited values: test subjects on OpenNeuro leave
    # the pre-training selection (and so every run after it); the splits read no such field
    original = registry.read_text()
    edited = yaml.safe_load(original)
    edited["datasets"]["DemoLesionT1FLAIR"]["openneuro"] = {"dataset": "ds990001", "subjects": ["01"]}
    registry.write_text(yaml.safe_dump(edited))  # keys sorted: a new order alone re-runs nothing
    counts = jobs_after({})
    assert counts.get("select_pretrain_data") == 2 and counts.get("pretrain") == 5, counts  # demo, demo-balanced
    assert "downstream_split" not in counts and "fetch_dataset" not in counts, counts
    edited["datasets"]["DemoLesionT1FLAIR"].pop("openneuro")
    edited["datasets"]["DemoLesionT1FLAIR"]["labels"] = {"background": 0, "lesions": 1}  # a renamed label
    registry.write_text(yaml.safe_dump(edited))
    counts = jobs_after({})
    assert counts.get("downstream_split") == 1 and counts.get("finetune") == 7 and "pretrain" not in counts, counts
    registry.write_text(original)

    # the report holds the benchmark tables and plots
    proc = run_snakemake(work, *configs, "--report", str(work / "report.html"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    assert "benchmark_table.csv" in html and "ranks_bootstrap.csv" in html and ".png" in html
    assert "Selections" in html and "summary.png" in html  # each selection's summary, side by side

    # `benchmark_table` gathers what exists and forces nothing
    proc = run_snakemake(work, *configs, "-c1", "benchmark_table", "--forcerun", "benchmark_table")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_counts(proc) == {"benchmark_table": 1}

    # any single output can be re-made by naming it
    target = work / "results/index/datasets/ds990002.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    proc = run_snakemake(work, *configs, "-c1", "results/index/datasets/ds990002.parquet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(target), before)

    # (last: it leaves a run trained with another setting than the demo's)
    # a changed setting trains anew with it; Snakemake removes only metrics.json, and the job used to
    # find nnU-Net's checkpoint_final.pth and skip training (plans and numbers of the old setting)
    seg_run = work / "results/downstream/DemoLesionT1/scratch__ResEncTiny__2/fold_test"
    (plans_file,) = (seg_run / "nnunet").rglob("plans.json")  # (predictions/ holds a copy)
    (model_file,) = (seg_run / "nnunet").rglob("checkpoint_final.pth")
    before = {"model": model_file.read_bytes(), "metrics": (seg_run / "metrics.json").read_text()}
    assert json.loads(plans_file.read_text())["openmind_bench"]["schedule"]["steps_per_epoch"] == 10
    (work / "change.yaml").write_text(yaml.safe_dump({"downstream": {"steps_per_epoch": 5}}))
    target = str((seg_run / "metrics.json").relative_to(work))
    proc = run_snakemake(work, *configs, str(work / "change.yaml"), "-c2", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(plans_file.read_text())["openmind_bench"]["schedule"]["steps_per_epoch"] == 5
    assert model_file.read_bytes() != before["model"]
    after = json.loads((seg_run / "metrics.json").read_text())
    assert (seg_run / "metrics.json").read_text() != before["metrics"] and after["training_reused"] is False
    # forced with the same settings: the trained model is reused, and the job's log says so
    proc = run_snakemake(work, *configs, str(work / "change.yaml"), "-c2", target, "--forcerun", "finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((seg_run / "metrics.json").read_text())["training_reused"] is True
    log_file = work / "logs/downstream/DemoLesionT1/scratch__ResEncTiny__2__fold_test.log"
    assert "reusing the trained model" in log_file.read_text()


def _mark_incomplete(work: Path, *outputs: str) -> None:
    """Leave outputs as a job killed with -9 leaves them: on disk, with Snakemake's incomplete marker."""
    import base64

    for out in outputs:
        (work / out).parent.mkdir(parents=True, exist_ok=True)
        (work / out).write_text("half-written")
        marker = work / ".snakemake" / "incomplete" / base64.urlsafe_b64encode(out.encode()).decode()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text('{"external_jobid": null}')


def test_default_workflow_profile_reruns_incomplete_outputs(tmp_path, repo):
    """profiles/default/ makes a plain re-run after kill -9 re-make the half-written outputs."""
    work = _workdir(tmp_path, repo, {"source": {"kind": "local", "root": str(tmp_path / "mirror"),
                                                "build_demo": False}})
    manifest = "data/raw/local/ds990002/download_manifest.json"
    _mark_incomplete(work, manifest, "results/qc/parts/fetch/local/ds990002.tsv")
    args = ("--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-n", manifest)
    # without the workflow profile Snakemake stops and asks for --rerun-incomplete
    proc = run_snakemake(work, *args, "--workflow-profile", "none")
    assert proc.returncode != 0 and "rerun-incomplete" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    proc = run_snakemake(work, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # --rerun-incomplete turns the incomplete outputs into forced re-runs
    assert "workflow specific profile profiles/default" in out and "reason: Forced execution" in out, out[-3000:]
    # the SLURM profile given by path keeps working beside it (both apply)
    proc = run_snakemake(work, *args, "--profile", str(repo / "profiles" / "slurm"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Using profile" in out and "and workflow specific profile" in out


def _fake_the_rest_finished(work: Path, configs: list[str]) -> None:
    """Mark every job of `all` still to run as done without running it: its outputs created empty, then
    `--touch` (pre-training and fine-tuning are not what these tests are about)."""
    proc = run_snakemake(work, *configs, "-n", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip().startswith("output:"):
            for out in line.split(":", 1)[1].split(","):
                path = work / out.strip()
                if path.name == "plots":
                    path.mkdir(parents=True, exist_ok=True)
                elif not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
    proc = run_snakemake(work, *configs, "-c1", "--touch", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_deleted_per_image_files_are_remade_alone_by_all_or_by_name(tmp_path, repo, demo_mirror):
    """A store file, mask or DWI map deleted after its shard ran: `snakemake all` plans exactly the job that
    re-makes it (no pre-training or fine-tuning), the file comes back byte-identical, naming it as a
    target works, and a file no job makes fails with the shard command named (issue: 'a deleted
    intermediate is not re-made')."""
    # no external checkpoint: the faked (empty) check.json would be read for the scratch baselines
    work = _workdir(tmp_path, repo, {"source": {"kind": "local", "root": str(demo_mirror), "build_demo": False},
                                     "checkpoints": []})
    configs = ["--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml")]
    # the real run up to the pre-training data (every shard stage), the rest marked done
    proc = run_snakemake(work, *configs, "-c2", "results/selections/demo/pretrain_data__preprocessed_train.json",
                         timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    _fake_the_rest_finished(work, configs)
    proc = run_snakemake(work, *configs, "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    manifests = sorted((work / "results/preprocessed").glob("*/shard-*.tsv"))
    stored = pd.concat([pd.read_csv(p, sep="\t") for p in manifests])
    image = work / stored.image.iloc[0]
    anat = work / stored.anat.iloc[0]
    masks = pd.concat([pd.read_parquet(p) for p in sorted((work / "results/masks").glob("*/shard-*.parquet"))])
    mask = work / masks[masks.anatomy_source != "release"].anat_mask.iloc[0]
    fa_map = work / pd.read_parquet(work / "results/index/dwi.parquet").query("modality == 'FA'").path.iloc[0]
    before = {p: p.read_bytes() for p in (image, anat, mask, fa_map)}
    for p in before:
        p.unlink()
    proc = run_snakemake(work, *configs, "-n", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_counts(proc) == {"all": 1, "preprocess_image": 1, "masks_image": 1, "dwi_file": 1}
    proc = run_snakemake(work, *configs, "-c2", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in before} == before
    proc = run_snakemake(work, *configs, "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    # naming the file as a target re-makes it (and only it)
    for p in (image, mask, fa_map):
        p.unlink()
        proc = run_snakemake(work, *configs, "-c1", str(p.relative_to(work)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert p.read_bytes() == before[p]
    proc = run_snakemake(work, *configs, "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    # the store path of a 4D DWI scan (its shard skips it; its derived maps are stored instead): no job
    # makes it, and the error names the file and the shard command
    images = pd.read_parquet(work / "results/index/images.parquet")
    dwi = images[images.n_volumes > 1].iloc[0]
    target = (f"results/preprocessed/{dwi.dataset}/sub-{dwi.subject}/ses-{dwi.session or 'DEFAULT'}/"
              f"{dwi.image_id}.b2nd")
    proc = run_snakemake(work, *configs, "-c1", target)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (f"{dwi.image_id}: results/preprocessed/{dwi.dataset}/shard-" in out and "does not list this image" in out
            and "--forcerun preprocess_shard" in out), out[-3000:]


def test_external_checkpoints_are_fetched_and_checked_before_any_fine_tuning(tmp_path, repo):
    """Config `checkpoints`: one fetch and one CPU check job per checkpoint; a broken one fails its own
    check naming the file, and the other goes on (keep-going); bad entries are config errors."""
    from test_transfer import pretrained_checkpoint

    pretrained_checkpoint(tmp_path / "mine.pt", "ResEncTiny")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    entries = [{"name": "mine", "source": str(tmp_path / "mine.pt")},
               {"name": "broken", "source": str(tmp_path / "broken.pt")}]
    work = _workdir(tmp_path, repo, {"checkpoints": entries})
    configs = ["--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml")]
    counts = _job_counts(run_snakemake(work, *configs, "-n", "all"))
    assert counts["fetch_checkpoint"] == 2 and counts["check_checkpoint"] == 2 and counts["checkpoint_scores"] == 2
    # each checkpoint x 2 schedules x 3 dataset-folds (the demo's own external entry is replaced: no hub; the
    # demo's one lora row stays), + linear_probe of the 2 own and 2 external checkpoints on the classification set
    demo = {k: v for k, v in DEMO_JOBS.items() if "checkpoint" not in k and k != "demo_hub"}
    assert {k: v for k, v in counts.items() if "checkpoint" not in k} == {**demo, "finetune": 18 + 1 + 2 * 2 * 3 + 4}

    targets = [f"results/checkpoints/{e['name']}/check.json" for e in entries]
    proc = run_snakemake(work, *configs, "-c2", "--keep-going", *targets)
    assert proc.returncode != 0
    report = json.loads((work / targets[0]).read_text())
    assert report["architecture"]["class"] == "ResidualEncoderUNet" and report["architecture"]["family"] == "cnn"
    assert [t["input_channels"] for t in report["transfers"]] == [1, 2]  # the demo registry's channel counts
    record = json.loads((work / "results/checkpoints/mine/source.json").read_text())
    assert record["kind"] == "local" and len(record["sha256"]) == 64
    assert not (work / targets[1]).exists()
    log = (work / "logs/checkpoints/broken/check.log").read_text()
    assert "broken" in log and "not a readable torch file" in log, log[-2000:]

    for overrides, key in (
        ({"checkpoints": [entries[0], {"name": "mine", "source": str(tmp_path / "broken.pt")}]},
         "config key 'checkpoints[1].name': 'mine' is also the name of checkpoints[0]"),
        ({"checkpoints": [{"name": "web", "source": "https://example.org/ckpt.pth"}]},
         "config key 'checkpoints[0].source'"),
        # its rows would carry the label of the config's own SimCLR runs
        ({"checkpoints": [{"name": "simclr", "source": str(tmp_path / "mine.pt")}]},
         "config key 'checkpoints[0].name': 'simclr' is also a pre-training method of this config"),
        ({"stages": {"openmind_data": False}}, "config key 'stages.pretrain'"),
    ):
        (work / "bad.yaml").write_text(yaml.safe_dump(overrides))
        proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "bad.yaml"), "-n", "all")
        assert proc.returncode != 0 and key in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def _assert_waits_for_its_check(dry_run: str, checked: bool) -> None:
    """A fine-tuning job of an external checkpoint has the checkpoint's check.json among its inputs;
    before the check has run, Snakemake plans it with an input still to be determined."""
    job = next(block for block in dry_run.split("rule finetune:")[1:]
               if "results/downstream/ATL/spark__sawtooth__150/fold_test/metrics.json" in block.split("rule ")[0])
    inputs = job.split("output:")[0]
    assert ("results/checkpoints/spark/check.json" in inputs) if checked else ("<TBD>" in inputs), job


def test_evaluate_overlay_scores_external_checkpoints_with_one_scratch_baseline_per_architecture(tmp_path, repo):
    """config/evaluate.yaml over the full registry, with a published-layout ResEnc-L, an nnssl-layout
    Primus-M and a plan-less nnssl Spark (ResEnc-L) checkpoint, all full size: no OpenMind data or
    pre-training job; every schedule, epoch and low-data setting applies to each checkpoint; after the
    checks (run for real on CPU) the scratch baselines are those of the two architectures, once each."""
    from openmind_bench import config as omb_config
    from openmind_bench.downstream.settings import dataset_folds
    from test_checkpoints import full_size_checkpoint

    work = _workdir(tmp_path, repo)
    published = tmp_path / "published"
    published.mkdir()
    full_size_checkpoint(published / "checkpoint_final.pth", "ResEncL", plan_beside=True)
    full_size_checkpoint(tmp_path / "primus.pth", "PrimusM", nnssl_plan=True)
    full_size_checkpoint(tmp_path / "spark.pth", "ResEncL", plan=False)
    entries = [{"name": "mae-published", "source": str(published)},
               {"name": "primus-submission", "source": str(tmp_path / "primus.pth")},
               {"name": "spark", "source": str(tmp_path / "spark.pth"), "architecture": "ResEncL"}]
    overlay = {"checkpoints": entries, "downstream": {"low_data_n": [10]}}
    (work / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--configfile", str(repo / "config/evaluate.yaml"), str(work / "overlay.yaml")]

    config = yaml.safe_load((repo / "config/config.yaml").read_text())
    for layer in (yaml.safe_load((repo / "config/evaluate.yaml").read_text()), overlay):
        omb_config.deep_update(config, layer)
    config = omb_config.validate(config, repo / "config/schema.yaml")
    config["downstream"]["root"] = str(work / "data" / "downstream")
    pairs = sum(len(f) for f in dataset_folds(config).values())  # (dataset, fold) jobs per run
    schedules, epochs = len(config["downstream"]["schedules"]), len(config["downstream"]["epochs"])
    per_checkpoint = schedules * epochs * 2  # x (all cases, n=10)
    fixed = {"all": 1, "fetch_checkpoint": 3, "check_checkpoint": 3, "checkpoint_scores": 3,
             "downstream_split": len(dataset_folds(config)), "qc_rejected": 1, "benchmark_table_of_config": 1}

    proc = run_snakemake(work, *configs, "-n", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_counts(proc) == {**fixed, "finetune": 3 * per_checkpoint * pairs}  # scratch: after the checks
    _assert_waits_for_its_check(proc.stdout + proc.stderr, checked=False)

    checks = [f"results/checkpoints/{e['name']}/check.json" for e in entries]
    proc = run_snakemake(work, *configs, "-c2", *checks, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    scratch = {json.loads((work / c).read_text())["architecture"]["scratch_architecture"] for c in checks}
    assert scratch == {"ResEncL", "PrimusM"}
    proc = run_snakemake(work, *configs, "-n", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scratch_runs = 2 * epochs * 2  # two architectures, once each, x (all cases, n=10)
    assert _job_counts(proc) == {**{k: v for k, v in fixed.items() if "checkpoint" not in k or "scores" in k},
                                 "finetune": (3 * per_checkpoint + scratch_runs) * pairs}
    out = proc.stdout + proc.stderr
    _assert_waits_for_its_check(out, checked=True)
    assert "results/downstream/ATL/scratch__PrimusM__150__n10/fold_test/metrics.json" in out
    assert "results/downstream/ATL/spark__sawtooth__150/fold_test/metrics.json" in out
    for rule in ("fetch_dataset", "index_dataset", "preprocess_shard", "pretrain", "select_pretrain_data"):
        assert f"rule {rule}:" not in out
