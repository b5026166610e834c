"""The training loop, on Accelerate: accumulation, precision, schedule, logging, checkpoints, resume.

``train(cfg)`` reads the split named by ``cfg.data.train`` through the library's readers, encodes
frozen towers once (cached on disk), and trains the predictor and target head. Every run writes its
resolved config, a JSONL metrics log, checkpoints (``save_state``) and the final model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vljepa.config import ConfigError, RunConfig, save_config
from vljepa.data.cache import EmbeddingCache
from vljepa.data.collate import Collator, ExampleIndex, Examples, TextTable
from vljepa.data.formats import DataError, SkipReport
from vljepa.data.sources import load_image, read_split
from vljepa.embed import cached_image_tokens, cached_text_features, pixel_loader
from vljepa.models.vljepa import VLJepa, read_model_meta
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


@dataclass
class TrainingData:
    examples: Examples
    collator: Collator
    images: list[str]
    texts: list[str]
    skipped: SkipReport
    cache_hits: dict[str, bool]


def _task_records(cfg: RunConfig, report: SkipReport) -> list[tuple[str, list]]:
    tasks = ["caption", "vqa"] if cfg.data.task == "mixed" else [cfg.data.task]
    out = []
    for task in tasks:
        records, skipped = read_split(cfg.data.train, task, on_error=cfg.data.on_error)
        report.merge(skipped)
        out.append((task, records))
    return out


def build_training_data(model: VLJepa, cfg: RunConfig, accelerator: Accelerator) -> TrainingData:
    """Records -> examples over an image table and a unique-text table, frozen towers cached."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty; set it to a split folder (images + metadata.jsonl)")
    report = SkipReport()
    per_task = _task_records(cfg, report)
    images: dict[str, int] = {}
    texts: dict[str, int] = {}
    raw: list[tuple[int, str, tuple[int, ...]]] = []
    for task, records in per_task:
        for r in records:
            img = images.setdefault(r.image, len(images))
            if task == "caption":
                targets = tuple(texts.setdefault(c, len(texts)) for c in r.captions)
                raw.append((img, "", targets))
            else:
                raw.append((img, r.question, (texts.setdefault(r.answer, len(texts)),)))
    image_list, text_list = list(images), list(texts)
    cache = None
    if cfg.data.cache:
        cache = EmbeddingCache(cfg.data.cache_dir or Path(cfg.train.output_dir) / "cache")
    hits: dict[str, bool] = {}
    visual_tokens = None
    ok = torch.ones(len(image_list), dtype=torch.bool)
    if cfg.model.vision.freeze:
        with accelerator.main_process_first():
            visual_tokens, ok, hits["images"] = cached_image_tokens(
                model, image_list, cache, on_error=cfg.data.on_error, report=SkipReport() if not
                accelerator.is_main_process else report, precision="no")
    else:
        ok = _check_images(image_list, cfg.data.on_error, report)
    # Records whose image could not be read are dropped, and counted.
    keep = [i for i, (img, _, _) in enumerate(raw) if ok[img]]
    for i in set(range(len(raw))) - set(keep):
        report.add("record of an unreadable image", image_list[raw[i][0]])
    raw = [raw[i] for i in keep]
    if not raw:
        raise DataError(f"no usable training records in '{cfg.data.train}'; {report.summary()}")

    if cfg.model.text.freeze:
        with accelerator.main_process_first():
            feats, hits["texts"] = cached_text_features(
                model, text_list, cache, with_states=model.target_head.needs_states, precision="no")
        table = TextTable(pooled=feats["pooled"], states=feats.get("states"), offsets=feats.get("offsets"))
    else:
        tok = model.tokenize(text_list)
        table = TextTable(token_ids=[ids[m.bool()].tolist() for ids, m in zip(tok["input_ids"], tok["attention_mask"])])

    queries = sorted({q for _, q, _ in raw if q})
    qtok = model.tokenize(queries, max_length=cfg.model.predictor.max_query_len) if queries else None
    qids = {"": []}
    if qtok is not None:
        for q, ids, m in zip(queries, qtok["input_ids"], qtok["attention_mask"]):
            qids[q] = ids[m.bool()].tolist()
    examples = Examples(image=[r[0] for r in raw], query=[qids[r[1]] for r in raw], targets=[r[2] for r in raw])
    if visual_tokens is not None:
        collator = Collator(examples, table, visual_tokens=visual_tokens, seed=cfg.train.seed)
    else:
        to_tensor = pixel_loader(model)
        collator = Collator(examples, table, seed=cfg.train.seed,
                            load_pixels=lambda j: to_tensor(load_image(image_list[j], "stop")))
    return TrainingData(examples, collator, image_list, text_list, report, hits)


def _check_images(paths: list[str], on_error: str, report: SkipReport) -> torch.Tensor:
    ok = torch.zeros(len(paths), dtype=torch.bool)
    for i, p in enumerate(paths):
        if load_image(p, on_error) is None:
            report.add("unreadable image", p)
        else:
            ok[i] = True
    return ok


def load_init(model: VLJepa, folder: str) -> None:
    """Start from a saved model (stage 2 from stage 1); the architectures must agree."""
    path = Path(folder)
    meta = read_model_meta(path)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"train.init_from='{folder}' does not fit this model config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); use the same model section as the run that saved it "
            f"(its config: {meta['model']})"
        )


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(accelerator: Accelerator, folder: Path, step: int, epoch: int, batch_in_epoch: int,
                     keep: int) -> None:
    """save_state into a temporary folder, then rename: a crash mid-write leaves the last good one."""
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp_step_{step:08d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def train(cfg: RunConfig, *, resume: bool = False, evaluate_fn=None) -> TrainResult:
    """Train a VL-JEPA model as ``cfg`` says; returns where the model and logs are.

    ``evaluate_fn(model, cfg) -> dict`` runs periodic evaluation (``train.eval_every``) and at the end.
    """
    tc = cfg.train
    out = Path(tc.output_dir)
    accelerator = Accelerator(mixed_precision=tc.precision, gradient_accumulation_steps=tc.grad_accum,
                              cpu=not torch.cuda.is_available())
    set_seed(tc.seed, device_specific=False)
    ckpt_dir = out / "checkpoints"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    start = time.time()

    model = VLJepa(cfg.model)
    if tc.init_from:
        load_init(model, tc.init_from)
    data = build_training_data(model, cfg, accelerator)
    per_process = tc.batch_size // accelerator.num_processes
    if per_process * accelerator.num_processes != tc.batch_size:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by {accelerator.num_processes} processes")
    generator = torch.Generator().manual_seed(tc.seed)
    loader = DataLoader(ExampleIndex(len(data.examples)), batch_size=per_process, shuffle=True, drop_last=True,
                        collate_fn=data.collator, num_workers=cfg.data.num_workers, generator=generator)
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the {len(data.examples)} training examples")
    optimizer = build_optimizer(model, cfg.optim, text_lr_mult=0.0 if cfg.model.text.freeze else cfg.model.text.lr_mult)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw_model: VLJepa = accelerator.unwrap_model(model)

    step, epoch, skip_batches = 0, 0, 0
    if resume:
        found = _checkpoints(ckpt_dir)
        if not found:
            raise ConfigError(f"--resume: no checkpoint under '{ckpt_dir}'; run without --resume to start fresh")
        accelerator.load_state(str(found[-1]))
        state = json.loads((found[-1] / "trainer.json").read_text())
        step, epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        accelerator.print(f"resumed from {found[-1]} at step {step}")

    summary = raw_model.parameter_summary()
    trainable = sum(p["trainable"] for p in summary.values())
    frozen = sum(p["frozen"] for p in summary.values())
    accelerator.print(
        f"model: trainable {trainable / 1e6:.2f}M / frozen {frozen / 1e6:.2f}M | examples {len(data.examples)} | "
        f"images {len(data.images)} | texts {len(data.texts)} | global batch {tc.batch_size * tc.grad_accum} | "
        f"cache {data.cache_hits or 'off'} | {data.skipped.summary()}"
    )
    log_file = out / "metrics.jsonl"
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (tc.progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    last: dict = {}
    eval_results: dict = {}
    window_t, window_n = time.time(), 0
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
                output = model(batch)
                loss = output.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step}; lower optim.lr or set train.precision=no. "
                        f"The last good checkpoint is under '{ckpt_dir}'"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_n += per_process * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.time() - window_t
                last = {"step": step, "epoch": epoch, "loss": float(loss), "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": window_n / max(elapsed, 1e-9), **output.metrics}
                window_t, window_n = time.time(), 0
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last.get('batch_acc', 0):.2f}")
                if accelerator.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(last) + "\n")
            if evaluate_fn and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                eval_results = _evaluate(evaluate_fn, raw_model, cfg, accelerator, step, log_file)
                model.train()
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                _save_checkpoint(accelerator, ckpt_dir, step, epoch, batch_in_epoch, tc.keep_last)
            if step >= tc.max_steps:
                break
        else:
            epoch += 1
    bar.close()
    _save_checkpoint(accelerator, ckpt_dir, step, epoch, batch_in_epoch, tc.keep_last)
    model_dir = out / "model"
    if accelerator.is_main_process:
        raw_model.save_pretrained(model_dir)
    if evaluate_fn:
        eval_results = _evaluate(evaluate_fn, raw_model, cfg, accelerator, step, log_file)
    seconds = time.time() - start
    if accelerator.is_main_process:
        (out / "train_summary.json").write_text(json.dumps(
            {"steps": step, "seconds": seconds, "last": last, "skipped": data.skipped.to_dict(),
             "parameters": summary, "eval": eval_results}, indent=2))
    accelerator.end_training()
    return TrainResult(out, model_dir, step, seconds, last, data.skipped.to_dict(), eval_results)


def _evaluate(evaluate_fn, model: VLJepa, cfg: RunConfig, accelerator: Accelerator, step: int, log_file: Path) -> dict:
    model.eval()
    results = evaluate_fn(model, cfg) if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        with log_file.open("a") as f:
            f.write(json.dumps({"step": step, "eval": results}) + "\n")
    accelerator.wait_for_everyone()
    return results
