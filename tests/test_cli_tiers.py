"""The command line's tile pruning and OWL flags: the fork's own command runs, flags that would do nothing are
refused in one line, and the metrics file records the tiers and the layer allocation."""

from __future__ import annotations

import pytest

from tests.test_cli import assert_one_line_error, prune_argv, read_metrics, run_main, tiny_opt  # noqa: F401

# run_prune_llama2_7b_three_tier.sh's flags (the fork's shipped script), after the model and our offline data
FORK_THREE_TIER = [
    "--prune_method", "wanda", "--sparsity_type", "three_tier", "--block_size", "16", "--top_dense_ratio", "0.35",
    "--mid_2_4_ratio", "0.45", "--bottom_topk_ratio", "0.2", "--topk_per_block", "15",
]  # fmt: skip
FORK_HYBRID = [
    "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--sparsity_type", "hybrid_2_4", "--block_size", "16",
    "--topk_per_block", "10", "--top_blocks_ratio", "0.9", "--score_threshold", "0.8",
]  # fmt: skip


def _offline(model, *flags: str) -> list[str]:
    """Our offline data flags plus ``flags`` (later flags override prune_argv's own)."""
    return [*prune_argv(model, ratio="0.0"), *flags]


def test_the_forks_three_tier_command_runs_and_records_the_tiers(tiny_opt, tmp_path, capsys):  # noqa: F811
    save = tmp_path / "out"
    assert run_main(_offline(tiny_opt, *FORK_THREE_TIER, "--save", str(save))) == 0
    out = capsys.readouterr().out
    assert "tiles - dense:" in out and "sparsity sanity check" in out
    metrics = read_metrics(save)
    tiers = metrics["prune"]["tiers"]
    layers = metrics["prune"]["layers"]
    assert sum(tiers.values()) > 0 and all(layer["tiers"] for layer in layers)
    assert {k: sum(layer["tiers"][k] for layer in layers) for k in tiers} == tiers
    # Full 16x16 tiles of random weights (no ties): a 2:4 tile loses 128 weights, a top-k tile 256 - 15.
    pruned = tiers["2:4"] * 128 + tiers["topk"] * (256 - 15)
    assert metrics["actual_sparsity"] == pytest.approx(pruned / (sum(tiers.values()) * 256), abs=1e-9)
    assert (save / "log_wanda.txt").read_text().splitlines()[1].startswith("wanda\t")


def test_the_forks_hybrid_command_runs(tiny_opt, tmp_path, capsys):  # noqa: F811
    assert run_main(_offline(tiny_opt, *FORK_HYBRID, "--save", str(tmp_path))) == 0
    assert read_metrics(tmp_path)["prune"]["sparsity_type"] == "hybrid_2_4"


def test_balanced_and_owl_from_the_command_line(tiny_opt, tmp_path, capsys):  # noqa: F811
    assert run_main(_offline(tiny_opt, *FORK_THREE_TIER, "--tier_selection", "balanced", "--save", str(tmp_path))) == 0
    metrics = read_metrics(tmp_path)
    assert metrics["config"]["tier_selection"] == "balanced"
    assert metrics["prune_config"]["top_dense_ratio"] == 0.35 and metrics["prune_config"]["top_blocks_ratio"] == 0.6
    owl = tmp_path / "owl"
    argv = _offline(
        tiny_opt, "--sparsity_ratio", "0.6", "--allocation", "owl", "--owl_lambda", "0.05", "--save", str(owl)
    )
    assert run_main(argv) == 0
    assert "OWL layer sparsities" in capsys.readouterr().out
    layers = read_metrics(owl)["prune"]["layers"]
    assert sorted(layer["target_sparsity"] for layer in layers) == pytest.approx([0.55, 0.65])


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--block_size", "8"], ["--block_size applies to --sparsity_type three_tier or hybrid_2_4"]),
        (["--sparsity_type", "hybrid_2_4", "--top_dense_ratio", "0.3"], ["--top_dense_ratio", "three_tier"]),
        (["--sparsity_type", "three_tier", "--score_threshold", "0.7"], ["--score_threshold", "hybrid_2_4"]),
        (["--tier_selection", "balanced"], ["--tier_selection applies to --sparsity_type three_tier"]),
        (["--owl_lambda", "0.1"], ["--owl_lambda", "--allocation owl"]),
        (["--sparsity_type", "three_tier", "--block_size", "100"], ["--block_size must be an integer in [1, 64]"]),
        (["--sparsity_type", "three_tier", "--prune_method", "sparsegpt"], ["--prune_method wanda or magnitude"]),
        (["--allocation", "owl", "--sparsity_type", "2:4"], ["--allocation owl", "--sparsity_type unstructured"]),
        (["--allocation", "owl", "--owl_lambda", "0.4"], ["smaller --owl_lambda"]),
        (["--sparsity_type", "three_tier", "--tier_selection", "fast"], ["tier selection must be fork, balanced"]),
    ],
)
def test_tile_and_owl_flags_that_cannot_apply_are_one_line_errors(tiny_opt, capsys, flags, fragments):  # noqa: F811
    assert_one_line_error(capsys, run_main([*prune_argv(tiny_opt), *flags]), *fragments)
