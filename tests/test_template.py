"""tinyvila.template against transformers' chat-template rendering (processor and tokenizer)."""

import datetime
import json
import os
import shutil

import pytest

from fixtures_tokenizer import (LLAVA_MISTRAL_TEMPLATE, LLAVA_VICUNA_TEMPLATE, QWEN2_VL_TEMPLATE,
                                build_llama_tokenizer, build_qwen2_tokenizer)
from tinyvila.errors import CheckpointError, TinyVilaError
from tinyvila.template import LLAVA_V1_SYSTEM, ChatTemplate, ChatTemplateError
from tinyvila.tokenizer import Tokenizer

import transformers  # noqa: E402  (the reference: a test dependency, never skipped)
transformers.logging.set_verbosity_error()

IMG = {"type": "image"}


def text(t):
    return {"type": "text", "text": t}


def user(*content):
    return {"role": "user", "content": list(content)}


def assistant(t):
    return {"role": "assistant", "content": [text(t)]}


SYSTEM = {"role": "system", "content": [text("You answer in one word.")]}

CONVERSATIONS = [
    [user(IMG, text("What is shown in this image?"))],
    [user(IMG, text("What is this?")), assistant("A cat."), user(text("What colour is it?"))],
    [SYSTEM, user(IMG, text("What is this?")), assistant("A cat."), user(IMG, IMG, text("And these two?"))],
    [SYSTEM, user(text("No image here, \"quotes\" & <tags>, \u00e9\u65e5\U0001F600\n"))],
    # what processors clean up: None-valued keys and OpenAI-style image_url items
    [user({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, text("Describe.")),
     {"role": "assistant", "content": [text("Ok.")]}, user(text("More."))],
]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """llava-hf style folders (with an image processor, so AutoProcessor loads) and a Qwen2.5-VL one."""
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for flavor in ("vicuna", "mistral"):
        fx = build_llama_tokenizer(str(root / flavor), flavor)
        transformers.LlavaNextImageProcessor().save_pretrained(fx.path)
        out[flavor] = fx.path
    out["qwen2"] = build_qwen2_tokenizer(str(root / "qwen2")).path
    return out


@pytest.mark.parametrize("flavor", ["vicuna", "mistral"])
@pytest.mark.parametrize("gen", [True, False])
def test_llava_checkpoint_templates_match_processor(ckpts, flavor, gen):
    processor = transformers.AutoProcessor.from_pretrained(ckpts[flavor])
    ours = ChatTemplate.from_dir(ckpts[flavor], special_tokens=Tokenizer.from_dir(ckpts[flavor]).special_tokens_map)
    assert ours.source == processor.chat_template == {"vicuna": LLAVA_VICUNA_TEMPLATE,
                                                      "mistral": LLAVA_MISTRAL_TEMPLATE}[flavor]
    for conv in CONVERSATIONS:
        want = processor.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
        assert ours.render(conv, add_generation_prompt=gen) == want


def test_llava_checkpoint_template_examples(ckpts):
    # the hub templates give the model-card prompts (with list content, images first)
    conv = [user(IMG, text("What is shown in this image?"))]
    vicuna, mistral = ChatTemplate.from_dir(ckpts["vicuna"]), ChatTemplate.from_dir(ckpts["mistral"])
    assert vicuna.render(conv) == "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    assert mistral.render(conv) == "[INST] <image>\nWhat is shown in this image? [/INST]"
    # string content renders no text with these templates (they only read typed items)
    assert ChatTemplate.from_dir(ckpts["vicuna"]).render([{"role": "user", "content": "hi"}]) == "USER: ASSISTANT:"


@pytest.mark.parametrize("extra", [{}, {"add_vision_id": True}])
def test_qwen2_template_matches_tokenizer(ckpts, extra):
    ref = transformers.AutoTokenizer.from_pretrained(ckpts["qwen2"])
    ours = ChatTemplate.from_dir(ckpts["qwen2"], special_tokens=Tokenizer.from_dir(ckpts["qwen2"]).special_tokens_map)
    assert ours.source == ref.chat_template == QWEN2_VL_TEMPLATE
    convs = CONVERSATIONS + [
        [user({"type": "video"}, IMG, text("Compare."))],
        [{"role": "user", "content": "plain string content"}, {"role": "assistant", "content": "ok"}],
    ]
    for conv in convs:
        for gen in (True, False):
            want = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **extra)
            assert ours.render(conv, add_generation_prompt=gen, **extra) == want
    assert ours.render(convs[0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is shown in this image?<|im_end|>\n<|im_start|>assistant\n")


# Templates exercising the environment: tags, filters, globals, whitespace control, special tokens.
FEATURE_TEMPLATES = [
    "{% for m in messages %}{{ m['role'] }}:{% generation %}{{ m['content'][0]['text'] }}{% endgeneration %}|"
    "{% endfor %}",
    "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}{{ {'b': 1, 'a': '<&>'} | tojson(sort_keys=True) }}",
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}{{ eos_token }}{% endfor %}{{ pad_token }}{{ unk_token }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.index > 2 %}{% break %}"
    "{% endif %}{% endfor %}{{ ns.n }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') }}",
    "  {% for m in messages %}\n    {%- if m['role'] == 'user' %}\n  U {{ m['content'] | length }}\n  {% endif %}\n"
    "{% endfor %}\n{% if add_generation_prompt %}GEN{% endif %}{{ custom_var }}",
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
def test_environment_matches_transformers(ckpts, template):
    ref = transformers.AutoProcessor.from_pretrained(ckpts["mistral"])
    ours = ChatTemplate(template, Tokenizer.from_dir(ckpts["mistral"]).special_tokens_map)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(conv, chat_template=template, add_generation_prompt=gen, custom_var="X")
            assert ours.render(conv, add_generation_prompt=gen, custom_var="X") == want
    if "strftime_now" in template:
        assert ours.render(CONVERSATIONS[0]).endswith(str(datetime.date.today().year))


def test_none_valued_keys_are_dropped():
    """transformers 5.23's processors drop None-valued message keys before rendering (5.17 kept
    them), so a template that dumps messages never sees them; we follow the newer behaviour."""
    t = ChatTemplate("{{ messages | tojson }}")
    out = t.render([{"role": "user", "content": [text("x")], "tool_calls": None}], add_generation_prompt=False)
    assert "tool_calls" not in out and '"x"' in out


def test_generation_tag_renders_body(ckpts):
    # llava-1.5-hf / vicuna template wraps assistant text in {% generation %}
    conv = [user(IMG, text("Q?")), assistant("Answer."), user(text("Q2?"))]
    want = "USER: <image>\nQ? ASSISTANT: Answer. USER: Q2? ASSISTANT:"
    assert ChatTemplate.from_dir(ckpts["vicuna"]).render(conv) == want
    t = ChatTemplate("{% generation %}[{{ x }}]{% endgeneration %}{%- generation -%} {{ y }} {%- endgeneration -%}")
    assert t.render([], x=1, y=2) == "[1]2"


def test_raise_exception(ckpts):
    conv = [{"role": "tool", "content": [text("x")]}]
    with pytest.raises(Exception, match="Only user and assistant roles are supported!"):
        transformers.AutoProcessor.from_pretrained(ckpts["mistral"]).apply_chat_template(conv)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported!"):
        ChatTemplate.from_dir(ckpts["mistral"]).render(conv)
    assert issubclass(ChatTemplateError, TinyVilaError)
    # other template failures are one-line user errors too
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value)
    with pytest.raises(ChatTemplateError):  # the sandbox refuses underscore namespace attributes
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])


def test_special_tokens_read_from_files(ckpts):
    t = ChatTemplate.from_dir(ckpts["mistral"])
    assert t.special_tokens == Tokenizer.from_dir(ckpts["mistral"]).special_tokens_map
    assert ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}").render([]) == "||"
    t = ChatTemplate.from_dir(ckpts["qwen2"])
    assert (t.special_tokens.get("bos_token"), t.special_tokens["eos_token"]) == (None, "<|im_end|>")


# --- built-ins: these literal strings are the spec --------------------------------------------

def test_builtin_llava_v1():
    t = ChatTemplate.builtin("llava_v1")
    assert t.render([user(IMG, text("What is this?"))]) == f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    conv = [user(IMG, text("What is this?")), assistant("A cat."), user(text("Colour?"))]
    turn1 = f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    assert t.render(conv) == turn1 + "USER: Colour? ASSISTANT:"
    assert t.render(conv[:2], add_generation_prompt=False) == turn1
    assert t.render([{"role": "system", "content": "Be brief."}] + conv) == (
        "Be brief. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:")
    assert t.render([SYSTEM, user(IMG, IMG, text("Both?"))]) == (
        "You answer in one word. USER: <image>\n<image>\nBoth? ASSISTANT:")
    assert t.render([{"role": "user", "content": "plain"}]) == f"{LLAVA_V1_SYSTEM} USER: plain ASSISTANT:"
    assert LLAVA_V1_SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                               "gives helpful, detailed, and polite answers to the human's questions.")


def test_builtin_mistral_instruct():
    t = ChatTemplate.builtin("mistral_instruct")
    assert t.render([user(IMG, text("What is this?"))]) == "[INST] <image>\nWhat is this? [/INST]"
    conv = [user(IMG, text("What is this?")), assistant("A cat."), user(text("Colour?"))]
    assert t.render(conv) == "[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] Colour? [/INST]"
    assert t.render([SYSTEM] + conv) == ("[INST] <<SYS>>\nYou answer in one word.\n<</SYS>>\n\n<image>\n"
                                         "What is this? [/INST] A cat. </s>[INST] Colour? [/INST]")
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "tool", "content": "x"}])


# --- which template a folder uses ---------------------------------------------------------------

def write(path, name, data):
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def test_template_precedence(ckpts, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(ckpts["mistral"], d)
    os.remove(os.path.join(d, "chat_template.json"))
    conv = [user(text("q"))]

    def render():
        return ChatTemplate.from_dir(d, default="llava_v1").render(conv)

    assert render().startswith(LLAVA_V1_SYSTEM)  # nothing shipped: the built-in default
    with pytest.raises(CheckpointError, match="no chat template"):
        ChatTemplate.from_dir(d)
    tc = json.load(open(os.path.join(d, "tokenizer_config.json")))
    write(d, "tokenizer_config.json", dict(tc, chat_template=[{"name": "tool_use", "template": "TOOL"},
                                                             {"name": "default", "template": "TC-LIST"}]))
    assert render() == "TC-LIST"
    write(d, "tokenizer_config.json", dict(tc, chat_template="TC"))
    assert render() == "TC"
    assert transformers.AutoTokenizer.from_pretrained(d).chat_template == "TC"
    write(d, "chat_template.jinja", "JINJA")
    assert render() == "JINJA"
    assert transformers.AutoProcessor.from_pretrained(d).chat_template == "JINJA"
    write(d, "chat_template.json", {"chat_template": "JSON"})
    assert render() == "JSON"  # as AutoProcessor: the legacy .json wins over .jinja
    assert transformers.AutoProcessor.from_pretrained(d).chat_template == "JSON"
    write(d, "processor_config.json", {"chat_template": "PROC"})
    assert render() == "PROC"


def test_template_errors(tmp_path):
    d = str(tmp_path)
    write(d, "chat_template.json", "{broken")
    with pytest.raises(CheckpointError, match="chat_template.json"):
        ChatTemplate.from_dir(d)
    write(d, "chat_template.json", {"no_template": 1})
    with pytest.raises(CheckpointError, match="chat_template"):
        ChatTemplate.from_dir(d)
    write(d, "chat_template.json", {"chat_template": "{% for m in messages %}{{ m }"})
    with pytest.raises(CheckpointError, match="bad chat template") as e:
        ChatTemplate.from_dir(d)
    assert "\n" not in str(e.value)
    os.remove(os.path.join(d, "chat_template.json"))
    write(d, "tokenizer_config.json", {"chat_template": [{"name": "other", "template": "x"}]})
    with pytest.raises(CheckpointError, match="default"):
        ChatTemplate.from_dir(d)
    with pytest.raises(CheckpointError, match="unknown built-in"):
        ChatTemplate.builtin("vicuna_v9")
