"""Checkpoint sources: parsing, and fetches from a local path, an offline Hugging Face cache and HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from openmind_bench.checkpoints.sources import (
    CheckpointSourceError,
    fetch_checkpoint,
    parse_source,
    partial_download_path,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CKPT = b"weights-" * 1000
PLAN = b'{"architecture": "ResEncL"}'
CONFIG = b'{"model_type": "openmind"}'


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- parse_source -----------------------------------------------------------------------------------------


def test_parse_the_three_forms():
    local = parse_source("/ckpts/mae", name="mae")
    assert (local.kind, local.path) == ("local", Path("/ckpts/mae"))
    hub = parse_source("hf://AnonRes/ResEncL-OpenMind-MAE@v1/sub/checkpoint_final.pth", name="mae")
    assert (hub.kind, hub.repo_id, hub.revision, hub.filename) == (
        "hf", "AnonRes/ResEncL-OpenMind-MAE", "v1", "sub/checkpoint_final.pth")
    whole = parse_source("hf://AnonRes/PrimusM-OpenMind-VoCo", name="voco", revision="main")
    assert (whole.repo_id, whole.revision, whole.filename) == ("AnonRes/PrimusM-OpenMind-VoCo", "main", None)
    web = parse_source("https://zenodo.org/records/1/files/checkpoint_final.pth", name="z", sha256="A" * 64)
    assert (web.kind, web.sha256) == ("https", "a" * 64)


@pytest.mark.parametrize("text, kwargs, says", [
    ("hf://", {}, "repository is missing"),
    ("hf://AnonRes", {}, "repository is missing"),
    ("hf://AnonRes/repo@", {}, "not followed by a revision"),
    ("hf://AnonRes/repo/../x", {}, "'..'"),
    ("hf://AnonRes/repo@v1", {"revision": "v2"}, "differ"),
    ("http://example.org/ckpt.pth", {"sha256": "0" * 64}, "plain http:// is refused"),
    ("http://127.0.0.1/ckpt.pth", {"sha256": "0" * 64}, "plain http:// is refused"),
    ("https://zenodo.org/records/1/files/c.pth", {}, "needs a sha256"),
    ("https://zenodo.org/c.pth", {"sha256": "xyz"}, "not 64 hexadecimal"),
    ("s3://bucket/c.pth", {}, "unknown scheme"),
    ("/ckpts/mae", {"revision": "main"}, "hf:// sources only"),
    ("  ", {}, "empty"),
])
def test_malformed_sources_name_the_entry(text, kwargs, says):
    with pytest.raises(CheckpointSourceError, match=says) as raised:
        parse_source(text, name="my_mae", **kwargs)
    assert "'my_mae'" in str(raised.value)


def test_http_to_loopback_only_when_explicitly_allowed():
    assert parse_source("http://127.0.0.1:8000/c.pth", sha256="0" * 64, allow_insecure_loopback=True).kind == "https"
    with pytest.raises(CheckpointSourceError, match="plain http"):
        parse_source("http://10.0.0.1/c.pth", sha256="0" * 64, allow_insecure_loopback=True)


# --- local ------------------------------------------------------------------------------------------------


def published_folder(root: Path, plan: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "checkpoint_final.pth").write_bytes(CKPT)
    (root / "config.json").write_bytes(CONFIG)
    if plan:
        (root / "adaptation_plan.json").write_bytes(PLAN)
    return root


def test_local_file_and_folder(tmp_path):
    folder = published_folder(tmp_path / "src" / "mae")
    dest = tmp_path / "results" / "checkpoints" / "mae"
    record = fetch_checkpoint("mae", str(folder), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["adaptation_plan.json", "checkpoint_final.pth", "config.json",
                                                      "source.json"]
    assert (dest / "checkpoint_final.pth").read_bytes() == CKPT
    assert (dest / "checkpoint_final.pth").stat().st_ino != (folder / "checkpoint_final.pth").stat().st_ino
    on_disk = json.loads((dest / "source.json").read_text())
    assert on_disk == record
    assert record["kind"] == "local" and record["sha256"] == sha(CKPT) and record["checkpoint"] == "mae"
    assert record["files"]["adaptation_plan.json"] == {"size": len(PLAN), "sha256": sha(PLAN)}
    assert record["size"] == len(CKPT) + len(PLAN) + len(CONFIG)

    single = tmp_path / "src" / "own.pt"
    single.write_bytes(b"our own")
    record = fetch_checkpoint("own", str(single), tmp_path / "results" / "checkpoints" / "own", sha256=sha(b"our own"))
    assert list(record["files"]) == ["own.pt"] and record["sha256"] == sha(b"our own")


def test_local_folder_without_plan_and_wrong_sha_leave_nothing(tmp_path):
    folder = published_folder(tmp_path / "src" / "mae", plan=False)
    parent = tmp_path / "results" / "checkpoints"
    with pytest.raises(CheckpointSourceError, match=r"'mae'.*adaptation_plan\.json"):
        fetch_checkpoint("mae", str(folder), parent / "mae")
    assert list(parent.iterdir()) == []
    (folder / "adaptation_plan.json").write_bytes(PLAN)
    with pytest.raises(CheckpointSourceError, match=rf"'mae'.*expected {'0' * 64}, got {sha(CKPT)}"):
        fetch_checkpoint("mae", str(folder), parent / "mae", sha256="0" * 64)
    assert list(parent.iterdir()) == []
    with pytest.raises(CheckpointSourceError, match=r"'gone'.*does not exist"):
        fetch_checkpoint("gone", str(tmp_path / "nowhere"), parent / "gone")


def test_refetch_is_a_no_op_and_a_changed_source_replaces(tmp_path, caplog):
    folder = published_folder(tmp_path / "src" / "mae")
    dest = tmp_path / "results" / "checkpoints" / "mae"
    first = fetch_checkpoint("mae", str(folder), dest)
    inode = dest.stat().st_ino
    caplog.set_level(logging.INFO, logger="openmind_bench.checkpoints.sources")
    assert fetch_checkpoint("mae", str(folder), dest) == first
    assert dest.stat().st_ino == inode
    assert "nothing to fetch" in caplog.text

    other = tmp_path / "src" / "other.pth"
    other.write_bytes(b"other weights")
    record = fetch_checkpoint("mae", str(other), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["other.pth", "source.json"]
    assert record["sha256"] == sha(b"other weights")
    # the same path with new content (retrained) is fetched again
    other.write_bytes(b"retrained weights")
    assert fetch_checkpoint("mae", str(other), dest)["sha256"] == sha(b"retrained weights")
    # a fetched file gone missing: fetched again
    (dest / "other.pth").unlink()
    fetch_checkpoint("mae", str(other), dest)
    assert (dest / "other.pth").read_bytes() == b"retrained weights"
    # the original deleted after the fetch: the fetched copy stays and is not fetched again
    other.unlink()
    assert fetch_checkpoint("mae", str(other), dest)["sha256"] == sha(b"retrained weights")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mae"]


def test_a_killed_fetch_leaves_a_temporary_the_next_fetch_removes(tmp_path):
    folder = published_folder(tmp_path / "src" / "mae")
    parent = tmp_path / "results" / "checkpoints"
    leftover = parent / ".mae.tmp-424242"  # atomic.atomic_path's build folder of a killed process
    leftover.mkdir(parents=True)
    (leftover / "checkpoint_final.pth").write_bytes(b"half")
    fetch_checkpoint("mae", str(folder), parent / "mae")
    assert sorted(p.name for p in parent.iterdir()) == ["mae"]


# --- Hugging Face, offline, from a cache in the hub's layout -------------------------------------------------


def add_to_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
                    refs: tuple[str, ...] = ("main",)) -> None:
    """One commit of a model repo as huggingface_hub caches it: content in blobs/, the commit's tree in
    snapshots/<commit>/ as relative symlinks to the blobs, and each branch's commit hash in refs/<branch>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for rel, data in files.items():
        blob = repo / "blobs" / sha(data)  # LFS files are stored under their sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the hub writes the hash without a newline


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    add_to_hf_cache(cache, "AnonRes/ResEncL-OpenMind-MAE",
                    {"checkpoint_final.pth": CKPT, "adaptation_plan.json": PLAN, "config.json": CONFIG,
                     ".gitattributes": b"*.pth filter=lfs"})
    add_to_hf_cache(cache, "AnonRes/ResEncL-OpenMind-MAE", {"checkpoint_final.pth": b"older", "adaptation_plan.json": PLAN},
                    commit=OTHER_COMMIT, refs=("v0",))
    add_to_hf_cache(cache, "AnonRes/NoPlan", {"checkpoint_final.pth": CKPT, "config.json": CONFIG})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("suffix, commit, checkpoint", [
    ("", COMMIT, CKPT), ("@main", COMMIT, CKPT), (f"@{COMMIT}", COMMIT, CKPT), ("@v0", OTHER_COMMIT, b"older"),
])
def test_hf_repo_from_the_offline_cache(hf_cache, tmp_path, suffix, commit, checkpoint):
    dest = tmp_path / "results" / "checkpoints" / "mae"
    record = fetch_checkpoint("mae", f"hf://AnonRes/ResEncL-OpenMind-MAE{suffix}", dest, cache_dir=hf_cache)
    assert record["commit"] == commit and record["repo_id"] == "AnonRes/ResEncL-OpenMind-MAE"
    assert record["revision"] == (suffix[1:] or None)
    assert (dest / "checkpoint_final.pth").read_bytes() == checkpoint
    assert not (dest / "checkpoint_final.pth").is_symlink()
    assert record["sha256"] == sha(checkpoint) and ".gitattributes" not in record["files"]
    assert (dest / "adaptation_plan.json").read_bytes() == PLAN


def test_hf_single_file_and_the_cache_from_the_environment(hf_cache, tmp_path):
    dest = tmp_path / "results" / "checkpoints" / "mae"
    record = fetch_checkpoint("mae", "hf://AnonRes/ResEncL-OpenMind-MAE/checkpoint_final.pth", dest,
                              sha256=sha(CKPT))  # no cache_dir: HF_HUB_CACHE
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint_final.pth", "source.json"]
    assert record["commit"] == COMMIT and record["filename"] == "checkpoint_final.pth"


def test_hf_bad_inputs_name_the_checkpoint_and_leave_nothing(hf_cache, tmp_path):
    parent = tmp_path / "results" / "checkpoints"
    with pytest.raises(CheckpointSourceError) as raised:
        fetch_checkpoint("mae", "hf://AnonRes/ResEncL-OpenMind-MAE@v9", parent / "mae", cache_dir=hf_cache)
    message = str(raised.value)
    assert all(s in message for s in ("'mae'", "AnonRes/ResEncL-OpenMind-MAE", "'v9'", "only the cache is read")), message
    with pytest.raises(CheckpointSourceError, match=r"'noplan'.*AnonRes/NoPlan.*adaptation_plan\.json"):
        fetch_checkpoint("noplan", "hf://AnonRes/NoPlan", parent / "noplan", cache_dir=hf_cache)
    with pytest.raises(CheckpointSourceError, match=r"'mae'.*not in the Hugging Face cache"):
        fetch_checkpoint("mae", "hf://AnonRes/ResEncL-OpenMind-MAE/missing.pth", parent / "mae", cache_dir=hf_cache)
    assert list(parent.iterdir()) == []


# --- https (http on 127.0.0.1 in tests) -------------------------------------------------------------------------


class FileServer:
    """Serves `files` on 127.0.0.1, honouring Range unless `ranges` is off; `cut_after` bytes ends a response early."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.ranges, self.cut_after, self.seen_ranges = files, True, None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                asked = self.headers.get("Range")
                server.seen_ranges.append(asked)
                start = int(asked.split("=")[1].split("-")[0]) if asked and server.ranges else 0
                if start >= len(data) and asked and server.ranges:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if server.cut_after is None else body[: server.cut_after])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = FileServer({"/records/1/files/checkpoint_final.pth": CKPT})
    yield s
    s.stop()


def fetch_url(server, dest, sha256):
    return fetch_checkpoint("zen", server.url("/records/1/files/checkpoint_final.pth"), dest, sha256=sha256,
                            allow_insecure_loopback=True)


def test_url_with_matching_sha256(server, tmp_path):
    dest = tmp_path / "results" / "checkpoints" / "zen"
    record = fetch_url(server, dest, sha(CKPT))
    assert (dest / "checkpoint_final.pth").read_bytes() == CKPT
    assert record["kind"] == "https" and record["url"].endswith("/checkpoint_final.pth") and record["sha256"] == sha(CKPT)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["zen"]
    fetch_url(server, dest, sha(CKPT))
    assert server.seen_ranges == [None]  # the second fetch found the folder complete


def test_url_sha256_mismatch_keeps_nothing(server, tmp_path):
    parent = tmp_path / "results" / "checkpoints"
    with pytest.raises(CheckpointSourceError, match=rf"'zen'.*expected {'1' * 64}, got {sha(CKPT)}"):
        fetch_url(server, parent / "zen", "1" * 64)
    assert list(parent.iterdir()) == []


def test_url_interrupted_download_resumes_with_range(server, tmp_path):
    parent = tmp_path / "results" / "checkpoints"
    server.cut_after = 3000
    with pytest.raises(CheckpointSourceError, match="'zen'.*run the fetch again to resume"):
        fetch_url(server, parent / "zen", sha(CKPT))
    partial = partial_download_path(parent / "zen", sha(CKPT))
    assert [p.name for p in parent.iterdir()] == [partial.name] and partial.stat().st_size == 3000
    server.cut_after = None
    fetch_url(server, parent / "zen", sha(CKPT))
    assert server.seen_ranges == [None, "bytes=3000-"]
    assert (parent / "zen" / "checkpoint_final.pth").read_bytes() == CKPT
    assert sorted(p.name for p in parent.iterdir()) == ["zen"]


def test_url_server_without_range_starts_over(server, tmp_path):
    parent = tmp_path / "results" / "checkpoints"
    partial = partial_download_path(parent / "zen", sha(CKPT))
    parent.mkdir(parents=True)
    partial.write_bytes(b"junk-from-elsewhere")
    server.ranges = False
    fetch_url(server, parent / "zen", sha(CKPT))
    assert (parent / "zen" / "checkpoint_final.pth").read_bytes() == CKPT
    assert sorted(p.name for p in parent.iterdir()) == ["zen"]


def test_url_missing_on_server(server, tmp_path):
    with pytest.raises(CheckpointSourceError, match="'zen'.*HTTP 404"):
        fetch_checkpoint("zen", server.url("/nothing/c.pth"), tmp_path / "ck" / "zen", sha256=sha(CKPT),
                         allow_insecure_loopback=True)
    assert list((tmp_path / "ck").iterdir()) == []


def test_url_partial_already_whole_is_verified_not_downloaded_again(server, tmp_path):
    parent = tmp_path / "results" / "checkpoints"
    parent.mkdir(parents=True)
    partial_download_path(parent / "zen", sha(CKPT)).write_bytes(CKPT)  # killed after the last byte
    fetch_url(server, parent / "zen", sha(CKPT))
    assert server.seen_ranges == [f"bytes={len(CKPT)}-"]  # answered 416: nothing left to send
    assert (parent / "zen" / "checkpoint_final.pth").read_bytes() == CKPT
    assert sorted(p.name for p in parent.iterdir()) == ["zen"]
