"""``vitlab serve`` with a model of 4 input bands: ``.npy`` and multi-band TIFF uploads are decoded by the readers
training uses (``load_sample``) and answered as ``vitlab predict`` answers the same files; object arrays, arrays of
the wrong shape and small uploads whose headers promise many pixels are refused with a 400 before decoding."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
tifffile = pytest.importorskip("tifffile")

import vitlab  # noqa: E402
from vitlab.cli import main as cli_main  # noqa: E402
from vitlab.data.images import declared_pixels  # noqa: E402
from vitlab.serve import BackgroundServer, create_app  # noqa: E402

from .conftest import randomize_  # noqa: E402
from .serve_helpers import post_files, request  # noqa: E402

BANDS = ["crop", "water", "urban"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = vitlab.create_model("vit_ti16", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                                num_classes=len(BANDS), in_chans=4)
    randomize_(model, std=0.2)
    return vitlab.save(model.eval(), tmp_path_factory.mktemp("bands") / "bands.safetensors", class_names=BANDS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("band-files")
    rng = np.random.default_rng(0)
    np.save(folder / "hwc_u16.npy", rng.integers(0, 65536, (20, 18, 4), dtype=np.uint16))
    np.save(folder / "chw_f32.npy", rng.random((4, 16, 16), dtype=np.float32))
    tifffile.imwrite(folder / "chw_u8.tif", rng.integers(0, 256, (4, 24, 20), dtype=np.uint8),
                     photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(folder / "hwc_u16.tiff", rng.integers(0, 65536, (16, 16, 4), dtype=np.uint16),
                     photometric="minisblack", planarconfig="contig")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def server(ckpt):
    app = create_app(str(ckpt), max_batch=4, max_wait_ms=5, max_pixels=10_000, max_request_pixels=20_000, name="bands")
    with BackgroundServer(app) as running:
        yield running.url


def predicted(ckpt, paths, capsys):
    capsys.readouterr()
    assert cli_main(["predict", str(ckpt), *map(str, paths), "--json", "--topk", "3"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_band_uploads_answer_as_vitlab_predict(server, ckpt, files, capsys):
    expected = predicted(ckpt, files, capsys)
    status, _, answer = post_files(server + "/v1/classify", [(p.name, p.read_bytes()) for p in files], {"top_k": "3"})
    assert status == 200, answer
    assert [r["name"] for r in answer["results"]] == [p.name for p in files]
    for got, want in zip(answer["results"], expected):
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in got["top"]],
                                   [t["probability"] for t in want["top"]], rtol=0, atol=1e-5)
    # one array as the raw body; and the rollout overlay of a 4-band input (drawn as grey)
    status, _, raw = request(server + "/v1/classify?top_k=3", files[0].read_bytes(),
                             {"Content-Type": "application/octet-stream"})
    assert status == 200 and json.loads(raw)["results"][0]["top"][0]["class"] == expected[0]["top"][0]["class"]
    status, _, answer = post_files(server + "/v1/explain", [(files[2].name, files[2].read_bytes())])
    assert status == 200, answer
    assert answer["results"][0]["rollout"]["overlay_png"]


def npy_bytes(array: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    np.save(out, array, **kwargs)
    return out.getvalue()


def npy_header_only(shape: tuple) -> bytes:
    """A .npy header declaring ``shape`` uint8 pixels, followed by only a few bytes of them."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return out.getvalue() + bytes(16)


@pytest.mark.parametrize("data, message", [
    (npy_bytes(np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True),
     "image 0: not a numeric array (dtype object)"),
    (npy_bytes(np.zeros((3, 8, 8), np.uint8)), "image 0: 3 band(s), expected 4 channel(s)"),
    (npy_bytes(np.zeros((2, 4, 8, 8), np.uint8)), "image 0: an array of shape (2, 4, 8, 8)"),
    (npy_bytes(np.full((8, 8, 4), np.nan, np.float32)), "image 0: the array holds NaN or infinite values"),
    (npy_header_only((101, 100, 4)), "image 0: image too large (100x101 pixels, limit 10,000)"),
    (npy_header_only((4, 60, 60)) + b"", "image 0: cannot read array"),
    (b"not an array at all", "image 0: data that is neither a .npy array nor a TIFF cannot hold 4 channels"),
])
def test_bad_band_uploads_get_a_400_with_one_line(server, data, message):
    status, _, raw = request(server + "/v1/classify", data, {"Content-Type": "application/octet-stream"})
    error = json.loads(raw)["error"]
    assert status == 400 and error.startswith(message) and "\n" not in error


def test_band_headers_count_in_the_request_pixel_budget_before_decoding(server, tmp_path):
    big = npy_header_only((4, 90, 100))  # 9,000 pixels each: under the per-image limit, three exceed 20,000
    status, _, answer = post_files(server + "/v1/classify", [("a.npy", big), ("b.npy", big), ("c.npy", big)])
    assert status == 400 and answer["error"].startswith("the images of this request declare 27,000 pixels")
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((4, 90, 100), np.uint8), photometric="minisblack",
                     planarconfig="separate")
    assert declared_pixels(io.BytesIO((tmp_path / "t.tif").read_bytes()), 4) == 9_000
    assert declared_pixels(io.BytesIO(big), 4) == 9_000 and declared_pixels(io.BytesIO(b"junk"), 4) == 0
    status, _, answer = post_files(server + "/v1/classify", [("t.tif", (tmp_path / "t.tif").read_bytes())] * 3)
    assert status == 400 and "declare 27,000 pixels" in answer["error"]
