"""Input-channel permutations for N:M masks (RIA's channel reallocation, Zhang et al., ICLR 2024, ``prune_ria``).

An N:M mask of ``scores[:, perm]`` keeps more score than one of ``scores`` when ``perm`` mixes strong and weak
columns in every group of ``m``. The heuristic (``--reallocation``, importance ``sum``) sorts columns by their
summed score and deals the ``m`` equal chunks of that order to the ``m`` positions of every group, every other
chunk reversed. The refinement (``--lsa``) then, for each position in the group, reassigns that position's
columns among the groups by a linear sum assignment that maximizes the kept score (scipy). A permutation only
helps if inference applies it: ``pruning.permutation`` folds it into the producer of the input where it can.
"""

from __future__ import annotations

import torch

LSA_STEP_ELEMENTS = 1 << 26  # the [O, rows, G, m] block of candidate groups scored at once (fp32: 256 MiB)


def reallocation_permutation(importance: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic: int64 [C], column ``perm[p]`` moves to position ``p``; ``importance`` [C], C % m == 0."""
    n_cols = importance.shape[0]
    if n_cols % m:
        raise ValueError(f"channel permutation needs in_features ({n_cols}) divisible by m ({m})")
    order = torch.sort(importance, stable=True)[1]
    chunks = order.reshape(m, n_cols // m).clone()
    chunks[1::2] = chunks[1::2].flip(1)  # the published loop's ii even: chunk ii-1 reversed
    return chunks.t().reshape(-1)  # position g * m + r holds chunk r's g-th column


def kept_score(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The score an N:M mask keeps: per group the ``m - n`` largest, summed (fp32 scalar)."""
    groups = scores.float().reshape(scores.shape[0], -1, m)
    return torch.sort(groups, dim=-1)[0][..., n:].sum()


def lsa_refine(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """RIA's ``--lsa`` (``blocks`` 1) on top of ``perm``: one assignment per position in the group."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("the linear-sum-assignment refinement (lsa) needs scipy: pip install scipy") from None
    perm = perm.clone()
    n_groups = scores.shape[1] // m
    group_ids = torch.arange(n_groups, device=scores.device)
    rows_per_step = max(1, LSA_STEP_ELEMENTS // (scores.shape[0] * n_groups * m))
    for column in range(m):
        permuted = scores[:, perm].float()
        others = [c for c in range(m) if c != column]
        moving = permuted[:, group_ids * m + column]  # [O, G]: the column at this position in each group
        value = torch.empty(n_groups, n_groups, dtype=torch.float32, device=scores.device)
        for start in range(0, n_groups, rows_per_step):  # value[g, h]: group g's others with group h's column
            g = group_ids[start : start + rows_per_step]
            rest = permuted[:, (g[:, None] * m + torch.tensor(others, device=scores.device)).reshape(-1)]
            rest = rest.reshape(-1, len(g), 1, m - 1).expand(-1, -1, n_groups, -1)
            strip = torch.cat([moving[:, None, :, None].expand(-1, len(g), -1, -1), rest], dim=-1)
            value[start : start + len(g)] = torch.sort(strip, dim=-1)[0][..., n:].sum(dim=(0, 3))
        chosen = torch.as_tensor(linear_sum_assignment(value.cpu().numpy(), maximize=True)[1], device=perm.device)
        positions = group_ids.to(perm.device) * m + column
        perm[positions] = perm[chosen * m + column]
    return perm


def head_permutation(importance: torch.Tensor, head_dim: int, kv_heads: int, m: int) -> torch.Tensor:
    """A permutation of an attention output's columns [query heads * head_dim] that only reorders dims inside
    each head, the same order for all query heads that share a value head (so it folds into the value rows).
    Each value head's order is :func:`reallocation_permutation` of its dims' importance summed over those heads."""
    n_cols = importance.shape[0]
    q_heads = n_cols // head_dim
    per_dim = importance.float().reshape(kv_heads, q_heads // kv_heads, head_dim).sum(dim=1)
    inner = torch.stack([reallocation_permutation(per_dim[h], m) for h in range(kv_heads)])  # [kv, head_dim]
    inner = inner.repeat_interleave(q_heads // kv_heads, dim=0)  # [q_heads, head_dim]
    offsets = torch.arange(q_heads, device=importance.device)[:, None] * head_dim
    return (inner + offsets).reshape(-1)
