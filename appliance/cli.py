"""`ctriage` command line: one subcommand per job; each lives in its own module and is imported lazily."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from appliance import __version__
from appliance.errors import UsageError

# subcommand → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("appliance.commands.analyze", "analyse a folder of DICOM files or lung-window crop images once"),
    "demo": ("appliance.commands.demo", "the whole chain on a synthetic study: broker, appliance, triage display"),
    "evaluate": ("appliance.commands.evaluate", "sensitivity/specificity/Dice on a labelled dataset"),
    "bench": ("appliance.commands.bench", "slices/s per stage and backend, peak memory"),
    "run": ("appliance.commands.run", "the appliance daemon: watch folder / DICOM node → MQTT verdicts"),
    "status": ("appliance.commands.status", "what the daemon is doing: queue, recent verdicts, bundles, broker"),
    "display": ("appliance.commands.display", "the fever-clinic triage screen (web page fed by MQTT)"),
    "models": ("appliance.commands.models", "model bundles and fleet trust (TUF): keygen, init, sign, timestamp, rotate, revoke, show, publish, verify, trust, install, rollback, list"),
    "echo": ("appliance.commands.echo", "DICOM C-ECHO to AE@host:port"),
    "config": ("appliance.commands.config", "print the effective configuration or check a config file"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctriage", description="COVID-19 pneumonia triage on chest CT, beside the scanner.")
    p.add_argument("--version", action="version", version=f"ctriage {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, helptext) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not built yet
            raise
        sp = sub.add_parser(name, help=helptext, description=(mod.__doc__ or helptext).strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from appliance.malloc import limit_arenas

    limit_arenas()  # before any worker or inference thread exists
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # pydicom both warns and logs each header oddity: say it once (the warning)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from appliance.config import ConfigError
    from appliance.inference.adapter import AdapterError
    from appliance.inference.bundle import BundleError

    try:
        return int(args._run(args) or 0)
    except (UsageError, ConfigError, BundleError, AdapterError) as e:
        print(f"ctriage {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctriage {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    # run as `python -m appliance.cli`: use the importable module so exception classes are the same objects
    from appliance.cli import main as _main

    sys.exit(_main())
