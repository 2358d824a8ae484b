"""pruning.plan: every up-front check once per run, whoever runs it (prune_model or the CLI)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import pruning
from pruning import plan as plan_module
from pruning.cli import main
from pruning.cli.demo import ASSETS
from pruning.config import PruneConfig
from pruning.tokenizers import byte_level_tokenizer


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=260, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


def calibration_ids(nsamples: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(4, 260, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def counted(monkeypatch):
    """Calls of each up-front check, wherever it is called from."""
    calls = {"placeable": 0, "one_mask": 0, "backend": 0}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        plan_module, "check_layers_placeable", counting("placeable", plan_module.check_layers_placeable)
    )
    monkeypatch.setattr(
        plan_module, "check_one_mask_for_every_layer", counting("one_mask", plan_module.check_one_mask_for_every_layer)
    )
    monkeypatch.setattr(plan_module, "_backend_for", counting("backend", plan_module._backend_for))
    return calls


def test_prune_model_checks_each_thing_once(counted):
    pruning.prune_model(tiny_opt(), calibration_ids(), "wanda", 0.5, "2:4")
    # the backend is checked before loading and resolved for the layers' device after
    assert counted == {"placeable": 1, "one_mask": 1, "backend": 2}


def test_the_cli_checks_each_thing_once(counted, tmp_path):
    model_dir = tmp_path / "tiny-opt"
    tiny_opt().save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    argv = [
        "--model", str(model_dir), "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--nsamples", "4",
        "--seqlen", "16", "--calib_dataset", str(ASSETS / "demo_calibration.txt"), "--eval_dataset", "none",
    ]  # fmt: skip
    assert main(argv) == 0
    assert counted == {"placeable": 1, "one_mask": 1, "backend": 2}


def test_a_plan_is_made_once_and_used_as_made():
    model, ids = tiny_opt(), calibration_ids(nsamples=6)
    config = PruneConfig(method="wanda", sparsity_ratio=0.5, calib_batch_size=4)
    made = plan_module.plan(model, config, ids)
    assert (made.nsamples, made.seqlen, made.batch_size, made.backend, made.streamed) == (6, 16, 4, "torch", False)
    report = pruning.prune_model(model, ids, config, plan=made)
    assert report.calib_batch_size == 4 and abs(report.actual_sparsity - 0.5) < 1e-6
    with pytest.raises(ValueError, match="another PruneConfig"):
        pruning.prune_model(model, ids, dataclasses.replace(config, sparsity_ratio=0.25), plan=made)


def test_a_config_is_given_one_way():
    with pytest.raises(TypeError, match="either a PruneConfig or its fields"):
        pruning.prune_model(tiny_opt(), calibration_ids(), PruneConfig(), calib_batch_size=2)
    with pytest.raises(TypeError):
        PruneConfig(offload=True)  # no dead fields: the CLI's --offload is a loading option


def test_checks_fail_before_any_weight_changes():
    model = tiny_opt()
    model.model.decoder.layers[1].fc2 = torch.nn.Linear(66, 32)  # 66 is no multiple of 4
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="needs in_features divisible by 4"):
        pruning.prune_model(model, calibration_ids(), "wanda", 0.5, "2:4")
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # layer 0 is fine, but nothing was pruned


def test_memory_estimates_count_what_calibration_keeps_alive():
    """On the CPU: every sample's layer inputs and outputs (2 x T x hidden fp32 per sample) grow with nsamples;
    SparseGPT adds an fp32 [C, C] Hessian per input width (32 and 64 here) and the factorization's workspace."""
    model = tiny_opt()

    def host_bytes(method: str, nsamples: int) -> int:
        config = PruneConfig(method=method, calib_batch_size=2)
        made = plan_module.plan(model, config, calibration_ids(nsamples=nsamples))
        assert made.store.type == "cpu" and made.device_bytes == 0
        return made.host_bytes

    assert host_bytes("wanda", 10) - host_bytes("wanda", 6) == 4 * 2 * 16 * 32 * 4
    # per Linear group (q/k/v | out_proj | fc1 | fc2, inputs 32, 32, 32, 64): a fp32 norm per input feature, or a
    # fp32 Hessian, plus the factorization's two [64, 64] temporaries
    wanda_statistics = 4 * (32 + 32 + 32 + 64)
    sparsegpt_statistics = 4 * (3 * 32 * 32 + 64 * 64) + 2 * 4 * 64 * 64
    assert host_bytes("sparsegpt", 6) - host_bytes("wanda", 6) == sparsegpt_statistics - wanda_statistics
    assert plan_module.plan(model, PruneConfig(method="magnitude"), None).host_bytes == 0


def test_a_run_that_cannot_fit_on_the_gpu_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    with pytest.raises(ValueError) as caught:
        plan_module.check_device_memory(3 << 30, torch.device("cuda", 0), 128, 2048)
    from pruning.cli.parser import flag

    message = caught.value.spelled(flag)
    assert "about 3.0 GiB needed" in message and "1.0 GiB free" in message and "--offload" in message
    plan_module.check_device_memory(1 << 29, torch.device("cuda", 0), 128, 2048)  # fits: nothing raised


def test_a_run_that_cannot_fit_in_ram_is_refused(monkeypatch):
    from pruning import memory

    monkeypatch.setattr(plan_module, "host_memory", lambda: memory.HostMemory(1 << 16, "the cgroup's memory limit"))
    with pytest.raises(ValueError, match="not enough CPU memory.*the cgroup's memory limit.*nsamples"):
        plan_module.plan(tiny_opt(), PruneConfig(method="wanda"), calibration_ids(nsamples=64))


def test_a_plan_runs_only_on_what_it_was_made_for():
    model, ids = tiny_opt(), calibration_ids(nsamples=6)
    config = PruneConfig(method="wanda", calib_batch_size=2)
    made = plan_module.plan(model, config, ids)
    with pytest.raises(ValueError, match="another model"):
        pruning.prune_model(tiny_opt(), ids, config, plan=made)
    with pytest.raises(ValueError, match="calibration_ids of shape"):
        pruning.prune_model(model, calibration_ids(nsamples=6, seqlen=32), config, plan=made)
    config.sparsity_type = "2:4"  # edited after planning: the plan keeps the config it checked
    with pytest.raises(ValueError, match="another PruneConfig"):
        pruning.prune_model(model, ids, config, plan=made)
    assert all(not torch.any(p == 0) for n, p in model.named_parameters() if "layers" in n and n.endswith("weight"))


def test_option_errors_quote_the_values_they_show():
    for method in ("{0}", "{a.b}", "wan{da"):
        with pytest.raises(ValueError) as caught:
            PruneConfig(method=method)
        assert repr(method) in str(caught.value)


def test_the_cgroup_room_does_not_count_reclaimable_page_cache(tmp_path, monkeypatch):
    from pruning import memory

    (tmp_path / "max").write_text(str(16 << 30))
    (tmp_path / "current").write_text(str(7 << 30))
    (tmp_path / "stat").write_text(f"anon {1 << 30}\ninactive_file {6 << 30}\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "current"),
                                                  str(tmp_path / "stat"), "inactive_file"),))  # fmt: skip
    assert memory._cgroup_room() == 15 << 30
    (tmp_path / "max").write_text("max")
    assert memory._cgroup_room() is None
