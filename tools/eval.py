"""tinyvila-eval: accuracy and latency of sparsity configurations, side by side, on your own data.

    tinyvila-eval MODEL --data questions.jsonl --configs dense,prefill:0.6,sparsevila:image,fastv,visionzip

The data file is the JSONL format of tools/eval_data.py (media paths, one or more turns, each with
a question, reference answers and a metric). Every configuration answers every sample greedily,
each sample in its own conversation; multi-turn samples run with history="evict" by default (each
turn sees the media and its own question only, as the SparseVILA protocol does).

Each answer is appended to OUT/answers.jsonl as soon as its sample is done, so an interrupted run
resumes where it stopped (a sample counts as done for one configuration, model, token limit and
set of questions). At the end: OUT/results.md and OUT/results.csv (accuracy, TTFT, decode tok/s,
E2E and the vision / prefill / decode split per configuration, E2E speedup against the first
configuration, or dense when present) and two plots, OUT/accuracy_vs_speedup.png and OUT/latency.png.

Latency is the steady state: E2E = TTFT + decode time without the one-time CUDA-graph capture; each
configuration first answers the first sample once, untimed (kernel compilation, warm-up).
"""
import argparse
import csv
import hashlib
import json
import os
import re
import statistics
import sys
import time

from tinyvila import __version__, load
from tinyvila.batch import Batcher
from tinyvila.errors import TinyVilaError, run_cli
from tinyvila.sparsity import Sparsity

from .eval_data import load_eval_file
from .metrics import score
from .plots import accuracy_vs_speedup, latency_breakdown, require_matplotlib

DEFAULT_CONFIGS = "dense,prefill:0.6,sparsevila:image,fastv,visionzip"
TIMES = ("ttft_s", "decode_tok_s", "e2e_s", "vision_s", "prefill_s", "decode_s")


def split_configs(text: str) -> list:
    """"dense,fastv:k=2,r=0.5,visionzip" -> ["dense", "fastv:k=2,r=0.5", "visionzip"]: a comma
    starts a new configuration unless what follows is a `key=value` setting of the last one."""
    names = [part.strip() for part in re.split(r",(?!\s*\w+\s*=)", text) if part.strip()]
    for name in names:
        Sparsity.from_options(name)  # a bad name fails before the model loads
    if len(set(names)) != len(names):
        raise TinyVilaError(f"--configs names a configuration twice: {text}")
    if not names:
        raise TinyVilaError("--configs is empty")
    return names


def sample_key(config: str, sample, model: str, max_new_tokens: int) -> str:
    """What makes a cached answer reusable: the configuration, the model, the token limit and the
    sample's questions and media."""
    what = json.dumps([config, os.path.abspath(model), max_new_tokens, sample.id, sample.images, sample.videos,
                       sample.num_frames, [t.question for t in sample.turns]])
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def read_cache(path: str) -> dict:
    """key -> record of OUT/answers.jsonl; a line cut short by an interruption is ignored."""
    done = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    done[record["key"]] = record
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def answer_sample(engine, sample, config: str, history: str, max_new_tokens: int) -> list:
    """One conversation: each turn's answer, score and timings."""
    with sample_session(engine, sample, config, history) as s:
        return [turn_record(turn, s.ask(turn.question, max_new_tokens=sample.max_new_tokens or max_new_tokens,
                                        temperature=0.0)) for turn in sample.turns]


def answer_batched(engine, todo: list, config: str, args, finished) -> None:
    """The samples `todo` [(sample, key)] through one Batcher: up to args.batch conversations at
    once, each sample's turns queued behind each other in its own session; finished(sample, key, turns)
    as each sample ends."""
    batcher, waiting, active = Batcher(engine, max_batch=args.batch), list(todo), []
    while waiting or active:
        while waiting and len(active) < args.batch:  # a session (and its cache) per open sample only
            sample, key = waiting.pop(0)
            s = sample_session(engine, sample, config, args.history)
            limit = sample.max_new_tokens or args.max_new_tokens
            active.append((sample, key, s, [batcher.ask(s, turn.question, max_new_tokens=limit, temperature=0.0)
                                            for turn in sample.turns]))
        batcher.step()
        for entry in [e for e in active if all(r.done for r in e[3])]:
            active.remove(entry)
            sample, key, s, requests = entry
            s.close()
            finished(sample, key, [turn_record(turn, r.wait()) for turn, r in zip(sample.turns, requests)])


def sample_session(engine, sample, config: str, history: str):
    options = {"max_frames": sample.num_frames} if sample.num_frames and "max_frames" in engine.model.media_options \
        else {}
    return engine.session(images=sample.images, videos=sample.videos, sparsity=config, history=history, **options)


def turn_record(turn, r) -> dict:
    """A turn's answer, score and timings (r: its GenerationResult)."""
    st = r.stats
    decode = st.decode_s - st.graph_capture_s
    return {"answer": r.text, "score": score(turn.metric, r.text, turn.answers), "metric": turn.metric,
            "ttft_s": st.ttft_s, "decode_tok_s": st.decode_tok_s, "e2e_s": st.ttft_s + decode,
            "vision_s": st.vision_s, "prefill_s": st.prefill_s, "decode_s": decode,
            "visual_tokens": st.visual_tokens, "visual_tokens_kept": st.visual_tokens_kept,
            "visual_tokens_selected": st.visual_tokens_selected}


def summarize(configs: list, records: dict) -> list:
    """One row per configuration: mean accuracy and timings over all turns, speedup vs the baseline."""
    rows = []
    for config in configs:
        turns = [t for r in records[config] for t in r["turns"]]
        row = {"name": config, "turns": len(turns), "accuracy": statistics.fmean(t["score"] for t in turns)}
        for key in TIMES + ("visual_tokens", "visual_tokens_kept", "visual_tokens_selected"):
            row[key] = statistics.fmean(t[key] for t in turns)
        rows.append(row)
    base = next((r for r in rows if r["name"] == "dense"), rows[0])
    for row in rows:
        row["speedup"] = base["e2e_s"] / row["e2e_s"] if row["e2e_s"] > 0 else float("nan")
    return rows


def markdown(rows: list, baseline: str) -> str:
    head = ("| configuration | turns | accuracy | visual tokens (kept / selected) | TTFT ms | decode tok/s | "
            f"E2E ms | vision / prefill / decode ms | E2E speedup vs {baseline} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['turns']} | {100 * r['accuracy']:.1f}% | {r['visual_tokens']:.0f} "
                     f"({r['visual_tokens_kept']:.0f} / {r['visual_tokens_selected']:.0f}) | {1e3 * r['ttft_s']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {1e3 * r['e2e_s']:.1f} | {1e3 * r['vision_s']:.1f} / "
                     f"{1e3 * r['prefill_s']:.1f} / {1e3 * r['decode_s']:.1f} | x{r['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list, out: str, title: str, plots: bool) -> str:
    baseline = next((r["name"] for r in rows if r["name"] == "dense"), rows[0]["name"])
    table = markdown(rows, baseline)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{table}")
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if plots:
        accuracy_vs_speedup(rows, os.path.join(out, "accuracy_vs_speedup.png"), title=title, baseline=baseline)
        latency_breakdown(rows, os.path.join(out, "latency.png"), title=f"{title}: mean per turn")
    return table


def run(args) -> str:
    configs = split_configs(args.configs)
    samples = load_eval_file(args.data)[:args.limit]
    if args.plots:  # fail now rather than after hours of answers
        require_matplotlib()
    os.makedirs(args.out, exist_ok=True)
    engine = load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len)
    for config in configs:  # fail before answering anything
        Sparsity.from_options(config).check_layers(engine.model.language_model.cfg.num_hidden_layers)
    if any(s.videos for s in samples) and not engine.model.takes_video:
        raise TinyVilaError(f"{args.data} has videos but {engine.model.name} takes images only")
    cache_path = os.path.join(args.out, "answers.jsonl")
    done = read_cache(cache_path)
    records = {c: [] for c in configs}
    with open(cache_path, "a", encoding="utf-8") as cache:
        for config in configs:
            todo = [(s, sample_key(config, s, args.model, args.max_new_tokens)) for s in samples]
            records[config] = [done[k] for _, k in todo if k in done]
            todo = [(s, k) for s, k in todo if k not in done]
            print(f"{config}: {len(records[config])} cached, {len(todo)} to answer", file=sys.stderr)
            if todo:  # kernel compilation and first-call costs stay out of the timings
                answer_sample(engine, todo[0][0], config, args.history, args.max_new_tokens)
            t0, total = time.perf_counter(), len(records[config]) + len(todo)

            def finished(sample, key, turns):
                record = {"key": key, "config": config, "id": sample.id, "turns": turns}
                cache.write(json.dumps(record) + "\n")
                cache.flush()
                os.fsync(cache.fileno())  # an interrupted run keeps every finished sample
                records[config].append(record)
                if args.progress:
                    print(f"  [{len(records[config])}/{total}] {sample.id}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)

            if args.batch > 1:
                answer_batched(engine, todo, config, args, finished)
            else:
                for sample, key in todo:
                    t0 = time.perf_counter()
                    finished(sample, key, answer_sample(engine, sample, config, args.history, args.max_new_tokens))
    title = f"{os.path.basename(os.path.normpath(args.model))} on {os.path.basename(args.data)} ({len(samples)} samples)"
    return write_results(summarize(configs, records), args.out, title, args.plots)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tinyvila-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="samples in the tinyvila eval JSONL format")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated sparsity configurations (default {DEFAULT_CONFIGS})")
    p.add_argument("--out", metavar="DIR", help="results and the answer cache (default eval-<data name>)")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=32)
    p.add_argument("--history", choices=["evict", "keep"], default="evict", help="multi-turn history (default evict)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int)
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    p.add_argument("--progress", action="store_true", help="a line per answered sample")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="answer N samples at once in shared decode steps (default 1; each answer is the one it "
                   "gets alone, the timings are those of a shared batch)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.batch < 1:
        p.error("--batch must be at least 1")
    args.out = args.out or "eval-" + os.path.splitext(os.path.basename(args.data))[0]

    def body():
        print(run(args), end="")

    return run_cli(body, args.debug, "try --max-seq-len or fewer frames (num_frames)")


if __name__ == "__main__":
    sys.exit(main())
