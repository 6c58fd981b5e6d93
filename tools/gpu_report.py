"""One GPU, one command, at most --budget-s seconds (default 8 min): the numbers a user asks of
this system on their GPU, written to `<out-dir>/gpu/<date>-<gpu>.json` and as a section
appended to `<out-dir>/gpu.md`.

    python tools/gpu_report.py [--out-dir results] [--budget-s 480]
    python tools/gpu_report.py --cpu-smoke --out-dir /tmp/report     # every part, toy size, on CPU

Parts (each skipped with a one-line reason when its package, device or time is missing):
  gemm          bf16 matmul ceiling, 8192^3 (TFLOP/s), torch alone
  benchmark     tools/benchmark.py on configs/bench/deepseek_v2_lite_4layers_1gpu.yaml (4 layers of
                DeepSeek-V2-Lite, bf16, seq 4096): the config as shipped, then grouped experts
                (`model.moe_grouped_gemm`) and dense-mask / fused document attention
                (`model.document_attention`); tokens/s, MFU, peak memory against the planner's
                estimate. A variant whose key the config does not know is skipped. These runs hide
                Transformer Engine (a `transformer_engine` that fails to import first on the path),
                so they use the portable spec even where TE is installed.
  transformers  plain `transformers` DeepseekV3ForCausalLM training steps on the same model and
                batch (megatron_mm/conversion/transformers_baseline.py), tokens/s side by side
  data          tools/benchmark_data.py on the same fixture shards: DALI (`mixed` decode on a GPU)
                and the PyTorch DataLoader + Pillow, images/s
  te            where `transformer_engine.pytorch` imports: te_bundle's smoke test, then the
                benchmark with the TE spec in bf16 and FP8 (`delayed`, `tensorwise`, and
                `blockwise` on Hopper): tokens/s, MFU, and each timed step's loss against the
                portable run's (relative difference within TE_LOSS_TOLERANCE)

MFU: on a Hopper (H100/H200/H800) against configs/clusters/h800.yaml's peaks (989.5 bf16, 1979
FP8 dense TFLOP/s: the same chip); elsewhere against the config's `logging.peak_tflops_per_gpu`.
Every subprocess gets what is left of the budget as its time limit. Last stdout line: the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BENCH_CONFIG = "configs/bench/deepseek_v2_lite_4layers_1gpu.yaml"
SMOKE_CONFIG = "configs/quickstart_text.yaml"
SMOKE_SETTINGS = ["data.source=synthetic", "train.global_batch_size=2", "train.micro_batch_size=1"]
HOPPER_CLUSTER = "configs/clusters/h800.yaml"
# Portable variants: name -> overrides (a key the config does not know skips the variant).
VARIANTS = {
    "shipped": [],
    "grouped_experts": ["model.moe_grouped_gemm=true"],
    "dense_mask_attention": ["model.document_attention=dense_mask"],
    "fused_attention": ["model.document_attention=fused"],
}
TE_RECIPES = {"bf16": None, "fp8_delayed": "delayed", "fp8_tensorwise": "tensorwise", "fp8_blockwise": "blockwise"}
# Largest relative difference of a timed step's loss, TE spec against the portable spec, same
# seed and data: bf16 kernels differ in summation order; FP8 rounds activations and weights.
TE_LOSS_TOLERANCE = {"bf16": 0.02, "fp8": 0.05}
# ModuleNotFoundError: megatron-core's own guards (tensor_parallel/random.py) catch only that
HIDE_TE = "raise ModuleNotFoundError('transformer_engine hidden by tools/gpu_report.py: portable spec run')\n"


def say(message: str) -> None:
    print(f"gpu_report: {message}", file=sys.stderr, flush=True)


class Budget:
    """Seconds left of the run's budget; parts ask before they start."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def refuse(self, needs: float) -> str | None:
        left = self.left()
        return None if left >= needs else f"time budget: {left:.0f} s left, this needs about {needs:.0f} s"


def subprocess_json(cmd: list[str], budget: Budget, env: dict | None = None) -> dict:
    """Run a tool that ends with one JSON line; {"skipped": reason} when it fails or runs out of time."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(budget.left(), 1))
    except subprocess.TimeoutExpired:
        return {"skipped": "time budget: stopped when the budget ran out"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"{os.path.basename(cmd[1])} failed (rc {proc.returncode}): {last[:300]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- parts

def part_gemm(ctx) -> dict:
    import torch

    n, dtype = (256, torch.float32) if ctx.smoke else (8192, torch.bfloat16)
    if not ctx.smoke and not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    device = "cpu" if ctx.smoke else "cuda"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    repeats = 3 if ctx.smoke else 50
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    seconds = (time.perf_counter() - start) / repeats
    return {"shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "tflops": 2 * n**3 / seconds / 1e12}


def config_knows(config: str, overrides: list[str]) -> str | None:
    """None when the config takes these overrides, else the one-line reason it refuses them."""
    from megatron_mm.config import ConfigError, load_config

    try:
        load_config(os.path.join(ROOT, config), overrides)
    except (ConfigError, ValueError) as e:
        return str(e).splitlines()[0].split(" (known:")[0][:300]
    return None


def effective(config: str, overrides: list[str]) -> dict:
    from megatron_mm.config import load_config

    cfg = load_config(os.path.join(ROOT, config), overrides)
    return {"moe_grouped_gemm": getattr(cfg.model, "moe_grouped_gemm", None),
            "document_attention": getattr(cfg.model, "document_attention", None)}


def planner_estimate_gib(config: str, overrides: list[str]) -> float:
    from megatron_mm.config import load_config
    from megatron_mm.costs.memory import estimate_memory

    return estimate_memory(load_config(os.path.join(ROOT, config), overrides), 1).worst.total_bytes / 2**30


def benchmark(ctx, overrides: list[str], hide_te: bool) -> dict:
    """tools/benchmark.py once, as a subprocess: the numbers this report keeps."""
    if not ctx.smoke and ctx.device == "cpu":
        return {"skipped": "no GPU: the V2-Lite-shape model needs one (--cpu-smoke runs a toy model on CPU)"}
    needs = 15 if ctx.smoke else 75
    if reason := ctx.budget.refuse(needs):
        return {"skipped": reason}
    cmd = [sys.executable, "tools/benchmark.py", "--config", ctx.config, "--steps", str(ctx.steps),
           "--warmup", str(ctx.warmup), "--timing-level", "0"]
    if ctx.cluster:
        cmd += ["--cluster", ctx.cluster]
    run_dir = os.path.join(ctx.tmp, f"run{len(os.listdir(ctx.tmp))}")
    for o in ctx.settings + overrides + [f"run.dir={run_dir}"]:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if hide_te:
        env["PYTHONPATH"] = os.pathsep.join([ctx.hide_te_dir, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    say(f"benchmark {' '.join(overrides) or '(as shipped)'}{' (TE hidden)' if hide_te else ''}")
    report = subprocess_json(cmd, ctx.budget, env)
    if "skipped" in report:
        return report
    estimate = planner_estimate_gib(ctx.config, ctx.settings + overrides)
    return {"overrides": overrides, "tokens_per_s": report["tokens_per_s"], "tflops_per_gpu": report["tflops_per_gpu"],
            "mfu": report["mfu"], "mfu_source": report["mfu_source"], "step_time_s": report["step_time_s"]["mean"],
            "peak_memory_gib": report["peak_memory_gib"][0], "planner_estimate_gib": estimate,
            "losses": report["loss"]["per_step"], "timed_steps": report["timed_steps"]}


def part_benchmark(ctx) -> dict:
    shipped = effective(ctx.config, ctx.settings)
    out = {"config": ctx.config, "settings": ctx.settings, "shipped": shipped, "variants": {}}
    for name, overrides in VARIANTS.items():
        if overrides and (refused := config_knows(ctx.config, ctx.settings + overrides)):
            out["variants"][name] = {"skipped": f"the config does not take {overrides[0]}: {refused}"}
            continue
        if overrides and effective(ctx.config, ctx.settings + overrides) == shipped:
            out["variants"][name] = {"skipped": "same as shipped"}
            continue
        out["variants"][name] = benchmark(ctx, overrides, hide_te=True)
    return out


def part_transformers(ctx) -> dict:
    try:
        from megatron_mm.conversion.transformers_baseline import measure_transformers_training
    except ImportError as e:
        return {"skipped": f"megatron_mm.conversion.transformers_baseline does not import: {e}"}
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed (te_bundle --group transformers carries it)"}
    if reason := ctx.budget.refuse(10 if ctx.smoke else 60):
        return {"skipped": reason}
    from megatron_mm.config import load_config

    import torch

    cfg = load_config(os.path.join(ROOT, ctx.config), ctx.settings)
    device = "cuda" if torch.cuda.is_available() and not ctx.smoke else "cpu"
    try:
        result = measure_transformers_training(cfg, steps=ctx.steps, warmup=ctx.warmup, device=device)
    except Exception as e:  # e.g. out of memory: plain transformers has no distributed optimizer
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    portable = ctx.results.get("benchmark", {}).get("variants", {}).get("shipped", {})
    if "tokens_per_s" in portable:
        result["megatron_mm_tokens_per_s"] = portable["tokens_per_s"]
        result["megatron_mm_over_transformers"] = portable["tokens_per_s"] / result["tokens_per_s"]
    return result


def part_data(ctx) -> dict:
    if reason := ctx.budget.refuse(10 if ctx.smoke else 45):
        return {"skipped": reason}
    shards = os.path.join(ctx.data_tmp, "shards")
    n, px, seconds = (16, 32, 0.5) if ctx.smoke else (1024, 256, 10)
    have_dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    cmd = [sys.executable, "tools/benchmark_data.py", "--shards", shards, "--make", str(n), "--image-px", str(px),
           "--seconds", str(seconds), "--workers", str(1 if ctx.smoke else 8), "--cache-dir", os.path.join(ctx.data_tmp, "cache"),
           "--loader", "both" if have_dali else "torch"]
    say("data loaders")
    report = subprocess_json(cmd, ctx.budget)
    if "skipped" in report:
        return report
    import torch

    def numbers(r: dict) -> dict:  # the loader's own `skipped` (bad samples) renamed: "skipped" means a skipped part here
        return {**{k: r[k] for k in ("images_per_s", "audio_per_s", "samples_per_s", "seconds", "startup_s")},
                "bad_samples": r["skipped"]}

    out = {"samples": n, "image_px": px, "batch": report["batch"], "workers": report["workers"],
           "torch": numbers(report["torch"])}
    out["dali"] = numbers(report["dali"]) if have_dali else {"skipped": "nvidia.dali is not installed"}
    if have_dali:
        out["dali"]["decode"] = "mixed" if torch.cuda.is_available() else "cpu"
    return out


def part_te(ctx) -> dict:
    if importlib.util.find_spec("transformer_engine") is None:
        return {"skipped": "transformer_engine is not installed (tools/te_bundle.py install carries it)"}
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from te_bundle import run_smoke

    if reason := ctx.budget.refuse(20):
        return {"skipped": reason}
    smoke = run_smoke(None)
    if "skipped" in smoke or "error" in smoke:
        return {"skipped": smoke.get("skipped") or smoke["error"]}
    import torch

    out = {"smoke": smoke, "tolerance": TE_LOSS_TOLERANCE, "variants": {}}
    portable = ctx.results.get("benchmark", {}).get("variants", {}).get("shipped", {})
    major = torch.cuda.get_device_capability()[0]
    for name, fp8 in TE_RECIPES.items():
        if fp8 == "blockwise" and major != 9:
            out["variants"][name] = {"skipped": f"blockwise FP8 needs Hopper (compute capability 9.x), this is {major}.x"}
            continue
        result = benchmark(ctx, [f"precision.fp8={fp8}" if fp8 else "precision.fp8=null"], hide_te=False)
        if "losses" in result and "losses" in portable:
            diff = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], portable["losses"]))
            tolerance = TE_LOSS_TOLERANCE["fp8" if fp8 else "bf16"]
            result["loss_vs_portable"] = {"max_relative_difference": diff, "tolerance": tolerance,
                                          "within": diff <= tolerance}
        out["variants"][name] = result
    return out


# In this order: when the budget runs short, the later parts are the ones skipped (TE's runs
# compare their losses with the portable run of `benchmark`, so they come after it).
PARTS = {"gemm": part_gemm, "benchmark": part_benchmark, "te": part_te, "data": part_data,
         "transformers": part_transformers}


# --------------------------------------------------------------------------- report

def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(report: dict) -> str:
    """The section appended to gpu.md."""
    p = report["parts"]
    lines = [f"## {report['date']} — {report['device']} (tools/gpu_report.py{' --cpu-smoke' if report['cpu_smoke'] else ''})",
             "", f"torch {report['torch']}, {report['elapsed_s']:.0f} s in all. Command:", "",
             f"    {report['command']}", ""]
    g = p["gemm"]
    lines.append(f"* GEMM ceiling: {g['skipped']}" if "skipped" in g else
                 f"* GEMM ceiling, {g['dtype']} {'x'.join(map(str, g['shape']))}: {g['tflops']:.4g} TFLOP/s")
    rows = []
    for part, names in (("benchmark", VARIANTS), ("te", TE_RECIPES)):
        variants = p[part].get("variants", {}) if "skipped" not in p[part] else {}
        for name in names:
            v = variants.get(name)
            if v is None:
                continue
            label = f"{'TE ' if part == 'te' else ''}{name}"
            if "skipped" in v:
                rows.append(f"| {label} | skipped: {v['skipped']} | | | | |")
                continue
            loss = v.get("loss_vs_portable")
            loss_text = "" if loss is None else f"{loss['max_relative_difference']:.4f} ({'ok' if loss['within'] else 'OVER'} {loss['tolerance']})"
            mfu = "-" if v["mfu"] is None else f"{100 * v['mfu']:.1f} %"
            rows.append(f"| {label} | {fmt(v['tokens_per_s'], 0)} | {mfu} | {fmt(v['peak_memory_gib'], 2)} / "
                        f"{fmt(v['planner_estimate_gib'], 2)} | {fmt(v['step_time_s'], 3)} | {loss_text} |")
    if "skipped" in p["benchmark"]:
        lines.append(f"* Benchmark: {p['benchmark']['skipped']}")
    if "skipped" in p["te"]:
        lines.append(f"* Transformer Engine: {p['te']['skipped']}")
    else:
        smoke = {k: v.get("relative_error", v.get("error")) for k, v in p["te"]["smoke"].items() if isinstance(v, dict)}
        lines.append(f"* Transformer Engine {p['te']['smoke'].get('te_version')}: te.Linear relative error "
                     f"against fp32, per recipe: {smoke}")
    if rows:
        lines += ["", f"Benchmark ({p['benchmark'].get('config')}, shipped: {p['benchmark'].get('shipped')}):", "",
                  "| variant | tokens/s | MFU | peak / planner GiB | step s | loss vs portable (max rel.) |",
                  "| --- | --- | --- | --- | --- | --- |"] + rows + [""]
    t = p["transformers"]
    lines.append(f"* Plain transformers: {t['skipped']}" if "skipped" in t else
                 f"* Plain transformers DeepseekV3ForCausalLM: {fmt(t['tokens_per_s'], 0)} tokens/s "
                 f"(megatron_mm as shipped: {fmt(t.get('megatron_mm_tokens_per_s'), 0)})")
    d = p["data"]
    if "skipped" in d:
        lines.append(f"* Data loaders: {d['skipped']}")
    else:
        dali = d["dali"].get("skipped") or f"{fmt(d['dali']['images_per_s'])} images/s ({d['dali']['decode']} decode)"
        lines.append(f"* Data loaders ({d['samples']} fixture samples, {d['image_px']} px): DALI {dali}; "
                     f"PyTorch DataLoader + Pillow {fmt(d['torch']['images_per_s'])} images/s")
    return "\n".join(lines) + "\n"


class Context:
    """What the parts share: mode, budget, config, device, scratch folders, earlier parts' results."""

    def __init__(self, args, tmp: str):
        import torch

        self.smoke, self.results = args.cpu_smoke, {}
        self.budget = Budget(args.budget_s)
        self.config = SMOKE_CONFIG if self.smoke else BENCH_CONFIG
        self.settings = SMOKE_SETTINGS if self.smoke else []
        self.steps, self.warmup = (1, 1) if self.smoke else (args.steps, args.warmup)
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() and not self.smoke else "cpu"
        self.cluster = HOPPER_CLUSTER if re.search(r"H100|H200|H800|GH200", self.device) else None
        self.data_tmp = tmp  # fixture shards and their index cache
        self.tmp = os.path.join(tmp, "runs")  # one run folder a benchmark
        os.makedirs(self.tmp)
        self.hide_te_dir = os.path.join(tmp, "hide_te")  # first on the path of the portable runs
        os.makedirs(os.path.join(self.hide_te_dir, "transformer_engine"))
        with open(os.path.join(self.hide_te_dir, "transformer_engine", "__init__.py"), "w") as f:
            f.write(HIDE_TE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "results"), help="gpu/<date>-<gpu>.json and gpu.md go here")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting parts after this many seconds")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps a benchmark run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--cpu-smoke", action="store_true", help="every part on CPU at toy size (the test suite's)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown or args.steps < 1 or args.warmup < 0 or args.budget_s <= 0:
        parser.error(f"--parts={args.parts} must name parts of {','.join(PARTS)}; --steps >= 1, --warmup >= 0, --budget-s > 0")
    import torch

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, tmp)
        for name in PARTS:
            if name not in args.parts.split(","):
                ctx.results[name] = {"skipped": "not asked for (--parts)"}
                continue
            say(f"part {name} ({ctx.budget.left():.0f} s of the budget left)")
            ctx.results[name] = PARTS[name](ctx)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    report = {"date": date, "device": ctx.device, "torch": torch.__version__, "cpu_smoke": args.cpu_smoke,
              "command": "python tools/gpu_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "budget_s": args.budget_s, "elapsed_s": time.monotonic() - start, "parts": ctx.results}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ctx.device).strip("-").lower()
    path = os.path.join(args.out_dir, "gpu", f"{date}-{slug}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out_dir, "gpu.md"), "a") as f:
        f.write("\n" + markdown(report))
    say(f"wrote {path} and a section of {os.path.join(args.out_dir, 'gpu.md')}")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
