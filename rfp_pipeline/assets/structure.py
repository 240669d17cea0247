"""Structure pairing: every frame embedded once (a cache shared by all experiments), then each
domain-0 frame paired with its k most similar domain-1 frames; the velocity draws its domain-1
partner among them.

Both stages materialise as skipped when `structure.pairing` is off or in generative mode: no
encoder is built then, so experiments that do not pair need no weights.
"""

import hashlib

import dagster as dg
import pyarrow as pa

from rfp_core import experiments as exps
from rfp_core.atomic import atomic_write_with
from rfp_core.media.manifest import ok_frames, read_manifest
from rfp_pipeline.assets.ingest import manifest_path
from rfp_pipeline.automation import cheap
from rfp_pipeline.metadata import markdown_image, prune_stage_dirs, skipped, stage_key, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import RfpHome
from rfp_pipeline.stage_records import STAGE, STAGE_RECORDS

GROUP = "structure"
PROOF_ROWS = 8
PROOF_TILE = 48  # px; similarities are printed on tiles this large


def skip_reason(cfg) -> str | None:
    if not cfg.structure.pairing:
        return "structure.pairing is off: the velocity draws domain-1 partners at random, nothing to embed or pair"
    if cfg.generative:
        return "generative mode (domain0 = random): there are no domain-0 frames to pair"
    return None


def _frames(frame_store: dict) -> dict[int, list[str]]:
    """The usable frames of each domain, from the manifest the `frame_store` input names."""
    table = read_manifest(manifest_path(frame_store))
    return {d: ok_frames(table, d) for d in (0, 1)}


def _sources(frame_store: dict) -> dict[str, str]:
    """frame key -> the file it came from (its md5), for a proof sheet drawn from many files."""
    table = read_manifest(manifest_path(frame_store))
    return {
        k: s or p
        for k, s, p in zip(
            table.column("frame_key").to_pylist(),
            table.column("source_md5").to_pylist(),
            table.column("source_path").to_pylist(),
        )
    }


def pairs_digest(table: pa.Table) -> str:
    """Content version of a pairs table: who is paired with whom, in which rank order."""
    h = hashlib.sha256()
    for col in ("d0_key", "d1_key", "rank"):
        h.update("\x1f".join(map(str, table.column(col).to_pylist())).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def current_pairs(rec: dict, name: str, cfg) -> dict | None:
    """The pairs record (the `structure_pairs` input) the velocity trains with when `cfg` pairs, else None."""
    if skip_reason(cfg) is not None:
        return None
    if rec.get("skipped"):
        raise FileNotFoundError(
            f"structure pairing is on for '{name}' but structure_pairs last ran with it off: "
            f"materialise 'structure_embeddings' and 'structure_pairs' for partition '{name}'"
        )
    return rec


def _stage(context: dg.AssetExecutionContext, rfp: RfpHome, stage: str, spec: dict):
    """(experiment name, its model config, this stage's folder, the skipped result or None)."""
    name = context.partition_key
    cfg = exps.model_config(spec)
    stage_dir = rfp.out_dir(name, stage)
    reason = skip_reason(cfg)
    if reason is None:
        return name, cfg, stage_dir, None
    context.log.info(f"{context.asset_key.to_user_string()} skipped: {reason}")
    return name, cfg, stage_dir, skipped(stage_dir, reason)


@dg.asset(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"parquet"},
    automation_condition=cheap(),
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "embeddings"},
    description="One structure embedding per usable frame (cfg.structure.encoder) in the cache shared by all "
    "experiments ($RFP_HOME/cache/embeddings/<encoder>.parquet); only frames not cached yet are computed. "
    "Skipped when structure pairing is off.",
)
def structure_embeddings(
    context: dg.AssetExecutionContext, rfp: RfpHome, experiment_config: dict, frame_store: dict
) -> dg.MaterializeResult:
    from rfp_core.structure.encoders import build_encoder

    name, cfg, stage_dir, skip = _stage(context, rfp, "embeddings", experiment_config)
    if skip is not None:
        return skip

    encoder = build_encoder(cfg.structure, rfp.resolve_device())  # no weights: the error says what to put where
    cache = rfp.embedding_cache(encoder.encoder_id)
    frames = _frames(frame_store)
    keys = list(dict.fromkeys(frames[0] + frames[1]))
    computed = cache.compute_missing(keys, rfp.frame_store(cfg.store_max_side), encoder, progress=False)
    # keys are content hashes: (encoder, keys) fixes every vector, so it is the content version
    version = stage_key(encoder=encoder.encoder_id, d0=sorted(frames[0]), d1=sorted(frames[1]))
    write_result(
        stage_dir,
        {
            "skipped": False,
            "encoder_id": encoder.encoder_id,
            "cache": str(cache.path),
            "version": version,
            "computed": computed,
            "cached": len(keys) - computed,
        },
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "computed": computed,
            "cached": len(keys) - computed,
            "encoder_id": encoder.encoder_id,
            "dim": int(encoder.dim),
            "frames_domain0": len(frames[0]),
            "frames_domain1": len(frames[1]),
            "cache_rows": len(cache),
            "dagster/row_count": len(keys),
            "dagster/uri": dg.MetadataValue.path(str(cache.path)),
        },
    )


def _pairs_from_cache(rfp: RfpHome, name: str, cfg, frames: dict[int, list[str]], emb: dict) -> pa.Table:
    """Top-k pairs from the embeddings the `structure_embeddings` input cached for these frames."""
    from rfp_core.structure import topk_pairs

    if emb.get("skipped"):
        raise FileNotFoundError(
            f"structure_embeddings last ran with pairing off: materialise it for partition '{name}' first"
        )
    cache = rfp.embedding_cache(emb["encoder_id"])
    (e0, missing0), (e1, missing1) = cache.get(frames[0]), cache.get(frames[1])
    if missing0 or missing1:
        raise FileNotFoundError(
            f"{len(missing0) + len(missing1)} frames of the manifest have no '{emb['encoder_id']}' embedding in "
            f"{cache.path}: materialise 'structure_embeddings' for partition '{name}' first"
        )
    return topk_pairs(frames[0], e0, frames[1], e1, cfg.structure.candidates, device=rfp.resolve_device())


def _pairs_metadata(table: pa.Table, png, path, cfg, frames: dict[int, list[str]], emb: dict) -> dict:
    import pyarrow.compute as pc

    top1 = table.filter(pc.equal(table["rank"], 0))["similarity"]
    return {
        "proof_sheet": markdown_image(png, "each row: a domain-0 frame, then its domain-1 matches, best first"),
        "dagster/row_count": table.num_rows,
        "dagster/uri": dg.MetadataValue.path(str(path)),
        "candidates": cfg.structure.candidates,
        "frames_domain0": len(frames[0]),
        "frames_domain1": len(frames[1]),
        "top1_similarity_mean": float(pc.mean(top1).as_py()) if len(top1) else float("nan"),
        "encoder_id": emb["encoder_id"],
        "built_from_embeddings": emb["version"],
    }


@dg.asset(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"parquet", "png"},
    automation_condition=cheap(),
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "pairs"},
    description="For every domain-0 frame its `structure.candidates` most similar domain-1 frames (cosine, "
    "chunked top-k): parquet (d0_key, d1_key, rank, similarity) and a proof sheet (a domain-0 frame, then its "
    "matches best first). Its data version is the pairs' content: re-pairing makes the velocity stale.",
)
def structure_pairs(
    context: dg.AssetExecutionContext,
    rfp: RfpHome,
    experiment_config: dict,
    frame_store: dict,
    structure_embeddings: dict,
) -> dg.MaterializeResult:
    from rfp_core.structure import proof_sheet, write_pairs

    name, cfg, stage_dir, skip = _stage(context, rfp, "pairs", experiment_config)
    if skip is not None:
        return skip

    emb = structure_embeddings
    frames = _frames(frame_store)
    table = _pairs_from_cache(rfp, name, cfg, frames, emb)
    version = pairs_digest(table)
    out_dir = rfp.out_dir(name, "pairs", version[:16])
    path = write_pairs(table, out_dir / "pairs.parquet")
    sheet = proof_sheet(
        table, rfp.frame_store(cfg.store_max_side), rows=PROOF_ROWS, size=PROOF_TILE, sources=_sources(frame_store)
    )
    png = atomic_write_with(out_dir / "proof_sheet.png", lambda p: sheet.save(p, format="PNG"))
    context.log.info(f"{table.num_rows} pairs -> {path}; proof sheet {png}")
    write_result(
        stage_dir,
        {
            "skipped": False,
            "pairs": str(path),
            "proof_sheet": str(png),
            "version": version,
            "encoder_id": emb["encoder_id"],
            "candidates": cfg.structure.candidates,
            "rows": table.num_rows,
            "built_from_embeddings": emb["version"],
        },
    )
    prune_stage_dirs(stage_dir, out_dir)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version), metadata=_pairs_metadata(table, png, path, cfg, frames, emb)
    )
