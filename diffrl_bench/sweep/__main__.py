"""`python -m diffrl_bench.sweep SPEC.yaml ...`: the same as `diffrl-bench sweep`."""
import sys

from diffrl_bench.allocator import preload_tcmalloc

preload_tcmalloc()  # first: it may re-execute this command with tcmalloc preloaded (diffrl_bench/allocator.py)

from diffrl_bench.sweep.cli import main  # noqa: E402

sys.exit(main())
