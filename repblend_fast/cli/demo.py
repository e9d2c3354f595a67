"""``repblend-fast demo`` (the whole pipeline on an embedded dataset, :mod:`repblend_fast.demo`)
and ``repblend-fast report`` (re-render a demo run's report and figures)."""

from __future__ import annotations

from pathlib import Path

from repblend_fast.cli.common import (
    CLIError,
    add_dataset_args,
    add_encoder_args,
    add_parser,
    add_set_arg,
    add_threads_arg,
    apply_threads,
    check_device,
    dataset_from_args,
    encoders_from_args,
    parse_set,
)

# One thread by default: results depend on the thread count (docs/demo.md, "Threads"), and one
# thread gives every machine the numbers the README and docs/demo.md report.
DEMO_THREADS = 1


def register(sub) -> None:
    from repblend_fast.demo import DemoSettings

    d = DemoSettings()
    p = add_parser(
        sub,
        "demo",
        help="run the whole pipeline on the embedded dataset and write a report",
        description="Run the whole pipeline (features, experts, RepBlend and LoRS distillation, "
        "evaluation against coreset and full-data baselines, report) on the embedded dataset.",
    )
    p.add_argument("--out", default="repblend_demo", help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    add_dataset_args(p)
    add_encoder_args(p)
    g = p.add_argument_group("demo size")
    g.add_argument(
        "--pairs", type=int, default=None, help="N synthetic pairs (default: the preset's, 99)"
    )
    g.add_argument(
        "--iterations", type=int, default=None, help="RepBlend iterations (default: the preset's)"
    )
    g.add_argument(
        "--experts", type=int, default=d.experts, metavar="N", help="number of RepBlend experts"
    )
    g.add_argument(
        "--expert-batch", type=int, default=d.expert_batch, help="RepBlend expert batch size"
    )
    g.add_argument("--dim", type=int, default=d.dim, help="projection width D")
    g.add_argument("--no-lors", action="store_true", help="skip the LoRS branch")
    g.add_argument(
        "--lors-iterations",
        type=int,
        default=None,
        help=f"LoRS iterations (default {d.lors_overrides['iterations']})",
    )
    g.add_argument("--lors-experts", type=int, default=d.lors_experts, help="LoRS experts")
    g.add_argument(
        "--lors-image-size",
        type=int,
        default=None,
        help="LoRS image resolution (default: as RepBlend)",
    )
    g.add_argument("--num-eval", type=int, default=d.num_eval, help="evaluation seeds")
    g.add_argument(
        "--eval-epochs", type=int, default=d.eval_epochs, help="evaluation training epochs"
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="score the test split every this many evaluation epochs (default: each method's "
        "research-code cadence, 20 for RepBlend and its baselines, 10 for LoRS)",
    )
    g.add_argument(
        "--full-epochs", type=int, default=d.full_epochs, help="epochs of the full-data baseline"
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seeds experts, distillation, subsets")
    add_set_arg(g, "a DistillConfig field of both methods")
    g.add_argument(
        "--lors-set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a DistillConfig field of the LoRS branch only (JSON value); repeatable; "
        "default: no overrides",
    )
    add_threads_arg(
        p,
        default=f"{DEMO_THREADS}, so that the demo's numbers are the same on every machine, "
        "whatever its number of cores",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage lines stay)")
    p.set_defaults(func=cmd_demo)

    r = add_parser(
        sub,
        "report",
        help="re-render report.md and the figures of a demo run",
    )
    r.add_argument("--run", required=True, help="demo run directory (holds metrics.json)")
    r.add_argument("--no-figures", action="store_true", help="only rewrite report.md")
    r.set_defaults(func=cmd_report)


def _settings(args):
    from repblend_fast.demo import DemoSettings

    lors_over = dict(DemoSettings().lors_overrides)
    if args.lors_iterations is not None:
        lors_over["iterations"] = args.lors_iterations
    lors_over.update(parse_set(args.lors_set, "--lors-set"))
    return DemoSettings(
        dataset=args.dataset,
        image_size=args.image_size,
        dim=args.dim,
        seed=args.seed,
        experts=args.experts,
        expert_batch=args.expert_batch,
        lors=not args.no_lors,
        lors_experts=args.lors_experts,
        lors_image_size=args.lors_image_size,
        lors_overrides=lors_over,
        num_eval=args.num_eval,
        eval_epochs=args.eval_epochs,
        eval_every=args.eval_every,
        full_epochs=args.full_epochs,
    )


def cmd_demo(args) -> int:
    from repblend_fast.demo import check_out, run_demo
    from repblend_fast.report import check_plotting, results_table

    check_device(args)
    threads = apply_threads(args.threads, DEMO_THREADS)
    over = parse_set(args.set)
    for flag in ("pairs", "iterations"):
        if getattr(args, flag) is not None:
            over[flag] = getattr(args, flag)
    if args.device != "cpu":
        over["device"] = args.device
    settings = _settings(args)
    try:  # every check that can fail before minutes of work
        settings.validate().configs(over)
        check_plotting()
        check_out(Path(args.out), args.overwrite)
    except (TypeError, ValueError, ImportError, FileExistsError) as exc:
        raise CLIError(str(exc)) from exc

    def loader():
        return (
            dataset_from_args(args, "train"),
            dataset_from_args(args, "test"),
            encoders_from_args(args),
        )

    try:
        metrics = run_demo(
            args.out,
            settings,
            overrides=over,
            loader=loader,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    print(results_table(metrics, "best"))
    for line in metrics.get("verdict") or []:
        print(f"- {line}")
    print(
        f"total {metrics['timings']['total_s']:.0f} s with {threads} torch thread(s); "
        f"report: {Path(args.out) / 'report.md'}"
    )
    return 0


def cmd_report(args) -> int:
    from repblend_fast.report import render_run

    try:
        written = render_run(args.run, figures=not args.no_figures)
    except (FileNotFoundError, ValueError, ImportError, KeyError) as exc:
        raise CLIError(str(exc)) from exc
    for name, path in written.items():
        print(f"wrote {path}" if name else path)
    return 0
