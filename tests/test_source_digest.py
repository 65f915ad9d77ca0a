"""The source digest that ties a results file to the code it measured (benches/source_digest.py)."""
import shutil
import subprocess

import pytest

from audiomae import report
from benches import source_digest as sd

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _write(root, files):
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin:/usr/local/bin"})
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


FILES = {"kernels/op.py": "a = 1\n", "csrc/k/k.cu": "// k\n", "audiomae/m.py": "m = 2\n", "benches/b.py": "b\n",
         "benches/results/r.json": "{}", "setup.py": "s\n", "Makefile": "all:\n", "README.md": "readme\n",
         "tests/test_x.py": "t\n"}


def test_which_files_count():
    assert sd.is_source("kernels/op.py") and sd.is_source("csrc/fbank/fbank.cu") and sd.is_source("setup.py")
    assert sd.is_source("csrc/fbank/fbank_frame.cuh") and sd.is_source("Makefile")
    assert not sd.is_source("benches/results/gpu_check.json") and not sd.is_source("README.md")
    assert not sd.is_source("tests/test_x.py") and not sd.is_source("kernels/__pycache__/op.cpython-311.pyc")
    assert not sd.is_source("kernels/_fbank.so")


def test_digest_follows_sources_only(tmp_path):
    _write(tmp_path, FILES)
    before = sd.digest(sd.working_tree_files(tmp_path))
    assert set(sd.working_tree_files(tmp_path)) == {"kernels/op.py", "csrc/k/k.cu", "audiomae/m.py", "benches/b.py",
                                                    "setup.py", "Makefile"}
    _write(tmp_path, {"benches/results/r.json": "[1]", "README.md": "other", "tests/test_x.py": "u"})
    assert sd.digest(sd.working_tree_files(tmp_path)) == before
    _write(tmp_path, {"kernels/op.py": "a = 2\n"})
    assert sd.digest(sd.working_tree_files(tmp_path)) != before
    # A file moved keeps its bytes but not its path: a different digest.
    assert sd.digest({"a.py": b"x", "b.py": b""}) != sd.digest({"a.py": b"", "b.py": b"x"})


def test_without_git_the_digest_alone(tmp_path, monkeypatch):
    _write(tmp_path, FILES)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    info = sd.source_info(tmp_path)
    assert info["commit"] is None and info["dirty"] is None and len(info["digest"]) == 64


@needs_git
def test_commit_dirty_and_find(tmp_path):
    _write(tmp_path, FILES)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    first = _git(tmp_path, "commit", "-q", "-m", "one")
    info = sd.source_info(tmp_path)
    assert info == {"digest": sd.digest(sd.commit_files(first, tmp_path)), "commit": first, "dirty": False}
    _write(tmp_path, {"kernels/op.py": "a = 3\n"})
    changed = sd.source_info(tmp_path)
    assert changed["dirty"] is True and changed["digest"] != info["digest"]
    _git(tmp_path, "commit", "-q", "-am", "two")
    _write(tmp_path, {"README.md": "docs only\n"})
    third = _git(tmp_path, "commit", "-q", "-am", "three")
    assert sd.source_info(tmp_path) == {"digest": changed["digest"], "commit": third, "dirty": False}
    assert sd.find_commit(info["digest"][:16], tmp_path) == first
    assert sd.find_commit(changed["digest"], tmp_path) == third  # the newest with those sources
    assert sd.find_commit("0" * 16, tmp_path) is None
    with pytest.raises(ValueError, match="8 hex digits"):
        sd.find_commit("abc", tmp_path)


def test_reports_name_the_source():
    assert report.source_phrase({}) == "" and report.source_phrase({"source": None}) == ""
    phrase = report.source_phrase({"source": {"digest": "ab" * 32, "commit": "c" * 40, "dirty": True}})
    assert phrase == f"; source {'ab' * 8} (commit {'c' * 12} with uncommitted changes)"
    assert "--find" in report.source_phrase({"source": {"digest": "ab" * 32, "commit": None, "dirty": None}})
    info = report.run_info("cpu", [], quick=True)
    assert len(info["source"]["digest"]) == 64


@needs_git
def test_a_copy_inside_another_repository_names_no_commit(tmp_path):
    _write(tmp_path, {"README.md": "outer\n"})
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "outer")
    inner = tmp_path / "venv" / "site-packages"
    _write(inner, FILES)
    info = sd.source_info(inner)
    assert info["commit"] is None and info["dirty"] is None
