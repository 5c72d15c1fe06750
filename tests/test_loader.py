"""Loading: every key layout and config spelling gives the same model; malformed checkpoints give
one clear CheckpointError."""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tqdm import tqdm

import tinyvila
from tinyvila import loader
from tinyvila.models import layers
from fixtures_llava import build_llava_next
from tinyvila.errors import CheckpointError, ContextError, TinyVilaError

PROMPT = "What is in the picture?"


def load(path, **kw):
    return tinyvila.load(path, device="cpu", dtype="float32", **kw)


def copy(src, tmp_path, name="ckpt"):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def reference(llava_vicuna, image_files):
    """Prompt ids (with the placeholder once) and logits of the hub-layout vicuna checkpoint."""
    eng = load(llava_vicuna)
    img = Image.open(image_files[0])
    ids = eng.encode_text(eng.render([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": PROMPT}]}]))
    return ids, eng.image_token_id, img, eng.logits(input_ids=ids, images=[img])


@pytest.mark.parametrize("layout", ["module", "original"])
def test_key_layouts_load_the_same_model(tmp_path, reference, layout):
    ids, image_id, img, ref = reference
    d = tmp_path / layout
    build_llava_next(d, "vicuna", layout=layout)  # same seed: the same weights as the fixture
    eng = load(d)
    ids = [eng.image_token_id if t == image_id else t for t in ids]
    assert (eng.logits(input_ids=ids, images=[img]) - ref).abs().max() < 1e-5
    if layout == "original":
        # No <image> token: the text is split on the placeholder and spliced, as LLaVA did.
        assert eng.image_token_id == -200 and eng.tokenizer.token_to_id("<image>") is None
        r = eng.generate(PROMPT, images=[img], max_new_tokens=3, temperature=0, ignore_eos=True)
        assert len(r.token_ids) == 3 and r.stats.visual_tokens > 0


@pytest.mark.parametrize("key, expected", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "language_model.lm_head.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
    ("vision_tower.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
    ("model.vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
    ("model.vision_tower.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
    ("model.vision_tower.vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
    ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("model.mm_projector.2.bias", "multi_modal_projector.linear_2.bias"),
    ("image_newline", "image_newline"),
    ("model.image_newline", "image_newline"),
])
def test_every_key_spelling(key, expected):
    from tinyvila.models.llava_next import canonical_name

    assert canonical_name(key) == expected


def test_original_layout_splices_like_llava(tmp_path):
    """Original LLaVA tokenizes the text around each <image> separately (each chunk with BOS, the
    BOS then stripped from every chunk but the first) and joins the chunks with -200."""
    from transformers import AutoTokenizer

    d = tmp_path / "original"
    build_llava_next(d, "mistral", layout="original")
    eng = load(d)
    hf = AutoTokenizer.from_pretrained(d)
    for prompt in ["[INST] <image>\nWhat is this? [/INST]", "A <image> and <image>\nB", "<image>\nx"]:
        chunks = [hf(c).input_ids for c in prompt.split("<image>")]
        expected = chunks[0][:1]
        for i, c in enumerate(chunks):
            expected += ([-200] if i else []) + c[1:]
        assert eng.encode_text(prompt) == expected, prompt


def test_sharded_checkpoint(tmp_path, reference, llava_vicuna):
    from transformers import LlavaNextForConditionalGeneration

    ids, _, img, ref = reference
    d = copy(llava_vicuna, tmp_path)
    (d / "model.safetensors").unlink()
    LlavaNextForConditionalGeneration.from_pretrained(llava_vicuna).save_pretrained(d, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    assert (load(d).logits(input_ids=ids, images=[img]) - ref).abs().max() < 1e-5


@pytest.fixture(scope="module")
def three_shards(llava_vicuna, tmp_path_factory):
    """The vicuna checkpoint split into three safetensors shards with an index."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("three_shards")
    shutil.copytree(llava_vicuna, d, dirs_exist_ok=True)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names, weight_map = sorted(state), {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: state[n] for n in names[i::3]}
        save_file(part, d / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_progress_bar_over_the_shards(three_shards, reference, capsys):
    ids, _, img, ref = reference
    eng = load(three_shards, progress=True)
    err = capsys.readouterr().err
    size = sum(f.stat().st_size for f in three_shards.glob("*.safetensors"))
    assert f"Loading weights:   0%|          | 0.00/{tqdm.format_sizeof(size, divisor=1024)}" in err, err
    assert (eng.logits(input_ids=ids, images=[img]) - ref).abs().max() < 1e-5
    load(three_shards)  # progress=None: stderr is not a terminal here, so nothing is printed
    load(three_shards, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("spelling", ["rope_theta_4x", "no_rope_fields"])
def test_config_spellings_and_defaults(tmp_path, reference, llava_vicuna, spelling):
    """4.x `rope_theta` and a vicuna config that leaves RoPE out both mean theta = 10000."""
    ids, _, img, ref = reference

    def rewrite(cfg):
        text = cfg["text_config"]
        params = text.pop("rope_parameters", None) or {}
        text.pop("rope_theta", None)
        if spelling == "rope_theta_4x":
            text["rope_theta"] = params.get("rope_theta", 10000.0)

    d = copy(llava_vicuna, tmp_path)
    edit_json(d / "config.json", rewrite)
    assert (load(d).logits(input_ids=ids, images=[img]) - ref).abs().max() < 1e-5


def test_config_defaults_match_transformers(llava_vicuna, llava_mistral):
    """Fields left out of config.json take transformers' class defaults."""
    from transformers import AutoConfig

    for path in (llava_vicuna, llava_mistral):
        hf = AutoConfig.from_pretrained(path).text_config
        ours = load(path).model.language_model.cfg
        assert ours.rms_norm_eps == hf.rms_norm_eps
        assert ours.num_key_value_heads == hf.num_key_value_heads
        assert ours.sliding_window == getattr(hf, "sliding_window", None)
        assert ours.rope_theta == hf.rope_parameters["rope_theta"]


def test_two_engines_in_one_process(llava_vicuna, llava_mistral, image_files):
    a, b = load(llava_vicuna), load(llava_mistral)
    img = Image.open(image_files[3])
    ra = a.generate("Hi", images=[img], max_new_tokens=4, temperature=0, ignore_eos=True)
    rb = b.generate("Hi", images=[img], max_new_tokens=4, temperature=0, ignore_eos=True)
    assert ra.token_ids == a.generate("Hi", images=[img], max_new_tokens=4, temperature=0,
                                      ignore_eos=True).token_ids
    assert len(rb.token_ids) == 4


# ---------------------------------------------------------------------------- malformed checkpoints

def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _wrong_shape(d):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, d / "model.safetensors")


def _drop_tensor(d):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    del state[next(k for k in state if k.endswith("post_attention_layernorm.weight"))]
    save_file(state, d / "model.safetensors")


def _pickle_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _missing_shard(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors"}}))


BAD = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "malformed config.json": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "unknown architecture": (lambda d: edit_json(d / "config.json", lambda c: c.update(
        architectures=["FancyVLM"], model_type="fancy")), "supports LLaVA-NeXT"),
    "truncated safetensors": (_truncate, "truncated or corrupt"),
    "wrong tensor shape": (_wrong_shape, "has shape"),
    "missing tensor": (_drop_tensor, "missing tensors"),
    "pickled weights only": (_pickle_only, "safetensors only"),
    "missing shard": (_missing_shard, "is missing"),
    "no tokenizer": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer.model")], "tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_checkpoints(tmp_path, llava_vicuna, case):
    breaker, message = BAD[case]
    d = copy(llava_vicuna, tmp_path)
    breaker(d)
    with pytest.raises(CheckpointError, match=message) as e:
        load(d)
    assert "\n" not in str(e.value)


def test_missing_directory_and_offline_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    # Not in the cache and no way to download it: one line naming --model PATH.
    code = ("import tinyvila\ntry:\n    tinyvila.load('no-such-org/no-such-model')\n"
            "except tinyvila.CheckpointError as e:\n    print(e)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "--model PATH" in out.stdout and len(out.stdout.strip().splitlines()) == 1, out.stderr


def test_prompt_longer_than_context(llava_vicuna, image_files):
    eng = load(llava_vicuna, max_seq_len=64)
    with pytest.raises(ContextError, match="context holds 64"):
        eng.generate("Describe.", images=[image_files[0]])
    with eng.session() as s:  # a failed turn leaves the conversation usable
        with pytest.raises(ContextError):
            s.ask("word " * 100)
        assert s.ask("Hi", max_new_tokens=2, ignore_eos=True).token_ids


def test_max_seq_len_beyond_the_position_limit(llava_vicuna, monkeypatch):
    """More than max_position_embeddings (1024 here): one line naming the limit, before the model's
    weights or any cache are allocated."""
    allocated = []
    monkeypatch.setattr(layers, "materialize", lambda *a: allocated.append(a))
    with pytest.raises(TinyVilaError, match="limit of 1024 positions") as e:
        load(llava_vicuna, max_seq_len=1025)
    assert len(str(e.value).splitlines()) == 1 and not allocated
    monkeypatch.undo()
    eng = load(llava_vicuna, max_seq_len=1024)  # the limit itself is fine
    with pytest.raises(TinyVilaError, match="limit of 1024 positions"):
        eng.session(max_seq_len=4096)
    out = subprocess.run([sys.executable, "-m", "tinyvila.chat", str(llava_vicuna), "-p", "hi", "-n", "2",
                          "--max-seq-len", "100000"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: max_seq_len 100000 is more than this model's limit of 1024 positions "
        "(max_position_embeddings in config.json)"], out.stderr


def test_placeholder_count_mismatch(llava_vicuna, image_files):
    eng = load(llava_vicuna)
    with pytest.raises(TinyVilaError, match="placeholder"):
        eng.generate(input_ids=[1, eng.image_token_id, 5], images=[])
    with pytest.raises(TinyVilaError, match="placeholder"):
        eng.generate("<image> and <image>", images=[image_files[0]])


def test_loading_and_generating_never_import_dynamo(llava_vicuna, image_files):
    """Building a model on the meta device must not reach torch._refs (nn.Embedding's init,
    empty_like): that imports torch._dynamo and torch.fx, most of a small model's start-up."""
    code = ("import sys, tinyvila\n"
            f"eng = tinyvila.load({str(llava_vicuna)!r}, device='cpu')\n"
            f"eng.generate('Hi', images=[{str(image_files[0])!r}], max_new_tokens=2, temperature=0)\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_progress_bars_are_automatic_on_a_terminal(monkeypatch):
    """progress=None: bars only when stderr is a terminal, after a moment; True at once."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    auto = loader.progress_bar(None, total=1)
    assert not auto.disable and auto.delay > 0
    assert loader.progress_bar(True, total=1).delay == 0 and loader.progress_bar(False, total=1).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert loader.progress_bar(None, total=1).disable and not loader.progress_bar(True, total=1).disable
