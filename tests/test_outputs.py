"""What --save writes when several runs (a job array) finish together: every row and every metrics file kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pruning.cli.outputs import LOG_COLUMNS, write_wanda_log

WRITER = """
import sys
from pathlib import Path
from pruning.cli.outputs import metrics_path, write_metrics, write_wanda_log
directory, worker = Path(sys.argv[1]), int(sys.argv[2])
for i in range(150):
    write_wanda_log(directory, "wanda", worker + i / 1000, 10.0)
    write_metrics(metrics_path(directory, "wanda", "2:4"), {"worker": worker, "i": i})
"""


def test_concurrent_runs_keep_every_row_and_metrics_file(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    workers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w)], cwd=repo, stderr=subprocess.PIPE)
        for w in (1, 2)
    ]
    for process in workers:
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    rows = (tmp_path / "log_wanda.txt").read_text().splitlines()
    assert rows[0].split("\t") == list(LOG_COLUMNS) and rows.count(rows[0]) == 1
    wanda_part = sorted("\t".join(row.split("\t")[:3]) for row in rows[1:])
    assert wanda_part == sorted(f"wanda\t{w + i / 1000:.4f}\t10.0000" for w in (1, 2) for i in range(150))
    assert all(len(row.split("\t")) == len(LOG_COLUMNS) for row in rows)
    assert len(list(tmp_path.glob("metrics_wanda_2-4_*.json"))) == 300
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_a_log_with_the_references_three_columns_gains_the_new_ones_in_place(tmp_path):
    """locuslab/wanda's layout (method, actual_sparsity, ppl_test) is widened, not mixed: its old rows get empty
    cells and keep their values; the new row fills every column."""
    log = tmp_path / "log_wanda.txt"
    log.write_text("method\tactual_sparsity\tppl_test\nwanda\t0.5000\t12.3456\n")
    write_wanda_log(tmp_path, "wanda", 0.25, 9.5, "unstructured", "facebook/opt-125m", "metrics_x.json")
    rows = [row.split("\t") for row in log.read_text().splitlines()]
    assert rows[0] == list(LOG_COLUMNS)
    assert rows[1] == ["wanda", "0.5000", "12.3456", "", "", "", ""]
    assert rows[2][:5] == ["wanda", "0.2500", "9.5000", "unstructured", "facebook/opt-125m"]
    assert rows[2][5].endswith("Z") and rows[2][6] == "metrics_x.json"
