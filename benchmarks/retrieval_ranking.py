"""Time and memory of the retrieval ranking (recall@K both ways) on random unit embeddings of several sizes.

    PYTHONPATH=. nice -n 10 python benchmarks/retrieval_ranking.py [--sizes 5000 10000] [--captions 5] [--dim 512]
                                                                   [--device cpu] [--block 24]

For each number of images N (N x captions texts, each a noisy copy of its image's embedding), a fresh process builds
the embeddings, then times :func:`vitlab.evaluate.retrieval.retrieval_metrics` and reports the peak resident memory
above what the process held before it started (the peak is reset through ``/proc/self/clear_refs`` first, then read
as ``VmHWM``; Linux only), next to the size the whole similarity matrix would have. The blocks hold 2^block scores
each, so the peak should follow the block size, not N x M.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB


def measure(n: int, captions: int, dim: int, device: str, block: int) -> dict:
    import numpy as np
    import torch

    from vitlab.evaluate.retrieval import retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    owner = np.repeat(np.arange(n), captions)
    noise = torch.randn(len(owner), dim, generator=gen) * 3 / dim ** 0.5
    texts = torch.nn.functional.normalize(images[owner] + noise, dim=-1)
    del noise
    images, texts = images.to(device), texts.to(device)
    current = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current size (Linux >= 4.0)
        f.write("5")
    start = time.perf_counter()
    results = retrieval_metrics(images, texts, owner, block_elements=1 << block)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return {"images": n, "texts": len(owner), "seconds": round(seconds, 2),
            "peak_above_start_mib": round(peak - current), "whole_matrix_mib": round(n * len(owner) * 4 / 2 ** 20),
            "i2t_r1": results["image_to_text"]["recall@1"], "t2i_r1": results["text_to_image"]["recall@1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000])
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block", type=int, default=24, help="log2 of the scores per block (default 24)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: measure one size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.captions, args.dim, args.device, args.block)))
        return
    for n in args.sizes:  # a fresh process each: the peak memory of one size only
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--captions", str(args.captions),
                              "--dim", str(args.dim), "--device", args.device, "--block", str(args.block)],
                             check=True, capture_output=True, text=True).stdout
        print(out.strip())


if __name__ == "__main__":
    main()
