"""lohakit.app.imagedata: folder layouts, captions, bad input, buckets, pixels, sample order.

Tiny images are written with PIL into tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from lohakit.app.imagedata import (  # noqa: E402
    ImageBatches,
    ImageDataError,
    ImageItem,
    bucket_for,
    load_pixels,
    make_buckets,
    process_caption,
    scan_images,
    tag_frequencies,
)


def img(path: Path, size=(24, 16), mode="RGB", color=(200, 30, 60), fmt=None) -> Path:
    """Write a small image with a left/right gradient (so flips are visible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    for x in range(size[0]):
        for y in range(size[1]):
            im.putpixel((x, y), (x * 255 // max(1, size[0] - 1), y * 255 // max(1, size[1] - 1), color[2]))
    if mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def cap(path: Path, text: str, ext: str = ".txt") -> None:
    path.with_suffix(ext).write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------
def test_flat_folder_mixed_formats(tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    a = img(root / "a.png", (32, 16))
    b = img(root / "b.JPG", (16, 32), fmt="JPEG")
    c = img(root / "c.webp", (20, 20))
    d = img(root / "d.png", (10, 12), mode="RGBA")
    e = img(root / "e.png", (12, 10), mode="L")
    f = img(root / "f.png", (8, 8), mode="P")
    for p, t in [(a, "  a cat, red \nsecond line"), (b, "\n\nb dog"), (c, "c"), (d, "d"), (e, "e"), (f, "f")]:
        cap(p, t)
    (root / "notes.md").write_text("ignored")
    img(root / ".hidden.png")  # hidden: skipped like kohya's glob("*")
    img(root / "sub" / "deep.png")  # flat layout does not recurse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items, rep = scan_images(root)
    assert [i.path.name for i in items] == ["a.png", "b.JPG", "c.webp", "d.png", "e.png", "f.png"]
    assert items[0].caption == "a cat, red"  # first line, stripped
    assert items[1].caption == "b dog"  # first non-blank line
    assert [(i.width, i.height) for i in items[:2]] == [(32, 16), (16, 32)]
    assert {i.concept for i in items} == {"mydata"} and {i.repeats for i in items} == {1}
    assert rep.layout == "flat" and rep.n_images == 6 and rep.n_samples == 6 and rep.missing_captions == 0
    assert rep.concepts == {"mydata": 6}


@pytest.mark.parametrize("ext", [".caption", "caption"])
def test_caption_extension(tmp_path: Path, ext: str) -> None:
    p = img(tmp_path / "a.png")
    cap(p, "from caption", ".caption")
    cap(p, "from txt", ".txt")
    items, _ = scan_images(tmp_path, caption_ext=ext)
    assert items[0].caption == "from caption"


def test_repeat_folders(tmp_path: Path) -> None:
    root = tmp_path / "train"
    for n in ("b", "a"):
        cap(img(root / "10_my_char" / f"{n}.png"), f"{n}, tag")
    cap(img(root / "2_style" / "x.jpg", fmt="JPEG"), "x")
    img(root / "2_style" / "nested" / "y.png")  # one level deep, like kohya
    img(root / "unprefixed" / "z.png")  # ignored, like kohya
    img(root / "0_zero" / "z.png")  # N < 1: ignored
    img(root / "loose.png")  # loose images ignored in this layout
    with pytest.warns(UserWarning, match="ignored 3") as rec:
        items, rep = scan_images(root)
    assert len(rec) == 1
    assert [(i.path.parent.name, i.path.name) for i in items] == [("10_my_char", "a.png"), ("10_my_char", "b.png"), ("2_style", "x.jpg")]
    assert [i.repeats for i in items] == [10, 10, 2]
    assert [i.concept for i in items] == ["my_char", "my_char", "style"]
    assert [i.dataset for i in items] == ["10_my_char", "10_my_char", "2_style"]
    assert rep.layout == "repeat_folders" and rep.n_images == 3 and rep.n_samples == 22
    assert rep.concepts == {"my_char": 2, "style": 1} and rep.concept_samples == {"my_char": 20, "style": 2}
    assert [p.name for p in rep.ignored] == ["0_zero", "loose.png", "unprefixed"]


def test_metadata_jsonl(tmp_path: Path) -> None:
    img(tmp_path / "b.png")
    img(tmp_path / "imgs" / "a.webp")
    img(tmp_path / "unlisted.png")
    cap(tmp_path / "b.png", "caption file is not used")
    lines = [{"file_name": "b.png", "text": " bee "}, {"file_name": "imgs/a.webp", "text": "ant\nmore"}, {}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n", encoding="utf-8")
    items, rep = scan_images(tmp_path)
    assert [(i.path.relative_to(tmp_path).as_posix(), i.caption) for i in items] == [("b.png", "bee"), ("imgs/a.webp", "ant")]
    assert rep.layout == "metadata" and rep.n_images == 2 and {i.concept for i in items} == {tmp_path.name}


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"file_name": "a.png", "text": "x"}\nnot json\n', r"metadata.jsonl:2: not valid JSON"),
        ('{"file_name": "a.png"}\n', r"metadata.jsonl:1: no field 'text'"),
        ('{"text": "x"}\n', r"metadata.jsonl:1: no field 'file_name'"),
        ('[1, 2]\n', r"metadata.jsonl:1: expected a JSON object"),
        ('{"file_name": "a.png", "text": 3}\n', r"metadata.jsonl:1: field 'text' must be a string"),
        ('{"file_name": "gone.png", "text": "x"}\n', r"metadata.jsonl:1: file_name 'gone.png' does not exist"),
        ('{"file_name": "../a.png", "text": "x"}\n', r"metadata.jsonl:1: file_name '../a.png' must be a relative path"),
        ('{"file_name": "a.txt", "text": "x"}\n', r"metadata.jsonl:1: file_name 'a.txt' is not an image"),
        ('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n', r":2: file_name 'a.png' is listed twice"),
        ("\n\n", r"lists no images"),
    ],
)
def test_bad_metadata(tmp_path: Path, content: str, match: str) -> None:
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "metadata.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(ImageDataError, match=match):
        scan_images(tmp_path)


# ------------------------------------------------------------------------------------------
# Missing captions
# ------------------------------------------------------------------------------------------
def _half_captioned(root: Path) -> None:
    cap(img(root / "5_dog" / "a.png"), "has caption")
    img(root / "5_dog" / "b.png")
    cap(img(root / "5_dog" / "c.png"), "  \n \n")  # blank file: missing
    img(root / "5_dog" / "d.png")


@pytest.mark.parametrize(
    "mode, expected, n_warnings",
    [
        ("warn", ["has caption", "", "", ""], 1),
        ("empty", ["has caption", "", "", ""], 0),
        ("folder", ["has caption", "dog", "dog", "dog"], 0),
    ],
)
def test_missing_caption_modes(tmp_path: Path, mode: str, expected: list[str], n_warnings: int) -> None:
    _half_captioned(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        items, rep = scan_images(tmp_path, missing_caption=mode)
    assert [i.caption for i in items] == expected and rep.missing_captions == 3
    assert len(rec) == n_warnings
    if n_warnings:
        assert "3 image(s) have no caption" in str(rec[0].message) and rec[0].category is UserWarning


def test_missing_caption_folder_flat_and_metadata(tmp_path: Path) -> None:
    flat = tmp_path / "concept_x"
    img(flat / "a.png")
    items, rep = scan_images(flat, missing_caption="folder")
    assert items[0].caption == "concept_x" and rep.missing_captions == 1
    meta = tmp_path / "meta"
    img(meta / "a.png")
    img(meta / "b.png")
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": ""}\n{"file_name": "b.png", "text": "b"}\n')
    with pytest.warns(UserWarning, match="1 image"):
        items, rep = scan_images(meta)
    assert [i.caption for i in items] == ["", "b"] and rep.missing_captions == 1


def test_missing_caption_error(tmp_path: Path) -> None:
    _half_captioned(tmp_path)
    with pytest.raises(ImageDataError, match=r"3 image\(s\) have no caption.*first '.*b\.png'"):
        scan_images(tmp_path, missing_caption="error")


def test_bad_options(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    with pytest.raises(ImageDataError, match="missing_caption='nope'"):
        scan_images(tmp_path, missing_caption="nope")  # type: ignore[arg-type]
    with pytest.raises(ImageDataError, match="caption extension '.png'"):
        scan_images(tmp_path, caption_ext=".png")


def test_caption_not_utf8(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ImageDataError, match=r"caption '.*a\.txt' is not UTF-8"):
        scan_images(tmp_path)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def _truncated(root: Path) -> Path:
    good = img(root / "good.png", (64, 64))
    cap(good, "ok")
    bad = img(root / "bad.png", (64, 64))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    cap(bad, "ok")
    return bad


def test_truncated_image_raises(tmp_path: Path) -> None:
    _truncated(tmp_path)
    with pytest.raises(ImageDataError, match=r"image '.*bad\.png' is not a readable"):
        scan_images(tmp_path)


def test_truncated_image_skipped(tmp_path: Path) -> None:
    bad = _truncated(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*bad\.png") as rec:
        items, rep = scan_images(tmp_path, skip_bad_images=True)
    assert len(rec) == 1
    assert [i.path.name for i in items] == ["good.png"] and rep.skipped == [bad] and rep.n_images == 1


def test_garbage_and_truncated_jpeg(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg")
    j = img(tmp_path / "y.jpg", (64, 64), fmt="JPEG")
    j.write_bytes(j.read_bytes()[:200])
    with pytest.warns(UserWarning, match="skipped 2"), pytest.raises(ImageDataError, match="no readable images"):
        scan_images(tmp_path, skip_bad_images=True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_not_opened(tmp_path: Path) -> None:
    cap(img(tmp_path / "a.png"), "a")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageDataError, match=r"pipe\.png' is not a regular file"):
        scan_images(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        items, rep = scan_images(tmp_path, skip_bad_images=True)
    assert [i.path.name for i in items] == ["a.png"]


@pytest.mark.skipif(not os.path.exists("/dev/null") or not hasattr(os, "mkfifo"), reason="needs /dev/null and mkfifo")
def test_device_symlink_and_fifo_caption(tmp_path: Path) -> None:
    root = tmp_path / "d"
    cap(img(root / "a.png"), "a")
    os.symlink("/dev/null", root / "dev.png")
    with pytest.raises(ImageDataError, match=r"dev\.png' is not a regular file"):
        scan_images(root)
    (root / "dev.png").unlink()
    os.symlink(root / "a.png", root / "link.png")  # a symlink to a regular file is fine
    cap(root / "link.png", "l")
    assert [i.path.name for i in scan_images(root)[0]] == ["a.png", "link.png"]
    img(root / "b.png")
    os.mkfifo(root / "b.txt")
    with pytest.raises(ImageDataError, match=r"caption '.*b\.txt' is not a regular file"):
        scan_images(root)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda r: None, r"image folder '.*root' does not exist"),
        (lambda r: r.write_text("x"), r"image folder '.*root' is not a folder"),
        (lambda r: r.mkdir(), r"image folder '.*root' has no images"),
        (lambda r: (r.mkdir(), (r / "a.txt").write_text("only text")), r"has no images"),
        (lambda r: (r / "3_empty").mkdir(parents=True), r"repeat folder '.*3_empty' has no images"),
    ],
    ids=["missing", "file", "empty", "no-images", "empty-repeat-folder"],
)
def test_bad_roots(tmp_path: Path, setup, match: str) -> None:
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(ImageDataError, match=match):
        scan_images(root)


def test_error_is_value_error_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as ei:
        scan_images(tmp_path / "nope")
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "resolution, factor, step, max_aspect",
    [(512, 8, None, 2.0), (512, 8, 64, 2.0), (1024, 16, 64, 2.0), (1024, 8, 32, 3.0),
     (256, 16, None, 1.5), (64, 8, None, 4.0), (8, 8, None, 2.0)],
)
def test_bucket_properties(resolution: int, factor: int, step: int | None, max_aspect: float) -> None:
    buckets = make_buckets(resolution, factor, step=step, max_aspect=max_aspect)
    s = step or factor
    assert (resolution, resolution) in buckets
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % s == 0 and h % s == 0 and w % factor == 0 and h % factor == 0
        assert w * h <= resolution**2
        assert 1 / max_aspect - 1e-9 <= w / h <= max_aspect + 1e-9
        assert (h, w) in buckets
        # as close to the area as the grid allows: one more step of height would exceed it
        assert w * (h + s) > resolution**2 or h * (w + s) > resolution**2


def test_buckets_match_kohya_512() -> None:
    # kohya make_bucket_resolutions((512, 512), 256, 1024, 64) restricted to aspect <= 2
    assert make_buckets(512, 8, step=64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


@pytest.mark.parametrize(
    "args, match",
    [((500, 8), r"--resolution 500: expected a positive multiple of the model's factor 8"), ((0, 8), "--resolution 0"),
     ((512, 0), "factor 0"), ((512, 8, 60), "step 60"), ((544, 8, 64), r"--resolution 544.*bucket step 64")],
)
def test_bucket_bad_args(args, match: str) -> None:
    res, factor, *step = args
    with pytest.raises(ImageDataError, match=match):
        make_buckets(res, factor, step=step[0] if step else None)


@pytest.mark.parametrize(
    "size, expected",
    [((100, 100), (512, 512)), ((1000, 600), (640, 384)), ((600, 1000), (384, 640)), ((4000, 100), (640, 384)),
     ((1100, 900), (576, 448)), ((50, 5000), (384, 640))],
)
def test_bucket_for(size, expected) -> None:
    buckets = make_buckets(512, 8, step=64)
    assert bucket_for(*size, buckets) == expected
    # it is the log-aspect minimiser
    best = min(abs(math.log(w / h) - math.log(size[0] / size[1])) for w, h in buckets)
    assert math.isclose(abs(math.log(expected[0] / expected[1]) - math.log(size[0] / size[1])), best, abs_tol=1e-12)


def test_bucket_for_ties() -> None:
    assert bucket_for(10, 10, [(128, 128), (64, 64), (32, 32)]) == (128, 128)  # same aspect: larger area
    assert bucket_for(10, 10, [(64, 32), (32, 64)]) == (64, 32)  # same error, same area: wider, deterministic
    with pytest.raises(ImageDataError):
        bucket_for(10, 10, [])


# ------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, fmt, suffix",
    [("RGB", "PNG", ".png"), ("RGBA", "PNG", ".png"), ("L", "PNG", ".png"), ("P", "PNG", ".png"), ("LA", "PNG", ".png"),
     ("I;16", "PNG", ".png"), ("RGB", "JPEG", ".jpg"), ("L", "JPEG", ".jpeg"), ("CMYK", "JPEG", ".jpg"),
     ("RGB", "WEBP", ".webp"), ("RGBA", "WEBP", ".webp")],
)
def test_load_pixels_modes(tmp_path: Path, mode: str, fmt: str, suffix: str) -> None:
    p = img(tmp_path / f"a{suffix}", (30, 20), mode=mode, fmt=fmt)
    x = load_pixels(p, (16, 8), flip=False)
    assert x.shape == (3, 8, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert torch.equal(load_pixels(p, (16, 8), flip=False), x)  # pure
    assert torch.equal(load_pixels(p, (16, 8), flip=True), torch.flip(x, dims=[-1]))


def test_load_pixels_alpha_on_white(tmp_path: Path) -> None:
    p = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(p)
    assert torch.equal(load_pixels(p, (8, 8)), torch.ones(3, 8, 8))
    q = tmp_path / "q.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 255)).save(q)
    assert torch.equal(load_pixels(q, (8, 8)), -torch.ones(3, 8, 8))


def test_load_pixels_cover_and_center_crop(tmp_path: Path) -> None:
    # 40x10: left quarter red, middle half green, right quarter blue; into a 10x10 bucket -> the green middle
    im = Image.new("RGB", (40, 10), (0, 255, 0))
    im.paste((255, 0, 0), (0, 0, 10, 10))
    im.paste((0, 0, 255), (30, 0, 40, 10))
    p = tmp_path / "bars.png"
    im.save(p)
    x = load_pixels(p, (10, 10))
    assert x.shape == (3, 10, 10)
    assert torch.allclose(x[:, :, 3:7], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 10, 4), atol=0.05)
    # upscaling: 4x2 into 16x16 covers (32x16), crops the middle
    assert load_pixels(img(tmp_path / "small.png", (4, 2)), (16, 16)).shape == (3, 16, 16)


def test_load_pixels_exif_orientation(tmp_path: Path) -> None:
    p = img(tmp_path / "o.jpg", (40, 20), fmt="JPEG")
    im = Image.open(p)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: displayed 20x40
    im.save(p, exif=exif)
    items, _ = scan_images(tmp_path, missing_caption="empty")
    assert (items[0].width, items[0].height) == (20, 40)
    assert load_pixels(p, (8, 16)).shape == (3, 16, 8)


def test_load_pixels_bad_file(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    p.write_bytes(b"nope")
    with pytest.raises(ImageDataError, match=r"x\.png' cannot be decoded"):
        load_pixels(p, (8, 8))


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------
def test_process_caption_unchanged_without_shuffle() -> None:
    assert process_caption("  a,b , c ", random.Random(0)) == "  a,b , c "


def test_process_caption_shuffle_keep_tokens() -> None:
    caption = "sks person, red hat, smiling, outdoors, night"
    seen = set()
    for s in range(50):
        out = process_caption(caption, random.Random(s), shuffle=True, keep_tokens=1)
        tags = out.split(", ")
        assert tags[0] == "sks person" and sorted(tags) == sorted(t.strip() for t in caption.split(","))
        seen.add(out)
        assert out == process_caption(caption, random.Random(s), shuffle=True, keep_tokens=1)  # rng-determined
    assert len(seen) > 5
    assert process_caption("a, b, c", random.Random(0), shuffle=True, keep_tokens=3) == "a, b, c"
    assert process_caption("a|b|c", random.Random(0), shuffle=True, keep_tokens=3, separator="|") == "a| b| c"


def test_process_caption_dropout() -> None:
    assert process_caption("a, b", random.Random(0), dropout=1.0) == ""
    assert process_caption("a, b", random.Random(0), dropout=0.0) == "a, b"
    rng = random.Random(1)
    n = sum(process_caption("a", rng, dropout=0.25) == "" for _ in range(4000))
    assert 800 < n < 1200
    with pytest.raises(ImageDataError):
        process_caption("a", random.Random(0), dropout=1.5)


def test_tag_frequencies_per_image_not_per_repeat() -> None:
    def it(dataset: str, caption: str, repeats: int) -> ImageItem:
        return ImageItem(Path(f"/x/{dataset}/{caption}.png"), caption, repeats, dataset.split("_", 1)[-1], 8, 8, dataset)

    items = [it("10_mychar", "Red Hat, smiling", 10), it("10_mychar", "red hat, , night", 10), it("2_style", "", 2),
             ImageItem(Path("/x/a.png"), "flat, tag", 1, "root", 8, 8)]
    assert tag_frequencies(items) == {
        "10_mychar": {"red hat": 2, "smiling": 1, "night": 1},
        "2_style": {},
        "root": {"flat": 1, "tag": 1},
    }


def test_tag_frequencies_from_scan(tmp_path: Path) -> None:
    cap(img(tmp_path / "3_cat" / "a.png"), "cat, tabby")
    cap(img(tmp_path / "3_cat" / "b.png"), "cat")
    items, _ = scan_images(tmp_path)
    assert tag_frequencies(items) == {"3_cat": {"cat": 2, "tabby": 1}}


# ------------------------------------------------------------------------------------------
# Sample order
# ------------------------------------------------------------------------------------------
BUCKETS = make_buckets(64, 8, step=16)


def make_items(spec: list[tuple[tuple[int, int], int]]) -> list[ImageItem]:
    """Items of the given (size, repeats)."""
    return [ImageItem(Path(f"/d/{i}.png"), f"c{i}", r, "c", w, h, "ds") for i, ((w, h), r) in enumerate(spec)]


SPEC = [((64, 64), 3), ((64, 64), 1), ((128, 64), 2), ((128, 64), 2), ((64, 128), 1), ((64, 128), 1), ((64, 128), 4), ((60, 64), 1)]


def test_batches_pure_and_resumable() -> None:
    items = make_items(SPEC)
    a, b = ImageBatches(items, BUCKETS, seed=7), ImageBatches(items, BUCKETS, seed=7)
    for step in range(30):
        assert a.batch(step, 1, 2, 4, 0, 1) == ImageBatches(items, BUCKETS, seed=7).batch(step, 1, 2, 4, 0, 1)
    # queried in reverse order on a used object: the same
    assert [b.batch(s, 0, 2, 4, 0, 1) for s in reversed(range(30))] == [a.batch(s, 0, 2, 4, 0, 1) for s in reversed(range(30))]
    other = ImageBatches(items, BUCKETS, seed=8)
    assert [other.batch(s, 0, 1, 4, 0, 1) for s in range(10)] != [a.batch(s, 0, 1, 4, 0, 1) for s in range(10)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shares_stack_one_bucket(world: int) -> None:
    items = make_items(SPEC)
    bt = ImageBatches(items, BUCKETS, seed=3)
    G, accum = 4, 3
    for step in range(12):
        for micro in range(accum):
            whole = bt.batch(step, micro, accum, G, 0, 1)
            shares = [bt.batch(step, micro, accum, G, r, world) for r in range(world)]
            assert sum(shares, []) == whole == bt.global_batch(step, micro, accum, G)
            assert all(len(s) == G // world for s in shares)
            assert {bt.item_buckets[i] for i in whole} == {bt.bucket(step, micro, accum, G)}


def test_batch_checks() -> None:
    bt = ImageBatches(make_items(SPEC), BUCKETS)
    with pytest.raises(ImageDataError, match="not divisible by the 3 processes"):
        bt.batch(0, 0, 1, 4, 0, 3)
    with pytest.raises(ImageDataError, match="rank"):
        bt.batch(0, 0, 1, 4, 2, 2)
    with pytest.raises(ImageDataError, match="micro"):
        bt.batch(0, 2, 2, 4, 0, 1)
    with pytest.raises(ImageDataError):
        ImageBatches([], BUCKETS)


@pytest.mark.parametrize("G", [1, 2, 3, 5, 16])
def test_epoch_covers_every_sample(G: int) -> None:
    items = make_items(SPEC)
    bt = ImageBatches(items, BUCKETS, seed=11)
    counts = bt.bucket_counts()
    B = bt.batches_per_epoch(G)
    assert B == sum(math.ceil(n / G) for n in counts.values())
    assert bt.steps_per_epoch(G, accum=2) == math.ceil(B / 2)
    for epoch in range(3):
        seen = Counter(i for j in range(epoch * B, (epoch + 1) * B) for i in bt.batch(j, 0, 1, G, 0, 1))
        for i, it in enumerate(items):
            assert seen[i] >= it.repeats  # every sample once per repeat...
        # ...plus at most G-1 wrap-around fills per bucket
        extra = sum(seen.values()) - bt.n_samples
        assert extra == sum(math.ceil(n / G) * G - n for n in counts.values())
        if all(n % G == 0 for n in counts.values()):
            assert all(seen[i] == it.repeats for i, it in enumerate(items))
    # epochs are shuffled differently
    assert [bt.batch(j, 0, 1, G, 0, 1) for j in range(B)] != [bt.batch(j, 0, 1, G, 0, 1) for j in range(B, 2 * B)] or B == 1


def test_small_bucket_wraps_within_itself() -> None:
    items = make_items([((64, 64), 1), ((64, 64), 1), ((128, 64), 5)])
    bt = ImageBatches(items, BUCKETS, seed=0)
    batches = [bt.batch(j, 0, 1, 4, 0, 1) for j in range(bt.batches_per_epoch(4))]
    square = [b for b in batches if bt.item_buckets[b[0]] == (64, 64)]
    assert len(square) == 1 and sorted(square[0]) == [0, 0, 1, 1]
    assert sorted(i for b in batches if b not in square for i in b) == [2] * 8


def test_flip_and_caption_rng_pure() -> None:
    items = make_items(SPEC)
    bt = ImageBatches(items, BUCKETS, seed=5, random_flip=True)
    flips = [bt.flip_for(s, m, p) for s in range(20) for m in range(2) for p in range(4)]
    fresh = ImageBatches(items, BUCKETS, seed=5, random_flip=True)
    assert flips == [fresh.flip_for(s, m, p) for s in range(20) for m in range(2) for p in range(4)]
    assert 40 < sum(flips) < 120
    assert not any(ImageBatches(items, BUCKETS, seed=5).flip_for(s, 0, 0) for s in range(20))
    r1, r2 = bt.caption_rng(3, 1, 2), ImageBatches(items, BUCKETS, seed=5).caption_rng(3, 1, 2)
    assert [r1.random() for _ in range(5)] == [r2.random() for _ in range(5)]
    assert bt.caption_rng(3, 1, 2).random() != bt.caption_rng(3, 1, 3).random()


def test_scan_to_batches_end_to_end(tmp_path: Path) -> None:
    cap(img(tmp_path / "2_a" / "wide.png", (48, 24)), "wide, thing")
    cap(img(tmp_path / "2_a" / "tall.png", (24, 48)), "tall")
    cap(img(tmp_path / "1_b" / "sq.webp", (32, 32)), "square")
    items, rep = scan_images(tmp_path)
    buckets = make_buckets(32, 8, step=8)
    bt = ImageBatches(items, buckets, seed=0, random_flip=True)
    assert bt.n_samples == rep.n_samples == 5
    for step in range(bt.steps_per_epoch(2)):
        idx = bt.batch(step, 0, 1, 2, 0, 1)
        bucket = bt.bucket(step, 0, 1, 2)
        x = torch.stack([load_pixels(items[i].path, bucket, bt.flip_for(step, 0, p)) for p, i in enumerate(idx)])
        assert x.shape == (2, 3, bucket[1], bucket[0])
        caps = [process_caption(items[i].caption, bt.caption_rng(step, 0, p), shuffle=True) for p, i in enumerate(idx)]
        assert all(isinstance(c, str) for c in caps)


# ------------------------------------------------------------------ limits (adversarial run, 2026-12-02)
def test_limits_on_repeats_caption_size_pixels_and_formats(tmp_path, monkeypatch):
    from PIL import Image

    from lohakit.app import imagedata as idata

    def folder(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        return d

    rep = folder("rep")
    (rep / "99999_x").mkdir()
    Image.new("RGB", (8, 8)).save(rep / "99999_x" / "a.png")
    with pytest.raises(ImageDataError, match="99999 repeats; expected at most 10,000"):
        scan_images(rep)
    cap = folder("cap")
    Image.new("RGB", (8, 8)).save(cap / "a.png")
    (cap / "a.txt").write_text("x" * (idata.MAX_CAPTION_BYTES + 1))
    with pytest.raises(ImageDataError, match="a.txt.*bytes; expected at most"):
        scan_images(cap)
    gif = folder("gif")
    Image.new("RGB", (8, 8)).save(gif / "a.png", format="GIF")
    with pytest.raises(ImageDataError, match="its content is GIF"):
        scan_images(gif)
    big = folder("big")
    Image.new("RGB", (20, 20)).save(big / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: above the warning limit, below the error one
    with pytest.raises(ImageDataError, match="exceeds limit"):
        scan_images(big)
