"""The reconstruction methods on the small networks and real data (crops of the MNI152 template with
a defaced box): they learn, the sparse encoder keeps masked regions at zero, and the loss looks only
at masked, non-anonymised voxels."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from openmind_bench import nets, ssl
from openmind_bench.ssl import masking, models_genesis, spark3d
from openmind_bench.engine import optimisation, step as engine_step
from openmind_bench.pretrain import batches, settings as run_settings, trainer
from conftest import eval_loss

PATCH = (32, 32, 32)
# 8^3 mask blocks at 32^3 (a 4^3 grid, the ResEncTiny bottleneck, as 32^3 blocks are the 5^3 ResEnc-L
# bottleneck at 160^3); fewer Models Genesis shuffle windows at 32^3.
SMALL_SETTINGS = {"mae_cnn": {"block_size": 8}, "spark3d": {"block_size": 8}, "models_genesis": {"shuffle_windows": 2000}}
RUNS = [
    ("mae", "ResEncTiny"),
    ("spark3d", "ResEncTiny"),
    ("models_genesis", "ResEncTiny"),
    ("mae", "PrimusTiny"),
    ("simmim", "PrimusTiny"),
    ("models_genesis", "PrimusTiny"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(method: str, arch_name: str, seed: int = 0):
    torch.manual_seed(seed)
    arch = nets.resolve(arch_name)
    return ssl.build(method, arch.build(PATCH), arch, PATCH, SMALL_SETTINGS.get(ssl.implementation(method, arch.family)))


def template_source():
    s = run_settings.resolve({"patch_size": list(PATCH)}, "mae", "ResEncTiny", out_dir="unused")
    return batches.TemplateBatches(s)


def defaced_batch() -> dict:
    """Two 32^3 crops: one through the defaced face box, one inside the brain."""
    image, anon, anat = batches.template_volumes()
    box = np.argwhere(anon > 0)
    corner = [int(box[:, 0].min()), image.shape[1] - 32, 0]  # front, bottom: through the face box
    centre = [s // 2 - 16 for s in image.shape]
    out = {}
    for key, volume in (("image", image), ("anon", anon), ("anat", anat)):
        crops = [volume[o[0]:o[0] + 32, o[1]:o[1] + 32, o[2]:o[2] + 32] for o in (corner, centre)]
        out[key] = torch.from_numpy(np.stack(crops)[:, None].copy())
    assert out["anon"][0].sum() > 1000 and out["anon"][1].sum() == 0
    return out


def test_method_names_and_registry():
    assert ssl.parse("spark3d_anat_anon") == ssl.MethodName("spark3d", True, True)
    assert ssl.parse("mae_anon") == ssl.MethodName("mae", False, True)
    assert ssl.implementation("mae", "transformer") == "mae_primus"
    assert ssl.compatible("models_genesis", "cnn") and not ssl.compatible("simmim", "cnn")
    with pytest.raises(ValueError, match="no implementation for transformer"):
        ssl.implementation("spark3d", "transformer")
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        ssl.parse("byol")
    with pytest.raises(ValueError, match="mae_cnn: unknown key"):
        ssl.settings_for("mae", "cnn", {"blocksize": 8})
    assert ssl.settings_for("mae", "cnn")["block_size"] == 16  # nnssl's code, not the paper's 32
    assert ssl.settings_for("spark3d", "cnn")["mask_ratio_range"] == [0.6, 0.9]


@pytest.mark.parametrize("method, arch", RUNS)
def test_loss_decreases(method, arch):
    """A dozen or two AdamW steps on fresh crops and masks every step: the loss on fixed held-out crops
    and masks drops clearly. (The engine's own optimisers are exercised in test_trainer.py.)"""
    model = build(method, arch)
    cnn = nets.resolve(arch).family == "cnn"
    cfg = {"optimizer": "adamw", "lr": 1e-2 if cnn else 3e-3, "weight_decay": 0.0}
    optimizer = optimisation.build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    source = template_source()
    held_out = next(iter(source.val(steps=1, rank=0, world_size=1, batch_size=2, seed=7)))
    held_out_view = model.make_view(held_out, [101, 102])

    before = eval_loss(model, held_out_view)
    ctx = trainer.distributed.Context(0, 1, 0, torch.device("cpu"))
    steps = 12 if cnn else 20
    for step, batch in enumerate(source.train(epoch=0, first_step=0, steps=steps, rank=0, world_size=1,
                                               batch_size=2, seed=3)):
        view = model.make_view(batch, [1000 + 2 * step, 1001 + 2 * step])
        loss, _ = engine_step.train_step(model, view, optimizer, None, 12.0, contextlib.nullcontext(), ctx, None)
        assert torch.isfinite(loss)
    after = eval_loss(model, held_out_view)
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("block_size", [8, 4])
def test_sparse_encoder_keeps_masked_regions_exactly_zero(block_size):
    """Every encoder stage at least as fine as the mask grid is zero on its masked sites; stages coarser
    than the grid are dense, as nnssl (4^3 blocks: the 4^3 bottleneck under the 8^3 grid)."""
    torch.manual_seed(0)
    arch = nets.resolve("ResEncTiny")
    model = spark3d.build(arch.build(PATCH), arch.kwargs, PATCH, anon_aware=False, mask_ratio_range=[0.6, 0.9],
                          block_size=block_size)
    batch = defaced_batch()
    view = model.make_view(batch, [11, 12])
    assert torch.equal(view["input"], batch["image"] * view["visible"])
    with torch.no_grad():
        features = model.encode(view)
    grid = masking.block_grid(PATCH, block_size)
    for feat in features:
        shape = feat.shape[2:]
        if shape[0] < grid[0]:
            assert torch.count_nonzero(feat) > 0.9 * feat.numel()  # dense: no masked site
            continue
        kernel = [p // s for p, s in zip(PATCH, shape)]
        visible = torch.nn.functional.max_pool3d(view["visible"], kernel, kernel)
        masked = (visible == 0).expand_as(feat)
        assert masked.any() or kernel[0] > PATCH[0] // grid[0]
        assert torch.count_nonzero(feat[masked]) == 0
        assert torch.count_nonzero(feat[~masked]) > 0.5 * (~masked).sum()
    # Class-swapped in place: the state dict is a plain ResEnc's and loads into one.
    plain = arch.build(PATCH)
    plain.load_state_dict(model.backbone.state_dict(), strict=True)
    assert type(model.backbone.encoder.stem.convs[0].conv) is spark3d.MaskedConv3d
    assert model.backbone.encoder.stem.convs[0].conv is model.backbone.encoder.stem.convs[0].all_modules[0]


def test_spark_masked_norm_uses_visible_sites_only():
    x = torch.randn(2, 3, 4, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, 4)
    mask[:, :, :2] = 1
    garbage = x.clone()
    garbage[:, :, 2:] = 1e6  # masked sites must not move the statistics
    a = spark3d.masked_instance_norm(x, mask, None, None, 1e-5)
    b = spark3d.masked_instance_norm(garbage, mask, None, None, 1e-5)
    assert torch.allclose(a, b) and torch.count_nonzero(a[:, :, 2:]) == 0
    visible = a[:, :, :2]
    assert torch.allclose(visible.mean(dim=(2, 3, 4)), torch.zeros(2, 3), atol=1e-5)


@pytest.mark.parametrize("method, arch", [
    ("mae_anon", "ResEncTiny"), ("spark3d_anon", "ResEncTiny"), ("mae_anon", "PrimusTiny"),
    ("simmim_anon", "PrimusTiny"), ("models_genesis_anon", "ResEncTiny"), ("mae", "ResEncTiny"),
])
def test_loss_ignores_unmasked_and_anonymised_voxels(method, arch):
    model = build(method, arch)
    batch = defaced_batch()
    view = model.make_view(batch, [5, 6])
    anon = batch["anon"]
    impl = ssl.implementation(method, nets.resolve(arch).family)
    # The masked voxels, recovered from each method's own view.
    if impl == "spark3d":
        masked = 1.0 - view["visible"]
    elif impl == "mae_cnn":
        masked = masking.upsample(masking.random_block_mask([5, 6], model.grid, [0.75, 0.75]), PATCH)
        assert torch.equal(view["input"], batch["image"] * (1 - masked))
    elif impl == "mae_primus":
        dropped = torch.ones(2, int(np.prod(model.grid)))
        dropped.scatter_(1, view["keep_index"], 0.0)
        masked = masking.upsample(dropped.reshape(2, *model.grid).bool(), PATCH)
    elif impl == "simmim_primus":
        masked = masking.upsample(view["token_mask"].reshape(2, *model.grid).bool(), PATCH)
    else:  # Models Genesis restores every voxel but the anonymised ones (flipped with the image)
        masked = torch.ones_like(view["target"])
    assert 0 < masked.mean() <= 1
    if impl == "models_genesis":
        assert torch.equal(view["loss_weight"].sum(dim=(1, 2, 3, 4)), (1 - anon).sum(dim=(1, 2, 3, 4)))
        ignored = view["loss_weight"] == 0
    elif method.endswith("_anon"):
        assert torch.equal(view["loss_weight"], masked * (1 - anon))
        ignored = (masked == 0) | (anon > 0)
    else:
        assert torch.equal(view["loss_weight"], masked)
        ignored = masked == 0
    assert ignored.any() and (~ignored).any()

    prediction = model.reconstruct(view).detach().requires_grad_(True)
    loss = masking.weighted_mse(prediction, view["target"], view["loss_weight"])
    loss.backward()
    assert torch.count_nonzero(prediction.grad[ignored]) == 0
    assert torch.count_nonzero(prediction.grad[~ignored]) > 0.9 * (~ignored).sum()
    with torch.no_grad():
        assert float(model(view)) == pytest.approx(float(loss), rel=1e-5)  # forward is this loss
        moved = dict(view, target=view["target"] + 100.0 * ignored.float())
        assert float(masking.weighted_mse(prediction, moved["target"], moved["loss_weight"])) == pytest.approx(
            float(loss), rel=1e-6)


def test_anon_aware_methods_need_the_mask():
    model = build("mae_anon", "ResEncTiny")
    with pytest.raises(ValueError, match="'anon' mask"):
        model.make_view({"image": torch.zeros(1, 1, *PATCH)}, [1])


@pytest.mark.parametrize("method, arch", [("spark3d", "ResEncTiny"), ("mae", "PrimusTiny"),
                                          ("models_genesis_anon", "ResEncTiny")])
def test_views_depend_on_the_sample_seed_only(method, arch):
    """A batch split in two (as over two DDP ranks) gets exactly the views of the whole batch."""
    model = build(method, arch)
    batch = defaced_batch()
    whole = model.make_view(batch, [21, 22])
    halves = [model.make_view({k: v[i:i + 1] for k, v in batch.items()}, [21 + i]) for i in range(2)]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves])), key
    other = model.make_view(batch, [23, 24])
    assert not torch.equal(other["loss_weight"], whole["loss_weight"]) or not torch.equal(other["input"],
                                                                                         whole["input"])


def test_models_genesis_corruptions():
    rng = np.random.default_rng(0)
    image = defaced_batch()["image"][1, 0]
    unit = (image - image.min()) / (image.max() - image.min())
    shuffled = models_genesis.local_pixel_shuffle(unit, rng, 500, torch.Generator().manual_seed(0))
    # values move within small windows (read from the original, so overlapping windows may repeat some)
    assert (shuffled != unit).float().mean() > 0.05 and torch.isin(shuffled, unit).all()
    # one window: a permutation of exactly its own voxels, nothing else moves
    one = models_genesis.local_pixel_shuffle(unit, np.random.default_rng(4), 1, torch.Generator().manual_seed(1))
    changed = one != unit
    assert changed.any()
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in torch.nonzero(changed).T)
    assert torch.equal(torch.sort(one[box].flatten())[0], torch.sort(unit[box].flatten())[0])
    curve = models_genesis.nonlinear_intensity(unit, np.random.default_rng(5))
    assert curve.min() >= 0 and curve.max() <= 1 and not torch.allclose(curve, unit)
    # the official formulation (np.interp on the Bezier samples) from the same draws
    draws = np.random.default_rng(5)
    xvals, yvals = models_genesis._bezier(np.array([[0.0, 0.0], draws.random(2), draws.random(2), [1.0, 1.0]]))
    xvals, yvals = (np.sort(xvals), yvals) if draws.random() < 0.5 else (np.sort(xvals), np.sort(yvals))
    assert np.allclose(curve.numpy(), np.interp(unit.numpy(), xvals, yvals), atol=1e-6)
    painted = models_genesis.in_paint(unit, rng)
    outside = models_genesis.out_paint(unit, rng)
    assert painted.shape == outside.shape == unit.shape
    assert (painted != unit).any() and (outside == unit).float().mean() > 0.02

    settings = dict(models_genesis.DEFAULTS)
    off = {**settings, "nonlinear_rate": 0, "paint_rate": 0, "local_rate": 0, "flip_rate": 0}
    x, y, a = models_genesis.corrupt(image, torch.zeros_like(image), np.random.default_rng(1), off)
    assert torch.equal(x, image) and torch.equal(y, image)
    flips = {**off, "flip_rate": 1.0}
    median = image.median()
    anon = (image > median).float()  # a mask tied to the image's content
    x, y, a = models_genesis.corrupt(image, anon, np.random.default_rng(2), flips)
    assert not torch.equal(y, image)
    assert torch.equal(a, (y > median).float())  # flipped together: still aligned
    for space in ("zscore", "unit"):
        x, y, _ = models_genesis.corrupt(image, None, np.random.default_rng(3),
                                         {**settings, "intensity_space": space, "shuffle_windows": 100})
        assert x.shape == y.shape and not torch.equal(x, y)
    with pytest.raises(ValueError, match="intensity_space"):
        build("models_genesis", "ResEncTiny").__class__(nets.resolve("ResEncTiny").build(PATCH), PATCH,
                                                        anon_aware=False, **{**settings, "intensity_space": "hu"})


@pytest.mark.parametrize("method, arch", [("mae_anon", "ResEncTiny"), ("spark3d_anon", "ResEncTiny"),
                                          ("mae_anon", "PrimusTiny"), ("simmim_anon", "PrimusTiny")])
def test_masked_views_are_built_on_the_batchs_device_from_a_block_grid_draw(method, arch):
    """The masked methods build their views where the batch is (the training device): on a `meta`
    batch every tensor of the view is on `meta`, so no full-size tensor was made on the CPU; the
    masks are the CPU draws of the sample seeds (the same on every device)."""
    model = build(method, arch)
    assert model.views_on_device
    batch = defaced_batch()
    view = model.make_view({k: v.to("meta") for k, v in batch.items()}, [5, 6])
    assert {key: value.device.type for key, value in view.items()} == {key: "meta" for key in view}
    cpu_view = model.make_view(batch, [5, 6])
    assert {key: tuple(value.shape) for key, value in view.items()} == \
        {key: tuple(value.shape) for key, value in cpu_view.items()}


def test_block_masks_expand_to_voxels_as_repeated_blocks():
    grid_mask = masking.random_block_mask([3, 4], (2, 4, 5), [0.5, 0.3])
    expected = grid_mask[:, None].float()
    for axis, size in enumerate((8, 16, 10)):
        expected = expected.repeat_interleave(size // grid_mask.shape[axis + 1], dim=axis + 2)
    assert torch.equal(masking.upsample(grid_mask, (8, 16, 10)), expected)
    assert [int(m.sum()) for m in grid_mask] == [20, 12]
