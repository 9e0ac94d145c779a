"""Attention dispatch: the chooser's decisions for given table rows and its fallback rule
(pure Python), the committed table, and every backend it can pick against float64."""
import json

import pytest
import torch

from echofm.kernels import attention_backend, dispatch, tube_attention
from echofm.kernels import reference as ref
from echofm.kernels.dispatch import AttentionTable, Row, bucket, choose, load_table

GPU = torch.cuda.is_available()


def row(mode="joint", dh=64, bkt=512, dtype="bfloat16", cap="9.0", train="sdpa-cudnn", infer="sdpa-cudnn"):
    return Row(mode=mode, dh=dh, bucket=bkt, dtype=dtype, capability=cap, train=train, infer=infer)


def pick(table, mode="joint", dh=64, length=393, dtype="bfloat16", cap="9.0", train=True):
    return choose(table, mode=mode, dh=dh, length=length, dtype=dtype, capability=cap, train=train)


@pytest.mark.parametrize("length,want", [(1, 8), (8, 8), (9, 16), (50, 64), (161, 256), (393, 512),
                                         (512, 512), (1569, 2048)])
def test_bucket_is_the_next_power_of_two(length, want):
    assert bucket(length) == want


def test_exact_row_wins_and_train_differs_from_infer():
    t = AttentionTable.from_rows([row(train="sdpa-cudnn", infer="triton")])
    assert pick(t, train=True) == "sdpa-cudnn"
    assert pick(t, train=False) == "triton"


def test_nearest_bucket_in_powers_of_two_tie_to_larger():
    t = AttentionTable.from_rows([row(bkt=256, train="triton"), row(bkt=1024, train="sdpa-flash"),
                                  row(bkt=4096, train="sdpa-efficient")])
    assert pick(t, length=161) == "triton"  # 256: exact bucket
    assert pick(t, length=100) == "triton"  # 128: one power from 256
    assert pick(t, length=393) == "sdpa-flash"  # 512: 256 and 1024 both one away -> larger
    assert pick(t, length=3000) == "sdpa-efficient"  # 4096 exact


def test_tie_goes_to_the_larger_bucket():
    t = AttentionTable.from_rows([row(bkt=1024, train="sdpa-flash"), row(bkt=4096, train="sdpa-efficient")])
    assert pick(t, length=2000) == "sdpa-efficient"  # bucket 2048: one power from each


def test_fallbacks_cpu_fp64_wide_heads_and_unmeasured_keys():
    t = AttentionTable.from_rows([row(train="triton", infer="triton"), row(mode="slice", bkt=64, train="sdpa")])
    assert pick(t, cap=None) == "sdpa"  # rule 1: not CUDA
    assert pick(t, dtype="float64") == "sdpa"  # rule 2
    assert pick(t, dh=256) == "sdpa"
    assert pick(t, dtype="float16") == "triton"  # rule 4: fp16 reads the bf16 rows
    # Rule 5: another GPU, fp32, another head dim -> static default per mode.
    for kw in (dict(cap="8.0"), dict(dtype="float32"), dict(dh=32)):
        assert pick(t, **kw) == "sdpa"
        assert pick(t, mode="tube", length=8, **kw) == "triton"
    assert pick(t, mode="slice", length=50) == "sdpa"  # its own row
    assert pick(AttentionTable({}), mode="slice", length=50) == "triton"


def test_fp16_rows_of_its_own_come_first():
    t = AttentionTable.from_rows([row(train="triton"), row(dtype="float16", train="sdpa-flash")])
    assert pick(t, dtype="float16") == "sdpa-flash"


def test_committed_table_encodes_the_h200_measurements():
    # benchmarks/results/kernels_gpu.json (H200, bf16): joint at encoder shapes is SDPA's
    # (Triton 0.70x); decoder Dh 32 stays Triton (1.12x); slice / tube stay Triton.
    t = load_table()
    assert t.rows, "kernels/attention_table.json has no rows"
    assert pick(t, length=393) in ("sdpa", "sdpa-cudnn")  # ViT-L encoder, 1 + 8 x 49 tokens
    assert pick(t, length=161) in ("sdpa", "sdpa-cudnn")  # ViT-B encoder at 90% mask
    assert pick(t, dh=32, length=1569) == "triton"  # ViT-L decoder
    assert pick(t, mode="slice", length=50) == "triton"  # phase projector
    assert pick(t, mode="tube", length=8) == "triton"
    for r in t.rows.values():
        assert r.train in dispatch.CHOOSABLE and r.infer in dispatch.CHOOSABLE


def write(tmp_path, data):
    p = tmp_path / "table.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


GOOD = dict(mode="joint", dh=64, bucket=512, dtype="bfloat16", capability="9.0", train="sdpa", infer="triton")


@pytest.mark.parametrize("bad,match", [
    ("{not json", "not valid JSON"),
    ({"rows": []}, "schema"),
    ({"schema": 1, "rows": [dict(GOOD, mode="diagonal")]}, "mode 'diagonal'"),
    ({"schema": 1, "rows": [dict(GOOD, bucket=500)]}, "bucket 500"),
    ({"schema": 1, "rows": [dict(GOOD, train="xformers")]}, "backends"),
    ({"schema": 1, "rows": [{k: v for k, v in GOOD.items() if k != "dh"}]}, "row needs"),
    ({"schema": 1, "rows": [GOOD, GOOD]}, "two rows"),
])
def test_bad_tables_name_the_file_and_the_problem(tmp_path, bad, match):
    path = write(tmp_path, bad)
    with pytest.raises(ValueError, match=match) as e:
        load_table(path)
    assert str(path) in str(e.value)


def test_missing_table_is_empty_and_static_defaults_apply(tmp_path):
    t = load_table(tmp_path / "none.json")
    assert t.rows == {} and pick(t) == "sdpa" and pick(t, mode="tube", length=8) == "triton"


def test_auto_on_cpu_tensors_is_sdpa():
    q = torch.randn(1, 2, 3, 5, 16)
    for mode in ref.MODES:
        assert attention_backend(q, mode, train=True) == "sdpa"


# Every backend a table row may name, run through tube_attention on this machine's device,
# forward and backward against float64 (CPU: Triton through the interpreter; SDPA's flash
# kernel has a CPU version; cuDNN and efficient are CUDA-only and say so).
CPU_MISSING = () if GPU else ("sdpa-cudnn", "sdpa-efficient")


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("backend", dispatch.CHOOSABLE)
def test_each_choosable_backend_matches_float64(backend, mode):
    device = torch.device("cuda" if GPU else "cpu")
    dtype = torch.float16  # half: what every SDPA kernel takes (cuDNN refuses fp32)
    shape = (2, 2, 3, 7, 32)
    q, k, v = (torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(3))
    if backend in CPU_MISSING:
        with pytest.raises(RuntimeError, match=backend):
            tube_attention(q, k, v, mode, backend=backend)
        return
    try:
        o = tube_attention(q, k, v, mode, backend=backend)
    except RuntimeError as e:
        if GPU and "no such SDPA kernel" in str(e):
            pytest.skip(f"{backend}: torch has no such kernel on this GPU ({e})")
        raise
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_ref = ref.tube_attention(*leaves, mode)
    grads_ref = torch.autograd.grad(o_ref, leaves, do.double())
    for got, want in zip((o, *grads), (o_ref, *grads_ref)):
        assert ((got.double() - want).norm() / want.norm()).item() < 5e-3


def load_bench():
    """benchmarks/kernels.py as a module (it is a script, not a package member)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def result(shape, backend, fwd, both, L=50, mode="slice", dh=64, err=1e-3):
    r = {"shape": shape, "backend": backend, "mode": mode, "Dh": dh, "L": L}
    if fwd is None:
        r["error"] = "RuntimeError: no such kernel"
    else:
        r.update(fwd_ms=fwd, fwdbwd_ms=both, rel_err_vs_sdpa=err)
    return r


def test_benchmark_picks_winners_by_summed_time_over_a_key():
    bench = load_bench()
    results = [  # two shapes share (slice, 64, bucket 64): 49 and 50 tokens
        result("phase", "triton", 1.0, 4.0), result("phase", "sdpa-flash", 0.8, 5.0),
        result("div", "triton", 1.0, 4.0, L=49), result("div", "sdpa-flash", 0.9, 2.5, L=49),
        result("phase", "sdpa-cudnn", 0.1, 0.1), result("div", "sdpa-cudnn", None, None, L=49),  # fails at one
        result("phase", "sdpa", 0.05, 0.05, err=0.5), result("div", "sdpa", 0.05, 0.05, L=49, err=0.5),  # wrong
        result("enc", "triton", 2.0, 8.0, L=393, mode="joint"), result("enc", "sdpa", 1.5, 6.0, L=393, mode="joint")]
    rows = bench.table_rows(results, "bfloat16", "9.0", {"device": "test"})
    by_key = {(r["mode"], r["bucket"]): r for r in rows}
    assert by_key["slice", 64]["train"] == "sdpa-flash"  # 7.5 ms vs triton 8.0
    assert by_key["slice", 64]["infer"] == "sdpa-flash"  # 1.7 ms vs 2.0
    assert by_key["joint", 512]["train"] == "sdpa"
    assert by_key["slice", 64]["measured"]["L"] == [49, 50]


def test_benchmark_merges_rows_into_the_table(tmp_path):
    bench = load_bench()
    path = tmp_path / "table.json"
    other_gpu = dict(GOOD, capability="8.0")
    path.write_text(json.dumps({"schema": 1, "rows": [other_gpu, GOOD]}))
    new = dict(GOOD, train="triton", infer="triton")
    bench.merge_table(path, [new], note="test")
    t = load_table(path)
    assert len(t.rows) == 2
    assert pick(t) == "triton" and pick(t, cap="8.0") == "sdpa"
