"""``audiomae validate`` and ``audiomae bench``: the parity table, its verdicts, and the report files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audiomae import report
from audiomae.cli import main
from benches import parity
from benches.render_results import render_file

ROOT = Path(__file__).resolve().parent.parent


def fake_case(op, actual, expected, tolerance=1e-3):
    return parity.Case(op, lambda device, dtype, quick: [
        parity.compare("fake", "forward", {"out": actual}, {"out": expected}, tolerance)], dtypes=("float32",))


def test_validate_passes_on_cpu(capsys):
    assert main(["validate", "--quick"]) == 0
    out = capsys.readouterr().out
    for op in parity.CASES:
        assert f"| {op} |" in out
    assert "| FAIL |" not in out and "| ERROR |" not in out
    assert "0 FAIL" in out and "0 ERROR" in out
    if not torch.cuda.is_available():
        assert "| window_attention | - | bfloat16 | - |" in out and "tl.dot" in out  # a SKIP, not a pass


@pytest.mark.parametrize("actual,expected,verdict", [
    (torch.ones(3), torch.full((3,), 0.5, dtype=torch.float64), "FAIL"),          # far off
    (torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.float64), "FAIL"),  # NaN never passes
    (torch.ones(3), torch.ones(3, dtype=torch.float64), "PASS"),
])
def test_compare_verdicts(actual, expected, verdict):
    row = parity.compare("fake", "forward", {"out": actual}, {"out": expected}, 1e-3)
    assert row["status"] == verdict


def test_failing_or_broken_case_makes_validate_fail(monkeypatch, capsys):
    monkeypatch.setattr(parity, "CASES", {"fake": fake_case("fake", torch.ones(4), torch.zeros(4, dtype=torch.float64) + 0.9)})
    assert main(["validate", "--ops", "fake"]) == 1
    assert "| fake | fake | float32 | forward | out | 0.1 |" in capsys.readouterr().out

    def missing(device, dtype, quick):
        from kernels import no_such_op  # noqa: F401 - an op whose module is not there yet

    monkeypatch.setattr(parity, "CASES", {"absent": parity.Case("absent", missing, dtypes=("float32",))})
    assert main(["validate"]) == 1
    assert "| ERROR | ImportError" in capsys.readouterr().out

    def skipped(device, dtype, quick):
        raise parity.Skip("not on this machine")

    monkeypatch.setattr(parity, "CASES", {"skipped": parity.Case("skipped", skipped, dtypes=("float32",))})
    assert main(["validate"]) == 0


def test_failing_rows_write_strict_json(monkeypatch, tmp_path):
    """A NaN result fails its row, and the JSON stays JSON (null, not NaN)."""
    monkeypatch.setattr(parity, "CASES", {"nan": fake_case("nan", torch.full((4,), float("nan")),
                                                           torch.zeros(4, dtype=torch.float64))})
    path = tmp_path / "v.json"
    assert main(["validate", "--ops", "nan", "--json", str(path)]) == 1
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert report.to_json({"a": [float("inf"), 1.5, {"b": float("nan")}]}) == report.to_json({"a": [None, 1.5, {"b": None}]})


def test_json_path_is_checked_before_the_run(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(report, "run_parity", lambda *a, **k: ran.append(1) or [])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["validate", "--ops", "gather_tokens", "--json", str(tmp_path / "nodir" / "v.json")])
    with pytest.raises(SystemExit, match="is a folder"):
        main(["validate", "--ops", "gather_tokens", "--json", str(tmp_path)])
    assert not ran


def test_unknown_op_is_an_error():
    with pytest.raises(SystemExit, match="unknown op nope") as stop:
        main(["validate", "--ops", "nope"])
    assert stop.value.code == 2  # a usage error, not 1 (a failed check)


def test_an_unwritable_out_folder_is_refused_before_the_run(monkeypatch):
    import os
    folder = "/sys/kernel"  # exists, and takes no new files even for root
    if not os.path.isdir(folder):
        pytest.skip("no /sys/kernel to try")
    ran = []
    monkeypatch.setattr(report, "run_parity", lambda *a, **k: ran.append(1) or [])
    with pytest.raises(SystemExit, match="cannot write there") as stop:
        main(["bench", "--ops", "gather_tokens", "--out", folder])
    assert stop.value.code == 2 and not ran


@pytest.mark.parametrize("name", ["report.md", "results.json", "speedup.png"])
def test_a_folder_where_an_output_file_goes_is_refused_before_the_run(monkeypatch, tmp_path, name):
    (tmp_path / name).mkdir()
    ran = []
    monkeypatch.setattr(report, "run_parity", lambda *a, **k: ran.append(1) or [])
    with pytest.raises(SystemExit, match=f"{name} is a folder") as stop:
        main(["bench", "--ops", "gather_tokens", "--out", str(tmp_path)])
    assert stop.value.code == 2 and not ran


def test_plots_of_an_earlier_run_are_removed(tmp_path):
    stale = tmp_path / "memory.png"
    stale.write_bytes(b"old")
    assert report.write_plots(tmp_path, []) == [] and not stale.exists()


@pytest.mark.parametrize("argv", [["validate", "--dtypes", "float128"], ["bench", "--batch-sizes", "0"],
                                  ["bench", "--batch-sizes", "-3"]])
def test_bad_dtype_or_batch_size_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'float128'" in err or "must be a positive integer" in err


def test_validate_with_nothing_selected_is_an_error():
    with pytest.raises(SystemExit, match="no parity case matches --ops fbank --dtypes bfloat16"):
        main(["validate", "--ops", "fbank", "--dtypes", "bfloat16"])


def test_selection_takes_relatives():
    modules = report.benchmark_modules()
    assert report.selection(["tokens"], modules, parity.CASES) == (
        {"gather_tokens", "gather_tokens_2d", "unshuffle_tokens"}, {"tokens"})
    assert report.selection(["unshuffle_tokens"], modules, parity.CASES) == ({"unshuffle_tokens"}, {"tokens"})
    assert report.selection(["train"], modules, parity.CASES) == ({"models"}, {"train"})
    assert report.selection(["mae_ast"], modules, parity.CASES) == (set(), {"mae_ast"})


def test_dtype_and_batch_filters_read_every_spelling(monkeypatch):
    import types

    rows = [{"name": "a", "dtype": "fp32", "shape": "B=4"}, {"name": "b", "dtype": "bf16-autocast", "shape": "B=64"}]
    monkeypatch.setitem(sys.modules, "benches.fake_bench", types.SimpleNamespace(run=lambda device, quick: rows))
    assert [r["name"] for r in report.run_benchmark("fake", "benches.fake_bench", "cpu", True, ["float32"])] == ["a"]
    assert [r["name"] for r in report.run_benchmark("fake", "benches.fake_bench", "cpu", True, ["bfloat16"])] == ["b"]
    [skip] = report.run_benchmark("fake", "benches.fake_bench", "cpu", True, None, [8])
    assert skip["status"] == "SKIP" and "--batch-sizes 8" in skip["note"] and "float32 B=4" in skip["note"]


def test_unavailable_rows_say_why_in_the_table():
    [row] = report.table_rows([{"suite": "s", "name": "x", "impl": "xformers", "unavailable": "not importable"}])
    assert row["note"] == "unavailable: not importable"


def test_broken_benchmark_module_is_an_error_row():
    rows = report.run_benchmark("broken", "benches.no_such_bench", "cpu", quick=True)
    assert [r["status"] for r in rows] == ["ERROR"] and "ModuleNotFoundError" in rows[0]["note"]


def test_batch_size_of_a_row():
    assert report.batch_size({"shape": "B=64 L=512 K=102 C=768"}) == 64
    assert report.batch_size({"shape": "B32xT1024x128"}) == 32
    assert report.batch_size({"batch": 8, "shape": "B=2"}) == 8
    assert report.batch_size({"shape": "grid 64x8"}) is None


def test_bench_quick_writes_report_results_and_plots(tmp_path):
    """A fresh process without TRITON_INTERPRET: the command must set it itself and say so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "audiomae", "bench", "--quick", "--ops", "gather_tokens", "fbank",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "report.md").exists() and list(out.glob("*.png"))
    results = json.loads((out / "results.json").read_text())
    assert {"device", "date", "versions", "shapes", "parity", "benchmarks"} <= set(results)
    assert results["versions"]["torch"] == torch.__version__
    assert {r["op"] for r in results["parity"]} == {"gather_tokens", "fbank"}
    # gather_tokens is a parity case of bench_tokens' kernels: naming it times them too.
    assert {r["suite"] for r in results["benchmarks"]} == {"fbank", "fbank_precision", "tokens"}
    assert all(r.get("status") != "ERROR" for r in results["parity"] + results["benchmarks"])
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in done.stdout and "say nothing about GPU speed" in done.stdout
        assert "say nothing about GPU speed" in (out / "report.md").read_text()
    rendered = render_file(out / "results.json")
    assert results["device"]["device"] in rendered and "| fbank |" in rendered


def test_a_named_case_keeps_its_own_rows_of_a_shared_suite():
    rows = [{"name": "gather fwd"}, {"name": "gather_2d fwd+bwd"}, {"name": "unshuffle fwd"},
            {"name": "-", "status": "ERROR"}]
    names = lambda kept: [r["name"] for r in kept]  # noqa: E731
    assert names(report.rows_of_ops("tokens", rows, ["gather_tokens"])) == ["gather fwd", "-"]
    assert names(report.rows_of_ops("tokens", rows, ["unshuffle_tokens", "gather_tokens_2d"])) == [
        "gather_2d fwd+bwd", "unshuffle fwd", "-"]
    for ops in (None, ["tokens"], ["tokens", "gather_tokens"], ["fbank"]):
        assert report.rows_of_ops("tokens", rows, ops) == rows
    assert report.rows_of_ops("fbank", [{"name": "fbank AudioMAE options"}], ["gather_tokens"]) == [
        {"name": "fbank AudioMAE options"}]
    # every named suite and row prefix exists
    modules = report.benchmark_modules()
    assert all(suite in modules for suite, _ in report.ROWS_OF_CASE.values())
