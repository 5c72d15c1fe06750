"""Tiny tokenizer checkpoints for tests, built offline in well under a second.

`build_llama_tokenizer` writes the tokenizer files of a llava-hf LLaVA-NeXT repo
(`llava-hf/llava-v1.6-{vicuna,mistral}-7b-hf`) around a freshly trained 500-piece SentencePiece BPE;
`build_qwen2_tokenizer` does the same for a Qwen2.5-VL-like repo (or a qwen2 LongVILA `llm/` folder
with vocab.json + merges.txt) around a tiny byte-level BPE.

The files are written the way the hub ships them (transformers 4.x era: `tokenizer.json` built by the
4.x slow->fast converter, `tokenizer_config.json` with `added_tokens_decoder`, `special_tokens_map.json`,
`added_tokens.json`, `chat_template.json`), not through transformers 5's `save_pretrained`, which
would rewrite them in its own newer layout (Metaspace everywhere, no legacy normalizer) and so would
not exercise the files real checkpoints carry. transformers itself is only the reference the tests
compare against: `AutoTokenizer.from_pretrained(out_dir)` on these folders. Tests that want the
transformers-5 layout too can re-save a folder with it.

Import from tests as `from fixtures_tokenizer import ...` (pytest puts tests/ on sys.path).
"""

import json
import os
import random
from dataclasses import dataclass

# --- chat templates, as shipped on the hub -------------------------------------------------------

# llava-hf/llava-v1.6-vicuna-7b-hf `chat_template.json`: the same text as llava-1.5-hf's. Source: the
# OpenVINO GenAI fallback table (openvinotoolkit/openvino.genai, src/cpp/src/tokenizer.cpp) quotes it
# as "llava-1.5, llava-v1.6-vicuna (chat_template.json)", and transformers' own llava_next processor
# test (tests/models/llava_next/test_processing_llava_next.py) uses this exact template. Note that it
# has no default system prompt, unlike the original LLaVA `llava_v1` conversation.
LLAVA_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf `chat_template.json` after its Sep 2024 "support system msg"
# commit. Source: a LlavaNextProcessor loaded from the hub and printed (a blog post in the pages
# index), and a template table in the code index that marks the older variant, which wrote the
# typo '<\\s> ' after answers, as "llava-next old". Not read from the hub file itself (not reachable
# from here): if the real file differs, the real file wins, since the runtime reads it.
LLAVA_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
    "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
    "message['content'][0]['text'] + '</s> '}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2-VL / Qwen2.5-VL-Instruct `chat_template.json` (qwen2_5_vl.md section 9; the same text is
# quoted in the OpenVINO GenAI table as "Qwen2-VL-2B-Instruct (tokenizer_config.json)").
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_ADDED_TOKENS = [  # qwen2_5_vl.md section 9, in id order; the last 8 are not "special"
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class TokenizerFixture:
    path: str
    vocab_size: int  # base vocabulary (SentencePiece pieces / BPE ids), without added tokens
    image_token_id: int | None
    pad_token_id: int | None
    eos_token_id: int | None


def training_sentences(n=400, seed=0):
    """Deterministic English-ish sentences (with digits, punctuation and a few accents)."""
    rng = random.Random(seed)
    words = (
        "the a an cat dog man woman child car bus tree house street sky image picture photo video frame "
        "what is this that there here describe show tell me about left right top bottom red blue green "
        "white black small big old new running sitting standing holding looking at on in of with and or "
        "but not it's don't can you see how many people are doing where why who which color caf\u00e9 "
        "na\u00efve assistant user question answer helpful detailed polite"
    ).split()
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 2025)))
        s = " ".join(ws)
        out.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return out


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _added(content, special=True, normalized=False):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def _write_config(out_dir, model_type):
    # Only `model_type` matters to AutoTokenizer (it picks the tokenizer class); a fuller config.json
    # written later by a model fixture may replace this file.
    if model_type is not None:
        _write_json(os.path.join(out_dir, "config.json"), {"model_type": model_type})


def _train_spm(model_path, vocab_size):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    # Llama-like trainer settings (cf. the proto of Llama/Mistral tokenizer.model): BPE, byte fallback,
    # split digits, dummy prefix, identity normalization, whitespace kept as is.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=model_path)


def build_llama_tokenizer(out_dir, flavor="vicuna", files="json", model_type="llava_next", vocab_size=500,
                          layout="hub"):
    """Write a tiny llava-hf-style LLaVA-NeXT tokenizer folder; return a TokenizerFixture.

    flavor: "vicuna" or "mistral" (chat template and the `legacy` flag). files: "json" (tokenizer.json
    + tokenizer.model, as the hub ships) or "spm" (no tokenizer.json: tokenizer.model +
    tokenizer_config.json + special_tokens_map.json + added_tokens.json). model_type: written to a
    minimal config.json ("llava_next" as on the hub; None writes no config.json, which makes
    transformers 5 rebuild the tokenizer as a LlamaTokenizer instead of loading tokenizer.json as is).
    layout="original" writes what the original liuhaotian repos have instead: no `<image>` / `<pad>`
    tokens (image_token_id is then None), `<unk>` as pad token and no chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    # `legacy`: the 4.x converter wrote a Prepend("▁")+Replace normalizer for legacy=True (Mistral's
    # tokenizer_config says true) and a Metaspace(prepend_scheme="first") pre-tokenizer for
    # legacy=False (Llama-2 / vicuna-v1.5 configs say false). We use one of each so both tokenizer.json
    # shapes are exercised; which one each llava-hf repo really has is unverified (spec part 5 item 5).
    if flavor == "vicuna":
        legacy, template = False, LLAVA_VICUNA_TEMPLATE
    elif flavor == "mistral":
        legacy, template = True, LLAVA_MISTRAL_TEMPLATE
    else:
        raise ValueError(f"unknown flavor {flavor!r}")
    if files not in ("json", "spm"):
        raise ValueError(f"unknown files kind {files!r}")
    if layout not in ("hub", "original"):
        raise ValueError(f"unknown layout {layout!r}")
    llava_tokens = layout == "hub"
    os.makedirs(out_dir, exist_ok=True)

    sp = _train_spm(os.path.join(out_dir, "tokenizer.model"), vocab_size)
    n = sp.get_piece_size()
    image_id, pad_id = n, n + 1  # llava-hf: <image> = 32000, <pad> = 32001 right after the 32000 pieces
    if not llava_tokens:
        image_id, pad_id = None, 0

    if files == "json":
        # BPE over the pieces, as the transformers converters build it. Merges come from transformers'
        # own `generate_merges` (what 5.x derives from a bare tokenizer.model; 4.x ranked them the same
        # way up to ties), so this tokenizer.json and the tokenizer.model alone give the same tokens.
        from transformers.tokenization_utils_base import generate_merges

        vocab = {sp.id_to_piece(i): i for i in range(n)}
        merges = generate_merges(vocab)
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                            fuse_unk=True, byte_fallback=True))
        if legacy:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
        if llava_tokens:
            tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                                    AddedToken("<pad>", normalized=False, special=True)])
        tok.save(os.path.join(out_dir, "tokenizer.json"))

    names = {0: "<unk>", 1: "<s>", 2: "</s>"}
    if llava_tokens:
        names.update({image_id: "<image>", pad_id: "<pad>"})
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added(t) for i, t in names.items()},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": legacy,
        "model_max_length": 4096,
        "pad_token": names[pad_id],
        "padding_side": "left",
        "processor_class": "LlavaNextProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    plain = {k: v for k, v in _added("").items() if k != "special"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": {**plain, "content": "<s>"},
        "eos_token": {**plain, "content": "</s>"},
        "pad_token": {**plain, "content": names[pad_id]},
        "unk_token": {**plain, "content": "<unk>"},
    })
    if llava_tokens:
        _write_json(os.path.join(out_dir, "added_tokens.json"), {"<image>": image_id, "<pad>": pad_id})
    if llava_tokens:
        _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": template})
    _write_config(out_dir, model_type)
    return TokenizerFixture(out_dir, n, image_id, pad_id, 2)


def build_qwen2_tokenizer(out_dir, files="json", model_type="qwen2_5_vl", vocab_size=600):
    """Write a tiny Qwen2.5-VL-style tokenizer folder; return a TokenizerFixture.

    files: "json" (tokenizer.json + vocab.json + merges.txt, as Qwen2.5-VL ships) or "vocab_merges"
    (no tokenizer.json, as the qwen2 LongVILA `llm/` folders ship). The 22 Qwen2 added tokens follow
    the BPE ids (so their ids are small, not 151643+). No BOS; eos `<|im_end|>`, pad `<|endoftext|>`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    if files not in ("json", "vocab_merges"):
        raise ValueError(f"unknown files kind {files!r}")
    os.makedirs(out_dir, exist_ok=True)
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_sentences(), trainer)
    n = tok.get_vocab_size()
    tok.model.save(out_dir)  # vocab.json + merges.txt
    ids = {t: n + i for i, t in enumerate(QWEN2_ADDED_TOKENS)}
    special = {t: i < 14 for i, t in enumerate(QWEN2_ADDED_TOKENS)}
    tok.add_tokens([AddedToken(t, normalized=False, special=special[t]) for t in QWEN2_ADDED_TOKENS])
    if files == "json":
        tok.save(os.path.join(out_dir, "tokenizer.json"))

    extra = QWEN2_ADDED_TOKENS[1:14]
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): _added(t, special=special[t]) for t in QWEN2_ADDED_TOKENS},
        "additional_special_tokens": extra,
        "bos_token": None,
        "chat_template": QWEN2_VL_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    plain = {k: v for k, v in _added("").items() if k != "special"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "additional_special_tokens": extra,
        "eos_token": {**plain, "content": "<|im_end|>"},
        "pad_token": {**plain, "content": "<|endoftext|>"},
    })
    _write_json(os.path.join(out_dir, "added_tokens.json"), ids)
    _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": QWEN2_VL_TEMPLATE})
    _write_config(out_dir, model_type)
    return TokenizerFixture(out_dir, n, ids["<|image_pad|>"], ids["<|endoftext|>"], ids["<|im_end|>"])
