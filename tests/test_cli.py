"""The chat CLI as a user runs it: a subprocess, one-shot and interactive (driven through stdin),
and every bad input giving one `error:` line and exit status 2, never a traceback."""
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import tinyvila

GREEDY = ["--temperature", "0", "--device", "cpu", "--dtype", "float32"]


def chat(*args, stdin=None, env=None):
    proc = subprocess.run([sys.executable, "-m", "tinyvila.chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_error(code, err, message):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loaded ")]  # load summary
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_one_shot_matches_api(llava_vicuna, image_files):
    code, out, err = chat(llava_vicuna, "--image", image_files[0], "-p", "Describe it.", "-n", "6", *GREEDY)
    assert code == 0, err
    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32")
    # the chat picks the "image" sparsity preset for an image; the Python API is dense unless told
    expected = eng.generate("Describe it.", images=[image_files[0]], max_new_tokens=6, temperature=0,
                            sparsity="image")
    assert out == expected.text + "\n"
    assert "prefill" in err and "decode" in err and "ttft" in err  # the stats block


def test_json_output_and_env_model(llava_mistral, image_files):
    code, out, err = chat("--image", image_files[1], "-p", "Hi", "-n", "4", "--json", *GREEDY,
                          env={"TINYVILA_MODEL": str(llava_mistral)})
    assert code == 0, err
    record = json.loads(out)
    assert set(record) == {"text", "token_ids", "finish_reason", "stats"}
    assert record["stats"]["visual_tokens"] > 0 and record["stats"]["prefill_tokens"] > 0


def test_interactive_chat_through_stdin(llava_vicuna, image_files, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    script = "\n".join([
        "What is this?",
        f"/image {bad}",  # reported, the conversation goes on
        "/set temperature 0",
        "/set top_p banana",  # reported too
        "And now?",
        "/stats",
        "/nonsense",
        "/help",
        "/exit",
        "never answered",
    ]) + "\n"
    code, out, err = chat(llava_vicuna, "--image", image_files[2], "-n", "3", *GREEDY, stdin=script)
    assert code == 0, err
    assert "Traceback" not in err
    assert err.count("error:") == 3  # bad image, bad /set value, unknown command
    assert "/image PATH" in out  # the help text
    answers = [line for line in out.splitlines() if line and "/" not in line]
    assert len(answers) >= 2
    assert err.count("ttft") == 3  # two answers and /stats


def test_ctrl_d_exits_cleanly(llava_vicuna):
    code, out, err = chat(llava_vicuna, *GREEDY, stdin="")
    assert code == 0 and "Traceback" not in err


def _bad_inputs(tmp_path, image):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    truncated = tmp_path / "cut.png"
    data = image.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # tiny file, 400 M pixels
    return {"missing": (tmp_path / "nope.png", "nope.png"), "empty": (empty, "empty"),
            "not an image": (text, "notes.png"), "truncated": (truncated, "cut.png"),
            "decompression bomb": (bomb, "pixels")}


def test_bad_images(llava_vicuna, image_files, tmp_path):
    for name, (path, message) in _bad_inputs(tmp_path, image_files[0]).items():
        code, out, err = chat(llava_vicuna, "--image", path, "-p", "Hi", *GREEDY)
        assert_clean_error(code, err, message)


def test_bad_models_and_flags(llava_vicuna, image_files, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["Nope"], "model_type": "nope"}))
    cases = [
        ([tmp_path / "missing-dir"], "does not exist"),
        ([broken], "not valid JSON"),
        ([unknown], "supports LLaVA-NeXT"),
        ([llava_vicuna, "--max-seq-len", "32"], "context holds 32"),
        ([llava_vicuna, "--temperature", "-1"], "temperature must be"),
    ]
    for args, message in cases:
        code, out, err = chat(*args, "--image", image_files[0], "-p", "Describe the image.", "--device", "cpu")
        assert_clean_error(code, err, message)
    if not torch.cuda.is_available():
        code, out, err = chat(llava_vicuna, "--image", image_files[0], "-p", "Hi", "--device", "cuda")
        assert_clean_error(code, err, "CUDA is not available")
    code, out, err = chat(llava_vicuna, "--frobnicate")
    assert code == 2 and "Traceback" not in err



def test_ctrl_c_stops_the_answer_not_the_program(llava_vicuna):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-u", "-m", "tinyvila.chat", str(llava_vicuna), "-n", "100000",
                             "--ignore-eos", *GREEDY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # SIGINT as a terminal delivers it: a background job (`pytest &`) ignores it,
                            # which the child would inherit and never raise KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write("Tell me everything.\n")
    proc.stdin.flush()
    assert proc.stdout.read(1)  # the answer is streaming
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out, err = proc.communicate("/set max_new_tokens 3\nStill there?\n/exit\n", timeout=120)
    assert proc.returncode == 0, err
    assert "[interrupted]" in err and "Traceback" not in err
    assert err.count("ttft") == 1  # the second question was answered in full


def test_debug_shows_the_traceback(tmp_path):
    code, out, err = chat(tmp_path / "missing", "-p", "Hi", "--debug")
    assert code != 0 and "Traceback" in err and "does not exist" in err


# ============================================================================ through the installed scripts
# The console scripts as a user runs them (`pip install .` puts them next to the interpreter).

# every console script setup.py declares
SCRIPTS = re.findall(r'"(tinyvila-[\w-]+) = ', (Path(__file__).resolve().parents[1] / "setup.py").read_text())
CPU = ["--device", "cpu", "--dtype", "float32", "--temperature", "0"]


def script(name):
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return found


def run(name, *args, env=None, stdin=None, drop=()):
    """Run an installed script; `drop` names environment variables to unset."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    proc = subprocess.run([script(name), *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=300, env=environment)
    return proc.returncode, proc.stdout, proc.stderr


def shell(command, env=None):
    """A bash command line (pipes, closed descriptors) with the scripts' folder first on PATH."""
    folder = os.path.dirname(script("tinyvila-chat"))
    environment = {**os.environ, **(env or {}), "PATH": folder + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, errors="replace", timeout=300,
                          env=environment)  # (`head -c` may cut a character in two)
    return proc.returncode, proc.stdout, proc.stderr


def test_image_takes_one_path_so_the_model_after_it_stays_the_model(llava_vicuna, image_files):
    code, out, err = run("tinyvila-chat", "-i", image_files[0], llava_vicuna, "-p", "Hi", "-n", "2", *CPU)
    assert code == 0 and out.strip(), err
    assert f"loaded {llava_vicuna}" in err  # this model, not the default hub one
    code, out, err = run("tinyvila-chat", "-i", image_files[0], "--image", image_files[1], llava_vicuna, "-p", "Hi",
                         "-n", "2", "--json", *CPU)
    assert code == 0, err
    assert json.loads(out)["stats"]["visual_tokens"] > 0


def test_old_many_paths_syntax_and_an_image_as_model_are_refused(llava_vicuna, image_files):
    code, out, err = run("tinyvila-chat", "-i", image_files[0], image_files[1], llava_vicuna, "-p", "Hi")
    assert code == 2 and "Traceback" not in err and "-i a.png -i b.png" in err.splitlines()[-1]
    code, out, err = run("tinyvila-chat", image_files[0], "-p", "Hi")
    assert code == 2 and f"MODEL '{image_files[0]}' is a file" in err.splitlines()[-1]


# Each is reported before the model loads: the model folder does not even exist.
BEFORE_LOADING = [
    (["-i", "{tmp}/nope.png"], "nope.png': no such file"),
    (["-i", "{tmp}"], "is a directory"),
    (["--video", "{tmp}/nope.mp4"], "nope.mp4': no such file"),
    (["--save-kept", "{tmp}/no-such-dir/kept.png"], "--save-kept: no folder"),
    (["--save-kept", "{tmp}"], "is a folder"),
    (["--save-kept", "{tmp}/kept.txt"], "say kept.png"),
    (["--temperature", "-1"], "temperature must be"),
    (["-n", "0"], "max_new_tokens must be a positive integer"),
    (["--seed", str(2 ** 64)], "seed must be a 64-bit integer"),
    (["--sparsity", "bogus"], "sparsity"),
    (["--prefill-budget", "everything"], "prefill_budget"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:7"], "cuda" if torch.cuda.is_available() else "CUDA is not available"),
]


@pytest.mark.parametrize("args,message", BEFORE_LOADING, ids=[" ".join(a) for a, _ in BEFORE_LOADING])
def test_options_and_paths_are_checked_before_loading(args, message, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in args]
    code, out, err = run("tinyvila-chat", tmp_path / "no-such-model", *argv, "-p", "Hi")
    assert_clean_error(code, err, message)


def test_bad_flag_values_get_argparse_one_line(tmp_path):
    for flag in ("--max-seq-len", "--max-pixels", "--max-frames", "--fps"):
        code, out, err = run("tinyvila-chat", tmp_path, flag, "0", "-p", "Hi")
        assert code == 2 and "Traceback" not in err and f"{flag}" in err and "must be a positive" in err


def test_default_model_is_announced_before_downloading(tmp_path):
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # never the network
    code, out, err = run("tinyvila-chat", "-p", "Hi", "--device", "cpu", env=offline, drop=("TINYVILA_MODEL",))
    assert code == 2 and "Traceback" not in err
    first, last = err.splitlines()[0], err.splitlines()[-1]
    assert "llava-hf/llava-v1.6-vicuna-7b-hf" in first and "~14 GB" in first and "downloading" in first
    assert last.startswith("error: ") and "not in the local hub cache" in last
    # already in the cache: nothing to announce
    repo = tmp_path / "hf" / "hub" / "models--llava-hf--llava-v1.6-vicuna-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    code, out, err = run("tinyvila-chat", "-p", "Hi", "--device", "cpu", env=offline, drop=("TINYVILA_MODEL",))
    assert code == 2 and "downloading" not in err and "Traceback" not in err


def test_closed_stdout_ends_quietly_as_on_sigpipe(llava_vicuna):
    code, out, err = shell(f"tinyvila-chat {llava_vicuna} -p Hi -n 1000 --ignore-eos --device cpu | head -c 5; "
                           "exit ${PIPESTATUS[0]}")
    assert code == 128 + signal.SIGPIPE, err  # killed by SIGPIPE, as coreutils are
    assert out and "Traceback" not in err and "Error" not in err


def test_closed_stdin_is_end_of_input(llava_vicuna):
    code, out, err = shell(f"tinyvila-chat {llava_vicuna} --device cpu <&-")
    assert code == 0 and "Traceback" not in err, err


def test_out_of_memory_is_one_line_saying_how_much_and_what_to_lower(llava_vicuna, tmp_path):
    model = tmp_path / "long"
    shutil.copytree(llava_vicuna, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 10 ** 16  # so the context length is allowed
    (model / "config.json").write_text(json.dumps(config))
    # far over any machine's address space: the allocation fails at once, whatever the overcommit policy
    code, out, err = run("tinyvila-chat", model, "--max-seq-len", 10 ** 15, "-p", "Hi", "-n", "2", *CPU)
    assert_clean_error(code, err, "out of CPU memory (tried to allocate ")
    assert "--max-seq-len" in err


def test_out_of_memory_conversion():
    from tinyvila.errors import out_of_memory

    gpu = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                      "of 79.19 GiB of which 1.00 GiB is free.")
    assert out_of_memory(gpu, "lower X").startswith("out of GPU memory (tried to allocate 2.00 GiB); lower X")
    with pytest.raises(RuntimeError) as e:
        torch.empty(2 ** 50, dtype=torch.uint8)
    assert out_of_memory(e.value, "lower X") == "out of CPU memory (tried to allocate 1048576.0 GiB); lower X"
    assert out_of_memory(ValueError("nope")) is None


def test_every_script_is_tested():
    assert len(SCRIPTS) >= 6 and "tinyvila-chat" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_version(name):
    code, out, err = run(name, "--version")
    assert code == 0 and out.strip() == f"{name} {tinyvila.__version__}", err


def test_list_models_reuses_the_registry():
    from tinyvila.models import ARCHITECTURES, HUB_MODELS, MODEL_TYPES

    code, out, err = run("tinyvila-chat", "--list-models")
    assert code == 0, err
    assert all(arch in out for arch in [*ARCHITECTURES, *MODEL_TYPES])
    assert set(HUB_MODELS) <= set(ARCHITECTURES)
    assert all(f"  {repo}" in out.splitlines() or f"  {repo}  (the default)" in out.splitlines()
               for repos in HUB_MODELS.values() for repo in repos)
    assert "  llava-hf/llava-v1.6-vicuna-7b-hf  (the default)" in out.splitlines()
    assert out.startswith("LLaVA-NeXT: architectures LlavaNextForConditionalGeneration")


def test_help_imports_no_torch():
    code, out, err = run("tinyvila-chat", "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert code == 0 and "--image" in out and "--list-models" in out
    imported = {line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "tinyvila.chat" in imported and "torch" not in imported and "numpy" not in imported


def test_load_summary_line_and_quiet(llava_vicuna, image_files):
    code, out, err = run("tinyvila-chat", llava_vicuna, "-i", image_files[3], "-p", "Hi", "-n", "2", *CPU)
    assert code == 0, err
    summary = [line for line in err.splitlines() if line.startswith("loaded ")]
    assert len(summary) == 1 and re.fullmatch(
        rf"loaded {re.escape(str(llava_vicuna))}: LLaVA-NeXT, float32, quantization none, cpu, "
        r"[\d.]+ MB of weights, [\d.]+ s", summary[0]), err
    assert "ttft" in err
    code, out, err = run("tinyvila-chat", llava_vicuna, "-i", image_files[3], "-p", "Hi", "-n", "2", "-q", *CPU)
    assert code == 0 and out.strip() and err == "", err


def test_load_summary_names_the_quantization():
    from tinyvila.chat import load_summary

    class W4Linear(torch.nn.Linear):
        pass

    class W8A8Linear(torch.nn.Linear):
        pass

    class Model(torch.nn.Module):
        name = "Fam"

    model = Model()
    model.a, model.b = W4Linear(4, 4, bias=False), W8A8Linear(4, 4, bias=False)
    engine = types.SimpleNamespace(model=model, dtype=torch.float16, device=torch.device("cpu"),
                                   path=Path("/hub/models--org--name/snapshots/abc"))
    assert load_summary(engine, 1.25) == ("loaded org/name: Fam, float16, quantization awq w4a16 + w8a8 vision, cpu, "
                                          "0.0 MB of weights, 1.2 s")


def test_image_command_takes_quoted_escaped_and_home_paths(llava_vicuna, image_files, tmp_path):
    folder = tmp_path / "my photos"
    folder.mkdir()
    shutil.copy(image_files[3], folder / "it's.png")
    shutil.copy(image_files[3], tmp_path / "home.png")
    dropped = [f"'{folder}/it'\\''s.png'", str(folder / "it's.png").replace(" ", "\\ ").replace("'", "\\'"),
               f'"{folder}/it\'s.png"', "~/home.png", str(folder / "it's.png")]
    script_in = "".join(f"/image {path}\n" for path in dropped) + "/image a b\n"
    code, out, err = run("tinyvila-chat", llava_vicuna, *CPU, stdin=script_in, env={"HOME": str(tmp_path)})
    assert code == 0 and "Traceback" not in err, err
    attached = [line for line in err.splitlines() if line.startswith("[image ")]
    assert len(attached) == 5, err
    assert sum(f"{folder}/it's.png" in line for line in attached) == 4
    assert any(str(tmp_path / "home.png") in line for line in attached)
    assert err.count("error: ") == 1 and "one path please" in err


def test_interactive_terminal_keeps_a_readline_history(llava_vicuna, tmp_path):
    pytest.importorskip("readline")
    for env, history in (({"HOME": str(tmp_path)}, tmp_path / ".tinyvila_history"),
                         ({"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
                          tmp_path / "state" / "tinyvila" / "history")):
        output = on_terminal([script("tinyvila-chat"), str(llava_vicuna), "-q", *CPU], b"/help\r/exit\r", env)
        assert b"/image PATH" in output and b"Traceback" not in output, output
        assert history.read_text().split()[-2:] == ["/help", "/exit"]


def on_terminal(argv, typed: bytes, env) -> bytes:
    """Run argv on a pseudo-terminal, type `typed`, return everything it printed."""
    master, slave = os.openpty()
    environment = {**os.environ, **env}
    if "XDG_STATE_HOME" not in env:  # the history then goes to $HOME, whatever this machine sets
        environment.pop("XDG_STATE_HOME", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=environment, close_fds=True)
    os.close(slave)
    output, typed_yet = b"", False
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed: the program ended
            break
        if not chunk:
            break
        output += chunk
        if not typed_yet and b">>> " in output:  # the prompt: readline is listening
            os.write(master, typed)
            typed_yet = True
    os.close(master)
    proc.wait(timeout=60)
    return output


def test_bench_without_the_gpu_is_one_line(tmp_path):
    # cuda:99 exists nowhere: "CUDA is not available" on a CPU machine, "no device cuda:99" on a GPU one
    code, out, err = run("tinyvila-bench", "--arch", "llava-next-vicuna-7b", "--device", "cuda:99")
    assert_clean_error(code, err, "cuda" if torch.cuda.is_available() else "CUDA is not available")
    if not torch.cuda.is_available():  # the default device is the GPU
        code, out, err = run("tinyvila-bench", "--arch", "llava-next-vicuna-7b")
        assert_clean_error(code, err, "CUDA is not available")
        for tool in ("kernel_bench", "retrieval_bench", "saliency_bench", "int8_bench"):
            proc = subprocess.run([sys.executable, "-m", f"tinyvila.tools.{tool}"], capture_output=True, text=True,
                                  timeout=300)
            assert_clean_error(proc.returncode, proc.stderr, f"{tool} needs a CUDA GPU")


def test_bench_on_the_cpu_prints_no_nan(llava_vicuna, tmp_path):
    out_file = tmp_path / "bench.json"
    code, out, err = run("tinyvila-bench", "--model", llava_vicuna, "--device", "cpu", "--dtype", "float32", "--image",
                         "64x48", "--new-tokens", "3", "--runs", "1", "--turns", "2", "--prefill-sparsity", "0.5",
                         "--json", out_file)
    assert code == 0, err
    assert "nan" not in out.lower().replace(str(llava_vicuna).lower(), "") and "| n/a |" in out
    assert "TB/s" not in out and "vision n/a" in out  # no copy bandwidth on the CPU; no vision on turn 2
    runs = json.loads(out_file.read_text())["runs"]  # strict JSON: no NaN
    assert all(r["roofline"] is None and r["copy_bandwidth"] is None for r in runs)
    code, out, err = run("tinyvila-bench", "--model", llava_vicuna, "--device", "cpu", "--json",
                         tmp_path / "no-dir" / "b.json")
    assert_clean_error(code, err, "--json: no folder")
