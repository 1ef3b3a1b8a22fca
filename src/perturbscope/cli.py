"""Command line: ``perturbscope demo`` and ``perturbscope benchmark``.

``perturbscope --help`` and argument errors stay fast: this module imports only the standard
library and :mod:`perturbscope._choices` at the top (the package ``__init__`` loads its
subpackages lazily); torch, scvi-tools and the benchmark are imported inside :func:`main` once
the arguments have been checked.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ._choices import ACCELERATORS, MODEL_NAMES, TASK_NAMES

DEFAULT_MODELS = "scopevi,linear,additive"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _model_list(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",")]
    if not all(models):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated model names without empty entries, got {text!r}"
        )
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown models {unknown}; choose from {', '.join(MODEL_NAMES)}"
        )
    duplicated = sorted({m for m in models if models.count(m) > 1})
    if duplicated:
        raise argparse.ArgumentTypeError(f"models {duplicated} are listed more than once")
    return models


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perturbscope", description="Predict and probe single-cell genetic perturbations."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,benchmark}")

    demo = commands.add_parser(
        "demo", help="simulate a screen, train ScopeVI and compare with baselines",
        description="Simulate a screen, hold out unseen genes and doubles, train ScopeVI and "
                    "score it beside baselines.",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0,
                      help="seed of the simulation, the held-out choice and training (default 0)")
    demo.add_argument("--epochs", type=_positive_int, default=60,
                      help="ScopeVI training epochs (default 60)")
    demo.add_argument("--accelerator", choices=ACCELERATORS, default="auto",
                      help="Lightning accelerator for training: %(choices)s (default auto)")

    bench = commands.add_parser(
        "benchmark", help="score models beside baselines and the noise ceiling",
        description="Score models on every split of a task beside the split-half noise "
                    "ceiling; writes metrics.csv, summary.csv, results.md and figures to --out.",
    )
    bench.add_argument("--data", type=Path, default=None,
                       help="h5ad file or shared data folder (not needed for 'simulated')")
    bench.add_argument("--task", required=True, choices=TASK_NAMES, metavar="TASK",
                       help="one of: %(choices)s")
    bench.add_argument("--models", type=_model_list, default=_model_list(DEFAULT_MODELS),
                       metavar="M1,M2,...",
                       help=f"comma-separated models from: {', '.join(MODEL_NAMES)} "
                            f"(default {DEFAULT_MODELS})")
    bench.add_argument("--seeds", type=_positive_int, default=3,
                       help="number of seeds 0..N-1 (default 3)")
    bench.add_argument("--out", type=Path, default=Path("benchmark_results"),
                       help="output folder (default benchmark_results)")
    bench.add_argument("--accelerator", choices=ACCELERATORS, default="auto",
                       help="Lightning accelerator for ScopeVI's training: %(choices)s "
                            "(default auto)")
    bench.set_defaults(subparser=bench)  # errors found after parsing name the subcommand
    return parser


def _check_benchmark_args(args: argparse.Namespace) -> None:
    parser = args.subparser
    if args.out.exists() and not args.out.is_dir():  # refused before any work, not after the whole run
        parser.error(f"--out {str(args.out)!r} is a file; pass a folder for the tables and plots")
    if args.task == "simulated":
        if args.data is not None:
            parser.error("--data is not read by the simulated task; leave it out")
        return
    if args.data is None:
        parser.error(f"--data is required for task {args.task!r}: the task's h5ad file or the "
                     "shared data folder")
    if not args.data.exists():
        parser.error(f"--data {str(args.data)!r} does not exist")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``perturbscope`` console script.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo

        demo(seed=args.seed, max_epochs=args.epochs, accelerator=args.accelerator)
        return
    _check_benchmark_args(args)
    from .benchmark import markdown_table, run_benchmark, summarize
    from .pl import benchmark_figures

    train = None if args.accelerator == "auto" else {"accelerator": args.accelerator}
    results = run_benchmark(data=args.data, task=args.task, models=args.models,
                            seeds=args.seeds, out=args.out,
                            scopevi_kwargs=None if train is None else {"train": train})
    benchmark_figures(results, args.out)
    print(markdown_table(summarize(results)))
    print(f"\nWrote every metric to {args.out / 'metrics.csv'}.")


if __name__ == "__main__":
    main()
