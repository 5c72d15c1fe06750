"""`python -m tinyvila.tools.saliency_bench`: attention + token saliency against attention alone.

    python -m tinyvila.tools.saliency_bench            # the table
    python -m tinyvila.tools.saliency_bench --check    # ours against the reference first
    python -m tinyvila.tools.saliency_bench --sweep    # time block-shape candidates per stage, then
                                                       # the table with the fastest

Shapes (fp16, 16 heads): SigLIP-so400m video frames (256 segments of 729 tokens, D=72, column
mean), a Qwen2.5-VL ViT full-attention block (one segment of 9216 patches, D=80, column mean) and
CLIP-336 AnyRes tiles (5 segments of 577 tokens, D=64, the CLS row: summary=1).

Columns, per shape: SDPA attention alone (F.scaled_dot_product_attention on [B, H, T, D] views of
the same fused qkv; the segments are the batch); ours (`saliency_attention`: attention and
saliency together) and its ratio to SDPA; the materialised way (SDPA, then the explicit fp32
softmax of q k^T and its column mean) and its ratio; the published flash-colsum kernel
(`flash_colsum(Q, K, cls_len=...)`, saliency alone, no attention output) and its ratio to SDPA,
and how much faster ours is than it (flash-colsum time / ours, and SDPA + flash-colsum / ours,
what a caller needing both pays). Every time is the median over replays of a CUDA graph holding
several back-to-back calls (tinyvila.tools.kernel_bench.time_graph).
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

from tinyvila import __version__
from tinyvila.errors import run_cli
from tinyvila.kernels import saliency as sal
from tinyvila.tools.kernel_bench import cuda_device, time_graph

# (name, segments, tokens per segment, heads, head dim, summary)
SHAPES = [
    ("SigLIP frames 256x729 D72 colmean", 256, 729, 16, 72, 0),
    ("Qwen ViT block 1x9216 D80 colmean", 1, 9216, 16, 80, 0),
    ("CLIP tiles 5x577 D64 CLS", 5, 577, 16, 64, 1),
]
# kernels/saliency.py's config tuples: forward (BLOCK_M, BLOCK_N, warps, stages),
# colsum (BLOCK_N, BLOCK_M, warps, stages)
FORWARD_CANDIDATES = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                      (128, 32, 8, 3)]
COLSUM_CANDIDATES = [(128, 32, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3),
                     (128, 64, 8, 3), (64, 32, 4, 3)]


def make_inputs(B, T, H, D, dtype, device, seed=0):
    """A fused qkv [B*T, 3, H, D] and its views: ours [total, H, D], SDPA's [B, H, T, D]."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B * T, 3, H, D, device=device, dtype=dtype, generator=g)
    q, k, v = qkv.unbind(1)
    q4, k4, v4 = (t.transpose(1, 2) for t in qkv.view(B, T, 3, H, D).unbind(2))
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
    return (q, k, v, cu), (q4, k4, v4)


def materialised(q4, k4, v4, summary):
    """Attention, then the explicit softmax and its column mean (what output_attentions costs)."""
    out = F.scaled_dot_product_attention(q4, k4, v4)
    rows = q4 if summary == 0 else q4[:, :, :summary]
    p = torch.softmax(rows @ k4.transpose(-1, -2) * q4.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)
    return out, p.mean(dim=(1, 2))


def _flash_colsum():
    try:
        from flash_colsum import flash_colsum
        return flash_colsum
    except Exception:  # not installed, or it fails to import on this build
        return None


def _reps(B, T, H, D):
    """Calls per graph: enough for ~10 ms of SDPA-sized work, at least 3."""
    work = B * H * T * T * D * 4 / 300e12
    return max(3, min(100, int(0.01 / work)))


def check(shape, dtype, device, max_segments=16, configs=None):
    """Ours against the reference on (the first `max_segments` segments of) a shape."""
    name, B, T, H, D, summary = shape
    b = min(B, max_segments)
    (q, k, v, cu), _ = make_inputs(b, T, H, D, dtype, device, seed=1)
    out, s = sal.saliency_attention(q, k, v, cu, T, summary=summary, configs=configs)
    rout, rs = sal.saliency_attention_ref(q, k, v, cu, summary=summary)
    out_err = (out.float() - rout.float()).abs().max().item()
    sal_err = ((s - rs).abs().max() / rs.abs().max()).item()
    kk = max(1, T // 4)  # the pruning use: the same top quarter of each segment
    top = s.view(b, T).topk(kk, dim=1).indices.sort(dim=1).values
    rtop = rs.view(b, T).topk(kk, dim=1).indices.sort(dim=1).values
    overlap = sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(top, rtop)) / (b * kk)
    again = sal.saliency_attention(q, k, v, cu, T, summary=summary, configs=configs)[1]
    return b, out_err, sal_err, overlap, torch.equal(again, s)


def bench(shape, dtype, device, configs=None):
    name, B, T, H, D, summary = shape
    (q, k, v, cu), (q4, k4, v4) = make_inputs(B, T, H, D, dtype, device)
    reps = _reps(B, T, H, D)
    t_sdpa = time_graph([lambda: F.scaled_dot_product_attention(q4, k4, v4)], reps)
    t_ours = time_graph([lambda: sal.saliency_attention(q, k, v, cu, T, summary=summary, configs=configs)], reps)
    t_mat = time_graph([lambda: materialised(q4, k4, v4, summary)], max(2, reps // 4))
    fc = _flash_colsum()
    t_fc = float("nan")
    if fc is not None:
        t_fc = time_graph([lambda: fc(q4, k4, cls_len=summary or None)], reps)
    return name, t_sdpa, t_ours, t_mat, t_fc


def sweep(shape, dtype, device):
    """Each stage alone over the candidate block shapes (ms): the forward, then the saliency
    pass (heads per program as saliency_attention picks them). Returns the fastest of each."""
    name, B, T, H, D, summary = shape
    (q, k, v, cu), _ = make_inputs(B, T, H, D, dtype, device)
    reps = _reps(B, T, H, D)
    qk_scale = D ** -0.5 * sal.LOG2E
    print(f"{name}:", flush=True)
    best = {}
    for stage, candidates in (("forward", FORWARD_CANDIDATES), ("colsum", COLSUM_CANDIDATES)):
        _, lse = sal._run_forward(q, k, v, cu, T, qk_scale, FORWARD_CANDIDATES[0])
        times = {}
        for cfg in candidates:
            if stage == "forward":
                fn = lambda cfg=cfg: sal._run_forward(q, k, v, cu, T, qk_scale, cfg)  # noqa: E731
            else:
                fn = lambda cfg=cfg: sal._run_colsum(q, k, lse, cu, T, summary, qk_scale, cfg)  # noqa: E731
            times[cfg] = time_graph([fn], reps, trials=3)
            print(f"  {stage} {cfg}: {times[cfg] * 1e3:.3f} ms", flush=True)
        best[stage] = min(times, key=times.get)
    return best["forward"], best["colsum"]


def _fmt(t):
    return "n/a" if math.isnan(t) else f"{t * 1e3:.3f}"


def _ratio(a, b):
    return "n/a" if math.isnan(a) or math.isnan(b) else f"{a / b:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyvila.tools.saliency_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--check", action="store_true", help="compare ours with the reference first")
    ap.add_argument("--sweep", action="store_true",
                    help="time block-shape candidates per stage first; the table then uses the fastest")
    ap.add_argument("--only", default="", help="comma-separated shape indices (default: all)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    return run_cli(lambda: run(args), args.debug, "run fewer shapes (--only)")


def run(args) -> None:
    device = cuda_device("saliency_bench")
    dtype = getattr(torch, args.dtype)
    shapes = [SHAPES[int(i)] for i in args.only.split(",")] if args.only else SHAPES
    fc = _flash_colsum()
    print(f"device: {torch.cuda.get_device_name(device)}; {args.dtype}; torch {torch.__version__}; "
          f"flash-colsum {'available' if fc is not None else 'n/a'}\n")
    chosen = {}
    if args.sweep:
        for shape in shapes:
            chosen[shape[0]] = (*sweep(shape, dtype, device), None)
            print(f"  fastest: forward {chosen[shape[0]][0]}, colsum {chosen[shape[0]][1]}\n")
    if args.check:
        for shape in shapes:
            b, out_err, sal_err, overlap, same = check(shape, dtype, device, configs=chosen.get(shape[0]))
            print(f"check {shape[0]} ({b} segments): out max abs err {out_err:.2e}, saliency max err / max "
                  f"{sal_err:.2e}, top-25% overlap {overlap:.4f}, repeat bit-identical {same}")
        print()
    print("| shape | SDPA attention (ms) | ours: attention + saliency (ms) | ours / SDPA | materialised softmax (ms) "
          "| materialised / SDPA | flash-colsum alone (ms) | flash-colsum / SDPA | flash-colsum / ours "
          "| (SDPA + flash-colsum) / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        name, t_sdpa, t_ours, t_mat, t_fc = bench(shape, dtype, device, chosen.get(shape[0]))
        print(f"| {name} | {_fmt(t_sdpa)} | {_fmt(t_ours)} | {_ratio(t_ours, t_sdpa)} | {_fmt(t_mat)} "
              f"| {_ratio(t_mat, t_sdpa)} | {_fmt(t_fc)} | {_ratio(t_fc, t_sdpa)} | {_ratio(t_fc, t_ours)} "
              f"| {_ratio(t_sdpa + t_fc, t_ours)} |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
