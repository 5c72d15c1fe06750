"""`python -m tinyvila.tools.kernel_bench`: time the decode kernels (W4A16 linears, attention) on the GPU.

    python -m tinyvila.tools.kernel_bench                    # the default tables
    python -m tinyvila.tools.kernel_bench --dtype bfloat16 --gemv-m 1,2,4 --gemm-m 16,128,512

Decode (GEMV) table: each shape K->N at M=1 (and any --gemv-m), time per call, bytes moved (packed
weights + scales + zeros + x read, y written) over the time, and that rate as a fraction of the
device's copy bandwidth (tinyvila.tools.bench.copy_bandwidth), and the time beyond what those
bytes take at that bandwidth (a call's fixed part: launch ramp, split-K tail), and the time of the
same GEMV ending at its split-K adds (w4a16.Sums, as decode runs the ones add_rmsnorm or rope_append
read; M <= GEMV_MAX_M). GEMM table, every
M from 1 to 2994 by default: w4a16_linear against cuBLAS on the same product with fp16/bf16 weights (F.linear;
the ratio is our time over cuBLAS's), torch's tinygemm int4 kernel (gpt-fast's path, bf16
activations; "-" where the GPU or torch lacks it), each of our two larger-M paths (fused-dequant
Triton GEMM; Triton dequantize + cuBLAS), and the GEMV for M <= 4, so the switch points can be read
off. Decode attention table: one token's attention over a KV cache of
the 7B models' head layouts (query heads / KV heads, head dim 128) at the split count decode uses,
time per call and the K/V bytes read over the time against the copy bandwidth.

Every time is the median over several replays of a CUDA graph holding `--reps` back-to-back calls
(launch overhead does not count), and the calls cycle through enough copies of the weights to
exceed the L2 cache, as a model's layers do. Weights are random packed words (speed does not depend
on their values); --check first compares each path with the PyTorch reference at every shape.
"""
import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from tinyvila import __version__
from tinyvila.errors import TinyVilaError, run_cli
from tinyvila.kernels import decode_attention, w4a16
from tinyvila.kernels.gpu import sm_count
from tinyvila.tools.bench import copy_bandwidth

# 7B-class shapes (K -> N) as decode runs them: LLaMA-2-7B fused QKV, gate|up, down, o_proj; Qwen2-7B
# fused gate|up (2 x 18944), down, fused QKV (3584 + 2 * 512), o_proj.
GEMV_SHAPES = [(4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096), (3584, 37888), (18944, 3584),
               (3584, 4608), (3584, 3584)]
GEMM_SHAPES = [(4096, 12288), (4096, 22016), (11008, 4096)]
# every batch size a prefill, a follow-up or a batch of conversations gives the 4-bit linears
GEMM_M = [1, 2, 4, 8, 16, 32, 64, 128, 148, 256, 512, 1381, 2994]
# decode attention (query heads, KV heads, keys): LLaVA-NeXT-7B after a 672x672 image, Qwen2.5-VL-7B
# after a 1344x1344 one, LongVILA-7B after 256 frames
ATTENTION_SHAPES = [(32, 32, 3000), (28, 4, 2400), (28, 4, 65900)]
L2_BYTES = 50 * 2**20


def cuda_device(prog: str) -> torch.device:
    """The GPU the kernel benchmarks time on; without one, a one-line error and exit."""
    if not torch.cuda.is_available():
        raise TinyVilaError(f"{prog} needs a CUDA GPU")
    return torch.device("cuda")


def make_layer(K, N, group, device):
    """A packed layer in w4a16's layout with random contents."""
    return {
        "qweight": torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int32, device=device),
        "scales": (torch.rand(K // group, N, device=device) * 0.02 + 0.001).half(),
        "zeros": torch.randint(0, 16, (K // group, N), dtype=torch.uint8, device=device),
        "counters": torch.zeros(-(-N // 8), dtype=torch.int32, device=device),
        "workspace": torch.zeros(4, N, dtype=torch.float32, device=device),
    }


def layer_bytes(K, N, group):
    return K // 8 * N * 4 + K // group * N * 3


def copies_for(nbytes):
    """How many copies of a weight make the cycle exceed the L2 cache three times."""
    return max(1, math.ceil(3 * L2_BYTES / nbytes))


def time_graph(calls, reps, trials=5):
    """Median seconds per call of `reps` calls (cycling through `calls`) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # compile and warm up outside the capture
            fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(reps):
                calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def check(K, N, group, dtype, device, ms=(1, 4, 100)):
    """Each path against the reference at this shape (relative Frobenius error)."""
    layer = make_layer(K, N, group, device)
    worst = 0.0
    for m in ms:
        x = torch.randn(m, K, device=device, dtype=dtype)
        ref = w4a16.w4a16_linear_ref(x, layer, group).double()
        outs = [w4a16.w4a16_linear(x, layer, group), w4a16.gemm(x, layer, group),
                w4a16.dequant_matmul(x, layer, group)]
        if m <= w4a16.GEMV_MAX_M:
            outs.append(w4a16.gemv(x, layer, group))
        for out in outs:
            worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
    return worst


def gemv_rows(shapes, ms, group, dtype, device, bw, reps):
    rows = []
    for K, N in shapes:
        lb = layer_bytes(K, N, group)
        layers = [make_layer(K, N, group, device) for _ in range(copies_for(lb))]
        for m in ms:
            xs = [torch.randn(m, K, device=device, dtype=dtype) for _ in layers]
            t = time_graph([lambda x=x, L=L: w4a16.w4a16_linear(x, L, group) for x, L in zip(xs, layers)], reps)
            sums = float("nan")  # the GEMV ending at its adds, as decode runs it before add_rmsnorm / rope_append
            if m <= w4a16.GEMV_MAX_M:  # (the sums pile up unread here: the time is the same)
                sums = time_graph([lambda x=x, L=L: w4a16.gemv(x, L, group, sums=True) for x, L in zip(xs, layers)],
                                  reps)
            moved = lb + m * (K + N) * xs[0].element_size()
            rows.append((f"{K}->{N}", m, t * 1e6, moved / t / 1e9, moved / t / bw, (t - moved / bw) * 1e6,
                         sums * 1e6))
        del layers
    return rows


def tinygemm_layer(K, N, group, device):
    """torch's tinygemm int4 operands (gpt-fast's int4 path: bf16 activations, group-wise scales
    and zeros) with random contents, or None where this torch or GPU lacks the kernel."""
    try:
        w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
        packed = torch._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(K // group, N, 2, device=device) * 0.02).to(torch.bfloat16)
        torch._weight_int4pack_mm(torch.randn(1, K, device=device, dtype=torch.bfloat16), packed, group, sz)
        return packed, sz
    except (RuntimeError, AttributeError):
        return None


def gemm_rows(shapes, ms, group, dtype, device, reps):
    rows = []
    for K, N in shapes:
        lb = layer_bytes(K, N, group)
        layers = [make_layer(K, N, group, device) for _ in range(copies_for(lb))]
        dense = [torch.randn(N, K, device=device, dtype=dtype) * 0.02 for _ in range(copies_for(N * K * 2))]
        tiny = tinygemm_layer(K, N, group, device)
        tinys = [tiny] * copies_for(lb) if tiny is None else [tinygemm_layer(K, N, group, device)
                                                               for _ in range(copies_for(lb))]
        for m in ms:
            x = torch.randn(m, K, device=device, dtype=dtype)
            xb = x.to(torch.bfloat16)
            r = max(5, min(reps, int(2e6 / (m * K * N / 1e6 + 1))))  # fewer calls per graph for big products

            def timed(fn, ws):
                return time_graph([lambda w=w: fn(x, w) for w in ws], r)

            t_cublas = timed(F.linear, dense)
            t_ours = timed(lambda x, L: w4a16.w4a16_linear(x, L, group), layers)
            t_fused = timed(lambda x, L: w4a16.gemm(x, L, group), layers)
            t_deq = timed(lambda x, L: w4a16.dequant_matmul(x, L, group), layers)
            t_gemv = timed(lambda x, L: w4a16.gemv(x, L, group), layers) if m <= 4 else float("nan")
            t_tiny = float("nan") if tiny is None else timed(
                lambda x, T: torch._weight_int4pack_mm(xb, T[0], group, T[1]), tinys)
            flops = 2 * m * K * N
            rows.append((f"{K}->{N}", m, t_ours * 1e6, flops / t_ours / 1e12, t_cublas * 1e6, t_ours / t_cublas,
                         t_tiny * 1e6, t_fused * 1e6, t_deq * 1e6, t_gemv * 1e6))
        del layers, dense
    return rows


def attention_rows(shapes, dtype, device, bw, reps, head_dim=128):
    rows = []
    for hq, hkv, keys, *room in shapes:
        capacity = room[0] if room else keys  # the cache's slots (a chat's session has room to grow)
        moved = 2 * hkv * keys * head_dim * torch.finfo(dtype).bits // 8
        caches = [(torch.randn(hkv, capacity, head_dim, device=device, dtype=dtype),
                   torch.randn(hkv, capacity, head_dim, device=device, dtype=dtype)) for _ in range(copies_for(moved))]
        q = torch.randn(hq, head_dim, device=device, dtype=dtype)
        length = torch.tensor([keys], dtype=torch.int32, device=device)
        splits = decode_attention.split_count(capacity, hkv, sm_count(device))
        ws = decode_attention.decode_workspace(hq, splits, head_dim, device)
        t = time_graph([lambda k=k, v=v: decode_attention.decode_attention(q, k, v, length, workspace=ws)
                        for k, v in caches], reps)
        keys = f"{keys} of {capacity}" if room else keys
        rows.append((f"{hq}/{hkv}", keys, splits, t * 1e6, moved / t / 1e9, moved / t / bw))
        del caches
    return rows


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _shapes(s):
    return [tuple(int(v) for v in item.split("x")) for item in s.split(",") if item]


def _attention_shapes(s):
    return [tuple(int(v) for v in item.split("/")) for item in s.split(",") if item]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyvila.tools.kernel_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--gemv-shapes", type=_shapes, default=GEMV_SHAPES, help="KxN,KxN,... (default: 7B shapes)")
    ap.add_argument("--gemm-shapes", type=_shapes, default=GEMM_SHAPES)
    ap.add_argument("--gemv-m", type=_ints, default=[1], help="decode rows (default 1)")
    ap.add_argument("--gemm-m", type=_ints, default=GEMM_M)
    ap.add_argument("--attention", type=_attention_shapes, default=ATTENTION_SHAPES,
                    help="decode attention shapes HQ/HKV/KEYS[/CAPACITY],... (default: the 7B models after an image "
                    "or video, the cache holding just those keys)")
    ap.add_argument("--reps", type=int, default=100, help="calls per captured graph")
    ap.add_argument("--check", action="store_true", help="compare every path with the reference first")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    return run_cli(lambda: run(args), args.debug,
                   "lower --reps or the shapes (--gemv-shapes, --gemm-shapes, --attention)")


def run(args) -> None:
    device = cuda_device("kernel_bench")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device)
    bw = copy_bandwidth(device)
    print(f"device: {name}; copy bandwidth {bw / 1e12:.2f} TB/s; {args.dtype}; group {args.group}; "
          f"GEMV_MAX_M {w4a16.GEMV_MAX_M}, CUBLAS_MIN_M {w4a16.CUBLAS_MIN_M}\n")
    if args.check:
        for K, N in sorted(set(args.gemv_shapes) | set(args.gemm_shapes)):
            err = check(K, N, args.group, dtype, device)
            print(f"check {K}->{N}: max relative error {err:.2e}")
        print()
    if args.gemv_shapes and args.gemv_m:
        print("| shape K->N | M | time (us) | GB/s | fraction of copy bandwidth "
              "| beyond the bytes at copy speed (us) | ending at its adds (Sums, us) |")
        print("|---|---|---|---|---|---|---|")
        for shape, m, t, gbs, frac, extra, sums in gemv_rows(args.gemv_shapes, args.gemv_m, args.group, dtype,
                                                             device, bw, args.reps):
            print(f"| {shape} | {m} | {t:.2f} | {gbs:.0f} | {frac:.1%} | {extra:.1f} | "
                  f"{'-' if sums != sums else f'{sums:.2f}'} |")
        print()
    if args.gemm_shapes and args.gemm_m:
        print(f"| shape K->N | M | w4a16_linear (us) | TFLOP/s | cuBLAS {args.dtype} weights (us) | ours / cuBLAS "
              "| tinygemm int4, bf16 (us) | fused GEMM (us) | dequant + cuBLAS (us) | GEMV (us) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for shape, m, t, tf, tc, ratio, tti, tfu, tdq, tgv in gemm_rows(args.gemm_shapes, args.gemm_m, args.group,
                                                                        dtype, device, args.reps):
            gv, ti = ("-" if v != v else f"{v:.1f}" for v in (tgv, tti))
            print(f"| {shape} | {m} | {t:.1f} | {tf:.0f} | {tc:.1f} | {ratio:.2f} | {ti} | {tfu:.1f} | {tdq:.1f} "
                  f"| {gv} |")
        print()
    if args.attention:
        print("| decode attention, heads q/kv | keys | splits | time (us) | GB/s | fraction of copy bandwidth |")
        print("|---|---|---|---|---|---|")
        for heads, keys, splits, t, gbs, frac in attention_rows(args.attention, dtype, device, bw, args.reps):
            print(f"| {heads} | {keys} | {splits} | {t:.2f} | {gbs:.0f} | {frac:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
