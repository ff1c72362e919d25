"""The `edgevoice` command: one entry point for the device, the relay and the tools.

Logging is configured here and only here. A configuration error prints
``file: key: reason`` on stderr and exits 78 (EX_CONFIG) before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Iterable, Sequence
from typing import Any

from edgevoice import __version__
from edgevoice.config.loader import EXIT_CONFIG
from edgevoice.errors import ConfigError
from edgevoice.logs import setup_logging, stream_is_journal

DEFAULT_DEVICE_CONFIG = "/etc/edgevoice/device.yaml"
DEFAULT_RELAY_CONFIG = "/etc/edgevoice/relay.yaml"

#: Standard-library modules the device's dependencies import at start-up only for paths
#: the device never takes. websockets' version.py imports importlib.metadata (used only
#: to compute a development build's version string; a release's is a constant) and its
#: proxy.py imports urllib.request (used only to read proxy settings; the device link
#: connects with ``proxy=None``). Run, the two bring in email, http.client, zipfile,
#: csv, importlib.resources and tempfile: 2 MB resident in an idle device (bench rows
#: 11 and 12). Deferred, they run the first time anything uses them.
DEVICE_DEFERRED_MODULES = ("importlib.metadata", "urllib.request")

_deferred_lock = threading.RLock()


class _DeferredModule(types.ModuleType):
    """A module whose code has not run yet: the first attribute it lacks runs it.

    Unlike :class:`importlib.util.LazyLoader`, reading what the import system reads
    (``__spec__``, ``__path__``, ``__name__``) does not run it, so a plain ``import``
    statement in a dependency leaves it unrun.
    """

    def __getattr__(self, name: str) -> Any:
        with _deferred_lock:
            if type(self) is _DeferredModule:
                if self.__dict__.get("_edgevoice_running"):
                    raise AttributeError(name)  # as a module still being imported
                spec = self.__spec__
                assert spec is not None and spec.loader is not None
                self.__dict__["_edgevoice_running"] = True
                try:
                    spec.loader.exec_module(self)
                finally:
                    del self.__dict__["_edgevoice_running"]
                object.__setattr__(self, "__class__", types.ModuleType)
        return getattr(self, name)


def defer_imports(names: Iterable[str]) -> None:
    """Importing any of ``names`` from now on is free until the module is used.

    A module already imported, or not found, is left alone."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _DeferredModule
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def _terminal_columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, then
    standard output's terminal, else 80), without importing shutil."""
    with contextlib.suppress(ValueError):
        columns = int(os.environ.get("COLUMNS", "0"))
        if columns > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, told the width: left to itself it imports shutil, and
    shutil bz2 and lzma, for every parser built (0.7 MB resident in a device that never
    prints help; bench rows 11 and 12)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _ArgumentParser(argparse.ArgumentParser):
    """A parser (and sub-parser) that formats with :class:`_HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="edgevoice", description=(
        "Headless voice terminal for Raspberry Pi-class boards, and its relay."))
    parser.add_argument("--version", action="version", version=f"edgevoice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_ArgumentParser)

    device = sub.add_parser("device", help="run the device daemon")
    device.add_argument("--config", default=DEFAULT_DEVICE_CONFIG, help="device YAML file")
    device.add_argument("--check-config", action="store_true",
                        help="only check the config file (and the token), then exit")
    device.add_argument("--help-config", action="store_true", help="list every option")

    relay = sub.add_parser("relay", help="run the relay")
    relay.add_argument("--config", default=DEFAULT_RELAY_CONFIG, help="relay YAML file")
    relay.add_argument("--check-config", action="store_true",
                       help="only check the config file, then exit")
    relay.add_argument("--live", action="store_true",
                       help="with --check-config and upstream nova: open and close one real "
                            "stream (credentials, region, model access, latency)")
    relay.add_argument("--help-config", action="store_true", help="list every option")

    demo = sub.add_parser("demo", help="one turn through a local relay, no hardware or cloud")
    demo.add_argument("--input", help="speech WAV (any rate, mono or stereo); default: bundled")
    demo.add_argument("--output", default="demo-out.wav", help="where the reply is written")
    demo.add_argument("--json", action="store_true", help="print the timeline as one JSON object")
    demo.add_argument("--fast", action="store_true",
                      help="read and write the WAVs as fast as possible, not at real time")
    demo.add_argument("--timeout", type=float, default=60.0, help="give up after this many s")

    doctor = sub.add_parser("doctor", help="check this device: audio, codec, relay, token, unit")
    doctor.add_argument("--config", default=DEFAULT_DEVICE_CONFIG, help="device YAML file")

    # `bench` has its own parser (edgevoice_dev.bench, the dev-only distribution in
    # devtools/): main() hands it the rest of argv.
    sub.add_parser("bench", help="benchmarks against the peers: edgevoice bench [--quick]",
                   add_help=False)

    token = sub.add_parser("token", help="manage device tokens on the relay")
    token.add_argument("action", choices=["add", "list", "remove", "ticket"],
                       help="ticket: a short-lived, single-use ticket for the browser page")
    token.add_argument("name", nargs="?", help="device id (for add, remove and ticket)")
    token.add_argument("--ttl-s", type=int, default=None,
                       help="ticket lifetime in seconds (default: web.ticket_ttl_s)")
    token.add_argument("--config", default=DEFAULT_RELAY_CONFIG, help="relay YAML file")
    token.add_argument("--replace", action="store_true",
                       help="add: issue a new token for a device that has one (the old one "
                            "stops working at once)")
    return parser


def _config_error(exc: ConfigError) -> int:
    # under systemd, at error priority: `journalctl -p err` must show why it stopped
    prefix = "<3>" if stream_is_journal(os.environ, 2) else ""
    print(f"{prefix}{exc}", file=sys.stderr)
    return EXIT_CONFIG


def _help_config(cls: type[Any], header: str) -> int:
    """Every option as the YAML file that sets it to its default, with its comment."""
    from edgevoice.config.render import render
    sys.stdout.write(render(cls, header))
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        return _config_error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edgevoice ... | head`: the reader has gone; that is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


BENCH_MISSING = (
    "edgevoice bench: the benchmarks live in the dev-only package edgevoice-dev, which "
    "is not installed here (a device install carries only the product).\n"
    "From a checkout: ./scripts/setup --test, or: pip install -e ./devtools")


def _bench(argv: Sequence[str]) -> int:
    """Run ``edgevoice bench`` from the dev package, or say how to get it (exit 2)."""
    try:
        # the bench reports its own progress when no logging is configured
        from edgevoice_dev.bench import main as bench_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("edgevoice_dev", "edgevoice_dev.bench"):
            raise
        print(BENCH_MISSING, file=sys.stderr)
        return 2
    return bench_main(argv)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "device":
        # before the config model, which imports the link and with it websockets
        defer_imports(DEVICE_DEFERRED_MODULES)
        from edgevoice.config.model import DeviceConfig, load_device_config
        if args.help_config:
            from edgevoice.config.templates import DEVICE_HEADER
            return _help_config(DeviceConfig, DEVICE_HEADER)
        config = load_device_config(args.config)
        from edgevoice.device.daemon import device_identity, read_token
        device_identity(config, read_token(config, args.config), args.config)
        if args.check_config:
            print(f"{args.config}: OK")
            return 0
        native = setup_logging(config.log_level, capture_native=True)
        from edgevoice.device.app import run_device
        asyncio.run(run_device(config, args.config, native=native))
        return 0
    if args.command == "relay":
        from edgevoice.config.relay import RelayConfig, load_relay_config
        if args.help_config:
            from edgevoice.config.templates import RELAY_HEADER
            return _help_config(RelayConfig, RELAY_HEADER)
        relay_config = load_relay_config(args.config)
        if relay_config.cluster.store.kind == "none":  # else the tokens are in the store
            from edgevoice.relay.auth import check_token_store
            check_token_store(relay_config.auth.tokens_file, args.config)
        if args.check_config:
            print(f"{args.config}: OK")
            if relay_config.upstream.kind == "nova":
                if args.live:
                    from edgevoice.nova.livecheck import run_live_check
                    return run_live_check(relay_config.upstream.nova)
                for warning in relay_config.upstream.nova.warnings():
                    print(f"warning: {warning}")
                print("(add --live to check credentials, region and model access with AWS)")
            return 0
        setup_logging(relay_config.log_level)
        from edgevoice.relay.app import run_relay
        from edgevoice.relay.loop import run as run_on_relay_loop
        run_on_relay_loop(run_relay(relay_config, args.config))
        return 0
    if args.command == "demo":
        setup_logging(os.environ.get("EDGEVOICE_LOG_LEVEL", "warning"))
        from edgevoice.demo import main_demo
        return main_demo(args.input, args.output, args.json, args.fast, args.timeout)
    if args.command == "token":
        return _token(args)
    if args.command == "doctor":
        from edgevoice.doctor import run_doctor
        return run_doctor(args.config)
    raise AssertionError(args.command)


def _token(args: argparse.Namespace) -> int:
    from edgevoice.config.relay import load_relay_config
    from edgevoice.relay.auth import TokenStoreError
    from edgevoice.relay.shared import token_store_for
    config = load_relay_config(args.config)
    if args.action == "ticket":
        from edgevoice.web.cli import issue_ticket
        return issue_ticket(config, args.name, args.ttl_s)
    store = token_store_for(config.auth.tokens_file, config.cluster.store)
    if args.action == "list":
        for name in store.devices():
            print(name)
        return 0
    if not args.name:
        print(f"edgevoice token {args.action}: give the device name", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            token = store.add(args.name, replace=args.replace)
        elif not store.remove(args.name):
            print(f"edgevoice token remove: no device {args.name!r}", file=sys.stderr)
            return 1
        else:
            return 0
    except ValueError as exc:  # a device id that is not one
        print(f"edgevoice token {args.action}: {exc}", file=sys.stderr)
        return 2
    except TokenStoreError as exc:
        hint = ""
        if isinstance(exc.__context__, PermissionError):
            hint = (" (run it as the relay's user, which owns the store: "
                    f"sudo -u edgevoice-relay edgevoice token {args.action} {args.name})")
        print(f"edgevoice token {args.action}: {exc}{hint}", file=sys.stderr)
        return 1
    print(token)
    verb = "replaced: the old one no longer works" if args.replace else "shown once"
    print(f"# token for {args.name!r} {verb}; put it in /etc/edgevoice/device.token "
          "on the device", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
