"""`openneuro` source: one dataset from OpenNeuro's public S3 bucket, anonymously and resumably.

`s3://openneuro.org/dsNNNNNN/` holds the latest snapshot of every public dataset. Requests are
unsigned (no AWS account needed). The transfer itself is boto3's: one shared s3transfer
`TransferManager` (ranged parallel GETs for large files, bounded thread pools) and botocore's
retry modes for 5xx, throttling (503 SlowDown; `adaptive` also rate-limits the client) and
connection errors; s3transfer re-reads a body that breaks off mid-stream. On top of that, per file:

- **Versions.** The listing comes from ListObjectVersions, so the manifest records each file's
  version id and every GET is pinned to it (a dataset that changes mid-download cannot mix two
  versions). Where the listing of versions is refused, plain ListObjectsV2 plus a HEAD per
  fetched file supplies the version id.
- **Verification.** A download lands under a temporary name and is renamed only after its size
  and its MD5 match the listing: the ETag where it is an MD5, the multipart ETag (MD5 of the part
  MD5s) for the usual part sizes. A multipart ETag with an unknown part size is accepted when two
  downloads give the same bytes. A killed run never leaves a file that looks complete.
- **Resume.** A file already in place is not fetched again when its size and ETag/MD5 check out
  (or it is unchanged since a previous run verified it, see `state.py`). Only the rest is fetched.
- **Faults.** A file that still fails after `file_attempts` whole-file attempts (with back-off) is
  recorded in the manifest's `failed` list and the rejection table; the job goes on. Only a
  missing or unfetchable dataset_description.json fails the dataset.
- **Safety.** Keys that would land outside the dataset folder (`..`, absolute, backslashes, a
  symlink in the raw tree that leads out) are refused and recorded, never written.

Which snapshot the bucket holds is checked afterwards against `config/openneuro_datasets.tsv`
(`check_snapshot`, DatasetDOI / version in dataset_description.json); older snapshots would need
OpenNeuro's API to map a tag to object versions, which this source does not query.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3ValidationError
from s3transfer.subscribers import BaseSubscriber
from tqdm import tqdm

from openmind_bench import atomic
from openmind_bench import config as omb_config
from openmind_bench.qc import Rejections
from openmind_bench.download_manifest import FileRecord, Manifest
from openmind_bench.sources.base import (
    REQUIRED_FILES,
    SourceError,
    inside,
    selected,
    unsafe_reason,
)
from openmind_bench.sources.state import FetchState, remove_stale_temporaries

log = logging.getLogger(__name__)

MB = 1024 * 1024

# The `source` options this kind reads, with config/schema.yaml's defaults (the only place they are written).
OPTIONS = ("bucket", "endpoint_url", "region", "prefix", "max_concurrency", "retry_mode", "request_attempts",
           "file_attempts", "retry_backoff_s", "connect_timeout_s", "read_timeout_s", "multipart_threshold_mb",
           "multipart_chunksize_mb")


def _schema_defaults() -> dict:
    section = omb_config.section("source")
    return {k: section[k] for k in OPTIONS}


# Part sizes S3 uploaders commonly use (AWS CLI / boto3 8 MiB, s3cmd 15 MiB, the 5 MiB minimum,
# rclone and DataLad/git-annex settings); the ceil(size / parts) guesses are added per object.
_COMMON_PART_SIZES = tuple(n * MB for n in (5, 8, 15, 16, 25, 32, 50, 64, 100, 128, 256, 512, 1024))
_PLAIN_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
# Request errors no retry can fix; 412 is handled separately (object changed under us).
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 416}


@dataclass
class RemoteObject:
    key: str
    rel: str
    size: int
    etag: str  # without quotes
    version_id: str | None

    @property
    def quoted_etag(self) -> str:
        return f'"{self.etag}"'


class _Corrupt(Exception):
    """A download finished but is not the object that was listed."""


class _FileFailed(Exception):
    """A file that could not be fetched; the message is the reason for the record."""


def options_with_defaults(options: dict) -> dict:
    defaults = _schema_defaults()
    return {**defaults, **{k: v for k, v in options.items() if v is not None or k not in defaults}}


def make_client(options: dict):
    """An unsigned S3 client with botocore's retry mode; path-style addressing for local servers."""
    opts = options_with_defaults(options)
    config = Config(
        signature_version=UNSIGNED,
        region_name=opts["region"],
        retries={"mode": opts["retry_mode"], "total_max_attempts": int(opts["request_attempts"])},
        connect_timeout=opts["connect_timeout_s"],
        read_timeout=opts["read_timeout_s"],
        # every transfer thread needs a connection, or urllib3 opens and discards extra ones
        max_pool_connections=max(10, 2 * int(opts["max_concurrency"])),
        s3={"addressing_style": "path"} if opts["endpoint_url"] else {},
    )
    # A fresh session: nothing from the caller's default session or credentials leaks in.
    return boto3.session.Session().client("s3", endpoint_url=opts["endpoint_url"], config=config)


def _strip(etag: str | None) -> str:
    return (etag or "").strip('"')


def _version(version_id: str | None) -> str | None:
    return None if version_id in (None, "", "null") else version_id


def list_dataset(client, bucket: str, prefix: str) -> tuple[list[RemoteObject], bool]:
    """Current objects under `prefix` and whether their version ids come from the listing."""
    try:
        objects = []
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                # keys whose latest version is a delete marker have no IsLatest version: skipped
                if v.get("IsLatest"):
                    objects.append(RemoteObject(v["Key"], v["Key"][len(prefix):], int(v["Size"]),
                                                _strip(v.get("ETag")), _version(v.get("VersionId"))))
        return objects, True
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            raise SourceError(f"bucket {bucket!r} does not exist ({e})") from e
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status not in (403, 405, 501) and code not in ("AccessDenied", "NotImplemented", "MethodNotAllowed"):
            raise
        log.warning("s3://%s/%s: listing object versions refused (%s); listing current objects, "
                    "version ids come from a HEAD per fetched file", bucket, prefix, code or status)
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            objects.append(RemoteObject(o["Key"], o["Key"][len(prefix):], int(o["Size"]),
                                        _strip(o.get("ETag")), None))
    return objects, False


def candidate_part_sizes(size: int, parts: int) -> list[int]:
    """Part sizes that split `size` bytes into exactly `parts` parts, likeliest first."""
    if parts < 1 or size < 1:
        return []
    guess = math.ceil(size / parts)
    candidates = [guess, math.ceil(guess / MB) * MB, *_COMMON_PART_SIZES]
    found = []
    for p in candidates:
        if p > 0 and math.ceil(size / p) == parts and p not in found:
            found.append(p)
    return found


def file_digests(path: Path, part_sizes: list[int], chunk: int = MB) -> tuple[str, dict[int, str]]:
    """MD5 of the file and, for each part size, its S3 multipart ETag; one read of the file."""
    whole = hashlib.md5()
    parts = {p: [hashlib.md5(), 0, []] for p in part_sizes}  # hasher, bytes in part, part digests
    with open(path, "rb") as f:
        while block := f.read(chunk):
            whole.update(block)
            for p, acc in parts.items():
                view = memoryview(block)
                while view:
                    take = min(len(view), p - acc[1])
                    acc[0].update(view[:take])
                    acc[1] += take
                    view = view[take:]
                    if acc[1] == p:
                        acc[2].append(acc[0].digest())
                        acc[0], acc[1] = hashlib.md5(), 0
    etags = {}
    for p, (hasher, filled, digests) in parts.items():
        if filled:
            digests.append(hasher.digest())
        etags[p] = f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"
    return whole.hexdigest(), etags


def check_against_etag(path: Path, etag: str) -> tuple[str, bool | None]:
    """(MD5 of the file, whether it matches `etag`); None where the ETag cannot tell
    (a multipart ETag of unknown part size, or an ETag that is not MD5-based at all)."""
    if _PLAIN_ETAG.match(etag):
        md5, _ = file_digests(path, [])
        return md5, md5 == etag
    m = _MULTIPART_ETAG.match(etag)
    if not m:
        return file_digests(path, [])[0], None  # SSE-KMS or another non-MD5 ETag
    sizes = candidate_part_sizes(path.stat().st_size, int(m.group(2)))
    md5, etags = file_digests(path, sizes)
    if any(e == etag for e in etags.values()):
        return md5, True
    return md5, None


class _KnownObject(BaseSubscriber):
    """Hands the listed size and ETag to s3transfer: no HEAD per file, and ranged GETs of a
    multipart download carry If-Match so all parts come from the same object."""

    def __init__(self, obj: RemoteObject):
        self.obj = obj

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self.obj.size)
        future.meta.provide_object_etag(self.obj.quoted_etag)


class _Progress:
    """One bar (bytes, with files in the postfix) for terminals, and a log line every
    `every_s` seconds for cluster logs, where the bar is switched off."""

    def __init__(self, dataset: str, n_files: int, n_bytes: int, every_s: float = 30.0):
        self.dataset, self.n_files, self.n_bytes, self.every_s = dataset, n_files, n_bytes, every_s
        self.files_done = 0
        self.bytes_done = 0
        self.started = self._last_log = time.monotonic()
        self._lock = threading.Lock()
        self.bar = tqdm(total=n_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"{dataset}", disable=None, postfix=f"0/{n_files} files")

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n
            self.bar.update(n)
            self._maybe_log()

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1
            self.bar.set_postfix_str(f"{self.files_done}/{self.n_files} files", refresh=False)
            self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            log.info("%s: %d/%d files, %.1f/%.1f MB, %.1f MB/s", self.dataset, self.files_done,
                     self.n_files, self.bytes_done / MB, self.n_bytes / MB,
                     self.bytes_done / MB / max(now - self.started, 1e-9))

    def close(self) -> None:
        self.bar.close()


class _AttemptBytes(BaseSubscriber):
    """Counts one attempt's bytes into the progress, so a failed attempt can be taken back."""

    def __init__(self, progress: _Progress):
        self.progress = progress
        self.count = 0

    def on_progress(self, future, bytes_transferred, **kwargs):
        self.count += bytes_transferred
        self.progress.add_bytes(bytes_transferred)

    def rewind(self) -> None:
        if self.count:
            self.progress.add_bytes(-self.count)
            self.count = 0


class _DatasetFetch:
    """The per-file work of one dataset fetch; runs in the worker threads."""

    def __init__(self, client, manager, bucket: str, dest: Path, state: FetchState, progress: _Progress,
                 versions_listed: bool, file_attempts: int, backoff_s: float):
        self.client, self.manager, self.bucket, self.dest = client, manager, bucket, dest
        self.state, self.progress = state, progress
        self.versions_listed = versions_listed
        # two at least: a multipart ETag of unknown part size needs two identical downloads
        self.file_attempts = max(2, int(file_attempts))
        self.backoff_s = float(backoff_s)
        self.fetched = self.reused = self.fetched_bytes = 0
        self._count_lock = threading.Lock()

    def identity(self, obj: RemoteObject) -> dict:
        ident = {"etag": obj.etag}
        if self.versions_listed:
            ident["version_id"] = obj.version_id
        return ident

    def record_of(self, obj: RemoteObject, md5: str, version_id: str | None) -> FileRecord:
        return FileRecord(path=obj.rel, size=obj.size, md5=md5, etag=obj.etag, version_id=version_id)

    def reuse_local(self, obj: RemoteObject, target: Path) -> FileRecord | None:
        """The record of a file already in place and complete, or None to fetch it."""
        known = self.state.trusted(obj.rel, target, size=obj.size, **self.identity(obj))
        if known:
            return self.record_of(obj, known["md5"], known.get("version_id"))
        if target.is_symlink() or not target.is_file() or target.stat().st_size != obj.size:
            return None
        md5, matches = check_against_etag(target, obj.etag)
        if not matches:
            return None  # no proof it is this object: fetch it again
        self.state.record(obj.rel, target, etag=obj.etag, version_id=obj.version_id, md5=md5)
        return self.record_of(obj, md5, obj.version_id)

    def fetch(self, obj: RemoteObject) -> FileRecord:
        target = self.dest / obj.rel
        record = self.reuse_local(obj, target)
        if record:
            self.progress.add_bytes(obj.size)
            with self._count_lock:
                self.reused += 1
        else:
            record = self.download(obj, target)
            with self._count_lock:
                self.fetched += 1
                self.fetched_bytes += record.size
        self.progress.file_done()
        return record

    def download(self, obj: RemoteObject, target: Path) -> FileRecord:
        last_reason = ""
        unverifiable_md5 = None  # content MD5 of an earlier attempt that the ETag could not check
        for attempt in range(1, self.file_attempts + 1):
            counter = _AttemptBytes(self.progress)
            try:
                if obj.version_id is None and not self.versions_listed:
                    obj = self.pin_version(obj)
                with atomic.atomic_path(target) as tmp:
                    extra = {"VersionId": obj.version_id} if obj.version_id else {}
                    self.manager.download(self.bucket, obj.key, str(tmp), extra_args=extra,
                                          subscribers=[_KnownObject(obj), counter]).result()
                    size = tmp.stat().st_size
                    if size != obj.size:
                        raise _Corrupt(f"got {size} bytes, the listing says {obj.size}")
                    md5, matches = check_against_etag(tmp, obj.etag)
                    if matches is False:
                        raise _Corrupt(f"MD5 {md5} does not match ETag {obj.etag}")
                    if matches is None and md5 != unverifiable_md5:
                        # cannot check against the ETag: accept only bytes seen twice
                        unverifiable_md5 = md5
                        raise _Corrupt(f"ETag {obj.etag} cannot be checked; fetching again to compare")
                self.state.record(obj.rel, target, etag=obj.etag, version_id=obj.version_id, md5=md5)
                if matches is None:
                    log.warning("%s: ETag %s not verifiable (unknown part size); two downloads agree",
                                obj.key, obj.etag)
                return self.record_of(obj, md5, obj.version_id)
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = e.response.get("Error", {}).get("Code", "")
                last_reason = f"HTTP {status} {code}".strip()
                if status == 412 and not obj.version_id:
                    obj = self.refresh(obj)  # replaced since the listing; fetch the new one
                elif status in _PERMANENT_STATUS:
                    raise _FileFailed(f"{last_reason} for s3://{self.bucket}/{obj.key}") from e
            except _Corrupt as e:
                last_reason = str(e)
            except (BotoCoreError, OSError, RetriesExceededError, S3DownloadFailedError, S3ValidationError) as e:
                # request retries or body re-reads exhausted, a checksum mismatch, the local disk
                last_reason = f"{type(e).__name__}: {e}"
            counter.rewind()
            if attempt < self.file_attempts:
                delay = min(60.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
                log.info("%s: attempt %d/%d failed (%s); again in %.1f s", obj.key, attempt,
                         self.file_attempts, last_reason, delay)
                time.sleep(delay)
        raise _FileFailed(f"gave up after {self.file_attempts} attempts: {last_reason}")

    def pin_version(self, obj: RemoteObject) -> RemoteObject:
        """Without a listing of versions, HEAD gives the current version id to pin the GET to."""
        head = self.client.head_object(Bucket=self.bucket, Key=obj.key)
        return RemoteObject(obj.key, obj.rel, int(head["ContentLength"]), _strip(head.get("ETag")),
                            _version(head.get("VersionId")))

    def refresh(self, obj: RemoteObject) -> RemoteObject:
        try:
            return self.pin_version(obj)
        except ClientError:
            return obj


def _plan(objects: list[RemoteObject], dataset: str, dest: Path, options: dict, manifest: Manifest,
          rejections: Rejections) -> list[RemoteObject]:
    include, exclude = options.get("include", ["*"]), options.get("exclude", [])
    wanted = []
    for obj in objects:
        if obj.key.endswith("/") and obj.size == 0:
            continue  # a "folder" marker some S3 clients create
        why = unsafe_reason(obj.rel)
        if why is None and not inside(dest / obj.rel, dest):
            why = "a symlink in the raw tree leads outside the dataset folder"
        if why:
            manifest.refused.append({"path": obj.rel, "reason": why})
            rejections.add(f"{dataset}/{obj.rel}", f"refused: {why}", dataset)
            log.warning("%s: refused key %r: %s", dataset, obj.key, why)
            continue
        if selected(obj.rel, include, exclude):
            wanted.append(obj)
    return wanted


def fetch(dataset: str, snapshot: str, dest: Path, options: dict, rejections: Rejections) -> Manifest:
    opts = options_with_defaults(options)
    bucket = opts["bucket"]
    prefix = opts["prefix"].format(dataset=dataset)
    where = f"s3://{bucket}/{prefix}" + (f" at {opts['endpoint_url']}" if opts["endpoint_url"] else "")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(dest)
    if stale:
        log.info("%s: removed %d temporary files of an interrupted run", dataset, stale)

    client = make_client(opts)
    try:
        objects, versions_listed = list_dataset(client, bucket, prefix)
    except (ClientError, BotoCoreError) as e:
        raise SourceError(f"{dataset}: cannot list {where}: {e}") from e
    if not objects:
        raise SourceError(f"{dataset}: no objects under {where}")

    manifest = Manifest(dataset=dataset, source="openneuro", snapshot=snapshot)
    wanted = _plan(objects, dataset, dest, opts, manifest, rejections)
    listed = {o.rel for o in wanted}
    missing = [f for f in REQUIRED_FILES if f not in listed]
    if missing:
        raise SourceError(f"{dataset}: required file(s) {missing} not in {where}")

    concurrency = max(1, int(opts["max_concurrency"]))
    transfer_config = TransferConfig(
        max_concurrency=concurrency,
        multipart_threshold=int(opts["multipart_threshold_mb"] * MB),
        multipart_chunksize=int(opts["multipart_chunksize_mb"] * MB),
        num_download_attempts=int(opts["request_attempts"]),
        use_threads=True,
        preferred_transfer_client="classic",  # the CRT client takes no subscribers
    )
    state = FetchState(dest, source=f"s3://{bucket}/{prefix}")
    progress = _Progress(dataset, len(wanted), sum(o.size for o in wanted))
    started = time.monotonic()
    records: list[FileRecord] = []
    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix=f"fetch-{dataset}") as pool, \
                create_transfer_manager(client, transfer_config) as manager:
            work = _DatasetFetch(client, manager, bucket, dest, state, progress, versions_listed,
                                 opts["file_attempts"], opts["retry_backoff_s"])
            pending = {pool.submit(work.fetch, obj): obj for obj in wanted}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        obj = pending.pop(future)
                        try:
                            records.append(future.result())
                        except _FileFailed as e:
                            manifest.failed.append({"path": obj.rel, "reason": str(e)})
                            rejections.add(f"{dataset}/{obj.rel}", f"fetch failed: {e}", dataset)
                            log.error("%s: %s failed: %s", dataset, obj.rel, e)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        state.save()
        progress.close()

    failed_required = [f["path"] for f in manifest.failed if f["path"] in REQUIRED_FILES]
    if failed_required:
        raise SourceError(f"{dataset}: required file(s) {failed_required} could not be fetched from {where}: "
                          + "; ".join(f["reason"] for f in manifest.failed if f["path"] in REQUIRED_FILES))
    manifest.files = sorted(records, key=lambda r: r.path)
    seconds = time.monotonic() - started
    log.info(
        "%s: %d files (%d bytes) from %s: %d downloaded, %d already complete, %d failed, %d refused; "
        "%.1f s, %.1f MB/s; version ids %s",
        dataset, len(manifest.files), sum(f.size for f in manifest.files), where, work.fetched, work.reused,
        len(manifest.failed), len(manifest.refused), seconds, work.fetched_bytes / MB / max(seconds, 1e-9),
        "from the listing" if versions_listed else "from HEAD requests",
    )
    return manifest
