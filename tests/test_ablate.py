"""tools/ablate.py with the local launcher on the tiny text model: a sweep of 1 rank, PP2, a
layout the config rules refuse and one that fails at start-up; its CSV, Markdown table and
PNG against the benchmark reports and the planner; a rerun skips finished layouts. Also the
benchmark job make_sbatch writes for --launcher slurm (the real submission: tests/test_slurm.py)."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import QUICKSTART, ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))

LAYOUTS = """\
- {name: one_rank, ranks: 1}
- {name: pp2, ranks: 2, set: [parallel.pp=2]}
- {name: bad_set, ranks: 1, set: [parallel.recompute=sometimes]}
- {name: no_checkpoint, ranks: 1, set: ["checkpoint.load=%s"]}
"""
OK = {"one_rank": (1, 1), "pp2": (2, 2)}  # name: (ranks, pp)


def ablate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ablate.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    (root / "empty").mkdir()  # passes validate (the folder exists), fails at start-up: no checkpoint in it
    layouts = root / "layouts.yaml"
    layouts.write_text(LAYOUTS % (root / "empty"))
    args = ["--config", QUICKSTART, "--set", "data.source=synthetic", "--set", "train.scheduler.warmup_steps=1",
            "--layouts", str(layouts), "--steps", "2", "--warmup", "1", "--out", str(root / "out"),
            "--cluster", os.path.join(ROOT, "configs", "clusters", "cpu_test.yaml")]
    first = ablate(*args)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # 1: some layout failed
    mtimes = {n: os.path.getmtime(root / "out" / n / "benchmark.json") for n in OK}
    again = ablate(*args)
    return {"root": root, "out": root / "out", "first": first, "again": again, "mtimes": mtimes}


def reports(out) -> dict:
    found = {}
    for name in OK:
        with open(out / name / "benchmark.json") as f:
            found[name] = json.load(f)
    return found


def decimals(cell: str) -> int:
    return len(cell.split(".")[1]) if "." in cell else 0


def test_csv_and_markdown_hold_the_reports(sweep):
    from megatron_mm.config import load_config
    from megatron_mm.costs.memory import GIB, estimate_memory

    out = sweep["out"]
    with open(out / "ablation.csv") as f:
        rows = {r["layout"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["one_rank", "pp2", "bad_set", "no_checkpoint"]
    md = (out / "ablation.md").read_text().splitlines()
    assert md[0].startswith("`python tools/ablate.py --config ")
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("| ")]
    header, cells = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert list(cells) == list(rows)
    as_md = {"tokens_per_s": "tokens/s", "tokens_per_s_per_gpu": "tokens/s/GPU", "step_time_s": "step (s)",
             "tflops_per_gpu": "TFLOP/s/GPU", "peak_memory_gib": "peak memory GiB (max rank)",
             "estimated_memory_gib": "estimate GiB", "estimate_over_measured": "estimate / measured",
             "final_loss": "final loss"}
    assert set(as_md.values()) < set(header)
    for name, report in reports(out).items():
        ranks, pp = OK[name]
        row, md_row = rows[name], cells[name]
        cfg = load_config(QUICKSTART, ["data.source=synthetic"] + (["parallel.pp=2"] if pp == 2 else []))
        estimate = estimate_memory(cfg, ranks).worst.total_bytes / GIB
        expected = {
            "tokens_per_s": report["tokens_per_s"], "tokens_per_s_per_gpu": report["tokens_per_s_per_gpu"],
            "step_time_s": report["step_time_s"]["mean"], "tflops_per_gpu": report["tflops_per_gpu"],
            "peak_memory_gib": max(report["peak_memory_gib"]), "estimated_memory_gib": estimate,
            "estimate_over_measured": estimate / max(report["peak_memory_gib"]), "final_loss": report["loss"]["final"],
        }
        assert report["world_size"] == ranks and report["layout"]["pp"] == pp and len(report["peak_memory_gib"]) == ranks
        assert (row["status"], row["error"], row["mfu"]) == ("ok", "", "")  # cpu_test has no peak: no MFU
        assert (int(row["world_size"]), int(row["pp"]), int(row["tp"]), int(row["dp"]), row["recompute"]) == (
            ranks, pp, 1, 1, "none")
        for key, value in expected.items():
            assert value > 0
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key  # the CSV: full precision
            cell = md_row[as_md[key]]
            assert abs(float(cell) - value) <= 0.51 * 10 ** -decimals(cell), (key, cell, value)  # rounded
        assert md_row["status"] == "ok" and md_row["MFU"] == "–"
    # the steps' tokens over the timed step time, and the same global batch in both layouts
    r1, r2 = reports(out)["one_rank"], reports(out)["pp2"]
    assert r1["tokens_per_s"] == pytest.approx(512 / r1["step_time_s"]["mean"], rel=1e-9)
    assert r2["tokens_per_s_per_gpu"] == pytest.approx(r2["tokens_per_s"] / 2, rel=1e-9)


def test_failed_layouts_are_recorded_and_the_others_complete(sweep):
    out, first = sweep["out"], sweep["first"]
    with open(out / "ablation.csv") as f:
        rows = {r["layout"]: r for r in csv.DictReader(f)}
    refused = "config error: parallel.recompute=sometimes: must be none or full"
    no_ckpt = (f"checkpoint error: checkpoint.load={sweep['root'] / 'empty'}: no checkpoint here "
               f"(neither latest_checkpointed_iteration.txt nor an iter_* folder)")
    assert (rows["bad_set"]["status"], rows["bad_set"]["error"]) == ("failed", refused)
    assert (rows["no_checkpoint"]["status"], rows["no_checkpoint"]["error"]) == ("failed", no_ckpt)
    assert (out / "bad_set" / "error.txt").read_text().strip() == refused
    assert not (out / "bad_set" / "log.txt").exists()  # refused before anything started
    assert "Traceback" not in (out / "no_checkpoint" / "log.txt").read_text()  # the tool's one-line error
    assert rows["bad_set"]["tokens_per_s"] == rows["no_checkpoint"]["tokens_per_s"] == ""
    assert rows["no_checkpoint"]["pp"] == "1" and float(rows["no_checkpoint"]["estimated_memory_gib"]) > 0
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["failed"] == ["bad_set", "no_checkpoint"]
    assert f"bad_set (1 rank(s), parallel.recompute=sometimes): FAILED (not started): {refused}" in first.stdout
    md = (out / "ablation.md").read_text()
    assert f"| failed: {refused} |" in md and f"| failed: {no_ckpt} |" in md
    png = (out / "ablation.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(out / "ablation.png")).shape
    assert width > height > 300


def test_rerun_skips_finished_layouts(sweep):
    again, out = sweep["again"], sweep["out"]
    assert again.returncode == 1, again.stderr[-3000:]
    for name in OK:
        assert f"{name} ({OK[name][0]} rank(s)" in again.stdout and f"done before ({out / name / 'benchmark.json'})" in again.stdout
        assert os.path.getmtime(out / name / "benchmark.json") == sweep["mtimes"][name]  # not run again
    assert "[4/4] no_checkpoint (1 rank(s), checkpoint.load=" in again.stdout and "running ..." in again.stdout
    assert again.stdout.count("done before") == 2  # the failed ones are tried again
    first, second = (json.loads(p.stdout.strip().splitlines()[-1])["rows"] for p in (sweep["first"], again))
    assert first == second


def test_bad_layouts_file_stops_with_one_line_each(tmp_path):
    layouts = tmp_path / "l.yaml"
    layouts.write_text("- {name: a, ranks: 1}\n- {name: a, ranks: 2}\n- {name: b/c, set: parallel.pp=2}\n")
    proc = ablate("--config", QUICKSTART, "--layouts", str(layouts), "--steps", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"config error: --layouts {layouts}: entry 2: name=a: used twice",
        f"config error: --layouts {layouts}: entry 3: name='b/c': use letters, digits and _ . + - only",
        f"config error: --layouts {layouts}: b/c: set='parallel.pp=2': must be a list of dotted.key=value",
        f"config error: --layouts {layouts}: b/c: ranks: needed with --launcher local",
    ]
    assert not (tmp_path / "o").exists()


def test_make_sbatch_benchmark_job(tmp_path):
    import make_sbatch

    script = tmp_path / "job.sbatch"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = make_sbatch.main([
            "--config", QUICKSTART, "--cluster", os.path.join(ROOT, "configs", "clusters", "cpu_test.yaml"),
            "--nodes", "2", "--set", "parallel.pp=2", "--benchmark", "7,3", "--time", "5", "--job-name", "pp2",
            "--runs-root", str(tmp_path / "runs"), "--out", str(script)])
    assert rc == 0, out.getvalue()  # --time 5 is shorter than the default --signal-minutes: no signal here
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=5", "#SBATCH --no-requeue",
                 f"#SBATCH --output={tmp_path / 'runs'}/%x-%j.out", f"RUN_DIR={tmp_path / 'runs'}/${{SLURM_JOB_NAME}}-",
                 "srun --kill-on-bad-exit=1 --distribution=block:block",
                 "tools/benchmark.py --config configs/quickstart_text.yaml", "  --set parallel.pp=2 \\",
                 '--set "run.dir=$RUN_DIR" --steps 7 --warmup 3 --cluster configs/clusters/cpu_test.yaml '
                 '--out "$RUN_DIR/benchmark.json"'):
        assert line in text, line
    for absent in ("--requeue\n", "--signal", "launch/pretrain.py", "{{"):
        assert absent not in text, absent
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()), \
            pytest.raises(SystemExit):
        make_sbatch.main(["--config", QUICKSTART, "--cluster", "x", "--nodes", "1", "--benchmark", "0"])
    assert "--benchmark: '0': STEPS must be >= 1 and WARMUP >= 0" in err.getvalue()
