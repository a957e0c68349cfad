"""Where does oneDNN's inner product beat F.linear on this CPU? The measurement behind the thresholds of
``vitlab.compute.onednn`` (``ONEDNN_MIN_FEATURES``, ``ONEDNN_MIN_MACS``).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/onednn_linear_thresholds.py [--threads 1] [--rounds 5]

For layers of ``features`` inputs and outputs (and the MLP's ``features -> 4 x features``) applied to ``rows`` token
rows, it times one training use of the layer (forward and backward, float32, CPU) as ``nn.Linear`` and as
``OneDnnLinear``, alternating the two in each round, and prints the median of the per-round time ratios
(F.linear / oneDNN: above 1 means oneDNN is faster) with the product's multiply-accumulates. Read the thresholds off
the table: the smallest width and product size from which the ratio stays above 1.

``--models vit_s16 vit_b16`` instead prints the choice vitlab makes on this machine for those models' Linear shapes
(``vitlab.compute.onednn.linear_choices``): a fresh measurement per shape (oneDNN's time over F.linear's, forward
and training use, median and 80th percentile of alternating rounds), the choice it leads to, and what the cache
under $VITLAB_HOME holds for this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vitlab.compute import onednn
from vitlab.compute.onednn import ONEDNN_MIN_FEATURES, ONEDNN_MIN_MACS, onednn_linear_available, onednn_product
from vitlab.models import create_model


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _use(product, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    def step():
        y = product(x, w, b)  # forward
        grad = torch.ones_like(y)
        product(grad, w.t(), None)  # dx = dy W
        product(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t(), None)  # dW = dy^T x
    return step


def print_choices(models: list[str]) -> None:
    """The measured choice for each Linear shape of ``models`` on this machine, and the cached one."""
    cached = onednn.read_calibration(onednn.calibration_path()).get(onednn.machine_key(), {})
    print(f"machine: {onednn.machine_key()}\ncache: {onednn.calibration_path()}")
    print(f"{'model':>10} {'in':>5} {'out':>5} {'rows':>5} {'fwd':>6} {'fwd80':>6} {'use':>6} {'use80':>6} "
          f"{'choice':>10} {'cached':>10}")
    for name in models:
        for fan_in, fan_out in onednn.linear_shapes(create_model(name)):
            rounds = onednn.measure_shape(fan_in, fan_out)
            ratios = onednn.median_ratios(rounds)
            choice = "busy/off" if onednn.disturbed(rounds, fan_in, fan_out) else onednn.decide(ratios)
            entry = cached.get(f"{fan_in}x{fan_out}", {}).get("choice", "-")
            print(f"{name:>10} {fan_in:>5} {fan_out:>5} {onednn.calibration_rows(fan_in, fan_out):>5} "
                  f"{ratios['forward']:>6.2f} {ratios['forward_high']:>6.2f} {ratios['use']:>6.2f} "
                  f"{ratios['use_high']:>6.2f} {choice:>10} {entry:>10}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--features", type=int, nargs="+", default=[64, 96, 128, 192, 384, 768])
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--models", nargs="+", help="print the measured choice for these models' Linear shapes")
    args = parser.parse_args()
    if not onednn_linear_available():
        raise SystemExit("this PyTorch build has no usable oneDNN inner product")
    torch.set_num_threads(args.threads)
    if args.models:
        print_choices(args.models)
        return
    print(f"{args.threads} thread(s); current thresholds: features >= {ONEDNN_MIN_FEATURES}, "
          f"MACs >= 2^{ONEDNN_MIN_MACS.bit_length() - 1}")
    print(f"{'rows':>6} {'in':>5} {'out':>5} {'MACs':>12} {'F.linear ms':>12} {'oneDNN ms':>10} {'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for features in args.features:
            for fan_in, fan_out in ((features, features), (features, 4 * features)):
                for rows in args.rows:
                    x = torch.randn(rows, fan_in, generator=gen)
                    w = torch.randn(fan_out, fan_in, generator=gen)
                    b = torch.randn(fan_out, generator=gen)
                    macs = rows * fan_in * fan_out
                    repeats = max(1, int(2e8 // macs))
                    plain, fast, ratios = [], [], []
                    for _ in range(args.rounds):
                        plain.append(_time(_use(F.linear, x, w, b), repeats))
                        fast.append(_time(_use(onednn_product, x, w, b), repeats))
                        ratios.append(plain[-1] / fast[-1])
                    print(f"{rows:>6} {fan_in:>5} {fan_out:>5} {macs:>12,} {1e3 * min(plain):>12.3f} "
                          f"{1e3 * min(fast):>10.3f} {statistics.median(ratios):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
