"""Downstream tasks without the stream: labels, label fractions, heads, losses, clip averaging,
layer-wise lr decay."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from echofm.engine.downstream_config import DownstreamConfig
from echofm.engine.downstream.data import annotated_frames, label_fraction_patients
from echofm.engine.downstream.evaluation import video_predictions
from echofm.engine.downstream.features import FeatureSet
from echofm.engine.downstream.heads import SegDecoder, VideoHead
from echofm.engine.downstream.probe import train_video_head
from echofm.engine.downstream.tasks import make_task


def corpus(n_patients=200, seed=0):
    """Patients with 1-3 views each; PLAX is rare (3 patients), EF spread 15-75."""
    rng = np.random.default_rng(seed)
    metas = []
    for p in range(n_patients):
        views = ["PLAX"] if p < 3 else list(rng.choice(["A4C", "A2C", "PSAX"], size=rng.integers(1, 4), replace=False))
        ef, grade = float(rng.uniform(15, 75)), int(rng.integers(0, 3))
        for v in views:
            metas.append({"key": f"p{p}_{v}", "patient": f"p{p:03d}", "view": v,
                          "labels": {"ef": ef, "grade": grade}})
    return metas


def test_labels_from_json():
    cfg = DownstreamConfig(task="grade")
    task = make_task(cfg, [])
    assert task.classes == ["0", "1", "2"]
    assert task.target({"labels": {"grade": 2}}) == 2
    assert task.target({"labels": {"grade": 1.0}}) == 1       # a CSV float is class "1"
    assert task.target({"labels": {}}) is None
    ef = make_task(DownstreamConfig(task="ef"), [])
    assert ef.target({"labels": {"ef": "55.5"}}) == 55.5 and ef.target({"labels": {"ef": None}}) is None
    assert ef.stratum({"labels": {"ef": 40.0}}) == "reduced"
    view = make_task(DownstreamConfig(task="view"), corpus(20))
    assert view.classes == ["A2C", "A4C", "PLAX", "PSAX"]   # present in train, sorted
    assert view.target({"view": "PLAX"}) == 2 and view.target({"view": "A3C"}) is None
    with pytest.raises(ValueError, match="label 'view' has 1 class"):
        make_task(DownstreamConfig(task="view"), [{"view": "A4C"}])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_label_fraction_keeps_every_class_and_whole_patients(fraction):
    metas = corpus()
    patients = {m["patient"] for m in metas}
    for task_name in ("view", "grade", "ef"):
        task = make_task(DownstreamConfig(task=task_name), metas)
        keep = label_fraction_patients(metas, task.stratum, fraction, seed=7)
        assert keep <= patients
        assert keep == label_fraction_patients(metas, task.stratum, fraction, seed=7)   # seeded
        kept_classes = {task.stratum(m) for m in metas if m["patient"] in keep}
        assert kept_classes == {task.stratum(m) for m in metas}, (task_name, fraction)
        # about `fraction` of the patients: ceil per stratum plus at most one per class
        n_strata = len(kept_classes)
        assert len(keep) <= math.ceil(fraction * len(patients)) + 2 * n_strata
        assert len(keep) >= min(len(patients), math.floor(fraction * len(patients)))
    other = label_fraction_patients(metas, make_task(DownstreamConfig(task="view"), metas).stratum, 0.1, seed=8)
    assert other != label_fraction_patients(metas, make_task(DownstreamConfig(task="view"), metas).stratum, 0.1, seed=7)


def test_label_fraction_stratified_proportions():
    # 100 patients of grade 0, 50 of grade 1, 10 of grade 2 -> 10%: 10, 5, 1.
    metas = [{"patient": f"p{i}", "labels": {"grade": 0 if i < 100 else 1 if i < 150 else 2}} for i in range(160)]
    task = make_task(DownstreamConfig(task="grade"), metas)
    keep = label_fraction_patients(metas, task.stratum, 0.1, seed=0)
    counts = Counter(task.stratum(m) for m in metas if m["patient"] in keep)
    assert counts == {"0": 10, "1": 5, "2": 1}


def test_annotated_frames():
    fi = torch.tensor([4, 6, 8, 10, 0, 2])
    assert annotated_frames({"seg_frames": [0, 8, 9]}, fi).tolist() == [False, False, True, False, True, False]
    assert annotated_frames({}, fi).tolist() == [False] * 6


def test_linear_probe_recovers_a_linear_rule():
    # EF = 50 + 10 * x0 - 5 * x1: the trained head must match the least-squares fit (float64).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = 50 + 10 * x[:, 0] - 5 * x[:, 1]
    cfg = DownstreamConfig(task="ef", epochs=600, lr=1e-2, batch_size=64)
    task = make_task(cfg, [])
    head = train_video_head(task, x, y, cfg, wd=0.0)
    a = np.c_[x.double().numpy(), np.ones(64)]
    ref = a @ np.linalg.lstsq(a, y.double().numpy(), rcond=None)[0]
    pred = head(x).detach().double().numpy()[:, 0]
    assert np.abs(pred - ref).max() < 0.2
    # A separable 3-class rule: the classifier gets every training point right.
    cls = torch.stack([x[:, 0], x[:, 1], -x[:, 0] - x[:, 1]], 1).argmax(1)
    ccfg = DownstreamConfig(task="grade", epochs=300, lr=1e-2, batch_size=64)
    chead = train_video_head(make_task(ccfg, []), x, cls, ccfg, wd=1e-4)
    assert (chead(x).argmax(1) == cls).float().mean() > 0.95


def test_clip_average_per_video():
    # Two clips of video a, one of b: scores are the mean of the clip probabilities.
    cfg = DownstreamConfig(task="grade", bootstrap=0)
    task = make_task(cfg, [])
    head = VideoHead(3, 3)
    with torch.no_grad():
        head.net.weight.copy_(torch.eye(3))
        head.net.bias.zero_()
    feats = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]])
    metas = [{"key": "a", "patient": "p1", "labels": {"grade": 0}, "clip_index": 0},
             {"key": "a", "patient": "p1", "labels": {"grade": 0}, "clip_index": 1},
             {"key": "b", "patient": "p2", "labels": {"grade": 2}}]
    keys, y, scores, patients = video_predictions(task, head, FeatureSet(feats=feats, metas=metas))
    assert keys == ["a", "b"] and y.tolist() == [0, 2] and patients == ["p1", "p2"]
    p = torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]).softmax(1).mean(0).double().numpy()
    assert np.allclose(scores[0], p) and np.allclose(scores[1], torch.tensor([0, 0, 1.0]).softmax(0).numpy())
    res = task.evaluate(y, scores, patients)
    assert res["accuracy"]["value"] == 1.0  # tie on a broken by argmax -> class 0


def test_seg_decoder_and_loss_use_annotated_frames_only():
    cfg = DownstreamConfig(task="seg")
    task = make_task(cfg, [])
    mask = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.uint8)
    assert task.remap(mask).tolist() == [[0, 1, 0, 2, 0]]  # LV -> 1, LA -> 2, myocardium -> bg
    dec = SegDecoder(16, 3, hidden=8, tubelet=2, frame_size=32)
    out = dec(torch.randn(2, 4, 4, 4, 16))
    assert out.shape == (2, 3, 8, 32, 32)
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[:, :, 6], out[:, :, 7])  # one slice, 2 frames
    y = torch.randint(0, 3, (2, 8, 32, 32))
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[:, :3] = True
    base = task.loss(out, y, valid)
    y2 = y.clone()
    y2[:, 3:] = (y2[:, 3:] + 1) % 3  # change only frames without annotation
    assert torch.equal(task.loss(out, y2, valid), base)
    assert not torch.equal(task.loss(out, y2, torch.ones_like(valid)), task.loss(out, y, torch.ones_like(valid)))


def test_layer_decay_groups():
    from echofm.engine.downstream.finetune import DownstreamNet, layer_decay_groups, layer_id
    from echofm.engine.model import EchoFM, ModelConfig

    model = EchoFM(ModelConfig(preset="echofm_tiny", depth=2, embed_dim=32, num_heads=2,
                               decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1))
    net = DownstreamNet(model, VideoHead(96, 4), "tokens+cls+phase", grid=False)
    cfg = DownstreamConfig(backbone_lr=1e-3, layer_decay=0.5, lr=1e-2)
    groups = layer_decay_groups(net, cfg, 0.05)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert layer_id("patch_embed.weight", 2) == 0 and layer_id("blocks.1.attn.qkv.weight", 2) == 2
    named = dict(model.named_parameters())
    assert lr_of[id(named["patch_embed.weight"])] == pytest.approx(1e-3 * 0.5 ** 3)
    assert lr_of[id(named["blocks.0.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lr_of[id(named["blocks.1.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["norm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(net.head.net.weight)] == 1e-2
    assert wd_of[id(named["blocks.0.mlp.fc1.weight"])] == 0.05 and wd_of[id(named["cls_token"])] == 0.0
    # The MAE decoder is not used by encode: frozen, in no group.
    assert not named["decoder_pred.weight"].requires_grad and id(named["decoder_pred.weight"]) not in lr_of


def test_backbone_sources_give_the_same_weights(tmp_path):
    import dataclasses

    from echofm.engine.adapters import export_official
    from echofm.engine.config import Recipe
    from echofm.engine.downstream.backbone import load_backbone, resolve_kind
    from echofm.engine.model import ModelConfig

    small = ModelConfig(preset="echofm_tiny", depth=1, embed_dim=32, num_heads=2, decoder_embed_dim=16,
                        decoder_num_heads=2, decoder_depth=1)
    recipe = dataclasses.replace(Recipe(), model=small)
    model, info = load_backbone("random", recipe, seed=3)
    assert info["kind"] == "random" and load_backbone("random", recipe, seed=3)[1]["fingerprint"] == info["fingerprint"]
    assert load_backbone("random", recipe, seed=4)[1]["fingerprint"] != info["fingerprint"]
    model.save_pretrained(tmp_path / "export")
    assert resolve_kind(str(tmp_path / "export")) == ("export", str(tmp_path / "export"))
    assert load_backbone(str(tmp_path / "export"), recipe)[1]["fingerprint"] == info["fingerprint"]
    torch.save(export_official(model), tmp_path / "official.pth")
    loaded, oinfo = load_backbone(str(tmp_path / "official.pth"), recipe)
    assert oinfo["kind"] == "official" and oinfo["fingerprint"] == info["fingerprint"]
    (tmp_path / "ckpt").mkdir()
    assert resolve_kind(str(tmp_path / "ckpt"))[0] == "checkpoint"
    assert resolve_kind(f"official:{tmp_path / 'x'}") == ("official", str(tmp_path / "x"))


def test_paired_gap_by_hand():
    from echofm.engine.downstream.probe import paired_gap
    from probe_report import bar_verdict

    keys, pats = ["a", "b", "c", "d"], ["p1", "p1", "p2", "p3"]
    y = [0, 1, 2, 1]

    def res(view_pred, ef_pred):
        return {"view": {"accuracy": {"value": float(np.mean(np.equal(view_pred, y)))},
                         "per_video": {"key": keys, "patient": pats, "y": y, "pred": view_pred}},
                "ef": {"mae": {"value": float(np.mean(np.abs(np.subtract(ef_pred, [50, 60, 30, 40]))))},
                       "per_video": {"key": keys, "patient": pats, "y": [50, 60, 30, 40], "pred": ef_pred}}}

    results = {"pretrained": res([0, 1, 2, 1], [52, 58, 31, 40]), "random": res([0, 0, 0, 1], [55, 65, 35, 45])}
    g = paired_gap(results, "view", samples=200)
    assert g["value"] == pytest.approx(1.0 - 0.5)
    assert g["ci_low"] >= 0.0 and g["ci_high"] <= 1.0
    e = paired_gap(results, "ef", samples=200)
    # MAE random 5.0, pretrained 1.25 -> gap 3.75; every video improves, so every resample too.
    assert e["value"] == pytest.approx(3.75) and e["ci_low"] > 0
    assert "ef mae 1.250 vs 5.000, gap +3.750" in bar_verdict(results)
