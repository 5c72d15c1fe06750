"""`tinyvila-demo`: a tiny checkpoint built with no download and no transformers, one question
about a generated picture through the whole path; the checkpoint is in the real hub format."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinyvila
from tinyvila import demo

REPO = Path(__file__).resolve().parents[1]


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "tinyvila.demo", "--device", "cpu", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "ckpt"
    out = run_demo("--keep", str(folder))
    assert out.returncode == 0, out.stderr
    return folder, out.stdout


def test_demo_runs_end_to_end_without_transformers(kept):
    folder, stdout = kept
    answer = next(line for line in stdout.splitlines() if line.startswith("answer:"))
    assert len(answer.removeprefix("answer:").strip()) > 5
    for stat in ("prefill", "decode", "ttft", "peak_mem"):
        assert stat in stdout
    assert "gibberish" in stdout and demo.REAL_MODEL_COMMAND in stdout
    assert demo.REAL_MODEL_COMMAND in (REPO / "README.md").read_text()  # the command the README starts with
    assert (folder / "example.png").is_file() and (folder / "model.safetensors.index.json").is_file()
    # The runtime alone: transformers is never imported, the temporary checkpoint is removed.
    code = ("import sys, tempfile, os; from tinyvila import demo; demo.main(['--device', 'cpu']); "
            "print('transformers' in sys.modules, [d for d in os.listdir(tempfile.gettempdir()) "
            "if d.startswith('tinyvila-demo-')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "False []", out.stderr


def test_answers_depend_on_the_image_and_the_question(kept):
    folder, _ = kept
    eng = tinyvila.load(folder, device="cpu")
    pictures = [demo.demo_picture(), demo.demo_picture(90, 150).transpose(0)]
    answers = {eng.generate(q, images=[p], max_new_tokens=8, temperature=0, ignore_eos=True).token_ids.__repr__()
               for q in ("What is in this picture?", "Is there a sun?") for p in pictures}
    assert len(answers) == 4


def test_bad_device_is_one_line_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tinyvila.demo", "--device", "tpu9", "--keep", str(tmp_path / "d")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "" and not (tmp_path / "d").exists()
    assert out.stderr.startswith("error: unknown device 'tpu9'") and len(out.stderr.splitlines()) == 1


def test_keep_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = run_demo("--keep", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --keep {tmp_path}: the folder is not empty (give a new one)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_checkpoint_is_real_transformers_gives_the_same_greedy_tokens(kept):
    """transformers loads the demo checkpoint (model, tokenizer, image processor) and generates the
    very tokens tinyvila does."""
    from PIL import Image
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

    from fixtures_llava import pil_image_processor

    folder, _ = kept
    eng = tinyvila.load(folder, device="cpu", dtype="float32")
    img = Image.open(folder / "example.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.QUESTION}]}]
    text = eng.render(messages)
    ids = eng.encode_text(text)
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == ids
    with eng.session(images=[img]) as s:
        keys, _ = s.expand(ids, s.pending)
    expanded = torch.tensor([[k if k >= 0 else eng.image_token_id for k in keys]])
    pixels = pil_image_processor().from_pretrained(folder)(images=[img], return_tensors="pt")
    model, info = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    banned = eng.banned.nonzero().flatten().tolist()
    out = model.generate(input_ids=expanded, attention_mask=torch.ones_like(expanded),
                         pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"], max_new_tokens=16,
                         do_sample=False, suppress_tokens=banned, eos_token_id=None, pad_token_id=0)
    ours = eng.generate(demo.QUESTION, images=[img], max_new_tokens=16, temperature=0, ignore_eos=True)
    assert ours.token_ids == out[0, expanded.shape[1]:].tolist()
