"""``wanda-prune report DIR``: every run of a --save directory in one table, from the metrics files runs write."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.test_cli import assert_one_line_error, prune_argv, read_metrics, run_main, tiny_opt  # noqa: F401


def test_report_tabulates_every_run_of_a_directory(tiny_opt, tmp_path, capsys):  # noqa: F811
    save = tmp_path / "sweep"
    for method, kind in (("wanda", "unstructured"), ("sparsegpt", "2:4")):
        assert run_main(prune_argv(tiny_opt, "--save", str(save), method=method, kind=kind)) == 0
    (save / "metrics_broken_x.json").write_text("{not json", encoding="utf-8")  # skipped with a warning
    capsys.readouterr()
    assert run_main(["report", str(save), "--layers"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("| model | method | sparsity | ppl |")
    rows = lines[2:4]
    files = sorted(save.glob("metrics_*_2*.json"), key=lambda path: path.stat().st_mtime_ns)  # oldest first
    assert files[0].name.startswith("metrics_wanda")
    for row, path in zip(rows, files, strict=True):
        metrics = json.loads(path.read_text())
        assert row.split(" | ")[-1].rstrip(" |") == path.name
        assert f"{metrics['ppl_test']:.4f}" in row and f"{metrics['actual_sparsity']:.4f}" in row
    assert "wanda unstructured at 0.5" in out and "sparsegpt 2:4 at 0.5" in out
    assert "hessian" in out and "norms" in out  # how each run's layer error was measured
    assert "layer  sparsity" in out and "mlp" not in out  # per-layer lines (OPT names: fc1, fc2)

    assert run_main(["report", str(save), "--csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["file"] for r in parsed] == [p.name for p in files]
    sparsegpt = next(r for r in parsed if r["method"].startswith("sparsegpt"))
    metrics = read_metrics_named(save, sparsegpt["file"])
    errors = [e for layer in metrics["prune"]["layers"] for e in layer["errors"].values()]
    assert float(sparsegpt["layer_error"]) == pytest.approx(sum(errors) / len(errors))


def read_metrics_named(save, name):
    return json.loads((save / name).read_text())


@pytest.mark.parametrize("setup, fragment", [("missing", "is not a directory"), ("empty", "no readable metrics")])
def test_report_of_nothing_is_one_line(tmp_path, capsys, setup, fragment):
    target = tmp_path / "out"
    if setup == "empty":
        target.mkdir()
    assert_one_line_error(capsys, run_main(["report", str(target)]), fragment)


def test_plot_draws_each_runs_layers_next_to_its_metrics(tiny_opt, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("matplotlib")
    save = tmp_path / "out"
    assert run_main(prune_argv(tiny_opt, "--save", str(save), "--plot", method="sparsegpt")) == 0
    (metrics,) = save.glob("metrics_*.json")
    png = metrics.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    png.unlink()
    assert run_main(["report", str(save), "--plot"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_or_save_is_one_line_before_any_work(tiny_opt, tmp_path, capsys, monkeypatch):  # noqa: F811
    import sys

    assert_one_line_error(capsys, run_main([*prune_argv(tiny_opt), "--plot"]), "--plot", "--save")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    argv = [*prune_argv(tiny_opt), "--plot", "--save", str(tmp_path / "s")]
    assert_one_line_error(capsys, run_main(argv), "matplotlib", "wanda-kernels[plot]")
    assert not (tmp_path / "s").exists()
