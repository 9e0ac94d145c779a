"""Reference models for the fidelity tests, written here from the published architectures
and losses (no code copied): the official EchoFM `MaskedAutoencoderViT` (SekeunKim/EchoFM:
sep_pos_embed, cls_embed, separate q/k/v, projector block + prj_norm, the pixel cycle prior,
the hard-mined triplet and the cycle KL) and the VideoMAE encoder (MCG-NJU: fused qkv with
q/v biases, no CLS, a fixed position table). Plain torch on state dicts with the published
key names; inputs in the published layout [N, C, T, H, W].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6  # LayerNorm eps of the published factories


def official_state_dict(a: dict, device: str = "cpu", prj_norm: bool = True, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> dict:
    """Official names and shapes; every tensor random (LayerNorm scales 1 + noise): no zero
    bias or unit scale can hide a mapping bug. a: d, depth, heads, dd, ddepth, dheads, c, t,
    p, tg, lg, u (see test files)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def new(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=g, dtype=dtype) * 0.1

    def lin(name, out, inp):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = new(out, inp), new(out)

    def ln(name, dim):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + new(dim), new(dim)

    def block(pre, dim):
        ln(f"{pre}.norm1", dim)
        for x in "qkv":
            lin(f"{pre}.attn.{x}", dim, dim)
        lin(f"{pre}.attn.proj", dim, dim)
        ln(f"{pre}.norm2", dim)
        lin(f"{pre}.mlp.fc1", 4 * dim, dim)
        lin(f"{pre}.mlp.fc2", dim, 4 * dim)

    d, dd = a["d"], a["dd"]
    sd["cls_token"], sd["decoder_cls_token"], sd["decoder_prj_cls_token"] = new(1, 1, d), new(1, 1, dd), new(1, 1, d)
    sd["pos_embed_spatial"], sd["pos_embed_temporal"] = new(1, a["lg"], d), new(1, a["tg"], d)
    sd["pos_embed_class"] = new(1, 1, d)
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = new(d, a["c"], a["t"], a["p"], a["p"]), new(d)
    for i in range(a["depth"]):
        block(f"blocks.{i}", d)
    block("decoder_block", d)
    ln("norm", d)
    if prj_norm:
        ln("prj_norm", d)
    lin("decoder_embed", dd, d)
    sd["mask_token"] = new(1, 1, dd)
    sd["decoder_pos_embed_spatial"], sd["decoder_pos_embed_temporal"] = new(1, a["lg"], dd), new(1, a["tg"], dd)
    sd["decoder_pos_embed_class"] = new(1, 1, dd)
    for i in range(a["ddepth"]):
        block(f"decoder_blocks.{i}", dd)
    ln("decoder_norm", dd)
    lin("decoder_pred", a["u"] * a["p"] ** 2 * a["c"], dd)
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=EPS)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _attend(q, k, v, heads):
    """q, k, v [B, n, C] -> softmax(q k^T / sqrt(Dh)) v per head, [B, n, C]."""
    b, n, c = q.shape
    q, k, v = (x.reshape(b, n, heads, c // heads).transpose(1, 2) for x in (q, k, v))
    w = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


def official_block(x, sd, pre, heads):
    """Pre-norm ViT block with separate q, k, v Linears (the official video_vit.Block)."""
    h = _ln(x, sd, f"{pre}.norm1")
    x = x + _lin(_attend(*(_lin(h, sd, f"{pre}.attn.{z}") for z in "qkv"), heads), sd, f"{pre}.attn.proj")
    return x + _lin(F.gelu(_lin(_ln(x, sd, f"{pre}.norm2"), sd, f"{pre}.mlp.fc1")), sd, f"{pre}.mlp.fc2")


def tube_masking(noise, t_grid, ratio):
    """One spatial keep-set per clip from noise [N, L]: int(L * (1 - ratio)) lowest-noise
    positions, ascending, at every slice. -> (ids_keep [N, T'K], mask [N, T'L], ids_restore)."""
    n, l_grid = noise.shape
    keep = int(l_grid * (1 - ratio))
    spatial = noise.argsort(1)[:, :keep].sort(1).values
    ids_keep = (spatial[:, None] + torch.arange(t_grid)[None, :, None] * l_grid).reshape(n, -1)
    mask = torch.ones(n, t_grid * l_grid, dtype=noise.dtype).scatter(1, ids_keep, 0.0)
    ids_restore = mask.argsort(dim=1, stable=True).argsort(dim=1)
    return ids_keep, mask, ids_restore


def official_forward(sd, imgs, a, noise, ratio, *, norm_pix=False, triplet_weight=1.0, triplet_margin=0.2,
                     cycle_weight=1.0, cycle_tau=0.1, prior_center_alpha=1.0, phase_prior="pixel",
                     prj="prj_norm"):
    """The official MaskedAutoencoderViT forward on imgs [N, C, T, H, W] (raw [0, 1]) with the
    tube mask drawn from `noise` [N, L]. -> dict of latent, phase, pred, mask, ids_restore,
    rec, triplet, cycle, active, loss."""
    n, d, tg, lg = imgs.shape[0], a["d"], a["tg"], a["lg"]
    x = F.conv3d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(a["t"], a["p"], a["p"]))
    x = x.flatten(3).permute(0, 2, 3, 1).reshape(n, tg * lg, d)  # (t, s) order
    ids_keep, mask, ids_restore = tube_masking(noise, tg, ratio)
    pos = sd["pos_embed_spatial"].repeat(1, tg, 1) + sd["pos_embed_temporal"].repeat_interleave(lg, 1)
    x = (x + pos).gather(1, ids_keep[..., None].expand(-1, -1, d))
    x = torch.cat([(sd["cls_token"] + sd["pos_embed_class"]).expand(n, -1, -1), x], 1)
    for i in range(a["depth"]):
        x = official_block(x, sd, f"blocks.{i}", a["heads"])
    latent = _ln(x, sd, "norm")[:, 1:]
    # projector: per slice [prj CLS, the slice's tokens] -> shared block -> prj_norm -> CLS
    per_slice = latent.reshape(n, tg, -1, d)
    phase = torch.stack([_ln(official_block(torch.cat([sd["decoder_prj_cls_token"].expand(n, -1, -1),
                                                       per_slice[:, t]], 1), sd, "decoder_block", a["heads"]),
                             sd, prj)[:, 0] for t in range(tg)], 1)
    pred = _official_decoder(sd, latent, ids_restore, a)
    out = {"latent": latent, "phase": phase, "pred": pred, "mask": mask, "ids_restore": ids_restore}
    out["rec"] = _official_rec(imgs, pred, mask, a, norm_pix)
    z = F.normalize(phase, dim=-1)
    sim = z @ z.transpose(1, 2)
    prior = official_prior(imgs, tg, prior_center_alpha) if phase_prior == "pixel" else sim.detach()
    out["triplet"], out["active"] = official_triplet(sim, prior, triplet_margin)
    out["cycle"] = official_cycle(sim, prior, cycle_tau)
    out["loss"] = out["rec"] + triplet_weight * out["triplet"] + cycle_weight * out["cycle"]
    return out


def _official_decoder(sd, latent, ids_restore, a):
    n, dd, tg, lg = latent.shape[0], a["dd"], a["tg"], a["lg"]
    y = _lin(latent, sd, "decoder_embed")
    y = torch.cat([y, sd["mask_token"].expand(n, tg * lg - y.shape[1], -1)], 1)
    y = y.gather(1, ids_restore[..., None].expand(-1, -1, dd))  # unshuffle
    pos = sd["decoder_pos_embed_spatial"].repeat(1, tg, 1) + sd["decoder_pos_embed_temporal"].repeat_interleave(lg, 1)
    y = torch.cat([(sd["decoder_cls_token"] + sd["decoder_pos_embed_class"]).expand(n, -1, -1), y + pos], 1)
    for i in range(a["ddepth"]):
        y = official_block(y, sd, f"decoder_blocks.{i}", a["dheads"])
    return _lin(_ln(y, sd, "decoder_norm"), sd, "decoder_pred")[:, 1:]


def _official_rec(imgs, pred, mask, a, norm_pix):
    """Target: frames linspace(0, T-1, pred_t_dim).long(), patches (u, p, q, c) flattened."""
    n, c, t = imgs.shape[:3]
    u, p, tg = a["u"], a["p"], a["tg"]
    frames = imgs[:, :, torch.linspace(0, t - 1, u * tg).long()]
    h = frames.shape[-1] // p
    x = frames.reshape(n, c, tg, u, h, p, h, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(n, tg * h * h, -1)
    if norm_pix:
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - x) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def official_prior(imgs, t_grid, alpha=1.0, grid=32):
    """Pixel cycle prior: gray, per-token frame mean, pool to grid^2, minus each frame's
    spatial mean, minus alpha x the temporal mean, cosine."""
    n = imgs.shape[0]
    x = imgs.mean(1)
    x = x.reshape(n, t_grid, -1, *x.shape[-2:]).mean(2)
    x = F.adaptive_avg_pool2d(x, grid).flatten(2)
    x = x - x.mean(-1, keepdim=True)
    x = F.normalize(x - alpha * x.mean(1, keepdim=True), dim=-1)
    return x @ x.transpose(1, 2)


def official_triplet(sim, prior, margin):
    """Loop form: positives above the row mean (j != i, mean over T-1), negatives the rest
    with |i - j| > 1; hardest in sim; mean hinge over anchors having both."""
    hinges = []
    t = sim.shape[-1]
    for b in range(sim.shape[0]):
        for i in range(t):
            others = [j for j in range(t) if j != i]
            mean = sum(prior[b, i, j] for j in others) / (t - 1)
            pos = [j for j in others if prior[b, i, j] > mean]
            neg = [j for j in others if not prior[b, i, j] > mean and abs(i - j) > 1]
            if pos and neg:
                ap = min(sim[b, i, j] for j in pos)
                an = max(sim[b, i, j] for j in neg)
                hinges.append(F.relu(an - ap + margin))
    if not hinges:
        return sim.sum() * 0.0, sim.new_zeros(())
    h = torch.stack(hinges)
    return h.mean(), (h > 0).to(sim.dtype).mean()


def official_cycle(sim, prior, tau):
    """KL(softmax(P_i / tau) || softmax(S_i / tau)) over j != i, summed, mean over all rows."""
    t = sim.shape[-1]
    kls = []
    for b in range(sim.shape[0]):
        for i in range(t):
            idx = [j for j in range(t) if j != i]
            q = torch.softmax(prior[b, i, idx] / tau, 0)
            logp = torch.log_softmax(sim[b, i, idx] / tau, 0)
            kls.append((q * (q.log() - logp)).sum())
    return torch.stack(kls).mean()


# ---------------------------------------------------------------- VideoMAE


def videomae_encoder(sd, imgs, pos_table, heads, tubelet, patch):
    """The VideoMAE encoder (no CLS) on ImageNet-normalised imgs [N, C, T, H, W] with keys
    `encoder.*`: conv patch embed, + fixed table [N_tokens, D], blocks with fused qkv and
    bias (q_bias, 0, v_bias), final norm. -> tokens [N, N_tokens, D]."""
    e = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    x = F.conv3d(imgs, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=(tubelet, patch, patch))
    x = x.flatten(2).transpose(1, 2) + pos_table
    d = x.shape[-1]
    for i in range(len({k.split(".")[1] for k in e if k.startswith("blocks.")})):
        pre = f"blocks.{i}"
        h = _ln(x, e, f"{pre}.norm1")
        bias = torch.cat([e[f"{pre}.attn.q_bias"], torch.zeros_like(e[f"{pre}.attn.q_bias"]), e[f"{pre}.attn.v_bias"]])
        q, k, v = F.linear(h, e[f"{pre}.attn.qkv.weight"], bias).split(d, -1)
        x = x + _lin(_attend(q, k, v, heads), e, f"{pre}.attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, e, f"{pre}.norm2"), e, f"{pre}.mlp.fc1")), e, f"{pre}.mlp.fc2")
    return _ln(x, e, "norm")


def videomae_state_dict(d=32, depth=2, c=3, t=2, p=8, seed=0):
    """A VideoMAE pretraining checkpoint's keys (encoder.* plus decoder keys), random values."""
    g = torch.Generator().manual_seed(seed)

    def new(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"encoder.patch_embed.proj.weight": new(d, c, t, p, p), "encoder.patch_embed.proj.bias": new(d)}
    for i in range(depth):
        pre = f"encoder.blocks.{i}"
        sd.update({f"{pre}.norm1.weight": 1 + new(d), f"{pre}.norm1.bias": new(d),
                   f"{pre}.attn.qkv.weight": new(3 * d, d), f"{pre}.attn.q_bias": new(d), f"{pre}.attn.v_bias": new(d),
                   f"{pre}.attn.proj.weight": new(d, d), f"{pre}.attn.proj.bias": new(d),
                   f"{pre}.norm2.weight": 1 + new(d), f"{pre}.norm2.bias": new(d),
                   f"{pre}.mlp.fc1.weight": new(4 * d, d), f"{pre}.mlp.fc1.bias": new(4 * d),
                   f"{pre}.mlp.fc2.weight": new(d, 4 * d), f"{pre}.mlp.fc2.bias": new(d)})
    sd.update({"encoder.norm.weight": 1 + new(d), "encoder.norm.bias": new(d),
               "encoder_to_decoder.weight": new(16, d), "mask_token": new(1, 1, 16),
               "decoder.head.weight": new(c * t * p * p, 16)})
    return sd
