"""Helpers of the serving tests: a small named checkpoint, images as files and bytes, an HTTP client on urllib (real
requests to loopback servers the tests start) and a Prometheus text parser."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import vitlab

from .conftest import randomize_

CLASSES = ["apple", "boat", "cloud", "dune", "elk", "fern", "gate"]
TINY_RGB = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_dim=96, num_classes=len(CLASSES))


def tiny_model():
    """A 3-channel ViT with 4x4 patches of 8 px, random weights (so that every probability differs)."""
    model = vitlab.create_model("vit_ti16", **TINY_RGB)
    randomize_(model, std=0.2)
    model.class_names = list(CLASSES)
    return model.eval()


def save_tiny(path: Path) -> Path:
    model = tiny_model()
    vitlab.save(model, path, class_names=CLASSES)
    return path


def write_images(folder: Path, count: int = 7) -> list[Path]:
    """Different kinds of images: RGB PNG and JPEG of several sizes, grey, 16-bit, palette GIF, CMYK JPEG, and a
    JPEG whose EXIF orientation says to rotate it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        height, width = 24 + 7 * i, 40 - 3 * i
        kind = i % 7
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if kind == 0:
            image, name = Image.fromarray(pixels), f"img{i}.png"
        elif kind == 1:
            image, name = Image.fromarray(pixels), f"img{i}.jpg"
        elif kind == 2:
            image, name = Image.fromarray(pixels[..., 0]), f"img{i}.png"
        elif kind == 3:
            image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)  # 16-bit grey (I;16)
            name = f"img{i}.png"
        elif kind == 4:
            image, name = Image.fromarray(pixels).convert("RGBA").convert("P"), f"img{i}.gif"
        elif kind == 5:
            image, name = Image.fromarray(pixels).convert("CMYK"), f"img{i}.jpg"
        else:
            image, name = Image.fromarray(pixels), f"img{i}_rotated.jpg"
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
            image.save(folder / name, exif=exif.tobytes())
            paths.append(folder / name)
            continue
        image.save(folder / name)
        paths.append(folder / name)
    return paths


def png_bytes(size=(30, 20), colour=(200, 40, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def noise_png(size=(64, 64), seed=0) -> bytes:
    """A PNG of random pixels (does not compress: cutting it anywhere loses pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_of_size(width: int, height: int, *, rows: int | None = None, bits: int = 1) -> bytes:
    """A grey PNG of ``width`` x ``height`` zero pixels (``bits`` per pixel: 1, 8 or 16), written chunk by chunk (no
    image in memory). With ``rows`` only that many rows of pixel data are stored: a small file whose header promises
    a huge image (the shape of a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    row = bytes(1 + (width * bits + 7) // 8)  # filter byte + packed samples
    compressor = zlib.compressobj(6)
    stored = height if rows is None else rows
    block = row * max(1, min(stored, (1 << 22) // len(row)))
    data, left = [], stored
    while left > 0:
        n = min(left, len(block) // len(row))
        data.append(compressor.compress(block[: n * len(row)]))
        left -= n
    data.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(data))
            + _chunk(b"IEND", b""))


def multipart(files: list[tuple[str, bytes]], fields: dict | None = None, field: str = "image") -> tuple[bytes, str]:
    """A multipart/form-data body with the files under ``field`` and the other fields; returns (body, type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(url: str, data=None, headers: dict | None = None, method: str | None = None, timeout: float = 120.0):
    """(status, headers, body bytes) of a real HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post_files(url: str, files: list[tuple[str, bytes]], fields: dict | None = None, headers: dict | None = None):
    body, kind = multipart(files, fields)
    status, head, raw = request(url, body, {"Content-Type": kind, **(headers or {})})
    return status, head, json.loads(raw)


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def scrape(base: str, headers: dict | None = None) -> dict:
    status, _, body = request(base + "/metrics", headers=headers)
    assert status == 200
    return metric_values(body.decode())


@contextlib.contextmanager
def cli_server(*args: str):
    """``vitlab serve ARGS --port 0`` in a child process: yields (its first stdout line, the base URL); killed after.
    The line is checked by the caller (it names the model), the URL read from it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert " at http://" in line, line + proc.stderr.read()
        yield line, line.split(" at ")[1].split("/ ")[0]
    finally:
        proc.kill()
        proc.wait()
