"""EchoFM: video MAE with tube masking, a phase projector and the periodic contrastive loss.

Data path of one training forward (shapes for B clips, token grid T' x L, K kept per slice):

    video [B, T, H, W, C] uint8|float  (loader layout; float means [0, 1] pixels)
      -> tube mask: ids_keep [B, T'K]                                  (masking.py)
      -> gather_patches: visible patches only [B, T'K, C*t*p*p]        (kernels)
      -> patch_embed (one Linear = Conv3d on those patches) + spatial/temporal pos
      -> [CLS, tokens] -> encoder blocks (tube_attention joint) -> norm -> latent
      -> phase projector: one shared block per slice, the slice CLS the only query over
         [CLS, the slice's tokens] -> phase [B, T', D]
      -> decoder: decoder_embed, scatter_tokens with the mask token, decoder pos,
         [CLS, all tokens] -> blocks (the last one's output only at the removed tokens,
         ids_masked [B, N - Nv]) -> norm -> decoder_pred [B, N - Nv, u*p*p*C]
      -> losses: (norm-pix) MSE over the removed tokens + triplet and cycle KL of phase vs
         a pixel prior (losses.py)

Training computes only what the loss reads, with the official numbers (float64 parity in
tests/test_fidelity.py and tests/test_step_equivalence.py): the removed tokens' predictions
and targets (the official code predicts every token and weights the visible ones by 0),
and the phase block's CLS rows (its other rows are discarded there). `forward_decoder`
without ids predicts every token.

Choices where the paper / official code leave room (documented here once):

- CLS: in `joint` attention the encoder CLS is simply token 0 of the joint group (it
  attends to and is attended by every visible token: exact ViT / official semantics).
  In `divided` attention (alternate blocks attend within a slice, then within a tube),
  the patch tokens never see the CLS; the CLS is updated by its own small attention over
  [CLS, all tokens] with the same block weights.
- Decoder target: token t reconstructs u = pred_t_dim / T' frames of the clip, the
  frames `linspace(0, num_frames - 1, pred_t_dim).long()` as the official code (the
  paper's 8 of 32 are frames 0, 4, 8, 13, 17, 22, 26, 31): a token's u frames always lie
  inside its own tubelet (checked for every valid config up to 128 frames, so the
  official choice costs nothing). Pixels of a target patch are flattened (u, p, p, C)
  like the official code, so its `decoder_pred` loads unchanged.
- Input: [0, 1] pixels (uint8 / 255 or float), then `(x - mean) / std` per channel with
  ModelConfig.mean / std, for the encoder input and the reconstruction target alike.
  The defaults (0, 1) are the official code's raw [0, 1] input; VideoMAE weights carry
  ImageNet mean / std (adapters.py), and every export carries its own.
- Phase projector: `slice` attention over [slice CLS, the slice's visible tokens]; only
  the CLS rows continue through proj / MLP / norm (the official code discards the other
  rows, using only x[:, 0]), so only the CLS queries are computed.

VideoMAE users with a [B, C, T, H, W] float clip in [0, 1]: `model(video.permute(0, 2, 3, 4, 1))`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from echofm.kernels import ATTENTION_BACKENDS, gather_patches, scatter_tokens

from . import losses
from .blocks import LN_EPS, Attention, Block
from .errors import CheckpointError
from .export_files import (FILES, MAX_PARAMS, check_checksums, check_layout, estimate_params, read_finite,
                           write_checksums)
from .losses import LossConfig
from .masking import Mask, MaskConfig, draw_mask, full_mask

PRESETS: dict[str, dict[str, int]] = {
    # The paper's model (docs/api.md#model-presets).
    "echofm_vit_large": dict(num_frames=32, img_size=224, patch_size=16, tubelet=4, embed_dim=1024, depth=24,
                             num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                             pred_t_dim=8),
    # Single-GPU research size: the VideoMAE-B shape (decoder 384 x 4), full reconstruction.
    "echofm_vit_base": dict(num_frames=16, img_size=224, patch_size=16, tubelet=2, embed_dim=768, depth=12,
                            num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6,
                            pred_t_dim=16),
    # CPU demo and tests.
    "echofm_tiny": dict(num_frames=16, img_size=112, patch_size=16, tubelet=2, embed_dim=192, depth=4,
                        num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                        pred_t_dim=8),
}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture. `preset` fills every field left at None (docs/api.md#model-presets); `resolved()` does it."""

    preset: Literal["echofm_vit_large", "echofm_vit_base", "echofm_tiny"] = "echofm_tiny"
    num_frames: int | None = None
    """Frames per clip T."""
    img_size: int | None = None
    """Square frame side H = W in pixels."""
    patch_size: int | None = None
    """Spatial patch side p."""
    tubelet: int | None = None
    """Frames per token t; T' = num_frames / tubelet temporal slices."""
    in_chans: int = 3
    """Channels C of the clip."""
    embed_dim: int | None = None
    """Encoder width D (also the phase projector's)."""
    depth: int | None = None
    """Encoder blocks."""
    num_heads: int | None = None
    """Encoder (and phase projector) attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width."""
    decoder_embed_dim: int | None = None
    """Decoder width."""
    decoder_depth: int | None = None
    """Decoder blocks."""
    decoder_num_heads: int | None = None
    """Decoder attention heads."""
    pred_t_dim: int | None = None
    """Frames the decoder reconstructs (the paper predicts 8 of 32): a multiple of T'
    dividing num_frames; frames linspace(0, num_frames - 1, pred_t_dim).long() (official)."""
    cls_embed: bool = True
    """Encoder CLS token (the official cls_embed). False: tokens only, as VideoMAE's
    encoder (no cls_token / pos_embed_class; `encode` returns the mean token as cls)."""
    attention: Literal["joint", "divided"] = "joint"
    """Encoder attention: joint over all tokens, or divided (slice then tube, alternating
    blocks) for long clips; divided needs tube masks."""
    attn_backend: Literal["auto", "triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "xformers",
                          "math"] = "auto"
    """tube_attention backend: auto = per call the kernel measured fastest for its shape on this GPU
    (kernels/attention_table.json; SDPA on CPU); sdpa = torch picks; sdpa-cudnn / sdpa-flash /
    sdpa-efficient pin one SDPA kernel; triton, xformers, math force that one. Only auto and
    triton run the masking gathers in Triton (the others: torch)."""
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-channel mean subtracted from [0, 1] pixels inside the patch gather (encoder input
    and reconstruction target). 0 = the official EchoFM input (raw [0, 1] pixels)."""
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel std dividing [0, 1] pixels (1 = the official EchoFM input)."""

    def resolved(self) -> ModelConfig:
        """A copy with every None field taken from the preset."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        base = PRESETS[self.preset]
        fill = {k: v for k, v in base.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def validate(self) -> None:
        c = self.resolved()
        if c.img_size % c.patch_size:
            raise ValueError(f"img_size {c.img_size} is not a multiple of patch_size {c.patch_size}")
        if c.num_frames % c.tubelet:
            raise ValueError(f"num_frames {c.num_frames} is not a multiple of tubelet {c.tubelet}")
        for dim, heads, name in ((c.embed_dim, c.num_heads, ""), (c.decoder_embed_dim, c.decoder_num_heads,
                                                                 "decoder_")):
            if dim % heads:
                raise ValueError(f"{name}embed_dim {dim} is not a multiple of {name}num_heads {heads}")
        t_grid = c.num_frames // c.tubelet
        if c.pred_t_dim % t_grid or c.num_frames % c.pred_t_dim:
            raise ValueError(f"pred_t_dim {c.pred_t_dim} must be a multiple of num_frames/tubelet = {t_grid} "
                             f"and divide num_frames {c.num_frames}")
        if c.attention == "divided" and not c.cls_embed:
            raise ValueError("attention 'divided' needs cls_embed (its CLS row is attended separately)")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTENTION_BACKENDS}, got {self.attn_backend!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need in_chans={self.in_chans} values")

    # Derived sizes (call on a resolved config).
    @property
    def t_grid(self) -> int:
        return self.num_frames // self.tubelet

    @property
    def l_grid(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.tubelet * self.patch_size ** 2

    @property
    def pred_u(self) -> int:
        """Frames each token reconstructs."""
        return self.pred_t_dim // self.t_grid

    @property
    def pred_dim(self) -> int:
        return self.pred_u * self.patch_size ** 2 * self.in_chans


# ---------------------------------------------------------------- model


class EchoFM(nn.Module):
    """The EchoFM video MAE. Parameter names follow the official checkpoints (docs/fidelity.md)
    except: `patch_embed` is a Linear (official: Conv3d `patch_embed.proj`), `attn.qkv`
    is fused (official: attn.q/k/v), and the phase projector is `phase_block`,
    `phase_norm`, `phase_cls_token` (official: decoder_block, prj_norm,
    decoder_prj_cls_token). `echofm.engine.adapters` converts both ways."""

    def __init__(self, model_cfg: ModelConfig | None = None, mask_cfg: MaskConfig | None = None,
                 loss_cfg: LossConfig | None = None):
        super().__init__()
        model_cfg = model_cfg or ModelConfig()
        model_cfg.validate()
        self.cfg = c = model_cfg.resolved()
        self.mask_cfg = mask_cfg or MaskConfig()
        self.loss_cfg = loss_cfg or LossConfig()
        self.mask_cfg.validate()
        self.loss_cfg.validate()
        if c.attention == "divided" and self.mask_cfg.kind != "tube" and self.mask_cfg.ratio > 0:
            raise ValueError(f"attention 'divided' needs mask.kind 'tube' (visible tubes), got {self.mask_cfg.kind!r}")
        self.gather_backend = {"auto": "auto", "triton": "triton"}.get(c.attn_backend, "torch")
        self.grad_checkpointing = False
        # The loss as a hook, so that engine/compile.py can swap in a compiled twin (train.compile.loss).
        self.loss_fn = losses.compute
        d, dd = c.embed_dim, c.decoder_embed_dim

        # Encoder.
        self.patch_embed = nn.Linear(c.patch_dim, d)
        if c.cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, c.l_grid, d))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, c.t_grid, d))
        if c.cls_embed:
            self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, c.attn_backend) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        # Phase projector: one block shared by all slices.
        self.phase_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.phase_block = Block(d, c.num_heads, c.mlp_ratio, c.attn_backend)
        self.phase_norm = nn.LayerNorm(d, eps=LN_EPS)
        # Decoder.
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, c.l_grid, dd))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, c.t_grid, dd))
        self.decoder_pos_embed_class = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_blocks = nn.ModuleList(Block(dd, c.decoder_num_heads, c.mlp_ratio, c.attn_backend)
                                            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=LN_EPS)
        self.decoder_pred = nn.Linear(dd, c.pred_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official code: trunc-normal tokens / pos, xavier Linear (the patch embed
        # as the flattened Conv3d), normal mask token.
        for name in ("cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class", "phase_cls_token",
                     "decoder_cls_token", "decoder_pos_embed_spatial", "decoder_pos_embed_temporal",
                     "decoder_pos_embed_class"):
            if hasattr(self, name):  # no encoder CLS without cls_embed
                nn.init.trunc_normal_(getattr(self, name), std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Attention):  # q, k, v each as its own [D, D] Linear (official)
                for part in m.qkv.weight.data.chunk(3, dim=0):
                    nn.init.xavier_uniform_(part)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (tokens and position embeddings)."""
        return {n for n, _ in self.named_parameters() if n.endswith("_token") or "pos_embed" in n}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder/decoder block activations in backward (torch.utils.checkpoint)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------ helpers

    def _check_video(self, video: torch.Tensor) -> None:
        c = self.cfg
        want = (c.num_frames, c.img_size, c.img_size, c.in_chans)
        if video.dim() != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"EchoFM expects video [B, T, H, W, C] = [B, {', '.join(map(str, want))}] "
                             f"(loader layout; from [B, C, T, H, W] use video.permute(0, 2, 3, 4, 1)), "
                             f"got {tuple(video.shape)}")

    def _backend(self, x: torch.Tensor) -> str:
        """Gather / scatter backend for x: the Triton kernels accumulate in float32, so
        float64 (parity checks) takes the torch path and is never downcast."""
        return "torch" if x.dtype == torch.float64 else self.gather_backend

    def _pos(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        """[1, L, D] + [1, T', D] -> full table [T'L, D] in (t, s) order."""
        return (temporal.transpose(0, 1) + spatial).flatten(0, 1)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, grid: tuple[int, int] | None, divided: bool) -> torch.Tensor:
        for i, blk in enumerate(blocks):
            mode = ("slice" if i % 2 == 0 else "tube") if divided else "joint"
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, grid, mode, use_reentrant=False)
            else:
                x = blk(x, grid, mode)
        return x

    def draw_mask(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Mask:
        return draw_mask(self.mask_cfg, batch, self.cfg.t_grid, self.cfg.l_grid, device, generator)

    # ------------------------------------------------------------ stages

    def forward_encoder(self, video: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, T, H, W, C] -> (latent tokens [B, Nv, D] normed, cls [B, D] normed)."""
        c = self.cfg
        patches = gather_patches(video, mask.ids_keep, (c.tubelet, c.patch_size, c.patch_size),
                                 c.mean, c.std, backend=self._backend(video))  # [B, Nv, C*t*p*p]
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        x = x + self._pos(self.pos_embed_spatial, self.pos_embed_temporal)[mask.ids_keep]
        if not c.cls_embed:  # VideoMAE: tokens only
            x = self.norm(self._run(self.blocks, x, None, False))
            return x, x.mean(1)
        cls = (self.cls_token + self.pos_embed_class).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        divided = c.attention == "divided" and mask.grid is not None
        x = self.norm(self._run(self.blocks, x, mask.grid, divided))
        return x[:, 1:], x[:, 0]

    def forward_phase(self, latent: torch.Tensor, mask: Mask) -> torch.Tensor:
        """latent [B, Nv, D] -> phase embeddings [B, T', D] (one per temporal slice)."""
        c, blk = self.cfg, self.phase_block
        b, d = latent.shape[0], c.embed_dim
        cls = self.phase_cls_token.expand(b, c.t_grid, d)  # [B, T', D]
        if mask.grid is not None:
            t, k = mask.grid
            o = self._phase_slices(latent.view(b, t, k, d))  # CLS rows [B, T', H, Dh]
        else:
            # Slices hold different numbers of visible tokens (random / frame masks): pad
            # each slice to L and mask the absent keys. Only the CLS query is needed.
            full = scatter_tokens(latent, mask.ids_keep, latent.new_zeros(d), c.t_grid * c.l_grid,
                                  backend=self._backend(latent)).view(b, c.t_grid, c.l_grid, d)
            x = torch.cat([cls.unsqueeze(2), full], dim=2)
            q, kk, v = blk.attn.qkv_heads(blk.norm1(x))  # [B, T', H, 1+L, Dh]
            keep = torch.cat([mask.mask.new_ones(b, c.t_grid, 1), 1 - mask.mask.view(b, c.t_grid, c.l_grid)], 2)
            attn_mask = keep.bool()[:, :, None, None, :]  # [B, T', 1, 1, 1+L]
            o = F.scaled_dot_product_attention(q[..., :1, :], kk, v, attn_mask=attn_mask)[..., 0, :]
        z = cls + blk.attn.proj(o.flatten(-2))
        z = z + blk.mlp(blk.norm2(z))
        return self.phase_norm(z)

    def _phase_slices(self, tokens: torch.Tensor) -> torch.Tensor:
        """The phase block's slice attention, CLS queries only: tokens [B, T', K, D] -> the CLS
        rows' attention output [B, T', H, Dh] over [CLS, the slice's K tokens].

        The slice CLS is one learned token, the same row in every slice of every clip: its
        norm1 / q / k / v are computed once; the tokens give keys and values only (their
        queries' outputs would be discarded). The same numbers as attention over all 1 + K
        rows of each slice, then taking row 0."""
        blk = self.phase_block
        attn = blk.attn
        b, t, k, d = tokens.shape
        h = attn.heads
        w, bias = attn.qkv.weight, attn.qkv.bias
        q, k_cls, v_cls = F.linear(blk.norm1(self.phase_cls_token.view(1, d)), w, bias).view(3, 1, h, d // h)
        kv = F.linear(blk.norm1(tokens), w[d:], bias[d:]).view(b, t, k, 2, h, d // h)

        def heads(cls_row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # -> [B, H*T', 1+K, Dh]
            x = torch.cat([cls_row.expand(b, t, 1, h, d // h), rows], dim=2)  # [B, T', 1+K, H, Dh]
            return x.permute(0, 3, 1, 2, 4).flatten(1, 2)

        o = attn._cross(q.view(1, h, 1, 1, d // h).expand(b, h, t, 1, d // h).flatten(1, 2),
                        heads(k_cls, kv[..., 0, :, :]), heads(v_cls, kv[..., 1, :, :]))  # [B, H*T', 1, Dh]
        return o.view(b, h, t, d // h).transpose(1, 2)

    def forward_decoder(self, latent: torch.Tensor, mask: Mask, ids: torch.Tensor | None = None) -> torch.Tensor:
        """latent [B, Nv, D] -> pred [B, N, u*p*p*C] for every token, or with ids int64 [B, M]
        for those tokens only, [B, M, u*p*p*C] (training: the removed ones, the only rows the
        loss reads; the last block then computes only their rows, every token still a key)."""
        c = self.cfg
        n = c.t_grid * c.l_grid
        y = self.decoder_embed(latent)
        x = scatter_tokens(y, mask.ids_keep, self.mask_token.view(-1).to(y.dtype), n, backend=self._backend(y))
        x = x + self._pos(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)
        cls = (self.decoder_cls_token + self.decoder_pos_embed_class).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        if ids is None:
            x = self._run(self.decoder_blocks, x, None, False)
            return self.decoder_pred(self.decoder_norm(x[:, 1:]))
        x = self._run(self.decoder_blocks[:-1], x, None, False)
        x = self._run_rows(self.decoder_blocks[-1], x, ids + 1)  # row 0 is the CLS
        return self.decoder_pred(self.decoder_norm(x))

    def _run_rows(self, blk: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, None, "joint", rows, use_reentrant=False)
        return blk(x, None, "joint", rows)

    # ------------------------------------------------------------ public API

    def forward(self, video: torch.Tensor, mask: Mask | None = None,
                generator: torch.Generator | None = None) -> dict:
        """One pretraining forward. video [B, T, H, W, C] uint8 or float in [0, 1].

        Returns {"loss": scalar, "terms": {"rec", "triplet", "cycle", "active"} (detached),
        "pred" and "target" [B, N - Nv, u*p*p*C]: the removed tokens' predictions and targets
        (norm-pix normalised when enabled) in ids_masked order (`forward_decoder` without ids
        predicts every token), "mask" [B, N] (1 = removed),
        "sim" / "prior" [B, T', T'], "phase" [B, T', D], "ids_keep" [B, Nv], "ids_restore"
        [B, N], "ids_masked" [B, N - Nv]}. The loss is computed in float32, or in
        float64 when the model and clip are float64 (half precision is upcast, never the
        reverse).
        """
        self._check_video(video)
        if mask is None:
            mask = self.draw_mask(video.shape[0], video.device, generator)
        latent, _ = self.forward_encoder(video, mask)
        phase = self.forward_phase(latent, mask)
        # Only the removed tokens are in the loss: their predictions and targets alone (the
        # same sum as the official mask-weighted mean over all N; docs/fidelity.md).
        ids_masked = mask.ids_masked()
        pred = self.forward_decoder(latent, mask, ids_masked)
        lc = self.loss_cfg
        prior = (losses.cycle_prior(video, self.cfg.t_grid, lc.prior_grid, lc.prior_center_alpha)
                 if lc.phase_prior == "pixel" else None)
        out = self.loss_fn(lc, losses.work_dtype(pred), self.target(video, ids_masked), None,
                           losses.work_dtype(phase), prior, valid=None if mask.grid is not None else mask.slice_valid())
        out.update(pred=pred, mask=mask.mask, phase=phase, ids_keep=mask.ids_keep, ids_restore=mask.ids_restore,
                   ids_masked=ids_masked)
        return out

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features without masking: (tokens [B, N, D] in (t, h, w) order, cls [B, D],
        phase [B, T', D]); all after their final LayerNorm."""
        self._check_video(video)
        mask = full_mask(video.shape[0], self.cfg.t_grid, self.cfg.l_grid, video.device)
        tokens, cls = self.forward_encoder(video, mask)
        return tokens, cls, self.forward_phase(tokens, mask)

    # ------------------------------------------------------------ pixels

    def target_frames(self) -> list[int]:
        """Indices of the frames the decoder reconstructs: the official
        `torch.linspace(0, T - 1, pred_t_dim).long()` (float32 linspace, truncated)."""
        c = self.cfg
        return torch.linspace(0, c.num_frames - 1, c.pred_t_dim, dtype=torch.float32).long().tolist()

    def normalize(self, video: torch.Tensor) -> torch.Tensor:
        """[..., C] uint8 or [0, 1] float -> (x - mean) / std, float32 (float64 stays float64)."""
        x = video.float() / 255.0 if video.dtype == torch.uint8 else losses.work_dtype(video)
        mean, std = (torch.tensor(v, dtype=x.dtype, device=video.device) for v in (self.cfg.mean, self.cfg.std))
        return (x - mean) / std

    def target(self, video: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised-pixel target patches [B, M, u*p*p*C] of the predicted frames at the
        tokens `ids` [B, M] (default: all N, in order); float32 (float64 for a float64 clip).

        The same fused gather as the encoder input (uint8 -> normalised float after the pick),
        with patch (u, p, p) over the pred_t_dim frames, in the official decoder_pred
        (u, p, p, C) order (channels_last: the clip's own order, no reordering on CPU)."""
        c = self.cfg
        frames = (video if c.pred_t_dim == c.num_frames else  # index_select: whole frames, not per element
                  video.index_select(1, _frame_index(tuple(self.target_frames()), video.device)))
        b, n = video.shape[0], c.t_grid * c.l_grid
        if ids is None:
            ids = torch.arange(n, device=video.device).expand(b, n).contiguous()
        x = gather_patches(frames, ids, (c.pred_u, c.patch_size, c.patch_size), c.mean, c.std,
                           backend=self._backend(frames), channels_last=True)
        return losses.work_dtype(x)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, u*p*p*C] (pred or target layout) -> frames [B, pred_t_dim, H, W, C]."""
        c = self.cfg
        b, h, p = x.shape[0], c.img_size // c.patch_size, c.patch_size
        x = x.reshape(b, c.t_grid, h, h, c.pred_u, p, p, c.in_chans)
        return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, c.pred_t_dim, c.img_size, c.img_size, c.in_chans)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, out: dict) -> torch.Tensor:
        """For figures: [B, pred_t_dim, H, W, C] float in [0, 1]: visible patches from the clip,
        removed ones from the prediction (un-normalised with each patch's own mean / std
        when norm_pix is on). `out`: the forward's "pred" [B, M, u*p*p*C] at "ids_masked"
        [B, M], or a prediction of every token [B, N, u*p*p*C] with "mask" [B, N]."""
        target = self.target(video)
        pred = out["pred"].float()
        ids = out.get("ids_masked")
        index = None if ids is None else ids[..., None].expand(-1, -1, target.shape[-1])
        if self.loss_cfg.norm_pix:
            own = target if index is None else target.gather(1, index)
            pred = pred * (own.var(-1, keepdim=True) + 1e-6).sqrt() + own.mean(-1, keepdim=True)
        if index is None:  # every token predicted (forward_decoder without ids)
            m = out["mask"].unsqueeze(-1)
            x = self.unpatchify(target * (1 - m) + pred * m)
        else:
            x = self.unpatchify(target.scatter(1, index, pred))
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (self.cfg.mean, self.cfg.std))
        return (x * std + mean).clamp(0, 1)

    # ------------------------------------------------------------ persistence

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write model.safetensors (all weights) + config.json: the resolved ModelConfig
        (input mean / std included), the MaskConfig and the LossConfig the model was built
        with, so whatever it was trained with travels with it (format version 2); and
        checksums.sha256 of both, which `from_pretrained` checks."""
        from safetensors.torch import save_file


        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"format": "echofm", "version": CONFIG_VERSION, "model": dataclasses.asdict(self.cfg),
               "mask": dataclasses.asdict(self.mask_cfg), "loss": dataclasses.asdict(self.loss_cfg)}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        write_checksums(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, mask_cfg: MaskConfig | None = None,
                        loss_cfg: LossConfig | None = None, map_location: str | torch.device = "cpu",
                        attn_backend: str | None = None) -> EchoFM:
        """Load a directory written by save_pretrained (or `echofm export`), in eval mode
        (call `.train()` to fine-tune). mask_cfg / loss_cfg / attn_backend, when given,
        replace the saved ones; version-1 files (no "mask" / "loss") get the current
        defaults for those two."""
        # Checked before anything is built or read (engine/export_files.py, docs/failures.md).
        path = Path(path)
        for f in FILES:
            if not (path / f).is_file():
                raise CheckpointError(f"{path / f}: missing (expected a folder written by "
                                      "EchoFM.save_pretrained or `echofm export`)")
        check_checksums(path)
        mcfg, mask, loss = _configs_from_json(path / "config.json", attn_backend)
        with torch.device("meta"):  # shapes and dtypes only: nothing allocated
            want = {k: (v.dtype, list(v.shape)) for k, v in cls(mcfg, mask, loss).state_dict().items()}
        weights = path / "model.safetensors"
        check_layout(weights, want)
        model = cls(mcfg, mask_cfg or mask, loss_cfg or loss)
        model.load_state_dict(read_finite(weights))
        return model.to(map_location).eval()


@functools.lru_cache(maxsize=16)
def _frame_index(frames: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The target frames as an index tensor on `device`, made once: no host-to-device copy
    per step (which a CUDA graph capture would refuse)."""
    return torch.tensor(frames, device=device)


CONFIG_VERSION = 2
"""config.json format: 1 = model only; 2 = model + mask + loss."""


def _section(cfg_cls: type, data: dict, file: Path, name: str) -> dict:
    """One config.json section -> constructor kwargs for cfg_cls (unknown keys named)."""
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{file}: unknown {name} keys {unknown}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _configs_from_json(f: Path, attn_backend: str | None) -> tuple[ModelConfig, MaskConfig, LossConfig]:
    """config.json -> its configs, the model bounded in size before anything is built;
    CheckpointError naming the file."""
    if f.stat().st_size > 2**20:
        raise CheckpointError(f"{f}: {f.stat().st_size} bytes: not an EchoFM config.json")
    try:
        data = json.loads(f.read_text())
        if data.get("format") != "echofm" or not isinstance(data.get("model"), dict):
            raise ValueError("no 'format': 'echofm' / 'model'")
        kw = _section(ModelConfig, data["model"], f, "model")
        if attn_backend is not None:
            kw["attn_backend"] = attn_backend
        mcfg = ModelConfig(**kw)
        mcfg.validate()
        res = mcfg.resolved()
        sizes = ("img_size", "patch_size", "num_frames", "tubelet", "embed_dim", "depth", "num_heads",
                 "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "pred_t_dim", "in_chans")
        if any(not isinstance(getattr(res, k), int) or getattr(res, k) < 1 for k in sizes):
            raise ValueError(f"model sizes must be positive integers: {[k for k in sizes if not isinstance(getattr(res, k), int) or getattr(res, k) < 1]}")
        n = estimate_params(res)
        if n > MAX_PARAMS:
            raise ValueError(f"asks for a model of ~{n / 1e9:.1f} B parameters ({4 * n / 2**30:.0f} GiB), "
                             f"more than {MAX_PARAMS / 1e9:.0f} B: refused")
        mask = MaskConfig(**_section(MaskConfig, data.get("mask", {}), f, "mask"))
        loss = LossConfig(**_section(LossConfig, data.get("loss", {}), f, "loss"))
    except (ValueError, TypeError, AttributeError, KeyError, ArithmeticError) as e:  # e.g. patch_size 0
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
    return mcfg, mask, loss


__all__ = ["EchoFM", "ModelConfig", "PRESETS"]
