"""`rfp config`."""

from __future__ import annotations


def add_parser(sub) -> None:
    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved config as JSON")
    show.add_argument("file")
    show.set_defaults(handler=run)


def run(args) -> int:
    from rfp_core.config_files import load_config

    print(load_config(args.file).to_json())
    return 0
