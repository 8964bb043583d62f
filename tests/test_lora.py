"""The `lora` schedule: adapters on the encoder through peft, merged into a plain network whose output
equals the adapted one; bad patterns and ranks named by their key; which runs and datasets it covers;
classification runs that train only adapters, stem and head. (Segmentation inside nnU-Net:
test_nnunet.py.)"""

import json
import re

import pytest
import torch

pytest.importorskip("peft")

from openmind_bench import config as omb_config  # noqa: E402
from openmind_bench import nets  # noqa: E402
from openmind_bench.config import ConfigError  # noqa: E402
from openmind_bench.aggregate.collect import gather  # noqa: E402
from openmind_bench.aggregate.table import build_table, render_markdown  # noqa: E402
from openmind_bench.aggregate.results import read_results  # noqa: E402
from openmind_bench.downstream import classification, lora, settings as run_settings, transfer  # noqa: E402
from openmind_bench.registry import load_registry  # noqa: E402

from test_classification import CLS, REGISTRY, _settings  # noqa: E402
from test_transfer import pretrained_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PATCH = [32, 32, 32]
ARCHITECTURES = ["ResEncTiny", "PrimusTiny"]
DEFAULTS = omb_config.section("downstream")["lora"]


def _network(arch, seed=0):
    torch.manual_seed(seed)
    return nets.resolve(arch).build(PATCH, 1, 3).eval()


def _attach(net, arch, **overrides):
    family = nets.resolve(arch).family
    return lora.attach(net, family, {**DEFAULTS, **overrides}, nets.adaptation_keys(net)["key_to_encoder"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_network_is_plain_and_predicts_as_the_adapted_one(arch):
    net = _network(arch)
    plain_keys = set(net.state_dict())
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = net(x)
    adapters = _attach(net, arch, rank=4)
    with torch.no_grad():
        assert torch.equal(net(x), base)  # lora_B starts at zero: the pre-trained function
        for name, p in net.named_parameters():
            if lora.is_adapter(name):
                p.normal_(0, 0.05)
        adapted = net(x)
    assert (adapted - base).abs().max() > 1e-3  # the forward runs through the adapters (aliases included)
    merged = adapters.merge()
    assert merged is net and set(net.state_dict()) == plain_keys
    assert not any("lora" in n for n, _ in net.named_modules())
    fresh = _network(arch, seed=3)
    fresh.load_state_dict(net.state_dict())  # a plain network of the architecture loads it, no peft
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-4, atol=1e-5)


def test_adapters_wrap_only_the_targets_and_only_they_train():
    net = _network("PrimusTiny")
    _attach(net, "PrimusTiny")
    wrapped = {n for n, m in net.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {f"eva.blocks.{b}.{layer}" for b in range(2) for layer in
                       ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == \
        {n for n, _ in net.named_parameters() if lora.is_adapter(n)}
    groups = lora.adapter_groups(transfer.parameter_groups(net, nets.adaptation_keys(net)))
    assert groups["encoder"] and all(lora.is_adapter(n) for n, _ in groups["encoder"])
    assert not any(lora.is_adapter(n) for g in ("stem", "decoder") for n, _ in groups[g])
    # rank 8 adapters on 96-wide layers (fc2: 256 -> 96 with SwiGLU's hidden 256)
    counts = transfer.trained_parameters(net, groups, {"encoder"})
    adapters = sum(p.numel() for n, p in net.named_parameters() if lora.is_adapter(n))
    assert counts["count"] == adapters and counts["total"] == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch, pattern, message", [
    ("ResEncTiny", r"encoder\.stages\.\d+\.blocks\.\d+\.conv9\.conv", "matches no module"),
    ("ResEncTiny", r"decoder\.stages\.\d+\.convs\.0\.conv", "outside the encoder"),
    ("ResEncTiny", r"encoder\.stages\.\d+\.blocks\.\d+\.skip\.1\.conv", "1x1x1 Conv3d"),
    ("ResEncTiny", r"encoder\.stages\.\d+\.blocks\.\d+\.conv1", "ConvDropoutNormReLU"),
    ("PrimusTiny", r"eva\.blocks\.\d+\.attn\.qkv", "matches no module"),
])
def test_a_target_pattern_that_cannot_be_used_names_the_key(arch, pattern, message):
    family = nets.resolve(arch).family
    net = _network(arch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"downstream\.lora\.target_modules\.{family}'.*{message}"):
        _attach(net, arch, target_modules={**DEFAULTS["target_modules"], family: pattern})
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # left as it was


def test_rank_zero_and_a_broken_pattern_fail_at_config_validation(downstream_root):
    with pytest.raises(ConfigError, match=r"downstream\.lora\.rank"):
        omb_config.validate({"downstream": {"lora": {"rank": 0}}}, omb_config.SCHEMA_PATH)
    config = omb_config.validate(
        {"downstream_registry": REGISTRY,
         "downstream": {"root": str(downstream_root), "schedules": ["lora"], "epochs": [10],
                        "lora": {"target_modules": {"cnn": "encoder\\.(stages"}}},
         "finetune": {"pretrained_runs": ["mae__ResEncTiny__demo"]}}, omb_config.SCHEMA_PATH)
    with pytest.raises(ConfigError, match=r"downstream\.lora\.target_modules\.cnn"):
        run_settings.run_names(config, ["mae__ResEncTiny__demo"])


def test_lora_runs_only_where_its_scope_says(downstream_root):
    def config(**scope):
        return omb_config.validate(
            {"downstream_registry": REGISTRY,
             "downstream": {"root": str(downstream_root), "schedules": ["frozen", "lora"], "epochs": [10],
                            "lora": scope},
             "finetune": {"scratch_architectures": []}}, omb_config.SCHEMA_PATH)

    pretrain = ["mae__ResEncTiny__demo", "mae__PrimusTiny__demo"]
    everywhere = run_settings.targets(config(), pretrain)
    assert len(everywhere) == 2 * 2 * 3  # runs x schedules x datasets (fold test)
    one = run_settings.targets(config(pretrained_runs=["mae__PrimusTiny__demo"], datasets=["DemoLesionT1"]), pretrain)
    lora_targets = [t for t in one if "__lora__" in t]
    assert lora_targets == ["results/downstream/DemoLesionT1/mae__PrimusTiny__demo__lora__10/fold_test/metrics.json"]
    assert len(one) == 2 * 3 + 1
    with pytest.raises(ConfigError, match=r"downstream\.lora\.pretrained_runs"):
        run_settings.run_names(config(pretrained_runs=["simclr__ResEncTiny__demo"]), pretrain)
    with pytest.raises(ConfigError, match=r"downstream\.lora\.datasets"):
        run_settings.targets(config(datasets=["NoSuchSet"]), pretrain)
    # the adapters' settings are in the records of lora runs only (a change re-runs those alone)
    s = run_settings.resolve(config(), CLS, "mae__ResEncTiny__demo__lora__10", "test", split="x.json",
                             pretrained_checkpoint="c.pt")
    assert s.schedule_config["lora"] == {k: DEFAULTS[k] for k in lora.ADAPTER_KEYS}
    s = run_settings.resolve(config(), CLS, "mae__ResEncTiny__demo__frozen__10", "test", split="x.json",
                             pretrained_checkpoint="c.pt")
    assert "lora" not in s.schedule_config


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_classification_with_lora_trains_adapters_stem_and_head_and_saves_a_plain_network(
        downstream_root, tmp_path, arch):
    ckpt = tmp_path / f"mae__{arch}__demo" / "checkpoint_final.pt"
    ckpt.parent.mkdir()
    pre = pretrained_checkpoint(ckpt, arch)
    run = f"mae__{arch}__demo__lora__2"
    s = _settings(downstream_root, tmp_path, CLS, run, ckpt, lora={"rank": 2})
    spec = load_registry(REGISTRY, downstream_root).get(CLS)
    torch.manual_seed(classification.derive_seed(s.seed, classification._TAG_INIT))  # the engine's initial net
    initial = classification.build_model(s, spec, run_settings.parse_run(run))[0].state_dict()
    assert classification.run(s) == "finished"
    out = tmp_path / "results" / "downstream" / CLS / run / "fold_test"
    tuned = torch.load(out / classification.FINAL, weights_only=True)["network_weights"]
    assert set(tuned) == set(initial)  # merged: a plain network of the architecture
    keys = classification._prefixed(nets.adaptation_keys(nets.resolve(arch).build(PATCH)), "backbone.")
    stem = [k for k in tuned if transfer._under(k, keys["key_to_stem"])]
    assert stem and any(not torch.equal(tuned[k], initial[k]) for k in stem)  # the stem trains
    assert not torch.equal(tuned["head.weight"], initial["head.weight"])
    encoder = [k for k in tuned if transfer._under(k, keys["key_to_encoder"]) or k == keys["key_to_lpe"]]
    plain = _network(arch)
    every_name = {}
    for name, module in plain.named_modules(remove_duplicate=False):
        every_name.setdefault(id(module), []).append(name)
    pattern = DEFAULTS["target_modules"][nets.resolve(arch).family]
    wrapped = {f"backbone.{alias}.weight" for name, module in plain.named_modules() if re.fullmatch(pattern, name)
               for alias in every_name[id(module)]}
    assert wrapped & set(encoder)
    for k in encoder:  # the encoder moved only where the adapters were merged in
        if k in wrapped:
            assert not torch.equal(tuned[k], pre[k.removeprefix("backbone.")]), k
        else:
            assert torch.equal(tuned[k], pre[k.removeprefix("backbone.")]), k
    doc = json.loads((out / "metrics.json").read_text())
    counted = doc["trained_parameters"]
    assert 0 < counted["share"] < 1 and counted["count"] < counted["total"]
    assert doc["schedule"] == "lora" and doc["cases"]


def test_the_table_shows_each_rows_trained_share(tmp_path):
    docs = {"frozen": 0.25, "lora": 0.04, "default": 1.0}
    paths = []
    for schedule, share in docs.items():
        for dataset in ("d1", "d2"):
            path = tmp_path / dataset / schedule / "fold_test" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({
                "dataset": dataset, "method": "mae", "architecture": "ResEncL", "schedule": schedule,
                "fold": "test", "summary": {"balanced_accuracy": 0.7},
                "trained_parameters": {"count": int(share * 1000), "total": 1000, "share": share}}))
            paths.append(path)
    collected = gather(paths)
    assert collected.trained == {("mae", "ResEncL", s): pytest.approx(v) for s, v in docs.items()}
    results = tmp_path / "results.csv"
    collected.long.to_csv(results, index=False)
    table = build_table(read_results(results), {}, trained=collected.trained)
    assert dict(zip(table.schedule, table.trained_share)) == pytest.approx(docs)
    markdown = render_markdown(table)
    assert "| Mean | Trained (%) | Avg. rank |" in markdown
    assert "| 4 |" in markdown and "| 25 |" in markdown and "| 100 |" in markdown
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "d1", "method": "mae", "architecture": "a", "schedule": "s", "fold": 0,
                               "summary": {"AUROC": 0.5}, "trained_parameters": {"share": 2}}))
    with pytest.raises(ValueError, match="trained_parameters"):
        gather([bad])
