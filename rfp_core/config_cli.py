"""`rfp config show FILE`."""

from __future__ import annotations

from rfp_core.config import load_config


def cli_show(args) -> int:
    print(load_config(args.file).to_json())
    return 0
