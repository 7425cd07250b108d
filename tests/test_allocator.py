"""tcmalloc selected at start (diffrl_bench/allocator.py): when to re-execute, with what, and exactly once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffrl_bench.allocator import REEXEC_MARK, TCMALLOC_ENV, preload_plan
from diffrl_bench.config import ConfigError

LIB = "/opt/x/libtcmalloc_minimal.so.4"


def found():
    return LIB


def test_the_plan_prepends_the_library_and_marks_the_process():
    plan = preload_plan({"LD_PRELOAD": "/a/libfoo.so", "PATH": "/bin"}, find=found)
    assert plan["LD_PRELOAD"] == f"{LIB} /a/libfoo.so"  # the user's own preloads stay, after it
    assert plan[REEXEC_MARK] == LIB and plan["PATH"] == "/bin"


@pytest.mark.parametrize("env", [
    {TCMALLOC_ENV: "0"}, {TCMALLOC_ENV: "off"},  # switched off
    {REEXEC_MARK: LIB},  # already re-executed once (even if the preload did not take)
    {"LD_PRELOAD": "/elsewhere/libtcmalloc_minimal.so.4"},  # the user preloaded one already
])
def test_no_reexecution_when_switched_off_done_or_already_preloaded(env):
    assert preload_plan(env, find=found) is None


def test_nothing_happens_without_an_installed_library():
    assert preload_plan({}, find=lambda: None) is None


def test_a_named_library_that_does_not_exist_is_refused_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=TCMALLOC_ENV):
        preload_plan({TCMALLOC_ENV: str(tmp_path / "missing.so")}, find=found)


def loaded_library(name: str) -> str:
    """The path of a shared library this interpreter has mapped (harmless to preload again)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(name):
            return path
    pytest.fail(f"no {name} mapped in this process")


def test_the_command_reexecutes_once_with_the_library_preloaded():
    library = loaded_library("libc.so")
    code = ("import os; print('start', flush=True); from diffrl_bench.allocator import preload_tcmalloc; "
            "preload_tcmalloc(); print('after', os.environ['LD_PRELOAD'])")
    env = {**os.environ, TCMALLOC_ENV: library}
    env.pop(REEXEC_MARK, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # the first process printed 'start' and was replaced; the second printed both: one re-execution, no loop
    assert lines.count("start") == 2 and len([l for l in lines if l.startswith("after")]) == 1
    assert lines[-1].split()[1] == library


def test_the_console_command_consults_it_first(tmp_path):
    env = {**os.environ, TCMALLOC_ENV: str(tmp_path / "missing.so")}
    env.pop(REEXEC_MARK, None)
    out = subprocess.run([sys.executable, "-m", "diffrl_bench.cli", "list"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and TCMALLOC_ENV in out.stderr and "Traceback" not in out.stderr
