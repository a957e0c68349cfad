"""The worker of tests/test_contrastive.py's two-process test (its own module: a spawned process imports only this,
not transformers)."""

import torch
import torch.nn.functional as F

from vitlab.train.contrastive import contrastive_loss


def global_pairs(n=6, dim=8):
    gen = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, dim, generator=gen), dim=-1)
    return img, txt


def gather_worker(rank, world_size, port, results):
    import torch.distributed as dist

    from vitlab.train.contrastive import gather_pairs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        img, txt = global_pairs()
        share = img.shape[0] // world_size
        rows = slice(rank * share, (rank + 1) * share)
        out = {}
        for kind in ("softmax", "sigmoid"):
            mine_img, mine_txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
            scale, bias = torch.tensor(1.5, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
            all_img, all_txt, offset = gather_pairs(mine_img * 1.0, mine_txt * 1.0)
            loss = contrastive_loss(mine_img, mine_txt, scale, bias, kind, all_images=all_img, all_texts=all_txt,
                                    offset=offset)
            loss.backward()
            out[kind] = (float(loss.detach()), mine_img.grad, mine_txt.grad, float(scale.grad),
                         0.0 if bias.grad is None else float(bias.grad))  # softmax: no bias
        results[rank] = out
    finally:
        dist.destroy_process_group()
