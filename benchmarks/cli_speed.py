"""Wall time of ``perturbscope --help`` and ``python -m perturbscope --help``, and what they import.

Each command is run ``--runs`` times in a fresh interpreter (after one untimed warm-up run that
fills the file cache); the median and the range are printed. A third measurement imports the
full package surface (``perturbscope.ScopeVI``) for comparison, which is what ``--help`` used to
cost before the package's subpackages loaded lazily. The script also checks, with
``python -X importtime``, that ``--help`` imports none of torch, scvi, scanpy or lightning.

Run: ``python benchmarks/cli_speed.py [--runs 7]``. Target: ``--help`` under 2 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "scvi", "scanpy", "lightning", "anndata")


def _time(command: list[str], runs: int) -> list[float]:
    subprocess.run(command, check=True, capture_output=True)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def _heavy_imports(command: list[str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command], check=True, capture_output=True, text=True
    )
    names = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    script = shutil.which("perturbscope")
    commands = {"python -m perturbscope --help": [sys.executable, "-m", "perturbscope", "--help"]}
    if script is not None:
        commands = {"perturbscope --help": [script, "--help"], **commands}
    commands["python -c 'import perturbscope; perturbscope.ScopeVI'"] = [
        sys.executable, "-c", "import perturbscope; perturbscope.ScopeVI"]
    print(f"{'command':<55} {'median s':>9} {'min s':>7} {'max s':>7}  (runs={runs})")
    medians = {}
    for name, command in commands.items():
        times = _time(command, runs)
        medians[name] = statistics.median(times)
        print(f"{name:<55} {medians[name]:>9.3f} {min(times):>7.3f} {max(times):>7.3f}")
    heavy = _heavy_imports(["-m", "perturbscope", "--help"])
    print(f"\nheavy modules imported by --help: {heavy or 'none'}")
    help_median = medians.get("perturbscope --help", medians["python -m perturbscope --help"])
    full = medians["python -c 'import perturbscope; perturbscope.ScopeVI'"]
    print(f"--help median {help_median:.3f} s (target < 2 s: "
          f"{'met' if help_median < 2 else 'missed'}); the full import takes "
          f"{full / help_median:.0f}x as long.")


if __name__ == "__main__":
    main()
