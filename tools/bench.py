"""`tinyvila-bench`: time a full-size model of a real architecture, built with random weights on the
GPU (no checkpoint, no download: speed does not depend on the weights' values).

    tinyvila-bench --arch llava-next-vicuna-7b --image 672x672 --new-tokens 128
    tinyvila-bench --arch longvila-7b --video 256x448x448 --new-tokens 32

One turn runs through the same Session code as a chat (vision encoder, prefill, decode); each
setting first runs once untimed, then its timed runs are reported as a markdown table: vision
encoder and projector, LLM prefill, TTFT, decode tok/s at the reached context, the roofline
fraction (bytes one decode step must read / step time / copy bandwidth measured in the same run),
context and peak memory.
`--compare-hf` also times transformers on the same architecture in the same process.
`--plot FILE.png` also draws each setting's vision / prefill / decode time as stacked bars.
"""
import argparse
import json
import math
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import tinyvila
from tinyvila import __version__
from tinyvila.engine import resolve_device
from tinyvila.errors import TinyVilaError, check_output_file, run_cli
from tinyvila.generate import PREFILL_BUCKETS
from tinyvila.media import open_video
from tinyvila.models import layers
from tinyvila.models.llava_next import LlavaNext, LlavaNextConfig
from tinyvila.models.longvila import LongVILA, VilaConfig
from tinyvila.models.quantized import W4Linear
from tinyvila.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, QwenVisionConfig
from tinyvila.models.qwen3_vl import Qwen3VisionConfig, Qwen3VL, Qwen3VLConfig
from tinyvila.quant.smoothquant import quantize_encoder
from tinyvila.sampling import SamplingParams
from tinyvila.session import Session
from tinyvila.sparsity import Sparsity
from tinyvila.tools import plots

# The released checkpoints' config.json values (LLM, vision) for each built-in architecture.
LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)
MISTRAL_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                  max_position_embeddings=32768, sliding_window=None)
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=128000)
QWEN2_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=128000, tie_word_embeddings=True)
LONGVILA_QWEN2_7B = dict(QWEN2_7B, vocab_size=151648, rope_theta=15300000.0, max_position_embeddings=131072)
LLAMA3_8B = dict(vocab_size=128257, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=207112184.0,
                 max_position_embeddings=262144)
# Qwen3-VL: the Qwen3 LLMs (4B: Qwen/Qwen3-VL-4B-Instruct config.json; 2B, 8B: the same fields of the
# Qwen3-1.7B / Qwen3-8B LLMs they are built on) and two sizes of the ViT.
QWEN3_VL_TEXT = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-6,
                     max_position_embeddings=262144,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000, "mrope_interleaved": True,
                                      "mrope_section": [24, 20, 20]})
QWEN3_VL_2B = dict(QWEN3_VL_TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                   num_attention_heads=16, tie_word_embeddings=True)
QWEN3_VL_4B = dict(QWEN3_VL_TEXT, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                   num_attention_heads=32, tie_word_embeddings=True)
QWEN3_VL_8B = dict(QWEN3_VL_TEXT, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                   num_attention_heads=32)
QWEN3_VIT_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=(5, 11, 17))
QWEN3_VIT_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=(8, 16, 24))
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

ARCHS = {
    "llava-next-vicuna-7b": ("llava_next", dict(text=(LLAMA2_7B, "llama"))),
    "llava-next-mistral-7b": ("llava_next", dict(text=(MISTRAL_7B, "mistral"))),
    "qwen2.5-vl-3b": ("qwen2_5_vl", dict(text=(QWEN2_3B, "qwen2"), out=2048)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(text=(QWEN2_7B, "qwen2"), out=3584)),
    "qwen3-vl-2b": ("qwen3_vl", dict(text=(QWEN3_VL_2B, "qwen3"), vision=QWEN3_VIT_SMALL)),
    "qwen3-vl-4b": ("qwen3_vl", dict(text=(QWEN3_VL_4B, "qwen3"), vision=QWEN3_VIT_SMALL)),
    "qwen3-vl-8b": ("qwen3_vl", dict(text=(QWEN3_VL_8B, "qwen3"), vision=QWEN3_VIT_LARGE)),
    "longvila-7b": ("longvila", dict(text=(LONGVILA_QWEN2_7B, "qwen2"), image_size=448, generation="nvila")),
    "llama3-longvila-8b": ("longvila", dict(text=(LLAMA3_8B, "llama"), image_size=384, generation="old")),
}


def build(arch: str, device, dtype, quant: str | None = None):
    """The family module with random weights, allocated directly on `device`."""
    family, spec = ARCHS[arch]
    text = layers.TextConfig.from_dict(dict(spec["text"][0]), spec["text"][1])
    if family == "llava_next":
        cls, cfg = LlavaNext, LlavaNextConfig(text=text, vision=layers.VisionConfig())
    elif family == "qwen2_5_vl":
        text.mrope_section = [16, 24, 24]
        cls, cfg = Qwen2_5_VL, Qwen2_5_VLConfig(text=text, vision=QwenVisionConfig(out_hidden_size=spec["out"]))
    elif family == "qwen3_vl":
        vision = Qwen3VisionConfig(out_hidden_size=text.hidden_size, **spec["vision"])
        cls, cfg = Qwen3VL, Qwen3VLConfig(text=text, vision=vision)
    else:
        vision = layers.VisionConfig(image_size=spec["image_size"], **SIGLIP)
        old = spec["generation"] == "old"
        cls, cfg = LongVILA, VilaConfig(text=text, vision=vision, projector="mlp_downsample", feature_layer=-2,
                                        generation=spec["generation"], order="column" if old else "row",
                                        num_video_frames=256)
    with torch.device("meta"):
        model = cls(cfg)
    model = layers.materialize(model.to(dtype), device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if "w4a16" in (quant or ""):
        random_w4(model.language_model)
    if "w8a8" in (quant or ""):
        quantize_encoder(model)
    layers.align_rows(model)  # as Engine.from_pretrained does
    if family == "longvila":  # what bind_tokenizer sets from a real tokenizer
        model.newline_ids = [198]
        if not old:  # VILA's loader adds its media tokens after the vocabulary
            model.image_token_id, model.video_token_id = text.vocab_size + 1, text.vocab_size + 2
    return model.eval()


def media_items(model, args, seed: int = 0):
    rng = np.random.default_rng(seed)

    def picture(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    items = [model.prepare_image(picture(*map(int, size.split("x")))) for size in args.image]
    for spec in args.video:
        n, h, w = map(int, spec.split("x"))
        frames = open_video([picture(w, h) for _ in range(n)])
        item = (model.prepare_video(frames, max_frames=n) if "max_frames" in model.media_options
                else model.prepare_video(frames))
        items += item if isinstance(item, list) else [item]  # Qwen3-VL: one item per frame pair
    return items


class ProjectorTimer:
    """GPU time spent in the projector (LLaVA's multi_modal_projector, VILA's mm_projector, Qwen's
    patch merger) during a run, from CUDA events around its forward: no host synchronisation.
    Qwen's merger is part of its encoder's CUDA graph: replays run no Python hooks, so with graphs
    on its time stays in the encoder column and this reads 0."""

    def __init__(self, model, device):
        self.cuda = torch.device(device).type == "cuda"
        module = model.projector
        self.events = []
        module.register_forward_pre_hook(lambda *_: self._record())
        module.register_forward_hook(lambda *_: self._record())

    def _record(self):
        if self.cuda and torch.cuda.is_current_stream_capturing():
            return  # being captured into a graph: an event recorded now can never be timed
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:  # CPU work is synchronous
            self.events.append(time.perf_counter())

    def take(self) -> float:
        """Seconds spent in the projector since the last call."""
        pairs = list(zip(self.events[::2], self.events[1::2]))
        if self.cuda:
            torch.cuda.synchronize()
            seconds = sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        else:
            seconds = sum(b - a for a, b in pairs)
        self.events = []
        return seconds


def copy_bandwidth(device, gib: float = 2.0, trials: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the best of a few timed trials."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = 0.0
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        best = max(best, 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3))
    del src, dst
    return best


def random_w4(lm, group_size: int = 128) -> None:
    """Swap every decoder-layer linear of `lm` for a W4A16 one with random packed weights (speed
    does not depend on the values; these give weights of about the fp16 ones' size)."""
    for layer in lm.layers:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            old = layer.get_submodule(name)
            new = W4Linear.like(old, group_size)
            with torch.no_grad():
                new.qweight.random_(-2**31, 2**31 - 1)
                new.qzeros.fill_(0x77777777)  # zero point 7 everywhere
                new.scales.fill_(0.004)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            new.finalize(old.weight.dtype)
            layers.replace_module(layer, name, new)


def layer_bytes(module) -> int:
    """Bytes a layer's weights take in their stored format: a 4-bit linear counts half a byte per
    weight plus an fp16 scale and a 4-bit zero point per group (the AutoAWQ format)."""
    if isinstance(module, W4Linear):
        groups = module.in_features // module.group_size * module.out_features
        bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        return module.in_features * module.out_features // 2 + groups * 5 // 2 + bias
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def decode_bytes(lm, context: int) -> int:
    """What one decode step must read: every LLM weight (the embedding table: one row; a tied
    table is read in full as the output projection) plus the K and V of the whole context."""
    cfg = lm.cfg
    weights = sum(layer_bytes(m) for n, m in lm.named_modules() if n != "embed_tokens")
    table = lm.embed_tokens.weight
    weights += table.numel() * table.element_size() if cfg.tie_word_embeddings else table[0].numel() * table.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * cfg.head_dim * table.element_size()
    return weights + kv


def hf_model(arch, device, dtype):
    """transformers' model of the same architecture, random weights, on the GPU (--compare-hf)."""
    import transformers

    family, spec = ARCHS[arch]
    text = dict(spec["text"][0])
    if family == "llava_next":
        text_cfg = (transformers.LlamaConfig if spec["text"][1] == "llama" else transformers.MistralConfig)(**text)
        cfg = transformers.LlavaNextConfig(text_config=text_cfg, image_token_index=32000)
        cls = transformers.LlavaNextForConditionalGeneration
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(out_hidden_size=spec["out"], depth=32,
                                            hidden_size=1280, intermediate_size=3420, num_heads=16,
                                            fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
                                            tokens_per_second=2, in_chans=3, hidden_act="silu"))
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3_vl":
        vision = dict(spec["vision"], out_hidden_size=text["hidden_size"])
        vision["deepstack_visual_indexes"] = list(vision["deepstack_visual_indexes"])
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                         tie_word_embeddings=text.get("tie_word_embeddings", False))
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        raise TinyVilaError(f"--compare-hf: transformers has no {arch} model class (VILA layout)")
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()


def hf_inputs(model, items, ids, image_token_id, device):
    """The same prompt for transformers: placeholders expanded, pixels as its processor gives them."""
    expanded = []
    for t in ids:
        expanded += [image_token_id] * items[0].n_tokens if t == image_token_id else [t]
    inputs = {"input_ids": torch.tensor([expanded], device=device)}
    item = items[0]
    if hasattr(item, "grid"):  # Qwen2.5-VL, Qwen3-VL
        inputs.update(pixel_values=item.pixels.to(device), image_grid_thw=torch.tensor([item.grid], device=device),
                      mm_token_type_ids=(inputs["input_ids"] == image_token_id).int())
    else:  # LLaVA-NeXT
        inputs.update(pixel_values=item.image.pixels[None].to(device),
                      image_sizes=torch.tensor([item.image.image_size], device=device))
    return inputs


def run_hf(args, items, ids, image_token_id) -> dict:
    """transformers' TTFT (prefill + first token) and decode tok/s on the same prompt."""
    import time

    model = hf_model(args.arch, args.device, getattr(torch, args.dtype))
    inputs = hf_inputs(model, items, ids, image_token_id, args.device)
    kw = dict(do_sample=False, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens, pad_token_id=0)
    result = {}
    with torch.no_grad():  # the vision encoder alone (+ projector / merger), best of three
        grid = inputs["image_grid_thw"] if "image_grid_thw" in inputs else inputs["image_sizes"]
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.model.get_image_features(inputs["pixel_values"], grid)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result["vision_s"] = min(times[1:])
    for _ in range(2):  # the first run warms up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, **dict(kw, min_new_tokens=1, max_new_tokens=1))
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ttft = t1 - t0
        result.update(ttft_s=ttft, decode_tok_s=(args.new_tokens - 1) / max(t2 - t1 - ttft, 1e-9))
    del model
    torch.cuda.empty_cache()
    return result


def question(n: int) -> list:
    """A question of n tokens after the media (--question-tokens; every turn asks one)."""
    return [200 + i % 1000 for i in range(n)]


def prompt_ids(model, items, text: int, asked: list) -> list:
    """A bench prompt: BOS, `text` filler tokens, a placeholder per media item, then the question."""
    placeholders = [model.image_token_id if it.kind == "image" else model.video_token_id for it in items]
    return [1] + list(range(100, 100 + text)) + placeholders + asked


class NoText:  # the bench feeds token ids; nothing is detokenized
    def stream_decoder(self):
        return SimpleNamespace(push=lambda t: "", flush=lambda: "")

    def decode(self, ids):
        return ""


def sampling(args, new_tokens: int, seed: int = 0) -> SamplingParams:
    """Fixed-length answers, greedy or sampled as --temperature / --top-p ask."""
    return SamplingParams(max_new_tokens=new_tokens, temperature=args.temperature, top_p=args.top_p, seed=seed,
                          ignore_eos=True)


def configs(args) -> list:
    """The sparsity settings to run: dense, the prefill stage alone when both stages are asked for
    (decode retrieval is then measured against it), then the one asked for."""
    asked = Sparsity.from_options(args.sparsity, prefill_sparsity=args.prefill_sparsity,
                                  decode_sparsity=args.decode_sparsity, history=args.history)
    dense = Sparsity(history=asked.history)
    stages = [dense, Sparsity(prefill=asked.prefill, history=asked.history), asked]
    return list(dict.fromkeys(stages))


def conversation(session, items, ids, question, params, turns, timer):
    """One conversation of `turns` questions about `items` in `session` (cleared first, so its
    captured graphs are kept and turns 2.. are real follow-ups over the cached media); yields
    (turn, stats, projector seconds) after each answer."""
    session.clear()
    session.pending = list(items)
    sparsity = session.sparsity
    turn_ids = ids
    for turn in range(turns):  # each question follows the last answer
        if turn:
            kept = turn_ids if sparsity.history == "keep" else ids[:-len(question)]
            turn_ids = kept + session.last_result.token_ids * (sparsity.history == "keep") + question
        session.complete(turn_ids, params)  # media + pending: the items, whatever the history
        yield turn + 1, session.last_result.stats, timer.take()


def engine_for(args):
    """The engine to time: a --model checkpoint, or an --arch built with random weights (an engine's
    attributes only). Fixed-length answers, nothing detokenized."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model:  # a real checkpoint folder (or hub id)
        engine = tinyvila.load(args.model, device=device, dtype=dtype, cuda_graphs=not args.no_graphs,
                               prefill_graphs=args.prefill_graphs)
        engine.tokenizer, engine.stop_ids = NoText(), set()  # fixed-length runs, nothing to detokenize
        model = engine.model
    else:
        model = build(args.arch, device, dtype, args.quant)
        layers.use_encoder_graphs(model, device.type == "cuda" and not args.no_graphs)  # as the engine does
        stream = torch.cuda.Stream(device) if device.type == "cuda" and not args.no_graphs else None
        engine = SimpleNamespace(model=model, device=device, dtype=dtype, tokenizer=NoText(), lock=threading.Lock(),
                                 banned=None, stop_ids=set(), capture_stream=lambda: stream,
                                 prefill_graphs=args.prefill_graphs and stream is not None,
                                 take_spare=lambda max_len: None, keep_spare=lambda spare: None)
    return engine, model


def run(args) -> list:
    device = torch.device(args.device)
    engine, model = engine_for(args)
    items = media_items(model, args)
    asked = question(args.question_tokens)
    ids = prompt_ids(model, items, args.text, asked)
    params = sampling(args, args.new_tokens)
    context = (sum(it.n_tokens for it in items) + len(ids) + args.turns * (args.new_tokens + len(asked) + 20)
               + PREFILL_BUCKETS[-1])  # room for a short prefill's padding past the prompt
    context = max(context, args.max_seq_len or 0)  # a chat's session has room for 8192 more tokens
    timer = ProjectorTimer(model, device)
    rows = []
    for sparsity in configs(args):  # dense first: the sparse rows are compared with it
        # One session per setting: its graphs are captured once. One untimed conversation first:
        # it compiles the Triton kernels for this setting's shapes, captures its graphs and grows
        # the allocator, none of which the timed runs should pay.
        session = Session(engine, [], None, context, sparsity=sparsity)
        for _ in conversation(session, items, ids, asked, params, args.turns, timer):
            pass
        for _ in range(args.runs):
            rows += [(sparsity, turn, stats, projector_s) for turn, stats, projector_s
                     in conversation(session, items, ids, asked, params, args.turns, timer)]
        session.close()
    hf = None
    if args.compare_hf:
        if not args.arch:
            raise SystemExit("--compare-hf needs --arch")
        hf = run_hf(args, items, ids, model.image_token_id)
    return rows, model, hf


def speedups(rows, lm, new_tokens: int) -> None:
    """Each sparse setting against dense, turn by turn, from the medians of this run's rows, decode
    next to what its bytes predict; decode retrieval also against the same p at d = 0."""
    def median(sparsity, turn, key):
        return float(np.median([getattr(s, key) for sp, t, s, _ in rows if sp == sparsity and t == turn]))

    def faster(base, sparsity, turn, key):  # how many times less `key` takes under `sparsity`
        b = median(sparsity, turn, key)
        return median(base, turn, key) / b if b else float("nan")  # (no vision time on follow-up turns)

    def decode(base, sparsity, turn):
        def step_bytes(sp):
            return decode_bytes(lm, int(median(sp, turn, "decode_context_tokens")) - new_tokens // 2)
        return (f"decode x{1 / faster(base, sparsity, turn, 'decode_tok_s'):.2f} "
                f"(bytes predict x{step_bytes(base) / step_bytes(sparsity):.2f})")

    def e2e(sp, turn):  # the answer's wall time, the once-per-conversation graph capture left out
        return median(sp, turn, "ttft_s") + median(sp, turn, "decode_s") - median(sp, turn, "graph_capture_s")

    settings = list(dict.fromkeys(sp for sp, _, _, _ in rows))
    dense = settings[0]
    for sparsity in settings[1:]:
        for turn in sorted({t for _, t, _, _ in rows}):
            prefill, ttft, vision = (faster(dense, sparsity, turn, k) for k in ("prefill_s", "ttft_s", "vision_s"))
            vision = "n/a" if math.isnan(vision) else f"x{vision:.2f}"  # no vision time on follow-up turns
            line = (f"{sparsity.label} turn {turn} vs dense: LLM prefill x{prefill:.2f}, "
                    f"TTFT x{ttft:.2f}, {decode(dense, sparsity, turn)}, vision {vision}, "
                    f"end to end x{e2e(dense, turn) / e2e(sparsity, turn):.2f}")
            if sparsity.decode:  # retrieval alone: against the same p at d = 0 (dense when p = 0)
                alone = Sparsity(prefill=sparsity.prefill, history=sparsity.history)
                line += (f"; vs d=0: {decode(alone, sparsity, turn)}, retrieval adds "
                         f"{1 / faster(alone, sparsity, turn, 'prefill_s') - 1:+.0%} to the prefill")
            print(line)


def followups(rows) -> None:
    """Each setting's TTFT turn by turn (medians over the runs): turns 2.. are the follow-ups."""
    for sparsity in dict.fromkeys(sp for sp, _, _, _ in rows):
        parts = []
        for turn in sorted({t for sp, t, _, _ in rows if sp == sparsity}):
            stats = [s for sp, t, s, _ in rows if sp == sparsity and t == turn]
            ttft = float(np.median([s.ttft_s for s in stats])) * 1e3
            graphed = ", graph" if all(s.prefill_graphed for s in stats) else ""
            parts.append(f"turn {turn} {ttft:.1f} ms ({stats[0].prefill_tokens} new tokens{graphed})")
        captured = max((s.prefill_graph_bytes for sp, _, s, _ in rows if sp == sparsity), default=0)
        memory = f"; prefill graphs hold {captured / 2**20:.0f} MiB" if captured else ""
        print(f"{sparsity.label} TTFT: " + ", ".join(parts) + memory)


def check_plot_path(p, path: str) -> None:
    """--plot: a .png in an existing folder, and matplotlib importable."""
    from pathlib import Path

    target = Path(path)
    if target.suffix.lower() != ".png":
        p.error(f"--plot writes a PNG: give a FILE.png, not {path!r}")
    if not target.parent.is_dir():
        p.error(f"--plot: no folder {str(target.parent)!r}")
    try:
        plots.require_matplotlib()
    except TinyVilaError as e:
        p.error(f"--plot: {e}")


def breakdown(rows) -> list:
    """One latency_breakdown row per setting (and turn, when several), from the medians of its runs.
    Decode leaves out the once-per-conversation graph capture, as the end-to-end speedups do."""
    groups = {}
    for sparsity, turn, s, _ in rows:
        groups.setdefault((sparsity, turn), []).append(s)
    several_turns = len({turn for _, turn in groups}) > 1
    out = []
    for (sparsity, turn), stats in groups.items():
        def median(f):
            return float(np.median([f(s) for s in stats]))

        name = sparsity.label
        out.append(dict(name=name + (f" turn {turn}" if several_turns else ""), vision_s=median(lambda s: s.vision_s),
                        prefill_s=median(lambda s: s.prefill_s),
                        decode_s=median(lambda s: s.decode_s - s.graph_capture_s),
                        tokens=int(median(lambda s: s.prefill_tokens))))
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tinyvila-bench", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", choices=sorted(ARCHS), help="a built-in architecture with random weights")
    what.add_argument("--model", metavar="DIR", help="a checkpoint folder or hub id (real weights)")
    p.add_argument("--image", action="append", default=[], metavar="WxH", help="an image of this size, repeatable")
    p.add_argument("--video", action="append", default=[], metavar="FRAMESxHxW", help="a video, repeatable")
    p.add_argument("--text", type=int, default=30, help="prompt text tokens before the media")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--quant", choices=["w4a16", "w8a8", "w4a16,w8a8"],
                   help="--arch only: AWQ W4A16 LLM (random packed weights) and/or W8A8 vision encoder; "
                   "a --model checkpoint runs as it is stored")
    p.add_argument("--sparsity", metavar="POLICY", help="also run this policy (after dense): image, video, "
                   "fastv[:k=K,r=R] or visionzip[:keep=F] (a baseline runs after SparseVILA's prefill stage at its p)")
    p.add_argument("--prefill-sparsity", type=float, metavar="P", help="also run with prefill sparsity P (after dense)")
    p.add_argument("--decode-sparsity", type=float, metavar="D", help="also run with decode sparsity D (after dense)")
    p.add_argument("--turns", type=int, default=1, help="questions per conversation (each after the last answer)")
    p.add_argument("--question-tokens", type=int, default=20, metavar="Q",
                   help="tokens in each question (turns 2.. are follow-ups of this length over the cached media)")
    p.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="run short prefills (follow-up questions) as CUDA graphs (default: off, eager)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="the session's context (default: what the turns "
                   "need; tinyvila-chat's sessions hold the media plus 8192 tokens)")
    p.add_argument("--history", choices=["keep", "evict"], default="keep", help="multi-turn history mode")
    p.add_argument("--no-graphs", action="store_true", help="run decode steps eagerly (no CUDA graph)")
    p.add_argument("--batch", type=int, metavar="N", help="N conversations at once, each with its own media and "
                   "question, through the batcher (against the same ones at batch 1): tools/batch_bench.py")
    p.add_argument("--stagger", type=int, default=0, metavar="K",
                   help="--batch: submit one conversation every K scheduler steps (default 0: all together)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="T",
                   help="--batch: a newcomer's prompt is prefilled T tokens per step (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sample at temperature T, seeded (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="with --temperature: top-p (default 1)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers on the same architecture")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw each setting's latency breakdown (needs matplotlib)")
    p.add_argument("--serve", nargs="?", metavar="URL", help="instead: tinyvila-serve over HTTP against in-process "
                   "(see tinyvila-bench --serve --help)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.question_tokens < 1 or args.turns < 1:
        p.error("--question-tokens and --turns must be at least 1")
    if args.quant and not args.arch:
        p.error("--quant builds a quantized --arch; a --model checkpoint runs as it is stored")
    if args.batch is not None and (args.batch < 1 or args.stagger < 0 or args.prefill_chunk < 1):
        p.error("--batch and --prefill-chunk must be at least 1, --stagger at least 0")
    if args.batch is not None and (args.turns != 1 or args.compare_hf or args.plot):
        p.error("--batch runs one turn per conversation, without --compare-hf or --plot")
    if args.plot:  # checked before the runs, so a long bench does not fail at its end
        check_plot_path(p, args.plot)
    try:
        configs(args)
    except TinyVilaError as e:
        p.error(str(e))
    return args


def report(args, rows, model, hf) -> None:
    """The markdown table, the speedups, and the --json / --plot files."""
    cuda = torch.device(args.device).type == "cuda"
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    bandwidth = copy_bandwidth(args.device) if cuda else None  # a GPU's roofline only
    media = " ".join(args.image + args.video)
    label = (args.arch or args.model) + (f" {args.quant}" if args.quant else "")
    copy = f", copy {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
    print(f"| arch | media | sparsity | turn | visual tok | kept | selected | encoder ms | projector ms | prefill ms | "
          f"TTFT ms | decode tok/s | GB/step | roofline | context | decode attends | peak GB |  ({name}, "
          f"{args.dtype}{copy})")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    records = []
    for sparsity, turn, s, projector_s in rows:
        # the context decode attends to in the middle of the answer stands for the whole decode
        step_bytes = decode_bytes(model.language_model, s.decode_context_tokens - args.new_tokens // 2)
        roofline = step_bytes * s.decode_tok_s / bandwidth if bandwidth else None
        records.append(dict(s.to_dict(), projector_s=projector_s, bytes_per_step=step_bytes,
                            copy_bandwidth=bandwidth, roofline=roofline, prefill_sparsity=sparsity.prefill,
                            decode_sparsity=sparsity.decode, turn=turn))
        print(f"| {label} | {media} | {sparsity.label} | {turn} | {s.visual_tokens} | "
              f"{s.visual_tokens_kept} | {s.visual_tokens_selected} | {(s.vision_s - projector_s) * 1e3:.1f} | "
              f"{projector_s * 1e3:.2f} | {s.prefill_s * 1e3:.1f} | "
              f"{s.ttft_s * 1e3:.1f} | {s.decode_tok_s:.1f} | {step_bytes / 1e9:.2f} | "
              f"{'n/a' if roofline is None else f'{roofline:.0%}'} | "
              f"{s.context_tokens} | {s.decode_context_tokens} | {s.peak_mem_bytes / 1e9:.2f} |")
    speedups(rows, model.language_model, args.new_tokens)
    if args.turns > 1:
        followups(rows)
    if hf:
        ours = rows[-1][2]
        print(f"\ntransformers {__import__('transformers').__version__}: vision {hf['vision_s'] * 1e3:.1f} ms, TTFT "
              f"{hf['ttft_s'] * 1e3:.1f} ms, decode {hf['decode_tok_s']:.1f} tok/s.  tinyvila/transformers: decode "
              f"x{ours.decode_tok_s / hf['decode_tok_s']:.1f}, TTFT x{ours.ttft_s / hf['ttft_s']:.2f}, "
              f"vision x{ours.vision_s / hf['vision_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "runs": records, "transformers": hf}, f, indent=2)
    if args.plot:
        plots.latency_breakdown(breakdown(rows), args.plot, title=f"{label} {media} ({name}, {args.dtype})")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--serve" or a.startswith("--serve=") for a in argv):  # over HTTP: another benchmark
        from tinyvila.tools import serve_bench

        return serve_bench.main(argv)
    args = parse_args(argv)

    def body():
        resolve_device(args.device)  # before anything is built: no GPU, or a GPU that is not there
        if args.json:
            check_output_file(args.json, "--json")
        if args.batch is not None:
            from .batch_bench import main as batch_bench

            batch_bench(args)
        else:
            report(args, *run(args))

    return run_cli(body, args.debug, "lower the media size, --new-tokens or --turns, or try --quant")


if __name__ == "__main__":
    sys.exit(main())
