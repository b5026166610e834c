"""The ``vljepa`` command. The only module that reads argv or the environment."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EPILOG_OVERRIDES = (
    "Overrides are dotted keys after the options, e.g. `optim.lr=3e-4 train.max_steps=500 "
    "data.on_error=skip`. Unknown keys and wrong types are errors."
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="YAML config file; repeat to layer several (later ones win)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vljepa",
        description="Vision-language JEPA: predict the embedding of the answer, not its tokens. "
                    "Generate the built-in world, train, evaluate, answer questions and inspect models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `vljepa quickstart --out runs/quickstart`. Run `vljepa COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="world -> caption pretraining -> VQA fine-tuning -> evaluation",
                       description="Generate the built-in world, run both training stages with the shipped "
                                   "quickstart configs, evaluate on held-out and compositional splits, print a "
                                   "results table, and save the model (DIR/model) and metrics (DIR/metrics.json).")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--small", action="store_true",
                   help="a tiny world and a few steps: checks the pipeline in about a minute, numbers are meaningless")
    p.add_argument("--grounded", action="store_true",
                   help="the world also asks questions about named objects (position, attribute, nearest / "
                        "furthest, shared attributes, yes/no relations); see docs/grounding.md")
    p.add_argument("--processes", type=int, default=0,
                   help="training processes per stage, launched with `accelerate launch` when more than one "
                        "(default 0 = automatic: one per GPU, one on a CPU)")

    p = sub.add_parser("world", help="generate the built-in procedural world (images + metadata.jsonl)",
                       description="Write a seeded world of 1-3 coloured shapes per image (up to 6 with "
                                   "--max-objects) with paraphrased captions and VQA questions, as train / test / "
                                   "comp (compositional) split folders in the same on-disk format as user data "
                                   "(images + metadata.jsonl + questions.jsonl).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=8000, help="training images (default 8000)")
    p.add_argument("--test", type=int, default=1000, help="held-out test images (default 1000)")
    p.add_argument("--comp", type=int, default=500, help="compositional test images (default 500)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--captions", type=int, default=5, help="captions per image (default 5)")
    p.add_argument("--grounded", action="store_true",
                   help="also ask grounded questions about named objects: position, attribute, nearest / furthest, "
                        "shared attributes, yes/no relations (types position, attribute, nearest, furthest, "
                        "share_count, relation_yesno; each record also has a family)")
    p.add_argument("--max-objects", type=int, default=3,
                   help="most objects per image, 1..6 (default 3); above 3 objects are smaller and placed anywhere")
    p.add_argument("--video", action="store_true",
                   help="write video clips instead of images: in each an object moves, appears, disappears or "
                        "changes colour or shape (videos/*.mp4 + captions, timestamped events and questions about "
                        "what happened; train and test splits; --comp, --grounded, --max-objects do not apply)")
    p.add_argument("--clip-seconds", type=float, default=2.0, help="with --video: seconds per clip (default 2)")
    p.add_argument("--fps", type=float, default=8.0, help="with --video: frames a second (default 8)")

    p = sub.add_parser("train", help="train a model from YAML config(s) + overrides",
                       description="Train with Accelerate (run under `accelerate launch` for several processes). "
                                   "Writes config.yaml, metrics.jsonl, checkpoints/ and model/ under "
                                   "train.output_dir.", epilog=EPILOG_OVERRIDES)
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.add_argument("--eval-split", default="", help="evaluate on this split folder at train.eval_every and at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the data, print parameter counts and the global batch, and exit")

    p = sub.add_parser("eval", help="evaluate a saved model on a split (retrieval, classify, vqa, caption)",
                       description="Evaluate a saved model folder on a split folder and print / save a JSON report. "
                                   "Report keys are documented in vljepa.eval.report.", epilog=EPILOG_OVERRIDES)
    p.add_argument("--model", required=True, help="model folder written by save_pretrained (or hf-hub:owner/name)")
    p.add_argument("--split", required=True, help="split folder (images + metadata.jsonl [+ questions.jsonl])")
    p.add_argument("--tasks", default="retrieval,classify,vqa", help="comma-separated: retrieval,classify,vqa,caption (caption needs `vljepa train-decoder` first)")
    p.add_argument("--out", default="", help="write the JSON report here")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop", help="bad records: stop or skip and count")

    p = sub.add_parser("predict", help="answer a question about one image",
                       description="Predict the answer embedding for an image and a question, and decode it as the "
                                   "nearest candidate answers.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", default="", help="question text; empty = query-free (caption)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--candidates", help="text file with one candidate answer a line")
    group.add_argument("--answers", help="comma-separated candidate answers")
    p.add_argument("-k", type=int, default=3, help="how many candidates to print")

    p = sub.add_parser("train-decoder", help="train a light text decoder for a saved model",
                       description="Embed a split's captions with the model's frozen Y-encoder and target head, "
                                   "train a light decoder (embedding -> caption) on them with Gaussian noise on the "
                                   "embeddings, and save it as DIR/decoder/ (VLJepa.from_pretrained(DIR) loads it "
                                   "as model.decoder). Keys: vljepa.config.DecoderTrainConfig.",
                       epilog="Overrides are dotted keys of DecoderTrainConfig, e.g. `decoder.depth=2 optim.lr=1e-3 "
                              "noise_std=0.3 max_steps=500`.")
    p.add_argument("--model", required=True, help="model folder written by save_pretrained")
    p.add_argument("--data", required=True, help="caption split folder (images + metadata.jsonl); only its captions are read")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="DecoderTrainConfig YAML (default: the shipped vljepa/configs/train/decoder.yaml)")

    p = sub.add_parser("stream", help="caption a video, decoding only when the predicted embedding changes",
                       description="Run the model over a sliding window of the video's frames (one query-free "
                                   "embedding per --stride seconds, or with --query), choose where to decode with "
                                   "a selective-decoding policy, decode each choice as the nearest caption of a "
                                   "candidate bank (or with the model's own text decoder), and write "
                                   "OUT/captions.json, OUT/captions.vtt and OUT/captions.srt.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--video", required=True, help="video file (or a folder of frames with --frame-rate)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--bank", help="candidate bank folder (CandidateBank.save)")
    group.add_argument("--captions", metavar="SPLIT",
                       help="split folder whose captions form the bank; without --bank or --captions the "
                            "model's text decoder is used")
    p.add_argument("--policy", choices=["ward", "online", "uniform"], default="ward",
                   help="ward: segments of the finished stream (the paper's method); online: decode when the "
                        "embedding moves; uniform: a fixed rate (default: ward)")
    p.add_argument("--rate", type=float, default=None,
                   help="ward / uniform: decodes per second (default 0.1 for ward, 1.0 for uniform)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="online: cosine distance from the last decoded embedding that triggers a decode (default 0.1)")
    p.add_argument("--max-gap", type=float, default=10.0,
                   help="online: decode at least every this many seconds; 0 = no limit (default 10)")
    p.add_argument("--stride", type=float, default=0.5, help="seconds between embeddings (default 0.5)")
    p.add_argument("--fps", type=float, default=None, help="resample the video to this frame rate first")
    p.add_argument("--frame-rate", type=float, default=None, help="frames a second of a --video frames folder")
    p.add_argument("--query", default="", help="question asked of every window; empty = query-free captions")
    p.add_argument("--pool", choices=["point", "mean"], default="point",
                   help="ward / uniform: decode each segment's chosen embedding or its mean (default point)")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("summary", help="build a model config and print parameter counts per part",
                       description="Build the model described by the config and print trainable / frozen "
                                   "parameters per part.", epilog=EPILOG_OVERRIDES)
    _add_config_args(p)
    return parser


def _cmd_world(args: argparse.Namespace) -> None:
    from vljepa.config import ConfigError
    from vljepa.data.world import MAX_OBJECTS, generate_world

    if not 1 <= args.max_objects <= MAX_OBJECTS:
        raise ConfigError(f"world: --max-objects must be in 1..{MAX_OBJECTS}, got {args.max_objects}")
    t = time.time()
    if args.video:
        from vljepa.data.world import generate_video_world

        if args.grounded or args.max_objects != 3:
            raise ConfigError("world: --grounded and --max-objects are for images; drop them with --video")
        try:
            info = generate_video_world(args.out, seed=args.seed, n_train=args.train, n_test=args.test,
                                        image_size=args.image_size, clip_seconds=args.clip_seconds, fps=args.fps,
                                        captions_per_clip=args.captions, progress=True)
        except ValueError as exc:  # --image-size / --captions / --clip-seconds x --fps out of range
            raise ConfigError(f"world: {exc}") from exc
        print(f"video world written to {info.root} in {time.time() - t:.1f}s: {info.splits} clips")
        return
    try:
        info = generate_world(args.out, seed=args.seed, n_train=args.train, n_test=args.test, n_comp=args.comp,
                              image_size=args.image_size, captions_per_image=args.captions, grounded=args.grounded,
                              max_objects=args.max_objects, progress=True)
    except ValueError as exc:  # --image-size / --captions out of range
        raise ConfigError(f"world: {exc}") from exc
    print(f"world written to {info.root} in {time.time() - t:.1f}s: {info.splits}; held-out pairs {info.held_out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from vljepa.config import load_config
    from vljepa.eval.report import evaluate
    from vljepa.train.trainer import dry_run, train

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        info = dry_run(cfg)
        print(json.dumps(info, indent=2))
        print(f"dry run ok: {sum(info['records'].values())} records, global batch {info['global_batch']}, "
              f"{info['skipped']['total']} skipped")
        return
    split = args.eval_split or cfg.eval.split
    fn = None
    if split:
        def fn(model, c, accelerator):
            return evaluate(model, split, c.eval, on_error=c.data.on_error, accelerator=accelerator)
    result = train(cfg, resume=args.resume, evaluate_fn=fn)
    print(f"trained {result.steps} steps in {result.seconds:.0f}s; model saved to {result.model_dir}")
    if result.eval:
        print(json.dumps(result.eval, indent=2))


def _cmd_eval(args: argparse.Namespace) -> None:
    from vljepa.config import EvalConfig, load_config
    from vljepa.eval.report import evaluate, format_table
    from vljepa.models.vljepa import VLJepa

    overrides = [o[len("eval."):] if o.startswith("eval.") else o for o in args.overrides]
    overrides.append(f"tasks=[{args.tasks}]")
    cfg = load_config(None, overrides, cls=EvalConfig)
    model = VLJepa.from_pretrained(args.model)
    results = evaluate(model, args.split, cfg, on_error=args.on_error)
    print(format_table({Path(args.split).name: results}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"report written to {args.out}")


def _cmd_train_decoder(args: argparse.Namespace) -> None:
    from vljepa.config import DecoderTrainConfig, config_dir, load_config
    from vljepa.train.decoder import train_decoder

    configs = args.config or [config_dir() / "train" / "decoder.yaml"]
    cfg = load_config(configs, [*args.overrides, f"data={args.data}"], cls=DecoderTrainConfig)
    result = train_decoder(args.model, cfg)
    print(f"trained the decoder {result.steps} steps in {result.seconds:.0f}s on {result.n_captions} captions "
          f"(last loss {result.last['loss']:.4f}); saved to {result.decoder_dir}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from vljepa.eval.report import answer
    from vljepa.models.vljepa import VLJepa

    if args.candidates:
        path = Path(args.candidates)
        if not path.is_file():
            raise SystemExit(f"error: --candidates '{path}' is not a file")
        candidates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        candidates = [a.strip() for a in args.answers.split(",") if a.strip()]
    if not candidates:
        raise SystemExit("error: no candidate answers given")
    model = VLJepa.from_pretrained(args.model)
    for text, score in answer(model, args.image, args.question, candidates, k=args.k):
        print(f"{score:.3f}  {text}")


def _cmd_summary(args: argparse.Namespace) -> None:
    import torch

    from vljepa.config import load_config
    from vljepa.hub import architecture_only
    from vljepa.models.vljepa import VLJepa

    cfg = load_config(args.config, args.overrides)
    # Counting needs shapes only: build from config files on the meta device (no memory, no weights,
    # no tokenizers), with the paper's Hub ids mapped to the architectures shipped in vljepa/configs/hf.
    with torch.device("meta"):
        model = VLJepa(architecture_only(cfg.model), load_weights=False, with_tokenizers=False)
    rows = model.parameter_summary()
    print(f"{'part':<12} {'trainable':>14} {'frozen':>14}")
    for name, c in rows.items():
        print(f"{name:<12} {c['trainable']:>14,} {c['frozen']:>14,}")
    print(f"{'total':<12} {sum(c['trainable'] for c in rows.values()):>14,} {sum(c['frozen'] for c in rows.values()):>14,}")


def _cmd_stream(args: argparse.Namespace) -> None:
    from vljepa.config import ConfigError
    from vljepa.data.formats import DataError
    from vljepa.decode.nearest import CandidateBank
    from vljepa.decode.selective import make_policy
    from vljepa.data.readers.video import video_info
    from vljepa.decode.stream import bank_decoder, caption_bank, caption_video, model_decoder, save_captions
    from vljepa.models.vljepa import VLJepa

    video_info(args.video, frame_rate=args.frame_rate)  # a missing or corrupt video fails before the model loads
    default_rate = {"ward": 0.1, "uniform": 1.0}.get(args.policy)
    try:
        policy = make_policy(args.policy, rate=args.rate if args.rate is not None else default_rate,
                             threshold=args.threshold, max_gap_s=args.max_gap or None)
    except ValueError as exc:
        raise ConfigError(f"stream: {exc}") from exc
    model = VLJepa.from_pretrained(args.model)
    if args.bank:
        try:
            decode = bank_decoder(CandidateBank.load(args.bank))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"--bank: {exc}") from exc
    elif args.captions:
        decode = bank_decoder(caption_bank(model, args.captions))
    else:
        decode = model_decoder(model)
        if decode is None:
            raise ConfigError(f"model '{args.model}' has no text decoder; give --bank BANK_DIR or --captions SPLIT")
    result = caption_video(model, args.video, policy, decode, fps=args.fps, stride_s=args.stride, query=args.query,
                           pool=args.pool, frame_rate=args.frame_rate, progress=True)
    minutes = max(float(result.times[-1]), 1e-9) / 60
    info = {"model": args.model, "video": args.video, "policy": args.policy, "parameters": vars(policy),
            "stride_s": args.stride, "query": args.query, "steps": len(result.times), "frames": result.frames,
            "seconds": round(result.seconds, 2)}
    save_captions(args.out, result.decodes, result.cues, info)
    print(f"{len(result.decodes)} decodes ({len(result.decodes) / minutes:.1f} per minute) over {len(result.times)} "
          f"embeddings, {len(result.cues)} subtitle cues, in {result.seconds:.1f}s; written to {args.out}")


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from vljepa.quickstart import run_quickstart

    run_quickstart(args.out, small=args.small, overrides=args.overrides, processes=args.processes,
                   grounded=args.grounded)


TAKES_OVERRIDES = {"quickstart", "train", "eval", "summary", "train-decoder"}
COMMANDS = {"quickstart": _cmd_quickstart, "world": _cmd_world, "train": _cmd_train, "eval": _cmd_eval,
            "predict": _cmd_predict, "summary": _cmd_summary, "train-decoder": _cmd_train_decoder,
            "stream": _cmd_stream}


def main(argv: list[str] | None = None) -> int:
    from vljepa.config import ConfigError
    from vljepa.data.formats import DataError

    parser = build_parser()
    # KEY=VALUE overrides may stand anywhere among the options, so they are collected from what
    # argparse does not recognise; anything else unrecognised is still an error.
    args, extra = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and args.command not in TAKES_OVERRIDES):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    args.overrides = extra
    try:
        COMMANDS[args.command](args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
