"""Where an external checkpoint comes from, and its fetch into `results/checkpoints/{name}/`.

Three source forms (`parse_source`):

- a local path: a checkpoint file, or a folder in the published layout (`checkpoint_final.pth`,
  `adaptation_plan.json`, usually `config.json`);
- `hf://org/repo[@revision][/file]`: a Hugging Face model repository through `huggingface_hub`
  (the whole snapshot, or one file), from the standard HF cache or a configured cache folder;
  `HF_HUB_OFFLINE` is respected (only the cache is read);
- `https://...` with a required sha256 (e.g. a Zenodo record's file).

`fetch_checkpoint` builds the checkpoint folder beside its final place and renames it in (the
dataset fetch's write-then-rename), with `source.json` recording what was fetched: the source, the
resolved commit for hf, every file's size and sha256, and when. A killed fetch leaves only that
temporary folder, which the next fetch removes; an interrupted https download keeps its partial file
(`.{name}.download-<sha256 prefix>.part` beside the folder) so the next fetch resumes it with an HTTP
Range request. A fetch whose `source.json` already records the same request, with every file in
place, does nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from openmind_bench import __version__, atomic
from openmind_bench.digests import file_digest

log = logging.getLogger(__name__)

SOURCE_RECORD = "source.json"
CHECKPOINT_FILE = "checkpoint_final.pth"
PLAN_FILE = "adaptation_plan.json"
# The published layout (AnonRes/{ResEncL,PrimusM}-OpenMind-*): a folder or hf repo must hold these.
REQUIRED_IN_FOLDER = (CHECKPOINT_FILE, PLAN_FILE)
KINDS = ("local", "hf", "https")
HTTP_TIMEOUT_S = 60
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Hub names: letters, digits, '-', '_', '.' (huggingface_hub's own repo-id validation is stricter still)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOOPBACK_NAMES = {"localhost"}


class CheckpointSourceError(RuntimeError):
    """A checkpoint source that is malformed or cannot be fetched; the message names the checkpoint."""


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    kind: str  # one of KINDS
    text: str  # the source as written in the config
    path: Path | None = None  # local
    repo_id: str | None = None  # hf: "org/repo"
    revision: str | None = None  # hf: branch, tag or commit; None = the repo's default branch
    filename: str | None = None  # hf: one file of the repo instead of the whole snapshot
    url: str | None = None  # https (or http to a loopback host in tests)
    sha256: str | None = None  # expected sha256 of the checkpoint file; required for https


def _where(name: str | None, text: str) -> str:
    return f"checkpoint {name!r}: source {text!r}" if name else f"checkpoint source {text!r}"


def _normalise_sha256(name: str | None, text: str, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if not _SHA256.match(value):
        raise CheckpointSourceError(f"{_where(name, text)}: sha256 {sha256!r} is not 64 hexadecimal digits")
    return value


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_hf(name: str | None, text: str, revision: str | None) -> dict:
    rest = text[len("hf://"):]
    segments = rest.split("/")
    if len(segments) < 2 or not segments[0] or not segments[1]:
        raise CheckpointSourceError(f"{_where(name, text)}: expected hf://org/repo[@revision][/file]; the repository is missing")
    org, repo_part = segments[0], segments[1]
    repo, at, text_revision = repo_part.partition("@")
    if at and not text_revision:
        raise CheckpointSourceError(f"{_where(name, text)}: '@' is not followed by a revision")
    for part in (org, repo):
        if not _HUB_NAME.match(part) or ".." in part:
            raise CheckpointSourceError(f"{_where(name, text)}: {part!r} is not a valid Hugging Face repository name")
    file_segments = segments[2:]
    filename = None
    if file_segments and file_segments != [""]:  # a trailing '/' names no file
        if any(s in ("", ".", "..") for s in file_segments):
            raise CheckpointSourceError(f"{_where(name, text)}: file path {'/'.join(file_segments)!r} has an empty, '.' or '..' part")
        filename = "/".join(file_segments)
    if text_revision and revision and text_revision != revision:
        raise CheckpointSourceError(
            f"{_where(name, text)}: revision {text_revision!r} in the source and {revision!r} in the entry differ; give one"
        )
    return {"repo_id": f"{org}/{repo}", "revision": text_revision or revision, "filename": filename}


def parse_source(
    text: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    sha256: str | None = None,
    allow_insecure_loopback: bool = False,
) -> CheckpointSource:
    """The source of config entry `name` (`text` plus the entry's optional `revision`, `sha256`).

    `allow_insecure_loopback` lets `http://` reach 127.0.0.1/localhost only (tests; a config never sets it).
    """
    if not isinstance(text, str) or not text.strip():
        raise CheckpointSourceError(f"{_where(name, str(text))}: empty; give a path, hf://org/repo or an https:// URL")
    text = text.strip()
    expected = _normalise_sha256(name, text, sha256)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme is None:
        if revision is not None:
            raise CheckpointSourceError(f"{_where(name, text)}: a revision applies to hf:// sources only")
        return CheckpointSource("local", text, path=Path(text).expanduser(), sha256=expected)
    kind = scheme.group(1).lower()
    if kind == "hf":
        return CheckpointSource("hf", text, sha256=expected, **_parse_hf(name, text, revision))
    if revision is not None:
        raise CheckpointSourceError(f"{_where(name, text)}: a revision applies to hf:// sources only")
    if kind in ("https", "http"):
        parsed = urllib.parse.urlsplit(text)
        if not parsed.hostname:
            raise CheckpointSourceError(f"{_where(name, text)}: the URL names no host")
        if kind == "http" and not (allow_insecure_loopback and _is_loopback(parsed.hostname)):
            raise CheckpointSourceError(f"{_where(name, text)}: plain http:// is refused; use https://")
        if expected is None:
            raise CheckpointSourceError(
                f"{_where(name, text)}: an https:// source needs a sha256 (of the file, as the record publishes it)"
            )
        return CheckpointSource("https", text, url=text, sha256=expected)
    raise CheckpointSourceError(
        f"{_where(name, text)}: unknown scheme {kind + '://'!r}; use a local path, hf://org/repo[@revision][/file] or https://"
    )


# --- files ------------------------------------------------------------------------------------------------


def _visible_files(root: Path) -> list[str]:
    """POSIX paths of the files below `root`, hidden ones (`.gitattributes`, `.cache/`) left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith("."):
                found.append((Path(dirpath) / filename).relative_to(root).as_posix())
    return found


def _place(src: Path, target: Path, hardlink: bool) -> dict:
    """Copy (or hard-link) `src` to `target`; its size and sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if hardlink:
        try:
            os.link(src.resolve(), target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
        else:
            return {"size": target.stat().st_size, "sha256": file_digest(target)}
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(target, "wb") as fout:
        while block := fin.read(1 << 20):
            h.update(block)
            fout.write(block)
    return {"size": target.stat().st_size, "sha256": h.hexdigest()}


def _require_published_layout(name: str, where: str, present: list[str]) -> None:
    missing = [f for f in REQUIRED_IN_FOLDER if f not in present]
    if missing:
        raise CheckpointSourceError(
            f"checkpoint {name!r}: {where} has no {', '.join(missing)} (a checkpoint folder or repository holds "
            f"{' and '.join(REQUIRED_IN_FOLDER)})"
        )


# --- the three kinds: each fills `build` (an empty folder) and returns its part of source.json ---------------


def _fetch_local(name: str, source: CheckpointSource, build: Path) -> dict:
    path = source.path.resolve()
    if path.is_file():
        names, root = [path.name], path.parent
    elif path.is_dir():
        root, names = path, _visible_files(path)
        _require_published_layout(name, f"folder {path}", names)
    else:
        raise CheckpointSourceError(f"checkpoint {name!r}: local source {path} does not exist")
    # Copied, not hard-linked: a training run that saves over its checkpoint_final.pth rewrites the same
    # inode (torch.save truncates), which would change the fetched copy behind its recorded sha256.
    files = {rel: _place(root / rel, build / rel, hardlink=False) for rel in names}
    stamps = {str(root / rel): [(root / rel).stat().st_size, (root / rel).stat().st_mtime_ns] for rel in names}
    return {"path": str(path), "files": files, "source_stamps": stamps}


def _hf_offline() -> bool:
    # read at call time: huggingface_hub reads it once at import, before a test or job may set it
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    if cache_dir is not None:
        return str(cache_dir)
    return os.environ.get("HF_HUB_CACHE") or None  # None: the hub's own default (HF_HOME/hub, ~/.cache/...)


def _commit_of_snapshot(path: Path) -> str:
    """The commit hash of a cache snapshot folder `.../snapshots/<commit>` (or of a file inside one)."""
    for part in [path, *path.parents]:
        if part.parent.name == "snapshots":
            return part.name
    raise CheckpointSourceError(f"{path} is not inside a Hugging Face cache snapshot folder")


def _hf_snapshot(name: str, source: CheckpointSource, cache_dir, offline: bool) -> tuple[Path, list[str]]:
    """The cache snapshot folder of the source's revision (downloaded first unless offline) and the
    files it holds of the request (the one file, or the whole repository's)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub import errors as hub_errors

    # IncompleteSnapshotError (a cached snapshot the hub knows to be partial) is newer than our lower bound
    incomplete_snapshot = getattr(hub_errors, "IncompleteSnapshotError", hub_errors.LocalEntryNotFoundError)
    offline = offline or _hf_offline()
    cache = _hf_cache_dir(cache_dir)
    revision_text = source.revision or "the default branch"
    what = f"{source.repo_id}" + (f" file {source.filename}" if source.filename else "")
    try:
        if source.filename:
            got = Path(hf_hub_download(source.repo_id, source.filename, revision=source.revision,
                                       cache_dir=cache, local_files_only=offline))
            root, names = got.parent, [got.name]
        else:
            root = Path(snapshot_download(source.repo_id, revision=source.revision, cache_dir=cache,
                                          local_files_only=offline))
            names = _visible_files(root)
    except (hub_errors.LocalEntryNotFoundError, incomplete_snapshot) as e:
        reason = ("the fetch is offline (HF_HUB_OFFLINE or the entry's `offline`), so only the cache is read" if offline
                  else "the Hub could not be reached and the cache does not hold it")
        raise CheckpointSourceError(
            f"checkpoint {name!r}: revision {revision_text!r} of {what} is not in the Hugging Face cache "
            f"({cache or 'default cache'}) and {reason}"
        ) from e
    except hub_errors.RevisionNotFoundError as e:
        raise CheckpointSourceError(f"checkpoint {name!r}: {source.repo_id} has no revision {revision_text!r}") from e
    except hub_errors.EntryNotFoundError as e:
        raise CheckpointSourceError(f"checkpoint {name!r}: {source.repo_id} has no file {source.filename!r}") from e
    except hub_errors.RepositoryNotFoundError as e:
        raise CheckpointSourceError(f"checkpoint {name!r}: repository {source.repo_id} not found (or gated)") from e
    except hub_errors.HfHubHTTPError as e:  # the Hub down, a token refused, ...
        raise CheckpointSourceError(f"checkpoint {name!r}: fetching {what} at {revision_text!r} failed: {e}") from e
    return root, names


def _fetch_hf(name: str, source: CheckpointSource, build: Path, cache_dir, offline: bool = False) -> dict:
    root, names = _hf_snapshot(name, source, cache_dir, offline)
    revision_text = source.revision or "the default branch"
    if not source.filename:
        _require_published_layout(name, f"repository {source.repo_id} at {revision_text!r}", names)
    # Hard links are safe here: the cache's blobs are content-addressed and never rewritten in place.
    files = {rel: _place(root / rel, build / rel, hardlink=True) for rel in names}
    return {"repo_id": source.repo_id, "revision": source.revision, "commit": _commit_of_snapshot(root / names[0]),
            "filename": source.filename, "files": files}


def partial_download_path(dest_dir: Path, sha256: str) -> Path:
    """Where an https download in progress lives: beside the checkpoint folder, keyed by the expected
    sha256 so that only bytes of that same file are resumed."""
    return dest_dir.with_name(f".{dest_dir.name}.download-{sha256[:16]}.part")


def _url_filename(name: str, url: str) -> str:
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not last or last.startswith(".") or "/" in last or "\\" in last or "\x00" in last:
        raise CheckpointSourceError(
            f"checkpoint {name!r}: cannot tell a file name from {url!r}; the URL path must end with the file's name"
        )
    return last


def _download(name: str, url: str, partial: Path) -> None:
    """Bring `url` into `partial`, continuing from its current length where the server honours Range."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"openmind-bench/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return  # nothing after `have`: the partial file is whole (the sha256 check decides)
        raise CheckpointSourceError(f"checkpoint {name!r}: {url} answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointSourceError(f"checkpoint {name!r}: cannot reach {url}: {e}") from e
    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = have and response.status == 206 and content_range.startswith(f"bytes {have}-")
        if have and not resumed:
            log.info("%s: %s ignored the Range request; downloading from the start", name, url)
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        expected_end = start + int(length) if length and length.isdigit() else None
        try:
            with open(partial, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (http.client.IncompleteRead, OSError) as e:
            raise CheckpointSourceError(
                f"checkpoint {name!r}: download of {url} interrupted ({e}); run the fetch again to resume"
            ) from e
    got = partial.stat().st_size
    if expected_end is not None and got < expected_end:
        raise CheckpointSourceError(
            f"checkpoint {name!r}: download of {url} stopped after {got} of {expected_end} bytes; run the fetch again to resume"
        )


def _fetch_https(name: str, source: CheckpointSource, build: Path, dest_dir: Path) -> dict:
    filename = _url_filename(name, source.url)
    partial = partial_download_path(dest_dir, source.sha256)
    _download(name, source.url, partial)
    got = file_digest(partial)
    if got != source.sha256:
        partial.unlink()  # wrong bytes: never resumed from, never kept
        raise CheckpointSourceError(
            f"checkpoint {name!r}: sha256 mismatch for {source.url}: expected {source.sha256}, got {got}; the download was deleted"
        )
    size = partial.stat().st_size
    os.replace(partial, build / filename)
    return {"url": source.url, "files": {filename: {"size": size, "sha256": got}}}


# --- the fetch ---------------------------------------------------------------------------------------------


def _request(source: CheckpointSource) -> dict:
    """What identifies a fetch: the same request on a complete folder is not fetched again."""
    return {"kind": source.kind, "source": source.text, "revision": source.revision, "expected_sha256": source.sha256}


def _read_record(dest_dir: Path) -> dict | None:
    try:
        record = json.loads((dest_dir / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _up_to_date(record: dict | None, source: CheckpointSource, dest_dir: Path) -> bool:
    if record is None or record.get("request") != _request(source) or not isinstance(record.get("files"), dict):
        return False
    for rel, info in record["files"].items():
        # size, not a re-hash: checkpoints are large and the folder is only written by this function
        target = dest_dir / rel
        if not target.is_file() or target.stat().st_size != info.get("size"):
            return False
    if source.kind == "local":  # the same path with new content (a retrained model) is a new source
        for path, stamp in (record.get("source_stamps") or {}).items():
            try:
                st = Path(path).stat()
            except FileNotFoundError:
                continue  # the original was removed since: the fetched copy is all there is, keep it
            if [st.st_size, st.st_mtime_ns] != stamp:
                return False
    return True


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _hf_moved(name: str, source: CheckpointSource, record: dict, cache_dir, offline: bool) -> bool:
    """Whether a branch or tag (or the default branch) now points at another commit than the one
    fetched: the same request is then a new checkpoint. A pinned commit never moves."""
    if source.kind != "hf" or (source.revision and _COMMIT.match(source.revision)):
        return False
    root, names = _hf_snapshot(name, source, cache_dir, offline or _hf_offline())
    return _commit_of_snapshot(root / names[0]) != record.get("commit")


def checkpoint_file_of(files: dict) -> str:
    """The checkpoint among fetched files: checkpoint_final.pth in the published layout, else the one file."""
    if CHECKPOINT_FILE in files:
        return CHECKPOINT_FILE
    if len(files) == 1:
        return next(iter(files))
    raise ValueError(f"no {CHECKPOINT_FILE} among {sorted(files)}")


def _remove_leftovers(dest_dir: Path) -> None:
    """What a killed fetch of `dest_dir` left: its build folder (`.name.tmp-PID`) and an old tree set aside
    during the final swap (`.name.old-PID`). A partial https download is kept: the next fetch resumes it."""
    removed = atomic.remove_temporaries([dest_dir])
    for aside in dest_dir.parent.glob(f".{atomic.glob_escape(dest_dir.name)}.old-*"):
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(aside)
    if removed:
        log.info("%s: removed %s left by a killed fetch", dest_dir.name, ", ".join(p.name for p in removed))


def fetch_checkpoint(
    name: str,
    source: str | CheckpointSource,
    dest_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool = False,
    allow_insecure_loopback: bool = False,
) -> dict:
    """Bring checkpoint `name` into `dest_dir` (`results/checkpoints/{name}/`); returns its `source.json`.

    `revision` and `sha256` are the config entry's own keys (a sha256, optional except for https, is checked
    against the checkpoint file); `cache_dir` is the Hugging Face cache to use instead of the standard one;
    `offline` reads only that cache, as HF_HUB_OFFLINE=1 does.
    """
    if isinstance(source, str):
        source = parse_source(source, name=name, revision=revision, sha256=sha256,
                              allow_insecure_loopback=allow_insecure_loopback)
    elif revision is not None or sha256 is not None:
        raise TypeError("revision and sha256 belong in the CheckpointSource when one is passed")
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest_dir)
    previous = _read_record(dest_dir)
    if _up_to_date(previous, source, dest_dir) and not _hf_moved(name, source, previous, cache_dir, offline):
        log.info("%s: %s already holds %s (source.json matches); nothing to fetch", name, dest_dir, source.text)
        return previous
    if previous is not None or dest_dir.exists():
        log.info("%s: %s holds another or an incomplete fetch; replacing it with %s", name, dest_dir, source.text)
    with atomic.atomic_path(dest_dir) as build:
        build.mkdir()
        if source.kind == "local":
            fetched = _fetch_local(name, source, build)
        elif source.kind == "hf":
            fetched = _fetch_hf(name, source, build, cache_dir, offline)
        else:
            fetched = _fetch_https(name, source, build, dest_dir)
        files = fetched["files"]
        if SOURCE_RECORD in files:
            raise CheckpointSourceError(f"checkpoint {name!r}: {source.text} holds a file named {SOURCE_RECORD}, "
                                        "the name of the fetch's own record")
        checkpoint = checkpoint_file_of(files)
        if source.sha256 is not None and files[checkpoint]["sha256"] != source.sha256:
            raise CheckpointSourceError(
                f"checkpoint {name!r}: sha256 mismatch for {checkpoint} from {source.text}: "
                f"expected {source.sha256}, got {files[checkpoint]['sha256']}"
            )
        record = {
            "checkpoint": name,
            "kind": source.kind,
            "source": source.text,
            "request": _request(source),
            **fetched,
            "checkpoint_file": checkpoint,
            "sha256": files[checkpoint]["sha256"],
            "size": sum(f["size"] for f in files.values()),
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "openmind_bench_version": __version__,
        }
        (build / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("%s: fetched %s into %s (%d files, %d bytes)", name, source.text, dest_dir, len(files), record["size"])
    return record
