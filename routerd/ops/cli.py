"""The ``routerd`` command: ``serve``, ``check-config``, ``convert`` and ``add-key``.

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

from routerd import __version__, paths
from routerd import config as config_mod
from routerd.errors import EXIT_INTERNAL, BadRequest, ConfigError, RouterdError, leaves
from routerd.front import keys
from routerd.ops import logs


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
    convert = sub.add_parser("convert", help="print a llama-swap config.yaml or a llama.cpp --models-preset .ini "
                             "as routerd TOML (what has no equivalent: listed at its end and on stderr)")
    convert.add_argument("path", metavar="FILE")
    add_key = sub.add_parser("add-key", help="make an API key while routerd is not running (a server that "
                             "listens beyond loopback needs one to start); prints it once")
    add_key.add_argument("name")
    add_key.add_argument("--admin", action="store_true", help="may use the admin views and actions")
    add_key.add_argument("--models", nargs="+", default=list(keys.EVERYTHING.models), metavar="GLOB",
                         help="models it may use (default: all)")
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


def add_key(name: str, settings: keys.KeySettings, *, state_dir: str) -> int:
    """``routerd add-key``: write a new key to the state directory's key store, print it."""
    store = keys.KeyFile(keys.store_path(state_dir))
    try:
        own = store.load()
        if name in own:
            raise BadRequest(f"a key named {name!r} exists in {store.path}; choose another name", code="key_exists")
        key, record = keys.make(name, settings)
        os.makedirs(state_dir, exist_ok=True)
        store.save([*own.values(), record])
    except (RouterdError, OSError) as exc:
        message = exc.message if isinstance(exc, RouterdError) else f"cannot write {store.path}: {exc.strerror or exc}"
        print(f"routerd: {message}", file=sys.stderr)
        return 1
    print(key)
    print(f"routerd: key {name!r} saved in {store.path} (only its hash); it is shown this once", file=sys.stderr)
    return 0


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
    if args.command == "convert":
        from routerd.ops import convert as convert_mod

        return convert_mod.main(args.path)
    if args.command == "add-key":
        settings = keys.KeySettings(models=tuple(args.models), admin=args.admin)
        return add_key(args.name, settings, state_dir=paths.state_dir())
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
