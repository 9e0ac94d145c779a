"""Masking gather/scatter kernels (tokens and raw video patches) against float64 torch.

Triton kernels run on CPU through the interpreter (conftest sets TRITON_INTERPRET=1) and
compiled on CUDA tensors when a GPU is present. Sizes are not multiples of block sizes;
outputs are pre-filled with NaN so an element a kernel never writes fails the check.
"""
import pytest
import torch

from echofm.kernels import gather_patches, gather_tokens, reference, scatter_tokens
from echofm.kernels.gather import gather_rows, inverse_ids, patches_bwd, patches_fwd, scatter_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.gpu(reason="bf16 is broken in the Triton interpreter")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=needs_gpu)]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
MEAN, STD = (0.12, 0.5, 0.9), (0.25, 0.3, 0.6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_ids(b: int, n: int, k: int) -> torch.Tensor:
    """[b, k] int64: the first k of a random permutation per row (what masking produces)."""
    return torch.rand(b, n, device=DEVICE).argsort(1)[:, :k]


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_scatter_rows_write_every_element(dtype):
    b, n, k, d = 2, 13, 5, 48
    x = torch.randn(b, n, d, device=DEVICE).to(dtype)
    ids = random_ids(b, n, k)
    y = gather_rows(x, ids, out=poisoned((b, k, d), dtype))
    assert torch.equal(y, reference.gather_tokens(x, ids))
    pos = inverse_ids(ids, n)
    fill_vec, fill_full = torch.randn(d, device=DEVICE).to(dtype), torch.randn(b, n, d, device=DEVICE).to(dtype)
    for fill in (None, fill_vec, fill_full):
        out = scatter_rows(y, pos, fill, n, out=poisoned((b, n, d), dtype))
        zeros = torch.zeros(d, dtype=dtype, device=DEVICE)
        expect = reference.scatter_tokens(y, ids, zeros if fill is None else fill, n)
        assert torch.equal(out, expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tokens_autograd_matches_reference(dtype):
    b, n, k, d = 2, 11, 4, 40
    ids = random_ids(b, n, k)
    x = torch.randn(b, n, d, device=DEVICE).to(dtype).requires_grad_()
    y = gather_tokens(x, ids, backend="triton")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference.gather_tokens(xr, ids), xr, dy.double())
    assert torch.equal(dx.double(), dx_ref)

    for fill_shape in ((d,), (1, 1, d), (b, n, d), (b, 1, d)):
        yy = torch.randn(b, k, d, device=DEVICE).to(dtype).requires_grad_()
        fill = torch.randn(fill_shape, device=DEVICE).to(dtype).requires_grad_()
        out = scatter_tokens(yy, ids, fill, n, backend="triton")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (yy, fill), dout)
        leaves = [t.detach().double().requires_grad_() for t in (yy, fill)]
        out_ref = reference.scatter_tokens(leaves[0], ids, leaves[1], n)
        assert torch.equal(out.double(), out_ref)
        for g, g_ref in zip(grads, torch.autograd.grad(out_ref, leaves, dout.double())):
            assert g.dtype == dtype and g.shape == g_ref.shape and rel_err(g, g_ref) < TOL[dtype]


def test_mask_token_keeps_its_dtype():
    # A float32 mask-token parameter [1, 1, D] with half-precision tokens (autocast-style).
    b, n, k, d = 2, 9, 4, 32
    ids = random_ids(b, n, k)
    y = torch.randn(b, k, d, device=DEVICE).half()
    token = torch.randn(1, 1, d, device=DEVICE, requires_grad=True)
    out = scatter_tokens(y, ids, token, n, backend="triton")
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, token, dout)
    masked = torch.ones(b, n, 1, device=DEVICE).scatter(1, ids[..., None], 0.0)
    assert out.dtype == torch.float16 and grad.dtype == torch.float32 and grad.shape == token.shape
    assert rel_err(grad, (dout.double() * masked).sum((0, 1), keepdim=True)) < 1e-6


def test_bad_ids_name_the_problem():
    x = torch.randn(2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="integer"):
        gather_tokens(x, torch.zeros(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="do not match"):
        gather_tokens(x, torch.zeros(3, 3, dtype=torch.long, device=DEVICE))


def test_scatter_is_the_inverse_of_gather():
    b, n, k, d = 3, 9, 4, 20
    x = torch.randn(b, n, d, device=DEVICE)
    ids = random_ids(b, n, k)
    y = gather_tokens(x, ids, backend="triton")
    # Visible rows back in place and the rest from x itself reproduces x exactly.
    assert torch.equal(scatter_tokens(y, ids, x, n, backend="triton"), x)
    assert torch.equal(gather_tokens(scatter_tokens(y, ids, torch.zeros(d, device=DEVICE), n, backend="triton"), ids,
                                     backend="triton"), y)


def conv3d_then_gather(video: torch.Tensor, ids, patch, weight, bias, mean, std) -> torch.Tensor:
    """The unfused path in float64: normalise, Conv3d patch embedding, then gather."""
    x = video.double()
    if video.dtype == torch.uint8:
        x = x / 255
    if mean is not None:
        x = (x - x.new_tensor(mean)) / x.new_tensor(std)
    emb = torch.nn.functional.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, stride=patch)  # [B, D, T', H', W']
    return reference.gather_tokens(emb.flatten(2).transpose(1, 2), ids)


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.uint8, id="uint8"), *DTYPES])
def test_patches_equal_conv3d_then_gather(dtype, norm):
    b, t, h, w, c, patch = 2, 4, 8, 12, 3, (2, 4, 4)  # 2*2*3 = 12 patches of 96 values
    if dtype == torch.uint8:
        video = torch.randint(0, 256, (b, t, h, w, c), dtype=torch.uint8, device=DEVICE)
    else:
        video = torch.randn(b, t, h, w, c, device=DEVICE).to(dtype)
    mean, std = (MEAN, STD) if norm else (None, None)
    ids = random_ids(b, 12, 5)
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    p = patches_fwd(video, ids, patch, None if not norm and dtype != torch.uint8 else _norm(dtype, mean, std),
                    out=poisoned((b, 5, 96), out_dtype))
    assert p.dtype == out_dtype
    weight = torch.randn(7, c, *patch, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(7, dtype=torch.float64, device=DEVICE)
    embedded = p.double() @ weight.reshape(7, -1).T + bias
    assert rel_err(embedded, conv3d_then_gather(video, ids, patch, weight, bias, mean, std)) < TOL.get(dtype, 1e-6)
    public = gather_patches(video, ids, patch, mean, std, backend="triton")
    assert torch.equal(public, p)


def _norm(dtype, mean, std):
    params = reference.norm_params(3, dtype == torch.uint8, mean, std)
    return tuple(t.to(DEVICE, torch.float32) for t in params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patches_backward_scatters_into_the_video(dtype):
    b, t, h, w, c, patch = 2, 2, 8, 12, 3, (1, 4, 4)  # 2*2*3 = 12 patches of 48 values
    video = torch.randn(b, t, h, w, c, device=DEVICE).to(dtype).requires_grad_()
    ids = random_ids(b, 12, 7)
    p = gather_patches(video, ids, patch, MEAN, STD, backend="triton")
    dp = torch.randn_like(p)
    (dv,) = torch.autograd.grad(p, video, dp)
    vr = video.detach().double().requires_grad_()
    (dv_ref,) = torch.autograd.grad(reference.gather_patches(vr, ids, patch, MEAN, STD), vr, dp.double())
    assert rel_err(dv, dv_ref) < TOL[dtype]
    # The kernel writes every video element (zeros off the visible patches): poison and compare.
    scale = _norm(dtype, MEAN, STD)[0]
    full = patches_bwd(dp, inverse_ids(ids, 12), video.shape, patch, scale, dtype, out=poisoned(video.shape, dtype))
    assert torch.equal(full, dv)


def test_norm_constants_reach_the_device_once():
    # Regression: gather_patches copied mean/std to the device on every call, a host-to-device
    # copy that CUDA graph capture refuses. Config tuples are now converted once per device.
    from echofm.kernels.reference import device_norm

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a = device_norm(3, True, mean, std, DEVICE, torch.float32)
    b = device_norm(3, True, list(mean), list(std), DEVICE, torch.float32)
    assert a[0] is b[0] and a[1] is b[1]
    torch.testing.assert_close(a[0], torch.tensor([1 / (255 * s) for s in std], device=DEVICE))
    torch.testing.assert_close(a[1], torch.tensor([-m / s for m, s in zip(mean, std)], device=DEVICE))
    assert device_norm(3, False, None, None, DEVICE, torch.float32) is None
