"""`python -m tinyvila.tools.int8_bench`: the W8A8 kernels at the vision encoders' shapes, on a GPU.

    python -m tinyvila.tools.int8_bench                 # markdown tables
    python -m tinyvila.tools.int8_bench --sweep         # also time every candidate tile config
    python -m tinyvila.tools.int8_bench --only clip     # shapes whose name starts with "clip"

Table 1, linears: int8_linear (int8 activations and weights, per-token x per-channel scales, fp16
bias and output) against cuBLAS fp16 (torch.nn.functional.linear on fp16 inputs of the same shape,
K zero-padded to a multiple of 8 as the fp16 model does) and cuBLAS's own int8 GEMM, all timed as
CUDA-graph replays of `--reps` back-to-back calls (median of `--iters` replays), on
random data; TOP/s counts 2*M*N*K. Each int8 result is checked against int8_linear_ref on some rows.
Table 2, the per-token quantization kernels: time and GB/s (bytes read + bytes written, once each).
Table 3, an activation fused into the fc1 epilogue + quantize_per_token against fc1 + act_quant.
Table 4 (`--encoders`; builds the 7B models with random weights, a minute or two): each whole vision
encoder's GPU time (torch.profiler: kernels and the pixel upload) in fp16 and in W8A8, split into
GEMMs, attention and the rest, and the W8A8 speedup it would reach if every int8 GEMM ran at twice
the fp16 GEMM time, the int8/fp16 tensor-core peak ratio, with the rest as measured.
Shapes: CLIP-L/336 (LLaVA-NeXT) 5 tiles of 577 tokens; SigLIP-so400m (LongVILA) a 32-frame chunk of
729 tokens; Qwen2.5-VL's ViT on a 1344x1344 image (9216 patches of 14x14, before the 2x2 merge).
"""
import argparse
import json
import statistics
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tinyvila import __version__
from tinyvila.errors import TinyVilaError, check_output_file, run_cli
from tinyvila.kernels import quantize_int8 as q
from tinyvila.kernels.int8_gemm import Int8Config, int8_linear, int8_linear_ref, pick_config, prepare_int8_weight
from tinyvila.kernels.quantize_int8 import act_quant, padded_k, quantize_per_token, quantize_weight_per_channel
from tinyvila.kernels.triton_lang import triton
from tinyvila.models.layers import use_encoder_graphs
from tinyvila.tools import bench
from tinyvila.tools.kernel_bench import time_graph

# name, M, K, N
LINEARS = [
    ("clip qkv", 2885, 1024, 3072), ("clip o", 2885, 1024, 1024),
    ("clip fc1", 2885, 1024, 4096), ("clip fc2", 2885, 4096, 1024),
    ("siglip qkv", 23328, 1152, 3456), ("siglip o", 23328, 1152, 1152),
    ("siglip fc1", 23328, 1152, 4304), ("siglip fc2", 23328, 4304, 1152),
    ("qwen qkv", 9216, 1280, 3840), ("qwen o", 9216, 1280, 1280),
    ("qwen gate_up", 9216, 1280, 6840), ("qwen down", 9216, 3420, 1280),
]
# name, op, M, K (K: the quantized width; silu_mul reads 2K)
QUANTS = [
    ("clip layernorm", "layernorm", 2885, 1024), ("clip quick_gelu", "quick_gelu", 2885, 4096),
    ("siglip layernorm", "layernorm", 23328, 1152), ("siglip gelu_tanh", "gelu_pytorch_tanh", 23328, 4304),
    ("qwen rmsnorm", "rmsnorm", 9216, 1280), ("qwen silu_mul", "silu_mul", 9216, 3420),
    ("per_token", "per_token", 23328, 4304), ("gelu (erf)", "gelu", 9216, 4096),
]
# name, M, K, N, act
FUSED = [("clip fc1 + quick_gelu", 2885, 1024, 4096, "quick_gelu"),
         ("siglip fc1 + gelu_tanh", 23328, 1152, 4304, "gelu_pytorch_tanh")]


def sweep_configs():
    """Candidates for --sweep (the winners and runners-up of the sweeps behind pick_config)."""
    C = Int8Config
    ts = dict(kind="tma", tma_store=True)
    return [C(BM=128, BN=128, num_warps=4, num_stages=3, epi_split=2, ctas_per_sm=2, **ts),
            C(kind="tma", BM=128, BN=128, num_warps=4, num_stages=3, ctas_per_sm=2),
            C(BM=64, BN=128, num_warps=4, num_stages=4, epi_split=2, ctas_per_sm=2, **ts),
            C(BM=128, BN=64, num_warps=4, num_stages=4, ctas_per_sm=2, **ts),
            C(BM=256, BN=128, num_warps=8, num_stages=3, epi_split=2, flatten=True, **ts),
            C(BM=128, BN=256, num_warps=8, num_stages=3, **ts),
            C(BM=256, BN=128, num_warps=8, num_stages=3, **ts),
            C(kind="ptr", BM=128, BN=128, num_warps=8, num_stages=3)]


def cfg_name(c):
    extra = ("+flat" if c.flatten else "") + ("+ws" if c.warp_spec else "")
    extra += (f" tmastore/{c.epi_split}" if c.tma_store and c.kind == "tma" else "")
    extra += (f" {c.ctas_per_sm}/SM" if c.kind == "tma" and c.ctas_per_sm > 1 else "")
    return f"{c.kind} {c.BM}x{c.BN}x{c.BK} w{c.num_warps} s{c.num_stages}{extra}"


def graph_time(fn, reps, iters):
    """Median ms per call of `fn`, from CUDA-graph replays of `reps` calls."""
    return time_graph([fn], reps, iters) * 1e3


def _linear_case(M, K, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=g) * 0.02
    bias = torch.randn(N, device="cuda", dtype=torch.float16, generator=g) * 0.1
    xq, xs = quantize_per_token(x)
    wq, ws = quantize_weight_per_channel(w)
    return x, w, bias, xq, xs, wq, prepare_int8_weight(wq), ws


def _check(y, xq, xs, wq, ws, bias, act=None):
    rows = torch.cat([torch.arange(0, 64), torch.arange(xq.shape[0] - 64, xq.shape[0])]).cuda()
    ref = int8_linear_ref(xq[rows], xs[rows], wq, ws, bias, torch.float32, act=act)
    err = ((y[rows].float() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, f"int8_linear differs from its reference: rel err {err:.2e}"
    return err


def _cublas_int8_ms(xq, wp, args):
    """cuBLAS's int8 GEMM on the same operands (torch._int_mm: int32 out; the per-token x
    per-channel scaling and bias would be a further pass): what the vendor library reaches at the
    shape, a ceiling to read the Triton kernel's speedup against."""
    xq = F.pad(xq, (0, wp.shape[1] - xq.shape[1]))  # the weight's zero-padded K
    return graph_time(lambda: torch._int_mm(xq, wp.t()), args.reps, args.iters)


def bench_linears(args, out):
    rows = []
    for name, M, K, N in LINEARS:
        if args.only and not name.startswith(args.only):
            continue
        x, w, bias, xq, xs, wq, wp, ws = _linear_case(M, K, N)
        cfg = pick_config(M, N, K, xq.device)
        best = None
        if args.sweep:
            res = []
            for c in sweep_configs():
                try:
                    y = int8_linear(xq, xs, wp, ws, bias, config=c)
                    _check(y, xq, xs, wq, ws, bias)
                    t = graph_time(lambda: int8_linear(xq, xs, wp, ws, bias, config=c), args.reps, args.iters)
                except Exception as e:  # noqa: BLE001  (a config that does not compile or fit)
                    print(f"  {name}: {cfg_name(c)} failed: {str(e).splitlines()[0][:150]}", file=sys.stderr)
                    continue
                res.append((t, c))
                out["sweep"].append(dict(shape=name, M=M, K=K, N=N, config=cfg_name(c), ms=t))
            res.sort(key=lambda r: r[0])
            print(f"{name} M={M} K={K} N={N}: " + ", ".join(f"{cfg_name(c)} {t * 1e3:.1f}us" for t, c in res[:4]),
                  file=sys.stderr)
            best = res[0]
        y = int8_linear(xq, xs, wp, ws, bias)
        err = _check(y, xq, xs, wq, ws, bias)
        t8 = graph_time(lambda: int8_linear(xq, xs, wp, ws, bias), args.reps, args.iters)
        if K % 8:  # as the fp16 model runs it (models/layers.PaddedLinear): K zero-padded to a multiple of 8
            x, w = F.pad(x, (0, -K % 8)), F.pad(w, (0, -K % 8))
        t16 = graph_time(lambda: F.linear(x, w, bias), args.reps, args.iters)
        t_lt = _cublas_int8_ms(xq, wp, args)
        flop = 2 * M * N * K
        r = dict(shape=name, M=M, K=K, N=N, config=cfg_name(cfg), int8_ms=t8, fp16_ms=t16, speedup=t16 / t8,
                 int8_tops=flop / t8 / 1e9, fp16_tflops=flop / t16 / 1e9, rel_err=err,
                 cublas_int8_ms=t_lt, cublas_int8_speedup=t16 / t_lt)
        if best:
            r.update(best_ms=best[0], best_config=cfg_name(best[1]))
        rows.append(r)
        torch.cuda.empty_cache()
    out["linears"] = rows
    print("\n| shape | M | K | N | int8 us | int8 TOP/s | fp16 cuBLAS us | fp16 TFLOP/s | speedup "
          "| cuBLAS int8 us (GEMM alone) | its speedup | config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['int8_ms'] * 1e3:.1f} | {r['int8_tops']:.0f} | "
              f"{r['fp16_ms'] * 1e3:.1f} | {r['fp16_tflops']:.0f} | **{r['speedup']:.2f}x** | "
              f"{r['cublas_int8_ms'] * 1e3:.1f} | {r['cublas_int8_speedup']:.2f}x | {r['config']} |")
    if rows:
        gm = statistics.geometric_mean([r["speedup"] for r in rows])
        gm_lt = statistics.geometric_mean([r["cublas_int8_speedup"] for r in rows])
        print(f"\ngeometric-mean speedup over cuBLAS fp16: {gm:.2f}x (cuBLAS's own int8 GEMM, int32 out and no "
              f"dequantization: {gm_lt:.2f}x)")


# arch, images, videos (tinyvila-bench's media specs): CLIP-L/336 anyres, Qwen's ViTs, a SigLIP chunk
ENCODERS = [("llava-next-vicuna-7b", ["672x672"], []), ("qwen2.5-vl-7b", ["1344x1344"], []),
            ("qwen3-vl-8b", ["1344x1344"], []), ("longvila-7b", [], ["32x448x448"])]


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "_forward", "_colsum", "sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_x", "_int8_mm", "xmma")):
        return "gemm"
    return "rest"


def _encoder_gpu_ms(arch, images, videos, quant, reps=3):
    """GPU ms of one encode call by kind (eager, so every kernel shows in the profile)."""
    dtype = torch.bfloat16 if arch.startswith("qwen") else torch.float16
    model = bench.build(arch, torch.device("cuda"), dtype, quant)
    use_encoder_graphs(model, False)
    items = bench.media_items(model, SimpleNamespace(image=images, video=videos))
    with torch.no_grad():
        for _ in range(2):
            model.encode(items)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                model.encode(items)
            torch.cuda.synchronize()
    ms = dict(gemm=0.0, attention=0.0, rest=0.0)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms[_kernel_kind(e.name)] += e.device_time_total / reps / 1e3
    del model
    torch.cuda.empty_cache()
    return ms


def bench_encoders(args, out):
    rows = []
    for arch, images, videos in ENCODERS:
        f, q = (_encoder_gpu_ms(arch, images, videos, quant) for quant in (None, "w8a8"))
        tf, tq = sum(f.values()), sum(q.values())
        rows.append(dict(arch=arch, media=(images + videos)[0], fp16=f, w8a8=q, speedup=tf / tq,
                         bound=tf / (tq - q["gemm"] + f["gemm"] / 2)))
    out["encoders"] = rows
    print("\n| encoder | media | fp16 ms (GEMM / attention / rest) | W8A8 ms (GEMM / attention / rest) | speedup "
          "| with int8 GEMMs at 2x fp16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{sum(r[k].values()):.1f} ({r[k]['gemm']:.1f} / {r[k]['attention']:.1f} / {r[k]['rest']:.1f})"
                 for k in ("fp16", "w8a8")]
        print(f"| {r['arch']} | {r['media']} | {cells[0]} | {cells[1]} | {r['speedup']:.2f}x | {r['bound']:.2f}x |")


def _quant_fn(op, x, M, K):
    if op == "layernorm":
        w, b = torch.randn(K, device="cuda", dtype=x.dtype), torch.randn(K, device="cuda", dtype=x.dtype)
        return lambda: q.layernorm_quant(x, w, b, 1e-6), lambda: q.layernorm_quant_ref(x, w, b, 1e-6), 4 * K
    if op == "rmsnorm":
        w = torch.randn(K, device="cuda", dtype=x.dtype)
        return lambda: q.rmsnorm_quant(x, w, 1e-6), lambda: q.rmsnorm_quant_ref(x, w, 1e-6), 2 * K
    if op == "per_token":
        return lambda: q.quantize_per_token(x), lambda: q.quantize_per_token_ref(x), 0
    return lambda: q.act_quant(x, op), lambda: q.act_quant_ref(x, op), 0


def bench_quants(args, out):
    rows = []
    for name, op, M, K in QUANTS:
        if args.only and not name.startswith(args.only):
            continue
        width = 2 * K if op == "silu_mul" else K
        x = torch.randn(M, width, device="cuda", dtype=torch.float16) * 2
        fn, ref, extra = _quant_fn(op, x, M, K)
        (xq, xs), (rq, rs) = fn(), ref()
        lsb = (xq.int() - rq.int()).abs().max().item()
        assert lsb <= 1 and torch.allclose(xs, rs, rtol=8e-3), (name, lsb)
        t = graph_time(fn, args.reps, args.iters)
        nbytes = M * width * 2 + M * padded_k(K) + 4 * M + extra
        rows.append(dict(kernel=name, op=op, M=M, K=K, ms=t, gbs=nbytes / t / 1e6, max_lsb=lsb))
    out["quants"] = rows
    print("\n| quant kernel | M | in width | out width | us | GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        w = 2 * r["K"] if r["op"] == "silu_mul" else r["K"]
        print(f"| {r['kernel']} | {r['M']} | {w} | {r['K']} | {r['ms'] * 1e3:.1f} | {r['gbs']:.0f} |")


def bench_fused(args, out):
    rows = []
    for name, M, K, N, act in FUSED:
        if args.only and not name.startswith(args.only):
            continue
        x, w, bias, xq, xs, wq, wp, ws = _linear_case(M, K, N)
        y = int8_linear(xq, xs, wp, ws, bias, act=act)
        _check(y, xq, xs, wq, ws, bias, act=act)
        fused = graph_time(lambda: quantize_per_token(int8_linear(xq, xs, wp, ws, bias, act=act)),
                           args.reps, args.iters)
        apart = graph_time(lambda: act_quant(int8_linear(xq, xs, wp, ws, bias), act), args.reps, args.iters)
        rows.append(dict(path=name, M=M, K=K, N=N, epilogue_ms=fused, separate_ms=apart))
    out["fused"] = rows
    print("\n| fc1 then quantize for fc2 | act in the GEMM epilogue + quantize_per_token us | GEMM + act_quant us |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['path']} (M={r['M']}) | {r['epilogue_ms'] * 1e3:.1f} | {r['separate_ms'] * 1e3:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyvila.tools.int8_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run the shapes whose name starts with this")
    ap.add_argument("--sweep", action="store_true", help="time every candidate tile config too (slow)")
    ap.add_argument("--reps", type=int, default=20, help="calls per CUDA-graph replay")
    ap.add_argument("--iters", type=int, default=7, help="timed replays (median)")
    ap.add_argument("--skip", default="", help="comma list of tables to skip: linears,quants,fused")
    ap.add_argument("--encoders", action="store_true",
                    help="also profile the whole vision encoders, fp16 against W8A8 (builds the 7B models)")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    return run_cli(lambda: run(args), args.debug, "lower --reps, or run fewer shapes (--only, --skip)")


def run(args) -> None:
    if not torch.cuda.is_available():
        raise TinyVilaError("int8_bench needs a CUDA GPU")
    if args.json:
        check_output_file(args.json, "--json")
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, triton {triton.__version__}; CUDA-graph replays of {args.reps} calls, "
          f"median of {args.iters}")
    out = dict(device=dev, torch=torch.__version__, triton=triton.__version__, sweep=[])
    skip = set(args.skip.split(","))
    if "linears" not in skip:
        bench_linears(args, out)
    if "quants" not in skip:
        bench_quants(args, out)
    if "fused" not in skip:
        bench_fused(args, out)
    if args.encoders:
        bench_encoders(args, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
