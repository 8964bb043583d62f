"""`openmind-bench evaluate SOURCE...`: score checkpoints trained elsewhere in one command.

It only writes a config overlay listing the checkpoints (and, if asked, the datasets) and runs
Snakemake with `config/evaluate.yaml` and that overlay: the fetch, the CPU check, the fine-tuning
fan-out against the scratch baselines and the tables are the workflow's, with its resumability and
profiles. A SOURCE is a local file or published-layout folder, `hf://org/repo[@revision][/file]` or
an https URL, optionally as `NAME=SOURCE` and with `,key=value` entry keys after it (`sha256`,
`revision`, `architecture`, `cache_dir`, `offline`), e.g.
`spark=/data/spark.pth,architecture=ResEncL`.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from openmind_bench import atomic
from openmind_bench.names import NAME_PATTERN

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]  # the checkout (installed editable, as README and .ci do)
EVALUATE_CONFIG = REPO / "config" / "evaluate.yaml"
DEFAULT_OVERLAY = "results/evaluate/checkpoints.yaml"
ENTRY_KEYS = ("sha256", "revision", "architecture", "cache_dir", "offline")
_NAME = re.compile(rf"^{NAME_PATTERN}$")
_NAMED = re.compile(rf"^({NAME_PATTERN})=(.+)$")


def default_name(source: str) -> str:
    """A checkpoint name from its source: the hub repository's name, else the file or folder's stem
    (`checkpoint_final` files are named by their folder), cleaned to a valid name part."""
    text = source.rstrip("/")
    if text.startswith("hf://"):
        stem = text[len("hf://"):].split("/")[1].split("@")[0]
    else:
        path = Path(text.split("?")[0])
        stem = path.parent.name if path.stem.startswith("checkpoint_") else path.stem
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")
    if not cleaned or not _NAME.match(cleaned):
        raise ValueError(f"no checkpoint name can be made from {source!r}: give one as NAME={source}")
    return cleaned


def parse_entry(spec: str) -> dict:
    """One SOURCE argument -> a `checkpoints` config entry (see the module doc)."""
    named = _NAMED.match(spec)
    name, rest = (named.group(1), named.group(2)) if named and not spec.startswith(("hf://", "https://")) else (None, spec)
    source, *pairs = rest.split(",")
    entry = {"name": name or default_name(source), "source": source}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ENTRY_KEYS:
            raise ValueError(f"{spec!r}: {pair!r} is not one of {', '.join(k + '=...' for k in ENTRY_KEYS)}")
        entry[key] = yaml.safe_load(value) if key == "offline" else value
    if not source.startswith(("hf://", "https://", "http://")):
        entry["source"] = str(Path(source).expanduser().resolve())  # the jobs run in the workflow's folder
    return entry


def overlay(specs: list[str], datasets: list[str] | None = None) -> dict:
    entries = [parse_entry(s) for s in specs]
    names = [e["name"] for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"checkpoint name(s) {twice} given twice: name them apart (NAME=SOURCE)")
    out: dict = {"checkpoints": entries}
    if datasets:
        out["finetune"] = {"datasets": list(datasets)}
    return out


def snakemake_command(overlay_path: str | Path, cores: int | None, dry_run: bool, extra: list[str]) -> list[str]:
    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    cmd = [exe, "-s", str(REPO / "Snakefile"), "--configfile", str(EVALUATE_CONFIG), str(overlay_path)]
    if cores is not None:
        cmd += ["--cores", str(cores)]
    if dry_run:
        cmd.append("-n")
    return [*cmd, *extra, "all"]


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="fine-tune and score checkpoints trained elsewhere (config/evaluate.yaml)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="[NAME=]SOURCE[,key=value...]")
    p.add_argument("--datasets", nargs="+", help="registry datasets to fine-tune on (default: every usable one)")
    p.add_argument("--overlay", default=DEFAULT_OVERLAY, help=f"where the overlay is written [{DEFAULT_OVERLAY}]")
    p.add_argument("--cores", type=int, help="snakemake --cores (with a profile, leave it to the profile)")
    p.add_argument("-n", "--dry-run", action="store_true", help="plan the jobs, run nothing")
    p.add_argument("--snakemake", type=shlex.split, default=[], metavar="ARGS",
                   help="more snakemake arguments, quoted (e.g. --snakemake '--profile slurm --keep-going')")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    atomic.write_text(args.overlay, yaml.safe_dump(overlay(args.sources, args.datasets), sort_keys=False))
    cmd = snakemake_command(args.overlay, args.cores, args.dry_run, list(args.snakemake))
    log.info("overlay %s; running %s", args.overlay, " ".join(cmd))
    return subprocess.call(cmd)


__all__ = ["default_name", "parse_entry", "overlay", "snakemake_command", "register"]
