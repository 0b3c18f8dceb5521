"""The score of a mutmut run, per module: what scripts/mutation prints after `mutmut run`.

Reads mutmut's per-file results (<mutants>/<path>.meta, JSON: mutant name -> exit code of the
test run), takes off the mutants listed as equivalent in the "Mutation testing" section of
docs/testing.md (one table row per mutant: "| `name` | why |"), and prints
killed / (mutants - equivalent) per module and overall. A mutant counts as killed when the
tests failed, timed out or the type check caught it; "no tests" and "survived" count against
the score. The diff of every survivor not judged equivalent goes to --diffs. Exits 1 when the
overall score is below --min.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
SECTION = "## Mutation testing"
ROW = re.compile(r"^\| `([A-Za-z_][\w.\u01c1]*__mutmut_\d+)` \|", re.MULTILINE)


def equivalents(doc: Path) -> set[str]:
    """The mutants named in the first column of a table row ("| `name` | why |") in the doc's
    "Mutation testing" section (up to the next ## heading)."""
    text = doc.read_text(encoding="utf-8")
    start = text.find(SECTION)
    if start < 0:
        return set()
    end = text.find("\n## ", start + len(SECTION))
    return set(ROW.findall(text[start:end if end > 0 else len(text)]))


def results(mutants: Path) -> dict[str, dict[str, int | None]]:
    """source path -> {mutant name: exit code or None (not run)}."""
    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        data = json.loads(meta.read_text(encoding="utf-8"))
        codes = data.get("exit_code_by_key") or {}
        if codes:
            out[str(meta.relative_to(mutants))[:-len(".meta")]] = codes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, required=True, help="mutmut's mutants/ directory")
    ap.add_argument("--equivalents", type=Path, required=True, help="docs/testing.md")
    ap.add_argument("--min", type=float, default=90.0, help="goal, percent")
    ap.add_argument("--diffs", type=Path, help="write the survivors' diffs here")
    args = ap.parse_args(argv)
    if not args.mutants.is_dir():
        ap.error(f"{args.mutants} is not a directory (run mutmut first)")
    from mutmut.stats import status_by_exit_code      # mutmut's own reading of its exit codes

    equiv = equivalents(args.equivalents)
    by_path = results(args.mutants)
    if not by_path:
        print(f"no mutmut results under {args.mutants}", file=sys.stderr)
        return 2
    survivors: list[tuple[str, str]] = []
    seen: set[str] = set()
    total = Counter()
    print(f"{'module':34} {'mutants':>7} {'equiv':>5} {'killed':>6} {'left':>4} {'score':>7}")
    for path, codes in by_path.items():
        c = Counter()
        for name, code in codes.items():
            seen.add(name)
            status = status_by_exit_code[code]
            if name in equiv:
                c["equivalent"] += 1
                if status in KILLED:
                    print(f"note: {name} is listed as equivalent but was killed", file=sys.stderr)
            elif status in KILLED:
                c["killed"] += 1
            elif status == "not checked":
                c["unchecked"] += 1
            else:
                c["left"] += 1
                survivors.append((path, name))
        c["mutants"] = len(codes)
        total.update(c)
        print(line(path, c))
    print(line("all", total))
    run_modules = {path[:-len(".py")].replace("/", ".") for path in by_path}
    for name in sorted(equiv - seen):
        if name.rsplit(".", 1)[0] in run_modules:
            print(f"note: equivalent {name} is no mutant of this run (the source changed: "
                  "judge its replacement again)", file=sys.stderr)
    if total["unchecked"]:
        print(f"{total['unchecked']} mutants were not run", file=sys.stderr)
    if survivors:
        print(f"{len(survivors)} surviving mutants not judged equivalent:")
        for _, name in survivors:
            print(f"  {name}")
        if args.diffs:
            write_diffs(args.mutants, survivors, args.diffs)
            print(f"their diffs: {args.diffs.resolve()}")
    got = score(total)
    if got is None or got < args.min:
        print(f"mutation score {fmt(got)} is below the goal of {args.min:g} %", file=sys.stderr)
        return 1
    return 0


def score(c: Counter) -> float | None:
    judged = c["mutants"] - c["equivalent"] - c["unchecked"]
    return None if judged <= 0 else 100.0 * c["killed"] / judged


def fmt(s: float | None) -> str:
    return "unknown" if s is None else f"{s:.1f} %"


def line(name: str, c: Counter) -> str:
    return (f"{name:34} {c['mutants']:7} {c['equivalent']:5} {c['killed']:6} {c['left']:4} "
            f"{fmt(score(c)):>7}")


def write_diffs(mutants: Path, survivors: list[tuple[str, str]], out: Path) -> None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    out = out.resolve()
    os.chdir(mutants.resolve().parent)     # mutmut reads mutants/<path> relative to its cwd
    with out.open("w", encoding="utf-8") as f:
        for path, name in survivors:
            try:
                diff = get_diff_for_mutant(name, path=Path(path))
            except Exception as exc:       # a diff is a help, not the result: say why it is missing
                diff = f"(no diff: {exc})"
            f.write(f"# {name}\n{diff}\n\n")


if __name__ == "__main__":
    sys.exit(main())
