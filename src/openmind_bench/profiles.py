"""`openmind-bench install-profile`: put the SLURM profile where `snakemake --profile NAME` finds it.

Snakemake looks a profile *name* up in the working directory, the user's config folder
(`$XDG_CONFIG_HOME/snakemake`, by default `~/.config/snakemake`) and `/etc/xdg/snakemake`,
never in the workflow's `profiles/` folder. This verb copies `profiles/slurm/` of the checkout to
`<dest>/<name>/`, with the site facts (partitions, account) filled in, so that
`snakemake --profile slurm all` works as written. A copy that differs from what would be
written (edited by hand, or installed with other site facts) is never overwritten without
`--force`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import openmind_bench

# profiles/ of the checkout (src/openmind_bench/__init__.py -> repository root)
PROFILES_ROOT = Path(openmind_bench.__file__).resolve().parents[2] / "profiles"

# lines of profiles/slurm/config.yaml marked for editing, by the site fact they carry
_CPU_LINE = re.compile(r'^(\s*)slurm_partition: "[^"]*"(\s*# EDIT: your CPU partition.*)$', re.M)
_GPU_LINE = re.compile(r'^(\s*)slurm_partition: "[^"]*"(\s*# EDIT: your GPU partition.*)$', re.M)
_ACCOUNT_LINE = re.compile(r'^(\s*)#\s*slurm_account: "[^"]*"(\s*# EDIT: your account.*)$', re.M)


def user_profile_dir() -> Path:
    """The user config folder Snakemake searches for profile names (as appdirs on Linux)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake"


def _quote(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.,:+-]+", value):
        raise ValueError(f"install-profile: {value!r} is not a valid SLURM partition/account name")
    return f'"{value}"'


def edit_site_facts(text: str, partition_cpu: str | None = None, partition_gpu: str | None = None,
                    account: str | None = None) -> str:
    """profiles/slurm/config.yaml with the `EDIT` lines set to the given site facts."""
    def sub(pattern: re.Pattern, value: str, what: str, text: str) -> str:
        new, n = pattern.subn(lambda m: f"{m.group(1)}slurm_{what}: {_quote(value)}{m.group(2)}", text)
        if n == 0:
            raise ValueError(f"install-profile: no `EDIT` line for the {what} in the profile's config.yaml")
        return new

    if partition_cpu is not None:
        text = sub(_CPU_LINE, partition_cpu, "partition", text)
    if partition_gpu is not None:
        text = sub(_GPU_LINE, partition_gpu, "partition", text)
    if account is not None:
        text = sub(_ACCOUNT_LINE, account, "account", text)
    return text


def install_profile(name: str = "slurm", dest: Path | None = None, partition_cpu: str | None = None,
                    partition_gpu: str | None = None, account: str | None = None, force: bool = False,
                    source: Path | None = None) -> tuple[Path, str]:
    """Copy the SLURM profile to `<dest>/<name>/`; returns (folder, "installed"|"unchanged"|"replaced").

    Raises FileExistsError when a different copy is there and `force` is false.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"install-profile: --name {name!r} must be a plain folder name")
    source = Path(source) if source else PROFILES_ROOT / "slurm"
    if not (source / "config.yaml").is_file():
        raise FileNotFoundError(f"install-profile: {source / 'config.yaml'} not found (is the package "
                                "installed from a checkout of the workflow?)")
    target = Path(dest).expanduser() if dest else user_profile_dir()
    target = target / name
    files = {p.relative_to(source): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    config = Path("config.yaml")
    files[config] = edit_site_facts(files[config].decode(), partition_cpu, partition_gpu, account).encode()

    state = "installed"
    if target.exists():
        existing = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
        if existing == files:
            return target, "unchanged"
        if not force:
            changed = sorted(str(k) for k in set(existing) | set(files) if existing.get(k) != files.get(k))
            raise FileExistsError(f"install-profile: {target} exists and differs from the profile to install "
                                  f"({', '.join(changed)}); pass --force to replace it")
        state = "replaced"
    tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target, state


def register(sub) -> None:
    p = sub.add_parser("install-profile",
                       help="install the SLURM profile so that `snakemake --profile slurm` finds it by name")
    p.add_argument("--name", default="slurm", help="profile name (folder name) [slurm]")
    p.add_argument("--dest", type=Path, default=None,
                   help="folder that receives <name>/ [$XDG_CONFIG_HOME/snakemake or ~/.config/snakemake]")
    p.add_argument("--partition-cpu", help="SLURM partition for CPU jobs [as in profiles/slurm: cpu]")
    p.add_argument("--partition-gpu", help="SLURM partition for pre-training and fine-tuning [gpu]")
    p.add_argument("--account", help="SLURM account, if the cluster requires one")
    p.add_argument("--force", action="store_true", help="replace an installed copy that differs")
    p.set_defaults(func=run)


def run(args) -> int:
    target, state = install_profile(args.name, args.dest, args.partition_cpu, args.partition_gpu,
                                    args.account, args.force)
    print(f"profile {state}: {target}  (use: snakemake --profile {args.name} all)")
    return 0
