"""Many conversations at once: continuous batching, each conversation with its own sparsity.

A `Batcher` runs the turns of several sessions of one engine together. Each `step`:

    1. cancelled requests leave (waiting, opening or running);
    2. if there is room (max_batch), the first waiting request whose conversation is not already
       answering is admitted: its question is templated now (so a follow-up queued behind its own
       conversation's answer sees that answer), its media encoded (generate.open_turn);
    3. otherwise the opening request gets one chunk of its prefill (generate.prefill_ahead), so
       the others' streams stall for one chunk (or one admission) at most; once its independent
       part is in the cache, the rest of its prefill runs and it answers its first token
       (generate.start_answer) and joins; with nobody running, admission and prefill run at once;
    4. one decode step for every running conversation: the linears at M = batch, attention over
       each row's own cache (its full cache, or the decode buffer holding its own retrieval
       selection), sampling per row with its own options and seed. On a GPU the step is
       DecoderLM.decode_batch (one attention launch for all rows), a CUDA graph per batch-size
       bucket (`BatchDecode`); on a CPU DecoderLM.decode_rows. A conversation that ends (stop
       token, length, cancel) leaves at once.

Each conversation's tokens are those it gets alone (batch 1). An error fails only its own request.
"""
import queue
import threading
import time
from collections import deque

import torch

from tinyvila.kernels.decode_attention import decode_workspace, rows_split_count
from tinyvila.kernels.gpu import sm_count
from tinyvila.models.layers import capture_graph

from .errors import TinyVilaError
from .generate import (GenerationResult, answer_ends, finish_turn, open_turn, opened, prefill_ahead, release,
                       start_answer)
from .kv_cache import KVCache
from .sampling import SamplingParams, is_number, sample_rows

_END = object()  # the end of a request's stream


class Request:
    """One turn submitted to a Batcher: `stream()` its text pieces as they come, `wait()` for its
    GenerationResult, `cancel()` it. `callback(piece)`, if given, gets each piece too, and
    `on_start()` is called once its first token is chosen, `on_open()` once it is admitted (its
    prompt fits, its media are encoded), before its prefill (all from the batcher's thread)."""

    def __init__(self, session, make, params: SamplingParams, callback=None, on_start=None, prompt_s=0.0,
                 on_open=None):
        self.session, self.params, self.callback, self.on_start = session, params, callback, on_start
        self.on_open = on_open
        self._make = make  # () -> (ids, media, on_done), called at admission
        self.prompt_s = prompt_s  # the time the caller spent making the ids (counted in the TTFT)
        self._pieces = queue.Queue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self.result = None  # GenerationResult once done
        self.error = None  # the exception that failed it

    def cancel(self) -> None:
        """Thread-safe: a waiting request never starts, an opening one stops prefilling, a running
        one ends at its next step ("cancelled", its answer kept in the history as Session.cancel)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stream(self):
        """Yield the answer's text pieces until it ends; raise the request's error, if any."""
        while True:
            piece = self._pieces.get()
            if piece is _END:
                break
            yield piece
        if self.error is not None:
            raise self.error

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """The result, once the answer has ended (raises the request's error, if any)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self.error is not None:
            raise self.error
        return self.result

    def _emit(self, piece: str) -> None:
        if piece:
            if self.callback is not None:
                self.callback(piece)
            self._pieces.put(piece)

    def _finish(self, result=None, error=None) -> None:
        self.result, self.error = result, error
        self.session = self._make = None  # nothing of a finished conversation stays referenced here
        self._pieces.put(_END)
        self._done.set()


class BatchDecode:
    """The GPU decode step of B conversations (DecoderLM.decode_batch), as one CUDA graph per
    bucket of B (1, 2, 4, 8, ...) captured on first use, all in one memory pool. Rows past the
    real ones are padding over a one-slot scratch cache. Each step's inputs (token, slot, RoPE
    position and the cache's addresses, per row) go to the device in one copy."""

    def __init__(self, engine):
        lm = engine.model.language_model
        cfg = lm.cfg
        self.lm, self.device, self.stream = lm, engine.device, engine.capture_stream()
        self.mrope = cfg.mrope_section is not None  # a text token's t, h and w positions are equal
        self.scratch = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 1, engine.device,
                               engine.dtype)
        self.pool = torch.cuda.graph_pool_handle() if self.stream is not None else None
        self.buckets = {}  # bucket size -> its buffers, workspace and graph
        self.capture_s = 0.0

    def __call__(self, tokens: list, positions: list, caches: list, slots: list) -> torch.Tensor:
        """fp32 logits [B, V] of the rows (ints and KVCaches, one each per row), valid until the
        next call."""
        n = len(tokens)
        b = self._ready(tokens, positions, caches, slots)
        if b["graph"] is not None:
            b["graph"].replay()
            logits = b["logits"]
        else:
            logits = b["run"]()
        for cache, slot in zip(caches, slots):
            cache.length = slot + 1
        return logits[:n]

    def prepare(self, max_rows: int) -> None:
        """Capture every bucket up to `max_rows` rows now (over the scratch cache alone: the graphs
        read the rows' caches from the table), so that no step later stalls on a capture when the
        batch grows."""
        for rows in (1 << i for i in range((max_rows - 1).bit_length() + 1)):
            self._ready([0] * rows, [0] * rows, [self.scratch] * rows, [0] * rows)

    def _ready(self, tokens, positions, caches, slots) -> dict:
        """The rows' bucket with their inputs on the device, its graph captured on first use."""
        bucket = 1 << (len(tokens) - 1).bit_length()
        b = self.buckets.get(bucket) or self._bucket(bucket)
        pad = bucket - len(tokens)
        addresses = list(zip(*(c.address() for c in caches + [self.scratch] * pad)))
        b["host"].copy_(torch.tensor([tokens + [0] * pad, slots + [0] * pad, *addresses, positions + [0] * pad]))
        b["inputs"].copy_(b["host"], non_blocking=True)
        if b["graph"] is None and self.stream is not None:
            t0 = time.perf_counter()
            b["graph"], b["logits"] = capture_graph(b["run"], self.device, self.stream, pool=self.pool)
            self.capture_s += time.perf_counter() - t0
        return b

    def _bucket(self, bucket: int) -> dict:
        lm, cfg, mrope = self.lm, self.lm.cfg, self.mrope
        splits = rows_split_count(bucket, cfg.num_key_value_heads, sm_count(self.device))
        workspace = decode_workspace(bucket * cfg.num_attention_heads, splits, cfg.head_dim, self.device)
        inputs = torch.zeros(6, bucket, dtype=torch.long, device=self.device)  # token, slot, K, V, cap, position

        def run():  # (refers to no `self`: the graphs go with the batcher, no cycle keeps them)
            slots, pos = inputs[1], inputs[5]
            with torch.no_grad():
                return lm.decode_batch(inputs[0], pos.expand(3, -1) if mrope else pos, inputs[2:5], slots,
                                       (slots + 1).to(torch.int32), workspace)

        host = torch.zeros(6, bucket, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.buckets[bucket] = dict(inputs=inputs, host=host, run=run, graph=None, logits=None)
        return self.buckets[bucket]


class Batcher:
    """Runs the turns of several sessions of `engine` in shared decode steps: at most `max_batch`
    conversations answering at once, a newcomer's prompt prefilled `prefill_chunk` tokens per step.
    Drive it with `step()` / `run()` in your thread or `start()` a background thread.
    `longest_stall_s`: the longest time running conversations waited for a newcomer between two
    decode steps, `longest_stall_cause` what that step did (an admission, a prefill chunk, a first
    token); `decode_rows / decode_s`: the aggregate decode rate (the once-per-bucket graph captures
    left out, as `capture_s`); `decode_by_rows`: steps and seconds per batch size."""

    def __init__(self, engine, max_batch: int = 8, prefill_chunk: int = 512):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if not is_number(value, integer=True) or value < 1:
                raise TinyVilaError(f"{name} must be a positive integer, got {value!r}")
        self.engine, self.max_batch, self.prefill_chunk = engine, max_batch, prefill_chunk
        self.longest_stall_s, self.longest_stall_cause = 0.0, ""
        self.decode_by_rows = {}  # rows in the step -> [steps, seconds]: the rate at each batch size
        self._waiting = deque()  # Requests not admitted yet, in order
        self._opening = None  # (Request, Opening) being prefilled
        self._running = []  # (Request, Turn) decoding
        self._wake = threading.Condition()  # guards _waiting; wakes the background thread
        self._thread, self._stopping = None, False
        self._step_gpu = None  # BatchDecode, made on the first GPU step

    # ------------------------------------------------------------------ submitting
    def ask(self, session, question: str, callback=None, **sampling) -> Request:
        """As Session.ask, batched: the question is templated when the request is admitted."""
        params = SamplingParams.from_options(**sampling)
        return self._add(Request(session, lambda: session.question_turn(question), params, callback))

    def submit(self, session, ids: list, params: SamplingParams | None = None, callback=None,
               on_start=None, prompt_s: float = 0.0, on_open=None) -> Request:
        """As Session.complete, batched: already templated ids (a placeholder per media item)."""
        ids = list(ids)
        return self._add(Request(session, lambda: (ids, session.media + session.pending, None),
                                 params or SamplingParams(), callback, on_start, prompt_s, on_open))

    def _add(self, request: Request) -> Request:
        if request.session.engine is not self.engine:
            raise TinyVilaError("the session belongs to another engine than this batcher's")
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        return request

    @property
    def active(self) -> int:
        """Conversations admitted and not finished (opening or running)."""
        return len(self._running) + (self._opening is not None)

    def idle(self) -> bool:
        return not (self._waiting or self._opening or self._running)

    # ------------------------------------------------------------------ running
    def prepare(self) -> "Batcher":
        """On a GPU, capture the decode step's graph for every batch size up to max_batch now
        (a server does it at start), so that a growing batch never waits for a capture."""
        if self.engine.device.type == "cuda":
            with self.engine.lock, torch.no_grad():
                self._gpu_step().prepare(self.max_batch)
        return self

    def step(self) -> bool:
        """One scheduling step (see the module's doc); returns whether work remains."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise TinyVilaError("this batcher steps in its background thread (start()); stop() it first")
        self._drop_cancelled()
        t, stalled = time.perf_counter(), bool(self._running)
        cause = self._open()
        stall = time.perf_counter() - t
        if stalled and stall > self.longest_stall_s:
            self.longest_stall_s, self.longest_stall_cause = stall, cause
        self._decode()
        return not self.idle()

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.step():
            pass

    def start(self) -> "Batcher":
        """Step in a background thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tinyvila-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread after its current step (requests not finished stay queued)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self.idle() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in the scheduler itself: fail what is in flight, keep serving
                self._fail_all(e)

    # ------------------------------------------------------------------ the step's parts
    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for request in gone:
            request._finish(GenerationResult("", finish_reason="cancelled"))
        if self._opening is not None and self._opening[0].cancelled:
            request, opening = self._opening
            self._opening = None
            opening.session.busy = False  # the cache keeps what was prefilled; the next turn reuses it
            request._finish(GenerationResult("", stats=opening.stats, finish_reason="cancelled"))
        for request, turn in [rt for rt in self._running if rt[0].cancelled]:
            self._running.remove((request, turn))
            turn.answer.finish = "cancelled"
            self._end(request, turn)

    def _open(self) -> str:
        """Admit a newcomer if there is room (its admission, which encodes its media, is a step
        of its own while others decode); else prefill one chunk of the opening request, or, once
        its independent part is in, start its answer. With nobody running, nobody waits: the
        whole prefill runs now. Returns what it did (the others' stall), "" for nothing."""
        if self._opening is None:
            if not self._admit():
                return ""
            if self._running:  # the newcomer's media encoding is this step's stall; its prefill starts next step
                return "admission (media encoding)"
        request, opening = self._opening
        cause = "a prefill that failed"
        try:
            while True:
                done = opening.done
                prefill_ahead(opening, self.prefill_chunk)
                if opening.done == done:
                    break
                if self._running:  # one chunk per step while others decode
                    return f"a prefill chunk of {opening.done - done} tokens"
            cause = f"the first token ({len(opening.prompt.keys) - opening.done} prompt tokens left)"
            turn = start_answer(opening)
        except Exception as e:
            opening.session.busy = False
            self._opening = None
            request._finish(error=e)
            return cause
        self._opening = None
        if self._accept(request, turn, turn.token):
            self._running.append((request, turn))
        return cause

    def _admit(self) -> bool:
        """The first waiting request whose conversation is not answering becomes the opening one
        (the later turns of a conversation wait behind its earlier ones)."""
        if len(self._running) >= self.max_batch:
            return False
        answering = {id(r.session) for r, _ in self._running}
        with self._wake:
            request = next((r for r in self._waiting if id(r.session) not in answering), None)
            if request is None:
                return False
            self._waiting.remove(request)
        try:
            t = time.perf_counter()
            ids, media, on_done = request._make()  # Batcher.ask templates the question here
            prompt_s = request.prompt_s + time.perf_counter() - t
            opening = open_turn(request.session, ids, media, request.params, on_done, prompt_s)
            self._opening = (request, opened(opening, request.on_open))
        except Exception as e:  # a bad request fails alone
            request._finish(error=e)
            return False
        return True

    def _decode(self) -> None:
        """One decode step for every running conversation, then each row samples its next token."""
        if not self._running:
            return
        turns = [turn for _, turn in self._running]
        fed = [turn.answer.tokens[-1] for turn in turns]
        t, captured = time.perf_counter(), self.capture_s
        try:
            logits = self._step_logits(turns, fed)
            tokens = sample_rows(logits, [turn.sampler for turn in turns])  # one copy to the host
        except Exception as e:
            self._fail_all(e)
            return
        running, self._running = self._running, []
        took = time.perf_counter() - t - (self.capture_s - captured)  # less this step's captures
        tally = self.decode_by_rows.setdefault(len(running), [0, 0.0])
        tally[0], tally[1] = tally[0] + 1, tally[1] + took
        for b, (request, turn) in enumerate(running):
            turn.session.tokens.append(fed[b])
            turn.stats.decode_tokens += 1
            if self._accept(request, turn, tokens[b]):
                self._running.append((request, turn))

    def _step_logits(self, turns: list, fed: list) -> torch.Tensor:
        """fp32 logits [B, V] of one decode step of `turns` fed `fed`."""
        eng = self.engine
        inputs = [turn.step_input() for turn in turns]
        positions, slots = [pos for pos, _ in inputs], [slot for _, slot in inputs]
        caches = [turn.target.cache for turn in turns]
        with eng.lock, torch.no_grad():
            if eng.device.type == "cuda":
                return self._gpu_step()(fed, positions, caches, slots)
            lm = eng.model.language_model
            pos = torch.tensor(positions, device=eng.device)
            mrope = lm.cfg.mrope_section is not None  # a text token's t, h and w positions are equal
            return lm.decode_rows(torch.tensor(fed, device=eng.device), pos.expand(3, -1) if mrope else pos,
                                  caches, slots)

    @property
    def decode_s(self) -> float:
        """Seconds spent in decode steps (their graph captures left out)."""
        return sum(seconds for _, seconds in self.decode_by_rows.values())

    @property
    def decode_steps(self) -> int:
        return sum(steps for steps, _ in self.decode_by_rows.values())

    @property
    def decode_rows(self) -> int:
        """Tokens the decode steps produced (one a row a step)."""
        return sum(rows * steps for rows, (steps, _) in self.decode_by_rows.items())

    @property
    def capture_s(self) -> float:
        """Seconds spent capturing the decode step's graphs, prepare() included."""
        return self._step_gpu.capture_s if self._step_gpu is not None else 0.0

    def _gpu_step(self) -> BatchDecode:
        if self._step_gpu is None:
            self._step_gpu = BatchDecode(self.engine)
        return self._step_gpu

    def _accept(self, request: Request, turn, token: int) -> bool:
        """Take the row's next token; False (the conversation ended and left) on a stop token,
        cancel, max_new_tokens or a full context."""
        try:
            if not turn.answer.tokens and request.on_start is not None:
                request.on_start()  # the first token is chosen
            if token in turn.stop_ids:
                turn.answer.finish = "stop"
            else:
                turn.answer.tokens.append(token)
                request._emit(turn.decoder.push(token))
                ends = answer_ends(turn.session, turn.params, turn.answer)
                if ends is None:
                    return True
                turn.answer.finish = ends
        except Exception as e:  # the request's own callback failed: it fails alone
            release(turn)
            request._finish(error=e)
            return False
        self._end(request, turn)
        return False

    def _end(self, request: Request, turn) -> None:
        try:
            request._emit(finish_turn(turn))
        except Exception as e:
            request._finish(error=e)
            return
        request._finish(turn.session.last_result)

    def _fail_all(self, error: Exception) -> None:
        """Fail every admitted request (their sessions freed)."""
        for request, turn in self._running:
            release(turn)
            request._finish(error=error)
        self._running = []
        if self._opening is not None:
            self._opening[1].session.busy = False
            self._opening[0]._finish(error=error)
            self._opening = None
