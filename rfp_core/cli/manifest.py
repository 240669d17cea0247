"""`rfp manifest`."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    manifest = sub.add_parser("manifest", help="query manifests").add_subparsers(dest="manifest_command", required=True)
    summary = manifest.add_parser("summary", help="per-domain counts by media type and status (DuckDB)")
    summary.add_argument("file")
    summary.set_defaults(handler=run)


def run(args) -> int:
    """`rfp manifest summary FILE`."""
    from rfp_core.media.manifest import content_version, format_summary, skip_reasons, summarize

    try:
        rows = summarize(args.file)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(rows))
    total = sum(r["count"] for r in rows)
    skipped = sum(r["count"] for r in rows if r["status"] == "skipped")
    print(f"\n{total} rows, {skipped} skipped; content version {content_version(args.file)[:16]}")
    reasons = skip_reasons(args.file)
    if reasons:
        print("\nskipped:")
        for r in reasons:
            print(f"  d{r['domain']} {r['source_path']} [frame {r['frame_index']}]: {r['error']}")
        if skipped > len(reasons):
            print(f"  ... and {skipped - len(reasons)} more (query the parquet file with DuckDB)")
    return 0
