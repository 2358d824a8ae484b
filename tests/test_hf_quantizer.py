"""transformers' own ``AutoModelForCausalLM.from_pretrained`` opens sparse24 checkpoints (``pruning.hf_quantizer``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import pruning
from pruning.infer.sparse_linear import Sparse24Linear
from pruning.sparse24 import load_sparse, save_sparse


def _tiny(arch: str):
    torch.manual_seed(0)
    if arch == "opt":
        config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
        return OPTForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("permute", [False, True])
def test_from_pretrained_gives_the_pruned_model(tmp_path, arch, permute):
    model = _tiny(arch)
    pruning.prune_model(model, IDS, "sparsegpt", 0.5, "2:4", backend="torch", permute_channels=permute)
    save_sparse(model, None, tmp_path / "m")
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "sparse24" and entry["version"] == (2 if permute else 1)
    assert not hasattr(model.config, "quantization_config")  # the in-memory model is left as it was
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    packed = [name for name, module in loaded.named_modules() if isinstance(module, Sparse24Linear)]
    assert packed == entry["modules"] and len(packed) == 2 * (6 if arch == "opt" else 7)
    assert bool(entry["permuted_modules"]) == permute
    with torch.no_grad():
        want, got = model(IDS).logits, loaded(IDS).logits
        ours = load_sparse(tmp_path / "m")(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, the same dense-with-zeros weights
    assert torch.equal(got, ours)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_from_pretrained_places_a_sparse24_model_by_device_map(tmp_path, device_map):
    """transformers' own placement (here the CPU; accelerate's 'auto' too) with the same logits as load_sparse."""
    model = _tiny("llama")
    pruning.prune_model(model, IDS, "wanda", 0.5, "2:4", backend="torch")
    save_sparse(model, None, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Sparse24Linear)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, load_sparse(tmp_path / "m")(IDS).logits)


def test_from_pretrained_refuses_corrupt_metadata_by_name(tmp_path):
    model = _tiny("opt")
    pruning.prune_model(model, IDS, "wanda", 0.5, "2:4", backend="torch")
    save_sparse(model, None, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    key = "model.decoder.layers.1.fc1.meta"
    state[key] = torch.full_like(state[key], 0b0111_0111)  # positions (3, 1): not increasing
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.decoder.layers.1.fc1.*corrupt 2:4 metadata"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_without_this_package_transformers_names_the_quantization_type(tmp_path):
    """transformers' own behaviour for an unknown quant_method, recorded here: it names it and reports the packed
    tensors as unexpected and the dense weights as missing (it cannot be made to stop: docs/sparse24.md)."""
    model = _tiny("opt")
    pruning.prune_model(model, IDS, "magnitude", 0.5, "2:4", backend="torch")
    save_sparse(model, None, tmp_path / "m")
    code = (
        "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "assert 'pruning' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Unknown quantization type, got sparse24" in run.stderr + run.stdout


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from pruning.hf_quantizer import Sparse24Quantizer, register

    register()
    register()
    assert AUTO_QUANTIZER_MAPPING["sparse24"] is Sparse24Quantizer
