"""``audiomae validate`` and ``audiomae bench``: is it the same model, how much faster, in how much memory.

``audiomae validate`` runs the parity table (``benches/parity.py``): every kernel and every model
backend against its float64 reference, per dtype, forward and backward, with max abs and max
relative error against the documented tolerance. It exits non-zero on any FAIL or ERROR row.

``audiomae bench`` runs the same table, then every ``benches/bench_*.py`` module's
``run(device, quick)``, and writes ``report.md``, ``results.json`` and PNG plots to ``--out``. A
module that raises is an ERROR row with its message; the report goes on. ``results.json`` is
rewritten after each module, so an interrupted run keeps what it measured.

Without a GPU both run the embedded default: small shapes on the CPU, the Triton kernels through
Triton's interpreter (``TRITON_INTERPRET=1`` is set here, before any ``kernels`` module is
imported), parity still checked, and timings that say nothing about GPU speed.

``--ops`` names parity cases and benchmark modules alike, each with its relatives
(``PARITY_OF_MODULE``: ``fbank`` selects the fbank parity rows and ``benches/bench_fbank.py``,
``tokens`` the three token cases and ``bench_tokens.py``); a case whose suite times several keeps
that suite's rows of its own (``ROWS_OF_CASE``). ``--dtypes`` and ``--batch-sizes`` select
rows (a suite left with none says what it measures instead); a benchmark module whose ``run``
accepts ``dtypes`` or ``batch_sizes`` keywords is also told, so it can skip the work. The batch
size of a row is its ``batch`` field, else the ``B=<n>`` in its shape. Unknown ops, dtypes or
non-positive batch sizes are errors, and so is a ``validate`` selection with no parity case.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent / "benches"
CPU_NOTE = ("No CUDA device: small shapes on the CPU, Triton kernels through the interpreter "
            "(TRITON_INTERPRET=1). CPU timings say nothing about GPU speed; parity is still checked. "
            "Peak memory comes from the GPU's allocator: CPU rows have none, so the memory plots stay empty "
            "(benches/bench_mae_ast.py reads the CPU's peak resident memory at its full size).")
FAILING = ("FAIL", "ERROR")
DTYPES = ("float32", "bfloat16", "float16", "float64")
# Rows name their dtype as the suite measured it ("fp32", "bf16-autocast"); --dtypes uses torch's names.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "bf16-autocast": "bfloat16",
                 "fp64": "float64"}
# The parity cases behind each benchmark module: `--ops tokens` also checks the token kernels, and
# `--ops gather_tokens` also times them.
# A suite that times several parity cases, by case: the first word of each case's row names. So
# ``--ops gather_tokens`` keeps the gather's rows of ``bench_tokens.py``, not the unshuffle's
# (``--ops tokens`` keeps them all).
ROWS_OF_CASE = {"gather_tokens": ("tokens", "gather"), "gather_tokens_2d": ("tokens", "gather_2d"),
                "unshuffle_tokens": ("tokens", "unshuffle")}
PARITY_OF_MODULE = {"tokens": ("gather_tokens", "gather_tokens_2d", "unshuffle_tokens"),
                    "window_attention": ("window_attention",), "window_tiling": ("window_attention",),
                    "post_norm": ("post_norm_residual", "post_norm_residual_copy"), "gelu_grad": ("gelu_mlp",),
                    "gelu_matmul": ("gelu_mlp_fused",), "column_sum": ("linear_column_sum",),
                    "fbank": ("fbank",), "models": ("models",), "train": ("models",)}


# ------------------------------------------------------------------------------------ runtime
def prepare_runtime():
    """The device to run on and the notes to print; sets up the interpreter when there is no GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), []
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the variable when a kernel is decorated: op modules imported before now
        # would run their references, not their kernels. References and helpers hold no kernels.
        early = sorted(name for name in sys.modules if name.startswith("kernels.")
                       and not name.startswith(("kernels.reference", "kernels._")))
        if early:
            raise RuntimeError(f"{', '.join(early)} were imported before TRITON_INTERPRET=1 could be set: "
                               "the Triton kernels would not run on the CPU; run in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu"), [CPU_NOTE]


def benchmark_modules() -> dict[str, str]:
    """``{name: module}`` for every ``benches/bench_<name>.py``."""
    return {path.stem.removeprefix("bench_"): f"benches.{path.stem}" for path in sorted(BENCHES.glob("bench_*.py"))}


class UsageError(SystemExit):
    """A command-line mistake: its message on stderr and exit code 2, as argparse's own errors;
    exit code 1 stays for a failed parity check or benchmark."""

    def __init__(self, message: str):
        print(f"audiomae: error: {message}", file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_choices(asked: list[str] | None, known: list[str], what: str) -> None:
    unknown = sorted(set(asked or ()) - set(known))
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")


def selection(ops: list[str] | None, modules: dict[str, str], cases) -> tuple[set[str], set[str]]:
    """(parity case names, benchmark module names) that ``--ops`` selects, each with its relatives."""
    if not ops:
        return set(cases), set(modules)
    chosen_cases = {op for op in ops if op in cases}
    chosen_modules = {op for op in ops if op in modules}
    for module, related in PARITY_OF_MODULE.items():
        if module in chosen_modules:
            chosen_cases |= {case for case in related if case in cases}
        # A case that is no module's name (gather_tokens...) also times the module that holds it.
        elif module in modules and any(op in related and op not in modules for op in ops):
            chosen_modules.add(module)
    return chosen_cases, chosen_modules


def canonical_dtype(name) -> str | None:
    return DTYPE_ALIASES.get(name, name) if isinstance(name, str) else None


def batch_size(row: dict) -> int | None:
    if isinstance(row.get("batch"), int):
        return row["batch"]
    found = re.search(r"\bB=?(\d+)", str(row.get("shape", "")))
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------------------- measuring
def parity_tasks(cases: set[str], dtypes: list[str] | None) -> list[tuple]:
    from benches import parity

    return [(case, dtype) for name, case in parity.CASES.items() if name in cases
            for dtype in case.dtypes if not dtypes or dtype in dtypes]


def run_parity(device, tasks, quick: bool, progress=None) -> list[dict]:
    from benches import parity

    rows = []
    for case, dtype in tasks:
        if progress is not None:
            progress.set_description(f"parity {case.op} {dtype}")
        rows += parity.run_case(case, device, dtype, quick)
        if progress is not None:
            progress.update()
    return rows


def run_benchmark(name: str, module_name: str, device, quick: bool, dtypes=None, batch_sizes=None) -> list[dict]:
    """One module's rows, filtered by dtype and batch size; an exception becomes one ERROR row."""
    try:
        run = importlib.import_module(module_name).run
        accepted = inspect.signature(run).parameters
        extra = {key: value for key, value in (("dtypes", dtypes), ("batch_sizes", batch_sizes))
                 if value and key in accepted}
        rows = run(str(device), quick, **extra)
    except Exception as error:  # noqa: BLE001 - one broken module must not end the report
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return [{"suite": name, "name": "-", "impl": "-", "status": "ERROR", "note": message}]
    kept = [{"suite": name, **row} for row in rows
            if (not dtypes or canonical_dtype(row.get("dtype")) in dtypes or row.get("status") in ("SKIP", "ERROR"))
            and (not batch_sizes or batch_size(row) in batch_sizes or batch_size(row) is None)]
    if rows and not kept:
        measured = sorted({f"{canonical_dtype(r.get('dtype'))} B={batch_size(r)}" for r in rows})
        asked = " ".join(f"--{k} {' '.join(map(str, v))}" for k, v in (("dtypes", dtypes), ("batch-sizes", batch_sizes)) if v)
        return [{"suite": name, "name": "-", "impl": "-", "status": "SKIP",
                 "note": f"no row matches {asked}; this suite measures {', '.join(measured)}"}]
    return kept


def rows_of_ops(name: str, rows: list[dict], ops: list[str] | None) -> list[dict]:
    """Suite ``name``'s rows that ``--ops`` asked for (``ROWS_OF_CASE``): all of them unless only
    some of its cases were named. ERROR and SKIP rows stay: they say what did not run."""
    if not ops or name in ops:
        return rows
    wanted = {first for case, (suite, first) in ROWS_OF_CASE.items() if suite == name and case in ops}
    if not wanted:
        return rows
    return [row for row in rows
            if str(row.get("name", "")).split(" ")[0] in wanted or row.get("status") in ("SKIP", "ERROR")]


# ---------------------------------------------------------------------------------- reporting
def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns`` are (header, key) pairs; missing values print empty."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_number(row.get(key)).replace("|", "/") for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PARITY_COLUMNS = [("op", "op"), ("impl", "impl"), ("dtype", "dtype"), ("pass", "pass"), ("worst tensor", "tensor"),
                  ("max abs", "max_abs"), ("max rel", "max_rel"), ("tolerance", "tolerance"),
                  ("on", "criterion"), ("status", "status"), ("note", "note")]
BENCH_COLUMNS = [("suite", "suite"), ("name", "name"), ("impl", "impl"), ("shape", "shape"), ("dtype", "dtype"),
                 ("median ms", "median_ms"), ("peak MiB", "peak_mib"), ("speed-up", "speedup"),
                 ("vs", "baseline"), ("floor ms", "floor"), ("floor/median", "floor_fraction"), ("note", "note")]


def speedup(row: dict) -> tuple[float | None, str]:
    """The row's speed-up against its suite's baseline (its ``speedup_vs_<baseline>`` field)."""
    for key, value in row.items():
        if key.startswith("speedup_vs_") and isinstance(value, (int, float)):
            return float(value), key.removeprefix("speedup_vs_")
    return None, ""


def table_rows(rows: list[dict]) -> list[dict]:
    """Bench rows with the derived columns the table and plots show."""
    out = []
    for row in rows:
        ratio, baseline = speedup(row)
        floor = row.get("floor_ms", row.get("flop_floor_ms"))
        median = row.get("median_ms")
        peak = row.get("peak_mem_bytes")
        out.append({**row, "speedup": ratio, "baseline": baseline, "floor": floor,
                    "floor_fraction": floor / median if floor and median else None,
                    "peak_mib": peak / 2**20 if isinstance(peak, (int, float)) else None,
                    "note": row.get("note") or row.get("status")
                    or (f"unavailable: {row['unavailable']}" if row.get("unavailable") else "")})
    return out


PLOT_NAMES = ("speedup.png", "memory.png", "batch_scaling.png")


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    """speedup.png and memory.png (one panel per suite), batch_scaling.png when a suite has several
    batch sizes. A suite without speed-ups shows its median times instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in PLOT_NAMES:  # an earlier run's plots must not sit beside this run's report
        (out / name).unlink(missing_ok=True)
    timed = [r for r in table_rows(rows) if isinstance(r.get("median_ms"), (int, float))]
    suites = sorted({r["suite"] for r in timed})
    written = []

    def panels(filename, pick, xlabel, log):
        chosen = {s: [r for r in timed if r["suite"] == s and pick(r) is not None] for s in suites}
        chosen = {s: rs for s, rs in chosen.items() if rs}
        if not chosen:
            return
        heights = [max(1.5, 0.28 * len(rs) + 1) for rs in chosen.values()]
        fig, axes = plt.subplots(len(chosen), 1, figsize=(10, sum(heights)), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, (suite, rs) in zip(axes[:, 0], chosen.items()):
            labels = [f"{r.get('name', '')} [{r.get('impl', '')}] {r.get('shape', '')}"[:80] for r in rs]
            ax.barh(range(len(rs)), [pick(r) for r in rs], color="tab:blue")
            ax.set_yticks(range(len(rs)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(suite, fontsize=9)
            ax.set_xlabel(xlabel(rs), fontsize=8)
            if log(rs):  # speed-ups span orders of magnitude; 1x is the baseline
                ax.set_xscale("log")
                ax.axvline(1.0, color="black", linewidth=0.8)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(out / filename)

    has_speedup = {s for s in suites if any(r["speedup"] is not None for r in timed if r["suite"] == s)}
    panels("speedup.png", lambda r: r["speedup"] if r["suite"] in has_speedup else r["median_ms"],
           lambda rs: f"speed-up vs {rs[0]['baseline']} (x)" if rs[0]["suite"] in has_speedup else "median ms",
           log=lambda rs: rs[0]["suite"] in has_speedup)
    panels("memory.png", lambda r: r["peak_mib"], lambda rs: "peak memory (MiB)", log=lambda rs: False)

    scaling = {}
    for r in timed:
        if batch_size(r) is not None:
            scaling.setdefault(r["suite"], {}).setdefault(f"{r.get('name', '')} [{r.get('impl', '')}]", []).append(
                (batch_size(r), r["median_ms"], r["peak_mib"]))
    scaling = {s: lines for s, lines in scaling.items() if len({b for pts in lines.values() for b, _, _ in pts}) > 1}
    if scaling:
        fig, axes = plt.subplots(len(scaling), 2, figsize=(12, 4 * len(scaling)), squeeze=False)
        for (suite, lines), (ax_time, ax_mem) in zip(scaling.items(), axes):
            for label, points in lines.items():
                points.sort()
                ax_time.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
                if all(p[2] is not None for p in points):
                    ax_mem.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
            ax_time.set(title=f"{suite}: time", xlabel="batch size", ylabel="median ms")
            ax_mem.set(title=f"{suite}: peak memory", xlabel="batch size", ylabel="MiB")
            if not ax_mem.lines:
                ax_mem.text(0.5, 0.5, "not measured on this device", ha="center", va="center",
                            transform=ax_mem.transAxes)
            ax_time.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "batch_scaling.png", dpi=100)
        plt.close(fig)
        written.append(out / "batch_scaling.png")
    return written


def run_info(device, notes: list[str], quick: bool) -> dict:
    from benches.harness import device_info
    from benches.source_digest import source_info

    info = device_info(device)
    versions = {key: info[key] for key in ("torch", "triton", "cuda", "python", "torchaudio") if key in info}
    # Which code ran: the GPU machine's copy has no .git, so a digest of the sources stands in for
    # the commit (python -m benches.source_digest --find DIGEST names it back here).
    return {"device": info, "date": info["date"], "versions": versions, "source": source_info(), "quick": quick,
            "notes": notes}


def source_phrase(info) -> str:
    """``; source <digest>`` (and the commit, marked when the tree had uncommitted changes) for a
    run that recorded ``run_info``'s source; empty for older results files."""
    source = info.get("source") if isinstance(info, dict) else None
    if not source or not source.get("digest"):
        return ""
    commit = source.get("commit")
    if commit is None:
        where = " (no git there: `python -m benches.source_digest --find` names the commit)"
    else:
        where = f" (commit {commit[:12]}{' with uncommitted changes' if source.get('dirty') else ''})"
    return f"; source {source['digest'][:16]}{where}"


def _finite_or_null(value):
    """JSON has no NaN or Infinity (a failing row's error can be either): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def to_json(data) -> str:
    """Strict JSON (non-finite numbers as null; other objects as their str)."""
    return json.dumps(_finite_or_null(data), indent=1, default=str, allow_nan=False)


def writable_file(path) -> Path:
    """``path`` checked before a long run writes it: its folder exists and takes files, and it is
    not a folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--json {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"--json {path}: the folder {path.parent} does not exist")
    check_writable_folder(path.parent, "--json")
    return path


def check_writable_folder(folder: Path, flag: str) -> None:
    from .train import unwritable

    problem = unwritable(folder)
    if problem:
        raise UsageError(f"{flag} {folder}: cannot write there ({problem})")


def write_results(path: Path, info: dict, parity_rows: list[dict], bench_rows: list[dict], **extra) -> Path:
    """The run as JSON: device, date, versions, the shapes per suite and every row."""
    shapes = {}
    for row in bench_rows:
        if row.get("shape"):
            shapes.setdefault(row["suite"], [])
            if row["shape"] not in shapes[row["suite"]]:
                shapes[row["suite"]].append(row["shape"])
    path.write_text(to_json({**info, **extra, "shapes": shapes, "parity": parity_rows, "benchmarks": bench_rows}))
    return path


def report_markdown(info: dict, parity_rows: list[dict], bench_rows: list[dict], plots: list[Path]) -> str:
    device = info["device"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    parts = [f"# AudioMAE kernels: parity and benchmarks\n\n{device['device']}, {info['date']}; {versions}"
             f"{source_phrase(info)}.\n"]
    parts += [f"> {note}\n" for note in info["notes"]]
    parts.append("## Parity against the float64 references\n\n" + markdown_table(parity_rows, PARITY_COLUMNS) + "\n")
    if bench_rows:
        parts.append("## Benchmarks\n\n" + markdown_table(table_rows(bench_rows), BENCH_COLUMNS) + "\n")
    parts += [f"![{p.stem}]({p.name})\n" for p in plots]
    return "\n".join(parts)


def summary(parity_rows: list[dict], bench_rows: list[dict]) -> str:
    counts = {status: sum(r.get("status") == status for r in parity_rows) for status in ("PASS", "FAIL", "SKIP", "ERROR")}
    errors = sum(r.get("status") == "ERROR" for r in bench_rows)
    text = "parity: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return text + (f"; benchmarks: {errors} ERROR" if errors else "")


# ---------------------------------------------------------------------------------- commands
def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)


def validate(args) -> int:
    device, notes = prepare_runtime()
    for note in notes:
        print(note)
    from benches import parity

    modules = benchmark_modules()
    check_choices(args.ops, sorted(set(parity.CASES) | set(modules)), "op")
    json_path = writable_file(args.json) if args.json else None
    cases, _ = selection(args.ops, modules, parity.CASES)
    tasks = parity_tasks(cases, args.dtypes)
    if not tasks:
        raise UsageError(f"no parity case matches --ops {' '.join(args.ops or ['(all)'])} "
                         f"--dtypes {' '.join(args.dtypes or ['(all)'])}: nothing to validate")
    with _progress(len(tasks)) as progress:
        rows = run_parity(device, tasks, args.quick, progress)
    print(markdown_table(rows, PARITY_COLUMNS))
    print(summary(rows, []))
    if json_path:
        json_path.write_text(to_json({**run_info(device, notes, args.quick), "parity": rows}))
    return 1 if any(r["status"] in FAILING for r in rows) else 0


def bench(args) -> int:
    device, notes = prepare_runtime()
    for note in notes:
        print(note)
    from benches import parity

    modules = benchmark_modules()
    check_choices(args.ops, sorted(set(parity.CASES) | set(modules)), "op")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for report.md, results.json and the plots")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot make the folder ({exc.strerror or exc})")
    check_writable_folder(out, "--out")
    for name in ("report.md", "results.json", *PLOT_NAMES):  # found at the end of a long run otherwise
        if (out / name).is_dir():
            raise UsageError(f"--out {out}: {out / name} is a folder, where the report writes a file of that name")
    cases, module_names = selection(args.ops, modules, parity.CASES)
    tasks = parity_tasks(cases, args.dtypes)
    chosen = {name: module for name, module in modules.items() if name in module_names}
    # The embedded CPU default times the small shapes: the larger CPU sizes take many minutes on two
    # cores and say no more about GPU speed (--full asks for them).
    bench_quick = args.quick or (device.type != "cuda" and not args.full)
    info = {**run_info(device, notes, bench_quick), "parity_quick": bool(args.quick)}
    started = time.perf_counter()
    bench_rows = []
    with _progress(len(tasks) + len(chosen)) as progress:
        parity_rows = run_parity(device, tasks, args.quick, progress)
        write_results(out / "results.json", info, parity_rows, bench_rows)
        for name, module in chosen.items():
            progress.set_description(f"bench {name}")
            bench_rows += rows_of_ops(name, run_benchmark(name, module, device, bench_quick, args.dtypes,
                                                          args.batch_sizes), args.ops)
            write_results(out / "results.json", info, parity_rows, bench_rows)
            progress.update()
    info["elapsed_s"] = time.perf_counter() - started
    write_results(out / "results.json", info, parity_rows, bench_rows)
    plots = write_plots(out, bench_rows)
    (out / "report.md").write_text(report_markdown(info, parity_rows, bench_rows, plots))
    print(markdown_table(parity_rows, PARITY_COLUMNS))
    print()
    print(markdown_table(table_rows(bench_rows), BENCH_COLUMNS))
    print()
    print(f"{summary(parity_rows, bench_rows)}; wrote {out / 'report.md'}, {out / 'results.json'} and "
          f"{len(plots)} plot(s) in {info['elapsed_s']:.0f} s")
    failed = any(r["status"] in FAILING for r in parity_rows) or any(r.get("status") == "ERROR" for r in bench_rows)
    return 1 if failed else 0


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a batch size must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a batch size must be a positive integer, got {value}")
    return value


def _selection_options(parser) -> None:
    parser.add_argument("--ops", nargs="+", metavar="OP", help="parity cases and benchmark modules to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", choices=DTYPES,
                        help="float32, bfloat16, float16, float64 (default: all)")
    parser.add_argument("--quick", action="store_true", help="the smallest shapes and fewest repetitions")


def register(subparsers) -> None:
    parser = subparsers.add_parser("validate", help="every kernel and backend against its float64 reference")
    _selection_options(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the device as JSON")
    parser.set_defaults(func=validate)

    parser = subparsers.add_parser("bench", help="parity, then speed and memory of everything: report.md, results.json, plots")
    _selection_options(parser)
    parser.add_argument("--batch-sizes", nargs="+", type=_positive_int, metavar="B", help="keep rows of these batch sizes")
    parser.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    parser.add_argument("--full", action="store_true",
                        help="without a GPU, time the benchmarks' larger CPU sizes too (many minutes)")
    parser.set_defaults(func=bench)
