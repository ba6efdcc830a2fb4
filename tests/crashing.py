"""``dpe-ingest consume`` or ``dpe-ingest analytics`` with one crash point armed: TESTS ONLY.

    python tests/crashing.py --at POINT [--after-batches N] consume|analytics [ARGS...]

The product calls a hook that does nothing at each of its crash points (``consumer.CRASH_POINTS``,
``analytics.CRASH_POINTS``) and reads no setting for it, so no pod's environment can arm one.  This
launcher, which only the tests run, hands the program a hook that SIGKILLs the process at POINT once N
batches are done (logging ``event=test_crash`` first), then runs the program's ``main(ARGS)``:

- consumer: ``after_poll`` (polled messages went into a batch, the batch before may still be with the
  writer thread), ``after_insert`` (rows and offsets in the open transaction, before COMMIT),
  ``after_dlq_send`` (the batch's dead letters acknowledged, before COMMIT), ``after_db_commit`` (the
  transaction committed, before the main thread hears of it); N counts the batches written;
- analytics: ``before_db_commit``, ``after_db_commit``; N counts the batches applied.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

PROGRAMS = {"consume": ("dpe_ingest.consumer", "Consumer"), "analytics": ("dpe_ingest.analytics", "Analytics")}


def command(program: str, point: str, after_batches: int = 0, *args: str) -> list[str]:
    """The argv that runs ``dpe-ingest PROGRAM ARGS`` with ``point`` armed."""
    return [sys.executable, str(Path(__file__).resolve()), "--at", point, "--after-batches", str(after_batches),
            program, *args]


def sigkill_at(log: logging.Logger, point: str, after_batches: int):
    from dpe_ingest import logs

    def hook(at: str, batches_done: int) -> None:
        if at == point and batches_done >= after_batches:
            logs.event(log, "test_crash", f"test crash hook: SIGKILL at {at} after {batches_done} batches",
                       logging.WARNING, point=at, batches=batches_done)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> int:
    import importlib

    p = argparse.ArgumentParser(prog="tests/crashing.py", description=__doc__.splitlines()[0])
    p.add_argument("--at", required=True, metavar="POINT")
    p.add_argument("--after-batches", type=int, default=0, metavar="N")
    p.add_argument("program", choices=sorted(PROGRAMS))
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    module_name, class_name = PROGRAMS[a.program]
    module = importlib.import_module(module_name)
    if a.at not in module.CRASH_POINTS:
        p.error(f"--at {a.at!r}: {a.program} has the crash points {', '.join(module.CRASH_POINTS)}")
    if a.after_batches < 0:
        p.error("--after-batches must be >= 0")
    hook = sigkill_at(module.log, a.at, a.after_batches)
    base = getattr(module, class_name)

    class Armed(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["crash"] = hook
            super().__init__(*args, **kwargs)

    setattr(module, class_name, Armed)  # the program's main() builds its app from this name
    return module.main(a.args)


if __name__ == "__main__":
    sys.exit(main())
