"""The `openneuro` source against a real S3 server (moto, in its own process) behind a
fault-injecting proxy: happy path, versions, resume after a killed run, injected faults,
path safety, snapshot checks, and the demo workflow switched to S3."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from s3server import FaultProxy, upload

from openmind_bench.config import validate
from openmind_bench.qc import Rejections
from openmind_bench.sources import fetch_dataset, openneuro, s3_mirror
from openmind_bench.download_manifest import Manifest
from openmind_bench.sources.base import SourceError
from openmind_bench.sources.state import STATE_FILE

DATASET = "ds000001"
MB = 1024 * 1024
BIG = f"{DATASET}/sub-01/dwi/sub-01_dwi.nii.gz"  # 11 MiB, uploaded in 5 MiB parts


def _bytes(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def dataset_files(version: str = "1.0.0") -> dict[str, bytes]:
    description = {"Name": "test", "BIDSVersion": "1.8.0", "DatasetDOI": f"doi:10.18112/openneuro.{DATASET}.v{version}"}
    files = {
        f"{DATASET}/dataset_description.json": json.dumps(description).encode(),
        f"{DATASET}/participants.tsv": b"participant_id\tage\nsub-01\t30\nsub-02\t41\n",
        f"{DATASET}/CHANGES": b"",  # empty objects exist on OpenNeuro too
        f"{DATASET}/sub-01/anat/sub-01_T1w.json": b'{"RepetitionTime": 2.3}',
        f"{DATASET}/sub-01/func/sub-01_task-rest_bold.nii.gz": _bytes(9, 3000),  # excluded by default
        f"{DATASET}/sub-01/dwi/sub-01_dwi.bval": b"0 1000 1000\n",
        f"{DATASET}/sub-01/dwi/sub-01_dwi.bvec": b"0 1 0\n0 0 1\n0 0 0\n",
        BIG: _bytes(1, 11 * MB + 12345),
    }
    for i, (sub, suffix) in enumerate([("01", "T1w"), ("01", "T2w"), ("01", "FLAIR"), ("02", "T1w"),
                                       ("02", "T2w"), ("02", "FLAIR")]):
        files[f"{DATASET}/sub-{sub}/anat/sub-{sub}_{suffix}.nii.gz"] = _bytes(10 + i, 20_000 + 7_000 * i)
    return files


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's S3 server in its own process, stopped by PID."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, endpoint = s3_mirror.start_moto(log_path=log_path)
    yield endpoint
    s3_mirror.stop(proc)


@pytest.fixture(scope="module")
def proxy(moto):
    p = FaultProxy(moto)
    yield p
    p.close()


@pytest.fixture
def faults(proxy):
    proxy.reset()
    yield proxy
    proxy.reset()


_bucket_counter = iter(range(10_000))


@pytest.fixture
def bucket(moto):
    """A fresh versioned, anonymously readable bucket holding the test dataset."""
    name = f"openneuro-test-{next(_bucket_counter)}"
    files = dataset_files()
    latest = upload(moto, name, files)
    return {"name": name, "files": files, "latest": latest}


@pytest.fixture
def options(repo, faults, bucket):
    config = validate({"source": {"kind": "openneuro"}}, repo / "config" / "schema.yaml")
    return {**config["source"], "endpoint_url": faults.url, "bucket": bucket["name"], "max_concurrency": 4,
            "request_attempts": 3, "file_attempts": 3, "retry_backoff_s": 0.01, "read_timeout_s": 10,
            "multipart_threshold_mb": 4, "multipart_chunksize_mb": 4}


def selected_keys(files: dict[str, bytes]) -> set[str]:
    return {k for k in files if "/func/" not in k}


def assert_identical(dest: Path, files: dict[str, bytes], keys) -> None:
    for key in keys:
        rel = key.split("/", 1)[1]
        assert (dest / rel).read_bytes() == files[key], rel


def run_fetch(options, dest, snapshot="1.0.0"):
    rejections = Rejections("fetch")
    manifest = fetch_dataset(options, DATASET, snapshot, dest, dest / "download_manifest.json", rejections)
    return manifest, rejections


def test_options_take_the_schema_defaults(repo):
    schema = yaml.safe_load((repo / "config" / "schema.yaml").read_text())
    props = schema["properties"]["source"]["properties"]
    opts = openneuro.options_with_defaults({"max_concurrency": 3, "endpoint_url": None})
    assert opts["max_concurrency"] == 3 and opts["endpoint_url"] is None
    for key in openneuro.OPTIONS:
        assert props[key]["description"]
        if key != "max_concurrency":
            assert opts[key] == props[key]["default"], key
    assert {"openneuro", "openmind_release"} <= set(props["kind"]["enum"])


def test_happy_path_versions_and_selection(tmp_path, options, bucket, faults):
    dest = tmp_path / "raw" / DATASET
    manifest, rejections = run_fetch(options, dest)
    wanted = selected_keys(bucket["files"])
    assert {f.path for f in manifest.files} == {k.split("/", 1)[1] for k in wanted}
    assert_identical(dest, bucket["files"], wanted)
    assert not (dest / "sub-01/func").exists()
    for record in manifest.files:
        key = f"{DATASET}/{record.path}"
        assert record.version_id == bucket["latest"][key]["VersionId"]
        assert record.etag == bucket["latest"][key]["ETag"]
        assert record.md5 == hashlib.md5(bucket["files"][key]).hexdigest()
    assert manifest.record_of("sub-01/dwi/sub-01_dwi.nii.gz").etag.endswith("-3")  # multipart ETag
    assert manifest.snapshot_match is True and not manifest.failed and not manifest.refused
    assert len(rejections) == 0
    assert Manifest.read(dest / "download_manifest.json").files == manifest.files
    # the listing's size and ETag go to the transfer manager: no HEAD, every GET pinned to its version
    assert not [r for r in faults.requests if r.method == "HEAD"]
    gets = faults.gets(DATASET)
    assert gets and all("versionId=" in r.query for r in gets)
    assert len(faults.gets(BIG)) == 3  # 11 MiB in 4 MiB ranges
    assert not faults.gets("/func/")
    assert not list(dest.rglob(".*.tmp-*"))


def test_latest_version_is_fetched(tmp_path, options, bucket, moto):
    key = f"{DATASET}/sub-02/anat/sub-02_T1w.nii.gz"
    client = s3_mirror.admin_client(moto)
    new = b"second version" * 1000
    client.put_object(Bucket=bucket["name"], Key=key, Body=new, ACL="public-read")
    versions = client.list_object_versions(Bucket=bucket["name"], Prefix=key)["Versions"]
    assert len(versions) == 2
    latest = next(v["VersionId"] for v in versions if v["IsLatest"])
    dest = tmp_path / DATASET
    manifest, _ = run_fetch(options, dest)
    assert (dest / "sub-02/anat/sub-02_T1w.nii.gz").read_bytes() == new
    assert manifest.record_of("sub-02/anat/sub-02_T1w.nii.gz").version_id == latest


_KILLED_FETCH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from openmind_bench.qc import Rejections
    from openmind_bench.sources import openneuro
    options = json.loads(sys.argv[1])
    openneuro.fetch("ds000001", "1.0.0", Path(sys.argv[2]), options, Rejections("fetch"))
""")


def test_resume_after_killed_run_fetches_only_missing_files(tmp_path, options, bucket, faults):
    dest = tmp_path / DATASET
    faults.add("hang", key=BIG, times=100)  # every range of the big file stalls half-way
    child = subprocess.Popen([sys.executable, "-c", _KILLED_FETCH, json.dumps(options), str(dest)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    small = [k for k in selected_keys(bucket["files"]) if k != BIG]
    big = dest / BIG.split("/", 1)[1]

    def partial_bytes() -> int:
        return sum(p.stat().st_size for p in big.parent.glob(".*.tmp-*")) if big.parent.is_dir() else 0

    try:
        deadline = time.monotonic() + 60
        # kill once every small file is complete and the big one is half-written
        while not (all((dest / k.split("/", 1)[1]).exists() for k in small) and partial_bytes() > 0):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run did not get half-way through the big file"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not big.exists(), "a killed download left a file under its final name"
    assert partial_bytes() > 0

    faults.reset()
    manifest, rejections = run_fetch(options, dest)
    fetched = {r.key for r in faults.gets(DATASET)}
    assert fetched == {BIG}, f"the resumed run fetched again: {fetched - {BIG}}"
    assert_identical(dest, bucket["files"], selected_keys(bucket["files"]))
    assert not list(dest.rglob(".*.tmp-*")) and not manifest.failed and len(rejections) == 0

    # a third run finds everything complete (from its state file), and so does one without it,
    # checking the plain ETags and the multipart ETag of the big file (5 MiB parts) by MD5
    for drop_state in (False, True):
        if drop_state:
            (dest / STATE_FILE).unlink()
        faults.reset()
        again, _ = run_fetch(options, dest)
        assert not faults.gets(DATASET)
        assert again.files == manifest.files


def test_injected_faults_end_in_identical_files(tmp_path, options, bucket, faults):
    a, b, c, d, e, f = (f"{DATASET}/sub-0{s}/anat/sub-0{s}_{m}.nii.gz" for s, m in
                        [(1, "T1w"), (1, "T2w"), (1, "FLAIR"), (2, "T1w"), (2, "T2w"), (2, "FLAIR")])
    faults.add("500", key=a, times=2)  # botocore retries
    faults.add("503", key=b, times=2)  # throttling (SlowDown)
    faults.add("drop", key=c)  # connection cut mid-body
    faults.add("short", key=d)  # Content-Length lies short: a complete-looking truncated body
    faults.add("long", key=e)  # Content-Length promises more than comes
    faults.add("corrupt", key=f)  # same length, one byte flipped
    faults.add("drop", key=BIG)  # one range of the multipart download cut
    faults.add("corrupt", key=f"{DATASET}/participants.tsv")
    dest = tmp_path / DATASET
    manifest, rejections = run_fetch(options, dest)
    assert not manifest.failed and len(rejections) == 0
    assert_identical(dest, bucket["files"], selected_keys(bucket["files"]))
    for key, least in [(a, 3), (b, 3), (c, 2), (d, 2), (e, 2), (f, 2), (BIG, 4)]:
        assert len(faults.gets(key)) >= least, key
    assert all(fault.times == 0 for fault in faults.faults)  # every fault was hit


@pytest.mark.parametrize("checksums", ["stripped", "kept"])
def test_file_that_keeps_failing_is_recorded(tmp_path, options, bucket, faults, checksums):
    faults.reset(strip_checksums=checksums == "stripped")
    broken = f"{DATASET}/sub-02/anat/sub-02_FLAIR.nii.gz"
    faults.add("500", key=broken, times=1000)
    faults.add("corrupt", key=f"{DATASET}/sub-02/anat/sub-02_T2w.nii.gz", times=1000)
    faults.add("drop", key=f"{DATASET}/sub-01/anat/sub-01_T1w.nii.gz", times=1000)
    dest = tmp_path / DATASET
    manifest, rejections = run_fetch(options, dest)
    failed = {f["path"]: f["reason"] for f in manifest.failed}
    assert set(failed) == {"sub-02/anat/sub-02_FLAIR.nii.gz", "sub-02/anat/sub-02_T2w.nii.gz",
                           "sub-01/anat/sub-01_T1w.nii.gz"}
    assert "500" in failed["sub-02/anat/sub-02_FLAIR.nii.gz"]
    assert "RetriesExceededError" in failed["sub-01/anat/sub-01_T1w.nii.gz"]
    # our MD5/ETag check, or botocore's CRC32 validation where the object has a checksum
    why = "does not match ETag" if checksums == "stripped" else "FlexibleChecksumError"
    assert why in failed["sub-02/anat/sub-02_T2w.nii.gz"]
    assert not (dest / "sub-02/anat/sub-02_FLAIR.nii.gz").exists()
    assert not (dest / "sub-02/anat/sub-02_T2w.nii.gz").exists()
    frame = rejections.frame()
    assert set(frame.image) == {f"{DATASET}/{p}" for p in failed}
    assert frame.reason.str.startswith("fetch failed").all()
    assert len(faults.gets(broken)) == options["file_attempts"] * options["request_attempts"]
    on_disk = Manifest.read(dest / "download_manifest.json")
    assert on_disk.failed == manifest.failed and len(on_disk.files) == len(selected_keys(bucket["files"])) - 3


def test_required_file_failing_fails_the_dataset(tmp_path, options, faults):
    faults.add("500", key=f"{DATASET}/dataset_description.json", times=1000)
    with pytest.raises(SourceError, match="dataset_description.json"):
        run_fetch(options, tmp_path / DATASET)
    assert not (tmp_path / DATASET / "download_manifest.json").exists()


def test_path_traversal_and_symlinks_refused(tmp_path, options, bucket, moto):
    client = s3_mirror.admin_client(moto)
    evil = {
        f"{DATASET}/../ds000002/dataset_description.json": "path escapes the dataset folder",
        f"{DATASET}/sub-01/../../escape.nii.gz": "path escapes the dataset folder",
        f"{DATASET}//etc/cron.d/job": "absolute path",
        f"{DATASET}/sub-01\\..\\..\\win.nii.gz": "backslash",
        f"{DATASET}/sub-03/anat/sub-03_T1w.nii.gz": "symlink",
    }
    for key in evil:
        client.put_object(Bucket=bucket["name"], Key=key, Body=b"payload", ACL="public-read")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "raw" / DATASET
    dest.mkdir(parents=True)
    (dest / "sub-03").symlink_to(outside, target_is_directory=True)
    manifest, rejections = run_fetch(options, dest)
    refused = {f"{DATASET}/{r['path']}": r["reason"] for r in manifest.refused}
    assert set(refused) == set(evil)
    for key, why in evil.items():
        assert why in refused[key], (key, refused[key])
    assert not list(outside.iterdir())
    assert not (tmp_path / "raw" / "ds000002").exists() and not (tmp_path / "raw" / "escape.nii.gz").exists()
    assert len(rejections) == len(evil) and rejections.frame().reason.str.startswith("refused").all()
    assert_identical(dest, bucket["files"], selected_keys(bucket["files"]))  # the rest still comes


def test_snapshot_mismatch_reported_or_fatal(tmp_path, options, caplog):
    dest = tmp_path / DATASET
    with caplog.at_level(logging.WARNING):
        manifest, _ = run_fetch(options, dest, snapshot="2.0.0")
    assert manifest.snapshot_match is False and manifest.snapshot_found == "1.0.0"
    assert "snapshot mismatch" in caplog.text
    assert Manifest.read(dest / "download_manifest.json").snapshot_match is False
    with pytest.raises(SourceError, match="snapshot mismatch"):
        run_fetch({**options, "on_snapshot_mismatch": "fail"}, dest, snapshot="2.0.0")


def test_refused_version_listing_falls_back_to_head(tmp_path, options, bucket, faults, caplog):
    faults.add("403", query="versions", times=1000)
    dest = tmp_path / DATASET
    with caplog.at_level(logging.WARNING):
        manifest, _ = run_fetch(options, dest)
    assert "listing object versions refused" in caplog.text
    assert_identical(dest, bucket["files"], selected_keys(bucket["files"]))
    for record in manifest.files:
        assert record.version_id == bucket["latest"][f"{DATASET}/{record.path}"]["VersionId"]
    assert len([r for r in faults.requests if r.method == "HEAD"]) == len(manifest.files)


def test_missing_dataset_fails_clearly(tmp_path, options):
    with pytest.raises(SourceError, match="no objects under s3://.*/ds000777/"):
        fetch_dataset(options, "ds000777", "1.0.0", tmp_path / "d", tmp_path / "m.json", Rejections("fetch"))


def test_candidate_part_sizes():
    data = _bytes(3, 13 * MB + 1)
    assert 8 * MB in openneuro.candidate_part_sizes(len(data), 2)
    assert 5 * MB not in openneuro.candidate_part_sizes(len(data), 2)  # would make 3 parts


def test_multipart_etag_verifies_file(tmp_path):
    data = _bytes(4, 13 * MB + 1)
    path = tmp_path / "f"
    path.write_bytes(data)
    parts = [data[i:i + 8 * MB] for i in range(0, len(data), 8 * MB)]
    etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-2"
    assert openneuro.check_against_etag(path, etag) == (hashlib.md5(data).hexdigest(), True)
    assert openneuro.check_against_etag(path, hashlib.md5(data).hexdigest())[1] is True
    assert openneuro.check_against_etag(path, "0" * 32)[1] is False
    unknown_parts = hashlib.md5(b"x").hexdigest() + "-2"
    assert openneuro.check_against_etag(path, unknown_parts)[1] is None


_SERVE = textwrap.dedent("""
    import argparse, sys
    from openmind_bench.sources import s3_mirror
    parser = argparse.ArgumentParser()
    s3_mirror.register(parser.add_subparsers())
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
""")


def test_s3_mirror_serves_a_mirror_until_stopped(tmp_path, repo):
    """`openmind-bench s3-mirror --serve`: moto started, mirror uploaded, overlay written; the
    overlay's source fetches the mirror; SIGTERM stops the server."""
    mirror = tmp_path / "mirror"
    for key, data in dataset_files().items():
        (mirror / key).parent.mkdir(parents=True, exist_ok=True)
        (mirror / key).write_bytes(data)
    overlay = tmp_path / "demo_s3.yaml"
    server = subprocess.Popen([sys.executable, "-c", _SERVE, "s3-mirror", "--root", str(mirror), "--serve",
                               "--port", "0", "--overlay", str(overlay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not overlay.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
            time.sleep(0.1)
        source = yaml.safe_load(overlay.read_text())["source"]
        assert source["kind"] == "openneuro" and source["build_demo"] is False
        config = validate({"source": source}, repo / "config" / "schema.yaml")
        dest = tmp_path / "raw" / DATASET
        manifest, _ = run_fetch(config["source"], dest)
        assert len(manifest.files) == len(selected_keys(dataset_files()))
        assert_identical(dest, dataset_files(), selected_keys(dataset_files()))
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    with pytest.raises(SourceError, match="cannot list"):
        run_fetch({**config["source"], "request_attempts": 1}, tmp_path / "again")


@pytest.mark.slow
def test_demo_workflow_on_local_s3(demo_mirror, repo, tmp_path):
    """config/demo.yaml + config/demo_s3.yaml: the demo's fetch and index run against moto."""
    from conftest import run_snakemake

    proc, endpoint = s3_mirror.start_moto(log_path=tmp_path / "moto.log")
    try:
        counts = s3_mirror.upload_tree(demo_mirror, endpoint)
        assert set(counts) == {"ds990001", "ds990002", "ds990003"}
        work = tmp_path / "work"
        shutil.copytree(repo / "config", work / "config")  # every table and registry the configs name
        overlay = yaml.safe_load((repo / "config" / "demo_s3.yaml").read_text())
        assert overlay["source"]["kind"] == "openneuro" and overlay["source"]["build_demo"] is False
        overlay["source"]["endpoint_url"] = endpoint
        (work / "config" / "demo_s3.yaml").write_text(yaml.safe_dump(overlay))
        # config file paths are read relative to snakemake's own working directory, not --directory
        configs = ["--configfile", str(work / "config" / "demo.yaml"), str(work / "config" / "demo_s3.yaml")]
        dry = run_snakemake(work, *configs, "-n", "all")
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "fetch_dataset" in dry.stdout and "demo_mirror" not in dry.stdout
        real = run_snakemake(work, *configs, "--cores", "2", "results/index/images.parquet",
                             "results/qc/rejected.tsv")
        assert real.returncode == 0, real.stderr[-3000:]
    finally:
        s3_mirror.stop(proc)
    for d, n in counts.items():
        manifest = Manifest.read(work / "data" / "raw" / "openneuro" / d / "download_manifest.json")
        assert manifest.source == "openneuro" and manifest.snapshot_match is True
        assert all(f.version_id and f.md5 for f in manifest.files)
        for f in manifest.files:
            assert (work / "data" / "raw" / "openneuro" / d / f.path).read_bytes() == (demo_mirror / d / f.path).read_bytes()
    images = pd.read_parquet(work / "results" / "index" / "images.parquet")
    truth = json.loads((demo_mirror / "ground_truth" / "ground_truth.json").read_text())
    assert {p.split("/raw/openneuro/", 1)[1] for p in images.path} == set(truth["images"])
