"""Write an sbatch script that trains (or benchmarks) a config on a SLURM cluster, and show
its rank map.

    python tools/make_sbatch.py --config F --cluster configs/clusters/NAME.yaml --nodes N \
        [--set k=v ...] [--out FILE] [--print-map] [--map-nodes K] [--time D-HH:MM:SS] \
        [--partition P] [--account A] [--qos Q] [--job-name NAME] [--runs-root DIR] \
        [--repo DIR] [--python PY] [--setup CMD] [--signal-minutes M] [--max-restarts R] \
        [--benchmark STEPS[,WARMUP]]

--benchmark writes a job that runs tools/benchmark.py instead of training (from
slurm/benchmark.sbatch.in: no checkpoints, no requeue; its JSON report goes to
$RUN_DIR/benchmark.json, MFU against the cluster profile's peak).

The config (with --set overrides and the cluster's MFU peak) is validated against the
cluster (`validate` with the profile's Hardware: FP8, GPUs per node; `check_fits`: GPU
memory) for nodes x GPUs-per-node ranks before anything is written; a request that cannot run is
refused with one line per broken rule (`refused: key=value: rule`, exit 2).

With --out the script goes to FILE and the report (layout, memory, map) to stdout, ending
with one JSON line; without --out the script goes to stdout and the report to stderr, so
`tools/make_sbatch.py ... | sbatch` works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

from megatron_mm.config import ConfigError, load_config, validate  # noqa: E402
from megatron_mm.costs.memory import GIB, MemoryEstimate, estimate_memory  # noqa: E402
from megatron_mm.planning.cluster import ClusterProfile, load_cluster, project_path  # noqa: E402
from megatron_mm.planning.fit import check_fits  # noqa: E402

TEMPLATE = os.path.join(ROOT, "slurm", "pretrain.sbatch.in")
BENCHMARK_TEMPLATE = os.path.join(ROOT, "slurm", "benchmark.sbatch.in")
TIME_FORMATS = (r"\d+", r"\d+:\d{2}", r"\d+:\d{2}:\d{2}", r"\d+-\d+", r"\d+-\d+:\d{2}", r"\d+-\d+:\d{2}:\d{2}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--cluster", required=True, help="cluster profile, configs/clusters/NAME.yaml")
    parser.add_argument("--nodes", required=True, type=int, help="number of nodes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable); passed on to the job")
    parser.add_argument("--out", help="write the script here (default: stdout)")
    parser.add_argument("--print-map", action="store_true", help="print node -> ranks -> TP/PP/DP/EP coordinates")
    parser.add_argument("--map-nodes", type=int, default=0, help="with --print-map: only the first and last K nodes")
    parser.add_argument("--time", default="24:00:00", help="sbatch --time (default 24:00:00)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--job-name", help="default: the config file's name")
    parser.add_argument("--repo", default=ROOT, help="checkout the job runs from (default: this one)")
    parser.add_argument("--runs-root", help="run directories and job logs go here (default: REPO/runs)")
    parser.add_argument("--python", default="python3", help="interpreter on the compute nodes")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="shell line run before srun, e.g. 'source venv/bin/activate' (repeatable)")
    parser.add_argument("--signal-minutes", type=int, default=10,
                        help="SIGUSR1 this long before the time limit: checkpoint and requeue (default 10)")
    parser.add_argument("--max-restarts", type=int, default=20, help="requeue at most this many times")
    parser.add_argument("--benchmark", type=benchmark_steps, metavar="STEPS[,WARMUP]",
                        help="a job that runs tools/benchmark.py: STEPS timed steps after WARMUP (default 2)")
    return parser.parse_args(argv)


def benchmark_steps(text: str) -> tuple[int, int]:
    """--benchmark STEPS[,WARMUP] as (steps, warmup)."""
    steps, _, warmup = text.partition(",")
    try:
        pair = int(steps), int(warmup or 2)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEPS or STEPS,WARMUP (integers)") from None
    if pair[0] < 1 or pair[1] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: STEPS must be >= 1 and WARMUP >= 0")
    return pair


def time_minutes(text: str) -> int:
    """sbatch --time in minutes (formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [int(x) for x in rest.split(":")]
    if "-" in text:  # D-H, D-H:M, D-H:M:S
        h, m = parts[0], parts[1] if len(parts) > 1 else 0
        return int(days) * 1440 + h * 60 + m
    if len(parts) == 3:
        return parts[0] * 60 + parts[1]
    return parts[0]  # M or M:S


def check_request(args, cluster: ClusterProfile) -> list[str]:
    """The job-level rules (the config-level ones are `validate`'s)."""
    problems = []
    if args.nodes < 1:
        problems.append(f"--nodes={args.nodes}: must be at least 1")
    if not any(re.fullmatch(f, args.time) for f in TIME_FORMATS):
        problems.append(f"--time={args.time}: must be minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time)")
    elif args.benchmark:
        pass  # no checkpoint signal, no requeue
    elif args.signal_minutes >= time_minutes(args.time):
        problems.append(f"--signal-minutes={args.signal_minutes}: must be shorter than --time={args.time}, "
                        f"or the checkpoint signal would come before the job starts training")
    if args.signal_minutes < 1:
        problems.append(f"--signal-minutes={args.signal_minutes}: must be at least 1 (time to write a checkpoint)")
    if args.max_restarts < 0:
        problems.append(f"--max-restarts={args.max_restarts}: must be >= 0")
    if args.job_name is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.job_name):
        problems.append(f"--job-name={args.job_name!r}: use letters, digits and _ . + - only")
    return problems


def plan(args):
    """(cluster, cfg, overrides passed to the job, world size, memory estimate) or ConfigError."""
    cluster = load_cluster(args.cluster)
    problems = check_request(args, cluster)
    if problems:
        raise ConfigError(problems)
    overrides = list(args.overrides)
    if cluster.peak_tflops_bf16 and not any(o.split("=", 1)[0].strip() == "logging.peak_tflops_per_gpu"
                                            for o in overrides):
        # MFU against the dense BF16 peak (also for FP8 runs, so MFU compares across precisions).
        overrides.append(f"logging.peak_tflops_per_gpu={cluster.peak_tflops_bf16:g}")
    cfg = load_config(args.config, overrides)
    world = args.nodes * cluster.gpus_per_node
    validate(cfg, world, cluster.hardware())
    check_fits(cfg, world, cluster.hardware())
    return cluster, cfg, overrides, world, estimate_memory(cfg, world)


def memory_summary(est: MemoryEstimate) -> str:
    w = est.worst
    return (f"stage {w.stage}: model state {w.model_state_bytes / GIB:.1f} GiB + activations "
            f"{w.activation_bytes / GIB:.1f} GiB ({w.in_flight} in flight) = {w.total_bytes / GIB:.1f} GiB")


def render(args, cluster: ClusterProfile, cfg, overrides: list[str], world: int, est: MemoryEstimate,
           command: str) -> str:
    q = shlex.quote
    repo = os.path.abspath(args.repo)
    runs_root = args.runs_root or os.path.join(repo, "runs")
    config = project_path(args.config)
    job_name = args.job_name or os.path.splitext(os.path.basename(args.config))[0]
    extra = []
    if cluster.gres and cluster.has_gpus:
        extra.append(f"#SBATCH --gpus-per-node={cluster.gpus_per_node}")
    if cluster.exclusive:
        extra.append("#SBATCH --exclusive")
    for flag in ("partition", "account", "qos"):
        if getattr(args, flag):
            extra.append(f"#SBATCH --{flag}={getattr(args, flag)}")
    env = "\n".join(f"export {k}={q(str(v))}" for k, v in cluster.env.items()) or "# (none)"
    p = cfg.parallel
    layout = (f"tp={p.tp} pp={p.pp} ep={p.ep} etp={p.etp} vpp={p.vpp or '-'} dp={est.dp} "
              f"expert_dp={est.expert_dp}")
    ckpt = q(cfg.checkpoint.dir) if cfg.checkpoint.dir else "$RUN_DIR/checkpoints"
    values = {
        "COMMAND": command,
        "CLUSTER": f"{cluster.name} ({cluster.gpu or 'CPU only'})",
        "CLUSTER_FILE": project_path(args.cluster),
        "NODES": str(args.nodes),
        "TASKS_PER_NODE": str(cluster.gpus_per_node),
        "WORLD": str(world),
        "LAYOUT": layout,
        "MEMORY": memory_summary(est) if cluster.gpu_memory_gib else memory_summary(est) + " (not checked: no GPU memory in the profile)",
        "JOB_NAME": job_name,
        "CPUS_PER_TASK": str(cluster.cpus_per_task),
        "TIME": args.time,
        "SBATCH_EXTRA": "".join(line + "\n" for line in extra),
        "SIGNAL_SECONDS": str(args.signal_minutes * 60),
        "LOG_DIR": runs_root,
        "REPO": q(repo),
        "RUNS_ROOT": q(runs_root),
        "CKPT_DIR": ckpt,
        "STEPS": str(cfg.train.steps),
        "MAX_RESTARTS": str(args.max_restarts),
        "ENV": env,
        "SETUP": "".join(line + "\n" for line in args.setup),
        "PYTHON": q(args.python),
        "CONFIG": q(config),
        "OVERRIDES": "".join(f"  --set {q(o)} \\\n" for o in overrides),
    }
    if args.benchmark:
        steps, warmup = args.benchmark
        values["BENCHMARK_ARGS"] = f"--steps {steps} --warmup {warmup} --cluster {q(project_path(args.cluster))}"
    with open(BENCHMARK_TEMPLATE if args.benchmark else TEMPLATE) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{[A-Z_]+\}\}", text)
    assert not leftover, leftover
    return text


def report(args, cluster: ClusterProfile, cfg, world: int, est: MemoryEstimate, out) -> None:
    from megatron_mm.planning.layout import ORDER, describe_groups, format_node, rank_map

    p = cfg.parallel
    say = lambda line="": print(line, file=out)  # noqa: E731
    say(f"cluster {cluster.name}: {args.nodes} node(s) x {cluster.gpus_per_node} "
        f"{cluster.gpu or 'CPU rank'}(s) = {world} ranks")
    say(f"layout: tp={p.tp} pp={p.pp} ep={p.ep} etp={p.etp} vpp={p.vpp or '-'} -> dp={est.dp}, "
        f"expert dp={est.expert_dp}; {est.microbatches} micro-batch(es) of {cfg.train.micro_batch_size} "
        f"x {cfg.model.seq_length} tokens per step; megatron-core order {ORDER}")
    from megatron_mm.costs import pipeline_split

    layers = pipeline_split.plan(cfg).layers
    extras = ["embedding"] + (["encoders"] if cfg.model.vision or cfg.model.audio else [])
    tail = ["output head"] + ([f"{cfg.model.mtp_num_layers} MTP layer(s)"] if cfg.model.mtp_num_layers else [])
    say(f"decoder layers by stage: {', '.join(map(str, layers)) if p.pp <= 16 else layers}; "
        f"stage 0 also holds the {' and '.join(extras)}, stage {p.pp - 1} the {' and '.join(tail)}")
    coords = rank_map(p.tp, p.pp, p.ep, p.etp, world, cluster.gpus_per_node)
    for line in describe_groups(coords, p.tp, p.pp, p.ep, p.etp, cluster.gpus_per_node):
        say(line)
    if cfg.logging.peak_tflops_per_gpu:
        say(f"MFU against {cfg.logging.peak_tflops_per_gpu:g} TFLOP/s a GPU (logging.peak_tflops_per_gpu)")
    say(f"memory a GPU (planner estimate; {cfg.precision.dtype} weights, fp32 grads, "
        f"{cfg.train.optimizer.name} state {'sharded over DP by the distributed optimizer' if cfg.train.optimizer.use_distributed_optimizer else 'replicated'};"
        f" activations {'with full' if cfg.parallel.recompute == 'full' else 'without'} recomputation,"
        f" see megatron_mm/costs/memory.py):")
    for line in est.table():
        say("  " + line)
    worst = est.worst
    if cluster.gpu_memory_gib:
        usable = cluster.gpu_memory_gib - cluster.reserved_memory_gib
        say(f"  worst: {memory_summary(est)} of {usable:g} GiB usable "
            f"({cluster.gpu_memory_gib:g} GiB less {cluster.reserved_memory_gib:g} reserved)")
        if worst.total_bytes / GIB > usable:
            say(f"warning: with activations stage {worst.stage} needs about {worst.total_bytes / GIB:.0f} GiB, over the "
                f"{usable:g} GiB usable: the model state fits, the activations need recomputation, more "
                f"tensor parallelism or more pipeline stages")
    if args.print_map:
        nodes = range(args.nodes)
        k = args.map_nodes
        if k and 2 * k < args.nodes:
            nodes = [*range(k), None, *range(args.nodes - k, args.nodes)]
        for node in nodes:
            if node is None:
                say(f"... (nodes {k}-{args.nodes - k - 1} follow the same pattern)")
                continue
            for line in format_node(coords, node, cluster.gpus_per_node):
                say(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/make_sbatch.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        cluster, cfg, overrides, world, est = plan(args)
    except ConfigError as err:
        for line in err.problems:
            print(f"refused: {line}", file=sys.stderr)
        return 2
    script = render(args, cluster, cfg, overrides, world, est, command)
    out = sys.stdout if args.out else sys.stderr
    report(args, cluster, cfg, world, est, out)
    if not args.out:
        sys.stdout.write(script)
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(script)
    if os.path.isfile(args.out):  # not /dev/null
        os.chmod(args.out, 0o755)
    repo = os.path.abspath(args.repo)
    runs_root = args.runs_root or os.path.join(repo, "runs")
    if os.path.isdir(repo):  # the job's checkout is here (shared file system): make the log folder
        os.makedirs(runs_root, exist_ok=True)  # sbatch does not create the --output folder
    else:
        print(f"note: {repo} is not here; create {runs_root} on the cluster before sbatch "
              f"(sbatch does not create the --output folder)", file=out)
    print(f"wrote {args.out}", file=out)
    print(json.dumps({"script": args.out, "cluster": cluster.name, "nodes": args.nodes, "world_size": world,
                      "memory": est.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
