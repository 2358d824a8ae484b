"""The README's main-job command (`make demo` = `python -m pruning demo`) runs end to end offline."""

from __future__ import annotations

import re

from pruning.cli import main


def test_demo_runs_every_method_and_exports_24(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "NOT model quality" in out  # the random-weight disclaimer
    rows = re.findall(r"^(wanda|magnitude|sparsegpt)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, flags=re.M)
    assert [(m, t) for m, t, *_ in rows] == [
        ("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("sparsegpt", "unstructured"),
    ]  # fmt: skip
    for _, _, sparsity, dense_ppl, pruned_ppl in rows:
        assert abs(float(sparsity) - 0.5) < 1e-3
        # Random weights over a 260-token vocabulary: perplexity near the vocabulary size, dense or pruned.
        assert 150 < float(dense_ppl) < 400 and 150 < float(pruned_ppl) < 400
    assert "exactly 2 zeros per group of 4: True; reloaded with pruning.load_sparse and ran: True" in out


def test_demo_takes_no_arguments(capsys):
    assert main(["demo", "--fast"]) == 2
    assert "takes no arguments" in capsys.readouterr().err
