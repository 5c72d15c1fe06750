"""One turn of a conversation, as the free functions it runs in order:

    reused_prefix   how much of the session's cache the new prompt can keep
    prefill         the rest of the prompt through the LLM (retrieval scores, FastV's pruning hook)
    attended_cache  what decode attends to: the whole cache, or the retrieval selection compacted
                    into the decode buffer
    decode_tokens   the decode loop: greedy on a GPU graphed one step ahead of the host, else
                    decode_one_token and the sampler
    fold_answer     the answer's K/V from the decode buffer back into the full cache

`generate` runs them for one `Session`, which holds the conversation's state (history, media,
features, tokens, caches, captured graphs); each can also be called on its own. The turn also comes
in steps, for a scheduler that interleaves conversations (batch.py): `open_turn` (admit, encode)
→ `prefill_ahead` (chunks of the prompt) → `start_answer` (the rest of prefill, the first token,
a `Turn`) → decode steps → `finish_turn`.
"""
import resource
import time
from dataclasses import asdict, dataclass, field

import torch

from tinyvila.kernels.decode_attention import decode_workspace, split_count
from tinyvila.kernels.gpu import sm_count
from tinyvila.models.layers import capture_graph, pool_bytes

from .errors import ContextError
from .kv_cache import KVCache
from .sampling import Sampler, SamplingParams


@dataclass
class Prompt:
    """A turn's prompt as the cache holds it: token keys (text ids, -(1 + media index) for visual
    slots), visual spans [(start, end, media index)] and RoPE positions [T] or [3, T]."""
    keys: list
    spans: list
    positions: torch.Tensor
    layout: object  # session.Layout: the media layout's positions and slots, computed once per layout

    @property
    def vis_end(self) -> int:
        """The end of the last visual item (0 without media)."""
        return max((e for _, e, _ in self.spans), default=0)


@dataclass
class DecodeTarget:
    """The cache decode attends to: the session's full cache, or the decode buffer, which lacks
    `dropped` of the full cache's (visual) slots."""
    cache: KVCache
    dropped: int = 0


@dataclass
class Answer:
    """The answer being decoded: its tokens (the stop token excluded) and why it ended."""
    tokens: list = field(default_factory=list)
    finish: str = "stop"  # "stop" | "length" | "cancelled"


@dataclass
class Opening:
    """A turn admitted but not answering yet (open_turn): prompt expanded, fresh media encoded,
    positions set; the cache holds the prompt's slots before `done`."""
    session: object
    ids: list
    media: list
    params: SamplingParams
    on_done: object
    prompt: Prompt
    start: int  # the slots kept from the cache (reused_prefix)
    fresh: list  # the media new in this turn
    stats: "Stats"
    t0: float
    done: int = 0

    def ahead_end(self) -> int:
        """Where the part of the prompt that does not depend on the rest ends (prefill_ahead):
        the end of the media under decode retrieval (the question's rows score them in the last
        pass), the start of the fresh media while FastV prunes them (its pruning pass needs them
        and everything after), else all but the last token."""
        sparsity, keys, vis_end = self.session.sparsity, self.prompt.keys, self.prompt.vis_end
        if self.fresh and sparsity.at_prefill.prunes_in_llm:
            return max(self.start, min(s for s, _, j in self.prompt.spans if j in self.fresh))
        if sparsity.at_decode.retrieves and 0 < vis_end < len(keys):
            return max(self.start, vis_end)
        return len(keys) - 1


@dataclass
class Turn:
    """A turn answering (start_answer): what each decode step needs and what finish_turn records."""
    session: object
    params: SamplingParams
    media: list
    on_done: object
    prompt: Prompt
    target: DecodeTarget
    sampler: Sampler
    stats: "Stats"
    token: int  # prefill's answer token
    t_decode: float
    decoder: object  # the tokenizer's stream decoder
    answer: Answer = field(default_factory=Answer)

    def __post_init__(self):
        self.delta = int(self.prompt.positions.max()) + 1 - len(self.prompt.keys)  # decode position offset

    @property
    def stop_ids(self):
        return () if self.params.ignore_eos else self.session.engine.stop_ids

    def step_input(self):
        """(RoPE position, slot in target.cache) of the next token fed to decode."""
        n = len(self.session.tokens)  # the token's position in the conversation
        return n + self.delta, n - self.target.dropped


def generate(session, ids: list, media: list, params: SamplingParams, callback=None, on_done=None, on_start=None,
             prompt_s: float = 0.0, on_open=None):
    """One turn of `session` for the templated prompt `ids` (placeholder id once per item of
    `media`): yields the answer's text as it streams (each piece also to `callback`); at the end
    `session.last_result` holds the result and `on_done(text)` records the answer in the history.
    `on_start()` is called once the first token is chosen, before its text (which may need the next
    tokens). Closing the generator early ends the answer there ("cancelled"). `prompt_s`: the time
    the caller spent making `ids` (template and tokenizer), counted in the TTFT. `on_open()`: once
    the prompt is known to fit and its media are encoded, before the prefill (begin_turn)."""
    turn = begin_turn(session, ids, media, params, on_done, prompt_s, on_open)
    try:
        if on_start is not None:
            on_start()
        for token in decode_tokens(turn):
            piece = turn.decoder.push(token)
            if piece:
                if callback is not None:
                    callback(piece)
                yield piece
    except GeneratorExit:
        turn.answer.finish = "cancelled"
    except BaseException:
        release(turn)
        raise
    tail = finish_turn(turn)
    if tail:
        if callback is not None:
            callback(tail)
        yield tail


def begin_turn(session, ids: list, media: list, params: SamplingParams, on_done=None, prompt_s: float = 0.0,
               on_open=None) -> Turn:
    """open_turn, `on_open()`, then start_answer: the turn prefilled, its first answer token chosen."""
    return start_answer(opened(open_turn(session, ids, media, params, on_done, prompt_s), on_open))


def opened(opening: Opening, on_open=None) -> Opening:
    """The opening, after `on_open()` if given: the turn is admitted (what remains to fail is the
    GPU's work), so that a server can start its response during the prefill. A failing callback
    frees the session."""
    if on_open is not None:
        try:
            on_open()
        except BaseException:
            opening.session.busy = False
            raise
    return opening


def open_turn(session, ids: list, media: list, params: SamplingParams, on_done=None, prompt_s: float = 0.0) -> Opening:
    """Admit a turn: expand the prompt, check it fits, mark the session busy, encode the media new
    in this conversation and place the prompt's positions. Nothing is prefilled yet. The TTFT
    counts from `prompt_s` before now (the time the caller spent making `ids`)."""
    session.check_free()
    t0 = time.perf_counter() - prompt_s
    keys, spans = session.expand(ids, media)
    check_fits(session, keys)
    start = reused_prefix(session.tokens, keys, spans)
    session.busy = True
    session.cancel_requested.clear()  # cancel() applies to the answer in progress
    stats = Stats(visual_tokens=sum(media[j].n_tokens for _, _, j in spans),
                  visual_tokens_kept=sum(e - s for s, e, _ in spans), prompt_s=prompt_s)
    stats.visual_tokens_selected = stats.visual_tokens_kept
    session.graphs.capture_s = 0.0
    try:
        reset_peak_memory(session.engine.device)
        t = time.perf_counter()
        fresh = session.encode_new(spans, media)  # the media new in this conversation
        stats.vision_s = time.perf_counter() - t if fresh else 0.0
        prompt = Prompt(keys, spans, session.positions(keys, spans, media), session.layout(spans, media, len(keys)))
    except BaseException:
        session.busy = False
        raise
    return Opening(session, ids, media, params, on_done, prompt, start, fresh, stats, t0, start)


def prefill_ahead(opening: Opening, n: int) -> int:
    """Prefill up to `n` more tokens of the opening's prompt, within the part that does not depend
    on the rest (Opening.ahead_end; under history "evict" a chunk stops at the media's end, as
    prefill cuts there). Returns how many tokens of that part remain."""
    o, session = opening, opening.session
    end = min(o.ahead_end(), o.done + n)
    if session.sparsity.history == "evict" and o.done < o.prompt.vis_end:
        end = min(end, o.prompt.vis_end)
    if end > o.done:
        t = time.perf_counter()
        keys = o.prompt.keys
        session.cache.truncate(o.done)
        with session.engine.lock, torch.no_grad():
            h = session.embed(keys, o.prompt.spans, o.done)[:end - o.done]
            session.lm.fill(h, o.prompt.positions[..., o.done:end], session.cache, o.done)
        session.tokens, o.done = keys[:end], end
        sync(session.engine.device)
        o.stats.prefill_s += time.perf_counter() - t
    return o.ahead_end() - o.done


def start_answer(opening: Opening) -> Turn:
    """The rest of the prefill, the decode target (retrieval's selection compacted) and the first
    answer token."""
    o, session = opening, opening.session
    eng, stats = session.engine, o.stats
    try:
        tp = time.perf_counter()
        with eng.lock, torch.no_grad():
            logits, prompt, scores = prefill_turn(session, o.ids, o.media, o.prompt, o.done, o.fresh)
            target = attended_cache(session, prompt, scores, o.params.max_new_tokens)
        stats.visual_tokens_kept = sum(e - s for s, e, _ in prompt.spans)
        stats.visual_tokens_selected = (stats.visual_tokens_kept if session.last_selection is None
                                        else session.last_selection.shape[-1])
        session.tokens = list(prompt.keys)
        sampler = Sampler(o.params, eng.banned)
        token = sampler(logits)
        sync(eng.device)
    except BaseException:
        session.busy = False
        raise
    t_decode = time.perf_counter()
    stats.prefill_s += t_decode - tp
    stats.ttft_s, stats.prefill_tokens = t_decode - o.t0, len(o.prompt.keys) - o.start
    return Turn(session, o.params, o.media, o.on_done, prompt, target, sampler, stats, token, t_decode,
                eng.tokenizer.stream_decoder())


def release(turn: Turn) -> None:
    """The session is free again and the answer's K/V are in its full cache."""
    turn.session.busy = False
    if turn.session.cache is not None:  # a session closed mid-answer keeps nothing
        fold_answer(turn.session, turn.target, len(turn.prompt.keys))


def finish_turn(turn: Turn) -> str:
    """End the answer (release, stats, history, `session.last_result`); returns the stream
    decoder's last text (none when cancelled)."""
    session = turn.session
    release(turn)
    if session.cache is None:  # closed in the middle of the answer: nothing to record
        return ""
    tail = turn.decoder.flush()
    finish_stats(turn.stats, session, turn.target, turn.t_decode)
    text = session.engine.tokenizer.decode(turn.answer.tokens)
    session.end_turn(turn.media, text, turn.on_done, turn.prompt.vis_end)
    session.last_result = GenerationResult(text, turn.answer.tokens, turn.stats, turn.answer.finish)
    return "" if turn.answer.finish == "cancelled" else tail


def answer_ends(session, params: SamplingParams, answer: Answer):
    """Why the answer ends after its last token ("cancelled", "length"), or None while it goes on."""
    if session.cancel_requested.is_set():
        return "cancelled"
    if len(answer.tokens) >= params.max_new_tokens or len(session.tokens) >= session.cache.max_len:
        return "length"
    return None


def check_fits(session, keys: list) -> None:
    """The prompt and at least one answer token must fit the session's context."""
    if len(keys) + 1 > session.cache.max_len:
        raise ContextError(f"the prompt is {len(keys)} tokens but the context holds "
                           f"{session.cache.max_len} (max_seq_len); use a smaller image, fewer turns "
                           f"or a larger --max-seq-len (the model allows "
                           f"{session.lm.cfg.max_position_embeddings})")


def reused_prefix(cached: list, keys: list, spans: list) -> int:
    """How many leading cache slots the prompt `keys` can keep from a cache holding `cached`: the
    longest common prefix, at least one token left to prefill, never ending inside a visual item."""
    p, block = 0, 256
    limit = min(len(cached), len(keys) - 1)  # always prefill at least one token
    while p + block <= limit and cached[p:p + block] == keys[p:p + block]:  # list compares run in C
        p += block
    while p < limit and cached[p] == keys[p]:
        p += 1
    for s, e, _ in spans:
        if s < p < e:
            p = s
    return p


def prefill_turn(session, ids: list, media: list, prompt: Prompt, start: int, fresh: list):
    """`prefill` with the prefill policy's hook inside the LLM (FastV), applied to the media
    `fresh` in this turn: each item then keeps only what survived, as encoder-side pruning would
    have recorded it, and the prompt is expanded again. Returns (last logits, the prompt as the
    cache now holds it, retrieval scores or None)."""
    eng = session.engine
    if session.short_prefills is not None:
        session.short_prefills.turn_started()
    fresh_spans = [(s, e, j) for s, e, j in prompt.spans if j in fresh]
    pruner = session.sparsity.at_prefill.pruner(eng.model, media, fresh_spans, start, len(prompt.keys) - start,
                                                eng.device) if fresh_spans else None
    logits, scores = prefill(session, prompt, start, pruner)
    if pruner is not None:
        session.keep_pruned(pruner.items(media))
        keys, spans = session.expand(ids, media)
        prompt = Prompt(keys, spans, session.positions(keys, spans, media), session.layout(spans, media, len(keys)))
    return logits, prompt, scores


def prefill(session, prompt: Prompt, start: int, pruner=None):
    """Prefill prompt.keys[start:] into the session's cache, whose slots before `start` hold the
    prompt's prefix already. Returns (last logits [1, V], retrieval scores [L, H_kv, n_vis] or
    None). Scores come when the decode policy retrieves and a question follows the media: the
    tokens after the media score the visual tokens. Under history "evict" those tokens are
    prefilled apart, as the next turn's question will be (it restarts right after the media), so
    a turn-2 answer is computed exactly as a fresh conversation's would be. `pruner`: FastV's hook
    (DecoderLM.pruned)."""
    lm, sp, cache = session.lm, session.sparsity, session.cache
    keys, spans, positions, vis_end = prompt.keys, prompt.spans, prompt.positions, prompt.vis_end
    retrieve = sp.at_decode.retrieves and 0 < vis_end < len(keys)  # a question after the media
    cut = max(0, vis_end - start) if sp.history == "evict" else 0
    cut = cut if cut < len(keys) - start and pruner is None else 0
    cache.truncate(start)
    session.tokens = session.tokens[:start]
    short = session.short_prefills
    if short is not None and pruner is None and not cut and start >= vis_end:  # text only: a question
        out = short.run(session, prompt, start, retrieve)
        if out is not None:
            return out
    h = session.embed(keys, spans, start)
    if cut:
        lm.fill(h[:cut], positions[..., start:start + cut], cache, start)
    rest = (h[cut:], positions[..., start + cut:], cache, start + cut)
    if retrieve:
        return lm.scored(*rest, prompt.layout.vis_slots, max(0, vis_end - start - cut))
    if pruner is not None:
        return lm.pruned(*rest, pruner), None
    return lm(*rest), None


def attended_cache(session, prompt: Prompt, scores, max_new_tokens: int) -> DecodeTarget:
    """What decode attends to: the full cache (everything; under FastV, its survivors), or with
    retrieval `scores` [L, H_kv, n_vis] the decode policy's selection of visual tokens per layer
    (or KV head) and all the text, gathered in cache order into the decode buffer. Records the
    selection in `session.last_selection`."""
    session.last_selection = None
    if scores is None:
        return DecodeTarget(session.cache)
    selected = session.sparsity.at_decode.select(scores)  # [L, G, k] indices into the visual tokens
    session.last_selection = (selected[:, 0] if session.sparsity.granularity == "layer" else selected).cpu()
    n_full = len(prompt.keys)
    vis_slots, text_slots = prompt.layout.vis_slots, prompt.layout.text_slots(n_full)
    L, G = selected.shape[:2]
    index = torch.cat([text_slots.expand(L, G, -1), vis_slots[selected]], dim=-1).sort(dim=-1).values
    buffer = decode_buffer(session, index.shape[-1] + max_new_tokens + 1)
    session.cache.gather_into(index, buffer)
    return DecodeTarget(buffer, n_full - buffer.length)


def decode_buffer(session, needed: int) -> KVCache:
    """The session's decode buffer, allocated once and grown (by 1024-slot steps) only when a turn
    needs more: its address stays fixed, so its captured decode graph is reused turn after turn."""
    if session.decode_buffer is None or session.decode_buffer.max_len < needed:
        full = session.cache
        size = min(full.max_len, -(-needed // 1024) * 1024)
        session.graphs.drop(session.decode_buffer)
        session.decode_buffer = KVCache(full.k.shape[0], full.k.shape[1], full.k.shape[-1], size, full.k.device,
                                        full.k.dtype)
    return session.decode_buffer


def decode_tokens(turn: Turn):
    """Yield the answer's tokens from the turn's first (prefill's) on, each before the next is
    computed, until a stop token (not yielded), max_new_tokens, the end of the context or cancel();
    `turn.answer` collects them and says why it ended. Greedy decoding on a GPU replays the captured
    step one token ahead of the host (GraphedDecode.greedy); otherwise each token is one
    decode_one_token and one sample."""
    session, params, answer, token = turn.session, turn.params, turn.answer, turn.token
    eng, cache, dims = session.engine, turn.target.cache, turn.prompt.positions.dim()
    greedy = None  # the GPU's greedy tokens, computed one step ahead of this loop
    while token not in turn.stop_ids:
        answer.tokens.append(token)
        yield token
        ends = answer_ends(session, params, answer)
        if ends:
            answer.finish = ends
            return
        pos, slot = turn.step_input()
        if eng.device.type == "cuda" and params.temperature == 0:
            if greedy is None:
                steps = min(params.max_new_tokens - len(answer.tokens), session.cache.max_len - len(session.tokens))
                greedy = session.graphs.step(session, cache, token, pos, slot, dims).greedy(token, pos, slot, steps)
            with eng.lock:
                token = next(greedy)
            session.tokens.append(answer.tokens[-1])
            cache.length = len(session.tokens) - turn.target.dropped
        else:
            with eng.lock:
                logits = decode_one_token(session, cache, token, pos, slot, dims)
            session.tokens.append(token)
            token = turn.sampler(logits)
        turn.stats.decode_tokens += 1


@torch.no_grad()
def decode_one_token(session, cache: KVCache, token: int, pos: int, slot: int, positions_dims: int) -> torch.Tensor:
    """Logits after feeding `token` at slot `slot` of `cache` (RoPE position `pos`). On a GPU:
    the Triton decode step, captured as a CUDA graph on first use; on a CPU: the eager forward."""
    eng, lm = session.engine, session.lm
    if eng.device.type != "cuda":
        shape = (3, 1) if positions_dims == 2 else (1,)
        return lm(lm.embed(torch.tensor([token], device=eng.device)), torch.full(shape, pos, device=eng.device),
                  cache, slot)
    logits = session.graphs.step(session, cache, token, pos, slot, positions_dims)(token, pos, slot)
    cache.length = slot + 1
    return logits


def fold_answer(session, target: DecodeTarget, n_prompt: int) -> None:
    """The answer's K/V, decoded into the decode buffer, join the full cache after the prompt's
    `n_prompt` slots (nothing to do when decode ran over the full cache)."""
    full, cache = session.cache, target.cache
    if cache is full:
        return
    a, b = n_prompt - target.dropped, len(session.tokens) - target.dropped
    full.k[:, :, n_prompt:len(session.tokens)] = cache.k[:, :, a:b]
    full.v[:, :, n_prompt:len(session.tokens)] = cache.v[:, :, a:b]
    full.length = len(session.tokens)


def finish_stats(stats, session, target: DecodeTarget, t_decode: float) -> None:
    """The decode figures of `stats`, once the answer is complete."""
    device = session.engine.device
    sync(device)
    stats.decode_s = time.perf_counter() - t_decode
    stats.graph_capture_s = session.graphs.capture_s
    if session.short_prefills is not None:
        short = session.short_prefills
        stats.prefill_graphed, stats.prefill_graph_capture_s, stats.prefill_graph_bytes = (
            short.used and short.graphed, short.capture_s, short.bytes)
    steady = stats.decode_s - stats.graph_capture_s
    stats.decode_tok_s = stats.decode_tokens / steady if steady > 0 else 0.0
    stats.context_tokens = session.cache.length
    stats.decode_context_tokens = target.cache.length
    stats.peak_mem_bytes = peak_memory(device)


class DecodeGraphs:
    """A session's GPU decode steps, one per cache decode runs over (the full cache, the decode
    buffer), each captured as a CUDA graph on first use; `capture_s` sums the seconds spent
    capturing since the caller last reset it."""

    def __init__(self):
        self.steps = {}  # id(cache) -> GraphedDecode
        self.capture_s = 0.0

    def step(self, session, cache: KVCache, token: int, pos: int, slot: int, positions_dims: int):
        """The GPU decode step over `cache`, captured on first use at (token, pos, slot)."""
        if id(cache) not in self.steps:
            eng = session.engine
            t0 = time.perf_counter()
            self.steps[id(cache)] = GraphedDecode(session.lm, cache, positions_dims, eng.banned, token, pos, slot,
                                                  eng.capture_stream())
            sync(eng.device)
            self.capture_s += time.perf_counter() - t0
        return self.steps[id(cache)]

    def drop(self, cache) -> None:
        self.steps.pop(id(cache), None)


PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)  # token counts of the short prefills, each padded to the next
MAX_PREFILL_GRAPHS = 8  # per session: buckets x visual-token counts, the least recently used dropped


class PrefillGraphs:
    """A session's short prefills: runs of at most 512 text tokens after the media (a follow-up
    question over a cached image, a text-only first turn) through DecoderLM.static_prefill, padded
    to a bucket, retrieval scores included. With `graphed` (a GPU engine loaded with
    prefill_graphs=True) each (bucket, scored visual count) is captured as a CUDA graph on first
    use, all in one memory pool, and replayed after: one launch instead of dozens per layer.
    Without, the same static work runs as it is (how the CPU tests check it). The pool is shared,
    so a replay may overwrite another graph's outputs: each replay's are read at once."""

    def __init__(self, graphed: bool):
        self.graphed = graphed
        self.entries = {}  # (bucket, padded visual count or None, positions dims) -> StaticPrefill
        self.pool = None  # the graphs' memory pool, the engine's (their replays never overlap)
        self.bytes = 0  # GPU memory reserved by the captures, over the session
        self.capture_s = 0.0  # capturing in the current turn
        self.used = False  # the current turn's prefill ran here

    def turn_started(self) -> None:
        self.capture_s, self.used = 0.0, False

    def run(self, session, prompt: Prompt, start: int, scored: bool):
        """prefill()'s result for prompt.keys[start:] (text only), or None when the run is too
        long for a bucket or its padding would pass the end of the cache: it then goes eagerly."""
        n = len(prompt.keys) - start
        bucket = next((b for b in PREFILL_BUCKETS if n <= b), None)
        cache = session.cache
        if bucket is None or start + bucket > cache.max_len or prompt.layout is None:
            return None
        vis = prompt.layout.vis_slots if scored else None
        n_vis = None if vis is None else -(-vis.numel() // 256) * 256  # padded: few distinct graphs
        key = (bucket, n_vis, prompt.positions.dim())
        entry = self.entries.pop(key, None)
        if entry is None:
            if len(self.entries) >= MAX_PREFILL_GRAPHS:
                self.entries.pop(next(iter(self.entries)))
            entry = StaticPrefill(session.lm, cache, bucket, prompt.positions.dim(), n_vis)
        self.entries[key] = entry  # most recently used last
        entry.set(prompt.keys[start:], prompt.layout.positions[..., start:start + bucket], start, vis)
        if self.graphed and entry.graph is None:
            self._capture(session, entry)
        logits, scores = entry()
        cache.length = start + n
        self.used = True
        return logits, (None if scores is None else scores[..., :vis.numel()])

    def _capture(self, session, entry) -> None:
        device = session.engine.device
        t0 = time.perf_counter()
        if self.pool is None:  # the engine's, shared by its sessions (a bench's stand-in engine has none)
            shared = getattr(session.engine, "prefill_graph_pool", None)
            self.pool = shared() if shared is not None else torch.cuda.graph_pool_handle()
        held = pool_bytes(self.pool)
        entry.graph, entry.out = capture_graph(entry.run, device, session.engine.capture_stream(), pool=self.pool)
        sync(device)
        self.bytes += pool_bytes(self.pool) - held  # what this session's captures added to the shared pool
        self.capture_s += time.perf_counter() - t0


class StaticPrefill:
    """The fixed buffers of one short-prefill shape (StaticPrefill.run reads them) and, once
    captured, its CUDA graph, whose replays rewrite `out`."""

    def __init__(self, lm, cache: KVCache, bucket: int, positions_dims: int, n_vis: int | None):
        device = cache.k.device
        self.lm, self.cache = lm, cache
        self.ids = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.zeros((3, bucket) if positions_dims == 2 else (bucket,), dtype=torch.long,
                                     device=device)
        self.start = torch.zeros(1, dtype=torch.int32, device=device)
        self.count = torch.ones(1, dtype=torch.int32, device=device)
        self.vis = None if n_vis is None else torch.zeros(n_vis, dtype=torch.long, device=device)
        self.graph = self.out = None

    def set(self, ids: list, positions: torch.Tensor, start: int, vis: torch.Tensor | None) -> None:
        """The run's inputs: its token ids (padded with 0 here), RoPE positions over the whole bucket
        (the layout's, past the prompt too), first slot, the visual slots to score."""
        bucket = self.ids.numel()
        self.ids.copy_(torch.tensor(ids + [0] * (bucket - len(ids))), non_blocking=True)
        self.positions.copy_(positions)
        self.start.fill_(start)
        self.count.fill_(len(ids))
        if vis is not None:
            self.vis[:vis.numel()] = vis

    def run(self):
        return self.lm.static_prefill(self.ids, self.positions, self.cache, self.start, self.count, self.vis)

    def __call__(self):
        """(logits [1, V], r [L, H_kv, padded n_vis] or None)."""
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.out


@dataclass
class Stats:
    """What one answer cost. Times in seconds; `prefill_tokens` counts only this turn's new tokens."""
    prefill_tokens: int = 0
    visual_tokens: int = 0  # visual positions in the prompt, image_newline included
    visual_tokens_kept: int = 0  # after prefill sparsity (equal to visual_tokens when dense)
    visual_tokens_selected: int = 0  # of those, what decode attended to per layer (retrieval)
    vision_s: float = 0.0  # vision encoder + projector for media new in this turn
    prefill_s: float = 0.0  # LLM prefill of this turn's new tokens
    prompt_s: float = 0.0  # rendering the chat template and tokenizing (host work, part of ttft_s)
    ttft_s: float = 0.0  # from the call (its templating included) to the first generated token
    decode_tokens: int = 0  # decode steps after the first token
    decode_s: float = 0.0  # all of decode, the one-time graph capture included
    decode_tok_s: float = 0.0  # steady rate: decode_tokens / (decode_s - graph_capture_s)
    graph_capture_s: float = 0.0  # capturing the GPU decode step (once per conversation and buffer)
    prefill_graphed: bool = False  # this turn's prefill replayed a captured short-prefill graph
    prefill_graph_capture_s: float = 0.0  # capturing short-prefill graphs in this turn (once per bucket)
    prefill_graph_bytes: int = 0  # GPU memory the session's short-prefill graphs hold (their shared pool)
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
        if capture_stream is not None:  # the warm-up's writes land in the slot about to be written
            self._set(token, pos, slot)

            def warm_up():
                self._step()
                self._set(token, pos, slot)

            # capture_stream: one per engine, as libraries keep per-stream workspaces for good
            self.graph, self.logits = capture_graph(self._step, device, capture_stream, warm_up, runs=2)

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
