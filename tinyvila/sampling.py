"""Sampling parameters and the sampler.

Sampling follows transformers' order (temperature, then top-k, then top-p) so that a seeded run is
reproducible and greedy decoding (temperature 0) is plain argmax over the allowed ids.
"""
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
