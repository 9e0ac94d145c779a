"""Regional torch.compile and whole-step CUDA graphs for the training step (issue 14).

- `compile_regions(model, mode)`: compiles every transformer `Block` in place
  (`nn.Module.compile`: parameter names and checkpoints unchanged), not the whole model:
  the blocks share one code object, so dynamo compiles the encoder block once and the
  decoder block once and reuses them for every layer (seconds, not minutes), and the
  Triton gathers / tube attention between them stay eager custom ops. Where compiling
  cannot work (no dynamo for this Python, no C++ compiler for CPU inductor, no Triton for
  CUDA inductor) it warns in one line and leaves the model eager.
- `first_step_or_eager(step, model, *args)`: the first (compiling) call of a step; if
  compilation fails there, it warns in one line, reverts the blocks to eager and reruns.
- `GraphedStep(step, *example)`: captures one whole training step (forward, loss,
  backward, optimizer step) in a CUDA graph and replays it with new inputs copied into
  static buffers. Needs static shapes (a fixed mask ratio gives them), no host syncs
  inside the step, and an optimizer built with `capturable=True` (fused AdamW supports
  it; a changing lr must then be a tensor). Without CUDA it warns and runs eagerly.

benchmarks/train.py measures each of these against eager and reports the winner.
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .model import Block

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def regions(model: nn.Module) -> list[nn.Module]:
    """The modules `compile_regions` compiles: every transformer Block of the model."""
    return [m for m in model.modules() if isinstance(m, Block)]


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
                    dynamic: bool | None = False) -> nn.Module:
    """Compile each Block of `model` in place; returns the model (eager, with a warning, when
    compiling is unavailable). dynamic=False: one graph per shape (fixed mask ratio and batch)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_regions: mode must be one of {COMPILE_MODES}, got {mode!r}")
    param = next(model.parameters(), None)
    reason = compile_unavailable(param.device if param is not None else torch.device("cpu"), backend)
    if reason:
        warnings.warn(f"compile_regions: {reason}; the model runs eager", stacklevel=2)
        return model
    kw = {} if backend != "inductor" else {"mode": mode}
    for blk in regions(model):
        blk.compile(backend=backend, dynamic=dynamic, **kw)
    return model


def uncompile_regions(model: nn.Module) -> nn.Module:
    """Undo `compile_regions`: the blocks run eager again."""
    for blk in regions(model):
        blk._compiled_call_impl = None  # what nn.Module.compile sets; None = the eager call
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(blk, "_compiled_call_impl", None) is not None for blk in regions(model))


def first_step_or_eager(step: Callable, model: nn.Module, *args):
    """`step(*args)`; if the compiled blocks fail to compile or run there, warn, revert them to
    eager, clear the gradients and run the step again. Out-of-memory errors propagate."""
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
