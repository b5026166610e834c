"""The training loop, on Accelerate: accumulation, precision, schedule, logging, checkpoints, resume.

``train(cfg)`` reads the split named by ``cfg.data.train`` through the library's readers, encodes
frozen towers once (cached on disk), and trains the predictor and target head. Every run writes its
resolved config, a JSONL metrics log, checkpoints (``save_state``) and the final model folder.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vljepa.atomic import publish
from vljepa.config import ConfigError, RunConfig, save_config
from vljepa.data.formats import SkipReport
from vljepa.embed import resolve_precision
from vljepa.hub import load_weights_into, read_model_meta
from vljepa.losses import total_loss
from vljepa.models.vljepa import VLJepa
from vljepa.train.data import TrainingData, build_training_data, read_training_records, training_loader
from vljepa.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    last_metrics: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def load_init(model: VLJepa, folder: str) -> None:
    """Start from a saved model (stage 2 from stage 1); the architectures must agree."""
    read_model_meta(Path(folder))
    load_weights_into(model, folder, what="train.init_from")


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(accelerator: Accelerator, folder: Path, progress: dict, keep: int) -> Path:
    """save_state into a temporary folder, fsync, rename; keep the last ``keep``.

    A crash or a failing write (disk full, permission) leaves the previous checkpoint untouched:
    only a complete folder is ever renamed to ``step_N``.
    """
    final = folder / f"step_{progress['step']:08d}"
    tmp = folder / f".tmp_step_{progress['step']:08d}"
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps(progress))
            publish(tmp, final)
            for old in _checkpoints(folder)[:-keep] if keep > 0 else []:
                shutil.rmtree(old)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        good = _checkpoints(folder)
        raise CheckpointError(
            f"writing checkpoint {final} failed ({exc.strerror or exc}); the last good checkpoint "
            f"{good[-1] if good else '(none yet)'} is intact. Free space or fix permissions of "
            f"'{folder}', then rerun with --resume"
        ) from exc
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path) -> None:
    """``load_state`` of a checkpoint written by :func:`_save_checkpoint`; a file in it that is not
    plain tensors (a pickle of other objects, which ``weights_only`` loading refuses) or is cut short
    is an error naming the checkpoint and what to do."""
    try:
        accelerator.load_state(str(folder))
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as exc:
        # torch's own message advises weights_only=False, which would run the file's code: not repeated here.
        raise ConfigError(
            f"--resume: checkpoint '{folder}' cannot be loaded safely ({exc.__class__.__name__}): it holds "
            "something other than the tensors and plain state vljepa writes, so it is not ours or is damaged. Delete "
            f"'{folder}' to resume from the checkpoint before it, or run without --resume to start fresh"
        ) from exc


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the last good one."""


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _grad_cache_backward(model, raw_model: VLJepa, batch: dict, chunk: int, accelerator: Accelerator):
    """Gradient caching: full-batch loss with micro-batch memory, same gradients as the full batch.

    1. embed every chunk without a graph; 2. loss over all embeddings (gathered over processes),
    backward to the embeddings only; 3. re-embed each chunk with a graph and back-propagate the
    cached embedding gradients. DDP's own reduction is switched off for the chunks; gradients are
    averaged over processes once at the end, as DDP would.
    """
    n = next(iter(batch.values())).shape[0]
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]

    def part(s: int, e: int) -> dict:
        out = {k: v[s:e] for k, v in batch.items()}
        if "query_mask" in out:  # trim padding the chunk does not need
            width = max(1, int(out["query_mask"].sum(1).max()))
            for key in ("query_ids", "query_mask", "query_states"):
                if key in out:
                    out[key] = out[key][:, :width]
        return out

    with torch.no_grad():
        embs = [model(part(s, e), with_loss=False) for s, e in spans]
    pred = torch.cat([o.pred for o in embs]).requires_grad_(True)
    target = torch.cat([o.target for o in embs]).requires_grad_(True)
    with accelerator.autocast():
        terms = raw_model.criterion(pred, target, batch.get("target_groups"))
    loss = total_loss(terms)
    accelerator.backward(loss)  # fills pred.grad, target.grad and the temperature's grad
    with accelerator.no_sync(model):
        for s, e in spans:
            out = model(part(s, e), with_loss=False)
            surrogate = (out.pred * pred.grad[s:e]).sum() + (out.target * target.grad[s:e]).sum()
            accelerator.backward(surrogate)
    if accelerator.num_processes > 1:
        for p in raw_model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= accelerator.num_processes
    return loss, {k: v.detach() for k, v in terms.items()}


def dry_run(cfg: RunConfig) -> dict:
    """Check config and data without training: records read, images found, model built."""
    report = SkipReport()
    counts = {f"{src.path} ({src.task})": len(records) for src, records in read_training_records(cfg, report)}
    model = VLJepa(cfg.model, load_weights=False)
    if cfg.train.init_from:
        read_model_meta(Path(cfg.train.init_from))
    info = {"records": counts, "skipped": report.to_dict(), "parameters": model.parameter_summary(),
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum, "max_steps": cfg.train.max_steps}
    return info


@dataclass
class PreparedRun:
    accelerator: Accelerator
    model: torch.nn.Module  # wrapped by Accelerate (DDP etc.)
    raw_model: VLJepa
    data: TrainingData
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    started: float


def with_resolved_precision(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``train.precision=auto`` replaced by what this machine runs (see ``resolve_precision``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.precision, device)
    if precision == cfg.train.precision:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def cache_frozen_towers(cfg: RunConfig) -> dict[str, bool]:
    """Encode the frozen towers' outputs for ``cfg``'s training data into ``data.cache_dir``, in this
    process, and return the cache hits. A run launched afterwards (``accelerate launch``) then reads
    the cache instead of encoding on its main process while the others wait."""
    cfg = with_resolved_precision(cfg)
    if not cfg.data.cache:
        return {}
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed, device_specific=False)  # as prepare_run: random frozen towers agree
    model = VLJepa(cfg.model)
    data = build_training_data(model, cfg, accelerator)
    return data.cache_hits


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Accelerator, model (optionally from train.init_from), data, loader, optimizer and schedule.

    ``train.precision=auto`` is resolved here; the run's ``config.yaml`` records what ran."""
    cfg = with_resolved_precision(cfg)
    tc = cfg.train
    out = Path(tc.output_dir)
    # A seedable sampler draws each epoch's order from (train.seed, epoch) alone, so a run resumed in
    # any epoch skips the batches it already trained on of the same order (the DataLoader generator
    # itself is not in the checkpoint).
    accelerator = Accelerator(mixed_precision=tc.precision, gradient_accumulation_steps=tc.grad_accum,
                              cpu=not torch.cuda.is_available(), log_with=tc.log_with or None,
                              project_dir=str(out),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              # A batch may leave parameters unused: query-free caption batches never touch
                              # the predictor's query embedding, and a mixed batch can hold no question.
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    # One seed on every process while the model is built, so frozen random towers (and their cached
    # outputs) agree; per-process seeds (seed + rank) afterwards for randomness inside the step. The
    # data order has its own generator seeded by train.seed, shared and then sharded, so N processes
    # see exactly the global batch one process would.
    set_seed(tc.seed, device_specific=False)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if tc.log_with:
        accelerator.init_trackers("vljepa", config={"lr": cfg.optim.lr, "batch_size": tc.batch_size,
                                                     "max_steps": tc.max_steps})
    started = time.time()
    model = VLJepa(cfg.model)
    if tc.init_from:
        load_init(model, tc.init_from)
    data = build_training_data(model, cfg, accelerator)
    per_process = tc.batch_size // accelerator.num_processes
    if per_process * accelerator.num_processes != tc.batch_size:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by {accelerator.num_processes} processes")
    loader = training_loader(data, cfg, per_process=per_process, pin_memory=accelerator.device.type == "cuda")
    if tc.compile:
        model.predictor.compile(dynamic=True)  # in place: parameter names and the state dict stay as they are
    optimizer = build_optimizer(model, cfg.optim, device=accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    set_seed(tc.seed, device_specific=True)
    return PreparedRun(accelerator, model, accelerator.unwrap_model(model), data, loader, optimizer, scheduler, started)


def forward_backward(run: PreparedRun, batch: dict, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Loss, whether it is finite, and the metrics of one batch, with its gradients accumulated
    (gradient caching when train.grad_cache_chunk > 0).

    Everything returned stays on the device (detached), so nothing waits for the device here; the
    caller reads ``finite`` (train.on_nan) before the optimizer step and the metrics when it logs.
    """
    if cfg.train.grad_cache_chunk:
        loss, metrics = _grad_cache_backward(run.model, run.raw_model, batch, cfg.train.grad_cache_chunk,
                                             run.accelerator)
        return loss, torch.isfinite(loss), metrics
    output = run.model(batch)
    finite = torch.isfinite(output.loss)  # queued before the backward pass, so reading it waits for the forward only
    run.accelerator.backward(output.loss)
    return output.loss, finite, output.metrics


def train(cfg: RunConfig, *, resume: bool = False, evaluate_fn=None) -> TrainResult:
    """Train a VL-JEPA model as ``cfg`` says; returns where the model and logs are.

    ``evaluate_fn(model, cfg, accelerator) -> dict`` runs on every process, periodically
    (``train.eval_every``) and at the end.
    """
    tc = cfg.train
    out = Path(tc.output_dir)
    run = prepare_run(cfg)
    accelerator, model, raw_model, data = run.accelerator, run.model, run.raw_model, run.data
    loader, optimizer, scheduler = run.loader, run.optimizer, run.scheduler
    ckpt_dir = out / "checkpoints"
    start = run.started
    per_process = tc.batch_size // accelerator.num_processes

    step, epoch, skip_batches, nan_skipped = 0, 0, 0, 0
    if resume:
        found = _checkpoints(ckpt_dir)
        if not found:
            raise ConfigError(f"--resume: no checkpoint under '{ckpt_dir}'; run without --resume to start fresh")
        load_checkpoint(accelerator, found[-1])
        state = json.loads((found[-1] / "trainer.json").read_text())
        step, epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        nan_skipped = state.get("nan_skipped", 0)
        accelerator.print(f"resumed from {found[-1]} at step {step}")

    summary = raw_model.parameter_summary()
    trainable = sum(p["trainable"] for p in summary.values())
    frozen = sum(p["frozen"] for p in summary.values())
    accelerator.print(
        f"model: trainable {trainable / 1e6:.2f}M / frozen {frozen / 1e6:.2f}M | examples {len(data.examples)} | "
        f"images {len(data.images)} | texts {len(data.texts)} | processes {accelerator.num_processes} | "
        f"global batch {tc.batch_size * tc.grad_accum} | frozen towers encoded in {data.encode_seconds:.0f}s "
        f"(cache hits {data.cache_hits or 'off'}) | {data.skipped.summary()}"
    )
    log_file = out / "metrics.jsonl"
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (tc.progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    last: dict = {}
    eval_results: dict = {}
    window_t, window_n = time.time(), 0
    batch_in_epoch = skip_batches
    model.train()
    while step < tc.max_steps:
        data.collator.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        batch_in_epoch = skip_batches
        skip_batches = 0
        for batch in batches:
            batch_in_epoch += 1
            with accelerator.accumulate(model):
                loss, finite, metrics = forward_backward(run, batch, cfg)
                finite = bool(finite)
                if not finite and tc.on_nan == "stop":
                    good = _checkpoints(ckpt_dir)
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step}; lower optim.lr, set train.precision=no, or set "
                        f"train.on_nan=skip. Last good checkpoint: {good[-1] if good else '(none yet)'}"
                    )
                if finite:
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                else:
                    nan_skipped += 1
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_n += per_process * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.time() - window_t
                last = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": window_n / max(elapsed, 1e-9), "peak_memory_mb": _peak_memory_mb(),
                        "nan_skipped": nan_skipped, **{k: float(v) for k, v in metrics.items()}}
                window_t, window_n = time.time(), 0
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last.get('batch_acc', 0):.2f}")
                if tc.log_with:
                    accelerator.log({k: v for k, v in last.items() if k != "step"}, step=step)
                if accelerator.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(last) + "\n")
            if evaluate_fn and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                eval_results = _evaluate(evaluate_fn, raw_model, cfg, accelerator, step, log_file)
                model.train()
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                _save_checkpoint(accelerator, ckpt_dir, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                                         "nan_skipped": nan_skipped}, tc.keep_last)
            if step >= tc.max_steps:
                break
        else:
            epoch += 1
    bar.close()
    _save_checkpoint(accelerator, ckpt_dir, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                             "nan_skipped": nan_skipped}, tc.keep_last)
    model_dir = out / "model"
    if accelerator.is_main_process:
        raw_model.save_pretrained(model_dir)
    if evaluate_fn:
        eval_results = _evaluate(evaluate_fn, raw_model, cfg, accelerator, step, log_file)
    seconds = time.time() - start
    if accelerator.is_main_process:
        (out / "train_summary.json").write_text(json.dumps(
            {"steps": step, "seconds": seconds, "encode_seconds": data.encode_seconds, "cache_hits": data.cache_hits,
             "last": last, "skipped": data.skipped.to_dict(),
             "nan_skipped": nan_skipped, "parameters": summary, "eval": eval_results}, indent=2))
    accelerator.end_training()
    return TrainResult(out, model_dir, step, seconds, last, data.skipped.to_dict(), eval_results)


def _evaluate(evaluate_fn, model: VLJepa, cfg: RunConfig, accelerator: Accelerator, step: int, log_file: Path) -> dict:
    model.eval()
    results = evaluate_fn(model, cfg, accelerator)
    if accelerator.is_main_process:
        with log_file.open("a") as f:
            f.write(json.dumps({"step": step, "eval": results}) + "\n")
    accelerator.wait_for_everyone()
    return results
