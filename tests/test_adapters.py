"""Checkpoint adapters: official EchoFM names and shapes (tiny and ViT-L on meta), VideoMAE encoder."""
import pytest
import torch
import torch.nn.functional as F

from echofm.engine.adapters import (CheckpointError, config_from_official, convert_official, export_official,
                                    load_official, load_videomae, separable_projection, sinusoid_table)
from echofm.engine.errors import UserError
from echofm.engine.model import EchoFM

# tiny official architecture: D 32 (2 heads), depth 2, decoder 16 x 1 (2 heads),
# 8 frames of 32^2, patch 8, tubelet 2 -> T' = 4, L = 16; u = 1 frame per token (pred 4 of 8).
TINY = dict(d=32, depth=2, heads=2, dd=16, ddepth=1, dheads=2, c=3, t=2, p=8, tg=4, lg=16, u=1)
LARGE = dict(d=1024, depth=24, heads=16, dd=512, ddepth=8, dheads=16, c=3, t=4, p=16, tg=8, lg=196, u=1)


def official_state_dict(a, device="cpu", prj_norm=True, seed=0, dtype=torch.float64):
    """The official MaskedAutoencoderViT(sep_pos_embed=True, cls_embed=True) names and shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

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


def _args(a):
    return {"num_heads": a["heads"], "decoder_num_heads": a["dheads"], "model": "custom"}


def _official_block(x, sd, pre, heads):
    """The official Block / Attention (separate q, k, v) in plain torch."""
    def ln(y, n):
        return F.layer_norm(y, y.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)

    def lin(y, n):
        return F.linear(y, sd[f"{n}.weight"], sd[f"{n}.bias"])

    b, n, c = x.shape
    h = ln(x, f"{pre}.norm1")
    q, k, v = (lin(h, f"{pre}.attn.{z}").reshape(b, n, heads, c // heads).permute(0, 2, 1, 3) for z in "qkv")
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    x = x + lin((attn @ v).transpose(1, 2).reshape(b, n, c), f"{pre}.attn.proj")
    return x + lin(F.gelu(lin(ln(x, f"{pre}.norm2"), f"{pre}.mlp.fc1")), f"{pre}.mlp.fc2")


def _official_encode(sd, imgs, a, prj="prj_norm"):
    """Official forward_encoder(mask_ratio=0) + forward_prj: Conv3d on [B, C, T, H, W]."""
    x = F.conv3d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(a["t"], a["p"], a["p"]))
    b, d = x.shape[:2]
    x = x.flatten(3).permute(0, 2, 3, 1).reshape(b, -1, d)  # [B, T'*L, D] in (t, s) order
    pos = sd["pos_embed_spatial"].repeat(1, a["tg"], 1) + sd["pos_embed_temporal"].repeat_interleave(a["lg"], 1)
    x = torch.cat([(sd["cls_token"] + sd["pos_embed_class"]).expand(b, -1, -1), x + pos], 1)
    for i in range(a["depth"]):
        x = _official_block(x, sd, f"blocks.{i}", a["heads"])
    x = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    tokens, cls = x[:, 1:], x[:, 0]
    phase = []
    for t in range(a["tg"]):
        xt = torch.cat([sd["decoder_prj_cls_token"].expand(b, -1, -1), tokens.view(b, a["tg"], -1, d)[:, t]], 1)
        xt = _official_block(xt, sd, "decoder_block", a["heads"])
        phase.append(F.layer_norm(xt, (d,), sd[f"{prj}.weight"], sd[f"{prj}.bias"], eps=1e-6)[:, 0])
    return tokens, cls, torch.stack(phase, 1)


def test_official_round_trip_through_a_file(tmp_path):
    sd = official_state_dict(TINY, dtype=torch.float32)
    path = tmp_path / "echofm_official.pth"
    torch.save({"model": sd, "model_args": _args(TINY)}, path)
    model = load_official(path)
    c = model.cfg
    assert (c.embed_dim, c.depth, c.num_heads, c.num_frames, c.img_size, c.tubelet, c.pred_t_dim) == (
        32, 2, 2, 8, 32, 2, 4)
    back = export_official(model)
    assert set(back["model"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back["model"][k], v), k
    assert back["model_args"]["t_patch_size"] == 2


@pytest.mark.parametrize("prj_norm", [True, False])
def test_encode_equals_the_official_conv3d_path(prj_norm):
    # values representable in float32 (the model is built in float32, then made float64)
    sd = {k: v.float().double() for k, v in official_state_dict(TINY, prj_norm=prj_norm, seed=1).items()}
    model = load_official({"model": sd, "model_args": _args(TINY)}, attn_backend="math").double().eval()
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 8, 32, 32, 3, generator=g, dtype=torch.float64)  # [0, 1] floats
    tokens, cls, phase = model.encode(video)
    mean = torch.tensor(model.cfg.mean, dtype=torch.float64)
    std = torch.tensor(model.cfg.std, dtype=torch.float64)
    imgs = ((video - mean) / std).permute(0, 4, 1, 2, 3)  # the official [B, C, T, H, W]
    ref_t, ref_c, ref_p = _official_encode(sd, imgs, TINY, "prj_norm" if prj_norm else "norm")
    torch.testing.assert_close(tokens, ref_t)
    torch.testing.assert_close(cls, ref_c)
    torch.testing.assert_close(phase, ref_p)


def test_vit_large_names_and_shapes_on_meta():
    sd = official_state_dict(LARGE, device="meta", dtype=torch.float32)
    cfg = config_from_official(sd, {"model": "mae_vit_large_patch16"})
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_frames, cfg.img_size, cfg.tubelet, cfg.pred_t_dim,
            cfg.decoder_embed_dim, cfg.decoder_depth) == (1024, 24, 16, 32, 224, 4, 8, 512, 8)
    assert cfg.resolved() == cfg.__class__(preset="echofm_vit_large").resolved()  # the paper's preset
    with torch.device("meta"):
        model = EchoFM(cfg)
    ours = convert_official(sd)
    own = model.state_dict()
    assert set(ours) == set(own)
    assert all(ours[k].shape == own[k].shape for k in own)
    exported = export_official(model)["model"]
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_unknown_missing_and_misshaped_keys_are_listed():
    sd = official_state_dict(TINY)
    sd["extra.weight"] = torch.zeros(1)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["decoder_norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_official({"model": sd, "model_args": _args(TINY)})
    msg = str(err.value)
    assert "extra.weight" in msg and "blocks.1.mlp.fc2.bias" in msg and "decoder_norm.weight" in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_official({"model": {"pos_embed": torch.zeros(1)}})


def test_files_are_read_weights_only(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": official_state_dict(TINY), "opts": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_official(tmp_path / "nope.pth")


class _Opaque:
    """A pickled object that weights_only loading must refuse."""


def _videomae_state_dict(d=32, depth=2, c=3, t=2, p=8, seed=0):
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


def test_videomae_encoder_loads(tmp_path):
    sd = _videomae_state_dict()
    path = tmp_path / "videomae.pth"
    torch.save({"model": sd}, path)
    model = load_videomae(path, num_frames=8, img_size=32, num_heads=2)
    own = model.state_dict()
    assert torch.equal(own["patch_embed.weight"], sd["encoder.patch_embed.proj.weight"].reshape(32, -1))
    assert torch.equal(own["blocks.1.attn.qkv.weight"], sd["encoder.blocks.1.attn.qkv.weight"])
    qkv_bias = own["blocks.0.attn.qkv.bias"]
    assert torch.equal(qkv_bias[:32], sd["encoder.blocks.0.attn.q_bias"])
    assert torch.equal(qkv_bias[32:64], torch.zeros(32))
    assert torch.equal(qkv_bias[64:], sd["encoder.blocks.0.attn.v_bias"])
    assert torch.equal(own["norm.weight"], sd["encoder.norm.weight"])
    assert 0 < model.adapter_report["pos_residual"] < 1
    tokens, cls, phase = model.encode(torch.rand(1, 8, 32, 32, 3))
    assert tokens.shape == (1, 64, 32) and torch.isfinite(tokens).all()
    bad = dict(sd)
    bad["encoder.blocks.0.gamma_1"] = torch.ones(32)
    with pytest.raises(CheckpointError, match="layer-scale"):
        load_videomae({"model": bad}, num_frames=8, img_size=32, num_heads=2)


def test_separable_projection_is_exact_on_separable_tables():
    g = torch.Generator().manual_seed(0)
    spatial, temporal = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g,
                                                                                           dtype=torch.float64)
    table = (temporal[:, None] + spatial[None]).reshape(64, 8)
    s, t, resid = separable_projection(table, 4)
    torch.testing.assert_close(t[:, None] + s[None], table.view(4, 16, 8))
    assert resid < 1e-12
    tab = sinusoid_table(5, 4)
    torch.testing.assert_close(tab[3, :2], torch.tensor([3.0, 3.0], dtype=torch.float64).sin() * torch.tensor([1.0, 0])
                               + torch.tensor([3.0, 3.0], dtype=torch.float64).cos() * torch.tensor([0, 1.0]))


def test_videomae_report_lists_the_decoder_keys_it_leaves_out():
    model = load_videomae({"model": _videomae_state_dict()}, num_frames=8, img_size=32, num_heads=2)
    assert {"encoder_to_decoder.weight", "mask_token", "decoder.head.weight"} <= set(model.adapter_report["ignored"])


def test_ddp_prefixed_official_checkpoint_loads():
    sd = {f"module.{k}": v for k, v in official_state_dict(TINY, dtype=torch.float32).items()}
    model = load_official({"model": sd, "model_args": _args(TINY)})
    assert torch.equal(model.cls_token, sd["module.cls_token"])
