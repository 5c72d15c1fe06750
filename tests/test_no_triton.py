"""Where Triton is not installed (setup.py installs it on Linux only), tinyvila still imports and
runs on the CPU: the kernel modules import without it and the CPU runs their PyTorch references."""
import json
import subprocess
import sys
from pathlib import Path

import tinyvila

REPO = Path(__file__).resolve().parents[1]
WITHOUT_TRITON = """
import json, sys

class NoTriton:  # as if triton were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
import tinyvila
import tinyvila.kernels.triton_lang as triton_lang
from tinyvila.errors import TinyVilaError

eng = tinyvila.load(sys.argv[1], device="cpu")
out = eng.generate("Describe the image.", images=[sys.argv[2]], max_new_tokens=4, temperature=0)
try:
    triton_lang.triton.cdiv(1, 1)
    launch = "no error"
except TinyVilaError as e:
    launch = str(e)
print(json.dumps(dict(tokens=out.token_ids, have_triton=triton_lang.HAVE_TRITON, launch=launch,
                      imported=sorted(m for m in sys.modules if m.split(".")[0] == "triton"))))
"""


def test_load_and_generate_without_triton(llava_vicuna, image_files):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(llava_vicuna), str(image_files[0])],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["have_triton"] is False and got["imported"] == []
    assert "Triton, which is not installed" in got["launch"]
    eng = tinyvila.load(llava_vicuna, device="cpu")
    ref = eng.generate("Describe the image.", images=[str(image_files[0])], max_new_tokens=4, temperature=0)
    assert got["tokens"] == ref.token_ids
