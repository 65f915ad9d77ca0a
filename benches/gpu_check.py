"""``make gpu-check``: on the GPU machine, build, test, validate and time everything in one call.

Run from the checkout as ``PYTHONPATH=. python3 benches/gpu_check.py`` (no package registry there:
nothing is installed, the CUDA extension is built in place). Each part runs in its own process
under its own timeout, inside one overall budget (``--budget``, 450 s by default, so the whole
check ends inside 8 minutes), most valuable first:

1. ``build``: ``AUDIOMAE_BUILD_CUDA=1 python3 setup.py build_ext --inplace`` (ninja); if that
   fails, ``build-jit``: the just-in-time loader of ``kernels/_cuda_extension.py``, so the rest
   can still use the kernel (both outcomes are rows);
2. ``tests``: ``pytest -m gpu -q`` (every GPU-marked test);
3. ``bench-window_attention``, ``bench-tokens``, ``bench-fbank``: the kernels' targets, and
   ``bench-column_sum`` (the Linears' bias gradients: short, and its kernel changed last);
4. ``models-pretrain``: the training step's target, batch 64, eager and CUDA-graph variants
   (its rows are saved as they land);
5. ``profile``: where the ``triton`` pretraining step spends its time (``torch.profiler``);
6. ``parity``: ``audiomae validate`` at the GPU shapes; then ``ncu``: Nsight Compute's counters of
   the fbank kernel and the window-attention backward (``benches/ncu_kernels.py``; a diagnostic
   that never fails the run), appended to ``profile.txt``;
7. ``bench-mae_ast`` (issue 7's ratios), ``bench-window_tiling`` (the sweep that should set the
   window-attention default), ``bench-gelu_grad`` (the MLP backward's fused GELU pass),
   ``bench-gelu_matmul`` (the MLP with GELU in its own matmuls' epilogues, against cuBLAS)
   and ``bench-launch_overhead`` (the host's
   time per launch, which bounds every eager row), ``models-pretrain-compiled`` (the compiled
   variants, with their own reference row), every other ``benches/bench_*.py`` at its target
   shapes (memory estimate, post-norm kernel, training CLI), then ``models-finetune``,
   ``models-embed`` and ``models-finetune-compiled``, and ``profile-compiled`` (the compiled
   step's profile, appended to ``profile.txt``).

The first H200 run (2026-11-26) took about 800 s for every part: one call of the default budget
gets through item 7's first parts, and a second call on the still-warm machine takes the rest. On
the H100 (2026-11-27) the parts took: build 38 s, tests 91, bench-window_attention 97 to 105,
bench-tokens 10, bench-fbank 26, models-pretrain 41, profile 20, bench-window_tiling 16 to 18,
models-pretrain-compiled 191, bench-post_norm 24 (parity took 43 s and bench-mae_ast 39 on the
H200; the H100's MAE-AST run crashed after 23 s, since fixed). On the H200 (2026-11-27): build 43,
tests 142, bench-window_attention 77, bench-tokens 14, bench-fbank 28, models-pretrain 45,
bench-mae_ast 76, parity 52, bench-window_tiling 18, bench-gelu_grad 25, bench-gelu_matmul 9,
models-pretrain-compiled 220.
Not everything may fit one 450 s budget on a cold machine: a later call can name the parts left,
``python3 benches/gpu_check.py --parts NAME ...`` (the build stays in the checkout while the
machine is held).

A part starts only when the budget left covers most of its usual time (``EXPECTED_S``, from the
H100 run); otherwise it is a SKIP row, not a silent gap, and shorter parts further down may still
run. Each part runs in its own process group (a timeout kills its compilers too); a benchmark part
whose rows hold an ERROR fails, as a crashed one does; a part whose output cannot be read is an
ERROR row, and the run goes on. ``gpu_check.json`` and ``report.md`` are rewritten after every part,
so a call cut short keeps what it measured; intermediate files stay outside ``$OUT``. Unknown
``--parts`` names are refused with the list. The wheels in ``.whl/site`` (soundfile), when there,
join every part's ``PYTHONPATH``. The
end of the output is one table per kind (parity, benchmarks, the issues' targets judged on these
rows by ``benches/targets.py``, parts), the parts last. Everything
goes to ``$OUT`` when set (else ``bench-out/gpu-check``), flat, at most 8 files: ``gpu_check.json``
(device, date, versions, the digest of the sources that ran (``benches/source_digest.py``), shapes,
parts, test counts, parity and benchmark rows), ``report.md``, ``log.txt`` (every part's output),
``profile.txt`` and the PNG plots. The exit status is non-zero
when a part failed, crashed or timed out (a failing test, a parity FAIL/ERROR, a broken build),
after everything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audiomae import report  # noqa: E402
from benches import targets  # noqa: E402

RESERVE_S = 15  # kept back for writing the report
MIN_PART_S = 20  # a part given less than this would only time out
# The model steps in two parts each: the eager and graphed variants (quick), then the compiled
# ones (each compiles for a minute or so), each with its own reference row for the ratios.
QUICK_VARIANTS = ("reference", "triton", "triton+graph", "sdpa", "reference+graph", "xformers", "triton+fusedmlp+graph",
                  "triton+percast", "triton+percast+graph")
COMPILED_VARIANTS = ("reference", "triton+compile+graph", "triton+compile", "reference+compile",
                     "triton+fusedmlp+compile+graph")
MODEL_TIMEOUTS = {"pretrain": 220, "pretrain-compiled": 260, "finetune": 150, "finetune-compiled": 260, "embed": 70}
# issues 4, 3 and 5, and (13 s on the H200) the Linears' bias gradients, whose kernel changed last
FIRST_BENCHES = ("window_attention", "tokens", "fbank", "column_sum")
# issue 7's ratios, the tiling that sets issue 4's default, the MLP backward's GELU pass (and its
# loop candidates), the MLP with GELU in its matmuls (issue 6: fused_matmul stays off until this
# row says it pays) and (short, new on 2026-11-27) the host's time per launch
SECOND_BENCHES = ("mae_ast", "window_tiling", "gelu_grad", "gelu_matmul", "launch_overhead")
BENCH_TIMEOUTS = {"window_attention": 180, "tokens": 90, "window_tiling": 90, "post_norm": 90, "mae_ast": 180}
# About how long each part took on the H100 and the H200 (2026-11-27), with some margin: a part is
# started only when the budget left covers most of it (a part cut by its timeout loses all its
# rows), and a shorter part further down the list may still fit. bench-mae_ast took 76 s on the
# H200 before its graphed reference-attention group (a guess: 20 s more); ncu's is a guess (three
# programs that import torch, and Nsight Compute's replays of one launch each). models-pretrain
# took 41 to 45 s; its two triton+percast variants (2026-11-28) should add about 20.
EXPECTED_S = {"build": 45, "tests": 150, "bench-window_attention": 110, "bench-tokens": 30, "bench-fbank": 35,
              "ncu": 95, "models-pretrain": 80, "profile": 25, "parity": 55, "bench-mae_ast": 100, "bench-window_tiling": 25,
              "bench-gelu_grad": 35, "bench-gelu_matmul": 20, "models-pretrain-compiled": 230, "bench-post_norm": 30,
              "models-finetune": 60, "models-embed": 30, "models-finetune-compiled": 200, "profile-compiled": 150,
              "bench-column_sum": 25, "bench-launch_overhead": 15}


def plan(work: Path) -> list[dict]:
    """The parts in priority order: name, argv, timeout, and where the part leaves its rows."""
    py = sys.executable
    parts = [
        {"name": "build", "argv": [py, "setup.py", "build_ext", "--inplace"], "timeout": 240,
         "env": {"AUDIOMAE_BUILD_CUDA": "1"}},
        {"name": "tests", "argv": [py, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
                                   f"--junitxml={work / 'junit.xml'}"], "timeout": 240},
    ]

    def models(step, variants=None, suffix=""):
        rows = work / f"models_{step}{suffix}.json"
        argv = [py, "-m", "benches.bench_models", "--steps", step, "--out", str(rows)]
        argv += ["--variants", *variants] if variants else []
        return {"name": f"models-{step}{suffix}", "argv": argv, "timeout": MODEL_TIMEOUTS[step + suffix], "rows": rows}

    def bench(name):
        rows = work / f"bench_{name}.json"
        return {"name": f"bench-{name}", "argv": [py, __file__, "--bench", name, "--json", str(rows)],
                "timeout": BENCH_TIMEOUTS.get(name, 120), "rows": rows}

    # The kernels' own targets first (each part is short), then the training step, then the rest.
    parts += [bench(name) for name in FIRST_BENCHES]
    parts.append(models("pretrain", QUICK_VARIANTS))
    # Issue 6 asks where the step's time goes: right after the step is timed, before the long tail.
    parts.append({"name": "profile", "argv": [py, "-m", "benches.bench_models", "--profile", "pretrain",
                                              "--variants", "triton"], "timeout": 60, "profile": True})
    parts.append({"name": "parity", "argv": [py, "-m", "audiomae", "validate", "--json", str(work / "parity.json")],
                  "timeout": 120, "parity": work / "parity.json"})
    # Why the two kernels furthest from their targets are slow (their timings cannot say); a
    # diagnostic: it exits 0 whatever ncu does, and says what it could not read.
    parts.append({"name": "ncu", "argv": [py, "-m", "benches.ncu_kernels"], "timeout": 200, "profile": True})
    parts += [bench(name) for name in SECOND_BENCHES]
    parts.append(models("pretrain", COMPILED_VARIANTS, "-compiled"))
    parts += [bench(name) for name in report.benchmark_modules()
              if name not in ("models", *FIRST_BENCHES, *SECOND_BENCHES)]
    parts += [models("finetune", QUICK_VARIANTS), models("embed"), models("finetune", COMPILED_VARIANTS, "-compiled")]
    # What the compiler leaves of the step's GPU time (elementwise work it fused, kernels it kept):
    # last, since compiling takes a minute; its tables join profile.txt.
    parts.append({"name": "profile-compiled", "argv": [py, "-m", "benches.bench_models", "--profile", "pretrain",
                                                       "--variants", "triton+compile"], "timeout": 150, "profile": True})
    return parts


def child_pythonpath() -> str:
    """The checkout, the wheels carried in ``.whl/site`` (soundfile and the like, which the GPU
    machine lacks; ``make gpu-check`` installs them there), then the caller's path."""
    wheels = ROOT / ".whl" / "site"
    return os.pathsep.join(filter(None, [str(ROOT), str(wheels) if wheels.is_dir() else None,
                                         os.environ.get("PYTHONPATH")]))


_RUNNING: list = []  # the part in flight, for the signal handler


def _kill_group(child) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL when the driver dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop_parts_on_signal() -> None:
    """A driver stopped from outside (the device tool's timeout sends SIGTERM) takes its part's
    whole process group with it: a part left running would hold the GPU into the next call."""
    def handler(signum, frame):
        for child in list(_RUNNING):
            _kill_group(child)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


def run_part(part: dict, timeout: float, log) -> dict:
    """Run one part in its own process group (a timeout kills its compilers and workers too); its
    output goes to the log (and is kept for the profile)."""
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), "PYTHONUNBUFFERED": "1", **part.get("env", {})}
    started = time.monotonic()
    log.write(f"\n===== {part['name']}: {' '.join(part['argv'])} (timeout {timeout:.0f} s)\n")
    log.flush()
    child = subprocess.Popen(part["argv"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             encoding="utf-8", errors="replace", start_new_session=True,
                             preexec_fn=_die_with_parent)
    _RUNNING.append(child)
    try:
        output, _ = child.communicate(timeout=timeout)
        status, code = "OK" if child.returncode == 0 else "FAIL", child.returncode
    except subprocess.TimeoutExpired:
        _kill_group(child)
        try:
            output, _ = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild in a session of its own still holds the pipe
            output = ""
        status, code = "TIMEOUT", None
    finally:
        _RUNNING.remove(child)
    log.write(output)
    log.flush()
    tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
    return {"part": part["name"], "status": status, "returncode": code,
            "seconds": round(time.monotonic() - started, 1), "summary": tail[0][:160], "output": output}


def test_counts(junit: Path) -> dict:
    if not junit.exists():
        return {}
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    parser.add_argument("--parts", nargs="+", help="run only these parts (names as in the parts table)")
    parser.add_argument("--bench", help=argparse.SUPPRESS)  # internal: one bench module in this process
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bench:
        device, _ = report.prepare_runtime()
        rows = report.run_benchmark(args.bench, report.benchmark_modules()[args.bench], device, quick=False)
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        return 0

    started = time.monotonic()
    out = Path(os.environ.get("OUT") or ROOT / "bench-out" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    # Intermediate rows live outside $OUT: a call cut short must leave $OUT to what comes back (the
    # merged JSON and report, rewritten after every part), not to a folder of pieces.
    names = [part["name"] for part in plan(Path("parts"))]  # build-jit runs only when build fails
    unknown = sorted(set(args.parts or []) - set(names))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are: {', '.join(names)}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    _stop_parts_on_signal()
    try:
        return _run_parts(args, out, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_parts(args, out: Path, work: Path, started: float) -> int:
    device, notes = report.prepare_runtime()
    info = report.run_info(device, notes, quick=False)
    print(f"{info['device']['device']}; {info['versions']}", flush=True)
    state = {"parts": [], "parity": [], "bench": [], "profile": ""}

    def left() -> float:
        return args.budget - (time.monotonic() - started) - RESERVE_S

    def run(part: dict, log) -> dict | None:
        """Run ``part`` if the budget covers it; its row, or None after a SKIP row."""
        needed = max(MIN_PART_S, 0.8 * EXPECTED_S.get(part["name"], MIN_PART_S))
        if left() < needed:
            state["parts"].append({"part": part["name"], "status": "SKIP", "seconds": 0,
                                   "summary": f"needs about {needed:.0f} s, {max(left(), 0):.0f} s of the "
                                              f"{args.budget:.0f} s budget left"})
            return None
        result = run_part(part, min(part["timeout"], left()), log)
        print(f"{result['part']}: {result['status']} in {result['seconds']} s", flush=True)
        state["parts"].append(result)
        return result

    try:
        with open(out / "log.txt", "w") as log:
            for part in plan(work):
                if args.parts and part["name"] not in args.parts:
                    continue
                result = run(part, log)
                if result is None:  # a SKIP row
                    write_outputs(out, info, state, started, plots=False)
                    continue
                output = result.pop("output")
                try:
                    collect(part, result, output, work, state, run, log)
                except Exception as error:  # noqa: BLE001 - one part's broken output must not end the run
                    result["status"] = "ERROR"
                    result["summary"] = f"reading its results: {type(error).__name__}: {error}"[:160]
                if state["profile"]:
                    (out / "profile.txt").write_text(state["profile"])
                write_outputs(out, info, state, started, plots=False)
    except SystemExit:  # stopped by a signal (see _stop_parts_on_signal): keep what was measured
        state["parts"].append({"part": "(driver)", "status": "KILLED", "seconds": 0,
                               "summary": "stopped from outside while a part ran"})
        write_outputs(out, info, state, started, plots=False)
        raise

    markdown, targets_table, parts_table = write_outputs(out, info, state, started, plots=True)
    parity_rows, bench_rows, parts = state["parity"], state["bench"], state["parts"]
    print(report.markdown_table(parity_rows, report.PARITY_COLUMNS))
    print()
    print(report.markdown_table(report.table_rows(bench_rows), report.BENCH_COLUMNS))
    print()
    if state["profile"]:
        print("\n".join(state["profile"].splitlines()[:16]))
    print(targets_table)
    print()
    print(parts_table)
    failed = [p["part"] for p in parts if p["status"] in ("FAIL", "TIMEOUT", "ERROR")]
    failed += ["parity"] if any(r.get("status") in report.FAILING for r in parity_rows) else []
    print(f"{report.summary(parity_rows, bench_rows)}; {info['elapsed_s']:.0f} s; wrote {out}"
          + (f"; FAILED: {', '.join(dict.fromkeys(failed))}" if failed else ""))
    return 1 if failed else 0


def collect(part: dict, result: dict, output: str, work: Path, state: dict, run, log) -> None:
    """Fold a finished part's rows into ``state``; a benchmark's ERROR rows fail its part."""
    if part["name"] == "build" and result["status"] != "OK":
        jit = {"name": "build-jit", "argv": [sys.executable, "-c",
               "from kernels._cuda_extension import extension_names, load_extension\n"
               "for name in extension_names(): load_extension(name)"], "timeout": 240}
        jit_result = run(jit, log)
        if jit_result is not None:
            jit_result.pop("output")
    if part["name"] == "tests":
        result.update(test_counts(work / "junit.xml"))
        if result["status"] == "FAIL" and result["returncode"] == 5:  # no test selected
            result["status"] = "OK"
    if part.get("parity") and part["parity"].exists():
        state["parity"] = json.loads(part["parity"].read_text())["parity"]
    if part.get("rows") and part["rows"].exists():
        rows = json.loads(part["rows"].read_text())
        state["bench"] += rows
        errors = [r for r in rows if r.get("status") == "ERROR"]
        if errors and result["status"] == "OK":
            result["status"] = "ERROR"
            result["summary"] = f"{len(errors)} ERROR row(s): {errors[0].get('note') or errors[0].get('error', '')}"[:160]
    if part.get("profile"):
        state["profile"] += (f"\n===== {part['name']}\n" if state["profile"] else "") + output


def write_outputs(out: Path, info: dict, state: dict, started: float, plots: bool):
    """gpu_check.json and report.md as they stand (after every part, and once more at the end with
    the plots): a call cut short still leaves what it measured."""
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    parity_rows, bench_rows, parts = state["parity"], state["bench"], state["parts"]
    report.write_results(out / "gpu_check.json", info, parity_rows, bench_rows, parts=parts)
    drawn = report.write_plots(out, bench_rows) if plots else []
    parts_table = report.markdown_table(parts, [("part", "part"), ("status", "status"), ("seconds", "seconds"),
                                                ("tests", "tests"), ("failures", "failures"), ("errors", "errors"),
                                                ("last line", "summary")])
    markdown = report.report_markdown(info, parity_rows, bench_rows, drawn)
    targets_table = report.markdown_table(targets.target_rows(bench_rows), targets.COLUMNS)
    (out / "report.md").write_text(markdown + "\n## The issues' targets\n\n" + targets_table
                                   + "\n\n## GPU check parts\n\n" + parts_table + "\n")
    return markdown, targets_table, parts_table


if __name__ == "__main__":
    sys.exit(main())
