"""``dpe-ingest`` command: one sub-command per entry point, each a thin ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help).  Each module has ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "produce": ("dpe_ingest.producer", "page one department of the ADEME API into Kafka (a Job)"),
    "consume": ("dpe_ingest.consumer", "write the Kafka topic into PostgreSQL in batches (a Deployment)"),
    "ademe-standin": ("dpe_ingest.standin.server", "serve the local stand-in of the ADEME data-fair API"),
    "testbed": ("dpe_ingest.testbed.cli", "start/stop the local bench: real Kafka, PostgreSQL, stand-in"),
    "run": ("dpe_ingest.local_run", "run the whole pipeline locally as processes, then summarise"),
    "status": ("dpe_ingest.status", "show per-department progress: API, Kafka, PostgreSQL, Jobs"),
    "analytics": ("dpe_ingest.analytics", "live statistics of the topic in a second consumer group (--report, --json)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dpe-ingest COMMAND [options]   (dpe-ingest COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"dpe-ingest: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
