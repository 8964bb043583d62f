"""Fine-tuning schedules: lr at chosen steps equals the closed form, freezing follows the phases."""

from __future__ import annotations

import math

import pytest

from openmind_bench.downstream.schedules import (
    GROUPS,
    ScheduleError,
    build_schedule,
    family_of,
    peak_lr,
    schedule_for_run,
    warmup_for,
)

P = 1e-3  # pre-trained CNN peak
E, S = 150, 250  # epochs, steps per epoch
D, W = 15, 15  # decoder and whole-net warm-up (public 150-epoch trainers)


def poly(peak, e, length):
    return peak * (1 - e / length) ** 0.9


def step(epoch, within=0):
    return epoch * S + within


def make(name, **kw):
    return build_schedule(name, E, P, S, decoder_warmup=D, whole_warmup=W, **kw)


def test_default_is_poly_from_the_peak_for_every_group():
    s = make("default")
    for e in (0, 1, 75, 149):
        for g in GROUPS:
            assert s.lr(g, step(e, 123)) == pytest.approx(poly(P, e, E), rel=1e-12)
    assert s.lr("encoder", 0) == P
    assert s.trainable(step(100)) == frozenset(GROUPS)


def test_frozen_trains_only_the_decoder_throughout():
    s = make("frozen")
    for e in (0, 14, 15, 80, 149):
        assert s.trainable(step(e)) == frozenset({"decoder"})
        assert s.lr("encoder", step(e)) == 0.0 and s.lr("stem", step(e)) == 0.0
    # the public frozen-encoder trainer: decoder warm-up over D, then poly over the rest
    assert s.lr("decoder", step(0)) == pytest.approx(P / D)
    assert s.lr("decoder", step(D - 1)) == pytest.approx(P)
    assert s.lr("decoder", step(80)) == pytest.approx(poly(P, 80 - D, E - D), rel=1e-12)


def test_warmup_is_linear_to_the_full_peak_then_poly():
    s = make("warmup")
    assert s.lr("encoder", step(0)) == pytest.approx(P / W)
    assert s.lr("stem", step(6, 249)) == pytest.approx(P * 7 / W)
    assert s.lr("decoder", step(W - 1, 249)) == pytest.approx(P)  # last warm-up step: the peak itself
    assert s.lr("encoder", step(W)) == pytest.approx(P)  # poly starts at the peak
    assert s.lr("encoder", step(W + 27)) == pytest.approx(poly(P, 27, E - W), rel=1e-12)
    assert s.lr("decoder", step(E - 1, 249)) == pytest.approx(poly(P, E - W - 1, E - W), rel=1e-12)
    assert all(s.trainable(step(e)) == frozenset(GROUPS) for e in (0, W, E - 1))


def test_valley_decreases_for_the_decoder_then_warms_the_whole_net():
    s = make("valley")
    for e in (0, 7, 14):
        assert s.trainable(step(e)) == frozenset({"decoder"})
        assert s.lr("decoder", step(e)) == pytest.approx(poly(P, e, D), rel=1e-12)
        assert s.lr("encoder", step(e)) == 0.0 and s.lr("stem", step(e)) == 0.0
    assert s.lr("decoder", step(14)) < s.lr("decoder", step(0))  # decreasing: the valley's first slope
    assert s.lr("encoder", step(D)) == pytest.approx(P / W)
    assert s.lr("stem", step(D + W - 1)) == pytest.approx(P)
    assert s.lr("encoder", step(D + W + 10)) == pytest.approx(poly(P, 10, E - D - W), rel=1e-12)
    assert s.trainable(step(D)) == frozenset(GROUPS)


def test_sawtooth_reaches_the_full_peak_in_both_warmups():
    s = make("sawtooth")
    up, down = D // 2, D - D // 2
    assert s.lr("decoder", step(0)) == pytest.approx(P / up)
    assert s.lr("decoder", step(up - 1)) == pytest.approx(P)
    assert s.lr("decoder", step(up)) == pytest.approx(P)  # decoder decay starts at the peak
    assert s.lr("decoder", step(up + 5)) == pytest.approx(poly(P, 5, down), rel=1e-12)
    for e in range(D):
        assert s.trainable(step(e)) == frozenset({"decoder"})
        assert s.lr("stem", step(e)) == 0.0  # stem frozen in the decoder warm-up (multi-channel rule)
    # whole-net warm-up: P (k + 1) / W, ending at the full peak, not the public trainer's half
    for k in (0, 4, W - 1):
        assert s.lr("encoder", step(D + k, 17)) == pytest.approx(P * (k + 1) / W)
    assert s.lr("encoder", step(D + W - 1)) == pytest.approx(P)
    assert s.lr("encoder", step(D + W - 1)) > 0.75 * P
    assert s.lr("encoder", step(D + W)) == pytest.approx(P)
    assert s.lr("decoder", step(E - 1)) == pytest.approx(poly(P, E - D - W - 1, E - D - W), rel=1e-12)
    assert s.phase_changes() == [step(up), step(D), step(D + W)]


def test_lr_changes_once_per_epoch_and_steps_are_bounded():
    s = make("sawtooth")
    assert s.lr("encoder", step(40, 0)) == s.lr("encoder", step(40, S - 1))
    with pytest.raises(ScheduleError, match="outside"):
        s.lr("encoder", E * S)
    with pytest.raises(ScheduleError, match="parameter group"):
        s.lr("head", 0)


def test_primus_and_scratch_peaks_and_primus_decoder_factor():
    assert peak_lr("cnn", True) == 1e-3 and peak_lr("cnn", False) == 1e-2
    assert peak_lr("transformer", True) == 1e-4 and peak_lr("transformer", False) == 3e-4
    with pytest.raises(ScheduleError, match="downstream.peak_lr.primus"):  # one family vocabulary: no aliases
        peak_lr("primus", False)
    # the families of openmind_bench.nets' presets, and name prefixes for others
    assert family_of("ResEncL") == "cnn" and family_of("PrimusTiny") == "transformer"
    assert family_of("resenc_l") == "cnn" and family_of("primus_m") == "transformer"
    with pytest.raises(ScheduleError, match="architecture 'swin': not a preset"):
        family_of("swin")
    s = schedule_for_run("sawtooth", "PrimusM", pretrained=True, epochs=150, steps_per_epoch=S)
    assert s.peak_lr == 1e-4
    assert s.lr("decoder", step(6)) == pytest.approx(1e-4 * 0.1)  # decoder phases at 0.1 x peak
    # Primus Sawtooth-150: decoder stage 15, whole-net warm-up 50 epochs reaching the full peak
    assert s.lr("encoder", step(15)) == pytest.approx(1e-4 / 50)
    assert s.lr("encoder", step(64)) == pytest.approx(1e-4)
    assert s.lr("encoder", step(65)) == pytest.approx(1e-4)
    scratch = schedule_for_run("default", "ResEncL", pretrained=False, epochs=1000, steps_per_epoch=S)
    assert scratch.lr("encoder", 0) == 1e-2
    assert warmup_for("cnn", 1000) == {"decoder": 50, "whole": 50, "decoder_lr_factor": 1.0}
    assert warmup_for("transformer", 1000)["decoder_lr_factor"] == 0.01


def test_warmup_lengths_from_config():
    config = {"warmup_epochs": {"cnn": {"4": {"decoder": 2, "whole": 1}}}, "peak_lr": {"cnn": {"pretrained": 5e-3}}}
    s = schedule_for_run("valley", "ResEncTiny", pretrained=True, epochs=4, steps_per_epoch=2, config=config)
    assert [p.epochs for p in s.phases] == [2, 1, 1]
    assert s.lr("decoder", 0) == 5e-3 and s.lr("encoder", 0) == 0.0
    assert s.lr("decoder", 2) == pytest.approx(5e-3 * (1 - 1 / 2) ** 0.9)
    assert s.lr("encoder", 4) == pytest.approx(5e-3)  # one-epoch warm-up: the peak at once
    assert s.lr("encoder", 6) == pytest.approx(5e-3)
    assert warmup_for("cnn", 40) == {"decoder": 4, "whole": 4, "decoder_lr_factor": 1.0}  # 10% fallback
    for epochs in (1, 2, 3, 5):  # very short runs (the demo) still leave the final phase an epoch
        w = warmup_for("cnn", epochs)
        s = build_schedule("sawtooth", epochs, P, 1, decoder_warmup=w["decoder"], whole_warmup=w["whole"])
        assert s.phases[-1].name == "train" and s.phases[-1].epochs >= 1


def test_warmups_longer_than_the_run_are_refused():
    with pytest.raises(ScheduleError, match="take 30 of 20 epochs"):
        build_schedule("sawtooth", 20, P, S, decoder_warmup=15, whole_warmup=15)
    with pytest.raises(ScheduleError, match="unknown fine-tuning schedule"):
        build_schedule("onecycle", E, P, S)
    # a warm-up of length 0 drops its phase
    s = build_schedule("warmup", 10, P, 1, whole_warmup=0)
    assert [p.name for p in s.phases] == ["train"] and s.lr("encoder", 0) == P


def test_custom_schedule_as_data():
    custom = {"decoder_then_all": [
        {"name": "dec", "trainable": ["decoder"], "curve": "linear_warmup", "epochs": "decoder"},
        {"name": "all", "trainable": "all", "curve": "poly", "epochs": "rest"},
    ]}
    s = build_schedule("decoder_then_all", 10, P, 1, decoder_warmup=4, custom=custom)
    assert s.lr("decoder", 3) == pytest.approx(P) and s.lr("encoder", 3) == 0.0
    assert s.lr("encoder", 4) == pytest.approx(P) and s.lr("stem", 9) == pytest.approx(poly(P, 5, 6))
    assert s.to_dict()["phases"][1] == {"name": "all", "first_epoch": 4, "epochs": 6,
                                        "trainable": ["decoder", "encoder", "stem"], "curve": "poly", "lr_factor": 1.0,
                                        "fresh_optimizer": True}  # the trained groups change
    with pytest.raises(ScheduleError, match="trainable"):
        build_schedule("bad", 10, P, 1, custom={"bad": [{"trainable": ["head"]}]})
    assert math.isclose(sum(p.epochs for p in s.phases), 10)


def test_classification_warm_starts_then_anneals_as_ssl3d_classification():
    # SSL3D_classification @848e22e, base_model.py CosineAnnealingLR_Warmstart with its data configs'
    # warmstart 20 over max_epochs 200 (T_max 200 - 20), stepped once per epoch: epoch e < 20 gets
    # peak * (e + 1) / 21, epoch 20 the peak, epoch 20 + k peak * (1 + cos(pi * k / 180)) / 2.
    peak, steps = 1e-4, 3
    s = build_schedule("cosine", 200, peak, steps, whole_warmup=20)
    assert [p.name for p in s.phases] == ["warmup", "train"] and all(p.trainable == frozenset(GROUPS) for p in s.phases)
    assert s.lr("encoder", 0) == pytest.approx(4.761904761904762e-06, rel=1e-12)  # 1e-4 / 21
    assert s.lr("decoder", 19 * steps + 2) == pytest.approx(9.523809523809524e-05, rel=1e-12)  # 1e-4 * 20 / 21
    assert s.lr("stem", 20 * steps) == pytest.approx(1e-4, rel=1e-12)
    assert s.lr("encoder", 110 * steps) == pytest.approx(0.5e-4, rel=1e-12)  # k = 90, half way
    assert s.lr("stem", 199 * steps + 2) == pytest.approx(7.615242180436521e-09, rel=1e-9)  # k = 179 of 180
    # no warm-start: cosine from the peak over all epochs
    s = build_schedule("cosine", 400, peak, steps)
    assert [p.name for p in s.phases] == ["train"] and s.lr("encoder", 0) == pytest.approx(peak)
    assert s.lr("stem", 399 * steps + 2) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 399 / 400)))


# The public trainers, read on TaWald/nnUNet branch nnssl_finetuning_inclusion (91b1e049):
# pretraining/pretrainedTrainer.py:36-41 (CNN 1e-3 / scratch 1e-2), :497-503 (Primus 1e-4 / 3e-4),
# :599 / :615 (150-epoch warm-up 15), :38 / :500 (1000-epoch warm-up 50);
# pretraining/sawtooth_trainer.py:129-131 (CNN-150: 15 / 15), :22-24 (CNN-1000: 50 / 50),
# :149-152 (Primus-1000: factor 0.01, 50 / 50), :261-264 (Primus-150: factor 0.1, 15 / 50);
# probing_dev's pretraining/frozen_enc_trainer.py:27-30 (Primus frozen: decoder warm-up 15 of 150).
PUBLIC = {  # (family, epochs): (decoder, whole-net warm-up, sawtooth's whole-net warm-up, decoder factor)
    ("cnn", 150): (15, 15, 15, 1.0),
    ("cnn", 1000): (50, 50, 50, 1.0),
    ("transformer", 150): (15, 15, 50, 0.1),
    ("transformer", 1000): (50, 50, 50, 0.01),
}


@pytest.mark.parametrize("family, epochs", list(PUBLIC))
def test_schema_tables_are_the_public_trainers(family, epochs):
    d, w, ws, f = PUBLIC[(family, epochs)]
    warm = warmup_for(family, epochs)
    assert (warm["decoder"], warm["whole"], warm.get("sawtooth_whole", warm["whole"]), warm["decoder_lr_factor"]) == (
        d, w, ws, f)
    peak = peak_lr(family, True)
    assert peak == {"cnn": 1e-3, "transformer": 1e-4}[family]
    assert peak_lr(family, False) == {"cnn": 1e-2, "transformer": 3e-4}[family]
    s = schedule_for_run("sawtooth", "ResEncL" if family == "cnn" else "PrimusM", True, epochs, steps_per_epoch=1)
    h = d // 2
    for e in range(epochs):  # Lin_incr / PolyLRScheduler_offset / Lin_incr_offset as the trainer steps them
        if e < h:
            expected = peak * f / h * (1 + e)
        elif e < d:
            expected = peak * f * (1 - (e - h) / (d - h)) ** 0.9
        elif e < d + ws:
            expected = peak / ws * (1 + e - d)
        else:
            expected = peak * (1 - (e - d - ws) / (epochs - d - ws)) ** 0.9
        assert s.lr("encoder" if e >= d else "decoder", e) == pytest.approx(expected, rel=1e-12), e
    frozen = schedule_for_run("frozen", "PrimusM", True, 150, steps_per_epoch=1)
    assert [frozen.lr("decoder", e) for e in (0, 14, 15)] == pytest.approx([1e-4 / 15, 1e-4, 1e-4])
