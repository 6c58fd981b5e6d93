"""Grouped experts (`model.moe_grouped_gemm`, models/grouped_experts.py) against megatron-core's
SequentialMLP: same weights, outputs, gradients, losses and checkpoints.

Tolerance: zero wherever both compute in fp32 on the CPU. Both run the same per-expert matmuls
(torch's CPU `_grouped_mm` loops over the groups with the same GEMM as `F.linear`), so they are
measured bit-identical; any difference is a defect, not rounding. bf16: also bit-identical.
"""

import json
import multiprocessing
import os
import shutil

import pytest
import torch

from conftest import losses, pretrain
from megatron_mm.models import grouped_gemm

# --------------------------------------------------------------------------- in-process modules

TOKENS = [5, 0, 7, 12]  # four local experts, one of them without tokens


def _init_parallel(rank: int, world: int, store: str, etp: int = 1):
    from megatron.core import parallel_state

    from megatron_mm.config import Hardware
    from megatron_mm.runtime import compat

    compat.apply(Hardware())
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(expert_tensor_parallel_size=etp)


def _close_parallel():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _experts(grouped: bool, etp: int = 1, dtype=torch.float32):
    """The tiny model's routed experts (4 local), built as training builds them, seed 7."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_mm.config import Hardware, load_config
    from megatron_mm.models.gpt import transformer_config
    from megatron_mm.models.grouped_experts import GroupedMLP
    from megatron_mm.runtime import compat

    sets = [f"parallel.etp={etp}", f"model.moe_grouped_gemm={str(grouped).lower()}",
            f"precision.dtype={'bf16' if dtype == torch.bfloat16 else 'fp32'}"]
    tc = transformer_config(load_config(os.path.join("configs", "quickstart_text.yaml"), sets),
                            compat.transformer_config_overrides(Hardware()))
    compat.seed_everything(7)
    cls = GroupedMLP if grouped else SequentialMLP
    return cls(4, tc, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
               pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def _run(experts, tokens=TOKENS, seed=3, reduce="weighted"):
    """Forward + backward on fixed inputs: (output, grad of input, grad of probs, weight grads)."""
    g = torch.Generator().manual_seed(seed)
    dtype = experts.local_experts[0].linear_fc1.weight.dtype
    x = torch.randn(sum(tokens), experts.config.hidden_size, generator=g).to(dtype).requires_grad_()
    probs = torch.rand(sum(tokens), generator=g).requires_grad_()
    out, bias = experts(x, torch.tensor(tokens), probs)
    assert bias is None
    if reduce == "weighted":
        (out * torch.randn(out.shape, generator=g).to(dtype)).sum().backward()
    else:  # a stride-0 output gradient, as out.sum() gives
        out.sum().backward()
    return out.detach(), x.grad, probs.grad, {n: p.grad for n, p in experts.named_parameters()}


def _assert_same_run(a, b):
    (out_a, dx_a, dp_a, dw_a), (out_b, dx_b, dp_b, dw_b) = a, b
    assert torch.equal(out_a, out_b)
    assert torch.equal(dx_a, dx_b) and torch.equal(dp_a, dp_b)
    assert dw_a.keys() == dw_b.keys()
    for name in dw_a:
        assert torch.equal(dw_a[name], dw_b[name]), name


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    _init_parallel(0, 1, str(tmp_path_factory.mktemp("store") / "rendezvous"))
    yield
    _close_parallel()


def test_same_parameters_and_initial_weights(one_rank):
    seq, grp = _experts(False), _experts(True)
    assert type(grp).__name__ == "GroupedMLP"
    s, g = seq.state_dict(), grp.state_dict()
    assert list(s) == list(g)
    assert all(torch.equal(s[k], g[k]) for k in s if isinstance(s[k], torch.Tensor))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["weighted", "sum"])
def test_outputs_and_gradients_equal_sequential(one_rank, dtype, reduce):
    _assert_same_run(_run(_experts(False, dtype=dtype), reduce=reduce),
                     _run(_experts(True, dtype=dtype), reduce=reduce))


@pytest.mark.parametrize("tokens", [[0, 0, 0, 0], [24, 0, 0, 0]])
def test_no_tokens_and_one_busy_expert(one_rank, tokens):
    seq, grp = _run(_experts(False), tokens), _run(_experts(True), tokens)
    _assert_same_run(seq, grp)
    if not sum(tokens):
        assert all(not w.any() for w in grp[3].values())  # zero weight gradients, no failure


def test_loop_fallback_equals_grouped_kernel(one_rank, monkeypatch):
    """Where `torch._grouped_mm` cannot serve (pre-Hopper GPUs, other dtypes), the same
    module runs a loop over the experts: same parameters, same numbers. On the CPU the kernel
    does run: fc1 and fc2 forward, then each one's input- and weight-gradient GEMMs."""
    calls = []
    kernel_op = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or kernel_op(*a, **k))
    kernel = _run(_experts(True))
    assert len(calls) == 6
    monkeypatch.setattr(grouped_gemm, "uses_grouped_kernel", lambda x, n: False)
    _assert_same_run(kernel, _run(_experts(True)))
    assert len(calls) == 6


def test_backward_keeps_no_stacked_weight_copy(one_rank):
    """What forward saves for backward: the parameters themselves and the inputs, no
    (experts, out, in) stack (one more copy of the rank's expert weights per layer in flight)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        _run(_experts(True))
    assert saved and not [shape for shape in saved if len(shape) == 3]


def test_five_adam_steps_same_losses(one_rank):
    """Five optimizer steps of the experts alone on a fixed regression target."""
    def train(experts):
        opt = torch.optim.Adam(experts.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(11)
        x = torch.randn(sum(TOKENS), experts.config.hidden_size, generator=g)
        target, probs = torch.randn(x.shape, generator=g), torch.rand(sum(TOKENS), generator=g)
        result = []
        for _ in range(5):
            opt.zero_grad()
            loss = ((experts(x, torch.tensor(TOKENS), probs)[0] - target) ** 2).mean()
            loss.backward()
            opt.step()
            result.append(loss.item())
        return result

    seq, grp = train(_experts(False)), train(_experts(True))
    assert seq == grp and seq[-1] < seq[0]


def _sharded_layout(experts):
    """Per state-dict entry: its checkpoint key, kind, and where its data sits in the global tensor."""
    def where(v):
        if hasattr(v, "global_offset"):  # ShardedTensor
            return v.global_shape, v.global_offset, v.replica_id
        if hasattr(v, "build_fn"):  # ShardedTensorFactory (the gated fc1, split into gate and up)
            return tuple(v.data.shape), v.replica_id
        return v.global_shape, v.global_offset  # ShardedObject

    return {k: (v.key, type(v).__name__, where(v)) for k, v in experts.sharded_state_dict(prefix="mlp.").items()}


def test_checkpoint_moves_between_sequential_and_grouped(one_rank, tmp_path):
    """Same dist-checkpoint keys, shapes and offsets; each loads the other's save."""
    from megatron.core import dist_checkpointing

    assert _sharded_layout(_experts(False)) == _sharded_layout(_experts(True))
    for saver, loader in ((False, True), (True, False)):
        source = _experts(saver)
        with torch.no_grad():
            for p in source.parameters():
                p.add_(1.0)  # differ from a fresh build, so loading has to change the weights
        folder = tmp_path / f"from_{'grouped' if saver else 'sequential'}"
        folder.mkdir()
        dist_checkpointing.save(source.sharded_state_dict(prefix="mlp."), str(folder))
        target = _experts(loader)
        target.load_state_dict(
            {k[len("mlp."):]: v for k, v in
             dist_checkpointing.load(target.sharded_state_dict(prefix="mlp."), str(folder)).items()})
        for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name


def _etp_rank(rank: int, store: str, results) -> None:
    """One of two ranks of an expert-tensor-parallel group of 2 (each holds half of every
    expert's FFN: fc1's rows, fc2's columns; the dispatcher sums the partial outputs)."""
    try:
        _init_parallel(rank, 2, store, etp=2)
        seq, grp = _experts(False, etp=2), _experts(True, etp=2)
        assert seq.local_experts[0].linear_fc2.weight.shape[1] == 16  # half of moe_ffn_hidden_size 32
        _assert_same_run(_run(seq), _run(grp))
        assert _sharded_layout(seq) == _sharded_layout(grp)
        _close_parallel()
        results.put((rank, "ok"))
    except BaseException as e:  # reported by the test
        results.put((rank, repr(e)))


def test_expert_tensor_parallel_module_level(tmp_path):
    """ETP2 at module level (training with parallel.etp > 1 is refused on CPU: gloo has no uneven
    all_gather, which the all-to-all dispatcher then uses): each rank's shard of the experts
    gives the same partial outputs, gradients and checkpoint layout grouped as sequential."""
    # spawn, not fork: a child forked after this process ran a matmul hangs in the CPU thread pool
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    ranks = [context.Process(target=_etp_rank, args=(r, str(tmp_path / "rendezvous"), results)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    alive = [p for p in ranks if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and sorted(results.get() for _ in ranks) == [(0, "ok"), (1, "ok")]


# --------------------------------------------------------------------------- training under EP2

TRAIN = ["train.steps=5", "train.global_batch_size=4", "checkpoint.save_interval=4", "logging.interval=1", "logging.tensorboard=false",
         "parallel.ep=2"]


def _at_iteration(checkpoints: str, iteration: int, out: str) -> str:
    """A checkpoints folder holding only `iteration` of `checkpoints` (resume starts there)."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(checkpoints, name), os.path.join(out, name))
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return out


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory, data_cache):
    """Sequential and grouped experts, 5 steps from the same seed under EP2 (2 gloo ranks);
    then step 5 again by each from the other's iteration-4 checkpoint."""
    root = tmp_path_factory.mktemp("grouped-ep2")
    common = TRAIN + [f"data.cache_dir={data_cache}"]
    runs = {}
    for name, grouped in (("sequential", False), ("grouped", True)):
        runs[name] = str(root / name)
        pretrain(2, common + [f"model.moe_grouped_gemm={str(grouped).lower()}", f"run.dir={runs[name]}"])
    for name, grouped, source in (("grouped_from_sequential", True, "sequential"),
                                  ("sequential_from_grouped", False, "grouped")):
        start = _at_iteration(os.path.join(runs[source], "checkpoints"), 4, str(root / f"{name}_start"))
        runs[name] = str(root / name)
        pretrain(2, common + [f"model.moe_grouped_gemm={str(grouped).lower()}", f"run.dir={runs[name]}",
                              f"checkpoint.load={start}"])
    return {name: losses(run_dir) for name, run_dir in runs.items()}


def test_ep2_five_step_losses_equal(ep2_runs):
    assert list(ep2_runs["sequential"]) == [1, 2, 3, 4, 5]
    assert ep2_runs["grouped"] == ep2_runs["sequential"]  # exact: fp32, same per-expert matmuls


def test_ep2_checkpoint_loads_in_the_other(ep2_runs):
    """Step 5 from the other module's iteration 4 equals step 5 of the uninterrupted runs."""
    for name in ("grouped_from_sequential", "sequential_from_grouped"):
        assert ep2_runs[name] == {5: ep2_runs["sequential"][5]}, name
