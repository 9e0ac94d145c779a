"""AdamW parameter groups, the lr scaling rule, warmup + half-cycle cosine as a function of the
step (what the trainer sets before each optimizer step), recipe errors."""
import math

import pytest
import torch
from torch import nn

from echofm.engine.config import ConfigError, load_recipe
from echofm.engine.optim import LrSchedule, OptimConfig, ScheduleConfig, build_optimizer, param_groups, peak_lr

TINY = "recipes/pretrain/echofm_tiny.yaml"


class StandIn(nn.Module):
    """Names like the EchoFM encoder's: which ones AdamW must not decay."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv3d(3, 8, (2, 4, 4), (2, 4, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, 4, 8))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, 2, 8))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_skip_norms_biases_embeddings_tokens():
    m = StandIn()
    decay, skip = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["fc.weight", "patch_embed.weight"]
    assert sorted(names[id(p)] for p in skip["params"]) == sorted([
        "patch_embed.bias", "cls_token", "mask_token", "pos_embed_spatial", "pos_embed_temporal",
        "norm.weight", "norm.bias", "fc.bias"])
    assert decay["weight_decay"] == 0.05 and skip["weight_decay"] == 0.0
    # The trainer's optimizer over those groups: one step decays `fc.weight` only.
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = build_optimizer([decay, skip], OptimConfig(weight_decay=0.05), lr=0.1)
    assert opt.defaults["betas"] == (0.9, 0.95) and [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    with torch.no_grad():
        m.fc.weight.fill_(1.0)
        m.fc.bias.fill_(1.0)
    before["fc.weight"], before["fc.bias"] = m.fc.weight.detach().clone(), m.fc.bias.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only weight decay moves a parameter
    opt.step()
    assert torch.allclose(m.fc.weight, before["fc.weight"] * (1 - 0.1 * 0.05))
    assert torch.equal(m.fc.bias, before["fc.bias"]) and torch.equal(m.cls_token, before["cls_token"])


def test_peak_lr_scales_with_global_batch():
    assert peak_lr(OptimConfig(base_lr=1.5e-4), 4096) == pytest.approx(1.5e-4 * 16)
    assert peak_lr(OptimConfig(base_lr=1e-3, lr=3e-4), 4096) == 3e-4


def test_warmup_cosine_matches_closed_form():
    peak, floor_lr, warm, total = 2.0e-3, 1.0e-4, 4, 12
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(2))]},
                             {"params": [nn.Parameter(torch.zeros(2))], "lr": peak / 10}], lr=peak)
    sched = LrSchedule.build(opt, ScheduleConfig(warmup_steps=warm, min_lr=floor_lr), peak=peak, total=total)
    got = []
    for s in range(total + 2):
        got.append(sched.apply(opt, s))
        assert opt.param_groups[1]["lr"] == pytest.approx(got[-1] / 10, rel=1e-12)  # every group scales alike
    # Reference written out independently: MAE's schedule with a 1-step-shifted warmup.
    ref = []
    for s in range(total + 2):
        if s < warm:
            ref.append(peak * (s + 1) / warm)
        else:
            prog = min((s - warm) / (total - warm), 1.0)
            ref.append(floor_lr + (peak - floor_lr) * 0.5 * (1 + math.cos(math.pi * prog)))
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert got[warm - 1] == pytest.approx(peak) and got[total] == pytest.approx(floor_lr)


def test_schedule_is_a_function_of_the_step():
    """Resume needs no saved schedule state: any step's lr comes from (step, config) alone,
    and a run extended with more steps gets the longer cosine."""
    def build(total):
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
        return opt, LrSchedule.build(opt, ScheduleConfig(warmup_steps=3), peak=1.0, total=total)

    opt, sched = build(10)
    walked = [sched.apply(opt, s) for s in range(8)]
    assert build(10)[1].lrs(5) == [walked[5]] and opt.param_groups[0]["lr"] == walked[7]
    longer = build(20)[1]
    assert longer.lrs(2) == sched.lrs(2) and longer.lrs(8)[0] > sched.lrs(8)[0]


@pytest.mark.parametrize("override, words", [
    ("optim.base_lr=-1", ["optim", "base_lr"]),
    ("optim.betas=[0.9, 1.5]", ["optim", "betas"]),
    ("schedule.warmup_steps=-2", ["schedule", "warmup_steps"]),
    ("deepspeed.zero_stage=5", ["deepspeed", "zero_stage"]),
    ("deepspeed.precision=fp8", ["deepspeed.precision", "bf16"]),
    ("deepspeed.grad_accum=0", ["deepspeed", "grad_accum"]),
    ("train.keep_last=0", ["train", "keep_last"]),
    ("train.steps=ten", ["train.steps", "int"]),
    ("logging.every=0", ["logging", "every"]),
    ("train.max_nonfinit=3", ["max_nonfinit", "valid keys"]),
])
def test_bad_recipe_values_give_named_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY, [override])
    msg = str(e.value)
    assert "echofm_tiny.yaml" in msg and all(w in msg for w in words), msg
