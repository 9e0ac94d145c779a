"""Analytic FLOPs: exact against torch's FlopCounterMode, and the VideoMAE-B figure of docs/mfu.md."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from echofm.engine.flops import device_peak, mfu, model_flops
from echofm.engine.losses import LossConfig
from echofm.engine.masking import MaskConfig
from echofm.engine.model import EchoFM, ModelConfig

SMALL = dict(preset="echofm_tiny", num_frames=8, img_size=32, patch_size=8, tubelet=2, embed_dim=64, depth=2,
             num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, pred_t_dim=4)


@pytest.mark.parametrize("kind,attention,cls_embed", [("tube", "joint", True), ("random", "joint", True),
                                                      ("frame", "joint", True), ("tube", "divided", True),
                                                      ("tube", "joint", False)])
def test_analytic_flops_match_flop_counter(kind, attention, cls_embed):
    # math backend: attention as explicit matmuls, which FlopCounterMode counts
    cfg = ModelConfig(**SMALL, attn_backend="math", attention=attention, cls_embed=cls_embed)
    mask_cfg = MaskConfig(kind=kind, ratio=0.75)
    model = EchoFM(cfg, mask_cfg)
    video = torch.randint(0, 256, (1, 8, 32, 32, 3), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        model(video)
    measured = counter.get_total_flops()
    analytic = model_flops(cfg, mask_cfg, model.loss_cfg)["forward"]
    if attention == "joint":
        assert measured == analytic
    else:  # the CLS row's small SDPA call is not seen by the counter on CPU
        assert abs(measured - analytic) / analytic < 0.01


def test_videomae_b_reference_figure():
    """docs/mfu.md: VideoMAE-B (16 x 224^2, tubelet 2, 90% mask, decoder 384 x 4) ~71 GFLOPs forward."""
    f = model_flops(ModelConfig(preset="echofm_vit_base"), MaskConfig(kind="tube", ratio=0.9))
    # 8 slices x int(196 * 0.1) = 19 kept positions (the official count; round() gives 20)
    assert f["parts"]["patch_embed"] == 2 * 8 * 19 * 1536 * 768
    assert abs(f["forward"] / 71e9 - 1) < 0.15, f["forward"] / 1e9
    assert f["train_step"] == 3 * f["forward"]
    assert abs(f["train_step"] / 213e9 - 1) < 0.15


def test_preset_flops_order_and_mfu():
    fl = {p: model_flops(ModelConfig(preset=p), MaskConfig(ratio=0.75))["forward"]
          for p in ("echofm_tiny", "echofm_vit_base", "echofm_vit_large")}
    assert fl["echofm_tiny"] < fl["echofm_vit_base"] < fl["echofm_vit_large"]
    # ViT-L/16, 32 frames, tubelet 4, 75% tube mask: 392 visible tokens through 24 layers of
    # ~12 * 1024^2 parameters dominate: 2 * 393 * 24 * 12.6M ~ 238 GFLOPs, decoder ~131.
    assert 300e9 < fl["echofm_vit_large"] < 450e9
def test_mfu_doc_table_matches_the_analytic_count():
    """docs/mfu.md, the one place MFU counting is documented: its parts are model_flops' parts
    and its ViT-L numbers are model_flops' (GFLOPs to 2 decimals)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "mfu.md").read_text()
    f = model_flops(ModelConfig(preset="echofm_vit_large"), MaskConfig(kind="tube", ratio=0.75))
    listed = set(re.findall(r"^\| `(\w+)` \|", doc, flags=re.M))
    assert listed == set(f["parts"]), listed ^ set(f["parts"])
    table = dict(re.findall(r"^\| ([\w ()]+?) \| ([\d.]+) \|$", doc, flags=re.M))
    want = {**f["parts"], "forward": f["forward"], "train step (3 x forward)": f["train_step"]}
    assert set(table) == set(want)
    for name, gflops in table.items():
        assert float(gflops) == pytest.approx(want[name] / 1e9, abs=0.006), name


def test_mfu_of_the_design_target():
    """The ViT-B sizing target: a ViT-B video MAE training at ~1,500 clips/s on one H200 (790 TFLOP/s bf16)
    is at ~40% MFU; the same clips/s over 8 devices is an eighth of that per device."""
    step = model_flops(ModelConfig(preset="echofm_vit_base"), MaskConfig(kind="tube", ratio=0.9))["train_step"]
    assert mfu(step, 1500) == pytest.approx(0.40, abs=0.03)
    assert mfu(step, 1500, devices=8) == pytest.approx(mfu(step, 1500) / 8)
    assert mfu(step, 1500, peak_flops=989e12) < mfu(step, 1500)  # an H100's peak


def test_the_loss_settings_count_where_they_change_the_products():
    """The pixel prior's pooled products follow loss.prior_grid, and phase_prior "embed" has none."""
    cfg, mask = ModelConfig(**SMALL), MaskConfig(ratio=0.75)
    t, d = 4, 64
    for loss, prior in ((LossConfig(prior_grid=16), 16), (LossConfig(), 32), (LossConfig(phase_prior="embed"), 0)):
        assert model_flops(cfg, mask, loss)["parts"]["loss"] == 2 * t * t * d + 2 * t * t * prior**2
    assert model_flops(cfg, mask) == model_flops(cfg, mask, LossConfig())


def test_device_peaks_by_name():
    assert device_peak("NVIDIA H200") == 790e12
    assert device_peak("NVIDIA GH200 480GB") == 989e12  # not the H200's: "GH200" contains "H200"
    assert device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak("Some Other GPU") is None
