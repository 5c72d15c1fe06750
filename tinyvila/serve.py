"""`tinyvila-serve MODEL` / `python -m tinyvila.serve MODEL`: an OpenAI-compatible chat server.

A chat client resends the whole conversation with every request. The server keeps each
conversation's session (its encoded media and KV cache) in an LRU; a request whose messages extend
a kept conversation (same system prompt, same media bytes in the same places, same earlier
messages, the assistant's own answers included) continues that session, so nothing is encoded or
prefilled again. Any other request starts a new session over the whole conversation. As in the
chat, a conversation runs under the image sparsity preset, or the video one when it holds a video
(unless --sparsity says otherwise), and is continued only under that same policy.

Requests run one at a time on the model, in arrival order, in one worker thread; the event loop
only parses, queues and streams. Nothing is ever fetched: media come as data: URLs, or as file://
paths inside --allowed-local-media.
"""
import argparse
import asyncio
import base64
import binascii
import contextlib
import ctypes
import hashlib
import hmac
import io
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from . import __version__, load
from .cli_options import add_load_options, check_sparsity, load_options, sparsity_options
from .errors import ContextError, MediaError, TinyVilaError, out_of_memory, run_cli
from .loader import read_json

try:  # the `serve` extra
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError:  # reported by main() as one line
    uvicorn = None

ROLES = ("system", "developer", "user", "assistant")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")
VIDEO_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/avi": ".avi",
                  "video/x-msvideo": ".avi", "video/quicktime": ".mov"}


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.type, self.code, self.headers = status, type, code, headers

    def response(self):
        body = {"error": {"message": str(self), "type": self.type, "code": self.code, "param": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad(message: str, code=None) -> APIError:
    return APIError(400, message, code=code)


# ---------------------------------------------------------------------- the request's conversation
@dataclass(frozen=True)
class Media:
    """One image or video of the conversation; equal when the kind and the bytes are equal."""
    kind: str  # "image" or "video"
    digest: str  # sha256 of the bytes
    data: bytes | None = field(default=None, compare=False, repr=False)  # a data: URL's bytes, if decoded
    path: str | None = field(default=None, compare=False)  # a file inside --allowed-local-media
    mime: str = field(default="", compare=False)
    url: bytes | None = field(default=None, compare=False, repr=False)  # a data: URL's text

    def read(self) -> bytes:
        """The inline bytes: decoded on arrival for a data: URL not seen before, else now (a URL
        recognised by its text is decoded only if a new session needs it)."""
        return self.data if self.data is not None else base64.b64decode(self.url.partition(b",")[2], validate=True)


class SeenURLs:
    """Recent data: URLs (their text) and their bytes' digests. A client resends a conversation's
    images with every request: recall() finds the URLs seen before in the raw request body, each by
    a sample of its characters confirmed by a memory compare, and swaps it for a short reference
    before the JSON is parsed, so a continued conversation's images cost neither parsing nor
    decoding their megabytes of text. Bounded in bytes, least recently used first."""

    URL_VALUE = re.compile(rb'"(?:url|image_url|video_url)"\s*:\s*$')  # a media part's URL, not a text

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.nbytes = max_bytes, 0
        self.known = OrderedDict()  # sample -> (URL text, digest)
        self.lock = threading.Lock()

    @staticmethod
    def sample(text, start: int, end: int) -> tuple:
        """About 512 characters spread over text[start:end] (bytes or bytearray), and its length."""
        return end - start, bytes(text[start:end:max(1, (end - start) // 512)])

    def recall(self, body) -> tuple:
        """(body with each data: URL seen before swapped for a reference, {reference: (URL, digest)});
        the body (bytes or bytearray) itself when none was, so that nothing is copied."""
        parts, seen, done = [], {}, 0
        tag = uuid.uuid4().hex  # a reference can only come from this call
        with self.lock:
            start = body.find(b'"data:')
            while start >= 0:
                end = body.find(b'"', start + 1)
                if end < 0:
                    break
                key = self.sample(body, start + 1, end)
                hit = self.known.get(key)
                if (hit is not None and body.startswith(hit[0], start + 1)
                        and self.URL_VALUE.search(body, max(0, start - 40), start)):
                    self.known.move_to_end(key)
                    ref = f"tinyvila-seen:{tag}:{len(seen)}"
                    seen[ref] = hit
                    parts += [body[done:start + 1], ref.encode()]
                    done = end
                start = body.find(b'"data:', end + 1)
        return (b"".join(parts + [body[done:]]) if seen else body), seen

    def digest(self, url: str, start: int, kind: str) -> tuple:
        """(the bytes' sha256, the bytes) of the data: URL `url`, whose base64 text starts at
        `start`, decoded (and checked); the URL is remembered."""
        try:
            data = base64.b64decode(url[start:], validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"the {kind} data: URL is not valid base64") from None
        digest, text = _digest(data), url.encode("ascii")  # base64: ASCII
        key = self.sample(text, 0, len(text))
        with self.lock:
            if (old := self.known.pop(key, None)) is not None:
                self.nbytes -= len(old[0])  # the same URL again (sent escaped), or one with the same sample
            self.known[key] = text, digest
            self.nbytes += len(text)
            while self.nbytes > self.max_bytes:
                self.nbytes -= len(self.known.popitem(last=False)[1][0])
        return digest, data


SEEN = SeenURLs()


class MediaURLs:
    """Turns a request's media URLs into Media: data: URLs (those recalled from earlier requests by
    reference), or file:// paths inside the allowed folder."""

    def __init__(self, allowed_dir: str | None, seen: dict | None = None):
        self.allowed_dir, self.seen = allowed_dir, seen or {}

    def parse(self, url, kind: str) -> Media:
        if isinstance(url, str) and url in self.seen:
            text, digest = self.seen[url]
            return Media(kind, digest, url=text, mime=_mime(text[5:text.find(b",")].decode()))
        if not isinstance(url, str) or not url:
            raise bad(f"{kind}_url needs a url string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            raise bad(f"this server does not fetch URLs: send the {kind} inline as a data: URL (base64)",
                      "url_not_supported")
        if scheme == "data":
            comma = url.find(",")  # the URL is not sliced: an image's text is megabytes
            head = url[5:comma]
            if comma < 0 or not head.endswith(";base64"):
                raise bad(f"a {kind} data: URL must be base64 (data:MIME;base64,...)")
            digest, data = SEEN.digest(url, comma + 1, kind)
            return Media(kind, digest, data=data, mime=_mime(head))
        if scheme == "file":
            return Media(kind, *_allowed_file(unquote(urlparse(url).path), self.allowed_dir))
        raise bad(f"unsupported {kind} URL scheme {scheme or url[:20]!r}: use a data: URL")


def _mime(head: str) -> str:
    """The MIME type of a data: URL's head ("image/png;base64")."""
    return head.partition(";")[0].lower()


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str
    media: tuple = ()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _allowed_file(path: str, allowed_dir: str | None):
    """(digest, data=None, path) for a local file inside `allowed_dir`, symlinks and `..` resolved."""
    if allowed_dir is None:
        raise bad("file:// URLs are refused: the server was started without --allowed-local-media",
                  "local_media_not_allowed")
    real = os.path.realpath(path)
    root = os.path.realpath(allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise bad(f"'{path}' is outside the allowed local media folder", "local_media_not_allowed")
    if not os.path.isfile(real):
        raise bad(f"'{path}': no such file")
    with open(real, "rb") as f:
        return _digest(f.read()), None, real


def parse_content(content, role: str, urls: MediaURLs) -> Turn:
    if isinstance(content, str):
        return Turn(role, content)
    if not isinstance(content, list):
        raise bad(f"a {role} message's content must be a string or a list of parts")
    texts, media = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            media.append(urls.parse(url, kind[:-4]))
        else:
            raise bad(f"unknown content part {kind!r} (use text, image_url or video_url)", "unknown_content_part")
    if media and role != "user":
        raise bad(f"only user messages may hold images or videos, not {role} messages")
    # The media go before the text, as the chat and Session.ask place them.
    return Turn(role, "\n".join(texts), tuple(media))


def parse_messages(messages, urls: MediaURLs):
    """(system prompt or None, [Turn]) from the request's messages."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "missing_messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise bad(f"message {i}: role must be one of {', '.join(ROLES)}")
        turn = parse_content(m.get("content"), role, urls)
        if role in ("system", "developer"):
            if i != 0:
                raise bad("a system message may only come first")
            system = turn.text or None
        else:
            turns.append(turn)
    if not turns or turns[-1].role != "user":
        raise bad("the last message must be the user's")
    return system, turns


# ---------------------------------------------------------------------- sampling
@dataclass
class ChatRequest:
    system: str | None
    turns: list
    params: object  # SamplingParams
    stop: list
    stream: bool
    include_usage: bool


def parse_request(body: dict, defaults: dict, urls: MediaURLs, max_tokens: int) -> ChatRequest:
    from .sampling import SamplingParams  # torch, loaded with the model: --help does not wait for it

    if body.get("n") not in (None, 1):
        raise bad("n must be 1 (one answer per request)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a string or a list of non-empty strings")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = dict(defaults, **{k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None})
    try:
        params = SamplingParams.from_options(max_new_tokens=max_tokens if tokens is None else tokens,
                                             ignore_eos=bool(body.get("ignore_eos", False)), **sampling)
    except TinyVilaError as e:
        raise bad(str(e).replace("max_new_tokens", "max_tokens")) from None
    system, turns = parse_messages(body.get("messages"), urls)
    options = body.get("stream_options") or {}
    return ChatRequest(system, turns, params, stop, bool(body.get("stream", False)),
                    isinstance(options, dict) and bool(options.get("include_usage")))


def sampling_defaults(engine) -> dict:
    """OpenAI's defaults: the checkpoint's generation_config, else temperature 1."""
    config = read_json(engine.path / "generation_config.json", required=False)
    out = {k: config[k] for k in ("temperature", "top_p", "top_k") if config.get(k) is not None}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    return {"temperature": 1.0, **out}


class StopWatch:
    """Cuts the answer at the first stop string; holds back text that may begin one."""

    def __init__(self, stops: list):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, piece: str) -> str:
        """The text that can be sent now."""
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[:min(found)], True
            return self.flush()
        end = len(self.text) - self.hold
        return self._take(end)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


# ---------------------------------------------------------------------- conversations kept
@dataclass
class Kept:
    system: str | None
    turns: list
    session: object
    nbytes: int  # its KV cache, preallocated for the whole context, and decode buffer


class SessionLRU:
    """Live sessions, least recently used first, bounded in count and in KV-cache bytes. Used from
    the worker threads (several under --max-batch: a lock)."""

    def __init__(self, max_sessions: int, max_bytes: float):
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self.kept = OrderedDict()
        self.evicted = 0
        self.lock = threading.Lock()

    def take(self, system, turns, sparsity):
        """(session, number of turns it holds) for the longest kept conversation that `turns`
        extends under the same sparsity policy; the session leaves the LRU. (None, 0) when none
        matches."""
        with self.lock:
            return self._take(system, turns, sparsity)

    def _take(self, system, turns, sparsity):
        best = None
        for key, k in self.kept.items():
            n = len(k.turns)
            extends = k.system == system and n < len(turns) and turns[:n] == k.turns
            if extends and k.session.sparsity == sparsity and (best is None or n > len(self.kept[best].turns)):
                best = key
        if best is None:
            return None, 0
        k = self.kept.pop(best)
        return k.session, len(k.turns)

    def put(self, system, turns, session) -> None:
        with self.lock:
            self._put(system, turns, session)

    def _put(self, system, turns, session) -> None:
        self.kept[uuid.uuid4().hex] = Kept(system, list(turns), session, session.nbytes())
        while self.kept and (len(self.kept) > self.max_sessions
                             or sum(k.nbytes for k in self.kept.values()) > self.max_bytes):
            self.kept.popitem(last=False)[1].session.close()
            self.evicted += 1

    def close_all(self) -> None:
        with self.lock:
            while self.kept:
                self.kept.popitem()[1].session.close()


# ---------------------------------------------------------------------- the model's worker thread
class Job:
    """One request's answer. Runs in the worker thread; `events` (streaming only) carries its text
    to the event loop. cancel() may be called from the loop at any time."""

    def __init__(self, req: ChatRequest, loop, streaming: bool, received: float):
        self.req, self.loop = req, loop
        self.received = received  # perf_counter() when the request's headers had been read
        self.first_token_at = None
        self.events = asyncio.Queue() if streaming else None
        self.cancelled = threading.Event()
        self.watch = StopWatch(req.stop)
        self.session = None
        self.task = None
        self.request = None  # --max-batch: its batch.Request

    def cancel(self) -> None:
        self.cancelled.set()
        if self.request is not None:  # also while it waits for a place in the batch
            self.request.cancel()

    def emit(self, kind: str, value) -> None:
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def on_open(self) -> None:
        """The turn is admitted (it fits, its media are encoded): a stream's response can start
        while the model prefills, so that only the first chunk is left for after the first token."""
        self.emit("open", None)

    def on_start(self) -> None:
        """The first token is chosen: the stream starts now, before its text (which may need the
        next tokens)."""
        self.first_token_at = time.perf_counter()
        self.emit("start", None)

    def on_piece(self, piece: str) -> None:
        """The session's callback, in the worker thread, during the answer."""
        text = self.watch.push(piece)
        if text:
            self.emit("piece", text)
        if self.watch.hit or self.cancelled.is_set():
            self.session.cancel()


def new_session(engine, req: ChatRequest, sparsity: dict, temp_files: list):
    """A session holding all of the conversation's media, in prompt order, its context sized for
    them all (as Engine.session sizes it for the media it is given)."""
    options = {k: v for k, v in engine.defaults.items() if k in engine.model.media_options}
    items = [item for t in req.turns for m in t.media  # a video may be several items (Qwen3-VL's frame pairs)
             for item in engine.load_media(**{f"{m.kind}s": [source(m, temp_files)]}, **options)]
    context = engine.default_context(items, engine.sparsity.overridden(**sparsity))
    session = engine.session(system=req.system, max_seq_len=context, **sparsity)
    session.pending = items  # the media of the conversation's user messages, in order
    return session


def attach(session, media, temp_files: list) -> None:
    for m in media:
        add = session.add_image if m.kind == "image" else session.add_video
        add(source(m, temp_files))


def source(m: Media, temp_files: list):
    return image_source(m) if m.kind == "image" else video_source(m, temp_files)


def image_source(m: Media):
    if m.path is not None:
        return m.path
    try:
        return Image.open(io.BytesIO(m.read()))
    except Image.DecompressionBombError as e:
        raise MediaError(f"the image is too large ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise MediaError("the image_url data is not an image, or an unsupported image format") from None


def video_source(m: Media, temp_files: list) -> str:
    """A video's file: decoders read files, so inline bytes go to a temporary one for the request."""
    if m.path is not None:
        return m.path
    fd, path = tempfile.mkstemp(prefix="tinyvila-serve-", suffix=VIDEO_SUFFIXES.get(m.mime, ".mp4"))
    temp_files.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(m.read())
    return path


def render(session, req: ChatRequest) -> list:
    """The whole conversation as the family's chat messages, as Session.ask would build them."""
    head = [session.message("system", req.system)] if req.system else []
    sources = iter(session.source_items())  # the family's items of each image or video, in order
    return head + [session.message(t.role, t.text, [item for _ in t.media for item in next(sources)])
                   for t in req.turns]


class Worker:
    """The model and its kept conversations; run() is the one place a job runs, in a worker
    thread: one, or under --max-batch N, N of them, whose answers share the decode steps of one
    background Batcher."""

    def __init__(self, engine, lru: SessionLRU, args):
        self.engine, self.lru, self.args = engine, lru, args
        self.answers = self.cancelled = 0  # answers given; requests cut short by a client that left
        self.lock = threading.Lock()  # the counters, from several worker threads
        self.batcher = None
        if args.max_batch > 1:
            from .batch import Batcher  # torch: not imported for --help

            self.batcher = Batcher(engine, max_batch=args.max_batch).prepare().start()

    def sparsity(self, req: ChatRequest) -> dict:
        """The conversation's sparsity options, as the chat picks them: --sparsity, else the video
        preset for a conversation with a video, the image preset for any other."""
        return sparsity_options(self.args, any(m.kind == "video" for t in req.turns for m in t.media))

    def run(self, job: Job):
        """("done", payload) or ("error", APIError), also sent as the job's last event."""
        try:
            out = ("done", self.answer(job))
        except APIError as e:
            out = ("error", e)
        except TinyVilaError as e:
            out = ("error", bad(str(e)))
        except Exception as e:
            memory = out_of_memory(e, "try a smaller image or fewer turns")
            if memory is None:  # a bug: logged here, never shown to the client
                print(f"tinyvila-serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc()
            out = ("error", APIError(500, memory or "internal server error", "server_error"))
        job.emit(*out)
        return out

    def respond(self, job: Job, session, known: int, sparsity: dict, temp_files: list):
        """(result, session, turns continued): the kept session continued, unless the new media do
        not fit its context (sized for the media it had): then, as with no kept session, a new
        session over the whole conversation, its context sized for all of its media."""
        try:
            if session is not None:
                try:
                    attach(session, [m for t in job.req.turns[known:] for m in t.media], temp_files)
                    return self.complete(job, session), session, known
                except ContextError:
                    session.close()
            session = None
            session = new_session(self.engine, job.req, sparsity, temp_files)
            return self.complete(job, session), session, 0
        except BaseException:
            if session is not None:
                session.close()
            raise

    def complete(self, job: Job, session):
        job.session = session
        t = time.perf_counter()
        ids = self.engine.encode_text(self.engine.render(render(session, job.req)))
        prompt_s = time.perf_counter() - t  # counted in the TTFT, as Session.ask counts its templating
        if self.batcher is None:
            return session.complete(ids, job.req.params, job.on_piece, job.on_start, prompt_s, job.on_open)
        job.request = self.batcher.submit(session, ids, job.req.params, job.on_piece, job.on_start, prompt_s,
                                          job.on_open)
        if job.cancelled.is_set():  # cancelled before its request existed
            job.request.cancel()
        return job.request.wait()

    def answer(self, job: Job) -> dict:
        req, engine = job.req, self.engine
        if job.cancelled.is_set():  # the client left while the request waited
            with self.lock:
                self.cancelled += 1
            raise APIError(499, "the client closed the connection", "cancelled")
        sparsity = self.sparsity(req)
        kept, known = self.lru.take(req.system, req.turns, engine.sparsity.overridden(**sparsity))
        temp_files = []
        try:
            result, session, known = self.respond(job, kept, known, sparsity, temp_files)
        finally:
            for path in temp_files:
                os.unlink(path)
        tail = job.watch.flush()
        if tail:
            job.emit("piece", tail)
        text = job.watch.text
        with self.lock:
            self.answers += 1
            self.cancelled += job.cancelled.is_set() and result.finish_reason == "cancelled"
        if job.cancelled.is_set():
            session.close()  # a half answer the client never saw: not worth keeping
        else:
            self.lru.put(req.system, req.turns + [Turn("assistant", text)], session)
        finish = "stop" if job.watch.hit else result.finish_reason
        stats = result.stats
        prompt = stats.context_tokens - stats.decode_tokens  # the cache holds the prompt, then the answer
        # the TTFT the server saw: the engine's (from the prompt's ids on) plus reading and parsing
        # the request, the wait for the model, the template and the tokenizer
        server_ttft = None if job.first_token_at is None else job.first_token_at - job.received
        return {"text": text, "finish_reason": finish, "prompt_tokens": prompt, "completion_tokens": len(result.token_ids),
                "cached_tokens": max(0, prompt - stats.prefill_tokens),
                "stats": dict(stats.to_dict(), server_ttft_s=server_ttft), "continued": known > 0}


# ---------------------------------------------------------------------- HTTP
def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def cancel_on_disconnect(receive, job: Job) -> None:
    """Cancel the job once the client has gone (a task beside the answer)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class EventStream:
    """The ASGI response streaming `chunks` (an async iterator of str) as server-sent events; the
    job is cancelled if the client leaves. Starlette's StreamingResponse would run the stream in a
    task group of its own (uvicorn speaks ASGI 2.3): ~0.2 ms more before the first chunk (measured)."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    def __init__(self, chunks, job: Job):
        self.chunks, self.job = chunks, job

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.job))
        try:
            async for text in self.chunks:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self.chunks.aclose()  # its own cleanup now, not whenever it is collected


class Server:
    def __init__(self, engine, args, name: str):
        self.engine, self.name, self.args = engine, name, args
        self.lru = SessionLRU(args.max_sessions, args.session_memory * 1e9)
        self.worker = Worker(engine, self.lru, args)
        self.batcher = self.worker.batcher  # --max-batch > 1: the background Batcher
        # FIFO: arrival order; --max-batch N: N answers at once
        self.pool = ThreadPoolExecutor(args.max_batch, thread_name_prefix="tinyvila-model")
        self.in_flight = 0  # running + waiting; touched on the event loop only
        self.jobs = set()
        self.defaults = sampling_defaults(engine)
        self.max_body = int(args.max_body_mb * 2 ** 20)
        self.ready_line = ""
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        handlers = {404: self.not_found, 405: self.not_found, Exception: self.crashed}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        print(self.ready_line, flush=True)
        yield
        for job in list(self.jobs):  # stop answers in progress; their sessions close
            job.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.stop()
        self.lru.close_all()

    # -- endpoints
    async def health(self, request):
        w = self.worker
        return JSONResponse({"status": "ok", "model": self.name, "device": str(self.engine.device),
                             "dtype": str(self.engine.dtype).removeprefix("torch."),
                             "requests_in_flight": self.in_flight, "sessions": len(self.lru.kept),
                             "sessions_evicted": self.lru.evicted, "answers": w.answers,
                             "answers_cancelled": w.cancelled, "max_batch": self.args.max_batch,
                             "longest_stall_ms": 1e3 * self.batcher.longest_stall_s if self.batcher else 0.0,
                             "longest_stall_cause": self.batcher.longest_stall_cause if self.batcher else ""})

    async def models(self, request):
        try:
            self.check_key(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "tinyvila"}]})

    async def chat(self, request):
        received = time.perf_counter()
        try:
            self.check_key(request)
            body, seen = await self.read_json(request)
            if not isinstance(body.get("model"), str):
                raise bad("model is required")
            if body["model"] != self.name:
                raise APIError(404, f"the model '{body['model']}' does not exist here (this server has "
                               f"'{self.name}')", code="model_not_found")
            req = parse_request(body, self.defaults, MediaURLs(self.args.allowed_local_media, seen),
                                self.engine.max_seq_len)
            job = Job(req, asyncio.get_running_loop(), req.stream, received)
            if req.stream:
                return await self.stream(job, body["model"])
            kind, value = await self.submit_watching(job, request)
            if kind == "error":
                raise value
            return JSONResponse(self.completion(value, body["model"]))
        except APIError as e:
            return e.response()

    async def not_found(self, request, exc):
        return APIError(exc.status_code, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def crashed(self, request, exc):
        print(f"tinyvila-serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return APIError(500, "internal server error", "server_error").response()

    # -- helpers
    def check_key(self, request) -> None:
        key = self.args.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           "authentication_error", "invalid_api_key")

    async def read_json(self, request) -> tuple:
        """(the body's JSON object, its recalled data: URLs: SeenURLs.recall)."""
        too_big = APIError(413, f"the request body is over {self.args.max_body_mb:g} MB", code="body_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)  # joined once: growing one buffer chunk by chunk cost ~0.5 ms a 1.8 MB body
            size += len(chunk)
            if size > self.max_body:
                raise too_big
        body, seen = SEEN.recall(b"".join(chunks))
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise bad("the request body is not valid JSON", "malformed_json") from None
        if not isinstance(data, dict):
            raise bad("the request body must be a JSON object", "malformed_json")
        return data, seen

    async def submit(self, job: Job):
        """Run the job after those before it; ("done", payload) or ("error", APIError)."""
        if self.in_flight >= self.args.max_batch + self.args.queue:  # --max-batch answering, --queue waiting
            raise APIError(503, f"the server is busy ({self.args.queue} requests waiting); retry shortly",
                           "server_busy", "queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.jobs.add(job)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.worker.run, job)
        finally:
            self.in_flight -= 1
            self.jobs.discard(job)

    async def submit_watching(self, job: Job, request):
        """submit(), the job cancelled if the client disconnects before its answer is ready."""
        watcher = asyncio.ensure_future(cancel_on_disconnect(request.receive, job))
        try:
            return await self.submit(job)
        finally:
            watcher.cancel()

    async def stream(self, job: Job, model: str):
        """The streamed response, once the turn is admitted (Job.on_open): its headers go out during
        the prefill. An error before that is the request's (an HTTP status); after, in the stream."""
        run = job.task = asyncio.ensure_future(self.submit(job))  # referenced: the loop keeps weak ones
        first = asyncio.ensure_future(job.events.get())
        await asyncio.wait([run, first], return_when=asyncio.FIRST_COMPLETED)
        if not first.done():  # refused before it ran (busy)
            first.cancel()
            kind, value = run.result() if run.exception() is None else ("error", run.exception())
            raise value if kind == "error" else RuntimeError("a streamed job ended without events")
        if first.result()[0] == "error":
            raise first.result()[1]
        return EventStream(self.events(job, first.result(), model, run), job)

    async def events(self, job: Job, item, model: str, run):
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def chunk(delta, finish=None, **extra):
            return sse(dict(head, choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                            **extra))

        try:
            if item[0] == "open":  # the headers went out during the prefill; the first chunk waits for the token
                item = await job.events.get()
            yield chunk({"role": "assistant", "content": ""})
            if item[0] == "start":
                item = await job.events.get()
            while item[0] == "piece":
                yield chunk({"content": item[1]})
                item = await job.events.get()
            kind, value = item
            await asyncio.shield(run)  # out of the in-flight count before the client hears the end
            if kind == "error":  # after the answer began: reported in the stream, as OpenAI does
                yield sse({"error": {"message": str(value), "type": value.type, "code": value.code}})
            else:
                yield chunk({}, value["finish_reason"], tinyvila=self.own_stats(value))
                if job.req.include_usage:
                    yield sse(dict(head, choices=[], usage=self.usage(value)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client left (or the answer is over: then a no-op)

    def completion(self, value: dict, model: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": value["text"]},
                                             "finish_reason": value["finish_reason"], "logprobs": None}],
                "usage": self.usage(value), "tinyvila": self.own_stats(value)}

    @staticmethod
    def usage(value: dict) -> dict:
        return {"prompt_tokens": value["prompt_tokens"], "completion_tokens": value["completion_tokens"],
                "total_tokens": value["prompt_tokens"] + value["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": value["cached_tokens"]}}

    @staticmethod
    def own_stats(value: dict) -> dict:
        return dict(value["stats"], cached_tokens=value["cached_tokens"], conversation_continued=value["continued"])


# ---------------------------------------------------------------------- command line
def parse_args(argv):
    p = argparse.ArgumentParser(prog="tinyvila-serve", description="Serve a vision-language model over an "
                                "OpenAI-compatible HTTP API.")
    add = p.add_argument
    add("model", metavar="MODEL", help="hub id or local checkpoint directory")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    add("--api-key", help="require Authorization: Bearer KEY on /v1 requests")
    add("--served-model-name", help="the model id clients send (default: MODEL as given)")
    add("--allowed-local-media", metavar="DIR", help="file:// media URLs may name files inside DIR (default: none)")
    add("--max-sessions", type=int, default=16, help="conversations kept live (default 16)")
    add("--session-memory", type=float, default=8.0, metavar="GB",
        help="KV-cache memory the kept conversations may hold (default 8)")
    add("--queue", type=int, default=64, help="requests that may wait; more get 503 (default 64)")
    add("--max-batch", type=int, default=1, metavar="N",
        help="answer up to N requests at once in shared decode steps (default 1: one at a time)")
    add("--max-body-mb", type=float, default=64.0, help="largest request body in MB (default 64)")
    add("--debug", action="store_true", help="show tracebacks of startup errors")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    add_load_options(p)
    args = p.parse_args(argv)
    for name in ("max_sessions", "session_memory", "queue", "max_body_mb"):
        if getattr(args, name) < 0:
            p.exit(2, f"error: --{name.replace('_', '-')} must be >= 0\n")
    if args.max_batch < 1:
        p.exit(2, "error: --max-batch must be >= 1\n")
    if not 0 <= args.port < 65536:
        p.exit(2, f"error: --port must be in 0..65535, got {args.port}\n")
    if args.allowed_local_media is not None and not os.path.isdir(args.allowed_local_media):
        p.exit(2, f"error: --allowed-local-media: no folder '{args.allowed_local_media}'\n")
    return args


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on each connection (it checks the proto),
        # so a streamed piece is not held back by Nagle's algorithm waiting for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise TinyVilaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def keep_freed_buffers() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MB (its limit) in the process. By default
    it unmaps any block over 128 KB when freed, so each request's body (megabytes for an image)
    lands in fresh pages, faulted in one by one on first touch: ~1 ms for each copy of a 1.8 MB
    body (the socket reads make some, the join another). Other C libraries: left alone."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)  # free memory atop the heap kept up to this, not returned


def serve(args) -> None:
    check_sparsity(args)  # a bad sparsity policy fails before anything loads
    keep_freed_buffers()
    sock = bind(args.host, args.port)
    engine = load(args.model, **load_options(args))
    server = Server(engine, args, args.served_model_name or args.model)
    host, port = sock.getsockname()[:2]
    server.ready_line = f"serving {server.name} on http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(server.app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if uvicorn is None:
        print("error: tinyvila-serve needs starlette and uvicorn: pip install 'tinyvila[serve]'", file=sys.stderr)
        return 2
    return run_cli(lambda: serve(args), args.debug, "try a smaller model or a quantized checkpoint")


if __name__ == "__main__":
    sys.exit(main())
