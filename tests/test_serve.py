"""``vitlab serve``: a real server on a loopback port, called over HTTP. Its answers equal ``vitlab predict`` on the
same files, its rollout equals ``vitlab.inspect.attention_rollout``, /metrics counts what was sent, bad input gets a
4xx with a one-line reason, a full queue answers 503, and a stopped server answers what it had accepted."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytest.importorskip("prometheus_client")

import uvicorn  # noqa: E402

import vitlab  # noqa: E402
from vitlab.cli import main as cli_main  # noqa: E402
from vitlab.data.images import load_image  # noqa: E402
from vitlab.inspect import attention_rollout  # noqa: E402
from vitlab.serve import BackgroundServer, Batcher, Engine, QueueFull, ServeSettings, create_app  # noqa: E402
from vitlab.serve.server import bind_socket, run_server  # noqa: E402

from .serve_helpers import (  # noqa: E402
    CLASSES,
    cli_server,
    multipart,
    noise_png,
    png_bytes,
    png_of_size,
    post_files,
    request,
    save_tiny,
    scrape,
    tiny_model,
    write_images,
)

BODY_LIMIT = 512 * 1024


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("serve") / "tiny.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def server(ckpt):
    app = create_app(str(ckpt), max_batch=8, max_wait_ms=20, max_body_bytes=BODY_LIMIT, name="tiny")
    with BackgroundServer(app) as running:
        yield running.url


def files_of(paths):
    return [(p.name, p.read_bytes()) for p in paths]


def expected_predictions(ckpt, paths, capsys, topk=5):
    capsys.readouterr()
    assert cli_main(["predict", str(ckpt), *map(str, paths), "--json", "--topk", str(topk)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def assert_same_top(got, expected):
    assert [t["index"] for t in got] == [t["index"] for t in expected["top"]]
    assert [t["class"] for t in got] == [t["class"] for t in expected["top"]]
    np.testing.assert_allclose([t["probability"] for t in got], [t["probability"] for t in expected["top"]],
                               rtol=0, atol=1e-5)


def test_classify_answers_equal_vitlab_predict_on_the_same_files(server, ckpt, images, capsys):
    expected = expected_predictions(ckpt, images, capsys)
    # several images in one multipart request
    status, _, answer = post_files(server + "/v1/classify", files_of(images))
    assert status == 200, answer
    assert answer["model"] == "tiny" and answer["time_ms"] > 0
    assert [r["name"] for r in answer["results"]] == [p.name for p in images]
    # one key for the file in both: predict --json's "name" is the path given, the server's the file name sent
    assert [Path(want["name"]).name for want in expected] == [r["name"] for r in answer["results"]]
    assert answer["top_k"] == 5 and "note" not in answer
    for got, want in zip(answer["results"], expected):
        assert_same_top(got["top"], want)
    # JSON with base64 (plain strings, objects, a data URL), and one image as the raw body
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
    body = {"images": [encoded[0], {"data": encoded[1], "name": "second.jpg"},
                       "data:image/png;base64," + encoded[2]], "top_k": 3}
    status, _, raw = request(server + "/v1/classify", json.dumps(body).encode(), {"Content-Type": "application/json"})
    answer = json.loads(raw)
    assert status == 200, answer
    assert [r["name"] for r in answer["results"]] == [None, "second.jpg", None]
    for got, want in zip(answer["results"], expected_predictions(ckpt, images[:3], capsys, topk=3)):
        assert_same_top(got["top"], want)
    status, _, raw = request(server + "/v1/classify?top_k=2", images[3].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200
    assert_same_top(json.loads(raw)["results"][0]["top"], expected_predictions(ckpt, images[3:4], capsys, 2)[0])


def test_top_k_above_the_class_count_says_so_in_the_answer(server, ckpt, images, capsys):
    status, _, answer = post_files(server + "/v1/classify", files_of(images[:1]), {"top_k": "5000"})
    assert status == 200 and len(answer["results"][0]["top"]) == len(CLASSES) == answer["top_k"]
    assert answer["note"] == f"top_k 5000 is more than the model's {len(CLASSES)} classes: all 7 are listed"
    assert cli_main(["predict", str(ckpt), str(images[0]), "--topk", "5000"]) == 0
    assert f"--topk 5000 is more than the model's {len(CLASSES)} classes" in capsys.readouterr().err


def test_explain_rollout_equals_attention_rollout(server, ckpt, images):
    model = vitlab.load(ckpt)
    transform = model.preprocessing.transform()
    picked = [images[0], images[5], images[6]]  # RGB PNG, CMYK JPEG, EXIF-rotated JPEG
    status, _, answer = post_files(server + "/v1/explain", files_of(picked))
    assert status == 200, answer
    options = {"head_fusion": "max", "discard_ratio": "0.5"}
    status, _, with_options = post_files(server + "/v1/explain", files_of(picked[:1]), options)
    assert status == 200, with_options
    for i, path in enumerate(picked):
        x = transform(load_image(path, channels=3))[None]
        with torch.no_grad():
            logits, attn = model.forward_with_attention(x)
        got = answer["results"][i]["rollout"]
        assert got["grid"] == [4, 4] and got["source"] == "class" and got["head_fusion"] == "mean"
        expected = attention_rollout(attn, model.cfg.num_prefix_tokens, model.cfg.grid_size)[0]
        np.testing.assert_allclose(np.array(got["values"]), expected.numpy(), rtol=0, atol=1e-6)
        probs = logits.softmax(1)[0]
        assert answer["results"][i]["top"][0]["index"] == int(probs.argmax())
        assert answer["results"][i]["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        with Image.open(io.BytesIO(base64.b64decode(got["overlay_png"]))) as overlay:
            assert overlay.format == "PNG" and overlay.size == (224, 224)  # 32 px scaled by 7
            pixels = np.asarray(overlay.convert("RGB"), dtype=np.float64)
        plain = (x[0] * 0.5 + 0.5).permute(1, 2, 0).numpy() * 255
        assert np.abs(pixels[::7, ::7] - plain).mean() > 10  # the heat map is drawn over the input
        if i == 0:
            fused = with_options["results"][0]["rollout"]
            want = attention_rollout(attn, 1, (4, 4), head_fusion="max", discard_ratio=0.5)[0]
            np.testing.assert_allclose(np.array(fused["values"]), want.numpy(), rtol=0, atol=1e-6)
            assert fused["head_fusion"] == "max" and fused["discard_ratio"] == 0.5


def test_metrics_count_what_was_sent(server, images):
    before = scrape(server)
    sent_images = 0
    for count in (1, 2, 3):
        status, _, _ = post_files(server + "/v1/classify", files_of(images[:count]))
        assert status == 200
        sent_images += count
    status, _, _ = post_files(server + "/v1/explain", files_of(images[:2]))
    assert status == 200
    status, _, _ = post_files(server + "/v1/classify", [("bad.png", b"not an image")])
    assert status == 400
    after = scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vitlab_requests_total", endpoint="/v1/classify", status="200") == 3
    assert delta("vitlab_requests_total", endpoint="/v1/explain", status="200") == 1
    assert delta("vitlab_requests_total", endpoint="/v1/classify", status="400") == 1
    assert delta("vitlab_request_errors_total", endpoint="/v1/classify", status="400") == 1
    assert delta("vitlab_request_errors_total", endpoint="/v1/classify", status="200") == 0
    assert delta("vitlab_images_total", endpoint="/v1/classify") == sent_images
    assert delta("vitlab_images_total", endpoint="/v1/explain") == 2
    assert delta("vitlab_request_duration_seconds_count", endpoint="/v1/classify") == 4
    assert delta("vitlab_batch_size_sum") == sent_images + 2  # every image went through exactly one model call
    assert 1 <= delta("vitlab_batch_size_count") <= 4
    assert delta("vitlab_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert after[("vitlab_queue_length", ())] == 0
    assert after[("vitlab_model_info", (("backend", "torch"), ("device", "cpu"), ("name", "tiny"),
                                        ("vitlab_version", vitlab.__version__)))] == 1


def test_model_card_health_and_page(server, ckpt):
    status, _, raw = request(server + "/v1/model")
    card = json.loads(raw)
    assert status == 200
    assert card["name"] == "tiny" and card["source"] == "tiny.safetensors" and card["backend"] == "torch"
    assert card["img_size"] == [32, 32] and card["patch_size"] == [8, 8] and card["num_classes"] == len(CLASSES)
    assert card["class_names"] == CLASSES and card["explain"] is True and card["rollout_source"] == "class"
    assert card["preprocessing"] == vitlab.load(ckpt).preprocessing.to_dict()
    assert card["parameters"] == tiny_model().num_params()
    assert card["limits"]["max_body_bytes"] == BODY_LIMIT and card["limits"]["api_key_required"] is False
    assert "api_key" not in card["limits"]
    status, _, raw = request(server + "/healthz")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, headers, raw = request(server + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"] and b'<script src="page.js"' in raw
    for asset in ("/page.js", "/page.css"):
        assert request(server + asset)[0] == 200
    status, _, raw = request(server + "/no/such/page")
    assert status == 404 and json.loads(raw) == {"error": "not found: /no/such/page"}


BAD_INPUTS = {
    "not an image": (400, "notes.png: cannot decode image",
                     lambda: multipart([("notes.png", b"just some text, not pixels")])),
    # the bad one of two files is named by its name, not by its place ("image 1")
    "bad second file": (400, "notes.png: cannot decode image",
                        lambda: multipart([("good.png", png_bytes()), ("notes.png", b"just text")])),
    "truncated PNG": (400, "cannot decode image", lambda: multipart([("cut.png", noise_png()[:6000])])),
    # a few kilobytes whose header promises 100,000 x 100,000 pixels: refused before anything is decoded
    "decompression bomb": (400, "image too large", lambda: multipart([("bomb.png", png_of_size(100_000, 100_000,
                                                                                               rows=64))])),
    "20,000 x 20,000 image": (400, "huge.png: image too large",
                              lambda: multipart([("huge.png", png_of_size(20_000, 20_000))])),
    "wrong content type": (415, "unsupported content type 'text/plain'", lambda: (b"hello", "text/plain")),
    "form-encoded body": (415, "unsupported content type 'application/x-www-form-urlencoded'",
                          lambda: (b"image=abc", "application/x-www-form-urlencoded")),
    "body over the limit": (413, "over the limit of 524,288 bytes",
                            lambda: multipart([("big.png", os.urandom(BODY_LIMIT + 1000))])),
    "bad base64": (400, "image 0: invalid base64", lambda: (b'{"images": ["@@@"]}', "application/json")),
    "bad JSON": (400, "body is not valid JSON", lambda: (b'{"images": [', "application/json")),
    "no image": (400, "no image in the request", lambda: multipart([], {"top_k": "3"})),
    "bad top_k": (400, "top_k must be at least 1", lambda: multipart([("a.png", png_bytes())], {"top_k": "0"})),
    "too many images": (400, "images in one request; the limit is 16",
                        lambda: multipart([(f"{i}.png", png_bytes()) for i in range(17)])),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_with_a_one_line_reason_and_the_next_request_succeeds(server, images, case):
    want_status, reason, make = BAD_INPUTS[case]
    body, kind = make()
    status, headers, raw = request(server + "/v1/classify", body, {"Content-Type": kind})
    assert status == want_status, raw
    assert headers["content-type"] == "application/json"
    message = json.loads(raw)["error"]
    assert reason in message and "\n" not in message and len(message) < 300, message
    status, _, answer = post_files(server + "/v1/classify", files_of(images[:1]))
    assert status == 200 and len(answer["results"]) == 1


def test_streamed_body_over_the_limit_is_cut_off(server, images):
    # no Content-Length: urllib sends an iterable body chunked, so the limit is enforced while reading
    chunks = (b"\0" * 65536 for _ in range(BODY_LIMIT // 65536 + 2))
    status, _, raw = request(server + "/v1/classify", chunks, {"Content-Type": "image/png"})
    assert status == 413 and "over the limit" in json.loads(raw)["error"]
    assert post_files(server + "/v1/classify", files_of(images[:1]))[0] == 200


def test_api_key_is_required_when_set(ckpt, images):
    app = create_app(str(ckpt), api_key="s3cret-key")
    with BackgroundServer(app) as running:
        url = running.url
        files = files_of(images[:1])
        status, headers, answer = post_files(url + "/v1/classify", files)
        assert status == 401 and "missing API key" in answer["error"] and headers["www-authenticate"] == "Bearer"
        status, _, answer = post_files(url + "/v1/classify", files, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and answer["error"] == "wrong API key"
        assert post_files(url + "/v1/classify", files, headers={"Authorization": "Bearer s3cret-key"})[0] == 200
        assert post_files(url + "/v1/classify", files, headers={"X-API-Key": "s3cret-key"})[0] == 200
        assert request(url + "/metrics")[0] == 401 and request(url + "/v1/model")[0] == 401
        assert request(url + "/metrics", headers={"X-API-Key": "s3cret-key"})[0] == 200
        assert request(url + "/healthz")[0] == 200 and request(url + "/")[0] == 200  # probes and the page stay open
        card = json.loads(request(url + "/v1/model", headers={"X-API-Key": "s3cret-key"})[2])
        assert card["limits"]["api_key_required"] is True and "s3cret" not in json.dumps(card)


class SlowModel(torch.nn.Module):
    """The tiny model, with every forward taking at least ``seconds``: keeps the queue full on purpose."""

    def __init__(self, seconds: float):
        super().__init__()
        self.inner = tiny_model()
        self.cfg, self.class_names = self.inner.cfg, CLASSES
        self.preprocessing = vitlab.Preprocessing.for_model(self.cfg.img_size, self.cfg.in_chans)
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def concurrent_posts(url: str, count: int, data: bytes):
    """``count`` requests released together from their own threads; their (status, headers, body) in order."""
    results = [None] * count
    barrier = threading.Barrier(count)

    def send(i):
        barrier.wait()
        results[i] = post_files(url, [(f"{i}.png", data)])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_full_queue_answers_503_with_retry_after_and_recovers():
    engine = Engine(SlowModel(0.4), name="slow")
    app = create_app(engine, max_batch=1, max_wait_ms=0, max_queue=2, max_images=2)
    with BackgroundServer(app) as running:
        results = concurrent_posts(running.url + "/v1/classify", 10, png_bytes())
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 1 and statuses.count(200) >= 3, statuses  # 1 running + 2 queued at least
        for status, headers, body in results:
            if status == 503:
                assert int(headers["retry-after"]) >= 1
                assert body["error"].startswith("server busy:") and "limit 2" in body["error"]
            else:
                assert len(body["results"]) == 1
        assert post_files(running.url + "/v1/classify", [("ok.png", png_bytes())])[0] == 200
        metrics = scrape(running.url)
        assert metrics[("vitlab_request_errors_total", (("endpoint", "/v1/classify"), ("status", "503")))] == \
            statuses.count(503)
        assert metrics[("vitlab_batch_size_sum", ())] == statuses.count(200) + 1


def test_concurrent_requests_are_batched_up_to_max_batch():
    engine = Engine(SlowModel(0.05), name="slow")
    for max_batch, most in ((4, 4), (1, 1)):
        app = create_app(engine, max_batch=max_batch, max_wait_ms=400, max_queue=64)
        with BackgroundServer(app) as running:
            results = concurrent_posts(running.url + "/v1/classify", 8, png_bytes())
            assert [status for status, _, _ in results] == [200] * 8
            metrics = scrape(running.url)
        sizes = {labels[0][1]: value for (name, labels), value in metrics.items() if name == "vitlab_batch_size_bucket"}
        assert metrics[("vitlab_batch_size_sum", ())] == 8
        assert sizes[str(float(most))] == metrics[("vitlab_batch_size_count", ())]  # no batch over max_batch
        if max_batch == 4:
            assert metrics[("vitlab_batch_size_count", ())] < 8  # requests shared model calls


def test_batcher_takes_batches_in_order_and_keeps_kinds_apart():
    calls = []

    def run(key, images):
        calls.append((key, images[:, 0, 0, 0].tolist()))
        return [(key, v) for v in images[:, 0, 0, 0].tolist()]

    async def scenario():
        batcher = Batcher(run, max_batch=2, max_wait_s=0.05, max_queue=6)
        image = lambda v: torch.full((1, 1, 1, 1), float(v))  # noqa: E731  (one 1x1 image)
        first = asyncio.ensure_future(batcher.submit("a", torch.cat([image(1), image(2), image(3)])))
        second = asyncio.ensure_future(batcher.submit("b", image(9)))
        third = asyncio.ensure_future(batcher.submit("a", image(4)))
        await asyncio.sleep(0)  # the three submits have queued their images; the worker has not run yet
        with pytest.raises(QueueFull, match="5 images queued"):
            batcher.check_room(2)
        out = await asyncio.gather(first, second, third)
        await batcher.close()
        return out

    out = asyncio.run(scenario())
    assert out == [[("a", 1.0), ("a", 2.0), ("a", 3.0)], [("b", 9.0)], [("a", 4.0)]]
    assert calls == [("a", [1.0, 2.0]), ("a", [3.0, 4.0]), ("b", [9.0])]


def test_settings_are_checked():
    with pytest.raises(vitlab.errors.VitlabError, match="max_batch must be at least 1"):
        ServeSettings(max_batch=0)
    with pytest.raises(vitlab.errors.VitlabError, match=r"max_images \(20\) cannot exceed max_queue \(8\)"):
        ServeSettings(max_images=20, max_queue=8)
    with pytest.raises(vitlab.errors.VitlabError, match="needs --backend onnx-int8"):
        create_app("model.onnx")


@pytest.mark.slow
def test_vitlab_serve_command_answers_accepted_requests_when_stopped(ckpt, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    (tmp_path / "key").write_text("k3y\n")
    cmd = [sys.executable, "-m", "vitlab", "serve", str(ckpt), "--port", "0", "--max-batch", "4",
           "--max-wait-ms", "1500", "--api-key-file", str(tmp_path / "key"), "--name", "cli-model"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("vitlab serve: cli-model (torch on cpu) at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split("/ ")[0]
        key = {"X-API-Key": "k3y"}
        deadline = time.time() + 120
        assert _up(url)  # the line comes once the server accepts: no waiting after it
        answer = {}
        sender = threading.Thread(target=lambda: answer.update(
            result=post_files(url + "/v1/classify", files_of(images[:1]), headers=key)))
        sender.start()
        while scrape(url, key).get(("vitlab_queue_length", ()), 0) < 1:  # accepted and waiting for its batch
            assert time.time() < deadline and sender.is_alive()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sender.join(60)
        status, _, body = answer["result"]
        assert status == 200 and len(body["results"]) == 1 and body["model"] == "cli-model"
        assert proc.wait(60) == 0
        assert "vitlab serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_vitlab_serve_merge_tokens_answers_as_predict_with_merging_and_says_so_in_its_card(ckpt, images, capsys):
    with cli_server(str(ckpt), "--merge-tokens", "2") as (line, url):
        assert line.startswith("vitlab serve: tiny (torch on cpu) at http://127.0.0.1:"), line
        card = json.loads(request(url + "/v1/model")[2])
        depth = len(vitlab.load(ckpt).blocks)
        assert card["architecture"] == "VisionTransformer" and card["source"] == ckpt.name
        assert card["token_merging"] == [2] * depth
        status, _, answer = post_files(url + "/v1/classify", files_of(images[:2]))
        assert status == 200, answer
        capsys.readouterr()
        assert cli_main(["predict", str(ckpt), *map(str, images[:2]), "--json", "--merge-tokens", "2"]) == 0
        merged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for got, want in zip(answer["results"], merged):
            assert_same_top(got["top"], want)
        assert merged != expected_predictions(ckpt, images[:2], capsys)  # merging changed the answers


async def _hello_app(scope, receive, send):
    """A minimal ASGI app whose startup takes a moment, as loading a model does."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(0.02)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.mark.slow  # 50 starts and stops of uvicorn: about 12 s here
def test_run_server_announces_only_once_connections_are_accepted(monkeypatch):
    # what `vitlab serve` does: bind, then print the address from on_ready; a script reading the line connects at
    # once. Before the fix the line came before uvicorn listened: "connection refused".
    servers = []
    init = uvicorn.Server.__init__

    def recording_init(self, config):  # to stop each server from here (run_server blocks until a signal)
        servers.append(self)
        init(self, config)

    monkeypatch.setattr(uvicorn.Server, "__init__", recording_init)
    for attempt in range(50):
        sock = bind_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        ready = threading.Event()
        thread = threading.Thread(target=run_server, args=(_hello_app, sock),
                                  kwargs=dict(log_level="warning", on_ready=ready.set), daemon=True)
        thread.start()
        assert ready.wait(30), "never announced"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = conn.makefile("rb").read()
        finally:
            servers[-1].should_exit = True
            thread.join(30)
            sock.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello"), (attempt, answer[:80])


def _up(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url + "/healthz", timeout=5).close()
        return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@pytest.mark.parametrize("args, message", [
    (["missing.safetensors"], "missing.safetensors"),
    (["{ckpt}", "--port", "70000"], "--port must be in 0..65535"),
    (["{ckpt}", "--max-batch", "0"], "max_batch must be at least 1"),
    (["{ckpt}", "--backend", "onnx-int8", "--device", "cuda"], "--device cuda"),
    (["{ckpt}", "--api-key-file", "no-such-key-file"], "--api-key-file no-such-key-file"),
    (["{ckpt}", "--api-key-file", "{ckpt}"], "not a text file"),  # was a UnicodeDecodeError traceback
])
def test_serve_command_reports_bad_options_in_one_line(ckpt, args, message, capsys):
    code = cli_main(["serve", *(a.format(ckpt=ckpt) for a in args)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vitlab serve: error:") and message in err and "\n" not in err, err
