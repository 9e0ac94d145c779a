"""Training metrics: JSONL + TensorBoard, a progress bar with fps and ETA, PNG figures.

Only rank 0 logs. `metrics.jsonl` is appended to, so a resumed run continues the same
file; the lines of steps after the checkpoint it resumes from (written by the session that
was interrupted, and about to be run again) are removed first, so each step appears once.
Figures: input / masked / reconstructed frames of one clip, and the temporal
self-similarity matrix S next to the cycle prior P (DESIGN §4), every `plot_every` steps
under `figures/`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
    """Show a tqdm progress bar (steps, sampled fps, ETA) on rank 0."""

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.plot_every < 0:
            raise ValueError(f"plot_every must be >= 0, got {self.plot_every}")


class MetricsLogger:
    """Rank-0 sink for step metrics. A no-op object on other ranks (`enabled=False`)."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, *, total_steps: int, start_step: int,
                 enabled: bool, desc: str = "pretrain") -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        drop_steps_after(self.run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
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
        """One JSONL line `{"step": step, **metrics}`; numeric values also to TensorBoard
        (nested dicts become `a/b` tags; None is kept in JSONL only)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        if self._tb is not None:
            for tag, v in _flatten(metrics):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(tag, v, step)

    def message(self, text: str) -> None:
        """A line above the progress bar (or on stdout)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def figures(self, step: int, frames: dict[str, np.ndarray], sim: np.ndarray | None,
                prior: np.ndarray | None) -> list[Path]:
        """Save `figures/recon_<step>.png` (rows = the entries of `frames`, each uint8
        [T, H, W, C]) and `figures/similarity_<step>.png` (S and P, [T', T'])."""
        if not self.enabled:
            return []
        out = self.run_dir / "figures"
        out.mkdir(parents=True, exist_ok=True)
        paths = [plot_frames(frames, out / f"recon_{step:08d}.png", title=f"step {step}")]
        if sim is not None:
            paths.append(plot_similarity(sim, prior, out / f"similarity_{step:08d}.png",
                                         title=f"step {step}"))
        if self._tb is not None:
            self._tb.flush()
        return paths

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


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


def plot_similarity(sim: np.ndarray, prior: np.ndarray | None, path: Path, *, title: str = "") -> Path:
    """PNG of the temporal self-similarity S [T', T'] (and the cycle prior P beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [("S (phase embeddings)", sim)] + ([("P (cycle prior)", prior)] if prior is not None else [])
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.0), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("t'")
        ax.set_ylabel("t'")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def reconstruction_rows(model, video, out: dict) -> dict[str, np.ndarray]:
    """Rows for `plot_frames` from one training forward: the reconstructed frames of clip 0
    as input, input with removed patches greyed out, and visible + predicted patches.

    `model`: EchoFM (target_frames / unpatchify / reconstruct); `video` uint8 [B, T, H, W, C];
    `out`: its forward output ("pred" [B, N, u*p*p*C], "mask" [B, N], 1 = removed).
    """
    import torch

    with torch.no_grad():
        video = video[:1]
        part = {"pred": out["pred"][:1].detach(), "mask": out["mask"][:1].detach()}
        frames = video[:, model.target_frames()].float()
        frames = frames / 255.0 if video.dtype == torch.uint8 else frames  # [1, u*T', H, W, C]
        m = part["mask"].float().unsqueeze(-1).expand(-1, -1, model.cfg.pred_dim)
        removed = model.unpatchify(m)  # 1 where the pixel's patch was removed
        recon = model.reconstruct(video, part)

    def u8(x):
        return (x[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    return {"input": u8(frames), "masked": u8(frames * (1 - removed) + 0.2 * removed),
            "reconstruction": u8(recon)}
