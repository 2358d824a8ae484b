"""Jiajun-Ji/wanda ("Wanda Hybrid Pruning") lib/prune.py tile functions, verbatim (commit 5f8707a), and
luuyin/OWL lib/prune_all.py's layer allocation: the published semantics that tests/test_tiers.py and
tests/test_owl.py compare ``pruning`` with. Changed only where marked: a print became ``warnings.warn``.
Keep them as published.
"""

# ruff: noqa
import warnings

import numpy as np
import torch


def compute_block_scores(W_metric, block_size=16):
    """
    Divide the weight score matrix into blocks and compute average score for each block.

    Vectorized implementation using unfold for 100-300x speedup.

    Args:
        W_metric: Weight score matrix [M, N]
        block_size: Block size, default 16

    Returns:
        block_scores: Block score matrix [num_blocks_row, num_blocks_col]
        num_blocks_row: Number of blocks in row dimension
        num_blocks_col: Number of blocks in column dimension
    """
    M, N = W_metric.shape
    num_blocks_row = (M + block_size - 1) // block_size
    num_blocks_col = (N + block_size - 1) // block_size

    # Pad to make dimensions divisible by block_size
    pad_M = num_blocks_row * block_size - M
    pad_N = num_blocks_col * block_size - N

    if pad_M > 0 or pad_N > 0:
        # Pad with zeros (won't affect mean calculation significantly for large blocks)
        W_metric_padded = torch.nn.functional.pad(
            W_metric, (0, pad_N, 0, pad_M), mode='constant', value=0
        )
    else:
        W_metric_padded = W_metric

    # Unfold: Extract all blocks at once using sliding window
    # Step 1: Unfold along columns (dimension 1)
    # Input: [M_padded, N_padded]
    # Output: [M_padded, num_blocks_col, block_size]
    unfolded = W_metric_padded.unfold(1, block_size, block_size)

    # Step 2: Unfold along rows (dimension 0)
    # Input: [M_padded, num_blocks_col, block_size]
    # Output: [num_blocks_row, num_blocks_col, block_size, block_size]
    unfolded = unfolded.unfold(0, block_size, block_size)

    # Compute mean for each block (average over last two dimensions)
    # Input: [num_blocks_row, num_blocks_col, block_size, block_size]
    # Output: [num_blocks_row, num_blocks_col]
    block_scores = unfolded.mean(dim=(-2, -1))

    return block_scores, num_blocks_row, num_blocks_col


def apply_2_4_sparsity_to_block(block):
    """
    Apply 2:4 structured sparsity to a block.
    For every 4 consecutive elements, keep the top-2 with largest absolute values.

    Vectorized implementation for 50-100x speedup.

    Args:
        block: 2D tensor (block of weights)

    Returns:
        mask: Boolean mask (True = prune, False = keep)
        actual_kept: Number of weights kept
    """
    block_flat = block.flatten()
    n = block_flat.numel()

    # Truncate to multiple of 4
    num_groups = n // 4
    n_truncated = num_groups * 4

    if num_groups > 0:
        # Reshape to [num_groups, 4] for vectorized processing
        groups = block_flat[:n_truncated].reshape(num_groups, 4)

        # Get absolute values
        abs_groups = torch.abs(groups)

        # Find top-2 indices for each group (vectorized!)
        # topk returns [num_groups, 2]
        _, top2_indices = torch.topk(abs_groups, 2, dim=1, largest=True)

        # Create mask for all groups at once
        # mask: [num_groups, 4], all True initially (prune all)
        mask_groups = torch.ones(num_groups, 4, dtype=torch.bool, device=block.device)

        # Set top-2 to False (keep them) using advanced indexing
        # row_indices: [num_groups, 1] - which group
        # top2_indices: [num_groups, 2] - which elements in each group
        row_indices = torch.arange(num_groups, device=block.device).unsqueeze(1)
        mask_groups[row_indices, top2_indices] = False

        # Flatten back to 1D
        mask_flat = mask_groups.flatten()
    else:
        mask_flat = torch.ones(0, dtype=torch.bool, device=block.device)

    # Handle remainder (if n is not divisible by 4)
    remainder = n % 4
    if remainder > 0:
        remainder_group = block_flat[n_truncated:]
        abs_remainder = torch.abs(remainder_group)
        k = min(2, remainder)
        _, top_indices = torch.topk(abs_remainder, k, largest=True)

        remainder_mask = torch.ones(remainder, dtype=torch.bool, device=block.device)
        remainder_mask[top_indices] = False

        # Concatenate
        mask_flat = torch.cat([mask_flat, remainder_mask])

    # Reshape to block shape
    mask = mask_flat.reshape(block.shape)
    actual_kept = (~mask).sum().item()

    return mask, actual_kept


def apply_hybrid_block_pruning_with_2_4(
    W, W_metric, sparsity_ratio, block_size=16,
    topk_per_block=10, top_blocks_ratio=0.6, score_threshold=0.8
):
    """
    Apply hybrid block pruning with three types of blocks:
    1. Fully dense blocks (most important)
    2. 2:4 sparse blocks (moderately important, hardware-friendly)
    3. Top-k sparse blocks (least important, scattered values)

    Strategy:
    - Select top `top_blocks_ratio` (e.g., 60%) blocks by score
    - For each selected block:
      - Try applying 2:4 sparsity
      - If score_2:4 >= score_threshold * score_original, use 2:4
      - Otherwise, keep fully dense
    - Remaining blocks: apply top-k sparsity

    Args:
        W: Weight matrix
        W_metric: Metric matrix (importance scores)
        sparsity_ratio: Target overall sparsity (not used directly, for reference)
        block_size: Size of blocks (default 16x16)
        topk_per_block: Number of weights to keep in top-k blocks
        top_blocks_ratio: Ratio of top blocks to consider (default 0.6)
        score_threshold: Threshold for accepting 2:4 sparsity (default 0.8)

    Returns:
        W_mask: Boolean mask (True = prune)
        stats: Dictionary with statistics
    """
    M, N = W.shape

    # Compute block scores
    block_scores, num_blocks_row, num_blocks_col = compute_block_scores(W_metric, block_size)

    total_blocks = num_blocks_row * num_blocks_col
    num_top_blocks = int(total_blocks * top_blocks_ratio)

    # Find top blocks
    flat_scores = block_scores.flatten()
    if num_top_blocks > 0 and num_top_blocks < total_blocks:
        threshold = torch.topk(flat_scores, num_top_blocks, largest=True)[0][-1]
    else:
        threshold = float('-inf')

    # Initialize mask and statistics
    W_mask = torch.zeros_like(W, dtype=torch.bool)

    stats = {
        'fully_dense_blocks': 0,
        'sparse_2_4_blocks': 0,
        'topk_blocks': 0,
        'total_pruned': 0,
        'total_elements': W.numel()
    }

    # Pad W and W_metric to make dimensions divisible by block_size
    pad_M = num_blocks_row * block_size - M
    pad_N = num_blocks_col * block_size - N

    if pad_M > 0 or pad_N > 0:
        W_padded = torch.nn.functional.pad(W, (0, pad_N, 0, pad_M), mode='constant', value=0)
        W_metric_padded = torch.nn.functional.pad(W_metric, (0, pad_N, 0, pad_M), mode='constant', value=0)
    else:
        W_padded = W
        W_metric_padded = W_metric

    # Unfold to get all blocks at once
    # Shape: [num_blocks_row, num_blocks_col, block_size, block_size]
    W_blocks = W_padded.unfold(0, block_size, block_size).unfold(1, block_size, block_size)
    W_metric_blocks = W_metric_padded.unfold(0, block_size, block_size).unfold(1, block_size, block_size)

    # Create top blocks mask
    top_blocks_mask = block_scores >= threshold  # [num_blocks_row, num_blocks_col]

    # Process top blocks (try 2:4 or keep dense)
    num_top = top_blocks_mask.sum().item()
    if num_top > 0:
        # Extract top blocks
        top_W_blocks = W_blocks[top_blocks_mask]  # [num_top, block_size, block_size]
        top_metric_blocks = W_metric_blocks[top_blocks_mask]  # [num_top, block_size, block_size]

        # Compute original scores for all top blocks
        original_scores = top_metric_blocks.sum(dim=(-2, -1))  # [num_top]

        # Apply 2:4 sparsity to all top blocks
        top_masks_2_4 = []
        for idx in range(num_top):
            mask_2_4, _ = apply_2_4_sparsity_to_block(top_W_blocks[idx])
            top_masks_2_4.append(mask_2_4)
        top_masks_2_4 = torch.stack(top_masks_2_4)  # [num_top, block_size, block_size]

        # Compute scores after 2:4 for all blocks
        scores_2_4 = (top_metric_blocks * (~top_masks_2_4)).sum(dim=(-2, -1))  # [num_top]

        # Decide which blocks accept 2:4
        accept_2_4 = scores_2_4 >= score_threshold * original_scores  # [num_top]

        # Count statistics
        stats['sparse_2_4_blocks'] = accept_2_4.sum().item()
        stats['fully_dense_blocks'] = num_top - stats['sparse_2_4_blocks']

    # Process low-score blocks (apply top-k)
    low_blocks_mask = ~top_blocks_mask
    num_low = low_blocks_mask.sum().item()
    stats['topk_blocks'] = num_low

    # Now fill in the W_mask
    # Process each block (still need loop for assignment, but computation is batched)
    top_idx = 0
    for i in range(num_blocks_row):
        for j in range(num_blocks_col):
            row_start = i * block_size
            row_end = min((i + 1) * block_size, M)
            col_start = j * block_size
            col_end = min((j + 1) * block_size, N)

            if top_blocks_mask[i, j]:
                # Top block
                if accept_2_4[top_idx]:
                    # Use 2:4 sparsity
                    mask_2_4 = top_masks_2_4[top_idx]
                    # Handle padding: only copy the valid part
                    valid_mask = mask_2_4[:row_end-row_start, :col_end-col_start]
                    W_mask[row_start:row_end, col_start:col_end] = valid_mask
                    stats['total_pruned'] += valid_mask.sum().item()
                # else: keep dense (W_mask already initialized to False)
                top_idx += 1
            else:
                # Low-score block - apply top-k
                block = W[row_start:row_end, col_start:col_end]
                block_flat = block.flatten()
                block_size_actual = block_flat.numel()

                if block_size_actual > topk_per_block:
                    block_abs = torch.abs(block_flat)
                    _, topk_indices = torch.topk(block_abs, min(topk_per_block, block_size_actual), largest=True)

                    block_mask = torch.ones(block_size_actual, dtype=torch.bool, device=W.device)
                    block_mask[topk_indices] = False

                    block_mask_2d = block_mask.reshape(block.shape)
                    W_mask[row_start:row_end, col_start:col_end] = block_mask_2d

                    stats['total_pruned'] += block_mask.sum().item()

    actual_sparsity = stats['total_pruned'] / stats['total_elements']
    stats['actual_sparsity'] = actual_sparsity

    return W_mask, stats


def apply_three_tier_block_pruning(
    W, W_metric,
    block_size=16,
    top_dense_ratio=0.4,
    mid_2_4_ratio=0.4,
    bottom_topk_ratio=0.2,
    topk_per_block=10
):
    """
    Apply three-tier fixed ratio block pruning strategy.

    Three tiers with fixed ratios:
    1. Top X% blocks: Fully dense (0% sparsity)
    2. Middle Y% blocks: 2:4 structured sparsity (50% sparsity)
    3. Bottom Z% blocks: Top-K sparsity (~96% sparsity)

    Strategy:
    - Compute block scores based on importance metrics
    - Sort all blocks by score (descending)
    - Assign top X% to tier 1 (fully dense)
    - Assign next Y% to tier 2 (2:4 sparse)
    - Assign remaining Z% to tier 3 (top-k sparse)

    Args:
        W: Weight matrix [M, N]
        W_metric: Importance metric matrix [M, N]
        block_size: Block size (default 16)
        top_dense_ratio: Ratio of top blocks to keep fully dense (default 0.4)
        mid_2_4_ratio: Ratio of middle blocks to apply 2:4 sparsity (default 0.4)
        bottom_topk_ratio: Ratio of bottom blocks to apply top-k (default 0.2)
        topk_per_block: Number of weights to keep in bottom blocks (default 10)

    Returns:
        W_mask: Boolean mask (True = prune, False = keep)
        stats: Dictionary with statistics
    """
    M, N = W.shape

    # Validate ratios
    total_ratio = top_dense_ratio + mid_2_4_ratio + bottom_topk_ratio
    if abs(total_ratio - 1.0) > 1e-6:
        warnings.warn(f"Ratios sum to {total_ratio:.4f}, not 1.0. Normalizing...")
        top_dense_ratio /= total_ratio
        mid_2_4_ratio /= total_ratio
        bottom_topk_ratio /= total_ratio

    # Compute block scores
    block_scores, num_blocks_row, num_blocks_col = compute_block_scores(W_metric, block_size)
    total_blocks = num_blocks_row * num_blocks_col

    # Calculate number of blocks in each tier
    num_top_dense = int(total_blocks * top_dense_ratio)
    num_mid_2_4 = int(total_blocks * mid_2_4_ratio)
    num_bottom_topk = total_blocks - num_top_dense - num_mid_2_4

    # Sort blocks by score (descending)
    flat_scores = block_scores.flatten()
    sorted_indices = torch.argsort(flat_scores, descending=True)

    # Divide into three tiers
    top_dense_indices = set(sorted_indices[:num_top_dense].tolist())
    mid_2_4_indices = set(sorted_indices[num_top_dense:num_top_dense+num_mid_2_4].tolist())
    bottom_topk_indices = set(sorted_indices[num_top_dense+num_mid_2_4:].tolist())

    # Initialize mask and statistics
    W_mask = torch.zeros_like(W, dtype=torch.bool)

    stats = {
        'fully_dense_blocks': 0,
        'sparse_2_4_blocks': 0,
        'topk_blocks': 0,
        'total_blocks': total_blocks,
        'total_elements': W.numel(),
        'total_pruned': 0,
        'dense_weights_kept': 0,
        'sparse_2_4_weights_kept': 0,
        'topk_weights_kept': 0
    }

    # Process each block
    for block_idx in range(total_blocks):
        block_i = block_idx // num_blocks_col
        block_j = block_idx % num_blocks_col

        row_start = block_i * block_size
        row_end = min(row_start + block_size, M)
        col_start = block_j * block_size
        col_end = min(col_start + block_size, N)

        block = W[row_start:row_end, col_start:col_end]
        block_elements = block.numel()

        if block_idx in top_dense_indices:
            # Tier 1: Fully dense - keep all weights
            # mask remains False (no pruning)
            stats['fully_dense_blocks'] += 1
            stats['dense_weights_kept'] += block_elements

        elif block_idx in mid_2_4_indices:
            # Tier 2: Apply 2:4 structured sparsity
            block_mask, kept = apply_2_4_sparsity_to_block(block)
            W_mask[row_start:row_end, col_start:col_end] = block_mask
            stats['sparse_2_4_blocks'] += 1
            stats['sparse_2_4_weights_kept'] += kept
            stats['total_pruned'] += block_mask.sum().item()

        else:  # block_idx in bottom_topk_indices
            # Tier 3: Apply top-k sparsity
            block_flat = block.flatten()
            if block_flat.numel() > topk_per_block:
                # Keep top-k weights by absolute value
                threshold = torch.topk(torch.abs(block_flat), topk_per_block, largest=True)[0][-1]
                block_mask = torch.abs(block) < threshold
                W_mask[row_start:row_end, col_start:col_end] = block_mask
                stats['topk_blocks'] += 1
                stats['topk_weights_kept'] += topk_per_block
                stats['total_pruned'] += block_mask.sum().item()
            else:
                # Block smaller than topk, keep all
                stats['topk_blocks'] += 1
                stats['topk_weights_kept'] += block_flat.numel()

    # Calculate actual sparsity
    actual_sparsity = stats['total_pruned'] / stats['total_elements']
    stats['actual_sparsity'] = actual_sparsity

    return W_mask, stats


# --- luuyin/OWL lib/prune_all.py (prune_wanda_outlier): the outlier ratio and the layer allocation -------------


def check_outlier_mean(mask, threshold):
    W = mask
    count = 0
    total_params = 0
    max_shred = torch.mean(W) * threshold
    count += (W > max_shred).sum().item()
    total_params += W.numel()
    outlier_ratio = float(count) / total_params * 100
    return outlier_ratio


def owl_layer_sparsities(layer_wmetrics, sparsity_ratio, Hyper_m=5, Lamda=0.08):
    """prune_wanda_outlier's first pass, from each layer's list of W_metric matrices: the layer sparsities."""
    all_layer_ratio = []
    for layer_wmetric in layer_wmetrics:
        layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
        for out_ratio in [Hyper_m]:
            out_ratio_layer = check_outlier_mean(layer_wmetric, out_ratio)
        all_layer_ratio.append(out_ratio_layer)
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min()) * (1/(all_layer_ratio.max() - all_layer_ratio.min()) * Lamda*2))
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    return [1 - r for r in all_layer_ratio]

