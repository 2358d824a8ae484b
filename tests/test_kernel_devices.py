"""Triton launches on the current CUDA device: every public launcher makes its inputs' device current first."""

from __future__ import annotations

import contextlib

import pytest
import torch

import wanda_kernels
from wanda_kernels import _runtime
from wanda_kernels import reference as ref
from wanda_kernels.kv_cache import write_kv_cache_
from wanda_kernels.rmsnorm import add_rms_norm
from wanda_kernels.silu_mul import silu_mul

LAUNCHERS = [getattr(wanda_kernels, name) for name in wanda_kernels.__all__] + [write_kv_cache_, add_rms_norm, silu_mul]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_every_public_launcher_switches_to_its_inputs_device(launcher):
    assert getattr(launcher, "__wrapped__", None) is not None and launcher.__code__ is _GUARD_CODE, (
        f"{launcher.__name__} is not wrapped by on_input_device"
    )


_GUARD_CODE = _runtime.on_input_device(lambda: None).__code__


class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (no GPU needed to check which device is made current)."""

    @property
    def device(self):
        return torch.device("cuda", 1)

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 1


def test_the_guard_makes_the_first_tensor_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen_inside = []

    @_runtime.on_input_device
    def launcher(flag, x, y=None):
        seen_inside.append(list(entered))
        return x

    on_gpu1 = torch.Tensor._make_subclass(_OnSecondGpu, torch.zeros(2))
    launcher(True, on_gpu1)
    launcher(True, x=on_gpu1)
    launcher(True, torch.zeros(2))  # CPU: no device switch
    assert entered == [torch.device("cuda", 1)] * 2
    assert seen_inside == [[torch.device("cuda", 1)], [torch.device("cuda", 1)] * 2, [torch.device("cuda", 1)] * 2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_on_the_second_gpu_while_the_first_is_current():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen).half()
    norms = torch.rand(256, generator=gen)
    want = ref.unstructured_mask_torch(ref.wanda_scores_torch(weight, norms), 0.5)
    with torch.cuda.device(0):
        got = wanda_kernels.unstructured_mask(wanda_kernels.wanda_scores(weight.cuda(1), norms.cuda(1)), 0.5)
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda", 1) and torch.equal(got.cpu(), want)


def test_the_guard_switches_nothing_on_one_gpu_or_on_the_current_one(monkeypatch):
    """The switch costs ~2 us of host time per launch: skipped where it cannot matter."""

    def must_not_switch(device):
        raise AssertionError("switched devices needlessly")

    monkeypatch.setattr(torch.cuda, "device", must_not_switch)
    launcher = _runtime.on_input_device(lambda x: x)
    on_gpu1 = torch.Tensor._make_subclass(_OnSecondGpu, torch.zeros(2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    launcher(on_gpu1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launcher(on_gpu1)
