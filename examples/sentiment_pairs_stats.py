"""Statistics of the sentiment preference files, as a Markdown table (used for examples/data/README.md).

    .venv/bin/python examples/sentiment_pairs_stats.py examples/data/sentiment-pairs.jsonl \
        examples/data/sentiment-pairs-validation.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "source"]


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        assert list(row) == KEYS, list(row)
        assert row["chosen_score"] > row["rejected_score"]
    return rows


def stats(rows: list[dict]) -> dict[str, str]:
    def mean(values):
        return statistics.fmean(values)

    chosen = [r["chosen_score"] for r in rows]
    rejected = [r["rejected_score"] for r in rows]
    gaps = [c - r for c, r in zip(chosen, rejected, strict=False)]
    cw = [len(r["chosen"].split()) for r in rows]
    rw = [len(r["rejected"].split()) for r in rows]
    cc = [len(r["chosen"]) for r in rows]
    rc = [len(r["rejected"]) for r in rows]
    pw = [len(r["prompt"].split()) for r in rows]
    return {
        "pairs": f"{len(rows)}",
        "distinct prompts": f"{len({r['prompt'] for r in rows})}",
        "prompt length, words (mean)": f"{mean(pw):.2f}",
        "chosen score, mean / median": f"{mean(chosen):.3f} / {statistics.median(chosen):.3f}",
        "rejected score, mean / median": f"{mean(rejected):.3f} / {statistics.median(rejected):.3f}",
        "gap (chosen − rejected), mean / median / min": f"{mean(gaps):.3f} / {statistics.median(gaps):.3f} / {min(gaps):.3f}",
        "chosen > 0 (share)": f"{sum(c > 0 for c in chosen) / len(rows):.1%}",
        "rejected < 0 (share)": f"{sum(r < 0 for r in rejected) / len(rows):.1%}",
        "chosen length, words / chars (mean)": f"{mean(cw):.1f} / {mean(cc):.1f}",
        "rejected length, words / chars (mean)": f"{mean(rw):.1f} / {mean(rc):.1f}",
        "chosen longer than rejected, in chars (share)": f"{sum(a > b for a, b in zip(cc, rc, strict=False)) / len(rows):.1%}",
        "chosen longer than rejected, in words (share)": f"{sum(a > b for a, b in zip(cw, rw, strict=False)) / len(rows):.1%}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    columns = {path.name: load(path) for path in args.files}
    columns["all"] = [row for rows in columns.values() for row in rows]
    table = {name: stats(rows) for name, rows in columns.items()}
    names = list(table)
    print("| statistic | " + " | ".join(f"`{n}`" if n != "all" else n for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for key in next(iter(table.values())):
        print(f"| {key} | " + " | ".join(table[n][key] for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
