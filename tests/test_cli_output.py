"""What a user sees: a config or checkpoint error is one line, printed once for all ranks,
and every rank exits 2 with no traceback of ours; a CPU run starts without warnings that a
user cannot act on (megatron-core's notices for Apex / Transformer Engine absent are counted
in the banner instead)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import QUICKSTART, ROOT, pretrain

OUR_TRACEBACK = re.compile(r'File ".*(megatron_mm|launch/pretrain\.py|tools/)')


def _exit_codes(output: str) -> list[int]:
    """The workers' exit codes in torchrun's failure report."""
    return [int(code) for code in re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", output, re.MULTILINE)]


def _assert_once_and_exit_2(proc: subprocess.CompletedProcess, prefix: str) -> None:
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output[-4000:]
    assert proc.returncode != 0
    assert _exit_codes(output) == [2, 2], output[-4000:]  # both ranks, not a SIGTERM
    assert not OUR_TRACEBACK.search(output), output[-4000:]


def test_config_error_printed_once_every_rank_exits_2():
    proc = pretrain(2, ["data.source=synthetic", "model.no_such_key=3"], check=False, timeout=300)
    _assert_once_and_exit_2(proc, "config error: model.no_such_key: unknown key")


def test_checkpoint_error_after_process_groups_printed_once_every_rank_exits_2(tmp_path):
    """A checkpoint that passes the checks made before the process groups start (its metadata
    is there) and fails once they run (common.pt is not a checkpoint)."""
    folder = tmp_path / "iter_0000001"
    folder.mkdir()
    (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                          '"common_backend": "torch", "common_backend_version": 1}')
    (folder / "common.pt").write_text("not a pickle")
    proc = pretrain(2, ["data.source=synthetic", f"checkpoint.load={folder}", f"run.dir={tmp_path / 'run'}"],
                    check=False, timeout=300)
    _assert_once_and_exit_2(proc, f"checkpoint error: checkpoint.load={folder}: common.pt is corrupt")


def test_cpu_start_up_prints_no_warning(tmp_path):
    """Warnings shown as for a user (the suite's PYTHONWARNINGS=ignore cleared): a two-step run's
    stderr holds no warning and no C++/profiler log line; the banner counts the hidden notices."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    args = ["data.source=synthetic", "train.steps=2", "train.scheduler.warmup_steps=1", f"run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", QUICKSTART]
                          + [a for o in args for a in ("--set", o)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    noisy = [line for line in proc.stderr.splitlines()
             if re.search(r"warn|^\[(rank\d+\]:\[)?W\d{4}|USDT|Rerun State Machine", line, re.IGNORECASE)]
    assert noisy == [], proc.stderr[-4000:]
    assert re.search(r"^runtime: no Apex, no Transformer Engine .*; \d+ megatron-core notices about them hidden$",
                     proc.stdout, re.MULTILINE), proc.stdout[-2000:]


@pytest.mark.parametrize("env, printed", [({}, True), ({"RANK": "0", "WORLD_SIZE": "2"}, True),
                                          ({"RANK": "1", "WORLD_SIZE": "2"}, False),
                                          ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, False)])
def test_report_errors_prints_on_rank_0_only(monkeypatch, capsys, env, printed):
    from megatron_mm import cli
    from megatron_mm.config import ConfigError

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def work():
        raise ConfigError(["a.b=1: must be 2", "c.d=3: must be 4"])

    assert cli.report_errors(work) == 2
    err = capsys.readouterr().err
    assert err == ("config error: a.b=1: must be 2\nconfig error: c.d=3: must be 4\n" if printed else "")


def test_plan_tool_config_error_is_one_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--config", QUICKSTART,
                           "--cluster", os.path.join(ROOT, "configs", "clusters", "h800.yaml"), "--gpus", "8",
                           "--set", "parallel.nonsense=1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("config error: parallel.nonsense: unknown key"), proc.stderr


def test_rank_specific_error_is_printed_by_its_rank(monkeypatch, capsys):
    """Under torchrun (its agent's store), rank 1 prints its error, prefixed, unless rank 0
    printed the same; it waits for the others at most LEAVE_TIMEOUT_S."""
    import datetime

    from torch.distributed import TCPStore

    from conftest import free_port
    from megatron_mm import cli

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "0"}
    monkeypatch.setattr(cli, "LEAVE_TIMEOUT_S", 0.3)
    assert cli._report(["checkpoint error: shard 3 unreadable"], env)  # rank 0 never came
    assert capsys.readouterr().err == "[rank 1] checkpoint error: shard 3 unreadable\n"
    env["TORCHELASTIC_RESTART_COUNT"] = "1"
    server.set("megatron_mm/error_exit/1/rank0", "checkpoint error: same on every rank")
    server.add("megatron_mm/error_exit/1/count", 1)
    assert cli._report(["checkpoint error: same on every rank"], env)
    assert capsys.readouterr().err == ""
