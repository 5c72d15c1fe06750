"""tinyvila.tokenizer against transformers.AutoTokenizer on the same (tiny, freshly built) files."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import sentencepiece

from fixtures_tokenizer import build_llama_tokenizer, build_qwen2_tokenizer
from tinyvila.errors import CheckpointError
from tinyvila.tokenizer import Tokenizer

import transformers  # noqa: E402  (the reference: a test dependency, never skipped)
transformers.logging.set_verbosity_error()

import google.protobuf  # noqa: E402,F401  transformers needs it to read a bare tokenizer.model (test extra)

TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])

TEXTS = [
    "Hello world",
    "hello world",
    " leading space",
    "trailing space ",
    "  two leading, two trailing  ",
    "a  b   c    d",
    "",
    " ",
    "\n",
    "line one\nline two\n\nline four",
    "tabs\there\t",
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "[INST] <image>\nWhat is this? [/INST]",
    "<image>",
    "<image><image>\n\n<image>x",
    "  <image>  z ",
    "text<image>text",
    "<s>raw bos</s> and <pad> and <unk>",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n",
    "Digits 0123456789 and 3.14159, 1,000,000",
    "It's, don't, we'll, I'M, they'VE",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m",
    "e\u0301 vs \u00e9 (NFC)",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587",
    "emoji \U0001F600\U0001F44D\U0001F3FD and \u2764\ufe0f",
    "math \u2211 x\u00b2 \u2264 \u221e",
    "Ends with punctuation!?",
    "ASSISTANT: A cat.</s>USER: And the dog? ASSISTANT:",
    "<<SYS>>\nBe brief.\n<</SYS>>\n\n",
    "x" * 50 + " " + "ab" * 20,
]

LLAMA_CASES = [(flavor, files, mt) for flavor in ("vicuna", "mistral") for files in ("json", "spm")
               for mt in ("llava_next", None)]
QWEN_CASES = [(files, mt) for files in ("json", "vocab_merges") for mt in ("qwen2_5_vl", "qwen2")]


@pytest.fixture(scope="session")
def tok_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for flavor, files, mt in LLAMA_CASES:
        dirs[("llama", flavor, files, mt)] = build_llama_tokenizer(str(root / f"llama-{flavor}-{files}-{mt}"),
                                                                   flavor, files, mt)
    for files, mt in QWEN_CASES:
        dirs[("qwen2", files, mt)] = build_qwen2_tokenizer(str(root / f"qwen2-{files}-{mt}"), files, mt)
    return root, dirs


def case_ids(case):
    return "-".join(str(c) for c in case)


ALL_CASES = [("llama",) + c for c in LLAMA_CASES] + [("qwen2",) + c for c in QWEN_CASES]


def assert_same(ours, ref, texts=TEXTS):
    for text in texts:
        for special in (True, False):
            want = ref.encode(text, add_special_tokens=special)
            got = ours.encode(text, add_special_tokens=special)
            assert got == want, (text, special, ref.convert_ids_to_tokens(want), [ours.id_to_token(i) for i in got])
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "all_special_ids", "special_tokens_map"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)
    for i in range(len(ref)):
        assert ours.id_to_token(i) == ref.convert_ids_to_tokens(i)
        assert ours.token_to_id(ours.id_to_token(i)) == i


def is_bare_spm(case):
    """A bare tokenizer.model next to a llava_next config.json: transformers loads it as its generic
    class, which encodes as the sentencepiece library does."""
    return case[0] == "llama" and case[2] == "spm" and case[3] == "llava_next"


def assert_same_as_sentencepiece(ours, fx, legacy):
    """`ours` encodes and decodes the texts that hold no added token as SentencePiece does."""
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(fx.path, "tokenizer.model"))
    checked = 0
    for text in TEXTS:
        if any(token in text for token in ("<image>", "<pad>", "<s>", "</s>", "<unk>")):
            continue  # SentencePiece knows no added tokens
        if not legacy and text.startswith(" "):
            continue  # legacy=False (transformers' choice): no dummy prefix before a leading space
        want = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False) == want, (text, sp.id_to_piece(want))
        assert ours.encode(text) == [sp.bos_id()] + want, text
        assert ours.decode(want) == sp.decode(want), text
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids)
def test_matches_transformers(tok_root, case):
    root, dirs = tok_root
    fx = dirs[case]
    ref = transformers.AutoTokenizer.from_pretrained(fx.path)
    ours = Tokenizer.from_dir(fx.path)
    if is_bare_spm(case):
        assert_same_as_sentencepiece(ours, fx, legacy=case[1] == "mistral")
        if TRANSFORMERS_VERSION < (5, 25):
            # Before 5.25 transformers built this tokenizer without SentencePiece's dummy prefix, so
            # for text it is no reference (sentencepiece is, above); vocabulary and special tokens still.
            assert_same(ours, ref, texts=[])
            return
    assert_same(ours, ref)
    # random id sequences (byte pieces, added and special tokens included) decode the same
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randint(1, 24))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_fixture_facts(tok_root):
    _, dirs = tok_root
    for case, fx in dirs.items():
        tok = Tokenizer.from_dir(fx.path)
        if case[0] == "llama":
            assert tok.token_to_id("<image>") == fx.image_token_id == fx.vocab_size
            assert tok.token_to_id("<pad>") == tok.pad_token_id == fx.pad_token_id == fx.vocab_size + 1
            assert (tok.bos_token, tok.bos_token_id, tok.eos_token_id) == ("<s>", 1, 2)
            # the image token is one id, wherever it sits
            ids = tok.encode("USER: <image>\nWhat is", add_special_tokens=False)
            assert ids.count(fx.image_token_id) == 1
        else:
            assert tok.bos_token is None and tok.bos_token_id is None
            assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
            assert tok.token_to_id("<|image_pad|>") == fx.image_token_id > fx.vocab_size
            assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no BOS


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c[2] != "spm"], ids=case_ids)
def test_transformers5_resaved(tok_root, tmp_path, case):
    """The same tokenizer after a transformers 5 `save_pretrained` (its own file layout)."""
    root, dirs = tok_root
    fx = dirs[case]
    ref = transformers.AutoTokenizer.from_pretrained(fx.path)
    ref.save_pretrained(str(tmp_path))
    if os.path.exists(os.path.join(fx.path, "config.json")):
        shutil.copy(os.path.join(fx.path, "config.json"), tmp_path)
    assert_same(Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path)))


@pytest.mark.parametrize("edit", ["no_added_tokens_decoder", "no_add_bos_token", "add_eos_token", "image_token",
                                  "no_legacy", "clean_up"])
@pytest.mark.parametrize("case", [("llama", "mistral", "json", None), ("llama", "vicuna", "spm", None),
                                  ("llama", "vicuna", "json", "llava_next"), ("qwen2", "vocab_merges", "qwen2")],
                         ids=case_ids)
def test_tokenizer_config_variants(tok_root, tmp_path, case, edit):
    """tokenizer_config.json flags that transformers honours or ignores depending on the files."""
    root, dirs = tok_root
    d = str(tmp_path / "tok")
    shutil.copytree(dirs[case].path, d)
    file = os.path.join(d, "tokenizer_config.json")
    with open(file) as f:
        tc = json.load(f)
    if edit == "no_added_tokens_decoder":  # older layout: special_tokens_map.json + added_tokens.json
        del tc["added_tokens_decoder"]
    elif edit == "no_add_bos_token":
        tc.pop("add_bos_token", None)
    elif edit == "add_eos_token":
        tc["add_eos_token"] = True
    elif edit == "image_token":
        tc["image_token"] = "<image>" if case[0] == "llama" else "<|image_pad|>"
    elif edit == "no_legacy":
        tc.pop("legacy", None)
    else:
        tc["clean_up_tokenization_spaces"] = True
    with open(file, "w") as f:
        json.dump(tc, f)
    assert_same(Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d), TEXTS[:14])


@pytest.mark.parametrize("files", ["json", "spm"])
@pytest.mark.parametrize("model_type", [None, "llava_llama"])
def test_original_llava_layout(tmp_path, files, model_type):
    """liuhaotian-style files: no <image>/<pad> tokens, pad = <unk>, LLaVA's own model_type."""
    fx = build_llama_tokenizer(str(tmp_path), "vicuna", files, model_type, layout="original")
    assert fx.image_token_id is None and not os.path.exists(tmp_path / "chat_template.json")
    tok = Tokenizer.from_dir(fx.path)
    assert tok.token_to_id("<image>") is None and tok.pad_token == "<unk>" and len(tok) == fx.vocab_size
    assert_same(tok, transformers.AutoTokenizer.from_pretrained(fx.path))


@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids)
def test_stream_decoder(tok_root, case):
    _, dirs = tok_root
    tok = Tokenizer.from_dir(dirs[case].path)
    rng = random.Random(2)
    sequences = [tok.encode(t) for t in TEXTS]
    # random ids, biased towards byte pieces / multi-byte characters and special tokens
    byte_ids = [i for i in range(len(tok)) if tok.id_to_token(i).startswith("<0x")] or list(range(256))
    for _ in range(60):
        sequences.append([rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(len(tok))
                          for _ in range(rng.randint(1, 30))])
    for ids in sequences:
        for skip in (True, False):
            stream = tok.stream_decoder(skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids]
            pieces.append(stream.flush())
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids
            if "\ufffd" not in tok.decode(ids, skip_special_tokens=skip):
                assert not any("\ufffd" in p for p in pieces), (ids, pieces)


class EncodeSpy:
    """A tokenizers backend that records the texts it is asked to encode."""

    def __init__(self, backend):
        self.backend, self.texts = backend, []

    def encode(self, text, **kw):
        self.texts.append(text)
        return self.backend.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def grown_prompts(tok, rng, n=40):
    """Texts as a conversation re-rendered each turn gives them: each one the last one plus more
    text and special tokens, now and then with an earlier part changed or a fresh start."""
    specials = [t for t in tok.all_special_tokens if tok.token_to_id(t) is not None] + ["<|im_end|>", "</s>"]
    pieces = TEXTS + specials * 3 + [" ", "\n", "  ", "\n\n"]
    text, out = "", []
    for i in range(n):
        if i % 13 == 12:  # an earlier turn edited: shares only a prefix with the texts before
            text = text[:rng.randrange(len(text) + 1)] + rng.choice(pieces)
        elif i % 11 == 10 and text:  # one character changed: every special token stays in its place
            at = rng.choice([0, rng.randrange(len(text))])
            text = text[:at] + ("X" if text[at] != "X" else "Y") + text[at + 1:]
        elif i % 17 == 16:
            text = ""
        text += "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        out.append(text)
    return out


@pytest.mark.parametrize("edit", [None, "add_eos_token", "split_special_tokens", "no_legacy"])
@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids)
def test_encode_prompt_equals_encode(tok_root, tmp_path, case, edit):
    """encode_prompt reuses a recent prompt's ids up to a shared special token: the ids equal a
    whole encode(), and the reuse does happen where the tokenizer allows it."""
    path = tok_root[1][case].path
    if edit is not None:
        path = str(tmp_path / "tok")
        shutil.copytree(tok_root[1][case].path, path)
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tc = json.load(f)
        tc.pop("legacy", None) if edit == "no_legacy" else tc.update({edit: True})
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(tc, f)
    tok, plain = Tokenizer.from_dir(path), Tokenizer.from_dir(path)
    tok._tok = EncodeSpy(tok._tok)
    reused = 0
    for special in (True, False):
        for text in grown_prompts(tok, random.Random(int(special))):
            assert tok.encode_prompt(text, special) == plain.encode(text, special), (text, special)
            reused += 0 < len(tok._tok.texts[-1]) < len(text)  # only a tail was tokenized
    adds_eos = plain.encode("a", True)[-1:] == [plain.eos_token_id] != plain.encode("a", False)[-1:]
    assert (reused > 20) == (edit != "split_special_tokens" and not adds_eos), reused


def grown_text(rng, turns=30):
    """A conversation's texts with no special token between turns (LLaVA-vicuna's template): words
    joined by single and double spaces, newlines, "\u2581" and byte-fallback characters, each text
    the last one plus a turn, now and then the last turn edited."""
    words = " ".join(TEXTS[:11] + TEXTS[-12:]).replace("<image>", "").split(" ")
    words += ["\u2581", "a\u2581b", "\U0001F600"]
    text, out = "USER: <image>\n", []
    for i in range(turns):
        if i % 7 == 6:
            text = text[:len(text) - rng.randrange(1, 40)]
        text += " ".join(rng.choice(words) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 30)))
        text += rng.choice([" ASSISTANT:", " USER: ", "  ", ""])
        out.append(text)
    return out


def test_encode_prompt_cuts_at_words_where_exact(tok_root, tmp_path):
    """A vicuna-style tokenizer (Metaspace alone, a section one BPE word, no merge into a "\u2581")
    reuses a recent prompt up to a word, so a conversation with no special token between turns is
    not tokenized whole; the ids equal encode(). A merge that joins a piece to a following
    "\u2581" makes those cuts wrong: such a vocabulary, and Mistral's Prepend normalizer, get none."""
    vicuna = tok_root[1][("llama", "vicuna", "json", "llava_next")]
    mistral = tok_root[1][("llama", "mistral", "json", "llava_next")]
    tok, plain = Tokenizer.from_dir(vicuna.path), Tokenizer.from_dir(vicuna.path)
    assert tok._word_cuts() and not Tokenizer.from_dir(mistral.path)._word_cuts()
    tok._tok = EncodeSpy(tok._tok)
    texts = grown_text(random.Random(0))
    for text in texts:
        assert tok.encode_prompt(text) == plain.encode(text), text
    tails = [len(t) for t in tok._tok.texts[1:]]
    assert max(tails) < 400 < len(texts[-1]), (tails, len(texts[-1]))  # turns, not whole conversations

    def with_merges(name, merges):
        """The vicuna tokenizer with `merges` applied before all of its own (their pieces added)."""
        path = tmp_path / name
        shutil.copytree(vicuna.path, path)
        with open(path / "tokenizer.json") as f:
            spec = json.load(f)
        vocab = spec["model"]["vocab"]
        for left, right in merges:
            vocab.setdefault(left + right, 1 + max(list(vocab.values()) + [t["id"] for t in spec["added_tokens"]]))
        spec["model"]["merges"] = merges + [m for m in spec["model"]["merges"] if m not in merges]
        with open(path / "tokenizer.json", "w") as f:
            json.dump(spec, f)
        return Tokenizer.from_dir(str(path)), Tokenizer.from_dir(str(path))

    # Runs of spaces as one piece (Llama has them): cuts stay, never after a space or a "\u2581".
    tok, plain = with_merges("spaces", [["\u2581", "\u2581"]])
    assert tok._word_cuts()
    for text in texts:
        assert tok.encode_prompt(text) == plain.encode(text), text
    # A piece ending in "t" joined to one starting with "\u2581": after "t a o", "t a e w" cut before
    # " a" (where "t a o" has a token start) would be wrong. (The tail's first-token check catches
    # this one; nothing bounds what such merges do in general, so the vocabulary gets no word cuts.)
    space = "\u2581"
    tok, plain = with_merges("crossing", [[space, "a"], [space, "e"], [space + "a", space + "e"],
                                          ["t", space + "a" + space + "e"]])
    assert not tok._word_cuts()
    old, new = "USER: t a o", "USER: t a e w"
    assert plain.encode(new) != plain.encode(new[:7]) + plain.encode(new[7:], False)
    for text in [old, new] + texts:
        assert tok.encode_prompt(text) == plain.encode(text), text


def test_stream_decoder_holds_partial_characters(tok_root):
    _, dirs = tok_root
    tok = Tokenizer.from_dir(dirs[("llama", "vicuna", "json", "llava_next")].path)
    ids = tok.encode("a \U0001F600 b", add_special_tokens=False)
    assert sum(tok.id_to_token(i).startswith("<0x") for i in ids) == 4  # the emoji is 4 byte pieces
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert any("\U0001F600" in p for p in pieces)  # arrives whole, once its 4 bytes are in
    assert "".join(pieces) + stream.flush() == "a \U0001F600 b"


def test_stream_decoder_is_linear_in_a_long_byte_run(tok_root):
    """A model emitting thousands of byte pieces in a row: the decoder must not re-decode the
    growing run at every token (it did: quadratic), yet still give the run's text at its end."""
    _, dirs = tok_root
    tok = Tokenizer.from_dir(dirs[("llama", "vicuna", "json", "llava_next")].path)
    run = [tok.token_to_id("<0x41>")] * 3000  # "A" as a byte piece
    ids = run + tok.encode(" end", add_special_tokens=False)
    decoded, real_decode = [0], tok.decode

    def counting_decode(part, **kw):
        decoded[0] += len(part)
        return real_decode(part, **kw)

    tok.decode = counting_decode
    stream = tok.stream_decoder()
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == real_decode(ids)
    assert decoded[0] < 10 * len(ids), decoded[0]  # quadratic would be ~ len(run)**2 / 2 = 4.5M


def test_errors(tmp_path, tok_root):
    _, dirs = tok_root
    with pytest.raises(CheckpointError, match="not a directory"):
        Tokenizer.from_dir(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json, vocab.json \\+ merges.txt, tokenizer.model"):
        Tokenizer.from_dir(str(empty))
    for name, text in [("tokenizer.json", '{"model": {"type": "BPE", "vocab": '),
                       ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nonsense"}}'),
                       ("tokenizer.json", "[1, 2]"),
                       ("tokenizer_config.json", "{not json"),
                       ("special_tokens_map.json", "")]:
        d = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(dirs[("llama", "mistral", "json", "llava_next")].path, d)
        (d / name).write_text(text)
        with pytest.raises(CheckpointError) as e:
            Tokenizer.from_dir(str(d))
        assert "\n" not in str(e.value) and name in str(e.value)
    d = tmp_path / "bad-spm"
    shutil.copytree(dirs[("llama", "mistral", "spm", None)].path, d)
    (d / "tokenizer.model").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer.from_dir(str(d))


def test_runtime_does_not_import_transformers(tok_root):
    _, dirs = tok_root
    path = dirs[("qwen2", "json", "qwen2_5_vl")].path
    code = ("import sys; from tinyvila.tokenizer import Tokenizer; from tinyvila.template import ChatTemplate; "
            f"t = Tokenizer.from_dir({path!r}); t.decode(t.encode('hi')); "
            f"ChatTemplate.from_dir({path!r}).render([{{'role': 'user', 'content': 'hi'}}]); "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.mark.parametrize("clean_up", [True, False])
def test_non_bpe_clean_up_spaces(tmp_path, clean_up):
    """transformers applies `clean_up_tokenization_spaces` only to non-BPE models: a tiny Unigram one."""
    from tokenizers import Tokenizer as Backend, decoders, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    from fixtures_tokenizer import training_sentences

    backend = Backend(Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(training_sentences() + ["a . b , c ? d ! it 's n't 're 've 'm ' x"],
                                UnigramTrainer(vocab_size=300, show_progress=False, unk_token="<unk>",
                                               special_tokens=["<unk>", "</s>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": clean_up,
        "unk_token": "<unk>", "eos_token": "</s>"}))
    texts = ["a . b , c ? d ! e", "it 's , we n't 're 've 'm ' x", "Hello world </s>"]
    assert_same(Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path)), texts)
