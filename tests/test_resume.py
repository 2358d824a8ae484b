"""``--resume`` (``pruning.checkpoint``): a run cut off after layer k, resumed, ends bit for bit where an
uninterrupted run does; a resume with other settings is refused naming the difference; a SIGKILL mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import pruning
from pruning.checkpoint import LayerCheckpoint, ResumeMismatchError
from tests.test_cli import CALIB, EVAL, assert_one_line_error, prune_argv, read_metrics, run_main, tiny_opt  # noqa: F401
from tests.test_pruner import calibration_ids


def _four_layer(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(vocab_size=96, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=64, dropout=0.0)  # fmt: skip
        return OPTForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


class Cut(KeyboardInterrupt):
    pass


def _cut_after(monkeypatch, layer_index: int):
    """Interrupt the run right after layer ``layer_index``'s checkpoint is written (as a kill would)."""
    original = LayerCheckpoint.save_layer

    def save_then_cut(self, index, layer, record):
        original(self, index, layer, record)
        if index == layer_index:
            raise Cut

    monkeypatch.setattr(LayerCheckpoint, "save_layer", save_then_cut)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "family, method, kind, options",
    [
        ("opt", "sparsegpt", "unstructured", {}),
        ("llama", "wanda", "2:4", {"permute_channels": True}),  # carried permutations are restored too
        ("opt", "alps", "2:4", {"alps_max_iter": 12}),
        ("llama", "wanda", "three_tier", {"block_size": 8, "refine": "admm"}),
        ("opt", "magnitude", "unstructured", {}),
    ],
)
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, monkeypatch, family, method, kind, options):
    ids = calibration_ids(nsamples=6)
    whole = _four_layer(family)
    expected = pruning.prune_model(whole, ids, method, 0.5, kind, backend="torch", calib_batch_size=2, **options)
    cut = _four_layer(family)
    checkpoint = LayerCheckpoint(tmp_path / "resume")
    with monkeypatch.context() as patch:
        _cut_after(patch, 1)
        with pytest.raises(Cut):
            pruning.prune_model(cut, ids, method, 0.5, kind, backend="torch", calib_batch_size=2,
                                checkpoint=checkpoint, **options)  # fmt: skip
    resumed = _four_layer(family)  # a fresh process would load the dense model again
    report = pruning.prune_model(resumed, ids, method, 0.5, kind, backend="torch", calib_batch_size=2,
                                 checkpoint=LayerCheckpoint(tmp_path / "resume"), **options)  # fmt: skip
    ours, want = _state(resumed), _state(whole)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    perm_attr = pruning.permutation.PERMUTATION_ATTRIBUTE
    for (name, a), (_, b) in zip(resumed.named_modules(), whole.named_modules(), strict=True):
        pa, pb = getattr(a, perm_attr, None), getattr(b, perm_attr, None)
        assert (pa is None) == (pb is None) and (pa is None or torch.equal(pa, pb)), name
    assert report.actual_sparsity == expected.actual_sparsity
    assert [layer.errors for layer in report.layers] == [layer.errors for layer in expected.layers]
    assert report.tiers == expected.tiers


def test_a_checkpoint_from_other_settings_is_refused_naming_the_difference(tmp_path, monkeypatch):
    ids = calibration_ids(nsamples=4)
    with monkeypatch.context() as patch:
        _cut_after(patch, 0)
        with pytest.raises(Cut):
            pruning.prune_model(_four_layer("opt"), ids, "wanda", 0.5, backend="torch",
                                checkpoint=LayerCheckpoint(tmp_path / "resume"))  # fmt: skip
    with pytest.raises(ResumeMismatchError, match="sparsity_ratio: 0.5 then, 0.6 now"):
        pruning.prune_model(_four_layer("opt"), ids, "wanda", 0.6, backend="torch",
                            checkpoint=LayerCheckpoint(tmp_path / "resume"))  # fmt: skip
    with pytest.raises(ResumeMismatchError, match="calibration_ids_sha256"):
        pruning.prune_model(_four_layer("opt"), calibration_ids(nsamples=4, seed=1), "wanda", 0.5, backend="torch",
                            checkpoint=LayerCheckpoint(tmp_path / "resume"))  # fmt: skip


def test_the_cli_resumes_and_removes_its_checkpoint_when_done(tiny_opt, tmp_path, capsys, monkeypatch):  # noqa: F811
    whole = tmp_path / "whole"
    assert run_main(prune_argv(tiny_opt, "--save", str(tmp_path / "s0"), "--save_model", str(whole),
                               method="sparsegpt")) == 0  # fmt: skip
    save, model_dir = tmp_path / "s1", tmp_path / "model"
    argv = prune_argv(tiny_opt, "--save", str(save), "--save_model", str(model_dir), "--resume", method="sparsegpt")
    with monkeypatch.context() as patch:
        _cut_after(patch, 0)
        assert run_main(argv) == 130  # interrupted, as by Ctrl-C
    assert (save / "resume" / "layer_0000.safetensors").is_file() and not model_dir.exists()
    capsys.readouterr()
    changed = [a if a != "0.5" else "0.6" for a in argv]
    assert_one_line_error(capsys, run_main(changed), "sparsity_ratio: 0.5 then, 0.6 now")
    capsys.readouterr()
    assert run_main(argv) == 0
    assert read_metrics(save)["ppl_test"] == read_metrics(tmp_path / "s0")["ppl_test"]
    ours, want = load_file(model_dir / "model.safetensors"), load_file(whole / "model.safetensors")
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    assert not (save / "resume").exists()
    assert_one_line_error(capsys, run_main([*prune_argv(tiny_opt), "--resume"]), "--resume", "--save")


def test_a_run_killed_mid_way_resumes_bit_for_bit(tiny_opt, tmp_path):  # noqa: F811
    """A real SIGKILL right after layer 0's checkpoint (no clean-up runs), then a resume in a new process."""
    save = tmp_path / "save"
    argv = prune_argv(tiny_opt, "--save", str(save), "--save_model", str(tmp_path / "model"), "--resume",
                      method="sparsegpt", kind="2:4")  # fmt: skip
    killer = (
        "import os, signal, sys\n"
        "from pruning.checkpoint import LayerCheckpoint\n"
        "from pruning.cli.main import main\n"
        "original = LayerCheckpoint.save_layer\n"
        "def save(self, index, layer, record):\n"
        "    original(self, index, layer, record)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "LayerCheckpoint.save_layer = save\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", killer, *argv], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (save / "resume" / "layer_0000.safetensors").is_file()
    resumed = subprocess.run([sys.executable, "-m", "pruning", *argv], env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert b"resuming: layers 0-0 restored" in resumed.stderr
    whole = tmp_path / "whole"
    assert run_main(prune_argv(tiny_opt, "--save_model", str(whole), method="sparsegpt", kind="2:4")) == 0
    ours, want = load_file(tmp_path / "model" / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(ours[k], want[k]) for k in want)
