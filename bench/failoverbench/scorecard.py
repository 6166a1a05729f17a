"""Prints failoverbench's result for Echelon as a Markdown scorecard and exits 1 on any
`fail` (scripts/failoverbench.sh).

Usage: scorecard.py RESULT.json
"""

import json
import sys

# The published scorecard of 2026-09-12 (pass/partial/safe/fail), from the copy's NOTICE.md.
PUBLISHED = [
    ("reference client (failoverbench's own)", (16, 0, 0, 0)),
    ("Portkey OSS", (11, 2, 0, 3)),
    ("LiteLLM proxy", (9, 3, 4, 0)),
    ("LiteLLM Router", (9, 3, 4, 0)),
    ("Bifrost v2.1.1", (9, 3, 3, 1)),
    ("openai-python", (6, 0, 10, 0)),
]


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as fh:
        doc = json.load(fh)
    print(f"## failoverbench {doc['failoverbench']} ({doc['profile']} profile), {doc['run_started_at']}\n")
    print("| id | scenario | verdict | outcome | attempts primary/fallback | wall s | reason |")
    print("|---|---|---|---|---|---|---|")
    for r in doc["scenarios"]:
        m = r["metrics"]
        print(f"| {r['id']} | {r['title']} | **{r['verdict']}** | {m['outcome']} | "
              f"{m['attempts_primary']}/{m['attempts_fallback']} | {m['elapsed_s']:.1f} | {r['reason']} |")
    s = doc["summary"]
    print("\n| system | pass | partial | safe | fail |")
    print("|---|---|---|---|---|")
    print(f"| **Echelon (this run)** | {s['pass']} | {s['partial']} | {s['safe']} | {s['fail']} |")
    for name, (p, pa, sa, f) in PUBLISHED:
        print(f"| {name} (published 2026-09-12) | {p} | {pa} | {sa} | {f} |")
    print(f"\nrun took {doc['run_seconds']} s")
    return 1 if s["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
