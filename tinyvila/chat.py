"""`python -m tinyvila.chat` / `tinyvila-chat`: chat with an image from the terminal.

With -p the model answers once and the program exits; without it, an interactive chat with
streamed answers and slash commands. Bad input prints one `error:` line and exits with status 2
(in the interactive chat a bad command is reported and the conversation goes on). Every path and
option is checked before the model loads.

The arguments are parsed before torch is imported, so --help and --version answer at once. That is
why tinyvila's own torch-using modules are imported late here, and only here: `check_before_loading`
and `list_models` import them once the command line is known to need them (`tinyvila.load` defers
the engine's import itself, `--save-kept` the drawing code's).
"""
import argparse
import atexit
import json
import os
import shlex
import sys
import time
from pathlib import Path

from PIL import Image

from . import __version__, load
from .cli_options import add_load_options, check_sparsity, load_options, sparsity_options
from .errors import TinyVilaError, check_output_file, run_cli

DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"
DEFAULT_MODEL_SIZE = "~14 GB"
HELP = """commands:
  /image PATH        attach an image to your next message (quotes, backslashes and ~ work)
  /video PATH        attach a video to your next message
  /clear             forget the conversation (also /reset)
  /system TEXT       set the system prompt (clears the conversation)
  /set NAME VALUE    temperature, top_p, top_k, seed or max_new_tokens
  /stats             show the last answer's statistics
  /help              this help (also /?)
  /exit              quit (also /quit, /bye, Ctrl+D); Ctrl+C stops an answer"""
SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "seed": int, "max_new_tokens": int}
# Layers that tell how a loaded model is quantized (class name -> what the summary line says).
QUANTIZED_LAYERS = {"W4Linear": "awq w4a16", "W8A8Linear": "w8a8 vision"}
HISTORY_LENGTH = 1000


def build_parser():
    p = argparse.ArgumentParser(prog="tinyvila-chat", description="Chat with a vision-language model.")
    add = p.add_argument
    add("model_pos", nargs="*", metavar="MODEL", help="hub id or local checkpoint directory")
    add("-m", "--model", help=f"same as MODEL (default: $TINYVILA_MODEL or {DEFAULT_MODEL})")
    add("--image", "-i", action="append", default=[], metavar="PATH", help="an image; repeat for more (-i a -i b)")
    add("--video", action="append", default=[], metavar="PATH", help="a video file; repeat for more")
    add("-p", "--prompt", help="answer this prompt once and exit")
    add("-n", "--max-new-tokens", "--max-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=512)
    add("--temperature", "--temp", type=float, default=0.2, help="0 = greedy (default 0.2)")
    add("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    add("--top-k", "--top_k", dest="top_k", type=int, default=0)
    add("--seed", type=int)
    add("--ignore-eos", "--ignore_eos", dest="ignore_eos", action="store_true", help="generate past stop tokens")
    add("--system", help="system prompt (none unless the chat template adds one)")
    add("--save-kept", "--save_kept", dest="save_kept", metavar="FILE.png",
        help="draw the visual tokens prefill pruning kept over the image (or the video's frames)")
    add("--no-stream", "--no_stream", dest="stream", action="store_false", help="print answers when complete")
    add("--json", action="store_true", help="print each answer and its stats as one JSON line")
    add("-q", "--quiet", action="store_true", help="no load summary line and no stats block")
    add("--list-models", action="store_true", help="list the supported model families and known hub ids")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    add("--debug", action="store_true", help="show tracebacks")
    add_load_options(p)
    return p


def parse_args(argv):
    """The parsed command line; `args.model` is None when neither MODEL, --model nor $TINYVILA_MODEL
    gives one (the default hub model is then announced before it downloads)."""
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.model_pos) > 1:
        p.error(f"one MODEL only, got {' '.join(args.model_pos)} (for several images repeat -i: -i a.png -i b.png)")
    positional = args.model_pos[0] if args.model_pos else None
    if args.model and positional:
        p.error("give the model once (MODEL or --model)")
    if positional and os.path.isfile(positional):  # an image given as MODEL: never a checkpoint
        p.error(f"MODEL '{positional}' is a file, not a checkpoint folder or hub id; give images with -i PATH")
    args.model = args.model or positional or os.environ.get("TINYVILA_MODEL") or None
    return args


def check_before_loading(args) -> None:
    """Every option, media file and output path, checked before the (slow) model load."""
    # The one deferred import of tinyvila's own modules (see the module docstring): they import torch.
    from . import engine, media, sampling

    sampling.SamplingParams(**{k: getattr(args, k) for k in SAMPLING}, ignore_eos=args.ignore_eos)
    check_sparsity(args)
    engine.resolve_device(args.device)
    for path in args.image:
        media.load_image(path)
    for path in args.video:
        media.open_video(path)
    if args.save_kept:
        check_output_file(args.save_kept, "--save-kept", suffixes=Image.registered_extensions(),
                          example="kept.png")


def in_hub_cache(repo: str) -> bool:
    """Whether `repo` is in the local Hugging Face cache (a file lookup, never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def announce_default_model() -> None:
    if not in_hub_cache(DEFAULT_MODEL):
        print(f"tinyvila: no model given (MODEL, --model or $TINYVILA_MODEL): downloading the default "
              f"{DEFAULT_MODEL} ({DEFAULT_MODEL_SIZE}) from the Hugging Face hub; Ctrl+C stops it "
              f"(tinyvila-chat --list-models lists the others)", file=sys.stderr)


def list_models() -> str:
    """The supported families (the config.json architectures and model types each reads, from the
    registry) and the known hub ids of each."""
    from .models import ARCHITECTURES, HUB_MODELS, MODEL_TYPES, family_for  # torch: see the module docstring

    families = {}
    for arch in ARCHITECTURES:
        families.setdefault(family_for({"architectures": [arch]}), []).append(arch)
    lines = []
    for family, archs in families.items():
        types = [t for t in MODEL_TYPES if family_for({"model_type": t}) is family]
        lines.append(f"{family.name}: architectures {', '.join(archs)}"
                     + (f"; model_type {', '.join(types)}" if types else ""))
        lines += [f"  {repo}{'  (the default)' if repo == DEFAULT_MODEL else ''}"
                  for arch in archs for repo in HUB_MODELS.get(arch, ())]
    return "\n".join(lines)


def model_name(engine) -> str:
    """The hub id of a hub snapshot (.../models--org--name/snapshots/HASH), else the folder."""
    path = Path(engine.path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return str(path)


def load_summary(engine, seconds: float) -> str:
    """One line: what was loaded, how (dtype, quantization, device), its weight memory and load time."""
    model = engine.model
    layers = {type(m).__name__ for m in model.modules()}
    quantized = [label for name, label in QUANTIZED_LAYERS.items() if name in layers]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    dtype = str(engine.dtype).removeprefix("torch.")
    return (f"loaded {model_name(engine)}: {model.name}, {dtype}, quantization {' + '.join(quantized) or 'none'}, "
            f"{engine.device}, {human_bytes(weights)} of weights, {seconds:.1f} s")


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def history_file() -> Path:
    """$XDG_STATE_HOME/tinyvila/history when XDG_STATE_HOME is set, else ~/.tinyvila_history."""
    state = os.environ.get("XDG_STATE_HOME")
    return Path(state) / "tinyvila" / "history" if state else Path.home() / ".tinyvila_history"


def enable_line_editing() -> None:
    """readline's line editing, and a history kept across sessions (terminals only)."""
    try:
        import readline
    except ImportError:  # not built into every Python (Windows)
        return
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:  # none yet, or unreadable: start empty
        pass
    readline.set_history_length(HISTORY_LENGTH)

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home must not spoil the exit
    atexit.register(save)


def media_path(text: str) -> str:
    """A path as typed or dropped into a terminal: 'quoted', back\\ slashed or ~/relative."""
    if os.path.exists(os.path.expanduser(text)):  # an unquoted name with spaces or quotes in it
        return os.path.expanduser(text)
    try:
        parts = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as it is
        parts = [text]
    if len(parts) != 1:
        raise TinyVilaError(f"one path please, got {len(parts)}: {text} (quote a path with spaces)")
    return os.path.expanduser(parts[0])


def format_stats(stats) -> str:
    """The stats block: stable keys, one line each, easy to grep."""
    pre_rate = stats.prefill_tokens / stats.prefill_s if stats.prefill_s else 0.0
    return (f"prefill {stats.prefill_tokens:6d} tok  {stats.prefill_s:7.3f} s  {pre_rate:8.1f} tok/s   "
            f"(visual {stats.visual_tokens} tok, kept {stats.visual_tokens_kept}; vision {stats.vision_s:.3f} s)\n"
            f"decode  {stats.decode_tokens:6d} tok  {stats.decode_s:7.3f} s  {stats.decode_tok_s:8.1f} tok/s   "
            f"(visual selected {stats.visual_tokens_selected} of {stats.visual_tokens_kept}; "
            f"attends {stats.decode_context_tokens} tok)\n"
            f"ttft    {stats.ttft_s:.3f} s    peak_mem {stats.peak_mem_bytes / 1e9:.2f} GB    "
            f"context {stats.context_tokens} tok")


class Chat:
    def __init__(self, engine, args):
        self.engine, self.args = engine, args
        self.sampling = {k: getattr(args, k) for k in SAMPLING}
        self.sampling["ignore_eos"] = args.ignore_eos
        # The chat picks the sparsity preset from the media unless told (the Python API is dense).
        self.session = engine.session(images=args.image, videos=args.video, system=args.system,
                                      **sparsity_options(args, bool(args.video)))

    def answer(self, question: str) -> None:
        out = sys.stdout
        pieces = self.session.stream(question, **self.sampling)
        try:
            for piece in pieces:
                if self.args.stream and not self.args.json:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:  # Ctrl+C stops this answer, not the program
            pieces.close()
            print("\n[interrupted]", file=sys.stderr)
            return
        result = self.session.last_result
        if self.args.json:
            print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                              "finish_reason": result.finish_reason, "stats": result.stats.to_dict()}))
        else:
            if not self.args.stream:
                out.write(result.text)
            out.write("\n")
            out.flush()
            if not self.args.quiet:
                print(format_stats(result.stats), file=sys.stderr)
        if self.args.save_kept and self.session.visual:
            from .visualize import save_kept

            for path in save_kept(self.session, self.args.save_kept):
                print(f"[kept visual tokens drawn in {path}]", file=sys.stderr)

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit", "bye"):
            return False
        if name in ("help", "?"):
            print(HELP)
        elif name in ("image", "video"):
            if not rest:
                raise TinyVilaError(f"usage: /{name} PATH")
            path = media_path(rest)
            (self.session.add_image if name == "image" else self.session.add_video)(path)
            print(f"[{name} {path} attached to your next message]", file=sys.stderr)
        elif name in ("clear", "reset"):
            self.session.clear()
            print("[conversation cleared]", file=sys.stderr)
        elif name == "system":
            self.session.clear()
            self.session.system = rest or None
            print("[system prompt set; conversation cleared]", file=sys.stderr)
        elif name == "set":
            key, _, value = rest.partition(" ")
            key = key.replace("-", "_")
            if key not in SAMPLING or not value.strip():
                raise TinyVilaError(f"usage: /set {{{'|'.join(SAMPLING)}}} VALUE")
            try:
                self.sampling[key] = SAMPLING[key](value.strip())
            except ValueError:
                raise TinyVilaError(f"/set {key}: {value.strip()!r} is not a valid {SAMPLING[key].__name__}")
        elif name == "stats":
            r = self.session.last_result
            print(format_stats(r.stats) if r else "[no answer yet]", file=sys.stderr)
        else:
            raise TinyVilaError(f"unknown command /{name} (try /help)")
        return True

    def loop(self) -> None:
        if sys.stdin is None:  # started with stdin closed (<&-): nothing to read
            return
        tty = sys.stdin.isatty()
        if tty:
            enable_line_editing()
            print(f"tinyvila: {self.engine.model.name} from {self.engine.path} ({self.engine.device}). "
                  f"/help for commands, Ctrl+D to quit.", file=sys.stderr)
        while True:
            try:
                line = input(">>> " if tty else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print("\n[use /exit or Ctrl+D to quit]", file=sys.stderr)
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.answer(line)
            except TinyVilaError as e:  # report and go on: the conversation is unharmed
                print(f"error: {e}", file=sys.stderr)


def run(args) -> None:
    if args.list_models:
        print(list_models())
        return
    check_before_loading(args)
    model = args.model
    if model is None:
        model = DEFAULT_MODEL
        announce_default_model()
    start = time.perf_counter()
    engine = load(model, progress=False if args.quiet else None, **load_options(args))
    if not args.quiet:
        print(load_summary(engine, time.perf_counter() - start), file=sys.stderr)
    chat = Chat(engine, args)
    if args.prompt is not None:
        chat.answer(args.prompt)
    else:
        chat.loop()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
