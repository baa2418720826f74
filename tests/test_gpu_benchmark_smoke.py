"""scripts/gpu_benchmark.py in its CPU smoke mode: every kind of row is written, and the compiled model is built
once for all batch sizes (dynamic batch axis, batch 1 bucketed). Nothing timed is asserted."""

from __future__ import annotations

import json

import torch

from _script_helpers import load_script

gpu_benchmark = load_script("gpu_benchmark")


def test_smoke_run_writes_one_table_with_every_kind_of_row(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = gpu_benchmark.main(
            ["--device", "cpu", "--quick", "--compile-backend", "eager", "--dtypes", "fp32", "--batch-sizes", "1", "4",
             "--iterations", "1", "--warmup", "0", "--training-steps", "1", "--budget-s", "300", "--output",
             str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    kinds = {(r["model"], r["mode"].split(" ")[0], r["batch"]) for r in data["rows"]}
    assert {("ours", "eager", 1), ("ours", "eager", 4), ("official stand-in", "eager", 1),
            ("ours", "compiled", 1), ("ours", "compiled", 4), ("training student", "eager,", 2)} <= kinds
    compiled = [r for r in data["rows"] if r["mode"].startswith("compiled")]
    assert [r["compiles"] for r in compiled] == [1, 1]  # batch 4 compiled once; batch 1 ran as 2 on that graph
    assert [r["run_batch"] for r in compiled] == [4, 2]
    assert not data["skipped"]
    table = (tmp_path / "results.md").read_text()
    assert "| official stand-in | eager | fp32 | 1 |" in table and "data loading" in table
