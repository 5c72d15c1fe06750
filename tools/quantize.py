"""`tinyvila-quantize`: AWQ W4A16 quantization of a checkpoint's LLM, written in the AutoAWQ GEMM
layout that vLLM and transformers load (and tinyvila.load / tinyvila-chat run).

    tinyvila-quantize llava-hf/llava-v1.6-vicuna-7b-hf --out llava-v1.6-7b-awq
    tinyvila-quantize ./Qwen2.5-VL-7B-Instruct --out ./qwen-awq --calib-images pics/ --calib-prompts prompts.txt

Calibration runs whole conversations (image + question + answer) through the model, so the LLM
sees the visual tokens it will see in use; the vision tower and the projector stay in 16 bits.
"""
import argparse
import sys
import time

import tinyvila
from tinyvila import __version__
from tinyvila.calibration import builtin_samples, user_samples
from tinyvila.errors import TinyVilaError, run_cli
from tinyvila.models.quantized import W4Linear
from tinyvila.quant import smoothquant as sq
from tinyvila.quant.awq import awq_quantize
from tinyvila.quant.checkpoint import write_awq_checkpoint

DEFAULTS = dict(group_size=128, w_bit=4, calib_samples=64, calib_seqlen=1024)


def calibration_inputs(engine, samples, seqlen: int) -> list:
    """(input embeddings [T, C], positions) for each (image, question, answer) sample: the chat
    template's rendering of the turn, the image encoded in place, the last `seqlen` tokens kept."""
    inputs = []
    for image, question, answer in samples:
        with engine.session(images=[image], max_seq_len=1) as s:  # no KV cache needed
            messages = s.history_start() + [s.user_message(question, s.pending)]
            if answer:
                messages.append(s.message("assistant", answer))
            ids = engine.encode_text(engine.render(messages, add_generation_prompt=not answer))
            h, positions = s.inputs(ids)
        inputs.append((h[-seqlen:], positions[..., -seqlen:]))
    return inputs


def check_widths(lm, group_size: int, quantize_lm_head: bool) -> None:
    names = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    linears = [lm.layers[0].get_submodule(n) for n in names] + ([lm.lm_head] if quantize_lm_head else [])
    for m in linears:
        if m.in_features % group_size:
            raise TinyVilaError(f"--group-size {group_size} does not divide the input width {m.in_features}")
        if m.out_features % 8:
            raise TinyVilaError(f"an output width of {m.out_features} cannot be packed 8 per int32")


def quantize(model, out, group_size=128, w_bit=4, calib_samples=64, calib_seqlen=1024, calib_images=None,
             calib_prompts=None, search=True, quantize_lm_head=False, device=None, dtype=None, seed=0,
             w8a8_vision=False, w8a8_alpha=0.5, progress=True, log=print):
    """Quantize `model` (folder or hub id) into the folder `out`; returns out's path."""
    if w_bit != 4:
        raise TinyVilaError("only --w-bit 4 is supported")
    if not 0 <= w8a8_alpha <= 1:
        raise TinyVilaError("--w8a8-alpha must be in [0, 1]")
    if calib_samples < 1 or calib_seqlen < 1:
        raise TinyVilaError("--calib-samples and --calib-seqlen must be positive")
    t0 = time.perf_counter()
    engine = tinyvila.load(model, device=device, dtype=dtype, cuda_graphs=False)
    net, lm = engine.model, engine.model.language_model
    if any(isinstance(m, W4Linear) for m in net.modules()):
        raise TinyVilaError(f"'{model}' is already quantized")
    if quantize_lm_head and lm.cfg.tie_word_embeddings:
        raise TinyVilaError("--quantize-lm-head: this model ties its output layer to the embeddings")
    check_widths(lm, group_size, quantize_lm_head)
    if calib_images is None and calib_prompts is None:
        samples = builtin_samples(calib_samples, seed)
    else:
        samples = user_samples(calib_samples, calib_images, calib_prompts, seed)
    data = calibration_inputs(engine, samples, calib_seqlen)
    log(f"calibration: {len(data)} samples, {sum(h.shape[0] for h, _ in data)} tokens "
        f"({time.perf_counter() - t0:.1f} s to load and encode)")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(lm.layers), desc="AWQ" if search else "RTN", unit="layer", file=sys.stderr)
    packed = awq_quantize(lm, data, group_size=group_size, w_bit=w_bit, search=search, clip=search,
                          quantize_lm_head=quantize_lm_head,
                          progress=(lambda done, total: bar.update(done - bar.n)) if bar else None)
    if bar:
        bar.close()
    packed = {"language_model." + name: parts for name, parts in packed.items()}
    write_awq_checkpoint(net, engine.path, out, packed, group_size, net.quant_skip)
    log(f"wrote {out} ({len(packed)} 4-bit layers, group size {group_size}) in {time.perf_counter() - t0:.1f} s")
    if w8a8_vision:  # after the checkpoint is written: its vision tensors stay the original ones
        images = [image for image, _, _ in samples]

        def encode_all():
            for i in range(0, len(images), 8):
                net.encode([net.prepare_image(im) for im in images[i:i + 8]])

        sq.smooth(net, sq.activation_maxima(net, encode_all), w8a8_alpha)
        names = sq.quantize_encoder(net)
        path = sq.save_w8a8(net, out, w8a8_alpha)
        log(f"wrote {path.name} ({len(names)} int8 vision linears, alpha {w8a8_alpha})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tinyvila-quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder or hub id (16-bit weights)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--w-bit", type=int, default=DEFAULTS["w_bit"], help="weight bits (4)")
    p.add_argument("--group-size", type=int, default=DEFAULTS["group_size"],
                   help="input channels per scale group; must divide every LLM input width (128)")
    p.add_argument("--calib-samples", type=int, default=DEFAULTS["calib_samples"], help="calibration conversations (64)")
    p.add_argument("--calib-seqlen", type=int, default=DEFAULTS["calib_seqlen"],
                   help="tokens kept per conversation, the last ones (1024)")
    p.add_argument("--calib-images", metavar="DIR", help="calibrate on these images (default: built-in drawings)")
    p.add_argument("--calib-prompts", metavar="FILE", help="calibrate on these prompts, one per line")
    p.add_argument("--no-search", action="store_true", help="plain round-to-nearest, no AWQ scale/clip search")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the output layer (tinyvila runs it; vLLM and transformers do not load it)")
    p.add_argument("--w8a8-vision", action="store_true",
                   help="also write a SmoothQuant W8A8 vision encoder (vision_w8a8.safetensors)")
    p.add_argument("--w8a8-alpha", type=float, default=0.5, help="SmoothQuant migration strength (0.5)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's 16-bit type on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: quantize(args.model, args.out, args.group_size, args.w_bit, args.calib_samples,
                                    args.calib_seqlen, args.calib_images, args.calib_prompts, not args.no_search,
                                    args.quantize_lm_head, args.device, args.dtype, args.seed, args.w8a8_vision,
                                    args.w8a8_alpha, log=lambda m: print(m, file=sys.stderr)),
                   args.debug, "try fewer --calib-samples, a shorter --calib-seqlen or --device cpu")


if __name__ == "__main__":
    sys.exit(main())
