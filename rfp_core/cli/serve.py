"""`rfp serve`."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve a registered translator over HTTP (MLflow scoring server, offline)")
    serve.add_argument("--model", default="models:/demo@champion", help="model URI (default: models:/demo@champion)")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import os

    from rfp_core.inference.serve import check_model_uri, server_command, server_env

    env = server_env()
    check_model_uri(args.model, env["MLFLOW_TRACKING_URI"])
    cmd = server_command(args.model, args.port, args.host, args.workers)
    print(
        f"serving {args.model} at http://{args.host}:{args.port}/invocations (tracking {env['MLFLOW_TRACKING_URI']})",
        file=sys.stderr,
        flush=True,
    )
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
