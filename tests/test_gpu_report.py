"""tools/gpu_report.py --cpu-smoke: every part of the GPU report runs (or says in one line why it
cannot) on CPU at toy size, so that the tool works the day a GPU is lent."""

import json
import math
import os

from conftest import tool


def test_cpu_smoke_report_has_every_part(tmp_path, capsys):
    # a budget no CPU machine reaches: the smoke run checks every part, not the budget
    code, stdout, _ = tool("gpu_report", ["--cpu-smoke", "--out-dir", str(tmp_path), "--budget-s", "3600"], capsys)
    assert code == 0
    report = json.loads(stdout.strip().splitlines()[-1])
    parts = report["parts"]
    assert set(parts) == {"gemm", "benchmark", "transformers", "data", "te"}

    def skipped_or(result: dict, check) -> None:
        if "skipped" in result:
            assert result["skipped"] and "\n" not in result["skipped"], result  # one line with a reason
        else:
            check(result)

    assert parts["gemm"]["tflops"] > 0 and parts["gemm"]["shape"] == [256, 256, 256]

    def bench(v):
        assert v["tokens_per_s"] > 0 and v["step_time_s"] > 0
        assert all(math.isfinite(x) and 0 < x < 10 for x in v["losses"])  # ln(512) = 6.2 at the start
        assert 0.5 <= v["peak_memory_gib"] / v["planner_estimate_gib"] <= 2.0  # the planner within 2x
    variants = parts["benchmark"]["variants"]
    bench(variants["shipped"])  # the portable spec always runs
    for v in variants.values():
        skipped_or(v, bench)

    def transformers(t):
        assert t["tokens_per_s"] > 0 and t["megatron_mm_tokens_per_s"] > 0
    skipped_or(parts["transformers"], transformers)

    data = parts["data"]
    assert data["torch"]["images_per_s"] > 0 and data["torch"]["bad_samples"] == 0
    def dali(d):
        assert d["images_per_s"] > 0 and d["decode"] == "cpu" and d["bad_samples"] == 0
    skipped_or(data["dali"], dali)
    assert parts["te"]["skipped"].startswith("transformer_engine")  # not installed on CPU machines

    assert os.path.isfile(tmp_path / "gpu" / f"{report['date']}-cpu.json")
    section = (tmp_path / "gpu.md").read_text()
    assert section.startswith(f"\n## {report['date']} — cpu (tools/gpu_report.py --cpu-smoke)")
    assert "| shipped | " in section and "* Data loaders (16 fixture samples, 32 px)" in section
