"""tube_attention: Triton forward/backward and the sdpa backend against a float64 reference.

Runs the Triton kernels on CPU through the interpreter (conftest sets TRITON_INTERPRET=1)
and compiled on CUDA tensors when a GPU is present (benchmarks/gpu_check.sh). Shapes are
tiny and deliberately not multiples of the block sizes. Fresh random inputs each run.
"""
import pytest
import torch

from echofm.kernels import reference as ref
from echofm.kernels import tube_attention
from echofm.kernels.attention import attention_bwd, attention_fwd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
needs_gpu = pytest.mark.gpu(reason="bf16 is broken in the Triton interpreter")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=needs_gpu)]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Head dims the models use (Dh 32, 64, 128); the widest only compiled on GPU (slow to interpret).
HEAD_DIMS = [16, 32, 64] + ([128] if GPU else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error norm ||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(shape, dtype):
    return [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]


def reference_grads(q, k, v, do, mode, scale=None):
    """float64 output and (dq, dk, dv) of the explicit-softmax reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o = ref.tube_attention(*leaves, mode, scale)
    return o, torch.autograd.grad(o, leaves, do.double())


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def check_kernels(mode, dtype, shape):
    """Forward and backward kernels, outputs pre-filled with NaN (an unwritten element fails)."""
    b, h, t, n, dh = shape
    q, k, v = qkv(shape, dtype)
    do = torch.randn(shape, device=DEVICE).to(dtype)
    scale = dh**-0.5
    o_ref, grads_ref = reference_grads(q, k, v, do, mode)
    groups, length = {"joint": (1, t * n), "slice": (t, n), "tube": (n, t)}[mode]
    lse = poisoned((b * h * groups, length), torch.float32)
    o, lse = attention_fwd(q, k, v, mode, scale, out=poisoned(shape, dtype), lse=lse)
    assert torch.isfinite(lse).all()
    assert rel_err(o, o_ref) < TOL[dtype]
    grads = attention_bwd(do, q, k, v, o, lse, mode, scale, *(poisoned(shape, dtype) for _ in range(3)))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[dtype], f"d{name}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ref.MODES)
def test_triton_kernels_match_reference(mode, dtype):
    check_kernels(mode, dtype, (1, 2, 3, 7, 24))  # B, H, T, K, Dh; Dh 24 is padded to 32 in-kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dh", HEAD_DIMS)
def test_head_dims(dh, dtype):
    check_kernels("joint", dtype, (2, 1, 2, 5, dh))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ref.MODES)
def test_many_tiles_and_packs(mode, dtype):
    # T=5, K=29: joint L=145 spans several tiles and steps with a ragged last block; slice
    # (L=29) and tube (L=5) pack several groups per tile, the last pack partly empty.
    shape = (1, 2, 5, 29, 32)
    q, k, v = qkv(shape, dtype)
    q = q * 3  # peaky softmax so the running max actually changes between key blocks
    do = torch.randn(shape, device=DEVICE).to(dtype)
    o_ref, grads_ref = reference_grads(q, k, v, do, mode, scale=0.3)
    o, lse = attention_fwd(q, k, v, mode, 0.3, out=poisoned(shape, dtype))
    assert rel_err(o, o_ref) < TOL[dtype]
    for g, g_ref in zip(attention_bwd(do, q, k, v, o, lse, mode, 0.3), grads_ref):
        assert rel_err(g, g_ref) < TOL[dtype]


# Leaf shapes for B=2, T=3, K=5, H=2, Dh=16. "qkv": one fused projection [B, T, K, 3, H, Dh]
# (T and K still merge: flat rows); "kmajor": [3, B, H, K, T, Dh] (T and K do not merge, so
# joint mode takes the kernels' div/mod index path).
LEAVES = {"qkv": (2, 3, 5, 3, 2, 16), "kmajor": (3, 2, 2, 5, 3, 16)}


def views(leaf: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """q, k, v as non-contiguous [B, H, T, K, Dh] views into one leaf tensor."""
    if layout == "qkv":
        return [leaf[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3)]
    return [leaf[i].transpose(2, 3) for i in range(3)]


@pytest.mark.parametrize("mode,layout", [("joint", "qkv"), ("tube", "qkv"), ("joint", "kmajor"), ("slice", "kmajor")])
def test_autograd_with_strided_views(mode, layout):
    # q, k, v are read in place through their strides; gradients flow back into the leaf.
    leaf = torch.randn(LEAVES[layout], device=DEVICE, requires_grad=True)
    q, k, v = views(leaf, layout)
    assert not q.is_contiguous()
    o = tube_attention(q, k, v, mode, backend="triton")
    do = torch.randn_like(o)
    (grad,) = torch.autograd.grad(o, leaf, do)
    leaf_ref = leaf.detach().double().requires_grad_()
    o_ref = ref.tube_attention(*views(leaf_ref, layout), mode)
    (grad_ref,) = torch.autograd.grad(o_ref, leaf_ref, do.double())
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(grad, grad_ref) < 1e-4


@pytest.mark.parametrize("mode", ["joint", "tube"])
def test_backward_of_a_sum(mode):
    # o.sum() hands backward an expanded dO with all strides 0: read in place like any view.
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 3, 5, 16), torch.float32))
    grads = torch.autograd.grad(tube_attention(q, k, v, mode, backend="triton").sum(), (q, k, v))
    _, grads_ref = reference_grads(q, k, v, torch.ones_like(q), mode)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ref.MODES)
def test_sdpa_backend_matches_reference(mode, dtype):
    shape = (2, 2, 3, 7, 24)
    q, k, v = (t.requires_grad_() for t in qkv(shape, dtype))
    o = tube_attention(q, k, v, mode, backend="sdpa")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, grads_ref = reference_grads(q, k, v, do, mode)
    assert o.dtype == dtype and o.shape == shape
    assert rel_err(o, o_ref) < TOL[dtype]
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[dtype]


def test_math_backend_and_mode_semantics():
    # "slice" must equal joint attention run separately per time slice; "tube" per position.
    q, k, v = qkv((1, 2, 3, 4, 8), torch.float64)
    sl = tube_attention(q, k, v, "slice", backend="math")
    tu = tube_attention(q, k, v, "tube", backend="math")
    for t in range(3):
        one = tube_attention(*(x[:, :, t : t + 1] for x in (q, k, v)), "joint", backend="math")
        torch.testing.assert_close(sl[:, :, t : t + 1], one)
    for j in range(4):
        one = tube_attention(*(x[:, :, :, j : j + 1] for x in (q, k, v)), "joint", backend="math")
        torch.testing.assert_close(tu[:, :, :, j : j + 1], one)


def test_bad_arguments_name_the_problem(monkeypatch):
    q, k, v = qkv((1, 1, 2, 2, 8), torch.float32)
    with pytest.raises(ValueError, match="mode"):
        tube_attention(q, k, v, "diagonal")
    with pytest.raises(ValueError, match="backend"):
        tube_attention(q, k, v, "joint", backend="cudnn")
    cpu = [t.cpu() for t in (q, k, v)]
    with pytest.raises(RuntimeError, match="xformers"):
        tube_attention(*cpu, "joint", backend="xformers")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need the interpreter for Triton
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tube_attention(*cpu, "joint", backend="triton")


@pytest.mark.parametrize("mode", ref.MODES)
def test_custom_ops_pass_opcheck(mode):
    # The Triton kernels are torch custom ops (so torch.compile and CUDA graphs see one opaque
    # call): schema, fake (meta) shapes, autograd registration and AOT dispatch must agree.
    from echofm.kernels import attention as attention_kernels

    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 3, 5, 16), torch.float32))
    torch.library.opcheck(attention_kernels._fwd_op, (q, k, v, mode, 0.25))
    o, lse = attention_kernels._fwd_op(q, k, v, mode, 0.25)
    do = torch.randn_like(o)
    args = (do, *(t.detach() for t in (q, k, v, o, lse)), mode, 0.25)  # no double backward
    torch.library.opcheck(attention_kernels._bwd_op, args)


@pytest.mark.parametrize("mode,layout", [("slice", "qkv"), ("tube", "kmajor")])
def test_sdpa_folds_strided_views(mode, layout):
    # sdpa folds the groups into the head dim ([B, H*G, L, Dh]), copying when strides demand.
    leaf = torch.randn(LEAVES[layout], device=DEVICE, requires_grad=True)
    o = tube_attention(*views(leaf, layout), mode, backend="sdpa")
    do = torch.randn_like(o)
    (grad,) = torch.autograd.grad(o, leaf, do)
    leaf_ref = leaf.detach().double().requires_grad_()
    o_ref = ref.tube_attention(*views(leaf_ref, layout), mode)
    (grad_ref,) = torch.autograd.grad(o_ref, leaf_ref, do.double())
    assert rel_err(o, o_ref) < 1e-4 and rel_err(grad, grad_ref) < 1e-4
