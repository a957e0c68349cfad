"""The written inspection report: files, values, and the HTML page as headless Chromium renders it."""

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.inspect import (
    LAYOUT,
    attention_statistics,
    embedding_filters_pca,
    inspect_model,
    position_embedding_similarity,
    position_embedding_structure,
)

CHROMIUM = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium") or None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A full report of a small random model on 12 images, written once for the tests below."""
    torch.manual_seed(0)
    model = vitlab.create_model("vit_fmnist", depth=3, img_size=(28, 24))
    images = torch.rand(12, 1, 28, 24) * 2 - 1
    out = tmp_path_factory.mktemp("report")
    summary = inspect_model(model, out, images=images, image_names=[f"img{i}.png" for i in range(12)],
                            rollout_images=5, batch_size=5, title="test model")
    return model, images, out, summary


def test_report_writes_every_figure_and_the_raw_values(report):
    model, images, out, summary = report
    names = ["filters", "posemb", "distance", "rollout"]
    assert summary["analyses"] == names
    for name in names:
        with Image.open(out / f"{name}.png") as png:
            assert png.size[0] > 300 and png.size[1] > 200
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind
    with np.load(out / "inspection.npz", allow_pickle=False) as arrays:
        stats = attention_statistics(model, images, rollout_images=5)
        np.testing.assert_allclose(arrays["attention_distance"], stats.mean_distance.numpy(), rtol=1e-6)
        np.testing.assert_allclose(arrays["rollout"], stats.rollout.numpy(), rtol=1e-6)
        np.testing.assert_allclose(arrays["posemb_similarity"], position_embedding_similarity(model).numpy())
        pca = embedding_filters_pca(model)
        np.testing.assert_allclose(arrays["filters_components"], pca.components.numpy())
        assert arrays["rollout"].shape == (5, 7, 6)
    saved = json.loads((out / "inspection.json").read_text())
    np.testing.assert_allclose(saved["distance"]["table"], stats.mean_distance.numpy(), rtol=1e-6)
    assert saved["distance"]["num_images"] == 12
    structure = position_embedding_structure(position_embedding_similarity(model))
    assert saved["posemb"]["distance_correlation"] == pytest.approx(structure.distance_correlation)
    assert saved["rollout"]["images"] == [f"img{i}.png" for i in range(5)]
    assert saved["model"]["img_size"] == [28, 24]


def test_html_page_embeds_each_png_itself(report):
    _, _, out, _ = report
    page = (out / "index.html").read_text()
    assert "src=\"file:" not in page and "http" not in page  # self-contained
    embedded = dict(re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    assert sorted(embedded) == ["distance", "filters", "posemb", "rollout"]
    for name, data in embedded.items():
        assert base64.b64decode(data) == (out / f"{name}.png").read_bytes()


def test_report_only_runs_what_was_asked(tmp_path):
    model = vitlab.create_model("vit_fmnist", depth=1)
    summary = inspect_model(model, tmp_path, what=["posemb"])
    assert summary["analyses"] == ["posemb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "inspection.json", "inspection.npz",
                                                          "posemb.png"]
    default = inspect_model(model, tmp_path / "no_images")  # without images: the weight-only analyses
    assert default["analyses"] == ["filters", "posemb"]


@pytest.mark.parametrize("what, kwargs, message", [
    (["rollout"], {}, "needs images"),
    (["posemb"], {"pos_embed": "none"}, "no position embedding"),
    (["filterz"], {}, "unknown analysis filterz"),
])
def test_report_rejects_analyses_it_cannot_run_before_writing(tmp_path, what, kwargs, message):
    model = vitlab.create_model("vit_fmnist", depth=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        inspect_model(model, tmp_path / "out", what=what)
    assert not (tmp_path / "out").exists()


def screenshot(html_path: Path, size: tuple[int, int]) -> Image.Image:
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as shots:
        target = Path(shots) / "page.png"
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--hide-scrollbars", "--force-device-scale-factor=1",
               f"--screenshot={target}", f"--window-size={size[0]},{size[1]}", html_path.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        with Image.open(target) as shot:
            return shot.convert("RGB")


def contained(png: Image.Image, box_size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """The PNG scaled as CSS object-fit: contain draws it in a box, and its offset inside the box."""
    scale = min(box_size[0] / png.width, box_size[1] / png.height)
    size = (round(png.width * scale), round(png.height * scale))
    return png.resize(size, Image.BILINEAR), ((box_size[0] - size[0]) // 2, (box_size[1] - size[1]) // 2)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh --dev installs it)")
def test_html_page_shows_every_figure_in_headless_chromium(report):
    _, _, out, summary = report
    figures = summary["analyses"]
    shot = screenshot(out / "index.html", (LAYOUT.page_width, LAYOUT.grid_height(len(figures))))
    for index, name in enumerate(figures):
        left, top, width, height = LAYOUT.image_box(index)
        area = shot.crop((left, top, left + width, top + height)).convert("L")
        drawn = (np.asarray(area) < 240).mean()
        assert drawn > 0.01, f"{name}: figure area is blank ({drawn:.3f} of pixels drawn)"
        with Image.open(out / f"{name}.png") as png:
            expected, (dx, dy) = contained(png.convert("L"), (width, height))
        shown = area.crop((dx, dy, dx + expected.width, dy + expected.height))
        # compare at an eighth of the resolution, so that the two renderers' different resampling of thin lines and
        # text does not count (different figures correlate below 0.25 at this scale, the right one above 0.94)
        small = (max(1, expected.width // 8), max(1, expected.height // 8))
        a = np.asarray(shown.resize(small, Image.BOX), dtype=np.float64).ravel()
        b = np.asarray(expected.resize(small, Image.BOX), dtype=np.float64).ravel()
        correlation = np.corrcoef(a, b)[0, 1]
        assert correlation > 0.8, f"{name}: what Chromium shows does not match {name}.png (r={correlation:.2f})"


def test_images_are_found_recursively_in_order_and_preprocessed(tmp_path):
    from vitlab.inspect import find_images, load_images
    from vitlab.preprocessing import Preprocessing

    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    (tmp_path / "b").mkdir()
    Image.fromarray(pixels).save(tmp_path / "b" / "1.png")
    Image.fromarray(255 - pixels).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    paths = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.png", "b/1.png"]
    assert find_images(tmp_path, limit=1) == paths[:1]
    images = load_images(paths, Preprocessing.for_model(28, 1))
    expected = torch.tensor(np.stack([255 - pixels, pixels]), dtype=torch.float32)[:, None] / 255 * 2 - 1
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_bad_image_inputs_give_one_line_errors(tmp_path):
    from vitlab.errors import VitlabError
    from vitlab.inspect import find_images, load_images
    from vitlab.preprocessing import Preprocessing

    with pytest.raises(VitlabError, match="no image files"):
        find_images(tmp_path)
    with pytest.raises(VitlabError, match="no such file or folder"):
        find_images(tmp_path / "missing")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(VitlabError, match="broken.png: not a readable image"):
        load_images([broken], Preprocessing.for_model(28, 1))
