"""tools/te_bundle.py on a synthetic Transformer Engine core wheel: a tiny C shared library with
a `.nv_fatbin` section holding fat binary containers of several architectures (built here with
gcc), so that nothing of NVIDIA's 276 MB wheel is downloaded in the suite."""

import ctypes
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, tool
from megatron_mm.bundle import fatbin, wheel

pytestmark = pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("strip")),
                                reason="needs gcc and strip (binutils)")

# (kind, arch, arch-specific "a", header size, payload) per entry, per container
CONTAINERS = [
    [(2, 75, False, 64, 40), (2, 90, False, 64, 53), (2, 90, True, 64, 24), (2, 100, False, 112, 70)],
    [(2, 80, False, 64, 16), (1, 90, False, 64, 33), (2, 90, False, 64, 8)],
]


def entry(kind: int, arch: int, specific: bool, header: int, payload: int, seed: int) -> bytes:
    padded = (payload + 7) // 8 * 8
    head = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x0101, header, padded, payload, 0, 8, 1, arch, 0, 0,
                       0x11 | (fatbin.ARCH_SPECIFIC if specific else 0), 0, payload)
    body = bytes((seed * 31 + i) % 251 + 1 for i in range(payload))  # nonzero, distinct per entry
    return head + bytes(header - len(head)) + body + bytes(padded - payload)


def container(entries: list[bytes]) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", fatbin.MAGIC, 1, 16, len(body)) + body


def section_bytes(containers) -> tuple[bytes, dict]:
    """The section (containers 8-aligned, zero padding between) and each entry's bytes by (container, index)."""
    out, entries = b"", {}
    for ci, c in enumerate(containers):
        parts = [entry(*e, seed=ci * 10 + i) for i, e in enumerate(c)]
        entries.update({(ci, i): p for i, p in enumerate(parts)})
        out += container(parts)
        out += bytes(-len(out) % 8 + 8)  # padding between containers, as in real libraries
    return out, entries


def build_library(folder: str, containers=CONTAINERS) -> tuple[str, dict]:
    """A shared library whose `.nv_fatbin` section (allocated, in a loaded segment, as nvcc's
    are) holds `containers`; returns its path and each entry's bytes by (container, index)."""
    src, lib = os.path.join(folder, "probe.c"), os.path.join(folder, "libtransformer_engine.so")
    data, entries = section_bytes(containers)
    with open(src, "w") as f:
        f.write("int probe(int x) { return 3 * x + 1; }\n"
                '__attribute__((section(".nv_fatbin"), aligned(8), used))\n'
                f"const unsigned char fatbin_data[{len(data)}] = {{{', '.join(map(str, data))}}};\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", src, "-o", lib], check=True)
    return lib, entries


def build_wheel(folder: str, lib: str) -> str:
    """transformer_engine_cu13-0.0.1 with the library under transformer_engine/wheel_lib/, as the real one."""
    name = "transformer_engine_cu13-0.0.1.dist-info"
    files = {"transformer_engine/wheel_lib/libtransformer_engine.so": open(lib, "rb").read(),
             "transformer_engine/wheel_lib/__init__.py": b"",
             f"{name}/METADATA": b"Metadata-Version: 2.1\nName: transformer-engine-cu13\nVersion: 0.0.1\n",
             f"{name}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    path = os.path.join(folder, "transformer_engine_cu13-0.0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        record = []
        for n, data in files.items():
            info = zipfile.ZipInfo(n)
            info.external_attr = (0o755 if n.endswith(".so") else 0o644) << 16
            z.writestr(info, data)
            digest = __import__("base64").urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{n},sha256={digest},{len(data)}")
        z.writestr(f"{name}/RECORD", "\n".join(record + [f"{name}/RECORD,,"]) + "\n")
    return path


def read_section(path: str) -> bytes:
    data = open(path, "rb").read()
    offset, size = fatbin.elf_section(data, ".nv_fatbin")
    return data[offset:offset + size]


@pytest.fixture(scope="module")
def slimmed(tmp_path_factory):
    """The synthetic bundle before and after `te_bundle slim --arch 90` (run once for the module)."""
    folder = str(tmp_path_factory.mktemp("bundle"))
    lib, entries = build_library(str(tmp_path_factory.mktemp("lib")))
    original = read_section(lib)
    path = build_wheel(folder, lib)
    before = os.path.getsize(path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "te_bundle.py"), "slim", "--bundle", folder,
                           "--arch", "90"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    unpacked = str(tmp_path_factory.mktemp("unpacked"))
    with zipfile.ZipFile(path) as z:
        z.extractall(unpacked)
        mode = z.getinfo("transformer_engine/wheel_lib/libtransformer_engine.so").external_attr >> 16
    return {"folder": folder, "wheel": path, "entries": entries, "original": original, "size_before": before,
            "report": json.loads(proc.stdout.strip().splitlines()[-1]), "mode": mode,
            "lib": os.path.join(unpacked, "transformer_engine/wheel_lib/libtransformer_engine.so")}


def test_parser_reads_the_synthetic_section(tmp_path):
    lib, _ = build_library(str(tmp_path))
    section = read_section(lib)
    containers = fatbin.parse(section)
    assert [len(c.entries) for c in containers] == [4, 3]
    assert fatbin.listing(section) == {"elf sm_100": 1, "elf sm_75": 1, "elf sm_80": 1, "elf sm_90": 2,
                                       "elf sm_90a": 1, "ptx sm_90": 1}


def test_slim_keeps_only_sm90_entries_byte_for_byte(slimmed):
    section = read_section(slimmed["lib"])
    assert len(section) == len(slimmed["original"])  # same section, same place: nothing relocated
    assert fatbin.listing(section) == {"elf sm_90": 2, "elf sm_90a": 1, "ptx sm_90": 1}
    before, after = fatbin.parse(slimmed["original"]), fatbin.parse(section)
    assert [c.offset for c in after] == [c.offset for c in before]  # containers stay where the host code points
    e = slimmed["entries"]
    for c, kept in zip(after, [[(0, 1), (0, 2)], [(1, 1), (1, 2)]]):
        body = section[c.offset + 16:c.offset + c.size]
        assert body == b"".join(e[k] for k in kept)  # the wanted entries, unchanged, in their order
    freed = sum(b.size - a.size for a, b in zip(after, before))
    assert freed == sum(len(e[k]) for k in [(0, 0), (0, 3), (1, 0)])
    zeros = sum(section[a.offset + a.size:b.offset + b.size].count(0) for a, b in zip(after, before))
    assert zeros == freed  # the dropped entries' bytes are all zero now
    report = slimmed["report"]["wheels"]["transformer_engine_cu13-0.0.1-py3-none-any.whl"]
    lib_report = report["libraries"]["transformer_engine/wheel_lib/libtransformer_engine.so"]
    assert (lib_report["containers"], lib_report["entries_kept"], lib_report["entries_dropped"]) == (2, 4, 3)
    assert lib_report["stripped_bytes"] < lib_report["bytes"]  # built with -g: strip removed the debug info


def test_slimmed_library_still_loads_and_wheel_is_consistent(slimmed, tmp_path):
    assert ctypes.CDLL(slimmed["lib"]).probe(4) == 13
    assert slimmed["mode"] & 0o111  # still executable, as in the original wheel
    assert wheel.check_record(slimmed["wheel"]) == []
    target = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", target,
                    slimmed["wheel"]], check=True)
    installed = os.path.join(target, "transformer_engine/wheel_lib/libtransformer_engine.so")
    assert open(installed, "rb").read() == open(slimmed["lib"], "rb").read()


# cuobjdump is not asked here: it parses every cubin (our payloads are not ELF files: "Invalid
# ELF"); its listing of the real library agrees with our parser (results/te_bundle.md).
def test_verify_passes(slimmed):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "te_bundle.py"), "verify", "--bundle",
                           slimmed["folder"], "--arch", "90", "--no-cuobjdump"], capture_output=True, text=True, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and report["ok"], report["problems"]
    (lib,) = report["libraries"].values()
    assert lib["entries"] == {"elf sm_90": 2, "elf sm_90a": 1, "ptx sm_90": 1} and lib["cuobjdump"] is None


def test_verify_fails_on_other_architectures(slimmed, tmp_path):
    lib, _ = build_library(str(tmp_path))
    build_wheel(str(tmp_path), lib)  # not slimmed: sm_75, sm_80, sm_100 remain
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "te_bundle.py"), "verify", "--bundle",
                           str(tmp_path), "--arch", "90", "--no-cuobjdump"], capture_output=True, text=True, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and not report["ok"]
    assert any("sm_75" in p and "sm_100" in p for p in report["problems"]), report["problems"]


def test_a_container_without_the_architecture_is_refused_unchanged(tmp_path):
    lib, _ = build_library(str(tmp_path), CONTAINERS + [[(2, 80, False, 64, 16)]])
    before = open(lib, "rb").read()
    with pytest.raises(fatbin.FatbinError, match="1 of 3 containers hold no entry for sm_90"):
        fatbin.reduce_library(lib, {90})
    assert open(lib, "rb").read() == before


def test_download_and_install_offline(tmp_path, capsys):
    """download through pip (a local --find-links index) and a file:// Simple API page for the source
    package, then install: wheels into --target, the PyTorch extension's build refused with the
    reason on a CPU torch, and the smoke test reporting why it did not run."""
    index = tmp_path / "index"
    (index / "transformer-engine-torch").mkdir(parents=True)
    sdist = index / "transformer-engine-torch" / "transformer_engine_torch-2.20.2.tar.gz"
    sdist.write_bytes(b"not really a source package")
    page = {"files": [{"filename": sdist.name, "url": sdist.name,  # relative to the page, as PyPI's may be
                       "hashes": {"sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()}}]}
    (index / "transformer-engine-torch" / "index.json").write_text(json.dumps(page))
    lib, _ = build_library(str(tmp_path))
    build_wheel(str(index), lib)
    out = tmp_path / "bundle"
    module = _te_bundle()
    module.PACKAGES["te"] = ["transformer-engine-cu13==0.0.1"]  # this module object only
    capsys.readouterr()
    code = module.main(["download", "--out", str(out), "--group", "te", "--index", index.as_uri() + "/{name}/index.json",
                        "--pip-arg=--no-index", f"--pip-arg=--find-links={index}"])
    stdout = capsys.readouterr().out
    report = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and set(report["files_mib"]) == {sdist.name, "transformer_engine_cu13-0.0.1-py3-none-any.whl"}
    code, stdout, _ = tool("te_bundle", ["install", "--bundle", str(out), "--target", str(tmp_path / "site"),
                                         "--no-smoke"], capsys)
    report = json.loads(stdout.strip().splitlines()[-1])
    assert os.path.isfile(tmp_path / "site/transformer_engine/wheel_lib/libtransformer_engine.so")
    assert report["transformer_engine_torch"].startswith("skipped: this torch is a CPU build")


def _te_bundle():
    """tools/te_bundle.py as the module conftest.tool() will load (PACKAGES patched on it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("te_bundle", os.path.join(ROOT, "tools", "te_bundle.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
