"""The ``routerd`` command: ``serve`` and ``check-config``.

Owns argument parsing and exit codes only; the daemon does the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio

from routerd import __version__, config as config_mod, logs
from routerd.errors import ConfigError, RouterdError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routerd", description="Serve many llama.cpp models behind one port.")
    parser.add_argument("--version", action="version", version=f"routerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", "-c", metavar="PATH", default=os.environ.get("ROUTERD_CONFIG"),
                       help="TOML config (default: $ROUTERD_CONFIG, else built-in defaults)")
    serve.add_argument("--log-level", default=os.environ.get("ROUTERD_LOG_LEVEL", "INFO"))
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("path", metavar="PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = config_mod.load(args.path)
        except ConfigError as exc:
            print(f"routerd: {exc.message}", file=sys.stderr)
            return 1
        print(json.dumps(config_mod.unstructure(config), indent=2))
        return 0
    logs.setup(args.log_level)
    try:
        config = config_mod.load(args.config)
        from routerd.daemon import serve

        trio.run(serve, config, dict(os.environ))
    except ConfigError as exc:
        print(f"routerd: {exc.message}", file=sys.stderr)
        return 1
    except RouterdError as exc:
        print(f"routerd: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return 1
    return 0
