"""Source adapters on fixture trees in the real layouts: EchoNet-Dynamic, CAMUS, DICOM
(pydicom's real A4C cine with burned-in text), video folders, CSV manifests."""
import csv
import io
import json
import shutil
import warnings

import numpy as np
import pytest

from echofm.loaders.ingest import IngestConfig, ingest
from echofm.loaders.sector import Sector, crop_resize, crop_resize_seg, detect_sector
from echofm.loaders.shard_verify import verify
from echofm.loaders.shards import iter_tar_samples, read_manifest
from echofm.loaders.sources import discover
from echofm.loaders.synth import ClipSpec, render_clip, write_video
from decoding import decode_bytes

SIZE = 64


def _render(view, h, w, frames, seed, period=14):
    spec = ClipSpec(name=f"c{seed}", patient=f"p{seed}", view=view, ef=55.0, grade=0, period=period,
                    ed_offset=2, systole=5, fps=50, frames=frames, height=h, width=w, container="avi",
                    split="train", seed=seed)
    return render_clip(spec)


def _samples(out):
    m = read_manifest(out)
    return m, {k: c for s in m["shards"] for k, c in iter_tar_samples(out / s["tar"])}


def _ingest(src, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended here
        return ingest([src], out, IngestConfig(size=SIZE, progress=False, **kw))


def _box(meta):
    return Sector(mask=np.zeros((1, 1), bool), box=tuple(meta["sector_box"]))


def _chords(mask):
    """EchoNet-style tracing rows for a binary LV mask: long axis first, then one chord per row."""
    ys = np.flatnonzero(mask.any(1))
    xc = float(np.mean(np.nonzero(mask)[1]))
    rows = [(xc, float(ys[0]), xc, float(ys[-1]))]
    for y in ys:
        xs = np.flatnonzero(mask[y])
        rows.append((float(xs[0]), float(y), float(xs[-1]), float(y)))
    return rows


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_echonet_layout_ingests_with_labels_and_lv_masks(tmp_path):
    root = tmp_path / "EchoNet-Dynamic"
    (root / "Videos").mkdir(parents=True)
    splits = ["TRAIN", "VAL", "TEST"]
    truth = {}
    with open(root / "FileList.csv", "w", newline="") as fl, open(root / "VolumeTracings.csv", "w", newline="") as vt:
        f = csv.writer(fl)
        f.writerow(["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"])
        v = csv.writer(vt)
        v.writerow(["FileName", "X1", "Y1", "X2", "Y2", "Frame"])
        for i in range(3):
            name = f"0X{1000 + i:04X}ABCDEF"
            r = _render("A4C", 112, 112, 40, seed=i)
            write_video(root / "Videos" / f"{name}.avi", r.video, 50, "avi")
            ed, es = r.ed[0], r.es[0]
            f.writerow([name, 60.0 + i, 30.5, 76.25, 112, 112, 50, 40, splits[i]])
            for t in (es, ed):  # the real file lists the ES tracing first for some videos
                for row in _chords(r.masks[t] == 1):
                    v.writerow([f"{name}.avi", *row, t])
            truth[name] = (r, ed, es, i)
    out = tmp_path / "shards"
    rep = _ingest(root, out)
    assert (rep.added, rep.rejected) == (3, 0)
    m, samples = _samples(out)
    assert m["splits"] == {"train": 1, "val": 1, "test": 1}
    assert verify(out).ok
    by_ef = {json.loads(c["json"])["labels"]["ef"]: c for c in samples.values()}
    for name, (r, ed, es, i) in truth.items():
        c = by_ef[60.0 + i]
        meta = json.loads(c["json"])
        assert meta["split"] == ["train", "val", "test"][i] and meta["fps"] == 50.0 and meta["view"] == "A4C"
        assert meta["labels"] == {"ef": 60.0 + i, "esv": 30.5, "edv": 76.25, "ed_true": [ed], "es_true": [es]}
        assert meta["seg_frames"] == sorted([ed, es])
        assert name not in json.dumps(meta) and all(name not in k for k in samples)
        seg = np.load(io.BytesIO(c["seg.npy"]))
        assert seg.shape == (meta["frames"], SIZE, SIZE) and set(np.unique(seg)) <= {0, 1}
        # the polygon of the chord ends reproduces the traced LV through the same crop/resize
        for t in (ed, es):
            ref = crop_resize_seg((r.masks == 1).astype(np.uint8), _box(meta), SIZE)[t]
            assert _iou(seg[t] == 1, ref == 1) > 0.85
        others = [t for t in range(meta["frames"]) if t not in (ed, es)]
        assert seg[others].max() == 0

    # --fps 25 halves the frames; the traced frames move to the nearest output frame
    out25 = tmp_path / "shards25"
    _ingest(root, out25, fps=25.0)
    _, samples25 = _samples(out25)
    for c in samples25.values():
        meta = json.loads(c["json"])
        r, ed, es, i = truth[next(n for n, v in truth.items() if 60.0 + v[3] == meta["labels"]["ef"])]
        assert meta["frames"] == 20 and meta["fps"] == 25.0
        assert meta["seg_frames"] == sorted({int(np.floor(ed / 2 + 0.5)), int(np.floor(es / 2 + 0.5))})
        seg = np.load(io.BytesIO(c["seg.npy"]))
        ref = crop_resize_seg((r.masks == 1).astype(np.uint8), _box(meta), SIZE)[ed]
        assert _iou(seg[int(np.floor(ed / 2 + 0.5))] == 1, ref == 1) > 0.85


def _write_nifti(path, vol_fhw):
    import nibabel as nib

    # CAMUS volumes are (x, y, t) = (width, height, frames) in nibabel's voxel order
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol_fhw.transpose(2, 1, 0)), np.eye(4)), str(path))


def test_camus_layout_axis_order_labels_and_masks(tmp_path):
    root = tmp_path / "CAMUS"
    rendered = {}
    for p in (1, 2):
        pdir = root / f"patient{p:04d}"
        pdir.mkdir(parents=True)
        for ch, view in (("2CH", "A2C"), ("4CH", "A4C")):
            r = _render(view, 96, 80, 18, seed=10 * p + len(ch), period=30)  # non-square: catches a transpose
            _write_nifti(pdir / f"patient{p:04d}_{ch}_half_sequence.nii.gz", r.video)
            _write_nifti(pdir / f"patient{p:04d}_{ch}_half_sequence_gt.nii.gz", r.masks)
            (pdir / f"Info_{ch}.cfg").write_text(
                f"ED: 1\nES: 12\nNbFrame: 18\nSex: F\nAge: 61\nImageQuality: {'Good' if p == 1 else 'Poor'}\n"
                f"EF: {40 + p}.5\n")
            rendered[(p, view)] = r
    clips = discover(root).clips
    assert len(clips) == 4 and {c.reader for c in clips} == {"nifti"}
    out = tmp_path / "shards"
    rep = _ingest(root, out)
    assert (rep.added, rep.rejected) == (4, 0)
    _, samples = _samples(out)
    splits = {}
    for c in samples.values():
        meta = json.loads(c["json"])
        p = 1 if meta["labels"]["image_quality"] == "Good" else 2
        r = rendered[(p, meta["view"])]
        assert meta["labels"] == {"ef": 40.5 + p, "image_quality": "Good" if p == 1 else "Poor",
                                  "ed_true": [0], "es_true": [11]}
        assert meta["source_size"] == [96, 80] and meta["fps_assumed"] and meta["frames"] == 18
        seg = np.load(io.BytesIO(c["seg.npy"]))
        np.testing.assert_array_equal(seg, crop_resize_seg(r.masks, _box(meta), SIZE))
        assert meta["seg_frames"] == list(range(18))
        rgb = np.repeat(r.video[..., None], 3, -1)
        ref = crop_resize(rgb, detect_sector(rgb), SIZE).astype(np.float32)
        assert np.abs(decode_bytes(c["webm"]).astype(np.float32) - ref).mean() < 6.0
        splits.setdefault(meta["patient"], set()).add(meta["split"])
    assert len(splits) == 2 and all(len(s) == 1 for s in splits.values())


def test_pydicom_cine_ingests_and_burned_in_text_is_gone(tmp_path):
    from pydicom import examples

    src = tmp_path / "dicom"
    src.mkdir()
    shutil.copy(examples.get_path("ybr_color"), src / "IM0001.dcm")
    out = tmp_path / "shards"
    rep = _ingest(src, out)
    assert (rep.added, rep.rejected) == (1, 0)
    _, samples = _samples(out)
    ((key, c),) = samples.items()
    meta = json.loads(c["json"])
    assert meta["frames"] == 30 and abs(meta["fps"] - 30.0) < 0.01 and meta["source_size"] == [240, 320]
    blob = json.dumps(meta) + key
    assert "PLA" not in blob and '"204"' not in blob and meta["patient"] != "204"  # PatientName / PatientID

    from echofm.loaders.sources.dicom import read_dicom

    full = read_dicom(src / "IM0001.dcm")  # streamed frame by frame, at the source size
    assert full.frames.shape == (30, 240, 320, 3) and full.scale == 1.0 and full.source_size == (240, 320)
    dec = read_dicom(src / "IM0001.dcm", short_side=IngestConfig(size=SIZE).keep_side)  # what ingest keeps
    assert dec.frames.shape == (30, 192, 256, 3) and dec.scale == pytest.approx(192 / 240)
    frames = full.frames
    gray = frames.astype(np.float32).mean(-1)
    text = (gray.std(0) < 0.5) & (gray[0] > 60)  # static bright pixels: burned-in text, icons
    assert text.sum() > 500
    sector = detect_sector(frames)
    # the json's box is in source pixels, measured on the shrunk frames: within 2% of the side
    assert max(abs(a - b) for a, b in zip(sector.box, meta["sector_box"])) <= 0.02 * 320
    assert not (sector.mask & text).any()
    # paint only the text, run the same crop: nothing of it survives
    only_text = np.zeros_like(frames)
    only_text[:, text] = 255
    assert crop_resize(only_text, sector, SIZE).max() == 0
    # and the shard's video is the blanked, cropped cine
    ref = crop_resize(frames, sector, SIZE).astype(np.float32)
    assert np.abs(decode_bytes(c["webm"]).astype(np.float32) - ref).mean() < 4.0


def test_video_folder_and_csv_manifest(tmp_path, synth_corpus):
    d = tmp_path / "vids"
    (d / "sub").mkdir(parents=True)
    r = _render("PLAX", 64, 64, 12, seed=3)
    write_video(d / "a.mp4", r.video, 25, "mp4")
    write_video(d / "sub" / "b.avi", r.video, 25, "avi")
    (d / "notes.txt").write_text("not a video")
    found = discover(d)
    clips = found.clips
    assert sorted(c.rel_source for c in clips) == ["a.mp4", "sub/b.avi"]
    assert {c.patient for c in clips} == {"a", "b"} and {c.reader for c in clips} == {"video"}
    assert found.ignored == {} and found.renamed == []  # notes.txt: a text file, quietly not a clip

    rows = list(csv.DictReader(open(synth_corpus / "labels.csv")))
    found = discover(synth_corpus)
    assert found.unlisted == []  # every video of the synthetic corpus is in its labels.csv
    clips = found.clips
    assert len(clips) == len(rows)
    for c, row in zip(clips, rows):
        assert c.labels["ef"] == pytest.approx(float(row["ef"])) and c.labels["grade"] == int(row["grade"])
        assert c.labels["period_true"] == int(row["period"])
        assert c.labels["ed_true"] == [int(x) for x in row["ed"].split(";")]
        assert c.view == row["view"] and c.split == row["split"] and c.patient == row["patient"]
        assert c.reader == {"mp4": "video", "avi": "video", "dcm": "dicom"}[row["file"].rsplit(".", 1)[1]]
        assert c.seg is not None and c.seg.path.endswith(row["mask"])


def test_dicom_pixel_and_timing_conversions():
    from echofm.loaders.sources.dicom import dicom_fps, to_frames

    mono1 = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4) * 1000  # 16-bit, inverted grey
    out = to_frames(mono1, {"PhotometricInterpretation": "MONOCHROME1", "SamplesPerPixel": 1, "NumberOfFrames": 2})
    assert out.shape == (2, 4, 4) and out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[1, 3, 3] == 0 and (np.diff(out.ravel().astype(int)) <= 0).all()
    single_rgb = np.full((4, 5, 3), 7, np.uint8)
    assert to_frames(single_rgb, {"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}).shape == (1, 4, 5, 3)
    assert dicom_fps({"FrameTime": "20"}) == 50.0
    assert dicom_fps({"CineRate": 25}) == 25.0 and dicom_fps({"RecommendedDisplayFrameRate": 60}) == 60.0
    assert dicom_fps({"FrameTimeVector": [0, 40, 40, 40]}) == 25.0 and dicom_fps({}) == 0.0
