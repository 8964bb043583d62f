"""A real S3 server for the download tests, and a fault-injecting proxy in front of it.

moto's server (`moto_server`, started by `openmind_bench.sources.s3_mirror.start_moto` and stopped
by PID) is the S3 implementation; nothing inside boto3 is mocked. moto has no fault injection,
so `FaultProxy`, a small threaded HTTP server on 127.0.0.1, sits between boto3 and moto: it
forwards every request, logs it (method, key, query, Range, what it did), and on the requests a
rule matches answers with a 500/503/403, drops the connection half-way through the body, lies
in Content-Length, flips bytes, or stalls half-way until released.

By default the proxy also drops the `x-amz-checksum-*` response headers: most objects in the
OpenNeuro bucket predate S3's additional checksums, so the downloader's own size and MD5/ETag
checks must catch damage, not botocore's checksum validation (`strip_checksums=False` keeps them).
"""

from __future__ import annotations

import http.client
import io
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from boto3.s3.transfer import TransferConfig

from openmind_bench.sources import s3_mirror

ACTIONS = {"500", "503", "403", "drop", "short", "long", "corrupt", "hang"}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
    "403": ("AccessDenied", "Access Denied"),
}


@dataclass
class Fault:
    action: str
    method: str = "GET"
    key: str | None = None  # substring of the object key
    query: str | None = None  # substring of the query string (e.g. "versions")
    times: int = 1  # how many matching requests it hits

    def matches(self, method: str, key: str, query: str) -> bool:
        return (self.times > 0 and method == self.method and (self.key is None or self.key in key)
                and (self.query is None or self.query in query))


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    query: str
    range: str | None
    action: str | None


@dataclass
class FaultProxy:
    upstream: str  # http://host:port of the S3 server
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    strip_checksums: bool = True

    def __post_init__(self):
        self._lock = threading.Lock()
        self.release = threading.Event()  # lets stalled ("hang") responses finish
        parsed = urllib.parse.urlparse(self.upstream)
        self._upstream = (parsed.hostname, parsed.port)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    # --- configuration and inspection -------------------------------------------------------

    def add(self, action: str, key: str | None = None, times: int = 1, method: str = "GET",
            query: str | None = None) -> Fault:
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}")
        fault = Fault(action, method, key, query, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset(self, strip_checksums: bool = True) -> None:
        self.strip_checksums = strip_checksums
        self.release.set()
        with self._lock:
            self.faults.clear()
            self.requests.clear()
        self.release = threading.Event()

    def gets(self, key_part: str = "") -> list[Request]:
        """Object GETs (not listings) whose key contains `key_part`."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.key and key_part in r.key
                    and "versions" not in r.query and "list-type" not in r.query]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # --- the proxy --------------------------------------------------------------------------

    def _pick(self, method: str, key: str, query: str) -> str | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, key, query):
                    fault.times -= 1
                    return fault.action
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path)
        bucket, _, key = path.lstrip("/").partition("/")
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        action = self._pick(h.command, key, url.query)
        with self._lock:
            self.requests.append(Request(h.command, bucket, key, url.query, h.headers.get("Range"), action))
        if action in _ERRORS:
            status = int(action)
            code, message = _ERRORS[action]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><Key>{key}</Key></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(xml)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(xml)
            return

        upstream = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(h.command, h.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            status, reason = response.status, response.reason
            out_headers = [(k, v) for k, v in response.getheaders()
                           if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
                           and not (self.strip_checksums and k.lower().startswith("x-amz-checksum"))]
            upstream_length = response.getheader("Content-Length")
        finally:
            upstream.close()

        is_body = h.command != "HEAD" and status < 300 and len(payload) > 1
        if not is_body:
            action = None  # faults below need a body to break
        declared = len(payload) if h.command != "HEAD" else int(upstream_length or 0)
        if action == "short":
            payload = payload[: len(payload) // 2]
            declared = len(payload)
        elif action == "long":
            declared = len(payload) + 1024
        elif action == "corrupt":
            middle = len(payload) // 2
            payload = payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1:]
        h.send_response(status, reason)
        for k, v in out_headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        if h.command == "HEAD":
            return
        if action in ("drop", "hang"):
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            if action == "hang":
                self.release.wait()
            self._cut(h)
            return
        h.wfile.write(payload)
        h.wfile.flush()
        if action == "long":
            self._cut(h)

    @staticmethod
    def _cut(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def upload(endpoint: str, bucket: str, files: dict[str, bytes], versioned: bool = True,
           part_size_mb: int = 5) -> dict[str, dict]:
    """Put `files` (key -> bytes) into a fresh anonymously readable bucket; objects over
    `part_size_mb` go up in parts of that size, as large OpenNeuro objects do (multipart ETag).
    Returns key -> {"VersionId", "ETag"} of the latest versions."""
    client = s3_mirror.admin_client(endpoint)
    s3_mirror.create_bucket(client, bucket, versioned=versioned)
    part = part_size_mb * 1024 * 1024
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
    for key, data in files.items():
        client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=s3_mirror.PUBLIC_READ, Config=config)
    latest = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            if v["IsLatest"]:
                latest[v["Key"]] = {"VersionId": v["VersionId"], "ETag": v["ETag"].strip('"')}
    return latest
