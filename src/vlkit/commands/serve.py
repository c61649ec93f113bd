"""``vlkit serve [MODEL]``: serve a model over HTTP (FastAPI + uvicorn, from the ``serve`` extra).

Concurrent requests are batched dynamically (up to ``--max-batch`` of them, the first waiting at most
``--max-wait-ms`` for company). Open http://HOST:PORT/ for the web page, /docs for the API.

Examples::

    vlkit serve                                   # the bundled shapes-blip2 on http://127.0.0.1:8000
    vlkit serve out/blip2-opt --port 9000 --device cuda --dtype bfloat16 --max-batch 16
    curl -F image=@cat.png http://127.0.0.1:8000/v1/caption
    curl -F image=@cat.png -F question="what is it?" http://127.0.0.1:8000/v1/vqa
    curl -F image=@cat.png -F labels=cat,dog http://127.0.0.1:8000/v1/classify
"""

from __future__ import annotations

import argparse

from vlkit.commands import common
from vlkit.errors import ConfigError


def main(argv: list[str]) -> int:
    from vlkit.api import DEFAULT_MODEL

    p = common.ArgumentParser(
        prog="vlkit serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help=f"model name or path (default: {DEFAULT_MODEL})")
    p.add_argument("--model", help="the same as MODEL")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", choices=common.DTYPES, help="cast the weights (default: as stored)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests per batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait (default: %(default)s ms)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default: %(default)s MB)")
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="largest image, pixels (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default: %(default)s)")
    p.add_argument(
        "--max-items", type=int, default=64, help="most images/texts/labels per request (default: %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="request timeout, seconds (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    if args.model_arg and args.model and args.model_arg != args.model:
        p.error(f"two models given: {args.model_arg} and --model {args.model}")
    for name in ("max_batch", "max_new_tokens", "max_items", "max_pixels"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.timeout <= 0:
        p.error("--max-wait-ms must be >= 0, --max-upload-mb and --timeout > 0")
    try:
        from vlkit.serving.app import serve
        from vlkit.serving.schemas import ServerSettings
    except ImportError as err:
        raise ConfigError(f"vlkit serve needs the serve extra: pip install 'vlkit[serve]' ({err})") from err
    from vlkit.api import load

    pipe = load(args.model_arg or args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype)
    settings = ServerSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_new_tokens=args.max_new_tokens,
        max_items=args.max_items,
        timeout_s=args.timeout,
    )
    print(f"vlkit: serving {pipe.name} ({', '.join(pipe.tasks)}) on http://{args.host}:{args.port}/", flush=True)
    serve(pipe, host=args.host, port=args.port, settings=settings, log_level=args.log_level)
    return 0
