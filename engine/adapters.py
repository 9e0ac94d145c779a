"""Checkpoint adapters: the official EchoFM and VideoMAE weights into `EchoFM`, and back.

Official EchoFM (github.com/SekeunKim/EchoFM, `{"model": state_dict, "model_args": {...}}`,
built with sep_pos_embed=True, cls_embed=True, its defaults). Differences from ours:

    official                                    ours
    patch_embed.proj  Conv3d [D, C, t, p, p]    patch_embed  Linear [D, C*t*p*p] (same order)
    *.attn.q / .k / .v  three Linears           *.attn.qkv   one Linear (rows q, k, v)
    decoder_block.*     (phase projector)       phase_block.*
    prj_norm            (newer checkpoints)     phase_norm   (older ones reuse `norm`: copied)
    decoder_prj_cls_token                       phase_cls_token
    everything else: same names and shapes.

VideoMAE (MCG-NJU, pretraining `encoder.*` or fine-tuned keys): the encoder only
(patch embed, blocks with fused qkv + q_bias / v_bias, norm or fc_norm). Its position
embedding is a fixed 1D sinusoid over all N tokens (not in the file), which is not a sum
of a spatial and a temporal table: we load its least-squares projection onto ours and
report the residual. The CLS token, phase projector and decoder stay freshly initialised.

Files are read with `torch.load(..., weights_only=True)` only. Unknown, missing or
mis-shaped keys raise `CheckpointError` listing them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import UserError
from .losses import LossConfig
from .masking import MaskConfig
from .model import EchoFM, ModelConfig

_QKV = re.compile(r"^(.*)\.attn\.([qkv])\.(weight|bias)$")
_RENAME = {"decoder_block.": "phase_block.", "prj_norm.": "phase_norm."}
_RENAME_PARAMS = {"decoder_prj_cls_token": "phase_cls_token"}
# Encoder heads of the official factories (heads cannot be read off weight shapes).
_OFFICIAL_HEADS = {"mae_vit_base_patch16": 12, "mae_vit_large_patch16": 16, "mae_vit_huge_patch14": 16}


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model; the message names the file and the keys."""


def _read(source: str | Path | Mapping) -> tuple[dict, str]:
    """A path (torch.load weights_only) or an already loaded mapping -> (dict, label)."""
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except Exception as e:  # weights_only refuses pickled code: say so, do not fall back
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): "
                              f"{str(e).splitlines()[0]}") from None


def _check_against(model: EchoFM, state: dict, label: str, allow_missing: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(allow_missing))
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    problems = []
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if missing:
        problems.append(f"missing keys {missing}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointError(f"{label}: does not fit EchoFM: " + "; ".join(problems))


# ---------------------------------------------------------------- official EchoFM


def convert_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official EchoFM names -> ours (pure renaming / reshaping; works on meta tensors)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        m = _QKV.match(key)
        if m:
            qkv.setdefault(f"{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = v
            continue
        if key == "patch_embed.proj.weight":
            v = v.reshape(v.shape[0], -1)  # Conv3d [D, C, t, p, p] -> Linear [D, C*t*p*p]
            key = "patch_embed.weight"
        elif key == "patch_embed.proj.bias":
            key = "patch_embed.bias"
        key = _RENAME_PARAMS.get(key, key)
        for old, new in _RENAME.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = v
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{key}: needs attn.q, attn.k and attn.v, found only {sorted(parts)}")
        out[_rename_block(key)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if "phase_norm.weight" not in out and "norm.weight" in out:
        # Before prj_norm existed the official projector reused the encoder's final norm.
        out["phase_norm.weight"], out["phase_norm.bias"] = out["norm.weight"].clone(), out["norm.bias"].clone()
    return out


def _rename_block(key: str) -> str:
    for old, new in _RENAME.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def export_official(model: EchoFM) -> dict:
    """Our model -> the official checkpoint format {"model": state_dict, "model_args": {...}}."""
    c = model.cfg
    sd: dict[str, torch.Tensor] = {}
    for key, v in model.state_dict().items():
        v = v.detach()
        if key == "patch_embed.weight":
            sd["patch_embed.proj.weight"] = v.reshape(v.shape[0], c.in_chans, c.tubelet, c.patch_size, c.patch_size)
            continue
        if key == "patch_embed.bias":
            sd["patch_embed.proj.bias"] = v
            continue
        if key.startswith("phase_block."):
            key = "decoder_block." + key[len("phase_block."):]
        elif key.startswith("phase_norm."):
            key = "prj_norm." + key[len("phase_norm."):]
        elif key == "phase_cls_token":
            key = "decoder_prj_cls_token"
        m = re.match(r"^(.*)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                sd[f"{m[1]}.attn.{name}.{m[2]}"] = part.clone()
            continue
        sd[key] = v.clone()
    args = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                depth=c.depth, num_heads=c.num_heads, decoder_embed_dim=c.decoder_embed_dim,
                decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio,
                num_frames=c.num_frames, t_patch_size=c.tubelet, pred_t_dim=c.pred_t_dim, sep_pos_embed=True,
                cls_embed=True, norm_pix_loss=model.loss_cfg.norm_pix)
    return {"model": sd, "model_args": args}


def _count(sd: Mapping, prefix: str) -> int:
    idx = {int(m[1]) for k in sd if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def config_from_official(sd: Mapping[str, torch.Tensor], model_args: Mapping | None = None,
                         label: str = "<state dict>") -> ModelConfig:
    """Architecture from the official weight shapes; heads from model_args (or the factory name)."""
    args = dict(model_args or {})
    need = ["patch_embed.proj.weight", "cls_token", "pos_embed_spatial", "pos_embed_temporal",
            "decoder_embed.weight", "decoder_pred.weight", "blocks.0.mlp.fc1.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        hint = (" (a checkpoint built with sep_pos_embed=False / cls_embed=False is not supported)"
                if "pos_embed" in sd or "cls_token" not in sd else "")
        raise CheckpointError(f"{label}: not an official EchoFM checkpoint: missing keys {absent}{hint}")
    d, c, t, p, _ = sd["patch_embed.proj.weight"].shape
    t_grid, l_grid = sd["pos_embed_temporal"].shape[1], sd["pos_embed_spatial"].shape[1]
    side = math.isqrt(l_grid)
    dd = sd["decoder_embed.weight"].shape[0]
    u = sd["decoder_pred.weight"].shape[0] // (p * p * c)
    heads = args.get("num_heads") or _OFFICIAL_HEADS.get(str(args.get("model", "")), max(1, d // 64))
    preset = {1024: "echofm_vit_large", 768: "echofm_vit_base"}.get(d, "echofm_tiny")
    return ModelConfig(preset=preset, num_frames=t_grid * t, img_size=side * p, patch_size=p, tubelet=t,
                       in_chans=c, embed_dim=d, depth=_count(sd, "blocks"), num_heads=int(heads),
                       mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d, decoder_embed_dim=dd,
                       decoder_depth=_count(sd, "decoder_blocks"),
                       decoder_num_heads=int(args.get("decoder_num_heads", 16)), pred_t_dim=u * t_grid,
                       mean=(0.485, 0.456, 0.406)[:c] if c == 3 else (0.5,) * c,
                       std=(0.229, 0.224, 0.225)[:c] if c == 3 else (0.5,) * c)


def load_official(source: str | Path | Mapping, mask_cfg: MaskConfig | None = None,
                  loss_cfg: LossConfig | None = None, attn_backend: str = "auto") -> EchoFM:
    """An official EchoFM checkpoint (path or loaded dict) -> EchoFM with those weights."""
    ckpt, label = _read(source)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{label}: expected {{'model': state_dict, 'model_args': ...}}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    cfg = config_from_official(sd, ckpt.get("model_args"), label)
    cfg.attn_backend = attn_backend
    model = EchoFM(cfg, mask_cfg, loss_cfg)
    state = convert_official(sd)
    _check_against(model, state, label)
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- VideoMAE


def sinusoid_table(n: int, d: int) -> torch.Tensor:
    """VideoMAE's fixed position table [n, d]: sin on even, cos on odd channels."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / d)
    return torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))


def separable_projection(table: torch.Tensor, t_grid: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least-squares spatial [L, D] + temporal [T', D] with spatial[s] + temporal[t] ~ table[t*L + s].

    Returns (spatial, temporal, relative residual norm)."""
    grid = table.view(t_grid, -1, table.shape[-1])  # [T', L, D]
    spatial = grid.mean(0)
    temporal = grid.mean(1) - grid.mean((0, 1))
    fit = temporal[:, None] + spatial[None]
    return spatial, temporal, float((grid - fit).norm() / grid.norm().clamp(min=1e-12))


def load_videomae(source: str | Path | Mapping, num_frames: int = 16, img_size: int = 224,
                  num_heads: int | None = None, mask_cfg: MaskConfig | None = None,
                  loss_cfg: LossConfig | None = None, attn_backend: str = "auto") -> EchoFM:
    """A VideoMAE checkpoint's encoder -> EchoFM (echofm_vit_base decoder, fresh CLS /
    projector / decoder). `model.adapter_report` says what was loaded and approximated."""
    ckpt, label = _read(source)
    sd = ckpt
    for key in ("model", "module", "state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    ignored: list[str] = []
    if any(k.startswith("encoder.") for k in sd):  # a pretraining checkpoint: keep the encoder
        ignored = sorted(k for k in sd if not k.startswith("encoder."))
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{label}: not a VideoMAE checkpoint: no (encoder.)patch_embed.proj.weight")
    layer_scale = sorted(k for k in sd if ".gamma_" in k)
    if layer_scale:
        raise CheckpointError(f"{label}: layer-scale weights (init_values > 0) are not supported: {layer_scale[:4]}...")
    d, c, t, p, _ = sd["patch_embed.proj.weight"].shape
    cfg = ModelConfig(preset="echofm_vit_base", num_frames=num_frames, img_size=img_size, patch_size=p, tubelet=t,
                      in_chans=c, embed_dim=d, depth=_count(sd, "blocks"), num_heads=num_heads or max(1, d // 64),
                      mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d, pred_t_dim=num_frames,
                      attn_backend=attn_backend)
    model = EchoFM(cfg, mask_cfg, loss_cfg)
    c_ = model.cfg
    state: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, v in sd.items():
        if key == "patch_embed.proj.weight":
            state["patch_embed.weight"] = v.reshape(d, -1)
        elif key == "patch_embed.proj.bias":
            state["patch_embed.bias"] = v
        elif key.endswith((".attn.q_bias", ".attn.v_bias")):
            continue  # folded into qkv.bias below
        elif key.startswith("blocks.") or key.startswith("norm."):
            state[key] = v
        elif key.startswith("fc_norm.") and "norm.weight" not in sd:
            state["norm." + key[len("fc_norm."):]] = v
            notes.append("fc_norm (applied after mean pooling in VideoMAE) loaded as the per-token final norm")
        elif key == "pos_embed":
            continue
        elif key.startswith("head."):
            ignored.append(key)
        else:
            raise CheckpointError(f"{label}: unknown VideoMAE key {key!r}")
    for i in range(cfg.depth):
        qb = sd.get(f"blocks.{i}.attn.q_bias")
        vb = sd.get(f"blocks.{i}.attn.v_bias")
        qb = torch.zeros(d) if qb is None else qb
        vb = torch.zeros(d) if vb is None else vb
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])  # k has no bias
    n = c_.t_grid * c_.l_grid
    table = sd.get("pos_embed")
    table = sinusoid_table(n, d) if table is None else table.reshape(-1, d)[-n:].double()
    if table.shape[0] != n:
        raise CheckpointError(f"{label}: pos_embed has {table.shape[0]} positions, the clip needs {n} "
                              f"(num_frames={num_frames}, img_size={img_size})")
    spatial, temporal, resid = separable_projection(table, c_.t_grid)
    state["pos_embed_spatial"], state["pos_embed_temporal"] = spatial[None].float(), temporal[None].float()
    state["pos_embed_class"] = torch.zeros(1, 1, d)
    notes.append(f"1D position table projected onto spatial + temporal (relative residual {resid:.3f})")
    fresh = ("cls_token", "phase_", "decoder", "mask_token")
    _check_against(model, state, label, allow_missing=fresh)
    model.load_state_dict(state, strict=False)
    model.adapter_report = {"loaded": sorted(state), "ignored": ignored, "fresh": list(fresh), "notes": notes,
                            "pos_residual": resid}
    return model
