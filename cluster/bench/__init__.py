"""`moe-serve bench`: benchmarks that measure side by side in one run and report ratios.

Machines here are shared and noisy, so every figure that matters is a ratio of
two measurements taken in the same process, on the same checkpoint and prompts.
"""

from __future__ import annotations

import argparse

from cluster.bench import engine as engine_bench
from cluster.bench import frontend as frontend_bench
from cluster.bench import placement as placement_bench
from cluster.bench import rebalance as rebalance_bench
from cluster.bench import scaling as scaling_bench
from cluster.bench import serving as serving_bench

SUITES = {"engine": engine_bench, "serving": serving_bench, "frontend": frontend_bench,
          "placement": placement_bench, "rebalance": rebalance_bench, "scaling": scaling_bench}


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    p.set_defaults(func=run_bench)
    bench_sub = p.add_subparsers(dest="suite", required=True)
    for name, module in SUITES.items():
        module.add_arguments(bench_sub.add_parser(name, help=module.__doc__.strip().splitlines()[0]))


def run_bench(args: argparse.Namespace) -> int:
    return SUITES[args.suite].run(args)
