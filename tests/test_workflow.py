"""The Snakemake workflow itself: lint, dry runs of both configs, and a real run on the demo."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_snakemake


def _workdir(tmp_path: Path, repo: Path, overrides: dict | None = None) -> Path:
    """A fresh working directory: the repository's config/, plus an overlay config file."""
    (tmp_path / "config").symlink_to(repo / "config")
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overrides or {}))
    return tmp_path


def test_lint_clean(tmp_path, repo):
    work = _workdir(tmp_path, repo)
    for extra in ([], ["--configfile", str(repo / "config/demo.yaml")]):
        proc = run_snakemake(work, "--lint", *extra)
        assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("configfile, datasets", [("config/demo.yaml", 3), ("config/config.yaml", None)])
def test_dry_run_all(tmp_path, repo, configfile, datasets):
    work = _workdir(tmp_path, repo)
    proc = run_snakemake(work, "--configfile", str(repo / configfile), "-n", "all", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    n = datasets or len(pd.read_csv(repo / "config" / "openneuro_datasets.tsv", sep="\t", comment="#"))
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["fetch_dataset"] == n and counts["index_dataset"] == n and counts["gather_index"] == 1


def test_bad_config_value_stops_with_key_named(tmp_path, repo):
    work = _workdir(tmp_path, repo, {"shard_size": -3})
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-n", "all")
    assert proc.returncode != 0
    assert "config key 'shard_size'" in proc.stdout + proc.stderr


def test_demo_all_runs_and_is_resumable(tmp_path, repo, demo_mirror, demo_truth):
    work = _workdir(tmp_path, repo, {"source": {"kind": "local", "root": str(demo_mirror), "build_demo": False}})
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-c2", "all")
    assert proc.returncode == 0, proc.stderr[-5000:]
    images = pd.read_parquet(work / "results/index/images.parquet")
    assert len(images) == len(demo_truth["images"])
    rejected = pd.read_csv(work / "results/qc/rejected.tsv", sep="\t")
    assert sorted(rejected.image) == sorted(f["path"] for f in demo_truth["expected_rejections"])
    # every indexed DWI scan became T2w/ADC/FA index rows, and those reached the pre-training store
    dwi_maps = pd.read_parquet(work / "results/index/dwi.parquet")
    dwi_scans = images[images.modality == "DWI"]
    assert sorted(dwi_maps.modality) == sorted(["ADC", "FA", "T2w"] * len(dwi_scans))
    assert set(dwi_maps.derived_from) == set(dwi_scans.image_id)
    stored = pd.concat([pd.read_csv(p, sep="\t") for p in (work / "results/preprocessed").rglob("shard-*.tsv")])
    assert set(dwi_maps.image_id) <= set(stored.image_id)
    # scratch + mae x {default, frozen} on the three demo downstream sets, per-case metrics each
    assert len(list((work / "results/downstream").rglob("metrics.json"))) == 9
    for rule in ("fetch", "index"):
        assert list((work / "logs" / rule).rglob("*.log")), rule
        assert list((work / "logs/benchmarks" / rule).rglob("*.tsv")), rule

    # nothing left to do on a second run
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-c2", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr

    # any single output can be re-made by naming it
    target = work / "results/index/datasets/ds990002.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    proc = run_snakemake(work, "--configfile", str(repo / "config/demo.yaml"), str(work / "overlay.yaml"), "-c1",
                         "results/index/datasets/ds990002.parquet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(target), before)
