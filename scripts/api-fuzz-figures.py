"""The figures of a scripts/api-fuzz run, from schemathesis' NDJSON reports: per document and
phase, the requests sent and their statuses; the failures schemathesis reported; and the
requirement of the broker-down phase that every 5xx there is a 503 (no document gives any other).

Usage: python3 scripts/api-fuzz-figures.py OUT_DIR VERSIONS SEED SECONDS
Exits 1 when a 5xx other than 503 was answered, or when a run failed.
"""

import collections
import glob
import json
import os
import sys


def runs(out):
    for path in sorted(glob.glob(os.path.join(out, "*", "ndjson-*.ndjson"))):
        yield os.path.basename(os.path.dirname(path)), path


def figures(path):
    statuses = collections.Counter()
    per_operation = collections.defaultdict(collections.Counter)
    failed = 0
    duration = 0.0
    for line in open(path, encoding="utf-8"):
        event = json.loads(line)
        if "ScenarioFinished" in event:
            scenario = event["ScenarioFinished"]
            recorder = scenario.get("recorder", {})
            for interaction in recorder.get("interactions", {}).values():
                response = interaction.get("response")
                status = response["status_code"] if response else "no answer"
                statuses[status] += 1
                per_operation[recorder.get("label", "?")][status] += 1
            if scenario.get("status") in ("failure", "error"):
                failed += 1
        elif "EngineFinished" in event:
            duration = event["EngineFinished"].get("running_time", 0.0)
    return statuses, per_operation, failed, duration


def main():
    out, versions, seed, seconds = sys.argv[1:5]
    ok = True
    total = collections.Counter()
    lines = [f"versions: {versions}; seed {seed}; {seconds} s per document, broker up/down"]
    for name, path in runs(out):
        statuses, per_operation, failed, duration = figures(path)
        total.update(statuses)
        requests = sum(statuses.values())
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str))
        lines.append(f"{name}: {requests} requests in {duration:.0f} s ({shown}); "
                     f"{failed} failing scenarios")
        bad = {s: n for s, n in statuses.items()
               if isinstance(s, int) and s >= 500 and s != 503}
        if bad or (not name.endswith("broker-down") and 503 in statuses):
            ok = False
            lines.append(f"  5xx not allowed in this phase: {bad or {503: statuses[503]}}")
            for label, counts in sorted(per_operation.items()):
                lines.append(f"    {label}: {dict(counts)}")
    shown = ", ".join(f"{s}: {n}" for s, n in sorted(total.items(), key=str))
    lines.append(f"all: {sum(total.values())} requests ({shown})")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "figures.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
