"""Chat templates rendered exactly as transformers 5.x renders them (no transformers import).

A checkpoint's template is jinja text; transformers renders it in a sandboxed jinja2 environment
(trim_blocks, lstrip_blocks, loop controls), with its own `tojson` filter (no HTML escaping),
`raise_exception`, `strftime_now`, a `{% generation %}` tag (renders its body; transformers uses it
only to find assistant spans), `dict` and an underscore-safe `namespace`. The variables are the
messages, `add_generation_prompt`, `tools`, `documents`, the tokenizer's named special tokens
(bos_token, eos_token, unk_token, pad_token, ... and model-specific ones such as image_token) and any
extra keyword arguments. We do the same.

Message content: transformers' processors pass `content` to the template untouched, string or list.
The llava-hf templates only read list content (`message['content'] | selectattr('type', ...)`), so a
plain string renders as nothing there, and the Qwen2-VL template accepts both. The engine must
therefore pass list content: one `{"type": "image"}` per image, before `{"type": "text", "text": ...}`.
Like the processor we drop keys whose value is None and turn OpenAI `image_url` items into
`{"type": "image", "url": ...}`.

Which template: `ChatTemplate.from_dir` follows `AutoProcessor.from_pretrained` (LLaVA-NeXT and
Qwen2.5-VL run through a processor): processor_config.json `chat_template`, else chat_template.json,
else chat_template.jinja (the processor prefers the legacy .json file when both exist), else the
tokenizer's template (tokenizer_config.json `chat_template`, a string or a list of
{"name", "template"} of which "default" is used; what a bare `llm/` folder has), else a built-in.
"""

import json
import os
import re
from datetime import datetime

from tinyvila.errors import CheckpointError, TinyVilaError


class ChatTemplateError(TinyVilaError):
    """The conversation cannot be rendered by the checkpoint's template (e.g. `raise_exception`)."""


# Built-ins, used only when a checkpoint ships no template. The BOS is not in the text: the
# tokenizer adds it.

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# `<image>\n` per image item, then the text items, concatenated; string content is the text.
_CONTENT_MACRO = (
    "{%- macro content_text(content, images) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- if images -%}{%- for c in content if c.get('type') == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- for c in content if c.get('type') == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = content_text(messages[0]['content'], false) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
)

# LLaVA `conv_llava_v1` (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
# "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:"
LLAVA_V1_TEMPLATE = _CONTENT_MACRO + (
    "{{- (system if system is not none else '" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "') + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + content_text(message['content'], true) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- generation -%}{{- content_text(message['content'], false) + '</s>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('llava_v1: only system, user and assistant roles are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# LLaVA `conv_mistral_instruct` (SeparatorStyle.LLAMA_2, sep "", sep2 "</s>"):
# "[INST] <image>\n{q} [/INST] {a} </s>[INST] {q2} [/INST]"; a system message is wrapped in
# "<<SYS>>\n{system}\n<</SYS>>\n\n" in front of the first user text.
MISTRAL_INSTRUCT_TEMPLATE = _CONTENT_MACRO + (
    "{%- set ns = namespace(first=true) -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' -}}"
    "{%- if ns.first and system -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{%- set ns.first = false -%}"
    "{{- content_text(message['content'], true) + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' -}}"
    "{%- generation -%}{{- content_text(message['content'], false) + ' </s>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('mistral_instruct: only system, user and assistant roles are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# VILA's `llama_3` conversation (Llama-3-LongVILA; SeparatorStyle.LLAMA_3, sep "<|eot_id|>"):
# "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" then per
# message "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>", then the assistant
# header as the generation prompt. The BOS is in the text; VILA's tokenization adds another (P7).
LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using natural "
                  "language.")
LLAMA_3_TEMPLATE = _CONTENT_MACRO + (
    "{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{{- (system if system is not none else '" + LLAMA_3_SYSTEM + "') + '<|eot_id|>' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ('user', 'assistant') -%}"
    "{{- raise_exception('llama_3: only system, user and assistant roles are supported') -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- content_text(message['content'], false) + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- content_text(message['content'], true) + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"llava_v1": LLAVA_V1_TEMPLATE, "mistral_instruct": MISTRAL_INSTRUCT_TEMPLATE,
                     "llama_3": LLAMA_3_TEMPLATE}


def _one_line(text):
    return re.sub(r"\s+", " ", str(text)).strip()


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """A jinja namespace that refuses underscore-prefixed attribute names (as transformers')."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    class DictMaker:
        """`dict(...)` / `dict.fromkeys(...)` without exposing the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise ChatTemplateError(_one_line(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = DictMaker()
    env.globals["namespace"] = SafeNamespace
    return env


_ENV = None


def _plain(value):
    """What the template may see: JSON-like data; other objects (images, arrays) become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalars
    return f"<{type(value).__name__}>"


def _prepare(messages):
    """The processor's clean-up of a conversation (a fresh copy; the caller's list is untouched)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            content = []
            for item in message["content"]:
                if isinstance(item, dict) and item.get("type") == "image_url" and "image_url" in item:
                    url = item["image_url"]
                    item = {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
                content.append(item)
            message["content"] = content
        message = _plain(message)
        # reasoning under older names is also offered as `reasoning_content` / `thinking`
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _special_tokens_from_files(path):
    """Named special tokens as strings, read from tokenizer_config.json / special_tokens_map.json.
    Approximate (no class defaults): pass `Tokenizer.special_tokens_map` for exactness."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        data = _read_json(os.path.join(path, name)) or {}
        for key, value in data.items():
            if key.endswith("_token") and not key.startswith("add_"):
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    out[key] = value
                elif value is None:
                    out.pop(key, None)
    return out


def _read_json(file):
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _template_text(value, file):
    """A template from a JSON field: a string, or transformers' list of {"name", "template"}."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise CheckpointError(f"{file}: chat_template list has no 'default' template")
    if isinstance(value, dict) and isinstance(value.get("default"), str):
        return value["default"]
    raise CheckpointError(f"{file}: chat_template is not a string")


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with."""

    def __init__(self, source, special_tokens=None, origin="<string>"):
        import jinja2

        global _ENV
        if _ENV is None:
            _ENV = _environment()
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{origin}: bad chat template, line {e.lineno}: {_one_line(e.message)}") from None

    @classmethod
    def builtin(cls, name, special_tokens=None):
        if name not in BUILTIN_TEMPLATES:
            raise CheckpointError(f"unknown built-in chat template {name!r} (have: {', '.join(BUILTIN_TEMPLATES)})")
        return cls(BUILTIN_TEMPLATES[name], special_tokens, origin=f"built-in {name}")

    @classmethod
    def from_dir(cls, path, default=None, special_tokens=None):
        """The checkpoint's template (see the module docstring for the order), else the built-in
        `default` ("llava_v1" or "mistral_instruct"). `special_tokens`: the tokenizer's
        `special_tokens_map`; read from the tokenizer files when not given."""
        path = os.fspath(path)
        if special_tokens is None:
            special_tokens = _special_tokens_from_files(path)
        processor_config = os.path.join(path, "processor_config.json")
        value = (_read_json(processor_config) or {}).get("chat_template")
        if value is not None:
            return cls(_template_text(value, processor_config), special_tokens, processor_config)
        json_file = os.path.join(path, "chat_template.json")
        data = _read_json(json_file)
        if data is not None:
            if "chat_template" not in data:
                raise CheckpointError(f"{json_file}: no 'chat_template' key")
            return cls(_template_text(data["chat_template"], json_file), special_tokens, json_file)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            try:
                with open(jinja_file, encoding="utf-8") as f:
                    return cls(f.read(), special_tokens, jinja_file)
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{jinja_file}: cannot read ({_one_line(e)})") from None
        tc_file = os.path.join(path, "tokenizer_config.json")
        value = (_read_json(tc_file) or {}).get("chat_template")
        if value is not None:
            return cls(_template_text(value, tc_file), special_tokens, tc_file)
        if default is None:
            raise CheckpointError(
                f"{path}: no chat template (looked for processor_config.json, chat_template.json, "
                f"chat_template.jinja, tokenizer_config.json) and no built-in default given")
        return cls.builtin(default, special_tokens)

    def render(self, messages, add_generation_prompt=True, **extra):
        """The prompt text for a conversation of transformers-style message dicts."""
        import jinja2

        variables = _plain({**self.special_tokens, **extra})
        try:
            return self._template.render(messages=_prepare(messages), tools=variables.pop("tools", None),
                                         documents=variables.pop("documents", None),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except TinyVilaError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"{self.origin}: cannot render the conversation ({type(e).__name__}: "
                                    f"{_one_line(e)})") from None
