import math
import re

import pytest
import torch

from diffrl_bench.registry import REWARDS
from diffrl_bench.reward_harness import RewardError, WeightedReward


class _Constant:
    def __init__(self, name, value, extra=None):
        self.name, self.value, self.extra = name, value, extra

    def __call__(self, images, prompts, metadata):
        out = {self.name: torch.full((images.shape[0],), self.value)}
        if self.extra:
            out[f"{self.name}.part"] = torch.full((images.shape[0],), self.extra)
        return out


@pytest.fixture
def fake_rewards(monkeypatch):
    made = {}

    def register(name, value, extra=None):
        monkeypatch.setitem(REWARDS._items, name, lambda **kw: _Constant(name, value, extra))
        made[name] = value

    return register


def _batch(n=4):
    return torch.rand(n, 3, 16, 16), [f"p{i}" for i in range(n)], [{} for _ in range(n)]


@pytest.mark.parametrize("worker", ["thread", "inline"])
def test_weighted_sum_and_components_are_logged(fake_rewards, worker):
    fake_rewards("r_a", 0.5, extra=0.25)
    fake_rewards("r_b", 2.0)
    reward = WeightedReward({"r_a": 3.0, "r_b": -1.0}, worker=worker)
    scores = reward.submit(*_batch()).result()
    reward.close()
    assert torch.allclose(scores["reward"], torch.full((4,), 3.0 * 0.5 - 2.0))
    assert torch.equal(scores["r_a.part"], torch.full((4,), 0.25))
    assert set(scores) == {"reward", "r_a", "r_a.part", "r_b"}


@pytest.mark.parametrize("worker", ["thread", "inline"])
def test_nan_reward_fails_loudly_with_its_name(fake_rewards, worker):
    fake_rewards("healthy", 1.0)
    fake_rewards("broken_scorer", math.nan)
    reward = WeightedReward({"healthy": 1.0, "broken_scorer": 1.0}, worker=worker)
    future = reward.submit(*_batch())
    with pytest.raises(RewardError, match="broken_scorer.*non-finite"):
        future.result()
    reward.close()


def test_raising_reward_is_reported_with_its_name(monkeypatch):
    class Exploding:
        name = "exploding"

        def __call__(self, images, prompts, metadata):
            raise RuntimeError("model server unreachable")

    monkeypatch.setitem(REWARDS._items, "exploding", lambda **kw: Exploding())
    reward = WeightedReward({"exploding": 1.0}, worker="thread")
    with pytest.raises(RewardError, match="exploding.*model server unreachable"):
        reward.submit(*_batch()).result()
    reward.close()


def test_wrong_length_scores_are_rejected(monkeypatch):
    class Short:
        name = "short"

        def __call__(self, images, prompts, metadata):
            return {"short": torch.zeros(images.shape[0] - 1)}

    monkeypatch.setitem(REWARDS._items, "short", lambda **kw: Short())
    with pytest.raises(RewardError, match="short.*3 scores.*4 images"):
        WeightedReward({"short": 1.0}, worker="inline")(*_batch())


def test_threaded_scoring_overlaps_with_the_caller(monkeypatch):
    import threading

    seen = {}

    class Slow:
        name = "slow"

        def __call__(self, images, prompts, metadata):
            seen["thread"] = threading.current_thread().name
            return {"slow": torch.ones(images.shape[0])}

    monkeypatch.setitem(REWARDS._items, "slow", lambda **kw: Slow())
    reward = WeightedReward({"slow": 1.0}, worker="thread")
    reward.submit(*_batch()).result()
    reward.close()
    assert seen["thread"].startswith("reward")


# ------------------------------------------------------------------------------------------- hangs, NaN, options
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from diffrl_bench.reward_harness import RewardConfigError, abandoned_calls, build_reward, call_reward  # noqa: E402


class _Hanging:
    """A reward that never answers until the test releases it (a dead reward server, say)."""

    name = "stuck_server"

    def __init__(self, release):
        self.release = release

    def __call__(self, images, prompts, metadata):
        self.release.wait()
        return {self.name: torch.zeros(images.shape[0])}


@pytest.mark.parametrize("worker", ["thread", "inline"])
def test_a_hanging_reward_stops_the_run_naming_it(monkeypatch, worker):
    release = threading.Event()
    monkeypatch.setitem(REWARDS._items, "stuck_server", lambda **kw: _Hanging(release))
    reward = WeightedReward({"stuck_server": 1.0}, worker=worker, timeout_s=0.2)
    try:
        with pytest.raises(RewardError) as info:
            reward.submit(*_batch()).result()
        assert str(info.value) == ("reward 'stuck_server' did not answer within 0.2 s (reward.timeout_s); the run "
                                   "stops. A reward server may be down or overloaded")
        # Nothing more is scored behind the hung call, and closing does not wait for it.
        with pytest.raises(RewardError, match="reward 'stuck_server' hung earlier"):
            reward.submit(*_batch())
        reward.close()
        assert reward._thread.daemon and reward._thread.is_alive()
    finally:
        release.set()


def test_the_timeout_covers_a_chunk_queued_behind_the_hung_one(monkeypatch):
    """The training loop waits on its chunks in order; a later chunk's wait must also notice the hang."""
    release = threading.Event()
    monkeypatch.setitem(REWARDS._items, "stuck_server", lambda **kw: _Hanging(release))
    reward = WeightedReward({"stuck_server": 1.0}, worker="thread", timeout_s=0.2)
    try:
        first, second = reward.submit(*_batch()), reward.submit(*_batch())
        with pytest.raises(RewardError, match="'stuck_server' did not answer"):
            second.result()
        with pytest.raises(RewardError, match="'stuck_server' did not answer"):
            first.result()
        reward.close()
    finally:
        release.set()


def test_a_hung_reward_does_not_keep_the_process_alive(tmp_path):
    """Interpreter exit (after Ctrl-C, or after the timeout error) must not wait on the hung worker thread."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import threading, torch\n"
        "from diffrl_bench.registry import REWARDS\n"
        "from diffrl_bench.reward_harness import RewardError, WeightedReward\n"
        "class Forever:\n"
        "    name = 'forever'\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        threading.Event().wait()\n"
        "REWARDS._items['forever'] = lambda **kw: Forever()\n"
        "reward = WeightedReward({'forever': 1.0}, timeout_s=0.2)\n"
        "try:\n"
        "    reward.submit(torch.rand(2, 3, 8, 8), ['a', 'b'], [{}, {}]).result()\n"
        "except RewardError as error:\n"
        "    print('stopped:', error)\n"
        "finally:\n"
        "    reward.close()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("stopped: reward 'forever' did not answer within 0.2 s")


def test_no_timeout_when_disabled(fake_rewards):
    fake_rewards("r_a", 0.5)
    reward = WeightedReward({"r_a": 1.0}, worker="thread", timeout_s=0)
    assert reward.timeout_s is None
    assert torch.equal(reward(*_batch())["reward"], torch.full((4,), 0.5))
    reward.close()


def test_a_nan_score_names_the_reward_and_the_image(monkeypatch):
    class NanAtTwo:
        name = "nan_at_two"

        def __call__(self, images, prompts, metadata):
            scores = torch.ones(images.shape[0])
            scores[2] = math.nan
            return {self.name: scores}

    images, prompts, metadata = _batch()
    with pytest.raises(RewardError) as info:
        call_reward("nan_at_two", NanAtTwo(), images, prompts, metadata)
    assert str(info.value) == "reward 'nan_at_two' returned a non-finite score nan under 'nan_at_two' (image 2, prompt 'p2')"


def test_a_non_finite_weight_is_refused_by_key(fake_rewards):
    fake_rewards("r_a", 0.5)
    with pytest.raises(RewardConfigError) as info:
        WeightedReward({"r_a": math.nan}, worker="inline")
    assert str(info.value) == "bad config key 'reward.components.r_a': weight nan is not a finite number"


def test_finite_scores_overflowing_the_weighted_sum_are_caught(fake_rewards):
    fake_rewards("huge", 3e38)
    reward = WeightedReward({"huge": 10.0}, worker="inline")
    with pytest.raises(RewardError, match=r"the weighted reward .* is non-finite \(inf\) for image 0"):
        reward(*_batch())
    reward.close()


@pytest.mark.parametrize("options, message", [
    ({"strict_weigth": 0.5}, "bad config key 'reward.options.toy_geneval.strict_weigth': reward 'toy_geneval' has no "
                             "option 'strict_weigth'; its options: ['strict_weight']"),
    ({"strict_weight": 1.5}, "bad config key 'reward.options.toy_geneval.strict_weight': 1.5 is not in [0, 1]"),
    ({"strict_weight": "half"}, "bad config key 'reward.options.toy_geneval.strict_weight': 'half' is not a number"),
    ({"strict_weight": math.nan}, "bad config key 'reward.options.toy_geneval.strict_weight': nan is not a number"),
])
def test_bad_reward_options_name_their_key(options, message):
    with pytest.raises(RewardConfigError) as info:
        build_reward("toy_geneval", options)
    assert str(info.value) == message


@pytest.mark.parametrize("name, options, message", [
    ("jpeg_compressibility", {"quality": 2.5}, "'reward.options.jpeg_compressibility.quality': 2.5 is not an integer"),
    ("jpeg_compressibility", {"quality": 0}, "'reward.options.jpeg_compressibility.quality': 0 is not in 1..100"),
    ("geneval", {"url": "localhost:18085"}, "'reward.options.geneval.url': 'localhost:18085' is not an http:// URL"),
    ("geneval", {"partial_mode": "mean"}, "'reward.options.geneval.partial_mode': 'mean' is not one of"),
    ("ocr", {"case_sensitive": "false"}, "'reward.options.ocr.case_sensitive': 'false' is not true or false"),
    ("pickscore", {"dtype": "fp16"}, "'reward.options.pickscore.dtype': 'fp16' is not one of"),
])
def test_bad_options_of_the_real_rewards_name_their_key(name, options, message):
    # Checked before any model is loaded: the constructors check options first.
    with pytest.raises(RewardConfigError, match=re.escape(message)):
        build_reward(name, options)


def test_a_reward_needing_metadata_refuses_a_prompt_without_it_at_call():
    images, prompts, _ = _batch(2)
    metadata = [{"tag": "single_object", "include": [{"class": "square", "count": 1}]}, {}]
    with pytest.raises(RewardError) as info:
        call_reward("toy_geneval", build_reward("toy_geneval"), images, prompts, metadata)
    assert str(info.value) == ("reward 'toy_geneval' needs prompt metadata ['tag', 'include']; image 1 (prompt 'p1') "
                               "has no ['tag', 'include']")


@pytest.mark.parametrize("lands_on", ["process", "reward_thread"])
def test_ctrl_c_stops_a_process_waiting_on_a_hung_reward(tmp_path, lands_on):
    """SIGINT while the caller waits (no timeout set): KeyboardInterrupt, and close + exit do not wait on the worker.
    The kernel may hand a process's SIGINT to any thread; `reward_thread` delivers it to the reward's own thread
    (as happened about once in seven tries of `process`), where it can reach the main thread only once that runs
    Python code again."""
    import signal

    script = tmp_path / "wait.py"
    script.write_text(
        "import signal, threading, torch\n"
        "from diffrl_bench.registry import REWARDS\n"
        "from diffrl_bench.reward_harness import WeightedReward\n"
        "class Forever:\n"
        "    name = 'forever'\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        print('scoring', flush=True)\n"
        f"        if {lands_on == 'reward_thread'}:\n"
        "            signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
        "        threading.Event().wait()\n"
        "REWARDS._items['forever'] = lambda **kw: Forever()\n"
        "reward = WeightedReward({'forever': 1.0}, timeout_s=0)\n"
        "try:\n"
        "    reward.submit(torch.rand(2, 3, 8, 8), ['a', 'b'], [{}, {}]).result()\n"
        "except KeyboardInterrupt:\n"
        "    reward.close(grace_s=0)  # as the Trainer does after Ctrl-C\n"
        "    raise\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "scoring\n"
        if lands_on == "process":
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr


# --------------------------------------------------------------------------- closing while a call is still running
_BUSY_REWARD = (
    "import sys, time, torch\n"
    "from diffrl_bench.cli import exit_code\n"
    "from diffrl_bench.registry import REWARDS\n"
    "from diffrl_bench.reward_harness import RewardError, WeightedReward\n"
    "torch.set_num_threads(1)\n"
    "class FailsThenBusy:\n"
    "    # the first chunk fails at once; later ones keep the thread inside torch ops for BUSY_S seconds\n"
    "    name = 'fails_then_busy'\n"
    "    calls = 0\n"
    "    def __call__(self, images, prompts, metadata):\n"
    "        FailsThenBusy.calls += 1\n"
    "        if FailsThenBusy.calls == 1:\n"
    "            raise ValueError('bad chunk')\n"
    "        a, end = torch.randn(300, 300), time.monotonic() + BUSY_S\n"
    "        while time.monotonic() < end:\n"
    "            a = torch.tanh(a @ a)\n"
    "        return {self.name: images.mean(dim=(1, 2, 3))}\n"
    "REWARDS._items['fails_then_busy'] = lambda **kw: FailsThenBusy()\n"
    "reward = WeightedReward({'fails_then_busy': 1.0}, timeout_s=TIMEOUT_S)\n"
    "batch = (torch.rand(2, 3, 8, 8), ['a', 'b'], [{}, {}])\n"
    "first, second = reward.submit(*batch), reward.submit(*batch)\n"
    "try:\n"
    "    (second if WAIT_SECOND else first).result()\n"
    "except RewardError as error:\n"
    "    print('stopped:', error, flush=True)\n"
    "    reward.close()\n"
    "    sys.exit(EXIT(1))\n")


def _run_busy(tmp_path, busy_s, timeout_s, wait_second, through_exit_code):
    script = tmp_path / "busy.py"
    script.write_text(_BUSY_REWARD.replace("BUSY_S", str(busy_s)).replace("TIMEOUT_S", str(timeout_s))
                      .replace("WAIT_SECOND", str(wait_second)).replace("EXIT", "exit_code" if through_exit_code else ""))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_failed_chunk_stops_after_the_chunk_being_scored_finishes(tmp_path):
    """Chunk 1 fails while chunk 2 is being scored inside torch ops. Exiting at once would stop that thread in C++
    code and the interpreter aborts (-6, "terminate called without an active exception": a 2-process test saw it);
    `close` lets the call finish, so the process exits with its own code."""
    done = _run_busy(tmp_path, busy_s=1.5, timeout_s=0, wait_second=False, through_exit_code=False)
    assert "terminate called" not in done.stderr
    assert done.returncode == 1, done.stderr
    assert done.stdout == "stopped: reward 'fails_then_busy' raised ValueError: bad chunk\n"


def test_a_call_past_the_timeout_inside_torch_does_not_abort_the_command(tmp_path):
    """A call given up on (past reward.timeout_s) is still inside torch ops at exit; the command's `exit_code`
    leaves without interpreter finalisation and keeps the run's exit code."""
    done = _run_busy(tmp_path, busy_s=60, timeout_s=0.5, wait_second=True, through_exit_code=True)
    assert "terminate called" not in done.stderr
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("stopped: reward 'fails_then_busy' did not answer within 0.5 s")
    assert "reward threads ['reward'] still running: exiting without waiting for them" in done.stderr


def test_closing_waits_for_the_running_call_and_ends_the_thread(monkeypatch):
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    class Slow:
        name = "slow_call"

        def __call__(self, images, prompts, metadata):
            started.set()
            release.wait()
            finished.set()
            return {self.name: torch.zeros(images.shape[0])}

    monkeypatch.setitem(REWARDS._items, "slow_call", lambda **kw: Slow())
    reward = WeightedReward({"slow_call": 1.0}, worker="thread", timeout_s=0)
    running, queued = reward.submit(*_batch()), reward.submit(*_batch())
    # close() cancels what has not started: on a busy machine the worker may not have taken the first call yet.
    assert started.wait(30)
    threading.Timer(0.3, release.set).start()
    reward.close(grace_s=30)
    assert finished.is_set() and not reward._thread.is_alive()
    assert running.done() and queued.cancelled()
    assert reward._thread.name not in abandoned_calls()
