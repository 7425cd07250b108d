"""Console logging of the command-line entry points: `diffrl-bench` and the sweep's job processes."""
from __future__ import annotations

import logging

# Libraries whose INFO lines would drown the run's own.
QUIET_LOGGERS = ("accelerate", "diffusers", "urllib3", "matplotlib")


def setup_logging(verbose: bool) -> None:
    """Timestamped log lines on stderr at INFO (DEBUG when `verbose`); the chatty libraries at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
