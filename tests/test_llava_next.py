"""LLaVA-NeXT parity with transformers on tiny random checkpoints in the hub format (fp32, CPU)."""
import pytest
import torch
from PIL import Image

import tinyvila

FLAVORS = ["llava_vicuna", "llava_mistral"]


def hf_model(path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def hf_processor(path):
    import json

    from transformers import AutoTokenizer, LlavaNextProcessor

    from fixtures_llava import pil_image_processor

    LlavaNextImageProcessorPil = pil_image_processor()

    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil.from_pretrained(path),
                              tokenizer=AutoTokenizer.from_pretrained(path), chat_template=template,
                              patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)  # as the hub processor_config.json


def conversation(turns, n_images=1):
    """transformers-style messages: images go first in the first user turn."""
    messages = []
    for i, (role, text) in enumerate(turns):
        items = [{"type": "image"}] * n_images if i == 0 else []
        messages.append({"role": role, "content": items + [{"type": "text", "text": text}]})
    return messages


def hf_inputs(proc, messages, images):
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    return proc(images=images, text=text, return_tensors="pt")


def hf_greedy(model, inputs, n, banned):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=banned,
                         eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def engines(request, llava_vicuna, llava_mistral):
    paths = {"llava_vicuna": llava_vicuna, "llava_mistral": llava_mistral}
    return {k: (p, tinyvila.load(p, device="cpu", dtype="float32")) for k, p in paths.items()}


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("image_index", [0, 1, 2])
def test_parity_with_transformers(engines, image_files, flavor, image_index):
    path, eng = engines[flavor]
    img = Image.open(image_files[image_index])
    proc, model = hf_processor(path), hf_model(path)
    messages = conversation([("user", "What is shown in this picture?")])
    inputs = hf_inputs(proc, messages, [img])

    # Preprocessing: pixel values and expanded ids.
    item = eng.model.prepare_image(img)
    n = inputs["pixel_values"].shape[1]
    assert torch.allclose(item.image.pixels, inputs["pixel_values"][0, :n], atol=1e-5)
    ids = eng.encode_text(eng.render(messages))
    with eng.session(images=[img]) as s:
        keys, _ = s.expand(ids, s.pending)
    expanded = [k if k >= 0 else eng.image_token_id for k in keys]
    assert expanded == inputs["input_ids"][0].tolist()

    # Logits for every prompt position.
    ours = eng.logits("What is shown in this picture?", images=[img])
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4

    # 20 greedy tokens, past any stop token, with the same ids banned on both sides.
    banned = eng.banned.nonzero().flatten().tolist()
    r = eng.generate("What is shown in this picture?", images=[img], max_new_tokens=20, temperature=0,
                     ignore_eos=True)
    assert r.token_ids == hf_greedy(model, inputs, 20, banned)
    assert len(r.token_ids) == 20
    assert r.stats.visual_tokens == item.n_tokens == expanded.count(eng.image_token_id)
    assert r.stats.prefill_tokens == len(expanded)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_two_turn_session_equals_one_shot(engines, image_files, flavor, monkeypatch):
    path, eng = engines[flavor]
    img = Image.open(image_files[0])
    encodes = []
    real = eng.model.encode
    monkeypatch.setattr(eng.model, "encode", lambda items, **kw: encodes.append(len(items)) or real(items, **kw))
    with eng.session(images=[img]) as s:
        first = s.ask("Describe the image.", max_new_tokens=8, temperature=0, ignore_eos=True)
        second = s.ask("What colour is it?", max_new_tokens=20, temperature=0, ignore_eos=True)
    assert encodes == [1], "the second question must not re-run the vision encoder"
    assert second.stats.prefill_tokens < second.stats.visual_tokens, "the image must not be re-prefilled"

    # The one-shot recomputation of the same conversation, by transformers.
    proc, model = hf_processor(path), hf_model(path)
    messages = conversation([("user", "Describe the image."), ("assistant", first.text),
                             ("user", "What colour is it?")])
    banned = eng.banned.nonzero().flatten().tolist()
    assert second.token_ids == hf_greedy(model, hf_inputs(proc, messages, [img]), 20, banned)


def test_stops_on_checkpoint_eos(engines, image_files, tmp_path):
    """Generation stops on generation_config's eos ids, and the stop token is not returned."""
    import json
    import shutil

    path, eng = engines["llava_vicuna"]
    img = Image.open(image_files[2])
    free = eng.generate("Hi", images=[img], max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    stop = free[5]
    d = tmp_path / "ckpt"
    shutil.copytree(path, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 2], "bos_token_id": 1}))
    stopped = tinyvila.load(d, device="cpu", dtype="float32").generate("Hi", images=[img], max_new_tokens=12,
                                                                       temperature=0)
    assert stopped.token_ids == free[:free.index(stop)]
    assert stopped.finish_reason == "stop"


def test_sampling_is_seeded(engines, image_files):
    _, eng = engines["llava_mistral"]
    img = Image.open(image_files[1])
    kw = dict(images=[img], max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    a = eng.generate("Tell me a story.", seed=7, **kw).token_ids
    b = eng.generate("Tell me a story.", seed=7, **kw).token_ids
    c = eng.generate("Tell me a story.", seed=8, **kw).token_ids
    assert a == b and a != c
    banned = set(eng.banned.nonzero().flatten().tolist())
    assert not banned & set(a + c)


def test_feature_layer_list(tmp_path, image_files):
    """A list of vision_feature_layer indices concatenates those hidden states (transformers)."""
    from fixtures_llava import build_llava_next

    build_llava_next(tmp_path, "vicuna", vision_feature_layer=[-3, -1])
    eng = tinyvila.load(tmp_path, device="cpu", dtype="float32")
    img = Image.open(image_files[1])
    inputs = hf_inputs(hf_processor(tmp_path), conversation([("user", "What?")]), [img])
    with torch.no_grad():
        ref = hf_model(tmp_path)(**inputs).logits[0]
    assert (eng.logits("What?", images=[img]) - ref).abs().max() <= 1e-4
