"""2:4 compressed checkpoints: save, load_sparse, Sparse24Linear numerics (CPU here; CUDA paths marked gpu)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import pruning
from pruning.sparse24 import Sparse24Linear, compress_model_24, load_sparse, save_sparse


def tiny(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(vocab_size=96, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
        model = OPTForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def pruned(family: str, dtype=torch.float32):
    model = tiny(family, dtype)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    pruning.prune_model(model.float(), ids, "wanda", 0.5, "2:4")
    return model.to(dtype)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_save_and_load_sparse_round_trip(family, tmp_path):
    model = pruned(family)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dense(ids).logits
    save_sparse(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    spec = config["sparsity_config"]
    assert spec["format"] == "sparse24" and len(spec["modules"]) == (12 if family == "opt" else 14)
    loaded = load_sparse(tmp_path)
    for name in spec["modules"]:
        module = loaded.get_submodule(name)
        assert isinstance(module, Sparse24Linear)
        assert torch.equal(module.to_dense(), dense.get_submodule(name).weight)  # exact zeros and values
    with torch.no_grad(), pytest.warns(UserWarning, match="dense weight"):
        got = loaded(ids).logits
    assert torch.equal(got, want)  # CPU runs the unpacked dense weight: bit-identical


def test_a_loaded_sparse_model_saves_again_and_reports_its_sparsity(tmp_path):
    model = pruned("llama")
    save_sparse(model, None, tmp_path / "first")
    loaded = load_sparse(tmp_path / "first")
    assert pruning.check_sparsity(loaded, log_layers=False) == pruning.check_sparsity(model, log_layers=False) == 0.5
    save_sparse(loaded, None, tmp_path / "second")  # its Linears are Sparse24Linears already
    spec = json.loads((tmp_path / "second" / "config.json").read_text())["sparsity_config"]
    assert len(spec["modules"]) == 14
    again = load_sparse(tmp_path / "second")
    for name in spec["modules"]:
        assert torch.equal(again.get_submodule(name).to_dense(), model.get_submodule(name).weight)


def test_new_weights_reach_the_forward(tmp_path):
    """Derived forms of the weight (on CPU the dense copy) are dropped when the state dict is loaded anew."""
    first, second = pruned("opt"), pruned("opt")
    with torch.no_grad():
        for lin in (m for m in second.modules() if isinstance(m, nn.Linear)):
            lin.weight.neg_()
    compress_model_24(first), compress_model_24(second)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.warns(UserWarning, match="dense weight"):
        first(ids)  # builds the dense copies
        first.load_state_dict(second.state_dict())
        torch.testing.assert_close(first(ids).logits, second(ids).logits, rtol=0, atol=0)


def test_saving_compressed_leaves_the_model_as_it_was(tmp_path):
    """The CLI saves before it evaluates: the model it then evaluates must keep its own Linears and config."""
    model = pruned("llama")
    before = dict(model.named_modules())
    save_sparse(model, None, tmp_path)
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(module is before[name] for name, module in model.named_modules())
    assert not hasattr(model.config, "sparsity_config")
    assert "sparsity_config" in json.loads((tmp_path / "config.json").read_text())


def test_a_sharded_checkpoint_loads_from_all_its_shards(tmp_path):
    """Large models are saved in several safetensors files with an index: load_sparse reads every shard."""
    model = pruned("opt")
    save_sparse(model, None, tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    loaded = load_sparse(tmp_path)
    for name, param in model.state_dict().items():
        module_name, _, attribute = name.rpartition(".")
        module = loaded.get_submodule(module_name)
        got = (
            module.to_dense()
            if isinstance(module, Sparse24Linear) and attribute == "weight"
            else getattr(module, attribute)
        )
        assert torch.equal(got, param), name


def test_compressed_tensors_are_0_5625x_the_dense_size(tmp_path):
    model = pruned("opt", torch.float16)
    first = "model.decoder.layers.0.fc1"
    dense_bytes = model.get_submodule(first).weight.numel() * 2
    save_sparse(model, None, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor(f"{first}.values").numel() * 2 + f.get_tensor(f"{first}.meta").numel()
    assert f"{first}.weight" not in keys and f"{first}.values" in keys
    assert packed / dense_bytes == 0.5625
    assert "model.decoder.embed_tokens.weight" in keys  # other weights are stored as they were


def test_a_weight_that_is_not_24_is_refused_by_name():
    model = pruned("llama")
    model.model.layers[1].mlp.up_proj.weight.data[0, :4] = 1.0
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*not 2:4 sparse: 1 groups"):
        compress_model_24(model)
    # Nothing was replaced: every decoder Linear is still a plain nn.Linear.
    assert not any(isinstance(m, Sparse24Linear) for m in model.modules())


def test_a_width_the_format_cannot_hold_is_refused_by_name():
    with pytest.raises(ValueError, match=r"cannot store layers\.0\.fc2 as 2:4: .*divisible by 8, got 100"):
        Sparse24Linear.from_linear(nn.Linear(100, 8), "layers.0.fc2")


def test_load_sparse_refuses_metadata_out_of_order_by_module(tmp_path):
    from safetensors.torch import load_file, save_file

    save_sparse(pruned("opt"), None, tmp_path)
    name = "model.decoder.layers.1.self_attn.k_proj"
    state = load_file(str(tmp_path / "model.safetensors"))
    # One byte, two groups: positions (0, 1) in order, then (3, 1), which the format never writes.
    state[f"{name}.meta"][3, 2] = (0 | 1 << 2) << 4 | (3 | 1 << 2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj: corrupt 2:4 metadata, 1 groups"):
        load_sparse(tmp_path)


def test_packed_positions_are_always_in_increasing_order():
    from pruning.sparse24 import check_meta_order
    from wanda_kernels.reference import pack_24_torch

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=gen)
    pruning.methods.prune_magnitude_(w, 0.5, 2, 4, backend="torch")
    w[0, :8] = 0.0  # groups with 4 and 3 zeros: the kept positions are filled with zeros, still in order
    w[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 2.0])
    _, meta = pack_24_torch(w)
    check_meta_order(meta, "w")


def test_load_sparse_rejects_a_dense_checkpoint(tmp_path):
    tiny("opt").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a sparse24 checkpoint"):
        load_sparse(tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens", [1, 16, 2048])
def test_sparse24_linear_on_cuda_matches_dense(n_tokens):
    torch.manual_seed(0)
    linear = nn.Linear(4096, 1024, bias=True).half().cuda()
    pruning.methods.prune_magnitude_(linear.weight.data, 0.5, 2, 4, backend="triton")
    sparse = Sparse24Linear.from_linear(linear)
    x = torch.randn(n_tokens, 4096, device="cuda", dtype=torch.float16)
    got, want = sparse(x), linear(x)
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
def test_sparse_model_logits_match_dense_with_zeros_on_cuda(tmp_path):
    model = pruned("llama", torch.float16)
    save_sparse(copy.deepcopy(model), None, tmp_path)
    dense = model.cuda()
    sparse = load_sparse(tmp_path, device="cuda")
    for shape in ((1, 1), (2, 40)):
        ids = torch.randint(0, 96, shape, device="cuda")
        with torch.no_grad():
            want, got = dense(ids).logits.float(), sparse(ids).logits.float()
        assert ((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
def test_large_m_backends_on_cuda_match_dense_and_one_is_chosen_per_shape():
    torch.manual_seed(0)
    linear = nn.Linear(2048, 512, bias=True).half().cuda()
    pruning.methods.prune_magnitude_(linear.weight.data, 0.5, 2, 4, backend="triton")
    sparse = Sparse24Linear.from_linear(linear)
    x = torch.randn(100, 2048, device="cuda", dtype=torch.float16)  # 100 rows: padded to 112 for cuSPARSELt
    want = linear(x)
    torch.testing.assert_close(sparse._cusparselt_linear(x), want, atol=2e-2, rtol=1e-2)
    if torch.cuda.get_device_capability()[0] == 8:
        torch.testing.assert_close(sparse._cutlass_linear(x), want, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(sparse(x), want, atol=2e-2, rtol=1e-2)
    assert sparse._backends == {112: sparse._backends[112]}
    assert sparse._backends[112] in ("cusparselt", "cutlass")
    for n_tokens in (1, 8):  # decode sizes: our GEMV or cuSPARSELt, whichever measured faster, both right
        x = torch.randn(n_tokens, 2048, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(sparse._triton_linear(x), linear(x), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(sparse(x), linear(x), atol=2e-2, rtol=1e-2)
        assert sparse._backends[n_tokens] in ("triton", "cusparselt")
    # Decode only: when our GEMV wins, cuSPARSELt's copy of the weight, made to time it, is let go.
    decode_only = Sparse24Linear.from_linear(linear)
    decode_only(torch.randn(1, 2048, device="cuda", dtype=torch.float16))
    assert (decode_only._cslt_weight is None) == (decode_only._backends[1] == "triton")


def test_check_packable_names_the_module_before_any_work():
    from pruning.sparse24 import check_packable

    model = tiny("llama")
    check_packable(model)  # 64 and 96 input features: fine
    model.model.layers[0].mlp.down_proj = nn.Linear(100, 64)
    with pytest.raises(ValueError, match=r"mlp.down_proj \(in_features 100\): save with save_format dense"):
        check_packable(model)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_ordinary_loader_reads_a_sparse24_checkpoint_as_its_dense_model(family, tmp_path):
    """from_pretrained alone would find no `weight` for the compressed Linears and initialize them at random
    (a warning, then wrong results); load_model (the CLI's and `check`'s loader) gets back the exact model."""
    from pruning.cli.outputs import save_model_atomically
    from pruning.loading import load_model

    model = pruned(family)
    dense = copy.deepcopy(model)
    save_sparse(model, None, tmp_path / "sparse")
    loaded = load_model(str(tmp_path / "sparse"), dtype="float32")
    assert not any(isinstance(m, Sparse24Linear) for m in loaded.modules())
    for name, param in dense.named_parameters():
        assert torch.equal(loaded.get_parameter(name), param), name
    with pytest.raises(ValueError, match="without device_map;"):
        load_model(str(tmp_path / "sparse"), device_map="auto")
    # Saved again from there, it is a plain dense checkpoint (no stale sparse24 label).
    save_model_atomically(loaded, None, tmp_path / "dense", overwrite=False)
    assert "sparsity_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    reloaded = load_model(str(tmp_path / "dense"), dtype="float32")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, dense(ids).logits)


def test_out_of_memory_while_choosing_a_backend_is_not_a_missing_backend(monkeypatch):
    """A candidate that runs out of memory (or breaks the CUDA context) must not be dropped for good as if its
    kernel did not exist: the error goes up to the caller's out-of-memory handling."""
    linear = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        linear.weight[:, 1::2] = 0  # 2:4
    module = Sparse24Linear.from_linear(linear)

    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(module, "_triton_linear", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        module._pick_backend(torch.zeros(1, 16), ["triton"])

    def missing(x):
        raise NotImplementedError("no such kernel here")

    monkeypatch.setattr(module, "_triton_linear", missing)
    with pytest.warns(UserWarning, match="triton is unavailable"):
        assert module._pick_backend(torch.zeros(1, 16), ["triton"]) == "dense"
