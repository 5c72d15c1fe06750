"""tinyvila-serve: a live server on 127.0.0.1 (a free port), driven by the real `openai` client and by
plain HTTP, against the in-process Engine on the same tiny checkpoints."""
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch

import tinyvila
from tinyvila.sampling import SamplingParams
from tinyvila.serve import Turn, bind

try:  # the openai package's HTTP client: httpx, or httpx2 in its newer releases
    import httpx
except ImportError:
    import httpx2 as httpx
from fixtures_images import draw_image, write_video
from fixtures_qwen import build_qwen2_5_vl
from fixtures_vila import build_vila

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test"
GREEDY = dict(temperature=0, max_tokens=10)


class LiveServer:
    """`python -m tinyvila.serve` in a subprocess; the port is the one it prints when ready."""

    def __init__(self, tmp: Path, *args):
        self.stderr = open(tmp / "stderr.txt", "w+")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyvila.serve", *map(str, args), "--port", "0",
                                      "--device", "cpu", "--dtype", "float32"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line = self.proc.stdout.readline()  # blocks until ready (or the process died)
        assert line.startswith("serving "), f"no ready line: {line!r}; stderr: {self.log()}"
        self.url = line.split(" on ")[1].strip()
        assert self.url.startswith("http://127.0.0.1:")
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.http.close()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        assert "Traceback" not in self.log(), self.log()
        return code


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, *urls, kind="image"):
    return {"role": "user", "content": [{"type": f"{kind}_url", f"{kind}_url": {"url": u}} for u in urls]
            + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    draw_image(90, 60, seed=3).save(d / "inside.png")
    return d


@pytest.fixture(scope="module")
def server(llava_vicuna, media_dir, tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("server"), llava_vicuna, "--api-key", KEY,
                   "--served-model-name", "tiny-llava", "--allowed-local-media", media_dir)
    yield s
    assert s.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


@pytest.fixture(scope="module")
def eng(llava_vicuna):
    """The reference: the server's default for a conversation with images is the chat's image preset."""
    return tinyvila.load(llava_vicuna, device="cpu", dtype=torch.float32, sparsity="image")


@pytest.fixture(scope="module")
def img():
    return draw_image(120, 80, seed=1)


def ask(server, messages, **kw):
    return server.client().chat.completions.create(model="tiny-llava", messages=messages, **dict(GREEDY, **kw))


def test_models_and_health(server):
    health = server.http.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["dtype"] == "float32"
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]


def test_greedy_answers_equal_generate(server, eng, img):
    r = ask(server, [user("Describe the image.", data_url(img))])
    ref = eng.generate("Describe the image.", images=[img], temperature=0, max_new_tokens=10)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if len(ref.token_ids) == 10 else "stop")
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == ref.stats.prefill_tokens and r.usage.prompt_tokens_details.cached_tokens == 0
    stats = r.model_extra["tinyvila"]
    assert stats["visual_tokens"] == ref.stats.visual_tokens > 0
    assert stats["server_ttft_s"] > stats["ttft_s"] > stats["prompt_s"] > 0  # the request's parsing added
    r = ask(server, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert r.choices[0].message.content == eng.generate("Hello there", system="Be brief.", temperature=0,
                                                        max_new_tokens=10).text


def test_stream_pieces_join_to_the_answer(server, eng, img):
    pieces, usage, finish = [], None, None
    stream = server.client().chat.completions.create(
        model="tiny-llava", messages=[user("What is it?", data_url(img))], stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    ref = eng.generate("What is it?", images=[img], temperature=0, max_new_tokens=10)
    assert "".join(pieces) == ref.text and len([p for p in pieces if p]) > 1
    assert finish in ("stop", "length") and usage.completion_tokens == len(ref.token_ids)


def test_two_turns_continue_the_session(server, eng, img):
    url = data_url(draw_image(100, 140, seed=7))
    first = [user("What is in the picture?", url)]
    a1 = ask(server, first).choices[0].message.content
    history = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And the colours?"}]
    r2 = ask(server, history)
    with eng.session(images=[draw_image(100, 140, seed=7)]) as s:
        assert s.ask("What is in the picture?", temperature=0, max_new_tokens=10).text == a1
        ref = s.ask("And the colours?", temperature=0, max_new_tokens=10)
    assert r2.choices[0].message.content == ref.text
    assert r2.usage.prompt_tokens_details.cached_tokens > 0
    assert r2.model_extra["tinyvila"]["conversation_continued"] is True
    assert r2.model_extra["tinyvila"]["vision_s"] == 0.0  # the image was not encoded again
    assert r2.usage.prompt_tokens == r2.usage.prompt_tokens_details.cached_tokens + ref.stats.prefill_tokens


def test_a_resent_image_is_recognised_without_decoding_it(monkeypatch):
    """A conversation resent with its history carries the same data: URLs: one seen before is found
    in the raw body and swapped for a reference before the JSON is parsed, and comes out as the same
    Media without being decoded; a new one is decoded (and checked). Not taken for a known URL: the
    same text in a text part, the URL sent with escaped slashes, a URL that differs from a known one
    only where the sample does not look, and one forgotten under the memory bound."""
    from tinyvila import serve

    seen_urls, decoded = serve.SeenURLs(), []
    monkeypatch.setattr(serve, "SEEN", seen_urls)
    real = base64.b64decode
    monkeypatch.setattr(serve.base64, "b64decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    big = bytes(range(256)) * 1200
    twin = big[:1] + b"x" + big[2:]  # its text differs from big's only at characters the sample skips
    url, twin_url = ("data:image/png;base64," + base64.b64encode(b).decode() for b in (big, twin))
    assert seen_urls.sample(url.encode(), 0, len(url)) == seen_urls.sample(twin_url.encode(), 0, len(url))

    def image(u, short=False):
        return {"type": "image_url", "image_url": u if short else {"url": u}}

    def parse(messages, body=None):
        body, seen = seen_urls.recall(body or json.dumps({"messages": messages}).encode())
        return serve.parse_messages(json.loads(body)["messages"], serve.MediaURLs(None, seen))[1], seen

    first = [{"role": "user", "content": [image(url), {"type": "text", "text": "What is it?"}]}]
    (turn,), seen = parse(first)
    assert not seen and len(decoded) == 1 and turn.media[0].data == big
    again = first + [{"role": "assistant", "content": url}, {"role": "user", "content": [image(url, short=True)]}]
    turns, seen = parse(again)
    assert len(seen) == 2 and len(decoded) == 1 and turns[1].text == url
    assert turns[0].media == turns[2].media == turn.media and turns[2].media[0].data is None
    assert turns[2].media[0].read() == big and len(decoded) == 2
    assert not parse(None, json.dumps({"messages": first}).replace("/", "\\/").encode())[1]  # escaped
    (other,), seen = parse([{"role": "user", "content": [image(twin_url)]}])
    assert not seen and other.media != turn.media and other.media[0].data == twin
    with pytest.raises(serve.APIError, match="not valid base64"):
        parse([{"role": "user", "content": [image(url[:-3] + "!!!")]}])
    seen_urls.max_bytes = len(url) + 10  # room for one: the newest stays
    small = "data:image/png;base64," + base64.b64encode(b"tiny").decode()
    parse([{"role": "user", "content": [image(url)]}])
    parse([{"role": "user", "content": [image(small)]}])
    assert len(parse([{"role": "user", "content": [image(small)]}])[1]) == 1 and not parse(first)[1]

def test_history_the_server_never_produced(server, eng, img):
    """A client-made assistant turn: a new session prefills the whole conversation."""
    msgs = [user("Hi", data_url(img)), {"role": "assistant", "content": "A made-up answer."},
            {"role": "user", "content": "Sure?"}]
    r = ask(server, msgs)
    family = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "A made-up answer."}]},
              {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]
    ids = eng.encode_text(eng.render(family))
    ids = [eng.image_token_id if t == eng.image_token_id else t for t in ids]
    ref = eng.generate(input_ids=ids, images=[img], temperature=0, max_new_tokens=10)
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def post(server, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return server.http.post("/v1/chat/completions", content=raw, headers=headers)
    return server.http.post("/v1/chat/completions", json=body, headers=headers)


def bad_images():
    buf = io.BytesIO()
    draw_image(64, 64).save(buf, "PNG")
    png = buf.getvalue()
    gif = io.BytesIO()
    draw_image(4, 4).save(gif, "GIF")
    huge = bytearray(gif.getvalue())
    huge[6:10] = (30000).to_bytes(2, "little") * 2  # logical screen 30000 x 30000
    return {"undecodable": b"not an image at all", "truncated": png[: len(png) // 2], "oversized": bytes(huge)}


def test_errors_then_a_good_request(server, media_dir, tmp_path):
    good = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    msg = lambda content: dict(good, messages=[{"role": "user", "content": content}])  # noqa: E731
    inline = lambda data: msg([{"type": "image_url", "image_url": {"url": "data:image/png;base64,"  # noqa: E731
                                                                   + base64.b64encode(data).decode()}}])
    (tmp_path / "outside.png").write_bytes((media_dir / "inside.png").read_bytes())
    os.symlink(tmp_path / "outside.png", media_dir / "link.png")
    file_part = lambda p: msg([{"type": "image_url", "image_url": {"url": f"file://{p}"}}])  # noqa: E731
    cases = [
        (None, b"{not json", 400, "malformed_json"),
        (dict(good, messages=None), None, 400, "missing_messages"),
        (dict(good, messages=[]), None, 400, "missing_messages"),
        (msg([{"type": "audio", "audio": "x"}]), None, 400, "unknown_content_part"),
        (msg([{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]), None, 400,
         "url_not_supported"),
        (file_part(f"{media_dir}/../{tmp_path.name}/outside.png"), None, 400, "local_media_not_allowed"),
        (file_part(tmp_path / "outside.png"), None, 400, "local_media_not_allowed"),
        (file_part(media_dir / "link.png"), None, 400, "local_media_not_allowed"),
        (msg("word " * 3000), None, 400, None),
        (dict(good, temperature=-1), None, 400, None),
        (dict(good, top_p=2), None, 400, None),
        (dict(good, max_tokens=0), None, 400, None),
        (dict(good, n=2), None, 400, None),
        (msg([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}]), None, 400,
         None),
        (msg([{"type": "image_url", "image_url": {"url": "data:image/png;base64,\u00e9t\u00e9"}}]), None, 400, None),
        (dict(good, model="gpt-4o"), None, 404, "model_not_found"),
        (good, None, 401, "invalid_api_key"),
    ] + [(inline(data), None, 400, None) for data in bad_images().values()]
    for i, (body, raw, status, code) in enumerate(cases):
        r = post(server, body, key=None if status == 401 else KEY, raw=raw)
        assert r.status_code == status, (i, r.text)
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in err["message"] and err["type"]
        if code:
            assert err["code"] == code, (i, err)
        if i == 4:
            assert "does not fetch" in err["message"]
        assert post(server, good).status_code == 200  # the server goes on
    assert post(server, good, key="wrong").status_code == 401
    assert server.http.get("/v1/nope").status_code == 404
    r = post(server, file_part(media_dir / "inside.png"))  # inside the folder: allowed
    assert r.status_code == 200 and r.json()["tinyvila"]["visual_tokens"] > 0


def test_eight_concurrent_clients(server, eng):
    prompts = [f"Tell me about number {i}." for i in range(8)]
    answers = {}

    def run(p):
        answers[p] = ask(server, [{"role": "user", "content": p}], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        assert answers[p] == eng.generate(p, temperature=0, max_new_tokens=6).text


def long_stream(server, model="tiny-llava"):
    body = {"model": model, "messages": [{"role": "user", "content": "Count."}], "stream": True,
            "max_tokens": 100000, "ignore_eos": True, "temperature": 0}
    return server.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_stop_strings_and_sampling(server, eng, img):
    ref = eng.generate("Describe the image.", images=[img], temperature=0, max_new_tokens=10).text
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    assert stop.strip(), ref
    msgs = [user("Describe the image.", data_url(img))]
    r = ask(server, msgs, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == ref[:ref.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = server.client().chat.completions.create(model="tiny-llava", messages=msgs, stream=True, stop=stop,
                                                       **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref[:ref.index(stop)]
    sampled = eng.generate("Describe the image.", images=[img], temperature=0.9, top_k=20, top_p=0.95, seed=5,
                           max_new_tokens=10).text
    r = ask(server, msgs, temperature=0.9, top_p=0.95, seed=5, extra_body={"top_k": 20})
    assert r.choices[0].message.content == sampled


@pytest.fixture(scope="module")
def small_server(llava_vicuna, eng, img, tmp_path_factory):
    """Room for one conversation (its KV cache and decode buffer), no waiting line, 1 MB bodies."""
    with eng.session(images=[img], max_seq_len=512) as s:
        s.ask("Hi", temperature=0, max_new_tokens=2)
        one = s.nbytes()
        assert one > s.cache.nbytes()  # the image preset's decode retrieval holds a decode buffer too
    s = LiveServer(tmp_path_factory.mktemp("small"), llava_vicuna, "--max-seq-len", 512, "--session-memory",
                   1.5 * one / 1e9, "--queue", 0, "--max-body-mb", 1)
    yield s
    assert s.stop(signal.SIGINT) in (0, 130, -signal.SIGINT)


def test_lru_eviction_under_small_session_memory(small_server, img):
    c = small_server.client()
    model = str(small_server.client().models.list().data[0].id)

    def turn(history, text):
        msgs = history + [user(text, data_url(img)) if not history else {"role": "user", "content": text}]
        r = c.chat.completions.create(model=model, messages=msgs, **GREEDY)
        return msgs + [{"role": "assistant", "content": r.choices[0].message.content}], r

    a, _ = turn([], "First conversation.")
    b, _ = turn([], "Second conversation.")  # a's session is closed to make room
    _, ra = turn(a, "More?")
    assert ra.usage.prompt_tokens_details.cached_tokens == 0 and not ra.model_extra["tinyvila"]["conversation_continued"]
    b, _ = turn([], "Second conversation.")  # a's session (turn 2) was evicted by this one
    _, rb = turn(b, "More?")
    assert rb.usage.prompt_tokens_details.cached_tokens > 0


def test_body_over_the_limit_is_413(small_server):
    big = small_server.http.post("/v1/chat/completions", content=b"x" * (2 << 20))
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    ok = small_server.http.post("/v1/chat/completions", json={
        "model": str(small_server.client().models.list().data[0].id),
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    """Qwen2.5-VL: video, a context (4096) long enough that an answer runs for seconds, no waiting line."""
    d = tmp_path_factory.mktemp("qwen_serve")
    build_qwen2_5_vl(d)
    s = LiveServer(tmp_path_factory.mktemp("qwen_server"), d, "--allowed-local-media", d, "--api-key", KEY,
                   "--queue", 0)
    yield s, d, tinyvila.load(d, device="cpu", dtype="float32")
    assert s.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def test_video_on_qwen2_5_vl(qwen_server):
    s, d, eng = qwen_server
    frames = [draw_image(56, 56, seed=i) for i in range(6)]
    video = write_video(d / "clip.mp4", frames, fps=4)
    ref = eng.generate("What happens?", videos=[str(video)], temperature=0, max_new_tokens=8, sparsity="video")
    assert ref.stats.visual_tokens_kept < ref.stats.visual_tokens  # the video preset pruned it
    for url in (f"file://{video}", "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()):
        r = s.client().chat.completions.create(model=str(d), messages=[user("What happens?", url, kind="video")],
                                               temperature=0, max_tokens=8)
        assert r.choices[0].message.content == ref.text
        assert r.model_extra["tinyvila"]["visual_tokens"] == ref.stats.visual_tokens > 0
        assert r.model_extra["tinyvila"]["visual_tokens_kept"] == ref.stats.visual_tokens_kept


def test_a_conversation_continues_only_under_its_policy(qwen_server):
    """An image conversation runs under the image preset; a follow-up that adds a video needs the
    video preset, so it starts a new session rather than continuing the image one."""
    s, d, eng = qwen_server
    video = write_video(d / "clip2.mp4", [draw_image(56, 56, seed=20 + i) for i in range(4)], fps=4)
    picture = data_url(draw_image(84, 56, seed=11))
    client = s.client()
    first = [user("What is this?", picture)]
    a1 = client.chat.completions.create(model=str(d), messages=first, temperature=0, max_tokens=6)
    with eng.session(images=[draw_image(84, 56, seed=11)], sparsity="image") as ref:
        assert a1.choices[0].message.content == ref.ask("What is this?", temperature=0, max_new_tokens=6).text
    assert a1.model_extra["tinyvila"]["visual_tokens_kept"] == ref.last_result.stats.visual_tokens_kept
    history = first + [{"role": "assistant", "content": a1.choices[0].message.content},
                       user("And now?", f"file://{video}", kind="video")]
    r2 = client.chat.completions.create(model=str(d), messages=history, temperature=0, max_tokens=6)
    assert r2.model_extra["tinyvila"]["conversation_continued"] is False
    assert r2.usage.prompt_tokens_details.cached_tokens == 0
    with eng.session(images=[draw_image(84, 56, seed=11)], sparsity="video") as ref:
        ref.ask("What is this?", temperature=0, max_new_tokens=6)
        ref.messages[-1] = ref.message("assistant", a1.choices[0].message.content)
        ref.add_video(str(video))
        expected = ref.ask("And now?", temperature=0, max_new_tokens=6)
    assert r2.choices[0].message.content == expected.text


@pytest.fixture(scope="module")
def vila_video(tmp_path_factory):
    """A tiny LongVILA (qwen2 backbone) checkpoint folder and a 12-frame video inside it."""
    d = tmp_path_factory.mktemp("vila_serve")
    path = build_vila(str(d), backbone="qwen2").path
    return d, path, write_video(d / "clip.mp4", [draw_image(64, 48, seed=k) for k in range(12)])


def test_video_on_longvila(vila_video, tmp_path_factory):
    """LongVILA: a video by file:// and inline, under the server's video preset."""
    d, path, video = vila_video
    s = LiveServer(tmp_path_factory.mktemp("vila_server"), path, "--allowed-local-media", d, "--max-frames", 4)
    try:
        eng = tinyvila.load(path, device="cpu", dtype="float32", max_frames=4)
        ref = eng.generate("What happens?", videos=[str(video)], temperature=0, max_new_tokens=6, sparsity="video")
        assert 0 < ref.stats.visual_tokens_kept < ref.stats.visual_tokens and ref.text.strip()
        for url in (f"file://{video}", "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()):
            r = s.client().chat.completions.create(model=str(path), messages=[user("What happens?", url, kind="video")],
                                                   temperature=0, max_tokens=6)
            assert r.choices[0].message.content == ref.text
            assert r.model_extra["tinyvila"]["visual_tokens_kept"] == ref.stats.visual_tokens_kept
    finally:
        assert s.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def test_a_session_is_sized_for_all_of_its_media(vila_video):
    """A kept session's context was sized for the media it had: a follow-up bringing a video that
    does not fit it is answered by a new session sized for the whole conversation; so is a new
    conversation whose video comes before an image. Run on the worker itself, with the text room
    beyond the media (8192 tokens by default) cut to lie between what each prompt needs without
    and with its media."""
    from tinyvila.sampling import SamplingParams
    from tinyvila.serve import ChatRequest, Job, MediaURLs, SessionLRU, Worker, parse_args

    d, path, video = vila_video
    eng = tinyvila.load(path, device="cpu", dtype="float32", max_frames=4)
    args = parse_args([str(path), "--sparsity", "dense"])
    clip = MediaURLs(str(d)).parse(f"file://{video}", "video")
    picture = MediaURLs(None).parse(data_url(draw_image(56, 56, seed=4)), "image")

    def run(worker, turns):
        req = ChatRequest(None, turns, SamplingParams(max_new_tokens=3, temperature=0), [], False, False)
        kind, value = worker.run(Job(req, None, False, time.perf_counter()))
        assert kind == "done", value
        return value

    def roomy_answer(turns):  # the answer with the default room; the room that makes this case
        value = run(Worker(eng, SessionLRU(4, 1e12), args), turns)
        return value, value["prompt_tokens"] - value["stats"]["visual_tokens"] // 2

    first = [Turn("user", "Hi")]
    a1 = run(Worker(eng, SessionLRU(4, 1e12), args), first)["text"]
    follow_up = first + [Turn("assistant", a1), Turn("user", "What happens?", (clip,))]
    mixed = [Turn("user", "What happens?", (clip,)), Turn("assistant", "A clip."), Turn("user", "And here?", (picture,))]
    for turns, kept_first in ((follow_up, True), (mixed, False)):
        ref, room = roomy_answer(turns)
        eng.max_seq_len = room
        worker = Worker(eng, SessionLRU(4, 1e12), args)
        if kept_first:
            assert run(worker, first)["text"] == a1  # kept, its context sized for no media
        out = run(worker, turns)
        assert out["text"] == ref["text"] and not out["continued"]
        assert out["prompt_tokens"] == ref["prompt_tokens"] > room


def idle_health(server) -> dict:
    for _ in range(600):
        health = server.http.get("/health").json()
        if health["requests_in_flight"] == 0:
            return health
        time.sleep(0.1)
    raise AssertionError(f"the server stays busy: {health}")


def test_client_drops_mid_stream(qwen_server):
    s, d, eng = qwen_server
    before = idle_health(s)["answers_cancelled"]
    with long_stream(s, str(d)) as r:  # thousands of tokens: it would run for seconds
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    assert idle_health(s)["answers_cancelled"] == before + 1  # Session.cancel ended it
    r = s.client().chat.completions.create(model=str(d), messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert r.choices[0].message.content == eng.generate("Hi", temperature=0, max_new_tokens=10).text


def test_client_drops_a_non_streamed_request(qwen_server):
    s, d, eng = qwen_server
    before = idle_health(s)["answers_cancelled"]
    body = {"model": str(d), "messages": [{"role": "user", "content": "Count."}], "max_tokens": 100000,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=s.url, timeout=httpx.Timeout(60, read=1)) as impatient:
        with pytest.raises(httpx.ReadTimeout):  # it gives up long before thousands of tokens
            impatient.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert idle_health(s)["answers_cancelled"] == before + 1  # cancelled, not answered to the end


def test_busy_server_says_503(qwen_server):
    s, d, eng = qwen_server
    hi = {"model": str(d), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    auth = {"Authorization": f"Bearer {KEY}"}
    with long_stream(s, str(d)) as r:  # thousands of tokens: still answering when the next request comes
        lines = r.iter_lines()  # kept: a dropped line iterator closes the connection, which cancels the answer
        assert r.status_code == 200 and next(lines).startswith("data: {")
        busy = s.http.post("/v1/chat/completions", json=hi, headers=auth)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", (busy.text, s.http.get("/health").json())
        assert busy.json()["error"]["code"] == "queue_full"
    idle_health(s)  # the dropped stream's answer ends at its next token
    assert s.http.post("/v1/chat/completions", json=hi, headers=auth).status_code == 200


def test_done_is_sent_after_the_request_left_the_queue(eng):
    """The stream's [DONE] waits until its request no longer counts in flight, even when the worker
    thread is slow to return after its last event (here held back on purpose)."""
    from tinyvila.serve import ChatRequest, Job, Server, Turn

    args = SimpleNamespace(max_sessions=1, session_memory=1.0, queue=0, max_body_mb=1.0, api_key=None,
                           allowed_local_media=None, sparsity=None, max_batch=1)

    class LateWorker:
        def run(self, job):
            payload = {"text": "x", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1,
                       "cached_tokens": 0, "stats": {}, "continued": False}
            job.emit("piece", "x")
            job.emit("done", payload)
            threading.Event().wait(0.3)  # returns late: without the wait for it, [DONE] would come first
            return "done", payload

    async def in_flight_at_done():
        srv = Server(eng, args, "m")
        srv.worker = LateWorker()
        req = ChatRequest(None, [Turn("user", "Hi")], None, [], True, False)
        response = await srv.stream(Job(req, asyncio.get_running_loop(), True, time.perf_counter()), "m")
        seen = [(chunk, srv.in_flight) async for chunk in response.chunks]
        srv.pool.shutdown()
        return seen

    seen = asyncio.run(in_flight_at_done())
    assert seen[-1] == ("data: [DONE]\n\n", 0)


def streamed_chunks(eng, on_start):
    """The chunks of one streamed "Hi" answered by a Server on `eng`; `on_start(job)` replaces the
    job's own on_start, once the response exists (see its first use)."""
    from tinyvila.serve import ChatRequest, Job, Server, Turn, parse_args

    async def stream():
        srv = Server(eng, parse_args(["model"]), "m")
        req = ChatRequest(None, [Turn("user", "Hi")], SamplingParams(max_new_tokens=3, temperature=0), [], True,
                          False)
        job = Job(req, asyncio.get_running_loop(), True, time.perf_counter())
        responded, own = threading.Event(), job.on_start
        job.on_start = lambda: on_start(responded, own)
        response = await srv.stream(job, "m")
        responded.set()
        chunks = [chunk async for chunk in response.chunks]
        srv.pool.shutdown()
        return chunks

    return asyncio.run(stream())


def test_a_stream_responds_before_its_first_token(eng):
    """A streamed request's response (its headers) starts once its turn is admitted, while the model
    prefills; the first chunk (the role) waits for the first token, whose choice is held here until
    the response exists. A failure after that (out of memory) comes in the stream."""
    held = []
    chunks = streamed_chunks(eng, lambda responded, own: (held.append(responded.wait(10)), own()))
    assert held == [True]  # the response existed before the first token was chosen
    assert json.loads(chunks[0][len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1] == "data: [DONE]\n\n" and len(chunks) >= 4

    def out_of_memory(responded, own):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    chunks = streamed_chunks(eng, out_of_memory)
    error = json.loads(chunks[-2][len("data: "):])["error"]
    assert error["message"].startswith("out of GPU memory (tried to allocate 2.00 GiB)")
    assert error["type"] == "server_error"
    assert chunks[-1] == "data: [DONE]\n\n"


def test_next_request_right_after_done_is_served(qwen_server):
    """With --queue 0 a request sent the moment the last one's stream ends must not find it still
    counted in flight."""
    s, d, eng = qwen_server
    hi = {"model": str(d), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(5):
        with s.http.stream("POST", "/v1/chat/completions", json=dict(hi, stream=True), headers=auth) as r:
            assert r.status_code == 200
            assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
        assert s.http.post("/v1/chat/completions", json=hi, headers=auth).status_code == 200


def test_command_line_errors_are_one_line(llava_vicuna):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "tinyvila.serve", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cases = [(("--queue", -1), "--queue must be >= 0"), (("--sparsity", "bogus"), "unknown sparsity"),
                 (("--allowed-local-media", ROOT / "no-such-folder"), "--allowed-local-media"),
                 (("--port", taken.getsockname()[1]), "cannot listen on 127.0.0.1")]
        for args, message in cases:
            r = run(llava_vicuna, *args)
            assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tinyvila.serve", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--session-memory" in r.stdout and "--decode-sparsity" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "tinyvila.cli_options" in imported and "torch" not in imported  # --help answers at once


def test_connections_are_not_delayed_by_nagle():
    """Streamed pieces are small writes: each connection the server accepts has TCP_NODELAY, else
    on a keep-alive connection a piece waits for the client's delayed ACK (~40 ms)."""

    async def accepted_nodelay():
        sock = bind("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                raw = transport.get_extra_info("socket")
                seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(seen, 30)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_request_body_does_not_land_in_fresh_pages():
    """A freed 1.8 MB body's memory is kept for the next one: joining its chunks again faults in
    almost no pages. MALLOC_MMAP_THRESHOLD_ pins glibc's default (unmap any freed block over
    128 KB), under which every join faults in all ~450 pages."""
    code = ("import resource, sys\n"
            "from tinyvila.serve import keep_freed_buffers\n"
            "if sys.argv[1] == 'kept':\n    keep_freed_buffers()\n"
            "chunks = [bytes(256 << 10) for _ in range(7)]\n"
            "b''.join(chunks)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(10):\n    b''.join(chunks)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    faults = {how: int(subprocess.run([sys.executable, "-c", code, how], env=env, capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "kept")}
    assert faults["default"] > 10 * 400  # the measurement sees the faults
    assert faults["kept"] < 10 * 20


def test_bench_serve_starts_a_server_and_prints_both_sides(llava_vicuna, tmp_path, capsys):
    from tinyvila.tools import bench

    out_json = tmp_path / "serve.json"
    assert bench.main(["--serve", "--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image",
                       "64x48", "--new-tokens", "4", "--runs", "1", "--concurrency", "2", "--json", str(out_json),
                       "--prefill-graphs"]) == 0  # passed to both sides (a CPU runs no graphs)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"in-process", "HTTP, cached conversation", "HTTP, no cached session"} <= set(rows), out
    assert "n/a" not in out and "TTFT - in-process" in out and "ms in the server before its first token" in out
    record = json.loads(out_json.read_text())
    assert len(record["in_process"]) == 1 and len(record["http"]) == 2  # one timed run per client
    for run in record["http"]:
        assert run["cached"]["tinyvila"]["conversation_continued"] and run["cached"]["usage"][
            "prompt_tokens_details"]["cached_tokens"] > 0
        assert run["cold"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert run["cold"]["tinyvila"]["vision_s"] > 0 == run["cached"]["tinyvila"]["vision_s"]
        assert run["cached"]["ttft_s"] > run["cached"]["tinyvila"]["server_ttft_s"] > run["cached"]["tinyvila"]["ttft_s"]
        assert run["cached"]["usage"]["prompt_tokens"] == run["cold"]["usage"]["prompt_tokens"]  # the same turn


def test_bench_serve_on_a_running_server(server, capsys):
    from tinyvila.tools import bench

    assert bench.main(["--serve", server.url, "--api-key", KEY, "--image", "64x48", "--new-tokens", "3",
                       "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| in-process | n/a |" in out and "| HTTP, cached conversation |" in out
    assert bench.main(["--serve", server.url, "--api-key", "wrong", "--image", "64x48", "--runs", "1"]) == 2
    assert "401" in capsys.readouterr().err
