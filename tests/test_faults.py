"""Fault injection: a save interrupted at each of its steps, concurrent runs, stale staging, file modes, a capped
address space. What must hold: the target holds a complete old or new model (never a mix, never nothing), the
run ends with one line and the exit code of its cause, and nothing is left beside the target.

Interruptions are real signals (``signal.raise_signal``) sent at named steps of the save (``outputs._step``), so
the CLI's own handlers and the save's signal holding decide what happens, deterministically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import OPTConfig, OPTForCausalLM

from pruning.cli import durable, main, outputs
from pruning.cli.demo import ASSETS
from pruning.tokenizers import byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
BEFORE_SWAP = ("staged", "synced")
DURING_SWAP = ("moved_aside", "swapped", "cleaned")


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=260, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    OPTForCausalLM(config).save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def signals_not_ignored():
    """A shell's background job (`cmd &`, `nohup`) starts with SIGINT, SIGQUIT or SIGHUP ignored, and the CLI rightly
    keeps such a choice; these tests deliver those signals, so they run with the default dispositions."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGQUIT: signal.SIG_DFL}
    defaults[signal.SIGHUP] = signal.SIG_DFL
    previous = {sig: signal.getsignal(sig) for sig in defaults}
    for sig, handler in defaults.items():
        if previous[sig] == signal.SIG_IGN:
            signal.signal(sig, handler)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def argv(model: Path, target: Path, *extra: str, ratio: str = "0.5", kind: str = "unstructured") -> list[str]:
    return [
        "--model", str(model), "--prune_method", "magnitude", "--sparsity_ratio", ratio, "--sparsity_type", kind,
        "--eval_dataset", "none", "--save_model", str(target), *extra,
    ]  # fmt: skip


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p != target)


@pytest.fixture
def old_model(tiny_opt, tmp_path, capsys) -> Path:
    """A saved model at the target (25% magnitude), to be replaced with --overwrite."""
    target = tmp_path / "out" / "pruned"
    assert main(argv(tiny_opt, target, ratio="0.25")) == 0
    capsys.readouterr()
    return target


def interrupt_at(monkeypatch, step: str, sig: int) -> None:
    def at_step(name: str) -> None:
        if name == step:
            signal.raise_signal(sig)

    monkeypatch.setattr(outputs, "_step", at_step)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("step", BEFORE_SWAP + DURING_SWAP)
@pytest.mark.parametrize("save_format", ["dense", "sparse24"])
def test_an_interrupted_overwrite_leaves_the_old_model_or_the_new_one(
    step, sig, code, save_format, tiny_opt, old_model, capsys, monkeypatch
):
    old = weights(old_model)
    interrupt_at(monkeypatch, step, sig)
    extra = ("--overwrite", "--save_format", save_format)
    assert main(argv(tiny_opt, old_model, *extra, kind="2:4" if save_format == "sparse24" else "unstructured")) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and ("terminated" if sig == signal.SIGTERM else "interrupted") in err[0]
    assert beside(old_model) == []  # no .partial-*, .old-* or .lock
    now = weights(old_model)
    if step in BEFORE_SWAP:  # the old model, untouched
        assert now.keys() == old.keys() and all(torch.equal(now[k], old[k]) for k in old)
        assert "saved" not in err[0]
    else:  # held across the swap: the new model, complete, and said so
        assert now.keys() != old.keys() or any(not torch.equal(now[k], old[k]) for k in old)
        assert f"is saved: {old_model}" in err[0]
        assert (old_model / "config.json").is_file() and (old_model / "tokenizer.json").is_file()


@pytest.mark.parametrize("step", BEFORE_SWAP + ("swapped",))
def test_an_interrupted_first_save_leaves_nothing_or_the_new_model(step, tiny_opt, tmp_path, capsys, monkeypatch):
    target = tmp_path / "out" / "pruned"
    interrupt_at(monkeypatch, step, signal.SIGTERM)
    assert main(argv(tiny_opt, target)) == 143
    err = capsys.readouterr().err
    assert beside(target) == []
    if step in BEFORE_SWAP:
        assert not target.exists()
    else:
        assert weights(target) and f"is saved: {target}" in err


def test_a_second_run_into_a_locked_target_is_refused_at_once(tiny_opt, old_model, capsys):
    before = weights(old_model)
    with durable.target_locked(old_model):  # as a run in progress holds it
        assert main(argv(tiny_opt, old_model, "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being written by another run" in err[0]
    assert all(torch.equal(weights(old_model)[k], v) for k, v in before.items())
    assert beside(old_model) == []


def test_stale_staging_of_a_killed_run_is_cleared_by_the_next_run(tiny_opt, old_model, caplog):
    partial = old_model.with_name(f".{old_model.name}.partial-killed")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a model")
    old = old_model.with_name(f".{old_model.name}.old-killed")
    old.mkdir()
    assert main(argv(tiny_opt, old_model, "--overwrite")) == 0
    assert beside(old_model) == []
    assert "removed what a killed run left" in caplog.text and partial.name in caplog.text


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_swap_killed_between_its_renames_is_repaired(overwrite, tiny_opt, old_model, capsys, caplog):
    """A kill -9 between the two renames: the old model is aside, the new one complete beside it, the target
    missing. The next run puts the old model back, keeps the new one under a visible name, and replaces the target
    only with --overwrite."""
    old = weights(old_model)
    assert main(argv(tiny_opt, old_model.with_name("donor"), ratio="0.75")) == 0  # a complete new model
    aside = old_model.with_name(f".{old_model.name}.old-killed")
    old_model.rename(aside)
    new = old_model.with_name(f".{old_model.name}.partial-killed")
    old_model.with_name("donor").rename(new)
    capsys.readouterr()
    code = main(argv(tiny_opt, old_model, *(["--overwrite"] if overwrite else [])))
    kept = old_model.with_name(f"{old_model.name}.pruned-killed")
    assert beside(old_model) == [kept.name] and kept.is_dir() and (kept / "checksums.json").is_file()
    assert "put the previous model back" in caplog.text and "kept the complete new model" in caplog.text
    if overwrite:
        assert code == 0 and any(not torch.equal(weights(old_model)[k], v) for k, v in old.items())
    else:
        assert code == 2 and "pass --overwrite" in capsys.readouterr().err
        assert all(torch.equal(weights(old_model)[k], v) for k, v in old.items())


def test_stale_staging_of_another_target_is_not_touched(tiny_opt, tmp_path):
    target = tmp_path / "opt[12]"  # a glob pattern: it must not match .opt1.*
    other = [tmp_path / ".opt1.partial-x", tmp_path / ".opt1.old-x"]
    for path in other:
        path.mkdir()
    assert main(argv(tiny_opt, target)) == 0
    assert all(path.is_dir() for path in other)


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGQUIT"])
def test_a_dropped_terminal_during_the_swap_is_held_too(sig, tiny_opt, old_model):
    """SIGHUP (an ssh session gone) or SIGQUIT mid-swap: held, then delivered after it, so the process dies with
    the new model in place."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        os.environ["TRITON_INTERPRET"] = "1"
        from pruning.cli import main, outputs
        outputs._step = lambda name: signal.raise_signal(signal.{sig}) if name == "moved_aside" else None
        sys.exit(main({argv(tiny_opt, old_model, "--overwrite", ratio="0.75")!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == -getattr(signal, sig)  # the default action, once the swap is done
    assert beside(old_model) == [".pruned.lock"] or beside(old_model) == []  # the lock file dies with the process
    zeros = sum(int((w == 0).sum()) for k, w in weights(old_model).items() if "layers" in k and k.endswith("weight"))
    total = sum(w.numel() for k, w in weights(old_model).items() if "layers" in k and k.endswith("weight"))
    assert zeros / total > 0.7  # the new, 75% model


def test_a_filesystem_without_locks_still_saves(tiny_opt, tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    target = tmp_path / "pruned"
    assert main(argv(tiny_opt, target)) == 0
    assert beside(target) == [] and "cannot lock" in caplog.text


def test_a_failed_second_rename_keeps_both_models(tiny_opt, old_model, capsys, monkeypatch):
    old = weights(old_model)
    real_rename = Path.rename

    def rename(self, target):
        if ".partial-" in self.name and Path(target) == old_model:
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    assert main(argv(tiny_opt, old_model, "--overwrite", ratio="0.75")) == 2
    err = capsys.readouterr().err
    assert "the previous model is back, and the pruned model is in" in err
    assert all(torch.equal(weights(old_model)[k], v) for k, v in old.items())
    (kept,) = [p for p in old_model.parent.iterdir() if p.name.startswith(f"{old_model.name}.pruned-")]
    assert weights(kept).keys() == old.keys()


def test_a_symlinked_target_is_not_replaced_through_the_link(tiny_opt, old_model, capsys):
    link = old_model.with_name("link")
    link.symlink_to(old_model)
    assert main(argv(tiny_opt, link, "--overwrite")) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in old_model.parent.iterdir() if not p.name.startswith(("pruned", "link"))) == []


def test_saved_files_follow_the_umask(tiny_opt, tmp_path):
    previous = os.umask(0o027)
    try:
        target = tmp_path / "pruned"
        assert main(argv(tiny_opt, target)) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}
    assert target.stat().st_mode & 0o777 == 0o750


def test_a_save_is_flushed_before_it_is_published(tiny_opt, tmp_path, monkeypatch):
    """Every written file and the directories are fsynced, and the rename comes after."""
    events = []
    fsync = durable.fsync_path
    monkeypatch.setattr(durable, "fsync_path", lambda path: events.append(("fsync", Path(path).name)) or fsync(path))
    monkeypatch.setattr(outputs, "_step", lambda name: events.append(("step", name)))
    target = tmp_path / "pruned"
    assert main(argv(tiny_opt, target)) == 0
    synced = events.index(("step", "synced"))
    flushed = {name for kind, name in events[:synced] if kind == "fsync"}
    assert {p.name for p in target.iterdir()} <= flushed
    assert ("fsync", tmp_path.name) in events[synced:]  # the parent, after the rename


def test_a_calibration_that_cannot_fit_in_ram_is_one_line(tmp_path):
    """RLIMIT_AS caps the address space 1 GiB above what the loaded libraries take: the layer inputs and outputs of
    20000 calibration samples of a 1024-wide model (5 GB) cannot be kept. The plan says so before any work, in one
    line, exit 2."""
    model_dir = tmp_path / "wide-opt"
    config = OPTConfig(
        vocab_size=260, hidden_size=1024, word_embed_proj_dim=1024, ffn_dim=1024, num_hidden_layers=1,
        num_attention_heads=8, max_position_embeddings=64,
    )  # fmt: skip
    OPTForCausalLM(config).save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    run_argv = argv(model_dir, tmp_path / "pruned") + [
        "--prune_method", "wanda", "--nsamples", "20000", "--seqlen", "32",
        "--calib_dataset", str(ASSETS / "demo_calibration.txt"),
    ]  # fmt: skip
    script = textwrap.dedent(
        f"""
        import os, resource, sys
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, transformers, pruning.cli.prune  # what the run needs, loaded before the cap
        size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
        from pruning.cli import main
        sys.exit(main({run_argv!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WANDA_DEBUG", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and "not enough CPU memory" in errors[0] and "RLIMIT_AS" in errors[0], errors
    assert "--nsamples" in errors[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "pruned").exists() and beside(tmp_path / "pruned") == ["wide-opt"]


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate"
        ),
        MemoryError(),
    ],
)
def test_a_cpu_allocation_failure_is_one_line(failure, tiny_opt, tmp_path, capsys, monkeypatch):
    """What the estimate does not foresee (another process takes the memory meanwhile) still ends in one line."""
    from pruning import driver

    def out_of_ram(*args, **kwargs):
        raise failure

    monkeypatch.setattr(driver, "_prune_layers", out_of_ram)
    run_argv = argv(tiny_opt, tmp_path / "pruned")
    run_argv[run_argv.index("magnitude")] = "wanda"
    run_argv += ["--nsamples", "4", "--seqlen", "16", "--calib_dataset", str(ASSETS / "demo_calibration.txt")]
    assert main(run_argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: out of CPU memory (RAM)") and "--nsamples" in errors[0]
    assert not (tmp_path / "pruned").exists()


def test_a_genuine_runtime_error_is_not_called_out_of_memory(tiny_opt, tmp_path, monkeypatch):
    from pruning import driver

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(driver, "_prune_layers", broken)
    run_argv = argv(tiny_opt, tmp_path / "pruned")
    run_argv[run_argv.index("magnitude")] = "wanda"
    run_argv += ["--nsamples", "4", "--seqlen", "16", "--calib_dataset", str(ASSETS / "demo_calibration.txt")]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # a bug: its traceback is wanted
        main(run_argv)


# --- bad input found before any weight loads: one line, exit 2 -------------------------------------------------


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (("--device_map", "cuda:7"), "names a GPU"),
        (("--device_map", "cuda"), "names a GPU"),
        (("--device_map", "7"), "names a GPU"),
        (("--device_map", "tpu:0"), "--device_map 'tpu:0'"),
        (("--device_map", "auto", "--offload"), "pass one of the two"),
        (("--true_sequential",), "magnitude pruning has none"),
        (("--device", "auto"), "unrecognized arguments: --device"),
    ],
)
def test_devices_and_flags_are_checked_before_loading(extra, fragment, tiny_opt, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available() and "GPU" in fragment:
        pytest.skip("this machine has a GPU")
    from pruning import loading

    monkeypatch.setattr(loading, "load_config", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    try:
        code = main(argv(tiny_opt, tmp_path / "pruned", *extra))
    except SystemExit as exit_:  # argparse's own errors exit
        code = exit_.code
    assert code == 2
    assert fragment in one_error_line(capsys)
    assert not (tmp_path / "pruned").exists()


def test_misleading_inputs_get_messages_that_name_the_fix(tiny_opt, tmp_path, capsys):
    cases = [
        (["--model", str(tiny_opt / "config.json")], "it is a file; pass the directory that holds config.json"),
        (["--model", "~no_such_user_here/opt"], "--model '~no_such_user_here/opt'"),
    ]
    for model_flag, fragment in cases:
        run_argv = argv(tiny_opt, tmp_path / "pruned")
        run_argv[1] = model_flag[1]
        assert main(run_argv) == 2
        assert fragment in one_error_line(capsys)
    calibration = argv(tiny_opt, tmp_path / "pruned", "--calib_dataset", "/dev/zero", "--nsamples", "2")
    calibration[calibration.index("magnitude")] = "wanda"
    assert main(calibration) == 2
    assert "not a regular file" in one_error_line(capsys)


def test_a_malformed_config_value_is_one_line(tiny_opt, tmp_path, capsys):
    import json
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_opt, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["ffn_dim"] = "sixty-four"
    (model_dir / "config.json").write_text(json.dumps(config))
    assert main(argv(model_dir, tmp_path / "pruned")) == 2
    assert "config.json" in one_error_line(capsys)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (("--device_map", "disk"), "without weights to run"),
        (("--overwrite",), "none is given"),
        (("--zero_shot_include_path", "/tmp"), "which is not given"),
    ],
)
def test_flags_that_would_do_nothing_are_refused(extra, fragment, tiny_opt, tmp_path, capsys):
    run_argv = [a for a in argv(tiny_opt, tmp_path / "pruned") if a not in ("--save_model", str(tmp_path / "pruned"))]
    assert main([*run_argv, *extra]) == 2
    assert fragment in one_error_line(capsys)


def test_a_calibration_batch_larger_than_the_samples_is_not_counted_as_such(tiny_opt, tmp_path):
    run_argv = argv(tiny_opt, tmp_path / "pruned")
    run_argv[run_argv.index("magnitude")] = "wanda"
    run_argv += ["--nsamples", "4", "--seqlen", "16", "--calib_batch_size", "100000000",
                 "--calib_dataset", str(ASSETS / "demo_calibration.txt")]  # fmt: skip
    assert main(run_argv) == 0


def test_hessian_dominated_refusal_names_the_method(monkeypatch):
    from pruning import memory
    from pruning import plan as plan_module
    from pruning.cli.parser import flag

    monkeypatch.setattr(plan_module, "host_memory", lambda: memory.HostMemory(1 << 30, "MemAvailable"))
    with pytest.raises(ValueError) as caught:
        plan_module.check_host_memory(28 << 30, 1, 2, hessians=27 << 30)
    message = caught.value.spelled(flag)
    assert "SparseGPT's statistics" in message and "--prune_method wanda" in message and "--nsamples" not in message
