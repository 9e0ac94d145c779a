"""Kernel benchmarks on a CUDA GPU: tube attention per backend (and the dispatch table), gather GB/s.

    python benchmarks/kernels.py [--out FILE] [--table-out FILE | --no-table] [--sweep]

Results (kernels_gpu.json) and the dispatch table it measured (attention_table.json: the
committed table with this device's winners merged in) go to a new run folder
runs/bench/kernels-<timestamp>/. The committed files are written only when named:
--out benchmarks/results/kernels_gpu.json --table-out kernels/attention_table.json (the
table the kernels read at run time).

On a GPU it measures first the two ceilings (a large device copy, a bf16 8192^3 matmul), then:
- tube_attention forward and forward+backward, bf16, at the attention calls the models make
  (`model_shapes`: ViT-L / ViT-B encoder joint over [CLS, visible tubes], the phase
  projector's slices with their CLS, the decoders over all tokens, and the divided
  encoder's slice / tube groups), q/k/v read as views of one fused qkv projection like the
  model's, for every backend the dispatch may choose (Triton, SDPA as torch picks it, SDPA
  pinned to cuDNN / flash / efficient). FLOPs = 4*B*H*G*L^2*Dh forward, 3.5x that
  forward+backward (FA2 convention: the backward recomputes P). The fastest correct
  backend per key (mode, Dh, token bucket, dtype, capability) -- forward+backward for
  training, forward for inference -- is merged into the dispatch table (kernels/dispatch.py:
  rows of other devices and keys are kept; shapes sharing a key are decided by their
  summed time);
- with --sweep, a block-size sweep of the Triton kernels at the ViT-L encoder shape (to tune
  `_config`);
- masking gather/scatter and the uint8 patch gather in GB/s (bytes read + written once)
  against torch.gather / index_select and the measured copy bandwidth.
Times are medians of triton.testing.do_bench (CUDA events, after warm-up).

Without a GPU it says so and exits 0. Two modes need no GPU: `--smoke` runs every code
path on CPU through the Triton interpreter at toy sizes (checks this script; its numbers
mean nothing, and it writes a table only to an explicit --table-out); `--ptxas` compiles
the attention kernels' default configs at these shapes for sm_90 with Triton's bundled
ptxas and prints registers and spill stack per kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from echofm.engine import bench

REPO = Path(__file__).resolve().parents[1]
COMMITTED_TABLE = REPO / "kernels" / "attention_table.json"
# Backends measured at every shape: those a dispatch table row may name.
BACKENDS = ("triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
# Ratios must be within this of the sdpa result (bf16) for a backend to win a row.
MAX_REL_ERR = 2e-2
# (tile, step) pairs x warps; 3 pipeline stages, then stages 2 and 4 for each kernel's best.
SWEEP = [(tile, step, w) for tile, step in ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128), (256, 32))
         for w in (4, 8)]


def model_shapes() -> list[tuple[str, int, int, int, int, int, str]]:
    """(name, B, H, T, K, Dh, mode) of each tube_attention call of the ViT-L / ViT-B training
    forward (tube mask 0.75 / 0.9 as in the recipes; K from masking.keep_count), at a
    per-GPU batch of the size the training step runs (64 ViT-L clips, 256 ViT-B)."""
    from echofm.engine.masking import keep_count
    from echofm.engine.model import ModelConfig

    shapes = []
    for tag, preset, ratio, batch in (("vitl", "echofm_vit_large", 0.75, 64), ("vitb", "echofm_vit_base", 0.9, 256)):
        c = ModelConfig(preset=preset).resolved()
        t, k = c.t_grid, keep_count(c.l_grid, ratio)
        dh, ddh = c.embed_dim // c.num_heads, c.decoder_embed_dim // c.decoder_num_heads
        cls = int(getattr(c, "cls_embed", True))  # the encoder CLS is optional (VideoMAE has none)
        shapes += [(f"{tag}-enc joint", batch, c.num_heads, 1, cls + t * k, dh, "joint"),  # [CLS, visible]
                   (f"{tag}-phase slice", batch, c.num_heads, t, 1 + k, dh, "slice"),  # [slice CLS, slice]
                   (f"{tag}-dec joint", batch, c.decoder_num_heads, 1, 1 + t * c.l_grid, ddh, "joint")]
        if tag == "vitl":  # attention "divided": slice and tube groups of the visible tubes
            shapes += [(f"{tag}-div slice", batch, c.num_heads, t, k, dh, "slice"),
                       (f"{tag}-div tube", batch, c.num_heads, t, k, dh, "tube")]
    return shapes


def group_length(t: int, k: int, mode: str) -> int:
    return {"joint": t * k, "slice": k, "tube": t}[mode]


class Env:
    """Device, dtype and timer: CUDA + do_bench normally; CPU + one wall-clock run for --smoke."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16  # bf16 is broken in the interpreter

    def ms(self, fn, grad_to_none=None, rep: int = 100) -> float:
        if self.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")

    def rand(self, *shape, **kw) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype, **kw)


def ceilings(env: Env) -> dict:
    n, m = (2**20, 256) if env.smoke else (2**29, 8192)  # 1 GiB copy, far above L2
    src = env.rand(n)
    dst = torch.empty_like(src)
    copy_ms = env.ms(lambda: dst.copy_(src))
    a, b = env.rand(m, m), env.rand(m, m)
    mm_ms = env.ms(lambda: a @ b)
    return {"copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
            "matmul_bf16_TFLOPs": 2 * m**3 / mm_ms / 1e9}


def qkv_views(env: "Env", b: int, h: int, t: int, k: int, dh: int) -> list[torch.Tensor]:
    """q, k, v [B, H, T, K, Dh] as views into one [B, T, K, 3, H, Dh] leaf: the strides of
    the model's fused qkv projection (Attention.qkv_heads)."""
    leaf = env.rand(b, t, k, 3, h, dh, requires_grad=True)
    return [leaf[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3)]


def bench_attention(env: "Env", shapes, backends=BACKENDS) -> list[dict]:
    """One row per (shape, backend): fwd / fwd+bwd ms and TF/s, error vs sdpa, or the error."""
    from echofm.kernels import tube_attention

    rows = []
    for name, b, h, t, k, dh, mode in shapes:
        length = group_length(t, k, mode)
        flops = 4 * b * h * (t * k // length) * length**2 * dh
        q, kk, v = qkv_views(env, b, h, t, k, dh)
        leaf = q._base
        do = torch.randn(q.shape, device=env.device, dtype=env.dtype)
        with torch.no_grad():
            o_ref = tube_attention(q, kk, v, mode, backend="sdpa").float()
        for backend in backends:
            row = {"shape": name, "B": b, "H": h, "T": t, "K": k, "Dh": dh, "mode": mode, "L": length,
                   "backend": backend}

            def fwd():
                return tube_attention(q, kk, v, mode, backend=backend)

            try:
                with torch.no_grad():
                    o = fwd().float()
                    row["rel_err_vs_sdpa"] = ((o - o_ref).norm() / o_ref.norm()).item()
                    fwd_ms = env.ms(fwd)
                both_ms = env.ms(lambda: fwd().backward(do), grad_to_none=[leaf])
                row.update(fwd_ms=fwd_ms, fwd_TFLOPs=flops / fwd_ms / 1e9,
                           fwdbwd_ms=both_ms, fwdbwd_TFLOPs=3.5 * flops / both_ms / 1e9)
            except Exception as e:  # a kernel torch does not have for these inputs, out of memory
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
        del q, kk, v, leaf, do, o_ref
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table_rows(results: list[dict], dtype: str, capability: str, meta: dict) -> list[dict]:
    """Dispatch table rows from `bench_attention` results: per key, the backend with the least
    summed time over the shapes of that key (fwd+bwd -> train, fwd -> infer), among those
    that ran and agree with sdpa."""
    from echofm.kernels.dispatch import bucket

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["mode"], r["Dh"], bucket(r["L"])), []).append(r)
    rows = []
    for (mode, dh, bkt), rs in sorted(groups.items()):
        shapes = sorted({r["shape"] for r in rs})
        ok = {r["backend"] for r in rs if "error" not in r and r["rel_err_vs_sdpa"] < MAX_REL_ERR}
        ok = {be for be in ok if all(any(x["backend"] == be and "error" not in x for x in rs if x["shape"] == s)
                                     for s in shapes)}  # ran at every shape of the key
        if not ok:
            continue
        total = {f: {be: sum(x[f] for x in rs if x["backend"] == be and "error" not in x) for be in sorted(ok)}
                 for f in ("fwd_ms", "fwdbwd_ms")}
        rows.append({"mode": mode, "dh": dh, "bucket": bkt, "dtype": dtype, "capability": capability,
                     "train": min(total["fwdbwd_ms"], key=total["fwdbwd_ms"].get),
                     "infer": min(total["fwd_ms"], key=total["fwd_ms"].get),
                     "measured": {"shapes": shapes, "L": sorted({x["L"] for x in rs}), **meta,
                                  **{f: {be: round(ms, 4) for be, ms in d.items()} for f, d in total.items()}}})
    return rows


def merge_table(path: Path, new_rows: list[dict], note: str) -> list[dict]:
    """Write `new_rows` into the table at `path`, replacing rows with the same key and keeping
    the others (other devices, other keys); validated by the dispatch loader afterwards."""
    from echofm.kernels.dispatch import SCHEMA, load_table

    def key(r):
        return (r["mode"], r["dh"], r["bucket"], r["dtype"], str(r["capability"]))

    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    fresh = {key(r) for r in new_rows}
    rows = sorted([r for r in old if key(r) not in fresh] + new_rows, key=lambda r: (str(r["capability"]), key(r)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "note": note, "rows": rows}, indent=1) + "\n")
    load_table(path)  # raises, naming the file, if a row is malformed
    return rows


def sweep_triton(env: Env, shape, configs) -> list[dict]:
    """Launch configs of the fwd, dkdv and dq kernels at one shape, fastest first per kernel.

    A dkdv or dq row times the whole backward with the other kernel at its default config.
    """
    from echofm.kernels.attention import attention_bwd, attention_fwd

    _, b, h, t, k, dh, mode = shape
    q, kk, v, do = (env.rand(b, h, t, k, dh) for _ in range(4))
    scale = dh**-0.5
    o, lse = attention_fwd(q, kk, v, mode, scale)
    calls = {"fwd": lambda c: attention_fwd(q, kk, v, mode, scale, out=o, cfg=c),
             "dkdv": lambda c: attention_bwd(do, q, kk, v, o, lse, mode, scale, cfg={"dkdv": c}),
             "dq": lambda c: attention_bwd(do, q, kk, v, o, lse, mode, scale, cfg={"dq": c})}
    rows = []

    def run(kind, tile, step, warps, stages):
        bm, bn = (step, tile) if kind == "dkdv" else (tile, step)  # dkdv's tile is keys
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, dh), num_warps=warps, num_stages=stages)
        row = {"kind": kind, "tile": tile, "step": step, **cfg}
        try:
            row["ms"] = env.ms(lambda: calls[kind](cfg), rep=50)
        except Exception as e:  # out of shared memory / registers for this tile
            row["error"] = type(e).__name__
        rows.append(row)
        return row

    for kind in calls:
        timed = [run(kind, tile, step, w, 3) for tile, step, w in configs]
        best = min(timed, key=lambda r: r.get("ms", float("inf")))
        for stages in (2, 4):
            run(kind, best["tile"], best["step"], best["num_warps"], stages)
    return sorted(rows, key=lambda r: (r["kind"], r.get("ms", float("inf"))))


def bench_gather(env: Env, copy_gbps: float) -> list[dict]:
    from echofm.kernels import gather_patches, gather_tokens, reference, scatter_tokens

    rows = []
    dev, size = env.device, env.dtype.itemsize

    def add(name, nbytes, fn):
        ms = env.ms(fn)
        gbps = nbytes / ms / 1e6
        rows.append({"op": name, "ms": ms, "GBps": gbps, "of_copy": gbps / copy_gbps})

    # Encoder masking gather: 75% masked, ViT-L width (a toy slice of it for --smoke).
    b, n, keep, d = (2, 1568, 392, 64) if env.smoke else (256, 1568, 392, 1024)
    x = env.rand(b, n, d)
    ids = torch.rand(b, n, device=dev).argsort(1)[:, :keep]
    moved = 2 * b * keep * d * size  # read + write of the kept rows
    flat = (ids + torch.arange(b, device=dev)[:, None] * n).flatten()
    out = torch.empty(b, keep, d, device=dev, dtype=env.dtype)
    add("gather_tokens triton", moved, lambda: gather_tokens(x, ids, backend="triton"))
    add("gather_tokens torch.gather", moved, lambda: torch.gather(x, 1, ids[..., None].expand(-1, -1, d)))
    add("gather_tokens index_select", moved, lambda: x.flatten(0, 1).index_select(0, flat))
    add("copy same bytes", moved, lambda: out.copy_(x[:, :keep]))
    # Decoder unshuffle: kept rows + mask token back to full length, decoder width 512.
    y, fill = env.rand(b, keep, d // 2), env.rand(d // 2)
    moved = (b * keep + b * n) * (d // 2) * size
    add("scatter_tokens triton", moved, lambda: scatter_tokens(y, ids, fill, n, backend="triton"))
    add("scatter_tokens torch", moved, lambda: reference.scatter_tokens(y, ids, fill, n))
    # uint8 clip -> normalised fp32 visible patches (ViT 2x16x16 tubelets, 16 x 224^2 frames).
    clips = 1 if env.smoke else 64
    video = torch.randint(0, 256, (clips, 16, 224, 224, 3), device=dev, dtype=torch.uint8)
    pids = torch.rand(clips, 1568, device=dev).argsort(1)[:, :keep]
    mean, std = (0.1, 0.1, 0.1), (0.2, 0.2, 0.2)
    moved = clips * keep * 1536 * (1 + 4)  # uint8 read, fp32 written
    add("gather_patches uint8 triton", moved,
        lambda: gather_patches(video, pids, (2, 16, 16), mean, std, backend="triton"))
    add("gather_patches uint8 torch", moved, lambda: reference.gather_patches(video, pids, (2, 16, 16), mean, std))
    return rows


def ptxas_report(dtype: str = "bf16") -> list[dict]:
    """Registers / stack bytes of each attention kernel's default config, compiled for sm_90.

    FLAT True is the contiguous-rows index path, False the general div/mod one.
    """
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from echofm.kernels import attention as attention_kernels

    ptrs = {n: dtype for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")} | {"LSE": "fp32", "DELTA": "fp32"}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for name, b, h, t, k, dh, mode in model_shapes():
        groups, length, _ = attention_kernels._geometry((b, h, t, k, dh), mode)
        for kernel, fn in (("fwd", attention_kernels._fwd_kernel), ("dkdv", attention_kernels._bwd_dkdv_kernel), ("dq", attention_kernels._bwd_dq_kernel)):
            for flat in (True, False):
                cfg = attention_kernels._config(length, groups, dh, kernel)
                warps, gpb = cfg.pop("num_warps"), cfg.pop("GPB")
                consts = dict(cfg, PACKED=gpb > 1, FLAT=flat, PRECISION="tf32")
                sig = {a: "constexpr" if a in consts else "*" + ptrs[a] if a in ptrs
                       else "fp32" if a.endswith("scale") else "i32" for a in fn.arg_names}
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                           capture_output=True, text=True, check=True).stdout
                fields = dict(kv.split(":", 1) for kv in usage.split("REG:", 1)[1].split()[1:3])
                rows.append({"shape": name, "kernel": kernel, "flat": flat, **cfg, "GPB": gpb, "num_warps": warps,
                             "regs": int(usage.split("REG:", 1)[1].split()[0]), "stack": int(fields["STACK"]),
                             "wgmma": compiled.asm["ptx"].count("wgmma.mma_async")})
    return rows


def print_tables(res: dict) -> None:
    c = res["ceilings"]
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}")
    print(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    # "of mm": share of the measured bf16 matmul rate, the ceiling for attention's GEMMs.
    print(f"\n{'attention ' + res['dtype']:<17} {'L':>5} {'backend':<15} {'fwd TF/s':>9} {'f+b TF/s':>9} "
          f"{'of mm':>6} {'err':>8}")
    for r in res["attention"]:
        head = f"{r['shape']:<17} {r['L']:>5} {r['backend']:<15}"
        if "error" in r:
            print(f"{head} {r['error'][:70]}")
        else:
            print(f"{head} {r['fwd_TFLOPs']:9.1f} {r['fwdbwd_TFLOPs']:9.1f} "
                  f"{r['fwdbwd_TFLOPs'] / c['matmul_bf16_TFLOPs']:6.0%} {r['rel_err_vs_sdpa']:8.1e}")
    print(f"\ndispatch rows ({res.get('table_path') or 'not written'}): mode Dh bucket -> train / infer")
    for r in res["table"]:
        print(f"  {r['mode']:<6} {r['dh']:>3} {r['bucket']:>5} -> {r['train']} / {r['infer']}   "
              f"(fwd+bwd ms {r['measured']['fwdbwd_ms']})")
    for kind in ("fwd", "dkdv", "dq") if res["sweep"] else ():
        best = [r for r in res["sweep"] if r["kind"] == kind and "ms" in r][:3]
        print(f"sweep {kind:<4} best (M,N,warps,stages ms): " + "; ".join(
            f"{r['BLOCK_M']},{r['BLOCK_N']},{r['num_warps']},{r['num_stages']} {r['ms']:.3f}" for r in best))
    print(f"\n{'gather':<30} {'ms':>8} {'GB/s':>8} {'of copy':>8}")
    for r in res["gather"]:
        print(f"{r['op']:<30} {r['ms']:8.3f} {r['GBps']:8.0f} {r['of_copy']:8.0%}")
    print("\n" + verdict(res))


def verdict(res: dict) -> str:
    """The issue's bar in one line: Triton vs each SDPA kernel at the encoder joint shapes
    (goal >= 1.0x cuDNN, else the table routes them to SDPA); gathers vs copy."""
    parts = []
    for shape in ("vitl-enc joint", "vitb-enc joint"):
        enc = {r["backend"]: r for r in res["attention"] if r["shape"] == shape and "error" not in r}
        for base in ("sdpa-cudnn", "sdpa-flash", "sdpa"):
            if "triton" in enc and base in enc:
                parts.append(f"{shape.split()[0]} triton/{base} fwd+bwd "
                             f"{enc[base]['fwdbwd_ms'] / enc['triton']['fwdbwd_ms']:.2f}x")
    gather = {r["op"]: r for r in res["gather"]}
    for op in ("gather_tokens triton", "scatter_tokens triton", "gather_patches uint8 triton"):
        parts.append(f"{op.split()[0]} {gather[op]['of_copy']:.0%} of copy")
    return "bar (bf16; Triton joint >= 1.0x cuDNN or not the default; gather >= 80% of copy): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results file (default: kernels_gpu.json in a new run folder; none for --smoke)")
    ap.add_argument("--table-out", type=Path, default=None,
                    help=f"dispatch table to merge the winners into (default: a copy of {COMMITTED_TABLE} in the "
                         "run folder; none for --smoke)")
    ap.add_argument("--no-table", action="store_true", help="measure, but write no dispatch table")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton launch configs (ViT-L encoder)")
    ap.add_argument("--quick", action="store_true", help="the encoder joint shapes only")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, toy sizes: checks the code only")
    ap.add_argument("--ptxas", action="store_true", help="sm_90 registers/spills of the kernels; no GPU needed")
    args = ap.parse_args(argv)
    if args.ptxas:
        print(f"{'shape':<17} {'kernel':<5} {'flat':<5} {'M':>4} {'N':>4} {'D':>4} {'GPB':>3} {'warps':>5} "
              f"{'regs':>4} {'stack':>5} {'wgmma':>5}")
        for r in ptxas_report():
            print(f"{r['shape']:<17} {r['kernel']:<5} {r['flat']!s:<5} {r['BLOCK_M']:>4} {r['BLOCK_N']:>4} "
                  f"{r['BLOCK_D']:>4} {r['GPB']:>3} {r['num_warps']:>5} {r['regs']:>4} {r['stack']:>5} {r['wgmma']:>5}")
        return 0
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--smoke needs TRITON_INTERPRET=1 in the environment")
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; none is visible, so nothing was measured.")
        return 0
    import triton

    env = Env(args.smoke)
    shapes = [s for s in model_shapes() if not args.quick or s[0].endswith("enc joint")]
    if args.smoke:  # one sample, one head, a few tokens: same code, interpreter-sized
        shapes = [(name, 1, 1, min(t, 2), min(k, 5), 16, mode) for name, _, _, t, k, _, mode in shapes]
    res = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "dtype": str(env.dtype).removeprefix("torch.")}
    res["ceilings"] = ceilings(env)
    res["attention"] = bench_attention(env, shapes)
    cap = "cpu" if args.smoke else "{}.{}".format(*torch.cuda.get_device_capability())
    meta = {"device": res["device"], "torch": res["torch"], "triton": res["triton"]}
    res["table"] = table_rows(res["attention"], res["dtype"], cap, meta)
    folder = None if args.smoke else _RunFolder()
    table_out = None if args.no_table else args.table_out or (folder and folder.table())
    if table_out is not None:
        merge_table(table_out, res["table"], note=f"Written by benchmarks/kernels.py on {res['device']} "
                    f"(capability {cap}); read by kernels/dispatch.py, whose docstring states the fallback rule.")
        res["table_path"] = str(table_out)
        if args.table_out is None:
            print(f"dispatch table: {table_out} (the kernels read {COMMITTED_TABLE}: copy it there, or rerun "
                  f"with --table-out {COMMITTED_TABLE.relative_to(REPO)})")
    res["sweep"] = sweep_triton(env, shapes[0], SWEEP[:2] if args.smoke else SWEEP) if args.sweep else []
    res["gather"] = bench_gather(env, res["ceilings"]["copy_GBps"])
    print_tables(res)
    out = args.out or (folder and folder.path() / "kernels_gpu.json")
    if out is not None:
        bench.write_json(out, res)
    return 0


class _RunFolder:
    """The run folder of this run, created on first use (so a run writing only to --out and
    --table-out leaves none behind)."""

    def __init__(self) -> None:
        self._path = None

    def path(self) -> Path:
        self._path = self._path or bench.run_dir("kernels")
        return self._path

    def table(self) -> Path:
        """A copy of the committed dispatch table to merge this device's rows into."""
        import shutil

        dst = self.path() / "attention_table.json"
        shutil.copyfile(COMMITTED_TABLE, dst)
        return dst


if __name__ == "__main__":
    sys.exit(main())
