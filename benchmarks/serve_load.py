"""Load test of ``vitlab serve`` on this machine's loopback interface, next to the model's own offline throughput.

    python benchmarks/serve_load.py --threads 1              # ViT-S/16 at 224 on the CPU: ~4 minutes on 2 cores
    python benchmarks/serve_load.py --model vit_ti16 --duration 5 --concurrency 1 8
    python benchmarks/serve_load.py --device cuda --max-batch 64 --concurrency 1 8 32 128

What it does, in one run:

1. saves the model (random weights: speed does not depend on them) and measures its offline inference throughput in
   this process at batch ``--max-batch`` and at batch 1 (``vitlab bench``'s timing: warm-up, then rounds of calls,
   medians), before any server runs and again after them (served rates are compared with the mean);
2. starts ``vitlab serve`` in a subprocess twice, with dynamic batching on (``--max-batch``, ``--max-wait-ms``) and
   off (``--max-batch 1``), and at each concurrency runs that many clients, each sending one JPEG at a time over its
   own keep-alive connection for ``--duration`` seconds (at most ``--max-requests`` requests);
3. overloads the batching server (``--overload`` clients against a queue of ``--overload-queue`` images) to check
   that it answers 503 rather than queueing without bound, and that its memory stays flat.

It prints throughput (answered images per second), p50 / p99 latency, failures, the mean batch size and the share
of the time the model was computing (both from ``/metrics``) and the server's resident memory, with the ratio of
served to offline throughput. Only 127.0.0.1 is
ever contacted; every loop is bounded in requests and time.

On a CPU shared with other jobs use ``--threads 1``: with more intra-op threads than free cores, OpenMP's waiting
threads make both the offline and the served numbers collapse (measured here: ViT-Ti/16 at 64 px ran 0.4 img/s at
batch 1 with 2 threads and 37 img/s with 1 thread, at a load average of 7 on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vitlab  # noqa: E402
from vitlab.compute.bench import interleaved_times  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by construction


def jpeg_bytes(size: int, seed: int = 0) -> bytes:
    """A smooth random photo-like JPEG (what a client would send), ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def offline_throughput(model, batch_sizes: list[int], device: torch.device, rounds: int, seconds: float) -> dict:
    """Images per second of ``model`` alone at each batch size (median over rounds)."""
    cfg = model.cfg
    fns = {}
    iters = {}
    for b in batch_sizes:
        x = torch.randn(b, cfg.in_chans, *cfg.img_size, device=device)

        def run(x=x):
            with torch.inference_mode():
                return model(x)

        fns[b] = run
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        iters[b] = max(1, int(seconds / max(time.perf_counter() - start, 1e-4)))
    out = {}
    for b, fn in fns.items():
        times = interleaved_times({b: fn}, rounds=rounds, iters=iters[b], device=device, warmup=1)[b]
        out[b] = b / statistics.median(times)
    return out


class Client:
    """One keep-alive HTTP/1.1 connection sending ``POST /v1/classify`` with a raw image body."""

    def __init__(self, port: int, body: bytes):
        self.port, self.body = port, body
        self.reader = self.writer = None
        self.head = (f"POST /v1/classify?top_k=5 HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: image/jpeg\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode()

    async def send(self) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.writer.write(self.head + self.body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.reader = self.writer = None


async def load(port: int, body: bytes, concurrency: int, duration: float, max_requests: int) -> dict:
    """``concurrency`` clients in a closed loop for ``duration`` seconds or ``max_requests`` requests in all."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures = [0]
    budget = [max_requests]
    deadline = time.perf_counter() + duration

    async def worker():
        client = Client(port, body)
        try:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                start = time.perf_counter()
                try:
                    status = await asyncio.wait_for(client.send(), timeout=120)
                except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                    failures[0] += 1
                    await client.close()
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - start)
        finally:
            await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "ok": len(latencies),
            "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "statuses": statuses, "failures": failures[0]}


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``vitlab serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace, max_batch: int, max_wait_ms: float,
                 max_queue: int):
        cmd = [sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--host", HOST, "--port", "0",
               "--device", args.device, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
               "--max-queue", str(max_queue), "--name", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            self.stop()
            raise SystemExit(f"vitlab serve did not start: {line!r}")
        self.port = int(line.split(" at http://")[1].split("/")[0].rsplit(":", 1)[1])
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://{HOST}:{self.port}/healthz", timeout=5).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("vitlab serve did not become healthy") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(server: Server, body: bytes, concurrency: int, args) -> dict:
    asyncio.run(load(server.port, body, min(concurrency, 4), 1.0, 2 * concurrency))  # warm the connections
    before = scrape(server.port)
    result = asyncio.run(load(server.port, body, concurrency, args.duration, args.max_requests))
    after = scrape(server.port)
    count = after[("vitlab_batch_size_count", ())] - before[("vitlab_batch_size_count", ())]
    total = after[("vitlab_batch_size_sum", ())] - before[("vitlab_batch_size_sum", ())]
    result["mean_batch"] = total / count if count else 0.0
    # the share of the wall time the model was computing: what HTTP, decoding and queueing leave to it
    busy = after[("vitlab_batch_duration_seconds_sum", ())] - before[("vitlab_batch_duration_seconds_sum", ())]
    result["model_busy"] = busy / result["seconds"]
    result["rss_mb"] = rss_mb(server.proc.pid)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_s16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads of the offline run and the server (default: torch's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=128)
    p.add_argument("--duration", type=float, default=12.0, help="seconds per measurement (default 12)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per measurement at most")
    p.add_argument("--overload", type=int, default=64, help="clients of the overload check (0: skip it)")
    p.add_argument("--overload-queue", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256, help="side of the JPEG the clients send (default 256)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    body = jpeg_bytes(args.image_size)
    report = {"model": args.model, "img_size": args.img_size, "device": args.device, "threads":
              torch.get_num_threads(), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jpeg_bytes": len(body),
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / f"{args.model}.safetensors"
        model = vitlab.create_model(args.model, img_size=args.img_size)
        vitlab.save(model, checkpoint)
        model = vitlab.load(checkpoint).to(device).eval()
        batches = sorted({1, args.max_batch})
        offline_before = offline_throughput(model, batches, device, rounds=3, seconds=2.0)
        print(f"{args.model} at {args.img_size} on {args.device}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
        print(f"offline (model alone) before the server runs: batch {args.max_batch}: "
              f"{offline_before[args.max_batch]:.1f} img/s, batch 1: {offline_before[1]:.1f} img/s")
        for batching in (True, False):
            max_batch = args.max_batch if batching else 1
            server = Server(checkpoint, args, max_batch, args.max_wait_ms if batching else 0.0, args.max_queue)
            try:
                for clients in args.concurrency:
                    result = measure(server, body, clients, args)
                    result.update(batching=batching, max_batch=max_batch)
                    report["runs"].append(result)
            finally:
                server.stop()
        # the offline rate again, after the server runs: on a shared machine the load moves; the served rates are
        # compared with the mean of the two measurements and the spread between them is reported
        offline_after = offline_throughput(model, batches, device, rounds=3, seconds=2.0)
        offline = {b: (offline_before[b] + offline_after[b]) / 2 for b in batches}
        report["offline"] = {"before": {str(b): v for b, v in offline_before.items()},
                             "after": {str(b): v for b, v in offline_after.items()},
                             "mean": {str(b): v for b, v in offline.items()}}
        del model
        print(f"offline (model alone) after the server runs: batch {args.max_batch}: "
              f"{offline_after[args.max_batch]:.1f} img/s, batch 1: {offline_after[1]:.1f} img/s")
        print(f"{'batching':>9} {'clients':>7} {'img/s':>7} {'vs offline':>10} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'mean batch':>10} {'model busy':>10} {'failed':>6} {'RSS MB':>7}")
        for result in report["runs"]:
            reference = offline[result["max_batch"]]
            result.update(vs_offline=result["throughput"] / reference, offline_reference=reference)
            failed = result["failures"] + sum(n for s, n in result["statuses"].items() if s != 200)
            print(f"{'on' if result['batching'] else 'off':>9} {result['concurrency']:>7} "
                  f"{result['throughput']:>7.1f} {result['vs_offline']:>10.2f} {result['p50_ms']:>8.0f} "
                  f"{result['p99_ms']:>8.0f} {result['mean_batch']:>10.1f} {result['model_busy']:>10.2f} {failed:>6} "
                  f"{result['rss_mb']:>7.0f}")
        if args.overload:
            server = Server(checkpoint, args, args.max_batch, args.max_wait_ms, args.overload_queue)
            try:
                # warm up first (the first full batches allocate their buffers), then two halves under overload
                asyncio.run(load(server.port, body, args.max_batch, 300.0, 2 * args.max_batch))
                rss_before = rss_mb(server.proc.pid)
                first = asyncio.run(load(server.port, body, args.overload, args.duration / 2, args.max_requests))
                rss_middle = rss_mb(server.proc.pid)
                second = asyncio.run(load(server.port, body, args.overload, args.duration / 2, args.max_requests))
                rss_after = rss_mb(server.proc.pid)
            finally:
                server.stop()
            statuses = {}
            for part in (first, second):
                for s, n in part["statuses"].items():
                    statuses[s] = statuses.get(s, 0) + n
            report["overload"] = {"clients": args.overload, "max_queue": args.overload_queue, "statuses": statuses,
                                  "failures": first["failures"] + second["failures"],
                                  "throughput": (first["ok"] + second["ok"]) / (first["seconds"] + second["seconds"]),
                                  "p99_ms_of_answered": max(first["p99_ms"], second["p99_ms"]),
                                  "rss_mb": [rss_before, rss_middle, rss_after]}
            o = report["overload"]
            print(f"overload: {args.overload} clients, queue limit {args.overload_queue} images: statuses "
                  f"{dict(sorted(statuses.items()))}, {o['failures']} connection failures, {o['throughput']:.1f} "
                  f"img/s answered; server RSS after warm-up {rss_before:.0f}, after half the time {rss_middle:.0f}, "
                  f"at the end {rss_after:.0f} MB")
    batch_seconds = args.max_batch / offline[args.max_batch]
    top = max(args.concurrency)
    on = next((r for r in report["runs"] if r["batching"] and r["concurrency"] == top), None)
    if on is not None:
        bound = args.max_wait_ms + 2000 * batch_seconds
        report["targets"] = {"served_vs_offline_at_top_concurrency": on["vs_offline"],
                             "p99_ms": on["p99_ms"], "p99_bound_ms": bound}
        print(f"targets at {top} clients with batching: served / offline {on['vs_offline']:.2f} (target >= 0.85); "
              f"p99 {on['p99_ms']:.0f} ms vs max-wait + 2 batch times = {bound:.0f} ms")
    report["seconds"] = round(time.time() - started, 1)
    print(f"took {report['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
