"""Which code a results file measured: a digest of the source files, the same with or without git.

The GPU machine gets a copy of the working tree without ``.git``, so a result written there cannot
name its commit. It records ``source_info()`` instead: a SHA-256 over the files that decide what
runs and what is measured (``kernels/``, ``csrc/``, ``audiomae/``, ``benches/`` except its
results, ``setup.py``, ``Makefile``), and the commit too where git can say it. Back here,

    python -m benches.source_digest --find DIGEST

walks the history newest first and prints the commit whose files give that digest (none: the run
measured uncommitted changes). ``python -m benches.source_digest`` prints the working tree's.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("kernels/", "csrc/", "audiomae/", "benches/")
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h")
TOP_LEVEL_FILES = ("setup.py", "Makefile")


def is_source(path: str) -> bool:
    """Whether ``path`` (relative, with forward slashes) is one of the digested files."""
    if path in TOP_LEVEL_FILES:
        return True
    return path.startswith(SOURCE_DIRS) and path.endswith(SOURCE_SUFFIXES) and not path.startswith("benches/results/")


def digest(files: dict[str, bytes]) -> str:
    """SHA-256 over the files in path order, each as its path, a NUL, its length and its bytes."""
    sha = hashlib.sha256()
    for path in sorted(files):
        sha.update(path.encode() + b"\0" + str(len(files[path])).encode() + b"\0" + files[path])
    return sha.hexdigest()


def working_tree_files(root: Path = ROOT) -> dict[str, bytes]:
    candidates = [root / name for name in TOP_LEVEL_FILES] + [p for top in SOURCE_DIRS for p in (root / top).rglob("*")]
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in candidates
            if is_source(path.relative_to(root).as_posix()) and path.is_file()}


def _git(root: Path, *args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(root), *args], input=data, capture_output=True, check=True).stdout


def commit_files(rev: str, root: Path = ROOT) -> dict[str, bytes]:
    """The digested files as committed at ``rev``."""
    paths = [p for p in _git(root, "ls-tree", "-r", "--name-only", "-z", rev).decode().split("\0") if is_source(p)]
    if not paths:
        return {}
    batch = _git(root, "cat-file", "--batch", data="".join(f"{rev}:{p}\n" for p in paths).encode())
    files, offset = {}, 0
    for path in paths:  # each object: "<sha> blob <size>\n" + contents + "\n"
        header_end = batch.index(b"\n", offset)
        size = int(batch[offset:header_end].split()[2])
        files[path] = batch[header_end + 1 : header_end + 1 + size]
        offset = header_end + 1 + size + 1
    return files


def source_info(root: Path = ROOT) -> dict:
    """``{"digest", "commit", "dirty"}``: commit and dirty are None where git cannot say (no ``.git``)."""
    info = {"digest": digest(working_tree_files(root)), "commit": None, "dirty": None}
    try:
        toplevel, commit = _git(root, "rev-parse", "--show-toplevel", "HEAD").decode().splitlines()
        if Path(toplevel).resolve() != Path(root).resolve():
            return info  # a copy inside some other repository (an installed package in a venv): not ours
        info["commit"] = commit
        info["dirty"] = info["digest"] != digest(commit_files("HEAD", root))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def find_commit(wanted: str, root: Path = ROOT, limit: int = 500) -> str | None:
    """The newest of the last ``limit`` commits whose files give the digest ``wanted`` (or one
    starting with it: reports print 16 hex digits), or None."""
    wanted = wanted.strip().lower()
    if len(wanted) < 8 or any(ch not in "0123456789abcdef" for ch in wanted):
        raise ValueError(f"a digest is at least 8 hex digits, got {wanted!r}")
    for rev in _git(root, "rev-list", f"--max-count={limit}", "HEAD").decode().split():
        if digest(commit_files(rev, root)).startswith(wanted):
            return rev
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.source_digest", description=__doc__.split("\n")[0])
    parser.add_argument("--find", metavar="DIGEST", help="print the commit whose source files give DIGEST")
    args = parser.parse_args(argv)
    if args.find is None:
        print(source_info())
        return 0
    try:
        commit = find_commit(args.find)
    except ValueError as error:
        parser.error(str(error))
    print(commit or "no commit in the last 500 gives that digest: the run measured uncommitted changes")
    return 0 if commit else 1


if __name__ == "__main__":
    sys.exit(main())
