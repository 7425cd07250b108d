"""Start the GenEval server: `python -m diffrl_bench.geneval ...`, or `python path/to/diffrl_bench/geneval ...`."""
import sys
from pathlib import Path

if not __package__:
    # Run as a path (GenEval's environment need not have this project installed): the package's own folder is
    # sys.path[0], where its module names would shadow others; the repository root makes it importable instead.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from diffrl_bench.geneval.server import main  # noqa: E402 - needs the path set above

main()
