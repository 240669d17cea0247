"""Stage 4, use: the evaluated model translates the media the experiment lists (`"translate": ["clips/"]`).

Videos come out as videos (rfp_core.inference.video: same frames, timing, audio), stills as
PNGs, under `$RFP_HOME/pipeline/<exp>/translated/<velocity key>/<n>-<listed name>/`; a new model
writes a new folder (the last two are kept). The metadata shows the first frame of every output
under its input's.
"""

from functools import partial
from pathlib import Path
from typing import Any

import dagster as dg
import torch

from rfp_pipeline.assets.evaluation import evaluation_samples
from rfp_pipeline.automation import follows
from rfp_pipeline.metadata import markdown_image, prune_stage_dirs, skipped, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import RfpHome

GROUP = "evaluation"
NOTHING = 'the experiment lists no media to translate (add "translate": ["clips/"] to its file)'
PREVIEW_COLUMNS = 8


def _first_frame(path: Path, size: int) -> torch.Tensor:
    """The first frame of a video or a still, cropped and sized as the translation sees it."""
    from rfp_core.inference.video import is_video
    from rfp_core.media.images import center_square, load_image, to_tensor

    if not is_video(path):
        return load_image(path, size)
    import av

    with av.open(str(path)) as c:
        frame = next(c.decode(c.streams.video[0]))
        return to_tensor(center_square(frame.to_image(), size))


def _media(entry: Path) -> tuple[list[Path], list[Path]]:
    """(videos, stills) of a listed file or folder; a missing entry fails with its name."""
    from rfp_core.inference.video import is_video
    from rfp_core.media.images import IMAGE_SUFFIXES

    if not entry.exists():
        raise FileNotFoundError(
            f"'translate' lists {entry}, which does not exist: fix the experiment file or add the media"
        )
    files = (
        [entry]
        if entry.is_file()
        else sorted(f for f in entry.rglob("*") if f.is_file() and not f.name.startswith("."))
    )
    return [f for f in files if is_video(f)], [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]


def _translate_entry(tr, entry: Path, out: Path, log) -> tuple[list[tuple[Path, Path]], list[dict], list[str]]:
    """Translate one listed entry into `out`: ((input, output) pairs, video reports, skip reasons)."""
    from rfp_core.inference.translate import output_names
    from rfp_core.inference.video import VideoTranslateError, translate_video, video_outputs
    from rfp_core.media.images import ImageLoadError, load_image, save_png

    videos, stills = _media(entry)
    done, reports, skips = [], [], []
    for src, dst in zip(videos, video_outputs(videos, out, other_inputs=True)):
        try:
            reports.append(
                translate_video(
                    src,
                    dst,
                    partial(tr.translate, shared_noise=True),
                    tr.size,
                    batch_size=tr.cfg.velocity.sample_batch_size,
                    progress=False,
                )
            )
            done.append((src, dst))
            log.info(f"translated {src} -> {dst}: {reports[-1]['frames']} frames")
        except VideoTranslateError as exc:
            skips.append(str(exc))
    batch = tr.cfg.velocity.sample_batch_size
    named = list(zip(stills, output_names(stills)))
    for i in range(0, len(named), batch):
        chunk = []
        for src, name in named[i : i + batch]:
            try:
                chunk.append((src, load_image(src, tr.size), out / name))
            except ImageLoadError as exc:
                skips.append(str(exc))
        if chunk:
            for (src, _, dst), y in zip(chunk, tr.translate(torch.stack([x for _, x, _ in chunk]))):
                out.mkdir(parents=True, exist_ok=True)
                done.append((src, save_png(y, dst)))
    return done, reports, skips


@dg.asset(
    partitions_def=experiments_partitions,
    deps=[evaluation_samples],
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "video"},
    # after the evaluation: the velocity is read, but a new one is translated once it has been evaluated
    automation_condition=follows("velocity_checkpoint"),
    description='The evaluated model translates the media the experiment lists ("translate": [files or folders]): '
    "videos to videos (frames, timing, audio kept), stills to PNGs, under the partition's translated/ folder; the "
    "metadata shows each output's first frame under its input's. Materialises at once when nothing is listed.",
)
def translated_media(
    context: dg.AssetExecutionContext, rfp: RfpHome, experiment_config: dict, velocity_checkpoint: dict
) -> dg.MaterializeResult:
    from rfp_core.inference.translate import Translator
    from rfp_core.media.images import paired_rows, save_grid

    name = context.partition_key
    spec = experiment_config
    stage_dir = rfp.out_dir(name, "translated")
    if not spec.get("translate"):
        return skipped(stage_dir, NOTHING)
    vel = velocity_checkpoint
    tr = Translator.from_run(vel["checkpoint"], device=rfp.resolve_device())
    out_dir = rfp.out_dir(name, "translated", str(vel.get("key") or "current"))
    root = rfp.root_path()
    done, reports, skips = [], [], []
    for i, listed in enumerate(spec["translate"]):
        entry = Path(listed) if Path(listed).is_absolute() else root / listed
        d, r, s = _translate_entry(tr, entry, out_dir / f"{i}-{entry.stem or 'media'}", context.log)
        done, reports, skips = done + d, reports + r, skips + s
    if not done:
        raise FileNotFoundError(
            f"nothing under {spec['translate']} could be translated: {skips or 'no videos or images found'}"
        )
    pairs = done[: PREVIEW_COLUMNS * 2]
    preview = save_grid(
        paired_rows(
            torch.stack([_first_frame(a, tr.size) for a, _ in pairs]),
            torch.stack([_first_frame(b, tr.size) for _, b in pairs]),
            PREVIEW_COLUMNS,
        ),
        out_dir / "preview.png",
    )
    write_result(
        stage_dir,
        {
            "skipped": False,
            "outputs": [str(b) for _, b in done],
            "folder": str(out_dir),
            "preview": str(preview),
            "videos": reports,
            "skipped_inputs": skips,
            "built_from_velocity": vel.get("key"),
        },
    )
    prune_stage_dirs(stage_dir, out_dir)
    return dg.MaterializeResult(metadata=_metadata(done, reports, skips, out_dir, preview, vel))


def _metadata(done, reports: list[dict], skips: list[str], out_dir: Path, preview: Path, vel: dict) -> dict[str, Any]:
    ratios = [r["flicker_ratio"] for r in reports if r.get("flicker_ratio") is not None]
    md: dict[str, Any] = {
        "preview": markdown_image(preview, "first frame of each input (upper row) and of its translation (lower row)"),
        "outputs": len(done),
        "videos": len(reports),
        "stills": len(done) - len(reports),
        "video_frames": sum(int(r["frames"]) for r in reports),
        "skipped_inputs": len(skips),
        "folder": dg.MetadataValue.path(str(out_dir)),
        "dagster/uri": dg.MetadataValue.path(str(out_dir)),
        "built_from_velocity": str(vel.get("key")),
    }
    if ratios:
        # > 1: the translation changes more from frame to frame than the input did
        md["flicker_ratio_mean"] = round(sum(ratios) / len(ratios), 3)
    if skips:
        md["skip_reasons"] = dg.MetadataValue.md("\n".join(f"- {s}" for s in skips[:20]))
    return md
