"""The page at ``/`` in headless Chromium: an image is chosen, the top-5 bars and the attention overlay appear, and
the screenshot shows them (checked by pixels, as the inspection report's test does), next to the model card."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from vitlab.serve import BackgroundServer, create_app  # noqa: E402

from .devtools import CHROMIUM, Browser  # noqa: E402
from .serve_helpers import CLASSES, post_files, save_tiny  # noqa: E402

BAR_BLUE = np.array([0x22, 0x66, 0xCC])  # .bar-row .fill in page.css


def rect(browser: Browser, selector: str) -> tuple[int, int, int, int]:
    box = browser.evaluate(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect(); "
                           "return [r.left, r.top, r.width, r.height]; })()")
    left, top, width, height = box
    return round(left), round(top), round(width), round(height)


def correlation(a: Image.Image, b: Image.Image, scale: int = 8) -> float:
    size = (max(1, a.width // scale), max(1, a.height // scale))
    x = np.asarray(a.convert("L").resize(size, Image.BOX), dtype=np.float64).ravel()
    y = np.asarray(b.convert("L").resize(size, Image.BOX), dtype=np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh --dev installs it)")
def test_page_shows_top5_bars_and_the_attention_overlay_of_a_chosen_image(tmp_path):
    ckpt = save_tiny(tmp_path / "tiny.safetensors")
    # a picture with structure, so that the overlay and the input are recognisable in the screenshot
    yy, xx = np.mgrid[0:96, 0:96]
    pixels = np.stack([(xx * 2.6) % 256, (yy * 2.6) % 256, ((xx + yy) * 5) % 256], axis=-1).astype(np.uint8)
    pixels[30:66, 30:66] = (250, 250, 40)
    image_path = tmp_path / "square.png"
    Image.fromarray(pixels).save(image_path)
    app = create_app(str(ckpt), name="tiny-page")
    with BackgroundServer(app) as server, Browser(1200, 900) as browser:
        _, _, answer = post_files(server.url + "/v1/explain", [("square.png", image_path.read_bytes())])
        expected = answer["results"][0]
        browser.open(server.url + "/")
        browser.wait_for("document.querySelector('#card-body table') !== null")  # the model card is in
        browser.choose_files("#file", [image_path])
        browser.wait_for("document.querySelector('.result.done') !== null")
        labels = browser.evaluate("Array.from(document.querySelectorAll('.result .bar-row .label'))"
                                  ".map(e => e.textContent)")
        card_text = browser.evaluate("document.querySelector('#card-body').innerText")
        overlay_box = rect(browser, ".result figure.overlay img")
        input_box = rect(browser, ".result figure img")
        tracks = [rect(browser, f".result .bar-row:nth-child({i + 1}) .track") for i in range(5)]
        card_box = rect(browser, "#card")
        shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")
    assert labels == [t["class"] for t in expected["top"]] and len(labels) == 5
    assert "tiny-page" in card_text and "VisionTransformer" in card_text and CLASSES[0] in card_text
    # the overlay: the PNG the API returns for this image, drawn in its 224 x 224 box
    left, top, width, height = overlay_box
    assert (width, height) == (224, 224)
    shown = shot.crop((left, top, left + width, top + height))
    with Image.open(io.BytesIO(base64.b64decode(expected["rollout"]["overlay_png"]))) as overlay:
        overlay = overlay.convert("RGB")
        r_overlay = correlation(shown, overlay)
    # the input box shows the chosen picture itself
    left, top, width, height = input_box
    picture = Image.fromarray(pixels).resize((224, 224))
    r_input = correlation(shot.crop((left, top, left + width, top + height)), picture)
    assert r_overlay > 0.9, f"the overlay area does not show the overlay (r={r_overlay:.2f})"
    assert r_input > 0.9, f"the input area does not show the image (r={r_input:.2f})"
    assert correlation(shown, picture) < r_overlay  # and the two differ
    # each bar is filled in proportion to its probability
    for (left, top, width, height), entry in zip(tracks, expected["top"]):
        row = np.asarray(shot.crop((left, top + height // 2, left + width, top + height // 2 + 1)), dtype=np.int64)[0]
        blue = np.abs(row - BAR_BLUE).sum(axis=1) < 40
        assert abs(blue.mean() - entry["probability"]) < 0.03, (blue.mean(), entry["probability"])
    # the model card beside them is drawn (dark text on its white box)
    left, top, width, height = card_box
    card = np.asarray(shot.crop((left, top, left + width, top + height)).convert("L"))
    assert (card < 128).mean() > 0.02
