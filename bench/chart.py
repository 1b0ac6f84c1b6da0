#!/usr/bin/env python3
"""Draw the per-operation ratios of a bench/protocol.py JSON file as a PNG.

    .venv/bin/python bench/chart.py protocol.json docs/protocol-ratios.png

Each bar is ours/C in ops/s (the median of per-round ratios), with a line
from the lowest to the highest round. A bar below the 1.0 line means ours
is slower than QEMU's C helper. Needs matplotlib (bench/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "matplotlib is missing: install it with "
    ".venv/bin/pip install -r bench/requirements.txt"
)


def load_ratios(path: Path) -> tuple[list[str], list[float], list[float], list[float]]:
    """Return operation names, ratios, and each ratio's lowest and highest round."""
    data = json.loads(path.read_text())
    if data.get("benchmark") != "protocol":
        raise ValueError(f"{path} is not the JSON output of bench/protocol.py")
    operations: dict[str, Any] = data["operations"]
    names = list(operations)
    ratios = [operations[name]["ratio"] for name in names]
    lows = [operations[name]["ratio_rounds_min"] for name in names]
    highs = [operations[name]["ratio_rounds_max"] for name in names]
    return names, ratios, lows, highs


def subtitle(path: Path) -> str:
    data = json.loads(path.read_text())
    machine = data["machine"]
    config = data["config"]
    return (
        f"{machine['nproc']} CPUs, Linux {machine['kernel']}, Python "
        f"{machine['python']}, placement {config.get('placement', 'free')}, "
        f"{config['rounds']} rounds"
    )


def draw(source: Path, output: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        sys.exit(INSTALL_HINT)

    names, ratios, lows, highs = load_ratios(source)
    figure, axes = pyplot.subplots(figsize=(10, 5.5), layout="constrained")
    positions = range(len(names))
    colors = ["tab:green" if ratio >= 1.0 else "tab:orange" for ratio in ratios]
    errors = [
        [ratio - low for ratio, low in zip(ratios, lows, strict=True)],
        [high - ratio for ratio, high in zip(ratios, highs, strict=True)],
    ]
    axes.bar(positions, ratios, color=colors, yerr=errors, capsize=3)
    axes.axhline(1.0, color="black", linewidth=1)
    # Labels go above the error bar, where they cannot cover it.
    for position, ratio, high in zip(positions, ratios, highs, strict=True):
        axes.text(position, high + 0.02, f"{ratio:.2f}", ha="center", va="bottom")
    axes.set_ylim(0, max(1.1, *highs) * 1.1)
    axes.set_xticks(list(positions), names, rotation=30, ha="right")
    axes.set_ylabel("ours / C, ops/s (1.0 = same speed)")
    axes.set_title(
        "Python helper vs QEMU's C virtfs-proxy-helper, per request type\n"
        + subtitle(source),
        fontsize=11,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Draw bench/protocol.py's per-operation ratios as a bar chart."
    )
    parser.add_argument("json", type=Path, help="JSON file from bench/protocol.py")
    parser.add_argument("png", type=Path, help="PNG file to write")
    args = parser.parse_args()
    draw(args.json, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
