"""scripts/profile_bundle.py on the test bundle: op-type shares that add up, and the reading of
a profile file on a crafted case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "profile_bundle.py"
sys.path.insert(0, str(SCRIPT.parent))

from profile_bundle import kernel_times  # noqa: E402  (scripts/ is not a package)


def test_kernel_times_sum_the_kernel_events(tmp_path: Path) -> None:
    def node(name: str, ts: int, dur: int, op: str) -> dict[str, object]:
        return {"cat": "Node", "name": name, "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # the warm-up
        node("/MatMul_1_kernel_time", 10, 500, "MatMul"),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        node("/MatMul_1_kernel_time", 210, 30, "MatMul"),
        node("/MatMul_2_kernel_time", 220, 10, "MatMul"),
        node("/Add_fence_before", 230, 99, "Add"),
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        node("/MatMul_1_kernel_time", 410, 5, "MatMul"),
        node("/Add_kernel_time", 420, 7, "Add"),
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    by_type, by_node = kernel_times(path, skip_runs=1)
    assert by_type == {"MatMul": 45, "Add": 7}
    assert by_node == {"/MatMul_1": 35, "/MatMul_2": 10, "/Add": 7}
    assert kernel_times(path)[0] == {"MatMul": 545, "Add": 7}


def table(lines: list[str], header: str) -> dict[str, float]:
    """The rows of the markdown table under `header`: name -> share in %."""
    start = lines.index(header) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("| ") or line == "| node | share |":
            break
        name, share = line.strip("| ").split(" | ")
        rows[name] = float(share.rstrip(" %"))
    return rows


def test_a_profile_of_the_test_bundle(exported: tuple[Path, Path]) -> None:
    cmd = [
        sys.executable,
        str(SCRIPT),
        str(exported[1]),
        "--batch",
        "8",
        "--k",
        "10",
        "--top",
        "100",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("kernel time per call: ")
    ops = table(lines, "| op type | share |")
    assert list(ops.values()) == sorted(ops.values(), reverse=True)
    # every op type is listed (--top 100): the shares add up to 100 %, each rounded to 0.1
    assert abs(sum(ops.values()) - 100) <= 0.05 * len(ops) + 1e-6
    assert {"MatMul", "TopK", "Softmax"} <= set(ops)  # the whole search runs inside the graph
    assert table(lines, "| node | share |")
