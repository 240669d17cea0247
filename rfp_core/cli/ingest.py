"""`rfp ingest`."""

from __future__ import annotations

import sys
from pathlib import Path

from rfp_core.cli import args as common


def add_parser(sub) -> None:
    ingest = sub.add_parser("ingest", help="scan domain folders into a parquet manifest and the frame store")
    common.domain_dirs(ingest, ("--domain0", "-d0"), "domain0", True, "domain-0 folders, or 'random'")
    common.domain_dirs(ingest, ("--domain1", "-d1"), "domain1", True, "domain-1 folders")
    ingest.add_argument("--out", required=True, help="manifest parquet file to write")
    ingest.add_argument("--store-max-side", type=int, default=512, help="cap on the stored frames' short side")
    ingest.set_defaults(handler=run)


def run(args) -> int:
    """`rfp ingest --domain0 DIR... --domain1 DIR... --out MANIFEST.parquet`."""
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.media.ingest import IngestError, StoreWriteError, ingest

    domain0 = "random" if args.domain0 == ["random"] else [Path(p) for p in args.domain0]
    try:
        report = ingest(
            domain0, [Path(p) for p in args.domain1], Path(args.out), FrameStore(max_side=args.store_max_side)
        )
    except IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for d, counts in report.per_domain.items():
        label = (
            "random (generative: no rows)"
            if d == 0 and domain0 == "random"
            else f"{counts['ok']} ok, {counts['skipped']} skipped"
        )
        print(f"domain{d}: {label}")
    print(
        f"frames decoded {report.frames_decoded}, reused from the store {report.frames_reused}, "
        f"files hashed {report.files_hashed}, {report.seconds:.1f} s"
    )
    print(f"manifest: {report.manifest_path} (content version {report.content_version[:16]})")
    if report.n_skipped:
        print(f"skipped {report.n_skipped} row(s); reasons: rfp manifest summary {report.manifest_path}")
    else:
        print("skipped 0")
    return 0
