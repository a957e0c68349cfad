"""Prompts per second of a CLIP text tower (the zero-shot and ``serve --zero-shot`` cost of a new class list).

    PYTHONPATH=. python benchmarks/text_prompts.py [--tokens 9] [--batch 64] [--seconds 4] [--rounds 2]

Builds CLIP B/16's text tower (width 512, 12 blocks, 77-token context; random weights: speed does not depend on
them) and embeds a batch of prompts of ``--tokens`` tokens (the end-of-text token last) padded to 77, two ways in
the same process, alternating: the whole padded sequence, and vitlab's forward, which stops after the last
end-of-text position (a causal tower's pooled output does not depend on what follows). Prints both rates, their
ratio and the largest difference of the embeddings.
"""

from __future__ import annotations

import argparse
import time

import torch

from vitlab.models.text import TextConfig, TextTransformer

EOS = 49407


def rate(fn, tokens: torch.Tensor, seconds: float) -> float:
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn(tokens)
        done += tokens.shape[0]
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=9, help="tokens per prompt, end-of-text included (default 9)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    tower = TextTransformer(TextConfig(eos_id=EOS)).eval()
    tokens = torch.zeros(args.batch, 77, dtype=torch.long)
    tokens[:, : args.tokens - 1] = torch.randint(1, EOS - 1, (args.batch, args.tokens - 1))
    tokens[:, args.tokens - 1] = EOS

    def padded(t: torch.Tensor) -> torch.Tensor:
        return tower.proj(tower.forward_features(t)[:, args.tokens - 1])

    with torch.inference_mode():
        difference = (padded(tokens) - tower(tokens)).abs().max().item()
        print(f"CLIP B text tower, {args.tokens}-token prompts padded to 77, batches of {args.batch}, "
              f"{torch.get_num_threads()} threads; max |difference| {difference:.2e}")
        for _ in range(args.rounds):
            full, cut = rate(padded, tokens, args.seconds), rate(tower, tokens, args.seconds)
            print(f"  padded: {full:.1f} prompts/s   cut after end-of-text: {cut:.1f} prompts/s   x{cut / full:.1f}")


if __name__ == "__main__":
    main()
