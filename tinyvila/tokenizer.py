"""Tokenizer loading that matches `transformers.AutoTokenizer.from_pretrained(dir)` (transformers 5.x).

Everything runs on the `tokenizers` library; transformers is never imported. What transformers 5 does,
and so what we copy:

* It picks a class from tokenizer_config.json `tokenizer_class` and config.json `model_type`. For
  `LlamaTokenizer` and `Qwen2Tokenizer` it does NOT use tokenizer.json as is: it takes only the vocab,
  merges and post-processor from it and rebuilds the normalizer / pre-tokenizer / decoder in code
  (Llama: Metaspace with prepend_scheme "first", or "always" when tokenizer_config says
  `legacy: true`; Qwen2: NFC + the Qwen2 split regex + ByteLevel). But for model types whose hub
  tokenizer_class it knows to be wrong (llava, llava_next, vipllava, mistral ...) it loads
  tokenizer.json verbatim. So the same tokenizer files encode differently with and without a
  llava_next config.json next to them; `_pick_class` reproduces that choice.
* With tokenizer.json present, `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored
  (the file's post-processor decides). Without it (tokenizer.model only), they rebuild the
  post-processor, and a missing `add_bos_token` means no BOS.
* tokenizer.model (SentencePiece) is not run through the sentencepiece library either: AutoTokenizer
  converts the pieces to a `tokenizers` BPE (or Unigram) and uses that, so we read the .model protobuf
  ourselves and do the same. As a LlamaTokenizer it gets the Metaspace pipeline above. As the generic
  class (a bare tokenizer.model next to a llava_next config.json) it follows the model's own
  normalizer spec, so it encodes as `sentencepiece.SentencePieceProcessor` does: the charsmap, extra
  space removal, " " -> "▁", the dummy prefix (Metaspace "first", or "always" when `legacy` is true or
  unset), BPE merges ranked by piece score, user-defined pieces kept whole; added tokens are then
  matched on the raw text so that each chunk between them gets its own dummy prefix. (One
  difference, transformers' too: with `legacy: false` a text starting with a space gets no prefix.)
* Added tokens come from tokenizer_config.json `added_tokens_decoder`, else from
  special_tokens_map.json + added_tokens.json + tokenizer.json; missing ones are appended in id order.
* decode: `tokenizers` decode, then `clean_up_tokenization_spaces` only for non-BPE models
  (transformers 5 skips that clean-up for BPE models).
"""

import json
import os
import re
import struct
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from tinyvila.errors import CheckpointError

NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# transformers 5 tables, only the entries that matter here. GENERIC = TokenizersBackend, i.e.
# tokenizer.json used as is.
GENERIC = "generic"
REGISTERED_CLASS = {  # TOKENIZER_MAPPING_NAMES[model_type]
    "llava": GENERIC, "llava_next": GENERIC, "vipllava": GENERIC, "mistral": GENERIC, "mistral3": GENERIC,
    "mixtral": GENERIC, "qwen2": "Qwen2Tokenizer", "qwen2_vl": "Qwen2Tokenizer",
    "qwen2_5_vl": "Qwen2Tokenizer", "qwen2_moe": "Qwen2Tokenizer", "qwen2_audio": "Qwen2Tokenizer",
    "qwen2_5_omni": "Qwen2Tokenizer",
}
HUB_CLASS_KNOWN_WRONG = {"llava", "llava_next", "vipllava", "qwen2"}  # MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
REBUILT_CLASSES = ("LlamaTokenizer", "Qwen2Tokenizer")
CLASS_DEFAULTS = {  # special-token defaults of those classes' __init__
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": None, "eos_token": "<|endoftext|>",
                       "pad_token": "<|endoftext|>"},
}


def _read_json(path, name, required=False):
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        if required:
            raise CheckpointError(f"{path}: missing {name}")
        return None
    try:
        with open(full, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{full}: not valid JSON ({e})") from None


def _pick_class(hub_class, model_type, tokenizer_json_text):
    """The tokenizer class AutoTokenizer would instantiate (transformers 5 rules, simplified)."""
    hub = hub_class.removesuffix("Fast") if hub_class else None
    registered = REGISTERED_CLASS.get(model_type)
    if (hub == "LlamaTokenizer" and model_type not in HUB_CLASS_KNOWN_WRONG and tokenizer_json_text
            and '"ByteLevel"' in tokenizer_json_text):
        return GENERIC  # a Llama-3 style byte-level tokenizer.json mislabelled LlamaTokenizer
    if hub and registered and registered != hub:
        if registered == GENERIC:
            return GENERIC
        hub = registered if model_type in HUB_CLASS_KNOWN_WRONG else hub
    if hub is None:
        hub = registered
    # Other specialised classes rebuild their pipelines their own way; we can only use the file as is.
    return hub if hub in REBUILT_CLASSES else GENERIC


# --- SentencePiece .model (protobuf) reading, just the fields transformers uses -----------------

def _varint(buf, i):
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return out, i


def _fields(buf):
    """Yield (field number, value) of a protobuf message; value is an int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, val


def _int32(v):
    return v - (1 << 64) if v >= 1 << 63 else v


TRAINER_FIELDS = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id",
                  45: "unk_piece", 46: "bos_piece", 47: "eos_piece"}  # TrainerSpec field numbers
NORMALIZER_FIELDS = {2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                     5: "escape_whitespaces"}  # NormalizerSpec field numbers
NORMAL_PIECE, CONTROL_PIECE, USER_DEFINED_PIECE = 1, 3, 4  # SentencePiece.Type values


def _read_spm(file):
    """Pieces [(piece, score, type)], the trainer spec and the normalizer spec of a sentencepiece model."""
    try:
        with open(file, "rb") as f:
            buf = f.read()
        pieces = []
        trainer = {"model_type": 1, "byte_fallback": 0, "unk_id": 0, "bos_id": 1, "eos_id": 2,
                   "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"}
        normalizer = {"precompiled_charsmap": b"", "add_dummy_prefix": 1, "remove_extra_whitespaces": 1,
                      "escape_whitespaces": 1}  # the proto's defaults
        for num, val in _fields(buf):
            if num == 1:  # ModelProto.pieces: piece=1, score=2 (float), type=3 (NORMAL by default)
                piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL_PIECE}
                piece.update(_fields(val))
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], piece[3]))
            elif num == 2:
                for k, v in _fields(val):
                    if k in TRAINER_FIELDS:
                        trainer[TRAINER_FIELDS[k]] = v.decode("utf-8") if isinstance(v, bytes) else _int32(v)
            elif num == 3:
                normalizer.update((NORMALIZER_FIELDS[k], v) for k, v in _fields(val) if k in NORMALIZER_FIELDS)
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{file}: not a readable sentencepiece model ({e})") from None
    if not pieces:
        raise CheckpointError(f"{file}: not a readable sentencepiece model (no pieces)")
    return pieces, trainer, normalizer


def _merges_from_vocab(vocab):
    """BPE merges for a SentencePiece vocab, in the order transformers' `generate_merges` gives:
    every split of every piece into two known pieces, ranked by the merged piece's id, then by the
    lengths and ids of the two halves."""
    merges = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, len(left), len(right), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[5], m[6]) for m in merges]


def _merges_by_score(pieces, names):
    """BPE merges as SentencePiece applies them: only normal pieces merge, the best-scored result
    first (ties by id). `names[i]` is the (possibly renamed) piece with id i."""
    normal = {names[i]: (-score, i) for i, (_, score, kind) in enumerate(pieces) if kind == NORMAL_PIECE}
    ranked = []
    for piece, rank in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((rank, left, right))
    ranked.sort()
    return [(left, right) for _, left, right in ranked]


# --- backends -------------------------------------------------------------------------------------

def _llama_backend(vocab, merges, tc):
    """What transformers' LlamaTokenizer.__init__ builds."""
    add_prefix_space = tc.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    scheme = ("always" if tc.get("legacy", False) else "first") if add_prefix_space else "never"
    tok = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _qwen2_backend(vocab, merges, tc):
    """What transformers' Qwen2Tokenizer.__init__ builds."""
    tok = Backend(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                      end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.decoder = decoders.ByteLevel()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tc.get("add_prefix_space") or False), use_regex=False),
    ])
    return tok


def _spm_piece_names(pieces, added_names):
    """Piece id -> text: the model's pieces, renamed where the added tokens give an id another name
    (unless that name is a piece that keeps its own id), as transformers does."""
    names = [p for p, _, _ in pieces]
    kept = {p for i, p in enumerate(names) if i not in added_names}
    return [added_names[i] if i in added_names and added_names[i] not in kept else p for i, p in enumerate(names)]


def _spm_generic_backend(pieces, trainer, spec, added_names, legacy):
    """A bare tokenizer.model as SentencePiece itself encodes it (what transformers builds for
    TokenizersBackend): the normalizer spec's steps in SentencePiece's order, the dummy prefix,
    user-defined pieces emitted whole."""
    byte_fallback = bool(trainer["byte_fallback"])
    names = _spm_piece_names(pieces, added_names)
    user_defined = [names[i] for i, (_, _, kind) in enumerate(pieces) if kind == USER_DEFINED_PIECE]
    if trainer["model_type"] == 1:
        tok = Backend(Unigram([(n, s) for n, (_, s, _) in zip(names, pieces)], trainer["unk_id"], byte_fallback))
    else:
        tok = Backend(BPE(vocab={n: i for i, n in enumerate(names)}, merges=_merges_by_score(pieces, names),
                          unk_token=trainer["unk_piece"], fuse_unk=True, byte_fallback=byte_fallback, dropout=None,
                          ignore_merges=bool(user_defined)))
    dummy_prefix = bool(spec["add_dummy_prefix"])
    steps = [normalizers.Precompiled(spec["precompiled_charsmap"])] if spec["precompiled_charsmap"] else []
    if spec["remove_extra_whitespaces"]:  # spaces only: SentencePiece leaves newlines and tabs alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if dummy_prefix and legacy:  # Metaspace skips the prefix when the text starts with "▁"; SentencePiece doesn't
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(steps)
    splits = []
    if dummy_prefix:
        splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first",
                                               split=False))
    if user_defined:  # after the dummy prefix, so that a user-defined piece never merges with it
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if byte_fallback else [])
    if dummy_prefix:  # Strip works per token: fuse first so that only the text's first space goes
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif byte_fallback:
        steps.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(steps)
    return tok


def _json_vocab_merges(tj):
    """A BPE tokenizer.json's vocab and merges (None, None for other models)."""
    model = tj.get("model") or {}
    if model.get("type") not in (None, "BPE") or not isinstance(model.get("vocab"), dict):
        return None, None
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], merges


def _json_post_processor(tj):
    """The post-processor of a tokenizer.json, parsed without its (large) vocab."""
    small = dict(tj, added_tokens=[])
    small["model"] = dict(tj["model"], vocab={}, merges=[])
    return Backend.from_str(json.dumps(small)).post_processor


def _read_tokenizer_json(path):
    """tokenizer.json's text and parsed object, or (None, None) when the folder has none."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None, None
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
        tj = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise CheckpointError(f"{file}: not a tokenizers file (no 'model' object)")
    return text, tj


@dataclass
class _Loaded:
    """A backend built from a checkpoint's files, and what the token set-up needs to know about it."""
    backend: Backend
    kind: str  # the transformers class it stands for: GENERIC, "LlamaTokenizer" or "Qwen2Tokenizer"
    post_processor: object = None  # tokenizer.json's, for the classes that rebuild the rest
    spm_extra: list = field(default_factory=list)  # SentencePiece control pieces: extra special tokens
    defaults: dict = field(default_factory=dict)  # special tokens the class (or the .model) names by default
    raw_added: bool = False  # added tokens matched on the raw text (normalized=False)


def _load_backend(path, kind, tc, tj_text, tj, added_names):
    """Build the backend from tokenizer.json, vocab.json + merges.txt or tokenizer.model, in that order."""
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    spm_file = os.path.join(path, "tokenizer.model")
    if tj is not None:
        vocab, merges = _json_vocab_merges(tj)
        if kind == "LlamaTokenizer" and vocab is not None:
            return _Loaded(_llama_backend(vocab, merges, tc), kind, _json_post_processor(tj))
        if kind == "Qwen2Tokenizer" and vocab is not None:
            return _Loaded(_qwen2_backend(vocab, merges, tc), kind, _json_post_processor(tj))
        return _Loaded(Backend.from_str(tj_text), GENERIC)
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):  # qwen2 LongVILA `llm/` folders
        vocab, merges = BPE.read_file(vocab_file, merges_file)
        return _Loaded(_qwen2_backend(vocab, merges, tc), "Qwen2Tokenizer")
    if not os.path.isfile(spm_file):
        raise CheckpointError(
            f"{path}: no tokenizer found (looked for tokenizer.json, vocab.json + merges.txt, tokenizer.model)")
    pieces, trainer, spec = _read_spm(spm_file)
    if kind == "LlamaTokenizer":
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        # control and user-defined pieces become extra special tokens
        extra = [_added_token(p, normalized=False, special=t == CONTROL_PIECE)
                 for p, _, t in pieces if t in (CONTROL_PIECE, USER_DEFINED_PIECE)]
        return _Loaded(_llama_backend(vocab, _merges_from_vocab(vocab), tc), kind, spm_extra=extra,
                       defaults=CLASS_DEFAULTS[kind])
    backend = _spm_generic_backend(pieces, trainer, spec, added_names, tc.get("legacy", True))
    extra = [_added_token(p, normalized=False, special=True) for p, _, t in pieces if t == CONTROL_PIECE]
    defaults = {f"{n}_token": trainer[f"{n}_piece"] or f"<{n}>"  # the model's own
                for n in ("unk", "bos", "eos") if trainer[f"{n}_id"] >= 0}
    return _Loaded(backend, GENERIC, spm_extra=extra, defaults=defaults, raw_added=bool(spec["add_dummy_prefix"]))


def _added_token(value, **defaults):
    """An AddedToken from a string or a tokenizer_config-style dict."""
    if isinstance(value, dict):
        d = {k: v for k, v in value.items() if k != "__type"}
        d.update(defaults)
        return AddedToken(**d)
    return AddedToken(str(value), **defaults)


def _changed(t, **changes):
    """A copy of AddedToken `t` with some flags changed."""
    flags = dict(content=t.content, rstrip=t.rstrip, lstrip=t.lstrip, single_word=t.single_word,
                 normalized=t.normalized, special=t.special)
    return AddedToken(**dict(flags, **changes))


def _flags(t):
    return (t.content, t.rstrip, t.lstrip, t.single_word, t.normalized, t.special)


def _declared_tokens(tc, stm, added_json, tj):
    """What the files declare, as transformers' `_from_pretrained` reads it: the init arguments (named
    special tokens among them), the extra special tokens and the added tokens by id."""
    init = dict(tc)
    extra = init.get("extra_special_tokens") or init.get("additional_special_tokens")
    if isinstance(extra, dict):  # a dict of named model-specific tokens, e.g. {"image_token": ...}
        init.update(extra)
        extra = None
    added = {}
    if "added_tokens_decoder" in tc:
        for idx, value in (tc["added_tokens_decoder"] or {}).items():
            added[int(idx)] = _added_token(value)
        return init, extra, added
    # older checkpoints: special_tokens_map.json, added_tokens.json and tokenizer.json's list
    for key, value in stm.items():
        if key == "extra_special_tokens" and isinstance(value, list):
            extra = list(extra or []) + [v for v in value if v not in (extra or [])]
        elif key == "additional_special_tokens":
            extra = extra or value
        elif isinstance(value, dict):
            init[key] = _added_token({k: v for k, v in value.items() if k != "special"}, special=True)
        else:
            init[key] = value
    specials = {str(init[k]) for k in NAMED_SPECIALS if isinstance(init.get(k), (str, AddedToken))}
    specials |= {str(_added_token(t)) for t in extra or []}
    for content, idx in added_json.items():
        special = content in specials
        added[idx] = AddedToken(content, rstrip=False, lstrip=False, normalized=not special, special=special)
    for t in (tj or {}).get("added_tokens", []):
        added[t["id"]] = _added_token({k: v for k, v in t.items() if k != "id"})
    return init, extra, added


class Tokenizer:
    """A checkpoint's tokenizer; build with `Tokenizer.from_dir(path)`."""

    def __init__(self, backend, special_tokens, extra_special_tokens, clean_up_tokenization_spaces=False):
        self._tok = backend
        self._special = special_tokens  # name -> token string (bos_token, ..., plus e.g. image_token)
        self._extra = extra_special_tokens
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # transformers never applies the space clean-up to BPE models (it would corrupt them)
        self._is_bpe = type(backend.model).__name__ == "BPE"
        self._special_ids = None  # ids of special added tokens, filled on first use
        self._prompts = _RecentPrompts()  # encode_prompt's reusable ids

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        tc, config, stm, added_json = (_read_json(path, name) or {} for name in (
            "tokenizer_config.json", "config.json", "special_tokens_map.json", "added_tokens.json"))
        if not all(isinstance(x, dict) for x in (tc, config, stm, added_json)):
            raise CheckpointError(f"{path}: a tokenizer JSON file does not hold an object")
        tj_text, tj = _read_tokenizer_json(path)
        init, extra, added = _declared_tokens(tc, stm, added_json, tj)
        kind = _pick_class(tc.get("tokenizer_class") or config.get("tokenizer_class"), config.get("model_type"),
                           tj_text)
        try:
            loaded = _load_backend(path, kind, tc, tj_text, tj, {i: t.content for i, t in added.items()})
        except CheckpointError:
            raise
        except Exception as e:  # the tokenizers library rejects a malformed file
            msg = " ".join(str(e).split())
            source = os.path.join(path, "tokenizer.json") if tj is not None else path
            raise CheckpointError(f"{source}: cannot load the tokenizer ({type(e).__name__}: {msg})") from None
        if loaded.raw_added:  # so that each chunk between added tokens gets its own dummy prefix
            added = {i: _changed(t, normalized=False) for i, t in added.items()}

        backend = loaded.backend
        self = cls(backend, {}, [], bool(tc.get("clean_up_tokenization_spaces", False)))
        if tc.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            self._is_bpe = False
        self._setup_tokens(init, extra or loaded.spm_extra, added, loaded.kind,
                           CLASS_DEFAULTS.get(loaded.kind, loaded.defaults))
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(tc.get("split_special_tokens", False))

        # BOS/EOS: the tokenizer.json post-processor wins; tokenizer_config flags only count without it.
        if tj is None:
            self._set_post_processor(bool(tc.get("add_bos_token", False)), bool(tc.get("add_eos_token", False)))
        elif loaded.post_processor is not None:
            backend.post_processor = loaded.post_processor
        if backend.post_processor is None:
            self._set_post_processor(False, False)
        return self

    def _setup_tokens(self, init, extra, added, kind, defaults):
        """Special and added tokens, as transformers' `TokenizersBackend.__init__` adds them."""
        by_content = {t.content: t for t in added.values()}
        init = dict(init)
        for key, value in defaults.items():  # the tokenizer class's __init__ defaults
            init.setdefault(key, value)

        # named special tokens, then model-specific "*_token" entries (e.g. image_token), which
        # transformers adds to the special tokens and passes to chat templates as well
        named = {}
        for key in NAMED_SPECIALS + tuple(k for k in init if k.endswith("_token") and k not in NAMED_SPECIALS):
            value = init.get(key)
            if isinstance(value, dict) and (key in NAMED_SPECIALS or value.get("__type") == "AddedToken"):
                value = _added_token(value)
            if isinstance(value, (str, AddedToken)):
                named[key] = by_content.get(str(value), value)
        extra = [_added_token(t) if isinstance(t, dict) else t for t in extra]

        # add what the backend lacks: added_tokens_decoder entries in id order, then special tokens
        have = {_flags(t) for t in self._tok.get_added_tokens_decoder().values()}
        todo = [t for _, t in sorted(added.items()) if _flags(t) not in have]
        known = {t.content for t in self._tok.get_added_tokens_decoder().values()} | {t.content for t in todo}
        for value in list(named.values()) + extra:
            if str(value) not in known:
                todo.append(value)
                known.add(str(value))
        named_strs = {str(v) for v in named.values()}
        tokens = []
        for t in todo:
            if isinstance(t, str):
                t = AddedToken(t, special=True)
            elif not t.special and t.content in named_strs:
                t = _changed(t, special=True)
            tokens.append(t)
        if tokens:
            self._tok.add_tokens(tokens)
        self._special = {k: str(v) for k, v in named.items()}
        self._extra = [str(t) for t in extra]
        if kind == "Qwen2Tokenizer":  # Qwen2Tokenizer re-adds all its special tokens as special
            self._tok.add_tokens([AddedToken(t, special=True) for t in self.all_special_tokens])

    def _set_post_processor(self, add_bos, add_eos):
        bos, eos = self._special.get("bos_token"), self._special.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        specials = ([(bos, self.bos_token_id)] if add_bos else []) + ([(eos, self.eos_token_id)] if add_eos else [])
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # -- special tokens --------------------------------------------------------------------------

    def _id(self, token):
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        return i if i is not None else self.unk_token_id if token != self.unk_token else None

    bos_token = property(lambda self: self._special.get("bos_token"))
    eos_token = property(lambda self: self._special.get("eos_token"))
    pad_token = property(lambda self: self._special.get("pad_token"))
    unk_token = property(lambda self: self._special.get("unk_token"))
    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    unk_token_id = property(lambda self: self._tok.token_to_id(self.unk_token) if self.unk_token else None)

    @property
    def special_tokens_map(self):
        """Named special tokens (bos_token, ..., model-specific ones such as image_token) -> string:
        the variables transformers passes to chat templates."""
        return dict(self._special)

    @property
    def all_special_tokens(self):
        out = []
        for t in list(self._special.values()) + self._extra:
            if t not in out:
                out.append(t)
        return out

    @property
    def all_special_ids(self):
        return [self._id(t) for t in self.all_special_tokens]

    # -- encode / decode -------------------------------------------------------------------------

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text, add_special_tokens=True):
        """encode() for a rendered conversation, which a follow-up renders again whole: the ids of a
        recent prompt that shares its text up to a special token are reused, and only the text
        from that token on is tokenized. Exact, because added special tokens are split out of the
        raw text before anything else: the ids before one depend only on the text before it. Where
        the tokenizer allows it (_word_cuts: Llama-2 / vicuna's), also up to a word's start, so that
        templates with no special token between turns are not tokenized whole either."""
        if not self._prompts_reusable():
            return self.encode(text, add_special_tokens)
        words = self._word_cuts()
        cut = self._prompts.longest_shared(text, add_special_tokens, words)
        if cut is None:
            enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
            ids, cuts, starts = enc.ids, self._cuts(text, enc, 0, 0), _starts(enc, 0) if words else None
        else:
            head, start, token_id, head_cuts, head_starts = cut
            tail = text[start:]
            enc = self._tok.encode(tail, add_special_tokens=False)
            if enc.ids[:1] != [token_id]:  # not split the same way: no reuse
                return self.encode(text, add_special_tokens)
            ids, cuts = head + enc.ids, head_cuts + self._cuts(tail, enc, start, len(head))
            starts = head_starts + _starts(enc, start) if words else None
        self._prompts.add(text, add_special_tokens, ids, cuts, starts)
        return list(ids)

    def _prompts_reusable(self):
        """Whether a prompt's ids can be cut at a special token: special tokens are split out
        (not so under split_special_tokens) and the post-processor adds tokens only in front."""
        p = self._prompts
        if p.reusable is None:
            bare, full = self.encode("a b", False), self.encode("a b", True)
            p.reusable = not self._tok.encode_special_tokens and full[len(full) - len(bare):] == bare
            # tokens matched in the raw text, before any normalization
            p.cut_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                            if t.special and not t.normalized}
        return p.reusable

    def _word_cuts(self):
        """Whether a prompt may also be cut before a space that follows another character: the
        text is normalized only by a Metaspace pre-tokenizer (spaces become "▁"; a section that
        starts with one gets no other), nothing joins across such a place (Metaspace splits there,
        or, a section being one BPE word, no merge joins a piece ending in another character to
        one starting with "▁"), and no added token holds a space. The ids before such a space then
        depend only on the text before it."""
        p = self._prompts
        if p.words is None:
            pre = self._tok.pre_tokenizer
            p.words = (self._tok.normalizer is None and isinstance(pre, pre_tokenizers.Metaspace)
                       and pre.replacement == "\u2581"
                       and not any(" " in t.content or "\u2581" in t.content
                                   for t in self._tok.get_added_tokens_decoder().values())
                       and (pre.split or _no_merge_into_a_space(json.loads(self._tok.to_str())["model"])))
        return p.words

    def _cuts(self, text, enc, shift, first):
        """(start, end, index) of each special token of `enc` that stands for exactly its own
        string in `text`, in text order, the positions shifted by `shift` characters and `first` ids.
        Found with str.find, not a loop over the ids: a prompt can be tens of thousands of them."""
        cuts = []
        for token, token_id in self._prompts.cut_tokens.items():
            at = text.find(token)
            while at >= 0:
                j = enc.char_to_token(at)
                if j is not None and enc.ids[j] == token_id and enc.token_to_chars(j) == (at, at + len(token)):
                    cuts.append((at + shift, at + len(token) + shift, j + first))
                at = text.find(token, at + len(token))
        return sorted(cuts)

    def decode(self, ids, skip_special_tokens=True):
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and not self._is_bpe:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def token_to_id(self, token):
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id):
        return self._tok.id_to_token(int(token_id))

    def __len__(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def add_special_tokens(self, tokens):
        """Append special tokens (ids after the current ones), as some loaders do at load time
        (VILA adds its media tokens this way)."""
        self._tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])
        self._special_ids = None
        self._prompts = _RecentPrompts()

    def _is_special(self, token_id):
        if self._special_ids is None:
            self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return token_id in self._special_ids

    def _is_byte_piece(self, token_id):
        token = self._tok.id_to_token(int(token_id)) or ""
        return len(token) == 6 and token.startswith("<0x") and token.endswith(">")

    def stream_decoder(self, skip_special_tokens=True):
        return StreamDecoder(self, skip_special_tokens)


def _starts(enc, shift):
    """Each token's first character in the prompt (the encoding's offsets shifted by `shift`)."""
    return array("q", (start + shift for start, _ in enc.offsets))


def _no_merge_into_a_space(model: dict) -> bool:
    """Whether a BPE model (its tokenizer.json entry) never merges a piece ending in a character
    other than "▁" with one starting with "▁", and emits words only through its merges."""
    if model.get("type") != "BPE" or model.get("dropout") or model.get("ignore_merges"):
        return False
    pairs = (m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges", []))
    return not any(left[-1:] != "\u2581" and right[:1] == "\u2581" for left, right in pairs)


class _RecentPrompts:
    """The last few prompts encode_prompt tokenized: text, ids, the special tokens' places and,
    where prompts may be cut at words, each token's first character."""

    def __init__(self, size: int = 16):  # as many as the server keeps conversations by default
        self.entries = deque(maxlen=size)  # (text, add_special_tokens, ids, cuts, starts), the newest last
        self.lock = threading.Lock()  # a server's worker threads share the tokenizer
        self.reusable = None  # set on first use (Tokenizer._prompts_reusable)
        self.words = None  # whether cuts at words are exact (Tokenizer._word_cuts)
        self.cut_tokens = {}  # special tokens matched in the raw text: string -> id

    def add(self, text, add_special_tokens, ids, cuts, starts=None) -> None:
        with self.lock:
            if not any(old == text and add == add_special_tokens for old, add, *_ in self.entries):
                self.entries.append((text, add_special_tokens, ids, cuts, starts))

    def longest_shared(self, text, add_special_tokens, words=False):
        """(ids before the cut, its character start, its token id, the cuts and token starts before
        it) for the recent prompt sharing the most ids with `text` up to one of its special tokens
        or, with `words`, up to a word (_word_cut), or None."""
        with self.lock:
            entries = list(self.entries)
        best = None  # (ids, starts, cuts, index of the cut's token, its character) sharing the most ids
        for old, add, ids, cuts, starts in entries:
            if add != add_special_tokens:
                continue
            shared = _shared_length(text, old)
            n = bisect_right(cuts, shared, key=lambda c: c[1])  # the special tokens in the shared text
            cut = (cuts[n - 1][2], cuts[n - 1][0]) if n else None  # (token index, character)
            if words and starts is not None:
                at = _word_cut(old, shared, starts)
                cut = at if cut is None or (at is not None and at[0] > cut[0]) else cut
            if cut is not None and (best is None or cut[0] > best[3]):
                best = ids, starts, cuts, *cut
        if best is None:
            return None
        ids, starts, cuts, j, start = best
        return ids[:j], start, ids[j], [c for c in cuts if c[2] < j], starts[:j] if words else None


def _word_cut(old, shared, starts):
    """(token index, character) of a word start in old[:shared], the text it shares with the new
    prompt (a space after another character), where one of `old`'s tokens starts: the second last
    such place, so that the token starting there lies wholly in the shared text (and the check of
    its id means something)."""
    end = _word_start_before(old, shared)
    at = _word_start_before(old, end) if end is not None else None
    if at is None:
        return None
    j = bisect_left(starts, at)
    return (j, at) if j < len(starts) and starts[j] == at else None


def _word_start_before(text, end):
    """The last i < end with text[i] a space and text[i - 1] neither a space nor "▁", or None."""
    i = text.rfind(" ", 1, end)
    while i > 0 and text[i - 1] in " \u2581":
        i = text.rfind(" ", 1, i)
    return i if i > 0 else None


def _shared_length(a, b):
    """The length of the longest common prefix of two strings: compared in doubling blocks, then
    the first block that differs halved, so that what is copied grows with what is shared (another
    conversation is told apart without copying half of its text)."""
    lo, size, end = 0, 64, min(len(a), len(b))
    while True:
        hi = min(lo + size, end)
        if not a.startswith(b[lo:hi], lo):
            break
        if hi == end:
            return end
        lo, size = hi, 2 * size
    hi -= 1  # a[lo:hi + 1] differs from b's: the prefix ends before hi + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid - 1
    return lo


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text, `flush()` the rest.

    Decoding one token at a time is wrong for SentencePiece (a leading "▁" becomes a space or is
    stripped depending on position) and for byte pieces (a character may span several tokens). So we
    decode a window that starts a little before the new tokens and emit only what it adds over the
    same window without them. Text ending in U+FFFD (an unfinished UTF-8 character) is held back, and
    so is text while the last token that is decoded is a byte-fallback piece ("<0x41>"): `tokenizers` decodes a run of
    byte pieces all at once and turns the whole run into U+FFFDs if any of it is invalid UTF-8, so a
    run's text is final only when the run ends. The pieces concatenate to `decode(all_ids)`.
    """

    def __init__(self, tokenizer, skip_special_tokens=True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = []
        self._prefix = 0  # window start
        self._read = 0  # end of the tokens already emitted

    def _decode(self, ids):
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id):
        self._ids.append(int(token_id))
        if self._in_byte_run():  # checked before decoding: a long run then costs one decode, at its end
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

    def _in_byte_run(self):
        """Whether the last token that reaches the decoder (skipped special tokens do not) is a byte piece."""
        tok = self._tokenizer
        for i in reversed(self._ids):
            if not (self._skip and tok._is_special(i)):
                return tok._is_byte_piece(i)
        return False

    def flush(self):
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):]
