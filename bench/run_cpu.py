"""The CPU benchmark suite (`make bench`): transfer, trainer (tiny model), dataset memory,
operator scale.

Runs each benchmark with its defaults (sized to finish together in well under
10 minutes on a 2-core machine), prints each table, writes bench/results/*.json,
and ends with the time each part took. A part that fails does not stop the
others; the exit status is non-zero if any failed. The GPU trainer benchmark
runs too when CUDA is available (it skips otherwise, in a second).

    python -m bench                      # = python -m bench.run_cpu
    python -m bench --quick              # seconds; what tests/bench runs
    python -m bench --only transfer,trainer
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import dataset_memory, operator_scale, trainer, trainer_gpu, transfer
from bench.common import RESULTS_DIR, format_table

__all__ = ["PARTS", "main"]

PARTS: dict[str, Callable[[list[str] | None], int]] = {
    "transfer": transfer.main,
    "trainer": trainer.main,
    "dataset_memory": dataset_memory.main,
    "operator_scale": operator_scale.main,
    "trainer_gpu": trainer_gpu.main,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smallest sizes (smoke test)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}"
    )
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(
            f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}"
        )
    common = ["--results-dir", str(args.results_dir), *(["--quick"] if args.quick else [])]
    summary: list[list[object]] = []
    failed = False
    started = time.perf_counter()
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            code = PARTS[name](common)
        except Exception:
            traceback.print_exc()
            code = 1
        failed |= code != 0
        summary.append([name, "ok" if code == 0 else f"FAILED ({code})", time.perf_counter() - t0])
    summary.append(["total", "", time.perf_counter() - started])
    print("\n" + format_table(["benchmark", "result", "seconds"], summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
