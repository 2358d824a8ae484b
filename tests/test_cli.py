"""The command line: locuslab/wanda's flags, one-line errors (exit 2, no traceback), outputs that lose nothing.

Every model here is a tiny random OPT saved to a temporary directory with the byte-level tokenizer, and every
dataset is one of the local demo texts, so nothing touches the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning import cli, hub, loading
from pruning.cli.demo import ASSETS

CALIB = ASSETS / "demo_calibration.txt"
EVAL = ASSETS / "demo_eval.txt"
REPO = Path(__file__).resolve().parents[1]
MAX_POSITIONS = 128


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer OPT (hidden 32, ffn 64, 128 positions) with the 260-token byte-level tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    from pruning.tokenizers import byte_level_tokenizer

    directory = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=260,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    OPTForCausalLM(config).save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved GPT-2 config: a real Hugging Face model directory of an architecture without an adapter."""
    from transformers import GPT2Config

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2Config(
        vocab_size=260, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=2
    ).save_pretrained(directory)
    return directory


def read_metrics(save: Path) -> dict:
    """The one run's metrics file in a --save directory."""
    (path,) = save.glob("metrics_*.json")
    return json.loads(path.read_text())


def prune_argv(model: Path | str, *extra: str, method: str = "wanda", ratio: str = "0.5", kind: str = "unstructured"):
    """Wanda-style flags for a fast offline run: 4 calibration samples of 64 tokens from the demo texts."""
    return [
        "--model", str(model), "--prune_method", method, "--sparsity_ratio", ratio, "--sparsity_type", kind,
        "--nsamples", "4", "--seqlen", "64", "--calib_dataset", str(CALIB), "--eval_dataset", str(EVAL),
        *extra,
    ]  # fmt: skip


def run_main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:  # argparse exits on its own
        return exit_.code


def assert_one_line_error(capsys: pytest.CaptureFixture, code: int, *fragments: str) -> str:
    """Exit status 2, exactly one non-empty stderr line ``error: ...`` containing every fragment, no traceback."""
    err = capsys.readouterr().err
    # transformers' own progress bar while it loads weights is not ours to count
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: contents and modification time."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def decoder_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    from pruning.adapters import get_adapter

    return {
        f"{i}.{name}": module.weight.detach().clone()
        for i, layer in enumerate(get_adapter(model).layers(model))
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any long work


@pytest.mark.parametrize(
    ("case", "flags", "fragments"),
    [
        ("ratio_one", ["--sparsity_ratio", "1.0"], ["--sparsity_ratio", "[0, 1)", "1.0"]),
        ("ratio_negative", ["--sparsity_ratio", "-0.1"], ["--sparsity_ratio", "[0, 1)"]),
        ("nm_ratio", ["--sparsity_type", "2:4", "--sparsity_ratio", "0.6"], ["2:4", "--sparsity_ratio 0.5"]),
        ("nsamples_zero", ["--nsamples", "0"], ["--nsamples", "positive", "got 0"]),
        ("nsamples_negative", ["--nsamples", "-3"], ["--nsamples", "positive"]),
        ("seqlen_too_long", ["--seqlen", "512"], ["--seqlen 512", f"({MAX_POSITIONS})", f"--seqlen {MAX_POSITIONS}"]),
        ("calib_missing", ["--calib_dataset", "no/such/calibration.txt"], ["--calib_dataset", "no such file"]),
        ("eval_missing", ["--eval_dataset", "no/such/eval.txt"], ["--eval_dataset", "no such file"]),
        ("method_unknown", ["--prune_method", "obs"], ["--prune_method", "invalid choice", "wanda"]),
        ("sparsity_type_bad", ["--sparsity_type", "2-4"], ["sparsity_type", "2:4"]),
        ("sparse24_not_24", ["--save_format", "sparse24", "--save_model", "unused"], ["--save_format sparse24", "2:4"]),
    ],
)
def test_bad_flag_values(tiny_opt, capsys, case, flags, fragments):
    code = run_main([*prune_argv(tiny_opt), *flags])  # later flags override the defaults in prune_argv
    assert_one_line_error(capsys, code, *fragments)


def test_missing_local_model(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code = run_main(prune_argv(missing))
    assert_one_line_error(capsys, code, str(missing), "no such directory", "save_pretrained")


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert_one_line_error(capsys, run_main(prune_argv(tmp_path)), "no config.json", "save_pretrained")


def test_unknown_hub_id_offline_fails_fast(tmp_path, capsys, monkeypatch):
    """The Hub does not answer: loading goes straight to the cache (local_files_only), no HTTP retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "answers", lambda: False)
    started = time.perf_counter()
    code = run_main(prune_argv("facebook/opt-does-not-exist", "--cache_dir", str(tmp_path / "cache")))
    assert time.perf_counter() - started < 20
    line = assert_one_line_error(capsys, code, "'facebook/opt-does-not-exist'", "--cache_dir", "--model")
    assert "unreachable" in line or "offline" in line


def test_unsupported_architecture_lists_supported_types(gpt2_dir, capsys):
    line = assert_one_line_error(capsys, run_main(prune_argv(gpt2_dir)), "unsupported architecture 'gpt2'")
    for model_type in ("opt", "llama"):
        assert model_type in line


def test_layers_with_different_attention_masks_fail_before_loading(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model(
        "qwen2", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        use_sliding_window=True, sliding_window=8, max_window_layers=1,
    ).save_pretrained(tmp_path)  # fmt: skip
    assert_one_line_error(capsys, run_main(prune_argv(tmp_path)), "mixes attention types", "use_sliding_window")


def test_unwritable_save_dir(tiny_opt, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    code = run_main(prune_argv(tiny_opt, "--save", str(a_file / "results")))
    assert_one_line_error(capsys, code, "--save", str(a_file / "results"), "writable")
    assert a_file.read_text() == "keep me"


def test_existing_save_model_dir_is_refused_and_untouched(tiny_opt, tmp_path, capsys):
    existing = tmp_path / "pruned"
    existing.mkdir()
    (existing / "config.json").write_text('{"earlier": "run"}')
    (existing / "model.safetensors").write_bytes(b"weights of an earlier run")
    before = snapshot(existing)
    code = run_main(prune_argv(tiny_opt, "--save_model", str(existing)))
    assert_one_line_error(capsys, code, "--save_model", "already exists", "--overwrite")
    assert snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_save_model_never_replaces_the_model_or_the_save_dir(tiny_opt, tmp_path, capsys):
    before = snapshot(tiny_opt)
    code = run_main(prune_argv(tiny_opt, "--save_model", str(tiny_opt), "--overwrite"))
    assert_one_line_error(capsys, code, "--save_model", "model being pruned")
    assert snapshot(tiny_opt) == before
    out = tmp_path / "out"
    code = run_main(prune_argv(tiny_opt, "--save", str(out / "logs"), "--save_model", str(out), "--overwrite"))
    assert_one_line_error(capsys, code, "--save", "inside --save_model")


def test_zero_shot_without_lm_eval_fails_before_loading(tiny_opt, tmp_path, capsys, monkeypatch):
    """The lm-eval check runs up front: no model is loaded, and earlier results stay as they were."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, installed or not

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --eval_zero_shot was validated")

    monkeypatch.setattr(loading, "load_config", must_not_load)
    save = tmp_path / "results"
    save.mkdir()
    (save / "log_wanda.txt").write_text("method\tactual_sparsity\tppl_test\nwanda\t0.5000\t12.3456\n")
    before = snapshot(save)
    code = run_main(prune_argv(tiny_opt, "--eval_zero_shot", "--save", str(save)))
    assert_one_line_error(capsys, code, "--eval_zero_shot", "pip install -e '.[eval]'")
    assert snapshot(save) == before


def test_hub_eval_dataset_offline_fails_before_loading_the_model(tiny_opt, capsys, monkeypatch):
    """The default --eval_dataset wikitext2 without network: a clear error before pruning, not after."""

    monkeypatch.setattr(hub, "datasets_offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the evaluation data")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    argv = prune_argv(tiny_opt, "--eval_dataset", "wikitext2", method="magnitude")
    assert_one_line_error(capsys, run_main(argv), "--eval_dataset", "wikitext2", "local text file")


def test_subprocess_error_has_no_traceback(tmp_path):
    """As a user sees it: ``python -m pruning`` with an unknown hub id offline, one line, exit 2, in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDA_DEBUG", None)
    started = time.perf_counter()
    argv = prune_argv("facebook/opt-does-not-exist", "--cache_dir", str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pruning", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert time.perf_counter() - started < 60
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot load model 'facebook/opt-does-not-exist'")
    assert "offline" in lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# a full run and its outputs


def test_full_run_writes_wanda_log_metrics_and_a_reloadable_2_4_model(tiny_opt, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning.cli import outputs
    from pruning.tokenizers import byte_level_tokenizer

    pruned_in_memory = {}
    save_model = outputs.save_model_atomically

    def capture_then_save(model, tokenizer, target, overwrite, *args, **kwargs):
        pruned_in_memory.update(decoder_linears(model))
        return save_model(model, tokenizer, target, overwrite, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_model_atomically", capture_then_save)
    save, save_model_dir = tmp_path / "results", tmp_path / "models" / "opt-2-4"
    argv = prune_argv(tiny_opt, "--save", str(save), "--save_model", str(save_model_dir), "--eval_dense", kind="2:4")
    assert cli.main(argv) == 0

    lines = (save / "log_wanda.txt").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["method", "actual_sparsity", "ppl_test"]
    assert len(lines) == 2
    method, actual, ppl, kind, model, stamp, metrics_file = lines[1].split("\t")
    assert (method, actual, kind, model) == ("wanda", "0.5000", "2:4", str(tiny_opt))
    assert stamp.endswith("Z") and (save / metrics_file).is_file()

    metrics = read_metrics(save)
    assert metrics["config"]["model"] == str(tiny_opt)
    assert metrics["config"]["sparsity_type"] == "2:4"
    assert metrics["config"]["prune_method"] == "wanda"
    assert metrics["versions"]["torch"] == torch.__version__
    assert metrics["versions"]["transformers"]
    assert float(ppl) == pytest.approx(metrics["ppl_test"], abs=1e-4)
    assert 1 < metrics["ppl_test"] < float("inf") and 1 < metrics["ppl_dense"] < float("inf")
    report = metrics["prune"]
    assert (report["method"], report["sparsity_type"], report["nsamples"], report["seqlen"]) == ("wanda", "2:4", 4, 64)
    assert [layer["index"] for layer in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert layer["sparsity"] == 0.5 and layer["seconds"] >= 0
    assert metrics["actual_sparsity"] == 0.5

    reloaded = AutoModelForCausalLM.from_pretrained(save_model_dir)
    weights = decoder_linears(reloaded)
    assert weights.keys() == pruned_in_memory.keys() and len(weights) == 12
    for name, weight in weights.items():
        assert torch.equal(weight, pruned_in_memory[name]), name
        zeros_per_group = (weight.reshape(-1, 4) == 0).sum(dim=1)
        assert torch.equal(zeros_per_group, torch.full_like(zeros_per_group, 2)), name  # exactly 2:4
    tokenizer = AutoTokenizer.from_pretrained(save_model_dir)
    text = "Pruning keeps half of every four weights."
    assert tokenizer(text).input_ids == byte_level_tokenizer()(text).input_ids
    assert not [p.name for p in save_model_dir.parent.iterdir() if p.name != save_model_dir.name]
    assert (save_model_dir.stat().st_mode & 0o777) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_overwrite_replaces_the_model_and_leaves_no_staging(tiny_opt, tmp_path):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "pruned"
    assert cli.main(prune_argv(tiny_opt, "--save_model", str(target), kind="2:4")) == 0
    first = decoder_linears(AutoModelForCausalLM.from_pretrained(target))
    (target / "stale-file.txt").write_text("from the replaced directory")
    argv = prune_argv(tiny_opt, "--save_model", str(target), "--overwrite", method="magnitude", ratio="0.25")
    assert cli.main(argv) == 0
    second = decoder_linears(AutoModelForCausalLM.from_pretrained(target))
    assert not (target / "stale-file.txt").exists()
    assert any(not torch.equal(first[name], second[name]) for name in first)
    zeros = sum(int((w == 0).sum()) for w in second.values())
    assert zeros / sum(w.numel() for w in second.values()) == pytest.approx(0.25, abs=0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no .partial-* / .old-* left behind


def test_console_script_with_the_seed_guide_flags(tiny_opt, tmp_path):
    """``wanda-prune --model DIR --prune_method magnitude --sparsity_ratio 0.5 --sparsity_type unstructured
    --save out/`` (plus a local eval text: this machine is offline)."""
    script = Path(sys.executable).with_name("wanda-prune")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    argv = [
        "--model", str(tiny_opt), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
        "--sparsity_type", "unstructured", "--save", "out/", "--eval_dataset", str(EVAL), "--seqlen", "64",
    ]  # fmt: skip
    result = subprocess.run([str(script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sparsity sanity check 0.50" in result.stdout  # magnitude prunes ties at the threshold: 0.5007
    lines = (tmp_path / "out" / "log_magnitude.txt").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["method", "actual_sparsity", "ppl_test"]
    assert lines[1].startswith("magnitude\t0.50")
    assert read_metrics(tmp_path / "out")["prune"]["method"] == "magnitude"


# ----------------------------------------------------------------------------------------------------------------------
# wanda-prune check


def test_check_shows_the_model_and_generates(tiny_opt, capsys):
    assert cli.main(["check", str(tiny_opt), "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "architecture opt (OPT adapter)" in out
    assert "model.decoder.layers" in out
    assert "2 decoder layers" in out
    for name, shape in [("q_proj", "32 x 32"), ("out_proj", "32 x 32"), ("fc1", "64 x 32"), ("fc2", "32 x 64")]:
        assert any(name in line and shape in line for line in out.splitlines()), (name, shape)
    assert "generation   'The capital of France is" in out
    assert "ready to prune" in out and "PROBLEM" not in out


def test_check_reports_decoder_linear_sparsity_and_the_nm_pattern(tiny_opt, tmp_path, capsys):
    """Zeros over the decoder layers' Linears (not every parameter: the embeddings would dominate) and the N:M
    patterns every such weight holds, for a dense model, a 2:4 model and a 50% unstructured one."""
    assert cli.main(["check", str(tiny_opt), "--max_new_tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "decoder layers: model.decoder.layers" in out and "model.model." not in out
    assert "0.00% exact zeros in the 12 decoder-layer Linears; no N:M pattern" in out
    for kind, expected in (("2:4", "N:M held by every one: 2:4, 4:8"), ("unstructured", "no N:M pattern")):
        target = tmp_path / kind.replace(":", "-")
        argv = prune_argv(tiny_opt, "--save_model", str(target), "--eval_dataset", "none", kind=kind)
        assert run_main(argv) == 0
        capsys.readouterr()
        assert cli.main(["check", str(target), "--max_new_tokens", "1"]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sparsity"))
        assert "50.00% exact zeros in the 12 decoder-layer Linears" in line and expected in line, line


def test_log_file_quiet_and_verbose(tiny_opt, tmp_path, capsys):
    """--log_file gets every message of the run (the per-layer lines too), -q keeps only warnings, -v adds debug;
    the levels are restored afterwards. A --log_file that cannot be opened is one line, before any work."""
    import logging

    log_file = tmp_path / "run.log"
    before = logging.getLogger().level
    assert run_main(prune_argv(tiny_opt, "--log_file", str(log_file), "-q")) == 0
    text = log_file.read_text()
    assert "layer 0:" not in text  # INFO: hidden by -q, in the file too
    assert logging.getLogger().level == before
    assert run_main(prune_argv(tiny_opt, "--log_file", str(log_file), "-v")) == 0
    text = log_file.read_text()
    assert "layer 0:" in text and "layer 1:" in text and " INFO: " in text
    assert logging.getLogger().level == before and not any(
        getattr(h, "baseFilename", None) == str(log_file) for h in logging.getLogger().handlers
    )
    capsys.readouterr()
    code = run_main(prune_argv(tiny_opt, "--log_file", str(tmp_path / "missing" / "run.log")))
    assert_one_line_error(capsys, code, "--log_file", "No such file or directory")


def test_a_run_ends_with_a_rounded_summary_of_what_it_did(tiny_opt, tmp_path, capsys):
    assert run_main(prune_argv(tiny_opt, "--save", str(tmp_path), "--refit", kind="2:4")) == 0
    out = capsys.readouterr().out
    summary = out[out.index("\nsummary\n") + 1 :].splitlines()
    metrics = read_metrics(tmp_path)
    fields = dict(line.split(None, 1) for line in summary[1:])
    assert fields["model"] == str(tiny_opt) and fields["method"] == "wanda 2:4 at 0.5 + refit"
    assert fields["sparsity"].startswith(f"{metrics['actual_sparsity']:.4f} ")
    assert fields["perplexity"] == f"{metrics['ppl_test']:.4f}"
    assert str(next(tmp_path.glob("metrics_*.json"))) in fields["written"]
    assert f"perplexity {metrics['ppl_test']:.4f}\n" in out  # rounded for people; full precision in the JSON


def test_zero_shot_results_print_per_task_and_their_mean():
    from pruning.cli.summary import zero_shot_line

    results = {"boolq": {"acc,none": 0.625, "acc_stderr,none": 0.01}, "rte": {"acc,none": 0.5}}
    assert zero_shot_line(results) == "boolq 0.6250, rte 0.5000; mean 0.5625"
    assert zero_shot_line({}) == "{}"


def test_a_bare_command_prints_the_help_and_version_names_the_commit(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: wanda-prune") and "--prune_method" in out and "--version" in out
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"wanda-prune \S+( \(git [0-9a-f]+\))?\n", capsys.readouterr().out)


def test_check_reports_nan_weights(tiny_opt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_opt)
    model.model.decoder.layers[1].fc1.weight.data[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_opt).save_pretrained(tmp_path)
    assert cli.main(["check", str(tmp_path), "--max_new_tokens", "2"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "layers.1.fc1.weight has NaN/inf" in out
    assert "ready to prune" not in out


def test_check_of_a_missing_model_is_one_line(tmp_path, capsys):
    assert_one_line_error(capsys, cli.main(["check", str(tmp_path / "nope")]), "no such directory")


def test_save_format_sparse24_round_trips_through_load_sparse(tiny_opt, tmp_path):
    from safetensors import safe_open

    from pruning import load_sparse
    from pruning.sparse24 import Sparse24Linear

    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    common = ("--eval_dataset", "none", "--seed", "3")
    assert cli.main(prune_argv(tiny_opt, *common, "--save_model", str(dense_dir), kind="2:4")) == 0
    argv = prune_argv(tiny_opt, *common, "--save_model", str(sparse_dir), "--save_format", "sparse24", kind="2:4")
    assert cli.main(argv) == 0

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    sparse = load_sparse(sparse_dir)
    modules = sparse.config.sparsity_config["modules"]
    assert len(modules) == 12
    for name in modules:
        module = sparse.get_submodule(name)
        assert isinstance(module, Sparse24Linear)
        assert torch.equal(module.to_dense(), dense.get_submodule(name).weight), name
    with safe_open(str(sparse_dir / "model.safetensors"), "pt") as f:
        assert f"{modules[0]}.values" in set(f.keys()) and f"{modules[0]}.weight" not in set(f.keys())
    assert (sparse_dir / "tokenizer.json").exists()

    # Given back to --model: with --device_map, one line naming the fix; without, it prunes as its dense model.
    again = ("--eval_dataset", "none", "--save", str(tmp_path / "again"))
    assert run_main(prune_argv(sparse_dir, *again, "--device_map", "auto", kind="2:4")) == 2
    assert cli.main(prune_argv(sparse_dir, *again, "--save_model", str(tmp_path / "again_model"), kind="2:4")) == 0
    # Pruning 2:4 weights 2:4 again keeps them (the zeros score lowest): the loaded weights were the saved ones,
    # not the random initialization from_pretrained alone would have given the compressed Linears.
    again_model = AutoModelForCausalLM.from_pretrained(tmp_path / "again_model")
    for name in modules:
        assert torch.equal(again_model.get_submodule(name).weight, dense.get_submodule(name).weight), name


def test_device_map_auto_runs(tiny_opt, tmp_path, monkeypatch):
    """--device_map reaches from_pretrained (accelerate's placement; all on the CPU here) and prunes as usual."""
    import transformers

    placements = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        placements.append(kwargs.get("device_map"))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    save = tmp_path / "out"
    argv = prune_argv(tiny_opt, "--device_map", "auto", "--save", str(save), "--eval_dataset", "none", kind="4:8")
    assert cli.main(argv) == 0
    assert placements == ["auto"]  # handed to from_pretrained, i.e. to accelerate
    metrics = read_metrics(save)
    assert metrics["config"]["device_map"] == "auto" and metrics["actual_sparsity"] == 0.5


# ----------------------------------------------------------------------------------------------------------------------
# What a user trips on: defaults, broken model directories, repeated runs, dangerous output paths, signals


def test_the_default_sparsity_ratio_0_evaluates_the_dense_model(tiny_opt, tmp_path, capsys):
    """As locuslab/wanda (``if args.sparsity_ratio != 0``): nothing is pruned, no calibration data is needed."""
    argv = prune_argv(tiny_opt, "--save", str(tmp_path), ratio="0")
    argv[argv.index("--calib_dataset") + 1] = str(tmp_path / "never-read.txt")
    assert run_main(argv) == 0
    assert "sparsity sanity check 0.0000" in capsys.readouterr().out
    assert read_metrics(tmp_path)["actual_sparsity"] == 0.0


def test_a_model_directory_without_tokenizer_files(tiny_opt, tmp_path, capsys):
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_opt / name).read_bytes())
    code = run_main(prune_argv(bare))
    assert_one_line_error(capsys, code, "cannot load the tokenizer", "tokenizer files")


@pytest.mark.parametrize("damage", ["truncated", "other-shapes"])
def test_a_damaged_checkpoint_is_one_line(damage, tiny_opt, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_opt.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    if damage == "truncated":  # an interrupted download
        weights = (tiny_opt / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    else:  # config.json says one size, the weights hold another
        config = json.loads((tiny_opt / "config.json").read_text())
        config["ffn_dim"] = 48
        (broken / "config.json").write_text(json.dumps(config))
    code = run_main(prune_argv(broken))
    err = capsys.readouterr().err  # transformers prints its loading progress and report before the error
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("error: "), err
    assert f"cannot load model {str(broken)!r}" in last and "fetch or save it again" in last


def test_runs_into_one_save_directory_keep_every_result(tiny_opt, tmp_path):
    """The README's baselines all write to one --save: each run adds its log row and its own metrics file."""
    save = tmp_path / "out"
    for method, ratio in (("magnitude", "0.5"), ("wanda", "0.5"), ("wanda", "0.25")):
        assert run_main(prune_argv(tiny_opt, "--save", str(save), method=method, ratio=ratio)) == 0
    wanda_rows = (save / "log_wanda.txt").read_text().splitlines()
    assert wanda_rows[0].split("\t")[:3] == ["method", "actual_sparsity", "ppl_test"] and len(wanda_rows) == 3
    assert [row.split("\t")[1] for row in wanda_rows[1:]] == ["0.5000", "0.2500"]
    runs = [json.loads(p.read_text()) for p in sorted(save.glob("metrics_*.json"))]
    assert sorted((r["prune"]["method"], r["prune"]["sparsity_ratio"]) for r in runs) == [
        ("magnitude", 0.5), ("wanda", 0.25), ("wanda", 0.5),
    ]  # fmt: skip


@pytest.mark.parametrize("problem", ["unknown task", "missing include path"])
def test_zero_shot_tasks_are_checked_before_loading(problem, tiny_opt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the zero-shot tasks were checked")

    monkeypatch.setattr(loading, "load_config", must_not_load)
    if problem == "unknown task":
        extra, fragment = ("--zero_shot_tasks", "boolq, no_such_task,arc_e*"), "no task 'no_such_task', 'arc_e*'"
    else:
        extra, fragment = ("--zero_shot_include_path", str(tmp_path / "absent")), "no such directory"
    code = run_main(prune_argv(tiny_opt, "--eval_zero_shot", *extra))
    assert_one_line_error(capsys, code, fragment)


def test_overwrite_replaces_only_a_model_directory(tiny_opt, tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "notes" / "thesis.tex").write_text("months of work")
    (project / "calib.txt").write_text(CALIB.read_text())
    before = snapshot(project)
    code = run_main(prune_argv(tiny_opt, "--save_model", str(project), "--overwrite"))
    assert_one_line_error(capsys, code, "holds no saved model", "choose a new directory")
    assert snapshot(project) == before
    # A dataset inside the directory the saved model replaces: refused too, even when it is a model directory.
    (project / "config.json").write_text("{}")
    argv = prune_argv(tiny_opt, "--save_model", str(project), "--overwrite")
    argv[argv.index("--calib_dataset") + 1] = str(project / "calib.txt")
    assert_one_line_error(capsys, run_main(argv), "--calib_dataset", "keep the data elsewhere")
    # The current directory cannot be renamed away.
    monkeypatch.chdir(project)
    code = run_main(prune_argv(tiny_opt, "--save_model", ".", "--overwrite"))
    assert_one_line_error(capsys, code, "current directory")


@pytest.mark.parametrize("flags", [("--save", ""), ("--save_model", ""), ("--eval_dense", "--eval_dataset", "none")])
def test_flags_that_would_be_silently_ignored(flags, tiny_opt, capsys):
    assert_one_line_error(capsys, run_main(prune_argv(tiny_opt, *flags)), flags[0])


def test_sigterm_while_saving_leaves_no_partial_model(tiny_opt, tmp_path, capsys, monkeypatch):
    """A scheduler's time limit sends SIGTERM: the staging directory is removed as on Ctrl-C."""
    import signal

    from transformers import PreTrainedModel

    def terminated_mid_write(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the save")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", terminated_mid_write)
    before = signal.getsignal(signal.SIGTERM)
    code = run_main(prune_argv(tiny_opt, "--save_model", str(tmp_path / "pruned"), "--eval_dataset", "none"))
    assert code == 143 and "error: terminated (SIGTERM)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the model nor its staging directory
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI's handler is gone again


def test_layers_device_map_left_off_the_gpus_fail_right_after_loading(tiny_opt, capsys, monkeypatch):
    real_load = loading.load_model

    def load_with_a_layer_on_meta(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.model.decoder.layers[1].to("meta")  # what accelerate leaves for a CPU- or disk-offloaded layer
        return model

    monkeypatch.setattr(loading, "load_model", load_with_a_layer_on_meta)
    code = run_main(prune_argv(tiny_opt, "--device_map", "auto", "--eval_dataset", "none"))
    assert_one_line_error(capsys, code, "left some decoder layers off the GPUs", "--offload")


def test_ctrl_c_while_saving_leaves_no_partial_model(tiny_opt, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def interrupted_mid_write(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted_mid_write)
    code = run_main(prune_argv(tiny_opt, "--save_model", str(tmp_path / "pruned"), "--eval_dataset", "none"))
    assert code == 130 and "error: interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
