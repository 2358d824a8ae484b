"""The command line's help (groups, defaults, examples, every subcommand's own) and its dashed flag spellings."""

from __future__ import annotations

import pytest

from pruning.cli.parser import build_parser, parse_prune_args
from tests.test_cli import run_main


def test_help_is_grouped_with_defaults_and_examples(capsys):
    assert run_main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the help wraps to the terminal's width
    for heading in ("locuslab/wanda's flags", "data and evaluation", "placement and speed", "output and logging",
                    "tile pruning", "better masks and weight updates", "examples:"):  # fmt: skip
        assert heading in out, heading
    assert "(default: 128)" in out and "(default: 0.0)" in out and "(default: wikitext2)" in out
    assert "--prune_method alps" in out and "--config" in out and "--push_to_hub" in out


@pytest.mark.parametrize("subcommand, fragment", [("check", "--max_new_tokens"), ("report", "--layers")])
def test_every_subcommand_documents_its_flags(capsys, subcommand, fragment):
    assert run_main([subcommand, "--help"]) == 0
    out = capsys.readouterr().out
    assert fragment in out and "examples:" in out


def test_dashed_spellings_parse_as_the_underscore_flags():
    base = ["--model", "m", "--prune_method", "wanda"]
    dashed = parse_prune_args([*base, "--sparsity-ratio", "0.5", "--sparsity-type", "2:4", "--calib-dataset", "x"])
    plain = parse_prune_args([*base, "--sparsity_ratio", "0.5", "--sparsity_type", "2:4", "--calib_dataset", "x"])
    assert vars(dashed) == vars(plain)
    assert parse_prune_args(["--model", "m", "--prune-method", "sparsegpt"]).prune_method == "sparsegpt"
    help_text = build_parser().format_help()
    assert "--sparsity-ratio SPARSITY_RATIO" not in help_text  # one name per flag in the list
