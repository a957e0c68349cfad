"""Does a streamed Hugging Face source keep memory flat? Peak RSS of one training epoch over 5,000 vs 20,000 images.

    PYTHONPATH=. nice -n 10 python benchmarks/hf_streaming_memory.py [--sizes 5000 20000] [--workers 2]

Writes a parquet set of ``max(--sizes)`` tiny PNGs (32x32 noise, about 3 KB each; row groups of 256 rows, the
``datasets`` features metadata in the schema) and a copy of its first rows for each smaller size, then in a fresh
process per (size, path) reads one epoch through the training loader (``FolderTrainLoader``: decode, Inception crop,
batches of 64) and reports the peak resident memory of the main process and of its largest DataLoader worker
(``getrusage`` maxima). ``--stream on`` reads one row group at a time per worker plus a 1,000-row shuffle buffer, so
its peak should not depend on the size; ``--stream off`` (random access: the parquet file is read into memory)
is measured too, for contrast.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_set(path: Path, n: int, seed: int = 0) -> None:
    """``n`` random 32x32 PNGs with labels 0..9 as parquet, in row groups of 256."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(str(path), features.arrow_schema) as writer:
        for lo in range(0, n, 256):
            rows = min(256, n - lo)
            images = []
            for _ in range(rows):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
            table = pa.Table.from_pydict({"image": images, "label": (np.arange(lo, lo + rows) % 10).tolist()},
                                         schema=features.arrow_schema)
            writer.write_table(table, row_group_size=256)


def measure(path: str, stream: str, workers: int) -> dict:
    """One epoch through the training loader; peak RSS in MiB of this process and of its largest child."""
    from vitlab.data import build_dataset
    from vitlab.data.loaders import Augment, FolderTrainLoader

    torch_threads = os.environ.get("OMP_NUM_THREADS")
    dataset = build_dataset(f"{path}?stream={stream}")
    loader = FolderTrainLoader(dataset, 64, (32, 32), Augment(), seed=0, num_workers=workers)
    images = 0
    for batch in loader.epoch(0):
        images += batch.images.shape[0]
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"images": images, "kind": type(dataset).__name__, "threads": torch_threads,
            "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", nargs=3, metavar=("PATH", "STREAM", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process
        path, stream, workers = args.measure
        print(json.dumps(measure(path, stream, int(workers))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow.parquet as pq

        full = Path(tmp) / f"set-{max(args.sizes)}.parquet"
        write_set(full, max(args.sizes))
        files = {max(args.sizes): full}
        for n in sorted(set(args.sizes) - {max(args.sizes)}):  # the first n rows of the big set
            files[n] = Path(tmp) / f"set-{n}.parquet"
            pq.write_table(pq.read_table(str(full)).slice(0, n), str(files[n]), row_group_size=256)
        print(f"{'images':>7} {'path':>6} {'file MiB':>9} {'main peak MiB':>14} {'worker peak MiB':>16}")
        for stream in ("on", "off"):
            for n in sorted(files):
                env = dict(os.environ, OMP_NUM_THREADS="1")
                out = subprocess.run([sys.executable, __file__, "--measure", str(files[n]), stream,
                                      str(args.workers)], env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                size = files[n].stat().st_size / 2**20
                print(f"{n:>7} {'stream' if stream == 'on' else 'random':>6} {size:>9.1f} {r['main_mib']:>14.0f} "
                      f"{r['worker_mib']:>16.0f}")


if __name__ == "__main__":
    main()
