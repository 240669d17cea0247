"""Structure pairing: encoders (real timm DINOv2 class, thumbnail), embedding cache, top-k, proof sheet."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image, ImageDraw

from rfp_core.config import ConfigError, StructureConfig
from rfp_core.config_files import config_from_dict
from rfp_core.media.datasets import UnpairedDataset
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.structure import (
    EmbeddingCache,
    WeightsMissingError,
    build_encoder,
    default_cache_path,
    embed_frames,
    pair_manifest,
    proof_sheet,
    read_pairs,
    topk_pairs,
    write_pairs,
)

S = 32


def _image(domain: int, left: bool, rng: np.random.Generator) -> Image.Image:
    """Domain 0: a warm flat shape; domain 1: a cool striped one; on the left or right half."""
    img = Image.new("RGB", (S, S), (128, 128, 128))
    r = rng.uniform(0.15, 0.22) * S
    cx = rng.uniform(0.18, 0.32) * S if left else rng.uniform(0.68, 0.82) * S
    cy = rng.uniform(0.3, 0.7) * S
    mask = Image.new("L", (S, S), 0)
    box = [cx - r, cy - r, cx + r, cy + r]
    (ImageDraw.Draw(mask).ellipse if rng.random() < 0.5 else ImageDraw.Draw(mask).rectangle)(box, fill=255)
    if domain == 0:
        fill = Image.new("RGB", (S, S), tuple(int(c) for c in rng.integers([200, 60, 0], [256, 160, 60])))
    else:
        light, dark = rng.integers([100, 180, 220], [150, 230, 256]), rng.integers([0, 20, 90], [40, 70, 140])
        rows = (np.arange(S) % 4) < 2
        fill = Image.fromarray(np.where(rows[:, None, None], light, dark).astype(np.uint8).repeat(S, 1))
    img.paste(fill, mask=mask)
    return img


def _fill_store(store: FrameStore, domain: int, n: int, seed: int) -> tuple[list[str], list[bool]]:
    rng = np.random.default_rng(seed)
    keys, sides = [], []
    for i in range(n):
        left = bool(i % 2)
        key = hashlib.md5(f"{domain}-{seed}-{i}".encode()).hexdigest()
        store.put(key, _image(domain, left, rng))
        keys.append(key)
        sides.append(left)
    return keys, sides


def _tiny_dino(img_size: int = 28) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=img_size,
        depth=1,
        embed_dim=32,
        num_heads=2,
        num_classes=0,
        init_values=1.0,
    )  # DINOv2 layer scale starts at 1e-5: blocks would be ~no-ops


def _brute_force(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = a.astype(np.float64) @ b.T.astype(np.float64)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


def test_chunked_topk_equals_brute_force():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 24)).astype(np.float32)
    b = rng.standard_normal((517, 24)).astype(np.float32)
    ka = [f"a{i}" for i in range(len(a))]
    kb = [f"b{i}" for i in range(len(b))]
    # chunk 64 cuts both sides into several blocks (and a ragged last one), so the merge runs
    table = topk_pairs(ka, a, kb, b, k=7, chunk_size=64)
    assert table.num_rows == 300 * 7
    assert [str(t) for t in table.schema.types] == ["string", "string", "int16", "float"]
    sims, idx = _brute_force(a, b, 7)
    got_d1 = np.array(table.column("d1_key").to_pylist()).reshape(300, 7)
    assert (got_d1 == np.array(kb)[idx]).all()
    np.testing.assert_allclose(np.array(table.column("similarity")).reshape(300, 7), sims, atol=1e-5)
    assert table.column("d0_key").to_pylist()[:8] == ["a0"] * 7 + ["a1"]
    assert table.column("rank").to_pylist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    # k larger than domain 1: every candidate once, no error
    small = topk_pairs(ka[:3], a[:3], kb[:4], b[:4], k=8, chunk_size=2)
    assert small.num_rows == 12 and sorted(small.column("d1_key").to_pylist()[:4]) == kb[:4]


def test_pairs_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((9, 8))
    table = topk_pairs([f"a{i}" for i in range(5)], a, [f"b{i}" for i in range(9)], b, k=3)
    path = write_pairs(table, tmp_path / "pairs.parquet")
    assert read_pairs(path).equals(table)
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(FileNotFoundError, match="no structure pairs"):
        read_pairs(tmp_path / "missing.parquet")


def test_thumbnail_pairs_share_the_side(tmp_path):
    """Generated images, object on the left or right, through real ingest: top-1 pairs share the side."""
    rng = np.random.default_rng(10)
    side_of: dict[str, bool] = {}
    for domain in (0, 1):
        for i in range(60):
            path = tmp_path / f"d{domain}" / f"{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            _image(domain, bool(i % 2), rng).save(path)
            side_of[hashlib.md5(path.read_bytes()).hexdigest()] = bool(i % 2)
    store = FrameStore(max_side=64)
    report = ingest([tmp_path / "d0"], [tmp_path / "d1"], tmp_path / "manifest.parquet", store, progress=False)
    cfg = StructureConfig(encoder="thumbnail", candidates=4)
    pairs = pair_manifest(report.manifest_path, store, cfg, progress=False)
    assert pairs.num_rows == 60 * 4
    top1 = {a: b for a, b, r in zip(*(pairs.column(c).to_pylist() for c in ("d0_key", "d1_key", "rank"))) if r == 0}
    agree = np.mean([side_of[a] == side_of[b] for a, b in top1.items()])
    assert len(top1) == 60 and agree >= 0.9, agree

    # the training dataset draws domain 1 among each item's candidates only
    data = UnpairedDataset(report.manifest_path, store, size=S, split="all", pairs=pairs)
    cands: dict[str, set[str]] = {a: set() for a in top1}
    for a, b in zip(pairs.column("d0_key").to_pylist(), pairs.column("d1_key").to_pylist()):
        cands[a].add(b)
    i0 = 5
    drawn = {data.d1.frame_keys[data._domain1_index(i0)] for _ in range(80)}
    assert drawn == cands[data.d0.frame_keys[i0]]

    # the proof sheet: one row per domain-0 frame, the frame then its 4 matches
    sheet = proof_sheet(pairs, store, rows=5, size=24)
    assert sheet.size == (2 + 5 * 26 + 6, 2 + 5 * 26)
    first = store.load(pairs.column("d0_key")[0].as_py()).resize((24, 24), Image.Resampling.LANCZOS)
    np.testing.assert_allclose(np.asarray(sheet, np.float32)[2:26, 2:26], np.asarray(first, np.float32), atol=2)
    # pairing the same manifest again embeds nothing new
    again = EmbeddingCache("thumbnail16")
    assert again.compute_missing(list(side_of), store, build_encoder(cfg), progress=False) == 0


def test_cache_computes_only_new_frames(tmp_path):
    store = FrameStore(tmp_path / "store", max_side=64)
    keys, _ = _fill_store(store, 0, 12, seed=3)
    encoder = build_encoder(StructureConfig(encoder="thumbnail", thumbnail_size=8))
    assert encoder.encoder_id == "thumbnail8" and encoder.dim == 64
    cache = EmbeddingCache(encoder.encoder_id)
    assert cache.path == default_cache_path("thumbnail8") and "cache/embeddings" in str(cache.path)
    assert cache.compute_missing(keys, store, encoder, batch_size=5, progress=False) == 12
    emb = embed_frames(keys, store, encoder, cache, progress=False)
    assert cache.computed == 12  # embed_frames found everything cached
    np.testing.assert_allclose(emb, encoder.embed([store.load(k) for k in keys]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # one more image in the domain: a fresh cache object (a new run) reads the file, computes one
    new_key, _ = _fill_store(store, 0, 13, seed=4)
    again = EmbeddingCache(encoder.encoder_id)
    assert len(again) == 12
    assert again.compute_missing(keys + new_key[-1:], store, encoder, progress=False) == 1
    assert again.computed == 1
    table = pq.read_table(again.path)
    assert table.num_rows == 13 and table.schema.metadata[b"encoder_id"] == b"thumbnail8"
    got, missing = again.get(["nope", keys[3]])
    assert missing == ["nope"] and got.shape == (1, 64)
    np.testing.assert_allclose(got[0], emb[3])
    with pytest.raises(FileNotFoundError, match="rfp ingest"):
        again.compute_missing(["not-in-store"], store, encoder, progress=False)


def test_cache_merges_concurrent_writers(tmp_path):
    """Two caches (two experiments) filling the same file: neither loses the other's rows."""
    store = FrameStore(tmp_path / "store", max_side=64)
    keys, _ = _fill_store(store, 1, 8, seed=5)
    encoder = build_encoder(StructureConfig(encoder="thumbnail"))
    first, second = EmbeddingCache(encoder.encoder_id), EmbeddingCache(encoder.encoder_id)
    first.compute_missing(keys[:4], store, encoder, progress=False)
    second.compute_missing(keys[4:], store, encoder, progress=False)
    assert len(EmbeddingCache(encoder.encoder_id)) == 8
    with pytest.raises(ValueError, match="thumbnail16"):
        EmbeddingCache("other", path=first.path)


def test_dinov2_tiny_real_model_class(tmp_path):
    store = FrameStore(tmp_path / "store", max_side=64)
    keys, _ = _fill_store(store, 0, 6, seed=6)
    cfg = StructureConfig(encoder="dinov2_vits14")
    encoder = build_encoder(cfg, model=_tiny_dino())
    assert type(encoder.model).__name__ == "VisionTransformer" and encoder.dim == 32
    assert encoder.encoder_id == "dinov2_vits14-custom32"  # never mixed with the released model's cache
    emb = embed_frames(keys, store, encoder, progress=False)
    assert emb.shape == (6, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3  # different images, different vectors
    # the CLS token after the final norm is exactly what the encoder returns (normalised)
    x = encoder.transform(store.load(keys[2])).unsqueeze(0)
    with torch.no_grad():
        cls = encoder.model.forward_features(x)[:, 0]
        cls = encoder.model.norm(cls) if encoder.model.fc_norm is torch.nn.Identity else cls
    np.testing.assert_allclose(emb[2], torch.nn.functional.normalize(cls, dim=1)[0].numpy(), atol=1e-5)


def test_dinov2_missing_weights_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsMissingError) as err:
        build_encoder(StructureConfig(encoder="dinov2_vits14"))
    msg = str(err.value)
    assert isinstance(err.value, ConfigError)
    assert "weights_path" in msg and "thumbnail" in msg and "vit_small_patch14_dinov2" in msg
    with pytest.raises(WeightsMissingError, match="does not exist"):
        build_encoder(StructureConfig(encoder="dinov2_vits14", weights_path=tmp_path / "nope.pth"))
    # the config route: flat key structure_encoder reaches the same place
    assert config_from_dict({"structure_encoder": "thumbnail"}).structure.encoder == "thumbnail"


def test_dinov2_loads_a_weights_file(tmp_path, monkeypatch):
    """A full ViT-S/14 state dict at DINOv2's native 518 px loads into the 224 px encoder,
    from structure.weights_path or from the Hugging Face cache where timm would have put it."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    path = tmp_path / "dinov2_vits14.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    encoder = build_encoder(StructureConfig(encoder="dinov2_vits14", weights_path=path))
    assert encoder.encoder_id == "dinov2_vits14" and encoder.dim == 384
    assert torch.equal(encoder.model.blocks[5].mlp.fc1.weight, src.blocks[5].mlp.fc1.weight)
    assert encoder.model.pos_embed.shape[1] == 1 + 16 * 16  # resampled from 37 x 37
    emb = encoder.embed([Image.new("RGB", (40, 30), (200, 10, 10))])
    assert emb.shape == (1, 384)
    # the same file in a Hugging Face cache layout is found with no weights_path
    import huggingface_hub.constants

    repo = tmp_path / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    path.rename(repo / "snapshots" / "abc123" / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cached = build_encoder(StructureConfig(encoder="dinov2_vits14"))
    assert torch.equal(cached.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    bad = tmp_path / "bad.safetensors"
    save_file({"weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ConfigError, match="bad.safetensors"):
        build_encoder(StructureConfig(encoder="dinov2_vits14", weights_path=bad))


def _glyph(kind: int, rng: np.random.Generator, textured: bool) -> Image.Image:
    """A white bar, cross or ring on black (domain 0), or the same glyph as MNIST-M blends it:
    a smooth random colour texture, inverted where the ink is (domain 1)."""
    ink = Image.new("L", (S, S), 0)
    draw, c, r = ImageDraw.Draw(ink), S / 2 + rng.uniform(-2, 2), rng.uniform(8, 11)
    width = int(rng.integers(3, 5))
    if kind in (0, 2):  # vertical bar; the cross adds a horizontal one
        draw.line([(c, c - r), (c, c + r)], fill=255, width=width)
    if kind in (1, 2):
        draw.line([(c - r, c), (c + r, c)], fill=255, width=width)
    if kind == 3:
        draw.ellipse([c - r, c - r, c + r, c + r], outline=255, width=width)
    a = np.asarray(ink, np.float32)[..., None].repeat(3, 2)
    if textured:
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
        texture = np.asarray(
            Image.fromarray(coarse.astype(np.uint8)).resize((S, S), Image.Resampling.BICUBIC), np.float32
        )
        a = np.abs(texture + rng.normal(0, 25, texture.shape) - a).clip(0, 255)
    return Image.fromarray(a.astype(np.uint8))


def test_hog_pairs_shapes_through_texture():
    """The hog encoder pairs each plain glyph with a textured one of the same kind; the thumbnail's
    distance from the dominant colour mistakes the texture's patches for layout."""
    rng = np.random.default_rng(4)
    kinds0, kinds1 = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    plain = [_glyph(int(k), rng, textured=False) for k in kinds0]
    textured = [_glyph(int(k), rng, textured=True) for k in kinds1]
    agree = {}
    for name in ("hog", "thumbnail"):
        enc = build_encoder(StructureConfig(encoder=name))
        e0, e1 = enc.embed(plain), enc.embed(textured)
        assert e0.shape == (80, enc.dim) and np.allclose(np.linalg.norm(e1, axis=1), 1, atol=1e-4)
        agree[name] = float((kinds1[(e0 @ e1.T).argmax(1)] == kinds0).mean())
    assert agree["hog"] >= 0.9 and agree["hog"] > agree["thumbnail"] + 0.2, agree
    assert build_encoder(StructureConfig(encoder="hog", hog_cells=4)).encoder_id == "hog4"
