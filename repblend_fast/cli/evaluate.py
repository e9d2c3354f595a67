"""``repblend-fast evaluate``: the train-on-distilled evaluation of a saved set
(:func:`repblend_fast.evaluate_saved.evaluate_file`)."""

from __future__ import annotations

import sys
from pathlib import Path

from repblend_fast.cli.common import (
    CLIError,
    add_dataset_args,
    add_encoder_args,
    add_parser,
    add_threads_arg,
    apply_threads,
    check_device,
    check_set_path,
    dataset_from_args,
    encoders_from_args,
)
from repblend_fast.config import EVAL_SEEDS, EVAL_TEMPERATURE


def register(sub) -> None:
    p = add_parser(
        sub,
        "evaluate",
        help="evaluate a distilled set (train fresh heads on it, retrieve on the real test split)",
        description="Evaluate a distilled set with the docs/algorithm.md §8 protocol: fresh heads "
        "trained on its pairs (frozen encoders), retrieval on the real test split, mean ± std "
        "over evaluation seeds.",
    )
    p.add_argument("--distilled", required=True, help="distilled.safetensors, or its run folder")
    add_dataset_args(p)
    add_encoder_args(p)
    g = p.add_argument_group("protocol")
    g.add_argument("--dim", type=int, default=256, help="projection width D of the fresh heads")
    g.add_argument("--num-eval", type=int, default=EVAL_SEEDS, help="evaluation seeds")
    g.add_argument("--epochs", type=int, default=101, help="training epochs (0..epochs-1)")
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="score the test split every this many epochs (default: the set's method's "
        "cadence, 20 for RepBlend, 10 for LoRS and MTT-VL, as their research code does)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=EVAL_TEMPERATURE,
        help="logit temperature of the evaluation, whatever the distillation used",
    )
    g.add_argument(
        "--loss", default=None, help="training loss (default: the set's configured loss, wbce)"
    )
    g.add_argument(
        "--lr-img", type=float, default=None, help="image-head lr (default: the learned η)"
    )
    g.add_argument(
        "--lr-txt", type=float, default=None, help="text-head lr (default: the learned η)"
    )
    g.add_argument(
        "--random-baseline",
        action="store_true",
        help="also evaluate random real subsets of the same size (same loss, lr 0.1)",
    )
    p.add_argument(
        "--json",
        default=None,
        help="also write the full result to this JSON file (default: print only)",
    )
    add_threads_arg(p)
    p.set_defaults(func=cmd_evaluate, distributed=True)


def cmd_evaluate(args) -> int:
    from repblend_fast import distributed
    from repblend_fast.evaluate_saved import evaluate_file
    from repblend_fast.report import results_table

    check_set_path(args.distilled, "--distilled")
    if args.json and Path(args.json).is_dir():
        raise CLIError(
            f"--json {args.json} is a folder; --json names the file to write: pass e.g. "
            f"{Path(args.json) / 'result.json'}"
        )
    check_device(args)
    for flag in ("dim", "num_eval", "epochs", "eval_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    apply_threads(args.threads)
    enc = encoders_from_args(args)
    test = dataset_from_args(args, "test")
    train = dataset_from_args(args, "train") if args.random_baseline else None
    try:
        result = evaluate_file(
            args.distilled,
            encoders=enc,
            test=test,
            train=train,
            image_size=args.image_size,
            dim=args.dim,
            num_eval=args.num_eval,
            epochs=args.epochs,
            eval_every=args.eval_every,
            temperature=args.temperature,
            loss=args.loss,
            lr_img=args.lr_img,
            lr_txt=args.lr_txt,
            cache_dir=args.cache_dir,
            note=lambda msg: print(msg, file=sys.stderr) if distributed.is_main() else None,
            shard_seeds=True,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--distilled {args.distilled}: {exc}") from exc
    n = result["methods"]["distilled"]["pairs"]
    print(
        f"{result['distilled']}: {n} pairs, {args.num_eval} seeds, {args.epochs} epochs, "
        f"loss {result['loss']}, scored every {result['eval_every']} epochs at "
        f"temperature {result['temperature']:g}"
    )
    print("best epoch (chosen on test):")
    print(results_table(result, "best"))
    print("last epoch:")
    print(results_table(result, "last"))
    if args.json and distributed.is_main():
        from repblend_fast.io import atomic_write_json

        atomic_write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
