"""`python -m diffrl_bench.sweep SPEC.yaml ...`: the same as `diffrl-bench sweep`."""
import sys

from diffrl_bench.sweep.cli import main

sys.exit(main())
