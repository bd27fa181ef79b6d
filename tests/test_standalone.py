"""The promise "copy one file into your project": every mechanism file, alone in an empty folder.

Each file in mechanisms/ is copied by itself into a fresh temporary directory and run there with
`python <file>`; its demo must exit 0 and print something. A file that imports another project file,
or reads anything relative to the repository, fails here. A second test reads each file's imports and
allows only torch and the standard library (the core file is held to the same rule), so an import that happens to be installed here cannot slip
through.
"""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MECHANISMS = sorted(p for p in (ROOT / "mechanisms").glob("*.py") if p.name != "__init__.py")
TORCH_ONLY = MECHANISMS + [ROOT / "transformer_implementation.py"]
ALLOWED = set(sys.stdlib_module_names) | {"torch"}


@pytest.mark.slow
@pytest.mark.parametrize("path", MECHANISMS, ids=lambda p: p.stem)
def test_runs_alone_in_an_empty_folder(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, copy.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{path.name} demo failed alone in {tmp_path}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{path.name} demo printed nothing"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == [path.name], (
        f"{path.name} demo wrote files next to itself"
    )


@pytest.mark.parametrize("path", TORCH_ONLY, ids=lambda p: p.stem)
def test_imports_only_torch_and_the_standard_library(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "", node.level)]
        else:
            continue
        for name, level in names:
            top = name.split(".")[0]
            assert level == 0 and top in ALLOWED, f"{path.name} imports {'.' * level}{name}"
