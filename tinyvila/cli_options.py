"""The options that load a model, shared by the command lines that load one (tinyvila-serve; the
chat's parser defines the same flags).

`add_load_options(parser)` adds them; `load_options(args)` turns the parsed flags into the keyword
arguments of `tinyvila.load`, checking the sparsity policy first so that a bad one fails before the
model loads.
"""
from .sparsity import BUDGETS, GRANULARITIES, HISTORIES, OPTIONS as SPARSITY_OPTIONS, POSITION_MODES, Sparsity

MEDIA_OPTIONS = ("max_pixels", "min_pixels", "fps", "max_frames")


def add_load_options(parser) -> None:
    g = parser.add_argument_group("model loading")
    add = g.add_argument
    add("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--dtype", choices=["float16", "bfloat16", "float32"])
    add("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int, help="context length to allocate")
    add("--max-pixels", "--max_pixels", dest="max_pixels", type=int, help="pixel budget per image or frame (Qwen2.5-VL)")
    add("--min-pixels", "--min_pixels", dest="min_pixels", type=int, help="minimum pixels per image or frame (Qwen2.5-VL)")
    add("--fps", type=float, help="video sampling rate in frames per second (default 2)")
    add("--max-frames", "--max_frames", dest="max_frames", type=int, help="at most this many video frames")
    add("--sparsity", metavar="POLICY", help="image, video or dense (default: dense); also prefill:P, decode:D, "
        "fastv[:k=K,r=R], visionzip[:keep=F] (baselines)")
    add("--dense", dest="sparsity", action="store_const", const="dense", help="no visual sparsity (--sparsity dense)")
    add("--prefill-sparsity", "--prefill_sparsity", dest="prefill_sparsity", type=float, metavar="P",
        help="fraction of visual tokens dropped before the LLM (overrides the preset)")
    add("--prefill-budget", "--prefill_budget", dest="prefill_budget", choices=BUDGETS,
        help="top-k per attention group (tile, frame) or over the whole item")
    add("--position-mode", "--position_mode", dest="position_mode", choices=POSITION_MODES,
        help="RoPE positions of the kept tokens (default compact)")
    add("--decode-sparsity", "--decode_sparsity", dest="decode_sparsity", type=float, metavar="D",
        help="fraction of the kept visual tokens each answer's decode skips (overrides the preset)")
    add("--retrieval-granularity", "--retrieval_granularity", dest="retrieval_granularity", choices=GRANULARITIES,
        help="one decode selection per layer (default) or per KV head")
    add("--prefill-graphs", "--prefill_graphs", dest="prefill_graphs", action="store_true",
        help="run short prefills (follow-up questions) as CUDA graphs on a GPU (default: off)")
    add("--history", choices=HISTORIES, help="keep (default) earlier questions and answers, or evict them "
        "after each answer (the media stay)")


def load_options(args) -> dict:
    """`tinyvila.load` keyword arguments from the parsed flags (None: the engine's default).
    Raises TinyVilaError for a bad sparsity policy."""
    sparsity = {k: getattr(args, k) for k in SPARSITY_OPTIONS if getattr(args, k, None) is not None}
    Sparsity.from_options(**sparsity)
    options = {k: getattr(args, k) for k in ("device", "dtype", "max_seq_len") + MEDIA_OPTIONS}
    options["prefill_graphs"] = getattr(args, "prefill_graphs", False) or None  # None: the engine's default
    return {k: v for k, v in dict(options, **sparsity).items() if v is not None}
