"""The options that load a model and pick its visual sparsity, shared by the command lines that load
one (tinyvila-chat, tinyvila-serve).

`add_load_options(parser)` adds them; `load_options(args)` turns the parsed flags into the keyword
arguments of `tinyvila.load`; `sparsity_options(args, video)` into a conversation's sparsity
options (`Engine.session`): --sparsity, else the preset for the conversation's media. Nothing here
imports torch, so --help answers at once: the sparsity choices are checked by `check_sparsity`
(Sparsity.from_options) after parsing, before the model loads.
"""
import argparse

MEDIA_OPTIONS = ("max_pixels", "min_pixels", "fps", "max_frames")
SPARSITY_ARGS = ("prefill_sparsity", "prefill_budget", "position_mode", "decode_sparsity", "retrieval_granularity",
                 "history")


def positive(kind):
    """An argparse type: a positive int or float (the message names the flag)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, "
                                             f"got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_load_options(parser) -> None:
    g = parser.add_argument_group("model loading and visual sparsity")
    add = g.add_argument
    add("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--dtype", choices=["float16", "bfloat16", "float32"])
    add("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=positive(int), help="context length to allocate")
    add("--max-pixels", "--max_pixels", dest="max_pixels", type=positive(int),
        help="pixel budget per image or frame (Qwen2.5-VL)")
    add("--min-pixels", "--min_pixels", dest="min_pixels", type=positive(int),
        help="minimum pixels per image or frame (Qwen2.5-VL)")
    add("--fps", type=positive(float), help="video sampling rate in frames per second (default 2)")
    add("--max-frames", "--max_frames", dest="max_frames", type=positive(int), help="at most this many video frames")
    add("--sparsity", metavar="POLICY", help="image, video or dense (default: image, or video for a conversation "
        "with a video); also prefill:P, decode:D, fastv[:k=K,r=R], visionzip[:keep=F] (baselines)")
    add("--dense", dest="sparsity", action="store_const", const="dense", help="no visual sparsity (--sparsity dense)")
    add("--prefill-sparsity", "--prefill_sparsity", dest="prefill_sparsity", type=float, metavar="P",
        help="fraction of visual tokens dropped before the LLM (overrides the preset)")
    add("--prefill-budget", "--prefill_budget", dest="prefill_budget", metavar="{group,global}",
        help="top-k per attention group (tile, frame) or over the whole item")
    add("--position-mode", "--position_mode", dest="position_mode", metavar="{compact,original}",
        help="RoPE positions of the kept tokens (default compact)")
    add("--decode-sparsity", "--decode_sparsity", dest="decode_sparsity", type=float, metavar="D",
        help="fraction of the kept visual tokens each answer's decode skips (overrides the preset)")
    add("--retrieval-granularity", "--retrieval_granularity", dest="retrieval_granularity",
        metavar="{layer,kv_head}", help="one decode selection per layer (default) or per KV head")
    add("--prefill-graphs", "--prefill_graphs", dest="prefill_graphs", action="store_true",
        help="run short prefills (follow-up questions) as CUDA graphs on a GPU (default: off)")
    add("--history", metavar="{keep,evict}", help="keep (default) earlier questions and answers, or evict them "
        "after each answer (the media stay)")


def load_options(args) -> dict:
    """`tinyvila.load` keyword arguments from the parsed flags (unset ones left to the engine)."""
    options = {k: getattr(args, k) for k in ("device", "dtype", "max_seq_len") + MEDIA_OPTIONS}
    options["prefill_graphs"] = getattr(args, "prefill_graphs", False) or None  # None: the engine's default
    return {k: v for k, v in options.items() if v is not None}


def sparsity_options(args, video: bool) -> dict:
    """A conversation's sparsity options: --sparsity, else the `video` preset for a conversation
    with a video and `image` for any other, with the --prefill-sparsity ... overrides on top."""
    options = {k: getattr(args, k) for k in SPARSITY_ARGS if getattr(args, k) is not None}
    return dict(options, sparsity=args.sparsity or ("video" if video else "image"))


def check_sparsity(args) -> None:
    """Raises TinyVilaError for a bad policy or override (imports torch: call it after parsing)."""
    from .sparsity import Sparsity

    for video in (False, True):
        Sparsity.from_options(**sparsity_options(args, video))
