"""Sampling parameters and the sampler.

Sampling follows transformers' order (temperature, then top-k, then top-p) so that a seeded run is
reproducible and greedy decoding (temperature 0) is plain argmax over the allowed ids.
"""
import secrets
from dataclasses import asdict, dataclass

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
        seed = self.seed  # 64 bits, signed or unsigned (the stream takes it modulo 2^64)
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


MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # splitmix64's increment


def _splitmix64(x: int) -> int:
    """splitmix64's output function: 64 well-mixed bits from a counter (Python ints, exact)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class Sampler:
    """Picks the next token from fp32 logits [V]; `banned` ids (rows without a token string,
    media placeholders) can never be picked. Each draw takes one uniform number from a stream that
    depends on the seed and the draw's index alone (no device RNG), so an answer samples the same
    tokens alone or in a batch (sample_rows)."""

    def __init__(self, params: SamplingParams, banned: torch.Tensor | None):
        self.p = params
        self.banned = banned
        self.seed = (params.seed if params.seed is not None else secrets.randbits(64)) & MASK64
        self.draws = 0

    def __call__(self, logits: torch.Tensor) -> int:
        return sample_rows(logits.reshape(1, -1), [self])[0]

    def uniform(self) -> float:
        """The stream's next number, a multiple of 2^-24 in [0, 1) (exact in fp32)."""
        self.draws += 1
        return (_splitmix64((self.seed + self.draws * GOLDEN64) & MASK64) >> 40) * 2.0 ** -24


def sample_rows(logits: torch.Tensor, samplers: list) -> list:
    """Each row's next token: row b of fp32 logits [B, V] by samplers[b] (one engine's: the same
    banned ids). A few batched kernels and one device-to-host copy for the whole batch."""
    banned = samplers[0].banned
    logits = logits.float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    rows = [b for b, s in enumerate(samplers) if s.p.temperature > 0]
    if not rows:
        return logits.argmax(-1).tolist()
    if len(rows) == len(samplers):
        return _sample(logits, samplers).tolist()
    tokens = logits.argmax(-1)
    index = torch.tensor(rows, device=logits.device)
    return tokens.index_copy(0, index, _sample(logits.index_select(0, index), [samplers[b] for b in rows])).tolist()


def _sample(logits: torch.Tensor, samplers: list) -> torch.Tensor:
    """Sampled tokens [R] of fp32 logits [R, V] (banned ids at -inf), as transformers orders it:
    temperature, top-k, top-p, then a draw by inverse CDF with each sampler's next uniform."""
    V = logits.shape[-1]
    opts = torch.tensor([[s.p.temperature, s.p.top_k or V, s.p.top_p, s.uniform()] for s in samplers]).to(logits.device)
    temperature, top_k, top_p, u = (opts[:, i:i + 1] for i in range(4))
    # Most likely first, every row (whatever its options, so that a row draws the same alone or not)
    logits, order = (logits / temperature).sort(-1, descending=True)
    position = torch.arange(V, device=logits.device)
    logits = logits.masked_fill(position >= top_k, float("-inf"))
    probs = logits.softmax(-1)
    ahead = probs.cumsum(-1) - probs  # the mass of the likelier tokens: the smallest set reaching top_p stays
    cdf = logits.masked_fill((ahead >= top_p) & (position > 0) & (top_p < 1), float("-inf")).softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    last = (cdf < total).sum(-1, keepdim=True)  # the last token with any mass (u * total may round up to total)
    pick = torch.minimum(torch.searchsorted(cdf, u * total, right=True), last)
    return order.gather(1, pick).reshape(-1)
