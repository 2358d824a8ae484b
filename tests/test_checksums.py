"""Integrity of saved checkpoints: checksums recorded at save time, verified on request, and a fuzz of the sparse24
loader (random byte flips, truncations, header edits): it loads bit-identical weights or fails in one line.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import pruning
from pruning import checksums
from pruning.cli import main
from pruning.loading import load_model
from pruning.sparse24 import load_sparse, save_sparse
from pruning.tokenizers import byte_level_tokenizer

WEIGHTS = "model.safetensors"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    return model


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "sparse"
    save_sparse(tiny_llama(), byte_level_tokenizer(), directory)
    return directory


@pytest.fixture
def copy(sparse_dir, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(sparse_dir, target)
    return target


def data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def header(path: Path) -> dict:
    return json.loads(path.read_bytes()[8 : data_start(path)])


def flip(path: Path, position: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= mask
    path.write_bytes(bytes(raw))


def test_a_fresh_save_verifies(sparse_dir):
    manifest = json.loads((sparse_dir / checksums.MANIFEST).read_text())
    assert set(manifest["files"]) == {WEIGHTS, "config.json"}
    assert set(manifest["files"][WEIGHTS]["tensors"]) == set(load_file(str(sparse_dir / WEIGHTS)))
    result = checksums.verify(sparse_dir)
    assert result.ok and result.files == 2 and result.bytes > 0


def test_a_flipped_value_byte_names_its_tensor(copy):
    name = "model.layers.1.mlp.down_proj.values"
    begin, _ = header(copy / WEIGHTS)[name]["data_offsets"]
    flip(copy / WEIGHTS, data_start(copy / WEIGHTS) + begin + 3)
    result = checksums.verify(copy)
    assert not result.ok and result.problems == [f"{WEIGHTS}: 1 tensors differ from when it was saved ({name})"]
    with pytest.raises(ValueError, match=f"is damaged: .*{name}"):
        load_sparse(copy, verify=True)
    load_sparse(copy)  # unverified, it loads: the default costs no hashing


def test_truncation_missing_files_extra_files_and_a_damaged_manifest(copy):
    weights = copy / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "bytes" in checksums.verify(copy).problems[0]
    (copy / "config.json").unlink()
    (copy / "model-00002-of-00002.safetensors").write_bytes(b"")
    problems = checksums.verify(copy).problems
    assert "config.json is missing" in problems
    assert "model-00002-of-00002.safetensors was not part of the checkpoint when it was saved" in problems
    (copy / checksums.MANIFEST).write_text("{not json")
    assert checksums.verify(copy).problems == [f"{checksums.MANIFEST} is damaged; nothing can be verified"]
    (copy / checksums.MANIFEST).unlink()
    assert not checksums.verify(copy).recorded
    with pytest.raises(ValueError, match="nothing to verify it against"):
        load_sparse(copy, verify=True)


def test_check_verifies_before_loading(sparse_dir, copy, capsys):
    assert main(["check", str(sparse_dir), "--max_new_tokens", "2"]) == 0
    assert "integrity    ok: 2 files" in capsys.readouterr().out
    begin, _ = header(copy / WEIGHTS)["model.layers.0.self_attn.q_proj.meta"]["data_offsets"]
    flip(copy / WEIGHTS, data_start(copy / WEIGHTS) + begin)
    assert main(["check", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM      integrity: model.safetensors: 1 tensors differ" in out and "q_proj.meta" in out
    assert "ready to prune" not in out


def test_a_dense_save_through_the_cli_records_checksums_too(tmp_path):
    model_dir = tmp_path / "m"
    LlamaForCausalLM(tiny_llama().config).save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    target = tmp_path / "pruned"
    argv = ["--model", str(model_dir), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
            "--eval_dataset", "none", "--save_model", str(target)]  # fmt: skip
    assert main(argv) == 0
    assert checksums.verify(target).ok


# --- fuzz ----------------------------------------------------------------------------------------------------------

EDITS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("header"), st.floats(0, 1, exclude_max=True), st.sampled_from(b'0123456789",:{}[] FBIU')),
)


def apply(path: Path, edit: tuple) -> None:
    kind, where, value = edit
    raw = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(bytes(raw[: int(where * len(raw))]))
        return
    if not raw:
        return
    if kind == "header":  # inside the JSON header, where a changed character still parses as often as not
        end = min(len(raw), 8 + struct.unpack("<Q", bytes(raw[:8]).ljust(8, b"\0"))[0]) if len(raw) > 8 else 0
        if end <= 8:
            return
        raw[8 + int(where * (end - 8))] = value
    else:
        position = int(where * len(raw))
        raw[position] ^= value
    path.write_bytes(bytes(raw))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(EDITS, min_size=1, max_size=3))
def test_fuzz_the_sparse24_loader_loads_exactly_or_fails_in_one_line(edits, sparse_dir, tmp_path_factory):
    copy = tmp_path_factory.mktemp("fuzz") / "sparse"
    shutil.copytree(sparse_dir, copy)
    for edit in edits:
        apply(copy / WEIGHTS, edit)
    original = load_sparse(sparse_dir).state_dict()
    try:
        loaded = load_sparse(copy, verify=True)
    except ValueError as err:
        assert "\n" not in str(err) and str(err), repr(err)
    else:  # only an edit that changed nothing (a header byte replaced by itself) may load
        state = loaded.state_dict()
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) and state[k].dtype == original[k].dtype for k in original)
    # The ordinary loader (no verification) never fails with anything but one line either.
    try:
        load_model(str(copy), dtype="float32")
    except ValueError as err:
        assert "\n" not in str(err) and str(err), repr(err)
