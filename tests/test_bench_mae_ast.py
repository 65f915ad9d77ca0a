"""The MAE-AST benchmark's groups: each MAE-AST row is compared with the SSAST row of its own attention."""
import pytest
import torch

from benches import bench_mae_ast


def test_groups_per_device_and_attention():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench_mae_ast._groups(cpu, ("sdpa", "reference")) == [
        [("ssast", "sdpa"), ("mae", "sdpa")], [("ssast", "reference"), ("mae", "reference")]]
    assert bench_mae_ast._groups(cpu, ("reference",)) == [[("ssast", "reference"), ("mae", "reference")]]
    groups = bench_mae_ast._groups(cuda, ("sdpa", "reference"))
    assert groups[0] == [("ssast", "sdpa"), ("mae", "sdpa"), ("mae", "triton")]
    assert groups[1] == [("ssast", "sdpa+graph"), ("mae", "sdpa+graph"), ("mae", "triton+graph")]
    assert groups[2] == [("ssast", "reference"), ("mae", "reference")]
    assert groups[3] == [("ssast", "reference+graph"), ("mae", "reference+graph")]
    assert len(groups) == 4
    with pytest.raises(ValueError, match="unknown attention"):
        bench_mae_ast._groups(cpu, ("flash",))


def test_reference_rows_are_compared_with_reference_ssast():
    quick = dict(bench_mae_ast.QUICK)
    rows = bench_mae_ast.measure("cpu", warmup=1, reps=1, attention=("sdpa", "reference"), **quick)
    by_name = {row["name"]: row for row in rows}
    depth, tokens = quick["depths"][0], quick["tokens"][0]
    for backend in ("sdpa", "reference"):
        ssast, mae = by_name[f"ssast/{backend} {tokens} depth {depth}"], by_name[f"mae/{backend} {tokens} depth {depth}"]
        assert mae["ssast_baseline"] == ssast["name"] and ssast["speedup_vs_ssast"] == 1.0
        assert mae["speedup_vs_ssast"] == pytest.approx(ssast["median_ms"] / mae["median_ms"])
        measure = mae["mem_ratio_measure"]
        assert mae["mem_ratio_vs_ssast"] == pytest.approx(ssast[measure] / mae[measure])
