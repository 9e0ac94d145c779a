"""Load a backbone for downstream use (finetune, evaluate, embed) and turn its outputs into
task features. The one resolver of backbone specs: `echofm finetune`, `evaluate` and
`embed` all load through `load_backbone`.

Five sources: an `echofm export` directory (model.safetensors + config.json), a training
checkpoint (`echofm.engine.checkpoint.load_model_state`), the official EchoFM checkpoint
(`echofm.engine.adapters.load_official`), a VideoMAE checkpoint's encoder
(`echofm.engine.adapters.load_videomae`, at the recipe's num_frames / img_size), or a
seeded random init of the recipe's model (the baseline every pretrained number is compared
against).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, UserError

KINDS = ("random", "export", "checkpoint", "official", "videomae")
ENCODER_KEYS = ("num_frames", "img_size", "patch_size", "tubelet", "in_chans", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "cls_embed", "attention", "mean", "std")
"""ModelConfig keys that shape what the encoder computes: a recipe's `model:` must agree with
the loaded backbone on each (the MAE decoder, unused downstream, and attn_backend may differ)."""


def pick_device(spec: str) -> torch.device:
    """downstream.device ('auto', 'cpu', 'cuda', 'cuda:1', ...) -> the torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"downstream.device: {spec!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return torch.device(spec)


def resolve_kind(spec: str) -> tuple[str, str]:
    """'random' | '[kind:]path' -> (kind, path). Without a prefix: a directory with
    config.json is an export, another directory a training checkpoint, a file the official
    format or VideoMAE (told apart by its keys when loaded: `file_kind`)."""
    if spec == "random":
        return "random", ""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS[1:]:
        return kind, rest
    p = Path(spec)
    if not p.exists():
        raise UserError(f"backbone {spec!r} does not exist (an export dir, a training checkpoint dir, "
                        "an official EchoFM or VideoMAE .pth, or 'random')")
    if p.is_dir():
        return ("export" if (p / "config.json").is_file() else "checkpoint"), spec
    return "official", spec


def load_backbone(spec: str, recipe, *, seed: int = 0) -> tuple[nn.Module, dict]:
    """-> (EchoFM in eval mode on the CPU, info dict for the results JSON).

    recipe: the run's Recipe; its model/mask/loss sections build the random init."""
    from ..model import EchoFM

    kind, path = resolve_kind(spec)
    if kind == "random":
        torch.manual_seed(seed)
        model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    elif kind == "export":
        from ..export import load_export

        model = load_export(path)  # checksums, and the header against config.json's model
    elif kind == "checkpoint":
        from ..checkpoint import load_model_state
        from ..config import recipe_from_data

        state, recipe_dict = load_model_state(path)
        r = recipe_from_data(recipe_dict, file=f"{path} (recipe stored in the checkpoint)")
        model = EchoFM(r.model, r.mask, r.loss)
        _load_state(model, state, path)
    else:
        model, kind = _load_file(kind, path, recipe, forced=spec.startswith(f"{kind}:"))
    model.eval()
    info = {"spec": spec, "kind": kind, "path": str(Path(path).resolve()) if path else "",
            "seed": seed if kind == "random" else None, "fingerprint": fingerprint(model)}
    return model, info


def file_kind(ckpt) -> str:
    """'videomae' or 'official' for a loaded checkpoint dict, from its keys: VideoMAE has
    `encoder.*` (pretraining) or a patch embed without the official CLS / separable position
    tables (fine-tuned)."""
    sd = ckpt
    for key in ("model", "module", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    keys = set(sd) if isinstance(sd, dict) else set()
    if any(k.startswith("encoder.patch_embed.") for k in keys):
        return "videomae"
    if "patch_embed.proj.weight" in keys and "pos_embed_spatial" not in keys and "cls_token" not in keys:
        return "videomae"
    return "official"


def _load_file(kind: str, path: str, recipe, *, forced: bool) -> tuple[nn.Module, str]:
    """An official EchoFM or VideoMAE file (read once; `file_kind` picks when not forced) ->
    (model, kind). VideoMAE's clip length and frame size (not in its weights) come from the
    recipe's model section."""
    from ..adapters import load_official, load_videomae, read_checkpoint

    ckpt, _ = read_checkpoint(path)
    if not forced and file_kind(ckpt) == "videomae":
        kind = "videomae"
    if kind == "videomae":
        m = recipe.model.resolved()
        return load_videomae(ckpt, num_frames=m.num_frames, img_size=m.img_size, num_heads=m.num_heads), kind
    return load_official(ckpt), kind


def check_model_section(recipe, model: nn.Module, spec: str) -> None:
    """ConfigError when the recipe's `model:` (preset resolved) describes another encoder than
    the backbone loaded from `spec`: an export, checkpoint or official file brings its own
    architecture, and a recipe that says otherwise would run silently on the wrong model."""
    want, have = recipe.model.resolved(), model.cfg
    diff = [(k, _yaml(getattr(want, k)), _yaml(getattr(have, k))) for k in ENCODER_KEYS]
    diff = [d for d in diff if d[1] != d[2]]
    if diff:
        raise ConfigError(
            f"the recipe's model: (preset {want.preset}) disagrees with the backbone '{spec}': "
            + ", ".join(f"model.{k}={a} but the backbone has {b}" for k, a, b in diff)
            + "; make the recipe describe the backbone (" + " ".join(f"--set model.{k}={b}" for k, _, b in diff)
            + ") or set downstream.backbone to the weights the recipe describes")


def _yaml(v) -> str:
    """A config value as --set takes it: [0.5,0.5,0.5], true, 768."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(f"{float(x):g}" for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _load_state(model: nn.Module, state: dict, path: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise UserError(f"{path}: checkpoint does not match the model: missing {list(missing)[:5]}, "
                        f"unexpected {list(unexpected)[:5]}")


def fingerprint(model: nn.Module) -> str:
    """Short hash of all weights: a head is only valid on the backbone it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pooled_dim(model: nn.Module, features: str) -> int:
    dim = grid_shape(model)[-1]
    return dim * len(features.split("+"))


def grid_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(T', h, w, D) of the encoder's token grid for a full clip."""
    c = model.cfg
    return c.num_frames // c.tubelet, c.img_size // c.patch_size, c.img_size // c.patch_size, c.embed_dim


def encode(model: nn.Module, video: torch.Tensor, features: str, *, grid: bool = False) -> torch.Tensor:
    """video uint8 [B, T, H, W, C] -> pooled features float [B, F] (`features` joins
    'tokens' (mean token), 'cls', 'phase' (mean phase embedding), 'dynamics' (std over the
    T' slices of each slice's mean token) with '+'), or with grid=True the token grid
    float [B, T', h, w, D]."""
    tokens, cls, phase = model.encode(video)
    g = tokens.reshape(tokens.shape[0], *grid_shape(model))              # [B, T', h, w, D]
    return g if grid else pool(g, cls, phase, features)


def pool(g: torch.Tensor, cls: torch.Tensor, phase: torch.Tensor, features: str) -> torch.Tensor:
    """Token grid [B, T', h, w, D], cls [B, D], phase [B, T', D] -> float32 [B, F]: the
    '+'-joined `features` side by side (see `encode`)."""
    per_slice = g.mean((2, 3))                                           # [B, T', D]
    parts = {"tokens": lambda: g.flatten(1, 3).mean(1), "cls": lambda: cls, "phase": lambda: phase.mean(1),
             "dynamics": lambda: per_slice.std(1, unbiased=False)}
    return torch.cat([parts[p]().float() for p in features.split("+")], dim=-1)


def embed(model: nn.Module, video: torch.Tensor, features: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (clip embedding float32 [B, F] as `encode`, per-slice phase
    embeddings float32 [B, T', D])."""
    tokens, cls, phase = model.encode(video)
    g = tokens.reshape(tokens.shape[0], *grid_shape(model))
    return pool(g, cls, phase, features), phase.float()
