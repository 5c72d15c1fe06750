"""`tinyvila-quant-check`: how close a quantized checkpoint stays to its 16-bit original, on the
calibration prompts (built-in images and questions, or yours).

    tinyvila-quant-check ./llava-v1.6-7b ./llava-v1.6-7b-awq

For each prompt it compares the logits at every prompt position (cosine similarity, top-1
agreement) and the greedy answers (exact match, and how many leading tokens agree).
"""
import argparse
import json
import sys

import torch

import tinyvila
from tinyvila.calibration import builtin_samples, user_samples
from tinyvila.errors import TinyVilaError, run_cli


def compare(reference, quantized, samples, max_new_tokens: int = 32) -> dict:
    """Per-sample and mean agreement between two engines of the same model on `samples`."""
    rows = []
    for image, question, _ in samples:
        a = reference.logits(question, images=[image]).float()
        b = quantized.logits(question, images=[image]).float().to(a.device)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        greedy = dict(temperature=0, max_new_tokens=max_new_tokens)
        ans_a = reference.generate(question, images=[image], **greedy).token_ids
        ans_b = quantized.generate(question, images=[image], **greedy).token_ids
        prefix = next((i for i, (x, y) in enumerate(zip(ans_a, ans_b)) if x != y), min(len(ans_a), len(ans_b)))
        rows.append(dict(question=question, logits_cosine=float(cosine.mean()), logits_cosine_min=float(cosine.min()),
                         top1_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                         answer_match=ans_a == ans_b, answer_prefix_agreement=prefix / max(len(ans_a), 1)))
    mean = {k: sum(float(r[k]) for r in rows) / len(rows) for k in
            ("logits_cosine", "top1_agreement", "answer_match", "answer_prefix_agreement")}
    mean["logits_cosine_min"] = min(r["logits_cosine_min"] for r in rows)
    return {"samples": rows, "mean": mean}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tinyvila-quant-check", description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="the 16-bit checkpoint (folder or hub id)")
    p.add_argument("quantized", help="its quantized checkpoint")
    p.add_argument("--samples", type=int, default=8, help="built-in calibration prompts to compare (8)")
    p.add_argument("--calib-images", metavar="DIR", help="use these images instead of the built-in drawings")
    p.add_argument("--calib-prompts", metavar="FILE", help="use these prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length compared (32)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's 16-bit type on GPU, float32 on CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the per-sample record as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    record = {}

    def body():
        if args.samples < 1:
            raise TinyVilaError("--samples must be positive")
        if args.calib_images is None and args.calib_prompts is None:
            samples = builtin_samples(args.samples, seed=1)  # not the quantizer's default draws
        else:
            samples = user_samples(args.samples, args.calib_images, args.calib_prompts, seed=1)
        reference = tinyvila.load(args.reference, device=args.device, dtype=args.dtype)
        quantized = tinyvila.load(args.quantized, device=args.device, dtype=args.dtype)
        record.update(compare(reference, quantized, samples, args.max_new_tokens))

    status = run_cli(body, args.debug, "try --device cpu or fewer --samples")
    if status:
        return status
    print("| prompt | logits cosine (mean / min) | top-1 agreement | greedy answer | leading tokens agreeing |")
    print("|---|---|---|---|---|")
    for r in record["samples"] + [dict(record["mean"], question="**mean**")]:
        match = r["answer_match"]
        print(f"| {r['question'][:48]} | {r['logits_cosine']:.4f} / {r['logits_cosine_min']:.4f} | "
              f"{r['top1_agreement']:.1%} | {'same' if match is True else 'differs' if match is False else f'{match:.0%} same'} | "
              f"{r['answer_prefix_agreement']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(record, reference=args.reference, quantized=args.quantized), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
