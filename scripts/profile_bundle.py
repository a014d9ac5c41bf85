"""Where ONNX Runtime spends a recommendation: its profiler over `recommender.onnx`, summed by
op type and by node (docs/BENCHMARKS.md).

    python scripts/profile_bundle.py runs/bundles/b [--batch 64] [--k 100] [--calls 6]
        [--threads 1] [--top 14]

Histories are the first `batch` validation histories of the bundle's dataset, cut to the
longest and with seen items excluded, as the service calls it. Prints the kernel time of one
call, then the share of each op type and of the heaviest nodes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnxruntime as ort

from service.bundle import Bundle, session_options
from training.data import leave_one_out, load_dataset, trim_padding

SUFFIX = "_kernel_time"


def kernel_times(profile: Path, skip_runs: int = 0) -> tuple[Counter[str], Counter[str]]:
    """Microseconds by op type and by node name, from an ONNX Runtime profile file, leaving out
    the kernels of the first `skip_runs` runs (a warm-up that pays for ORT's lazy set-up)."""
    events = json.loads(profile.read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    after = runs[skip_runs - 1] if skip_runs else -1
    by_type: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith(SUFFIX) and event["ts"] > after:
            by_type[event["args"]["op_name"]] += event["dur"]
            by_node[event["name"][: -len(SUFFIX)]] += event["dur"]
    return by_type, by_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--calls", type=int, default=6, help="Profiled calls (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--top", type=int, default=14, help="Op types and nodes listed")
    args = parser.parse_args()
    bundle = Bundle(args.bundle, intra_op_threads=args.threads)
    dataset = load_dataset(Path(bundle.manifest["dataset"]["path"]))
    h = trim_padding(leave_one_out(dataset, bundle.max_history).valid.histories[: args.batch])
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(args.threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        bundle.recommender = ort.InferenceSession(
            str(args.bundle / bundle.manifest["recommender"]["file"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        for _ in range(1 + args.calls):  # the first is the warm-up, left out below
            bundle.recommend(h, args.k, h)
        profile = Path(bundle.recommender.end_profiling())
        by_type, by_node = kernel_times(profile, skip_runs=1)
    total = sum(by_type.values())
    print(f"batch {len(h)}, k {args.k}, {args.threads} thread(s), {args.calls} calls")
    print(f"kernel time per call: {total / args.calls / 1000:.2f} ms")
    print("| op type | share |\n|---|---|")
    for op, us in by_type.most_common(args.top):
        print(f"| {op} | {100 * us / total:.1f} % |")
    print("| node | share |\n|---|---|")
    for node, us in by_node.most_common(args.top):
        print(f"| {node} | {100 * us / total:.1f} % |")


if __name__ == "__main__":
    main()
