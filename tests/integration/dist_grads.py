"""One training batch through the real trainer set-up; saves the loss and every gradient.

Run as one process (``python dist_grads.py ...``) or several (``torchrun --nproc_per_node 2
dist_grads.py ...``); test_distributed.py compares the files. Not collected by pytest.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from vljepa.config import load_config
from vljepa.train.trainer import forward_backward, prepare_run

TINY = [
    "model.vision.kind=vit", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.dim=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.predictor.dim=32", "model.predictor.depth=2",
    "model.predictor.heads=2", "model.embed_dim=16", "model.target_head=token", "model.target_head_dim=32",
    "train.precision=no", "train.progress=false", "data.task=mixed",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--vision-frozen", default="true")
    args = parser.parse_args()
    cfg = load_config(None, TINY + [f"data.train={args.train}", f"train.output_dir={args.run_dir}",
                                    f"train.batch_size={args.batch}", f"train.grad_cache_chunk={args.chunk}",
                                    f"model.vision.freeze={args.vision_frozen}"])
    run = prepare_run(cfg)
    run.model.train()
    batch = next(iter(run.loader))
    loss, _, _ = forward_backward(run, batch, cfg)
    grads = {name: p.grad.detach().clone() for name, p in run.raw_model.named_parameters() if p.grad is not None}
    if run.accelerator.is_main_process:
        save_file({"loss": loss.detach().reshape(1), **{f"grad/{k}": v for k, v in grads.items()},
                   "num_processes": torch.tensor([run.accelerator.num_processes])}, args.out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
