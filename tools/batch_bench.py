"""`tinyvila-bench --batch N`: N conversations at once through a Batcher (tinyvila/batch.py), each
with its own media (random pictures of the --image / --video sizes, its own seed) and its own
question, each answering --new-tokens tokens; all submitted together, or one every K scheduler
steps (--stagger K), the newcomers prefilled --prefill-chunk tokens per step; greedy, or sampled
(--temperature, --top-p) with a seed per conversation.

    tinyvila-bench --arch llava-next-vicuna-7b --quant w4a16 --image 672x672 --batch 8 --sparsity image

For each sparsity setting the same conversations also run through a batcher of one (one after
another), and the table shows, per batch size: the aggregate decode rate (every row's tokens over
the time spent in decode steps, the steps while the batch fills and drains included), the rate of
the steps that ran every row at once (B rows a step over their time; how many steps those were),
the per-conversation rate (median and lowest: each answer's tokens
over its own decode time, stalls included), both against batch 1, the longest stall a newcomer's
prefill caused the running conversations, and how many conversations' tokens equal their batch-1
tokens (on a GPU in fp16 a near-tie of the logits may flip one: the lone step's GEMV sums its
split-K parts with fp32 atomics, in an order that varies from run to run). The aggregate rate
leaves out the batcher's once-per-batch-size graph captures. On a GPU it also gives what the
bytes allow: a decode step of B rows reads the weights once and each row's own K/V (its mean
context while answering), so at the copy bandwidth measured in the same run B rows make at most
B x bandwidth / (weights + B x K/V) tokens a second ("of that": the all-rows rate's share).
Batch 1 here is the batcher's own step at one row (its CUDA graph for one row), which decodes as a
lone session's graphed step does.
"""
import json
import statistics
import time

import torch

from tinyvila.batch import Batcher
from tinyvila.generate import peak_memory, reset_peak_memory
from tinyvila.session import Session

from .bench import configs, copy_bandwidth, decode_bytes, engine_for, media_items, prompt_ids, question, sampling


def conversations(model, args) -> list:
    """(media items, prompt ids) of each conversation: its own pictures, its own question (the
    bench's --question-tokens rotated)."""
    out, asked = [], question(args.question_tokens)
    for i in range(args.batch):
        items = media_items(model, args, seed=i)
        own = asked[i % len(asked):] + asked[:i % len(asked)]
        out.append((items, prompt_ids(model, items, args.text, own)))
    return out


def run_batch(engine, convs, sparsity, size: int, args, new_tokens: int) -> dict:
    """The conversations through a batcher of `size`, submitted per --stagger: one record."""
    batcher = Batcher(engine, max_batch=size, prefill_chunk=args.prefill_chunk).prepare()
    pending, requests, steps = list(convs), [], 0
    reset_peak_memory(engine.device)
    t0 = time.perf_counter()
    while pending or not batcher.idle():
        while pending and len(requests) * args.stagger <= steps:
            items, ids = pending.pop(0)
            context = sum(it.n_tokens for it in items) + len(ids) + new_tokens + 8
            params = sampling(args, new_tokens, seed=len(requests))  # each conversation its own seed
            requests.append(batcher.submit(Session(engine, list(items), None, context, sparsity=sparsity), ids,
                                           params))
        batcher.step()
        steps += 1
    wall = time.perf_counter() - t0
    results = [r.wait() for r in requests]
    per = [r.stats.decode_tok_s for r in results]
    rows = min(size, len(convs))
    full_steps, full_s = batcher.decode_by_rows.get(rows, (0, 0.0))
    return dict(sparsity=sparsity.label, batch=size, stagger=args.stagger, prefill_chunk=args.prefill_chunk,
                conversations=len(convs), aggregate_tok_s=batcher.decode_rows / batcher.decode_s,
                full_batch_tok_s=rows * full_steps / full_s if full_steps else None, full_batch_steps=full_steps,
                decode_steps=batcher.decode_steps,
                per_conversation_median_tok_s=statistics.median(per), per_conversation_min_tok_s=min(per),
                longest_stall_s=batcher.longest_stall_s, longest_stall_cause=batcher.longest_stall_cause, wall_s=wall,
                decode_context=statistics.mean(r.stats.decode_context_tokens for r in results) - new_tokens / 2,
                peak_mem_bytes=max([peak_memory(engine.device)] + [r.stats.peak_mem_bytes for r in results]),
                tokens=[r.token_ids for r in results])


def main(args) -> list:
    engine, model = engine_for(args)
    convs = conversations(model, args)
    records = []
    for sparsity in configs(args):
        # Untimed first, as long as the timed run so that the batch grows through the same sizes:
        # each size's kernels compile here (the graph captures of each run are left out of its
        # decode rate by the batcher).
        run_batch(engine, convs, sparsity, args.batch, args, args.new_tokens)
        alone = run_batch(engine, convs, sparsity, 1, args, args.new_tokens)
        together = run_batch(engine, convs, sparsity, args.batch, args, args.new_tokens) if args.batch > 1 else alone
        same = sum(a == b for a, b in zip(together["tokens"], alone["tokens"]))
        together["tokens_same"] = alone["tokens_same"] = same
        records += [alone, together] if args.batch > 1 else [alone]
    report(args, records, model.language_model)
    return records


def bytes_bound(records, lm, bandwidth) -> None:
    """Each record's `bound_tok_s`: the aggregate rate its bytes allow at the copy bandwidth (None
    without a GPU), its rows all decoding together at their mean context."""
    weights = decode_bytes(lm, 0)
    for r in records:
        rows = min(r["batch"], r["conversations"])
        kv = decode_bytes(lm, int(r["decode_context"])) - weights
        r["bound_tok_s"] = rows * bandwidth / (weights + rows * kv) if bandwidth else None


def report(args, records, lm) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    bytes_bound(records, lm, bandwidth)
    print(f"| sparsity | batch | stagger | aggregate decode tok/s | x batch 1 | all rows in: tok/s (steps) | x batch 1 "
          f"| bytes allow tok/s | of that | "
          f"per-conversation tok/s median / min | x batch 1 | longest stall ms (what it did) | wall s | peak GB "
          f"| tokens = batch 1 |"
          f"  ({args.arch or args.model}, {' '.join(args.image + args.video)}, {args.new_tokens} new tokens each, "
          f"{name}, {args.dtype}" + (f", copy {bandwidth / 1e12:.2f} TB/s)" if bandwidth else ")"))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in records:
        b = base.setdefault(r["sparsity"], r)
        bound = r["bound_tok_s"]
        print(f"| {r['sparsity']} | {r['batch']} | {r['stagger']} | {r['aggregate_tok_s']:.1f} | "
              f"x{r['aggregate_tok_s'] / b['aggregate_tok_s']:.2f} | "
              + (f"{full:.1f} ({r['full_batch_steps']}/{r['decode_steps']}) | x{full / b['aggregate_tok_s']:.2f} | "
                 if (full := r["full_batch_tok_s"]) else "- | - | ")
              + (f"{bound:.0f} | {(full or r['aggregate_tok_s']) / bound:.0%} | "
                 if bound else "n/a | n/a | ")
              + f"{r['per_conversation_median_tok_s']:.1f} / {r['per_conversation_min_tok_s']:.1f} | "
              f"{r['per_conversation_median_tok_s'] / b['per_conversation_median_tok_s']:.0%} | "
              f"{r['longest_stall_s'] * 1e3:.1f}"
              + (f" ({r['longest_stall_cause']})" if r["longest_stall_cause"] else "")
              + f" | {r['wall_s']:.2f} | {r['peak_mem_bytes'] / 1e9:.2f} | "
              f"{r['tokens_same']}/{r['conversations']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "runs": records}, f, indent=2)
