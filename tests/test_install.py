"""A plain (not editable) ``pip install .`` works without the repository: shipped files are package data.

The package is installed, without its dependencies, into a new virtual environment that borrows
this one's third-party packages through a path file; everything then runs from another folder.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, tiny_llama


def run(command, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EASYEDIT_PATH", "MEMOE_DATA")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    if not any(files):
        pytest.skip("not a git checkout: cannot tell the project's files")
    for name in filter(None, (f.decode() for f in files)):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            target.symlink_to(os.readlink(REPO / name))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    root).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")   # torch, transformers, pip ...
    result = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  str(source)], root)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.rmtree(source)                      # nothing may come from the source tree any more
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return venv, elsewhere


def test_the_package_is_the_installed_copy_and_imports_lightly(installed):
    venv, elsewhere = installed
    probe = ("import json, sys, memoe_plugin; print(json.dumps({'file': memoe_plugin.__file__, 'heavy': "
             "[m for m in sys.modules if m.startswith(('matplotlib', 'memoe_plugin.eval', 'memoe_plugin.cli'))]}))")
    result = run([str(venv / "bin" / "python"), "-c", probe], elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["file"].startswith(str(venv)) and out["heavy"] == []


def test_memoe_compare_lists_the_shipped_files(installed):
    venv, elsewhere = installed
    result = run([str(venv / "bin" / "memoe-compare"), "--list-methods"], elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    shipped = [line.split()[-1] for line in lines if line.split()[-1].endswith(".yaml")]
    assert {"MEMoE", "FT-L", "GRACE", "WISE"} <= {line.split()[0] for line in lines}
    assert shipped and all(Path(p).is_file() and p.startswith(str(venv)) for p in shipped)


def test_memoe_edit_runs_with_the_shipped_hparams_and_examples(installed, tokenizer):
    venv, elsewhere = installed
    model_dir = elsewhere / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = run([str(venv / "bin" / "memoe-edit"), "--model", str(model_dir), "--limit", "1", "--set", "layer=2",
                  "steps=5", "anchor_backend=offline"], elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[1] The Eiffel Tower is located in the city of -> Rome" in result.stdout
