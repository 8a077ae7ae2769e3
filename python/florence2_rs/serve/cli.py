"""The `florence2-serve` command: one model behind the HTTP API, with dynamic batching.

    florence2-serve --model ID_OR_DIR [--host 127.0.0.1] [--port 8000] [--dtype DTYPE] [--quantize int8|int4]
                    [--threads N] [--device DEVICE] [--max-batch-size N] [--max-wait-ms MS] [--max-queue N] ...

Prints `florence2-serve: listening on http://HOST:PORT` on stdout once it accepts connections (with `--port 0`,
the port the system chose). SIGTERM or Ctrl-C drains: `/health` and new requests answer 503, admitted
requests are answered, and the process exits when they are (or after `--shutdown-timeout-s`). A second
signal exits at once. Exit status: 0 after a drain, 2 for a usage error or a model that cannot be loaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any, Optional, Sequence

import uvicorn

from ..apps.cli import positive_int, usable_threads
from .._native import DTYPES
from ..quantization import QUANTIZE_MODES
from .app import ServerOptions, ServerState, create_app
from .engine import DEFAULT_GENERATION, EngineOptions
from .images import ImageLimits


def parser() -> argparse.ArgumentParser:
    """The command line of `florence2-serve`."""
    p = argparse.ArgumentParser(prog="florence2-serve", description="Serve Florence-2 over HTTP (native and "
                                "OpenAI-compatible endpoints) with dynamic batching.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    limits = p.add_argument_group("HTTP limits")
    limits.add_argument("--max-body-mb", type=_positive_float, default=20.0,
                        help="largest request body in MiB (default: %(default)s)")
    limits.add_argument("--request-timeout-s", type=_positive_float, default=300.0,
                        help="longest wait for an answer before 504 (default: %(default)s)")
    limits.add_argument("--shutdown-timeout-s", type=_positive_float, default=30.0,
                        help="on SIGTERM, longest wait for admitted requests (default: %(default)s)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: %(default)s)")
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options `florence2-serve` and `florence2-mcp` share: the model (as the `florence2` command names
    them), the generation defaults, batching and the image limits."""
    p.add_argument("--model", required=True, help="Hub id or local checkpoint folder")
    p.add_argument("--served-model-name", help="the model name /v1/models lists (default: --model)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype; auto is the checkpoint's (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="quantize the linear layers' weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, help="CPU threads of the model (default: all cores)")
    defaults = p.add_argument_group("generation defaults (a request's own settings override them)")
    defaults.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_GENERATION["max_new_tokens"],
                          help="default: %(default)s")
    defaults.add_argument("--num-beams", type=positive_int, default=DEFAULT_GENERATION["num_beams"],
                          help="default: %(default)s")
    batching = p.add_argument_group("batching and admission")
    batching.add_argument("--max-batch-size", type=positive_int, default=8,
                          help="rows (image x task) per generate call (default: %(default)s)")
    batching.add_argument("--max-wait-ms", type=_non_negative, default=5.0,
                          help="how long a request waits for others to batch with (default: %(default)s)")
    batching.add_argument("--max-queue", type=positive_int, default=64,
                          help="requests waiting before new ones are refused (default: %(default)s)")
    images = p.add_argument_group("images")
    images.add_argument("--max-image-pixels", type=positive_int, default=50_000_000,
                        help="largest image (width x height) accepted (default: %(default)s)")
    images.add_argument("--allow-url-fetch", action="store_true", help="fetch http(s) image URLs")
    images.add_argument("--allow-private-urls", action="store_true",
                        help="let fetched URLs reach private, loopback and link-local addresses")
    images.add_argument("--url-timeout-s", type=_positive_float, default=10.0,
                        help="the whole fetch of an image URL, to its last byte; default: %(default)s")
    images.add_argument("--max-url-mb", type=_positive_float, default=20.0, help="default: %(default)s")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text}")
    return value


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """The server options a parsed command line asks for."""
    generation = {**DEFAULT_GENERATION, "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    options = ServerOptions(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, quantize=args.quantize,
        device=args.device,
        engine=EngineOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, generation=generation),
        images=ImageLimits(max_pixels=args.max_image_pixels, allow_url_fetch=args.allow_url_fetch,
                           allow_private_urls=args.allow_private_urls, fetch_timeout_s=args.url_timeout_s,
                           max_fetch_bytes=int(args.max_url_mb * 2**20)),
    )
    if hasattr(args, "max_body_mb"):  # the HTTP server's own limits
        options.max_body_bytes = int(args.max_body_mb * 2**20)
        options.request_timeout_s, options.shutdown_timeout_s = args.request_timeout_s, args.shutdown_timeout_s
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the server until it is drained; returns the exit status."""
    args = parser().parse_args(argv)
    if args.threads:
        # rayon sizes its pool from this variable at the first model call.
        os.environ["RAYON_NUM_THREADS"] = str(usable_threads(args.threads, sys.stderr))
    options = options_from_args(args)
    app = create_app(options)
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as err:
        print(f"florence2-serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(config, app.state.server, sock)
    server.run(sockets=[sock])
    if app.state.server.load_error:
        print(f"florence2-serve: {app.state.server.load_error}", file=sys.stderr)
        return 2
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, whose first SIGTERM or SIGINT drains instead of closing the listening socket (so
    that requests arriving meanwhile get 503 rather than a refused connection); a second one exits at once.

    Args:
        config: uvicorn's config.
        state: the app's state (draining, requests in flight).
        sock: the bound listening socket, whose address is printed once the server accepts connections.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, sock: socket.socket) -> None:
        super().__init__(config)
        self.state, self.sock = state, sock

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining_since is None and sig in (signal.SIGTERM, signal.SIGINT):
            self.state.start_draining()
        else:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"florence2-serve: listening on http://{shown}:{port}", flush=True)

    async def on_tick(self, counter: int) -> bool:
        if self.state.load_error is not None or self.state.drained():
            return True
        return await super().on_tick(counter)
