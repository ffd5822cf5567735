"""Local image data for ``lohakit train --task text-to-image``: folders, captions, buckets, batches.

Nothing here downloads anything. Three folder layouts are read (chosen in this order):

1. **metadata** — ``<root>/metadata.jsonl`` exists (HF ``imagefolder``): one JSON object per
   line with ``file_name`` (relative to the root, may point into subfolders) and ``text``.
   Images the file does not list are not used. Every sample has 1 repeat.
2. **repeat folders** — the root has at least one subfolder named ``<N>_<name>`` (kohya
   sd-scripts DreamBooth style, e.g. ``10_mychar/``): the images directly inside it are used
   ``N`` times per epoch, concept ``<name>``. As in kohya, subfolders without the ``N_`` prefix
   (or with ``N < 1``) are ignored, so are images lying loose in the root, and the folders are
   read one level deep (kohya's ``glob_images`` does not recurse): one warning lists what was
   ignored (``ScanReport.ignored``).
3. **flat** — otherwise the images directly inside the root, 1 repeat, concept = the root's name.
   Subfolders are not read.

Captions for layouts 2 and 3 come from a same-name file next to the image (``a.png`` +
``a.txt``; the extension is ``caption_ext``). Like kohya (without its wildcard option) only the
first line is used, stripped; unlike kohya, leading blank lines are skipped (the first *non-blank*
line), and a file with no text counts as a missing caption instead of stopping the run. kohya
fills missing captions with the folder's class tokens (our ``missing_caption="folder"``).

Image files: ``.jpg .jpeg .png .webp`` in any letter case; names starting with ``.`` are hidden
and skipped (as kohya's ``glob("*")`` does, e.g. macOS ``._a.png``). Only regular files are
opened (a symlink to one is fine; a FIFO or device named ``a.png`` is a bad image). Every image
is opened and fully decoded once during the scan, so a truncated file fails here and not in step
9000. Sizes are after EXIF orientation, which :func:`load_pixels` applies too.

Batches are a pure function of ``(seed, step, micro)`` (see :class:`ImageBatches`): a global
micro-batch ``j = step·accum + micro`` holds ``G`` samples from one bucket; rank ``k`` of ``W``
takes positions ``[k·G/W, (k+1)·G/W)`` of it. So a resumed run sees exactly the batches an
uninterrupted run would, and ``W`` processes see the same global batches as one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ImageDataError",
    "ImageItem",
    "ScanReport",
    "scan_images",
    "make_buckets",
    "bucket_for",
    "load_pixels",
    "process_caption",
    "ImageBatches",
    "tag_frequencies",
    "IMAGE_SUFFIXES",
    "METADATA_FILE",
]

#: Image file suffixes read (compared lower-cased).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: The HF imagefolder metadata file looked for at the root.
METADATA_FILE = "metadata.jsonl"
#: ``missing_caption`` modes.
MISSING_CAPTION_MODES = ("warn", "error", "empty", "folder")
#: kohya repeat folder: ``<N>_<name>``.
#: Repeats a kohya ``N_name`` folder may ask for (kohya folders use 1-100; more is a typo or an attack).
MAX_REPEATS = 10_000
#: Largest caption file read (CLIP reads 77 tokens, T5 512).
MAX_CAPTION_BYTES = 1 << 20
#: Image formats read, whatever the file is named (decoded content decides; GIF/TIFF/BMP are refused).
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
_REPEAT_DIR = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
#: How many names a warning or error lists before "...".
_SHOW = 5


class ImageDataError(ValueError):
    """Bad image data: the message names the file or folder at fault and what was expected."""


@dataclass(frozen=True)
class ImageItem:
    """One image of the data set.

    Attributes:
        path: The image file.
        caption: Its caption (stripped; may be empty).
        repeats: How many times it is used per epoch (kohya ``N_`` folders; else 1).
        concept: The dataset folder's name without the ``N_`` prefix, or the root folder's name.
        width: Width in pixels after EXIF orientation.
        height: Height in pixels after EXIF orientation.
        dataset: The dataset folder's name as on disk (``"10_mychar"``; the root's name for the
            flat and metadata layouts): the key of :func:`tag_frequencies`.
    """

    path: Path
    caption: str
    repeats: int
    concept: str
    width: int
    height: int
    dataset: str = ""


@dataclass
class ScanReport:
    """What :func:`scan_images` found.

    Attributes:
        layout: ``"flat"``, ``"repeat_folders"`` or ``"metadata"``.
        n_images: Images used.
        n_samples: Samples per epoch (sum of repeats).
        skipped: Unreadable images skipped (``skip_bad_images=True``), sorted.
        missing_captions: Images without a caption (file missing or empty, or empty ``text``).
        concepts: Images per concept.
        concept_samples: Samples (with repeats) per concept.
        ignored: Subfolders and loose images not read (repeat-folder layout), sorted.
    """

    layout: str
    n_images: int = 0
    n_samples: int = 0
    skipped: list[Path] = field(default_factory=list)
    missing_captions: int = 0
    concepts: dict[str, int] = field(default_factory=dict)
    concept_samples: dict[str, int] = field(default_factory=dict)
    ignored: list[Path] = field(default_factory=list)


def _pil() -> Any:
    """The PIL.Image module, or an ImportError saying how to install it."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with the diffusers / cli extras
        raise ImportError("image data needs Pillow: pip install pillow") from e
    return Image


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_SHOW])
    return shown + (f", ... ({len(paths) - _SHOW} more)" if len(paths) > _SHOW else "")


def _is_regular(path: Path) -> bool:
    """True when ``path`` (after symlinks) is a regular file; never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# ------------------------------------------------------------------------------------------
# Scanning
# ------------------------------------------------------------------------------------------
_ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5..8 swap width and height


def _check_image(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation of a fully decodable image; ImageDataError otherwise."""
    Image = _pil()
    if not _is_regular(path):
        raise ImageDataError(f"image {str(path)!r} is not a regular file")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS (89M) and raises at twice that: refuse both (a bomb or a header lie)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()  # structure and checksums (PNG CRCs)
            with Image.open(path) as im:  # verify() leaves the object unusable: reopen to decode fully
                w, h = im.size
                if im.format not in IMAGE_FORMATS:
                    raise ValueError(f"its content is {im.format or 'an unknown format'}")
                im.load()  # truncated data fails here (unless ImageFile.LOAD_TRUNCATED_IMAGES is set)
                orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb*...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageDataError(f"image {str(path)!r} is not a readable JPEG/PNG/WebP image ({reason})") from None
    if w < 1 or h < 1:
        raise ImageDataError(f"image {str(path)!r} has size {w}x{h}; expected at least 1x1")
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _read_caption(path: Path) -> str | None:
    """The caption file's first non-blank line (stripped), "" when it has none, None when absent."""
    if not os.path.lexists(path):
        return None
    if not _is_regular(path):
        raise ImageDataError(f"caption {str(path)!r} is not a regular file")
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise ImageDataError(f"caption {str(path)!r} is {path.stat().st_size:,} bytes; expected at most {MAX_CAPTION_BYTES:,} "
                             "(a caption is a line of text)")
    try:
        return _first_line(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ImageDataError(f"caption {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ImageDataError(f"caption {str(path)!r} cannot be read ({e.strerror or e})") from None


def _list_dir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise ImageDataError(f"folder {str(folder)!r} cannot be listed ({e.strerror or e})") from None


def _images_in(folder: Path) -> list[Path]:
    """Image-named entries directly in ``folder`` (not recursive), sorted by name."""
    return [Path(e.path) for e in _list_dir(folder) if _is_image_name(e.name) and not e.is_dir()]


def _metadata_entries(meta: Path, root: Path, text_field: str) -> list[tuple[Path, str]]:
    """(image path, caption) per line of ``metadata.jsonl``, in file order."""
    if not _is_regular(meta):
        raise ImageDataError(f"{str(meta)!r} is not a regular file")
    out: list[tuple[Path, str]] = []
    seen: dict[Path, int] = {}
    try:
        lines = meta.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ImageDataError(f"{str(meta)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ImageDataError(f"{where}: not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(obj, dict):
            raise ImageDataError(f"{where}: expected a JSON object with 'file_name' and {text_field!r}, got {type(obj).__name__}")
        for key in ("file_name", text_field):
            if key not in obj:
                raise ImageDataError(f"{where}: no field {key!r} (found {sorted(obj)}); expected 'file_name' and {text_field!r}")
            if not isinstance(obj[key], str):
                raise ImageDataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        name = obj["file_name"]
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise ImageDataError(f"{where}: file_name {name!r} must be a relative path inside {str(root)!r}")
        if not _is_image_name(rel.name):
            raise ImageDataError(f"{where}: file_name {name!r} is not an image; expected one of {list(IMAGE_SUFFIXES)}")
        path = root / rel
        if not os.path.lexists(path):
            raise ImageDataError(f"{where}: file_name {name!r} does not exist ({str(path)!r})")
        if path in seen:
            raise ImageDataError(f"{where}: file_name {name!r} is listed twice (first on line {seen[path]})")
        seen[path] = lineno
        out.append((path, _first_line(obj[text_field])))
    if not out:
        raise ImageDataError(f"{str(meta)!r} lists no images; expected lines like {{\"file_name\": \"a.png\", \"text\": \"...\"}}")
    return out


def scan_images(
    root: str | os.PathLike,
    *,
    caption_ext: str = ".txt",
    missing_caption: Literal["warn", "error", "empty", "folder"] = "warn",
    skip_bad_images: bool = False,
    text_field: str = "text",
) -> tuple[list[ImageItem], ScanReport]:
    """Find, check and caption the images under ``root`` (layouts: see the module docstring).

    Args:
        root: The data folder.
        caption_ext: Suffix of caption files (``".txt"``, ``".caption"``; a missing dot is added).
        missing_caption: An image without a caption (no file, an empty file, or empty ``text``):
            ``"warn"``: empty caption and one warning with the count; ``"error"``: ImageDataError
            naming the first and the count; ``"empty"``: empty caption silently; ``"folder"``: the
            concept name as caption (kohya's class tokens).
        skip_bad_images: Skip unreadable or truncated images (one warning with the count and the
            first names, listed in ``ScanReport.skipped``) instead of raising ImageDataError.
        text_field: The caption field of ``metadata.jsonl`` lines.

    Returns:
        ``(items, report)``: items sorted by path in every layout (repeat folders by folder name,
        then file name; ``metadata.jsonl`` order is not kept), so the order never depends on the
        file system's listing order.

    Raises:
        ImageDataError: The root is missing or not a folder; no images; a bad image (unless
            skipped); a bad ``metadata.jsonl`` line (file and line named); a caption file that is
            not UTF-8; ``missing_caption="error"`` and captions missing; a bad option value.
    """
    if missing_caption not in MISSING_CAPTION_MODES:
        raise ImageDataError(f"missing_caption={missing_caption!r}; expected one of {list(MISSING_CAPTION_MODES)}")
    if not caption_ext or caption_ext in (".",) or "/" in caption_ext or os.sep in caption_ext:
        raise ImageDataError(f"caption extension {caption_ext!r}; expected a suffix like '.txt'")
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    if caption_ext.lower() in IMAGE_SUFFIXES:
        raise ImageDataError(f"caption extension {caption_ext!r} is an image suffix; expected a text suffix like '.txt'")
    root = Path(root)
    if not root.exists():
        raise ImageDataError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ImageDataError(f"image folder {str(root)!r} is not a folder")
    root_name = root.resolve().name or str(root)

    # candidates: (path, caption or None (read from file), repeats, concept, dataset)
    candidates: list[tuple[Path, str | None, int, str, str]] = []
    ignored: list[Path] = []
    meta = root / METADATA_FILE
    if os.path.lexists(meta):
        layout = "metadata"
        for path, cap in _metadata_entries(meta, root, text_field):
            candidates.append((path, cap, 1, root_name, root_name))
        candidates.sort(key=lambda c: c[0])
    else:
        entries = _list_dir(root)
        subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        repeat_dirs = [(e, _REPEAT_DIR.match(e.name)) for e in subdirs]
        if any(m is not None for _, m in repeat_dirs):
            layout = "repeat_folders"
            for e, m in repeat_dirs:
                if m is None or int(m.group(1)) < 1:
                    ignored.append(Path(e.path))
                    continue
                n, concept = int(m.group(1)), m.group(2)
                folder = Path(e.path)
                if n > MAX_REPEATS:
                    raise ImageDataError(f"repeat folder {str(folder)!r}: {m.group(1)} repeats; expected at most {MAX_REPEATS:,}")
                imgs = _images_in(folder)
                if not imgs:
                    raise ImageDataError(f"repeat folder {str(folder)!r} has no images; expected {list(IMAGE_SUFFIXES)} files")
                candidates += [(p, None, n, concept, e.name) for p in imgs]
            ignored += [Path(e.path) for e in entries if _is_image_name(e.name) and not e.is_dir()]
            ignored.sort()
            if ignored:
                warnings.warn(
                    f"{root}: using kohya repeat folders (<N>_<name>); ignored {len(ignored)} subfolder(s)/image(s) "
                    f"without an N_ prefix (N >= 1): {_names(ignored)}",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            layout = "flat"
            candidates = [(p, None, 1, root_name, root_name) for p in _images_in(root)]
    if not candidates:
        raise ImageDataError(
            f"image folder {str(root)!r} has no images; expected {list(IMAGE_SUFFIXES)} files, <N>_<name> subfolders "
            f"or a {METADATA_FILE}"
        )

    items: list[ImageItem] = []
    skipped: list[Path] = []
    missing: list[Path] = []
    for path, cap, repeats, concept, dataset in candidates:
        try:
            w, h = _check_image(path)
        except ImageDataError:
            if not skip_bad_images:
                raise
            skipped.append(path)
            continue
        if cap is None:
            cap = _read_caption(path.with_suffix(caption_ext))
        if not cap:
            missing.append(path)
            cap = concept if missing_caption == "folder" else ""
        items.append(ImageItem(path, cap, repeats, concept, w, h, dataset))

    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} unreadable image(s): {_names(skipped)}", UserWarning, stacklevel=2)
    if not items:
        raise ImageDataError(f"image folder {str(root)!r} has no readable images ({len(skipped)} skipped)")
    if missing:
        if missing_caption == "error":
            raise ImageDataError(
                f"{len(missing)} image(s) have no caption (no {caption_ext} file or empty), first {str(missing[0])!r}; "
                f"expected a caption for every image (or set missing_caption to warn/empty/folder)"
            )
        if missing_caption == "warn":
            warnings.warn(
                f"{root}: {len(missing)} image(s) have no caption ({caption_ext} file missing or empty) and train with an "
                f"empty caption: {_names(missing)}",
                UserWarning,
                stacklevel=2,
            )
    report = ScanReport(layout=layout, skipped=sorted(skipped), missing_captions=len(missing), ignored=ignored)
    for it in items:
        report.n_images += 1
        report.n_samples += it.repeats
        report.concepts[it.concept] = report.concepts.get(it.concept, 0) + 1
        report.concept_samples[it.concept] = report.concept_samples.get(it.concept, 0) + it.repeats
    logger.info("%s: %d images, %d samples per epoch (%s layout)", root, report.n_images, report.n_samples, layout)
    return items, report


# ------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------
def make_buckets(resolution: int, factor: int, *, max_aspect: float = 2.0, step: int | None = None) -> list[tuple[int, int]]:
    """Aspect-ratio buckets ``(width, height)`` for ``resolution``, as kohya's ``make_bucket_resolutions``.

    For every width ``w`` that is a multiple of ``step``, the height is the largest multiple of
    ``step`` with ``w·h <= resolution²``; buckets whose aspect ``w/h`` lies in
    ``[1/max_aspect, max_aspect]`` are kept, with their transposes. The square
    ``(resolution, resolution)`` is always one (resolution is a multiple of ``step``).

    Args:
        resolution: The training resolution (side of the square bucket).
        factor: What every side must be a multiple of (e.g. 8 for an SD VAE, 16 with a patch 2
            transformer).
        max_aspect: Largest long/short side ratio (>= 1).
        step: Spacing of the sides; a multiple of ``factor``; defaults to ``factor`` (kohya uses 64).

    Returns:
        Buckets sorted by ``(width, height)``.

    Raises:
        ImageDataError: ``resolution`` not a positive multiple of ``factor`` (or of ``step``), or a
            bad ``factor``/``step``/``max_aspect``.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ImageDataError(f"bucket factor {factor!r}: expected a positive integer")
    step = factor if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or step % factor:
        raise ImageDataError(f"bucket step {step!r}: expected a positive multiple of the factor {factor}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1 or resolution % step:
        what = f"the model's factor {factor}" + (f" and of the bucket step {step}" if step != factor else "")
        raise ImageDataError(f"--resolution {resolution!r}: expected a positive multiple of {what}")
    if not (isinstance(max_aspect, (int, float)) and math.isfinite(max_aspect) and max_aspect >= 1):
        raise ImageDataError(f"max_aspect {max_aspect!r}: expected a finite number >= 1")
    area = resolution * resolution
    eps = 1e-9
    out = {(resolution, resolution)}
    w = step
    while w <= math.ceil(resolution * math.sqrt(max_aspect)) + step:
        h = (area // w) // step * step
        if h >= step and 1 / max_aspect - eps <= w / h <= max_aspect + eps:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def bucket_for(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's (ties: larger area, then wider).

    Raises:
        ImageDataError: No buckets, or a non-positive image size.
    """
    if not buckets:
        raise ImageDataError("no buckets to choose from; expected make_buckets(...) output")
    if width < 1 or height < 1:
        raise ImageDataError(f"image size {width}x{height}; expected positive sides")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1], -b[0]))


# ------------------------------------------------------------------------------------------
# Pixels and captions
# ------------------------------------------------------------------------------------------
def _to_rgb(im: Any) -> Any:
    """RGB image from any PIL mode: alpha composited on white, palettes expanded, 16-bit scaled."""
    Image = _pil()
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")  # 16-bit grey -> 8-bit
    elif im.mode == "F":
        im = im.convert("L")
    elif im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def cover_and_crop(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How :func:`load_pixels` fits an image to a bucket: ``((resized w, h), (crop left, top))``.

    The image is scaled (aspect kept) to the smallest size covering the bucket, then center
    cropped; SDXL's ``crops_coords_top_left`` conditioning is the ``(top, left)`` of that crop.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    nw, nh = max(bw, round(width * scale)), max(bh, round(height * scale))
    return (nw, nh), ((nw - bw) // 2, (nh - bh) // 2)


def load_pixels(path: str | os.PathLike, bucket: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """The image as a float32 (3, H, W) tensor in [-1, 1] filling ``bucket = (W, H)``.

    EXIF orientation is applied; the image is converted to RGB (transparent areas composited on
    white, palettes and grayscale expanded), resized with LANCZOS so that it covers the bucket
    with its aspect kept, center-cropped, and mirrored left-right when ``flip``. Pure: the same
    file and arguments give the same tensor.

    Raises:
        ImageDataError: The file cannot be decoded, or a bad bucket.
    """
    Image = _pil()
    from PIL import ImageOps

    bw, bh = int(bucket[0]), int(bucket[1])
    if bw < 1 or bh < 1:
        raise ImageDataError(f"bucket {tuple(bucket)}; expected positive (width, height)")
    path = Path(path)
    if not _is_regular(path):
        raise ImageDataError(f"image {str(path)!r} is not a regular file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            (nw, nh), (left, top) = cover_and_crop(im.size[0], im.size[1], (bw, bh))
            if (nw, nh) != im.size:
                im = im.resize((nw, nh), resample=Image.Resampling.LANCZOS)
            im = im.crop((left, top, left + bw, top + bh))
            data = bytearray(im.tobytes())
    except ImageDataError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageDataError(f"image {str(path)!r} cannot be decoded ({reason})") from None
    x = torch.frombuffer(data, dtype=torch.uint8).view(bh, bw, 3).permute(2, 0, 1)  # (3, H, W)
    x = x.to(torch.float32) / 127.5 - 1.0
    return torch.flip(x, dims=[2]).contiguous() if flip else x.contiguous()


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    dropout: float = 0.0,
    separator: str = ",",
) -> str:
    """A training-time caption, with kohya's ``--shuffle_caption/--keep_tokens/--caption_dropout_rate``.

    1. With probability ``dropout`` the caption is ``""`` (unconditional training); one
       ``rng.random()`` is drawn only when ``dropout > 0``.
    2. With ``shuffle``, the caption is split at ``separator``, tags stripped, the first
       ``keep_tokens`` tags kept in place and the rest shuffled with ``rng``; joined with
       ``separator + " "`` (kohya joins with ``", "``). Empty tags are kept, as kohya does.
    3. Without ``shuffle`` the caption is returned unchanged.

    Args:
        caption: The stored caption.
        rng: The sample's caption rng (:meth:`ImageBatches.caption_rng` makes it reproducible).
        shuffle: Shuffle tags.
        keep_tokens: Leading tags that stay first.
        dropout: Caption dropout probability in [0, 1].
        separator: Tag separator.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ImageDataError(f"caption dropout {dropout!r}; expected a probability in [0, 1]")
    if keep_tokens < 0:
        raise ImageDataError(f"keep_tokens {keep_tokens!r}; expected >= 0")
    if not separator:
        raise ImageDataError("caption separator is empty; expected e.g. ','")
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tokens = [t.strip() for t in caption.strip().split(separator)]
    fixed, flex = tokens[:keep_tokens], tokens[keep_tokens:]
    rng.shuffle(flex)
    joiner = separator if separator.endswith(" ") else separator + " "
    return joiner.join(fixed + flex)


def tag_frequencies(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{dataset folder name: {tag: count}}``.

    As kohya's ``set_tag_frequency``: captions split at ``","``, tags stripped and lower-cased,
    empty tags dropped; each image counts once (repeats do not multiply), a tag twice in one
    caption counts twice. Folders with no tags still appear (with ``{}``).
    """
    out: dict[str, dict[str, int]] = {}
    for it in items:
        freq = out.setdefault(it.dataset or it.concept, {})
        for tag in it.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


# ------------------------------------------------------------------------------------------
# Sample order
# ------------------------------------------------------------------------------------------
class ImageBatches:
    """Deterministic bucketed sample order; every function of it is pure in ``(seed, step, micro)``.

    Samples are the items expanded by ``repeats`` (item ``i`` with 3 repeats is 3 samples). With
    ``G`` samples per global micro-batch, epoch ``e`` is built as follows: in every bucket (sorted
    by size) the samples are permuted by ``random.Random("<seed>:<e>:<bucket>")`` and cut into
    ``ceil(n_b / G)`` groups of ``G``, the last one filled up by wrapping around to the start of
    that bucket's permutation (a bucket with fewer than ``G`` samples repeats within itself);
    then the groups of all buckets are shuffled by ``random.Random("<seed>:<e>")``. Global
    micro-batch ``j = step·accum + micro`` is group ``j mod B`` of epoch ``j // B``
    (``B = batches_per_epoch(G)``), so every sample appears once per epoch per repeat (plus the
    wrap-around fill), and a global batch never mixes buckets: ranks' shares stack.

    Args:
        items: The data set (``scan_images`` output).
        buckets: Buckets (``make_buckets`` output); each item goes to :func:`bucket_for`'s choice.
        seed: The run's seed.
        random_flip: Whether :meth:`flip_for` flips (with probability 1/2).
    """

    def __init__(self, items: Sequence[ImageItem], buckets: Sequence[tuple[int, int]], seed: int = 0, *, random_flip: bool = False) -> None:
        if not items:
            raise ImageDataError("no images to batch; expected scan_images(...) items")
        self.seed = int(seed)
        self.random_flip = random_flip
        self.item_buckets: list[tuple[int, int]] = [bucket_for(it.width, it.height, buckets) for it in items]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (it, b) in enumerate(zip(items, self.item_buckets)):
            if it.repeats < 1:
                raise ImageDataError(f"image {str(it.path)!r} has repeats={it.repeats}; expected >= 1")
            groups.setdefault(b, []).extend([i] * it.repeats)
        #: bucket -> its samples (item indices, repeated), buckets sorted
        self.samples: dict[tuple[int, int], list[int]] = {b: groups[b] for b in sorted(groups)}
        self._cache: dict[tuple[int, int], list[tuple[tuple[int, int], list[int]]]] = {}

    @property
    def n_samples(self) -> int:
        """Samples per epoch (with repeats)."""
        return sum(len(s) for s in self.samples.values())

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Samples per bucket used."""
        return {b: len(s) for b, s in self.samples.items()}

    def batches_per_epoch(self, global_batch: int) -> int:
        """Global micro-batches per epoch: ``sum over buckets of ceil(n_b / global_batch)``."""
        self._check_batch(global_batch, 1)
        return sum(-(-len(s) // global_batch) for s in self.samples.values())

    def steps_per_epoch(self, global_batch: int, accum: int = 1) -> int:
        """Optimiser steps per epoch (``ceil(batches_per_epoch / accum)``)."""
        if accum < 1:
            raise ImageDataError(f"gradient accumulation {accum!r}; expected >= 1")
        return -(-self.batches_per_epoch(global_batch) // accum)

    @staticmethod
    def _check_batch(global_batch: int, world: int) -> None:
        if global_batch < 1:
            raise ImageDataError(f"global batch size {global_batch!r}; expected >= 1")
        if world < 1 or global_batch % world:
            raise ImageDataError(f"global batch size {global_batch} is not divisible by the {world} processes; expected a multiple")

    def _epoch(self, global_batch: int, epoch: int) -> list[tuple[tuple[int, int], list[int]]]:
        key = (global_batch, epoch)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            groups: list[tuple[tuple[int, int], list[int]]] = []
            for b, samples in self.samples.items():
                perm = list(samples)
                random.Random(f"lohakit-images:{self.seed}:{epoch}:{b[0]}x{b[1]}").shuffle(perm)
                n = len(perm)
                for start in range(0, n, global_batch):
                    groups.append((b, [perm[(start + i) % n] for i in range(global_batch)]))
            random.Random(f"lohakit-images:{self.seed}:{epoch}").shuffle(groups)
            self._cache[key] = groups
        return self._cache[key]

    def _global(self, step: int, micro: int, accum: int, global_batch: int) -> tuple[tuple[int, int], list[int]]:
        if step < 0 or accum < 1 or not 0 <= micro < accum:
            raise ImageDataError(f"step {step}, micro-batch {micro} of {accum}; expected step >= 0 and 0 <= micro < accum")
        j = step * accum + micro
        epoch, k = divmod(j, self.batches_per_epoch(global_batch))
        return self._epoch(global_batch, epoch)[k]

    def global_batch(self, step: int, micro: int, accum: int, global_batch: int) -> list[int]:
        """Item indices of the whole global micro-batch (all ranks)."""
        return list(self._global(step, micro, accum, global_batch)[1])

    def bucket(self, step: int, micro: int, accum: int, global_batch: int) -> tuple[int, int]:
        """The (width, height) bucket of that global micro-batch."""
        return self._global(step, micro, accum, global_batch)[0]

    def batch(self, step: int, micro: int, accum: int, global_batch: int, rank: int, world: int) -> list[int]:
        """Item indices of rank ``rank``'s share of micro-batch ``micro`` of optimiser step ``step``.

        Positions ``[rank·G/W, (rank+1)·G/W)`` of the global micro-batch (all from one bucket).

        Raises:
            ImageDataError: ``global_batch`` not a multiple of ``world``, or a bad rank/step.
        """
        self._check_batch(global_batch, world)
        if not 0 <= rank < world:
            raise ImageDataError(f"rank {rank} of {world} processes; expected 0 <= rank < world")
        per = global_batch // world
        return self.global_batch(step, micro, accum, global_batch)[rank * per : (rank + 1) * per]

    def flip_for(self, step: int, micro: int, position: int) -> bool:
        """Whether to mirror the sample at ``position`` of the global micro-batch (``rank·G/W + i``)."""
        if not self.random_flip:
            return False
        return random.Random(f"lohakit-flip:{self.seed}:{step}:{micro}:{position}").random() < 0.5

    def caption_rng(self, step: int, micro: int, position: int) -> random.Random:
        """A fresh rng for :func:`process_caption` of the sample at ``position`` of the global micro-batch."""
        return random.Random(f"lohakit-caption:{self.seed}:{step}:{micro}:{position}")
