"""Starting the server from the command line (``lora-nodes serve``)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from ..libraries import import_model_libraries
from ..modelfolders import active_folders
from . import EXAMPLES_DIR, new_token
from .app import Server, ServerConfig, is_loopback
from .frontend import FrontendError, static_root

EXIT_OK, EXIT_INVALID = 0, 2


def config_from_args(args: argparse.Namespace, static: Path | None) -> ServerConfig:
    """The server's configuration from ``serve``'s options (model folders: those in force)."""
    user_dir = Path(args.user_dir).resolve()
    examples = EXAMPLES_DIR if EXAMPLES_DIR.is_dir() else None
    token = args.token or (None if is_loopback(args.host) else new_token())
    return ServerConfig(output_dir=Path(args.output_dir).resolve(), user_dir=user_dir,
                        history_dir=user_dir / "history", cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                        base_dir=Path.cwd(), folders=active_folders(),
                        examples_dir=examples, static_root=static, token=token, host=args.host)


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the exit code."""
    from aiohttp import web

    try:
        static = static_root()
    except FrontendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args, static)
    import_model_libraries()  # before serving: the first graph does not wait for them
    server = Server(config)
    # listening on every address: show the machine's name, which others can open (0.0.0.0 they cannot)
    shown_host = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    address = f"http://{shown_host}:{args.port}/" + (f"?token={config.token}" if config.token else "")
    print(f"lora-nodes editor: {address}", flush=True)
    if not is_loopback(args.host):
        print("  anyone who can reach this address and has the token can run graphs here", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, handle_signals=True)
    return EXIT_OK
