"""Proof sheet: does pairing work? Each row = a domain-0 frame, a gap, its matches best first."""

from __future__ import annotations

import pyarrow as pa
from PIL import Image, ImageDraw

from rfp_core.media.images import center_square

GAP = 6
PAD = 2
BACKDROP = (24, 24, 24)
SOURCE_FRAME = (230, 80, 60)  # outline marking the domain-0 frame of each row


def _tile(store, key: str, size: int) -> Image.Image:
    try:
        return center_square(store.load(key).convert("RGB"), size)
    except (FileNotFoundError, KeyError, OSError):
        # a frame gone from the store leaves a visibly empty tile instead of no sheet at all
        return Image.new("RGB", (size, size), (90, 0, 90))


def spread(keys: list[str], sources: dict[str, str] | None, n: int) -> list[str]:
    """`n` of `keys` taken in turn from each source file (the first frame of every file, then the
    second, ...), in first-seen order: eight frames of one video would show one shape eight times."""
    if not sources:
        return keys[:n]
    by_source: dict[str, list[str]] = {}
    for k in keys:
        by_source.setdefault(sources.get(k, k), []).append(k)
    queues = list(by_source.values())
    out: list[str] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
        depth += 1
    return out


def proof_sheet(
    pairs: pa.Table, store, rows: int = 8, size: int = 64, sources: dict[str, str] | None = None
) -> Image.Image:
    """`rows` domain-0 keys with their matches sorted by rank; with `sources` (frame key -> source
    file) the rows come from as many different files as there are (`spread`), else table order."""
    d0 = pairs.column("d0_key").to_pylist()
    chosen = spread(list(dict.fromkeys(d0)), sources, rows)
    want = set(chosen)
    matches: dict[str, list[tuple[int, str, float]]] = {key: [] for key in chosen}
    for a, b, r, s in zip(
        d0, pairs.column("d1_key").to_pylist(), pairs.column("rank").to_pylist(), pairs.column("similarity").to_pylist()
    ):
        if a in want:
            matches[a].append((r, b, s))
    k = max((len(m) for m in matches.values()), default=0)
    cell = size + PAD
    width = PAD + cell + GAP + k * cell
    sheet = Image.new("RGB", (width, PAD + max(1, len(chosen)) * cell), BACKDROP)
    draw = ImageDraw.Draw(sheet)
    for row, key in enumerate(chosen):
        y = PAD + row * cell
        sheet.paste(_tile(store, key, size), (PAD, y))
        draw.rectangle([PAD - 1, y - 1, PAD + size, y + size], outline=SOURCE_FRAME)
        for col, (_, d1_key, sim) in enumerate(sorted(matches[key])):
            x = PAD + cell + GAP + col * cell
            sheet.paste(_tile(store, d1_key, size), (x, y))
            if size >= 48:
                draw.text((x + 2, y + size - 12), f"{sim:.2f}", fill=(255, 255, 0))
    return sheet
