"""The loading contract: a model is exactly what its files hold, or one line says which file and what is wrong.

transformers fills every weight a checkpoint lacks with fresh random values and only prints a report; a run on
such a model would prune, evaluate and save noise and exit 0. Each damaged checkpoint here must be refused,
through the library (ValueError) and through the CLI (exit 2, one line, nothing written).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import pruning
from pruning.cli import main
from pruning.cli.demo import ASSETS
from pruning.loading import load_model
from pruning.sparse24 import save_sparse
from pruning.tokenizers import byte_level_tokenizer


def tiny(family: str):
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(
            vocab_size=260, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return OPTForCausalLM(config).eval()
    config = LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def saved(family: str, directory: Path) -> Path:
    tiny(family).save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def rewrite_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def prune_argv(model: Path, save_model: Path) -> list[str]:
    return [
        "--model", str(model), "--prune_method", "magnitude", "--sparsity_ratio", "0.5", "--eval_dataset", "none",
        "--save_model", str(save_model),
    ]  # fmt: skip


def assert_refused(directory: Path, tmp_path: Path, capsys, *fragments: str) -> None:
    with pytest.raises(ValueError) as caught:
        load_model(str(directory), dtype="float32")
    for fragment in fragments:
        assert fragment in str(caught.value)
    out = tmp_path / "pruned"
    capsys.readouterr()
    assert main(prune_argv(directory, out)) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), errors
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_good_checkpoint_loads_exactly(family, tmp_path):
    model = tiny(family)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    for name, param in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name


@pytest.mark.parametrize("family, weight", [("opt", "model.decoder.layers.1.fc1.weight"),
                                            ("llama", "model.layers.0.mlp.up_proj.weight")])  # fmt: skip
def test_a_missing_weight_is_refused(family, weight, tmp_path, capsys):
    directory = saved(family, tmp_path / "m")
    rewrite_weights(directory, lambda state: state.pop(weight))
    assert_refused(directory, tmp_path, capsys, "1 missing", weight)


def test_a_config_of_another_architecture_is_refused(tmp_path, capsys):
    directory = saved("opt", tmp_path / "m")
    llama = saved("llama", tmp_path / "llama")
    (directory / "config.json").write_text((llama / "config.json").read_text())
    assert_refused(directory, tmp_path, capsys, "missing", "unexpected")


@pytest.mark.parametrize("marker", ["removed", "renamed", "a string"])
def test_a_sparse24_checkpoint_with_an_altered_marker_is_refused(marker, tmp_path, capsys):
    model = tiny("llama")
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    directory = tmp_path / "sparse"
    save_sparse(model, byte_level_tokenizer(), directory)
    config = json.loads((directory / "config.json").read_text())
    if marker == "removed":
        del config["sparsity_config"]
    elif marker == "renamed":
        config["sparsity_config"]["format"] = "sparse42"
    else:
        config["sparsity_config"] = "sparse24"
    (directory / "config.json").write_text(json.dumps(config))
    assert_refused(directory, tmp_path, capsys, "stored 2:4-compressed", "export it again")


def test_a_truncated_sparse24_file_is_one_line(tmp_path, capsys):
    model = tiny("opt")
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    directory = tmp_path / "sparse"
    save_sparse(model, byte_level_tokenizer(), directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_refused(directory, tmp_path, capsys, "sparse24 checkpoint", "export it again")


def test_a_sparse24_checkpoint_with_a_reshaped_tensor_is_one_line(tmp_path, capsys):
    model = tiny("opt")
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    directory = tmp_path / "sparse"
    save_sparse(model, byte_level_tokenizer(), directory)
    name = "model.decoder.layers.0.fc1.values"
    rewrite_weights(directory, lambda state: state.__setitem__(name, state[name][:, :8].contiguous()))
    assert_refused(
        directory, tmp_path, capsys, "sparse24 checkpoint", "size mismatch for model.decoder.layers.0.fc1.values"
    )


def test_the_cli_still_prunes_a_good_checkpoint(tmp_path, capsys):
    directory = saved("opt", tmp_path / "m")
    argv = prune_argv(directory, tmp_path / "pruned")
    argv[argv.index("magnitude")] = "wanda"
    argv += ["--nsamples", "4", "--seqlen", "16", "--calib_dataset", str(ASSETS / "demo_calibration.txt")]
    assert main(argv) == 0
    assert (tmp_path / "pruned" / "model.safetensors").is_file()


def test_integer_weights_are_refused_not_cast(tmp_path, capsys):
    directory = saved("opt", tmp_path / "m")
    name = "model.decoder.layers.0.fc2.weight"
    rewrite_weights(directory, lambda state: state.__setitem__(name, (state[name] * 1000).to(torch.int32)))
    assert_refused(directory, tmp_path, capsys, "must be floating point", f"{name} (I32)")


@pytest.mark.parametrize("tensor, dtype", [("fc1.values", torch.int32), ("fc1.meta", torch.int16)])
def test_a_relabelled_sparse24_dtype_is_refused(tensor, dtype, tmp_path, capsys):
    model = tiny("opt")
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    directory = tmp_path / "sparse"
    save_sparse(model, byte_level_tokenizer(), directory)
    name = f"model.decoder.layers.0.{tensor}"
    rewrite_weights(directory, lambda state: state.__setitem__(name, state[name].to(dtype)))
    assert_refused(directory, tmp_path, capsys, name, "the checkpoint is damaged")


def bin_checkpoint(directory: Path, edit) -> Path:
    """A pytorch_model.bin checkpoint (the format before safetensors), edited before it is written."""
    directory = saved("opt", directory)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    edit(state)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_integer_weights_in_a_bin_checkpoint_are_refused(tmp_path, capsys):
    name = "model.decoder.layers.0.fc2.weight"
    directory = bin_checkpoint(tmp_path / "m", lambda s: s.__setitem__(name, (s[name] * 100).to(torch.int8)))
    assert_refused(directory, tmp_path, capsys, "must be floating point", f"{name} (INT8)")


def test_a_bin_checkpoint_with_pickled_objects_is_one_line(tmp_path, capsys):
    directory = bin_checkpoint(tmp_path / "m", lambda s: s.__setitem__("extra", {"a": object()}))
    assert_refused(directory, tmp_path, capsys, "safe loader refuses")


def test_a_good_bin_checkpoint_still_loads(tmp_path):
    directory = bin_checkpoint(tmp_path / "m", lambda s: None)
    model = load_model(str(directory), dtype="float32")
    assert model.model.decoder.layers[0].fc2.weight.dtype == torch.float32


@pytest.mark.parametrize("save_format", ["dense", "sparse24"])
def test_a_config_with_fewer_layers_than_the_weights_is_refused(save_format, tmp_path, capsys):
    model = tiny("opt")
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    directory = tmp_path / "m"
    if save_format == "dense":
        model.save_pretrained(directory)
        byte_level_tokenizer().save_pretrained(directory)
    else:
        save_sparse(model, byte_level_tokenizer(), directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    assert_refused(directory, tmp_path, capsys, "model.decoder.layers.1.", "match its config.json")
