"""How the tiny ladder's learning rates were chosen (a design step, not part of the main job).

    OMP_NUM_THREADS=1 python tools/sweep.py examples/tiny_ladder/lr_sweep.yaml --jobs 2
    python examples/tiny_ladder/choose_lr.py out/tiny_ladder/lr_runs

Protocol, fixed before any run of the validation size: each fitted size trains at four rates
at the reference level of 256 facts; the criterion is the mean training loss of the last 50
steps (never retention, which the law is fitted on); a parabola in log10(lr) through each
size's four losses gives its best rate (the best grid rate when the parabola opens down,
clamped to the grid); a line through log10(best rate) against log10(N) gives the rate of
every size, the held-out validation size included, rounded to two significant digits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

LAST_STEPS = 50


def mean_final_loss(run: Path) -> float:
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    return float(np.mean(losses[-LAST_STEPS:]))


def best_rate(lrs: np.ndarray, losses: np.ndarray) -> float:
    x = np.log10(lrs)
    a, b, _ = np.polyfit(x, losses, 2)
    if a <= 0:
        return float(lrs[np.argmin(losses)])
    return float(10 ** np.clip(-b / (2 * a), x.min(), x.max()))


def main(root: str) -> int:
    runs = {}
    for run in sorted(Path(root).iterdir()):
        info = json.loads((run / "run.json").read_text())
        if info.get("status") != "finished":
            print(f"error: {run} is not finished", file=sys.stderr)
            return 2
        cfg = (run / "config.yaml").read_text()
        lr = float(next(line.split(":")[1] for line in cfg.splitlines() if line.strip().startswith("lr:")))
        runs.setdefault(info["model_params"], []).append((lr, mean_final_loss(run)))
    sizes, best = [], []
    print("| N | " + " | ".join(f"lr {lr:g}" for lr, _ in sorted(next(iter(runs.values())))) + " | best rate |")
    print("|---|" + "---|" * (len(next(iter(runs.values()))) + 1))
    for n, pts in sorted(runs.items()):
        pts.sort()
        lrs, losses = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        sizes.append(n)
        best.append(best_rate(lrs, losses))
        print(f"| {n:,} | " + " | ".join(f"{v:.4f}" for v in losses) + f" | {best[-1]:.3g} |")
    slope, icpt = np.polyfit(np.log10(sizes), np.log10(best), 1)
    print(f"\nrule: lr(N) = {10 ** icpt:.4g} * N^{slope:.3f}")
    for dim, n in ((32, 57504), (64, 155968), (96, 295392), (128, 524928), (192, 1033152)):
        lr = float(f"{10 ** (icpt + slope * np.log10(n)):.2g}")
        print(f"d{dim} (N={n:,}): train.lr={lr:g} train.min_lr={lr / 10:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/tiny_ladder/lr_runs"))
