"""scripts/bench_bundles.py on the test bundle: one row per configuration, and a bundle of
another catalogue is refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.service.test_reload import reversed_copy

SCRIPT = Path(__file__).parents[2] / "scripts" / "bench_bundles.py"


def bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *map(str, args), "--rounds", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_two_bundles_get_a_p50_each_and_a_ratio(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    copy = shutil.copytree(exported[1], tmp_path / "copy")
    done = bench(exported[1], copy, "--batches", "1,8", "--k", "1,10")
    assert done.returncode == 0, done.stderr
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows[0].startswith("| batch | k |")
    cells = [row.strip("| ").split(" | ") for row in rows[1:]]
    assert [(c[0], c[1]) for c in cells] == [("1", "1"), ("1", "10"), ("8", "1"), ("8", "10")]
    for c in cells:
        a, b, ratio = map(float, c[2:])
        assert min(a, b) > 0
        # of the unrounded p50s, printed to 2 decimals
        np.testing.assert_allclose(ratio, b / a, rtol=0.05, atol=0.01)


def test_bundles_of_other_catalogues_are_refused(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    other = reversed_copy(exported[1], tmp_path / "reversed", "other")
    done = bench(exported[1], other)
    assert done.returncode != 0
    assert "another catalogue" in done.stderr
