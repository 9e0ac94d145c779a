"""Synthetic echocardiography corpus with exact ground truth (`echofm synth`).

Each clip is a phantom of one view (A4C, A2C, PLAX, PSAX) drawn inside a fan-shaped
ultrasound sector with speckle on a black background; burned-in text (top corners) and an
ECG trace with a moving cursor (a thin line in a band below the fan) lie outside the
sector, as on a scanner screen. Only chamber geometry, valve leaflets, the per-frame noise
and the ECG cursor change from frame to frame.

Ground truth, per clip:
- cardiac cycle: integer period P (frames) and ED offset; the cycle curve c(t) is exactly 1
  at end-diastole (ED, frames t = ed_offset + kP) and exactly 0 at end-systole (ES,
  `systole` frames after ED); the LV shrinks with 1 - c, the LA grows.
- EF: the LV cavity volume is defined from its mask area as V = A**1.5 (area-length family:
  similar shapes have V proportional to A^(3/2)), so EF = 100 * (1 - (A_es / A_ed)**1.5)
  of the written masks (tests/test_synth.py recomputes it). The geometry is built so the
  analytic areas give the labelled EF exactly; rasterisation moves it by well under a point.
- masks: uint8 [F, H, W], 0 background, 1 LV cavity, 2 LV myocardium, 3 LA (CAMUS).
- valve grade 0/1/2 (none/mild/significant): leaflets get thicker, brighter and open less;
  grade 2 adds calcified nodules at the hinges.
- patient / study: a patient has one or more studies, a study several views with one EF
  and grade; splits are by patient.

Modules, one job each (data flows down the list):
    plan.py      SynthConfig -> one ClipSpec per clip (patients, studies, views, labels)
    overlays.py  burned-in text and ECG trace outside the fan
    phantom.py   ClipSpec -> pixels and masks (sector, speckle, pose, chambers, cycle)
    write.py     pixels -> MP4 / AVI / DICOM files
    disk.py      make_corpus (plan -> render -> write), labels.csv read / write, summary

Everything is a function of (config, seed): the clip seeds come from
`numpy.random.SeedSequence([seed, index])`, so worker count does not change output.
"""
from .disk import LABEL_COLUMNS, make_corpus, read_labels, summarize
from .phantom import LA, LV_CAVITY, LV_MYO, RenderedClip, cycle, render_clip, sector_geometry, sector_mask
from .plan import CONTAINERS, VIEWS, ClipSpec, SynthConfig, plan_corpus
from .write import write_dicom, write_video

__all__ = ["CONTAINERS", "LABEL_COLUMNS", "LA", "LV_CAVITY", "LV_MYO", "VIEWS", "ClipSpec", "RenderedClip",
           "SynthConfig", "cycle", "make_corpus", "plan_corpus", "read_labels", "render_clip", "sector_geometry",
           "sector_mask", "summarize", "write_dicom", "write_video"]
