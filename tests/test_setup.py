"""scripts/setup.sh is idempotent: a second run rebuilds nothing; a changed input does.

The real repository: `--check-test` finds it up to date (scripts/test.sh has
just run setup), and a real second run builds nothing and leaves the built
extension untouched (how long it takes is a matter for benchmarks, not tests).  A copy of the
setup inputs next to this .venv's stamps: changing torch_xegpu_attn/csrc/ or a requirements
file makes `--check-test` report the
reinstall or rebuild it would do (the copy is never built).
"""

import os
import shutil
import subprocess
from pathlib import Path

import torch_xegpu_attn._C

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ["scripts", "torch_xegpu_attn/csrc", "setup.py", "pyproject.toml", "requirements.txt", "requirements-test.txt"]


def setup(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(folder / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          timeout=600)


def test_second_run_rebuilds_nothing():
    check = setup(ROOT, "--check-test")
    assert check.returncode == 0, f"run scripts/setup.sh --test first:\n{check.stdout}{check.stderr}"
    assert "setup: up to date" in check.stdout
    extension = Path(torch_xegpu_attn._C.__file__)
    before = extension.stat().st_mtime_ns
    done = setup(ROOT, "--test")
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stdout and "ready" in done.stdout
    assert extension.stat().st_mtime_ns == before, "the second run rebuilt the extension"


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in INPUTS:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / name)
    venv = copy / ".venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(ROOT / ".venv" / "bin" / "python", venv / "bin" / "python")
    for stamp in (ROOT / ".venv").glob(".setup-*"):
        shutil.copy(stamp, venv / stamp.name)
    return copy


def test_changed_inputs_are_detected(tmp_path):
    copy = _copy(tmp_path)
    assert setup(copy, "--check-test").stdout.strip() == "setup: up to date"

    source = copy / "torch_xegpu_attn" / "csrc" / "op.cpp"
    original = source.read_text()
    source.write_text(original + "\n// a change\n")
    report = setup(copy, "--check-test")
    assert report.returncode == 1 and report.stdout.strip() == "setup would rebuild the C++ extension"
    source.write_text(original)

    (copy / "requirements-test.txt").write_text((copy / "requirements-test.txt").read_text() + "\n# change\n")
    report = setup(copy, "--check-test")
    assert report.returncode == 1 and report.stdout.strip() == "setup would install requirements-test.txt"
    assert setup(copy, "--check").returncode == 0, "the demo's setup does not need the test requirements"

    (copy / "requirements.txt").write_text((copy / "requirements.txt").read_text() + "\n# change\n")
    lines = setup(copy, "--check").stdout.splitlines()
    assert lines == ["setup would install requirements.txt", "setup would rebuild the C++ extension"], lines


def test_unknown_option():
    done = setup(ROOT, "--frobnicate")
    assert done.returncode == 2 and "unknown option" in done.stderr
