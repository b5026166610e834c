"""Throughput of the quickstart model on this machine: training steps, inference, decoding, embedding cache.

    python benchmarks/bench_quickstart.py [--model DIR] [--out benchmarks/results/quickstart_cpu.json] [--smoke]

Measures, in one process and one run (so every ratio compares numbers taken side by side):

1. ``train``: one optimizer step as ``vljepa.train.trainer.train`` does it (``model(batch)`` under
   autocast, backward, grad-norm clip, AdamW, LR schedule), fp32 and bf16, on batches built by the
   trainer's own data path (``build_training_data``: cached frozen-tower outputs + ``Collator``) for the
   caption, VQA and mixed (stage 2) tasks. Median over timed steps; warm-up steps excluded.
2. ``infer``: pixels -> X-encoder -> predictor (query-free and with a question), fp32 and bf16.
3. ``decode``: ``CandidateBank.search`` of predicted embeddings against an answer bank and a caption
   bank, and ``CandidateBank.build`` (Y-encoder + target head via ``vljepa.embed.embed_texts``).
4. ``cache``: encoding N images + their captions into an empty ``EmbeddingCache`` vs. loading them back.

Inputs: a small procedural world (``generate_world``) in a temp folder supplies real images, captions,
questions and answers; inference uses random pixels (the timing does not depend on the content).
Nothing here asserts on a timing; see benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vljepa import embed
from vljepa.config import RunConfig, config_dir, load_config
from vljepa.data.cache import EmbeddingCache
from vljepa.data.formats import SkipReport
from vljepa.data.readers import read_split
from vljepa.data.world import generate_world
from vljepa.decode.nearest import CandidateBank
from vljepa.embed import autocast, cached_image_tokens, cached_text_features, embed_texts, predict_batched
from vljepa.models.vljepa import VLJepa
from vljepa.train.optim import build_optimizer, build_scheduler
from vljepa.train.data import build_training_data

REPO = Path(__file__).resolve().parent.parent
STAGE2 = config_dir() / "train" / "quickstart_stage2.yaml"
PRECISIONS = ("fp32", "bf16")  # "fp32" = train.precision=no

# Full sizes: batch sizes are the quickstart's (train 256, eval 128); N images for the cache.
FULL = {
    "cache_images": 512,  # world train split: cache measurement and training batches
    "extra_caption_images": 1100,  # world test split: only its captions, to fill the 5000-caption bank
    "train_batch": 256, "train_warmup": 3, "train_steps": 20, "train_distinct_batches": 8,
    "infer_batch": 128, "infer_warmup": 2, "infer_iters": 10,
    "search_queries": 1024, "search_iters": 10, "single_queries": 50,
    "answer_bank": 50, "caption_bank": 5000, "build_iters_small": 5,
    "cache_hits": 3,
}
SMOKE = {
    "cache_images": 16, "extra_caption_images": 8,
    "train_batch": 8, "train_warmup": 1, "train_steps": 2, "train_distinct_batches": 2,
    "infer_batch": 2, "infer_warmup": 1, "infer_iters": 2,
    "search_queries": 16, "search_iters": 2, "single_queries": 3,
    "answer_bank": 16, "caption_bank": 32, "build_iters_small": 1,
    "cache_hits": 1,
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def times_of(fn: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """Wall seconds of ``iters`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(seconds: list[float], items: int, unit: str) -> dict:
    """Median-based rate (``unit`` per second) plus the spread of the per-call times in ms."""
    med = statistics.median(seconds)
    return {
        f"{unit}_per_s": items / med,
        "ms": {"median": med * 1e3, "min": min(seconds) * 1e3, "max": max(seconds) * 1e3},
        "timed_iters": len(seconds),
        "items_per_iter": items,
    }


def precision_arg(p: str) -> str:
    """This script's precision names -> the library's (``train.precision``)."""
    return "no" if p == "fp32" else p


# ------------------------------------------------------------------------------------------ machine


def machine_info() -> dict:
    cpu, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_bf16": sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------ setup


def build_model(args: argparse.Namespace, cfg: RunConfig) -> tuple[VLJepa, RunConfig]:
    """The stage-2 quickstart model (fresh), or a saved model whose config replaces the YAML's model section."""
    if args.model:
        model = VLJepa.from_pretrained(args.model)
        cfg = dataclasses.replace(cfg, model=model.config)
    else:
        model = VLJepa(cfg.model)
    return model.eval(), cfg


def unique_captions(split: Path) -> list[str]:
    records, _ = read_split(split, "caption")
    return list(dict.fromkeys(c for r in records for c in r.captions))


# ------------------------------------------------------------------------------------------ 4. cache


def bench_cache(model: VLJepa, cfg: RunConfig, split: Path, cache_dir: Path, sizes: dict) -> dict:
    """Encode the split's images and captions into an empty cache (miss), then load them back (hit).

    Paths and texts are listed the way ``build_training_data`` lists them, so the training batches
    built afterwards read the same entries.
    """
    records, _ = read_split(split, "caption")
    images = list(dict.fromkeys(r.image for r in records))
    texts = list(dict.fromkeys(c for r in records for c in r.captions))
    precision = cfg.train.precision
    with_states = model.target_head.reads_states
    # First calls pay one-time costs (kernel selection, lazy imports) that no cache build repeats.
    cached_image_tokens(model, images[:2], None, on_error=cfg.data.on_error, report=SkipReport(), precision=precision)
    cached_text_features(model, texts[:4], None, with_states=with_states, precision=precision)

    cache = EmbeddingCache(cache_dir)

    def run() -> tuple[float, float, bool]:
        t0 = time.perf_counter()
        _, _, hit_i = cached_image_tokens(model, images, cache, on_error=cfg.data.on_error, report=SkipReport(),
                                          precision=precision)
        t1 = time.perf_counter()
        _, hit_t = cached_text_features(model, texts, cache, with_states=with_states, precision=precision)
        t2 = time.perf_counter()
        if hit_i != hit_t:
            raise RuntimeError(f"cache: images hit={hit_i} but texts hit={hit_t}; expected both alike")
        return t1 - t0, t2 - t1, hit_i

    build_img, build_txt, hit = run()
    if hit:
        raise RuntimeError(f"cache dir '{cache_dir}' was not empty: the build measurement read old entries")
    hits = [run() for _ in range(sizes["cache_hits"])]
    if not all(h[2] for h in hits):
        raise RuntimeError("cache: the second encoding missed the cache; the hit measurement is void")
    hit_img = statistics.median(h[0] for h in hits)
    hit_txt = statistics.median(h[1] for h in hits)
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return {
        "images": len(images), "texts": len(texts), "precision": precision, "token_states": with_states,
        "bytes_on_disk": size,
        "build": {"images_s": build_img, "texts_s": build_txt, "total_s": build_img + build_txt},
        "hit": {"images_s": hit_img, "texts_s": hit_txt, "total_s": hit_img + hit_txt, "timed_iters": len(hits)},
        "speedup": (build_img + build_txt) / (hit_img + hit_txt),
        "speedup_images": build_img / hit_img,
        "speedup_texts": build_txt / hit_txt,
    }


# ------------------------------------------------------------------------------------------ 2. inference


@torch.no_grad()
def bench_infer(model: VLJepa, questions: list[str], sizes: dict) -> dict:
    """Images/s of the X-encoder alone and of pixels -> ŝ, without and with a question."""
    b = sizes["infer_batch"]
    size = model.config.vision.image_size
    pixels = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
    q = model.tokenize_queries([questions[i % len(questions)] for i in range(b)])
    model.eval()
    chunk = embed.CPU_VISION_CHUNK

    def vision_in_chunks() -> torch.Tensor:  # what encode_images does on the CPU
        return torch.cat([model.encode_image(pixels[i : i + chunk]) for i in range(0, b, chunk)])

    cases = {
        "vision": lambda: model.encode_image(pixels),
        "vision_chunked": vision_in_chunks,
        "query_free": lambda: model.predict(pixels),
        "query": lambda: model.predict(pixels, **q),
    }
    out: dict = {"batch": b, "image_size": size, "query_len": int(q["query_ids"].shape[1]), "vision_chunk": chunk}
    for name, fn in cases.items():
        out[name] = {}
        for p in PRECISIONS:
            def call(fn=fn, p=p):
                with autocast(precision_arg(p)):
                    return fn()
            secs = times_of(call, warmup=sizes["infer_warmup"], iters=sizes["infer_iters"])
            out[name][p] = summary(secs, b, "images")
            log(f"infer {name:<10} {p}: {out[name][p]['images_per_s']:.1f} images/s")
        if "bf16" in out[name]:
            out[name]["bf16_speedup"] = out[name]["bf16"]["images_per_s"] / out[name]["fp32"]["images_per_s"]
    return out


# ------------------------------------------------------------------------------------------ 3. decode


def bench_decode(model: VLJepa, preds: torch.Tensor, answers: list[str], captions: list[str], sizes: dict) -> dict:
    """CandidateBank.search throughput / latency and CandidateBank.build texts/s, per bank."""
    # Short texts of the world first; captions fill the answer bank up to its size if the world has fewer answers.
    answer_texts = list(dict.fromkeys(answers + captions))[: sizes["answer_bank"]]
    caption_texts = captions[: sizes["caption_bank"]]
    embed_texts(model, answer_texts[:4])  # one-time costs, as in bench_cache
    if "bf16" in PRECISIONS:
        embed_texts(model, answer_texts[:4], precision="bf16")
    out: dict = {"queries": int(preds.shape[0]), "dim": int(preds.shape[1])}
    for name, texts in (("answers", answer_texts), ("captions", caption_texts)):
        iters = sizes["build_iters_small"] if len(texts) <= 256 else 1
        build: dict = {"bank_size": len(texts)}
        bank = None
        for p in PRECISIONS:
            def make(p=p):
                return CandidateBank.build(texts, lambda t: embed_texts(model, t, precision=precision_arg(p)))
            secs = []
            for _ in range(iters):
                t0 = time.perf_counter()
                bank = make()
                secs.append(time.perf_counter() - t0)
            build[p] = summary(secs, len(texts), "texts")
            log(f"build  {name:<8} {p}: {build[p]['texts_per_s']:.0f} texts/s ({len(texts)} texts)")
        if "bf16" in build:
            build["bf16_speedup"] = build["bf16"]["texts_per_s"] / build["fp32"]["texts_per_s"]
        search = {"bank_size": len(bank)}
        search["batched"] = summary(times_of(lambda: bank.search(preds, k=1), warmup=1, iters=sizes["search_iters"]),
                                    int(preds.shape[0]), "queries")
        singles = preds[: sizes["single_queries"]]
        one = times_of(lambda: [bank.search(singles[i : i + 1], k=1) for i in range(len(singles))], warmup=1, iters=1)
        search["single_query_ms"] = one[0] / len(singles) * 1e3
        log(f"search {name:<8}: {search['batched']['queries_per_s']:.0f} queries/s batched, "
            f"{search['single_query_ms']:.3f} ms for one query")
        out[name] = {"build": build, "search": search}
    return out


# ------------------------------------------------------------------------------------------ 1. training


def collated_batches(
    model: VLJepa, cfg: RunConfig, task: str, sizes: dict
) -> tuple[list[dict], list[float], int, dict[str, bool]]:
    """Batches from the trainer's own data path (images and captions hit the cache bench_cache filled).

    Returns the batches, the collate seconds of each, the number of examples and the cache hits.
    """
    from accelerate import Accelerator

    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=task))
    data = build_training_data(model, run_cfg, Accelerator(cpu=True))
    data.collator.set_epoch(0)
    b = sizes["train_batch"]
    n = len(data.examples)
    if n < b:
        raise RuntimeError(f"train.{task}: {n} examples are fewer than the batch of {b}; raise cache_images")
    gen = torch.Generator().manual_seed(0)
    batches, secs = [], []
    for _ in range(sizes["train_distinct_batches"]):
        idx = torch.randperm(n, generator=gen)[:b].tolist()
        t0 = time.perf_counter()
        batches.append(data.collator(idx))
        secs.append(time.perf_counter() - t0)
    return batches, secs, n, data.cache_hits


def batch_shape(batches: list[dict]) -> dict:
    first = batches[0]
    info = {k: list(v.shape) for k, v in first.items()}
    info["distinct_targets_mean"] = statistics.mean(len(torch.unique(b["target_groups"])) for b in batches)
    if "query_mask" in first:
        info["query_tokens_mean"] = statistics.mean(float(b["query_mask"].sum(1).float().mean()) for b in batches)
    if "target_mask" in first:
        info["target_tokens_mean"] = statistics.mean(float(b["target_mask"].sum(1).float().mean()) for b in batches)
    return info


def bench_train_step(model: VLJepa, cfg: RunConfig, batches: list[dict], precision: str, sizes: dict) -> dict:
    """The loop body of ``trainer.train`` without Accelerate (on one CPU process it adds only the autocast)."""
    optimizer = build_optimizer(model, cfg.optim,
                                text_lr_mult=0.0 if cfg.model.text.freeze else cfg.model.text.lr_mult)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    step = iter(range(10**9))
    model.train()

    def one_step() -> None:
        batch = batches[next(step) % len(batches)]
        with autocast(precision_arg(precision)):
            output = model(batch)
        loss = output.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} in the {precision} benchmark step")
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    secs = times_of(one_step, warmup=sizes["train_warmup"], iters=sizes["train_steps"])
    model.eval()
    return summary(secs, sizes["train_batch"], "samples")


def bench_train(model: VLJepa, cfg: RunConfig, sizes: dict) -> dict:
    # Runs last: it changes the predictor and head weights (harmless for timing, but not for later stages).
    out: dict = {"batch": sizes["train_batch"]}
    for task in ("caption", "vqa", "mixed"):
        batches, collate_secs, n, hits = collated_batches(model, cfg, task, sizes)
        res: dict = {"examples": n, "cache_hits": hits, "batch_shapes": batch_shape(batches),
                     "collate_ms_median": statistics.median(collate_secs) * 1e3}
        for p in PRECISIONS:
            res[p] = bench_train_step(model, cfg, batches, p, sizes)
            log(f"train  {task:<8} {p}: {res[p]['samples_per_s']:.0f} samples/s "
                f"(step {res[p]['ms']['median']:.0f} ms median)")
        if "bf16" in res:
            res["bf16_speedup"] = res["bf16"]["samples_per_s"] / res["fp32"]["samples_per_s"]
        # The same fp32 steps with every batch run as one padded block (no length groups).
        saved, model.max_length_groups = model.max_length_groups, 1
        try:
            res["fp32_padded"] = bench_train_step(model, cfg, batches, "fp32", sizes)
        finally:
            model.max_length_groups = saved
        res["length_buckets_speedup"] = res["fp32"]["samples_per_s"] / res["fp32_padded"]["samples_per_s"]
        log(f"train  {task:<8} fp32 one padded block: {res['fp32_padded']['samples_per_s']:.0f} samples/s "
            f"-> length groups {res['length_buckets_speedup']:.2f}x")
        out[task] = res
    return out


# ------------------------------------------------------------------------------------------ report


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _rate(r: dict, key: str, fmt: str) -> str:
    return fmt.format(r["bf16"][key]) if "bf16" in r else "-"


def _ratio(r: dict) -> str:
    return f"{r['bf16_speedup']:.2f}x" if "bf16_speedup" in r else "-"


def table(results: dict) -> str:
    rows = [("", "fp32", "bf16", "bf16/fp32")]
    for task in ("caption", "vqa", "mixed"):
        r = results["train"][task]
        rows.append((f"train {task} samples/s (batch {results['train']['batch']})",
                     f"{r['fp32']['samples_per_s']:.0f}", _rate(r, "samples_per_s", "{:.0f}"), _ratio(r)))
    for task in ("caption", "vqa", "mixed"):
        r = results["train"][task]
        rows.append((f"train {task} fp32, one padded block", f"{r['fp32_padded']['samples_per_s']:.0f}", "",
                     f"groups {r['length_buckets_speedup']:.2f}x"))
    for name in ("vision", "vision_chunked", "query_free", "query"):
        r = results["infer"][name]
        rows.append((f"infer {name} images/s (batch {results['infer']['batch']})",
                     f"{r['fp32']['images_per_s']:.1f}", _rate(r, "images_per_s", "{:.1f}"), _ratio(r)))
    for name in ("answers", "captions"):
        r = results["decode"][name]["build"]
        rows.append((f"bank build {name} texts/s ({r['bank_size']} texts)", f"{r['fp32']['texts_per_s']:.0f}",
                     _rate(r, "texts_per_s", "{:.0f}"), _ratio(r)))
    lines = []
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    lines.append("")
    for name in ("answers", "captions"):
        s = results["decode"][name]["search"]
        lines.append(f"search {name} bank ({s['bank_size']}): {s['batched']['queries_per_s']:.0f} queries/s "
                     f"({results['decode']['queries']} at once), {s['single_query_ms']:.3f} ms for one query")
    c = results["cache"]
    lines.append(f"cache {c['images']} images + {c['texts']} texts ({c['precision']}): "
                 f"build {c['build']['total_s']:.2f}s (images {c['build']['images_s']:.2f}s, "
                 f"texts {c['build']['texts_s']:.2f}s), hit {c['hit']['total_s']:.3f}s -> {c['speedup']:.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a saved model folder (default: a fresh stage-2 quickstart model)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quickstart_cpu.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs (< 30 s)")
    parser.add_argument("--fp32-only", action="store_true",
                        help="skip the bf16 measurements (on a CPU without bf16 instructions they are emulated, "
                             "several times slower than fp32, and take most of the run)")
    args = parser.parse_args()
    global PRECISIONS
    if args.fp32_only:
        PRECISIONS = ("fp32",)
    sizes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    stages: dict[str, float] = {}
    torch.manual_seed(0)
    machine = machine_info()

    with tempfile.TemporaryDirectory(prefix="vljepa-bench-") as tmp:
        tmp = Path(tmp)
        log(f"world: {sizes['cache_images']} + {sizes['extra_caption_images']} images in {tmp}")
        info = generate_world(tmp / "world", seed=0, n_train=sizes["cache_images"],
                              n_test=sizes["extra_caption_images"], n_comp=0)
        split = tmp / "world" / "train"
        cfg = load_config(STAGE2, [f"data.train={split}", f"data.cache_dir={tmp / 'cache'}",
                                   f"train.batch_size={sizes['train_batch']}"])
        stages["world"] = time.perf_counter() - started
        model, cfg = build_model(args, cfg)
        params = model.parameter_summary()
        stages["model"] = time.perf_counter() - started - sum(stages.values())

        log("cache: build vs. hit")
        cache = bench_cache(model, cfg, split, tmp / "cache", sizes)
        log(f"cache: build {cache['build']['total_s']:.2f}s, hit {cache['hit']['total_s']:.3f}s")
        stages["cache"] = time.perf_counter() - started - sum(stages.values())

        vqa, _ = read_split(split, "vqa")
        questions = [r.question for r in vqa]
        infer = bench_infer(model, questions, sizes)
        stages["infer"] = time.perf_counter() - started - sum(stages.values())

        # Real predicted embeddings to search with: the cached visual tokens (a hit) + real questions.
        images = list(dict.fromkeys(r.image for r in read_split(split, "caption")[0]))
        tokens, _, _ = cached_image_tokens(model, images, EmbeddingCache(tmp / "cache"), on_error="stop",
                                           report=SkipReport(), precision=cfg.train.precision)
        row = {p: i for i, p in enumerate(images)}
        picks = [vqa[i % len(vqa)] for i in range(sizes["search_queries"])]
        preds = predict_batched(model, tokens, [row[r.image] for r in picks], [r.question for r in picks])
        captions = unique_captions(split) + unique_captions(tmp / "world" / "test")
        captions = list(dict.fromkeys(captions))
        decode = bench_decode(model, preds, list(info.answers), captions, sizes)
        stages["decode"] = time.perf_counter() - started - sum(stages.values())

        train = bench_train(model, cfg, sizes)
        stages["train"] = time.perf_counter() - started - sum(stages.values())

    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {
        "benchmark": "quickstart_cpu",
        "smoke": args.smoke,
        "machine": machine,
        "settings": {"config": str(STAGE2.relative_to(REPO)) if STAGE2.is_relative_to(REPO) else str(STAGE2),
                     "model": args.model or "fresh stage-2 model (pretrained frozen towers, random predictor and head)",
                     "parameters": params, "sizes": sizes, "precisions": list(PRECISIONS)},
        "train": train,
        "infer": infer,
        "decode": decode,
        "cache": cache,
        "seconds_total": time.perf_counter() - started,
        "seconds_per_stage": stages,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\n[bench] wrote {out} in {results['seconds_total']:.0f}s"
          f"{' (smoke sizes: not a measurement)' if args.smoke else ''}")


if __name__ == "__main__":
    main()
