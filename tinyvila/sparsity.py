"""Visual sparsity policies: which visual tokens the LLM sees, and which of them decode attends to.

A `Sparsity` is a policy with two hooks, each an object of one small interface:
- `at_prefill` (a `PrefillPolicy`): what the LLM sees of each media item. `Dense` keeps every
  token. `SaliencyTopK` (SparseVILA, query-agnostic): the vision encoder's own attention ranks the
  tokens of each item (`saliency`, one float per visual position, +inf for structural positions
  such as LLaVA-NeXT's image_newline or VILA's per-frame "\\n"), and `select_kept` keeps the top
  ceil((1 - p) * n) of every attention group (anyres tile, base image, frame), or of the whole item
  with `prefill_budget="global"`; the dropped tokens never reach the LLM. `VisionZip` merges
  instead. `FastV` keeps every token through the encoder and prunes inside the LLM
  (`FastV.pruner`, the hook the decoder calls at layer K).
- `at_decode` (a `DecodePolicy`): what each answer's decode attends to. `AttendAll`, or
  `Retrieval` (query-aware): per layer (or KV head) the top ceil((1 - d) n) visual tokens by the
  turn's attention, compacted with all the text into the decode buffer.

p = 0 is the dense path itself (no saliency is computed), so it is token-for-token the dense output.

The two published baselines:
- FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024
  (pkunlp-icler/FastV@d165972). After LLM layer K-1 the last prompt token's attention (mean over
  heads) ranks the visual tokens; the top (1 - R) go on through layers K.., the rest are dropped
  for good (query-aware: the question of the turn that brought the media decides), positions
  unchanged. Paper setting K = 2, R = 50%. Layers below K see every token during that prefill
  only; the cache then holds the kept tokens in every layer (FastV's KV-cache variant prunes once).
- VisionZip: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
  Models", CVPR 2025 (dvlab-research/VisionZip@3151f6d, visionzip/clip_encoder.py). Query-agnostic:
  of each group's budget, "dominant" tokens by summary attention and 10/64 of it "contextual"
  tokens merged from the rest (`visionzip_merge`). Paper settings 64 / 128 / 192 of LLaVA-1.5's
  576 tokens; our default keeps 192/576 (its largest, nearest our image preset's 40%).
"""
import math
from dataclasses import dataclass

import torch

from .errors import TinyVilaError

# Named after the paper's settings: (prefill sparsity p, decode sparsity d).
PRESETS = {"dense": (0.0, 0.0), "image": (0.60, 0.75), "video": (0.75, 0.90)}
BUDGETS = ("group", "global")
POSITION_MODES = ("compact", "original")
GRANULARITIES = ("layer", "kv_head")
HISTORIES = ("keep", "evict")
METHODS = ("sparsevila", "fastv", "visionzip")
FASTV_LAYER, FASTV_RATIO = 2, 0.5  # FastV's K and R (paper default)
VISIONZIP_KEEP, VISIONZIP_CONTEXTUAL = 192 / 576, 10 / 64  # kept share; contextual share of what is kept
OPTIONS = ("sparsity", "prefill_sparsity", "decode_sparsity", "prefill_budget", "position_mode",
           "retrieval_granularity", "history")


@dataclass(frozen=True)
class Sparsity:
    prefill: float = 0.0  # p: fraction of each group's visual tokens dropped before the LLM
    decode: float = 0.0  # d: fraction of the kept visual tokens decode skips, per turn
    budget: str = "group"  # "group": top-k per attention group; "global": per item, scores normalised per group
    position_mode: str = "compact"  # "compact": positions as if the dropped tokens were never written
    granularity: str = "layer"  # retrieval selection per "layer" or per "kv_head"
    history: str = "keep"  # "keep" | "evict" (drop each turn's question and answer at its end)
    method: str = "sparsevila"  # who drops the `prefill` share: "sparsevila" | "fastv" | "visionzip"
    fastv_layer: int = FASTV_LAYER  # FastV's K: the first layer that sees only the kept tokens

    @property
    def label(self) -> str:
        """A short name for tables: "dense", "p=0.6 d=0.75", "fastv k=2 r=0.5", "visionzip keep=0.33"."""
        if self.method == "fastv":
            return f"fastv k={self.fastv_layer} r={self.prefill:g}"
        if self.method == "visionzip":
            return f"visionzip keep={1 - self.prefill:.2g}" + (f" d={self.decode:g}" if self.decode else "")
        return f"p={self.prefill:g} d={self.decode:g}" if self.prefill or self.decode else "dense"

    def check_layers(self, n_layers: int) -> None:
        """FastV's K must leave the model at least one layer that sees only the kept tokens."""
        if self.method == "fastv" and self.fastv_layer >= n_layers:
            raise TinyVilaError(f"fastv k must be below the model's {n_layers} layers (got k={self.fastv_layer})")

    @property
    def encoder_prunes(self) -> bool:
        """The vision encoder's saliency picks the tokens (SparseVILA's prefill stage, VisionZip)."""
        return self.prefill > 0 and self.method != "fastv"

    @property
    def at_prefill(self) -> "PrefillPolicy":
        """The prefill hook: what the LLM sees of each media item."""
        return PREFILL_POLICIES[self.method](self) if self.prefill > 0 else Dense(self)

    @property
    def at_decode(self) -> "DecodePolicy":
        """The decode hook: what each answer's decode attends to."""
        return Retrieval(self) if self.decode > 0 else AttendAll(self)

    @classmethod
    def from_options(cls, sparsity=None, prefill_sparsity=None, decode_sparsity=None, prefill_budget=None,
                     position_mode=None, retrieval_granularity=None, history=None) -> "Sparsity":
        """A preset name (or a Sparsity) with any of its fields overridden."""
        base = sparsity if isinstance(sparsity, Sparsity) else parse_policy(sparsity)
        prefill = base.prefill if prefill_sparsity is None else prefill_sparsity
        decode = base.decode if decode_sparsity is None else decode_sparsity
        out = cls(prefill=_fraction("prefill_sparsity", prefill), decode=_fraction("decode_sparsity", decode),
                  budget=_choice("prefill_budget", prefill_budget or base.budget, BUDGETS),
                  position_mode=_choice("position_mode", position_mode or base.position_mode, POSITION_MODES),
                  granularity=_choice("retrieval_granularity", retrieval_granularity or base.granularity,
                                      GRANULARITIES),
                  history=_choice("history", history or base.history, HISTORIES),
                  method=base.method, fastv_layer=base.fastv_layer)
        if out.method == "fastv" and out.decode > 0:
            raise TinyVilaError("fastv prunes during prefill only: it takes no decode_sparsity")
        if out.method == "fastv" and out.position_mode != "original":
            raise TinyVilaError("fastv keeps the dense positions: it takes no position_mode other than original")
        return out

    def overridden(self, **options) -> "Sparsity":
        """This policy with the given OPTIONS applied on top (a preset name resets p and d)."""
        options = {k: v for k, v in options.items() if v is not None}
        base = self
        if "sparsity" in options:  # a new policy, this one's budget, positions and history kept
            base = Sparsity.from_options(options.pop("sparsity"), prefill_budget=self.budget,
                                         position_mode=None if self.position_mode == "compact" else self.position_mode, retrieval_granularity=self.granularity,
                                         history=self.history)
        return Sparsity.from_options(base, **options)


def parse_policy(spec) -> Sparsity:
    """A policy from its name: None or a preset ("dense", "image", "video"), "sparsevila:PRESET",
    "prefill:P", "decode:D", "fastv" or "fastv:k=K,r=R", "visionzip" or "visionzip:keep=F"."""
    if spec is None:
        return Sparsity()
    name, _, args = str(spec).strip().partition(":")
    usage = ("use dense, image, video, sparsevila:PRESET, prefill:P, decode:D, fastv[:k=K,r=R] or "
             "visionzip[:keep=F]")
    if name in PRESETS and not args:
        return Sparsity(*PRESETS[name])
    if name == "sparsevila" and args in PRESETS:
        return Sparsity(*PRESETS[args])
    if name in ("prefill", "decode") and args:
        return Sparsity(**{name: _fraction(f"{name}_sparsity", args)})
    if name in ("fastv", "visionzip"):
        given = _settings(spec, args, ("k", "r") if name == "fastv" else ("keep",))
        if name == "visionzip":
            keep = given.get("keep", VISIONZIP_KEEP)
            if not 0 < keep <= 1:
                raise TinyVilaError(f"visionzip keep must be in (0, 1], got {keep:g}")
            return Sparsity(prefill=1.0 - keep, method="visionzip")
        k = given.get("k", FASTV_LAYER)
        if k != int(k) or k < 1:
            raise TinyVilaError(f"fastv k (the layer that starts pruned) must be an integer >= 1, got {k:g}")
        return Sparsity(prefill=_fraction("fastv r", given.get("r", FASTV_RATIO)), method="fastv",
                        fastv_layer=int(k), position_mode="original")  # FastV keeps the dense positions
    raise TinyVilaError(f"unknown sparsity {spec!r} ({usage})")


def _settings(spec, args: str, allowed) -> dict:
    """"k=2,r=0.5" -> {"k": 2.0, "r": 0.5}, only `allowed` keys."""
    out = {}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in allowed:
            raise TinyVilaError(f"bad setting {item!r} in sparsity {spec!r} (settings: {', '.join(allowed)})")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise TinyVilaError(f"bad setting {item!r} in sparsity {spec!r}: {value!r} is not a number")
    return out


def _fraction(name, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TinyVilaError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise TinyVilaError(f"{name} must be in [0, 1), got {value}")
    return value


def _choice(name, value, allowed) -> str:
    if value not in allowed:
        raise TinyVilaError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- stage 1: which tokens stay

def keep_count(n: int, p: float) -> int:
    """Tokens kept of n at prefill sparsity p: ceil((1 - p) * n), at least one of a non-empty group."""
    return min(n, max(1 if n else 0, math.ceil(round((1.0 - p) * n, 9))))


def kept_total(groups: torch.Tensor, p: float, budget: str = "group") -> int:
    """How many positions of an item survive (structural ones included), known before encoding."""
    structural = int((groups < 0).sum())
    if p == 0:
        return groups.numel()
    if budget == "global":
        return structural + keep_count(groups.numel() - structural, p)
    return structural + sum(keep_count(int(n), p) for n in torch.bincount(groups[groups >= 0]).tolist())


def visual_slots(model, item, sparsity: Sparsity) -> int:
    """LLM positions a media item takes under `sparsity`, known before it is encoded."""
    return sparsity.at_prefill.slots(model, item)


def select_kept(saliency: torch.Tensor, groups: torch.Tensor, p: float, budget: str = "group") -> torch.Tensor:
    """Sorted indices of the positions to keep. saliency [n] (float, +inf where structural),
    groups [n] (attention group id, -1 where structural). Top-k per group by saliency, ties to the
    lower index; `budget="global"` ranks the whole item on saliency divided by its group's mean.
    Vectorised: a 256-frame video has 256 groups."""
    saliency, groups = saliency.float().cpu(), groups.cpu()
    members = torch.nonzero(groups >= 0).flatten()
    score, group = saliency[members], groups[members]
    counts = torch.bincount(group)
    if budget == "global":
        means = torch.bincount(group, weights=score) / counts.clamp_min(1)
        score = score / means[group].clamp_min(1e-30)
        group = torch.zeros_like(group)
        counts = counts.sum().view(1)
    # Best first inside each group: a stable sort by score, then a stable sort by group.
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel()) - starts[group[order]]
    quota = torch.tensor([keep_count(int(n), p) for n in counts.tolist()], dtype=torch.long)
    keep = groups < 0  # structural positions always stay
    keep[members[order[rank < quota[group[order]]]]] = True
    return torch.nonzero(keep).flatten()


def fastv_keep(score: torch.Tensor, ranked: torch.Tensor, r: float) -> torch.Tensor:
    """FastV's choice: a bool mask over the visual tokens of a prompt, True for the top
    ceil((1 - r) n) of the n `ranked` ones by `score` (the last token's attention at layer K-1,
    ties to the lower index) and for every structural (unranked) one."""
    order = torch.sort(score.masked_fill(~ranked, float("inf")), descending=True, stable=True).indices
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[order[:int((~ranked).sum()) + keep_count(int(ranked.sum()), r)]] = True
    return keep


def visionzip_merge(features: torch.Tensor, saliency: torch.Tensor, groups: torch.Tensor, p: float,
                    contextual: float = VISIONZIP_CONTEXTUAL):
    """VisionZip's token selection (see the module docstring) on an item's LLM-input features
    [n, C]. Per attention group: k = keep_count(n, p) tokens stay, c = round(contextual * k) of them
    contextual. Dominant: the top k - c by saliency. Contextual: c targets evenly strided over the
    remaining tokens (in order), each other remaining token assigned to its most cosine-similar
    target and averaged into it (target included), as VisionZip does. Returns (kept [k_total]
    sorted indices, features [k_total, C] for them, contextual tokens merged).

    Two departures, both so that one code path serves the three projectors: the similarity is
    taken between the projected features (VisionZip: encoder layer -2 keys, head mean), and a
    contextual token sits at its target's place in the sequence (VisionZip appends them)."""
    out = features.clone()
    saliency, groups = saliency.float().cpu(), groups.cpu()
    keep = groups < 0  # structural positions always stay
    for g in torch.unique(groups[groups >= 0]).tolist():
        members = torch.nonzero(groups == g).flatten()
        k = keep_count(members.numel(), p)
        c = min(round(contextual * k), k - 1, members.numel() - k)  # at least one dominant token
        order = torch.sort(saliency[members], descending=True, stable=True).indices
        keep[members[order[:k - c]]] = True
        if c <= 0:
            continue
        rest = members[torch.sort(order[k - c:]).values]  # the non-dominant tokens, in order
        is_target = torch.zeros(rest.numel(), dtype=torch.bool)
        is_target[torch.arange(0, rest.numel(), max(1, rest.numel() // c))[:c]] = True
        targets, t = rest[is_target], is_target.to(features.device)
        f = features[rest.to(features.device)].float()
        unit = torch.nn.functional.normalize(f, dim=-1)
        nearest = (unit[~t] @ unit[t].T).argmax(-1)  # each other token's most similar target
        sums = f[t].index_add(0, nearest, f[~t])
        counts = torch.ones(c, device=f.device).index_add(0, nearest, torch.ones_like(nearest, dtype=f.dtype))
        out[targets.to(out.device)] = (sums / counts[:, None]).to(out.dtype)
        keep[targets] = True
    kept = torch.nonzero(keep).flatten()
    return kept, out[kept.to(out.device)]


@dataclass
class VisualTokens:
    """What the LLM sees of one media item (`session.visual`): `n_tokens` visual positions in the
    dense prompt (structural ones included), `kept` the sorted indices into them that stay, and
    `saliency` a float per position (+inf where structural; None when nothing was pruned)."""
    n_tokens: int
    kept: torch.Tensor
    saliency: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # attention group of every position (-1: structural)

    @property
    def n_kept(self) -> int:
        return self.kept.numel()


# --------------------------------------------------------------------------- the policies' hooks

class PrefillPolicy:
    """What the LLM sees of each media item. `saliency`: the encoder also returns each token's
    saliency. The base policy is dense: every visual token, through encoder and LLM alike."""
    saliency = False
    prunes_in_llm = False  # True: pruning happens inside the prefill pass, which needs the whole prompt

    def __init__(self, sparsity: Sparsity):
        self.sparsity = sparsity

    def slots(self, model, item) -> int:
        """LLM positions `item` takes, known before it is encoded."""
        return item.n_tokens

    def keep(self, model, item, encoded):
        """After encoding (`encoded`: the features, with `saliency` also the saliency): what the
        LLM sees of `item`, as (VisualTokens, the kept tokens' features)."""
        return VisualTokens(item.n_tokens, torch.arange(item.n_tokens)), encoded

    def pruner(self, model, media, fresh, start: int, n_rows: int, device):
        """The hook the decoder calls inside the prefill pass (FastV), or None."""
        return None


class Dense(PrefillPolicy):
    pass


class SaliencyTopK(PrefillPolicy):
    """SparseVILA's prefill stage: per attention group (or item, budget "global") the top
    ceil((1 - p) n) tokens by the encoder's saliency; structural positions always stay."""
    saliency = True

    def slots(self, model, item) -> int:
        return kept_total(model.visual_groups(item), self.sparsity.prefill, self.sparsity.budget)

    def keep(self, model, item, encoded):
        features, saliency = encoded
        groups = model.visual_groups(item)
        kept = select_kept(saliency, groups, self.sparsity.prefill, self.sparsity.budget)
        return VisualTokens(item.n_tokens, kept, saliency, groups), features[kept.to(features.device)]


class VisionZip(SaliencyTopK):
    """The same budget as SaliencyTopK, its contextual share merged (visionzip_merge)."""

    def keep(self, model, item, encoded):
        features, saliency = encoded
        groups = model.visual_groups(item)
        kept, features = visionzip_merge(features, saliency, groups, self.sparsity.prefill)
        return VisualTokens(item.n_tokens, kept, saliency, groups), features


class FastV(PrefillPolicy):
    """Every token through the encoder; the LLM prunes the items new in a turn at layer K."""
    prunes_in_llm = True

    def pruner(self, model, media, fresh, start: int, n_rows: int, device):
        """`fresh`: the spans [(start, end, media index)] of the items to prune, in prompt order;
        h's rows are cache slots start..start + n_rows."""
        self.sparsity.check_layers(model.language_model.cfg.num_hidden_layers)
        groups = {j: model.visual_groups(media[j]) for _, _, j in fresh}
        return FastVPruner(self.sparsity.fastv_layer, self.sparsity.prefill, fresh, groups, start, n_rows, device)


class FastVPruner:
    """FastV inside one prefill pass (DecoderLM.pruned): the top ceil((1 - R) n) of the fresh
    items' n visual tokens (structural ones aside) by the last row's attention at layer K - 1 go
    on, jointly across the items as FastV ranks all image tokens of a prompt."""

    def __init__(self, layer: int, ratio: float, fresh, groups: dict, start: int, n_rows: int, device):
        self.layer, self.ratio, self.fresh, self.groups = layer, ratio, fresh, groups
        self.start, self.n_rows, self.device = start, n_rows, device
        self.cpu_slots = torch.cat([torch.arange(s, e) for s, e, _ in fresh])
        self.slots = self.cpu_slots.to(device)  # the cache slots block K - 1 scores
        self.ranked = torch.cat([groups[j] >= 0 for _, _, j in fresh])  # structural tokens always stay
        self.score = self.kept = None

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """r [H_kv, n]: the mean over the KV heads is the mean over all heads. Returns the rows of
        h that go on."""
        self.score = r.float().mean(0).cpu()
        self.kept = fastv_keep(self.score, self.ranked, self.ratio)
        rows = torch.ones(self.n_rows, dtype=torch.bool)
        rows[self.cpu_slots - self.start] = self.kept
        return torch.nonzero(rows).flatten().to(self.device)

    def items(self, media):
        """After the pass: (media index, VisualTokens) for each fresh item, as encoder-side pruning
        would have recorded it, so later turns see the same prompt."""
        at = 0
        for s, e, j in self.fresh:
            n = e - s
            kept = torch.nonzero(self.kept[at:at + n]).flatten()
            score = self.score[at:at + n].masked_fill(self.groups[j] < 0, float("inf"))
            yield j, VisualTokens(media[j].n_tokens, kept, score, self.groups[j])
            at += n


class DecodePolicy:
    """What decode attends to. The base policy attends to everything the cache holds; a
    retrieving one (`retrieves`) selects visual tokens from the turn's attention scores."""
    retrieves = False

    def __init__(self, sparsity: Sparsity):
        self.sparsity = sparsity


class AttendAll(DecodePolicy):
    pass


class Retrieval(DecodePolicy):
    """Per layer (or KV head) the top ceil((1 - d) n) visual tokens by the turn's attention."""
    retrieves = True

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [L, H_kv, n_vis] -> the selected visual tokens [L, G, k], sorted indices
        (G = 1 per layer, H_kv per KV head), ties to the lower index."""
        k = keep_count(scores.shape[-1], self.sparsity.decode)
        if self.sparsity.granularity == "layer":
            scores = scores.mean(1, keepdim=True)  # GQA groups were averaged in the kernel
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        return top.sort(dim=-1).values


PREFILL_POLICIES = {"sparsevila": SaliencyTopK, "visionzip": VisionZip, "fastv": FastV}


# --------------------------------------------------------------------------- positions after pruning

def positions_1d(n_tokens: int, spans, kept: dict, mode: str, device) -> torch.Tensor:
    """1-D RoPE positions for a prompt of n_tokens slots whose visual spans [(start, end, item)]
    hold the kept tokens of their items. compact: 0..n-1, as if the dropped tokens had never been
    written. original: the dense prompt's positions (each kept token keeps its own, the text after
    an item continues from the item's dense end)."""
    if mode == "compact" or not kept:
        return torch.arange(n_tokens, device=device)
    pos = torch.empty(n_tokens, dtype=torch.long)
    shift = done = 0  # shift: dense positions minus slots after the spans seen so far
    for s, e, j in sorted(spans):
        pos[done:s] = torch.arange(done, s) + shift
        pos[s:e] = s + shift + kept[j].kept
        shift += kept[j].n_tokens - (e - s)
        done = e
    pos[done:] = torch.arange(done, n_tokens) + shift
    return pos.to(device)


def compact_grid(ids: torch.Tensor) -> torch.Tensor:
    """M-RoPE ids [3, n] of an item's kept tokens -> the smallest contiguous grid holding them:
    each axis rank-compressed (its sorted distinct values become 0, 1, 2, ...)."""
    return torch.stack([torch.unique(axis, return_inverse=True)[1] for axis in ids])
