"""Print the effective configuration (defaults + FILE), or only check FILE and say what is wrong.

    ctriage config --config /etc/ctriage/ctriage.toml           # effective TOML on stdout
    ctriage config --config /etc/ctriage/ctriage.toml --check   # "ok" or one line naming the bad key (exit 2)
"""
from __future__ import annotations

import argparse

from appliance.commands.common import add_config_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--check", action="store_true", help="only validate; print 'ok' or the error")


def run(args: argparse.Namespace) -> int:
    from appliance import config as config_mod

    cfg = config_mod.load(args.config)  # ConfigError → one line, exit 2 (cli.main)
    if args.check:
        print(f"ok: {args.config or 'built-in defaults'}")
        return 0
    print(config_mod.to_toml(cfg), end="")
    return 0
