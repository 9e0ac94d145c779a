"""Studies: the `study` field at ingest (DICOM StudyInstanceUID, a CSV `study` column, one
study per patient otherwise; keyed like patients), and `downstream.level: study` (one
prediction per study: mean logits / EF over the clips of the views the task uses), checked
on constructed numbers and end to end through finetune / evaluate."""
import csv
import hashlib
import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from echofm.engine.downstream_config import DownstreamConfig
from echofm.engine.downstream.evaluation import score_video_task, video_predictions
from echofm.engine.downstream.features import FeatureSet
from echofm.engine.downstream.heads import VideoHead
from echofm.engine.downstream.tasks import make_task
from echofm.loaders import ids
from echofm.loaders.errors import DataError

# ---------------------------------------------------------------- ingest


def test_dicom_study_instance_uid_becomes_the_clip_study(tmp_path):
    from echofm.loaders.ingest import IngestConfig, plan
    from echofm.loaders.sources.dicom import discover_files
    from echofm.loaders.synth.write import write_dicom

    video = np.zeros((4, 32, 32), np.uint8)
    for name, patient, study in (("a", "P1", "exam1"), ("b", "P1", "exam1"), ("c", "P1", "exam2"), ("d", "P2", "")):
        write_dicom(tmp_path / f"{name}.dcm", video, fps=30, patient=patient, study=study, name=name, seed=0)
    clips = discover_files(sorted(tmp_path.glob("*.dcm")), tmp_path, "dcm")
    import pydicom

    uids = [str(pydicom.dcmread(str(tmp_path / f"{n}.dcm")).StudyInstanceUID) for n in "abcd"]
    assert [c.study for c in clips] == uids and uids[0] == uids[1] != uids[2]
    key = b"k" * 32
    jobs = plan(clips, [hashlib.sha256(n.encode()).hexdigest() for n in "abcd"], IngestConfig(), [], key)
    studies = [j.study for j in jobs]
    assert studies[0] == studies[1] != studies[2] != studies[3]
    assert studies[0] == ids.study_hash(key, "dcm", clips[0].patient, uids[0])
    assert all(uid not in s and j.phash != s for uid, s, j in zip(uids, studies, jobs))


def test_source_without_a_study_id_gives_one_study_per_patient():
    from echofm.loaders.ingest import IngestConfig, plan
    from echofm.loaders.sources.base import Clip

    clips = [Clip(source=f"/x/{i}.avi", reader="video", dataset="camus", patient=p, clip_id=v)
             for i, (p, v) in enumerate([("p1", "2CH"), ("p1", "4CH"), ("p2", "2CH")])]
    jobs = plan(clips, [f"{i:064x}" for i in range(3)], IngestConfig(), [], b"k" * 32)
    assert jobs[0].study == jobs[1].study != jobs[2].study
    assert jobs[0].study == ids.study_hash(b"k" * 32, "camus", "p1", "")


def test_csv_study_column_reaches_json_and_sample_list(tiny_shards, synth_corpus):
    """The synthetic corpus's labels.csv `study` column: clips of one study share the json's
    keyed study hash, other studies differ, the study id never appears in clear."""
    from echofm.engine.downstream.data import list_samples
    from echofm.loaders.sources.base import safe_name

    rows = {hashlib.sha256((synth_corpus / r["file"]).read_bytes()).hexdigest(): r
            for r in csv.DictReader(open(synth_corpus / "labels.csv"))}
    key, _ = ids.load_key(ids.default_key_path(tiny_shards), create=False)
    ds = safe_name(synth_corpus.resolve().name)
    by_study = defaultdict(set)
    for m in list_samples(tiny_shards, "all"):
        r = rows[m["source_sha256"]]
        assert m["study"] == ids.study_hash(key, ds, r["patient"], r["study"])
        assert r["study"] not in json.dumps(m) and "study" not in m["labels"]
        by_study[r["study"]].add(m["study"])
    assert all(len(v) == 1 for v in by_study.values())
    assert len({next(iter(v)) for v in by_study.values()}) == len(by_study)
    assert any(len([1 for r in rows.values() if r["study"] == s]) > 1 for s in by_study)  # a multi-view study
    sidecar = [json.loads(x) for p in tiny_shards.glob("*.samples.jsonl") for x in p.read_text().splitlines()]
    assert sidecar and all(len(s["study"]) == 16 for s in sidecar)


# ---------------------------------------------------------------- level: study


def _metas():
    """Study s1: video a (2 A4C clips), video b (1 PSAX clip); study s2: video c (1 A4C clip)."""
    m = lambda key, study, view, ef, grade, patient: {  # noqa: E731
        "key": key, "study": study, "view": view, "patient": patient, "labels": {"ef": ef, "grade": grade}}
    return [m("a", "s1", "A4C", 40.0, 1, "p1"), m("a", "s1", "A4C", 40.0, 1, "p1"),
            m("b", "s1", "PSAX", 40.0, 1, "p1"), m("c", "s2", "A4C", 60.0, 0, "p2")]


def _identity(dim):
    head = VideoHead(dim, dim)
    with torch.no_grad():
        head.net.weight.copy_(torch.eye(dim))
        head.net.bias.zero_()
    return head


FEATS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 6.0], [1.0, 0.0, 0.0]])


def test_study_pools_the_mean_logits_of_the_views_it_uses(tmp_path):
    cfg = DownstreamConfig(task="grade", level="study", views=["A4C"], bootstrap=0)
    task = make_task(cfg, [])
    keys, y, scores, patients = video_predictions(task, _identity(3), FeatureSet(feats=FEATS, metas=_metas()))
    assert keys == ["s1", "s2"] and y.tolist() == [1, 0] and patients == ["p1", "p2"]
    # s1: the two A4C clips of a (b is PSAX: left out); mean of logits, then softmax.
    np.testing.assert_allclose(scores[0], torch.tensor([1.0, 2.0, 0.0]).softmax(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores[1], torch.tensor([1.0, 0.0, 0.0]).softmax(0).numpy(), rtol=1e-6)
    # Every view: b's clip joins s1's mean.
    task_all = make_task(DownstreamConfig(task="grade", level="study", bootstrap=0), [])
    _, _, s_all, _ = video_predictions(task_all, _identity(3), FeatureSet(feats=FEATS, metas=_metas()))
    np.testing.assert_allclose(s_all[0], torch.tensor([2 / 3, 4 / 3, 2.0]).softmax(0).numpy(), rtol=1e-6)
    res = score_video_task(task, _identity(3), FeatureSet(feats=FEATS, metas=_metas()),
                           csv_path=tmp_path / "p.csv")
    assert res["studies"] == 2 and res["videos"] == 2 and res["clips"] == 3 and res["accuracy"]["value"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [(r["study"], r["patient"], r["label"], r["pred"]) for r in rows] == [("s1", "p1", "1", "1"),
                                                                                ("s2", "p2", "0", "0")]


def test_study_ef_is_the_mean_over_its_clips():
    task = make_task(DownstreamConfig(task="ef", level="study", bootstrap=0), [])
    head = VideoHead(3, 1)
    with torch.no_grad():
        head.net.weight.copy_(torch.tensor([[10.0, 5.0, 1.0]]))
        head.net.bias.fill_(30.0)
    keys, y, scores, _ = video_predictions(task, head, FeatureSet(feats=FEATS, metas=_metas()))
    # clip EFs: 50, 50, 36 (s1) and 40 (s2)
    assert keys == ["s1", "s2"] and y.tolist() == [40.0, 60.0]
    np.testing.assert_allclose(scores[:, 0], [(50 + 50 + 36) / 3, 40.0], rtol=1e-6)
    res = task.evaluate(y, scores, ["p1", "p2"], bootstrap=0)
    assert res["mae"]["value"] == pytest.approx((abs(136 / 3 - 40) + 20) / 2)


def test_study_level_refusals():
    metas = _metas()
    metas[2]["labels"]["grade"] = 2  # b disagrees with a inside s1
    task = make_task(DownstreamConfig(task="grade", level="study", bootstrap=0), [])
    with pytest.raises(DataError, match="study s1: its videos disagree"):
        video_predictions(task, _identity(3), FeatureSet(feats=FEATS, metas=metas))
    old = [{k: v for k, v in m.items() if k != "study"} for m in _metas()]
    with pytest.raises(DataError, match="no 'study' in its json"):
        video_predictions(task, _identity(3), FeatureSet(feats=FEATS, metas=old))
    with pytest.raises(ValueError, match="task 'view' is per video"):
        DownstreamConfig(task="view", level="study").validate()


def _study_recipe(shards, out, *extra):
    from echofm.engine.config import load_recipe

    return load_recipe("recipes/downstream/synthetic_ef.yaml", [
        f"data.shards={shards}", "downstream.backbone=random", f"downstream.out_dir={out}",
        "downstream.bootstrap=20", "downstream.train_clips=1", "downstream.test_clips=2", "downstream.level=study",
        "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_num_heads=2", "model.decoder_depth=1", *extra])


@pytest.mark.parametrize("mode", ["probe", "finetune"])
def test_finetune_and_evaluate_give_one_prediction_per_study(tiny_shards, tmp_path, mode):
    from echofm.engine.downstream.data import list_samples
    from echofm.engine.downstream.run import evaluate, load_run_recipe, run

    extra = ["downstream.epochs=20"] if mode == "probe" else [
        "downstream.mode=finetune", "downstream.epochs=1", "data.batch_size=4"]
    r = _study_recipe(tiny_shards, tmp_path, *extra)
    res = run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    ev = evaluate(load_run_recipe(run_dir), run_dir, log=lambda *_: None)
    assert ev["metrics"] == res["metrics"]
    for split, m in res["metrics"].items():
        studies = {s["study"] for s in list_samples(tiny_shards, split)}
        for prefix in ("", "evaluate_"):
            rows = list(csv.DictReader(open(run_dir / f"{prefix}{split}_predictions.csv")))
            assert sorted(r["study"] for r in rows) == sorted(studies)  # one row per study
        assert m["studies"] == len(studies) and m["videos"] == len(list_samples(tiny_shards, split))
        y = np.array([float(x["label"]) for x in rows])
        p = np.array([float(x["pred"]) for x in rows])
        assert m["mae"]["value"] == pytest.approx(np.abs(p - y).mean(), abs=1e-5)
