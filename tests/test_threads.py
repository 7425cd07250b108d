"""The CPU thread policy: counts follow the cores this process may use and an executor's share, never more."""
import os
import subprocess
import sys

import pytest

from diffrl_bench import threads
from diffrl_bench.threads import (MAX_THREADS_ENV, available_cores, configure_openmp_env, resolve_threads,
                                  thread_cap)


@pytest.fixture
def cores(monkeypatch):
    """Pretend this process may run on `n` cores, with no thread variables in the environment."""
    for name in (MAX_THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def set_cores(n):
        monkeypatch.setattr(threads, "available_cores", lambda: n)
    return set_cores


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="affinity is Linux's")
def test_available_cores_is_the_affinity_set():
    assert available_cores() == len(os.sched_getaffinity(0))


def test_auto_takes_the_cores_and_an_explicit_count_never_exceeds_them(cores, monkeypatch):
    cores(4)
    assert resolve_threads(0) == 4
    assert resolve_threads(2) == 2
    assert resolve_threads(16) == 4  # more threads than cores would oversubscribe them
    assert resolve_threads(0, default=2) == 2  # torch's own default (physical cores) bounds auto
    assert resolve_threads(0, default=64) == 4  # but a default past the affinity set does not count
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(0) == 3  # the environment's choice bounds auto...
    assert resolve_threads(4) == 4  # ...but not an explicit config value


def test_an_executors_share_caps_every_count(cores, monkeypatch):
    cores(8)
    monkeypatch.setenv(MAX_THREADS_ENV, "2")
    assert thread_cap() == 2
    assert [resolve_threads(n) for n in (0, 1, 2, 6)] == [2, 1, 2, 2]


def test_bad_values_are_named(cores, monkeypatch):
    cores(2)
    with pytest.raises(ValueError, match="train.threads"):
        resolve_threads(-1)
    monkeypatch.setenv(MAX_THREADS_ENV, "two")
    with pytest.raises(ValueError, match=MAX_THREADS_ENV):
        thread_cap()


def test_the_wait_policy_is_passive_on_a_busy_machine_unless_the_environment_has_chosen():
    env = {}
    assert configure_openmp_env(env, load=1.5) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert configure_openmp_env(env, load=0.2) is None and env == {}  # quiet: spinning is faster, kept
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(chosen)
        assert configure_openmp_env(env, load=5.0) is None and env == chosen


def test_the_cli_sets_the_wait_policy_before_torch_loads():
    # OpenMP reads the policy once, when torch loads it: the entry point must set it while torch is not imported.
    # `list` runs no network, so it does not sample the machine; `train` does (the missing config file is refused
    # after that). One process each: `list` itself imports torch.
    def policy_calls(argv):
        code = ("import sys, diffrl_bench.cli as c; import diffrl_bench.threads as t; seen = []\n"
                "t.configure_openmp_env = lambda env=None: seen.append('torch' in sys.modules)\n"
                f"c.main({argv!r})\nprint(seen)")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert policy_calls(["train", "/nonexistent/cfg.yaml"]) == "[False]"
    assert policy_calls(["list"]) == "[]"


def test_busy_cores_sees_another_process_spinning_on_a_core():
    # A neighbour that keeps a core busy must count as busy (>= BUSY_LOAD) whatever else the machine does: other
    # processes only add to the machine-wide non-idle time that busy_cores samples.
    import subprocess
    import sys

    from diffrl_bench.threads import BUSY_LOAD, busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)  # let it start spinning
        assert busy_cores(0.5) >= BUSY_LOAD
    finally:
        spinner.kill()
        spinner.wait()
