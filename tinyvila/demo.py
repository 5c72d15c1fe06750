"""`tinyvila-demo` / `python -m tinyvila.demo`: try tinyvila in seconds, with no download.

Builds a tiny LLaVA-NeXT checkpoint with random weights in the hub's format (config.json,
generation_config.json, preprocessor_config.json, tokenizer.json + tokenizer_config.json with a chat
template, safetensors shards with an index), draws a test picture, and asks one question about it
through the whole path (tinyvila.load, then generate). The checkpoint is a real one in every
respect but its weights: transformers loads it too. A random model answers gibberish; the demo says
so, and what to run for a real model.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from . import __version__, load
from .chat import format_stats
from .engine import resolve_device
from .errors import TinyVilaError, run_cli

REAL_MODEL_COMMAND = ('python -m tinyvila.chat llava-hf/llava-v1.6-vicuna-7b-hf --image photo.jpg '
                      '-p "Describe the image."')
QUESTION = "What is in this picture?"
TILE, PATCH = 56, 14  # CLIP tiles of 56 px in 14 px patches: 16 visual tokens a tile
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
            hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=2, image_size=TILE, patch_size=PATCH, num_channels=3, projection_dim=32,
              hidden_act="quick_gelu", layer_norm_eps=1e-5)
# The vicuna chat template of llava-hf/llava-v1.6-vicuna-7b-hf.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
WORDS = ("the a cat dog man woman child car bus tree house street sky image picture photo red blue green white "
         "black small big old new running sitting standing holding looking at on in of with and what is this "
         "that there here left right top bottom color many people light dark round square").split()


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A small Llama-style BPE (SentencePiece's "▁" word marker, BOS added) trained on made-up
    sentences, with <unk> <s> </s> as ids 0-2 as in Llama tokenizers."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!")
                 for _ in range(400)]
    tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    tok.train_from_iterator(sentences, BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                  initial_alphabet=alphabet, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<image>", "<pad>")])
    return tok


def write_tokenizer(out: Path) -> tuple[int, int, int]:
    """tokenizer.json and tokenizer_config.json (with the chat template); returns the ids of
    <image> and <pad> and the number of tokens."""
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    names = {i: t for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>") if (i := tok.token_to_id(t)) is not None}
    write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in names.items()},
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": TEXT["max_position_embeddings"], "tokenizer_class": "LlamaTokenizer",
        "processor_class": "LlavaNextProcessor", "chat_template": CHAT_TEMPLATE,
    })
    return tok.token_to_id("<image>"), tok.token_to_id("<pad>"), tok.get_vocab_size()


def write_configs(out: Path, image_id: int, pad_id: int, vocab_rows: int) -> None:
    write_json(out / "config.json", {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "dtype": "float32",
        "text_config": dict(TEXT, vocab_size=vocab_rows, pad_token_id=0), "vision_config": VISION,
        "image_token_index": image_id, "pad_token_id": pad_id, "image_grid_pinpoints": PINPOINTS,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "tie_word_embeddings": False,
    })
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id})
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "LlavaNextImageProcessor", "crop_size": {"height": TILE, "width": TILE},
        "size": {"shortest_edge": TILE}, "image_grid_pinpoints": PINPOINTS, "do_center_crop": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "do_convert_rgb": True, "do_pad": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255,
    })


def vision_shapes() -> dict:
    """The CLIP tower's tensors under the llava-hf hub names, every layer and the final norm
    included (tinyvila skips the ones it never runs; transformers wants them all)."""
    c, inner, p = VISION["hidden_size"], VISION["intermediate_size"], PATCH
    pre = "vision_tower.vision_model."
    shapes = {pre + "embeddings.class_embedding": [c],
              pre + "embeddings.patch_embedding.weight": [c, 3, p, p],
              pre + "embeddings.position_embedding.weight": [(TILE // p) ** 2 + 1, c]}
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"{pre}{norm}.weight": [c], f"{pre}{norm}.bias": [c]})
    for i in range(VISION["num_hidden_layers"]):
        layer = f"{pre}encoder.layers.{i}."
        for name, (rows, cols) in {"self_attn.q_proj": (c, c), "self_attn.k_proj": (c, c), "self_attn.v_proj": (c, c),
                                   "self_attn.out_proj": (c, c), "mlp.fc1": (inner, c), "mlp.fc2": (c, inner)}.items():
            shapes.update({layer + name + ".weight": [rows, cols], layer + name + ".bias": [rows]})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({layer + norm + ".weight": [c], layer + norm + ".bias": [c]})
    return shapes


def language_shapes(vocab_rows: int) -> dict:
    """The projector, image_newline and Llama decoder under the llava-hf hub names."""
    c, inner, d = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["hidden_size"] // TEXT["num_attention_heads"]
    q, kv = TEXT["num_attention_heads"] * d, TEXT["num_key_value_heads"] * d
    shapes = {"multi_modal_projector.linear_1.weight": [c, VISION["hidden_size"]],
              "multi_modal_projector.linear_1.bias": [c], "multi_modal_projector.linear_2.weight": [c, c],
              "multi_modal_projector.linear_2.bias": [c], "image_newline": [c],
              "language_model.model.embed_tokens.weight": [vocab_rows, c],
              "language_model.model.norm.weight": [c], "language_model.lm_head.weight": [vocab_rows, c]}
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        shapes.update({layer + "self_attn.q_proj.weight": [q, c], layer + "self_attn.k_proj.weight": [kv, c],
                       layer + "self_attn.v_proj.weight": [kv, c], layer + "self_attn.o_proj.weight": [c, q],
                       layer + "mlp.gate_proj.weight": [inner, c], layer + "mlp.up_proj.weight": [inner, c],
                       layer + "mlp.down_proj.weight": [c, inner], layer + "input_layernorm.weight": [c],
                       layer + "post_attention_layernorm.weight": [c]})
    return shapes


def write_weights(out: Path, vocab_rows: int, seed: int = 0) -> None:
    """Random weights in two shards (vision tower; projector and LLM) with their index. Norm
    weights near 1 and matrices large enough that the answer depends on the image and the question."""
    gen = torch.Generator().manual_seed(seed)
    shards = {"model-00001-of-00002.safetensors": vision_shapes(),
              "model-00002-of-00002.safetensors": language_shapes(vocab_rows)}
    weight_map, total = {}, 0
    for file, shapes in shards.items():
        tensors = {}
        for name, shape in shapes.items():
            std = 1.0 if name in ("image_newline", "language_model.model.embed_tokens.weight") else (
                0.2 if len(shape) > 1 else 0.05)
            norm_weight = "norm" in name.rpartition(".")[0] and name.endswith("weight")
            tensors[name] = torch.randn(shape, generator=gen) * std + (1.0 if norm_weight else 0.0)
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))})


def build_checkpoint(out) -> Path:
    """Write the tiny checkpoint into the folder `out` (created if needed); returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_id, pad_id, n_tokens = write_tokenizer(out)
    vocab_rows = (n_tokens + 63) // 64 * 64  # padded past the tokenizer, as the hub's 32064 rows for 32002 tokens
    write_configs(out, image_id, pad_id, vocab_rows)
    write_weights(out, vocab_rows)
    return out


def demo_picture(width: int = 160, height: int = 120) -> Image.Image:
    """A sky, a sun, a house and grass."""
    img = Image.new("RGB", (width, height), (110, 170, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(60, 160, 70))
    draw.ellipse([width - 45, 10, width - 15, 40], fill=(250, 210, 60))
    draw.rectangle([30, height // 2 - 5, 80, height * 2 // 3 + 10], fill=(190, 70, 50))
    draw.polygon([(25, height // 2 - 5), (55, height // 4), (85, height // 2 - 5)], fill=(120, 50, 40))
    return img


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tinyvila-demo", description="Build a tiny random LLaVA-NeXT checkpoint "
                                "locally (no download) and ask it one question about a generated picture.")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint (and the picture, example.png) to DIR and "
                   "keep it (default: a temporary folder, removed afterwards)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("-p", "--prompt", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def check_keep(folder) -> Path:
    """--keep DIR: a new or empty folder, or one an earlier demo wrote (it is rewritten)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise TinyVilaError(f"--keep {folder}: not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / "example.png").is_file():
        raise TinyVilaError(f"--keep {folder}: the folder is not empty (give a new one)")
    return path


def run(folder: Path, device, prompt: str, kept: bool) -> None:
    t0 = time.perf_counter()
    build_checkpoint(folder)
    picture = demo_picture()
    if kept:
        picture.save(folder / "example.png")
    print(f"Built a tiny random LLaVA-NeXT checkpoint in {time.perf_counter() - t0:.2f} s, no download: "
          f"{folder if kept else 'a temporary folder'}")
    engine = load(folder, device=device)
    print(f"Loaded on {engine.device} ({str(engine.dtype).removeprefix('torch.')}); asking about a "
          f"{picture.width}x{picture.height} test picture (a house under a sun).\n")
    result = engine.generate(prompt, images=[picture], max_new_tokens=24, temperature=0, ignore_eos=True)
    print(f"question: {prompt}\nanswer:   {result.text.strip()}\n")
    print(format_stats(result.stats))
    print("\nThe weights are random, so the answer is gibberish: what the demo shows is that the whole path "
          "works here\n(checkpoint files, tokenizer, chat template, image preprocessing, vision encoder, "
          "decoding).")
    if kept:
        print(f"Chat with it: python -m tinyvila.chat {folder} --image {folder / 'example.png'}")
    print(f"For a real model (a ~14 GB download on first use):\n  {REAL_MODEL_COMMAND}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        device = resolve_device(args.device)  # a bad --device or --keep is reported before any work
        if args.keep:
            run(check_keep(args.keep), device, args.prompt, kept=True)
            return
        with tempfile.TemporaryDirectory(prefix="tinyvila-demo-") as folder:
            run(Path(folder), device, args.prompt, kept=False)

    return run_cli(body, args.debug, "the demo model is tiny: is the GPU in use by another program?")


if __name__ == "__main__":
    sys.exit(main())
