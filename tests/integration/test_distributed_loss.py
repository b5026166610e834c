"""Two processes == one process with the same global batch: the InfoNCE loss over gathered
embeddings (gloo, CPU) equals the single-process loss, and gradients flow back to each rank."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vljepa.losses import gather_no_grad, gather_with_grad, info_nce

WORLD = 2
B = 6  # global batch; 3 per rank
SCALE = 8.0


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pred = F.normalize(torch.randn(B, 8, generator=g), dim=-1)
    target = F.normalize(torch.randn(B, 8, generator=g), dim=-1)
    groups = torch.tensor([0, 1, 2, 0, 3, 1])  # repeated answers across the two ranks
    for i, grp in enumerate(groups.tolist()):
        target[i] = target[groups.tolist().index(grp)]
    return pred, target, groups


def _worker(rank: int, init: str, out: str) -> None:
    # A short timeout: a rank that dies must fail the test, not hang it for gloo's default 30 min.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        pred, target, groups = _global_batch()
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        p = pred[rows].clone().requires_grad_()
        t = target[rows].clone().requires_grad_()
        terms = info_nce(gather_with_grad(p), gather_with_grad(t), torch.tensor(SCALE), gather_no_grad(groups[rows]))
        terms["infonce_loss"].backward()
        torch.save({"loss": terms["infonce_loss"].detach(), "p_grad": p.grad, "t_grad": t.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_infonce_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=WORLD, join=True)
    pred, target, groups = _global_batch()
    p = pred.clone().requires_grad_()
    t = target.clone().requires_grad_()
    single = info_nce(p, t, torch.tensor(SCALE), groups)
    single["infonce_loss"].backward()
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        torch.testing.assert_close(r["loss"], single["infonce_loss"].detach())
        # Every rank computes the same global loss and all_gather's backward sums the ranks'
        # gradients, so each rank holds WORLD x the gradient of its rows; averaging across
        # ranks (what DDP does to parameter gradients) gives the single-process gradient.
        torch.testing.assert_close(r["p_grad"] / WORLD, p.grad[rows])
        torch.testing.assert_close(r["t_grad"] / WORLD, t.grad[rows])
