"""Sampling, per-answer statistics and the result type.

Sampling follows transformers' order (temperature, then top-k, then top-p) so that a seeded run is
reproducible and greedy decoding (temperature 0) is plain argmax over the allowed ids.
"""
import resource
from dataclasses import asdict, dataclass, field

import torch

from .errors import TinyVilaError


def is_number(value, integer: bool = False) -> bool:
    """An int (or, unless `integer`, an int or a float); bools are ints in Python but not here."""
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False  # keep generating through stop tokens (benchmarks, parity tests)

    def __post_init__(self):
        # Types first: a float top_k or a string seed would otherwise fail deep inside torch.
        if not is_number(self.max_new_tokens, integer=True) or self.max_new_tokens < 1:
            raise TinyVilaError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise TinyVilaError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise TinyVilaError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_number(self.top_k, integer=True) or self.top_k < 0:
            raise TinyVilaError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        seed = self.seed  # torch.Generator.manual_seed takes 64 bits, signed or unsigned
        if seed is not None and (not is_number(seed, integer=True) or not -2 ** 63 <= seed < 2 ** 64):
            raise TinyVilaError(f"seed must be a 64-bit integer, got {self.seed!r}")

    @classmethod
    def from_options(cls, defaults: "SamplingParams | None" = None, **options) -> "SamplingParams":
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        base = asdict(defaults) if defaults else {}
        base.update({k: v for k, v in options.items() if v is not None})
        return cls(**base)


class Sampler:
    """Picks the next token from fp32 logits [V]; `banned` ids (rows without a token string,
    media placeholders) can never be picked."""

    def __init__(self, params: SamplingParams, banned: torch.Tensor | None, device):
        self.p = params
        self.banned = banned
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.reshape(-1).float()
        if self.banned is not None:
            logits = logits.masked_fill(self.banned, float("-inf"))
        if self.p.temperature == 0:
            return int(logits.argmax())
        logits = logits / self.p.temperature
        if self.p.top_k:
            kth = torch.topk(logits, min(self.p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.p.top_p < 1:
            sorted_logits, order = torch.sort(logits)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - self.p.top_p
            remove[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class Stats:
    """What one answer cost. Times in seconds; `prefill_tokens` counts only this turn's new tokens."""
    prefill_tokens: int = 0
    visual_tokens: int = 0  # visual positions in the prompt, image_newline included
    visual_tokens_kept: int = 0  # after prefill sparsity (equal to visual_tokens when dense)
    visual_tokens_selected: int = 0  # of those, what decode attended to per layer (retrieval)
    vision_s: float = 0.0  # vision encoder + projector for media new in this turn
    prefill_s: float = 0.0  # LLM prefill of this turn's new tokens
    ttft_s: float = 0.0  # from the call to the first generated token
    decode_tokens: int = 0  # decode steps after the first token
    decode_s: float = 0.0  # all of decode, the one-time graph capture included
    decode_tok_s: float = 0.0  # steady rate: decode_tokens / (decode_s - graph_capture_s)
    graph_capture_s: float = 0.0  # capturing the GPU decode step (once per conversation and buffer)
    context_tokens: int = 0  # tokens in the KV cache at the end of the answer
    decode_context_tokens: int = 0  # of those, what decode attends to (fewer under retrieval)
    peak_mem_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list = field(default_factory=list)  # new tokens only, the stop token excluded
    stats: Stats = field(default_factory=Stats)
    finish_reason: str = "stop"  # "stop" | "length" | "cancelled"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int:
    """Peak bytes allocated on the GPU since the last reset; on the CPU, the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class GraphedDecode:
    """A session's decode step (all layers, one token) captured once as a CUDA graph and replayed
    for every new token: one launch instead of hundreds. Inputs live in fixed device tensors; the
    KV cache and the attention workspace never move. The graph also advances its own position,
    slot and length and picks the greedy next token (never a banned id), feeding it to the next
    replay, so greedy decoding runs ahead of the host (`greedy`)."""

    def __init__(self, lm, cache, positions_dims: int, banned, token: int, pos: int, slot: int,
                 capture_stream=None):
        from tinyvila.kernels.decode_attention import decode_workspace, split_count
        from tinyvila.kernels.gpu import sm_count

        device = cache.k.device
        cfg = lm.cfg
        self.lm, self.cache, self.banned = lm, cache, banned
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros((3, 1) if positions_dims == 2 else (1,), dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.length = torch.ones(1, dtype=torch.int32, device=device)
        splits = split_count(cache.max_len, cfg.num_key_value_heads, sm_count(device))
        self.workspace = decode_workspace(cfg.num_attention_heads, splits, cfg.head_dim, device)
        self.graph = None
        # greedy(): where the host reads each token, one slot per step in flight
        self._pinned = torch.zeros(2, dtype=torch.long, pin_memory=True)
        self._ready = [torch.cuda.Event(), torch.cuda.Event()]
        if capture_stream is not None:  # warm up on a side stream (writes land in the slot about to be written)
            self._set(token, pos, slot)
            side = capture_stream  # one per engine: libraries keep per-stream workspaces for good
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):
                    self._step()
                    self._set(token, pos, slot)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.logits = self._step()

    def _set(self, token, pos, slot):
        self.token.fill_(token)
        self.pos.fill_(pos)
        self.slot.fill_(slot)
        self.length.fill_(slot + 1)

    def _step(self):
        logits = self.lm.decode_step(self.token, self.pos, self.cache, self.slot, self.length, self.workspace)
        masked = logits if self.banned is None else logits.masked_fill(self.banned, float("-inf"))
        self.token.copy_(masked.argmax(-1))  # the greedy next token, fed to the next replay
        for t in (self.pos, self.slot, self.length):
            t.add_(1)
        return logits

    def __call__(self, token: int, pos: int, slot: int) -> torch.Tensor:
        """Logits after feeding `token` at `slot` (RoPE position `pos`)."""
        if self.graph is None:
            self._set(token, pos, slot)
            with torch.no_grad():
                logits = self._step()
        else:
            self._set(token, pos, slot)
            self.graph.replay()
        return logits if self.graph is None else self.logits

    def greedy(self, token: int, pos: int, slot: int, steps: int):
        """Yield the next `steps` greedy tokens after feeding `token` at `slot`, keeping one step
        queued on the GPU ahead of the host: while the host streams token i, step i+1 runs, so
        no host time sits between steps. A consumer that stops early leaves one step computed past
        the end (its KV lies beyond the cache length and is overwritten later)."""
        device = self.token.device
        self._set(token, pos, slot)

        def launch(i):
            with torch.no_grad():
                self.graph.replay() if self.graph is not None else self._step()
            self._pinned[i % 2:i % 2 + 1].copy_(self.token, non_blocking=True)
            self._ready[i % 2].record(torch.cuda.current_stream(device))

        if steps > 0:
            launch(0)
        for i in range(steps):
            if i + 1 < steps:
                launch(i + 1)
            self._ready[i % 2].synchronize()
            yield int(self._pinned[i % 2])
