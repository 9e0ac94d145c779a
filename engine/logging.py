"""Training metrics: JSONL + TensorBoard, a step line or a progress bar, optional Weights &
Biases / MLflow sinks, PNG figures.

Only rank 0 logs. `metrics.jsonl` is appended to, so a resumed run continues the same
file; the lines of steps after the checkpoint it resumes from (written by the session that
was interrupted, and about to be run again) are removed first, so each step appears once.
Every logged step also gets one human-readable line in `train.log` (with the run's
messages), and on stdout too when the progress bar is off (`logging.progress: false`, e.g.
under a batch scheduler). W&B and MLflow are imported only when enabled (extras
`echofm[wandb]`, `echofm[mlflow]`); a resumed run continues the same tracker run (its id
is kept in `trackers.json`). A tracker key the recipe leaves at null is the client's own
setting, so the environment a user sets (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME) is honoured unless the recipe sets that key.
Figures: input / masked / reconstructed frames of one clip (predicted patches outlined),
and the temporal self-similarity matrix S next to the cycle prior P (docs/fidelity.md),
every `plot_every` steps under `figures/`.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import UserError

TRACKERS = "trackers.json"
"""Run folder file: the W&B / MLflow run ids a resumed run continues."""
OUTLINE_RGB = (255, 140, 0)
"""Colour of the outline drawn on predicted (masked-out) patches in the reconstruction row."""


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """Weights & Biases sink (`pip install 'echofm[wandb]'`)."""

    enabled: bool = False
    """Also send the step metrics (and the recipe, as the run config) to a W&B run."""
    project: str | None = None
    """W&B project; null: $WANDB_PROJECT, else 'echofm'."""
    entity: str | None = None
    """W&B team or user; null: $WANDB_ENTITY, else your default entity."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """offline: write under `<run>/wandb/` only, for a later `wandb sync`; null: $WANDB_MODE,
    else online (which needs `wandb login` or $WANDB_API_KEY)."""


@dataclass(kw_only=True, slots=True)
class MlflowConfig:
    """MLflow sink (`pip install 'echofm[mlflow]'`)."""

    enabled: bool = False
    """Also send the step metrics (and the recipe, as run params) to an MLflow run."""
    tracking_uri: str | None = None
    """Tracking server or store, e.g. http://host:5000 or sqlite:///mlflow.db; null:
    $MLFLOW_TRACKING_URI, else the installed MLflow's default (3.x: sqlite:///mlflow.db in
    the current folder; 2.x: ./mlruns)."""
    experiment: str | None = None
    """Experiment name (created when missing); null: $MLFLOW_EXPERIMENT_NAME, else 'echofm'."""


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """What the trainer records and how often."""

    every: int = 10
    """Write JSONL / TensorBoard metrics every N optimizer steps (and at the last step)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under `tb/`."""
    plot_every: int = 0
    """Save reconstruction and self-similarity PNGs every N steps; 0 disables them."""
    progress: bool = True
    """Show a tqdm progress bar (steps, sampled fps, ETA) on rank 0; false: a step line on stdout
    every `every` steps instead (train.log gets the lines either way)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.plot_every < 0:
            raise ValueError(f"plot_every must be >= 0, got {self.plot_every}")


class MetricsLogger:
    """Rank-0 sink for step metrics. A no-op object on other ranks (`enabled=False`).

    config: the run's recipe as a dict, sent to W&B / MLflow as the run's config."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, *, total_steps: int, start_step: int,
                 enabled: bool, desc: str = "pretrain", config: dict | None = None) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.desc, self.total_steps = desc, total_steps
        self._jsonl = self._text = self._tb = self._bar = None
        self._sinks: list = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # trackers first: a missing package fails before any file is opened
        self._sinks = open_trackers(cfg, self.run_dir, resumed=start_step > 0, config=config or {}, name=desc)
        drop_steps_after(self.run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._text = open(self.run_dir / "train.log", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc=desc, smoothing=0.1)

    def should_plot(self, step: int) -> bool:
        return self.enabled and self.cfg.plot_every > 0 and step % self.cfg.plot_every == 0

    def progress(self, step: int, *, loss: float, fps: float) -> None:
        """Advance the bar to `step` (1-based count of optimizer steps done)."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", fps=f"{fps:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: dict) -> None:
        """One JSONL line `{"step": step, **metrics}`; numeric values also to TensorBoard and the
        trackers (nested dicts become `a/b` tags; None is kept in JSONL only); one step line
        to train.log, and to stdout when there is no progress bar."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        scalars = {tag: float(v) for tag, v in _flatten(metrics)
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, step)
        for sink in self._sinks:
            sink.log(step, scalars)
        line = step_line(self.desc, step, self.total_steps, metrics)
        self._text.write(line + "\n")
        if self._bar is None:
            print(line, flush=True)

    def message(self, text: str) -> None:
        """A line above the progress bar (or on stdout), and in train.log."""
        if not self.enabled:
            return
        self._text.write(text + "\n")
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def figures(self, step: int, frames: dict[str, np.ndarray], sim: np.ndarray | None,
                prior: np.ndarray | None, note: str = "") -> list[Path]:
        """Save `figures/recon_<step>.png` (rows = the entries of `frames`, each uint8
        [T, H, W, C]) and `figures/similarity_<step>.png` (S and P, [T', T']; `note`: a
        caption under them, e.g. the collapse monitor's reading)."""
        if not self.enabled:
            return []
        out = self.run_dir / "figures"
        out.mkdir(parents=True, exist_ok=True)
        paths = [plot_frames(frames, out / f"recon_{step:08d}.png", title=f"step {step}")]
        if sim is not None:
            paths.append(plot_similarity(sim, prior, out / f"similarity_{step:08d}.png",
                                         title=f"step {step}", note=note))
        if self._tb is not None:
            self._tb.flush()
        return paths

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        for f in (self._jsonl, self._text):
            if f is not None:
                f.close()
        for sink in self._sinks:
            sink.close()


def step_line(desc: str, step: int, total: int, m: dict) -> str:
    """'[pretrain] step 20/600 loss 0.5123 lr 2.5e-04 1,234 fps 0.41 s/step eta 3m58s'; the
    parts whose metric is missing or None are left out."""
    parts = [f"[{desc}] step {step}/{total}"]
    fmt = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("sampled_fps", "{:,.0f} fps"),
           ("step_time_s", "{:.2f} s/step"))
    parts += [f.format(m[k]) for k, f in fmt if isinstance(m.get(k), (int, float))]
    if isinstance(m.get("step_time_s"), (int, float)) and total > step:
        parts.append("eta " + _duration((total - step) * m["step_time_s"]))
    return " ".join(parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s % 60:02d}s" if m else f"{s}s")


# ---------------------------------------------------------------- W&B / MLflow


def _import(module: str, key: str, extra: str):
    """The tracker's package, or a UserError saying how to install it (or turn it off)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{key}: true, but the {module} package is not installed; "
                        f"pip install 'echofm[{extra}]' (or set {key}=false)") from None


@contextlib.contextmanager
def _tracker_errors(key: str, fix: str):
    """A tracker client that cannot start (no login, a store it refuses, a missing driver)
    -> one UserError line naming the sink and the fix, not the client's traceback."""
    try:
        yield
    except Exception as e:  # the clients raise many unrelated types; any of them stops the run here
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{key}: {type(e).__name__}: {first}; {fix} (or set {key}.enabled=false)") from e


def open_trackers(cfg: LoggingConfig, run_dir: Path, *, resumed: bool, config: dict, name: str) -> list:
    """The enabled W&B / MLflow sinks. A resumed run continues the tracker runs whose ids
    `<run_dir>/trackers.json` keeps; a fresh one starts new runs and records their ids."""
    ids_file = run_dir / TRACKERS
    ids = json.loads(ids_file.read_text()) if resumed and ids_file.is_file() else {}
    sinks = []
    if cfg.wandb.enabled:
        sinks.append(WandbSink(_import("wandb", "logging.wandb.enabled", "wandb"), cfg.wandb, run_dir,
                               run_id=ids.get("wandb"), config=config, name=name))
        ids["wandb"] = sinks[-1].run_id
    if cfg.mlflow.enabled:
        sinks.append(MlflowSink(_import("mlflow", "logging.mlflow.enabled", "mlflow"), cfg.mlflow,
                                run_id=ids.get("mlflow"), config=config, name=f"{run_dir.name}/{name}"))
        ids["mlflow"] = sinks[-1].run_id
    if sinks:
        ids_file.write_text(json.dumps(ids, indent=1))
    return sinks


class WandbSink:
    """Step metrics to a W&B run (`run.log(scalars, step=step)`); the recipe is its config."""

    def __init__(self, wandb, cfg: WandbConfig, run_dir: Path, *, run_id: str | None, config: dict,
                 name: str) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:12]
        project = cfg.project or os.environ.get("WANDB_PROJECT") or "echofm"
        with _tracker_errors("logging.wandb", "set WANDB_MODE=offline (or logging.wandb.mode=offline), or run "
                             "`wandb login`"):
            self.run = wandb.init(project=project, entity=cfg.entity, name=f"{run_dir.name}/{name}",
                                  id=self.run_id, resume="allow", dir=str(run_dir), config=config, mode=cfg.mode)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """Step metrics to an MLflow run through `MlflowClient` (no process-wide active run);
    the recipe's keys become run params (on a fresh run only: MLflow refuses to change them)."""

    def __init__(self, mlflow, cfg: MlflowConfig, *, run_id: str | None, config: dict, name: str) -> None:
        from mlflow.entities import Metric, Param

        self.metric = Metric
        experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "echofm"
        with _tracker_errors("logging.mlflow", "set MLFLOW_TRACKING_URI or logging.mlflow.tracking_uri to a "
                             "store this MLflow accepts (e.g. sqlite:///mlflow.db, or http://HOST:PORT)"):
            self.client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
            if run_id is None:
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
                run_id = self.client.create_run(exp_id, run_name=name).info.run_id
                params = [Param(k, str(v)[:500]) for k, v in _flatten(config)]  # MLflow's value limit
                for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
                    self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, v, ms, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def drop_steps_after(path: Path, step: int) -> None:
    """Keep only the JSONL lines of steps <= `step` (and drop a line cut off by a kill);
    rewritten atomically. A missing file is left missing."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line of a killed run
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        tag = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, tag)
        else:
            yield tag, v


def plot_frames(rows: dict[str, np.ndarray], path: Path, *, title: str = "", max_cols: int = 8) -> Path:
    """Grid PNG: one row per entry of `rows` (uint8 [T, H, W, C] or [T, H, W]), up to
    `max_cols` evenly spaced frames per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = min(len(v) for v in rows.values())
    cols = min(t, max_cols)
    idx = np.linspace(0, t - 1, cols).round().astype(int)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows.items()):
        for c, i in enumerate(idx):
            ax = axes[r][c]
            img = frames[i]
            ax.imshow(img if img.ndim == 3 and img.shape[-1] == 3 else img.squeeze(), cmap="gray",
                      vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"t={i}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def healthy_similarity(prior: np.ndarray) -> np.ndarray:
    """What a healthy S looks like for this clip: P's off-diagonal pattern (the beats), each
    row rescaled to [-1, 1] with the diagonal at 1 (S is a cosine, P's scale is the pixels')."""
    p = prior.astype(np.float64).copy()
    off = ~np.eye(len(p), dtype=bool)
    lo, hi = p[off].min(), p[off].max()
    s = 2 * (p - lo) / (hi - lo) - 1 if hi > lo else np.zeros_like(p)
    s[~off] = 1.0
    return s


def plot_similarity(sim: np.ndarray, prior: np.ndarray | None, path: Path, *, title: str = "",
                    note: str = "") -> Path:
    """PNG of the temporal self-similarity S [T', T'], the cycle prior P beside it and what a
    healthy S looks like for this clip (`healthy_similarity`); `note` goes under them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [("S (phase embeddings)", sim)]
    if prior is not None:
        mats += [("P (cycle prior)", prior), ("healthy S: P's beat bands", healthy_similarity(prior))]
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.4 if note else 3.0), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("t'")
        ax.set_ylabel("t'")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    if note:
        import textwrap

        fig.text(0.5, 0.01, textwrap.fill(note, 40 * len(mats)), ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0.1 if note else 0, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def reconstruction_rows(model, video, out: dict) -> dict[str, np.ndarray]:
    """Rows for `plot_frames` from one training forward: the reconstructed frames of clip 0
    as input, input with removed patches greyed out, and visible + predicted patches with
    the predicted ones outlined in OUTLINE_RGB.

    `model`: EchoFM (target_frames / unpatchify / reconstruct); `video` uint8 [B, T, H, W, C];
    `out`: its forward output ("pred" [B, M, u*p*p*C] at "ids_masked" [B, M], "mask" [B, N], 1 = removed).
    """
    import torch

    with torch.no_grad():
        video = video[:1]
        part = {"pred": out["pred"][:1].detach(), "mask": out["mask"][:1].detach(),
                "ids_masked": out["ids_masked"][:1]}
        frames = video[:, model.target_frames()].float()
        frames = frames / 255.0 if video.dtype == torch.uint8 else frames  # [1, u*T', H, W, C]
        m = part["mask"].float().unsqueeze(-1).expand(-1, -1, model.cfg.pred_dim)
        removed = model.unpatchify(m)  # 1 where the pixel's patch was removed
        recon = model.reconstruct(video, part)

    def u8(x):
        return (x[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    return {"input": u8(frames), "masked": u8(frames * (1 - removed) + 0.2 * removed),
            "reconstruction\n(outlined: predicted)": mark_predicted(u8(recon), u8(removed) > 0,
                                                                    model.cfg.patch_size)}


def mark_predicted(frames: np.ndarray, removed: np.ndarray, patch: int) -> np.ndarray:
    """Outline the predicted patches: frames uint8 [T, H, W, C] (C = 1 or 3), removed bool
    [T, H, W, C] (True on every pixel of a masked-out patch), patch side p -> RGB uint8
    [T, H, W, 3] with the one-pixel border of each removed p x p patch in OUTLINE_RGB."""
    rgb = np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames.copy()
    h, w = frames.shape[1:3]
    ry, rx = np.arange(h) % patch, np.arange(w) % patch
    edge = ((ry == 0) | (ry == patch - 1))[:, None] | ((rx == 0) | (rx == patch - 1))[None, :]  # [H, W]
    rgb[removed[..., 0] & edge] = OUTLINE_RGB
    return rgb
