"""``dpe-ingest`` command: one sub-command per entry point, each a thin ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

# The harness (devkit/ in the checkout: the local bench, the test cluster, the local run) is a
# separate distribution that imports this package, never the reverse: its two commands are named
# here and loaded only when asked for.
HARNESS = "dpe_devkit"

# name -> (module, one-line help).  Each module has ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "produce": ("dpe_ingest.producer", "page one department of the ADEME API into Kafka (a Job)"),
    "consume": ("dpe_ingest.consumer", "write the Kafka topic into PostgreSQL in batches (a Deployment)"),
    "ademe-standin": ("dpe_ingest.standin.server", "serve the local stand-in of the ADEME data-fair API"),
    "testbed": ("dpe_devkit.testbed.cli", "start/stop the local bench: real Kafka, PostgreSQL, stand-in"),
    "run": ("dpe_devkit.local_run", "run the whole pipeline locally as processes, then summarise"),
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
    module_name = COMMANDS[name][0]
    if module_name.startswith(HARNESS + "."):
        try:
            importlib.import_module(HARNESS)
        except ModuleNotFoundError as exc:
            if exc.name != HARNESS:
                raise
            print(f"dpe-ingest {name}: this command is part of the development harness ({HARNESS}), which is not "
                  "installed here (the images never carry it). From a checkout: bash scripts/setup "
                  "(or pip install -e devkit)", file=sys.stderr)
            return 2
    module = importlib.import_module(module_name)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
