"""The tiny test checkpoints tell inputs apart: two different images, or two different prompts, get
different greedy answers. Equivalence tests built on a checkpoint that gives one answer to
everything (its norm gains near zero once muted every layer) would prove nothing."""
import pytest
import torch

import tinyvila
from fixtures_qwen import build_qwen2_5_vl
from fixtures_qwen3 import build_qwen3_vl
from fixtures_vila import build_vila

GREEDY = dict(temperature=0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", params=["llava_vicuna", "llava_mistral", "qwen2_5_vl", "qwen3_vl", "vila_llama3",
                                                 "vila_qwen2"])
def eng(request, tmp_path_factory):
    family = request.param
    if family.startswith("llava"):
        path = request.getfixturevalue(family)  # conftest's session checkpoints, the ones most tests use
    else:
        path = tmp_path_factory.mktemp(family)
        if family == "qwen2_5_vl":
            build_qwen2_5_vl(path)
        elif family == "qwen3_vl":
            build_qwen3_vl(path)
        else:
            build_vila(str(path), backbone=family.removeprefix("vila_"))
    return tinyvila.load(path, device="cpu", dtype=torch.float32)


def answer(eng, prompt, image):
    return eng.generate(prompt, images=[image], **GREEDY).token_ids


def test_different_images_give_different_answers(eng, image_files):
    first, second = answer(eng, "What?", image_files[0]), answer(eng, "What?", image_files[1])
    assert len(first) == len(second) == GREEDY["max_new_tokens"]
    assert first != second


def test_different_prompts_give_different_answers(eng, image_files):
    assert answer(eng, "What?", image_files[0]) != answer(eng, "Describe it.", image_files[0])
