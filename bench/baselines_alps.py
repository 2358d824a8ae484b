"""Published code paths of ALPS and the ADMM weight update, per weight matrix, kept as published: what ours is
compared with.

* ALPS, mazumder-lab/ALPS @ 8af9e6b, alps.py ``ALPS_prune.ALPS_admm`` and ``cg_batch``: the ``[in, out]`` layout,
  every rule and constant as written. ``'cuda:0'`` / ``.cpu()`` became the tensor's own device, ``.float()`` the
  ``dtype`` argument (float64 to compare at rounding), the unused ``Btest`` / ``errorc`` diagnostics and prints were
  dropped; ``XtX`` is the accumulated ``X^T X`` (any positive scale).
* ADMM, fmfi-compbio/admm-pruning @ 8039208, lib/admm.py ``AdmmPruner.fasterprune`` with main.py's call
  (``percdamp=0.1``, defaults ``iterative_prune=15, iters=20, per_out=False``); its 2:4-only hard-coded 4 kept.
"""

from __future__ import annotations

import numpy as np
import torch


# --- ALPS --------------------------------------------------------------------------------------------------
def alps_admm(weight, XtX, sp, nm_n=0, nm_m=0, rho=0.1, max_iter=300, update_iter=3, switch_iter=30,
              dtype=torch.float32):  # fmt: skip
    """Returns (pruned weight [out, in] in ``dtype``, ALPS's relative error after the back-solve)."""
    dev = weight.device
    W = weight.clone().to(dtype)
    XtX = XtX.clone().to(dtype)
    damp1 = 0.01 * torch.mean(torch.diag(XtX)).item()
    diag = torch.arange(XtX.shape[0], device=XtX.device)
    XtX[diag, diag] += damp1
    X_norm = torch.diag(XtX).sqrt() + 1e-8
    XtX = XtX / X_norm
    XtX = (XtX.T / X_norm).T
    YtX = torch.matmul(W * X_norm, XtX)
    B = (W * X_norm).t().clone()
    B_orig = B.clone()
    V = torch.zeros_like(B)
    D_supp = torch.zeros_like(B)
    totp, num_cout = B.shape
    L, Q = torch.linalg.eigh(XtX.double())
    XTX_inv = (Q @ ((1 / (L + (rho))) * Q).T).to(dtype)
    init_rho = False
    Res0 = torch.sum(B_orig * YtX.T)
    params = B.shape[0] * B.shape[1]
    k_spar = int(np.round((1 - sp) * params))
    if nm_n == 0:
        D = B.clone().reshape(-1)
        _, loss_idx = torch.topk(-(D**2), totp * num_cout - k_spar)
        D[loss_idx] = 0
        D_suppp = (D == 0).to(dtype)
        D = D.reshape(totp, num_cout)
    else:
        new_dim = int(totp * num_cout / nm_m)
        k_spar = totp * num_cout * nm_n / nm_m
        D = B.clone().t().reshape((new_dim, nm_m))
        _, loss_idx = torch.topk(-(D**2), nm_m - nm_n, dim=1)
        D = D.scatter(src=torch.zeros((new_dim, nm_m - nm_n), dtype=dtype, device=dev), dim=1, index=loss_idx)
        D_suppp = (D == 0).to(dtype)
        D = D.reshape(num_cout, totp).t()
    D_init = D.clone()
    for i_admm in range(max_iter):
        B = XTX_inv @ (YtX.T - V + rho * D)
        if nm_n == 0:
            D = ((V + rho * B) / rho).reshape(-1)
            _, loss_idx = torch.topk(-(D**2), totp * num_cout - k_spar)
            D[loss_idx] = 0
            D = D.reshape(totp, num_cout)
        else:
            D = ((V + rho * B) / rho).t().reshape((new_dim, nm_m))
            _, loss_idx = torch.topk(-(D**2), nm_m - nm_n, dim=1)
            D = D.scatter(src=torch.zeros((new_dim, nm_m - nm_n), dtype=dtype, device=dev), dim=1, index=loss_idx)
            D_supp = (D == 0).to(dtype)
            D = D.reshape(num_cout, totp).t()
        V = V + rho * (B - D)
        if (i_admm + 1) % update_iter == 0:
            if nm_n == 0:
                D_supp = (D.reshape(-1) == 0).to(dtype)
            supp_change = torch.sum((D_supp - D_suppp) ** 2)
            if supp_change / k_spar > 0.1:
                init_rho = True
                rho *= 1.3
            elif supp_change / k_spar > 0.005:
                init_rho = True
                rho *= 1.2
            elif supp_change > 0.5:
                if init_rho:
                    rho *= 1.1
                else:
                    rho /= 5
                    B = B_orig.clone()
                    D = D_init.clone()
                    V = torch.zeros_like(B)
            else:
                if init_rho:
                    break
                else:
                    rho /= 5
            D_suppp = (D_supp).clone()
            if rho > 1e6:
                rho = 1e6
            XTX_inv = (Q @ ((1 / (L + (rho))) * Q).T).to(dtype)
            if i_admm >= switch_iter and supp_change / k_spar < 0.0003:
                break
    if nm_n == 0:
        B = B.reshape(-1)
        _, loss_idx = torch.topk(-(B**2), totp * num_cout - k_spar)
        B[loss_idx] = 0
        B = B.reshape(totp, num_cout)
    else:
        B = B.t().reshape((new_dim, nm_m))
        _, loss_idx = torch.topk(-(B**2), nm_m - nm_n, dim=1)
        B = B.scatter(src=torch.zeros((new_dim, nm_m - nm_n), dtype=dtype, device=dev), dim=1, index=loss_idx)
        B = B.reshape(num_cout, totp).t()
    B = cg_batch(XtX, YtX.T, (B != 0).to(dtype), X0=B, rtol=1e-4, atol=0.0, maxiter=10)
    Res = torch.matmul(XtX, B) - YtX.T
    Res = torch.diag(torch.matmul((B - B_orig).t(), Res))
    error = (torch.sum(Res) / Res0).item()
    return (B.t() / X_norm), error


def cg_batch(A, B, A_supp, M_bmm=None, X0=None, rtol=1e-3, atol=0.0, maxiter=None):
    n, m = B.shape
    if M_bmm is None:
        M_bmm = lambda x: x  # noqa: E731
    if X0 is None:
        X0 = M_bmm(B)
    if maxiter is None:
        maxiter = 5 * n
    X_k = X0
    R_k = B - A @ X_k
    R_k = R_k * A_supp
    Z_k = M_bmm(R_k)
    P_k = torch.zeros_like(Z_k)
    P_k1 = P_k
    R_k1 = R_k
    R_k2 = R_k
    X_k1 = X0
    Z_k1 = Z_k
    Z_k2 = Z_k
    B_norm = torch.norm(B, dim=1)
    stopping_matrix = torch.max(rtol * B_norm, atol * torch.ones_like(B_norm))
    for k in range(1, maxiter + 1):
        Z_k = M_bmm(R_k)
        if k == 1:
            P_k = Z_k
            R_k1 = R_k
            X_k1 = X_k
            Z_k1 = Z_k
        else:
            R_k2 = R_k1
            Z_k2 = Z_k1
            P_k1 = P_k
            R_k1 = R_k
            Z_k1 = Z_k
            X_k1 = X_k
            denominator = (R_k2 * Z_k2).sum(0)
            denominator[denominator == 0] = 1e-8
            beta = (R_k1 * Z_k1).sum(0) / denominator
            P_k = Z_k1 + beta.unsqueeze(0) * P_k1
        denominator = (P_k * (A @ P_k)).sum(0)
        denominator[denominator == 0] = 1e-8
        alpha = (R_k1 * Z_k1).sum(0) / denominator
        X_k = X_k1 + alpha.unsqueeze(0) * P_k
        R_k = R_k1 - alpha.unsqueeze(0) * (A @ P_k)
        R_k = R_k * A_supp
        residual_norm = torch.norm(A @ X_k - B, dim=1)
        if (residual_norm <= stopping_matrix).all():
            break
    return X_k


# --- ADMM weight update (Boža) ------------------------------------------------------------------------------
def admm_fasterprune(weight, XX, sparsity, prune_n=0, prune_m=0, percdamp=0.1, iterative_prune=15, iters=20,
                     per_out=False, dtype=torch.float32):  # fmt: skip
    """Returns the pruned weight [out, in] in ``dtype``."""
    XX = XX.clone().to(dtype)
    norm = torch.diag(XX).sqrt() + 1e-8
    XX = XX / norm
    XX = (XX.T / norm).T
    W = (weight.to(dtype) * norm).T
    rho0 = percdamp * torch.diag(XX).mean()
    diag = torch.arange(XX.shape[0], device=XX.device)
    XX[diag, diag] += rho0
    if iterative_prune == 0:
        if prune_n != 0:
            WT = W.T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
            mask = torch.zeros_like(WT)
            sort_inds = WT.sort(dim=1)[1]
            mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
            mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
            mask = mask.reshape(W.T.shape).T
        elif per_out:
            thres = (W).abs().sort(dim=0)[0][int(W.shape[0] * sparsity)]
            mask = (W).abs() >= thres.unsqueeze(0)
        else:
            topk = torch.topk(W.abs().flatten(), k=int(W.numel() * sparsity), largest=False)
            mask = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
            mask[topk.indices] = 0
            mask = mask.reshape(W.shape)
    if iters == 0:
        Z = (W) * mask
        return Z.T / norm
    rho = 1
    XY = XX.matmul(W)
    XX[diag, diag] += rho
    XXinv = torch.inverse(XX)
    U = torch.zeros_like(W)
    for itt in range(iters):
        if iterative_prune > 0 and itt < iterative_prune:
            if prune_n != 0:
                sparsity = 0.5
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                WT = (W + U).T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
                mask = torch.zeros(WT.shape, dtype=torch.bool, device=W.device)
                sort_inds = WT.sort(dim=1)[1]
                mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
                mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
                mask = mask.reshape(W.T.shape).T
                Z2 = (W + U).abs()
                Z2[mask] = torch.inf
                thres = Z2.flatten().kthvalue(int(W.numel() * cur_sparsity) + 1)[0]
                mask = Z2 >= thres
            else:
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                if per_out:
                    thres = (W + U).abs().sort(dim=0)[0][int(W.shape[0] * cur_sparsity)]
                    mask = (W + U).abs() >= thres.unsqueeze(0)
                else:
                    topk = torch.topk((W + U).abs().flatten(), k=int(W.numel() * sparsity), largest=False)
                    mask = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
                    mask[topk.indices] = 0
                    mask = mask.reshape(W.shape)
        Z = (W + U) * mask
        U = U + (W - Z)
        W = XXinv.matmul(XY + rho * (Z - U))
    Z = (W + U) * mask
    return Z.T / norm
