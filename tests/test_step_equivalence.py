"""The CPU step's shortcuts are the same model: each new path against the plain computation
it replaces, in float64 (loss and every gradient), and the uint8 fast paths bit for bit.

Shortcuts (benchmarks/train.py's "ours" vs "plain"): the visible patches picked before the
clip is converted; the loss, the decoder's last block and head on the removed tokens only;
the phase projector's slice CLS computed once with the tokens as keys and values only; the
norm-pix target as one layer_norm; the cycle prior's grey levels summed in integers; fused
AdamW on CPU.
"""
import pytest
import torch
import torch.nn.functional as F

from echofm.engine import losses
from echofm.engine.losses import LossConfig
from echofm.engine.masking import MaskConfig, random_mask, tube_mask
from echofm.engine.model import EchoFM, ModelConfig
from echofm.kernels import gather_patches, reference, tube_attention

SMALL = dict(preset="echofm_tiny", num_frames=8, img_size=32, patch_size=8, tubelet=2, embed_dim=64, depth=2,
             num_heads=2, decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=3, pred_t_dim=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _video(b=2, seed=0, t=8, s=32):
    return torch.randint(0, 256, (b, t, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _plain_phase(m: EchoFM, latent: torch.Tensor, mask) -> torch.Tensor:
    """The official projector: the block's q, k, v on every [slice CLS, slice tokens] row."""
    blk, (t, k) = m.phase_block, mask.grid
    b, d = latent.shape[0], m.cfg.embed_dim
    cls = m.phase_cls_token.expand(b, t, d)
    x = torch.cat([cls.unsqueeze(2), latent.view(b, t, k, d)], dim=2)
    q, kk, v = (a.transpose(1, 2) for a in blk.attn.qkv_heads(blk.norm1(x)))
    o = tube_attention(q, kk, v, "slice", backend="math")[:, :, :, 0].transpose(1, 2)
    z = cls + blk.attn.proj(o.flatten(-2))
    return m.phase_norm(z + blk.mlp(blk.norm2(z)))


def _plain_loss(m: EchoFM, video: torch.Tensor, mask) -> torch.Tensor:
    """The official objective: every token predicted, the norm-pix target of every patch with
    Tensor.var, the mask-weighted mean, the prior from the whole clip."""
    lc = m.loss_cfg
    latent, _ = m.forward_encoder(video, mask)
    phase = _plain_phase(m, latent, mask)
    pred = m.forward_decoder(latent, mask)  # [B, N, P]
    target = m.target(video)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    per_patch = (pred - (target - mean) / (var + 1e-6) ** 0.5).pow(2).mean(-1)
    rec = (per_patch * mask.mask).sum() / mask.mask.sum()
    x = video.mean(-1).view(video.shape[0], m.cfg.t_grid, -1, *video.shape[2:4]).mean(2)
    x = F.adaptive_avg_pool2d(x, lc.prior_grid).flatten(2)
    x = x - x.mean(-1, keepdim=True)
    x = F.normalize(x - lc.prior_center_alpha * x.mean(1, keepdim=True), dim=-1)
    prior = torch.bmm(x, x.transpose(1, 2))
    sim = losses.phase_similarity(phase, lc.variant, lc.centre_eps)
    trip, _ = losses.periodic_contrastive(sim, prior, lc.triplet_margin)
    return rec + lc.triplet_weight * trip + lc.cycle_weight * losses.cycle_kl(sim, prior, lc.cycle_tau)


@pytest.mark.parametrize("variant", ["official", "centred"])
def test_training_forward_equals_the_plain_objective_in_float64(variant):
    """Loss and every parameter's gradient: the shortcuts change nothing but rounding."""
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL, attn_backend="math"), MaskConfig(ratio=0.75),
               LossConfig(variant=variant, triplet_weight=0.7, cycle_weight=0.6)).double()
    video = _video().double() / 255
    mask = m.draw_mask(2, "cpu", torch.Generator().manual_seed(1))
    got = m(video, mask=mask)["loss"]
    got.backward()
    ours = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    want = _plain_loss(m, video, mask)
    want.backward()
    assert abs(got.item() - want.item()) < 1e-12 * abs(want.item())
    for k, p in m.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-10, atol=1e-13, msg=k)


def test_the_last_decoder_block_on_some_rows_is_those_rows_of_the_full_block():
    torch.manual_seed(0)
    for backend in ("math", "sdpa"):
        m = EchoFM(ModelConfig(**SMALL, attn_backend=backend)).double()
        blk = m.decoder_blocks[-1]
        x = torch.randn(2, 33, 48, dtype=torch.float64)
        rows = torch.tensor([[1, 5, 6, 32], [0, 2, 3, 31]])
        full = blk(x)
        torch.testing.assert_close(blk(x, rows=rows), full.gather(1, rows[..., None].expand(-1, -1, 48)),
                                   rtol=1e-12, atol=1e-12)


def test_phase_slices_equal_the_official_projector():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL)).double()
    mask = tube_mask(2, 4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(2, 4 * 4, 64, dtype=torch.float64)
    torch.testing.assert_close(m.forward_phase(latent, mask), _plain_phase(m, latent, mask), rtol=1e-12, atol=1e-12)


def test_ids_masked_are_the_removed_tokens():
    for mask in (tube_mask(3, 4, 16, 0.75, generator=torch.Generator().manual_seed(2)),
                 random_mask(3, 4, 16, 0.6, generator=torch.Generator().manual_seed(2))):
        ids = mask.ids_masked()
        assert ids.shape == (3, 64 - mask.num_visible)
        assert torch.equal(mask.mask.gather(1, ids), torch.ones_like(ids, dtype=torch.float32))
        both = torch.cat([mask.ids_keep, ids], 1).sort(1).values
        assert torch.equal(both, torch.arange(64).expand(3, -1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_patches_picks_before_converting_bit_for_bit(channels_last):
    """uint8: the same floats as normalising the whole clip, patchifying, then gathering;
    float64: the same values and the same gradient."""
    video = _video(2, 3)
    ids = torch.rand(2, 64).argsort(1)[:, :20]
    mean, std = (0.1, 0.45, 0.9), (0.2, 0.3, 0.7)
    patch = (2, 8, 8)
    scale, shift = reference.device_norm(3, True, mean, std, "cpu", torch.float32)

    def plain(x):  # [B, K, C*t*p*p], (C, t, p, p) order
        out = reference.gather_tokens(reference.patchify(x, patch), ids)
        if channels_last:
            out = out.view(2, 20, 3, -1).transpose(2, 3).reshape(2, 20, -1)
        return out

    got = gather_patches(video, ids, patch, mean, std, backend="torch", channels_last=channels_last)
    assert torch.equal(got, plain(video.float() * scale + shift))
    v64 = (video.double() / 255).requires_grad_()
    got = gather_patches(v64, ids, patch, backend="torch", channels_last=channels_last)
    assert torch.equal(got, plain(v64))
    g = torch.randn_like(got)
    (a,) = torch.autograd.grad(got, v64, g)
    (b,) = torch.autograd.grad(plain(v64), v64, g)
    assert torch.equal(a, b)


def test_uint8_fast_paths_match_the_plain_float_computation():
    """The cycle prior's integer grey sums and the target's uint8 pick: the float32 numbers of
    the plain computation, up to float32 rounding of the prior (a scale-free cosine)."""
    video = _video(2, 4, t=16, s=48)
    x = video.float().mean(-1).view(2, 8, 2, 48, 48).mean(2)
    x = F.adaptive_avg_pool2d(x, 32).flatten(2)
    x = x - x.mean(-1, keepdim=True)
    x = F.normalize(x - x.mean(1, keepdim=True), dim=-1)
    torch.testing.assert_close(losses.cycle_prior(video, 8), torch.bmm(x, x.transpose(1, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(losses.cycle_prior(video, 8), losses.cycle_prior(video.double(), 8).float(),
                               rtol=0, atol=1e-6)
    m = EchoFM(ModelConfig(**SMALL))
    ids = torch.rand(2, 64).argsort(1)[:, :40]
    full = m.target(video[:, :8, :32, :32])
    assert torch.equal(m.target(video[:, :8, :32, :32], ids), full.gather(1, ids[..., None].expand(-1, -1, 384)))


def test_norm_pix_target_and_the_removed_rows_loss_equal_the_official_formulas():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 10, 96, dtype=torch.float64, generator=g) * 3
    pred = torch.randn(2, 10, 96, dtype=torch.float64, generator=g, requires_grad=True)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    official = (target - mean) / (var + 1e-6) ** 0.5
    torch.testing.assert_close(losses.norm_pix_target(target), official, rtol=1e-13, atol=1e-13)
    mask = (torch.rand(2, 10, generator=g) < 0.7).double()
    mask[:, :2] = 1.0  # the same number of removed rows per clip, as the masks give
    mask[:, 2:] = 0.0
    mask[:, 5:9] = 1.0
    ids = mask.nonzero()[:, 1].view(2, -1)
    want, _ = losses.reconstruction_loss(pred, target, mask)
    (gw,) = torch.autograd.grad(want, pred)
    rows = ids[..., None].expand(-1, -1, 96)
    got, _ = losses.reconstruction_loss(pred.gather(1, rows), target.gather(1, rows), None)
    (gg,) = torch.autograd.grad(got, pred)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(gg, gw, rtol=1e-13, atol=1e-16)
    empty, _ = losses.reconstruction_loss(pred[:, :0], target[:, :0], None)
    assert empty.item() == 0.0


def test_reconstruct_from_removed_rows_equals_from_every_row():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL))
    video = _video()
    mask = m.draw_mask(2, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(video, mask=mask)
        latent, _ = m.forward_encoder(video, mask)
        full = m.forward_decoder(latent, mask)
    torch.testing.assert_close(m.reconstruct(video, out), m.reconstruct(video, {"pred": full, "mask": mask.mask}),
                               rtol=1e-5, atol=1e-5)


def test_build_optimizer_is_fused_on_cpu_and_steps_like_the_loop():
    from echofm.engine.optim import OptimConfig, build_optimizer, param_groups

    torch.manual_seed(0)
    a = EchoFM(ModelConfig(**SMALL))
    b = EchoFM(ModelConfig(**SMALL))
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig()
    fused = build_optimizer(param_groups(a, 0.05), cfg, 1e-3)
    loop = torch.optim.AdamW(param_groups(b, 0.05), lr=1e-3, betas=cfg.betas, eps=cfg.eps, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for m in (a, b):
            for p in m.parameters():
                p.grad = torch.sin(p.detach() * 3 + 1)
        fused.step()
        loop.step()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=k)


def test_channels_last_patches_are_the_same_with_the_triton_gather():
    """The target's (t, p, p, C) layout: the Triton gather (the interpreter on CPU) reordered
    after its (C, t, p, p) kernel equals the torch pick."""
    video = _video(2, 5)
    ids = torch.rand(2, 64).argsort(1)[:, :24]
    want = gather_patches(video, ids, (2, 8, 8), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), backend="torch",
                          channels_last=True)
    got = gather_patches(video, ids, (2, 8, 8), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), backend="triton",
                         channels_last=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
