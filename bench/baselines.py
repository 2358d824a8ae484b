"""Published code paths, re-implemented as references: locuslab/wanda and IST-DASLab/sparsegpt.

Per matrix (the kernels suite): ``locuslab_prune_`` (prune_wanda's mask), ``locuslab_magnitude_mask``,
``locuslab_add_batch_`` (WrappedGPT's statistic) and ``vectorized_prune_``, the fastest plain torch we know.
Whole models (the e2e suite): ``locuslab_prune`` runs lib/prune_opt.py's prune_wanda / prune_sparsegpt on an
OPT, one calibration sample per layer forward. The ablations (tests/test_ablate.py): ``locuslab_prune_ablate``
with lib/ablate.py's ``AblateGPT``. Changed only where transformers or the data loading differ (see
docs/benchmarks.md); these are what our results are compared with, so keep them as published.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pruning.adapters import get_adapter
from pruning.config import parse_sparsity_type

# --- per matrix: locuslab/wanda lib/prune.py, and plain torch -------------------------------------------


def locuslab_prune_(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """locuslab/wanda lib/prune.py prune_wanda, per matrix, verbatim apart from names."""
    w_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    w_mask = torch.zeros_like(w_metric) == 1
    if n != 0:
        for ii in range(w_metric.shape[1]):
            if ii % m == 0:
                tmp = w_metric[:, ii : (ii + m)].float()
                w_mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(w_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(w_metric.shape[1] * sparsity)]
        w_mask.scatter_(1, indices, True)
    weight[w_mask] = 0
    return w_mask


def vectorized_prune_(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """The fastest plain-torch formulation we know: topk per row, or reshape to groups + topk."""
    w_metric = weight.abs().float() * torch.sqrt(scaler_row)[None, :]
    rows, cols = w_metric.shape
    if n:
        groups = w_metric.reshape(rows, cols // m, m)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            2, torch.topk(groups, n, dim=2, largest=False)[1], True
        )
        mask = mask.reshape(rows, cols)
    else:
        idx = torch.topk(w_metric, int(cols * sparsity), dim=1, largest=False)[1]
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device).scatter_(1, idx, True)
    weight.masked_fill_(mask, 0)
    return mask


def locuslab_magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """locuslab/wanda prune_magnitude's mask: a full sort of |W| for one threshold."""
    w_metric = torch.abs(weight)
    thresh = torch.sort(w_metric.flatten())[0][int(weight.numel() * sparsity)]
    return w_metric <= thresh


def locuslab_add_batch_(scaler_row: torch.Tensor, inp: torch.Tensor, nsamples: int) -> None:
    """WrappedGPT.add_batch's statistic (for one batch of one sample, as the reference runs it)."""
    tmp = 1
    inp = inp.reshape((-1, inp.shape[-1])).t()
    scaler_row *= nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = inp.type(torch.float32)
    scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples


# --- whole models: locuslab/wanda lib/prune_opt.py, re-implemented faithfully --------------------------


def _cuda_synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_layers(module: nn.Module, layers=(nn.Linear,), name: str = "") -> dict[str, nn.Module]:
    """lib/prune_opt.py find_layers: every module of the given types, by qualified name."""
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + "." + name1 if name != "" else name1))
    return res


class WrappedGPT:
    """lib/layerwrapper.py: a running mean over samples of each input channel's squared L2 norm."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.dev = self.layer.weight.device
        self.rows = layer.weight.data.shape[0]
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class SparseGPT:
    """lib/sparsegpt.py (IST-DASLab/sparsegpt f5c2500): Hessian running mean + fasterprune. Unchanged apart
    from the Conv1D/Conv2d branches (OPT has only nn.Linear) and the unused timer and losses print."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01) -> None:
        W = self.layer.weight.data.clone().float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Losses = torch.zeros(self.rows, device=self.dev)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        mask = None
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    tmp = W1[:, i : (i + prune_m)] ** 2 / (torch.diag(Hinv1)[i : (i + prune_m)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        _cuda_synchronize()
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)

    def free(self) -> None:
        self.H = None
        _empty_cache()


def _hidden_states(out):
    """A decoder layer's output: a tensor in transformers 5, ``(hidden_states, ...)`` before."""
    return out[0] if isinstance(out, (tuple, list)) else out


def locuslab_prepare_calibration_input(model, calibration_ids: torch.Tensor, device: torch.device):
    """prepare_calibration_input: a Catcher in place of layer 0 records its input, one sample per forward."""
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.decoder.layers
    nsamples, seqlen = calibration_ids.shape
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=dtype, device=device)  # 128 upstream
    inps.requires_grad = False
    cache = {"i": 0, "layer_kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            # upstream keeps kwargs['attention_mask'] only; newer layers also want position_ids etc.
            cache["layer_kwargs"] = {
                k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "cache")
            }
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(nsamples):  # the dataloader yields one [1, seqlen] sample per batch
        try:
            model(calibration_ids[j : j + 1].to(device))
        except ValueError:
            pass
    layers[0] = layers[0].module
    if cache["i"] != nsamples:
        raise RuntimeError(f"the Catcher saw {cache['i']} of {nsamples} samples: the model forward failed early")
    outs = torch.zeros_like(inps)
    model.config.use_cache = use_cache
    return inps, outs, cache["layer_kwargs"]


def locuslab_prune_wanda(model, calibration_ids, sparsity_ratio, prune_n=0, prune_m=0, device=None) -> None:
    """prune_wanda from locuslab/wanda lib/prune_opt.py (OPT), minus data loading and prints."""
    device = device or next(model.parameters()).device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    nsamples = calibration_ids.shape[0]
    with torch.no_grad():
        inps, outs, layer_kwargs = locuslab_prepare_calibration_input(model, calibration_ids, device)

    layers = model.model.decoder.layers
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        wrapped_layers = {name: WrappedGPT(subset[name]) for name in subset}

        def add_batch(name, wrapped_layers=wrapped_layers):
            def hook(_, inp, out):  # upstream names it tmp, like the N:M loop's variable below
                wrapped_layers[name].add_batch(inp[0].data, out.data)

            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped_layers]
        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        for h in handles:
            h.remove()

        for name in subset:  # prune_wanda's mask + zeroing, per matrix (locuslab_prune_ keeps it verbatim)
            locuslab_prune_(subset[name].weight.data, wrapped_layers[name].scaler_row, sparsity_ratio, prune_n, prune_m)

        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        inps, outs = outs, inps

    model.config.use_cache = use_cache
    _empty_cache()


@torch.no_grad()
def locuslab_prune_sparsegpt(model, calibration_ids, sparsity_ratio, prune_n=0, prune_m=0, device=None) -> None:
    """prune_sparsegpt from locuslab/wanda lib/prune_opt.py (OPT), minus data loading and prints."""
    device = device or next(model.parameters()).device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    nsamples = calibration_ids.shape[0]
    inps, outs, layer_kwargs = locuslab_prepare_calibration_input(model, calibration_ids, device)
    _empty_cache()

    layers = model.model.decoder.layers
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        gpts = {name: SparseGPT(subset[name]) for name in subset}

        def add_batch(name, gpts=gpts):
            def hook(_, inp, out):
                gpts[name].add_batch(inp[0].data, out.data)

            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in gpts]
        for j in range(nsamples):
            outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        for h in handles:
            h.remove()

        for name in gpts:
            gpts[name].fasterprune(sparsity_ratio, prune_n=prune_n, prune_m=prune_m, percdamp=0.01, blocksize=128)
            gpts[name].free()

        for j in range(nsamples):
            outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        layers[i] = layer
        _empty_cache()
        inps, outs = outs, inps

    model.config.use_cache = use_cache
    _empty_cache()


LOCUSLAB = {"wanda": locuslab_prune_wanda, "sparsegpt": locuslab_prune_sparsegpt}


def locuslab_prune(model, calibration_ids, method: str, sparsity_type: str, sparsity_ratio=0.5) -> None:
    """``method`` (wanda, sparsegpt) at ``sparsity_type`` (unstructured or N:M), as lib/prune_opt.py runs it."""
    n, m = parse_sparsity_type(sparsity_type)
    LOCUSLAB[method](model, calibration_ids, sparsity_ratio, prune_n=n, prune_m=m)


# --- the ablations: locuslab/wanda lib/ablate.py ---------------------------------------------------------


class AblateGPT:
    """locuslab/wanda lib/ablate.py ``AblateGPT``, on the CPU."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns)
        self.nsamples = 0
        self.scaler_row = torch.zeros(self.columns)

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.unsqueeze(0) if inp.ndim == 2 else inp
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    def get_wanda_mask(self, sparsity, prune_n, prune_m):
        metric = torch.abs(self.layer.weight.data) * torch.sqrt(self.scaler_row.reshape((1, -1)))
        mask = torch.zeros_like(metric) == 1
        if prune_n != 0:
            for ii in range(0, metric.shape[1], prune_m):
                tmp = metric[:, ii : ii + prune_m].float()
                mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
        else:
            indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
            mask.scatter_(1, indices, True)
        return mask

    def get_mag_mask(self, sparsity, prune_n, prune_m):
        metric = torch.abs(self.layer.weight.data)
        if prune_n != 0:
            mask = torch.zeros_like(metric) == 1
            for ii in range(0, metric.shape[1], prune_m):
                tmp = metric[:, ii : ii + prune_m].float()
                mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            return mask
        return metric <= torch.sort(metric.flatten())[0][int(metric.numel() * sparsity)]

    def fasterprune(self, method, sparsity, mask=None, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        diag = torch.arange(self.columns)
        H[diag, diag] += percdamp * torch.mean(torch.diag(H))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0 or mask is not None:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    if "wanda" in method:
                        tmp = torch.abs(W1) * torch.sqrt(self.scaler_row[i1:i2].reshape((1, -1)))
                    else:
                        tmp = torch.abs(W1)
                    mask1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(i2 - i1):
                w, d = W1[:, i], Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0 and mask is None:
                    if "wanda" in method:
                        scale = torch.sqrt(self.scaler_row[(i + i1) : (i + i1 + prune_m)].reshape((1, -1)))
                        tmp = torch.abs(W1[:, i : (i + prune_m)]) * scale
                    else:
                        tmp = torch.abs(W1[:, i : (i + prune_m)])
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.to(self.layer.weight.data.dtype)


def per_sample_layer_inputs(model, ids):
    """prepare_calibration_input: layer-0 inputs of each sample, one sample per forward."""
    layers = get_adapter(model).layers(model)
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"], {k: v for k, v in kwargs.items()}))
        raise StopIteration

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    for j in range(ids.shape[0]):
        try:
            model(input_ids=ids[j : j + 1], use_cache=False)
        except StopIteration:
            pass
    handle.remove()
    return captured


def layer_output(layer, hidden, kwargs):
    """A decoder layer's hidden-state output (transformers returns a tuple in some versions)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def locuslab_prune_ablate(model, ids, method, sparsity, n=0, m=0):
    """lib/prune.py prune_ablate (``ablate_{mag,wanda}_{seq,iter}``), any model ``pruning.adapters`` knows, CPU."""
    samples = per_sample_layer_inputs(model, ids)
    for layer in get_adapter(model).layers(model):
        subset = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        gpts = {name: AblateGPT(mod) for name, mod in subset.items()}
        handles = [
            subset[name].register_forward_hook(lambda _m, inp, _out, g=gpts[name]: g.add_batch(inp[0].data))
            for name in subset
        ]
        for hidden, kwargs in samples:
            layer_output(layer, hidden, kwargs)
        for h in handles:
            h.remove()
        for gpt in gpts.values():
            mask = None
            if method == "ablate_wanda_seq":
                mask = gpt.get_wanda_mask(sparsity, n, m)
            elif method == "ablate_mag_seq":
                mask = gpt.get_mag_mask(sparsity, n, m)
            gpt.fasterprune(method, sparsity, mask=mask, prune_n=n, prune_m=m)
        samples = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]
