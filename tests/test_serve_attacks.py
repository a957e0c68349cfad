"""``vitlab serve`` under hostile clients, over real loopback sockets: clients that trickle their headers or body are
cut off at a deadline and never lock others out, the request limit answers 503 with ``Retry-After``, and every such
answer is counted in ``/metrics``."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytest.importorskip("prometheus_client")

from vitlab.serve import BackgroundServer, Engine, create_app  # noqa: E402

from .serve_helpers import png_bytes, png_of_size, post_files, request, scrape, tiny_model  # noqa: E402
from .test_serve import SlowModel, concurrent_posts  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), name="tiny")


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send ``data`` one byte every ``every`` seconds until it is sent, ``stop`` is set or the server hangs up."""
    for byte in data:
        if stop.wait(every):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_clients_trickling_headers_do_not_lock_others_out_and_are_cut_off(engine):
    app = create_app(engine)
    with BackgroundServer(app, max_connections=3, header_timeout=1.0) as running:
        stop = threading.Event()
        socks = [_connect(running.url) for _ in range(8)]  # more than max_connections
        head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + b"X-Pad: y\r\n" * 50
        threads = [threading.Thread(target=_trickle, args=(s, head, 0.1, stop), daemon=True) for s in socks]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            for _ in range(3):  # good clients are answered while the slow ones are still sending (uvicorn's own
                # limit_concurrency answered them 503 until the slow connections went away)
                status, _, body = post_files(running.url + "/v1/classify", [("a.png", png_bytes())])
                assert status == 200 and len(body["results"]) == 1
            answers = [_answer(s) for s in socks]  # the deadline closes every slow connection
        finally:
            stop.set()
            for s in socks:
                s.close()
        assert all(a.startswith(b"HTTP/1.1 408 ") and b"no complete request within 1 s" in a for a in answers), \
            answers
        metrics = scrape(running.url)
        assert metrics[("vitlab_request_errors_total", (("endpoint", "other"), ("status", "408")))] == 8


def test_client_trickling_its_body_gets_408_and_the_connection_is_closed(engine):
    app = create_app(engine, body_timeout_s=1.0)
    with BackgroundServer(app) as running:
        data = png_bytes()
        sock = _connect(running.url)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(data))
        stop = threading.Event()
        thread = threading.Thread(target=_trickle, args=(sock, data, 0.1, stop), daemon=True)
        thread.start()
        try:
            answer = _answer(sock)
        finally:
            stop.set()
            sock.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in answer
        assert post_files(running.url + "/v1/classify", [("a.png", data)])[0] == 200
        metrics = scrape(running.url)
        assert metrics[("vitlab_request_errors_total", (("endpoint", "/v1/classify"), ("status", "408")))] == 1


def test_request_limit_answers_503_with_retry_after_counted_in_metrics():
    app = create_app(Engine(SlowModel(0.5), name="slow"), max_batch=1, max_wait_ms=0)
    with BackgroundServer(app, max_connections=1) as running:
        results = concurrent_posts(running.url + "/v1/classify", 4, png_bytes())
        statuses = sorted(status for status, _, _ in results)
        assert statuses[0] == 200 and 503 in statuses, statuses
        for status, headers, body in results:
            if status == 503:
                assert int(headers["retry-after"]) >= 1 and "--max-connections" in body["error"]
        metrics = scrape(running.url)
        assert metrics[("vitlab_request_errors_total", (("endpoint", "/v1/classify"), ("status", "503")))] == \
            statuses.count(503)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine)) as running:
        yield running.url


def _png_b64() -> str:
    return base64.b64encode(png_bytes()).decode()


JSON_BOMBS = {
    "100000 nested [": b"[" * 100_000,
    "objects 3000 deep": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "top_k Infinity": b'{"images": ["%s"], "top_k": Infinity}',
    "top_k NaN": b'{"images": ["%s"], "top_k": NaN}',
    "top_k of 5000 digits": b'{"images": ["%s"], "top_k": 1' + b"0" * 4999 + b"}",
    "top_k of 4000 digits": b'{"images": ["%s"], "top_k": 1' + b"0" * 3999 + b"}",
    "top_k 1e999": b'{"images": ["%s"], "top_k": 1e999}',
    "discard_ratio -Infinity": b'{"images": ["%s"], "discard_ratio": -Infinity}',
    "head_fusion nested 900 deep": b'{"images": ["%s"], "head_fusion": ' + b"[" * 900 + b"]" * 900 + b"}",
    "image name nested 900 deep": b'{"images": [{"data": "%s", "name": ' + b"[" * 900 + b"]" * 900 + b"}]}",
}


@pytest.mark.parametrize("case", list(JSON_BOMBS))
def test_json_bombs_get_a_400_with_one_line_and_no_traceback(server, case, caplog):
    body = JSON_BOMBS[case].replace(b"%s", _png_b64().encode())
    endpoint = "/v1/explain" if "fusion" in case or "discard" in case else "/v1/classify"
    with caplog.at_level("WARNING"):
        status, _, raw = request(server + endpoint, body, {"Content-Type": "application/json"})
    answer = json.loads(raw)
    if case == "image name nested 900 deep":  # a name that is not a string is dropped, the image answered
        assert status == 200 and answer["results"][0]["name"] is None, answer
    else:
        message = answer["error"]
        assert status == 400 and "\n" not in message and len(message) < 400, (status, message)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
    assert post_files(server + "/v1/classify", [("a.png", png_bytes())])[0] == 200


def test_small_uploads_promising_many_pixels_are_refused_before_decoding(server):
    bomb = png_of_size(5000, 5000, bits=16)  # 16-bit zeros: about 50 KB that decode to 25 megapixels
    assert len(bomb) < 100_000
    status, _, body = post_files(server + "/v1/classify", [(f"{i}.png", bomb) for i in range(4)])
    assert status == 400 and "declare 100,000,000 pixels in all" in body["error"] and "50,000,000" in body["error"]
    assert post_files(server + "/v1/classify", [("a.png", png_bytes())])[0] == 200


def test_16_bit_images_decode_without_float64_copies():
    """Reading a 16-bit image's pixels out of Pillow takes 4 bytes a pixel for a moment (its bytes, then the array), the
    8-bit result 1 more, the rescaling blocks of 64 K pixels: well under 8 bytes a pixel. The float64 copies this
    replaced took over 16."""
    import io
    import tracemalloc

    import numpy as np
    from PIL import Image

    from vitlab.data.images import load_image

    values = np.random.default_rng(0).integers(0, 65536, (1500, 2000)).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    tracemalloc.start()
    try:
        image = load_image(io.BytesIO(out.getvalue()), channels=1, name="u16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(np.asarray(image), np.rint(values / 257.0).astype(np.uint8))
    assert peak < 8 * values.size, peak  # numpy's allocations (tracemalloc sees them; Pillow's own it does not)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16 x 16 JPEG whose frame header is rewritten to declare ``width`` x ``height``: libjpeg decodes the
    short scan and fills the rest with grey, with only a warning."""
    import io
    import struct

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    frame = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, height, width)
    return bytes(data)


def test_jpeg_far_shorter_than_its_declared_size_is_a_400_not_a_partly_decoded_200(server):
    status, _, body = post_files(server + "/v1/classify", [("cut.jpg", _jpeg_declaring(4999, 5000))])
    assert status == 400 and "truncated" in body["error"] and "4999x5000" in body["error"], body


def test_non_ascii_upload_names_come_back_as_sent(server):
    names = ["chat-é-猫.png", "🐱 cat.png", "naïve résumé (2).png", "a/b\\c<x>\u200b.png"]
    status, _, body = post_files(server + "/v1/classify", [(name, png_bytes()) for name in names])
    assert status == 200, body
    assert [r["name"] for r in body["results"]] == names[:3] + ["a_b_c_x__.png"]


def test_malformed_requests_answered_by_the_server_itself_are_counted(server):
    before = scrape(server).get(("vitlab_request_errors_total", (("endpoint", "other"), ("status", "400"))), 0)
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        sock = _connect(server)
        sock.sendall(garbage)
        assert _answer(sock).startswith(b"HTTP/1.1 400 ")
        sock.close()
    after = scrape(server)[("vitlab_request_errors_total", (("endpoint", "other"), ("status", "400")))]
    assert after - before == 2
