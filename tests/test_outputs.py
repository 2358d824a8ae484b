"""What --save writes when several runs (a job array) finish together: every row and every metrics file kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert rows[0] == "method\tactual_sparsity\tppl_test" and rows.count(rows[0]) == 1
    assert sorted(rows[1:]) == sorted(f"wanda\t{w + i / 1000:.4f}\t10.0000" for w in (1, 2) for i in range(150))
    assert len(list(tmp_path.glob("metrics_wanda_2-4_*.json"))) == 300
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
