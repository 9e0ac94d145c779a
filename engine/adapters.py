"""Checkpoint adapters: the official EchoFM and VideoMAE weights into `EchoFM`, and back.

Official EchoFM (github.com/SekeunKim/EchoFM): `{"model": state_dict, "model_args": {...}}`
(the released weights) or a main_pretrain checkpoint `{"model", "optimizer", "epoch",
"scaler", "args": argparse.Namespace}`; built with sep_pos_embed=True, cls_embed=True.
`load_official(path)` with no other argument gives the official model: architecture from
the weight shapes, and from the checkpoint's settings (official defaults where a key is
absent) the input (raw [0, 1] pixels: mean 0, std 1, as the official loader), the tube
mask ratio (`mask_ratio`, 0.75) and every loss setting (`OFFICIAL_LOSS_KEYS`), with the
`official` loss variant. docs/fidelity.md lists what matches to float64 precision.
Name and shape differences:

    official                                    ours
    patch_embed.proj  Conv3d [D, C, t, p, p]    patch_embed  Linear [D, C*t*p*p] (same order)
    *.attn.q / .k / .v  three Linears           *.attn.qkv   one Linear (rows q, k, v;
                                                             zero bias under no_qkv_bias)
    decoder_block.*     (phase projector)       phase_block.*
    prj_norm            (newer checkpoints)     phase_norm   (older ones reuse `norm`: copied)
    decoder_prj_cls_token                       phase_cls_token
    everything else: same names and shapes.

VideoMAE (MCG-NJU, pretraining `encoder.*` or fine-tuned keys): the encoder only
(patch embed, blocks with fused qkv + q_bias / v_bias, norm or fc_norm), no CLS token
(cls_embed=False) and ImageNet mean / std input normalisation, as VideoMAE's loader. Its
position embedding is a fixed 1D sinusoid over all N tokens (not in the file), which is
not a sum of a spatial and a temporal table: we load its least-squares projection onto
ours and report the residual. The phase projector and decoder stay freshly initialised.

Files are read with `torch.load(..., weights_only=True)` only (argparse.Namespace, the
official training checkpoints' `args`, is allow-listed). Unknown, missing or mis-shaped
keys raise `CheckpointError` listing them.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError
from .losses import LossConfig
from .masking import MaskConfig
from .model import EchoFM, ModelConfig

_QKV = re.compile(r"^(.*)\.attn\.([qkv])\.(weight|bias)$")
_RENAME = {"decoder_block.": "phase_block.", "prj_norm.": "phase_norm."}
_RENAME_PARAMS = {"decoder_prj_cls_token": "phase_cls_token"}
# Encoder heads of the official factories (heads cannot be read off weight shapes): by
# factory name, else by width (ViT-B 768 -> 12, ViT-L 1024 -> 16, ViT-H 1280 -> 16).
_OFFICIAL_HEADS = {"mae_vit_base_patch16": 12, "mae_vit_large_patch16": 16, "mae_vit_huge_patch14": 16}
_OFFICIAL_HEADS_BY_DIM = {768: 12, 1024: 16, 1280: 16}
# Loss settings of the official model_args / args -> LossConfig fields, with the
# MaskedAutoencoderViT defaults that apply when a checkpoint does not carry a key.
OFFICIAL_LOSS_KEYS = {"norm_pix_loss": ("norm_pix", False), "triplet_weight": ("triplet_weight", 1.0),
                      "triplet_margin": ("triplet_margin", 0.2), "phase_prior": ("phase_prior", "pixel"),
                      "cycle_weight": ("cycle_weight", 1.0), "cycle_tau": ("cycle_tau", 0.1),
                      "prior_center_alpha": ("prior_center_alpha", 1.0)}
OFFICIAL_MASK_RATIO = 0.75
"""main_pretrain's --mask_ratio default (and MaskedAutoencoderViT.forward's)."""
OFFICIAL_PRIOR_GRID = 32
"""The official pixel prior pools to 32 x 32 (hard-coded there, no key)."""
EXTRA_KEY = "echofm"
"""model_args key for what the official code has no key for (input mean / std, loss
variant, ...): written by export_official, read by load_official; the official
MaskedAutoencoderViT(**model_args) swallows it in **kwargs."""


def read_checkpoint(source: str | Path | Mapping) -> tuple[dict, str]:
    """A path (torch.load weights_only) or an already loaded mapping -> (dict, label)."""
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official training `args`
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
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        bias = key[:-len("weight")] + "bias"
        if bias not in out:  # no_qkv_bias: a zero bias is the same function
            out[bias] = out[key].new_zeros(out[key].shape[0])
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
    """Our model -> the official checkpoint format {"model": state_dict, "model_args": {...}}.

    model_args holds the architecture, mask_ratio and the loss settings under the official
    names, plus `EXTRA_KEY` for what the official code has no key for. The official code
    feeds raw [0, 1] pixels and computes the `official` loss variant: only a model with
    mean 0 / std 1 and that variant behaves the same there."""
    c = model.cfg
    if not c.cls_embed:
        raise CheckpointError("export_official: the official format needs an encoder CLS token (cls_embed)")
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
    lc = model.loss_cfg
    args = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                depth=c.depth, num_heads=c.num_heads, decoder_embed_dim=c.decoder_embed_dim,
                decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio,
                num_frames=c.num_frames, t_patch_size=c.tubelet, pred_t_dim=c.pred_t_dim, sep_pos_embed=True,
                cls_embed=True, mask_ratio=model.mask_cfg.ratio)
    args.update({key: getattr(lc, field) for key, (field, _) in OFFICIAL_LOSS_KEYS.items()})
    args[EXTRA_KEY] = {"mean": list(c.mean), "std": list(c.std), "mask_kind": model.mask_cfg.kind,
                       "loss_variant": lc.variant, "prior_grid": lc.prior_grid, "centre_eps": lc.centre_eps}
    return {"model": sd, "model_args": args}


def _count(sd: Mapping, prefix: str) -> int:
    idx = {int(m[1]) for k in sd if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def official_args(ckpt: Mapping) -> dict:
    """The settings an official checkpoint carries: `model_args` (released weights) or the
    training `args` Namespace (main_pretrain); {} when it has neither."""
    args = ckpt.get("model_args")
    if args is None:
        args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def config_from_official(sd: Mapping[str, torch.Tensor], model_args: Mapping | None = None,
                         label: str = "<state dict>") -> ModelConfig:
    """Architecture from the official weight shapes (heads from model_args, the factory
    name or the width); input normalisation: raw [0, 1] pixels (mean 0, std 1) unless
    model_args[EXTRA_KEY] says otherwise. model_args that contradict the weights raise."""
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
    u = sd["decoder_pred.weight"].shape[0] // (p * p * c)
    heads = args.get("num_heads") or _OFFICIAL_HEADS.get(str(args.get("model", "")),
                                                         _OFFICIAL_HEADS_BY_DIM.get(d, max(1, d // 64)))
    extra = args.get(EXTRA_KEY) or {}
    cfg = ModelConfig(preset={1024: "echofm_vit_large", 768: "echofm_vit_base"}.get(d, "echofm_tiny"),
                      num_frames=t_grid * t, img_size=side * p, patch_size=p, tubelet=t, in_chans=c, embed_dim=d,
                      depth=_count(sd, "blocks"), num_heads=int(heads),
                      mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d,
                      decoder_embed_dim=sd["decoder_embed.weight"].shape[0],
                      decoder_depth=_count(sd, "decoder_blocks"),
                      decoder_num_heads=int(args.get("decoder_num_heads", 16)), pred_t_dim=u * t_grid,
                      mean=tuple(extra.get("mean", (0.0,) * c)), std=tuple(extra.get("std", (1.0,) * c)))
    _check_args(cfg, args, label)
    return cfg


def _check_args(cfg: ModelConfig, args: Mapping, label: str) -> None:
    """model_args / args architecture keys must agree with the weights."""
    implied = {"num_frames": cfg.num_frames, "t_patch_size": cfg.tubelet, "pred_t_dim": cfg.pred_t_dim,
               "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
               "decoder_embed_dim": cfg.decoder_embed_dim, "decoder_depth": cfg.decoder_depth,
               "img_size": cfg.img_size, "input_size": cfg.img_size, "in_chans": cfg.in_chans,
               "sep_pos_embed": True, "cls_embed": True}
    wrong = [f"{k}={args[k]!r} (weights: {v!r})" for k, v in implied.items() if k in args and args[k] != v]
    if wrong:
        raise CheckpointError(f"{label}: model_args contradict the weights: {', '.join(wrong)}")


def loss_config_from_official(args: Mapping) -> LossConfig:
    """The official loss settings of a checkpoint (MaskedAutoencoderViT defaults where absent)."""
    kw = {field: args.get(key, default) for key, (field, default) in OFFICIAL_LOSS_KEYS.items()}
    kw["norm_pix"] = bool(kw["norm_pix"])
    extra = args.get(EXTRA_KEY) or {}
    cfg = LossConfig(**kw, variant=extra.get("loss_variant", "official"),
                     prior_grid=int(extra.get("prior_grid", OFFICIAL_PRIOR_GRID)),
                     centre_eps=float(extra.get("centre_eps", LossConfig().centre_eps)))
    cfg.validate()
    return cfg


def mask_config_from_official(args: Mapping) -> MaskConfig:
    """The official tube mask at the checkpoint's mask_ratio (0.75 where absent)."""
    extra = args.get(EXTRA_KEY) or {}
    cfg = MaskConfig(kind=extra.get("mask_kind", "tube"), ratio=float(args.get("mask_ratio", OFFICIAL_MASK_RATIO)))
    cfg.validate()
    return cfg


def load_official(source: str | Path | Mapping, mask_cfg: MaskConfig | None = None,
                  loss_cfg: LossConfig | None = None, attn_backend: str = "auto") -> EchoFM:
    """An official EchoFM checkpoint (path or loaded dict) -> EchoFM with those weights,
    input normalisation, mask and loss (mask_cfg / loss_cfg replace the checkpoint's).
    `model.adapter_report` lists the settings read from the file and those defaulted."""
    ckpt, label = read_checkpoint(source)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{label}: expected {{'model': state_dict, 'model_args': ...}}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    args = official_args(ckpt) if sd is not ckpt else {}
    cfg = config_from_official(sd, args, label)
    cfg.attn_backend = attn_backend
    try:
        mask_cfg = mask_cfg or mask_config_from_official(args)
        loss_cfg = loss_cfg or loss_config_from_official(args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: bad loss / mask setting in model_args: {e}") from None
    model = EchoFM(cfg, mask_cfg, loss_cfg)
    state = convert_official(sd)
    _check_against(model, state, label)
    model.load_state_dict(state)
    keys = [*OFFICIAL_LOSS_KEYS, "mask_ratio"]
    model.adapter_report = {"source": label, "from_checkpoint": sorted(k for k in keys if k in args),
                            "defaulted": sorted(k for k in keys if k not in args)}
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""VideoMAE's input normalisation (its GroupNormalize with timm's ImageNet defaults)."""


def load_videomae(source: str | Path | Mapping, num_frames: int = 16, img_size: int = 224,
                  num_heads: int | None = None, mask_cfg: MaskConfig | None = None,
                  loss_cfg: LossConfig | None = None, attn_backend: str = "auto", seed: int = 0) -> EchoFM:
    """A VideoMAE checkpoint's encoder -> EchoFM without an encoder CLS (cls_embed=False),
    ImageNet-normalised input (mean / std travel in model.cfg and its exports), fresh
    projector / decoder (echofm_vit_base decoder), initialised from `seed` without touching
    the global RNG: every load of a file is the same model (weight fingerprint, phase
    embeddings), as a downstream head and a resumed `echofm embed` need.
    `model.adapter_report` says what was loaded and approximated."""
    ckpt, label = read_checkpoint(source)
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
                      cls_embed=False, attn_backend=attn_backend,
                      mean=IMAGENET_MEAN if c == 3 else (0.5,) * c, std=IMAGENET_STD if c == 3 else (0.5,) * c)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
    notes.append(f"1D position table projected onto spatial + temporal (relative residual {resid:.3f})")
    fresh = ("phase_", "decoder", "mask_token")
    _check_against(model, state, label, allow_missing=fresh)
    model.load_state_dict(state, strict=False)
    model.adapter_report = {"loaded": sorted(state), "ignored": ignored, "fresh": list(fresh), "notes": notes,
                            "pos_residual": resid}
    return model
