"""The command line's RIA, DSnoT and channel-permutation flags, under our names and the published ones."""

from __future__ import annotations

import pytest

from tests.test_cli import assert_one_line_error, prune_argv, read_metrics, run_main, tiny_opt  # noqa: F401


def test_ria_with_permutation_dsnot_and_reconstruction_saves_a_sparse24_checkpoint(tiny_opt, tmp_path, capsys):  # noqa: F811
    from pruning.sparse24 import load_sparse

    save, model_dir = tmp_path / "out", tmp_path / "model"
    argv = prune_argv(
        tiny_opt, "--permute_channels", "--refine", "dsnot", "--dsnot_skip_layer", "no_skip", "--reconstruction",
        "--save", str(save), "--save_model", str(model_dir), "--save_format", "sparse24",
        method="ria", kind="2:4",
    )  # fmt: skip
    assert run_main(argv) == 0
    metrics = read_metrics(save)
    config = metrics["prune_config"]
    assert config["method"] == "ria" and config["permute_channels"] and config["refine"] == "dsnot"
    assert config["reconstruction"] and config["dsnot_update_threshold"] == 0.1 and config["ria_a"] == 0.5
    assert metrics["actual_sparsity"] == pytest.approx(0.5)
    loaded = load_sparse(model_dir)
    assert "model.decoder.layers.0.self_attn.q_proj" in loaded.config.sparsity_config["permuted_modules"]


def test_refit_runs_from_the_command_line_and_is_recorded(tiny_opt, tmp_path, capsys):  # noqa: F811
    argv = prune_argv(tiny_opt, "--refit", "--refit_iters", "4", "--save", str(tmp_path), method="sparsegpt")
    assert run_main(argv) == 0
    metrics = read_metrics(tmp_path)
    assert metrics["prune_config"]["refit"] and metrics["prune_config"]["refit_iters"] == 4
    assert metrics["actual_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_the_published_flag_names_are_accepted(tiny_opt, tmp_path, capsys):  # noqa: F811
    argv = prune_argv(
        tiny_opt, "--a", "0.4", "--reallocation", "--lsa", "--save", str(tmp_path), method="ria", kind="2:4"
    )
    assert run_main(argv) == 0
    config = read_metrics(tmp_path)["prune_config"]
    assert config["ria_a"] == 0.4 and config["permute_channels"] and config["lsa"]
    dsnot = tmp_path / "dsnot"
    argv = prune_argv(
        tiny_opt, "--refine", "dsnot", "--max_cycle_time", "10", "--update_threshold", "0.05", "--skip_layer",
        "self_attn", "--save", str(dsnot),
    )  # fmt: skip
    assert run_main(argv) == 0
    config = read_metrics(dsnot)["prune_config"]
    assert config["dsnot_max_cycles"] == 10 and config["dsnot_update_threshold"] == 0.05
    assert config["dsnot_skip_layer"] == "self_attn"


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--ria_a", "0.3"], ("--ria_a", "--prune_method ria")),
        (["--max_cycle_time", "5"], ("--dsnot_max_cycles", "--refine dsnot")),
        (["--permute_channels"], ("--permute_channels", "N:M")),
        (["--lsa"], ("--lsa", "--permute_channels")),
        (["--prune_method", "sparsegpt", "--reconstruction"], ("--reconstruction", "already updates")),
        (["--refit_iters", "5"], ("--refit_iters", "--refit")),
        (["--refit", "--refit_iters", "0"], ("--refit_iters", "positive integer")),
    ],
)
def test_flags_that_would_do_nothing_are_refused_in_one_line(tiny_opt, capsys, flags, fragments):  # noqa: F811
    assert_one_line_error(capsys, run_main([*prune_argv(tiny_opt), *flags]), *fragments)


def test_alps_and_admm_run_from_the_command_line_with_their_errors_in_the_metrics(tiny_opt, tmp_path, capsys):  # noqa: F811
    argv = prune_argv(tiny_opt, "--alps_max_iter", "30", "--save", str(tmp_path), method="alps", kind="2:4")
    assert run_main(argv) == 0
    metrics = read_metrics(tmp_path)
    assert metrics["prune_config"]["method"] == "alps" and metrics["prune_config"]["alps_max_iter"] == 30
    assert metrics["prune_config"]["alps_rho"] == 0.1  # the published default
    layer = metrics["prune"]["layers"][0]
    assert layer["error_kind"] == "hessian" and 0 < min(layer["errors"].values()) < 1
    admm = tmp_path / "admm"
    argv = prune_argv(tiny_opt, "--refine", "admm", "--admm_iters", "5", "--save", str(admm), kind="2:4")
    assert run_main(argv) == 0
    config = read_metrics(admm)["prune_config"]
    assert config["refine"] == "admm" and config["admm_iters"] == 5


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--alps_rho", "0.5"], ("--alps_rho", "--prune_method alps")),
        (["--admm_iters", "5"], ("--admm_iters", "--refine admm")),
        (["--refine", "admm", "--admm_iterative_prune", "3"], ("--admm_iterative_prune", "mask is given")),
        (["--prune_method", "admm", "--admm_iters", "0"], ("--admm_iters", "positive integer")),
        (["--prune_method", "alps", "--sparsity_type", "three_tier"], ("--refine admm",)),
        (["--refine", "admm", "--reconstruction"], ("--reconstruction", "choose one")),
    ],
)
def test_optimizer_flags_that_would_do_nothing_are_refused_in_one_line(tiny_opt, capsys, flags, fragments):  # noqa: F811
    assert_one_line_error(capsys, run_main([*prune_argv(tiny_opt), *flags]), *fragments)
