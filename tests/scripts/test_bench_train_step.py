"""scripts/bench_train_step.py on the test run: both kinds of step are timed, and grouped
batches keep fewer history columns than random ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "bench_train_step.py"


def test_random_and_grouped_steps_are_timed(exported: tuple[Path, Path]) -> None:
    cmd = [sys.executable, str(SCRIPT), "--run", str(exported[0]), "--steps", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = dict(
        (m[1], (float(m[2]), float(m[3])))
        for m in re.finditer(r"^\| (random|grouped) \| ([\d.]+) \| ([\d.]+) \|$", done.stdout, re.M)
    )
    assert set(rows) == {"random", "grouped"}
    assert min(ms for ms, _ in rows.values()) > 0
    assert rows["grouped"][1] < rows["random"][1]
    assert re.search(r"random / grouped: [\d.]+x", done.stdout)


def test_more_steps_than_an_epoch_are_refused(exported: tuple[Path, Path]) -> None:
    cmd = [sys.executable, str(SCRIPT), "--run", str(exported[0]), "--steps", "100000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "exceeds" in done.stderr
