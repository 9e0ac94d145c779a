"""Fidelity: `load_official(path)` (no other argument) gives the official EchoFM model's
features, prediction and every loss term in float64; the VideoMAE adapter gives the
VideoMAE encoder's tokens. References: tests/official_reference.py (written from the
published architectures and losses). docs/fidelity.md has the side-by-side numbers
against the official code itself.
"""
import argparse
import math

import pytest
import torch

from echofm.engine.adapters import (IMAGENET_MEAN, IMAGENET_STD, convert_official, export_official, load_official,
                                    load_videomae, separable_projection, sinusoid_table)
from echofm.engine.losses import LossConfig
from echofm.engine.masking import MaskConfig
from official_reference import official_forward, official_state_dict, videomae_encoder, videomae_state_dict

# 16 frames of 48^2, patch 8, tubelet 2 -> T' = 8 slices of L = 36 patches; the decoder
# predicts 8 of the 16 frames (linspace picks frame 15 where arange would pick 14); mask
# 0.9 keeps int(3.6) = 3 positions per slice (round() would keep 4).
A = dict(d=32, depth=2, heads=2, dd=16, ddepth=1, dheads=2, c=3, t=2, p=8, tg=8, lg=36, u=1)
ARCH = dict(num_heads=2, decoder_num_heads=2, num_frames=16, t_patch_size=2, pred_t_dim=8)
CUSTOM = dict(norm_pix_loss=True, triplet_weight=0.7, triplet_margin=0.25, cycle_weight=0.6, cycle_tau=0.15,
              prior_center_alpha=0.9, mask_ratio=0.9)
TOL = 1e-10  # float64 end to end: any float32 step would show as ~1e-7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel(a, b):
    """max |a - b| / max |b| (absolute below 1e-3: the embed-prior KL is 0 up to rounding)."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-3))


def _clip(n=2, t=16, s=48, seed=0):
    """[N, 3, T, H, W] float64 in [0, 1]: a disk pulsing with a 6-frame period, noise and
    global flicker (which the official prior's per-frame centring removes)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    r = torch.hypot(yy - s / 2 + 0.5, xx - s / 2 + 0.5).double()
    frames = [[(r < s * (0.22 + 0.1 * math.sin(2 * math.pi * (f + 2 * b) / 6))).double() * 0.7 + 0.1
               + 0.05 * math.sin(f) for f in range(t)] for b in range(n)]
    x = torch.stack([torch.stack(fs) for fs in frames])[:, None].expand(-1, 3, -1, -1, -1)
    return (x + 0.1 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def _weights(seed=0, **kw):
    """Official weights, float32 values (as released) held in float64 for the reference."""
    return {k: v.float().double() for k, v in official_state_dict(A, seed=seed, **kw).items()}


def _save(tmp_path, sd, settings, key="model_args"):
    path = tmp_path / "official.pth"
    args = {**ARCH, **settings}
    torch.save({"model": {k: v.float() for k, v in sd.items()},
                key: argparse.Namespace(**args) if key == "args" else args}, path)
    return path


def _reference_kw(settings):
    keys = ("triplet_weight", "triplet_margin", "cycle_weight", "cycle_tau", "prior_center_alpha", "phase_prior")
    return {"norm_pix": settings.get("norm_pix_loss", False), **{k: settings[k] for k in keys if k in settings}}


def _ours(model, video, seed):
    """Our outputs for the mask `seed` draws (the official code draws torch.rand(N, L))."""
    mask = model.draw_mask(video.shape[0], video.device, torch.Generator().manual_seed(seed))
    latent, _ = model.forward_encoder(video, mask)
    return mask, latent, model.forward_phase(latent, mask), model(video, mask=mask)


@pytest.mark.parametrize("settings,key", [({}, "model_args"), (CUSTOM, "model_args"),
                                          ({"phase_prior": "embed", "mask_ratio": 0.5}, "args")],
                         ids=["official-defaults", "custom-settings", "training-args-embed-prior"])
def test_load_official_reproduces_the_official_forward(tmp_path, settings, key):
    sd = _weights()
    model = load_official(_save(tmp_path, sd, settings, key)).double()  # nothing but the path
    imgs = _clip()
    video = imgs.permute(0, 2, 3, 4, 1)  # ours: [B, T, H, W, C]
    ratio = settings.get("mask_ratio", 0.75)
    noise = torch.rand(2, A["lg"], generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    ref = official_forward(sd, imgs, A, noise, ratio, **_reference_kw(settings))
    mask, latent, phase, out = _ours(model, video, seed=5)
    assert torch.equal(mask.mask, ref["mask"].float()) and torch.equal(mask.ids_restore, ref["ids_restore"])
    assert mask.grid[1] == int(36 * (1 - ratio))
    # The training forward predicts the removed tokens only (the loss reads nothing else);
    # forward_decoder without ids predicts every token.
    removed = ref["pred"].gather(1, out["ids_masked"][..., None].expand(-1, -1, ref["pred"].shape[-1]))
    got = {"latent": latent, "phase": phase, "pred": out["pred"], "rec": out["terms"]["rec"],
           "triplet": out["terms"]["triplet"], "cycle": out["terms"]["cycle"], "active": out["terms"]["active"],
           "loss": out["loss"]}
    errors = {k: _rel(v, removed if k == "pred" else ref[k]) for k, v in got.items()}
    errors["pred (every token)"] = _rel(model.forward_decoder(latent, mask), ref["pred"])
    assert max(errors.values()) < TOL, errors
    assert ref["triplet"] > 0 and (ref["cycle"] > 0 or settings.get("phase_prior") == "embed")


def test_official_gradients_match(tmp_path):
    """The loss is the official one in backward too (hardest pairs picked as argmin / argmax)."""
    sd = _weights(seed=2)
    model = load_official(_save(tmp_path, sd, CUSTOM)).double()
    imgs = _clip(seed=1)
    leaves = {k: v.clone().requires_grad_() for k, v in sd.items()}
    noise = torch.rand(2, A["lg"], generator=torch.Generator().manual_seed(3))
    official_forward(leaves, imgs, A, noise, 0.9, **_reference_kw(CUSTOM))["loss"].backward()
    model(imgs.permute(0, 2, 3, 4, 1), mask=model.draw_mask(2, "cpu", torch.Generator().manual_seed(3)))[
        "loss"].backward()
    want = convert_official({k: v.grad for k, v in leaves.items()})
    errors = {k: _rel(p.grad, want[k]) for k, p in model.named_parameters()}
    assert max(errors.values()) < 1e-9, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("prj_norm", [True, False])
def test_encode_is_the_official_unmasked_encoder_and_projector(prj_norm):
    """README usage: forward_encoder(imgs, mask_ratio=0) + forward_prj on raw [0, 1] clips;
    checkpoints from before prj_norm existed run the projector through `norm`."""
    sd = _weights(seed=1, prj_norm=prj_norm)
    model = load_official({"model": sd, "model_args": ARCH}).double().eval()
    imgs = _clip(n=1)
    prj = "prj_norm" if prj_norm else "norm"
    ref = official_forward(sd, imgs, A, torch.rand(1, A["lg"]), 0.0, prj=prj)
    tokens, _, phase = model.encode(imgs.permute(0, 2, 3, 4, 1))
    assert _rel(tokens, ref["latent"]) < TOL and _rel(phase, ref["phase"]) < TOL
    # the loader's uint8 clips: the same features up to float32 arithmetic
    u8 = (imgs * 255).round().to(torch.uint8)
    ref8 = official_forward(sd, u8.double() / 255, A, torch.rand(1, A["lg"]), 0.0, prj=prj)
    assert _rel(model.encode(u8.permute(0, 2, 3, 4, 1))[0], ref8["latent"]) < 1e-5


def test_official_settings_and_defaults_travel(tmp_path):
    model = load_official(_save(tmp_path, _weights(), CUSTOM))
    lc = model.loss_cfg
    assert (lc.variant, lc.norm_pix, lc.triplet_weight, lc.triplet_margin, lc.cycle_weight, lc.cycle_tau,
            lc.prior_center_alpha, lc.prior_grid) == ("official", True, 0.7, 0.25, 0.6, 0.15, 0.9, 32)
    assert (model.mask_cfg.kind, model.mask_cfg.ratio) == ("tube", 0.9)
    assert model.cfg.mean == (0.0, 0.0, 0.0) and model.cfg.std == (1.0, 1.0, 1.0)
    assert model.adapter_report["defaulted"] == ["phase_prior"]
    bare = load_official({"model": _weights(), "model_args": ARCH})
    assert bare.loss_cfg == LossConfig(norm_pix=False)  # MaskedAutoencoderViT defaults
    assert bare.mask_cfg == MaskConfig(kind="tube", ratio=0.75)


def test_export_official_round_trip_keeps_every_setting(tmp_path):
    """Our settings the official code has no key for travel in model_args["echofm"]."""
    model = load_official({"model": _weights(), "model_args": ARCH}, mask_cfg=MaskConfig(ratio=0.6),
                          loss_cfg=LossConfig(variant="centred", triplet_weight=0.3, prior_grid=8))
    model.cfg.mean, model.cfg.std = IMAGENET_MEAN, IMAGENET_STD
    torch.save(export_official(model), tmp_path / "x.pth")
    back = load_official(tmp_path / "x.pth")
    assert back.loss_cfg == model.loss_cfg and back.mask_cfg == model.mask_cfg
    assert back.cfg.mean == IMAGENET_MEAN and back.cfg.std == IMAGENET_STD


# ---------------------------------------------------------------- VideoMAE


def _separable_table(t_grid, l_grid, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    temporal, spatial = torch.randn(t_grid, 1, d, generator=g), torch.randn(1, l_grid, d, generator=g)
    return (temporal + spatial).reshape(1, t_grid * l_grid, d)


def test_videomae_encoder_equals_the_videomae_structure():
    """VideoMAE: no CLS, ImageNet-normalised input, a fixed table added to all tokens. With
    a separable table (the only kind our spatial + temporal embedding holds exactly) the
    tokens equal VideoMAE's; the mean / std travel with the model."""
    sd = videomae_state_dict()
    table = _separable_table(4, 16, 32).double()
    sd["encoder.pos_embed"] = table.float()
    model = load_videomae({"model": sd}, num_frames=8, img_size=32, num_heads=2).double().eval()
    assert not model.cfg.cls_embed and model.cfg.mean == IMAGENET_MEAN and model.cfg.std == IMAGENET_STD
    assert model.adapter_report["pos_residual"] < 1e-6
    video = torch.rand(2, 8, 32, 32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, std = torch.tensor(IMAGENET_MEAN, dtype=torch.float64), torch.tensor(IMAGENET_STD, dtype=torch.float64)
    imgs = ((video - mean) / std).permute(0, 4, 1, 2, 3)
    ref = videomae_encoder({k: v.double() for k, v in sd.items()}, imgs, table, heads=2, tubelet=2, patch=8)
    tokens, cls, _ = model.encode(video)
    assert _rel(tokens, ref) < 1e-6  # the projected table is stored in float32
    torch.testing.assert_close(cls, tokens.mean(1))
    raw = videomae_encoder({k: v.double() for k, v in sd.items()}, video.permute(0, 4, 1, 2, 3), table, 2, 2, 8)
    assert _rel(tokens, raw) > 1e-2  # the normalisation matters


def test_videomae_position_residual_is_the_least_squares_one():
    """The sinusoid table is not separable: the loader reports how far its projection is,
    and that projection is the least-squares optimum."""
    t_grid, l_grid, d = 4, 16, 32
    table = sinusoid_table(t_grid * l_grid, d)
    spatial, temporal, resid = separable_projection(table, t_grid)
    design = torch.zeros(t_grid * l_grid, t_grid + l_grid, dtype=torch.float64)
    for t in range(t_grid):
        for s in range(l_grid):
            design[t * l_grid + s, t] = design[t * l_grid + s, t_grid + s] = 1.0
    coef = torch.linalg.lstsq(design, table, driver="gelsd").solution
    fit = design @ coef
    torch.testing.assert_close((temporal[:, None] + spatial[None]).reshape(-1, d), fit)
    assert resid == pytest.approx(float((table - fit).norm() / table.norm()), rel=1e-9)
    assert 0.05 < resid < 1
    model = load_videomae({"model": videomae_state_dict()}, num_frames=8, img_size=32, num_heads=2)
    assert model.adapter_report["pos_residual"] == pytest.approx(resid, rel=1e-9)
    assert any("residual" in n for n in model.adapter_report["notes"])
