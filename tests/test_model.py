"""EchoFM model: patch embedding, attention paths, gradients, overfitting, persistence."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from echofm.engine.losses import LossConfig
from echofm.engine.masking import MaskConfig, full_mask, tube_mask
from echofm.engine.model import PRESETS, EchoFM, ModelConfig

# A shrunken tiny model: 4 frames of 32^2, patch 8, tubelet 2 -> 2 x 16 tokens.
SMALL = dict(preset="echofm_tiny", num_frames=4, img_size=32, patch_size=8, tubelet=2, embed_dim=64, depth=2,
             num_heads=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, pred_t_dim=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _video(b, t, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, s, s, 3), dtype=torch.uint8, generator=g)


def test_presets_resolve_and_validate():
    for name, fields in PRESETS.items():
        c = ModelConfig(preset=name).resolved()
        assert all(getattr(c, k) == v for k, v in fields.items())
    assert ModelConfig(preset="echofm_vit_large", depth=2).resolved().depth == 2
    large = ModelConfig(preset="echofm_vit_large").resolved()
    assert (large.t_grid, large.l_grid, large.pred_u) == (8, 196, 1)
    with pytest.raises(ValueError, match="pred_t_dim"):
        ModelConfig(preset="echofm_tiny", pred_t_dim=12).validate()
    with pytest.raises(ValueError, match="divided"):
        EchoFM(ModelConfig(**SMALL, attention="divided"), MaskConfig(kind="random"))


def test_visible_patch_embedding_equals_conv3d_then_gather():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL)).double()
    c = m.cfg
    video = _video(2, 4, 32)
    mask = tube_mask(2, c.t_grid, c.l_grid, 0.75, generator=torch.Generator().manual_seed(3))
    from echofm.kernels import gather_patches

    ours = m.patch_embed(gather_patches(video, mask.ids_keep, (2, 8, 8), c.mean, c.std).double())
    conv = torch.nn.Conv3d(3, c.embed_dim, (2, 8, 8), stride=(2, 8, 8)).double()
    conv.weight.data = m.patch_embed.weight.data.view(c.embed_dim, 3, 2, 8, 8)
    conv.bias.data = m.patch_embed.bias.data
    x = (video.double() / 255 - torch.tensor(c.mean, dtype=torch.float64)) / torch.tensor(c.std, dtype=torch.float64)
    full = conv(x.permute(0, 4, 1, 2, 3)).flatten(2).transpose(1, 2)  # [B, N, D] in (t, h, w) order
    ref = torch.gather(full, 1, mask.ids_keep[..., None].expand(-1, -1, c.embed_dim))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)  # uint8 -> float32 inside the gather


def test_forward_outputs_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    # 8 frames / tubelet 2 = 4 slices, so anchors have non-adjacent negatives.
    cfg = ModelConfig(**{**SMALL, "num_frames": 8, "pred_t_dim": 8})
    m = EchoFM(cfg, MaskConfig(ratio=0.75), LossConfig(triplet_weight=0.5, cycle_weight=0.1))
    video = _video(2, 8, 32)
    out = m(video, generator=torch.Generator().manual_seed(0))
    assert out["terms"]["active"] > 0
    n, t = m.cfg.t_grid * m.cfg.l_grid, m.cfg.t_grid
    removed = n - out["ids_keep"].shape[1]
    assert out["pred"].shape == out["target"].shape == (2, removed, m.cfg.pred_dim)
    assert torch.equal(out["mask"].gather(1, out["ids_masked"]), torch.ones(2, removed))
    assert out["mask"].shape == (2, n) and out["sim"].shape == out["prior"].shape == (2, t, t)
    assert set(out["terms"]) == {"rec", "triplet", "cycle", "active"}
    t = out["terms"]
    torch.testing.assert_close(out["loss"].detach(), t["rec"] + 0.5 * t["triplet"] + 0.1 * t["cycle"])
    out["loss"].backward()
    no_grad = [name for name, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_encode_shapes_and_equivalence_with_full_mask_forward():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL)).eval()
    video = _video(2, 4, 32)
    tokens, cls, phase = m.encode(video)
    assert tokens.shape == (2, 32, 64) and cls.shape == (2, 64) and phase.shape == (2, 2, 64)
    # float [0, 1] input gives the same features as uint8
    t2, c2, p2 = m.encode(video.float() / 255)
    torch.testing.assert_close(t2, tokens, rtol=1e-5, atol=1e-5)
    # VideoMAE layout one-liner
    t3, _, _ = m.encode((video.float() / 255).permute(0, 4, 1, 2, 3).permute(0, 2, 3, 4, 1))
    torch.testing.assert_close(t3, tokens, rtol=1e-5, atol=1e-5)


def test_phase_projector_padded_path_equals_tube_path():
    """Random/frame masks run the projector on padded slices; on a tube mask it must agree."""
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL)).double()
    mask = tube_mask(3, 2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    latent = torch.randn(3, mask.num_visible, 64, dtype=torch.float64)
    a = m.forward_phase(latent, mask)
    b = m.forward_phase(latent, dataclasses.replace(mask, grid=None))
    torch.testing.assert_close(a, b)


def test_divided_slice_block_keeps_slices_apart():
    """A single divided (slice) block: tokens of slice 0 ignore pixels of slice 1."""
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**{**SMALL, "depth": 1}, attention="divided")).double()
    video = _video(1, 4, 32).double() / 255
    mask = full_mask(1, 2, 16)
    a, _ = m.forward_encoder(video, mask)
    video2 = video.clone()
    video2[:, 2:] = torch.rand_like(video2[:, 2:])  # frames of slice 1 only
    b, _ = m.forward_encoder(video2, mask)
    torch.testing.assert_close(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL))
    video = _video(2, 4, 32)
    mask = m.draw_mask(2, video.device, torch.Generator().manual_seed(0))
    m(video, mask=mask)["loss"].backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(video, mask=mask)["loss"].backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mean,std", [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_unpatchify_inverts_target_and_picks_the_official_frames(mean, std):
    m = EchoFM(ModelConfig(**{**SMALL, "num_frames": 8, "tubelet": 4, "pred_t_dim": 4}, mean=mean, std=std))
    video = _video(2, 8, 32)
    # official linspace(0, 7, 4).long() = [0, 2, 4, 7] (arange would give 6 last); u = 2
    # frames per token, both inside the token's own tubelet
    assert m.target_frames() == [0, 2, 4, 7]
    paper = EchoFM(ModelConfig(**{**SMALL, "num_frames": 32, "tubelet": 4, "pred_t_dim": 8}))  # 8 of 32 frames
    assert paper.target_frames() == [0, 4, 8, 13, 17, 22, 26, 31]
    frames = m.unpatchify(m.target(video))
    torch.testing.assert_close(frames, m.normalize(video[:, [0, 2, 4, 7]]))
    torch.testing.assert_close(m.normalize(video)[..., 0], (video[..., 0].float() / 255 - mean[0]) / std[0])
    # token (t=1, h=0, w=0) <- frames 4 and 7, as (u, p, p, C)
    tgt = m.target(video)[:, 16].view(2, 2, 8, 8, 3)
    torch.testing.assert_close(tgt[:, 1], m.normalize(video[:, 7, :8, :8]))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL), MaskConfig(ratio=0.75), LossConfig(triplet_weight=0.1))
    video = _video(2, 4, 32)
    mask = m.draw_mask(2, video.device, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        out = m(video, mask=mask)
        first = first if first is not None else out["terms"]["rec"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = m(video, mask=mask)["terms"]["rec"].item()
    assert last < first / 5, (first, last)


def test_save_and_load_pretrained_carry_normalisation_mask_and_loss(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    mask_cfg, loss_cfg = MaskConfig(kind="random", ratio=0.6), LossConfig(variant="centred", triplet_weight=0.3)
    m = EchoFM(cfg, mask_cfg, loss_cfg).eval()
    m.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    m2 = EchoFM.from_pretrained(tmp_path / "export").eval()
    assert m2.cfg == m.cfg and m2.mask_cfg == mask_cfg and m2.loss_cfg == loss_cfg
    video = _video(1, 4, 32)
    for a, b in zip(m.encode(video), m2.encode(video)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # explicit configs replace the saved ones
    assert EchoFM.from_pretrained(tmp_path / "export", loss_cfg=LossConfig()).loss_cfg == LossConfig()
    # a version-1 config.json (model only, ImageNet input) still loads: defaults for mask / loss
    data = json.loads((tmp_path / "export" / "config.json").read_text())
    old = {"format": "echofm", "version": 1, "model": {**data["model"], "mean": [0.485, 0.456, 0.406],
                                                        "std": [0.229, 0.224, 0.225]}}
    old["model"].pop("cls_embed")
    (tmp_path / "export" / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="does not match checksums.sha256"):  # edited after saving
        EchoFM.from_pretrained(tmp_path / "export")
    (tmp_path / "export" / "checksums.sha256").unlink()  # old folders had none: loads, with a warning
    with pytest.warns(UserWarning, match="no checksums.sha256"):
        m3 = EchoFM.from_pretrained(tmp_path / "export")
    assert m3.mask_cfg == MaskConfig() and m3.loss_cfg == LossConfig() and m3.cfg.mean == (0.485, 0.456, 0.406)
    data["loss"]["typo"] = 1
    (tmp_path / "export" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown loss keys \['typo'\]"), pytest.warns(UserWarning):
        EchoFM.from_pretrained(tmp_path / "export")


def test_float64_is_never_downcast_and_half_is_upcast():
    """Parity checks run in float64: every output of a float64 forward stays float64."""
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**{**SMALL, "num_frames": 8, "pred_t_dim": 8})).double()
    out = m(_video(2, 8, 32).double() / 255, generator=torch.Generator().manual_seed(0))
    for key in ("loss", "pred", "target", "phase", "sim", "prior"):
        assert out[key].dtype == torch.float64, key
    assert all(v.dtype == torch.float64 for v in out["terms"].values())
    half = EchoFM(ModelConfig(**{**SMALL, "num_frames": 8, "pred_t_dim": 8})).to(torch.bfloat16)
    out = half(_video(2, 8, 32), generator=torch.Generator().manual_seed(0))
    assert out["pred"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])


def test_encoder_without_cls_token():
    """cls_embed=False (VideoMAE's encoder): no CLS parameters, cls = mean token, every
    parameter still trained."""
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**{**SMALL, "num_frames": 8, "pred_t_dim": 8}, cls_embed=False))
    assert not hasattr(m, "cls_token") and "pos_embed_class" not in dict(m.named_parameters())
    video = _video(2, 8, 32)
    tokens, cls, _ = m.encode(video)
    torch.testing.assert_close(cls, tokens.mean(1))
    m(video, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match="cls_embed"):
        ModelConfig(**SMALL, cls_embed=False, attention="divided").validate()


def test_bad_video_shape_is_named():
    m = EchoFM(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
        m(torch.zeros(1, 3, 4, 32, 32))


def test_triton_path_equals_sdpa_path():
    """Tiny preset on a tiny clip: Triton kernels (interpreter on CPU, compiled on a GPU)
    vs SDPA + torch gathers."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(preset="echofm_tiny", num_frames=8, img_size=64, attn_backend="sdpa")
    m = EchoFM(cfg).to(dev)
    m2 = EchoFM(dataclasses.replace(cfg, attn_backend="triton")).to(dev)
    m2.load_state_dict(m.state_dict())
    assert m2.gather_backend == "triton"
    video = _video(2, 8, 64).to(dev)
    mask = m.draw_mask(2, dev, torch.Generator(device=dev).manual_seed(0))
    out, out2 = m(video, mask=mask), m2(video, mask=mask)
    torch.testing.assert_close(out2["pred"], out["pred"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out2["phase"], out["phase"], rtol=1e-4, atol=1e-4)
    out["loss"].backward()
    out2["loss"].backward()
    for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
        assert (p2.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-7, n


def test_reconstruct_keeps_visible_patches_of_the_clip():
    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL))
    video = _video(1, 4, 32)
    out = m(video, generator=torch.Generator().manual_seed(0))
    rec = m.reconstruct(video, out)  # [1, 4, 32, 32, 3] in [0, 1]
    assert rec.shape == (1, 4, 32, 32, 3)
    visible = m.unpatchify((1 - out["mask"])[..., None].expand(-1, -1, m.cfg.pred_dim)).bool()
    torch.testing.assert_close(rec[visible], (video.float() / 255)[visible], rtol=0, atol=1e-5)


def test_attn_backend_names_are_the_kernels_and_pinned_sdpa_runs():
    """ModelConfig.attn_backend takes exactly the kernels' backend names (the pinned SDPA ones
    included), from a recipe too; an unknown one is named. sdpa-flash has a CPU kernel: the
    same loss as sdpa; cuDNN / efficient are CUDA kernels (a named error on CPU)."""
    import typing

    from echofm.engine.config import ConfigError, load_recipe
    from echofm.kernels import ATTENTION_BACKENDS

    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["attn_backend"]) == ATTENTION_BACKENDS
    tiny = Path(__file__).resolve().parents[1] / "recipes/pretrain/echofm_tiny.yaml"
    assert load_recipe(tiny, ["model.attn_backend=sdpa-cudnn"]).model.attn_backend == "sdpa-cudnn"
    with pytest.raises(ConfigError, match="model.attn_backend: expected 'auto' .* 'sdpa-cudnn' .*got str 'sdpa-fast'"):
        load_recipe(tiny, ["model.attn_backend=sdpa-fast"])
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        ModelConfig(**SMALL, attn_backend="cudnn").validate()
    video = _video(2, 4, 32)
    losses = {}
    for backend in ("sdpa", "sdpa-flash"):
        torch.manual_seed(0)
        m = EchoFM(ModelConfig(**SMALL, attn_backend=backend))
        assert m.gather_backend == "torch"
        losses[backend] = m(video, generator=torch.Generator().manual_seed(1))["loss"].item()
    assert losses["sdpa-flash"] == pytest.approx(losses["sdpa"], rel=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'sdpa-cudnn': torch has no such SDPA kernel for cpu"):
            EchoFM(ModelConfig(**SMALL, attn_backend="sdpa-cudnn"))(video)


def test_forward_takes_its_loss_from_the_loss_hook():
    """model.loss_fn (losses.compute by default) is what forward calls: the hook compile swaps."""
    from echofm.engine import losses

    torch.manual_seed(0)
    m = EchoFM(ModelConfig(**SMALL))
    assert m.loss_fn is losses.compute
    seen = []

    def spy(*args, **kw):
        seen.append(args[0])
        return losses.compute(*args, **kw)

    m.loss_fn = spy
    video, g = _video(2, 4, 32), torch.Generator()
    out = m(video, generator=g.manual_seed(0))
    assert seen == [m.loss_cfg]
    m.loss_fn = losses.compute
    assert m(video, generator=g.manual_seed(0))["loss"].item() == out["loss"].item()
