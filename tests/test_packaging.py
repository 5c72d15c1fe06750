"""`pip install .` and `pip install -e .` both give tinyvila.{kernels,quant,models,tools} and the
tinyvila-chat script, with no generic top-level package names in site-packages."""
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, sys
for name in ("tinyvila", "tinyvila.kernels", "tinyvila.quant", "tinyvila.models", "tinyvila.tools",
             "tinyvila.models.llava_next", "tinyvila.chat"):
    print(name, importlib.import_module(name).__file__)
for generic in ("models", "kernels", "quant", "tools"):
    try:
        importlib.import_module(generic)
        sys.exit(f"a top-level '{generic}' package is importable")
    except ImportError:
        pass
"""


@pytest.mark.parametrize("editable", [False, True])
def test_pip_install(tmp_path, editable):
    env_dir = tmp_path / "venv"
    # The running interpreter's packages (torch & co.) stay visible through a .pth file, even when
    # that interpreter is itself a venv; the new venv's own site-packages come first.
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    (Path(own) / "parent.pth").write_text("\n".join(p for p in sys.path if p.endswith("-packages")) + "\n")
    args = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    args += ["-e", str(REPO)] if editable else [str(REPO)]
    subprocess.run(args, check=True, cwd=tmp_path, capture_output=True)
    out = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    files = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    if editable:
        assert files["tinyvila.kernels"] == str(REPO / "kernels" / "__init__.py")
    else:
        assert str(env_dir) in files["tinyvila.models"] and files["tinyvila.models"].endswith(
            "tinyvila/models/__init__.py")
    script = subprocess.run([str(env_dir / "bin" / "tinyvila-chat"), "--help"], capture_output=True, text=True)
    assert script.returncode == 0 and "--image" in script.stdout
