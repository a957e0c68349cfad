"""The page at ``/`` in headless Chromium: an image is chosen, the top-5 bars and the attention overlay appear, and
the screenshot shows them (checked by pixels, as the inspection report's test does), next to the model card; at a
phone's, a tablet's and a desktop's width nothing overflows or hides behind the card."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import vitlab

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from vitlab.serve import BackgroundServer, create_app  # noqa: E402

from .conftest import randomize_  # noqa: E402
from .devtools import CHROMIUM, Browser  # noqa: E402
from .serve_helpers import CLASSES, TINY_RGB, post_files, save_tiny  # noqa: E402

BAR_BLUE = np.array([0x22, 0x66, 0xCC])  # .bar-row .fill in page.css


def rect(browser: Browser, selector: str) -> tuple[int, int, int, int]:
    box = browser.evaluate(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect(); "
                           "return [r.left, r.top, r.width, r.height]; })()")
    left, top, width, height = box
    return round(left), round(top), round(width), round(height)


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def structured_picture(path) -> np.ndarray:
    """A picture with structure, so that the overlay and the input are recognisable in a screenshot."""
    yy, xx = np.mgrid[0:96, 0:96]
    pixels = np.stack([(xx * 2.6) % 256, (yy * 2.6) % 256, ((xx + yy) * 5) % 256], axis=-1).astype(np.uint8)
    pixels[30:66, 30:66] = (250, 250, 40)
    Image.fromarray(pixels).save(path)
    return pixels


def bar_fill(shot: Image.Image, box: tuple[int, int, int, int]) -> float:
    """The share of a bar's track drawn in the fill colour, along its middle row."""
    left, top, width, height = box
    row = np.asarray(shot.crop((left, top + height // 2, left + width, top + height // 2 + 1)), dtype=np.int64)[0]
    return float((np.abs(row - BAR_BLUE).sum(axis=1) < 40).mean())


def correlation(a: Image.Image, b: Image.Image, scale: int = 8) -> float:
    size = (max(1, a.width // scale), max(1, a.height // scale))
    x = np.asarray(a.convert("L").resize(size, Image.BOX), dtype=np.float64).ravel()
    y = np.asarray(b.convert("L").resize(size, Image.BOX), dtype=np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh --dev installs it)")
def test_page_shows_top5_bars_and_the_attention_overlay_of_a_chosen_image(tmp_path):
    ckpt = save_tiny(tmp_path / "tiny.safetensors")
    image_path = tmp_path / "square.png"
    pixels = structured_picture(image_path)
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
    assert "tiny-page" in card_text and "VisionTransformer" in card_text
    assert f"class names ({len(CLASSES)})" in card_text
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
    for box, entry in zip(tracks, expected["top"]):
        assert abs(bar_fill(shot, box) - entry["probability"]) < 0.03, (bar_fill(shot, box), entry["probability"])
    # the model card beside them is drawn (dark text on its white box)
    left, top, width, height = card_box
    card = np.asarray(shot.crop((left, top, left + width, top + height)).convert("L"))
    assert (card < 128).mean() > 0.02


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh --dev installs it)")
def test_page_fits_phone_tablet_and_desktop_widths_with_the_class_list_folded(tmp_path):
    # a thousand class names, as an ImageNet model has: folded away in the card until asked for
    names = [f"{CLASSES[i % len(CLASSES)]} {i}" for i in range(1000)]
    model = vitlab.create_model("vit_ti16", **dict(TINY_RGB, num_classes=len(names)))
    randomize_(model, std=0.2)
    ckpt = vitlab.save(model.eval(), tmp_path / "wide.safetensors", class_names=names)
    image_path = tmp_path / "square.png"
    structured_picture(image_path)
    app = create_app(str(ckpt), name="tiny-widths")
    height = 1500  # tall enough that the result and the card are in the screenshot at every width
    with BackgroundServer(app) as server, Browser(1280, height) as browser:
        _, _, answer = post_files(server.url + "/v1/explain", [("square.png", image_path.read_bytes())])
        expected = answer["results"][0]
        with Image.open(io.BytesIO(base64.b64decode(expected["rollout"]["overlay_png"]))) as overlay_png:
            overlay_png = overlay_png.convert("RGB")
        browser.open(server.url + "/")
        browser.wait_for("document.querySelector('#card-body table') !== null")
        browser.choose_files("#file", [image_path])
        browser.wait_for("document.querySelector('.result.done') !== null")
        for width in (420, 800, 1280):
            browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                "deviceScaleFactor": 1, "mobile": False})
            browser.wait_for(f"window.innerWidth === {width}")
            page_width = browser.evaluate("document.documentElement.scrollWidth")
            drop, work, card, result = (rect(browser, s) for s in ("#drop", "#work", "#card", ".result"))
            overlay_box = rect(browser, ".result figure.overlay img")
            tracks = [rect(browser, f".result .bar-row:nth-child({i + 1}) .track") for i in range(5)]
            folded = browser.evaluate("document.querySelector('#class-names').checkVisibility()")
            shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")
            where = f"at {width} px"
            assert page_width <= width, f"{where} the page is {page_width} px wide"
            # the drop zone spans the work column, which takes most of the screen
            assert drop[2] == work[2] and drop[2] >= 0.6 * width, (where, drop, work)
            # the card is beside the results on a desktop, below them on narrower screens; never over them
            assert not overlap(card, result), (where, card, result)
            if width >= 1280:
                assert card[0] >= result[0] + result[2], (where, card, result)
            else:
                assert card[1] >= result[1] + result[3] and card[2] == work[2], (where, card, result)
            for box in (drop, card, result, overlay_box, *tracks):
                assert box[0] >= 0 and box[0] + box[2] <= width, (where, box)
            # the overlay, square and big enough to see, shows the API's overlay image
            assert overlay_box[2] == overlay_box[3] >= 150, (where, overlay_box)
            left, top, w, h = overlay_box
            r = correlation(shot.crop((left, top, left + w, top + h)), overlay_png)
            assert r > 0.9, f"{where} the overlay area does not show the overlay (r={r:.2f})"
            # the five bars are drawn and each is filled in proportion to its probability
            for box, entry in zip(tracks, expected["top"]):
                assert box[2] >= 100, (where, box)
                assert abs(bar_fill(shot, box) - entry["probability"]) < 0.03, (where, entry)
            # the class names are folded: the card stays short, the list takes no room
            assert not folded and card[3] < 600, (where, card)
            drawn = np.asarray(shot.crop((card[0], card[1], card[0] + card[2], card[1] + card[3])).convert("L"))
            assert (drawn < 128).mean() > 0.02, f"{where} the model card is not drawn"
        # unfolded, the list shows every name in a box of bounded height that scrolls
        browser.evaluate("document.querySelector('#card summary').click()")
        browser.wait_for("document.querySelector('#card details').open")
        unfolded = rect(browser, "#class-names")
        assert browser.evaluate("document.querySelector('#class-names').checkVisibility()")
        shown = browser.evaluate("document.querySelector('#class-names').innerText")
        scroll = browser.evaluate("document.querySelector('#class-names').scrollHeight")
    assert 100 < unfolded[3] <= 260 < scroll, (unfolded, scroll)
    assert shown == ", ".join(names)
