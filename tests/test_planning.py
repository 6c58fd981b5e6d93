"""Planning without a cluster: parameters per rank against built megatron-core models, memory
arithmetic (recomputation included), rank maps from megatron-core's RankGenerator, cluster
profiles, uneven pipeline splits, tools/make_sbatch.py (scripts and one-line refusals), and the
layout planner (megatron_mm/planning/planner.py, tools/plan.py). The memory estimate against
measured CPU peaks: tests/test_memory_measurement.py."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

sys.path.insert(0, os.path.join(ROOT, "tools"))

from megatron_mm.config import ConfigError, Hardware, load_config, validate  # noqa: E402
from megatron_mm.costs import pipeline_split  # noqa: E402
from megatron_mm.costs.memory import (  # noqa: E402
    GIB, _layer_activation_elements, estimate_memory, in_flight_chunks, rank_parameters)
from megatron_mm.models.params import estimate_parameters  # noqa: E402
from megatron_mm.planning.cluster import load_cluster  # noqa: E402
from megatron_mm.planning.fit import check_fits  # noqa: E402
from megatron_mm.planning.planner import MATMUL_EFFICIENCY, Layout, plan_layouts  # noqa: E402

TEXT = os.path.join(ROOT, "configs", "quickstart_text.yaml")
MULTIMODAL = os.path.join(ROOT, "configs", "quickstart.yaml")
CLUSTERS = os.path.join(ROOT, "configs", "clusters")
LAYOUTS = os.path.join(ROOT, "configs", "layouts")
SP = "parallel.sequence_parallel=true"

# Layouts of 4 ranks whose every rank's parameters are counted on a built model.
CASES = {
    "tp2_pp2": (TEXT, ["parallel.tp=2", "parallel.pp=2", SP]),
    "tp2_ep2": (TEXT, ["parallel.tp=2", "parallel.ep=2", SP]),
    "pp2_vpp2_ep2": (TEXT, ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"]),
    "pp4_mtp": (TEXT, ["parallel.pp=4", "model.mtp_num_layers=1"]),
    "pp2_uneven_tied_mtp_tp2": (TEXT, ["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.tp=2", SP,
                                       "model.share_embeddings_and_output_weights=true", "model.mtp_num_layers=1"]),
    "multimodal_tp2_pp2_resampler": (MULTIMODAL, ["parallel.tp=2", "parallel.pp=2", SP,
                                                  "model.vision.projector=resampler"]),
    "multimodal_tp4": (MULTIMODAL, ["parallel.tp=4", SP]),
    "dense_tp2_pp2_tied": (TEXT, ["model.num_experts=null", "parallel.tp=2", "parallel.pp=2",
                                  "model.share_embeddings_and_output_weights=true"]),
    "no_q_lora_no_shared_tp2_ep2": (TEXT, ["model.q_lora_rank=null", "model.num_shared_experts=0",
                                           "parallel.tp=2", "parallel.ep=2", SP]),
}


def test_rank_parameters_equal_built_models(tmp_path):
    """Every rank of 9 layouts (TP, PP, VPP, EP, uneven split, MTP, tied embeddings, encoders,
    dense, no q compression, no shared experts): planner count == megatron-core's model."""
    cases = [{"name": n, "config": c, "overrides": o} for n, (c, o) in CASES.items()]
    for case in cases:
        validate(load_config(case["config"], case["overrides"]), 4, Hardware())
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "counts.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={free_port()}",
           os.path.join(ROOT, "tests", "helpers", "count_rank_params.py"), str(tmp_path / "cases.json"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    counts = json.loads(out.read_text())
    for case in cases:
        cfg = load_config(case["config"], case["overrides"])
        for rank in counts[case["name"]]:
            assert rank["params"] == rank_parameters(cfg, rank["pp"]).total, (case["name"], rank)


@pytest.mark.parametrize("model", ["tiny", "deepseek_v2_lite_16b", "deepseek_v3_671b"])
def test_one_rank_equals_whole_model_count(model):
    cfg = load_config(os.path.join(ROOT, "configs", "models", f"{model}.yaml"))
    assert rank_parameters(cfg, 0).total == estimate_parameters(cfg.model)["total"]


def test_v3_pp16_ep64_shards_add_up_to_the_model():
    cfg = load_config(os.path.join(LAYOUTS, "deepseek_v3_671b_pp16_ep64.yaml"))
    p, m = cfg.parallel, cfg.model
    stages = [rank_parameters(cfg, s) for s in range(p.pp)]
    copies = m.vocab_size * m.hidden_size  # the MTP's copy of the embedding on the last stage
    total = sum(s.dense + p.ep * s.expert for s in stages) - copies
    assert total == estimate_parameters(m)["total"]
    assert pipeline_split.plan(cfg).layers == [3] + [4] * 14 + [2]


def test_model_state_bytes():
    base = ["parallel.ep=2", "precision.dtype=bf16"]
    cfg = load_config(TEXT, base)
    est = estimate_memory(cfg, 4)  # dp 4, expert dp 2
    st, params = est.stages[0], rank_parameters(cfg, 0)
    assert (est.dp, est.expert_dp) == (4, 2)
    assert st.weights_bytes == 2 * params.total and st.grads_bytes == 4 * params.total
    assert st.optimizer_bytes == pytest.approx(12 * params.dense / 4 + 12 * params.expert / 2)
    fp32 = estimate_memory(load_config(TEXT, ["parallel.ep=2"]), 4).stages[0]
    assert fp32.weights_bytes == 4 * params.total  # no master copy in fp32: Adam's two moments only
    assert fp32.optimizer_bytes == pytest.approx(8 * params.dense / 4 + 8 * params.expert / 2)
    plain = estimate_memory(load_config(TEXT, base + ["train.optimizer.use_distributed_optimizer=false"]), 4)
    assert plain.stages[0].optimizer_bytes == 12 * params.total
    frozen = estimate_memory(load_config(MULTIMODAL, ["train.freeze.language_model=true"]), 1).stages[0]
    mm = rank_parameters(load_config(MULTIMODAL), 0)
    trainable = mm.total - (frozen.params.frozen_dense + frozen.params.frozen_expert)
    assert frozen.grads_bytes == 4 * trainable and 0 < trainable < mm.total


def test_activations_scale_with_tokens_and_tp():
    one = estimate_memory(load_config(TEXT, ["train.micro_batch_size=1"]), 1).stages[0].activation_bytes
    two = estimate_memory(load_config(TEXT, ["train.micro_batch_size=2"]), 1).stages[0].activation_bytes
    assert two == pytest.approx(2 * one)
    tp2 = estimate_memory(load_config(TEXT, ["parallel.tp=2", SP]), 2).stages[0].activation_bytes
    assert tp2 == pytest.approx(one / 2)


def test_recompute_keeps_layer_inputs():
    """Full recomputation: each layer keeps its input (h per token), plus one layer's full
    activations for the layer being recomputed; logits and model state unchanged."""
    cfg = load_config(TEXT)
    m, tokens, w = cfg.model, cfg.train.micro_batch_size * cfg.model.seq_length, 4
    per_layer = [_layer_activation_elements(m, 1, 1, False, i >= m.first_k_dense_layers, w) for i in range(4)]
    logits = tokens * m.vocab_size * (w + 4)
    none = estimate_memory(cfg, 1).stages[0]
    full = estimate_memory(load_config(TEXT, ["parallel.recompute=full"]), 1).stages[0]
    assert none.activation_bytes == pytest.approx(sum(per_layer) * tokens * w + logits)
    assert full.activation_bytes == pytest.approx((4 * m.hidden_size + max(per_layer)) * tokens * w + logits)
    assert full.model_state_bytes == none.model_state_bytes
    # PP2, 4 micro-batches: stage 0 holds 2 of them, each keeping its 2 layers' inputs.
    pp2 = estimate_memory(load_config(TEXT, ["parallel.pp=2", "parallel.recompute=full"]), 2).stages[0]
    assert pp2.in_flight == 2
    assert pp2.activation_bytes == pytest.approx((2 * 2 * m.hidden_size + max(per_layer[:2])) * tokens * w)


def test_in_flight_micro_batches():
    assert [in_flight_chunks(4, None, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight_chunks(4, None, r, 2) for r in range(4)] == [2, 2, 2, 1]
    # interleaved: megatron-core's warm-up (pp - rank - 1) * 2 + (vpp - 1) * pp, plus one
    assert [in_flight_chunks(2, 2, r, 8) for r in range(2)] == [5, 3]
    assert in_flight_chunks(1, None, 0, 8) == 1


def test_rank_map_follows_megatron_order():
    from megatron_mm.planning.layout import rank_map

    coords = rank_map(tp=2, pp=2, ep=2, etp=1, world_size=16, gpus_per_node=8)
    assert [(c.tp, c.dp, c.pp) for c in coords[:4]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert {c.pp for c in coords[:8]} == {0} and {c.pp for c in coords[8:]} == {1}  # a stage a node
    assert [c.ep for c in coords[:4]] == [0, 1, 0, 1] and [c.edp for c in coords[:8]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.node for c in coords] == [r // 8 for r in range(16)]


# --------------------------------------------------------------------------- config rules


def test_cluster_profiles():
    h800 = load_cluster(os.path.join(CLUSTERS, "h800.yaml"))
    a100 = load_cluster(os.path.join(CLUSTERS, "a100_80gb.yaml"))
    cpu = load_cluster(os.path.join(CLUSTERS, "cpu_test.yaml"))
    assert (h800.gpus_per_node, h800.fp8, a100.fp8, a100.peak_tflops_fp8) == (8, True, False, None)
    assert h800.hardware().fp8_capable and not a100.hardware().fp8_capable
    assert a100.hardware().gpu_memory_gib == a100.gpu_memory_gib and not cpu.hardware().has_cuda
    with pytest.raises(ConfigError) as err:
        load_cluster(os.path.join(CLUSTERS, "missing.yaml"))
    assert len(err.value.problems) == 1


def test_bad_cluster_profile_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngpu: G\ngpus_per_node: 8\ngpu_memory: 80\n")
    with pytest.raises(ConfigError) as err:
        load_cluster(str(bad))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"--cluster {bad}: unknown key gpu_memory (known: ")


# --------------------------------------------------------------------------- make_sbatch


def _make_sbatch(argv):
    import make_sbatch

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = make_sbatch.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_ten_refusals_are_one_line_each():
    from slurm_examples import REFUSALS

    assert len(REFUSALS) == 10
    for what, argv, expected in REFUSALS:
        rc, out, err = _make_sbatch([a if not a.startswith("configs/") else os.path.join(ROOT, a) for a in argv]
                                    + ["--out", os.devnull])
        lines = [line.replace(ROOT + os.sep, "") for line in err.splitlines() if line.startswith("refused:")]
        assert rc == 2 and lines == [expected], (what, lines)


def test_script_for_v2_lite_on_two_h800_nodes(tmp_path):
    out_file = tmp_path / "job.sbatch"
    rc, out, err = _make_sbatch([
        "--config", os.path.join(LAYOUTS, "deepseek_v2_lite_pp2_ep8.yaml"),
        "--cluster", os.path.join(CLUSTERS, "h800.yaml"), "--nodes", "2", "--partition", "gpu",
        "--account", "proj", "--runs-root", str(tmp_path / "runs"), "--out", str(out_file), "--print-map",
        "--set", "train.steps=3000"])
    assert rc == 0, err
    text = out_file.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@600", "export NCCL_IB_HCA=mlx5", "TRAIN_STEPS=3000",
                 "--set logging.peak_tflops_per_gpu=989.5", "--set train.steps=3000",
                 "srun --kill-on-bad-exit=1 --distribution=block:block",
                 "launch/pretrain.py --config configs/layouts/deepseek_v2_lite_pp2_ep8.yaml"):
        assert line in text, line
    assert "node 1 (ranks 8-15): pipeline stage 1" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["world_size"] == 16 and len(report["memory"]["stages"]) == 2
    assert os.path.isdir(tmp_path / "runs")  # sbatch needs the --output folder to exist
    # The script is valid bash.
    assert subprocess.run(["bash", "-n", str(out_file)]).returncode == 0


def test_script_to_stdout_without_out():
    rc, out, err = _make_sbatch(["--config", TEXT, "--cluster", os.path.join(CLUSTERS, "cpu_test.yaml"),
                                 "--nodes", "2", "--runs-root", "/tmp/unused-runs"])
    assert rc == 0 and out.startswith("#!/bin/bash") and "cluster cpu_test" in err
    assert "--gpus-per-node" not in out and "peak_tflops" not in out  # no GPUs, no MFU peak


# --------------------------------------------------------------------------- layout planner

V2_LITE = os.path.join(ROOT, "configs", "models", "deepseek_v2_lite_16b.yaml")
V2_SETS = ["precision.dtype=bf16", "train.global_batch_size=1024"]


@pytest.fixture(scope="module")
def v2_lite_plan():
    cluster = load_cluster(os.path.join(CLUSTERS, "h800.yaml"))
    return cluster, plan_layouts(load_config(V2_LITE, V2_SETS), cluster, 16)


def test_planner_keeps_only_layouts_that_validate_and_fit(v2_lite_plan):
    cluster, result = v2_lite_plan
    usable = cluster.gpu_memory_gib - cluster.reserved_memory_gib
    assert len(result.ranked) > 500 and result.enumerated == len(result.ranked) + result.too_big + sum(result.refused.values())
    times = [c.time.total for c in result.ranked]
    assert times == sorted(times)
    for c in result.ranked:  # the --set arguments it reports select exactly that layout
        cfg = load_config(V2_LITE, V2_SETS + c.layout.overrides())
        validate(cfg, 16, cluster.hardware())
        check_fits(cfg, 16, cluster.hardware())
        assert estimate_memory(cfg, 16).worst.total_bytes / GIB == pytest.approx(c.memory_gib) and c.memory_gib <= usable
        assert c.tokens_per_s == pytest.approx(1024 * 4096 / c.time.total)


def test_memory_rule_is_check_fits_after_validate():
    """`validate` knows nothing of memory; `planning.fit.check_fits` refuses the unsharded
    layout in one line (the same line make_sbatch and the planner report)."""
    cluster = load_cluster(os.path.join(CLUSTERS, "h800.yaml"))
    cfg = load_config(V2_LITE, V2_SETS)
    validate(cfg, 16, cluster.hardware())
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, 16, cluster.hardware())
    assert err.value.problems == [
        "parallel=tp1.pp1.ep1.etp1.dp16 (expert dp 16, vpp -) on 16 ranks: model state needs 98.7 GiB a GPU on "
        "pipeline stage 0 (weights, gradients, optimizer; planner estimate), more than the 74.1 GiB usable of a "
        "79.1 GiB NVIDIA H800 80GB HBM3 (h800)"]
    check_fits(cfg, 16, Hardware())  # no GPU memory size: nothing to check


def test_planner_top_layout_is_sensible(v2_lite_plan):
    _, result = v2_lite_plan
    best = result.ranked[0]
    lay = best.layout
    # A 2048-wide model gains nothing from TP; recomputation and bigger micro-batches only cost
    # time when mbs 1 without recomputation fits; any all-to-all stays on NVLink.
    assert (lay.tp, lay.micro_batch_size, lay.recompute) == (1, 1, "none")
    assert lay.ep * lay.etp <= 8
    assert best.time.compute / best.time.total > 0.9 and 0.3 < best.mfu <= MATMUL_EFFICIENCY


def test_planner_excludes_what_does_not_fit(v2_lite_plan):
    cluster, result = v2_lite_plan
    ranked = {c.layout: c for c in result.ranked}
    # Nothing sharded: 98.7 GiB of weights, gradients and optimizer a GPU; validate refuses it.
    assert Layout(1, 1, None, 1, 1, 1, "none") not in ranked and result.refused["parallel"] > 0
    # EP8, micro-batch 4: 28 GiB of model state fits, 73 GiB of activations of 27 layers do not
    # (101 GiB); recomputing keeps 13 GiB of them and fits.
    assert Layout(1, 1, None, 8, 1, 4, "none") not in ranked and result.too_big > 0
    assert ranked[Layout(1, 1, None, 8, 1, 4, "full")].memory_gib == pytest.approx(41.8, abs=0.1)


def test_step_time_parts(v2_lite_plan):
    """The time model's parts against hand arithmetic (megatron_mm/planning/planner.py)."""
    _, result = v2_lite_plan
    ranked = {c.layout: c for c in result.ranked}
    ep8 = ranked[Layout(1, 1, None, 8, 1, 1, "none")]
    ep16 = ranked[Layout(1, 1, None, 16, 1, 1, "none")]
    # 64 micro-batches x 26 MoE layers x (dispatch + combine) x (forward + backward), each
    # sending 4096 tokens x top-6 x 2048 x 2 bytes, 7/8 of it, over 400/2 GB/s NVLink at 80 %.
    sent = 4096 * 6 * 2048 * 2 * 7 / 8
    assert ep8.time.ep_comm == pytest.approx(64 * 26 * 2 * 2 * sent / 160e9)
    assert ep16.time.ep_comm > 2 * ep8.time.ep_comm  # half of it crosses InfiniBand (40 GB/s a GPU)
    assert ep8.time.tp_comm == ep8.time.pp_comm == ep8.time.bubble == 0
    # Recomputation: one more forward of the decoder layers and of their communication.
    full = ranked[Layout(1, 1, None, 8, 1, 1, "full")]
    assert full.time.ep_comm == pytest.approx(1.5 * ep8.time.ep_comm)
    assert 1.25 < full.time.compute / ep8.time.compute < 4 / 3  # the LM head is not recomputed
    # Pipeline bubble: (pp-1)/(vpp x M) of the micro-batches' time.
    for lay in (Layout(1, 4, None, 1, 1, 1, "none", 8, 5), Layout(1, 2, 3, 2, 1, 1, "none", 15, 12)):
        c = ranked[lay]
        busy = c.time.compute + c.time.tp_comm + c.time.ep_comm + c.time.pp_comm
        assert c.time.bubble == pytest.approx(busy * (lay.pp - 1) / ((lay.vpp or 1) * c.microbatches))
        assert c.stage_layers[0] == lay.first_stage_layers and c.stage_layers[-1] == lay.last_stage_layers
    tp2 = ranked[Layout(2, 1, None, 8, 1, 1, "none")]
    # TP2 halves DP, so twice the micro-batches, each split over two GPUs: the same GEMM time.
    assert tp2.microbatches == 2 * ep8.microbatches and tp2.time.compute == pytest.approx(ep8.time.compute)
    # 128 micro-batches x 27 layers x 2 passes x (2 all-gathers + 2 reduce-scatters) of the
    # 4096 x 2048 bf16 activation, half of it moved (ring, tp 2), over NVLink at 160 GB/s.
    assert tp2.time.tp_comm == pytest.approx(128 * 27 * 2 * 4 * (4096 * 2048 * 2) / 2 / 160e9)


def _plan_cli(argv):
    import plan

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = plan.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_plan_tool(tmp_path):
    args = ["--config", V2_LITE, "--cluster", os.path.join(CLUSTERS, "h800.yaml"), "--gpus", "16"]
    sets = [a for s in V2_SETS for a in ("--set", s)]
    rc, out, err = _plan_cli(args + sets + ["--top", "3", "--json", str(tmp_path / "plan.json")])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("plan: ") and "16 x NVIDIA H800" in lines[0] and "1024 x 4096 tokens, bf16" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# tp pp vpp"))
    assert [line.split()[0] for line in lines[header + 1:header + 4]] == ["1", "2", "3"]
    assert lines[header + 4].startswith("best: --set parallel.tp=")
    report = json.loads(lines[-1])
    full = json.loads((tmp_path / "plan.json").read_text())
    assert len(report["top"]) == 3 and report["top"] == full["layouts"][:3] and report["fit"] == len(full["layouts"])
    assert f"best: --set {' --set '.join(report['top'][0]['overrides'])}" in lines
    # Refusals: one line each, exit 2.
    rc, out, err = _plan_cli(args[:-1] + ["12"])
    assert rc == 2 and err == "config error: --gpus=12: must be at most 8 or a multiple of it (whole nodes of h800)\n"
    rc, out, err = _plan_cli(args[:-1] + ["1"] + sets)  # 15.7B parameters on one GPU
    assert rc == 2 and err.startswith("config error: --gpus=1: no layout fits (")
    assert "model state needs" in err.splitlines()[1]
