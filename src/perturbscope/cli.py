"""Command line: ``perturbscope demo`` and ``perturbscope benchmark``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perturbscope", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="simulate a screen, train ScopeVI and compare with baselines")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=60)

    bench = commands.add_parser("benchmark", help="score models beside baselines and the noise ceiling")
    bench.add_argument("--data", default=None, help="h5ad file or shared data folder (none for 'simulated')")
    bench.add_argument("--task", required=True)
    bench.add_argument("--models", default="scopevi,linear,additive", help="comma-separated model names")
    bench.add_argument("--seeds", type=int, default=3)
    bench.add_argument("--out", type=Path, default=Path("benchmark_results"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``perturbscope`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo

        demo(seed=args.seed, max_epochs=args.epochs)
    else:
        from .benchmark import markdown_table, run_benchmark, summarize
        from .pl import benchmark_figures

        results = run_benchmark(data=args.data, task=args.task, models=[m.strip() for m in args.models.split(",")],
                                seeds=args.seeds, out=args.out)
        benchmark_figures(results, args.out)
        print(markdown_table(summarize(results)))
        print(f"\nWrote every metric to {args.out / 'metrics.csv'}.")


if __name__ == "__main__":
    main()
