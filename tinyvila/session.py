"""A conversation: its history, its media, and its one KV cache.

Each turn renders the whole conversation with the chat template and tokenizes it, exactly as a
one-shot prompt would be, then compares it with what the cache already holds and prefills only the
new suffix. So a follow-up question neither re-runs the vision encoder nor re-prefills the image,
and still sees the very tokens a fresh one-shot recomputation of the conversation would see.
Visual positions are compared by media item, so two images never alias each other.
"""
import threading
import time

import torch

from .errors import ContextError, TinyVilaError
from .generate import (GenerationResult, GraphedDecode, Sampler, SamplingParams, Stats, peak_memory,
                       reset_peak_memory, sync)
from .kv_cache import KVCache
from .sparsity import Sparsity, VisualTokens, fastv_keep, keep_count, select_kept, visionzip_merge, visual_slots


class Session:
    def __init__(self, engine, media: list, system: str | None, max_seq_len: int, media_options=None,
                 sparsity: Sparsity | None = None):
        self.engine = engine
        self.sparsity = sparsity or Sparsity()
        self.system = system
        self.media_options = dict(media_options or {})
        self.messages = []  # transformers-style chat messages, answers included
        self.media = []  # media items already placed in a user message, in prompt order
        self.pending = list(media)  # media for the next user message
        self.features = {}  # media index -> encoded features (the kept ones), computed once per conversation
        self._visual = {}  # media index -> VisualTokens: what prefill pruning kept of it
        self.tokens = []  # token keys held by the cache: text ids, or -(1 + media index) for visual slots
        self.turns = 0
        self.last_result = None
        self._busy = False
        self._cancel = threading.Event()  # set by cancel(), from any thread
        self._decoders = {}  # id(cache) -> its GPU decode step, captured on first use
        self._compact_cache = None  # decode retrieval's buffer (allocated on first use)
        self._capture_s = 0.0  # this turn's seconds spent capturing decode graphs
        self.last_selection = None  # per layer, the visual tokens the last answer's decode attended to
        text = engine.model.language_model.cfg
        self.cache = KVCache(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, max_seq_len,
                             engine.device, engine.dtype)

    @property
    def visual(self) -> list:
        """Per media item encoded so far, in prompt order: a `VisualTokens` (n_tokens, kept,
        saliency) saying which of its visual positions the LLM sees."""
        return [self._visual[j] for j in sorted(self._visual)]

    # ------------------------------------------------------------------ conversation
    def add_image(self, image) -> None:
        """Attach an image (path, PIL image or HxWx3 uint8 array) to the next question."""
        self.pending += self.engine.load_media(images=[image], **self.media_options)

    def add_video(self, video) -> None:
        """Attach a video (file path or list of frames) to the next question."""
        self.pending += self.engine.load_media(videos=[video], **self.media_options)

    def clear(self) -> None:
        """Forget the conversation (history, media and cache); the system prompt stays."""
        self.messages, self.media, self.pending, self.features, self.tokens = [], [], [], {}, []
        self._visual = {}
        self.cache.truncate(0)
        self.turns = 0

    def ask(self, question: str, callback=None, **sampling) -> GenerationResult:
        """Answer `question` (with any pending media); returns the full result."""
        for _ in self._turn_for_question(question, SamplingParams.from_options(**sampling), callback):
            pass
        return self.last_result

    def stream(self, question: str, **sampling):
        """Yield the answer's text as it is generated; `last_result` holds the result afterwards.
        Stopping the iteration early ends the answer there (it stays in the history)."""
        yield from self._turn_for_question(question, SamplingParams.from_options(**sampling), None)

    def complete(self, ids: list, params: SamplingParams, callback=None) -> GenerationResult:
        """One turn from already templated ids (placeholder id once per media item of the
        conversation, pending ones included)."""
        for _ in self._turn(ids, self.media + self.pending, params, callback, on_done=None):
            pass
        return self.last_result

    @torch.no_grad()
    def logits(self, ids: list) -> torch.Tensor:
        """fp32 logits [T, vocab] for every position of a prompt given as ids (placeholder id once
        per media item of the conversation, pending ones included). Scores only: no answer is
        generated and the history is kept, but the cache is refilled by the next turn."""
        h, positions = self.inputs(ids)
        if h.shape[0] > self.cache.max_len:
            raise ContextError(f"the prompt is {h.shape[0]} tokens but the context holds {self.cache.max_len}")
        self.cache.truncate(0)
        self.tokens = []
        with self.engine.lock:
            return self.engine.model.language_model(h, positions, self.cache, 0, logits="all")

    @torch.no_grad()
    def inputs(self, ids: list):
        """What the LLM takes for a prompt given as ids (as in `logits`): input embeddings [T, C]
        with the media features in place, and RoPE positions [T] or [3, T]."""
        media = self.media + self.pending
        keys, spans = self._expand(ids, media)
        self._encode_new(spans, media)
        return self._embed(keys, spans, 0), self._positions(keys, spans, media)

    def cancel(self) -> None:
        """Stop the answer being generated (thread-safe): it ends at the next token with
        finish_reason "cancelled" and stays in the history; the session stays usable."""
        self._cancel.set()

    def close(self) -> None:
        self.cache = self._compact_cache = None  # release the preallocated caches and the captured graphs
        self._decoders = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ internals
    def message(self, role: str, text: str, media=()) -> dict:
        """A chat message as the family's template takes it: transformers-style content items (one
        per media item, then the text), or, for families whose templates take plain text
        (`string_content`), the media markers followed by the text."""
        model = self.engine.model
        if getattr(model, "string_content", False):
            return {"role": role, "content": "".join(model.media_text(m) for m in media) + text}
        return {"role": role, "content": [{"type": m.kind} for m in media] + [{"type": "text", "text": text}]}

    def user_message(self, question: str, media: list) -> dict:
        """The user's turn. A question that already holds the placeholders (one per media item) is
        used as is."""
        given = sum(question.count(p) for p in self.engine.model.placeholders.values())
        if given not in (0, len(media)):
            raise TinyVilaError(f"the question has {given} media placeholder(s) but {len(media)} "
                                f"media item(s) were given")
        return self.message("user", question, () if given else media)

    def history_start(self) -> list:
        """The messages a conversation starts with: the system prompt, if any."""
        return [self.message("system", self.system)] if self.system else []

    def _turn_for_question(self, question, params, callback):
        if not isinstance(question, str) or not question.strip():
            raise TinyVilaError("the question is empty")
        messages = list(self.messages) or self.history_start()
        messages.append(self.user_message(question, self.pending))
        ids = self.engine.encode_text(self.engine.render(messages))

        def on_done(answer_text):
            messages.append(self.message("assistant", answer_text))
            self.messages = messages

        yield from self._turn(ids, self.media + self.pending, params, callback, on_done)

    def _expand(self, ids: list, media: list):
        """Replace each placeholder id by its media item's visual slots.

        Returns token keys (text ids, -(1 + media index) for visual slots) and the visual spans
        [(start, end, media index)].
        """
        model = self.engine.model
        placeholders = {i: kind for kind, i in (("image", model.image_token_id), ("video", model.video_token_id))
                        if i is not None}
        if not ids:
            raise TinyVilaError("the prompt is empty (no token ids)")
        vocab = model.language_model.cfg.vocab_size
        keys, spans = [], []
        for t in ids:
            if t not in placeholders:
                if not 0 <= t < vocab:
                    raise TinyVilaError(f"token id {t} is outside the vocabulary (0..{vocab - 1})")
                keys.append(t)
                continue
            j = len(spans)
            if j >= len(media):
                raise TinyVilaError(f"the prompt has more media placeholders than the {len(media)} "
                                    f"media item(s) given")
            if media[j].kind != placeholders[t]:
                raise TinyVilaError(f"media item {j + 1} is {_a(media[j].kind)} but the prompt has "
                                    f"{_a(placeholders[t])} placeholder there")
            n = self._visual[j].n_kept if j in self._visual else visual_slots(model, media[j], self.sparsity)
            spans.append((len(keys), len(keys) + n, j))
            keys += [-(1 + j)] * n
        if len(spans) != len(media):
            raise TinyVilaError(f"the prompt has {len(spans)} media placeholder(s) but {len(media)} "
                                f"media item(s) were given")
        return keys, spans

    def _turn(self, ids, media, params, callback, on_done):
        if self._busy:
            raise TinyVilaError("this session is already answering (sessions are not shared between threads)")
        if self.cache is None:
            raise TinyVilaError("this session is closed")
        eng, model = self.engine, self.engine.model
        lm = model.language_model
        t0 = time.perf_counter()
        keys, spans = self._expand(ids, media)
        if len(keys) + 1 > self.cache.max_len:
            raise ContextError(f"the prompt is {len(keys)} tokens but the context holds "
                               f"{self.cache.max_len} (max_seq_len); use a smaller image, fewer turns "
                               f"or a larger --max-seq-len (the model allows "
                               f"{lm.cfg.max_position_embeddings})")
        # Reuse the longest cached prefix; never start inside a visual item.
        p = 0
        limit = min(len(self.tokens), len(keys) - 1)  # always prefill at least one token
        while p < limit and self.tokens[p] == keys[p]:
            p += 1
        for s, e, _ in spans:
            if s < p < e:
                p = s

        vis_end = max((e for _, e, _ in spans), default=0)  # the end of the last visual item
        retrieve = self.sparsity.decode > 0 and 0 < vis_end < len(keys)  # a question after the media
        # FastV prunes the media new in this turn inside the LLM, ranked by this very prompt.
        fastv = [(s, e, j) for s, e, j in spans if j not in self._visual] if (
            self.sparsity.method == "fastv" and self.sparsity.prefill > 0) else []
        # The tokens after the media score the visual tokens (retrieval). Under "evict" they are
        # prefilled apart, as the next turn's question will be (it restarts right after the
        # media), so a turn-2 answer is computed exactly as a fresh conversation's would be.
        cut = max(0, vis_end - p) if self.sparsity.history == "evict" else 0
        cut = cut if cut < len(keys) - p and not fastv else 0
        score_from = max(0, vis_end - p - cut)  # the scored rows of what is prefilled after the cut

        self._busy = True
        self._cancel.clear()  # cancel() applies to the answer in progress
        stats = Stats(visual_tokens=sum(media[j].n_tokens for _, _, j in spans),
                      visual_tokens_kept=sum(e - s for s, e, _ in spans))
        stats.visual_tokens_selected = stats.visual_tokens_kept
        out, finish = [], "stop"
        decoder = eng.tokenizer.stream_decoder()
        cache, dropped = self.cache, 0  # the cache decode attends to; full-cache slots it lacks
        self._capture_s = 0.0
        try:
            reset_peak_memory(eng.device)
            stats.vision_s = self._encode_new(spans, media)
            positions = self._positions(keys, spans, media)

            tp = time.perf_counter()
            self.cache.truncate(p)
            self.tokens = self.tokens[:p]
            h = self._embed(keys, spans, p)
            with eng.lock, torch.no_grad():
                if cut:
                    lm(h[:cut], positions[..., p:p + cut], self.cache, p, logits="none")
                if retrieve:
                    vis_slots = torch.cat([torch.arange(s, e, device=eng.device) for s, e, _ in spans])
                    logits, scores = lm(h[cut:], positions[..., p + cut:], self.cache, p + cut, vis_slots=vis_slots,
                                        score_from=score_from)
                    cache = self._compact(scores, vis_slots, len(keys), params.max_new_tokens)
                    dropped = len(keys) - cache.length
                    stats.visual_tokens_selected = self.last_selection.shape[-1]
                elif fastv:
                    logits, keys, spans, positions = self._fastv(ids, keys, media, h, positions, p, fastv)
                    vis_end = max(e for _, e, _ in spans)
                    stats.visual_tokens_kept = stats.visual_tokens_selected = sum(e - s for s, e, _ in spans)
                    self.last_selection = None
                else:
                    logits = lm(h[cut:], positions[..., p + cut:], self.cache, p + cut)
                    self.last_selection = None
            delta = int(positions.max()) + 1 - len(keys)  # decode position offset (M-RoPE shrinks it)
            self.tokens = list(keys)
            self._record_segments(keys, spans, p)
            sampler = Sampler(params, eng.banned, eng.device)
            token = sampler(logits)
            sync(eng.device)
            now = time.perf_counter()
            stats.prefill_s, stats.ttft_s, stats.prefill_tokens = now - tp, now - t0, h.shape[0]
            t_decode = now
            stop_ids = () if params.ignore_eos else eng.stop_ids
            greedy = None  # the GPU's greedy tokens, computed one step ahead of this loop
            while token not in stop_ids:
                out.append(token)
                piece = decoder.push(token)
                if piece:
                    if callback is not None:
                        callback(piece)
                    yield piece
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
                n = len(self.tokens)  # the token's position in the conversation; its slot is n - dropped
                if len(out) >= params.max_new_tokens or n >= self.cache.max_len:
                    finish = "length"
                    break
                if eng.device.type == "cuda" and params.temperature == 0:
                    if greedy is None:
                        steps = min(params.max_new_tokens - len(out), self.cache.max_len - n)
                        greedy = self._decoder_for(cache, token, n + delta, n - dropped, positions.dim()).greedy(
                            token, n + delta, n - dropped, steps)
                    with eng.lock:
                        token = next(greedy)
                    self.tokens.append(out[-1])
                    cache.length = len(self.tokens) - dropped
                else:
                    with eng.lock:
                        logits = self._decode_step(cache, token, n + delta, n - dropped, positions.dim())
                    self.tokens.append(token)
                    token = sampler(logits)
                stats.decode_tokens += 1
        except GeneratorExit:
            finish = "cancelled"
        finally:
            self._busy = False
            if cache is not self.cache:  # the answer's K/V join the full cache too
                a, b = len(keys) - dropped, len(self.tokens) - dropped
                self.cache.k[:, :, len(keys):len(self.tokens)] = cache.k[:, :, a:b]
                self.cache.v[:, :, len(keys):len(self.tokens)] = cache.v[:, :, a:b]
                self.cache.length = len(self.tokens)
        tail = decoder.flush()
        if tail and finish != "cancelled":
            if callback is not None:
                callback(tail)
            yield tail
        sync(eng.device)
        stats.decode_s = time.perf_counter() - t_decode
        stats.graph_capture_s = self._capture_s
        steady = stats.decode_s - stats.graph_capture_s
        stats.decode_tok_s = stats.decode_tokens / steady if steady > 0 else 0.0
        stats.context_tokens = self.cache.length
        stats.decode_context_tokens = cache.length
        if self.cache.segments and self.cache.segments[-1].kind != "visual":
            self.cache.segments[-1].end = self.cache.length  # the answer belongs to the turn's text
        stats.peak_mem_bytes = peak_memory(eng.device)
        text = eng.tokenizer.decode(out)
        self.media = list(media)
        self.pending = []
        self.turns += 1
        if on_done is not None:
            on_done(text)
        if self.sparsity.history == "evict":
            self._evict(vis_end)
        self.last_result = GenerationResult(text, out, stats, finish)

    def _fastv(self, ids, keys, media, h, positions, p, fresh):
        """Prefill h (keys[p:]) with FastV pruning the visual tokens of the `fresh` items at layer K
        by the last row's attention: the top ceil((1 - R) n) of their n (structural ones aside)
        stay, jointly across the items as FastV ranks all image tokens of a prompt. Records what
        each item kept, as encoder-side pruning would have, so later turns see the same prompt;
        returns (logits, keys, spans, positions) of the pruned prompt."""
        lm, sp = self.engine.model.language_model, self.sparsity
        sp.check_layers(lm.cfg.num_hidden_layers)
        device = h.device
        groups = {j: self.engine.model.visual_groups(media[j]) for _, _, j in fresh}
        slots = torch.cat([torch.arange(s, e) for s, e, _ in fresh])
        ranked = torch.cat([groups[j] >= 0 for _, _, j in fresh])  # structural tokens always stay
        chosen = {}

        def choose(r):  # r [H_kv, n]: mean over the KV heads is the mean over all heads
            score = r.float().mean(0).cpu()
            keep = fastv_keep(score, ranked, sp.prefill)
            rows = torch.ones(len(keys) - p, dtype=torch.bool)
            rows[slots - p] = keep
            chosen.update(score=score, keep=keep)
            return torch.nonzero(rows).flatten().to(device)

        logits = lm(h, positions[..., p:], self.cache, p, prune_at=(sp.fastv_layer, slots.to(device), choose))
        at = 0
        for s, e, j in fresh:
            n = e - s
            kept = torch.nonzero(chosen["keep"][at:at + n]).flatten()
            score = chosen["score"][at:at + n].masked_fill(groups[j] < 0, float("inf"))
            self.features[j] = self.features[j][kept.to(self.features[j].device)]
            self._visual[j] = VisualTokens(media[j].n_tokens, kept, score, groups[j])
            at += n
        keys, spans = self._expand(ids, media)
        return logits, keys, spans, self._positions(keys, spans, media)

    def _evict(self, vis_end: int) -> None:
        """history="evict": forget the turn's question and answer; the system prefix and every
        visual token stay cached, and the media go to the next question as if it were the first."""
        self.cache.truncate(vis_end)
        self.tokens = self.tokens[:vis_end]
        self.messages = []
        self.pending, self.media = self.media + self.pending, []

    def _compact(self, scores, vis_slots, n_full: int, max_new_tokens: int):
        """Retrieval (spec stage 2): per layer (or KV head) keep the top ceil((1 - d) n) visual
        tokens by the turn's attention `scores` [L, H_kv, n_vis], and gather [text before | the
        selected visual tokens | text after], in cache order, into the contiguous decode buffer."""
        n_vis = vis_slots.numel()
        k = keep_count(n_vis, self.sparsity.decode)
        if self.sparsity.granularity == "layer":
            scores = scores.mean(1, keepdim=True)  # GQA groups were averaged in the kernel
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        selected = top.sort(dim=-1).values  # [L, G, k] indices into the visual tokens
        self.last_selection = (selected[:, 0] if self.sparsity.granularity == "layer" else selected).cpu()
        text = torch.ones(n_full, dtype=torch.bool, device=vis_slots.device)
        text[vis_slots] = False
        text_slots = torch.nonzero(text).flatten()
        L, G = selected.shape[:2]
        index = torch.cat([text_slots.expand(L, G, -1), vis_slots[selected]], dim=-1).sort(dim=-1).values
        buffer = self._compact_buffer(index.shape[-1] + max_new_tokens + 1)
        self.cache.gather_into(index, buffer)
        return buffer

    def _compact_buffer(self, needed: int) -> KVCache:
        """The decode buffer, allocated once and grown (by 1024-slot steps) only when a turn needs
        more: its address stays fixed, so its captured decode graph is reused turn after turn."""
        if self._compact_cache is None or self._compact_cache.max_len < needed:
            full = self.cache
            size = min(full.max_len, -(-needed // 1024) * 1024)
            self._decoders.pop(id(self._compact_cache), None)
            self._compact_cache = KVCache(full.k.shape[0], full.k.shape[1], full.k.shape[-1], size,
                                          full.k.device, full.k.dtype)
        return self._compact_cache

    def _encode_new(self, spans, media) -> float:
        """Encode the media this conversation has not encoded yet (each once per conversation),
        pruned to the tokens prefill sparsity keeps; returns the seconds it took."""
        new = [j for _, _, j in spans if j not in self.features]
        if not new:
            return 0.0
        eng, p, prunes = self.engine, self.sparsity.prefill, self.sparsity.encoder_prunes
        t0 = time.perf_counter()
        with eng.lock:
            encoded = eng.model.encode([media[j] for j in new], saliency=prunes)
        for j, out in zip(new, encoded):
            item = media[j]
            if not prunes:  # dense (or FastV, which prunes in the LLM): every position stays
                self.features[j] = out
                self._visual[j] = VisualTokens(item.n_tokens, torch.arange(item.n_tokens))
                continue
            features, saliency = out
            groups = eng.model.visual_groups(item)
            if self.sparsity.method == "visionzip":
                kept, self.features[j] = visionzip_merge(features, saliency, groups, p)
            else:
                kept = select_kept(saliency, groups, p, self.sparsity.budget)
                self.features[j] = features[kept.to(features.device)]
            self._visual[j] = VisualTokens(item.n_tokens, kept, saliency, groups)
        sync(eng.device)
        return time.perf_counter() - t0

    def _positions(self, keys, spans, media) -> torch.Tensor:
        """RoPE positions of the prompt, the pruned items placed per the position mode."""
        pruned = {j: self._visual[j] for _, _, j in spans if self._visual[j].saliency is not None}
        return self.engine.model.positions(len(keys), spans, media, self.engine.device, pruned,
                                           self.sparsity.position_mode)

    @torch.no_grad()
    def _decode_step(self, cache, token: int, pos: int, slot: int, positions_dims: int) -> torch.Tensor:
        """Logits after feeding `token` at slot `slot` of `cache` (RoPE position `pos`). On a GPU:
        the Triton decode step, captured as a CUDA graph on first use; on a CPU: the eager forward."""
        eng = self.engine
        lm = eng.model.language_model
        if eng.device.type != "cuda":
            shape = (3, 1) if positions_dims == 2 else (1,)
            return lm(lm.embed(torch.tensor([token], device=eng.device)), torch.full(shape, pos, device=eng.device),
                      cache, slot)
        logits = self._decoder_for(cache, token, pos, slot, positions_dims)(token, pos, slot)
        cache.length = slot + 1
        return logits

    def _decoder_for(self, cache, token: int, pos: int, slot: int, positions_dims: int) -> GraphedDecode:
        """The GPU decode step over `cache` (the full cache or the compact decode buffer),
        captured as a CUDA graph on first use."""
        if id(cache) not in self._decoders:
            eng = self.engine
            t0 = time.perf_counter()
            self._decoders[id(cache)] = GraphedDecode(eng.model.language_model, cache, positions_dims, eng.banned,
                                                      token, pos, slot, eng.capture_stream())
            sync(eng.device)
            self._capture_s += time.perf_counter() - t0
        return self._decoders[id(cache)]

    @torch.no_grad()  # as every forward here: no autograd graph, even for weights that require grad
    def _embed(self, keys: list, spans: list, start: int) -> torch.Tensor:
        """Input embeddings for keys[start:]: token embeddings, media features at visual slots."""
        lm, device = self.engine.model.language_model, self.engine.device
        ids = torch.tensor([max(k, 0) for k in keys[start:]], device=device)
        h = lm.embed(ids)
        for s, e, j in spans:
            if e > start:
                h[max(s, start) - start:e - start] = self.features[j][max(s, start) - s:].to(h.dtype)
        return h

    def _record_segments(self, keys, spans, start):
        """Label the newly prefilled slots: text before any media ("prefix"), visual items, turn text."""
        cursor = start
        for s, e, j in spans:
            if e > start:
                self._add_text_segment(cursor, max(cursor, s))
                self.cache.add_segment("visual", max(s, start), e, j)
                cursor = e
        self._add_text_segment(cursor, len(keys))

    def _add_text_segment(self, start, end):
        seen_visual = any(seg.kind == "visual" for seg in self.cache.segments)
        self.cache.add_segment("text" if seen_visual else "prefix", start, end, self.turns)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind
