"""`python -m tinyvila.tools.retrieval_bench`: time query-aware retrieval attention and the KV gather.

    python -m tinyvila.tools.retrieval_bench            # the default tables
    python -m tinyvila.tools.retrieval_bench --sweep    # also time kernel 1 / kernel 2 tile variants

Table 1, one decoder layer's attention for T question tokens over a cache of visual + text tokens:
retrieval_attention (out and r), its kernel 1 alone (out, scores=False), SDPA computing out alone
with the boolean causal/offset mask (GQA through enable_gqa), the extra time r costs, and the bytes
each moves over its time as a fraction of the device's copy bandwidth (tinyvila.tools.bench.
copy_bandwidth, bytes read + written). Bytes: attention reads K and V of the start + T visible
slots once (plus q, out); r reads the visual K rows once more. Shapes: LongVILA-7B-like (Qwen2-7B:
H 28, H_kv 4, D 128) 50,000 visual + 100 text tokens; LLaVA-NeXT-7B-like (vicuna: H 32 = H_kv, D 128)
2,900 visual + 100 text; T = 32, bf16.

Table 2, gather_kv compacting 28 layers x 4 KV heads of a 50,100-slot cache to 10% of the visual
tokens plus the text (5,100 slots), one selection per layer (G 1) or per KV head (G 4): bytes = K
and V rows read once and written once.

Every time is the median over several replays of a CUDA graph holding `--reps` back-to-back calls,
and the calls cycle through enough copies of the cache to exceed the L2 cache, as a model's layers do.
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

from tinyvila import __version__
from tinyvila.errors import run_cli
from tinyvila.kernels import retrieval
from tinyvila.kernels.compact_kv import gather_kv
from tinyvila.kernels.retrieval import retrieval_attention
from tinyvila.tools.bench import copy_bandwidth
from tinyvila.tools.kernel_bench import cuda_device, time_graph

L2_BYTES = 50 * 2**20
# name, H, H_kv, D, visual tokens, text tokens (before, after the visual ones), T
SHAPES = [("LongVILA-7B (Qwen2)", 28, 4, 128, 50_000, (36, 64), 32),
          ("LLaVA-NeXT-7B (vicuna)", 32, 32, 128, 2_900, (36, 64), 32)]


def make_inputs(H, Hkv, D, n_vis, text, T, dtype, device, copies):
    start = n_vis + sum(text)
    s_max = math.ceil((start + T) / 256) * 256
    sets = []
    for _ in range(copies):
        qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device, dtype=dtype)
        kv = torch.randn(2, Hkv, s_max, D, device=device, dtype=dtype)
        sets.append((qkv[:, :H * D].view(T, H, D), kv[0], kv[1]))
    slots = torch.arange(text[0], text[0] + n_vis, device=device, dtype=torch.int32)
    mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)  # key j <= start + i
    return start, sets, slots, mask


def sdpa(q, k, v, start, mask):
    T = q.shape[0]
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None, :, :start + T], v[None, :, :start + T],
                                          attn_mask=mask, enable_gqa=k.shape[0] != q.shape[1])


def attention_rows(shapes, dtype, device, bw, reps):
    rows = []
    for name, H, Hkv, D, n_vis, text, T in shapes:
        es = torch.finfo(dtype).bits // 8
        start = n_vis + sum(text)
        kv_bytes = 2 * Hkv * (start + T) * D * es
        copies = max(1, math.ceil(3 * L2_BYTES / kv_bytes))
        start, sets, slots, mask = make_inputs(H, Hkv, D, n_vis, text, T, dtype, device, copies)
        q, k, v = sets[0]
        out, r = retrieval_attention(q, k, v, start, slots)
        ref = sdpa(q, k, v, start, mask)[0].transpose(0, 1)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        t_all = time_graph([lambda s=s: retrieval_attention(*s, start, slots) for s in sets], reps)
        t_k1 = time_graph([lambda s=s: retrieval_attention(*s, start, slots, scores=False) for s in sets], reps)
        try:
            t_sdpa = time_graph([lambda s=s: sdpa(*s, start, mask) for s in sets], max(2, reps // 4))
        except RuntimeError as e:  # a backend that cannot be captured: report, don't die
            print(f"SDPA failed for {name}: {str(e).splitlines()[0]}")
            t_sdpa = float("nan")
        io = 2 * T * H * D * es  # q read, out written
        attn = kv_bytes + io
        vis = Hkv * n_vis * D * es + Hkv * n_vis * 4
        rows.append(dict(name=name, T=T, start=start, n_vis=n_vis, err=err, t_all=t_all, t_k1=t_k1, t_sdpa=t_sdpa,
                         attn=attn, vis=vis, bw=bw, plan=retrieval.plan(T, H, Hkv, D, start, None, device)))
        del sets
    return rows


def sweep(shapes, dtype, device, reps):
    """Kernel 1 (scores=False) and the r pass at a few tile configs; prints a table per shape."""
    for name, H, Hkv, D, n_vis, text, T in shapes:
        es = torch.finfo(dtype).bits // 8
        start = n_vis + sum(text)
        copies = max(1, math.ceil(3 * L2_BYTES / (2 * Hkv * (start + T) * D * es)))
        start, sets, slots, _ = make_inputs(H, Hkv, D, n_vis, text, T, dtype, device, copies)
        base = retrieval.plan(T, H, Hkv, D, start, None, device)
        print(f"\nsweep {name}: default plan (BLOCK_M, BLOCK_N, row blocks, splits, split size, warps) = {base}")
        print("| kernel 1 config | time (us) |")
        print("|---|---|")
        variants = [dict(), dict(block_n=32), dict(block_n=128), dict(num_stages=2), dict(num_stages=4),
                    dict(splits=max(1, base[3] // 2)), dict(splits=base[3] * 2), dict(block_m=64)]
        for kw in variants:
            try:
                t = time_graph([lambda s=s: retrieval_attention(*s, start, slots, scores=False, **kw) for s in sets],
                               reps)
                print(f"| {kw or 'default'} | {t * 1e6:.1f} |")
            except Exception as e:  # noqa: BLE001 (a config that does not compile: report it)
                print(f"| {kw} | failed: {str(e).splitlines()[0][:80]} |")
        print("| r pass config | full - kernel 1 (us) |")
        print("|---|---|")
        t_k1 = time_graph([lambda s=s: retrieval_attention(*s, start, slots, scores=False) for s in sets], reps)
        for bv in (32, 64, 128):
            t = time_graph([lambda s=s: retrieval_attention(*s, start, slots, block_v=bv) for s in sets], reps)
            print(f"| block_v {bv} | {(t - t_k1) * 1e6:.1f} |")
        del sets


def gather_rows(dtype, device, bw, reps):
    L, Hkv, D, start, n_vis, n_text = 28, 4, 128, 50_100, 50_000, 100
    s_src = 50_176
    src_k = torch.randn(L, Hkv, s_src, D, device=device, dtype=dtype)
    src_v = torch.randn(L, Hkv, s_src, D, device=device, dtype=dtype)
    keep = n_vis // 10 + n_text
    dst_k = torch.empty(L, Hkv, keep + 256, D, device=device, dtype=dtype)
    dst_v = torch.empty_like(dst_k)
    rows = []
    for G in (1, Hkv):
        pick = torch.rand(L * G, n_vis, device=device).topk(n_vis // 10, dim=1).indices + 36
        text = torch.cat([torch.arange(36, device=device), torch.arange(36 + n_vis, start, device=device)])
        index = torch.cat([pick, text.expand(L * G, -1)], 1).sort(dim=1).values.view(L, G, keep).int()
        t = time_graph([lambda: gather_kv(src_k, src_v, index, dst_k, dst_v)], reps)
        moved = 2 * 2 * L * Hkv * keep * D * dtype.itemsize + index.numel() * 4
        rows.append((G, keep, t, moved, moved / t / bw))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyvila.tools.retrieval_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants of both kernels")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    return run_cli(lambda: run(args), args.debug, "lower --reps")


def run(args) -> None:
    device = cuda_device("retrieval_bench")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {bw / 1e12:.2f} TB/s; {args.dtype}\n")
    rows = attention_rows(SHAPES, dtype, device, bw, args.reps)
    if args.sweep:
        sweep(SHAPES, dtype, device, args.reps)
        print()
    print("| shape | T | cache | out+r (us) | kernel 1 (us) | SDPA out (us) | r extra (us) | r extra / kernel 1 "
          "| kernel 1 GB/s (of copy bw) | out+r GB/s (of copy bw) | r pass GB/s | out vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        extra = x["t_all"] - x["t_k1"]
        k1 = x["attn"] / x["t_k1"]
        full = (x["attn"] + x["vis"]) / x["t_all"]
        print(f"| {x['name']} | {x['T']} | {x['start']} ({x['n_vis']} vis) | {x['t_all'] * 1e6:.1f} "
              f"| {x['t_k1'] * 1e6:.1f} | {x['t_sdpa'] * 1e6:.1f} | {extra * 1e6:.1f} | {extra / x['t_k1']:.2f} "
              f"| {k1 / 1e9:.0f} ({k1 / bw:.0%}) | {full / 1e9:.0f} ({full / bw:.0%}) "
              f"| {x['vis'] / max(extra, 1e-9) / 1e9:.0f} | {x['err']:.1e} |")
    print("\nkernel 1 plans (BLOCK_M, BLOCK_N, row blocks, splits, split size, warps): "
          + "; ".join(f"{x['name']} {x['plan']}" for x in rows))
    print("\n| gather_kv: 28 layers x 4 KV heads, 50,100 -> S_c | G | time (us) | GB/s (of copy bw) |")
    print("|---|---|---|---|")
    for G, keep, t, moved, frac in gather_rows(dtype, device, bw, args.reps):
        print(f"| {keep} slots | {G} | {t * 1e6:.1f} | {moved / t / 1e9:.0f} ({frac:.0%}) |")


if __name__ == "__main__":
    sys.exit(main())
