"""Assemble reports/evaluation.md from the tables and plots `segcam evaluate` wrote.

.venv/bin/python scripts/evaluation_report.py reports
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SECTIONS = {
    "evidence": (
        "Benchmark with known evidence",
        "Held-out synthetic scenes (`segcam.testing.evidence`): a plain disk whose class is set "
        "only by a marker elsewhere (the evidence is the marker), and a striped square whose "
        "class is set by its own texture (the evidence is the square). Targets: each object's "
        "pixels with its true class. Energy = share of the map's positive mass; the chance level "
        "is the evidence's share of the image.",
    ),
    "ct": (
        "CT liver and tumour (held-out axial slices 56-79)",
        "2D network; targets: the predicted pixels of each class; localisation against the "
        "ground truth; deletion (lower is better) and insertion (higher is better) AUC of the "
        "target score, divided by its unperturbed value, blurred-input baseline, 16 steps.",
    ),
    "randomisation": (
        "Sanity: cascading parameter randomisation",
        "Spearman rank correlation between the maps of the trained evidence network and of "
        "copies whose layers are randomised from the output backwards (8 scenes, raw maps). A "
        "method that explains the learnt function falls to about 0.",
    ),
}


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "reports")
    lines = [
        "# segcam evaluation",
        "",
        "Mean and 95% bootstrap interval (2000 resamples) per method, layer and metric. "
        "Made by `make evaluate`.",
        "",
    ]
    for stem, (title, intro) in SECTIONS.items():
        table = folder / f"{stem}.md"
        if not table.is_file():
            continue
        count = len(json.loads((folder / f"{stem}_records.json").read_text()))
        lines += [
            f"## {title}",
            "",
            intro,
            "",
            f"({count} per-sample records)",
            "",
            table.read_text().strip(),
            "",
            f"![{title}]({stem}.png)",
            "",
        ]
        if (folder / f"{stem}_curves.png").is_file():
            lines += [f"![{title}: mean curves]({stem}_curves.png)", ""]
    output = folder / "evaluation.md"
    output.write_text("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
