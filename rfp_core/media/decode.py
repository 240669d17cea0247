"""Find media in domain folders and decode it: images (Pillow), videos (PyAV), zip archives.

Every decoded frame comes out as a `DecodedFrame`. A source that cannot be read raises
`MediaError` (the reason is recorded as a 'skipped' manifest row by `ingest`); a zip member
that cannot be read comes out as a frame with `error` set, so the other members survive.
Zip members are read into memory with `zipfile` and never extracted, so a member named
`../x.png` cannot write anything anywhere; such names are still refused (skipped) because an
archive carrying them was not made as a plain image collection. An archive inside an archive
is not opened (a skipped member: nesting is how zip bombs multiply).

Orientation: stills are turned by their EXIF orientation, video frames by their stream's
display matrix (rotation side data, as phones write it), so every frame is stored upright.
Symbolic links are followed, to files and to folders anywhere (a folder of links into a
photo library is a common way to make a domain); a folder reached twice (a link loop) is
walked once. Nothing is ever written through a link: ingest only reads its sources.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal

import av
from PIL import Image, ImageOps

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"})
ZIP_EXTS = frozenset({".zip"})
MediaKind = Literal["image", "video", "zip"]
# a member larger than this is refused before it is read into memory (zip bombs)
MAX_ZIP_MEMBER_BYTES = 256 * 1024 * 1024


class MediaError(Exception):
    """A source (or one frame of it) that cannot be decoded; the message is the skip reason."""


@dataclass(frozen=True, order=True)
class MediaFile:
    path: Path
    kind: MediaKind

    @property
    def media_type(self) -> str:
        """The manifest's media_type for this source's rows."""
        return "zip_image" if self.kind == "zip" else self.kind


@dataclass
class DecodedFrame:
    index: int  # position in the source: video frame number, or image member number in a zip
    timestamp: float | None  # seconds, videos only
    image: Image.Image | None  # RGB; None when `error` is set
    member: str | None = None  # zip member name
    error: str | None = None  # why this zip member was skipped


_KIND_BY_EXT: dict[str, MediaKind] = {
    **{e: "image" for e in IMAGE_EXTS},
    **{e: "video" for e in VIDEO_EXTS},
    **{e: "zip" for e in ZIP_EXTS},
}


def kind_of(path: str | os.PathLike) -> MediaKind | None:
    return _KIND_BY_EXT.get(os.path.splitext(path)[1].lower())


class FolderError(FileNotFoundError):
    """A domain folder (or a folder inside it) cannot be listed: missing, vanished, unreadable."""


def discover(dirs: list[Path]) -> list[MediaFile]:
    """All media under `dirs` (recursive, links followed, case-insensitive extensions, hidden
    entries skipped), sorted by path. A path that is itself a media file is taken as is. A
    folder that is missing, vanishes while it is listed or cannot be read raises FolderError:
    a manifest silently missing a folder would train on other data than the user named."""
    found: dict[str, MediaKind] = {}
    for d in dirs:
        d = Path(d).expanduser().absolute()
        if d.is_file():
            if (kind := kind_of(d)) is not None:
                found[str(d)] = kind
            continue
        if not d.is_dir():
            raise FolderError(f"domain folder {d} does not exist (check the path you passed)")
        found.update(_walk(d))
    return [MediaFile(Path(p), found[p]) for p in sorted(found)]


def _walk(d: Path) -> dict[str, MediaKind]:
    def failed(exc: OSError) -> None:
        raise FolderError(
            f"cannot list folder {exc.filename} inside domain folder {d}: {exc.strerror} "
            "(it vanished or is unreadable while being scanned; fix it and run again)"
        )

    found: dict[str, MediaKind] = {}
    seen: set[str] = set()
    # os.walk and plain strings: a re-scan of 10,000 files must take well under a second
    for root, subdirs, files in os.walk(d, onerror=failed, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # reached again through a link (a loop, or two links to one folder)
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(
            s for s in subdirs if not s.startswith(".")
        )  # sorted: a loop is cut at the same place every time
        for name in files:
            if not name.startswith(".") and (kind := kind_of(name)) is not None:
                found[os.path.join(root, name)] = kind
    return found


def iter_frames(media: MediaFile) -> Iterator[DecodedFrame]:
    """Decode every frame of `media` once, in order. Raises MediaError when the source fails.

    For a video that fails part way, the frames before the failure have been yielded already;
    the MediaError that follows says at which frame it stopped (`ingest` keeps those frames).
    """
    if media.kind == "image":
        with open(media.path, "rb") as fh:
            yield DecodedFrame(0, None, decode_image(fh))
    elif media.kind == "video":
        yield from _iter_video(media.path)
    else:
        yield from _iter_zip(media.path)


def decode_image(fp) -> Image.Image:
    """Open, fully decode and orient one image; refuse decompression bombs at Pillow's limit."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; a warning is not enough here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise MediaError(
                    f"{img.width}x{img.height} image exceeds Pillow's decompression-bomb limit of "
                    f"{limit} pixels (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
                )
            img.load()  # decode now: a truncated file fails here, not later in a DataLoader worker
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"decompression-bomb limit: {exc}") from None
    except Image.UnidentifiedImageError:
        raise MediaError("not an image Pillow can read (wrong extension, or corrupt)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"image decode failed: {exc}") from None


def _iter_video(path: Path) -> Iterator[DecodedFrame]:
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise MediaError(f"cannot open video: {exc}") from None
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise MediaError(f"no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: decode throughput, same frames
        declared = stream.frames
        fps = float(stream.average_rate) if stream.average_rate else None
        limit = Image.MAX_IMAGE_PIXELS
        index = 0
        try:
            for frame in container.decode(stream):
                if limit and frame.width * frame.height > limit:
                    raise MediaError(f"{frame.width}x{frame.height} frames exceed the pixel limit {limit}")
                if frame.time is not None:
                    ts = float(frame.time)
                else:
                    ts = index / fps if fps else None
                yield DecodedFrame(index, ts, upright(frame.to_image(), _rotation(frame)))
                index += 1
        except MediaError:
            raise
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"video decode failed at frame {index}: {exc}") from None
        if index == 0:
            raise MediaError("video stream holds no decodable frame")
        # A truncated file can also end quietly: compare with the count the header promised.
        if declared and index < declared:
            raise MediaError(f"video ended after {index} of {declared} declared frames (truncated?)")


def _rotation(frame: av.VideoFrame) -> int:
    """Degrees counter-clockwise the display matrix turns this frame by (0 without one)."""
    try:
        return int(round(frame.rotation or 0))
    except (AttributeError, ValueError, TypeError):  # a matrix that is no rotation
        return 0


def upright(image: Image.Image, degrees: int) -> Image.Image:
    """`image` as it is displayed: turned `degrees` counter-clockwise (a video's display matrix).
    Quarter turns are exact pixel moves; other angles are resampled on a grown canvas."""
    quarter = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    degrees %= 360
    if degrees == 0:
        return image
    if degrees in quarter:
        return image.transpose(quarter[degrees])
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)


def unsafe_member(name: str) -> str | None:
    """Why a zip member name is refused, or None when it is a plain relative path."""
    if "\\" in name:
        return "backslash in member name"
    p = PurePosixPath(name)
    if p.is_absolute():
        return "absolute member path"
    if ".." in p.parts:
        return "member path escapes the archive ('..')"
    return None


def _hidden(part: str) -> bool:
    # '..' is not hidden: such a member must show up as a skipped row, not vanish
    return (part.startswith(".") and part != "..") or part == "__MACOSX"


def _iter_zip(path: Path) -> Iterator[DecodedFrame]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MediaError(f"cannot open zip archive: {exc}") from None
    with zf:
        members = [
            info
            for info in zf.infolist()
            if not info.is_dir()
            and PurePosixPath(info.filename).suffix.lower() in IMAGE_EXTS | ZIP_EXTS
            and not any(_hidden(part) for part in PurePosixPath(info.filename).parts)
        ]
        members.sort(key=lambda info: info.filename)
        for index, info in enumerate(members):
            name = info.filename
            reason = unsafe_member(name)
            if reason is None and PurePosixPath(name).suffix.lower() in ZIP_EXTS:
                reason = "archive inside an archive is not opened; unzip it into the domain folder"
            if reason is None and info.file_size > MAX_ZIP_MEMBER_BYTES:
                reason = f"member is {info.file_size} bytes uncompressed, over the {MAX_ZIP_MEMBER_BYTES} limit"
            if reason is not None:
                yield DecodedFrame(index, None, None, member=name, error=reason)
                continue
            try:
                data = zf.read(info)  # into memory only: nothing is extracted to disk
                image = decode_image(io.BytesIO(data))
            except MediaError as exc:
                yield DecodedFrame(index, None, None, member=name, error=str(exc))
                continue
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
                # RuntimeError: encrypted member; BadZipFile: CRC mismatch
                yield DecodedFrame(index, None, None, member=name, error=f"cannot read member: {exc}")
                continue
            yield DecodedFrame(index, None, image, member=name)
