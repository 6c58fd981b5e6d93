"""A real SLURM on this machine: Debian's slurmctld + two slurmd emulating two nodes (n1, n2,
two CPU ranks each), started in a temporary directory with auth/none, no systemd.

A script written by tools/make_sbatch.py trains the tiny model under TP2 x PP2 x EP2 on
2 nodes x 2 tasks (gloo). Mid-run the test sends SIGUSR1 to the job's ranks, as SLURM's
`--signal=USR1@...` does before the time limit: the ranks checkpoint and exit, the script
requeues the job, and the job resumes from that checkpoint and finishes. Checked: the job
log, metrics (every step once, across the restart), checkpoints, and every rank's TP/PP/DP/
EP coordinates, node and parameter count against the generator's rank map and the planner.

Slurm is installed with apt-get when missing; the test skips only where that is impossible
(no apt-get, or not root). It stops only the daemons it started (by their pid files).
"""

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
STEPS = 16  # room for the signal to land mid-run on a fast machine


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "srun"))


def _install_slurm() -> None:
    if _have_slurm():
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("slurm is not installed and cannot be: needs apt-get as root (Debian's slurmctld/slurmd)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env, timeout=300)
    install = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                             capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0 and _have_slurm(), (
        f"apt-get install {' '.join(PACKAGES)} failed:\n{update.stderr[-2000:]}\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")


def _conf(tmp: str, user: str) -> str:
    host = socket.gethostname()
    ctld_port, d1, d2 = free_port(), free_port(), free_port()
    nodes = [("n1", d1), ("n2", d2)]
    lines = [
        f"ClusterName=mm{os.getpid()}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={d1}",
        "AuthType=auth/none",
        "CredType=cred/none",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        f"StateSaveLocation={tmp}/state",
        f"SlurmdSpoolDir={tmp}/spool-%n",
        f"SlurmctldPidFile={tmp}/slurmctld.pid",
        f"SlurmdPidFile={tmp}/slurmd-%n.pid",
        f"SlurmctldLogFile={tmp}/slurmctld.log",
        f"SlurmdLogFile={tmp}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SlurmdParameters=config_overrides",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "MinJobAge=600",
        "KillWait=10",
        *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 State=UNKNOWN"
          for n, port in nodes),
        "PartitionName=mm Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
    ]
    path = os.path.join(tmp, "slurm.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _pid(path: str):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node SLURM cluster of this machine; yields the environment for its commands."""
    _install_slurm()
    tmp = str(tmp_path_factory.mktemp("slurm"))
    os.makedirs(os.path.join(tmp, "state"))
    conf = _conf(tmp, getpass.getuser())
    env = {**os.environ, "SLURM_CONF": conf}
    pid_files = [os.path.join(tmp, f) for f in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid")]
    try:
        subprocess.run(["slurmctld", "-c", "-f", conf], env=env, check=True, timeout=60)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-N", node, "-f", conf], env=env, check=True, timeout=60)
        deadline = time.time() + 60
        while True:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True).stdout
            if states.count("idle") == 2:
                break
            assert time.time() < deadline, f"nodes not idle: {states}\n{_tail(tmp, 'slurmctld.log')}"
            time.sleep(0.5)
        yield {"env": env, "dir": tmp}
    finally:
        for path in pid_files:  # only the daemons this fixture started
            pid = _pid(path)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        for path in pid_files:
            pid = _pid(path)
            while pid and time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)


def _tail(folder: str, name: str, n: int = 3000) -> str:
    try:
        with open(os.path.join(folder, name)) as f:
            return f"--- {name}\n" + f.read()[-n:]
    except OSError:
        return f"--- {name}: missing"


def _job(jobid: str, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", jobid, "-o"], env=env, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _metrics(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def test_sbatch_trains_requeues_on_signal_and_resumes(slurm, tmp_path, data_cache):
    started = time.time()
    env = slurm["env"]
    runs = tmp_path / "runs"
    script = tmp_path / "job.sbatch"
    overrides = [
        "parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=true",
        f"train.steps={STEPS}", "train.global_batch_size=4", "train.scheduler.warmup_steps=2",
        "logging.interval=1", "logging.tensorboard=false", "checkpoint.save_interval=0",
        f"data.cache_dir={data_cache}",
    ]
    gen = subprocess.run(
        [sys.executable, "tools/make_sbatch.py", "--config", "configs/quickstart_text.yaml",
         "--cluster", "configs/clusters/cpu_test.yaml", "--nodes", "2", "--partition", "mm",
         "--time", "20", "--signal-minutes", "2", "--job-name", "mmtest", "--python", sys.executable,
         "--runs-root", str(runs), "--out", str(script), "--print-map",
         *[a for o in overrides for a in ("--set", o)]],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert gen.returncode == 0, gen.stderr
    assert "node 1 (ranks 2-3): pipeline stage 1" in gen.stdout, gen.stdout
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@120", "#SBATCH --partition=mm", "srun --kill-on-bad-exit=1"):
        assert line in text, line
    assert "--gpus-per-node" not in text  # CPU profile

    jobid = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True,
                           check=True, cwd=str(tmp_path)).stdout.strip().split(";")[0]
    run_dir = str(runs / f"mmtest-{jobid}")
    log = str(runs / f"mmtest-{jobid}.out")

    def wait(what, predicate, timeout=240, poll=1.0):
        deadline = time.time() + timeout
        while not predicate():
            state = _job(jobid, env)
            if state.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            if time.time() > deadline:
                break
            time.sleep(poll)
        if not predicate():
            logs = "\n".join(_tail(slurm["dir"], n) for n in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"))
            job_log = open(log).read()[-6000:] if os.path.exists(log) else "(no job log)"
            pytest.fail(f"timed out waiting for {what}; job {state}\n{job_log}\n{logs}")

    # First run: a few steps, then the pre-time-limit signal (what --signal=USR1@120 sends).
    wait("3 logged steps", lambda: len(_metrics(run_dir)) >= 3, poll=0.2)
    subprocess.run(["scancel", "--signal=USR1", jobid], env=env, check=True)

    # The ranks checkpoint and exit 0; the script requeues the job, which waits on its begin time.
    pending_since = []

    def requeued_or_running_again():
        state = _job(jobid, env)
        if state.get("JobState") == "PENDING" and state.get("Restarts", "0") != "0":
            pending_since.append(time.time())
            # Not at once: slurmd is still tearing down the killed first run, and a batch
            # launched on that node before it is done is refused ("Job 1 already killed, do not
            # launch batch job") and the job FAILS (seen once in a full-suite run).
            if time.time() - pending_since[0] >= 5:
                subprocess.run(["scontrol", "update", f"jobid={jobid}", "StartTime=now"], env=env)
        return state.get("JobState") == "COMPLETED"

    wait("the requeued job to finish", requeued_or_running_again, timeout=300)
    state = _job(jobid, env)
    with open(log) as f:
        job_log = f.read()
    assert state["ExitCode"] == "0:0" and state["Restarts"] == "1", state
    assert "(restart 0)" in job_log and "(restart 1)" in job_log, job_log[-4000:]
    assert "received signal 10" in job_log and "requeueing job" in job_log, job_log[-4000:]
    stopped = int(job_log.split("stopping after step ")[1].split()[0])
    assert 3 <= stopped < STEPS, stopped
    assert f"resumed from {run_dir}/checkpoints at step {stopped}" in job_log, job_log[-4000:]
    assert f"training finished with exit code 0 at step {STEPS} of {STEPS}" in job_log, job_log[-4000:]

    # Every step logged once across the restart, finite losses; checkpoints of both runs.
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps
    assert all(0 < m["loss"] < 10 for m in _metrics(run_dir))
    ckpts = os.path.join(run_dir, "checkpoints")
    assert os.path.isdir(os.path.join(ckpts, f"iter_{stopped:07d}")), os.listdir(ckpts)
    assert os.path.isdir(os.path.join(ckpts, f"iter_{STEPS:07d}")), os.listdir(ckpts)
    with open(os.path.join(ckpts, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(STEPS)

    # Each rank's coordinates, node and parameters: what the generator and planner predicted.
    sys.path.insert(0, ROOT)
    from megatron_mm.config import load_config
    from megatron_mm.planning.layout import rank_map
    from megatron_mm.costs.memory import rank_parameters

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart_text.yaml"), overrides)
    with open(os.path.join(run_dir, "rank_map.json")) as f:
        reported = json.load(f)["ranks"]
    predicted = rank_map(2, 2, 2, 1, 4, gpus_per_node=2)
    for got, want in zip(reported, predicted):
        assert {k: got[k] for k in ("rank", "tp", "pp", "dp", "ep", "etp", "edp")} == {
            k: getattr(want, k) for k in ("rank", "tp", "pp", "dp", "ep", "etp", "edp")}, (got, want)
        assert got["slurm_node"] == f"n{want.node + 1}" and got["local_rank"] == want.local_rank, got
        assert got["params"] == rank_parameters(cfg, want.pp).total, got
    assert f"model: {rank_parameters(cfg, 0).total:,} parameters on rank 0" in job_log
    print(f"\nSLURM job {jobid}: 2 nodes x 2 ranks, TP2xPP2xEP2, stopped at step {stopped}, "
          f"requeued, resumed, finished {STEPS} steps; test wall {time.time() - started:.0f} s")


def test_ablation_jobs(slurm, tmp_path):
    """tools/ablate.py --launcher slurm: one benchmark job a layout (make_sbatch --benchmark:
    no requeue), all submitted, then waited for; the table holds each job's report; a layout the
    config rules refuse gets no job; a rerun submits nothing."""
    started = time.time()
    layouts = tmp_path / "layouts.yaml"
    layouts.write_text("- {name: pp2, nodes: 1, set: [parallel.pp=2]}\n"
                       "- {name: dp2_pp2, ranks: 4, set: [parallel.pp=2]}\n"
                       "- {name: tp2_no_sp, nodes: 1, set: [parallel.tp=2]}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/ablate.py", "--config", "configs/quickstart_text.yaml",
           "--set", "data.source=synthetic", "--layouts", str(layouts), "--steps", "2", "--warmup", "1",
           "--out", str(out), "--launcher", "slurm", "--cluster", "configs/clusters/cpu_test.yaml",
           "--partition", "mm", "--time", "10", "--poll", "0.5"]
    env = {**slurm["env"], "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    logs = "\n".join(_tail(slurm["dir"], n) for n in ("slurmctld.log", "slurmd-n1.log"))
    assert first.returncode == 1, first.stdout[-4000:] + first.stderr[-4000:] + logs
    result = json.loads(first.stdout.strip().splitlines()[-1])
    rows = {r["layout"]: r for r in result["rows"]}
    assert result["failed"] == ["tp2_no_sp"] and not (out / "tp2_no_sp" / "job.json").exists()
    assert rows["tp2_no_sp"]["error"] == ("config error: parallel.sequence_parallel=False: must be true for an MoE "
                                          "model with parallel.tp=2 > 1 (megatron-core rule)")
    for name, world in (("pp2", 2), ("dp2_pp2", 4)):
        job = json.loads((out / name / "job.json").read_text())
        script = (out / name / "job.sbatch").read_text()
        assert "#SBATCH --no-requeue" in script and "#SBATCH --requeue" not in script
        with open(os.path.join(job["run_dir"], "benchmark.json")) as f:
            report = json.load(f)
        r = rows[name]
        assert (r["status"], r["world_size"], r["pp"], r["dp"]) == ("ok", world, 2, world // 2)
        assert r["tokens_per_s"] == report["tokens_per_s"] and r["final_loss"] == report["loss"]["final"]
        assert r["peak_memory_gib"] == max(report["peak_memory_gib"]) and len(report["peak_memory_gib"]) == world
        assert f"benchmark job {job['job_id']}" in open(job["log"]).read()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert again.returncode == 1 and again.stdout.count("done before") == 2, again.stdout
    assert "submitted" not in again.stdout
    print(f"\nablation under SLURM: 2 benchmark jobs + 1 refused layout, rerun skipped; "
          f"test wall {time.time() - started:.0f} s")
