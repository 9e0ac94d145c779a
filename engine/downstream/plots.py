"""Result figures as PNGs: confusion matrix, EF scatter + Bland-Altman, segmentation overlays."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_png(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    """cm: int [C, C] rows = true, columns = predicted; cells show count and row share."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def ef_png(y: np.ndarray, pred: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Left: predicted vs true EF with the identity line; right: Bland-Altman (difference
    against mean, with the bias and the 95% limits of agreement)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    lo, hi = float(min(y.min(), pred.min())) - 2, float(max(y.max(), pred.max())) + 2
    a.scatter(y, pred, s=12, alpha=0.7)
    a.plot([lo, hi], [lo, hi], "k--", lw=1)
    a.set_xlim(lo, hi)
    a.set_ylim(lo, hi)
    a.set_xlabel("true EF (%)")
    a.set_ylabel("predicted EF (%)")
    a.set_title(title or "EF", fontsize=9)
    mean, diff = (y + pred) / 2, pred - y
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    b.scatter(mean, diff, s=12, alpha=0.7)
    for v, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
        b.axhline(v, color="k", ls=style, lw=1)
    b.set_xlabel("mean of true and predicted EF (%)")
    b.set_ylabel("predicted - true (%)")
    b.set_title(f"Bland-Altman: bias {bias:+.2f}, LoA +-{1.96 * sd:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


_COLORS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [60, 120, 240], [240, 200, 40]], np.float64)


def seg_overlay_png(frames: np.ndarray, target: np.ndarray, pred: np.ndarray, path: str | Path,
                    names: list[str] | None = None) -> Path:
    """Rows: frames; columns: image, ground truth overlay, prediction overlay.

    frames: uint8 [F, H, W, C]; target, pred: int [F, H, W] class ids (0 background)."""
    f = frames.shape[0]
    fig, axes = plt.subplots(f, 3, figsize=(7.5, 2.5 * f), squeeze=False)
    for i in range(f):
        img = frames[i].astype(np.float64)
        for j, (lab, title) in enumerate(((None, "frame"), (target[i], "ground truth"), (pred[i], "prediction"))):
            shown = img
            if lab is not None:
                col = _COLORS[np.clip(lab, 0, len(_COLORS) - 1)]
                alpha = 0.45 * (lab > 0)[..., None]
                shown = img * (1 - alpha) + col * alpha
            axes[i, j].imshow(shown.astype(np.uint8))
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(title, fontsize=9)
    if names:
        legend = ", ".join(f"{n}={c}" for n, c in zip(names, ("red", "green", "blue", "yellow")))
        fig.suptitle(legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
