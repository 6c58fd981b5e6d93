"""Every CPU / no-Transformer-Engine workaround for megatron-core 0.16.1, in one place.

megatron-core assumes CUDA and Transformer Engine in a handful of places (DESIGN.md lists
them). Each workaround below names the megatron-core call site it serves, is applied only
where it is needed (`needed(hardware)`), and has a test in tests/test_compat.py that fails
if the workaround stops being needed or stops working. No other module asks whether it is
on a CPU: they call `apply()` once and use `transformer_config_overrides()`.

Also here: the notices megatron-core prints for an absence handled above (Apex, TE, ...),
hidden in one place by `hide_notices()` and counted into the start-up banner by
`runtime_summary()`; and `defer_jit_compile()`, which keeps megatron-core's import from loading
torch's compiler. Entry points call both through `before_megatron_import()`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_mm.config import Hardware


@dataclass(frozen=True)
class Workaround:
    name: str
    call_site: str
    needed: Callable[[Hardware], bool]
    apply: Callable[[], None]


_applied: set[str] = set()


# --------------------------------------------------------------------------- RNG tracker
# Call site: megatron/core/tensor_parallel/random.py, CudaRNGStatesTracker.add/fork read and
# write torch.cuda RNG state (model_parallel_cuda_manual_seed → tracker.add).


class CpuRNGStatesTracker:
    """megatron-core's RNG-state tracker interface on the CPU default generator."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_, self.seeds_, self._is_initialized = {}, set(), False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized, self.states_ = True, dict(states)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"rng state {name} (seed {seed}) already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


# Call site: megatron/core/tensor_parallel/random.py CheckpointFunction (full activation
# recomputation, transformer_block.py `_checkpointed_forward` → `tensor_parallel.checkpoint`)
# saves and restores the RNG states around the recomputed forward with `_get_all_rng_states`
# / `_set_all_rng_states`, which read and write the CUDA generator (`_get_cuda_rng_state`).
# On the CPU there is no CUDA generator: the CPU generator and the tracker's states are all
# the recomputed forward draws from (dropout masks must repeat exactly).


def _cpu_checkpoint_rng_states() -> None:
    from megatron.core.tensor_parallel import random

    def get_all_rng_states():
        return torch.get_rng_state(), None, random.get_cuda_rng_tracker().get_states()

    def set_all_rng_states(cpu_rng_state, cuda_rng_state, cuda_rng_state_tracker):
        torch.set_rng_state(cpu_rng_state)
        random.get_cuda_rng_tracker().set_states(cuda_rng_state_tracker)

    random._get_all_rng_states = get_all_rng_states
    random._set_all_rng_states = set_all_rng_states


# --------------------------------------------------------------------------- CUDA devices
# Call sites: ~100 `torch.cuda.current_device()` used as a device (e.g.
# models/common/embeddings/rotary_pos_embedding.py RotaryEmbedding.__init__), and literal
# `device="cuda"` allocations (pipeline_parallel/schedules.py `total_num_tokens`,
# distributed/param_and_grad_buffer.py). On a machine without CUDA every device argument
# names the CPU: this torch-function mode rewrites `device=` arguments and `.cuda()`/
# `.to("cuda")` to the CPU, and `torch.cuda.current_device()` answers the CPU device itself
# (the mode is not active inside autograd's backward, where tensor_parallel/layers.py
# allocates with `device=torch.cuda.current_device()`).
# Call sites: optimizer/distrib_optimizer.py `_build_model_and_main_param_groups`,
# optimizer/optimizer.py `Float16OptimizerWithFloat16Params`, optimizer/clip_grads.py accept
# only parameters whose `tensor.type()` names a CUDA type: the same mode reports a CPU
# tensor's type under its CUDA name (`torch.FloatTensor` → `torch.cuda.FloatTensor`).


def _is_cuda_device(d) -> bool:
    if isinstance(d, int) and not isinstance(d, bool):
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Send every CUDA device argument to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_cuda_mode: CudaToCpuMode | None = None


def _redirect_cuda_devices() -> None:
    global _cuda_mode
    torch.cuda.current_device = lambda: torch.device("cpu")
    _cuda_mode = CudaToCpuMode()
    _cuda_mode.__enter__()  # for the life of the process
    _call_sites_outside_mode()


# The mode costs every torch call it sees a Python round trip (3.7 us measured; 9,766 calls a
# training step at the item-5 CPU benchmark shape, configs/bench/cpu_item5.yaml). It steps aside
# while the call sites below run, which make no CUDA device argument of their own (they allocate
# on `torch.cuda.current_device()`, which answers the CPU above; streams and split sizes are the
# patches below) and make most of a step's torch calls (2,303 a step remain, 76 % fewer):
#   transformer/transformer_layer.py TransformerLayer.forward: attention, MLP, MoE router,
#     dispatcher and experts of every decoder layer;
#   torch/optim/adam.py Adam.step (AdamW's too): the optimizer's update, per parameter;
#   optimizer/distrib_optimizer.py DistributedOptimizer._copy_model_grads_to_main_grads /
#     _copy_main_params_to_model_params: its per-parameter copies.
# Whatever they call outside (a hook, a callback) runs with the mode as before. Probe:
# tests/compat_probes.py cuda_devices_to_cpu (none of them sees the mode; a layer runs on the CPU).
OUTSIDE_CUDA_MODE = [
    ("megatron.core.transformer.transformer_layer", "TransformerLayer", "forward"),
    ("torch.optim.adam", "Adam", "step"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_copy_model_grads_to_main_grads"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_copy_main_params_to_model_params"),
]


def _outside_cuda_mode(method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        if torch.overrides._get_current_function_mode() is not _cuda_mode:
            return method(*args, **kwargs)
        with torch.overrides._pop_mode_temporarily():
            return method(*args, **kwargs)

    run.outside_cuda_mode = True
    return run


def _call_sites_outside_mode() -> None:
    for module, cls, name in OUTSIDE_CUDA_MODE:
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, name, _outside_cuda_mode(getattr(owner, name)))


# --------------------------------------------------------------------------- CUDA streams
# Call sites: transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.__init__
# (`torch.cuda.Stream()`) and `_maybe_dtoh_and_synchronize` (`torch.cuda.current_stream()`,
# `torch.cuda.stream(...)`, `wait_stream`), plus `torch.cuda.synchronize()` in timers.py
# `Timer.start`/`stop` (the step timers a benchmark sets as `config.timers`).
# On the CPU work is synchronous: one stand-in stream object that does nothing.


class _CpuStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def __eq__(self, other):
        return isinstance(other, _CpuStream)

    def __hash__(self):
        return 0


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass


def _cpu_streams() -> None:
    stream = _CpuStream()
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


# --------------------------------------------------------------------------- MoE split sizes
# Call site: transformer/moe/moe_utils.py `maybe_move_tensor_to_cpu` converts only CUDA
# tensors, so on the CPU the all-to-all dispatcher's input/output split sizes stay tensors
# and `torch.distributed.all_to_all_single` rejects them. Convert CPU tensors as well.


def _cpu_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --------------------------------------------------------------------------- no Transformer Engine
# Call site: transformer/multi_latent_attention.py sets HAVE_TE = True because its TE import
# succeeds against megatron's placeholder module, then `isinstance(self.linear_proj, TELinear)`
# fails with TELinear None.  Call site: transformer/moe/moe_utils.py
# RouterGatingLinearFunction.forward reads `te_general_gemm`, never defined when the TE
# import fails (NameError at the first MoE forward).


def _mla_without_te() -> None:
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def _router_gemm_without_te() -> None:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------- optimizer step
# Call site: optimizer/distrib_optimizer.py DistributedOptimizer.state_dict, on the path
# without apex/TE (`not HAVE_APEX_OR_TE`), asserts that every parameter's torch Adam state
# has a `step`; a fresh optimizer (building the sharded state dict to resume into, before
# any step) has none. Give empty states a temporary step 0 while the state dict is read,
# then empty them again so megatron-core's loader finds a fresh optimizer. The same assert
# fails for an optimizer with no parameter at all (the expert optimizer of a pipeline stage
# that holds only dense layers, e.g. first_k_dense_layers=2 under PP2 with EP): it then gets
# a placeholder state entry (not a parameter's; only its step is read) for the same moment,
# whose step is its ChainedOptimizer siblings' step: the param groups' step is saved under a
# key shared by all pipeline stages, so an empty optimizer's step reaches every stage's
# expert optimizer on load (and ChainedOptimizer._synchronize_steps wants them all equal).


def _optimizer_state_before_first_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    original = DistributedOptimizer.state_dict
    sibling_step: dict = {"value": None}

    def with_sibling_step(method):
        def wrapped(self, *args, **kwargs):
            steps = {float(state["step"]) for opt in self.chained_optimizers
                     for state in getattr(getattr(opt, "optimizer", None), "state", {}).values()
                     if isinstance(state, dict) and "step" in state}
            sibling_step["value"] = max(steps) if steps else None
            try:
                return method(self, *args, **kwargs)
            finally:
                sibling_step["value"] = None

        return wrapped

    ChainedOptimizer.sharded_state_dict = with_sibling_step(ChainedOptimizer.sharded_state_dict)
    ChainedOptimizer.state_dict = with_sibling_step(ChainedOptimizer.state_dict)

    def state_dict(self):
        inner = self.optimizer
        filled = []
        placeholder = "megatron_mm: no parameters"
        if isinstance(inner, torch.optim.Adam):
            for group in inner.param_groups:
                for param in group["params"]:
                    if not inner.state[param]:
                        inner.state[param]["step"] = torch.tensor(0.0)
                        filled.append(param)
            if not any(group["params"] for group in inner.param_groups):
                inner.state[placeholder] = {"step": torch.tensor(sibling_step["value"] or 0.0)}
        try:
            return original(self)
        finally:
            for param in filled:
                inner.state.pop(param, None)
            if isinstance(inner, torch.optim.Adam):
                inner.state.pop(placeholder, None)

    DistributedOptimizer.state_dict = state_dict


# Call site: optimizer/distrib_optimizer.py load_parameter_state_from_fully_reshardable skips
# torch Adam's "step" when it reads the checkpoint (step comes back through the param
# groups), then `_set_main_param_and_optimizer_states` copies every key of the destination
# state, "step" included: KeyError. Keep the already-restored step for that key.
# Call site: DistributedOptimizer.load_state_dict (no apex/TE path) gives every parameter
# the *same* step tensor (`s["step"] = step`); torch Adam increments steps in place, so
# after a resume the shared step advanced once per parameter per update and Adam's bias
# correction went wrong. Give each parameter its own copy.


def _adam_step_on_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict


# --------------------------------------------------------------------------- zero_grad of views
# Call site: optimizer/distrib_optimizer.py DistributedOptimizer.zero_grad passes
# `shard_fp32_groups` (views of fp32 parameters, `model_param.view(-1)[start:end]`, so not
# leaves) to optimizer/optimizer.py `_zero_grad_group_helper`, whose `getattr(param, "grad")`
# makes torch warn "The .grad attribute of a Tensor that is not a leaf Tensor is being
# accessed" (megatron-core's own comment there: "throws grad-access warning"). Harmless: torch
# warns only while that `.grad` is unset, so the read answers None and there is nothing to
# zero, which is right (each step `_copy_model_grads_to_main_grads` sets it afresh). The
# warning is megatron-core's on any hardware with fp32 parameters; on the CPU it carried
# compat.py's file and line only because CudaToCpuMode re-issues the `Tensor.grad` getter.
# Silenced for that helper's calls from the distributed optimizer, nowhere else.

_NON_LEAF_GRAD = r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"


def _zero_grad_of_views() -> None:
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer._zero_grad_group_helper

    def zero_grad_group_helper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
            return original(*args, **kwargs)

    distrib_optimizer._zero_grad_group_helper = zero_grad_group_helper


# --------------------------------------------------------------------------- fused functions
# Call site: megatron/core/jit.py, enable_jit_fuser() at import: `jit_fuser = torch.compile`,
# then megatron/core/fusions/*.py and transformer/moe/router.py decorate functions with it while
# megatron.core imports. torch.compile(fn) only wraps fn (it compiles at the first call), but it
# imports torch._dynamo and torch._inductor to do so: 1.8 s of every process's start (4.5 s ->
# 2.7 s for megatron-core), also for processes that never call a fused function. So
# `before_megatron_import()` (on any hardware: not a workaround) has megatron/core/jit.py see
# `_compile_at_first_call` as torch.compile.
#
# Workaround (CPU): the first call then compiles, as before. On a CPU every MoE run calls
# TopKRouter._apply_expert_bias (router.py, `@jit_fuser`, a one-line count of routed tokens)
# and inductor compiles it for 3.7 s per process (measured: a 3-step tiny run, 14.6 s -> 10.9 s),
# for nothing to gain: `_eager_fused_functions` has the fused functions run as written.

_fused_eagerly = False


def _compile_at_first_call(fn=None, **options):
    """torch.compile(fn, **options), made when the returned function first runs (or fn itself
    under `_eager_fused_functions`)."""
    if fn is None:  # used as @torch.compile(...)
        return lambda f: _compile_at_first_call(f, **options)
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = fn if _fused_eagerly else torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return run


class _DeferMegatronJit(importlib.abc.MetaPathFinder):
    """Runs megatron/core/jit.py with torch.compile standing in as `_compile_at_first_call`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron.core.jit":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            real, torch.compile = torch.compile, _compile_at_first_call
            try:
                run_module(module)
            finally:
                torch.compile = real

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def defer_jit_compile() -> None:
    """Install `_DeferMegatronJit` (idempotent; too late once megatron.core is imported)."""
    if not any(isinstance(finder, _DeferMegatronJit) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeferMegatronJit())


def jit_fuser_deferred() -> bool:
    """Whether megatron-core's jit_fuser is `_compile_at_first_call` (imports megatron.core)."""
    from megatron.core import jit

    return jit.jit_fuser is _compile_at_first_call


def _eager_fused_functions() -> None:
    global _fused_eagerly
    _fused_eagerly = True


# --------------------------------------------------------------------------- save results
# Call site: megatron/core/dist_checkpointing/strategies/filesystem_async.py,
# _get_write_results_queue(): the writer hands its results back through a queue of a
# multiprocessing Manager started with "spawn" at a process's first save: a new interpreter that
# imports torch, 2.4 s of CPU on every rank of every run that saves (measured: a 3-step tiny run
# spends 3.4 s in its one save, 2.5 s of it waiting for the Manager). Our saves are synchronous
# (checkpoint.save: dist_checkpointing.save, no AsyncCallsQueue): the writer runs in this
# process, so a queue of this process serves. Any hardware.


def _save_results_in_process() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# --------------------------------------------------------------------------- FlexAttention on a CPU
# Call site: not megatron-core but our decoder attention over packed samples
# (models/portable.py FlexSegmentAttention → models/packed_attention.py `kernel`): torch 2.13's
# `torch.nn.attention.flex_attention.flex_attention` refuses any input that requires grad on a
# CPU (`_validate_device`: "FlexAttention does not support backward on CPU"), compiled or not.
# On a CPU the block mask's mask function is applied here the way torch's own eager
# FlexAttention applies it (at every query/key position, the block lists unread), as a boolean
# mask for SDPA: [b, 1, s, s], smaller than the [b, h, s, s] scores eager FlexAttention
# materialises anyway, and 14x faster (measured fwd+bwd, b2 h4 s128: 4 ms against 57 ms for
# torch's eager flex_attention op with autograd). Our mask function broadcasts, so it is called
# once on index grids. tests/test_fused_attention.py checks the block lists themselves and
# FlexAttention's own (eager, forward) values against the dense mask.


def _flex_attention_through_sdpa(query, key, value, block_mask, scale):
    b, s = query.shape[0], query.shape[2]
    index = torch.arange(s, device=query.device)
    batch = torch.arange(b, device=query.device)[:, None, None, None]
    allowed = block_mask.mask_mod(batch, 0, index[:, None], index[None, :])  # [b, 1, s, s]
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)


def _cpu_flex_attention() -> None:
    from megatron_mm.models import packed_attention

    packed_attention.kernel = _flex_attention_through_sdpa


# --------------------------------------------------------------------------- one-rank buffer collectives
# Call site: distributed/param_and_grad_buffer.py, `_ParamAndGradBucketGroup.start_grad_sync`
# (`dist_reduce_scatter_func(local_data_view, bucket.grad_data, ...)`, the distributed
# optimizer's gradient reduce-scatter) and `start_param_sync` (`dist_all_gather_func(
# bucket.param_data, local_data_view, ...)`, its parameter all-gather), once a step each. With one
# rank in the distributed optimizer's group the shard *is* the whole buffer (the same memory), so
# both are the identity, but gloo still runs them as collectives over the gradient and parameter
# buffers: 20-23 ms of CPU a step each at 6M parameters, and far more wall time on a loaded
# machine (gloo's own threads; measured 170 ms each at a load of 30 on 2 cores). Skipped when the
# group has one rank, the op is synchronous and the shard is the buffer; anything else goes to
# megatron-core's call as before. Applied where there is no GPU (gloo); NCCL's one-rank case not measured.


def _skip_one_rank_buffer_collectives() -> None:
    from megatron.core.distributed import param_and_grad_buffer as buffers

    def identity(output, input_, group=None, async_op=False):
        return (not async_op and torch.distributed.get_world_size(group) == 1
                and output.data_ptr() == input_.data_ptr() and output.numel() == input_.numel())

    reduce_scatter, all_gather = buffers.dist_reduce_scatter_func, buffers.dist_all_gather_func

    def reduce_scatter_unless_one_rank(output, input_, op=None, group=None, async_op=False):
        if identity(output, input_, group, async_op):
            return None
        kwargs = {} if op is None else {"op": op}
        return reduce_scatter(output, input_, group=group, async_op=async_op, **kwargs)

    def all_gather_unless_one_rank(output, input_, group=None, async_op=False):
        if identity(output, input_, group, async_op):
            return None
        return all_gather(output, input_, group=group, async_op=async_op)

    buffers.dist_reduce_scatter_func = reduce_scatter_unless_one_rank
    buffers.dist_all_gather_func = all_gather_unless_one_rank


WORKAROUNDS: list[Workaround] = [
    Workaround(
        "cpu_rng_tracker",
        "megatron/core/tensor_parallel/random.py: CudaRNGStatesTracker.add uses torch.cuda RNG",
        lambda hw: not hw.has_cuda,
        _install_cpu_rng_tracker,
    ),
    Workaround(
        "cpu_checkpoint_rng",
        "megatron/core/tensor_parallel/random.py CheckpointFunction: _get_all_rng_states reads torch.cuda RNG",
        lambda hw: not hw.has_cuda,
        _cpu_checkpoint_rng_states,
    ),
    Workaround(
        "cuda_devices_to_cpu",
        "rotary_pos_embedding.py RotaryEmbedding: torch.cuda.current_device(); "
        "schedules.py: torch.zeros(device='cuda'); models/vision/clip_vit_model.py CLIPViTModel: .cuda() position ids",
        lambda hw: not hw.has_cuda,
        _redirect_cuda_devices,
    ),
    Workaround(
        "cpu_streams",
        "moe/token_dispatcher.py MoEAlltoAllTokenDispatcher: torch.cuda.Stream/current_stream; "
        "timers.py Timer.start/stop: torch.cuda.synchronize",
        lambda hw: not hw.has_cuda,
        _cpu_streams,
    ),
    Workaround(
        "cpu_split_sizes",
        "moe/moe_utils.py maybe_move_tensor_to_cpu leaves CPU split sizes as tensors",
        lambda hw: not hw.has_cuda,
        _cpu_split_sizes,
    ),
    Workaround(
        "mla_without_te",
        "transformer/multi_latent_attention.py: HAVE_TE True without TE; isinstance(x, None)",
        lambda hw: not hw.has_transformer_engine,
        _mla_without_te,
    ),
    Workaround(
        "router_gemm_without_te",
        "transformer/moe/moe_utils.py RouterGatingLinearFunction: undefined te_general_gemm",
        lambda hw: not hw.has_transformer_engine,
        _router_gemm_without_te,
    ),
    Workaround(
        "optimizer_state_before_first_step",
        "optimizer/distrib_optimizer.py DistributedOptimizer.state_dict: assert every state has 'step'",
        lambda hw: not hw.has_transformer_engine,
        _optimizer_state_before_first_step,
    ),
    Workaround(
        "adam_step_on_load",
        "optimizer/distrib_optimizer.py _set_main_param_and_optimizer_states: KeyError 'step'; "
        "load_state_dict shares one step tensor between parameters",
        lambda hw: not hw.has_transformer_engine,
        _adam_step_on_load,
    ),
    Workaround(
        "zero_grad_of_views",
        "optimizer/distrib_optimizer.py DistributedOptimizer.zero_grad: _zero_grad_group_helper reads .grad "
        "of non-leaf views (torch warns; any hardware)",
        lambda hw: True,
        _zero_grad_of_views,
    ),
    Workaround(
        "eager_fused_functions",
        "jit.py jit_fuser = torch.compile: transformer/moe/router.py TopKRouter._apply_expert_bias and the "
        "fusions compile with inductor at their first call (3.7 s a process on CPU)",
        lambda hw: not hw.has_cuda,
        _eager_fused_functions,
    ),
    Workaround(
        "save_results_in_process",
        "dist_checkpointing/strategies/filesystem_async.py _get_write_results_queue: a spawned Manager "
        "process at the first save (2.4 s a rank; our saves are synchronous; any hardware)",
        lambda hw: True,
        _save_results_in_process,
    ),
    Workaround(
        "cpu_flex_attention",
        "not megatron-core: torch/nn/attention/flex_attention.py flex_attention refuses backward on a CPU "
        "(our FlexSegmentAttention, model.document_attention=fused)",
        lambda hw: not hw.has_cuda,
        _cpu_flex_attention,
    ),
    Workaround(
        "one_rank_buffer_collectives",
        "distributed/param_and_grad_buffer.py start_grad_sync / start_param_sync: gloo reduce-scatters and "
        "all-gathers the whole gradient and parameter buffers over a one-rank group (the identity) every step",
        lambda hw: not hw.has_cuda,
        _skip_one_rank_buffer_collectives,
    ),
]


def apply(hardware: Hardware) -> list[str]:
    """Apply every workaround this machine needs (idempotent); return their names."""
    names = []
    for w in WORKAROUNDS:
        if w.needed(hardware):
            if w.name not in _applied:
                w.apply()
                _applied.add(w.name)
            names.append(w.name)
    return names


def seed_everything(seed: int) -> None:
    """Seed torch and megatron-core's model-parallel RNG tracker (after `apply`)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config_overrides(hardware: Hardware) -> dict:
    """TransformerConfig fields this machine needs: fused kernels from apex/TE/CUDA off where
    they do not exist; weights initialised on the CPU where there is no GPU."""
    overrides = {}
    if not hardware.has_transformer_engine:
        overrides.update(
            gradient_accumulation_fusion=False,
            masked_softmax_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
        )
    if not hardware.has_cuda:
        # gloo matches p2p messages by (peer, tag) in posting order; with PP2 + VPP a rank's
        # previous and next stage are the same rank, and the batched exchange
        # (pipeline_parallel/p2p_communication.py `_batched_p2p_ops`) posts the activation
        # and the gradient to it in an order the peer does not receive them in: each rank
        # gets the peer's gradient as its input activation and vice versa. The unbatched
        # `_p2p_ops` orders them by rank parity. Probe: tests/compat_probes.py batch_p2p_comm.
        overrides.update(use_cpu_initialization=True, batch_p2p_comm=False)
    return overrides


# --------------------------------------------------------------------------- notices
# What megatron-core (and torch under it) prints on every CPU start for something we know and
# handle; a user can do nothing about it. Each notice is matched by its message *and* the
# package that reports it, never by category alone: every other warning still shows.
# `hide_notices()` installs the filters once per process, before megatron-core is imported
# (the entry points call it through megatron_mm.cli.report_errors and
# megatron_mm.conversion.cli.run_conversion); `runtime_summary` puts the count into the
# start-up banner. Probes (the notice is still printed without the filter, and hidden with it):
# tests/compat_probes.py NOTICE_PROBES.


@dataclass(frozen=True)
class Notice:
    name: str
    call_site: str
    message: str  # regular expression, matched at the start of the message
    source: str  # the packages that report it ("a.b|c.d"; a warning) or the logger's name (a log record)
    kind: str  # "warning" or "log"
    about_apex_te: bool  # counted in the banner's Apex / Transformer Engine line


NOTICES: list[Notice] = [
    Notice(
        "apex_te_fallbacks",
        "optimizer/__init__.py:24, optimizer/optimizer.py:28, optimizer/clip_grads.py:29, "
        "distributed/fsdp/src/megatron_fsdp/mixed_precision.py:114, at import: torch optimizers and local "
        "multi_tensor_* functions instead of Apex's / Transformer Engine's fused ones",
        r"Transformer Engine and Apex are not installed\. Falling back to",
        "megatron.core", "warning", True,
    ),
    Notice(
        "apex_norm_fallback",
        "models/backends.py:21 and models/gpt/gpt_layer_specs.py:70, at import: torch norms instead of "
        "Apex's fused LayerNorm (our spec brings its own RMSNorm)",
        r"Apex is not installed\. Falling back to Torch Norm",
        "megatron.core", "warning", True,
    ),
    Notice(
        "c10d_renamed_collectives",
        "distributed/param_and_grad_buffer.py:35, tensor_parallel/mappings.py:12, tensor_parallel/layers.py:79, "
        "timers.py:26, utils.py:1102 bind torch.distributed.reduce_scatter_tensor / all_gather_into_tensor, "
        "which torch 2.13 deprecates for *_single (reported from torch/distributed/c10d_logger.py)",
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        "torch.distributed", "warning", False,
    ),
    Notice(
        "dcp_load_state_dict_renamed",
        "dist_checkpointing/strategies/torch.py:799 (TorchDistLoadShardedStrategy.load) calls "
        "torch.distributed.checkpoint.load_state_dict, which torch 2.13 deprecates for `load`; every resume",
        r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead",
        "megatron.core", "warning", False,
    ),
    Notice(
        "sharded_tensor_deprecated",
        "dist_checkpointing/strategies/torch.py builds torch ShardedTensors for the torch_dist format, which "
        "torch 2.13 deprecates for DTensor; every resume (reported from CudaToCpuMode on CPU, which makes "
        "the call)",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        "megatron.core|megatron_mm.runtime", "warning", False,
    ),
    Notice(
        "expert_sequence_parallel_off",
        "tensor_parallel/layers.py:914 (ColumnParallelLinear/RowParallelLinear.__init__): the routed experts' "
        "linears run on the expert TP group (parallel.etp=1) and turn sequence parallelism off for "
        "themselves, as intended, whenever parallel.sequence_parallel is on",
        r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1\. Disabling sequence parallel",
        "megatron.core", "warning", False,
    ),
    Notice(
        "cuda_device_max_connections",
        "tensor_parallel/layers.py:730 (linear_with_grad_accumulation_and_async_allreduce), with sequence "
        "parallelism: a GPU setting (our sbatch jobs export CUDA_DEVICE_MAX_CONNECTIONS=1); nothing to set on CPU",
        r"When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
        "megatron.core", "warning", False,
    ),
    Notice(
        "rerun_state_machine_disabled",
        "rerun_state_machine.py get_rerun_state_machine and RerunStateMachine.__init__ log at WARNING that "
        "the result-validation rerun machine starts, in its default mode DISABLED (first schedule call)",
        r"Implicit initialization of Rerun State Machine!$|RerunStateMachine initialized in mode RerunMode\.DISABLED$",
        "megatron.core.rerun_state_machine", "log", False,
    ),
]

_hidden: Counter = Counter()
_notices_installed = False


def _reported_from(filename: str, packages: str) -> bool:
    """Whether `filename` lies in one of `packages` ("a.b|c.d")."""
    path = filename.replace("\\", "/")
    return any(f"/{package.replace('.', '/')}/" in path for package in packages.split("|"))


def hide_notices() -> None:
    """Hide NOTICES for the rest of the process, counting them (idempotent). Call before
    megatron-core is imported: most of them are printed at import."""
    global _notices_installed
    if _notices_installed:
        return
    _notices_installed = True
    warned = [n for n in NOTICES if n.kind == "warning"]
    for n in warned:
        # "default" (once a call site) ahead of the user's filters: a notice reaches the
        # counting hook below even under -W error, which is for warnings one can act on.
        modules = "|".join(re.escape(package) + r"\." for package in n.source.split("|"))
        warnings.filterwarnings("default", message=n.message, module=modules)
    previous = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        for n in warned:
            if re.match(n.message, str(message)) and _reported_from(filename, n.source):
                _hidden[n.name] += 1
                return
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    for n in NOTICES:
        if n.kind == "log":
            def drop(record, n=n):
                if re.match(n.message, record.getMessage()):
                    _hidden[n.name] += 1
                    return False
                return True

            logging.getLogger(n.source).addFilter(drop)


def before_megatron_import() -> None:
    """What every entry point calls before megatron-core is imported: its notices hidden and
    counted (`hide_notices`), its fused functions compiled at their first call, not at import."""
    hide_notices()
    defer_jit_compile()


def hidden_notices() -> dict[str, int]:
    """How many times each notice was hidden so far in this process."""
    return dict(_hidden)


def runtime_summary(hardware: Hardware) -> str | None:
    """The banner's line on what megatron-core runs without (None when Apex and TE are both here)."""
    missing = []
    if importlib.util.find_spec("apex") is None:
        missing.append("no Apex")
    if not hardware.has_transformer_engine:
        missing.append("no Transformer Engine")
    if not missing:
        return None
    line = f"runtime: {', '.join(missing)} (megatron-core's torch fallbacks; our portable layer spec)"
    count = sum(_hidden[n.name] for n in NOTICES if n.about_apex_te)
    if count:
        line += f"; {count} megatron-core notice{'s' if count > 1 else ''} about them hidden"
    return line
