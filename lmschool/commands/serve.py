"""`lmschool serve`: serve checkpoints over OpenAI's API, with a web page to chat, compare and read
the report.

    lmschool serve runs/demo                       # every stage of a pipeline run, and its report
    lmschool serve runs/sft runs/dpo --port 8001   # ids "sft" and "dpo"
    lmschool serve base=runs/sft/checkpoints/step-00000200 --api-key KEY --host 0.0.0.0

then open http://127.0.0.1:8000/ or point any OpenAI client at http://127.0.0.1:8000/v1:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi!"}])

Local-only by default (127.0.0.1); `--host 0.0.0.0` without `--api-key` is said in a warning.
`--port 0` picks a free port (the line printed at start says which). Requests that arrive
together are decoded as one batch; at most `--max-batch` samples at once, `--max-queue`
requests waiting, one more is answered 429 with Retry-After. See lmschool/serve/app.py for the
endpoints and fields.
"""

from __future__ import annotations

import argparse
import socket
import sys

from lmschool.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="model or run directory, a pipeline run (`lmschool run --out DIR`), or NAME=PATH")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1 and /api")
    parser.add_argument("--max-batch", type=int, default=32, metavar="N",
                        help="most samples decoded at once, over all models (default 32)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="most requests waiting for a slot; one more gets 429 (default 64)")
    parser.add_argument("--world", metavar="DIR", help="the school world whose teacher scores answers in the "
                        "compare view (default: the run's world/ directory, when there is one)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="bf16 autocast, fp32, or auto (bf16 where the hardware runs it fast; default)")


def check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port; give 0-65535 (0 = any free port)")
    if args.max_batch < 1:
        raise UserError(f"--max-batch {args.max_batch}: must be at least 1")
    if args.max_queue < 0:
        raise UserError(f"--max-queue {args.max_queue}: must be 0 or more")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty; give a key, or leave the option out")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load, so a port in use fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0 = any free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    check(args)
    try:
        import uvicorn
        from lmschool.serve.app import create_app
    except ImportError as e:
        raise UserError(f"lmschool serve needs fastapi and uvicorn ({e.name} is missing): "
                        "pip install 'lmschool[serve]'") from None
    from pathlib import Path

    from lmschool.runtime import autocast, pick_device, resolve_precision
    from lmschool.serve import models as catalog
    from lmschool.serve.engine import Engine

    specs, report_run = catalog.find(args.checkpoints)
    world = Path(args.world) if args.world else None
    if world is not None:
        catalog.world_of(specs[0], world)   # checked before the models load
    device = pick_device(args.device)
    precision = resolve_precision(device, args.precision)
    sock = bind(args.host, args.port)
    served = catalog.load(specs, device, world)
    engine = Engine(served, max_batch=args.max_batch, max_queue=args.max_queue,
                    autocast=lambda: autocast(device, precision))
    app = create_app(served, engine, api_key=args.api_key, report_run=report_run, teachers=catalog.Teachers())
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lmschool serve: {', '.join(served)} on {device} ({precision}) at http://{shown}:{port}/ "
          f"(OpenAI API at /v1{', report at /report' if report_run else ''})", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"lmschool serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this machine can use the models", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    return 0
