"""Stage 1, ingest: the experiment's resolved spec, its media manifest and its frames in the store."""

import json
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from rfp_core import experiments as exps
from rfp_core.atomic import atomic_write_text
from rfp_core.media.images import grid_png_bytes
from rfp_core.media.ingest import ingest
from rfp_core.media.manifest import content_version, ok_frames, read_manifest
from rfp_pipeline.automation import cheap
from rfp_pipeline.checks import MANIFEST_CHECKS, manifest_checks
from rfp_pipeline.metadata import markdown_image, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import CheckThresholds, RfpHome
from rfp_pipeline.stage_records import RECORD, STAGE, STAGE_RECORDS

GROUP = "ingest"
# a folder being copied into while it is scanned, a network share hiccup: worth another try
FS_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


def manifest_path(frames: dict) -> Path:
    """The manifest whose frames the `frame_store` input holds (its record names it)."""
    path = frames.get("manifest")  # a MissingRecord raises here: materialise frame_store first
    if path is None:
        raise FileNotFoundError(
            "the frame_store record names no manifest (written by older code): materialise it again"
        )
    return Path(path)


@dg.asset(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"json"},
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: ".", RECORD: "experiment.json"},
    description="experiments/<name>.json resolved: folders, and the model config with overrides merged. "
    "Requested by the experiments sensor when the file (or its config file) changes.",
)
def experiment_config(context: dg.AssetExecutionContext, rfp: RfpHome) -> dg.MaterializeResult:
    name = context.partition_key
    exp = rfp.load_experiment(name)
    spec = exps.resolved_spec(exp, rfp.root_path())
    out = atomic_write_text(rfp.out_dir(name) / "experiment.json", json.dumps(spec, indent=2) + "\n")
    cfg = exps.model_config(spec)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(exps.spec_digest(spec)),
        metadata={
            "experiment_file": dg.MetadataValue.path(str(rfp.experiment_file(name))),
            "domain0": dg.MetadataValue.json({"folders": spec["domain0"]}),
            "domain1": dg.MetadataValue.json({"folders": spec["domain1"]}),
            "generative": cfg.generative,
            "max_size": cfg.max_size,
            "model_config": dg.MetadataValue.json(spec["model_config"]),
            "dagster/uri": dg.MetadataValue.path(str(out)),
        },
    )


@dg.asset(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"parquet", "duckdb"},
    automation_condition=cheap(),
    retry_policy=FS_RETRY,
    check_specs=MANIFEST_CHECKS,
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "."},
    description="One parquet row per frame of every image, video and zip in the domain folders. "
    "Its data version is the manifest's content version: touching a file keeps it, adding one changes it.",
)
def media_manifest(
    context: dg.AssetExecutionContext,
    rfp: RfpHome,
    duckdb: DuckDBResource,
    thresholds: CheckThresholds,
    experiment_config: dict,
) -> dg.MaterializeResult:
    name = context.partition_key
    spec = experiment_config
    domain0, domain1 = exps.spec_domains(spec, rfp.root_path())
    cfg = exps.model_config(spec)
    out = rfp.out_dir(name) / "manifest.parquet"
    report = ingest(domain0, domain1, out=out, store=rfp.frame_store(cfg.store_max_side), progress=False)
    # the digest the folder sensor compares against (md5s are cached by ingest's hash cache)
    folder_digest = exps.folder_digest(domain0, domain1, rfp.hash_cache())

    with duckdb.get_connection() as con:
        rows = con.execute(
            "SELECT domain, media_type, status, count(*) AS n, count(DISTINCT source_md5) AS files "
            "FROM read_parquet(?) GROUP BY ALL ORDER BY ALL",
            [str(report.manifest_path)],
        ).fetchall()
        distinct = con.execute(
            "SELECT domain, status, count(DISTINCT frame_key) FROM read_parquet(?) GROUP BY ALL",
            [str(report.manifest_path)],
        ).fetchall()
    summary = dg.MetadataValue.md(
        "| domain | media | status | rows | files |\n|---|---|---|---|---|\n"
        + "\n".join(f"| {d} | {m} | {s} | {n} | {f} |" for d, m, s, n, f in rows)
    )
    total = report.n_ok + report.n_skipped
    write_result(rfp.out_dir(name), {"manifest": str(report.manifest_path), "content_version": report.content_version})
    counts = {(int(d), str(st)): int(n) for d, st, n in distinct}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(report.content_version),
        check_results=manifest_checks(counts, cfg.generative, thresholds, str(report.manifest_path), partition=name),
        metadata={
            "dagster/row_count": total,
            "dagster/uri": dg.MetadataValue.path(str(report.manifest_path)),
            "frames_ok": report.n_ok,
            "frames_skipped": report.n_skipped,
            "skip_rate": report.n_skipped / total if total else 0.0,
            "domain0_ok": report.per_domain.get(0, {}).get("ok", 0),
            "domain1_ok": report.per_domain.get(1, {}).get("ok", 0),
            "frames_decoded": report.frames_decoded,
            "frames_reused": report.frames_reused,
            "files_hashed": report.files_hashed,
            "seconds": round(report.seconds, 3),
            "content_version": report.content_version,
            "folder_digest": folder_digest,
            "summary": summary,
        },
    )


@dg.asset(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"png"},
    automation_condition=cheap(),
    retry_policy=FS_RETRY,
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "frame_store"},
    description="Every usable frame of the manifest, decoded once into the content-addressed store "
    "($RFP_HOME/store, shared by all experiments). Re-decodes only frames missing from the store.",
)
def frame_store(
    context: dg.AssetExecutionContext, rfp: RfpHome, experiment_config: dict, media_manifest: dict
) -> dg.MaterializeResult:
    name = context.partition_key
    spec = experiment_config
    cfg = exps.model_config(spec)
    store = rfp.frame_store(cfg.store_max_side)
    manifest = Path(media_manifest["manifest"])
    table = read_manifest(manifest)
    keys = {d: ok_frames(table, d) for d in (0, 1)}
    missing = [k for d in (0, 1) for k in keys[d] if not store.has(k)]
    repaired = 0
    if missing:
        # the store was pruned or moved: ingest again, which decodes exactly the missing frames
        context.log.warning(f"{len(missing)} frames missing from {store.frames_dir}; decoding them again")
        domain0, domain1 = exps.spec_domains(spec, rfp.root_path())
        repair = ingest(
            domain0, domain1, out=rfp.out_dir(name, "frame_store") / "repair.parquet", store=store, progress=False
        )
        repaired = repair.frames_decoded
        still = [k for k in missing if not store.has(k)]
        if still:
            raise RuntimeError(
                f"{len(still)} frames of {manifest} are not in the store and their sources changed since: "
                "re-materialise media_manifest (the domain folders changed)"
            )
    size_bytes = sum(store.path_for(k).stat().st_size for d in (0, 1) for k in keys[d])
    preview = _preview(store, keys, cfg.max_size)
    write_result(
        rfp.out_dir(name, "frame_store"),
        # the manifest travels on with its frames: the stages after this one take it from this record
        {"manifest": str(manifest), "manifest_version": content_version(table), "frames": sum(map(len, keys.values()))},
    )
    metadata = {
        "frames_domain0": len(keys[0]),
        "frames_domain1": len(keys[1]),
        "frames_repaired": repaired,
        "store_mb": round(size_bytes / 2**20, 3),
        "store_max_side": cfg.store_max_side,
        "dagster/uri": dg.MetadataValue.path(str(store.frames_dir)),
        "built_from_manifest": content_version(table),
    }
    if preview is not None:
        metadata["preview"] = markdown_image(preview, "frames: domain 0 above, domain 1 below")
    return dg.MaterializeResult(metadata=metadata)


def _preview(store, keys: dict[int, list[str]], size: int, n: int = 8) -> bytes | None:
    import torch

    from rfp_core.media.images import center_square, to_tensor

    rows = []
    for d in (0, 1):
        if keys[d]:
            rows.append(torch.stack([to_tensor(center_square(store.load(k), min(size, 64))) for k in keys[d][:n]]))
    if not rows:
        return None
    width = min(len(r) for r in rows)
    return grid_png_bytes([r[:width] for r in rows])
