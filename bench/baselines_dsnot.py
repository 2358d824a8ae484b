"""Published code paths of RIA and DSnoT, per weight matrix, kept as published: what ours is compared with.

* RIA, biomedical-cybernetics/Relative-importance-and-activation-pruning @ 7bc55b0, lib/prune.py ``prune_ria``:
  the score, the per-matrix unstructured threshold, direct N:M, the heuristic channel reallocation (importance
  ``sum``) and its linear-sum-assignment refinement (``--lsa``, ``blocks = 1``; scipy). Their ``W.shape`` and
  ``.cuda()`` calls became the tensor's own device; prints were dropped.
* DSnoT, zyxxmu/DSnoT @ 4c029df, lib/prune.py ``prune_DSnoT`` for one Linear, and lib/layerwrapper.py
  ``WrappedGPT.add_batch`` (the statistics). ``args`` became keyword arguments with the published defaults.
"""

from __future__ import annotations

import torch


# --- RIA ---------------------------------------------------------------------------------------------------
def ria_metric(weight: torch.Tensor, scaler_row: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    W = weight
    return (
        torch.abs(W) / torch.sum(torch.abs(W), dim=0) + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)
    ) * (torch.sqrt(scaler_row.reshape((1, -1)))) ** a


def ria_unstructured_mask(W_metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    thresh = torch.sort(W_metric.flatten())[0][int(W_metric.shape[0] * W_metric.shape[1] * sparsity_ratio)]
    return W_metric <= thresh


def ria_nm_mask(W_metric: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    W_mask = torch.zeros_like(W_metric) == 1
    for ii in range(W_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = W_metric[:, ii : (ii + prune_m)].float()
            W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    return W_mask


def ria_reallocation_index(W_metric: torch.Tensor, prune_m: int) -> torch.Tensor:
    """Heuristic channel reallocation, importance_score "sum": the permutation ``index`` (W_metric[:, index])."""
    sorted_idx = torch.sort(torch.sum(W_metric, dim=0))[1]
    index = torch.zeros_like(sorted_idx)
    for ii in range(1, prune_m + 1):
        if ii % 2 == 1:
            index[ii - 1 :: prune_m] = sorted_idx[
                int(W_metric.shape[1] * (ii - 1) / prune_m) : int(W_metric.shape[1] * ii / prune_m)
            ]
        else:
            index[ii - 1 :: prune_m] = sorted_idx[
                int(W_metric.shape[1] * (ii - 1) / prune_m) : int(W_metric.shape[1] * ii / prune_m)
            ].flip(0)
    return index


def ria_lsa_refine(W_metric: torch.Tensor, index: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """``--lsa`` (blocks = 1): one linear sum assignment per position in the group, refining ``index``."""
    from scipy.optimize import linear_sum_assignment

    device = W_metric.device
    index = index.clone()
    blocks = 1
    shape = W_metric.shape[1] // prune_m // blocks
    rows = torch.arange(shape).to(device)
    lsa_columns = torch.arange(prune_m).to(device)

    def lsa(W_metric, lsa_column, shape, rows, prune_n, prune_m, device):
        W_metric = W_metric.to(device)
        score_matrix = torch.zeros(shape, shape).to(device)
        num_parallel = 1
        for row in range(shape // num_parallel):
            strip_idx = torch.zeros(num_parallel, shape, prune_m).long().to(device)
            block_columns = torch.arange(prune_m).to(device)
            columns_mask = block_columns != lsa_column
            block_columns = block_columns[columns_mask]
            strip_idx[:, :, 0] = (rows * prune_m).reshape(1, -1) + lsa_column
            strip_idx[:, :, 1:] = (
                block_columns.reshape(1, 1, -1)
                + torch.arange(row * num_parallel, (row + 1) * num_parallel).reshape(-1, 1, 1).to(device) * prune_m
            )
            tmp = W_metric[:, strip_idx].transpose(1, 0).transpose(2, 1)
            W_mask = torch.zeros_like(tmp).to(device)
            tmp_index = torch.sort(tmp, dim=-1)[1]
            W_mask.scatter_(dim=-1, index=tmp_index[:, :, :, :prune_n], value=1)
            score_matrix[:, row * num_parallel : (row + 1) * num_parallel] = torch.sum(
                torch.sum((tmp * (W_mask == 0)), dim=-1), dim=-1
            ).transpose(1, 0)
        score_matrix = score_matrix.transpose(1, 0)
        col_indices = torch.LongTensor(linear_sum_assignment(score_matrix.cpu(), maximize=True)[1]).to(device)
        idx = torch.arange(W_metric.shape[1]).long().to(device)
        idx[rows * prune_m + lsa_column] = col_indices * prune_m + lsa_column
        return idx

    for lsa_column in lsa_columns:
        for ii in range(blocks):
            index_tmp = index[ii * len(index) // blocks : (ii + 1) * len(index) // blocks]
            permute_idx = lsa(W_metric[:, index_tmp], lsa_column, shape, rows, prune_n, prune_m, device)
            index[ii * len(index) // blocks : (ii + 1) * len(index) // blocks] = index_tmp[permute_idx]
    return index


def ria_reallocated_mask(W_metric: torch.Tensor, prune_n: int, prune_m: int, lsa: bool = False) -> torch.Tensor:
    """The mask of ``--reallocation`` (and ``--lsa``), in the original column order."""
    index = ria_reallocation_index(W_metric, prune_m)
    if lsa:
        index = ria_lsa_refine(W_metric, index, prune_n, prune_m)
    W_mask_permute = ria_nm_mask(W_metric[:, index], prune_n, prune_m)
    W_mask = torch.zeros_like(W_metric) == 1
    W_mask[:, index] = W_mask_permute
    return W_mask


# --- DSnoT -------------------------------------------------------------------------------------------------
class DSnoTStatistics:
    """lib/layerwrapper.py WrappedGPT: scaler_row, sum_metric_row, mean and var, one add_batch per sample."""

    def __init__(self, columns: int, device=None):
        self.nsamples = 0
        self.scaler_row = torch.zeros((columns), device=device)
        self.sum_metric_row = torch.zeros((columns), device=device)
        self.mean = torch.zeros((columns), device=device)
        self.var = torch.zeros((columns), device=device)
        self.ntokens = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        inp = inp.type(torch.float32)
        mean_inp = torch.mean(inp, dim=1, keepdim=True)
        var_inp = torch.var(inp, dim=1, unbiased=False, keepdim=True)
        num_inp = inp.shape[1]
        self.var = (
            var_inp if self.ntokens == 0 else (self.var * self.ntokens + var_inp * num_inp) / (self.ntokens + num_inp)
        )
        self.mean = (
            mean_inp
            if self.ntokens == 0
            else (self.mean * self.ntokens + mean_inp * num_inp) / (self.ntokens + num_inp)
        )
        self.ntokens += num_inp
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.sum_metric_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples
        self.sum_metric_row += torch.sum(inp, dim=1) / self.nsamples


def return_reorder_indice(input_tensor):
    positive_tensor = input_tensor.clone()
    negative_tensor = input_tensor.clone()
    positive_mask = positive_tensor > 0
    negative_mask = negative_tensor < 0
    positive_indices = (
        torch.arange(0, input_tensor.shape[1], device=input_tensor.device)
        .to(torch.float64)
        .repeat(input_tensor.shape[0], 1)
    )
    negative_indices = (
        torch.arange(0, input_tensor.shape[1], device=input_tensor.device)
        .to(torch.float64)
        .repeat(input_tensor.shape[0], 1)
    )
    positive_indices[~positive_mask] = float("inf")
    negative_indices[~negative_mask] = float("inf")
    positive_value, _ = torch.sort(positive_indices, dim=1)
    negative_value, _ = torch.sort(negative_indices, dim=1)
    positive_value = torch.flip(positive_value, dims=[1])
    negative_value[negative_value == float("inf")] = 0
    positive_value[positive_value == float("inf")] = 0
    reorder_indice = (positive_value + negative_value).to(torch.int64)
    return reorder_indice


@torch.no_grad()
def dsnot_prune_mask(
    weight: torch.Tensor,
    stats: DSnoTStatistics,
    initial_metric: torch.Tensor,
    sparsity_ratio: float,
    prune_n: int = 0,
    prune_m: int = 0,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1,
    without_same_sign: bool = True,
) -> torch.Tensor:
    """lib/prune.py prune_DSnoT's body for one Linear that is not skipped; returns ``weight_mask`` (True = pruned).
    ``initial_metric``: the initial method's score (wanda: |W| * sqrt(scaler_row))."""
    initial_metric = initial_metric.clone()
    DSnoT_metric = weight * stats.sum_metric_row.reshape((1, -1))
    weight_mask = torch.zeros_like(initial_metric) == 1
    if prune_n != 0:
        initial_prune_indices = torch.zeros(
            (initial_metric.shape[0], 0), dtype=torch.int64, device=initial_metric.device
        )
        initial_res_indices = torch.zeros((initial_metric.shape[0], 0), dtype=torch.int64, device=initial_metric.device)
        for ii in range(initial_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = initial_metric[:, ii : (ii + prune_m)].float()
                _, tmp_all_indices = torch.sort(tmp, dim=1)
                tmp_all_indices += ii
                res_prune_n = prune_m - prune_n
                tmp_indices, tmp_res_indices = torch.split(
                    tmp_all_indices, split_size_or_sections=[prune_n, res_prune_n], dim=1
                )
                initial_prune_indices = torch.cat((initial_prune_indices, tmp_indices), dim=1)
                initial_res_indices = torch.cat((initial_res_indices, tmp_res_indices), dim=1)
                weight_mask.scatter_(1, tmp_indices, True)
        metric_for_regrowing = DSnoT_metric.clone()
        metric_for_regrowing.scatter_(1, initial_res_indices, 0)
        reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
        initialize_error_sign = torch.sign(reconstruction_error)
        if pow_of_var_regrowing:
            metric_for_regrowing /= torch.pow(stats.var.reshape((1, -1)), pow_of_var_regrowing)
        _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
        indice_indice_list_for_regrowing = torch.zeros(
            (reconstruction_error.shape[0], 2), device=reconstruction_error.device, dtype=torch.long
        )
        last_one = regrowing_indices_block.shape[-1] - 1
        indice_indice_list_for_regrowing[:, 1] = last_one
        update_num_for_regrowing = torch.ones(
            (reconstruction_error.shape[0], 2), device=reconstruction_error.device, dtype=torch.long
        )
        update_num_for_regrowing[:, 1] = -1
        initial_metric.scatter_(1, initial_prune_indices, float("inf"))
        W_metric_max_value = torch.max(initial_metric, dim=1, keepdim=True)[0] + 1
        cycle_time = 1
        update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
        while not (torch.all(update_mask == False) or cycle_time > max_cycle_time):  # noqa: E712
            cycle_time += 1
            indice_of_indice_indice_list_for_regrowing = (reconstruction_error > 0).int().to(torch.int64)
            indice_indice_for_regrowing = torch.gather(
                indice_indice_list_for_regrowing, 1, indice_of_indice_indice_list_for_regrowing
            )
            regrowing_indice = torch.gather(regrowing_indices_block, 1, indice_indice_for_regrowing.to(torch.int64))
            regrowing_metric = DSnoT_metric.gather(1, regrowing_indice.to(torch.int64))
            recover_block_start_indice = regrowing_indice - regrowing_indice % prune_m
            recover_block_indices = (
                torch.arange(0, prune_m, device=recover_block_start_indice.device).repeat(
                    recover_block_start_indice.shape[1], 1
                )
                + recover_block_start_indice
            )
            pruning_block = torch.gather(initial_metric, 1, recover_block_indices.to(torch.int64))
            pruning_wanda_metric, pruning_indice = torch.topk(pruning_block, 1, dim=1, largest=False)
            pruning_indice += recover_block_start_indice
            pruning_metric = DSnoT_metric.gather(1, pruning_indice.to(torch.int64))
            reconstruction_error_after = reconstruction_error + pruning_metric - regrowing_metric
            update_mask = (
                update_mask
                & (initialize_error_sign == torch.sign(reconstruction_error_after))
                & (abs(reconstruction_error) > update_threshold)
            )
            initial_metric.scatter_(1, pruning_indice, W_metric_max_value)
            weight_mask.scatter_(1, pruning_indice, update_mask)
            weight_mask.scatter_(1, regrowing_indice, ~update_mask)
            reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
            reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
            indice_indice_list_for_regrowing.scatter_(
                1,
                indice_of_indice_indice_list_for_regrowing,
                indice_indice_for_regrowing
                + update_num_for_regrowing.gather(1, indice_of_indice_indice_list_for_regrowing),
            )
        return weight_mask

    _, sorted_initial_indice = torch.sort(initial_metric, dim=-1, stable=True)
    sparsity_num = int(initial_metric.shape[1] * sparsity_ratio)
    res_sparsity_num = sorted_initial_indice.shape[1] - sparsity_num
    initial_prune_indices, initial_res_indices = torch.split(
        sorted_initial_indice, split_size_or_sections=[sparsity_num, res_sparsity_num], dim=1
    )
    weight_mask.scatter_(1, initial_prune_indices, True)
    metric_for_regrowing = DSnoT_metric.clone()
    wanda_metric = torch.abs(weight) * torch.sqrt(stats.scaler_row.reshape((1, -1)))
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    initialize_error_sign = torch.sign(reconstruction_error)
    if pow_of_var_regrowing:
        metric_for_regrowing /= torch.pow(stats.var.reshape((1, -1)), pow_of_var_regrowing)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    wanda_metric.scatter_(1, initial_prune_indices, float("inf"))
    wanda_res_indices, _ = torch.split(
        torch.sort(wanda_metric, dim=1, stable=True)[1], split_size_or_sections=[res_sparsity_num, sparsity_num], dim=1
    )
    reorder_indice_of_pruning_indice = return_reorder_indice(torch.gather(DSnoT_metric, 1, wanda_res_indices))
    pruning_indices_block = torch.gather(wanda_res_indices, 1, reorder_indice_of_pruning_indice)
    indice_indice_list_for_regrowing = torch.zeros(
        (reconstruction_error.shape[0], 2), device=reconstruction_error.device, dtype=torch.long
    )
    last_one = regrowing_indices_block.shape[-1] - 1
    indice_indice_list_for_regrowing[:, 1] = last_one
    update_num_for_regrowing = torch.ones(
        (reconstruction_error.shape[0], 2), device=reconstruction_error.device, dtype=torch.long
    )
    update_num_for_regrowing[:, 1] = -1
    indice_indice_list_for_pruning = torch.zeros(
        (reconstruction_error.shape[0], 2), device=reconstruction_error.device, dtype=torch.long
    )
    last_one = pruning_indices_block.shape[-1] - 1
    indice_indice_list_for_pruning[:, 1] = last_one
    update_num_for_pruning = torch.ones(
        (reconstruction_error.shape[0], 2), device=reconstruction_error.device, dtype=torch.long
    )
    update_num_for_pruning[:, 1] = -1
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    cycle_time = 0
    while not (torch.all(update_mask == False) or cycle_time >= max_cycle_time):  # noqa: E712
        cycle_time += 1
        indice_of_indice_indice_list_for_regrowing = (reconstruction_error > 0).int().to(torch.int64)
        indice_indice_for_regrowing = torch.gather(
            indice_indice_list_for_regrowing, 1, indice_of_indice_indice_list_for_regrowing
        )
        regrowing_indice = torch.gather(regrowing_indices_block, 1, indice_indice_for_regrowing.to(torch.int64))
        regrowing_metric = DSnoT_metric.gather(1, regrowing_indice.to(torch.int64))
        indice_indice_list_for_regrowing.scatter_(
            1,
            indice_of_indice_indice_list_for_regrowing,
            indice_indice_for_regrowing
            + update_num_for_regrowing.gather(1, indice_of_indice_indice_list_for_regrowing),
        )
        indice_of_indice_indice_list_for_pruning = (reconstruction_error < 0).int().to(torch.int64)
        indice_indice_for_pruning = torch.gather(
            indice_indice_list_for_pruning, 1, indice_of_indice_indice_list_for_pruning
        )
        pruning_indice = torch.gather(pruning_indices_block, 1, indice_indice_for_pruning.to(torch.int64))
        pruning_metric = DSnoT_metric.gather(1, pruning_indice.to(torch.int64))
        indice_indice_list_for_pruning.scatter_(
            1,
            indice_of_indice_indice_list_for_pruning,
            indice_indice_for_pruning + update_num_for_pruning.gather(1, indice_of_indice_indice_list_for_pruning),
        )
        reconstruction_error_after = reconstruction_error + pruning_metric - regrowing_metric
        if without_same_sign:
            update_mask = update_mask & (abs(reconstruction_error) > update_threshold)
        else:
            update_mask = (
                update_mask
                & (abs(reconstruction_error) > update_threshold)
                & (initialize_error_sign == torch.sign(reconstruction_error_after))
            )
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
    return weight_mask
