"""`python -m diffrl_bench.report RESULTS_DIR ...`: the same as `diffrl-bench report`."""
import sys

from diffrl_bench.report.cli import main

sys.exit(main())
