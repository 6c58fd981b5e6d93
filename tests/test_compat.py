"""Each CPU/no-TE workaround in megatron_mm.runtime.compat (a patch, or a TransformerConfig
override): its megatron-core call site fails without it (else the workaround is no longer
needed) and works with it."""

import json
import os
import subprocess
import sys

import pytest

from megatron_mm.config import Hardware

HERE = os.path.dirname(os.path.abspath(__file__))


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "compat_probes.py"), mode],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return {"without": _probe("without"), "with": _probe("with")}


def test_every_workaround_has_a_probe():
    from megatron_mm.runtime import compat
    import compat_probes

    assert [w.name for w in compat.WORKAROUNDS] == [p.__name__ for p in compat_probes.PROBES]
    overrides = compat.transformer_config_overrides(Hardware(has_cuda=False, has_transformer_engine=False))
    assert all(p.__name__ in overrides for p in compat_probes.OVERRIDE_PROBES)


@pytest.mark.parametrize("name", [
    "cpu_rng_tracker", "cpu_checkpoint_rng", "cuda_devices_to_cpu", "cpu_streams", "cpu_split_sizes", "mla_without_te",
    "router_gemm_without_te", "optimizer_state_before_first_step", "adam_step_on_load", "zero_grad_of_views",
    "eager_fused_functions", "save_results_in_process", "cpu_flex_attention", "one_rank_buffer_collectives",
    "batch_p2p_comm",
])
def test_workaround_needed_and_working(results, name):
    assert results["without"][name] != "ok", f"{name}: megatron-core no longer needs this workaround"
    assert results["with"][name] == "ok", f"{name}: {results['with'][name]}"


def test_batched_p2p_swaps_activation_and_gradient(results):
    # Rank 1 sent activation 101 and gradient 201; batched, rank 0 got them in each other's slot.
    assert results["without"]["batch_p2p_comm"].startswith(
        "AssertionError: rank 0 received activation [201.0] and gradient [101.0] from rank 1"), results["without"]


def test_workarounds_only_where_needed():
    from megatron_mm.runtime import compat

    gpu_with_te = Hardware(has_cuda=True, fp8_capable=True, has_transformer_engine=True, device_name="H100")
    # zero_grad_of_views: megatron-core's own warning, on any hardware with fp32 parameters;
    # save_results_in_process: its spawned Manager costs the same on any hardware
    assert [w.name for w in compat.WORKAROUNDS if w.needed(gpu_with_te)] == ["zero_grad_of_views",
                                                                           "save_results_in_process"]
    assert compat.transformer_config_overrides(gpu_with_te) == {}


def test_notices_still_printed_and_hidden():
    """Each of compat.NOTICES is still printed by megatron-core / torch (hide_notices counts it
    only when it is printed: else drop it), and hide_notices() hides it: nothing of the probe's
    reaches stderr, with warnings shown as for a user (the suite's PYTHONWARNINGS cleared)."""
    from megatron_mm.runtime import compat

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "compat_probes.py"), "notices"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    hidden = json.loads(out.stdout.strip().splitlines()[-1])
    assert {n.name for n in compat.NOTICES} == {name for name, count in hidden.items() if count >= 1}, hidden
    assert out.stderr.strip() == "", out.stderr[-2000:]


IMPORT_PROBE = """
import json, sys
from megatron_mm.runtime import compat
if sys.argv[1] == "deferred":
    compat.before_megatron_import()
import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.pipeline_parallel
from megatron.core import jit
print(json.dumps({"dynamo_imported": "torch._dynamo" in sys.modules,
                  "deferred": compat.jit_fuser_deferred()}))
"""


@pytest.mark.parametrize("mode", ["as_is", "deferred"])
def test_megatron_import_defers_torch_compile(mode):
    """megatron-core's import loads torch's compiler (its jit_fuser is torch.compile: else
    `defer_jit_compile` is no longer needed), and does not after `before_megatron_import()`."""
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=os.path.dirname(HERE))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    deferred = mode == "deferred"
    assert seen == {"dynamo_imported": not deferred, "deferred": deferred}
