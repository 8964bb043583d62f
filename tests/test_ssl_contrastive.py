"""The contrastive and pseudo-segmentation methods (SimCLR, VoCo, VolumeFusion, SwinUNETR-style, Barlow
Twins, VICReg) on the small networks and crops of the MNI152 template: the losses equal their formulas
on hand-made batches, negatives gathered over 2 gloo ranks equal one process, VoCo's overlap targets and
VolumeFusion's labels are exact, every method learns, and every checkpoint fine-tunes."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from openmind_bench import nets, ssl
from openmind_bench.downstream import transfer
from openmind_bench.ssl import features, swinunetr, views, voco, volume_fusion
from openmind_bench import config as omb_config
from openmind_bench.engine import checkpoint, distributed, optimisation, step as engine_step
from openmind_bench.pretrain import batches, settings as run_settings, trainer
from conftest import eval_loss

NEW = ["simclr", "voco", "volume_fusion", "swinunetr", "barlow_twins", "vicreg"]
# Scaled down: 16^3 crops of 32 x 32 x 16 regions, one crop pair per region, 2 x 2 x 1 VoCo bases,
# small projectors and boxes.
TWO_VIEW = {"region_size": [32, 32, 16], "crop_size": [16, 16, 16], "pairs_per_image": 1, "projector_dims": [64, 64]}
SMALL = {
    "simclr": TWO_VIEW,
    "barlow_twins": TWO_VIEW,
    "vicreg": TWO_VIEW,
    "voco": {"region_size": [32, 32, 16], "base_grid": [2, 2, 1], "projector_dims": [64, 64]},
    "volume_fusion": {"min_box_size": 2, "n_boxes": [4, 10]},
    "swinunetr": {"contrastive_dim": 32},
}
PATCH = [16, 16, 16]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(method: str, arch_name: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    arch = nets.resolve(arch_name)
    overrides = {**SMALL[ssl.parse(method).base], **extra}
    loader, network = ssl.patch_sizes(method, arch.family, PATCH, overrides)
    return ssl.build(method, arch.build(network), arch, PATCH, overrides), loader


def direct_nt_xent(z1, z2, t):
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denominator)
    return total / (2 * n)


HAND = (torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]]),
        torch.tensor([[0.8, 0.1, 2.5], [1.0, -1.0, 0.5], [-0.5, 2.0, 1.0]]))


def test_simclr_loss_is_nt_xent_on_a_hand_made_batch():
    z1, z2 = HAND
    assert float(features.nt_xent(z1, z2, 0.5)) == pytest.approx(direct_nt_xent(z1, z2, 0.5), rel=1e-5)
    # The method's loss is NT-Xent of its projected views, temperature 0.5 by default.
    model, region = build("simclr", "ResEncTiny")
    assert ssl.settings_for("simclr", "cnn")["temperature"] == 0.5
    view = model.make_view({"image": torch.randn(3, 1, *region)}, [1, 2, 3])
    assert view["views"].shape == (6, 1, 16, 16, 16)
    with torch.no_grad():
        z = model.embed(view["views"])
        assert float(model(view)) == pytest.approx(direct_nt_xent(z[:3], z[3:], 0.5), rel=1e-4)


def test_two_view_defaults_are_nnssls_simclr():
    """nnssl simCLRTrainer.py:63-66 + simclr_transform.py:88-124 (batchgenerators' defaults where it
    passes none); the VoCo projector is voco_architecture.py:37 (three linear layers of 2048)."""
    for method in ("simclr", "barlow_twins", "vicreg"):
        s = ssl.settings_for(method, "cnn")
        assert (s["region_size"], s["crop_size"], s["min_overlap"], s["pairs_per_image"], s["projector_dims"]) == (
            [192, 192, 64], [64, 64, 64], 0.5, 2, [2048, 2048, 2048])
    assert ssl.settings_for("barlow_twins", "cnn")["off_diagonal_weight"] == 5e-3  # Zbontar et al.; nnssl has none
    assert ssl.settings_for("voco", "cnn")["projector_dims"] == [2048, 2048, 2048]
    a = views.AUGMENTATION
    assert (a["noise_p"], a["noise_std"], a["blur_p"], a["blur_p_per_channel"], a["blur_sigma"]) == (
        0.1, (0.0, 0.1), 0.2, 0.5, (0.5, 1.0))
    assert (a["brightness_p"], a["brightness"], a["contrast_p"], a["contrast"]) == (0.15, (0.75, 1.25), 0.15, (0.75, 1.25))
    assert (a["lowres_p"], a["lowres_p_per_channel"], a["lowres_zoom"]) == (0.1, 0.5, (0.5, 1.0))
    assert (a["gamma_inverted_p"], a["gamma_p"], a["gamma"]) == (0.1, 0.3, (0.7, 1.5))
    assert (a["mirror_p"], a["rot90_p"], a["rot90_k"], a["rot90_axes"]) == (0.5, 0.3, (1, 2, 3), (0, 1))
    # The built VoCo projector: pooled width -> 2048 -> 2048 -> 2048.
    model, _ = build("voco", "ResEncTiny", projector_dims=[2048, 2048, 2048])
    widths = [(m.in_features, m.out_features) for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert widths == [(features.pooled_width(model.backbone), 2048), (2048, 2048), (2048, 2048)]


def _only(**probabilities) -> dict:
    return {**{k: (0.0 if k.endswith("_p") else v) for k, v in views.AUGMENTATION.items()}, **probabilities}


def test_rot90_and_low_resolution_rates_are_nnssls():
    """rot90 fires on 30% of crops, by 90, 180 or 270 degrees in axes (0, 1), never 0; low resolution
    fires on 10% of crops and then on each channel with p 0.5."""
    x = torch.arange(2 * 4**3, dtype=torch.float32).reshape(2, 4, 4, 4)
    n, rotated = 600, 0
    for seed in range(n):
        y = views.augment(x.clone(), views.rng(seed, 5), None, _only(rot90_p=0.3))
        if not torch.equal(y, x):
            rotated += 1
            assert any(torch.equal(y, torch.rot90(x, k, dims=(1, 2))) for k in (1, 2, 3))
    assert abs(rotated / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    always_coarser = _only(lowres_p=1.0, lowres_zoom=(0.5, 0.6))  # a zoom that always changes 4^3
    channels = [not torch.equal(c, x_c) for seed in range(200)
                for c, x_c in zip(views.augment(x.clone(), views.rng(seed, 6), None, always_coarser), x)]
    assert abs(sum(channels) / len(channels) - 0.5) < 4 * math.sqrt(0.25 / len(channels))
    channels = [not torch.equal(c, x_c) for seed in range(200)
                for c, x_c in zip(views.augment(x.clone(), views.rng(seed, 7), None, _only()), x)]
    assert not any(channels)  # every probability 0: the crop passes unchanged


def test_two_crop_pairs_per_region_are_aligned_positives():
    """nnssl cuts 2 pairs per region: views = first crops of (sample, pair) sample-major, then the
    second crops in the same order; each pair overlaps by at least half per axis."""
    region, crop = (32, 32, 16), (16, 16, 16)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in region], indexing="ij"))
    image = torch.stack([grid, grid + 1000])  # (2 samples, 3 channels = voxel coordinates + sample offset)
    v = views.two_views(image, [4, 5], crop, 0.5, augmentation=False, pairs_per_image=2)
    assert v.shape == (8, 3, *crop)
    for k in range(4):
        first, second = v[k], v[4 + k]
        assert int(first[0, 0, 0, 0]) // 1000 == k // 2 == int(second[0, 0, 0, 0]) // 1000  # same sample
        shift = (first[:, 0, 0, 0] - second[:, 0, 0, 0]).abs()
        assert bool((shift <= 8).all())
    model, region = build("simclr", "ResEncTiny", pairs_per_image=2)
    view = model.make_view({"image": torch.randn(2, 1, *region)}, [1, 2])
    assert view["views"].shape == (8, 1, 16, 16, 16)
    with torch.no_grad():
        z = model.embed(view["views"])
        assert float(model(view)) == pytest.approx(direct_nt_xent(z[:4], z[4:], 0.5), rel=1e-4)


def test_barlow_twins_and_vicreg_equal_their_formulas():
    z1, z2 = HAND
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    expected = 0.0
    for i in range(d):
        for j in range(d):
            c = float(sum(a[k, i] * b[k, j] for k in range(n)) / n)
            expected += (1 - c) ** 2 if i == j else 5e-3 * c**2
    assert float(features.barlow_twins(z1, z2, 5e-3)) == pytest.approx(expected, rel=1e-5)

    def var_cov(z):
        zc = z - z.mean(0)
        std = [math.sqrt(float(zc[:, i].pow(2).sum()) / (n - 1) + 1e-4) for i in range(d)]
        var = sum(max(0.0, 1 - s) for s in std) / d
        cov = sum(float((zc[:, i] * zc[:, j]).sum() / (n - 1)) ** 2 for i in range(d) for j in range(d) if i != j) / d
        return var, cov

    invariance = float(((z1 - z2) ** 2).mean())
    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    expected = 25 * invariance + 25 * (v1 + v2) / 2 + 1 * (c1 + c2)
    assert float(features.vicreg(z1, z2, 25, 25, 1)) == pytest.approx(expected, rel=1e-5)
    assert ssl.settings_for("vicreg", "cnn")["sim_weight"] == 25.0


def test_contrastive_losses_run_in_float32_under_autocast():
    """Under bf16 autocast (what a GPU run uses) the NT-Xent logits, the Barlow cross-correlation and
    the VICReg covariance are still float32: the losses equal their fp32 values. With autocast left on
    inside the loss they differ (bf16 matmuls)."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 256, generator=g), torch.randn(16, 256, generator=g)
    z2 = z1 + 0.5 * z2  # correlated views, as a projector's outputs
    losses = {
        "nt_xent": lambda a, b: features.nt_xent(a, b, 0.5),
        "barlow_twins": lambda a, b: features.barlow_twins(a, b, 5e-3),
        "vicreg": lambda a, b: features.vicreg(a, b, 25, 25, 1),
    }
    for name, loss in losses.items():
        fp32 = loss(z1, z2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss(z1.bfloat16().float(), z2.bfloat16().float())
        reference = loss(z1.bfloat16().float(), z2.bfloat16().float())  # the same inputs, no autocast
        assert mixed.dtype == torch.float32, name
        assert float(mixed) == pytest.approx(float(reference), rel=1e-6), name
        assert float(mixed) == pytest.approx(float(fp32), rel=2e-2), name


def _gather_worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
        half = slice(2 * rank, 2 * rank + 2)
        results = {}
        for name, fn in (("nt_xent", lambda a, b: features.nt_xent(a, b, 0.5, gather_ranks=True)),
                         ("barlow", lambda a, b: features.barlow_twins(a, b, 5e-3)),
                         ("vicreg", lambda a, b: features.vicreg(a, b, 25, 25, 1))):
            a, b = z1[half].clone().requires_grad_(), z2[half].clone().requires_grad_()
            loss = fn(a, b)
            loss.backward()
            # DDP averages gradients over the ranks: the rank's share of the one-process gradient.
            results[name] = (loss.detach(), a.grad / world, b.grad / world)
        results["nt_xent_per_rank"] = features.nt_xent(z1[half], z2[half], 0.5)  # the default: own batch only
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_negatives_gathered_over_two_gloo_ranks_equal_one_process(tmp_path):
    """Barlow Twins, VICReg and NT-Xent with `gather_ranks` see the batch of all ranks; NT-Xent by
    default (nnssl) takes its negatives from the rank's own batch: 2 x 2 - 2 = 2 per anchor here."""
    mp.spawn(_gather_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
    for rank in range(2):
        half = slice(2 * rank, 2 * rank + 2)
        got = float(torch.load(tmp_path / f"rank{rank}.pt")["nt_xent_per_rank"])
        assert got == pytest.approx(direct_nt_xent(z1[half], z2[half], 0.5), rel=1e-5)
        assert got != pytest.approx(features.nt_xent(z1, z2, 0.5).item(), rel=1e-3)
    for name, fn in (("nt_xent", lambda a, b: features.nt_xent(a, b, 0.5)),
                     ("barlow", lambda a, b: features.barlow_twins(a, b, 5e-3)),
                     ("vicreg", lambda a, b: features.vicreg(a, b, 25, 25, 1))):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        for rank in range(2):
            got_loss, grad_a, grad_b = torch.load(tmp_path / f"rank{rank}.pt")[name]
            half = slice(2 * rank, 2 * rank + 2)
            assert float(got_loss) == pytest.approx(loss.item(), rel=1e-5), name
            assert torch.allclose(grad_a, a.grad[half], atol=1e-6), name
            assert torch.allclose(grad_b, b.grad[half], atol=1e-6), name


def test_voco_overlap_targets_are_exact_for_hand_made_boxes():
    bases = voco.base_boxes([256, 256, 64], [4, 4, 1])
    assert len(bases) == 16 and bases[5].tolist() == [[64, 64, 0], [128, 128, 64]]
    targets = np.array([
        [[0, 0, 0], [64, 64, 64]],  # exactly base 0
        [[32, 32, 0], [96, 96, 64]],  # a quarter in bases 0, 1, 4, 5
        [[64, 16, 0], [128, 80, 64]],  # 3/4 in base 4, 1/4 in base 5
    ])
    o = voco.overlaps(targets, bases)
    assert o[0, 0] == 1 and o[0].sum() == 1
    assert o[1, [0, 1, 4, 5]].tolist() == [0.25] * 4 and o[1].sum() == 1
    assert o[2, 4] == 0.75 and o[2, 5] == 0.25 and o[2].sum() == 1
    # The validation view's bases are the plain grid cells of the region, in base_boxes' order, with
    # their targets.
    model, region = build("voco", "ResEncTiny")
    model.eval()
    image = torch.randn(1, 1, *region)
    view = model.make_view({"image": image}, [9])
    for i, (start, stop) in enumerate(voco.base_boxes(region, [2, 2, 1])):
        assert torch.equal(view["bases"][i], views.crop(image[0], start, stop - start))
    boxes = model.target_boxes(9)
    for j, (start, stop) in enumerate(boxes):
        assert torch.equal(view["targets"][j], views.crop(image[0], start, stop - start))
    assert torch.allclose(view["overlap"][0], torch.as_tensor(voco.overlaps(boxes, model.bases), dtype=torch.float32))


def test_voco_augments_every_base_and_target_crop_on_its_own():
    """nnssl's VocoTransform runs the SimCLR pipeline over the batch of crops, one draw per crop. Here
    the four base cells hold the same content: in training they come out different, each equal to the
    pipeline applied with its own stream (sample seed, 22, crop index; targets after the bases)."""
    model, region = build("voco", "ResEncTiny")
    cell = torch.randn(1, 16, 16, 16)
    image = cell.repeat(1, 2, 2, 1)[None]  # (1, 1, 32, 32, 16): the 2 x 2 x 1 bases are identical
    view = model.make_view({"image": image}, [9])
    raw_bases = [views.crop(image[0], a, b - a) for a, b in voco.base_boxes(region, [2, 2, 1])]
    for j, raw in enumerate(raw_bases):
        assert torch.allclose(view["bases"][j], views.augment_crop(raw, (9, 22, j)), atol=1e-6)
    for k, (a, b) in enumerate(model.target_boxes(9)):
        expected = views.augment_crop(views.crop(image[0], a, b - a), (9, 22, 4 + k))
        assert torch.allclose(view["targets"][k], expected, atol=1e-6)
    assert all(not torch.allclose(view["bases"][i], view["bases"][j]) for i in range(4) for j in range(i))


def _voco_by_hand(s_base, s_target, t_base, t_target, overlap):
    """The original's loss, element by element: logits = (relu cos(student target, teacher base) +
    relu cos(teacher target, student base)) / 2; -log(1 - |o - l|) weighted by o on overlapping pairs,
    l^2 on the others; + mean relu cos between different student bases."""
    def cos(a, b):
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    total = 0.0
    n_b, n_t, n_base = overlap.shape
    for i in range(n_b):
        pos = pos_w = neg = neg_n = 0.0
        for k in range(n_t):
            for j in range(n_base):
                logit = 0.5 * (max(0.0, cos(s_target[i, k], t_base[i, j])) + max(0.0, cos(t_target[i, k], s_base[i, j])))
                o = float(overlap[i, k, j])
                if o > 0:
                    pos += -math.log(1 - abs(o - logit) + 1e-6) * o
                    pos_w += o
                else:
                    neg += logit**2
                    neg_n += 1
        reg = sum(max(0.0, cos(s_base[i, j], s_base[i, l])) for j in range(n_base) for l in range(j + 1, n_base))
        total += pos / pos_w + neg / (neg_n + 1e-6) + reg * 2 / (n_base * (n_base - 1))
    return total / n_b


def test_voco_teacher_averages_the_two_terms_of_the_original():
    model, region = build("voco", "ResEncTiny")
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a teacher that differs from the student
    model.eval()  # no EMA step, plain crops: the embeddings below are the ones the loss sees
    view = model.make_view({"image": torch.randn(2, 1, *region)}, [3, 4])
    b, n_t, n_base = view["overlap"].shape
    crops = torch.cat([view["bases"], view["targets"]])
    with torch.no_grad():
        s, t = model.embed(crops), model.embed(crops, teacher=True)
        loss = float(model(view))
    split = b * n_base
    parts = [x[:split].reshape(b, n_base, -1) for x in (s, t)] + [x[split:].reshape(b, n_t, -1) for x in (s, t)]
    s_base, t_base, s_target, t_target = parts
    assert loss == pytest.approx(_voco_by_hand(s_base, s_target, t_base, t_target, view["overlap"]), rel=1e-4)
    one_term = _voco_by_hand(s_base, s_target, t_base, s_target, view["overlap"])  # teacher bases only
    assert abs(loss - one_term) > 1e-4
    # The second term passes the prediction gradient to the student's bases; nnssl's variant
    # (momentum null) detaches them, so with the regularisation off they get none.
    for momentum, moves in ((0.9, True), (None, False)):
        model, region = build("voco", "ResEncTiny", momentum=momentum, reg_weight=0.0)
        model.eval()
        view = model.make_view({"image": torch.randn(1, 1, *region)}, [5])
        view["bases"].requires_grad_()
        model(view).backward()
        assert (view["bases"].grad.abs().sum() > 0) == moves, momentum


def test_volume_fusion_reads_centre_crops_and_augments_each_image_before_the_mix():
    """nnssl VolumeFusionTrainer: centre-crop loader; noise, blur, brightness, contrast, low resolution
    (p 0.25), gamma and mirroring on each image, then the mix (validation: no augmentation)."""
    from openmind_bench.data.sampler import PatchSampler

    assert ssl.loader_sampling("volume_fusion", "cnn") == "centre"
    assert ssl.loader_sampling("volume_fusion_anat", "transformer") == "random"  # anatomy centres asked for
    assert ssl.loader_sampling("mae", "cnn") == ssl.loader_sampling("voco", "cnn") == "random"
    sampler = PatchSampler([object()], (16, 16, 16), centre_crop=True)
    sampler.shape = lambda index: (51, 16, 13)
    # nnssl get_bbox: lower corner int((shape - patch) / 2) (truncated): 17, 0, -1 (padded); centre + 8
    assert sampler.sample_centre(0, np.random.default_rng(0)).tolist() == [25, 8, 7]
    a = volume_fusion.AUGMENTATION
    assert (a["lowres_p"], a["rot90_p"], a["noise_p"], a["blur_p"], a["gamma_inverted_p"], a["mirror_p"]) == (
        0.25, 0.0, 0.1, 0.2, 0.1, 0.5)
    model, _ = build("volume_fusion", "ResEncTiny")
    x = torch.randn(2, 1, *PATCH)
    view = model.make_view({"image": x}, [3, 4])
    augmented = torch.stack([views.augment_crop(x[i], (seed, 32), a) for i, seed in enumerate([3, 4])])
    assert not torch.equal(augmented, x)
    alpha = torch.tensor(model.levels)[view["labels"]][:, None]
    assert torch.allclose(view["input"], alpha * augmented + (1 - alpha) * augmented.roll(-1, 0))


def test_volume_fusion_labels_match_the_fusion_coefficients_voxel_for_voxel():
    boxes = [([0, 0, 0], [4, 4, 4], 2), ([2, 2, 2], [4, 4, 4], 4), ([10, 0, 0], [6, 16, 16], 1)]
    labels = volume_fusion.level_map(boxes, PATCH, "cpu")
    assert labels[0, 0, 0] == 2 and labels[3, 3, 3] == 4 and labels[5, 5, 5] == 4 and labels[12, 15, 15] == 1
    assert labels[8, 8, 8] == 0 and int((labels == 4).sum()) == 64
    model, _ = build("volume_fusion", "ResEncTiny")
    model.eval()  # the plain mix (training augments each image first)
    a, b = torch.rand(1, 1, *PATCH) + 1, -torch.rand(1, 1, *PATCH) - 1  # a > 0 > b
    view = model.make_view({"image": torch.cat([a, b])}, [3, 4])
    drawn = volume_fusion.draw_boxes(3, PATCH, (4, 10), 2, 0.625, 5)
    assert torch.equal(view["labels"][0], volume_fusion.level_map(drawn, PATCH, "cpu"))
    alpha = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])[view["labels"]][:, None]
    partners = torch.cat([b, a])
    assert torch.allclose(view["input"], alpha * torch.cat([a, b]) + (1 - alpha) * partners)
    assert set(view["labels"].unique().tolist()) > {0}


def _swinunetr(patch, **settings):
    arch = nets.resolve("ResEncTiny")
    return ssl.build("swinunetr", arch.build(patch), arch, patch, {**SMALL["swinunetr"], **settings})


def test_swinunetr_rotates_in_spatial_axes_1_and_2_as_nnssl():
    """nnssl rot_rand: np.rot90(x, k, (2, 3)) on (C, X, Y, Z), k drawn in 0..3, per view."""
    model = _swinunetr(PATCH, max_cutout_fraction=0.0)  # no cut-out: the input is the rotated patch
    x = torch.randn(3, 1, *PATCH)
    view = model.make_view({"image": x}, [0, 1, 2])
    seen = set()
    for v in range(2):
        for i, seed in enumerate([0, 1, 2]):
            k = int(views.rng(seed, 41 + v).integers(0, 4))
            expected = torch.from_numpy(np.rot90(x[i].numpy(), k, (2, 3)).copy())
            j = 3 * v + i
            assert int(view["rotation"][j]) == k
            assert torch.equal(view["target"][j], expected) and torch.equal(view["input"][j], expected)
            seen.add(k)
    assert seen & {1, 3}  # a quarter turn happened: X slices kept their voxels, Y and Z swapped roles
    with pytest.raises(ValueError, match="square"):
        _swinunetr([16, 16, 8])


def test_swinunetr_cut_outs_are_unit_noise_boxes_of_5_to_25_percent_and_swap_with_a_partner():
    patch = (40, 40, 40)
    r = np.random.default_rng(0)
    boxes = swinunetr.cutout_boxes(r, patch, 0.3, 0.25, 0.05)
    # by hand, nnssl patch_rand_drop: budget U(0, 0.3) x 40^3; corners in [0, 38]; sides in [2, 10], clipped
    r = np.random.default_rng(0)
    budget, used = r.uniform(0, 0.3) * 40**3, 0
    for start, stop in boxes:
        assert used < budget
        assert start == [int(r.integers(0, 39)) for _ in range(3)]
        assert stop == [min(int(r.integers(2, 11)) + a, 40) for a in start]
        used += np.prod([b - a for a, b in zip(start, stop)])
    assert used >= budget and len(boxes) > 1
    # Two constant samples, 5 and -5: cut-out voxels hold [0, 1] noise or, after a swap, the partner's -5.
    model = _swinunetr([32, 32, 32])
    x = torch.cat([torch.full((1, 1, 32, 32, 32), 5.0), torch.full((1, 1, 32, 32, 32), -5.0)])
    swapped = 0
    for seed in range(8):
        inp = model.make_view({"image": x}, [seed, 100 + seed])["input"][0]
        noise = (inp != 5) & (inp != -5)
        assert noise.any() and bool(((inp[noise] >= 0) & (inp[noise] <= 1)).all())
        swapped += bool((inp == -5).any())
    assert 0 < swapped < 8  # the partner is drawn from the batch, itself included (then no swap)
    alone = model.make_view({"image": x[:1]}, [3])["input"]
    assert not (alone == -5).any()


def test_swinunetr_heads_read_bottleneck_tokens_0_and_1():
    """nnssl swinunetr_architecture: bottleneck flattened (b c x y z -> b (x y z) c); rotation head
    on token 0, contrastive head on token 1; `head_tokens: null` pools."""
    model = _swinunetr(PATCH)
    bottleneck = torch.randn(2, 5, 2, 2, 2)
    rotation_in, contrastive_in = model.head_inputs([bottleneck])
    assert torch.equal(rotation_in, bottleneck[:, :, 0, 0, 0]) and torch.equal(contrastive_in, bottleneck[:, :, 0, 0, 1])
    tokens = torch.randn(2, 8, 5)  # Primus: already (B, N, C) in (x y z) order
    assert torch.equal(model.head_inputs([tokens])[1], tokens[:, 1])
    pooled = _swinunetr(PATCH, head_tokens=None).head_inputs([bottleneck])
    assert torch.allclose(pooled[0], bottleneck.mean((2, 3, 4))) and torch.equal(pooled[0], pooled[1])
    with pytest.raises(ValueError, match="only 1 token"):
        model.head_inputs([torch.randn(2, 5, 1, 1, 1)])


RUNS = [(m, a) for m in NEW for a in ("ResEncTiny", "PrimusTiny")]


@pytest.mark.parametrize("method, arch", RUNS)
def test_loss_decreases(method, arch):
    """A few dozen AdamW steps on fresh crops every step (views built as the engine does): the loss on
    fixed held-out crops drops. VoCo runs with its EMA teacher (the default)."""
    model, region = build(method, arch)
    source = batches.TemplateBatches(type("S", (), {"loader_patch_size": region})())
    cnn = nets.resolve(arch).family == "cnn"
    cfg = {"optimizer": "adamw", "lr": 3e-3 if cnn else 1e-3, "weight_decay": 0.0}
    optimizer = optimisation.build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    held_out = next(iter(source.val(steps=1, rank=0, world_size=1, batch_size=4, seed=7)))
    held_out_view = model.make_view(held_out, [101, 102, 103, 104])

    before = eval_loss(model, held_out_view)
    ctx = distributed.Context(0, 1, 0, torch.device("cpu"))
    steps = 30
    for step, batch in enumerate(source.train(epoch=0, first_step=0, steps=steps, rank=0, world_size=1,
                                               batch_size=4, seed=3)):
        view = trainer.make_view(model, batch, [1000 + 4 * step + i for i in range(4)], torch.device("cpu"))
        loss, _ = engine_step.train_step(model, view, optimizer, None, 12.0, contextlib.nullcontext(), ctx, None)
        assert torch.isfinite(loss)
    after = eval_loss(model, held_out_view)
    assert after < before - 0.05 * abs(before), (before, after)


def test_voco_teacher_follows_the_student_by_ema():
    model, region = build("voco", "ResEncTiny")
    assert model.momentum == 0.9
    teacher = dict(model.teacher["backbone"].named_parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    key = "encoder.stem.convs.0.conv.weight"
    old = teacher[key].clone()
    view = model.make_view({"image": torch.randn(1, 1, *region)}, [1])
    model(view)
    student = dict(model.backbone.named_parameters())[key]
    assert torch.allclose(teacher[key], 0.9 * old + 0.1 * student.detach())
    model.eval()
    frozen = teacher[key].clone()
    model(view)  # validation does not move the teacher
    assert torch.equal(teacher[key], frozen)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_names_and_settings():
    for m in NEW:
        assert ssl.compatible(m, "cnn") and ssl.compatible(m, "transformer")
    assert ssl.parse("simclr_anat") == ssl.MethodName("simclr", True, False)
    with pytest.raises(ValueError, match="anonymisation-aware"):
        ssl.parse("voco_anon")
    assert ssl.patch_sizes("simclr", "transformer", [160] * 3) == ([192, 192, 64], [64, 64, 64])
    assert ssl.patch_sizes("voco", "cnn", [160] * 3) == ([256, 256, 64], [64, 64, 64])
    assert ssl.patch_sizes("volume_fusion", "cnn", [160] * 3) == ([160] * 3, [160] * 3)
    assert ssl.grad_clip("simclr", "cnn", 12.0) == 0.1 and ssl.grad_clip("simclr", "transformer", 1.0) == 1.0
    assert ssl.grad_clip("voco", "cnn", 12.0) == math.inf
    assert not ssl.loader_augmentation("models_genesis", "cnn") and ssl.loader_augmentation("mae", "cnn")
    assert omb_config.defaults()["pretrain"]["amp_dtype"] == "float16"


@pytest.mark.parametrize("method, arch", [(m, a) for m in NEW for a in ("ResEncTiny", "PrimusTiny")])
def test_checkpoint_fine_tunes(tmp_path, method, arch):
    """One engine step, then the encoder and stem load into a fresh network at a downstream patch;
    Primus position embeddings are interpolated from the pre-training crop the plan records."""
    section = {"patch_size": PATCH, "epochs": 1, "steps_per_epoch": 1, "val_steps": 0, "total_batch_size": 2,
               "optimisation": {"transformer": {"warmup_epochs": 0}},
               "method_settings": {method: SMALL[method]}}
    s = run_settings.resolve(section, method, arch, out_dir=str(tmp_path / "run"))
    s.batch_source, s.threads = "openmind_bench.pretrain.batches:template_batches", 1
    assert trainer.run(s).status == "finished"
    state = checkpoint.load(tmp_path / "run" / checkpoint.FINAL)
    crop = [16, 16, 16]
    assert checkpoint.pretrain_patch_size(state["nnssl_adaptation_plan"]) == crop
    downstream = [32, 32, 32]
    pretrained = transfer.read_pretrained(tmp_path / "run" / checkpoint.FINAL)
    net = nets.resolve(arch).build(downstream, 1, 3)
    loaded = transfer.transfer(pretrained, net, downstream)
    plan = state["nnssl_adaptation_plan"]
    assert loaded and all(k.startswith((plan["key_to_encoder"], plan["key_to_stem"])) or k == plan["key_to_lpe"]
                          for k in loaded)
    if arch == "PrimusTiny":
        assert "eva.pos_embed" in loaded and state["network_weights"]["eva.pos_embed"].shape[1] == 2**3
        assert net.state_dict()["eva.pos_embed"].shape[1] == 4**3
    net(torch.randn(1, 1, *downstream))


def test_simclr_under_ddp_two_gloo_processes_equals_one_process(tmp_path):
    """The engine with 2 torchrun gloo processes (1 sample each; views built on the device, negatives
    gathered across the ranks with `gather_negatives`) ends with the weights of 1 process on the
    2-sample batch."""
    from openmind_bench.pretrain import worker as launch

    def settings(out):
        section = {"patch_size": PATCH, "epochs": 1, "steps_per_epoch": 2, "val_steps": 1, "total_batch_size": 2,
                   "method_settings": {"simclr": {**SMALL["simclr"], "gather_negatives": True}}}
        s = run_settings.resolve(section, "simclr", "ResEncTiny", out_dir=str(out))
        s.batch_source, s.threads = "openmind_bench.pretrain.batches:template_batches", 1
        return s

    assert launch.launch(settings(tmp_path / "two"), nproc=2, threads=2) == 0
    assert trainer.run(settings(tmp_path / "one")).status == "finished"
    a = checkpoint.load(tmp_path / "one" / checkpoint.FINAL)
    b = checkpoint.load(tmp_path / "two" / checkpoint.FINAL)
    torch.manual_seed(engine_step.derive_seed(0, 0))
    initial = nets.resolve("ResEncTiny").build(PATCH[:2] + [16]).state_dict()
    moved = 0
    for part in ("network_weights", "pretext_weights"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], rtol=1e-4, atol=1e-6), key
            moved += part == "network_weights" and value.is_floating_point() and not torch.equal(value, initial[key])
    assert moved > 0.5 * len(initial)  # training happened
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=1e-4)
