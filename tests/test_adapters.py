"""Checkpoint adapters: official EchoFM names, shapes and file formats (tiny and ViT-L on
meta), VideoMAE encoder loading. Numerical parity with the official / VideoMAE models:
tests/test_fidelity.py."""
import argparse

import pytest
import torch

from echofm.engine.adapters import (CheckpointError, config_from_official, convert_official, export_official,
                                    load_official, load_videomae, separable_projection, sinusoid_table)
from echofm.engine.errors import UserError
from echofm.engine.model import EchoFM
from official_reference import official_state_dict, videomae_state_dict

# tiny official architecture: D 32 (2 heads), depth 2, decoder 16 x 1 (2 heads),
# 8 frames of 32^2, patch 8, tubelet 2 -> T' = 4, L = 16; u = 1 frame per token (pred 4 of 8).
TINY = dict(d=32, depth=2, heads=2, dd=16, ddepth=1, dheads=2, c=3, t=2, p=8, tg=4, lg=16, u=1)
LARGE = dict(d=1024, depth=24, heads=16, dd=512, ddepth=8, dheads=16, c=3, t=4, p=16, tg=8, lg=196, u=1)


def _args(a):
    return {"num_heads": a["heads"], "decoder_num_heads": a["dheads"], "model": "custom"}


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


def test_videomae_encoder_loads(tmp_path):
    sd = videomae_state_dict()
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
    model = load_videomae({"model": videomae_state_dict()}, num_frames=8, img_size=32, num_heads=2)
    assert {"encoder_to_decoder.weight", "mask_token", "decoder.head.weight"} <= set(model.adapter_report["ignored"])


def test_ddp_prefixed_official_checkpoint_loads():
    sd = {f"module.{k}": v for k, v in official_state_dict(TINY, dtype=torch.float32).items()}
    model = load_official({"model": sd, "model_args": _args(TINY)})
    assert torch.equal(model.cls_token, sd["module.cls_token"])


def test_official_training_checkpoint_with_args_namespace(tmp_path):
    """main_pretrain saves {"model", "optimizer", "epoch", "scaler", "args": Namespace}: read
    with weights_only (Namespace allow-listed), settings taken from args."""
    args = argparse.Namespace(model="custom", num_heads=2, decoder_num_heads=2, num_frames=8, t_patch_size=2,
                              pred_t_dim=4, input_size=32, mask_ratio=0.9, norm_pix_loss=True, triplet_weight=0.5,
                              cycle_tau=0.2, sep_pos_embed=True, cls_embed=True, blr=1e-3, output_dir="/x")
    path = tmp_path / "checkpoint-00003.pth"
    torch.save({"model": official_state_dict(TINY, dtype=torch.float32), "optimizer": {"state": {}}, "epoch": 3,
                "scaler": {}, "args": args}, path)
    model = load_official(path)
    assert (model.mask_cfg.ratio, model.loss_cfg.norm_pix, model.loss_cfg.triplet_weight,
            model.loss_cfg.cycle_tau, model.loss_cfg.cycle_weight) == (0.9, True, 0.5, 0.2, 1.0)
    assert "cycle_weight" in model.adapter_report["defaulted"]


def test_model_args_that_contradict_the_weights_are_named():
    with pytest.raises(CheckpointError, match=r"num_frames=16 \(weights: 8\)"):
        load_official({"model": official_state_dict(TINY), "model_args": {**_args(TINY), "num_frames": 16}})
    with pytest.raises(CheckpointError, match="cycle_tau"):
        load_official({"model": official_state_dict(TINY), "model_args": {**_args(TINY), "cycle_tau": 0}})


def test_heads_from_factory_name_or_width_and_no_qkv_bias():
    sd = official_state_dict(LARGE, device="meta", dtype=torch.float32)
    assert config_from_official(sd, {}).num_heads == 16  # ViT-L width
    assert config_from_official(sd, {"model": "mae_vit_base_patch16"}).num_heads == 12
    small = {k: v for k, v in official_state_dict(TINY, dtype=torch.float32).items()
             if not (".attn.q.bias" in k or ".attn.k.bias" in k or ".attn.v.bias" in k)}
    model = load_official({"model": small, "model_args": _args(TINY)})  # built with no_qkv_bias=True
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(96))
