"""Probes of the megatron-core call sites each compat workaround serves. Run as a script
(`python compat_probes.py with|without`) it prints JSON {workaround: "ok" | error}.

Two kinds: PROBES, one per `compat.WORKAROUNDS` entry ("with" applies them all), and
OVERRIDE_PROBES, one per TransformerConfig override in `compat.transformer_config_overrides`
that works around megatron-core ("with" uses the overrides, "without" megatron's defaults).
"""

import dataclasses
import datetime
import inspect
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

import torch  # noqa: E402


def cpu_rng_tracker():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=False)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked state advanced


def cpu_checkpoint_rng():
    """Full recomputation (`tensor_parallel.checkpoint`) replays the forward's random draws,
    from the CPU generator and from the tracker, so the gradient follows the forward's
    dropout masks."""
    from megatron.core import tensor_parallel

    def dropouts(x):
        x = torch.nn.functional.dropout(x, 0.5)  # CPU generator
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, 0.5)  # the tracker's state

    x = torch.randn(64, requires_grad=True)
    y = tensor_parallel.checkpoint(dropouts, False, x)
    y.sum().backward()
    assert torch.equal(x.grad, 4.0 * (y != 0)), "the recomputed forward drew other dropout masks"


def cuda_devices_to_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(8, rotary_percent=1.0)
    assert emb.inv_freq.device.type == "cpu"
    assert torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    from megatron.core.models.vision import clip_vit_model  # models/encoders.py VisionTower's constructor

    assert ".cuda()" in inspect.getsource(clip_vit_model.CLIPViTModel.__init__)
    assert torch.arange(3).cuda().device.type == "cpu"
    # The call sites the mode steps aside for: wrapped, they run without it, and their own code
    # still names no CUDA device.
    import importlib

    from megatron_mm.runtime import compat

    for module, cls, name in compat.OUTSIDE_CUDA_MODE:
        method = getattr(getattr(importlib.import_module(module), cls), name)
        assert getattr(method, "outside_cuda_mode", False), f"{cls}.{name} runs under the mode"
        source = inspect.getsource(inspect.unwrap(method))
        assert not any(s in source for s in ('"cuda"', "'cuda'", ".cuda(")), f"{cls}.{name} names a CUDA device"
    assert compat._outside_cuda_mode(torch.overrides._get_current_function_mode)() is None
    assert torch.overrides._get_current_function_mode() is not None  # and it is back


def cpu_streams():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pass
    stream.wait_stream(torch.cuda.current_stream())
    stream.record_event().synchronize()
    from megatron.core.timers import Timers

    timer = Timers(2, "minmax")("forward-compute", log_level=2)  # Timer.start/stop: torch.cuda.synchronize()
    timer.start()
    timer.stop()
    assert timer.elapsed() >= 0


def cpu_split_sizes():
    from megatron.core.transformer.moe import token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert not torch.is_tensor(out), "split sizes stayed a tensor"


def mla_without_te():
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.HAVE_TE:
        isinstance(torch.nn.Linear(1, 1), mla.TELinear)  # the check MLASelfAttention makes


def router_gemm_without_te():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x, w = torch.randn(3, 4), torch.randn(2, 4)
    assert torch.allclose(router_gating_linear(x, w, None, torch.float32), x @ w.t())


def _patched(fn) -> bool:
    return fn.__module__ == "megatron_mm.runtime.compat"


# The two optimizer call sites need a whole DistributedOptimizer; the bit-exact resume test
# in test_training.py shows the patches work. Here: megatron-core still has the code.
def optimizer_state_before_first_step():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fn = DistributedOptimizer.state_dict
    assert _patched(fn) or "assert len(steps) == 1" not in inspect.getsource(fn), "asserts a step exists"


def adam_step_on_load():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fn = DistributedOptimizer.load_state_dict
    assert _patched(fn) or 's["step"] = step' not in inspect.getsource(fn), "one step tensor shared by all"


def zero_grad_of_views():
    """The distributed optimizer zeroes the gradients of views of its fp32 parameters (not
    leaves): torch warns about reading their `.grad`, which is unset (nothing to zero)."""
    from megatron.core.optimizer import distrib_optimizer

    param = torch.nn.Parameter(torch.ones(4))
    view = param.view(-1)[1:3]  # what DistributedOptimizer.shard_fp32_groups hold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distrib_optimizer._zero_grad_group_helper([view], set_to_none=True)
    assert not caught, f"warned: {str(caught[0].message)[:80]}"


def eager_fused_functions():
    """The router's count of routed tokens (`@jit_fuser`) runs as written: dynamo traces nothing.
    Without: torch.compile's first call traces it (and inductor compiles it, seconds on a CPU)."""
    from megatron.core.transformer.moe.router import TopKRouter
    from torch._dynamo.utils import counters

    class Router:
        enable_expert_bias = True
        local_tokens_per_expert = torch.zeros(4)

    before = sum(counters["frames"].values())
    TopKRouter._apply_expert_bias(Router(), torch.tensor([[True, False, True, False]]))
    assert Router.local_tokens_per_expert.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert sum(counters["frames"].values()) == before, "torch.compile traced the function"


def save_results_in_process():
    """A save's writer hands its results back through a queue of this process (without: the
    queue of a Manager process started with spawn, 2.4 s)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert isinstance(filesystem_async._get_write_results_queue(), queue.Queue)


def cpu_flex_attention():
    """FlexAttention over a packed block mask trains on a CPU (without: torch refuses its
    backward there) and gives SDPA's values and gradients over the dense mask."""
    from megatron_mm.models import packed_attention
    from megatron_mm.models.attention_mask import document_attention_mask

    segments = torch.tensor([[1] * 5 + [2] * 7 + [0] * 4])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, d, generator=g, requires_grad=True) for d in (6, 6, 4))
    flex = packed_attention.flex_attention(q, k, v, packed_attention.segment_block_mask(segments, 8), None)
    grads = torch.autograd.grad(flex.square().sum(), (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~document_attention_mask(segments))
    for a, b in zip((flex, *grads), (sdpa, *torch.autograd.grad(sdpa.square().sum(), (q, k, v)))):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def one_rank_buffer_collectives():
    """On a one-rank group the distributed optimizer's gradient reduce-scatter and parameter
    all-gather (param_and_grad_buffer.py, inside a coalescing manager as start_grad_sync and
    start_param_sync call them) queue no collective for gloo, and leave the buffer as it was.
    Without: both are queued (and run over the whole buffers at the manager's exit)."""
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from torch.distributed.distributed_c10d import _coalescing_manager, _world

    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            group = torch.distributed.new_group([0])
            grads, params = torch.arange(6.0), torch.arange(6.0) + 10
            queued = 0
            with _coalescing_manager(group):
                buffers.dist_reduce_scatter_func(grads[0:6], grads, op=torch.distributed.ReduceOp.SUM, group=group)
                queued += len(_world.pg_coalesce_state.get(group, []))
            with _coalescing_manager(group):
                buffers.dist_all_gather_func(params, params[0:6], group=group)
                queued += len(_world.pg_coalesce_state.get(group, []))
            assert torch.equal(grads, torch.arange(6.0)) and torch.equal(params, torch.arange(6.0) + 10)
            assert queued == 0, f"{queued} one-rank collectives queued"
        finally:
            torch.distributed.destroy_process_group()


PROBES = [cpu_rng_tracker, cpu_checkpoint_rng, cuda_devices_to_cpu, cpu_streams, cpu_split_sizes, mla_without_te,
          router_gemm_without_te, optimizer_state_before_first_step, adam_step_on_load, zero_grad_of_views,
          eager_fused_functions, save_results_in_process, cpu_flex_attention,
          one_rank_buffer_collectives]


# --------------------------------------------------------------------------- notices
# `python compat_probes.py notices`, in a fresh process with warnings shown: hides the
# notices, then triggers each of compat.NOTICES where megatron-core (or torch under it) prints
# it; prints JSON {notice: times hidden} (counted only when printed).


def trigger_notices():
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401  Apex norm fallback, at import
    import megatron.core.optimizer  # noqa: F401  Apex/TE fallbacks, at import
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        torch.distributed.reduce_scatter_tensor(torch.zeros(2), torch.ones(2))  # as param_and_grad_buffer.py binds it
        torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
        get_rerun_state_machine()  # first use by the schedules: implicit, mode DISABLED
        # a torch_dist checkpoint saved and loaded, as on every resume (the loader builds torch
        # ShardedTensors through the deprecated load_state_dict)
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        from megatron_mm.config import Hardware
        from megatron_mm.runtime import compat

        compat.apply(Hardware())  # as in training: the writer synchronises "CUDA"

        def layer_stack(data):  # a tensor of layer 0 of a stack, as TransformerBlock shards its layers
            return {"w": ShardedTensor.from_rank_offsets("w", data, (0, 0, 1), replica_id=0, prepend_axis_num=1)}

        os.makedirs(f"{tmp}/ckpt")
        dist_checkpointing.save(layer_stack(torch.ones(4)), f"{tmp}/ckpt")
        dist_checkpointing.load(layer_stack(torch.zeros(4)), f"{tmp}/ckpt")
        # a sequence-parallel linear on a TP group of one (the experts' with parallel.etp=1), run
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel.layers import (
            ColumnParallelLinear, linear_with_grad_accumulation_and_async_allreduce,
        )

        parallel_state.initialize_model_parallel()
        group = parallel_state.get_tensor_model_parallel_group()
        config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True)
        ColumnParallelLinear(4, 4, config=config, init_method=torch.nn.init.zeros_, tp_group=group)
        linear_with_grad_accumulation_and_async_allreduce(torch.ones(2, 1, 4), torch.ones(4, 4), None, False, False,
                                                          sequence_parallel=True, tp_group=group)
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()



# --------------------------------------------------------------------------- config overrides

CONFIG_OVERRIDES: dict = {}  # "with": compat.transformer_config_overrides(CPU); "without": none


def _exchange_with_peer(rank, rendezvous, config_kwargs, received):
    """One of two pipeline ranks: the interleaved schedule's bidirectional exchange, sending
    activation 100+rank forward and gradient 200+rank backward; puts what arrived."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from megatron_mm.config import Hardware
    from megatron_mm.runtime import compat

    compat.apply(Hardware())  # the call site also allocates on torch.cuda.current_device()
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))
    comm = P2PCommunicator(torch.distributed.new_group([0, 1]),
                           ModelParallelConfig(pipeline_dtype=torch.float32, **config_kwargs))
    activation, gradient = comm.send_forward_backward_recv_forward_backward(
        torch.full((2, 3), 100.0 + rank), torch.full((2, 3), 200.0 + rank),
        recv_prev=True, recv_next=True, tensor_shape=(2, 3))
    received.put((rank, activation.unique().tolist(), gradient.unique().tolist()))
    torch.distributed.destroy_process_group()


def batch_p2p_comm():
    """PP2: a rank's previous and next stage are the same peer. The interleaved schedule's
    `send_forward_backward_recv_forward_backward` must still hand each rank the peer's
    activation as its input and the peer's gradient as its output gradient."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    fields = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    config_kwargs = {k: v for k, v in CONFIG_OVERRIDES.items() if k in fields}
    context = torch.multiprocessing.get_context("fork")  # fork: the ranks inherit imported megatron-core
    received = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_exchange_with_peer, args=(os.path.join(tmp, "rendezvous"), config_kwargs,
                                              received), nprocs=2, start_method="fork")
    for rank, activation, gradient in sorted(received.get() for _ in range(2)):
        peer = 1 - rank
        assert (activation, gradient) == ([100.0 + peer], [200.0 + peer]), (
            f"rank {rank} received activation {activation} and gradient {gradient} from rank {peer}, "
            f"which sent activation {100.0 + peer} and gradient {200.0 + peer}")


OVERRIDE_PROBES = [batch_p2p_comm]

if __name__ == "__main__" and sys.argv[1] == "notices":
    warnings.filters.remove(("ignore", None, Warning, None, 0))  # Python's defaults, as for a user
    warnings._filters_mutated()
    from megatron_mm.runtime import compat

    compat.hide_notices()
    trigger_notices()
    print(json.dumps(compat.hidden_notices()))
elif __name__ == "__main__":
    from megatron_mm.config import Hardware

    if sys.argv[1] == "with":
        from megatron_mm.runtime import compat

        compat.defer_jit_compile()  # as every entry point, before megatron-core is imported
        cpu = Hardware(has_cuda=False, fp8_capable=False, has_transformer_engine=False)
        compat.apply(cpu)
        CONFIG_OVERRIDES.update(compat.transformer_config_overrides(cpu))
    results = {}
    for probe in PROBES + OVERRIDE_PROBES:
        try:
            probe()
            results[probe.__name__] = "ok"
        except BaseException as err:  # noqa: BLE001 - report whatever the call site raises
            results[probe.__name__] = f"{type(err).__name__}: {err}"[:300]
    print(json.dumps(results))
