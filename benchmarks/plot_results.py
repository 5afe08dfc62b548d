"""Turn benchmark JSON into PNG charts: throughput and peak memory against the number of classes.

    python benchmarks/bench_head_step.py --json benchmarks/head_step.json
    python benchmarks/plot_results.py benchmarks/head_step.json --out benchmarks/head_step.png

The JSON holds ``{"machine": str, "results": [{"method": str, "classes": int,
"samples_per_s": float, "peak_mib": float}, ...]}``: one row per (method, class count).
Each method becomes one line in each of the two panels; both axes of the class count are
logarithmic.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PANELS = (("samples_per_s", "head-step throughput (samples/s)"), ("peak_mib", "peak memory above baseline (MiB/rank)"))


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method, each group sorted by class count."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["method"]].append(row)
    return {method: sorted(group, key=lambda r: r["classes"]) for method, group in grouped.items()}


def plot(report: dict, out: Path) -> None:
    figure, axes = plt.subplots(1, len(PANELS), figsize=(11, 4.2))
    for axis, (key, title) in zip(axes, PANELS):
        for method, rows in series(report["results"]).items():
            axis.plot([r["classes"] for r in rows], [r[key] for r in rows], marker="o", label=method)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("number of classes C")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(report.get("machine", ""), fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="JSON written by a benchmark's --json flag")
    parser.add_argument("--out", type=Path, help="PNG to write (default: the report's name with .png)")
    args = parser.parse_args()
    out = args.out or args.report.with_suffix(".png")
    plot(json.loads(args.report.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
