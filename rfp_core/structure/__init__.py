"""Structure-aware pairing: encoders, embedding cache, chunked top-k, proof sheet."""

from rfp_core.structure.cache import EmbeddingCache, default_cache_path, embed_frames
from rfp_core.structure.encoders import (
    DINO_SPECS,
    DinoEncoder,
    StructureEncoder,
    ThumbnailEncoder,
    WeightsMissingError,
    build_encoder,
    load_dino,
)
from rfp_core.structure.pairing import (
    PAIRS_SCHEMA,
    pair_frames,
    pair_manifest,
    read_pairs,
    topk_indices,
    topk_pairs,
    write_pairs,
)
from rfp_core.structure.proof import proof_sheet

__all__ = [
    "DINO_SPECS",
    "DinoEncoder",
    "EmbeddingCache",
    "PAIRS_SCHEMA",
    "StructureEncoder",
    "ThumbnailEncoder",
    "WeightsMissingError",
    "build_encoder",
    "default_cache_path",
    "embed_frames",
    "load_dino",
    "pair_frames",
    "pair_manifest",
    "proof_sheet",
    "read_pairs",
    "topk_indices",
    "topk_pairs",
    "write_pairs",
]
