"""`tinyvila-bench --serve [URL]`: what a client of tinyvila-serve sees over HTTP, next to the same
conversation in-process.

    tinyvila-bench --serve --model Qwen/Qwen2.5-VL-7B-Instruct-AWQ --image 672x672 --new-tokens 128
    tinyvila-bench --serve http://127.0.0.1:8000 --model DIR --api-key sk-local

Each run is a two-question conversation about one image (a new random image per run, so nothing is
cached between runs), answered greedily with a fixed answer length. It runs in-process first
(`Session.ask`, the model then released), then over HTTP on a server it starts on the same model
(or on the server at URL): turn 1, turn 2 resent with its history (the server continues the kept
session), then the very same turn-2 request again, which no kept session matches (the kept one now
holds the second answer too), so it is answered as by a server with no cache: the image encoded
and the whole conversation prefilled. TTFT over HTTP is from sending the request to the first
streamed chunk (the server sends it once the first token is chosen, as TTFT in-process counts);
streaming tok/s is the answer's tokens after the first over the time between that chunk and the
last one (sent once the answer has ended). The turn-2 figures (medians over the runs) are printed
side by side.
"""
import argparse
import base64
import http.client
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from tinyvila import __version__
from tinyvila.errors import TinyVilaError, check_output_file, run_cli

QUESTIONS = ("Describe the image in detail.", "What else is in the picture?")
WARMUP = 2  # untimed conversations first, on each side: kernels compiled, graphs captured, caches grown


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tinyvila-bench --serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", nargs="?", const="", metavar="URL",
                   help="the server to talk to (default: start one on --model, on a free port of 127.0.0.1)")
    p.add_argument("--model", metavar="DIR", help="checkpoint folder or hub id: the in-process runs, and the "
                   "server this starts (without --model only the HTTP columns are measured, on URL)")
    p.add_argument("--api-key", help="the server's --api-key (a started server is given it too)")
    p.add_argument("--served-model", metavar="NAME", help="the model id to send (default: the server's first "
                   "in /v1/models)")
    p.add_argument("--concurrency", type=int, default=1, help="clients running conversations at once (default 1)")
    p.add_argument("--image", default="672x672", metavar="WxH", help="the image's size (default 672x672)")
    p.add_argument("--new-tokens", type=int, default=128, help="answer length (default 128)")
    p.add_argument("--runs", type=int, default=3, help="timed conversations per client (default 3)")
    p.add_argument("--sparsity", metavar="POLICY", help="both sides' policy (default: the server's default for an "
                   "image conversation, the image preset)")
    p.add_argument("--prefill-graphs", action="store_true", help="both sides run short prefills (the follow-ups) "
                   "as CUDA graphs, captured once per conversation and bucket (tinyvila-serve --prefill-graphs)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("--version", action="version", version=f"tinyvila-bench {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if not args.serve and not args.model:
        p.error("--serve without a URL starts a server on --model: give --model (or a URL)")
    try:
        args.size = tuple(int(v) for v in args.image.lower().split("x"))
    except ValueError:
        args.size = ()
    if len(args.size) != 2 or min(args.size) <= 0:
        p.error(f"--image must be WxH, got {args.image!r}")
    for name in ("concurrency", "new_tokens", "runs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def picture(size, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------- in-process
def in_process(args, seeds) -> list:
    """Turn-2 stats of each conversation of `seeds` (the first WARMUP untimed) in this process."""
    import torch

    import tinyvila

    engine = tinyvila.load(args.model, device=args.device, dtype=args.dtype, prefill_graphs=args.prefill_graphs)
    sampling = dict(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    out = []
    for seed in seeds:
        with engine.session(images=[picture(args.size, seed)], sparsity=args.sparsity or "image") as s:
            s.ask(QUESTIONS[0], **sampling)
            out.append(s.ask(QUESTIONS[1], **sampling).stats)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the server started next needs the memory
    return out[WARMUP:]


# ---------------------------------------------------------------------- over HTTP
class Client:
    """One keep-alive HTTP connection streaming chat completions."""

    def __init__(self, url: str, key: str | None, model: str):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.model, self.new_tokens = model, 0

    def chat(self, messages: list) -> dict:
        """One streamed answer: its text, client-side ttft_s and stream tok/s, and the server's
        usage and tinyvila stats."""
        body = json.dumps({"model": self.model, "messages": messages, "stream": True, "temperature": 0,
                           "max_tokens": self.new_tokens, "ignore_eos": True,
                           "stream_options": {"include_usage": True}}).encode()  # serialized before t0
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", body, self.headers)
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise TinyVilaError(f"the server answered {resp.status}: {resp.read().decode(errors='replace')[:300]}")
        text, out, first = [], {}, None
        for line in sse_lines(resp):
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            last = time.perf_counter()
            first = first or last
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise TinyVilaError(f"the server's answer failed: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    text.append(piece)
            out.update({k: chunk[k] for k in ("usage", "tinyvila") if chunk.get(k)})
        if first is None or "usage" not in out:
            raise TinyVilaError("the server streamed nothing or no usage")
        n = out["usage"]["completion_tokens"]
        span = last - first
        return dict(out, text="".join(text), ttft_s=first - t0, tok_s=(n - 1) / span if span > 0 else 0.0)


def sse_lines(resp):
    """The response's lines as they arrive (HTTPResponse.readline waits for more of the body)."""
    pending = b""
    while chunk := resp.read1(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines


def conversation(client: Client, size, seed: int) -> tuple:
    """(turn 2 continuing the kept session, the same turn 2 with no kept session) over HTTP."""
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(picture(size, seed))}},
                                          {"type": "text", "text": QUESTIONS[0]}]}]
    answer = client.chat(first)["text"]
    history = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
    cached = client.chat(history)
    cold = client.chat(history)  # the kept session now holds this answer too: nothing matches
    if not cached["tinyvila"].get("conversation_continued"):
        raise TinyVilaError("the server did not continue the conversation (started with --max-sessions 0, or "
                            "evicting under a small --session-memory?)")
    if cold["tinyvila"].get("conversation_continued"):
        raise TinyVilaError("the server continued the repeated turn 2: the no-cache figure would be wrong")
    return cached, cold


def over_http(args, url: str, model: str, seeds) -> list:
    """(cached, cold) per conversation: `concurrency` clients, each WARMUP untimed conversations
    then `runs` timed ones."""
    results, errors = [], []

    def client_runs(i):
        try:
            c = Client(url, args.api_key, model)
            c.new_tokens = args.new_tokens
            for j, seed in enumerate(seeds):
                pair = conversation(c, args.size, seed + i * len(seeds))  # client 0: the in-process images
                if j >= WARMUP:
                    results.append(pair)
        except (TinyVilaError, OSError, http.client.HTTPException) as e:
            errors.append(e)

    threads = [threading.Thread(target=client_runs, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise TinyVilaError(f"over HTTP: {errors[0]}")
    return results


def served_model(url: str, key: str | None) -> str:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    if resp.status != 200:
        raise TinyVilaError(f"GET {url}/v1/models answered {resp.status}")
    return json.loads(resp.read())["data"][0]["id"]


def start_server(args, log):
    """`python -m tinyvila.serve` on a free port; (process, URL) once it says it is ready."""
    cmd = [sys.executable, "-m", "tinyvila.serve", args.model, "--port", "0"]
    for flag in ("api_key", "sparsity", "device", "dtype"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    cmd += ["--prefill-graphs"] if args.prefill_graphs else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()  # the ready line, or nothing once it died
    if not line.startswith("serving "):
        proc.wait()
        log.seek(0)
        raise TinyVilaError(f"the server did not start: {log.read().strip()[-500:]}")
    return proc, line.split(" on ")[-1].strip()


# ---------------------------------------------------------------------- report
def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def report(args, local: list, http_runs: list, url: str) -> None:
    cached, cold = [c for c, _ in http_runs], [c for _, c in http_runs]
    ms = lambda xs: f"{median(xs) * 1e3:.1f}"  # noqa: E731
    rows = {"in-process": (ms([s.ttft_s for s in local]) if local else "n/a", "",
                           f"{median([s.decode_tok_s for s in local]):.1f}" if local else "n/a"),
            "HTTP, cached conversation": (ms([r["ttft_s"] for r in cached]),
                                          ms([r["tinyvila"]["ttft_s"] for r in cached]),
                                          f"{median([r['tok_s'] for r in cached]):.1f}"),
            "HTTP, no cached session": (ms([r["ttft_s"] for r in cold]), ms([r["tinyvila"]["ttft_s"] for r in cold]),
                                        f"{median([r['tok_s'] for r in cold]):.1f}")}
    print(f"tinyvila-bench --serve {url}: {args.model or ''} image {args.image}, {args.new_tokens} new tokens, "
          f"sparsity {args.sparsity or 'the server default (image)'}, {args.runs} runs x {args.concurrency} "
          f"client(s); turn 2, medians")
    print("| turn 2 | TTFT ms (client) | TTFT ms (server's own) | decode tok/s |")
    print("|---|---|---|---|")
    for name, (ttft, server_ttft, rate) in rows.items():
        print(f"| {name} | {ttft} | {server_ttft} | {rate} |")
    print(f"cached tokens: {median([r['usage']['prompt_tokens_details']['cached_tokens'] for r in cached]):.0f} of "
          f"{median([r['usage']['prompt_tokens'] for r in cached]):.0f} prompt tokens")
    added = median([r["ttft_s"] - r["tinyvila"]["ttft_s"] for r in cached]) * 1e3
    print(f"HTTP adds {added:.1f} ms to the server's own TTFT of a cached turn 2 (median over the requests: "
          f"receiving and parsing the request, the hand-offs between threads, sending the first chunk)")
    inside = [r["tinyvila"]["server_ttft_s"] - r["tinyvila"]["ttft_s"] for r in cached
              if r["tinyvila"].get("server_ttft_s") is not None]  # a server of this version
    if inside:
        before = median(inside) * 1e3
        print(f"  of which {before:.1f} ms in the server before its first token (reading and parsing the request, "
              f"the hand-off to the model's thread) and {added - before:.1f} ms after it "
              f"or outside (the first chunk, the client sending and reading)")
    if local:
        extra = (median([r["ttft_s"] for r in cached]) - median([s.ttft_s for s in local])) * 1e3
        kept = median([r["tok_s"] for r in cached]) / median([s.decode_tok_s for s in local])
        print(f"HTTP cached turn 2 TTFT - in-process: {extra:+.1f} ms (target <= 3 ms); streaming keeps "
              f"{kept:.0%} of in-process decode tok/s (target >= 90%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "size"}, "url": url,
                       "in_process": [s.to_dict() for s in local],
                       "http": [{"cached": c, "cold": d} for c, d in http_runs]}, f, indent=2)


def run(args) -> None:
    if args.json:
        check_output_file(args.json, "--json")
    seeds = range(WARMUP + args.runs)
    local = in_process(args, seeds) if args.model else []
    proc = None
    with tempfile.TemporaryFile("w+") as log:
        try:
            if args.serve:
                url = args.serve.rstrip("/")
            else:
                proc, url = start_server(args, log)
            model = args.served_model or served_model(url, args.api_key)
            http_runs = over_http(args, url, model, seeds)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    report(args, local, http_runs, url)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: run(args), args.debug, "lower --image or --new-tokens")


if __name__ == "__main__":
    sys.exit(main())
