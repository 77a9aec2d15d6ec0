"""How well evaluate.py's refusal judge agrees with people: the 2,250 human-labelled XSTest completions.

    python -m studies.refusal_judge                 # prints the agreement, writes docs/refusal-judge.md

XSTest (Röttger et al., NAACL 2024; CC-BY-4.0, assets/xstest-LICENSE) labelled each completion of five chat models
on its 450 prompts as full compliance, full refusal or partial refusal. The judge (`evaluate.refusal`) reads only
the response. Reported: agreement on the three classes, on refusal (full or partial) against compliance, and the
confusion matrix.
"""

from __future__ import annotations

import argparse
import collections
import sys

import data
import evaluate
import outputs

LABELS = {"1_full_compliance": None, "2_full_refusal": "full", "3_partial_refusal": "partial"}
NAMES = {None: "complies", "full": "full refusal", "partial": "partial refusal"}


def agreement(path=data.XSTEST_COMPLETIONS):
    """(three-class agreement, refusal-or-not agreement, confusion {(human, judge): count}, count)."""
    rows = [row for _, row in data.read_rows(path)]
    confusion = collections.Counter((LABELS[r["final_label"]], evaluate.refusal(r["completion"])) for r in rows)
    same = sum(n for (human, judge), n in confusion.items() if human == judge)
    binary = sum(n for (human, judge), n in confusion.items() if (human is None) == (judge is None))
    return same / len(rows), binary / len(rows), confusion, len(rows)


def report(three, binary, confusion, n):
    classes = (None, "full", "partial")
    lines = ["# The refusal judge against XSTest's human labels", "",
             "Command: `python -m studies.refusal_judge`. The judge is `evaluate.refusal`; the labels are XSTest's",
             f"({n:,} completions of five chat models on its 450 prompts,",
             "`assets/xstest-labelled-completions.jsonl.gz`).",
             "", f"- agreement on the three classes: {three:.3f}",
             f"- agreement on refusal (full or partial) against compliance: {binary:.3f}", "",
             "| human label \\ judge | " + " | ".join(NAMES[c] for c in classes) + " | total |",
             "|---|---|---|---|---|"]
    for human in classes:
        row = [confusion[(human, judge)] for judge in classes]
        lines.append(f"| {NAMES[human]} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    lines += ["", "The judge is a string match on the opening of a response, like XSTest's own: it sees refusals that",
              "say so, and misses refusals that only argue with the premise. Partial refusals are mostly read as full",
              "ones, so the evaluation counts full and partial together (`over_refusal`, `refusal_of_harmful`)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.refusal_judge", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--out", default="docs/refusal-judge.md", help="the report")
    args = p.parse_args(argv)

    def measure(_):
        text = report(*agreement())
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(text)

    return outputs.run_script("python -m studies.refusal_judge", measure)


if __name__ == "__main__":
    sys.exit(main())
