"""Render the committed ``benches/results/*.json`` as markdown for the README.

Each file is one measured run: ``{"device": benches.harness.device_info(...), ...}`` with its rows
under ``benchmarks`` (``audiomae bench``, ``benches/gpu_check.py``) or ``rows`` (a bench module's
own ``--out``), and optionally a ``parity`` table. First, per GPU, the issues' targets judged on
every row measured on that GPU (``benches.targets``); then one section per file: device, date and
versions, the benchmark table (``audiomae.report``'s columns) and the parity verdicts.

``python benches/render_results.py [FILES...] [--out PATH]`` (default: every file, to stdout).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audiomae import report  # noqa: E402
from benches import targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _load(path: Path) -> tuple[list[dict], dict]:
    """(benchmark rows, device info) of one results file."""
    return _rows_and_device(json.loads(path.read_text()))


def _rows_and_device(data) -> tuple[list[dict], dict]:
    rows = data if isinstance(data, list) else data.get("benchmarks") or data.get("rows") or []
    device = data.get("device", {}) if isinstance(data, dict) else {}
    if not device and rows:
        device = rows[0]  # bench rows carry device_info's fields
    return rows, device


CPU_ARCHITECTURES = ("x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "ppc64le", "s390x")


def is_gpu(device: dict) -> bool:
    """Whether a results file's device is a GPU: its recorded type, else (older files) a name that is
    neither a CPU's nor an architecture's (``platform.processor()`` may give "x86_64")."""
    if device.get("device_type"):
        return device["device_type"] == "cuda"
    name = str(device.get("device", ""))
    return bool(name) and "cpu" not in name.lower() and name.lower() not in CPU_ARCHITECTURES


def render_targets(paths: list[Path]) -> str:
    """One verdict table per GPU, over the rows of every file measured on it."""
    by_device: dict[str, list[dict]] = {}
    # Oldest run first: where two runs measured the same row, the targets take the newer one.
    for rows, device in sorted((_load(path) for path in paths), key=lambda loaded: loaded[1].get("date", "")):
        if is_gpu(device):  # CPU runs and counts on fake tensors are no GPU figures
            by_device.setdefault(device["device"], []).extend(rows)
    sections = []
    for name, rows in by_device.items():
        sections += [f"### Targets on the {name}", "",
                     "Each issue's GPU target (stated for an H100) against the rows measured on this GPU; "
                     "`benches/targets.py` reads them.", "",
                     report.markdown_table(targets.target_rows(rows), targets.COLUMNS), ""]
    return "\n".join(sections)


def render_file(path: Path) -> str:
    data = json.loads(path.read_text())
    rows, device = _rows_and_device(data)
    versions = ", ".join(f"{key} {device[key]}" for key in ("torch", "triton", "cuda", "torchaudio", "python")
                         if device.get(key))
    lines = [f"### {path.stem}", "", f"{device.get('device', 'unknown device')}, {device.get('date', 'undated')}; "
             f"{versions or 'versions not recorded'}.", ""]
    for note in (data.get("notes") or [data.get("note")]) if isinstance(data, dict) else []:
        if note:
            lines += [f"> {note}", ""]
    if rows:
        lines += [report.markdown_table(report.table_rows(rows), report.BENCH_COLUMNS), ""]
    parity = data.get("parity") if isinstance(data, dict) else None
    if parity:
        lines += [f"Parity: {report.summary(parity, [])}.", ""]
        failing = [row for row in parity if row.get("status") in report.FAILING]
        if failing:
            lines += [report.markdown_table(failing, report.PARITY_COLUMNS), ""]
    return "\n".join(lines)


def render(paths: list[Path]) -> str:
    return "\n".join([render_targets(paths)] + [render_file(path) for path in paths]).lstrip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, help="write the markdown here instead of printing it")
    args = parser.parse_args()
    paths = args.files or sorted(RESULTS.glob("*.json"))
    if not paths:
        raise SystemExit(f"no results to render under {RESULTS}")
    text = render(paths)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
