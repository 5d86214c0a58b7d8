"""The ``routerd`` command: ``serve`` and ``check-config``.

Owns argument parsing and exit codes only; the daemon does the work. A failure a user can cause
(port in use, another routerd on the socket, a bad config, no llama-server, a state directory
it cannot write) is one line on stderr and a documented exit status (``routerd.errors.EXIT_*``);
a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import trio

from routerd import __version__, config as config_mod
from routerd.ops import logs
from routerd.errors import EXIT_INTERNAL, ConfigError, RouterdError, leaves


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routerd", description="Serve many llama.cpp models behind one port.")
    parser.add_argument("--version", action="version", version=f"routerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", "-c", metavar="PATH", default=os.environ.get("ROUTERD_CONFIG"),
                       help="TOML config (default: $ROUTERD_CONFIG, else built-in defaults)")
    serve.add_argument("--log-level", default=os.environ.get("ROUTERD_LOG_LEVEL", "INFO"), type=str.upper,
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--debug", action="store_true", help="print the traceback of a fatal error")
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("path", metavar="PATH")
    return parser


def fatal(exc: BaseException) -> tuple[int, str]:
    """The exit status and the message for an exception that ended the daemon (pure).

    The root nursery wraps what its tasks raise in exception groups: the error a user can act on
    is the one RouterdError among them; anything else is a bug, said as such.
    """
    found = leaves(exc)
    known = [leaf for leaf in found if isinstance(leaf, RouterdError)]
    if known:
        return known[0].exit_status, known[0].message
    first = next((leaf for leaf in found if not isinstance(leaf, trio.Cancelled)), exc)
    return EXIT_INTERNAL, (f"internal error: {type(first).__name__}: {first}; run `routerd serve --debug` "
                           "for the traceback and please report it")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = config_mod.load(args.path)
        except ConfigError as exc:
            print(f"routerd: {exc.message}", file=sys.stderr)
            return 1  # a checker's "no" (serve exits EXIT_CONFIG on the same error)
        print(json.dumps(config_mod.unstructure(config), indent=2))
        return 0
    logs.setup(args.log_level)
    try:
        config = config_mod.load(args.config)
        logs.setup(args.log_level, config.logging.format)
        from routerd.ops.daemon import serve

        trio.run(serve, config, dict(os.environ))
    except Exception as exc:  # every kind: the user gets a line, never a traceback by surprise
        status, message = fatal(exc)
        if args.debug:
            traceback.print_exception(exc)
        print(f"routerd: {message}", file=sys.stderr)
        return status
    return 0
