"""``vitlab serve`` under hostile clients: the server's time and memory, and what good clients get meanwhile.

    python benchmarks/serve_hostile.py                      # ViT-Ti/16 at 32 px: about a minute on 2 cores
    python benchmarks/serve_hostile.py --slow-clients 50 --max-connections 20

Starts ``vitlab serve`` in a subprocess on 127.0.0.1 (only loopback is ever contacted) and runs, one after the other:

1. ``pixel bomb``: requests of four 16-bit 5000 x 5000 PNGs of zeros (about 190 KB each request): the answer, its
   time and the server's peak resident memory (``VmHWM``) before and after; then two of them (at the per-request
   pixel limit, so decoded);
2. ``json bombs``: 100,000 nested ``[``, objects 3,000 deep, ``top_k: Infinity``, a 5,000-digit integer;
3. ``slow headers``: ``--slow-clients`` sockets sending one header byte every 0.5 s against ``--max-connections``,
   while a good client sends requests: their statuses and latency, and when the slow sockets were cut off;
4. ``slow body``: one client sending its body one byte every 0.5 s: the 408 and its time.

Each line gives the statuses, the wall time and the server's memory. Bounded in requests and time throughout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vitlab  # noqa: E402

HOST = "127.0.0.1"


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of a process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def png_zeros_16bit(width: int, height: int) -> bytes:
    """A 16-bit grey PNG of zeros, written chunk by chunk (no image in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = bytes(1 + 2 * width)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row * 100) for _ in range(height // 100)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def post(url: str, body: bytes, kind: str, timeout: float = 120.0) -> tuple[int, float, str]:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    return status, time.perf_counter() - start, text


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def good_png() -> bytes:
    out = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def trickle(data: bytes, port: int, every: float, stop: threading.Event, cut: list) -> None:
    """Send ``data`` one byte every ``every`` s; record when the server hung up."""
    started = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=60) as sock:
        for byte in data:
            if stop.wait(every):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
        try:
            answer = sock.recv(200)
        except OSError:
            answer = b""
    cut.append((time.perf_counter() - started, answer.split(b"\r\n", 1)[0].decode(errors="replace")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-clients", type=int, default=25)
    parser.add_argument("--max-connections", type=int, default=20)
    parser.add_argument("--header-timeout", type=float, default=3.0)
    parser.add_argument("--body-timeout", type=float, default=3.0)
    parser.add_argument("--bomb-requests", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="serve-hostile-"))
    model = vitlab.create_model("vit_ti16", img_size=32, patch_size=8, num_classes=5)
    checkpoint = folder / "tiny.safetensors"
    vitlab.save(model.eval(), checkpoint)
    # the command of this checkout, with the limits under test
    cmd = [sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--host", HOST, "--port", "0", "--threads", "1",
           "--max-connections", str(args.max_connections), "--header-timeout", str(args.header_timeout),
           "--body-timeout", str(args.body_timeout)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        port = int(line.split(" at http://")[1].split("/")[0].rsplit(":", 1)[1])
        base = f"http://{HOST}:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=5).close()
                break
            except OSError:
                time.sleep(0.2)
        body, kind = multipart([("ok.png", good_png())])
        status, seconds, _ = post(base + "/v1/classify", body, kind)
        print(f"{'good request':28s} {status}  {seconds * 1000:7.1f} ms   server {memory_mb(proc.pid)[0]:.0f} MB "
              f"(peak {memory_mb(proc.pid)[1]:.0f} MB)")

        bomb = png_zeros_16bit(5000, 5000)
        bomb_body, bomb_kind = multipart([(f"{i}.png", bomb) for i in range(4)])
        for i in range(args.bomb_requests):
            status, seconds, text = post(base + "/v1/classify", bomb_body, bomb_kind)
            rss, peak = memory_mb(proc.pid)
            print(f"{'pixel bomb ' + str(len(bomb_body) // 1024) + ' KB #' + str(i):28s} {status}  "
                  f"{seconds * 1000:7.1f} ms   server {rss:.0f} MB (peak {peak:.0f} MB)  {json.loads(text)}")

        heavy_body, heavy_kind = multipart([(f"{i}.png", bomb) for i in range(2)])  # at the per-request limit
        status, seconds, _ = post(base + "/v1/classify", heavy_body, heavy_kind)
        rss, peak = memory_mb(proc.pid)
        print(f"{'two 16-bit 25 MP at limit':28s} {status}  {seconds * 1000:7.1f} ms   server {rss:.0f} MB "
              f"(peak {peak:.0f} MB)")

        png = good_png()
        import base64

        one = base64.b64encode(png).decode()
        bombs = {"100000 nested [": b"[" * 100_000, "objects 3000 deep": b'{"a":' * 3000 + b"1" + b"}" * 3000,
                 "top_k Infinity": f'{{"images": ["{one}"], "top_k": Infinity}}'.encode(),
                 "5000-digit top_k": f'{{"images": ["{one}"], "top_k": 1{"0" * 4999}}}'.encode()}
        for name, data in bombs.items():
            status, seconds, text = post(base + "/v1/classify", data, "application/json")
            print(f"{'json: ' + name:28s} {status}  {seconds * 1000:7.1f} ms   {json.loads(text)['error'][:70]}")

        stop, cut = threading.Event(), []
        head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + b"X-Pad: y\r\n" * 200
        threads = [threading.Thread(target=trickle, args=(head, port, 0.5, stop, cut), daemon=True)
                   for _ in range(args.slow_clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        results = [post(base + "/v1/classify", body, kind) for _ in range(10)]
        for t in threads:
            t.join(args.header_timeout + 10)
        stop.set()
        statuses = sorted({s for s, _, _ in results})
        worst = max(s for _, s, _ in results)
        print(f"{'slow headers x' + str(args.slow_clients):28s} good requests {statuses}, slowest "
              f"{worst * 1000:.1f} ms; slow sockets cut after {min(c for c, _ in cut):.1f}-"
              f"{max(c for c, _ in cut):.1f} s with {sorted({a for _, a in cut})}")

        data = png
        raw = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
               % len(data))
        stop = threading.Event()

        def send_slowly(sock: socket.socket) -> None:
            for byte in data:
                if stop.wait(0.5):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        with socket.create_connection((HOST, port), timeout=60) as sock:
            sock.sendall(raw)
            started = time.perf_counter()
            sender = threading.Thread(target=send_slowly, args=(sock,), daemon=True)
            sender.start()
            answer = sock.recv(200)
            print(f"{'slow body':28s} {answer.split(b' ', 2)[1].decode()} after "
                  f"{time.perf_counter() - started:.1f} s")
            stop.set()
            sender.join(5)
        rss, peak = memory_mb(proc.pid)
        print(f"{'end':28s} server {rss:.0f} MB (peak {peak:.0f} MB)")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
