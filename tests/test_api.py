"""The public Python API: streaming, callbacks, raw prompts, image inputs, sessions, hub resolution."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import tinyvila
from tinyvila.batch import Batcher
from tinyvila.errors import TinyVilaError
from tinyvila.sampling import SamplingParams

GREEDY = dict(temperature=0, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def eng(llava_vicuna):
    return tinyvila.load(llava_vicuna, device="cpu", dtype=torch.float32)


def test_callback_and_stream_give_the_answer(eng, image_files):
    pieces = []
    r = eng.generate("Describe it.", images=[image_files[0]], callback=pieces.append, **GREEDY)
    assert "".join(pieces) == r.text == eng.tokenizer.decode(r.token_ids)
    with eng.session(images=[image_files[0]]) as s:
        streamed = "".join(s.stream("Describe it.", **GREEDY))
        assert streamed == r.text and s.last_result.token_ids == r.token_ids


def test_on_open_and_on_start_come_once_before_the_text(eng, image_files):
    """Session.complete's on_open marks the admitted turn (its image encoded, nothing prefilled: a
    server starts its response there), on_start the first token, both before any text."""
    events = []
    with eng.session(images=[image_files[0]]) as s:
        ids = eng.encode_text(eng.render([s.user_message("Describe it.", s.pending)]))
        r = s.complete(ids, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True),
                       callback=events.append, on_start=lambda: events.append(None),
                       on_open=lambda: events.append(("open", len(s.visual), len(s.tokens))))
    assert events[0] == ("open", 1, 0) and events[1] is None
    assert None not in events[2:] and "".join(events[2:]) == r.text and r.text


def test_a_failing_or_unreached_on_open(eng, image_files):
    """A prompt too long for the context fails before on_open; an on_open that raises ends the
    turn before its prefill and leaves the session usable."""
    opened = []
    with eng.session(images=[image_files[0]]) as s:
        long_ids = eng.encode_text(eng.render([s.user_message("word " * s.cache.max_len, s.pending)]))
        with pytest.raises(TinyVilaError, match="context"):
            s.complete(long_ids, SamplingParams(max_new_tokens=2), on_open=lambda: opened.append(1))
        assert not opened

        def refuse():
            raise RuntimeError("no")

        ids = eng.encode_text(eng.render([s.user_message("Describe it.", s.pending)]))
        with pytest.raises(RuntimeError, match="no"):
            s.complete(ids, SamplingParams(max_new_tokens=2), on_open=refuse)
        assert not s.tokens and s.ask("Describe it.", **GREEDY).token_ids


def test_stopping_a_stream_keeps_the_session_usable(eng, image_files):
    with eng.session(images=[image_files[0]]) as s:
        stream = s.stream("Describe it.", temperature=0, max_new_tokens=50, ignore_eos=True)
        next(stream)
        stream.close()
        assert s.last_result.finish_reason == "cancelled"
        assert s.ask("And again?", **GREEDY).token_ids


def test_image_inputs_are_equivalent(eng, image_files):
    path = image_files[1]
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    answers = {kind: eng.generate("What?", images=[src], **GREEDY).token_ids
               for kind, src in (("path", path), ("str", str(path)), ("pil", pil), ("array", arr))}
    assert len({tuple(a) for a in answers.values()}) == 1


def test_raw_prompt_and_input_ids_paths(eng, image_files):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = eng.render(messages)
    templated = eng.generate("What?", images=[image_files[2]], **GREEDY)
    raw = eng.generate(text, images=[image_files[2]], template=False, **GREEDY)
    ids = eng.generate(input_ids=eng.encode_text(text), images=[image_files[2]], **GREEDY)
    assert templated.token_ids == raw.token_ids == ids.token_ids


def test_stats_fields(eng, image_files):
    r = eng.generate("What?", images=[image_files[0]], **GREEDY)
    d = r.stats.to_dict()
    for key in ("prefill_tokens", "visual_tokens", "visual_tokens_kept", "prefill_s", "ttft_s",
                "decode_tokens", "decode_tok_s", "peak_mem_bytes"):
        assert key in d
    assert r.stats.decode_tokens == len(r.token_ids) - 1
    assert r.stats.visual_tokens == r.stats.visual_tokens_kept > 0
    assert r.stats.ttft_s >= r.stats.prefill_s > 0 and r.stats.peak_mem_bytes > 0


def test_ttft_counts_the_templating(eng, image_files, monkeypatch):
    """A question's TTFT runs from the call: rendering the template and tokenizing included
    (prompt_s), as a caller of Session.ask, the batcher or the server waits for them."""
    render = eng.render
    monkeypatch.setattr(eng, "render", lambda *a, **k: time.sleep(0.05) or render(*a, **k))
    with eng.session(images=[image_files[0]]) as s:
        r = s.ask("What?", **GREEDY)
    assert r.stats.prompt_s >= 0.05
    assert r.stats.ttft_s >= r.stats.prompt_s + r.stats.vision_s + r.stats.prefill_s
    batcher = Batcher(eng)
    with eng.session(images=[image_files[0]]) as s:
        request = batcher.ask(s, "What?", **GREEDY)
        batcher.run()
        stats = request.wait().stats
    assert stats.prompt_s >= 0.05 and stats.ttft_s >= stats.prompt_s + stats.prefill_s


def test_session_images_added_later_and_what_the_cache_holds(eng, image_files):
    with eng.session(system="Answer briefly.") as s:
        s.ask("Hello", **GREEDY)
        s.add_image(image_files[0])
        r = s.ask("What is this?", **GREEDY)
        assert r.stats.visual_tokens > 0
        # the cache's slots, in order: text (the system prompt, turn 1), the image, turn 2's text
        visual = [i for i, key in enumerate(s.tokens) if key < 0]
        assert visual and visual[0] > 0 and visual[-1] < len(s.tokens) - 1
        assert visual == list(range(visual[0], visual[0] + r.stats.visual_tokens))  # one contiguous item
        assert set(s.tokens[visual[0]:visual[-1] + 1]) == {-1}  # media item 0
        assert len(s.tokens) == s.cache.length
        s.clear()
        assert s.cache.length == 0 and not s.messages
    with pytest.raises(TinyVilaError):
        s.ask("closed session")


@pytest.mark.parametrize("sparsity", [{}, dict(decode_sparsity=0.5)])
def test_the_next_session_of_a_closed_ones_size_takes_its_caches(eng, image_files, sparsity):
    """generate() after generate(): the closed session's KV cache (and decode buffer, and on a GPU
    the graphs captured over them) serve the next session of the same context size, whose answer
    is what a fresh session gives, whatever the previous one left in them."""
    opts = dict(GREEDY, max_seq_len=600, **sparsity)
    eng.drop_spare()
    fresh = eng.generate("Describe it.", images=[image_files[1]], **opts)
    left = eng._spare
    assert left is not None and left.cache.max_len == 600 and (left.decode_buffer is not None) == bool(sparsity)
    other = eng.generate("What colors are in the picture, and where?", images=[image_files[0]], **opts)
    assert eng._spare.cache is left.cache and eng._spare.decode_buffer is left.decode_buffer
    again = eng.generate("Describe it.", images=[image_files[1]], **opts)
    assert eng._spare.cache is left.cache
    assert again.token_ids == fresh.token_ids and again.text == fresh.text
    assert other.token_ids != fresh.token_ids  # the answers depend on the inputs: the equality above means something
    eng.generate("Describe it.", images=[image_files[1]], **dict(opts, max_seq_len=601))
    assert eng._spare.cache is not left.cache and eng._spare.cache.max_len == 601  # another size: a new cache
    eng.drop_spare()
    assert eng._spare is None


def test_a_session_closed_mid_answer_leaves_no_spare(eng, image_files):
    eng.drop_spare()
    with eng.session(images=[image_files[0]], max_seq_len=600) as s:
        pieces = s.stream("Describe it.", **GREEDY)
        next(pieces)
    assert eng._spare is None and s.cache is None
    pieces.close()


def test_bad_sampling_options(eng):
    with pytest.raises(TinyVilaError, match="top_p"):
        eng.generate("Hi", top_p=0)
    with pytest.raises(TypeError, match="unknown"):
        eng.generate("Hi", beams=3)
    with pytest.raises(TinyVilaError, match="empty"):
        eng.session().ask("   ")


def test_dtype_names(llava_vicuna):
    assert tinyvila.load(llava_vicuna, device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(TinyVilaError, match="unknown dtype"):
        tinyvila.load(llava_vicuna, device="cpu", dtype="int3")


def test_hub_id_from_local_cache(llava_vicuna, tmp_path):
    """A hub id resolves from the local hub cache without any network."""
    cache = tmp_path / "hub"
    snap = cache / "models--tiny--llava" / "snapshots" / "0123abc"
    shutil.copytree(llava_vicuna, snap)
    (cache / "models--tiny--llava" / "refs").mkdir()
    (cache / "models--tiny--llava" / "refs" / "main").write_text("0123abc")
    # huggingface_hub reads its environment at import: use a fresh process.
    code = "import tinyvila; print(tinyvila.load('tiny/llava', device='cpu').path.resolve())"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snap.resolve())


def test_import_is_light():
    code = "import sys, tinyvila; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_logits_in_a_session_with_history_use_the_right_media(eng, image_files):
    """Media are indexed over the whole conversation: scoring after a turn with image A and a new
    image B equals scoring the same two-image prompt in a fresh session."""
    a, b = image_files[0], image_files[1]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}]}]
    ids = eng.encode_text(eng.render(messages))
    with eng.session(images=[a]) as s:
        s.ask("One?", **GREEDY)
        s.add_image(b)
        ours = s.logits(ids)
    assert torch.allclose(ours, eng.logits(input_ids=ids, images=[a, b]), atol=1e-5)
