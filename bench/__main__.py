"""`python -m bench` runs the CPU suite (bench/run_cpu.py)."""

import sys

from bench.run_cpu import main

sys.exit(main())
