"""Per-call cost of a ``dynamic_img_size`` ViT against fixed-size models (issue target: under 2% at batch 8, CPU).

    PYTHONPATH=. nice -n 10 python benchmarks/dynamic_size_overhead.py [vit_ti16] [--batch-size 8] [--rounds 15]

Two comparisons, each on the same weights and inputs, timed in alternating rounds (A, B, A, B, ...) so that both
sides see the same machine load; each ratio is the median of the per-round ratios (dynamic / fixed):

- at the build size (224): the dynamic model against the fixed model (the cost of the size checks);
- at another size (256): the dynamic model, whose resampled position embedding is cached after the first call,
  against a fixed model built at 256 from the resampled checkpoint (the cost of the cache look-up).

Also printed: the code that differs (size check + cached look-up) timed on its own, which does not depend on the
machine's load, and the one-off cost of a cache miss (resampling the position embedding for a new grid).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitlab.models import create_model
from vitlab.models.resample import resample_pos_embed


def _seconds(fn, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls


def compare(fixed, dynamic, x: torch.Tensor, rounds: int, calls: int) -> tuple[float, float, float]:
    """(median ratio dynamic / fixed, median fixed seconds per call, median dynamic seconds per call)."""
    fixed(x), dynamic(x)  # warm-up (and fill the cache)
    ratios, a, b = [], [], []
    for i in range(rounds):
        if i % 2:  # alternate which side goes first
            tb, ta = _seconds(dynamic, x, calls), _seconds(fixed, x, calls)
        else:
            ta, tb = _seconds(fixed, x, calls), _seconds(dynamic, x, calls)
        a.append(ta)
        b.append(tb)
        ratios.append(tb / ta)
    return statistics.median(ratios), statistics.median(a), statistics.median(b)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="vit_ti16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2, help="calls per side per round")
    parser.add_argument("--other-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fixed = create_model(args.model).eval()
    dynamic = create_model(args.model, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    size, other = fixed.cfg.img_size, args.other_size
    at_other = create_model(args.model, img_size=other).eval()
    sd = dict(fixed.state_dict())
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], at_other.cfg.grid_size, fixed.cfg.grid_size, 1,
                                         dynamic.cfg.dynamic_resample)
    at_other.load_state_dict(sd)

    x = torch.randn(args.batch_size, 3, *size)
    y = torch.randn(args.batch_size, 3, other, other)
    assert torch.allclose(dynamic(y), at_other(y), atol=1e-5)  # same function, so the timing compares like with like

    ratio, t_fixed, t_dyn = compare(fixed, dynamic, x, args.rounds, args.calls)
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"build size {size[0]}x{size[1]}: fixed {1e3 * t_fixed:.1f} ms/call, dynamic {1e3 * t_dyn:.1f} ms/call, "
          f"ratio {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    ratio, t_fixed, t_dyn = compare(at_other, dynamic, y, args.rounds, args.calls)
    print(f"other size {other}x{other} (cached grid): built-at-size {1e3 * t_fixed:.1f} ms/call, dynamic "
          f"{1e3 * t_dyn:.1f} ms/call, ratio {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    # the code that differs between the two models, timed alone (robust to machine load): the input-size check and
    # the position-embedding look-up, against the fixed model's whole call
    reps = 2000
    start = time.perf_counter()
    for _ in range(reps):
        dynamic.position_embedding(dynamic.input_grid(y))
    extra = (time.perf_counter() - start) / reps
    print(f"size check + cached look-up alone: {1e6 * extra:.1f} us/call = {100 * extra / t_fixed:.4f}% of a "
          f"{1e3 * t_fixed:.0f} ms call")
    grid = (other // fixed.cfg.patch_size[0] + 1, other // fixed.cfg.patch_size[1])
    start = time.perf_counter()
    dynamic.position_embedding(grid)  # a grid not seen yet: one resampling
    miss = time.perf_counter() - start
    print(f"cache miss (resample to {grid[0]}x{grid[1]}): {1e3 * miss:.2f} ms, once per grid")


if __name__ == "__main__":
    main()
