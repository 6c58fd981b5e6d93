"""The optimizer's state in a checkpoint, in a form no parallel layout shapes.

megatron-core's optimizer writes its state (`sharded_state_dict`, the distributed optimizer in
its `fully_reshardable` form) as sharded tensors named after the model's parameters, e.g.
`optimizer.state.exp_avg.decoder.layers.3.mlp.router.weight`, which any layout can read. But
the dict around them follows the optimizer objects of the saving layout: one optimizer (EP 1:
expert parameters are ordinary data-parallel ones) or a ChainedOptimizer of two (EP > 1: the
expert parameters get their own, keyed 0 and 1, their tensors prefixed `chained_N.`), dense
param groups or expert ones, the step in the param groups (distributed optimizer) or under
`common_step` (the plain one). dist_checkpointing.load merges the saved dict into the requested
one by structure, so any change of EP failed ("Different dict keys encountered in
`apply_factory_merges`"), and megatron-core has no conversion between the two forms.

So a checkpoint holds, under "optimizer":
    "tensors": {i: every sharded tensor (or factory) of the optimizer's own sharded state dict},
    "step":    the optimizer's step count (the same for all parameters and ranks),
and loading asks for the tensors this layout's optimizer needs by their names (the dict keys
`i` only have to be unique), puts them back where its own `sharded_state_dict` has them, fills
in the step, and hands that to `optimizer.load_state_dict`. The param groups' settings (lr,
weight decay, ...) are this run's (the scheduler sets lr on the next step anyway).

Written by hand: megatron-core 0.16.1 converts between no two of its optimizer layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedTensorFactory

# Tensors keyed by the parameter's name alone, the same under any layout: no `chained_N.`
# prefix (ChainedOptimizer.sharded_state_dict adds it unless told not to).
METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# The fp32 copy of each parameter the distributed optimizer keeps (`param`) or a mixed-precision
# optimizer does (`fp32_param`): the model's weights again, present or not by the optimizer kind.
MAIN_PARAM_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


def _leaves(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every leaf of nested dicts and lists."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _leaves(value, path + (index,))
    else:
        yield path, tree


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Any, path: tuple, value: Any) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def _is_sharded(value: Any) -> bool:
    return isinstance(value, (ShardedBase, ShardedTensorFactory))


def _parts(native: dict) -> list[dict]:
    """The state dict of each optimizer: a ChainedOptimizer of several keys them 0, 1, ..."""
    if native and all(isinstance(key, int) for key in native):
        return [native[key] for key in sorted(native)]
    return [native]


def _step(part: dict) -> Optional[float]:
    """The step count in one optimizer's state dict (None before the first step)."""
    if "param_state_sharding_type" in part:  # distributed optimizer: in each param group
        steps = {group["step"] for group in part["optimizer"]["param_groups"] if "step" in group}
    else:  # megatron-core's plain optimizers, around torch's ({"optimizer": ...} if mixed precision)
        steps = {part.get("optimizer", part).get("state", {}).get("common_step")} - {None}
    steps = {float(step) for step in steps}
    if len(steps) > 1:
        raise ValueError(f"the optimizer's param groups are at different steps: {sorted(steps)}")
    return steps.pop() if steps else None


def _set_step(part: dict, step: float) -> None:
    if "param_state_sharding_type" in part:
        for group in part["optimizer"]["param_groups"]:
            group["step"] = step
    else:  # torch's Adam counts in a float tensor per parameter (copied from this one)
        part.get("optimizer", part)["state"]["common_step"] = torch.tensor(step)


def for_save(optimizer, model_state: dict) -> dict:
    """The optimizer's entry of a checkpoint being saved."""
    native = optimizer.sharded_state_dict(model_state, is_loading=False, metadata=METADATA)
    steps = {_step(part) for part in _parts(native)} - {None}
    if len(steps) > 1:
        raise ValueError(f"the chained optimizers are at different steps: {sorted(steps)}")
    tensors = [value for _, value in _leaves(native) if _is_sharded(value)]
    return {"tensors": dict(enumerate(tensors)), "step": steps.pop() if steps else None}


class Request:
    """What this layout's optimizer asks a checkpoint for, and how the answer goes back in."""

    def __init__(self, optimizer, model_state: dict):
        self.optimizer = optimizer
        self.native = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=METADATA)
        self.paths = [path for path, value in _leaves(self.native) if _is_sharded(value)]
        for path, value in list(_leaves(self.native)):
            if isinstance(value, LocalNonpersistentObject):  # what dist_checkpointing.load would do
                _set(self.native, path, value.unwrap())

    def entry(self, saved: Callable[[str], bool]) -> dict:
        """The checkpoint entry to load. A main-parameter copy the checkpoint lacks (it was saved
        by the other kind of optimizer) is read under the other kind's name if it has that,
        else not at all: see `load_into`."""
        tensors, self.missing = {}, []
        for index, path in enumerate(self.paths):
            value = _get(self.native, path)
            if not saved(value.key) and value.key.startswith(MAIN_PARAM_PREFIXES):
                name = value.key.split(".", 3)[3]  # optimizer.state.<param|fp32_param>.<name>
                other = next((prefix + name for prefix in MAIN_PARAM_PREFIXES if saved(prefix + name)), None)
                if other is None:
                    self.missing.append(index)
                    continue
                value = dataclasses.replace(value, key=other)
            tensors[index] = value
        return {"tensors": tensors}

    def load_into(self, loaded: dict, chunks) -> None:
        """Put the loaded tensors and step into this layout's state dict and load it. Main-
        parameter copies the checkpoint lacks are the model's (loaded) weights: the optimizer
        copies placeholders into its main parameters, which for fp32 weights under the
        distributed optimizer are views of the weights themselves, so the weights are kept
        aside (a copy of this rank's) and put back, and `reload_model_params` copies them into
        separate main parameters (bf16 weights)."""
        weights = [param for chunk in chunks for param in chunk.parameters()]
        kept = [param.detach().clone() for param in weights] if self.missing else []
        tensors = loaded["tensors"]
        for index, path in enumerate(self.paths):
            _set(self.native, path, tensors[index] if index in tensors else _get(self.native, path).data)
        # a checkpoint saved before "step" was: megatron-core's own dict, one optimizer's
        step = loaded["step"] if "step" in loaded else _step(loaded)
        if step is not None:
            for part in _parts(self.native):
                _set_step(part, step)
        self.optimizer.load_state_dict(self.native)
        if self.missing:
            with torch.no_grad():
                for param, copy in zip(weights, kept):
                    param.copy_(copy)
            self.optimizer.reload_model_params()
