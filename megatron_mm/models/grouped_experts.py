"""Routed experts as one grouped GEMM per projection, on any device (`model.moe_grouped_gemm`).

Hand-written: megatron-core's grouped expert modules need Transformer Engine (`TEGroupedMLP`)
or the `grouped_gemm` package (`GroupedMLP`). This one is megatron-core's `SequentialMLP`
with another forward: the same per-expert `MLP`s hold the parameters, built and initialised
in the same order, so the weights, the state dict, the dist-checkpoint keys (`SequentialMLP.
sharded_state_dict`, which `TEGroupedMLP`'s equal) and the optimizer state are SequentialMLP's,
and a checkpoint moves between the two (and TEGroupedMLP under TE) as it is. The forward runs
fc1 (gate+up) of all local experts as one GEMM over the dispatcher's expert-sorted tokens, the
gated activation scaled by the routing probabilities, then fc2 (down) as one GEMM
(`grouped_gemm.grouped_linear`: `torch._grouped_mm`, or a per-expert loop where it cannot run).

Expert linears here have no bias and no FP8 (our models: `add_bias_linear=False`; FP8 takes the
TE backend); anything else falls back to SequentialMLP's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_mm.models.grouped_gemm import grouped_linear


class GroupedMLP(SequentialMLP):
    """SequentialMLP's parameters and checkpoint; forward as two grouped GEMMs."""

    def _grouped(self) -> bool:
        c = self.config
        fused_other = c.bias_activation_fusion and not (c.gated_linear_unit and c.activation_func == F.silu)
        return not (c.add_bias_linear or c.fp8 or c.fp4 or c.moe_apply_probs_on_input
                    or c.use_te_activation_func or fused_other)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        if not self._grouped():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        experts = self.local_experts
        fc1 = grouped_linear(permuted_local_hidden_states, [e.linear_fc1.weight for e in experts],
                             tokens_per_expert)
        scaled = self._activation(fc1, permuted_probs.unsqueeze(-1))
        out = grouped_linear(scaled, [e.linear_fc2.weight for e in experts], tokens_per_expert)
        return out, None

    def _activation(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron-core's `MLP.forward` activation with `per_token_scale` (no bias), unchanged."""
        c = self.config
        if c.bias_activation_fusion and c.gated_linear_unit and c.activation_func == F.silu:
            return weighted_bias_swiglu_impl(x, None, probs, c.activation_func_fp8_input_store)
        if c.gated_linear_unit:
            x_glu, x_linear = torch.chunk(x, 2, dim=-1)
            if (val := c.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            x = c.activation_func(x_glu) * (x_linear + c.glu_linear_offset)
        else:
            x = c.activation_func(x)
        return (x * probs).to(x.dtype)
