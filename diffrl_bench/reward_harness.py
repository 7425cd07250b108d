"""The reward protocol (see rewards/ for plugins); the harness that runs them follows below."""
from __future__ import annotations

import inspect
import math
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as wait_futures
from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch

from diffrl_bench.config import ConfigError

DEFAULT_TIMEOUT_S = 600.0
"""seconds one scoring call (all components of one chunk) may take before the run stops (RewardConfig.timeout_s)"""
CLOSE_GRACE_S = 10.0
"""seconds `WeightedReward.close` lets a running scoring call finish before abandoning it"""

_ABANDONED: List[threading.Thread] = []


def _abandon(thread: threading.Thread) -> None:
    _ABANDONED.append(thread)


def abandoned_calls() -> List[str]:
    """The names of reward threads given up on (past the timeout, or not done when the harness closed) that are
    still running. Python stops daemon threads at interpreter exit only when they next take the GIL; one inside a
    torch or other C++ call then unwinds through C++ and the process aborts ("terminate called without an active
    exception", exit -6) instead of exiting with its code, so the command-line exits without finalising then."""
    return [thread.name for thread in _ABANDONED if thread.is_alive()]


class Reward(Protocol):
    """A reward scores a batch of images.

    `images` are float tensors (B, 3, H, W) in [0, 1]; `prompts` the B prompt strings; `metadata` one dict per image
    (for GenEval-style tasks, the prompt's include/exclude clauses). It returns a dict of float tensors of shape (B,):
    the key equal to the reward's `name` is the score used for training; other keys, written `name.part`, are logged.

    A reward that cannot score a prompt without some metadata keys declares them as a class attribute,
    `needs_metadata = ("tag", "include")`: prompts lacking one are refused before the run starts
    (`check_reward_metadata`) and again at every call, instead of being scored as if nothing were asked for.
    """

    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        ...


class RewardError(RuntimeError):
    """A reward raised, returned the wrong shape, returned a non-finite score, or did not answer in time."""


class RewardConfigError(ConfigError):
    """A reward's options, or the prompts it is given, cannot work; the message names the config key."""


def option_error(reward: str, option: str, value: Any, why: str) -> RewardConfigError:
    """The error a reward constructor raises for a bad option value, named by its config key."""
    return RewardConfigError(f"bad config key 'reward.options.{reward}.{option}': {value!r} {why}")


def _accepted_options(factory) -> Optional[set]:
    """The keyword options a reward factory takes; None when it takes any (**kwargs) or cannot be inspected."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}


def check_reward_options(name: str, options: Dict[str, Any] | None) -> None:
    """Unknown option keys of a reward, found from its constructor's signature without building it (cheap)."""
    from diffrl_bench.registry import REWARDS

    if options is not None and not isinstance(options, dict):
        raise RewardConfigError(f"bad config key 'reward.options.{name}': must be a mapping of option -> value, "
                                f"got {options!r}")
    accepted = _accepted_options(REWARDS.get(name))
    if accepted is None:
        return
    for key in options or {}:
        if key not in accepted:
            raise RewardConfigError(f"bad config key 'reward.options.{name}.{key}': reward {name!r} has no option "
                                    f"{key!r}; its options: {sorted(accepted)}")


def build_reward(name: str, options: Dict[str, Any] | None = None) -> Reward:
    from diffrl_bench.registry import REWARDS

    check_reward_options(name, options)
    try:
        return REWARDS.get(name)(**(options or {}))
    except RewardConfigError:
        raise
    except (TypeError, ValueError) as error:
        # e.g. float("abc") on an option: the constructor could not say which key, the harness names the reward's.
        raise RewardConfigError(f"bad config key 'reward.options.{name}': reward {name!r} rejected its options "
                                f"{options or {}}: {type(error).__name__}: {error}") from None


def _lacking(needs: Sequence[str], metadata: Any) -> List[str]:
    if not isinstance(metadata, dict):
        return list(needs)
    return [key for key in needs if metadata.get(key) in (None, "", [], {})]


def check_reward_metadata(names: Sequence[str], prompts: Sequence[Any], prompts_key: str,
                          names_key: str = "reward.components") -> None:
    """Refuse, before any work, prompts that lack metadata a reward declares it needs (`needs_metadata`).

    `prompts` are `diffrl_bench.prompts.Prompt`s; the first offending one is named with its file and line."""
    from diffrl_bench.registry import REWARDS

    for name in names:
        needs = tuple(getattr(REWARDS.get(name), "needs_metadata", ()))
        if not needs:
            continue
        for prompt in prompts:
            missing = _lacking(needs, prompt.metadata)
            if missing:
                raise RewardConfigError(
                    f"{names_key}: reward {name!r} needs prompt metadata {list(needs)}, but {prompts_key} prompt "
                    f"{prompt.where or '?'} ({prompt.text[:80]!r}) has no {missing}; use prompts that carry it "
                    f"(e.g. GenEval metadata: geneval:PATH / a .jsonl file, or toy:*) or another reward")


def call_reward(name: str, reward: Reward, images: torch.Tensor, prompts: Sequence[str],
                metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Run one reward and check what it returned; any failure names the reward (never a silent 0)."""
    needs = tuple(getattr(reward, "needs_metadata", ()))
    for index, record in enumerate(metadata if needs else ()):
        missing = _lacking(needs, record)
        if missing:
            raise RewardError(f"reward {name!r} needs prompt metadata {list(needs)}; image {index} (prompt "
                              f"{prompts[index][:80]!r}) has no {missing}")
    try:
        scores = reward(images, prompts, metadata)
    except Exception as error:  # noqa: BLE001 - re-raised with the reward's name
        raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
    if name not in scores:
        raise RewardError(f"reward {name!r} returned keys {sorted(scores)} without its own name")
    checked = {}
    for key, value in scores.items():
        value = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
        if value.shape[0] != images.shape[0]:
            raise RewardError(f"reward {name!r} returned {value.shape[0]} scores under {key!r} for {images.shape[0]} images")
        bad = ~torch.isfinite(value)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise RewardError(f"reward {name!r} returned a non-finite score {float(value[index])} under {key!r} "
                              f"(image {index}, prompt {prompts[index]!r})")
        checked[key] = value
    return checked


def call_reward_within(timeout_s: Optional[float], name: str, reward: Reward, images: torch.Tensor,
                       prompts: Sequence[str], metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """`call_reward` bounded by `timeout_s` (<= 0 or None: no limit), for callers without a `WeightedReward`
    (evaluation). The call runs on a daemon thread, abandoned when it is past the timeout."""
    if not timeout_s or timeout_s <= 0:
        return call_reward(name, reward, images, prompts, metadata)
    future: Future = Future()

    def run() -> None:
        try:
            _settle(future.set_result, call_reward(name, reward, images, prompts, metadata))
        except BaseException as error:  # noqa: BLE001 - delivered to the caller through the future
            _settle(future.set_exception, error)

    thread = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
    thread.start()
    done, _ = wait_futures([future], timeout=timeout_s)
    if not done:
        _abandon(thread)
        raise RewardError(f"reward {name!r} did not answer within {timeout_s:g} s (reward.timeout_s); the "
                          f"evaluation stops. A reward server may be down or overloaded")
    return future.result()


def _settle(setter, value) -> None:
    """Complete a future unless it is done already (the caller gave up on it after a timeout, or cancelled it)."""
    try:
        setter(value)
    except InvalidStateError:
        pass


class _Job:
    def __init__(self, args, harness: "WeightedReward"):
        self.args = args
        self.future = _RewardFuture(harness, self)
        self.started: Optional[float] = None
        self.running: Optional[str] = None  # the component being scored, for the timeout message


class _RewardFuture(Future):
    """A future whose plain `result()` gives up once the reward call it waits on is past the harness's timeout."""

    def __init__(self, harness: "WeightedReward", job: _Job):
        super().__init__()
        self._harness, self._job = harness, job

    def result(self, timeout: Optional[float] = None):
        if timeout is None:
            self._harness._wait(self._job)
        return super().result(timeout)


class WeightedReward:
    """The training reward: a weighted sum of components, each component (and its parts) kept for logging.

    Scoring runs on one daemon worker thread. `submit` returns a future: with `worker="thread"` at once, so the
    caller samples the next chunk meanwhile; with `worker="inline"` once the chunk is scored. `Future.result()`
    re-raises any failure with the reward's name.

    `timeout_s` bounds one scoring call (every component on one chunk; <= 0: no limit). A call past it fails the
    waiting caller with a `RewardError` naming the reward that was running; the hung call is abandoned on its
    daemon thread, which neither `close` nor interpreter exit waits for, so Ctrl-C and shutdown stay prompt.
    """

    TOTAL = "reward"
    _POLL_S = 0.5  # how often a waiting caller checks the running call's age and Ctrl-C; results arrive at once

    def __init__(self, components: Dict[str, float], options: Dict[str, Dict[str, Any]] | None = None,
                 worker: str = "thread", timeout_s: float = DEFAULT_TIMEOUT_S):
        if not components:
            raise RewardError("no reward components configured (reward.components is empty)")
        if worker not in ("thread", "inline"):
            raise RewardConfigError(f"bad config key 'reward.worker': {worker!r} is not 'thread' or 'inline'")
        for name, weight in components.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RewardConfigError(f"bad config key 'reward.components.{name}': weight {weight!r} is not a "
                                        f"finite number")
        options = options or {}
        self.weights = dict(components)
        self.rewards = {name: build_reward(name, options.get(name)) for name in components}
        self.inline = worker == "inline"
        self.timeout_s = float(timeout_s) if timeout_s and timeout_s > 0 else None
        self._jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._current: Optional[_Job] = None
        self._hung: Optional[str] = None
        self._thread = threading.Thread(target=self._work, name="reward", daemon=True)
        self._thread.start()

    def _score(self, job: _Job) -> Dict[str, torch.Tensor]:
        images, prompts, metadata = job.args
        scores: Dict[str, torch.Tensor] = {}
        for name, reward in self.rewards.items():
            job.running = name
            scores.update(call_reward(name, reward, images, prompts, metadata))
        job.running = None
        total = sum(weight * scores[name] for name, weight in self.weights.items())
        bad = ~torch.isfinite(total)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise RewardError(f"the weighted reward (reward.components {self.weights}) is non-finite "
                              f"({float(total[index])}) for image {index} (prompt {prompts[index]!r})")
        scores[self.TOTAL] = total
        return scores

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._current, job.started = job, time.monotonic()
            try:
                result = self._score(job)
            except BaseException as error:  # noqa: BLE001 - delivered to the caller through the future
                _settle(job.future.set_exception, error)
            else:
                _settle(job.future.set_result, result)
            self._current = None

    def _wait(self, job: _Job) -> None:
        """Block until `job` is done, or raise once the call running on the worker is past the timeout."""
        while not job.future.done():
            # Always a bounded wait, also with no timeout set: Ctrl-C's SIGINT may land on the reward thread, and
            # then only the main thread's next bytecode raises KeyboardInterrupt; an unbounded lock wait never
            # returns to run it (seen: 1 hang in 6 tries with a reward that never answers).
            wait_futures([job.future], timeout=self._POLL_S)
            running = self._current
            if (self.timeout_s is not None and running is not None and running.started is not None
                    and time.monotonic() - running.started > self.timeout_s and not job.future.done()):
                name = running.running or "?"
                self._hung = name
                error = RewardError(f"reward {name!r} did not answer within {self.timeout_s:g} s "
                                    f"(reward.timeout_s); the run stops. A reward server may be down or overloaded")
                for stuck in (running, job):
                    _settle(stuck.future.set_exception, error)

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]) -> Future:
        if self._hung is not None:
            raise RewardError(f"reward {self._hung!r} hung earlier (past reward.timeout_s = {self.timeout_s:g} s); "
                              f"no further scoring is possible in this process")
        job = _Job((images, prompts, metadata), self)
        self._jobs.put(job)
        if self.inline:
            self._wait(job)
        return job.future

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        return self.submit(images, prompts, metadata).result()

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop the worker: calls not yet started are cancelled; the running one gets up to `grace_s` to finish
        (0 after Ctrl-C; none for a call already past the timeout), after which it is abandoned to its daemon
        thread (see `abandoned_calls`)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._jobs.put(None)
        # A run stopped by one chunk's failure may still be scoring the next: left running inside a torch op,
        # it would abort the interpreter at exit (SIGABRT instead of the run's exit code).
        if self._hung is None and grace_s > 0:
            self._thread.join(grace_s)
        if self._thread.is_alive():
            _abandon(self._thread)
