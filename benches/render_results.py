"""Render the committed ``benches/results/*.json`` as markdown for the README.

Each file is one measured run: ``{"device": benches.harness.device_info(...), ...}`` with its rows
under ``benchmarks`` (``audiomae bench``, ``benches/gpu_check.py``) or ``rows`` (a bench module's
own ``--out``), and optionally a ``parity`` table. First, per GPU, the issues' targets judged on
every row measured on that GPU (``benches.targets``); then one section per file: device, date and
versions, the benchmark table (``audiomae.report``'s columns) and the parity verdicts. Files sort
oldest first by date, then part (``-part2`` after the run's first file); a target takes its newest row
in that order, and never one of a ``"quick": true`` file.

``python benches/render_results.py [FILES...] [--out PATH]`` (default: every file, to stdout).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audiomae import report  # noqa: E402
from benches import targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def rows_and_device(data) -> tuple[list[dict], dict]:
    """A results file's (rows, device info): rows under ``benchmarks`` or ``rows``."""
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


def _run_order(path: Path, device: dict) -> tuple[str, int]:
    """Oldest first: by date, then a run's parts in order (``-part2`` after the run's first file)."""
    part = re.search(r"-part(\d+)$", path.stem)
    return str(device.get("date", "")), int(part.group(1)) if part else 1


def gpu_runs(paths: list[Path], cpu: bool = False) -> dict[str, list[dict]]:
    """Per GPU, the rows of every run measured on it, oldest run first, each stamped with its
    results file and whether the run was quick (``benches.targets.stamp_run``: the targets take a
    target's newest row, and no quick run's). ``cpu``: the CPU runs instead, all under "CPU"."""
    runs = []
    for path in paths:
        data = json.loads(path.read_text())
        rows, device = rows_and_device(data)
        # counts (on fake or real tensors) are no measurement of any device; older CPU files
        # recorded only the device's name
        name = str(device.get("device", "")).lower()
        measured_here = (not is_gpu(device) and device.get("device_type", "cpu" if "cpu" in name else None) == "cpu"
                         and "fake" not in name and "counted" not in name)
        if (measured_here if cpu else is_gpu(device)):
            quick = isinstance(data, dict) and bool(data.get("quick"))
            name = "CPU" if cpu else device["device"]
            runs.append((_run_order(path, device), name, targets.stamp_run(rows, path.stem, quick)))
    by_device: dict[str, list[dict]] = {}
    for _, name, rows in sorted(runs, key=lambda run: run[0]):
        by_device.setdefault(name, []).extend(rows)
    return by_device


def render_targets(paths: list[Path]) -> str:
    """One verdict table per GPU, over the rows of every file measured on it."""
    sections = []
    for name, rows in gpu_runs(paths).items():
        sections += [f"### Targets on the {name}", "",
                     "Each issue's GPU target (stated for an H100) against the rows measured on this GPU; "
                     "`benches/targets.py` reads them.", "",
                     report.markdown_table(targets.target_rows(rows), targets.COLUMNS), ""]
    cpu_lines = targets.cpu_target_rows(gpu_runs(paths, cpu=True).get("CPU", []))
    if cpu_lines:
        sections += ["### Targets on the CPU", "", "The targets the issues set on the CPU, from the newest full CPU "
                     "run that measured them (this machine's two shared cores: timings drift by tens of percent "
                     "between runs).", "", report.markdown_table(cpu_lines, targets.COLUMNS), ""]
    return "\n".join(sections)


def _floor_units_note(rows: list[dict]) -> list[str]:
    """A note where window-attention rows do not record the floor units they were divided by: rows
    measured before ``floor_units`` was stored may have the older 12-unit fwd+bwd floor."""
    if not any(str(r.get("suite", "")).startswith("window_attention") and r.get("floor_ms") and "floor_units" not in r
               for r in rows):
        return []
    return ["> Window-attention rows here do not record their `floor_units`: their floor may be the older "
            "12-unit fwd+bwd one, not `benches/bench_window_attention.py`'s current `FLOOR_UNITS`.", ""]


def render_file(path: Path) -> str:
    data = json.loads(path.read_text())
    rows, device = rows_and_device(data)
    versions = ", ".join(f"{key} {device[key]}" for key in ("torch", "triton", "cuda", "torchaudio", "python")
                         if device.get(key))
    lines = [f"### {path.stem}", "", f"{device.get('device', 'unknown device')}, {device.get('date', 'undated')}; "
             f"{versions or 'versions not recorded'}{report.source_phrase(data)}.", ""]
    for note in (data.get("notes") or [data.get("note")]) if isinstance(data, dict) else []:
        if note:
            lines += [f"> {note}", ""]
    if rows:
        lines += _floor_units_note(rows)
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
