"""Probe a predictor change on the built-in world's questions, faster than a whole stage 2.

Starts from a saved stage-1 model (optionally with changed predictor options: new parts keep their
initialisation), trains on the split's questions with the quickstart's stage-2 question mixture
(all questions x2, exist + yes/no x1, relations x``--relation-weight``; no captions), and prints
accuracy per question form on the first ``--eval-questions`` test questions every ``--every`` steps.
Relations are split into "what is left/right of X?", yes/no left/right, and yes/no above/below.

    python scripts/stage2_probe.py --stage1 runs/qs/stage1/model --world runs/qs/world --out runs/probe \\
        model.predictor.fusion=pointer

Frozen-tower outputs come from the library's cache (``--out``/../probe_cache); the loss is the
library's InfoNCE over answer groups plus the target-uniformity term of the quickstart's stage 2.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from vljepa.config import ModelConfig, from_dict
from vljepa.data.cache import EmbeddingCache
from vljepa.data.formats import SkipReport
from vljepa.embed import cached_image_tokens
from vljepa.losses import info_nce, target_uniformity
from vljepa.models.vljepa import VLJepa, read_model_meta


def question_form(record: dict) -> str:
    if record["type"] != "relation":
        return record["type"]
    q = record["question"]
    if q.startswith("what"):
        return "rel_what"
    return "rel_yn_vert" if (" above " in q or " below " in q) else "rel_yn_horiz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage1", required=True, help="a saved stage-1 model folder")
    ap.add_argument("--world", required=True, help="the built-in world folder (train/ and test/)")
    ap.add_argument("--out", required=True, help="folder for log.jsonl")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--relation-weight", type=float, default=1.0)
    ap.add_argument("--eval-questions", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("overrides", nargs="*", help="model.KEY=VALUE changes to the stage-1 model's config")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, world = Path(args.out), Path(args.world)
    out.mkdir(parents=True, exist_ok=True)

    config = read_model_meta(Path(args.stage1))["model"]
    for item in args.overrides:
        key, value = item.split("=", 1)
        path = key.removeprefix("model.").split(".")
        node = config
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = yaml.safe_load(value)
    model = VLJepa(from_dict(ModelConfig, config, prefix="model."))
    missing, unexpected = model.load_state_dict(load_file(str(Path(args.stage1) / "model.safetensors")), strict=False)
    if unexpected:
        raise SystemExit(f"the overrides remove parts of the stage-1 model: {unexpected[:3]}")
    print(f"new parameters (initialised fresh): {missing}", flush=True)

    def split(name: str):
        records = [json.loads(line) for line in open(world / name / "questions.jsonl")]
        files = sorted({r["file_name"] for r in records})
        tokens, _, _ = cached_image_tokens(model, [str(world / name / f) for f in files],
                                           EmbeddingCache(out.parent / "probe_cache"), on_error="stop",
                                           report=SkipReport())
        index = {f: i for i, f in enumerate(files)}
        return records, tokens, index

    train, train_tokens, train_index = split("train")
    test, test_tokens, test_index = split("test")
    test = test[: args.eval_questions]
    answers = sorted({r["answer"] for r in train} | {a for r in test for a in r["answers"]})
    answer_id = {a: i for i, a in enumerate(answers)}
    counts = {"all": len(train), "ey": sum(r["type"] in ("exist", "yesno") for r in train) or 1,
              "rel": sum(r["type"] == "relation" for r in train) or 1}
    weights = torch.tensor([2 / counts["all"] + (r["type"] in ("exist", "yesno")) / counts["ey"]
                            + args.relation_weight * (r["type"] == "relation") / counts["rel"] for r in train],
                           dtype=torch.double)
    tok = model.tokenize(answers)
    with torch.no_grad():
        answer_feats = model.text_features(tok["input_ids"], tok["attention_mask"])

    def batch(records, tokens, index, rows):
        rs = [records[i] for i in rows]
        queries = model.tokenize_queries([r["question"] for r in rs])
        return tokens[[index[r["file_name"]] for r in rs]], queries, torch.tensor([answer_id[r["answer"]] for r in rs])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        bank = model.embed_target(**answer_feats)
        hits, n = defaultdict(int), defaultdict(int)
        for s in range(0, len(test), 256):
            rows = list(range(s, min(len(test), s + 256)))
            visual, queries, _ = batch(test, test_tokens, test_index, rows)
            best = (model.predict(visual_tokens=visual, **queries) @ bank.T).argmax(1).tolist()
            for i, b in zip(rows, best):
                hit = answers[b] in test[i]["answers"]
                for form in (question_form(test[i]), "all"):
                    hits[form] += hit
                    n[form] += 1
        model.train()
        return {form: round(hits[form] / n[form], 3) for form in sorted(n)}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    with open(out / "log.jsonl", "w") as log:
        for step in range(1, args.steps + 1):
            rows = torch.multinomial(weights, args.batch_size, replacement=True, generator=g).tolist()
            visual, queries, ans = batch(train, train_tokens, train_index, rows)
            pred = model.predict(visual_tokens=visual, **queries)
            distinct, inverse = torch.unique(ans, return_inverse=True)
            target = model.embed_target(**{k: v[distinct] for k, v in answer_feats.items()})[inverse]
            scale = model.logit_scale.exp().clamp(max=model.config.loss.max_logit_scale)
            loss = info_nce(pred, target, scale, ans)["loss"] + target_uniformity(target, ans)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            if step % args.every == 0 or step == args.steps:
                row = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start),
                       **evaluate()}
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
