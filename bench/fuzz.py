"""Run the property tests (tests/test_properties_*.py) for a long time with random inputs: ``make fuzz``.

Each property (a parametrized one takes its parameters in turn) gets an equal share of the time (``--minutes``, 10 by
default) and is called in rounds of ``--round`` inputs under the ``fuzz`` profile of
tests/hypothesis_profiles.py (random, no example database), each round with new random inputs.  A failure is
counted, its falsifying example printed, and the property goes on.  At the end: inputs tried per target and
failures found; exit 1 if any.

    .venv/bin/python bench/fuzz.py --minutes 3        # or: make fuzz MINUTES=3
    .venv/bin/python bench/fuzz.py -k ademe           # only the targets whose name holds "ademe"
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def targets(keyword: str | None) -> list[tuple[str, object, list[dict]]]:
    """(name, property, its parameters) of every property of tests/test_properties_*.py."""
    found = []
    for path in sorted(TESTS.glob("test_properties_*.py")):
        module = importlib.import_module(path.stem)
        for attr, fn in vars(module).items():
            if not attr.startswith("test_") or not hasattr(fn, "hypothesis"):
                continue
            params = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            if params:
                argname, values = params[0].args[:2]
                found.append((attr, fn, [{argname: v} for v in values]))
            else:
                found.append((attr, fn, [{}]))
    return [t for t in found if keyword is None or keyword in t[0]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="total time, shared by the targets (default 10)")
    p.add_argument("--round", type=int, default=200, help="inputs per round of one target (default 200)")
    p.add_argument("-k", dest="keyword", help="only the targets whose name contains this")
    args = p.parse_args(argv)

    import logging

    from hypothesis import settings

    logging.disable(logging.CRITICAL)  # the retries the ADEME client logs on every bad answer

    sys.path.insert(0, str(TESTS))
    import hypothesis_profiles  # the profiles, and the count of inputs each property was called with

    chosen = targets(args.keyword)
    if not chosen:
        print("no target", file=sys.stderr)
        return 2
    share = args.minutes * 60.0 / len(chosen)
    fuzz = settings(settings.get_profile("fuzz"), max_examples=args.round)
    rows, failures_total, started = [], 0, time.monotonic()
    print(f"fuzz: {len(chosen)} targets, {share:.0f} s each, rounds of {args.round} inputs", flush=True)
    decorated: dict = {}
    for name, fn, params in chosen:
        if fn not in decorated:
            decorated[fn] = fuzz(fn)
        test = decorated[fn]
        counter_key = fn.hypothesis.inner_test.__name__
        before = hypothesis_profiles.TRIED[counter_key]
        t0, failures = time.monotonic(), 0
        rounds = 0
        while time.monotonic() - t0 < share:
            kwargs = params[rounds % len(params)]
            rounds += 1
            try:
                test(**kwargs)
            except Exception as exc:  # noqa: BLE001 - a falsified property: count it, show it, go on
                failures += 1
                notes = "\n".join(getattr(exc, "__notes__", []))
                print(f"FAILURE in {name}{kwargs or ''}:\n{notes}\n{''.join(traceback.format_exception_only(exc))[:2000]}",
                      flush=True)
        tried = hypothesis_profiles.TRIED[counter_key] - before
        seconds = time.monotonic() - t0
        rows.append((name, tried, failures, seconds))
        failures_total += failures
        print(f"  {name}: {tried} inputs, {failures} failures, {seconds:.0f} s", flush=True)
    for path in sorted(TESTS.glob("test_properties_*.py")):
        teardown = getattr(sys.modules[path.stem], "teardown_module", None)
        if teardown is not None:
            teardown()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'target':<{width}}  {'inputs':>9}  {'failures':>8}  {'seconds':>7}")
    for name, tried, failures, seconds in rows:
        print(f"{name:<{width}}  {tried:>9}  {failures:>8}  {seconds:>7.0f}")
    total = sum(r[1] for r in rows)
    print(f"{'total':<{width}}  {total:>9}  {failures_total:>8}  {time.monotonic() - started:>7.0f}")
    return 1 if failures_total else 0


if __name__ == "__main__":
    sys.exit(main())
