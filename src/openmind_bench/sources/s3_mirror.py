"""A local S3 server holding a mirror in the OpenNeuro bucket layout, for the demo and the tests.

`openmind-bench s3-mirror --root data/demo_mirror --serve` starts moto's S3 server on 127.0.0.1,
uploads every `dsNNNNNN/` folder under ROOT to a versioned bucket readable anonymously (as
s3://openneuro.org is), prints (or writes, `--overlay`) the config overlay that points the workflow at it, and keeps
serving until interrupted. Moto keeps objects in memory, so the server must outlive the fetch.
With `--endpoint-url` instead of `--serve` it uploads to a server that is already running.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from openmind_bench import atomic

log = logging.getLogger(__name__)

DATASET_DIR_PREFIX = "ds"
# moto answers anonymous HEADs only for objects with a public-read ACL (the bucket policy
# covers GET and listings); uploads carry both, as objects in the OpenNeuro bucket are public.
PUBLIC_READ = {"ACL": "public-read"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def moto_executable() -> str:
    beside = Path(sys.executable).parent / "moto_server"
    found = str(beside) if beside.exists() else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    return found


def start_moto(port: int | None = None, host: str = "127.0.0.1", log_path: str | Path | None = None,
               timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start moto's S3 server; return (process, endpoint URL) once it answers. Stop it by PID."""
    port = port or free_port(host)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([moto_executable(), "-H", host, "-p", str(port)], stdout=out,
                            stderr=subprocess.STDOUT)
    if log_path:
        out.close()  # the child holds its own descriptor
    endpoint = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with status {proc.returncode} (port {port} taken?)")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return proc, endpoint
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin_client(endpoint_url: str, region: str = "us-east-1"):
    """A signed client for a local S3 server (any key pair is accepted there)."""
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region,
        aws_access_key_id="openmind-bench", aws_secret_access_key="openmind-bench",
    )


def public_read_policy(bucket: str) -> str:
    """Anonymous list and read, including old versions: what the OpenNeuro bucket allows."""
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": "*",
            "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:ListBucketVersions"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        }],
    })


def create_bucket(client, bucket: str, versioned: bool = True) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_bucket_policy(Bucket=bucket, Policy=public_read_policy(bucket))


def upload_tree(root: str | Path, endpoint_url: str, bucket: str = "openneuro.org",
                datasets: list[str] | None = None, versioned: bool = True) -> dict[str, int]:
    """Upload ROOT/dsNNNNNN/** as s3://bucket/dsNNNNNN/**; returns files per dataset.

    Hidden files and symlinks are skipped: a bucket has neither, and a link could leak a file
    from outside the mirror into it.
    """
    from boto3.s3.transfer import TransferConfig

    root = Path(root)
    client = admin_client(endpoint_url)
    create_bucket(client, bucket, versioned=versioned)
    config = TransferConfig(max_concurrency=8)
    wanted = datasets or sorted(p.name for p in root.iterdir()
                                if p.is_dir() and p.name.startswith(DATASET_DIR_PREFIX))
    counts = {}
    for dataset in wanted:
        top = root / dataset
        if not top.is_dir():
            raise FileNotFoundError(f"{top}: no such dataset folder in the mirror")
        n = 0
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or path.is_symlink():
                    continue
                key = path.relative_to(root).as_posix()
                client.upload_file(str(path), bucket, key, ExtraArgs=PUBLIC_READ, Config=config)
                n += 1
        counts[dataset] = n
        log.info("uploaded %s: %d files to s3://%s/%s/ at %s", dataset, n, bucket, dataset, endpoint_url)
    return counts


def register(sub) -> None:
    p = sub.add_parser("s3-mirror", help="serve a local mirror from a local S3 server (demo, tests)")
    p.add_argument("--root", default="data/demo_mirror", help="folder holding dsNNNNNN/ datasets")
    p.add_argument("--bucket", default="openneuro.org")
    p.add_argument("--datasets", nargs="*", help="dataset ids to upload (default: all under ROOT)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--serve", action="store_true",
                       help="start moto's S3 server, upload, and serve until interrupted")
    where.add_argument("--endpoint-url", help="upload to this already running S3 server")
    p.add_argument("--host", default="127.0.0.1", help="with --serve: address to bind")
    p.add_argument("--port", type=int, default=9000, help="with --serve: port (0 = any free one)")
    p.add_argument("--overlay", help="write a config overlay (YAML) pointing the workflow's source here")
    p.set_defaults(func=run)


def overlay_yaml(bucket: str, endpoint_url: str) -> str:
    """A config overlay that switches the demo's source to this server (see config/demo_s3.yaml)."""
    import yaml

    source = {"kind": "openneuro", "build_demo": False, "bucket": bucket, "endpoint_url": endpoint_url}
    return "# written by `openmind-bench s3-mirror`\n" + yaml.safe_dump({"source": source}, sort_keys=False)


def run(args) -> int:
    proc = None
    endpoint = args.endpoint_url
    if args.serve:
        proc, endpoint = start_moto(args.port or None, host=args.host)
        log.info("moto S3 server (pid %d) on %s", proc.pid, endpoint)
    try:
        counts = upload_tree(args.root, endpoint, bucket=args.bucket, datasets=args.datasets)
        print(f"uploaded {sum(counts.values())} files of {len(counts)} datasets to s3://{args.bucket} at {endpoint}")
        if args.overlay:
            atomic.write_text(args.overlay, overlay_yaml(args.bucket, endpoint))
            print(f"config overlay: {args.overlay}  (snakemake --configfile config/demo.yaml {args.overlay} all)")
        else:
            print("config overlay for this server (config/demo_s3.yaml is the one for port 9000):")
            print(overlay_yaml(args.bucket, endpoint), end="")
        sys.stdout.flush()
        if proc is None:
            return 0
        stop_requested = []
        signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
        while not stop_requested and proc.poll() is None:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server stopped unexpectedly (status {proc.returncode})")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None:
            stop(proc)
