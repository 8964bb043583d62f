"""A guard for every method: a short, seeded CPU run of the pre-training engine per method and
architecture (6 epochs of one step, batch 2, crops of the MNI152 template, one thread, the config's
optimisers with a 1-epoch Primus warm-up) whose loss curve (train loss per step, validation loss on
fixed held-out crops after it) must match the stored reference in `tests/data/loss_curves.json`.

A change that moves a curve beyond the tolerance fails here: the views, the loss, the optimiser
defaults, the seeds. When the change is meant, renew the reference on purpose and commit it with
the change (its message saying why the curves moved):

    PYTHONPATH=src .venv/bin/python tests/test_loss_curves.py            # every run
    PYTHONPATH=src .venv/bin/python tests/test_loss_curves.py voco__ResEncTiny   # some runs

The tolerance (relative 5e-3, absolute 1e-4 per point) covers float differences between CPUs and
thread counts: they start near 1e-7 and grow with the steps (training through ReLU kinks at SGD
momentum 0.99 is chaotic; measured between 1 and 2 threads: at most 1e-3 relative within these 6
steps, percents after 12), which is why the runs are short. A changed view, loss, random draw or
optimiser default moves a curve by percents from its first points.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "data" / "loss_curves.json"
RELATIVE, ABSOLUTE = 5e-3, 1e-4
ARCHITECTURES = ("ResEncTiny", "PrimusTiny")
# Scaled down as in test_ssl_contrastive.py / test_ssl_methods.py: 16^3 crops of 32 x 32 x 16
# regions for the view-making methods (2 crop pairs per region, as nnssl: Barlow Twins standardises
# over the batch, and 2 embeddings per view make its loss piecewise constant), 32^3 patches with 8^3
# mask blocks for the reconstruction ones.
TWO_VIEW = {"region_size": [32, 32, 16], "crop_size": [16, 16, 16], "pairs_per_image": 2, "projector_dims": [64, 64]}
SMALL = {
    "simclr": TWO_VIEW, "barlow_twins": TWO_VIEW, "vicreg": TWO_VIEW,
    "voco": {"region_size": [32, 32, 16], "base_grid": [2, 2, 1], "projector_dims": [64, 64]},
    "volume_fusion": {"min_box_size": 2, "n_boxes": [4, 10]},
    "swinunetr": {"contrastive_dim": 32},
    "mae_cnn": {"block_size": 8}, "spark3d": {"block_size": 8}, "models_genesis": {"shuffle_windows": 2000},
}
SMALL_PATCH = ("simclr", "barlow_twins", "vicreg", "voco", "volume_fusion", "swinunetr")


def runs() -> list[tuple[str, str]]:
    from openmind_bench import nets, ssl

    return [(m, a) for m in ssl.METHODS for a in ARCHITECTURES if ssl.compatible(m, nets.resolve(a).family)]


def curve(method: str, arch: str, threads: int = 1) -> dict[str, list[float]]:
    """The run's train and validation loss per epoch (one step each)."""
    from openmind_bench import nets, ssl
    from openmind_bench.engine import checkpoint
    from openmind_bench.pretrain import settings as run_settings, trainer

    impl = ssl.implementation(method, nets.resolve(arch).family)
    patch = [16, 16, 16] if impl in SMALL_PATCH else [32, 32, 32]
    section = {"patch_size": patch, "epochs": 6, "steps_per_epoch": 1, "val_steps": 3, "total_batch_size": 2,
               "checkpoint_every": 1000, "seed": 0, "optimisation": {"transformer": {"warmup_epochs": 1}},
               "method_settings": {impl: SMALL.get(impl, {})}}
    with tempfile.TemporaryDirectory() as out:
        s = run_settings.resolve(section, method, arch, out_dir=out)
        s.batch_source, s.threads = "openmind_bench.pretrain.batches:template_batches", threads
        outcome = trainer.run(s)
        history = checkpoint.load(outcome.checkpoint)["history"]
    return {"train_loss": [float(r["train_loss"]) for r in history],
            "val_loss": [float(r["val_loss"]) for r in history]}


def key(method: str, arch: str) -> str:
    return f"{method}__{arch}"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())["curves"]


def test_every_method_and_architecture_has_a_reference(reference):
    assert sorted(reference) == sorted(key(m, a) for m, a in runs())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method, arch", runs())
def test_loss_curve_matches_the_reference(method, arch, reference):
    expected = reference[key(method, arch)]
    got = curve(method, arch)
    for name in ("train_loss", "val_loss"):
        assert got[name] == pytest.approx(expected[name], rel=RELATIVE, abs=ABSOLUTE), (
            f"{key(method, arch)} {name} moved: renew tests/data/loss_curves.json on purpose if the change "
            f"is meant (see this module's docstring)")


def test_voco_learns_with_augmented_crops_and_the_two_term_teacher(reference):
    """The stored VoCo curves (default settings: every crop augmented, the EMA teacher): the held-out
    loss falls well below its start on both architectures."""
    for arch in ARCHITECTURES:
        val = reference[key("voco", arch)]["val_loss"]
        assert min(val) < 0.9 * val[0], (arch, val)


def renew(keys: list[str]) -> None:
    import torch

    curves = json.loads(REFERENCE.read_text())["curves"] if REFERENCE.exists() else {}
    for method, arch in runs():
        if keys and key(method, arch) not in keys:
            continue
        torch.manual_seed(0)
        curves[key(method, arch)] = {k: [round(v, 6) for v in vs] for k, vs in curve(method, arch).items()}
        print(key(method, arch), curves[key(method, arch)]["val_loss"], flush=True)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps({
        "note": "Loss curves of tests/test_loss_curves.py (renew with: PYTHONPATH=src python "
                "tests/test_loss_curves.py [method__arch ...]); one thread, CPU.",
        "torch": torch.__version__,
        "curves": dict(sorted(curves.items())),
    }, indent=1) + "\n")


if __name__ == "__main__":
    renew(sys.argv[1:])
