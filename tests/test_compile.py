"""Regional compile and whole-step CUDA graphs (engine/compile.py): same numbers as eager, and
clean fallbacks where they cannot run (CPU without a compiler, no CUDA, a failing compile); the
recipe's train.compile section. The trainer's compiled runs: tests/test_trainer.py."""
import copy
import os
import warnings

import pytest
import torch

from echofm.engine import compile as compiling
from echofm.engine import losses
from echofm.engine.compile import CompileConfig
from echofm.engine.masking import MaskConfig
from echofm.engine.model import EchoFM, ModelConfig

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
SMALL = dict(preset="echofm_tiny", num_frames=8, img_size=32, patch_size=8, tubelet=2, embed_dim=64, depth=2,
             num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, pred_t_dim=4)
# Inductor's CPU code generation compiles C++: ~90 s cold on 2 cores (seconds once cached).
slow_inductor = pytest.mark.skipif(not GPU and os.environ.get("ECHOFM_SLOW") != "1",
                                   reason="inductor on CPU compiles C++ (~90 s cold): set ECHOFM_SLOW=1 to run it")


def model_and_batch(backend="auto", seed=0):
    torch.manual_seed(seed)
    model = EchoFM(ModelConfig(**SMALL, attn_backend=backend), MaskConfig(ratio=0.75)).to(DEVICE)
    g = torch.Generator(device="cpu").manual_seed(seed)
    video = torch.randint(0, 256, (2, 8, 32, 32, 3), generator=g, dtype=torch.uint8).to(DEVICE)
    return model, video, model.draw_mask(2, DEVICE)


def loss_and_grads(model, video, mask):
    model.zero_grad(set_to_none=True)
    loss = model(video, mask=mask)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(model, compiled, video, mask, tol):
    loss, grads = loss_and_grads(model, video, mask)
    loss_c, grads_c = loss_and_grads(compiled, video, mask)
    assert compiling.is_compiled(compiled) and not compiling.is_compiled(model)
    assert abs(loss_c.item() - loss.item()) <= tol * abs(loss.item())
    assert grads.keys() == grads_c.keys()
    limit = 1e-3 if tol < 1e-4 else 1e-2
    for n in grads:
        # floor 1e-6: phase_norm.bias has an exactly-zero true gradient (the contrastive
        # loss centres the phase over time), so its computed one is rounding noise
        err = (grads_c[n] - grads[n]).norm() / grads[n].norm().clamp(min=1e-6)
        assert err < limit, n


@pytest.mark.parametrize("attn", ["auto", "triton"])
def test_regional_compile_matches_eager(attn):
    # aot_eager: dynamo + AOTAutograd through the blocks (and the Triton custom op) and the
    # loss, without inductor's code generation; parameter names stay those of the eager model.
    model, video, mask = model_and_batch(attn)
    compiled = compiling.compile_regions(copy.deepcopy(model), backend="aot_eager")
    assert compiled.state_dict().keys() == model.state_dict().keys()
    assert len(compiling.regions(compiled)) == 2 + 1 + 1  # encoder blocks, decoder block, phase block
    assert compiled.loss_fn is not losses.compute and model.loss_fn is losses.compute
    check_same(model, compiled, video, mask, tol=1e-5)


def test_blocks_and_loss_compile_separately_and_revert():
    model, video, mask = model_and_batch()
    compiling.compile_regions(model, backend="aot_eager", blocks=False)
    assert compiling.is_compiled(model) and all(b._compiled_call_impl is None for b in compiling.regions(model))
    loss_c, _ = loss_and_grads(model, video, mask)
    compiling.uncompile_regions(model)
    assert model.loss_fn is losses.compute and not compiling.is_compiled(model)
    compiling.compile_regions(model, backend="aot_eager", loss=False)
    assert model.loss_fn is losses.compute and compiling.is_compiled(model)
    compiling.uncompile_regions(model)
    loss, _ = loss_and_grads(model, video, mask)
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-6)


def test_compile_config_is_checked_where_the_recipe_sets_it():
    from pathlib import Path

    from echofm.engine.config import ConfigError, load_recipe

    assert not CompileConfig().enabled and CompileConfig(loss=True).enabled
    with pytest.raises(ValueError, match="inductor mode; backend 'aot_eager' takes mode 'default'"):
        CompileConfig(backend="aot_eager", mode="reduce-overhead").validate()
    tiny = Path(__file__).resolve().parents[1] / "recipes/pretrain/echofm_tiny.yaml"
    r = load_recipe(tiny, ["train.compile.blocks=true", "train.compile.mode=reduce-overhead"])
    assert r.train.compile == CompileConfig(blocks=True, mode="reduce-overhead")
    with pytest.raises(ConfigError, match="train.compile.mode: expected 'default'"):
        load_recipe(tiny, ["train.compile.mode=fastest"])
    with pytest.raises(ConfigError, match="train.compile: backend must name"):
        load_recipe(tiny, ["train.compile.backend="])


def test_graph_mode_needs_cuda_and_one_micro_batch_per_step(monkeypatch):
    """reduce-overhead without CUDA: one warning, then the graph-less mode; with gradient
    accumulation: a named error before anything is built."""
    from pathlib import Path

    from echofm.engine.config import load_recipe
    from echofm.engine.errors import UserError
    from echofm.engine.distributed import prepare_model

    seen = []
    monkeypatch.setattr(compiling, "compile_regions", lambda model, mode, **kw: seen.append((mode, kw)) or model)
    model, _, _ = model_and_batch()
    cfg = CompileConfig(blocks=True, mode="reduce-overhead")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiling.compile_for_training(model, cfg, torch.device("cpu"))
    assert [str(w.message) for w in caught] == ["train.compile.mode='reduce-overhead': CUDA graphs need a CUDA "
                                               "device; compiling with mode 'default' on cpu"]
    assert seen == [("default", dict(backend="inductor", blocks=True, loss=False))]
    compiling.compile_for_training(model, CompileConfig(), torch.device("cpu"))  # nothing to compile: no call
    assert len(seen) == 1
    tiny = Path(__file__).resolve().parents[1] / "recipes/pretrain/echofm_tiny.yaml"
    recipe = load_recipe(tiny, ["train.compile.blocks=true", "train.compile.mode=reduce-overhead",
                                "deepspeed.grad_accum=2"])
    with pytest.raises(UserError, match="needs deepspeed.grad_accum=1, got 2"):
        prepare_model(model, recipe, torch.device("cpu"))


def test_step_begin_marks_an_iteration_only_for_graph_modes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    model, _, _ = model_and_batch()
    compiling.compile_regions(model, "default", backend="aot_eager")
    compiling.step_begin(model)
    assert calls == []
    compiling.compile_regions(model, "reduce-overhead")  # lazy: nothing compiles until called
    compiling.step_begin(model)
    assert calls == [1]
    compiling.uncompile_regions(model)
    compiling.step_begin(model)
    assert calls == [1]


@slow_inductor
def test_inductor_compile_matches_eager():
    model, video, mask = model_and_batch()
    check_same(model, compiling.compile_regions(copy.deepcopy(model)), video, mask, tol=1e-4)


def test_compile_unavailable_warns_and_stays_eager(monkeypatch):
    model, video, mask = model_and_batch()
    monkeypatch.setattr(compiling, "compile_unavailable", lambda device, backend="inductor": "no C++ compiler here")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler here; the model runs eager"):
        out = compiling.compile_regions(model)
    assert out is model and not compiling.is_compiled(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        compiling.compile_regions(model, "fastest")


def test_cpu_without_a_compiler_is_reported(monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert "C++ compiler" in compiling.compile_unavailable(torch.device("cpu"))
    assert compiling.compile_unavailable(torch.device("cpu"), backend="aot_eager") is None


def test_failing_compile_falls_back_to_eager_on_the_first_step():
    model, video, mask = model_and_batch()
    loss_ref, _ = loss_and_grads(copy.deepcopy(model), video, mask)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    compiling.compile_regions(model, backend=broken_backend)
    with pytest.warns(UserWarning, match="compiled step failed .*backend exploded.*running eager"):
        loss, _ = compiling.first_step_or_eager(lambda v, m: loss_and_grads(model, v, m), model, video, mask)
    assert not compiling.is_compiled(model)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def make_step(model, opt):
    def step(video, mask):
        opt.zero_grad(set_to_none=True)
        loss = model(video, mask=mask)["loss"]
        loss.backward()
        opt.step()
        return loss.detach()
    return step


@pytest.mark.skipif(GPU, reason="checks the CPU fallback")
def test_graphed_step_without_cuda_warns_and_runs_eager():
    model, video, mask = model_and_batch()
    twin = copy.deepcopy(model)
    step = make_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    ref_step = make_step(twin, torch.optim.AdamW(twin.parameters(), lr=1e-3))
    with pytest.warns(UserWarning, match="CUDA graphs need CUDA tensors"):
        graphed = compiling.GraphedStep(step, video, mask)
    assert not graphed.captured
    for _ in range(2):
        assert graphed(video, mask).item() == pytest.approx(ref_step(video, mask).item(), rel=1e-6)


def test_static_inputs_must_keep_their_shapes():
    _, video, mask = model_and_batch()
    static = (compiling._static_copy(video), compiling._static_copy(mask))
    assert static[1].ids_keep is not mask.ids_keep and torch.equal(static[1].ids_keep, mask.ids_keep)
    other = EchoFM(ModelConfig(**SMALL), MaskConfig(ratio=0.5)).draw_mask(2, DEVICE)
    with pytest.raises(ValueError, match="argument 1.ids_keep must stay"):
        compiling._fill(static[1], other, "argument 1")
    with pytest.raises(ValueError, match="argument 0 must stay"):
        compiling._fill(static[0], video[:1], "argument 0")


@pytest.mark.gpu(reason="CUDA graphs need a CUDA GPU")
def test_graphed_step_replays_like_eager_steps():
    model, video, mask = model_and_batch()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True)
    ref_step = make_step(twin, ref_opt)
    graphed = compiling.GraphedStep(make_step(model, opt), video, mask, warmup=2)
    for _ in range(2):  # the warmup calls were real steps (the capture only records one)
        ref_step(video, mask)
    assert graphed.captured
    for seed in (1, 2):
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randint(0, 256, video.shape, generator=g, dtype=torch.uint8).to(DEVICE)
        m = model.draw_mask(2, DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = graphed(v, m).item()
        assert loss == pytest.approx(ref_step(v, m).item(), rel=1e-4)
