"""Downstream run config: the `downstream:` section of a recipe (README: Downstream).

The recipe's `data:` section says where the shards are and how clips are cut; `model:`
gives the architecture of a random-init backbone. This section says which task, which
backbone, which mode (linear probe or full fine-tune), how many training patients, and
how the result is measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TASKS = ("view", "ef", "grade", "seg")
FEATURES = ("tokens", "cls", "phase", "dynamics")
LEVELS = ("video", "study")


@dataclass(kw_only=True, slots=True)
class DownstreamConfig:
    task: Literal["view", "ef", "grade", "seg"] = "view"
    """view: view identification; ef: EF regression; grade: valve-disease grade (3-class);
    seg: LV / LA segmentation per frame."""
    mode: Literal["probe", "finetune"] = "probe"
    """probe: frozen backbone, features cached once, head only; finetune: whole network."""
    backbone: str = "random"
    """'random' (seeded init of the recipe's `model:`), an `echofm export` dir, a training
    checkpoint dir, an official EchoFM .pth or a VideoMAE .pth (told apart by their keys;
    VideoMAE's clip length, frame size and heads from the recipe's `model:`); prefix
    'export:', 'checkpoint:', 'official:' or 'videomae:' to force the kind. The recipe's `model:` must describe the backbone's encoder
    (a mismatch is an error naming each key)."""
    level: Literal["video", "study"] = "video"
    """What one prediction is: 'video' (a sample: its clips' scores averaged) or 'study' (an
    exam, the json's `study`: the mean logits (view-free tasks: grade) or mean EF over the
    clips of all the study's videos the task uses, see `views`). Metrics, patient-bootstrap
    CIs and the predictions CSV then count studies. Not for task view or seg."""
    views: list[str] = field(default_factory=list)
    """Views the task uses (e.g. [A4C, A2C] for EF): clips of other views are left out of
    training and scoring. Empty: every view."""
    label_key: str = ""
    """Where the label lives in the sample json: 'view' (top level) or a key of 'labels'.
    Empty: the task's default (view -> view, ef -> ef, grade -> grade, seg -> the mask)."""
    classes: list[str] = field(default_factory=list)
    """Class names for view/grade. Empty: view uses the views present in the training
    split, grade uses 0, 1, 2 (none / mild / significant)."""
    label_fraction: float = 1.0
    """Fraction of training PATIENTS used (0.01, 0.1, 1.0): stratified, seeded, and every
    class keeps at least one patient."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    features: str = "tokens+cls+phase+dynamics"
    """Pooled backbone features for video-level heads, '+'-joined: 'tokens' (mean encoder
    token), 'cls', 'phase' (mean phase embedding), 'dynamics' (std over time of the
    per-slice mean token: how much the clip changes over the cycle, what EF needs)."""
    head: Literal["linear", "mlp"] = "linear"
    """Video-level head on the pooled features."""
    hidden: int = 256
    """Width of the mlp head and of the segmentation decoder."""
    seg_labels: list[int] = field(default_factory=lambda: [1, 3])
    """Mask values the segmentation head predicts (CAMUS convention: 1 LV cavity,
    2 myocardium, 3 LA); every other value is background."""
    seg_names: list[str] = field(default_factory=lambda: ["LV", "LA"])
    """Names of `seg_labels` in the results."""
    ef_threshold: float = 50.0
    """EF below this (percent) is 'reduced' for the AUROC."""
    lr: float = 1.0e-2
    """Head lr: the probe's (Adam on standardised features) or the head's peak lr in a
    fine-tune (recipes use ~1e-3 there)."""
    backbone_lr: float = 1.0e-4
    """Fine-tune: lr of the top encoder layer (lower layers decay from it)."""
    weight_decay: float = 1.0e-4
    """Probe head weight decay; with `select_wd` the value picked on the val split wins."""
    select_wd: bool = True
    """Probe: pick the weight decay from {1e-4 .. 10} on the val split (same rule for every backbone)."""
    epochs: int = 200
    """Probe: full-batch steps over the cached features. Fine-tune: epochs over the stream."""
    batch_size: int = 256
    """Probe head mini-batch (cached features); fine-tune uses data.batch_size."""
    layer_decay: float = 0.75
    """Fine-tune layer-wise lr decay: layer i of L gets lr * layer_decay ** (L - i)."""
    warmup_epochs: int = 1
    """Fine-tune: linear warmup, then cosine."""
    train_clips: int = 2
    """Probe: clips per training video whose features are cached (evenly spaced)."""
    test_clips: int = 4
    """Clips per val/test video; video-level predictions are averaged over them."""
    bootstrap: int = 1000
    """Bootstrap resamples over patients for the confidence intervals (0: none)."""
    ci: float = 0.95
    """Confidence level of the intervals."""
    seed: int = 0
    """Seeds the label-fraction draw, random init, head init and the bootstrap."""
    out_dir: str = "runs/downstream"
    """Run folder: results.json, head / model weights, PNGs, the resolved recipe."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..."""
    feature_batch: int = 8
    """Clips per forward pass when caching probe features."""

    def validate(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.level == "study" and self.task in ("view", "seg"):
            raise ValueError(f"level study pools a study's views into one prediction: task {self.task!r} "
                             "is per video (use level video)")
        parts = self.features.split("+")
        bad = [p for p in parts if p not in FEATURES]
        if bad or len(set(parts)) != len(parts):
            raise ValueError(f"features {self.features!r}: join distinct parts of {', '.join(FEATURES)} with '+'")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.layer_decay <= 0 or self.layer_decay > 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.train_clips < 1 or self.test_clips < 1:
            raise ValueError("train_clips and test_clips must be >= 1")
        if self.epochs < 1 or self.batch_size < 1 or self.feature_batch < 1:
            raise ValueError("epochs, batch_size and feature_batch must be >= 1")
        if not 0.0 < self.ci < 1.0:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if len(self.seg_labels) != len(self.seg_names):
            raise ValueError(f"seg_labels {self.seg_labels} and seg_names {self.seg_names} "
                             "must have the same length")
        if any(v <= 0 or v > 255 for v in self.seg_labels):
            raise ValueError(f"seg_labels must be mask values in 1..255, got {self.seg_labels}")
