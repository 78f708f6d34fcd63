"""``calibration.png``: per score, the PR curve and the ROC with the chosen cut (and BLIP's 0.5 for
ITM) marked, and the score's histograms for the good and the bad labelled texts.

matplotlib (Agg backend, no display) is imported here only; it ships with MLflow.
"""

from __future__ import annotations

import os

import numpy as np

from ..atomic import atomic_path

GOOD_COLOUR, BAD_COLOUR, CHOSEN_COLOUR, BLIP_COLOUR = "#2e7d32", "#c62828", "#1565c0", "#757575"


def _marks(m: dict) -> list[tuple[str, dict, str]]:
    out = []
    c = m["chosen"]
    if c.get("threshold") is not None:
        rule = f"precision >= {c['target']}" if c["rule"] == "target_precision" else f"keep {100 * c['target']:.0f}%"
        out.append((f"chosen ({rule}): {c['threshold']:.3f}", c, CHOSEN_COLOUR))
    if "blip_default" in m:
        out.append(("BLIP's 0.5", m["blip_default"], BLIP_COLOUR))
    return out


def plot_calibration(report: dict, labelled: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike) -> None:
    """Write the figure of a :func:`blip.evaluate.calibration.calibrate` result to ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"calibration.png needs matplotlib ({e}); pip install matplotlib") from e
    names = list(report["scores"])
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.8 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        m = report["scores"][name]
        s, y = labelled[name]
        pr, roc = m["pr_curve"], m["roc_curve"]
        ax = row[0]
        ax.step(pr["recall"], pr["precision"], where="pre", color="black", lw=1.2)
        if m["chosen"]["rule"] == "target_precision":
            ax.axhline(m["chosen"]["target"], color=CHOSEN_COLOUR, ls=":", lw=1, label="target precision")
        for label, pt, colour in _marks(m):
            ax.plot([pt["recall"]], [pt["precision"]], "o", color=colour, ms=7, label=label)
        ax.set(xlabel="recall (good texts kept)", ylabel="precision (kept texts that are good)", xlim=(0, 1.02),
               ylim=(0, 1.02), title=f"{name}: PR, AP {m['average_precision']:.3f}")
        ax.legend(loc="lower left", fontsize=8)
        ax = row[1]
        ax.plot(roc["fpr"], roc["tpr"], color="black", lw=1.2)
        ax.plot([0, 1], [0, 1], color="#bbbbbb", ls="--", lw=0.8)
        for label, pt, colour in _marks(m):
            ax.plot([pt["fpr"]], [pt["recall"]], "o", color=colour, ms=7, label=label)
        ax.set(xlabel="false positive rate (bad texts kept)", ylabel="true positive rate (= recall)",
               xlim=(0, 1), ylim=(0, 1.02), title=f"{name}: ROC, AUC {m['roc_auc']:.3f}")
        ax.legend(loc="lower right", fontsize=8)
        ax = row[2]
        bins = np.linspace(float(s.min()), float(s.max()), 31) if s.max() > s.min() else 10
        ax.hist(s[y], bins=bins, alpha=0.6, color=GOOD_COLOUR, label=f"good ({int(y.sum())})")
        ax.hist(s[~y], bins=bins, alpha=0.6, color=BAD_COLOUR, label=f"bad ({int((~y).sum())})")
        for label, pt, colour in _marks(m):
            ax.axvline(pt["threshold"], color=colour, lw=1.5, label=label)
        ax.set(xlabel=f"{name} score" + (" (p(match))" if name == "itm" else " (cosine)"), ylabel="labelled texts",
               title=f"{name}: labelled texts (kept: score >= line)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Choosing a threshold: {report['n_matched']} labelled texts", fontsize=12)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
