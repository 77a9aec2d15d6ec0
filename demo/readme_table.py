"""Keep the README's demo table equal to what `make demo` prints.

    python -m demo.readme_table           # paste the summary table of runs/demo/report.md into README.md (make readme)
    python -m demo.readme_table --check   # exit 1 when they differ (CI runs this after make demo)

The README's table sits between two markers, with a line naming the commit and the command it came from. Only the
table is compared: the commit line changes with every commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import outputs

BEGIN, END = "<!-- demo table: begin (python -m demo.readme_table) -->", "<!-- demo table: end -->"
COMMAND = "make demo"


def report_table(path):
    """The first markdown table under '## Summary' in an evaluate.py report."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if "## Summary" not in lines:
        raise SystemExit(f"python -m demo.readme_table: error: {path}: no '## Summary' section; rerun make demo")
    rows = []
    for line in lines[lines.index("## Summary") + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return "\n".join(rows)


def readme_block(text, path="README.md"):
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"python -m demo.readme_table: error: {path}: needs exactly one pair of the markers {BEGIN} / "
                         f"{END}")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return start, end, "\n".join(line for line in text[start:end].splitlines() if line.startswith("|"))


def commit():
    """The commit a result was made at, '+ uncommitted changes' when code differed from it (for every table the
    project writes: the demo's, the benchmark's, the studies')."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.splitlines()
    dirty = [s for s in status
             if not s.endswith(("README.md", "demo/readme_table.py")) and not s[3:].startswith(("runs/", "docs/"))]
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo.readme_table", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--report", default="runs/demo/report.md", help="the demo's report")
    p.add_argument("--readme", default="README.md", help="the page to paste into")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the tables differ")
    args = p.parse_args(argv)
    table = report_table(args.report)
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    start, end, current = readme_block(text, args.readme)
    if args.check:
        if current != table:
            print(f"python -m demo.readme_table: the demo table in {args.readme} differs from {args.report}; run `make "
                  f"readme` and commit the README with the change that moved the numbers\n--- README\n{current}\n"
                  f"--- demo\n{table}",
                  file=sys.stderr)
            return 1
        print(f"python -m demo.readme_table: {args.readme}'s demo table equals {args.report}")
        return 0
    block = f"\n(`{COMMAND}` at commit {commit()}; pasted by `make readme`)\n\n{table}\n"
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(text[:start] + block + text[end:])
    print(f"python -m demo.readme_table: pasted the demo table of {args.report} into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
