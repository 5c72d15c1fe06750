"""A conversation: its history, its media, and its one KV cache.

Each turn renders the whole conversation with the chat template and tokenizes it, exactly as a
one-shot prompt would be, then compares it with what the cache already holds and prefills only the
new suffix. So a follow-up question neither re-runs the vision encoder nor re-prefills the image,
and still sees the very tokens a fresh one-shot recomputation of the conversation would see.
Visual positions are compared by media item, so two images never alias each other.

A Session holds the conversation's state only; the turn itself is `generate.generate`.
"""
import threading
import time
from typing import NamedTuple

import torch

from .errors import ContextError, TinyVilaError
from .generate import DecodeGraphs, GenerationResult, PrefillGraphs, generate, sync
from .kv_cache import KVCache
from .sampling import SamplingParams
from .sparsity import Sparsity, visual_slots


class Spare(NamedTuple):
    """What a closed session leaves its engine for the next session of the same context size: its
    preallocated caches and the graphs captured over them (their contents do not matter: a
    session fills what it reads)."""
    cache: KVCache
    decode_buffer: KVCache | None
    graphs: DecodeGraphs
    short_prefills: PrefillGraphs | None


class Session:
    def __init__(self, engine, media: list, system: str | None, max_seq_len: int, media_options=None,
                 sparsity: Sparsity | None = None):
        self.engine = engine
        self.lm = engine.model.language_model
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
        self.busy = False
        self.cancel_requested = threading.Event()  # set by cancel(), from any thread
        self.last_selection = None  # per layer, the visual tokens the last answer's decode attended to
        self._layout = {}  # media layout -> its positions and slots, computed once (Session.layout)
        # cache: the conversation's KV; decode_buffer: decode retrieval's compact cache (allocated on
        # first use); graphs: the GPU decode steps, captured on first use; short_prefills: short
        # prefills as CUDA graphs (opt-in: load(..., prefill_graphs=True)), None: all eager. A closed
        # session of the same context size may have left them (Engine.take_spare).
        spare = engine.take_spare(max_seq_len) or self._new_state(max_seq_len)
        self.cache, self.decode_buffer, self.graphs, self.short_prefills = spare
        self.cache.truncate(0)

    def _new_state(self, max_seq_len: int) -> Spare:
        engine, text = self.engine, self.lm.cfg
        graphed = getattr(engine, "prefill_graphs", False) and engine.capture_stream() is not None
        cache = KVCache(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, max_seq_len,
                        engine.device, engine.dtype)
        return Spare(cache, None, DecodeGraphs(), PrefillGraphs(graphed=True) if graphed else None)

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
        self._layout = {}
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

    def complete(self, ids: list, params: SamplingParams, callback=None, on_start=None,
                 prompt_s: float = 0.0, on_open=None) -> GenerationResult:
        """One turn from already templated ids (placeholder id once per media item of the
        conversation, pending ones included). `on_start()`: once the first token is chosen;
        `on_open()`: before the prefill, once the prompt is known to fit and the media are encoded;
        `prompt_s`: the time spent making `ids`, counted in the TTFT."""
        for _ in generate(self, ids, self.media + self.pending, params, callback, on_start=on_start, prompt_s=prompt_s,
                          on_open=on_open):
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
            return self.lm(h, positions, self.cache, 0, logits="all")

    @torch.no_grad()
    def inputs(self, ids: list):
        """What the LLM takes for a prompt given as ids (as in `logits`): input embeddings [T, C]
        with the media features in place, and RoPE positions [T] or [3, T]."""
        media = self.media + self.pending
        keys, spans = self.expand(ids, media)
        self.encode_new(spans, media)
        return self.embed(keys, spans, 0), self.positions(keys, spans, media)

    def cancel(self) -> None:
        """Stop the answer being generated (thread-safe): it ends at the next token with
        finish_reason "cancelled" and stays in the history; the session stays usable."""
        self.cancel_requested.set()

    def close(self) -> None:
        """Release the preallocated caches and the captured graphs: to the engine, which keeps the
        last closed session's for the next session of the same context size (Engine.drop_spare
        frees them). A session closed in the middle of an answer leaves nothing."""
        if self.cache is not None and not self.busy:
            self.engine.keep_spare(Spare(self.cache, self.decode_buffer, self.graphs, self.short_prefills))
        self.cache = self.decode_buffer = None
        self.graphs = DecodeGraphs()
        self.short_prefills = None

    def nbytes(self) -> int:
        """The device memory the session holds: its KV cache and its decode buffer (0 once closed)."""
        return sum(c.nbytes() for c in (self.cache, self.decode_buffer) if c is not None)

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
        content = [part for m in media for part in model.media_content(m)]
        return {"role": role, "content": content + [{"type": "text", "text": text}]}

    def user_message(self, question: str, media: list) -> dict:
        """The user's turn. A question that already holds the placeholders (one per media item) is
        used as is."""
        given = sum(question.count(p) for p in self.engine.model.placeholders.values())
        if given not in (0, len(media)):
            raise TinyVilaError(f"the question has {given} media placeholder(s) but {len(media)} "
                                f"media item(s) were given")
        return self.message("user", question, () if given else media)

    def source_items(self) -> list:
        """The media items of the conversation grouped per image or video given, in prompt order
        (a family may split one video into several items: Qwen3-VL's frame pairs)."""
        groups = []
        for item in self.media + self.pending:
            if getattr(item, "part", 0) and groups:
                groups[-1].append(item)
            else:
                groups.append([item])
        return groups

    def history_start(self) -> list:
        """The messages a conversation starts with: the system prompt, if any."""
        return [self.message("system", self.system)] if self.system else []

    def _turn_for_question(self, question, params, callback):
        t = time.perf_counter()
        ids, media, on_done = self.question_turn(question)
        yield from generate(self, ids, media, params, callback, on_done, prompt_s=time.perf_counter() - t)

    def question_turn(self, question: str):
        """The next turn for `question`, templated now over the history as it stands: (ids, media,
        on_done), on_done(answer text) recording the answer (generate's arguments)."""
        if not isinstance(question, str) or not question.strip():
            raise TinyVilaError("the question is empty")
        messages = list(self.messages) or self.history_start()
        messages.append(self.user_message(question, self.pending))
        ids = self.engine.encode_text(self.engine.render(messages))

        def on_done(answer_text):
            messages.append(self.message("assistant", answer_text))
            self.messages = messages

        return ids, self.media + self.pending, on_done

    def expand(self, ids: list, media: list):
        """Replace each placeholder id by its media item's visual slots.

        Returns token keys (text ids, -(1 + media index) for visual slots) and the visual spans
        [(start, end, media index)].
        """
        model = self.engine.model
        placeholders = {i: kind for kind, i in (("image", model.image_token_id), ("video", model.video_token_id))
                        if i is not None}
        if not ids:
            raise TinyVilaError("the prompt is empty (no token ids)")
        vocab = self.lm.cfg.vocab_size
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

    def check_free(self) -> None:
        """A turn may start: the session is open and not answering already."""
        if self.busy:
            raise TinyVilaError("this session is already answering (sessions are not shared between threads)")
        if self.cache is None:
            raise TinyVilaError("this session is closed")

    def end_turn(self, media: list, answer_text: str, on_done, vis_end: int) -> None:
        """The turn's media are placed, its answer recorded (on_done); under history "evict" the
        question and answer are then forgotten."""
        self.media = list(media)
        self.pending = []
        self.turns += 1
        if on_done is not None:
            on_done(answer_text)
        if self.sparsity.history == "evict":
            self._evict(vis_end)

    def _evict(self, vis_end: int) -> None:
        """history="evict": forget the turn's question and answer; the system prefix and every
        visual token stay cached, and the media go to the next question as if it were the first."""
        self.cache.truncate(vis_end)
        self.tokens = self.tokens[:vis_end]
        self.messages = []
        self.pending, self.media = self.media + self.pending, []

    def encode_new(self, spans, media) -> list:
        """Encode the media this conversation has not encoded yet (each once per conversation),
        keeping what the prefill policy keeps of each; returns their indices."""
        new = [j for _, _, j in spans if j not in self.features]
        if not new:
            return new
        eng, policy = self.engine, self.sparsity.at_prefill
        with eng.lock:
            encoded = eng.model.encode([media[j] for j in new], saliency=policy.saliency)
        for j, out in zip(new, encoded):
            self._visual[j], self.features[j] = policy.keep(eng.model, media[j], out)
        sync(eng.device)
        return new

    def keep_pruned(self, items) -> None:
        """(media index, VisualTokens) pairs pruned inside the LLM (FastV): each item's features
        shrink to the kept tokens, as if the encoder had pruned them."""
        for j, visual in items:
            self.features[j] = self.features[j][visual.kept.to(self.features[j].device)]
            self._visual[j] = visual
        self._layout = {}  # what was kept changed: positions are placed anew

    def positions(self, keys, spans, media) -> torch.Tensor:
        """RoPE positions of the prompt, the pruned items placed per the position mode: a slice of
        the layout's positions (Session.layout), so no per-turn work."""
        return self.layout(spans, media, len(keys)).positions[..., :len(keys)]

    def layout(self, spans, media, n_tokens: int) -> "Layout":
        """What depends only on the media layout (the visual spans, their items and what was kept
        of them), computed once per layout rather than once per turn: RoPE positions for the whole
        context, and the visual slots. A token's position depends only on the tokens before it
        (the cached K/V, rotated once, rely on that already), so the positions of a longer prompt
        with the same layout extend those of a shorter one, whatever the family does after media."""
        key = tuple((s, e, j, id(media[j]), id(self._visual.get(j))) for s, e, j in spans)
        layout = self._layout.get(key)
        if layout is None or layout.positions.shape[-1] < n_tokens:
            pruned = {j: self._visual[j] for _, _, j in spans if self._visual[j].saliency is not None}
            n = max(n_tokens, self.cache.max_len if self.cache is not None else 0)
            device = self.engine.device
            positions = self.engine.model.positions(n, spans, media, device, pruned, self.sparsity.position_mode)
            layout = Layout(positions, spans, device)
            self._layout = {key: layout}  # one layout at a time: a conversation's media rarely change
        return layout

    @torch.no_grad()  # as every forward here: no autograd graph, even for weights that require grad
    def embed(self, keys: list, spans: list, start: int) -> torch.Tensor:
        """Input embeddings for keys[start:]: token embeddings, media features at visual slots."""
        lm, device = self.lm, self.engine.device
        ids = torch.tensor([max(k, 0) for k in keys[start:]], device=device)
        h = lm.embed_prompt(ids)  # wider than C for DeepStack: its features fill the extra columns
        for s, e, j in spans:
            if e > start:
                h[max(s, start) - start:e - start] = self.features[j][max(s, start) - s:].to(h.dtype)
        return h


class Layout:
    """A media layout's RoPE positions over the whole context ([n] or [3, n]), its visual slots in
    order, the text slots before its last item ends (`vis_end`), all on the device."""

    def __init__(self, positions: torch.Tensor, spans: list, device):
        self.positions = positions
        self.vis_end = max((e for _, e, _ in spans), default=0)
        vis, text, done = [], [], 0
        for s, e, _ in sorted(spans):
            text.append(torch.arange(done, s))
            vis.append(torch.arange(s, e))
            done = e
        empty = torch.zeros(0, dtype=torch.long)
        self.vis_slots = torch.cat(vis or [empty]).to(device)
        self._text_before = torch.cat(text or [empty]).to(device)

    def text_slots(self, n_tokens: int) -> torch.Tensor:
        """The slots 0..n_tokens that hold no visual token, in order."""
        return torch.cat([self._text_before, torch.arange(self.vis_end, n_tokens, device=self._text_before.device)])


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind
