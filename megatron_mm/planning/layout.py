"""Rank layout: which node, TP/PP/DP and EP/ETP/expert-DP coordinates every rank gets.

The coordinates come from megatron-core's own `RankGenerator` (pure Python, no process
group), built exactly as `parallel_state.initialize_model_parallel` builds its two
generators (decoder: tp, dp, pp; experts: etp, ep, expert dp, pp) with our rank order
`ORDER`, so the map is what the ranks of a real run report (`rank_map.json` in the run
directory; compared in tests/test_slurm.py). Ranks fill nodes in order: srun's block
distribution gives node i the ranks [i*g, (i+1)*g) for g GPUs a node.

With ORDER = tp-cp-ep-dp-pp, tensor parallelism varies fastest (a TP group is `tp`
consecutive ranks, inside one node when tp divides the node), then expert parallelism
(an EP group is `ep*etp` consecutive ranks within a stage), then data parallelism, and the
pipeline stage slowest: stage s is the contiguous block of ranks [s*W/pp, (s+1)*W/pp), so
stage 0 (embedding and encoders) sits on the first nodes and the last stage (head, MTP) on
the last nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ORDER = "tp-cp-ep-dp-pp"  # megatron-core's default; runtime.distributed passes it explicitly


@dataclass(frozen=True)
class RankCoords:
    rank: int
    node: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int  # expert data-parallel rank

    def as_dict(self) -> dict:
        return asdict(self)


def parallel_layout(cfg, world_size: int) -> dict:
    """How `cfg` splits over `world_size` ranks (a benchmark report's `layout`)."""
    p, t = cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp)
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep, "etp": p.etp, "dp": dp,
            "sequence_parallel": p.sequence_parallel, "micro_batch_size": t.micro_batch_size,
            "global_batch_size": t.global_batch_size,
            "num_microbatches": t.global_batch_size // (t.micro_batch_size * dp), "recompute": p.recompute}


def _position(groups: list[list[int]], world: int) -> list[int]:
    pos = [0] * world
    for group in groups:
        for i, r in enumerate(group):
            pos[r] = i
    return pos


def rank_map(tp: int, pp: int, ep: int, etp: int, world_size: int, gpus_per_node: int) -> list[RankCoords]:
    """Coordinates of every rank, from megatron-core's RankGenerator."""
    from megatron.core.parallel_state import RankGenerator

    dp = world_size // (tp * pp)
    edp = world_size // (etp * ep * pp)
    decoder = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=ORDER)
    experts = RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=ORDER)
    tp_pos = _position(decoder.get_ranks("tp"), world_size)
    pp_pos = _position(decoder.get_ranks("pp"), world_size)
    dp_pos = _position(decoder.get_ranks("dp"), world_size)
    ep_pos = _position(experts.get_ranks("ep"), world_size)
    etp_pos = _position(experts.get_ranks("tp"), world_size)
    edp_pos = _position(experts.get_ranks("dp"), world_size)
    return [
        RankCoords(r, r // gpus_per_node, r % gpus_per_node, tp_pos[r], pp_pos[r], dp_pos[r],
                   ep_pos[r], etp_pos[r], edp_pos[r])
        for r in range(world_size)
    ]


def describe_groups(coords: list[RankCoords], tp: int, pp: int, ep: int, etp: int, gpus_per_node: int) -> list[str]:
    """One line each on where the TP, EP and pipeline groups fall across nodes."""
    world = len(coords)
    nodes = world // gpus_per_node
    per_stage = world // pp
    lines = []
    tp_nodes = {tuple(sorted({c.node for c in coords if (c.pp, c.dp) == key}))
                for key in {(c.pp, c.dp) for c in coords}}
    span = max(len(n) for n in tp_nodes)
    lines.append(f"tensor parallel: {world // tp} group(s) of {tp} consecutive rank(s), "
                 + ("each inside one node" if span == 1 else f"spanning up to {span} nodes"))
    ep_size = ep * etp
    ep_span = -(-ep_size // gpus_per_node) if ep_size > gpus_per_node else 1
    lines.append(
        f"expert parallel: {world // ep_size} group(s) of {ep} x etp {etp} consecutive ranks"
        + (", each inside one node (all-to-all inside the node)" if ep_span == 1
           else f", each across {ep_span} nodes (all-to-all between nodes)")
    )
    stage_nodes = []
    for s in range(pp):
        ns = sorted({c.node for c in coords if c.pp == s})
        stage_nodes.append(f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}")
    if per_stage % gpus_per_node == 0:
        shape = f"each stage on {per_stage // gpus_per_node} whole node(s)"
    elif gpus_per_node % per_stage == 0:
        shape = f"{gpus_per_node // per_stage} stages share each node"
    else:
        shape = "stages straddle node boundaries"
    shown = stage_nodes if pp <= 8 else stage_nodes[:3] + ["..."] + stage_nodes[-2:]
    lines.append(f"pipeline: stage s = ranks [{per_stage}s, {per_stage}(s+1)), {shape}; "
                 f"nodes by stage: {', '.join(shown)} ({nodes} nodes)")
    return lines


def format_node(coords: list[RankCoords], node: int, gpus_per_node: int) -> list[str]:
    ranks = coords[node * gpus_per_node:(node + 1) * gpus_per_node]
    stages = sorted({c.pp for c in ranks})
    head = (f"node {node} (ranks {ranks[0].rank}-{ranks[-1].rank}): pipeline stage "
            f"{', '.join(map(str, stages))}")
    rows = [f"  rank {c.rank:>5} gpu {c.local_rank}: tp {c.tp} pp {c.pp:>2} dp {c.dp:>3} | "
            f"ep {c.ep:>2} etp {c.etp} edp {c.edp:>3}" for c in ranks]
    return [head, *rows]
