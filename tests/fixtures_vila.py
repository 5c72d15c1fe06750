"""Tiny random VILA / LongVILA checkpoints in NVlabs' on-disk layout, plus reference pieces.

`build_vila` writes a folder shaped like the hub's LongVILA repos (spec part 2, section 2.2):

    <out>/config.json        top-level VILA config (LlavaLlamaModel / llava_llama, llm_cfg, ...)
    <out>/llm/               plain HF causal LM (Llama-3 or Qwen2) + tokenizer files of its generation
    <out>/vision_tower/      plain HF SiglipVisionModel (hub key names `vision_model.*`) + preprocessor
    <out>/mm_projector/      config.json (v2l_projector) + model.safetensors (`layers.<i>.*`)

Weights are random, drawn like tests/fixtures_llava.py (normal(0, 0.2) for matrices), rounded to
bfloat16 and stored as bfloat16 like the hub's files (`dtype="float32"` stores float32 instead). The
in-memory transformers modules returned in the VilaFixture are float32 holding the same
(bf16-representable) values, so reading the files back in float32 reproduces them exactly.

Reference pieces, written from the spec and independent of tinyvila: `downsample` (section 2.5),
`reference_image_features`, `siglip_pixels` (2.6) and `uniform_frame_indices` (2.7).

Sub-configs carry absolute `_name_or_path`s of a fake training cluster (pitfall P15): a loader must
resolve `llm/`, `vision_tower/`, `mm_projector/` relative to the repo instead.

Import from tests as `from fixtures_vila import ...` (pytest puts tests/ on sys.path).
"""
import copy
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from fixtures_tokenizer import QWEN2_PRETOKENIZE_REGEX, _added, _write_json, training_sentences

PATCH = 14
CLUSTER = "/lustre/fsw/portfolios/xyz/checkpoints/run1"  # fake absolute training paths (P15)
PROJECTOR_TYPES = ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")

# Llama-3 `tokenizer.json` pre-tokenizer regex (Meta-Llama-3-8B): like Qwen2's, but digits in runs of 1-3.
LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The block of Llama-3 special tokens after the BPE vocabulary, shrunk from 256 to 16 but in the real
# order (128000 begin, 128001 end, 128002-5 reserved 0-3, 128006/7 headers, 128008 reserved 4,
# 128009 eot, then more reserved). VILA appends `[PAD]` after the block (128256 -> 128257 rows).
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 11)])

# qwen2 LongVILA `llm/` added tokens (VH constants.py comment: 151643 ... 151650). The first five are
# rows of the embedding table; the last three are added by VILA's loader and have ids BEYOND the
# rows (spec 2.11, pitfall P8).
QWEN2_VILA_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]"]
VILA_MEDIA_ADDED = ["<vila/sentinel>", "<image>", "<vila/video>"]

# Stock Qwen2-Instruct chat template (Qwen/Qwen2-7B-Instruct tokenizer_config.json): default system
# prompt "You are a helpful assistant." WITH the period (spec 2.12: use what the checkpoint ships).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class VilaFixture:
    path: str
    backbone: str  # "llama3" | "qwen2"
    projector: str  # mm_projector_type
    vision: torch.nn.Module  # transformers SiglipVisionModel, eval, float32
    llm: torch.nn.Module  # transformers LlamaForCausalLM / Qwen2ForCausalLM, eval, float32
    # Plain nn.Sequential with the file's weights under the file's indices minus "layers." (index 0,
    # the down-sampler, is an nn.Identity placeholder: `downsample` does that part).
    mm_projector: torch.nn.Sequential
    image_size: int
    patches_per_side: int  # G = image_size // 14
    k: int  # 2 or 3 (down-sampling block)
    order: str  # emission order of the generation this checkpoint imitates: "column" (llama3), "row" (qwen2)
    tokens_per_image: int  # ceil(G / k) ** 2 projector outputs (without the "\n")
    vocab_rows: int  # LLM embedding rows (llm/config.json vocab_size)
    tokenizer_len: int  # all tokenizer ids incl. added ones
    bos: int | None  # llama3 <|begin_of_text|>; qwen2 None (no BOS prepended; `[BOS]` exists: see ids)
    eos: int  # generation_config eos: llama3 <|end_of_text|>, qwen2 <|endoftext|>
    eot: int | None  # llama3 <|eot_id|>
    im_end: int | None  # qwen2 <|im_end|> (= the tokenizer's eos_token)
    pad: int  # [PAD]
    newline: int  # id of "\n" (one token)
    sentinel: int | None = None  # qwen2 only (ids >= vocab_rows)
    image: int | None = None
    video: int | None = None
    ids: dict = field(default_factory=dict)  # every special/added token string -> id


def build_vila(out_dir, backbone="llama3", projector="mlp_downsample", image_size=56, seed=0,
               dtype="bfloat16", num_video_frames=8) -> VilaFixture:
    """Write a tiny VILA checkpoint folder; return a VilaFixture (see the module docstring).

    llama3: Llama-3-LongVILA-like (tokenizer.json with a BOS-prepending post-processor, no <image>
    token, SigLIP with its MAP head in the file, column-major projector order). qwen2: qwen2 LongVILA
    -like (vocab.json + merges.txt, no tokenizer.json, media tokens past the embedding rows, SigLIP
    without head, row-major order). image_size 56 -> 4x4 patches; 42 -> 3x3 (odd, zero padding).
    """
    if backbone not in ("llama3", "qwen2"):
        raise ValueError(f"unknown backbone {backbone!r}")
    if projector not in PROJECTOR_TYPES:
        raise ValueError(f"unknown projector {projector!r}")
    if image_size % PATCH:
        raise ValueError("image_size must be a multiple of 14")
    out_dir = str(out_dir)
    llm_dir, vt_dir, pj_dir = (os.path.join(out_dir, d) for d in ("llm", "vision_tower", "mm_projector"))
    for d in (llm_dir, vt_dir, pj_dir):
        os.makedirs(d, exist_ok=True)
    store = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    version = "4.37.2" if backbone == "llama3" else "4.46.0"  # VILA pins of the two code generations

    if backbone == "llama3":
        tok = _llama3_tokenizer(llm_dir)
    else:
        tok = _qwen2_tokenizer(llm_dir)
    ids = tok["ids"]

    torch.manual_seed(seed)
    llm = _build_llm(backbone, tok)
    vision = _build_vision(image_size, with_head=backbone == "llama3")
    k = 3 if projector == "mlp_downsample_3x3_fix" else 2
    mm = _build_projector(k, vision.config.hidden_size, llm.config.hidden_size)
    for module in (llm, vision, mm):
        _randomize(module, store)
        module.eval()

    # --- llm/ ---
    copy.deepcopy(llm).to(store).save_pretrained(llm_dir)  # a copy: float buffers (inv_freq) stay exact
    llm_cfg = _hub_llm_config(llm_dir, backbone, dtype, version)
    gen = ({"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"]} if backbone == "llama3"
           else {"bos_token_id": ids["<|endoftext|>"], "do_sample": False, "eos_token_id": ids["<|endoftext|>"],
                 "max_new_tokens": 2048})
    _write_json(os.path.join(llm_dir, "generation_config.json"), {**gen, "transformers_version": version})

    # --- vision_tower/ ---
    copy.deepcopy(vision).to(store).save_pretrained(vt_dir)
    _hub_vision_names(vt_dir)
    vt_cfg = _hub_vision_config(vt_dir, dtype, version, with_head=backbone == "llama3")
    _write_json(os.path.join(vt_dir, "preprocessor_config.json"), {
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size}})

    # --- mm_projector/ ---
    from safetensors.torch import save_file

    state = {f"layers.{name}": p.detach().to(store).contiguous() for name, p in mm.state_dict().items()}
    save_file(state, os.path.join(pj_dir, "model.safetensors"), metadata={"format": "pt"})
    pj_cfg = {"_name_or_path": f"{CLUSTER}/mm_projector", "architectures": ["MultimodalProjector"],
              "mm_projector_type": projector, "model_type": "v2l_projector", "torch_dtype": dtype,
              "transformers_version": version}
    _write_json(os.path.join(pj_dir, "config.json"), pj_cfg)

    # --- top-level config.json ---
    top = {
        "_name_or_path": CLUSTER,
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": llm_cfg,
        "vision_tower_cfg": vt_cfg,
        "mm_projector_cfg": pj_cfg,
        "resume_path": CLUSTER,
        "hidden_size": llm.config.hidden_size,
        "mm_hidden_size": vision.config.hidden_size,
        "image_aspect_ratio": "resize",
        "num_video_frames": num_video_frames,
        "fps": 0.0,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_projector_lr": None,
        "vision_tower_lr": None,
        "vision_resolution": -1,
        "interpolate_mode": "linear",
        "drop_path_rate": 0.0,
        "s2": False,
        "s2_scales": "336,672,1008",
        "s2_max_split_size": 336,
        "chat_template": None,
        "model_dtype": "torch.bfloat16",
        "tune_language_model": True,
        "tune_mm_projector": True,
        "tune_vision_tower": True,
        "transformers_version": version,
    }
    if backbone == "qwen2":  # NVILA-era fields
        top.update({
            "dynamic_s2": False,
            "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
            "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"}),
        })
    _write_json(os.path.join(out_dir, "config.json"), top)

    g = image_size // PATCH
    llama = backbone == "llama3"
    return VilaFixture(
        path=out_dir, backbone=backbone, projector=projector, vision=vision, llm=llm, mm_projector=mm,
        image_size=image_size, patches_per_side=g, k=k, order="column" if llama else "row",
        tokens_per_image=math.ceil(g / k) ** 2, vocab_rows=llm.config.vocab_size, tokenizer_len=tok["len"],
        bos=ids["<|begin_of_text|>"] if llama else None,
        eos=ids["<|end_of_text|>"] if llama else ids["<|endoftext|>"],
        eot=ids["<|eot_id|>"] if llama else None,
        im_end=None if llama else ids["<|im_end|>"],
        pad=ids["[PAD]"], newline=tok["newline"],
        sentinel=None if llama else ids["<vila/sentinel>"],
        image=None if llama else ids["<image>"],
        video=None if llama else ids["<vila/video>"],
        ids=dict(ids))


# --- models ----------------------------------------------------------------------------------------

def _build_llm(backbone, tok):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    ids = tok["ids"]
    common = dict(vocab_size=tok["rows"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if backbone == "llama3":
        cfg = LlamaConfig(**common, rms_norm_eps=1e-5, max_position_embeddings=262144, attention_bias=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 207112184.0},
                          bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"])
        return LlamaForCausalLM(cfg)
    cfg = Qwen2Config(**common, rms_norm_eps=1e-6, max_position_embeddings=131072, use_sliding_window=False,
                      sliding_window=131072, max_window_layers=28,
                      rope_parameters={"rope_type": "default", "rope_theta": 15300000.0},
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"])
    return Qwen2ForCausalLM(cfg)


def _build_vision(image_size, with_head):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                             image_size=image_size, patch_size=PATCH, hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6, vision_use_head=with_head)
    return SiglipVisionModel(cfg)


def _build_projector(k, c, h):
    """VH base_projector.py layouts; index 0 (the DownSample block) is an Identity placeholder."""
    nn = torch.nn
    if k == 2:  # mlp_downsample / mlp_downsample_2x2_fix
        return nn.Sequential(nn.Identity(), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(), nn.Linear(h, h))
    return nn.Sequential(nn.Identity(), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                         nn.LayerNorm(3 * c), nn.Linear(3 * c, h), nn.GELU(), nn.Linear(h, h))


def _randomize(module, store):
    """Draw like tests/fixtures_llava.py, then round to the stored dtype (parameters only: buffers
    such as rotary inv_freq stay float32) so the float32 modules equal what the files hold."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
            if p.dim() == 1 and name.endswith("weight") and ("norm" in name or _is_norm(module, name)):
                p.add_(1.0)  # norm gains around 1, as trained models have
            p.copy_(p.to(store).float())


def _is_norm(module, name):
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return isinstance(owner, torch.nn.LayerNorm)


# --- config rewriting to the hub's (transformers 4.x) form ----------------------------------------

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _hub_llm_config(llm_dir, backbone, dtype, version):
    """transformers 5 writes `rope_parameters` and `dtype`; the hub files (4.37/4.46) say
    `rope_theta`, `rope_scaling`, `torch_dtype`, and carry a cluster `_name_or_path`."""
    path = os.path.join(llm_dir, "config.json")
    cfg = _read_json(path)
    rope = cfg.pop("rope_parameters", None) or {}
    cfg.pop("dtype", None)
    for key in ("head_dim", "layer_types"):  # derived; absent from the 4.x files
        cfg.pop(key, None)
    cfg.update({"_name_or_path": f"{CLUSTER}/llm", "rope_theta": rope.get("rope_theta"), "rope_scaling": None,
                "torch_dtype": dtype, "transformers_version": version})
    cfg.pop("pad_token_id", None)
    if backbone == "qwen2":  # 5.x nulls it when use_sliding_window is false; the hub files say 131072
        cfg["sliding_window"] = 131072
    cfg = dict(sorted(cfg.items()))
    _write_json(path, cfg)
    return cfg


def _hub_vision_config(vt_dir, dtype, version, with_head):
    path = os.path.join(vt_dir, "config.json")
    cfg = _read_json(path)
    cfg.pop("dtype", None)
    if with_head:
        cfg.pop("vision_use_head", None)  # absent = true (the 384-px towers' config)
    cfg.update({"_name_or_path": f"{CLUSTER}/vision_tower", "torch_dtype": dtype, "transformers_version": version})
    cfg = dict(sorted(cfg.items()))
    _write_json(path, cfg)
    return cfg


def _hub_vision_names(vt_dir):
    """transformers 5 saves SiglipVisionModel keys without a prefix; the hub files (4.x saves) say
    `vision_model.embeddings.*` etc. (spec 2.3.2). Write the hub's names."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(vt_dir, "model.safetensors")
    state = load_file(path)
    renamed = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in state.items()}
    save_file(renamed, path, metadata={"format": "pt"})


# --- tokenizers ------------------------------------------------------------------------------------

def _train_byte_bpe(regex, extra_lines=(), vocab_size=600):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(training_sentences()) + list(extra_lines), trainer)
    return tok


def _newline_id(tok):
    enc = tok.encode("\n", add_special_tokens=False).ids
    assert len(enc) == 1, enc
    return enc[0]


def _llama3_tokenizer(llm_dir):
    """Llama-3-LongVILA `llm/`: tokenizer.json (byte-level BPE, TemplateProcessing that prepends
    <|begin_of_text|>), tokenizer_config.json (PreTrainedTokenizerFast), special_tokens_map.json.
    No <image> token (old code splices -200), no chat template (llama_3 lives in VILA's code)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    # a few template-like lines so "\n\n" and the header words get merges, as in the real vocabulary
    extra = ["system\n\nYou are a helpful language and vision assistant.",
             "user\n\nWhat is this?", "assistant\n\nA cat.\n\n"] * 5
    trained = _train_byte_bpe(LLAMA3_PRETOKENIZE_REGEX, extra)
    vocab = trained.get_vocab()
    merges = _merges_of(trained)
    n = len(vocab)
    # Llama-3's tokenizer.json: BPE with ignore_merges, Split(regex)+ByteLevel pre-tokenizer, no
    # normalizer, post-processor Sequence[ByteLevel, TemplateProcessing(bos $A)], ByteLevel decoder.
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    ids = {t: n + i for i, t in enumerate(LLAMA3_SPECIALS)}
    ids["[PAD]"] = n + len(LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, ids[bos])]),
    ])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ids])
    assert all(tok.token_to_id(t) == i for t, i in ids.items())
    tok.save(os.path.join(llm_dir, "tokenizer.json"))

    _write_json(os.path.join(llm_dir, "tokenizer_config.json"), {
        "added_tokens_decoder": {str(i): _added(t) for t, i in ids.items()},
        "bos_token": bos,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|end_of_text|>",
        "legacy": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 262144,
        "pad_token": "[PAD]",
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    plain = {k: v for k, v in _added("").items() if k != "special"}
    _write_json(os.path.join(llm_dir, "special_tokens_map.json"), {
        "bos_token": {**plain, "content": bos},
        "eos_token": {**plain, "content": "<|end_of_text|>"},
        "pad_token": {**plain, "content": "[PAD]"},
    })
    total = n + len(ids)
    return {"ids": ids, "rows": total, "len": total, "newline": _newline_id(tok)}


def _qwen2_tokenizer(llm_dir):
    """qwen2 LongVILA `llm/`: vocab.json + merges.txt + added_tokens.json + tokenizer_config.json (with
    the Qwen2-Instruct chat template) + special_tokens_map.json, and NO tokenizer.json. Added ids:
    <|endoftext|> <|im_start|> <|im_end|> [BOS] [PAD] (embedding rows end here), then VILA's
    <vila/sentinel> <image> <vila/video>."""
    from tokenizers import AddedToken

    tok = _train_byte_bpe(QWEN2_PRETOKENIZE_REGEX)
    n = tok.get_vocab_size()
    tok.model.save(llm_dir)  # vocab.json + merges.txt
    names = QWEN2_VILA_ADDED + VILA_MEDIA_ADDED
    ids = {t: n + i for i, t in enumerate(names)}
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in names])
    assert all(tok.token_to_id(t) == i for t, i in ids.items())
    extra = ["<|im_start|>", "<|im_end|>"]
    _write_json(os.path.join(llm_dir, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added(t) for t, i in ids.items()},
        "additional_special_tokens": extra,
        "bos_token": "[BOS]",
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "[PAD]",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    plain = {k: v for k, v in _added("").items() if k != "special"}
    _write_json(os.path.join(llm_dir, "special_tokens_map.json"), {
        "additional_special_tokens": extra,
        "bos_token": {**plain, "content": "[BOS]"},
        "eos_token": {**plain, "content": "<|im_end|>"},
        "pad_token": {**plain, "content": "[PAD]"},
    })
    _write_json(os.path.join(llm_dir, "added_tokens.json"), ids)
    return {"ids": ids, "rows": n + len(QWEN2_VILA_ADDED), "len": n + len(names), "newline": _newline_id(tok)}


def _merges_of(tok):
    model = json.loads(tok.to_str())["model"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


# --- reference pieces ------------------------------------------------------------------------------

def downsample(features, k=2, order="row"):
    """Spec 2.5: [N, G*G, C] -> [N, ceil(G/k)**2, k*k*C].

    Reshape row-major to [G, G, C]; zero-pad bottom rows / right columns up to a multiple of k
    (before anything else, P2); merged token (i, j) = channel concat of its k x k block in row-major
    sub-order; tokens emitted row-major (i outer, "row": NVILA-era code) or column-major (j outer,
    "column": the 2024 VILA1.5 / LongVILA-branch code, P1)."""
    if order not in ("row", "column"):
        raise ValueError(f"unknown order {order!r}")
    n, t, c = features.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"{t} tokens is not a square grid")
    x = features.reshape(n, g, g, c)
    m = -(-g // k)
    pad = m * k - g
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad, 0, pad))  # C untouched, then W right, then H bottom
    x = x.reshape(n, m, k, m, k, c).permute(0, 1, 3, 2, 4, 5)  # [N, i, j, a, b, C]
    if order == "column":
        x = x.transpose(1, 2)  # [N, j, i, a, b, C]
    return x.reshape(n, m * m, k * k * c)


@torch.no_grad()
def reference_image_features(fx, pixel_values, order=None):
    """[N, 3, S, S] -> [N, T, H]: SigLIP hidden_states[-2] (all tokens, cls_patch) -> downsample ->
    projector. order None = the fixture's own generation (fx.order)."""
    out = fx.vision(pixel_values=pixel_values.float(), output_hidden_states=True)
    feats = out.hidden_states[-2]
    return fx.mm_projector(downsample(feats, fx.k, order or fx.order))


def siglip_processor(fx):
    """transformers' PIL-based SigLIP processor from the folder's preprocessor_config.json
    (5.2x: SiglipImageProcessorPil; earlier releases: the slow SiglipImageProcessor)."""
    import transformers

    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return cls.from_pretrained(os.path.join(fx.path, "vision_tower"))


def siglip_pixels(fx, pil_images):
    """"resize" aspect mode (spec 2.6): PIL bicubic resize of the whole image to S x S (squash), then the
    SigLIP processor (rescale 1/255, mean/std 0.5; its own resize is then a no-op)."""
    from PIL import Image

    s = fx.image_size
    imgs = [im.convert("RGB").resize((s, s), Image.BICUBIC) for im in pil_images]
    return siglip_processor(fx)(images=imgs, return_tensors="pt")["pixel_values"]


def uniform_frame_indices(total, n, rule="round"):
    """Spec 2.7 frame indices.

    rule="round" (NVILA-era VN/VH `_load_video`): np.round(np.linspace(0, total-1, n)) (numpy rounds
    half to even); the frames are returned for every index, so a clip shorter than n gives
    duplicates (e.g. total 3, n 5 -> [0, 0, 1, 2, 2]), exactly as that code does.
    rule="int" (2024 LongVILA branch `get_frame_from_vcap`): np.linspace(0, total-1, n, dtype=int)
    (truncation); a clip with fewer than n frames gives all its frames, in order.
    """
    if total <= 0 or n <= 0:
        return []
    if rule == "round":
        return np.round(np.linspace(0, total - 1, n)).astype(int).tolist()
    if rule == "int":
        if total < n:
            return list(range(total))
        return np.linspace(0, total - 1, n, dtype=int).tolist()
    raise ValueError(f"unknown rule {rule!r}")
