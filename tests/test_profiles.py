"""`openmind-bench install-profile`: the SLURM profile where Snakemake finds it by name."""

import subprocess
import sys

import pytest
import yaml

from openmind_bench.cli import main
from openmind_bench.profiles import PROFILES_ROOT, install_profile, user_profile_dir


def test_user_profile_dir_follows_home_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_profile_dir() == tmp_path / ".config" / "snakemake"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_profile_dir() == tmp_path / "xdg" / "snakemake"


def test_install_edits_site_facts_and_keeps_the_rest(tmp_path):
    target, state = install_profile("mycluster", tmp_path, partition_cpu="short", partition_gpu="a100",
                                    account="lab_42")
    assert state == "installed" and target == tmp_path / "mycluster"
    original = yaml.safe_load((PROFILES_ROOT / "slurm" / "config.yaml").read_text())
    installed = yaml.safe_load((target / "config.yaml").read_text())
    assert installed["default-resources"]["slurm_partition"] == "short"
    assert installed["default-resources"]["slurm_account"] == "lab_42"
    assert installed["set-resources"]["pretrain"]["slurm_partition"] == "a100"
    assert installed["set-resources"]["finetune"]["slurm_partition"] == "a100"
    # everything else is the repository's profile
    for key in ("executor", "jobs", "rerun-incomplete", "slurm-status-command", "retries"):
        assert installed[key] == original[key]
    assert installed["set-resources"]["pretrain"]["slurm_extra"] == original["set-resources"]["pretrain"]["slurm_extra"]
    # comments (the EDIT markers) stay for the user
    assert "# EDIT: your GPU partition" in (target / "config.yaml").read_text()


def test_reinstall_is_a_no_op_and_a_changed_copy_needs_force(tmp_path):
    target, _ = install_profile("slurm", tmp_path)
    assert (target / "config.yaml").read_bytes() == (PROFILES_ROOT / "slurm" / "config.yaml").read_bytes()
    assert install_profile("slurm", tmp_path)[1] == "unchanged"
    (target / "config.yaml").write_text((target / "config.yaml").read_text() + "jobs: 7\n")
    with pytest.raises(FileExistsError, match=r"differs .*config\.yaml.*--force"):
        install_profile("slurm", tmp_path)
    assert (target / "config.yaml").read_text().endswith("jobs: 7\n")  # untouched
    with pytest.raises(FileExistsError, match="--force"):
        install_profile("slurm", tmp_path, partition_gpu="other")
    assert install_profile("slurm", tmp_path, partition_gpu="other", force=True)[1] == "replaced"
    assert 'slurm_partition: "other"' in (target / "config.yaml").read_text()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_bad_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        install_profile("../x", tmp_path)
    with pytest.raises(ValueError, match="not a valid SLURM partition"):
        install_profile("slurm", tmp_path, partition_cpu="cpu\nexecutor: local")


def test_cli_installs_into_home_and_refuses_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["install-profile", "--partition-cpu", "c1"]) == 0
    installed = tmp_path / ".config" / "snakemake" / "slurm" / "config.yaml"
    assert yaml.safe_load(installed.read_text())["default-resources"]["slurm_partition"] == "c1"
    assert "snakemake --profile slurm" in capsys.readouterr().out
    assert main(["install-profile", "--partition-cpu", "c2"]) == 1  # differs, no --force
    assert main(["install-profile", "--partition-cpu", "c2", "--force"]) == 0
    assert yaml.safe_load(installed.read_text())["default-resources"]["slurm_partition"] == "c2"


def test_snakemake_finds_the_installed_profile_by_name(tmp_path):
    """Snakemake's own lookup (cwd, user config dir, site dir) resolves the bare name."""
    install_profile("slurm", tmp_path / ".config" / "snakemake")
    code = ("from snakemake.cli import get_profile_dir; import sys; "
            "print(get_profile_dir('slurm')[1])")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / ".config" / "snakemake" / "slurm" / "config.yaml")
