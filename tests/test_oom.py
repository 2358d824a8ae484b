"""GPU out-of-memory errors: batched passes retry with halved batches and give the same result as a run that
used the smaller batch from the start; what no batch size cures becomes one line naming the flags to change.

There is no GPU here, so the error is raised by hooks that play an allocator refusing batches above a size,
at the point of a real forward where memory would run out (mid-layer, after some statistics were taken).
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from test_cli import prune_argv, run_main, tiny_opt  # noqa: F401 (tiny_opt: a saved model fixture)
from test_pruner import calibration_ids, linears, tiny_llama
from test_pruner import tiny_opt as tiny_opt_model
from torch import nn

import pruning
from pruning.adapters import get_adapter
from pruning.evaluate import layerwise_perplexity, perplexity
from pruning.layerwise import capture_layer_inputs, run_layer, with_smaller_batches_on_oom

MODELS = {"opt": tiny_opt_model, "llama": tiny_llama}
CPU = torch.device("cpu")


def refuse_batches_above(limit: int, module: nn.Module, *, after_forward: bool = False) -> None:
    """``module`` raises torch.OutOfMemoryError for inputs of more than ``limit`` samples (before its forward,
    or after it, once its output exists)."""

    def check(_module, args, *_output):
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {args[0].shape[0]} samples > {limit})")

    if after_forward:
        module.register_forward_hook(check)
    else:
        module.register_forward_pre_hook(check)


def attention_output_projection(layer: nn.Module) -> nn.Linear:
    attention = layer.self_attn
    return getattr(attention, "o_proj", None) or attention.out_proj


def retries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_split_batches_equal_batches_captured_that_small(arch, attention):
    """limit_batch(2) on inputs captured 5 at a time gives what capturing 2 at a time gives: hidden states and
    every per-sample argument (OPT's position ids, eager attention masks) cut, shared tables kept whole."""
    model = MODELS[arch]()
    model.config._attn_implementation = attention
    adapter, ids = get_adapter(model), calibration_ids(5)
    split = capture_layer_inputs(model, adapter, ids, 5, CPU)
    split.limit_batch(2)
    direct = capture_layer_inputs(model, adapter, ids, 2, CPU)
    assert [h.shape[0] for h in split.hidden] == [h.shape[0] for h in direct.hidden] == [2, 2, 1]

    def assert_same(a, b):
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, (tuple, list)):
            assert type(a) is type(b) and len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert_same(x, y)
        elif isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                assert_same(a[key], b[key])
        else:
            assert a == b

    for got, want in zip(split.hidden, direct.hidden, strict=True):
        assert_same(got, want)
    assert_same(split.args, direct.args)
    assert_same(split.kwargs, direct.kwargs)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_pruning_that_runs_out_of_memory_equals_pruning_with_the_batch_that_fits(arch, method, caplog):
    """8 samples per forward: the capture fails above 4, and every layer's attention output projection above 2,
    after q/k/v's statistics of the batch were taken. The statistics pass restarts from zero at 2 samples, so
    the weights equal those of a run asked for 2 samples per forward (double-counted statistics would not)."""
    model = MODELS[arch]()
    reference = copy.deepcopy(model)
    refuse_batches_above(4, model.get_input_embeddings())
    for layer in get_adapter(model).layers(model):
        refuse_batches_above(2, attention_output_projection(layer))
    ids = calibration_ids(8)
    options = dict(method=method, sparsity_ratio=0.5, sparsity_type="unstructured", backend="torch")

    with caplog.at_level(logging.WARNING, logger="pruning"):
        report = pruning.prune_model(model, ids, calib_batch_size=8, **options)
    expected_report = pruning.prune_model(reference, ids, calib_batch_size=2, **options)

    assert retries(caplog) == [
        "GPU out of memory while capturing layer-0 inputs with 8 samples per batch; retrying with 4",
        "GPU out of memory while collecting layer 0's statistics with 4 samples per batch; retrying with 2",
    ]
    assert report.calib_batch_size == 2
    got, want = linears(model), linears(reference)
    for name in want:
        assert torch.equal(got[name].weight, want[name].weight), name
    assert report.actual_sparsity == expected_report.actual_sparsity


def test_recomputed_outputs_after_out_of_memory_equal_a_run_at_the_smaller_batch():
    """The output pass (no statistics) fails once the layer's output exists: it is run again on halved batches,
    and later passes keep them."""
    model = tiny_opt_model()
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    ids = calibration_ids(6)
    expected = run_layer(layer, capture_layer_inputs(model, adapter, ids, 3, CPU), CPU, CPU)

    refuse_batches_above(3, layer, after_forward=True)
    inputs = capture_layer_inputs(model, adapter, ids, 6, CPU)
    outputs = with_smaller_batches_on_oom(inputs, functools.partial(run_layer, layer, inputs, CPU, CPU), "testing")
    assert [o.shape[0] for o in outputs] == [h.shape[0] for h in inputs.hidden] == [3, 3]
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got, want)


def test_out_of_memory_at_one_sample_reaches_the_caller():
    model = tiny_opt_model()
    for layer in get_adapter(model).layers(model):
        refuse_batches_above(0, attention_output_projection(layer))
    with pytest.raises(torch.OutOfMemoryError):
        pruning.prune_model(model, calibration_ids(4), method="wanda", calib_batch_size=4, backend="torch")


def test_perplexity_after_out_of_memory_equals_one_window_at_a_time(caplog):
    model = tiny_opt_model()
    ids = calibration_ids(1, seqlen=8 * 16).reshape(1, -1)
    one_at_a_time = perplexity(model, ids, 16, batch_size=1, progress=False)
    refuse_batches_above(1, get_adapter(model).layers(model)[1])
    with caplog.at_level(logging.WARNING, logger="pruning"):
        assert perplexity(model, ids, 16, batch_size=4, progress=False) == one_at_a_time
    assert len(retries(caplog)) == 2  # 4 -> 2 -> 1


def test_layerwise_perplexity_after_out_of_memory_pairs_split_batches_with_their_windows():
    """The streamed evaluation splits its stored batches mid-model; the head must still score each batch
    against its own windows (a misaligned pairing gives another number)."""
    model = tiny_opt_model()
    adapter = get_adapter(model)
    ids = calibration_ids(1, seqlen=6 * 16).reshape(1, -1)
    expected = layerwise_perplexity(model, adapter, ids, 16, batch_size=2)
    refuse_batches_above(2, adapter.layers(model)[1])
    assert layerwise_perplexity(model, adapter, ids, 16, batch_size=6) == pytest.approx(expected, rel=1e-6)


def error_line(capsys) -> str:
    """The one ``error:`` line, last on stderr (progress bars of the model load may precede it), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0]


def test_cli_out_of_memory_while_pruning_is_one_line_with_the_fix(tiny_opt, tmp_path, capsys, monkeypatch):  # noqa: F811
    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")

    monkeypatch.setattr("pruning.driver._prune_layers", out_of_memory)
    target = tmp_path / "model"
    assert run_main(prune_argv(tiny_opt, "--save_model", str(target))) == 2
    err = error_line(capsys)
    assert err.startswith("error: GPU out of memory while pruning: use --offload")
    assert "--device_map auto" in err and "--seqlen" in err and "expandable_segments" in err
    assert not target.exists()

    assert run_main(prune_argv(tiny_opt, "--offload")) == 2  # streamed already: only a shorter sequence helps
    assert error_line(capsys).startswith("error: GPU out of memory while pruning: use a smaller --seqlen")


def test_cli_saves_the_pruned_model_before_evaluation_can_run_out_of_memory(tiny_opt, tmp_path, capsys, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")

    monkeypatch.setattr("pruning.evaluate._summed_nll_in_batches", out_of_memory)
    target = tmp_path / "model"
    assert run_main(prune_argv(tiny_opt, "--save_model", str(target), kind="2:4")) == 2
    err = error_line(capsys)
    assert err.startswith("error: GPU out of memory while evaluating perplexity")
    assert "--eval_dataset none" in err and err.rstrip().endswith(f"the pruned model is saved in {target}")
    saved = AutoModelForCausalLM.from_pretrained(target)
    for name, module in linears(saved).items():
        assert int((module.weight.reshape(-1, 4) == 0).sum(dim=1).min()) == 2, name
