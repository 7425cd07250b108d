"""tcmalloc for CPU runs, selected when a command starts.

glibc's malloc hands the large activation buffers of every training step back to the system and asks for them again
on the next one; tcmalloc keeps them. Issue 18 measured 0.85x per toy step with it, and `benchmarks/speed.py`
measures it side by side on the machine at hand. The numerics do not change: an allocator decides where tensors
live, not what is computed (the speed benchmark's tcmalloc worker reproduces the glibc worker's losses).

An allocator cannot be swapped inside a running process: the library must be preloaded when the process starts.
So the console entry points (`diffrl-bench`, `python -m diffrl_bench.sweep`) re-execute themselves once, with
`LD_PRELOAD` naming a libtcmalloc, when one is installed and not already loaded; every process they start inherits
it. `DIFFRL_BENCH_TCMALLOC=0` keeps glibc's malloc; `DIFFRL_BENCH_TCMALLOC=/path/lib.so` names the library.
Nothing happens when no libtcmalloc is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`), on a
system without `LD_PRELOAD` semantics, or when called from Python (`cli.main([...])` in a test or a notebook).
"""
from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("diffrl_bench")

TCMALLOC_ENV = "DIFFRL_BENCH_TCMALLOC"
"""'0' / 'off' / 'false': keep the system malloc; a path: preload that library instead of searching"""
REEXEC_MARK = "DIFFRL_BENCH_PRELOAD_DONE"
"""set in the re-executed process, so that it never re-executes again (also when the preload failed)"""
OFF_VALUES = ("0", "off", "false", "no")
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
        "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> Optional[str]:
    """The path of an installed libtcmalloc, or None."""
    for directory in DIRS:
        for name in NAMES:
            if Path(directory, name).exists():
                return str(Path(directory, name))
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def preload_plan(env: Mapping[str, str], find: Callable[[], Optional[str]] = find_tcmalloc
                 ) -> Optional[Dict[str, str]]:
    """The environment to re-execute with (LD_PRELOAD gaining the library, REEXEC_MARK set), or None when the
    process should go on as it is: switched off, already re-executed, the library already preloaded, not Linux,
    or no library found. A named library that does not exist is an error naming the variable."""
    choice = env.get(TCMALLOC_ENV, "").strip()
    if choice.lower() in OFF_VALUES or env.get(REEXEC_MARK) or not sys.platform.startswith("linux"):
        return None
    if choice:
        if not Path(choice).is_file():
            from diffrl_bench.config import ConfigError

            raise ConfigError(f"environment variable {TCMALLOC_ENV}={choice!r}: no such file (a libtcmalloc path, "
                              f"or 0 to keep the system malloc)")
        library = choice
    else:
        library = find()
        if not library:
            return None
    preloaded = [item for item in env.get("LD_PRELOAD", "").replace(":", " ").split() if item]
    if any(Path(item).name == Path(library).name or item == library for item in preloaded):
        return None
    new_env = dict(env)
    new_env["LD_PRELOAD"] = " ".join([library] + preloaded)
    new_env[REEXEC_MARK] = library
    return new_env


def command_line() -> List[str]:
    """The command that started this interpreter, as it was typed (`python -m pkg ...` stays `-m`)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    argv[0] = sys.executable
    return argv


def preload_tcmalloc(exec_fn: Callable[[str, Sequence[str], Mapping[str, str]], None] = os.execve) -> None:
    """Re-execute this command with tcmalloc preloaded when `preload_plan` says so; returns only when not."""
    plan = preload_plan(os.environ)
    if plan is None:
        return
    argv = command_line()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        exec_fn(argv[0], argv, plan)
    except OSError as error:  # cannot exec (odd interpreters): go on with the system malloc
        log.warning("could not restart with %s preloaded (%s); going on with the system malloc",
                    plan[REEXEC_MARK], error)
