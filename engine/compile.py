"""torch.compile of the training step's hot regions, and whole-step CUDA graphs (issue 14).

- `CompileConfig` (the recipe's `train.compile`): what the trainer compiles. Off by default;
  `benchmarks/train.py` measures each setting on the trainer's own step.
- `compile_regions(model, mode)`: compiles every transformer `Block` in place
  (`nn.Module.compile`: parameter names and checkpoints unchanged) and the model's loss
  (`EchoFM.loss_fn`, i.e. `losses.compute`), not the whole model: the blocks share one code
  object, so dynamo compiles the encoder block once and the decoder block once and reuses
  them for every layer (seconds, not minutes), and the Triton gathers / tube attention
  between them stay eager custom ops. Where compiling cannot work (no dynamo for this
  Python, no C++ compiler for CPU inductor, no Triton for CUDA inductor) it warns in one
  line and leaves the model eager.
- `compile_for_training(model, cfg, device)`: the trainer's entry point: `compile_regions`
  per `CompileConfig`; a CUDA-graph mode ("reduce-overhead": torch's cudagraph trees over
  each compiled region's forward and backward) falls back to its graph-less twin, with a
  warning, where there is no CUDA.
- `first_step_or_eager(step, model, *args)`: the first (compiling) call of a step; if
  compilation fails there, it warns in one line, reverts the regions to eager and reruns.
- `GraphedStep(step, *example)`: captures one whole training step (forward, loss,
  backward, optimizer step) in a CUDA graph and replays it with new inputs copied into
  static buffers. Needs static shapes (a fixed mask ratio gives them), no host syncs
  inside the step, and an optimizer built with `capturable=True` (fused AdamW supports
  it; a changing lr must then be a tensor). Without CUDA it warns and runs eagerly.

Why the trainer cannot use `GraphedStep` (benchmarks/train.py measures it as an upper
bound only): a CUDA graph replays device work and nothing else, and the trainer's step is
not only device work. (1) Its one host read per micro-batch decides, on every rank alike,
whether the backward runs at all (non-finite skip). (2) DeepSpeed 0.19's bf16 step (ZeRO 0:
FP16_UnfusedOptimizer; ZeRO 1-2: the ZeRO optimizer) reads the overflow flag and the
gradient norm on the host (`.item()`), decides the clip factor in Python, loops over the
parameters in Python and keeps its step counters on the host: a graph would replay none of
those decisions and freeze the lr of the capture. So the trainer's graphs are the compiled
regions' own (`mode="reduce-overhead"`: forward and backward of each block and of the loss),
and the optimizer step stays DeepSpeed's.
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .model import Block

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
"""Modes that add CUDA graphs (cudagraph trees) -> the same mode without them."""
_EAGER_LOSS = "_echofm_eager"  # attribute of a compiled loss: the eager function it wraps
_GRAPHS = "_echofm_cudagraphs"  # attribute of a model compiled with a CUDA-graph mode


@dataclass(kw_only=True, slots=True)
class CompileConfig:
    """torch.compile of the step's hot regions (engine/compile.py; measured by benchmarks/train.py)."""

    blocks: bool = False
    """Compile every encoder and decoder block in place: norms, bias adds, GELU and residuals
    fused around the matmuls and the attention kernels."""
    loss: bool = False
    """Compile the losses (EchoFM.loss_fn = losses.compute: norm-pix reconstruction and the
    contrastive terms, elementwise work over every token of the clip)."""
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of the inductor backend. reduce-overhead (and max-autotune) add CUDA
    graphs to the compiled regions' forward and backward: they need static shapes (a fixed
    mask ratio and batch: set data.drop_last, or the last partial batch records more graphs)
    and deepspeed.grad_accum 1; without CUDA they run as their graph-less twin, with a warning."""
    backend: str = "inductor"
    """torch.compile backend: inductor (generates fused kernels), or a tracing-only one such as
    aot_eager (the CPU tests' cheap check that compiling keeps the numbers)."""

    @property
    def enabled(self) -> bool:
        return self.blocks or self.loss

    def validate(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {self.mode!r}")
        if not self.backend:
            raise ValueError("backend must name a torch.compile backend (inductor, aot_eager, ...)")
        if self.backend != "inductor" and self.mode != "default":
            raise ValueError(f"mode {self.mode!r} is an inductor mode; backend {self.backend!r} takes mode 'default'")


def regions(model: nn.Module) -> list[nn.Module]:
    """The modules `compile_regions` compiles: every transformer Block of the model."""
    return [m for m in model.modules() if isinstance(m, Block)]


def _loss_owners(model: nn.Module) -> list[nn.Module]:
    """Modules with a loss hook (`loss_fn`: EchoFM), the model itself or inside it."""
    return [m for m in model.modules() if callable(getattr(m, "loss_fn", None))]


def compile_unavailable(device: torch.device, backend: str = "inductor") -> str | None:
    """Why torch.compile cannot run here (None when it can)."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported by this torch / Python"
    if backend != "inductor":
        return None
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "inductor on CPU needs a C++ compiler (c++, g++ or clang++ on PATH)"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor on CUDA needs triton"
    return None


def compile_regions(model: nn.Module, mode: str = "default", *, backend: str = "inductor",
                    dynamic: bool | None = False, blocks: bool = True, loss: bool = True) -> nn.Module:
    """Compile each Block of `model` (blocks) and its loss hook (loss) in place; returns the model
    (eager, with a warning, when compiling is unavailable). dynamic=False: one graph per shape
    (fixed mask ratio and batch)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_regions: mode must be one of {COMPILE_MODES}, got {mode!r}")
    param = next(model.parameters(), None)
    reason = compile_unavailable(param.device if param is not None else torch.device("cpu"), backend)
    if reason:
        warnings.warn(f"compile_regions: {reason}; the model runs eager", stacklevel=2)
        return model
    kw = {"backend": backend, "dynamic": dynamic, **({"mode": mode} if backend == "inductor" else {})}
    for blk in regions(model) if blocks else []:
        blk.compile(**kw)
    for owner in _loss_owners(model) if loss else []:
        eager = getattr(owner.loss_fn, _EAGER_LOSS, owner.loss_fn)
        compiled = torch.compile(eager, **kw)
        setattr(compiled, _EAGER_LOSS, eager)
        owner.loss_fn = compiled
    if mode in GRAPH_MODES and backend == "inductor":
        setattr(model, _GRAPHS, True)
    return model


def step_begin(model: nn.Module) -> None:
    """Before each micro-batch of a model compiled with CUDA graphs: a new iteration, whose
    replays may reuse the memory of the last one's outputs (torch's cudagraph trees guess
    this from the call order; a skipped backward would mislead the guess)."""
    if getattr(model, _GRAPHS, False):
        torch.compiler.cudagraph_mark_step_begin()


def compile_for_training(model: nn.Module, cfg: CompileConfig, device: torch.device) -> nn.Module:
    """`compile_regions` as `cfg` says (nothing when cfg compiles nothing); a CUDA-graph mode
    without CUDA compiles as its graph-less twin, with a one-line warning."""
    if not cfg.enabled:
        return model
    mode = cfg.mode
    if mode in GRAPH_MODES and device.type != "cuda":
        warnings.warn(f"train.compile.mode={mode!r}: CUDA graphs need a CUDA device; compiling with "
                      f"mode {GRAPH_MODES[mode]!r} on {device.type}", stacklevel=2)
        mode = GRAPH_MODES[mode]
    return compile_regions(model, mode, backend=cfg.backend, blocks=cfg.blocks, loss=cfg.loss)


def uncompile_regions(model: nn.Module) -> nn.Module:
    """Undo `compile_regions`: the blocks and the loss run eager again."""
    for blk in regions(model):
        blk._compiled_call_impl = None  # what nn.Module.compile sets; None = the eager call
    for owner in _loss_owners(model):
        owner.loss_fn = getattr(owner.loss_fn, _EAGER_LOSS, owner.loss_fn)
    if hasattr(model, _GRAPHS):
        delattr(model, _GRAPHS)
    return model


def is_compiled(model: nn.Module) -> bool:
    return (any(getattr(blk, "_compiled_call_impl", None) is not None for blk in regions(model))
            or any(hasattr(owner.loss_fn, _EAGER_LOSS) for owner in _loss_owners(model)))


def first_step_or_eager(step: Callable, model: nn.Module, *args):
    """`step(*args)`; if the compiled regions fail to compile or run there, warn, revert them to
    eager, clear the gradients, restore the random state (the same masks) and run the step
    again. Out-of-memory errors propagate."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return step(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if not is_compiled(model):
            raise
        warnings.warn(f"compile_regions: the compiled step failed ({_describe(e)}); running eager", stacklevel=2)
        uncompile_regions(model)
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return step(*args)


def _describe(e: BaseException) -> str:
    """One line: the exception type and the start of its message (dynamo puts the backend's
    own error on the message's second line), or of its root cause's."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    cause = f"{type(root).__name__}: " if root is not e else ""
    return f"{type(e).__name__}: {cause}{' '.join(lines[:2])[:240]}"


# ---------------------------------------------------------------- CUDA graphs


def _static_copy(x):
    """Capture-time input buffers: tensors cloned, dataclasses (a Mask) field by field."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _static_copy(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def _fill(static, new, where: str) -> None:
    """Copy `new` into the static buffers; anything else must be equal (static shapes)."""
    if isinstance(static, torch.Tensor):
        if not isinstance(new, torch.Tensor) or new.shape != static.shape or new.dtype != static.dtype:
            got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"GraphedStep: {where} must stay {tuple(static.shape)} {static.dtype} "
                             f"(the graph was captured for it), got {got}")
        static.copy_(new, non_blocking=True)
    elif dataclasses.is_dataclass(static):
        for f in dataclasses.fields(static):
            _fill(getattr(static, f.name), getattr(new, f.name), f"{where}.{f.name}")
    elif static != new:
        raise ValueError(f"GraphedStep: {where} must stay {static!r} (the graph was captured for it), got {new!r}")


class GraphedStep:
    """One training step captured in a CUDA graph (see the module docstring).

    `step(*args)` must zero the gradients itself (`optimizer.zero_grad(set_to_none=True)`),
    then run forward, backward and the optimizer step, and return what the caller reads
    (e.g. the detached loss). The `warmup` calls before capture (side stream, as CUDA
    graphs require) are real steps on `example`. Each call copies its arguments into the
    capture-time buffers, replays, and returns the capture-time outputs: read them before
    the next call.
    """

    def __init__(self, step: Callable, *example, warmup: int = 3):
        self.step, self.graph, self.out = step, None, None
        device = next((a.device for a in example if isinstance(a, torch.Tensor)), torch.device("cpu"))
        if device.type != "cuda":
            warnings.warn("GraphedStep: CUDA graphs need CUDA tensors; the step runs eager", stacklevel=2)
            return
        self.static = tuple(_static_copy(a) for a in example)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(*self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(*self.static)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *args):
        if self.graph is None:
            return self.step(*args)
        if len(args) != len(self.static):
            raise ValueError(f"GraphedStep: captured with {len(self.static)} arguments, got {len(args)}")
        for i, (s, a) in enumerate(zip(self.static, args)):
            _fill(s, a, f"argument {i}")
        self.graph.replay()
        return self.out
