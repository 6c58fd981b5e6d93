"""tools/benchmark.py on the tiny text model, 1 rank and PP2: the report's numbers agree with
each other, with the FLOPs model, the cluster profile's peak and the loop's own metrics.jsonl;
warm-up steps are left out; the timed steps compute what a plain training run computes."""

import json
import os
import subprocess
import sys

import pytest

from conftest import QUICKSTART, ROOT, free_port, losses

WARMUP, STEPS = 1, 2
COMMON = ["data.source=synthetic", f"train.steps={WARMUP + STEPS}", "train.scheduler.warmup_steps=1",
          "logging.tensorboard=false", "checkpoint.save_interval=0"]
RUNS = {"one_rank": (1, []), "pp2": (2, ["parallel.pp=2"])}


def start(nproc: int, script: str, overrides: list[str], *args: str) -> subprocess.Popen:
    """`script` (a path under the repository) with the text quickstart config on `nproc` gloo ranks."""
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = launch + [os.path.join(ROOT, script), "--config", QUICKSTART,
                    *[a for o in overrides for a in ("--set", o)], *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module", params=list(RUNS))
def bench(request, tmp_path_factory):
    """A benchmark run (with a cluster profile that has a bf16 peak on one rank, the CPU
    profile without one under PP2) and its report; beside it, a plain training run of the
    same config (launch/pretrain.py)."""
    nproc, layout = RUNS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    if nproc == 1:
        cluster = root / "cluster.yaml"
        cluster.write_text("name: tiny\ngpu: null\ngpus_per_node: 1\npeak_tflops_bf16: 0.5\npeak_tflops_fp8: 2.0\n")
    else:
        cluster = os.path.join(ROOT, "configs", "clusters", "cpu_test.yaml")
    procs = [start(nproc, "tools/benchmark.py", COMMON + layout + [f"run.dir={root}/bench"], "--steps", str(STEPS),
                   "--warmup", str(WARMUP), "--cluster", str(cluster), "--out", f"{root}/report.json"),
             start(nproc, "launch/pretrain.py", COMMON + layout + ["logging.interval=1", f"run.dir={root}/plain"])]
    results = [finish(proc) for proc in procs]
    for code, _, err in results:
        assert code == 0, err[-4000:]
    with open(f"{root}/report.json") as f:
        report = json.load(f)
    assert json.loads(results[0][1].strip().splitlines()[-1]) == report  # the last stdout line
    return {"nproc": nproc, "layout": layout, "root": root, "report": report}


def test_throughput_and_mfu_agree(bench):
    from megatron_mm.config import load_config
    from megatron_mm.costs.flops import training_flops_per_token

    r, nproc = bench["report"], bench["nproc"]
    cfg = load_config(QUICKSTART, COMMON + bench["layout"])
    times = r["step_time_s"]["per_step"]
    mean = sum(times) / len(times)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    assert r["world_size"] == nproc and r["device"] == "cpu"
    assert (r["layout"]["pp"], r["layout"]["dp"], r["layout"]["num_microbatches"]) == (nproc, 1, 8)
    assert r["step_time_s"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert r["step_time_s"]["min"] == min(times) and r["step_time_s"]["max"] == max(times)
    assert r["tokens_per_step"] == tokens == 512
    assert r["tokens_per_s"] == pytest.approx(tokens / mean, rel=1e-12)
    assert r["tokens_per_s_per_gpu"] == pytest.approx(tokens / mean / nproc, rel=1e-12)
    tflops = training_flops_per_token(cfg.model) * tokens / mean / nproc / 1e12
    assert r["tflops_per_gpu"] == pytest.approx(tflops, rel=1e-12)
    if nproc == 1:  # the test profile: fp32 config, so the bf16 peak
        assert r["peak_tflops_per_gpu"] == 0.5 and r["mfu"] == pytest.approx(tflops / 0.5, rel=1e-12)
    else:
        assert r["mfu"] is None and r["mfu_source"] == "cluster profile cpu_test has no peak_tflops_bf16"


def test_warmup_excluded_and_times_from_the_loop(bench):
    r = bench["report"]
    assert r["timed_steps"] == list(range(WARMUP + 1, WARMUP + STEPS + 1))
    with open(os.path.join(bench["root"], "bench", "benchmark", "metrics.jsonl")) as f:
        logged = {m["step"]: m for m in map(json.loads, f)}
    assert sorted(logged) == list(range(1, WARMUP + STEPS + 1))
    assert r["step_time_s"]["per_step"] == [logged[s]["step_time_s"] for s in r["timed_steps"]]
    assert [rank["rank"] for rank in logged[WARMUP + 1]["ranks"]] == list(range(bench["nproc"]))
    assert not os.path.exists(os.path.join(bench["root"], "bench", "benchmark", "checkpoints"))


def test_time_split_per_rank(bench):
    r, pp = bench["report"], bench["nproc"]
    assert r["peak_memory_gib"] == [rank["peak_memory_gib"] for rank in r["ranks"]]
    assert len(r["peak_memory_gib"]) == bench["nproc"] and all(m > 0 for m in r["peak_memory_gib"])
    assert r["ranks"][0]["step_time_s"] == pytest.approx(r["step_time_s"]["mean"], rel=1e-12)
    for rank in r["ranks"]:
        split, step = rank["split_s"], rank["step_time_s"]
        assert set(split) == set(r["time_split"]["measured"]) | {"other"}
        assert all(seconds >= -1e-4 for seconds in split.values()), split
        assert sum(split.values()) == pytest.approx(step, rel=1e-9)  # `other` is the remainder by definition
        assert rank["timers_s"]["forward-backward"] <= step
        inside = split["forward"] + split["backward"] + split["pipeline_p2p"] + split["grad_sync"]
        assert inside <= rank["timers_s"]["forward-backward"] + 1e-4
        assert split["forward"] > 0 and split["backward"] > 0 and split["optimizer"] > 0
        assert (split["pipeline_p2p"] > 0) == (pp > 1)  # p2p waits are timed only between stages


def test_timed_losses_equal_a_plain_run(bench):
    plain = losses(str(bench["root"] / "plain"))
    r = bench["report"]
    assert r["loss"]["per_step"] == [plain[s] for s in r["timed_steps"]]
    assert r["loss"]["final"] == plain[WARMUP + STEPS]


def test_peak_follows_precision_and_bad_arguments_stop(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from benchmark import peak_tflops

    from megatron_mm.config import load_config

    cluster = tmp_path / "c.yaml"
    cluster.write_text("name: c\ngpu: G\ngpus_per_node: 8\ngpu_memory_gib: 80\n"
                       "peak_tflops_bf16: 900\npeak_tflops_fp8: 1800\nfp8: true\n")
    assert peak_tflops(load_config(QUICKSTART), str(cluster)) == (900, "cluster c: peak_tflops_bf16")
    fp8 = load_config(QUICKSTART, ["precision.dtype=bf16", "precision.fp8=delayed"])
    assert peak_tflops(fp8, str(cluster)) == (1800, "cluster c: peak_tflops_fp8")
    assert peak_tflops(load_config(QUICKSTART, ["logging.peak_tflops_per_gpu=7"]), None)[0] == 7
    code, _, err = finish(start(1, "tools/benchmark.py", [], "--steps", "2", "--cluster", str(tmp_path / "x.yaml")))
    assert code == 2 and err.strip().splitlines() == [
        f"config error: --cluster {tmp_path / 'x.yaml'}: not found (profiles: configs/clusters/*.yaml)"]
