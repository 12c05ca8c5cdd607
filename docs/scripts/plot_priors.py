"""Render docs/img/priors.png: every budget prior of graff.priors, with and without warm-up.

Run from the repository root::

    python docs/scripts/plot_priors.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graff.priors import PRIOR_NAMES, BudgetPrior  # noqa: E402

OUT = ROOT / "docs" / "img" / "priors.png"
SETTINGS = (
    ("no warm-up, final = 0", {"warmup": 0.0, "final": 0.0, "decay": 0.2}),
    ("warm-up 0.05 from 0.1, final = 0.1", {"warmup": 0.05, "final": 0.1, "decay": 0.2}),
)


def main() -> None:
    """Plot each prior against fraction_used in [0, 1] and save the PNG."""
    us = [i / 1000 for i in range(1001)]
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(10, 3.6), sharey=True)
    for ax, (title, kwargs) in zip(axes, SETTINGS, strict=True):
        for name in PRIOR_NAMES:
            prior = BudgetPrior(name, **kwargs)
            ax.plot(us, [prior(u) for u in us], label=name, linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("fraction_used $u$")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("multiplier $p(u)$")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=120, metadata={"Software": None})


if __name__ == "__main__":
    main()
