"""dpe-ingest benchmarks: how fast, against what, and how cost grows.

``make bench`` (or ``.venv/bin/python bench/run.py``) starts the bench (real Kafka, real PostgreSQL,
the ADEME stand-in in its own process) unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set, runs
every measurement side by side in one run, prints a table and writes ``bench/results.json``.

The peer a data engineer would pick, Kafka Connect (standalone) with Debezium's JDBC sink, is measured
beside our consumer on the same rows (section ``connect``, ``bench/section_connect.py``, bench/README.md).

Every program measured runs as its own process: wall seconds of the work, and its peak resident
memory (the kernel's high-water mark, ``VmHWM``).  Ratios compare rows/s measured in this same run.

Layout: this file is the command line; ``bench/harness.py`` what the sections share (servers and
stand-in, processes and their memory, recording, results); one file per section
(``section_main.py``, ``section_refresh.py``, ``section_analytics.py``, ``section_connect.py``,
``section_france.py``), each
importing the harness only; ``bench/baselines.py`` the programs we are compared with.
"""

from __future__ import annotations

import argparse
import sys
import time

import section_analytics
import section_connect
import section_france
import section_main
import section_refresh
from harness import HERE, Bench, results, write_results

#: every section, in the order they run
SECTIONS = ("refresh", "analytics", "connect", "main", "france")


def run(args: argparse.Namespace, sections: set[str]) -> dict:
    sizes = [int(s) for s in args.scale.split(",") if s]
    with Bench(args.rows, args.baseline_rows, sizes) as b:
        t_all = time.perf_counter()
        if "refresh" in sections:
            section_refresh.measure(b)
        if "analytics" in sections:
            section_analytics.measure(b)
        if "main" in sections:
            # the peer runs on the topic the main section's consumer read, right after it
            peer = (lambda ours, topic, table: section_connect.measure(b, ours=ours, topic=topic, ours_table=table)
                    ) if "connect" in sections else None
            section_main.measure(b, before=args.before, consumer_measured=peer)
        elif "connect" in sections:
            section_connect.measure(b)
        if "france" in sections:
            section_france.measure(b, rows=args.france_rows,
                                   page_sizes=tuple(int(x) for x in args.france_pages.split(",")) if args.france_pages else None)
        return results(b, time.perf_counter() - t_all, section_connect.SETTINGS if "connect" in sections else {})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows per department of the comparisons (100000)")
    p.add_argument("--baseline-rows", type=int, default=20_000,
                   help="rows the slow per-row baselines process (their rows/s is what is compared)")
    p.add_argument("--scale", default="10000,100000,1000000", help="department sizes of the scale test")
    p.add_argument("--sections", default="main,refresh,analytics,connect",
                   help="what to measure: main (producer, consumer, end to end, scale), refresh, analytics, "
                        "connect (the Kafka Connect + Debezium JDBC sink peer, beside our consumer), france (every "
                        "department under one data-fair budget, the chart's defaults: bench/section_france.py)")
    p.add_argument("--before", default="e274184", metavar="REV",
                   help="also run the end-to-end measurement with this commit's code (default: the commit "
                        "before issue 13's changes; '' for none)")
    p.add_argument("--france-rows", type=int, default=250_000,
                   help="france: rows of all France, split by population (250000)")
    p.add_argument("--france-pages", default="",
                   help="france: page sizes to run (default: the chart's, then the course's 500 if different)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    sections = set(args.sections.split(","))
    unknown = sorted(sections - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)} (accepted: {', '.join(SECTIONS)})")
    doc = run(args, sections)
    if sections == {"france"}:  # the france section alone: the other sections' figures in --out stay
        doc = merged(doc, args.out)
    write_results(doc, args.out)
    return 0


def merged(doc: dict, out: str) -> dict:
    """``doc``'s france measurements in place of those of the document at ``out``, the rest kept."""
    import json
    from pathlib import Path

    try:
        old = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        return doc
    kept = [m for m in old.get("measurements", []) if not m["name"].startswith("france.")]
    old["measurements"] = kept + doc["measurements"]
    old.setdefault("france", {})["measured_at"] = doc["measured_at"]
    return old


if __name__ == "__main__":
    sys.exit(main())
