"""Sector detection: against the synthetic fan (known mask), overlays excluded, crop/resize maps."""
import numpy as np
import pytest

from echofm.loaders.sector import Sector, crop_resize, crop_resize_seg, detect_sector
from echofm.loaders.synth import ClipSpec, render_clip


def _clip(view: str, h: int, w: int, seed: int):
    spec = ClipSpec(name="t", patient="p", view=view, ef=50.0, grade=1, period=16 + seed, ed_offset=2,
                    systole=6, fps=30, frames=40, height=h, width=w, container="mp4", split="train",
                    seed=seed)
    r = render_clip(spec)
    return np.repeat(r.video[..., None], 3, -1), r


@pytest.mark.parametrize("view,h,w", [("A4C", 96, 128), ("PSAX", 160, 144), ("PLAX", 120, 120)])
def test_sector_matches_synthetic_fan_and_excludes_overlays(view, h, w):
    frames, r = _clip(view, h, w, seed=h % 7)
    s = detect_sector(frames)
    assert s is not None
    iou = (s.mask & r.sector).sum() / (s.mask | r.sector).sum()
    assert iou > 0.95, iou
    assert r.overlay.sum() > 100 and not (s.mask & r.overlay).any()  # text + ECG all outside
    out = crop_resize(frames, s, 64)
    assert out.shape == (40, 64, 64, 3) and out.dtype == np.uint8


def test_static_or_blank_video_has_no_sector():
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 255, (1, 64, 80, 3), dtype=np.uint8), 12, axis=0)
    assert detect_sector(still) is None
    assert detect_sector(np.zeros((12, 64, 80, 3), np.uint8)) is None


def test_crop_resize_blanks_outside_and_maps_geometry():
    # A 40x80 frame, sector = a 20x40 block at rows 10..30, cols 20..60 (its box); the crop is
    # padded to 40x40 (10 rows above and below) and resized 1:1 to 40.
    frames = np.full((3, 40, 80, 3), 200, np.uint8)
    mask = np.zeros((40, 80), bool)
    mask[10:30, 20:60] = True
    s = Sector(mask=mask, box=(10, 30, 20, 60))
    out = crop_resize(frames, s, 40)
    assert out.shape == (3, 40, 40, 3)
    assert (out[:, 10:30] == 200).all() and (out[:, :10] == 0).all() and (out[:, 30:] == 0).all()
    seg = np.zeros((3, 40, 80), np.uint8)
    seg[:, 12:14, 22:24] = 3
    segr = crop_resize_seg(seg, s, 80)  # 2x nearest: a 2x2 label block becomes 4x4, labels kept
    assert segr.shape == (3, 80, 80) and set(np.unique(segr)) == {0, 3}
    assert (segr[0] == 3).sum() == 16 and segr[0, 24:28, 4:8].min() == 3


@pytest.mark.parametrize("view,h,w", [("A4C", 138, 146), ("PLAX", 160, 210)])
def test_mjpeg_artefacts_do_not_pull_overlays_into_the_sector(tmp_path, view, h, w):
    # Regression: at a 3% relative threshold, MJPEG's flickering blocks around the text and
    # the ECG trace counted as moving, and the ECG band stayed in AVI clips' crops.
    import av

    from echofm.loaders.synth import write_video

    _, r = _clip(view, h, w, seed=5)
    path = tmp_path / "clip.avi"
    write_video(path, r.video, 30, "avi")
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    s = detect_sector(frames)
    assert s is not None and not (s.mask & r.overlay).any()
    assert (s.mask & r.sector).sum() / (s.mask | r.sector).sum() > 0.9
