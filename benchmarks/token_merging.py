"""Token merging (vitlab.compute.merge_tokens): inference speed-up against r, and the accuracy it costs a trained model.

    PYTHONPATH=. python benchmarks/token_merging.py speed [vit_b16] [--r 0,8,13,16] [--batch-size 8] [--rounds 7]
    PYTHONPATH=. python benchmarks/token_merging.py accuracy RUN_OR_CHECKPOINT --data fashion-mnist [--r 0,2,4,6,8]

``speed``: one model with random weights (speed does not depend on them) and a copy per ``r``, timed in the same
process in interleaved rounds (every copy once per round, the order reversed every other round; warm-up first), so
that the load of other processes hits every ``r`` alike. Printed per ``r``: the tokens entering each block and after
the last, the encoder's multiply-accumulates as a share of the unmerged model's (analytic, from the token counts), the
median images per second and the median over rounds of the per-round speed-up over ``r = 0``.

``accuracy``: ``vitlab eval``'s top-1 of a checkpoint on a data set's test split for each ``r`` (the same images and
preprocessing each time).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from vitlab.compute import merge_tokens, set_onednn_linear, token_counts
from vitlab.compute.bench import interleaved_times, paired_ratio
from vitlab.models import create_model


def encoder_macs(cfg, counts: list[int]) -> int:
    """Multiply-accumulates per image of the encoder blocks when ``counts[i]`` tokens enter block i (attention
    projections and products on those) and ``counts[i + 1]`` leave its merge (the MLP on those); the matching's own
    products (|A| x |B| x head_dim per block) included."""
    D, M, hd = cfg.embed_dim, cfg.mlp_dim, cfg.embed_dim // cfg.num_heads
    total = 0
    for n_in, n_out in zip(counts, counts[1:]):
        total += 4 * n_in * D * D + 2 * n_in * n_in * D + 2 * n_out * D * M
        if n_out < n_in:
            total += (n_in // 2) ** 2 * hd
    return total


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = set_onednn_linear(create_model(args.model)).eval()
    models = {r: merge_tokens(copy.deepcopy(base), r) if r else base for r in args.r}
    x = torch.randn(args.batch_size, base.cfg.in_chans, *base.cfg.img_size)

    def runner(model):
        def run():
            with torch.inference_mode():
                return model(x)
        return run

    times = interleaved_times({r: runner(m) for r, m in models.items()}, args.rounds, 1, torch.device("cpu"),
                              warmup=args.warmup)
    reference = times[args.r[0]]
    print(f"{args.model} {base.cfg.img_size[0]} px fp32, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds (speed-up: median of per-round ratios against r={args.r[0]})")
    print(f"{'r':>4} {'tokens in -> out':>18} {'encoder MACs':>13} {'img/s':>8} {'speed-up':>9}")
    full = encoder_macs(base.cfg, token_counts(base, r=0))
    for r, model in models.items():
        counts = token_counts(model, r=r)
        print(f"{r:>4} {f'{counts[0]} -> {counts[-1]}':>18} {encoder_macs(base.cfg, counts) / full:>12.1%} "
              f"{args.batch_size / statistics.median(times[r]):>8.2f} {paired_ratio(times[r], reference):>8.2f}x")


def accuracy(args: argparse.Namespace) -> None:
    from vitlab.tasks import eval_checkpoint

    print(f"{args.checkpoint} on {args.data} {args.split}")
    print(f"{'r':>4} {'tokens in -> out':>18} {'top-1':>8} {'loss':>8}")
    for r in args.r:
        results = eval_checkpoint(args.checkpoint, args.data, args.split, data_dir=args.data_dir,
                                  batch_size=args.batch_size, merge_tokens=r, device="cpu")
        tokens = results.get("token_merging", {}).get("tokens")
        shown = f"{tokens[0]} -> {tokens[-1]}" if tokens else "unmerged"
        print(f"{r:>4} {shown:>18} {100 * results['top1']:>7.2f}% {results['loss']:>8.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("model", nargs="?", default="vit_b16")
    p.add_argument("--r", default="0,8,13,16", help="comma-separated r values; the first is the reference")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    a = sub.add_parser("accuracy")
    a.add_argument("checkpoint")
    a.add_argument("--data", default="fashion-mnist")
    a.add_argument("--data-dir")
    a.add_argument("--split", default="test")
    a.add_argument("--r", default="0,2,4,6,8", help="comma-separated r values")
    a.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    args.r = [int(v) for v in args.r.split(",")]
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    speed(args) if args.what == "speed" else accuracy(args)


if __name__ == "__main__":
    main()
