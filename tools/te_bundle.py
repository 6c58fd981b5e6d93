"""Transformer Engine (and what megatron_mm needs beside it) for a GPU machine without internet,
small enough to carry: download here, cut the CUDA library to one GPU architecture, check it,
install it there offline and try it.

    python tools/te_bundle.py download --out .whl [--group te --group runtime --group transformers]
    python tools/te_bundle.py slim --bundle .whl --arch 90          # TE's core wheel: 276 MB -> ~29 MB
    python tools/te_bundle.py verify --bundle .whl --arch 90        # what is left, by our parser and cuobjdump
    python tools/te_bundle.py install --bundle .whl --target /tmp/site --arch 90   # on the GPU machine
    python tools/te_bundle.py smoke --site /tmp/site                # TE Linear in bf16 and FP8, one JSON line

`download` takes Python 3.12 / manylinux x86_64 wheels, pinned (PACKAGES; the GPU machines
here have Python 3.12 and torch 2.11 for CUDA 13), with `pip download --no-deps`; the
`transformer-engine-torch` source package comes through PyPI's Simple API (sha256 checked), since
`pip download` of it runs its setup.py, which needs a CUDA torch. `slim` strips each shared
library of the core wheel and keeps, in every fat binary container, only the entries of
`--arch` (megatron_mm/bundle/fatbin.py: sm_90 keeps sm_90 and sm_90a). `install` installs the
wheels with `pip --no-index --no-deps --target`, then compiles `transformer-engine-torch`
there (C++ only, g++ against torch and the CUDA headers of the nvidia wheels torch brings;
NVTE_PYTORCH_FORCE_BUILD keeps its setup.py from trying to download a prebuilt wheel) and
runs `smoke`. Each command ends with one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.bundle import fatbin, wheel  # noqa: E402

TE_VERSION = "2.20.2"
# group -> pinned wheels (pip requirement strings), downloaded without their dependencies
PACKAGES = {
    # megatron-core for Python 3.12 (the GPU machine has none); einops: TE imports it
    "runtime": ["megatron-core==0.16.1", "einops==0.8.2"],
    # TE: core CUDA library (slimmed), its Python package, pydantic (TE's config classes) and deps
    "te": [f"transformer-engine-cu13=={TE_VERSION}", f"transformer-engine=={TE_VERSION}", "pydantic==2.14.4",
           "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "packaging==26.4"],
    # plain transformers for tools/gpu_report.py's baseline (~27 MB: too much beside TE in one call)
    "transformers": ["transformers==5.24.0", "tokenizers==0.23.3", "huggingface-hub==2.5.0", "safetensors==0.8.0",
                     "regex==2026.12.2", "pyyaml==6.0.4", "tqdm==4.70.1", "hf-xet==1.8.0", "httpx2==2.17.0",
                     "httpcore2==2.17.0", "h11==0.16.0", "anyio==4.16.0", "idna==3.21", "truststore==0.10.5",
                     "typer==0.29.3", "click==8.5.1", "rich==15.0.0", "markdown-it-py==4.3.0", "mdurl==0.1.2",
                     "pygments==2.21.0", "shellingham==1.5.4", "annotated-doc==0.0.7"],
}
SDISTS = {"te": ("transformer-engine-torch", TE_VERSION)}  # source only on PyPI
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]
SIMPLE_INDEX = "https://pypi.org/simple/{name}/"
CORE_WHEEL = "transformer_engine_cu*.whl"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mib(path: str) -> float:
    return round(os.path.getsize(path) / 2**20, 2)


def bundle_sizes(folder: str) -> dict:
    files = sorted(glob.glob(os.path.join(folder, "*.whl")) + glob.glob(os.path.join(folder, "*.tar.gz")))
    sizes = {os.path.basename(f): mib(f) for f in files}
    return {"files_mib": sizes, "total_mib": round(sum(sizes.values()), 2)}


# --------------------------------------------------------------------------- download

def fetch_sdist(name: str, version: str, out: str, index: str = SIMPLE_INDEX) -> str:
    """The source package of name==version into `out`, found through the index's Simple API in
    its JSON form (PEP 691, what pip reads), its sha256 checked against the index's."""
    request = urllib.request.Request(index.format(name=name), headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    filename = f"{name.replace('-', '_')}-{version}.tar.gz"
    sdist = next((f for f in files if f["filename"] == filename), None)
    if sdist is None:
        raise SystemExit(f"te_bundle: {index.format(name=name)} lists no {filename}")
    path = os.path.join(out, filename)
    with urllib.request.urlopen(urllib.parse.urljoin(index.format(name=name), sdist["url"]), timeout=300) as r, \
            open(path + ".partial", "wb") as f:
        shutil.copyfileobj(r, f)
    with open(path + ".partial", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sdist["hashes"]["sha256"]:
        os.remove(path + ".partial")
        raise SystemExit(f"te_bundle: {filename}: sha256 {digest} is not the index's {sdist['hashes']['sha256']}")
    os.replace(path + ".partial", path)
    return path


def download(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    groups = args.group or ["runtime", "te"]
    wanted = [p for g in groups for p in PACKAGES[g]]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", args.out] + PLATFORM
    cmd += args.pip_arg + wanted
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    for g in groups:
        if g in SDISTS:
            say(f"{SDISTS[g][0]}=={SDISTS[g][1]}: source package from {args.index}")
            fetch_sdist(*SDISTS[g], args.out, args.index)
    return {"groups": groups, **bundle_sizes(args.out)}


# --------------------------------------------------------------------------- slim

def slim_library(member: str, path: str, archs: set[int]) -> dict | None:
    """Strip one shared library of the wheel and cut its fat binaries to `archs`."""
    if ".so" not in os.path.basename(member):
        return None
    before = os.path.getsize(path)
    subprocess.run(["strip", "--strip-unneeded", path], check=True)
    stripped = os.path.getsize(path)
    report = fatbin.reduce_library(path, archs)
    return {"bytes": before, "stripped_bytes": stripped, **report}


def slim(args) -> dict:
    if shutil.which("strip") is None:
        raise SystemExit("te_bundle slim: needs binutils' strip on PATH")
    archs = set(args.arch)
    cores = glob.glob(os.path.join(args.bundle, CORE_WHEEL))
    if not cores:
        raise SystemExit(f"te_bundle slim: no {CORE_WHEEL} in {args.bundle}")
    report = {}
    for path in cores:
        before = mib(path)
        say(f"{os.path.basename(path)}: stripping and keeping sm_{'/'.join(map(str, sorted(archs)))} ...")
        libraries = wheel.rewrite(path, path, lambda member, file: slim_library(member, file, archs))
        report[os.path.basename(path)] = {"mib_before": before, "mib_after": mib(path), "libraries": libraries}
    return {"arch": sorted(archs), "wheels": report, **bundle_sizes(args.bundle)}


# --------------------------------------------------------------------------- verify

def find_cuobjdump() -> str | None:
    """cuobjdump: on PATH, or from the nvidia-cuda-cuobjdump wheel (setup.py's dev extra, 0.3 MB)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia.cu13  # the nvidia-cuda-cuobjdump wheel's package
    except ImportError:
        return None
    candidate = os.path.join(list(nvidia.cu13.__path__)[0], "bin", "cuobjdump")
    return candidate if os.path.isfile(candidate) else None


def cuobjdump_listing(cuobjdump: str, library: str) -> dict[str, int]:
    """{"elf sm_90": n, ...} from `cuobjdump --list-elf` (its file names end `.sm_90a.cubin`)."""
    proc = subprocess.run([cuobjdump, "--list-elf", library], capture_output=True, text=True)
    if proc.returncode != 0 and "does not contain device code" not in proc.stderr:
        raise SystemExit(f"te_bundle verify: cuobjdump failed on {library}: {proc.stderr.strip()}")
    counts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        name = line.split()[-1]
        arch = next((part for part in name.split(".") if part.startswith("sm_")), "unknown")
        counts[f"elf {arch}"] = counts.get(f"elf {arch}", 0) + 1
    return dict(sorted(counts.items()))


def verify(args) -> dict:
    archs = set(args.arch)
    report, problems = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        cuobjdump = None if args.no_cuobjdump else args.cuobjdump or find_cuobjdump()
        for path in sorted(glob.glob(os.path.join(args.bundle, CORE_WHEEL))):
            with zipfile.ZipFile(path) as z:
                libraries = [n for n in z.namelist() if ".so" in os.path.basename(n)]
                z.extractall(tmp, libraries)
            bad = wheel.check_record(path)
            if bad:
                problems.append(f"{os.path.basename(path)}: RECORD does not match {bad}")
            for member in libraries:
                file = os.path.join(tmp, member)
                with open(file, "rb") as f:
                    data = f.read()
                found = fatbin.elf_section(data, ".nv_fatbin")
                section = data[found[0]:found[0] + found[1]] if found and found[0] is not None else b""
                ours = fatbin.listing(section)
                containers = fatbin.parse(section)
                theirs = cuobjdump_listing(cuobjdump, file) if cuobjdump else None
                other = [k for k in ours if int(k.split("sm_")[1].rstrip("a")) not in archs]
                empty = sum(not c.entries for c in containers)
                if other:
                    problems.append(f"{member}: entries of other architectures left: {other}")
                if empty:
                    problems.append(f"{member}: {empty} containers without an entry")
                if theirs is not None and theirs != {k: v for k, v in ours.items() if k.startswith("elf")}:
                    problems.append(f"{member}: cuobjdump lists {theirs}, our parser {ours}")
                report[f"{os.path.basename(path)}:{member}"] = {"containers": len(containers), "entries": ours,
                                                                 "cuobjdump": theirs}
    result = {"arch": sorted(archs), "cuobjdump": cuobjdump or "not found (only our parser checked)",
              "libraries": report, "problems": problems, "ok": not problems}
    return result


# --------------------------------------------------------------------------- install and smoke

def torch_cuda_version() -> str | None:
    import torch
    return torch.version.cuda


def install(args) -> dict:
    os.makedirs(args.target, exist_ok=True)
    wheels = sorted(glob.glob(os.path.join(args.bundle, "*.whl")))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", args.target] + wheels
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    result = {"target": args.target, "wheels": [os.path.basename(w) for w in wheels]}
    sdists = glob.glob(os.path.join(args.bundle, "transformer_engine_torch-*.tar.gz"))
    if not sdists:
        result["transformer_engine_torch"] = "skipped: no transformer_engine_torch source package in the bundle"
    elif torch_cuda_version() is None:
        result["transformer_engine_torch"] = ("skipped: this torch is a CPU build (torch.version.cuda is None); "
                                              "transformer-engine-torch's setup.py needs CUDA 12 or 13 torch")
    else:
        env = {**os.environ, "NVTE_PYTORCH_FORCE_BUILD": "TRUE", "NVTE_CUDA_ARCHS": ";".join(map(str, args.arch)),
               "NVTE_BUILD_USE_NVIDIA_WHEELS": "1", "MAX_JOBS": str(os.cpu_count() or 4),
               "PYTHONPATH": os.pathsep.join([args.target] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
               "--target", args.target, sdists[0]]
        say("$ " + " ".join(cmd))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            say(tail)
            result["transformer_engine_torch"] = f"build failed (rc {proc.returncode}): {tail.strip().splitlines()[-1]}"
        else:
            result["transformer_engine_torch"] = "built"
    if not args.no_smoke:
        result["smoke"] = run_smoke(args.target)
    return result


SMOKE = r"""
import json, torch
out = {}
try:
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe
except Exception as e:
    print(json.dumps({"skipped": f"transformer_engine.pytorch does not import: {type(e).__name__}: {e}"})); raise SystemExit
if not torch.cuda.is_available():
    print(json.dumps({"skipped": "no GPU"})); raise SystemExit
torch.manual_seed(0)
layer = te.Linear(1024, 1024, bias=False, params_dtype=torch.bfloat16).cuda()
x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
reference = x.float() @ layer.weight.float().t()
major, minor = torch.cuda.get_device_capability()
recipes = {"bf16": None}
if (major, minor) >= (8, 9):
    recipes["delayed"] = recipe.DelayedScaling()
    recipes["tensorwise"] = recipe.Float8CurrentScaling()
if major == 9:
    recipes["blockwise"] = recipe.Float8BlockScaling()
for name, r in recipes.items():
    try:
        with te.autocast(enabled=r is not None, recipe=r):
            y = layer(x)
        y.float().sum().backward()
        err = ((y.float() - reference).norm() / reference.norm()).item()
        out[name] = {"relative_error": round(err, 5), "grad_finite": bool(torch.isfinite(x.grad).all())}
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    x.grad = None
out["te_version"] = getattr(__import__("transformer_engine"), "__version__", "?")
out["device"] = torch.cuda.get_device_name()
print(json.dumps(out))
"""


def run_smoke(site: str | None) -> dict:
    """TE's Linear forward/backward on the GPU in bf16 and each FP8 recipe the GPU has, in a fresh
    process with `site` first on the path: relative error against an fp32 matmul."""
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"rc {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}
    return json.loads(lines[-1])


def smoke(args) -> dict:
    return run_smoke(args.site)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="pinned wheels (+ TE's PyTorch source package) into --out")
    p.add_argument("--out", required=True)
    p.add_argument("--group", action="append", choices=sorted(PACKAGES), help="default: runtime and te")
    p.add_argument("--index", default=SIMPLE_INDEX, help="Simple API page of a project ({name}) for source packages")
    p.add_argument("--pip-arg", action="append", default=[], help="extra pip download argument (e.g. --no-index)")
    for name, help_text in (("slim", "strip the core wheel and keep only --arch"),
                            ("verify", "check what the core wheel holds"),
                            ("install", "install the bundle offline (on the GPU machine)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--bundle", required=True)
        p.add_argument("--arch", type=int, action="append", default=None, help="SM architecture (default 90)")
        if name == "verify":
            p.add_argument("--cuobjdump", help="cuobjdump binary (default: PATH, nvidia-cuda-cuobjdump)")
            p.add_argument("--no-cuobjdump", action="store_true", help="check with our parser only")
        if name == "install":
            p.add_argument("--target", required=True, help="folder to install into (put it on PYTHONPATH)")
            p.add_argument("--no-smoke", action="store_true")
    p = sub.add_parser("smoke", help="TE Linear in bf16 and FP8 on this GPU")
    p.add_argument("--site", help="folder to put first on the path (install's --target)")
    args = parser.parse_args(argv)
    if getattr(args, "arch", None) is None and args.command in ("slim", "verify", "install"):
        args.arch = [90]
    result = {"download": download, "slim": slim, "verify": verify, "install": install, "smoke": smoke}[args.command](args)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
