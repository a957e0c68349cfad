"""Decoding user images safely: the Pillow pitfalls, image folders with bad files, and tar shards."""

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import ImageFolderDataset, ImageLoadError, ShardDataset, build_dataset, collate_skipping, load_image
from vitlab.data.shards import expand_shard_pattern


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels but holds a tiny (wrong) image stream: a decompression bomb
    stand-in that costs nothing to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64], [32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").convert("L").getpixel((0, 1)) == 255  # the pitfall: plain convert clips
    img = load_image(tmp_path / "deep.png", channels=1)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), [[0, 64], [128, 255]])


def test_transparency_is_composited_over_the_background(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red
    rgba[0, 1] = (0, 0, 255, 0)     # fully transparent blue: must not show
    rgba[1, 0] = (0, 0, 0, 128)     # half-transparent black over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = np.asarray(load_image(tmp_path / "alpha.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])
    black = np.asarray(load_image(tmp_path / "alpha.png", background=(0, 0, 0)))
    assert tuple(black[0, 1]) == (0, 0, 0)


def test_cmyk_jpeg_and_exif_orientation(tmp_path):
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    red = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert red.shape == (4, 8, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 5, 10))  # white strip on the left
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    shown = np.asarray(load_image(tmp_path / "rot.jpg", channels=1))
    assert shown.shape == (20, 10)  # displayed upright: 10 wide, 20 tall
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the left strip is now at the top


def test_broken_files_raise_one_error_that_names_them(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=r"trunc\.png: cannot decode"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(ImageLoadError, match=r"junk\.jpg: cannot decode"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(ImageLoadError, match=r"bomb\.png: image too large"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match=r"big\.png: image too large \(100x100"):
        load_image(tmp_path / "big.png", max_pixels=5000)


def make_messy_folder(root: Path) -> dict[str, Path]:
    """Two classes with good images in several modes plus corrupt, truncated and oversized files."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / cls / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)).save(root / "cat" / "deep16.png")
    Image.new("RGBA", (12, 12), (10, 20, 30, 100)).save(root / "cat" / "alpha.png")
    Image.new("CMYK", (12, 12), (0, 50, 100, 0)).save(root / "dog" / "cmyk.jpg")
    data = (root / "cat" / "rgb0.png").read_bytes()
    bad = {"corrupt": root / "dog" / "corrupt.png", "truncated": root / "dog" / "truncated.png",
           "huge": root / "cat" / "huge.png"}
    bad["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    bad["truncated"].write_bytes(data[: len(data) // 2])
    png_header_only(bad["huge"], 40000, 40000)
    return bad


def test_image_folder_skips_and_names_bad_files(tmp_path):
    bad = make_messy_folder(tmp_path / "data")
    ds = build_dataset(tmp_path / "data", channels=3)
    assert isinstance(ds, ImageFolderDataset) and ds.class_names == ["cat", "dog"] and len(ds) == 12
    from vitlab.preprocessing import Preprocessing

    ds.transform = Preprocessing.for_model(8).transform()
    images, labels, skipped = collate_skipping([ds[i] for i in range(len(ds))])
    assert images.shape == (9, 3, 8, 8) and labels.tolist().count(0) == 5
    assert sorted(Path(r.split(": ")[0]).name for r in skipped) == sorted(p.name for p in bad.values())
    strict = ImageFolderDataset(tmp_path / "data", on_error="fail")
    with pytest.raises(ImageLoadError, match="huge.png"):
        [strict[i] for i in range(len(strict))]


def write_shards(folder: Path, n_shards: int, per_shard: int, bad_key: str | None = None) -> list[int]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("zero\none\ntwo\n")
    labels = []
    for s in range(n_shards):
        with tarfile.open(folder / f"part-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                value = s * per_shard + i
                buf = io.BytesIO()
                Image.new("L", (4, 4), value % 256).save(buf, format="PNG")
                payload = b"not a png" if key == bad_key else buf.getvalue()
                for ext, data in (("png", payload), ("cls", str(value % 3).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                labels.append(value % 3)
    return labels



@pytest.mark.parametrize("n_shards", [6, 2])  # by shard (6 >= 4 slots) and by sample (2 < 4 slots)
def test_shards_split_over_ranks_and_workers_exactly_once(tmp_path, n_shards):
    write_shards(tmp_path / "sh", n_shards, 12 // n_shards * 2)
    total = n_shards * (12 // n_shards * 2)
    to_tensor = lambda img: torch.from_numpy(np.asarray(img)).unsqueeze(0)  # noqa: E731
    seen = []
    for rank in range(2):
        ds = ShardDataset(tmp_path / "sh", transform=to_tensor, channels=1, rank=rank, world_size=2)
        assert len(ds) == total and ds.class_names == ["zero", "one", "two"]
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen += [int(x[0, 0, 0]) for x, _ in loader]
    assert sorted(seen) == list(range(total))


def test_shard_patterns_and_bad_samples(tmp_path):
    write_shards(tmp_path / "sh", 3, 4, bad_key="s1_002")
    files = expand_shard_pattern(str(tmp_path / "sh" / "part-{0000..0002}.tar"))
    assert [f.name for f in files] == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    assert len(expand_shard_pattern(str(tmp_path / "sh" / "part-*.tar"))) == 3
    ds = build_dataset(str(tmp_path / "sh" / "part-{0000..0002}.tar"), channels=1)
    samples = list(ds)
    bad = [x for x, _ in samples if hasattr(x, "reason")]
    assert len(samples) == 12 and len(bad) == 1 and "part-0001.tar:s1_002" in bad[0].reason
