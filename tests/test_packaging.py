"""`pip install .` and `pip install -e .` both give tinyvila.{kernels,quant,models,tools} and the
tinyvila-chat and tinyvila-demo scripts, with no generic top-level package names in site-packages; run from the clone's
root, `python -m tinyvila...` works too, and a package named `kernels` elsewhere (Hugging Face's,
which transformers imports) is not shadowed by the clone's kernels/ folder."""
import os
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
    spec = importlib.util.find_spec(generic)  # Hugging Face's `kernels` may be installed: not ours
    if spec is not None and (spec.origin or "").startswith(tuple(sys.argv[1:])):
        sys.exit(f"a top-level '{generic}' package of ours is importable: {spec.origin}")
"""
# Run from the clone's root with an unrelated `kernels` package on the path: it must stay importable.
FROM_ROOT = """
import tinyvila, tinyvila.models, tinyvila.kernels.gpu, kernels
print(kernels.ORIGIN, tinyvila.models.__file__)
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
    out = subprocess.run([str(python), "-c", CHECK, str(env_dir), str(REPO)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    files = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    if editable:
        assert files["tinyvila.kernels"] == str(REPO / "kernels" / "__init__.py")
    else:
        assert str(env_dir) in files["tinyvila.models"] and files["tinyvila.models"].endswith(
            "tinyvila/models/__init__.py")
    script = subprocess.run([str(env_dir / "bin" / "tinyvila-chat"), "--help"], capture_output=True, text=True)
    assert script.returncode == 0 and "--image" in script.stdout
    demo = subprocess.run([str(env_dir / "bin" / "tinyvila-demo"), "--device", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True)  # no tests/ fixtures, no transformers needed
    assert demo.returncode == 0 and "answer:" in demo.stdout, demo.stderr
    script = subprocess.run([str(env_dir / "bin" / "tinyvila-serve"), "--help"], capture_output=True, text=True)
    assert script.returncode == 0 and "--allowed-local-media" in script.stdout

    unrelated = tmp_path / "elsewhere" / "kernels"
    unrelated.mkdir(parents=True)
    (unrelated / "__init__.py").write_text("ORIGIN = 'unrelated'\n")
    env = dict(os.environ, PYTHONPATH=str(unrelated.parent))
    for command in (["-c", FROM_ROOT], ["-m", "tinyvila.chat", "--help"]):
        run = subprocess.run([str(python), *command], cwd=REPO, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr + run.stdout
    run = subprocess.run([str(python), "-c", FROM_ROOT], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.stdout.split()[0] == "unrelated"
    assert run.stdout.split()[1] == str(REPO / "models" / "__init__.py")  # the clone's own code runs


def test_tests_keep_the_clone_root_off_the_path():
    """This very process (`python -m pytest` from the clone's root) must not find the clone's
    kernels/ folder ahead of site-packages."""
    root = str(REPO)
    entries = [os.path.abspath(p or os.curdir) for p in sys.path]
    packages = [i for i, p in enumerate(entries) if p.endswith("-packages")]
    assert all(i > max(packages) for i, p in enumerate(entries) if p == root)
