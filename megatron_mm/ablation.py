"""Parallel-layout ablation: benchmark one config under a list of layouts and tabulate them
(`tools/ablate.py` is its command line and documents the layouts file and the output folder).

Every layout runs tools/benchmark.py: with the local launcher one after another on this
machine, with the SLURM launcher as one job a layout (written by tools/make_sbatch.py
--benchmark), all submitted at once and then waited for. A layout the config rules refuse for
its world size (`validate` and `planning.fit.check_fits`, as every launch) is recorded as
failed without starting anything. A rerun skips layouts with a report for the same request.
The tables (CSV, Markdown, PNG) are written from the reports on disk.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from megatron_mm.config import ConfigError, load_config, validate
from megatron_mm.costs.memory import GIB, estimate_memory
from megatron_mm.planning.cluster import CHECKOUT, load_cluster, project_path
from megatron_mm.planning.fit import check_fits
from megatron_mm.planning.layout import parallel_layout

BENCHMARK = os.path.join(CHECKOUT, "tools", "benchmark.py")
MAKE_SBATCH = os.path.join(CHECKOUT, "tools", "make_sbatch.py")
NAME = re.compile(r"[A-Za-z0-9_.+-]+")
# SLURM job states after which a job will not run again (see `scontrol show job`).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}

# The table: (CSV column, Markdown header, Markdown format). Numbers come from the layout's
# benchmark.json, except the planner's estimate and its ratio to the measurement.
COLUMNS = [
    ("layout", "layout", "{}"),
    ("world_size", "ranks", "{}"),
    ("tp", "TP", "{}"),
    ("pp", "PP", "{}"),
    ("vpp", "VPP", "{}"),
    ("ep", "EP", "{}"),
    ("etp", "ETP", "{}"),
    ("dp", "DP", "{}"),
    ("sequence_parallel", "SP", "{}"),
    ("micro_batch_size", "micro-batch", "{}"),
    ("recompute", "recompute", "{}"),
    ("step_time_s", "step (s)", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("tokens_per_s_per_gpu", "tokens/s/GPU", "{:.0f}"),
    ("tflops_per_gpu", "TFLOP/s/GPU", "{:.3g}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_memory_gib", "peak memory GiB (max rank)", "{:.3g}"),
    ("estimated_memory_gib", "estimate GiB", "{:.3g}"),
    ("estimate_over_measured", "estimate / measured", "{:.3g}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("status", "status", "{}"),
    ("error", None, "{}"),  # CSV only; the Markdown status cell says it
]


def estimated_memory_gib(cfg, world_size: int) -> float:
    """The planner's memory a GPU for this layout: its worst pipeline stage's total."""
    return estimate_memory(cfg, world_size).worst.total_bytes / GIB


# --------------------------------------------------------------------------- the layouts


@dataclass
class Layout:
    name: str
    world_size: int
    nodes: int | None  # slurm only
    overrides: list[str] = field(default_factory=list)


def read_layouts(path: str, launcher: str, ranks_per_node: int | None) -> list[Layout]:
    """The layouts file; ConfigError with one line per problem."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError([f"--layouts {path}: not found"])
    with open(path) as f:
        try:
            entries = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError([f"--layouts {path}: not valid YAML: {' '.join(str(err).split())}"]) from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError([f"--layouts {path}: must be a non-empty YAML list of {{name, ranks|nodes, set}}"])
    layouts, problems, seen = [], [], set()
    for i, entry in enumerate(entries, 1):
        where = f"--layouts {path}: entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with name, ranks or nodes, set")
            continue
        name, sets = entry.get("name"), entry.get("set") or []
        ranks, nodes = entry.get("ranks"), entry.get("nodes")
        unknown = set(entry) - {"name", "ranks", "nodes", "set"}
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (name, ranks, nodes, set)")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            problems.append(f"{where}: name={name!r}: use letters, digits and _ . + - only")
        elif name in seen:
            problems.append(f"{where}: name={name}: used twice")
        seen.add(name)
        where = f"--layouts {path}: {name}"
        if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
            problems.append(f"{where}: set={sets!r}: must be a list of dotted.key=value")
        for key, value in (("ranks", ranks), ("nodes", nodes)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"{where}: {key}={value!r}: must be a positive integer")
        if launcher == "local":
            if ranks is None:
                problems.append(f"{where}: ranks: needed with --launcher local")
            world = ranks
        elif nodes is not None:
            world = nodes * ranks_per_node
            if ranks is not None and ranks != world:
                problems.append(f"{where}: ranks={ranks}: nodes={nodes} x {ranks_per_node} ranks a node "
                                f"is {world}")
        elif ranks is not None and ranks % ranks_per_node == 0:
            nodes, world = ranks // ranks_per_node, ranks
        else:
            problems.append(f"{where}: nodes: needed with --launcher slurm (or ranks, a multiple of the "
                            f"cluster's {ranks_per_node} ranks a node)")
        layouts.append(Layout(str(name), world or 0, nodes, list(sets) if isinstance(sets, list) else []))
    if problems:
        raise ConfigError(problems)
    return layouts


def check(args, layout: Layout, hardware):
    """(the layout's config, None) or (None, the one line saying why it cannot run)."""
    try:
        cfg = load_config(args.config, args.overrides + layout.overrides)
        validate(cfg, layout.world_size, hardware)
        check_fits(cfg, layout.world_size, hardware)
        return cfg, None
    except ConfigError as err:
        return None, "config error: " + "; ".join(err.problems)


# --------------------------------------------------------------------------- a layout's folder


class Folder:
    """DIR/NAME/: what was asked, the run's log, and its outcome."""

    def __init__(self, out: str, name: str):
        self.path = os.path.join(out, name)
        self.request, self.log, self.job = (os.path.join(self.path, f) for f in ("request.json", "log.txt", "job.json"))
        self.report, self.error = os.path.join(self.path, "benchmark.json"), os.path.join(self.path, "error.txt")

    def read(self, path: str):
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return f.read().strip() if path == self.error else json.load(f)

    def write(self, path: str, value) -> None:
        with open(path, "w") as f:
            f.write(value + "\n" if isinstance(value, str) else json.dumps(value, indent=1))

    def start(self, request: dict) -> None:
        """Forget an earlier attempt's outcome (its logs and run folders stay) and record the request."""
        os.makedirs(self.path, exist_ok=True)
        for path in (self.report, self.error, self.job):
            if os.path.exists(path):
                os.remove(path)
        self.write(self.request, request)

    def fail(self, line: str) -> str:
        self.write(self.error, line)
        return line


def error_line(log: str, code=None) -> str:
    """Why a run failed, in one line: a tool's own error line, else the first exception
    (not torchrun's summary of its children), else the log's last line."""
    mine = re.search(r"(config error|checkpoint error|refused): .*?(?=(config error|checkpoint error|refused): |$)",
                     log, re.M)
    if mine:
        return mine.group(0).strip()
    for line in log.splitlines():
        line = re.sub(r"^\[rank\d+\]:\s*", "", line.strip())
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:", line) and "ChildFailedError" not in line:
            return line
    last = [line.strip() for line in log.splitlines() if line.strip()]
    return f"exit status {code}: {last[-1] if last else '(no output)'}"


def read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# --------------------------------------------------------------------------- launchers


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(args, layout: Layout, folder: Folder) -> str | None:
    """Benchmark the layout on this machine; None, or why it failed."""
    n = layout.world_size
    launch = [sys.executable] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}"]
    cmd = launch + [BENCHMARK, "--config", args.config,
                    *sets(args.overrides + layout.overrides + [f"run.dir={os.path.abspath(folder.path)}/run"]),
                    "--steps", str(args.steps), "--warmup", str(args.warmup),
                    *(["--cluster", args.cluster] if args.cluster else []), "--out", folder.report]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for its ranks: one rank alone gets the same
    with open(folder.log, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout or None)
        except subprocess.TimeoutExpired:
            return f"timed out after {args.timeout} s (--timeout)"
        finally:
            stop(proc)
    if code == 0 and os.path.isfile(folder.report):
        return None
    return error_line(read_log(folder.log), code)


def stop(proc: subprocess.Popen) -> None:
    """End a run this tool started (its process group: torchrun and its ranks), if still running."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


def submit(args, layout: Layout, folder: Folder) -> str | None:
    """Write the layout's benchmark job (tools/make_sbatch.py --benchmark) and sbatch it;
    None (the job is in job.json), or why not."""
    script = os.path.join(folder.path, "job.sbatch")
    argv = ["--config", args.config, "--cluster", args.cluster, "--nodes", str(layout.nodes),
            *sets(args.overrides + layout.overrides), "--benchmark", f"{args.steps},{args.warmup}",
            "--job-name", layout.name, "--runs-root", os.path.abspath(folder.path), "--time", args.time,
            "--python", args.python, *[a for s in args.setup for a in ("--setup", s)], "--out", script]
    for flag in ("partition", "account", "qos"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    with open(folder.log, "w") as log:
        code = subprocess.run([sys.executable, MAKE_SBATCH, *argv], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return error_line(read_log(folder.log), code)
    sbatch = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True, cwd=folder.path)
    if sbatch.returncode != 0:
        return f"sbatch: {' '.join(sbatch.stderr.split()) or f'exit status {sbatch.returncode}'}"
    job_id = sbatch.stdout.strip().split(";")[0]
    run_dir = os.path.join(os.path.abspath(folder.path), f"{layout.name}-{job_id}")
    folder.write(folder.job, {"job_id": job_id, "run_dir": run_dir, "log": f"{run_dir}.out", "script": script})
    return None


def job_state(job_id: str) -> str | None:
    """SLURM's state of the job, None once SLURM no longer knows it, "" when it cannot tell now."""
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True)
    if out.returncode != 0:
        return None if "Invalid job id" in out.stderr else ""
    found = re.search(r"\bJobState=(\S+)", out.stdout)
    return found.group(1) if found else ""


def collect(folder: Folder, state: str | None) -> str | None:
    """A finished job's report into the layout's folder; None, or why there is none."""
    job = folder.read(folder.job)
    report = os.path.join(job["run_dir"], "benchmark.json")
    if os.path.isfile(report):
        shutil.copyfile(report, folder.report)
        return None
    log = read_log(job["log"])
    return error_line(log) if log.strip() else f"job {job['job_id']} {state or 'gone'}: no report, no log"


# --------------------------------------------------------------------------- the table


def row(layout: Layout, cfg, folder: Folder) -> dict:
    """The layout's table row: its report's numbers (and the planner's estimate), or its error."""
    report = folder.read(folder.report)
    r = {name: None for name, _, _ in COLUMNS}
    r.update(layout=layout.name, world_size=layout.world_size)
    if cfg is not None:
        r.update(parallel_layout(cfg, layout.world_size))
        r["estimated_memory_gib"] = estimated_memory_gib(cfg, layout.world_size)
    if report is None:
        r.update(status="failed", error=folder.read(folder.error) or "no report")
        return {name: r[name] for name, _, _ in COLUMNS}
    r.update(report["layout"])
    r.update(world_size=report["world_size"], step_time_s=report["step_time_s"]["mean"],
             tokens_per_s=report["tokens_per_s"], tokens_per_s_per_gpu=report["tokens_per_s_per_gpu"],
             tflops_per_gpu=report["tflops_per_gpu"], mfu=report["mfu"],
             peak_memory_gib=max(report["peak_memory_gib"], key=lambda v: -1 if v is None else v), final_loss=report["loss"]["final"], status="ok", error="")
    if r["estimated_memory_gib"] is not None and r["peak_memory_gib"]:
        r["estimate_over_measured"] = r["estimated_memory_gib"] / r["peak_memory_gib"]
    return {name: r[name] for name, _, _ in COLUMNS}


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=[name for name, _, _ in COLUMNS])
        out.writeheader()
        out.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])


def markdown(rows: list[dict], command: str) -> str:
    shown = [(name, header, fmt) for name, header, fmt in COLUMNS if header]

    def cell(r, name, fmt):
        if name == "status" and r["status"] != "ok":
            return f"failed: {r['error']}".replace("|", "\\|")
        return "–" if r[name] is None else fmt.format(r[name])

    lines = [f"`{command}`", "", "| " + " | ".join(h for _, h, _ in shown) + " |",
             "|" + "|".join("---" for _ in shown) + "|"]
    lines += ["| " + " | ".join(cell(r, name, fmt) for name, _, fmt in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    """Two panels: tokens/s, and peak memory (measured, max over ranks; planner estimate) per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    x = list(range(len(ok)))
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(4 + 1.1 * max(len(ok), 2), 4.5))
    speed.bar(x, [r["tokens_per_s"] for r in ok], color="tab:blue")
    speed.set(title="throughput", ylabel="tokens/s")
    gib = max(max(r["peak_memory_gib"] or 0 for r in ok), max(r["estimated_memory_gib"] or 0 for r in ok)) >= 1
    unit, scale = ("GiB", 1) if gib else ("MiB", 1024)  # a tiny model's megabytes read better as MiB
    size = lambda v: math.nan if v is None else v * scale  # noqa: E731
    memory.bar([i - 0.2 for i in x], [size(r["peak_memory_gib"]) for r in ok], 0.4,
               label="measured (max over ranks)", color="tab:orange")
    memory.bar([i + 0.2 for i in x], [size(r["estimated_memory_gib"]) for r in ok], 0.4, label="planner estimate",
               color="tab:gray")
    memory.set(title="peak memory a rank", ylabel=unit)
    for ax in (speed, memory):
        ax.set_xticks(x, [r["layout"] for r in ok], rotation=40, ha="right")
    fig.suptitle(title)
    fig.legend(loc="lower center", ncol=2, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the sweep


def sweep(args, command: str) -> list[str]:
    """Run (or submit and wait for) every layout of `args` (tools/ablate.py's arguments), write
    the tables; the names of the layouts that failed. A bad config, cluster or layouts file
    raises ConfigError before any layout starts."""
    failed: list[str] = []
    load_config(args.config, args.overrides)  # a bad config or --set stops here, before any layout
    if args.launcher == "slurm":
        cluster = load_cluster(args.cluster)
        ranks_per_node, hardware = cluster.gpus_per_node, cluster.hardware()
    else:
        from megatron_mm.runtime.distributed import detect_hardware

        ranks_per_node, hardware = None, detect_hardware()
    layouts = read_layouts(args.layouts, args.launcher, ranks_per_node)
    os.makedirs(args.out, exist_ok=True)
    cfgs, waiting = {}, {}
    for i, layout in enumerate(layouts, 1):
        nodes = f"{layout.nodes} node(s), " if layout.nodes else ""
        tag = (f"[{i}/{len(layouts)}] {layout.name} ({nodes}{layout.world_size} rank(s)"
               f"{', ' + ' '.join(layout.overrides) if layout.overrides else ''})")
        cfgs[layout.name], problem = check(args, layout, hardware)
        folder = Folder(args.out, layout.name)
        outcome = run_layout(args, layout, folder, problem, lambda text: say(f"{tag}: {text}"))
        if outcome == "failed":
            failed.append(layout.name)
        elif outcome == "waiting":
            waiting[layout.name] = folder
    failed.extend(wait_for_jobs(args, waiting))

    rows = [row(layout, cfgs[layout.name], Folder(args.out, layout.name)) for layout in layouts]
    paths = {kind: os.path.join(args.out, f"ablation.{kind}") for kind in ("csv", "md", "png")}
    write_csv(rows, paths["csv"])
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, command))
    plot(rows, paths["png"], f"{os.path.basename(args.config)}: {args.steps} timed steps a layout"
         + (f" ({len(failed)} failed: see the table)" if failed else ""))
    say(f"wrote {', '.join(paths.values())}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    say(json.dumps({"command": command, **paths, "failed": failed, "rows": rows}))
    return failed


def say(text: str) -> None:
    print(text, flush=True)


def run_layout(args, layout: Layout, folder: Folder, problem: str | None, note) -> str:
    """One layout: "done" (run now, or before with the same request), "failed" (recorded in
    error.txt), or "waiting" (its SLURM job is queued or running). The request names files of
    this checkout by their path in it, so a request (and the results kept beside it) means the
    same in another checkout."""
    request = {"config": project_path(args.config), "overrides": args.overrides + layout.overrides,
               "world_size": layout.world_size, "nodes": layout.nodes, "launcher": args.launcher,
               "steps": args.steps, "warmup": args.warmup,
               "cluster": project_path(args.cluster) if args.cluster else None}
    same = folder.read(folder.request) == request
    if same and os.path.isfile(folder.report):
        note(f"done before ({folder.report}), skipped")
        return "done"
    if same and folder.read(folder.job) and not os.path.isfile(folder.error):
        note(f"job {folder.read(folder.job)['job_id']} submitted before: waiting for it")
        return "waiting"
    folder.start(request)
    if problem:
        note(f"FAILED (not started): {folder.fail(problem)}")
        return "failed"
    started = time.time()
    note("running ..." if args.launcher == "local" else "submitting ...")
    problem = (run_local if args.launcher == "local" else submit)(args, layout, folder)
    if problem:
        note(f"FAILED after {time.time() - started:.0f} s: {folder.fail(problem)} (log: {folder.log})")
        return "failed"
    if args.launcher == "slurm":
        note(f"job {folder.read(folder.job)['job_id']} submitted")
        return "waiting"
    note(f"done in {time.time() - started:.0f} s: {summary(folder.read(folder.report))}")
    return "done"


def summary(report: dict) -> str:
    return (f"{report['step_time_s']['mean']:.3f} s/step, {report['tokens_per_s']:.0f} tokens/s, "
            f"peak {max(report['peak_memory_gib']):.3g} GiB, loss {report['loss']['final']:.4f}")


def wait_for_jobs(args, waiting: dict) -> list[str]:
    """Wait for the SLURM jobs, collecting each report as its job ends (a line on every state
    change); the layouts whose job left no report."""
    if waiting:
        say(f"waiting for {len(waiting)} SLURM job(s) (state checked every {args.poll:g} s)")
    seen, failed = {}, []
    while waiting:
        for name, folder in list(waiting.items()):
            job_id = folder.read(folder.job)["job_id"]
            state = job_state(job_id)
            if state and state != seen.get(name):
                say(f"{name}: job {job_id} {state}")
                seen[name] = state
            if state == "" or (state is not None and state not in ENDED):
                continue
            del waiting[name]
            problem = collect(folder, state)
            if problem:
                failed.append(name)
                say(f"{name}: FAILED: {folder.fail(problem)}")
            else:
                say(f"{name}: done: {summary(folder.read(folder.report))}")
        if waiting:
            time.sleep(args.poll)
    return failed

