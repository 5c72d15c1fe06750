"""Evaluation data for `tinyvila-eval`: the JSONL format, its loader, and a command line that checks a
file or converts public benchmark files into it (the converters are in eval_convert.py).

    python -m tinyvila.tools.eval_data check FILE.jsonl
    python -m tinyvila.tools.eval_data convert FORMAT SRC [--media-dir DIR] --out FILE.jsonl [--limit N]

Format: UTF-8 text, one JSON object per line (a sample); blank lines are skipped; there are no
comments. Keys of a sample:

    "id"              string or integer, unique in the file (default: the line number)
    "image"           one image path, or "images": a list of them (not both)
    "video"           one video path, or "videos": a list of them (not both)
    "num_frames"      positive integer: frames to sample from each video (default: the model's);
                      only with a video
    "question"        the question (a non-empty string) ...
    "answers"         ... its reference answers: a list of strings, or one string
    "metric"          how answers are scored: "vqa", "anls", "exact", "choice" or "relaxed"
                      (see metrics.py); at the top level it is the default for every turn
    "turns"           instead of "question"/"answers": a list of {"question", "answers", "metric"}
                      objects, asked in order in one conversation about the same media
    "max_new_tokens"  positive integer: answer length limit for this sample
    "meta"            an object of free-form values kept with the sample (say, a category to
                      group scores by)

Media paths are relative to the folder of the JSONL file (absolute paths and ~ work too). A sample
without media is a text-only question. Each turn needs a metric, from the turn or the top level.
No other keys are allowed, so a misspelt key is an error instead of being ignored.

    {"id": "q17", "image": "imgs/a.jpg", "question": "What color is the car?", "answers": ["red"], "metric": "exact"}
    {"video": "clips/x.mp4", "num_frames": 8, "metric": "vqa", "turns": [
        {"question": "What is the man holding?", "answers": ["a cup", "cup"]},
        {"question": "What does he do with it?", "answers": ["drinks"]}]}

(a sample is one line; the second is wrapped here to fit.) Every problem in a file raises
`EvalDataError` with one line naming the file and line.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from tinyvila import __version__
from tinyvila.errors import TinyVilaError, run_cli
from tinyvila.tools.metrics import METRICS

SAMPLE_KEYS = {"id", "image", "images", "video", "videos", "num_frames", "question", "answers", "metric",
               "turns", "max_new_tokens", "meta"}
TURN_KEYS = {"question", "answers", "metric"}


class EvalDataError(TinyVilaError):
    """A missing or malformed evaluation file (the message names the file and line)."""


@dataclass
class EvalTurn:
    question: str
    answers: list[str]
    metric: str


@dataclass
class EvalSample:
    id: str
    images: list[str]  # resolved paths
    videos: list[str]
    turns: list[EvalTurn]
    num_frames: int | None = None
    max_new_tokens: int | None = None
    line: int = 0  # 1-based line in the file, for messages
    meta: dict = field(default_factory=dict)


def read_text(path: str) -> str:
    """A UTF-8 file's text, or an EvalDataError naming the file (and the line of a bad byte)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found")
    except IsADirectoryError:
        raise EvalDataError(f"{path}: is a folder, not a JSONL file")
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read: {e.strerror}")
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM, as some editors write
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise EvalDataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _media(obj: dict, one: str, many: str, base: str, check_media: bool, bad) -> list[str]:
    if one in obj and many in obj:
        raise bad(f'give "{one}" or "{many}", not both')
    if one in obj:
        paths = [obj[one]]
    else:
        paths = obj.get(many, [])
        if not isinstance(paths, list):
            raise bad(f'"{many}" must be a list of paths')
    resolved = []
    for path in paths:
        if not isinstance(path, str) or not path.strip():
            raise bad(f'"{one if one in obj else many}" must hold non-empty path strings, got {json.dumps(path)}')
        path = os.path.join(base, os.path.expanduser(path))  # an absolute path stays as is
        if check_media and not os.path.isfile(path):
            raise bad(f"{one} not found: {path}")
        resolved.append(path)
    return resolved


def _turn(raw: dict, default_metric, bad) -> EvalTurn:
    question = raw.get("question")
    if not isinstance(question, str):
        raise bad('"question" is missing' if question is None
                  else f'"question" must be a string, got {json.dumps(question)}')
    if not question.strip():
        raise bad('"question" is empty')
    answers = raw.get("answers")
    if answers is None:
        raise bad('"answers" is missing (a list of reference answers)')
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise bad(f'"answers" must be a non-empty list of strings, got {json.dumps(answers)[:80]}')
    metric = raw.get("metric", default_metric)
    if metric is None:
        raise bad(f'no "metric" (give it on the turn or at the top level; one of: {", ".join(METRICS)})')
    if metric not in METRICS:
        raise bad(f'unknown metric {json.dumps(metric)}; allowed: {", ".join(METRICS)}')
    return EvalTurn(question, answers, metric)


def parse_sample(obj, line: int, where: str, base: str, check_media: bool = True) -> EvalSample:
    """One decoded JSONL line as a sample; `where` ("file:line") prefixes error messages and media
    paths are resolved against `base`."""

    def bad(message):
        return EvalDataError(f"{where}: {message}")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__ if obj is not None else 'null'}")
    unknown = sorted(set(obj) - SAMPLE_KEYS)
    if unknown:
        raise bad(f"unknown key {json.dumps(unknown[0])}; allowed: {', '.join(sorted(SAMPLE_KEYS))}")
    sample_id = obj.get("id", line)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
        raise bad(f'"id" must be a non-empty string or an integer, got {json.dumps(sample_id)}')
    images = _media(obj, "image", "images", base, check_media, bad)
    videos = _media(obj, "video", "videos", base, check_media, bad)
    num_frames = obj.get("num_frames")
    if num_frames is not None:
        if not _positive_int(num_frames):
            raise bad(f'"num_frames" must be a positive integer, got {json.dumps(num_frames)}')
        if not videos:
            raise bad('"num_frames" is given but the sample has no video')
    max_new_tokens = obj.get("max_new_tokens")
    if max_new_tokens is not None and not _positive_int(max_new_tokens):
        raise bad(f'"max_new_tokens" must be a positive integer, got {json.dumps(max_new_tokens)}')
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise bad('"meta" must be a JSON object')
    default_metric = obj.get("metric")
    if default_metric is not None and default_metric not in METRICS:
        raise bad(f'unknown metric {json.dumps(default_metric)}; allowed: {", ".join(METRICS)}')

    if "turns" in obj:
        if "question" in obj or "answers" in obj:
            raise bad('give "question"/"answers" or "turns", not both')
        raw_turns = obj["turns"]
        if not isinstance(raw_turns, list) or not raw_turns:
            raise bad('"turns" must be a non-empty list of {"question", "answers", "metric"} objects')
        turns = []
        for number, raw in enumerate(raw_turns, 1):
            def bad_turn(message, number=number):
                return bad(f"turn {number}: {message}")
            if not isinstance(raw, dict):
                raise bad_turn("expected a JSON object")
            unknown = sorted(set(raw) - TURN_KEYS)
            if unknown:
                raise bad_turn(f"unknown key {json.dumps(unknown[0])}; allowed: {', '.join(sorted(TURN_KEYS))}")
            turns.append(_turn(raw, default_metric, bad_turn))
    else:
        turns = [_turn(obj, default_metric, bad)]
    return EvalSample(str(sample_id), images, videos, turns, num_frames, max_new_tokens, line, meta)


def load_eval_file(path, check_media: bool = True) -> list[EvalSample]:
    """Read and check a JSONL evaluation file (the format is in this module's docstring); with
    `check_media`, every image and video must exist. Raises EvalDataError on any problem."""
    path = os.fspath(path)
    text = read_text(path)
    base = os.path.dirname(os.path.abspath(path))
    samples, line_of_id = [], {}
    for line, raw in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
        sample = parse_sample(obj, line, where, base, check_media)
        if sample.id in line_of_id:
            first = line_of_id[sample.id]
            raise EvalDataError(f"{where}: duplicate id {json.dumps(sample.id)} (first on line {first})")
        line_of_id[sample.id] = line
        samples.append(sample)
    if not samples:
        raise EvalDataError(f"{path}: no samples (the file is empty)")
    return samples


def write_eval_file(samples: list[dict], path) -> None:
    """Write sample objects (the JSONL format above) to `path`, turning absolute media paths into
    paths relative to the file's folder where possible, so the folder can move as a whole."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)

    def relative(media):
        try:
            return os.path.relpath(media, folder)
        except ValueError:  # another drive on Windows
            return media

    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            sample = dict(sample)
            for key in ("image", "video"):
                if key in sample:
                    sample[key] = relative(sample[key])
            for key in ("images", "videos"):
                if key in sample:
                    sample[key] = [relative(m) for m in sample[key]]
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    from tinyvila.tools import eval_convert

    p = argparse.ArgumentParser(prog="tinyvila-eval-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="load a JSONL evaluation file and summarise it")
    check.add_argument("file")
    check.add_argument("--no-check-media", action="store_true", help="do not require the media files to exist")
    convert = commands.add_parser("convert", help="convert a public benchmark file to the JSONL format",
                                  description=eval_convert.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("format", metavar="FORMAT", help=f"one of: {', '.join(eval_convert.CONVERTERS)}")
    convert.add_argument("src", metavar="SRC", help="the benchmark's question file (AI2D: its folder)")
    convert.add_argument("--media-dir", metavar="DIR", help="where the images or videos are (see the formats above)")
    convert.add_argument("--out", metavar="FILE.jsonl", required=True, help="the JSONL file to write")
    convert.add_argument("--limit", type=int, metavar="N", help="convert only the first N questions")
    for sub in (check, convert):
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        if args.command == "check":
            samples = load_eval_file(args.file, check_media=not args.no_check_media)
            turns = [t for s in samples for t in s.turns]
            metrics = sorted({t.metric for t in turns})
            print(f"{args.file}: {len(samples)} samples, {len(turns)} questions, metrics: {', '.join(metrics)}")
        else:
            count = eval_convert.convert(args.format, args.src, args.out, args.media_dir, args.limit)
            print(f"wrote {count} samples to {args.out}", file=sys.stderr)

    return run_cli(body, args.debug, "convert fewer questions (--limit)")


if __name__ == "__main__":
    sys.exit(main())
