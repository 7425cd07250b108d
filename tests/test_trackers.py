"""Trackers mirror metrics.jsonl: TensorBoard read back from its event files, W&B from its offline run, and a
tracker that cannot start stops the run naming it."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from diffrl_bench import trackers as tr

ROWS = [
    {"step": 1, "reward/mean": 0.25, "loss": -1.5e-3, "kl": 0.0, "nfe/train": 40, "time/s": 3.75},
    {"step": 2, "reward/mean": 0.5, "loss": 2.0e-3, "kl": float("nan"), "nfe/train": 80, "time/s": 7.5},
    {"step": 2, "eval/reward": 0.625, "eval/clip": None},
]
CONFIG = {"name": "toy_nft", "algorithm": "nft", "train": {"steps": 2, "lr": 1e-4}, "reward": {"names": ["a", "b"]},
          "checkpoint": {"dir": None}}
RUN_INFO = {"device": "cpu", "world_size": 1}

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")


def expected_scalars(rows):
    """tag -> [(step, value)] as a plot of metrics.jsonl would show it: finite numbers only."""
    out = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def assert_points(got, points, tag, **tolerance):
    """(step, value) series: the steps exactly, the values with pytest.approx(**tolerance) (pytest 9's approx
    refuses a list of tuples)."""
    assert [s for s, _ in got] == [s for s, _ in points], tag
    assert [v for _, v in got] == pytest.approx([v for _, v in points], **tolerance), tag


@needs_tb
def test_tensorboard_event_file_holds_exactly_the_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = tr.Trackers(["tensorboard"], None, tmp_path)
    trackers.start("toy_nft", CONFIG, RUN_INFO, group="sweep1", tags={"arm": "nft", "seed": 0})
    for row in ROWS:
        trackers.log(row, row["step"])
    grid = np.zeros((6, 8, 3), dtype=np.uint8)
    grid[:, :4, 0] = 255  # left half red: read back below
    trackers.log_images("eval/grid_end", grid, 2)
    trackers.finish()

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    want = expected_scalars(ROWS)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert_points(got, points, tag, rel=1e-6, abs=1e-12)  # event files store float32
    (image,) = acc.Images("eval/grid_end")
    assert (image.step, image.width, image.height) == (2, 8, 6)
    from PIL import Image
    import io

    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert (pixels[:, :4] == [255, 0, 0]).all() and (pixels[:, 4:] == 0).all()


@needs_tb
def test_tensorboard_records_the_flattened_config_as_hparams(tmp_path):
    trackers = tr.Trackers(["tensorboard"], None, tmp_path)
    trackers.start("toy_nft", CONFIG, RUN_INFO, tags={"arm": "nft"})
    trackers.finish()
    import yaml

    (hparams_file,) = (tmp_path / "tensorboard").glob("*/hparams.yml")
    hparams = yaml.safe_load(hparams_file.read_text())
    assert hparams["train.lr"] == 1e-4 and hparams["reward.names"] == '["a", "b"]'
    assert hparams["run_info.world_size"] == 1 and hparams["tag.arm"] == "nft"
    assert hparams["checkpoint.dir"] == "None"


def _wandb_log_entries(path):
    """The protobuf records of a .wandb transaction log (LevelDB log framing: 32 KiB blocks, 7-byte record
    headers crc32/length/type, FULL=1 FIRST=2 MIDDLE=3 LAST=4), after the 7-byte ':W&B' file header."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def _wandb_has_exit(log_file):
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for raw in _wandb_log_entries(log_file):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "exit":
                return True
    except Exception:  # noqa: BLE001 - a log still being written may end mid-record
        return False
    return False


def _wandb_records(run_dir):
    """History rows and config of an offline W&B run, read from its .wandb transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    import time

    (log_file,) = run_dir.glob("run-*.wandb")
    # run.finish() can return before W&B's service process has flushed the log; its last record is the exit.
    deadline = time.monotonic() + 60
    while not _wandb_has_exit(log_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    history, config = [], {}
    for raw in _wandb_log_entries(log_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


@needs_wandb
def test_wandb_offline_run_holds_the_rows_config_and_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    rows = ROWS[:2]
    trackers = tr.Trackers(["wandb"], {"wandb": {"project": "diffrl-test"}}, tmp_path)
    trackers.start("toy_nft", CONFIG, RUN_INFO, group="sweep1", tags={"arm": "nft", "seed": 3})
    run = trackers._live["wandb"].tracker
    assert (run.group, sorted(run.tags), run.name) == ("sweep1", ["arm=nft", "seed=3"], "toy_nft")
    for row in rows:
        trackers.log(row, row["step"])
    trackers.finish()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history, config = _wandb_records(run_dir)
    assert config["train.lr"] == 1e-4 and config["run_info.device"] == "cpu" and config["tag.seed"] == "3"
    want = [tr.scalar_row(r) for r in rows]
    got = [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]
    assert got == want  # the NaN kl of step 2 is left out, as metrics.jsonl stores null
    assert [h["_step"] for h in history] == [1, 2]


def test_non_main_process_tracks_nothing(tmp_path):
    trackers = tr.Trackers([], None, tmp_path, main_process=False)
    trackers.start("r", CONFIG)
    trackers.log(ROWS[0], 1)
    trackers.finish()
    if importlib.util.find_spec("tensorboard") is not None:
        trackers = tr.Trackers(["tensorboard"], None, tmp_path, main_process=False)
        trackers.start("r", CONFIG)
        trackers.log(ROWS[0], 1)
        trackers.log_images("g", np.zeros((2, 2, 3), np.uint8), 1)
        trackers.finish()
    assert not any(tmp_path.iterdir())


@needs_tb
def test_tracker_that_cannot_start_raises_naming_it_and_closes_the_others(tmp_path):
    trackers = tr.Trackers(["tensorboard", "wandb"] if importlib.util.find_spec("wandb") else ["tensorboard"],
                           {"tensorboard": {"no_such_option": 1}}, tmp_path)
    with pytest.raises(tr.TrackerError, match="'tensorboard' failed to start.*no_such_option"):
        trackers.start("r", CONFIG)
    assert trackers.active == []


@needs_wandb
@needs_tb
def test_second_tracker_failing_closes_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = tr.Trackers(["tensorboard", "wandb"], {"wandb": {"not_a_wandb_init_argument": 1}}, tmp_path)
    with pytest.raises(tr.TrackerError, match="'wandb' failed to start"):
        trackers.start("r", CONFIG)
    assert trackers.active == []


def test_unknown_tracker_is_refused_with_the_known_names():
    with pytest.raises(tr.TrackerError, match=r"log.trackers\[1\] = 'tensorbord': unknown tracker; known: .*wandb"):
        tr.check_trackers(["wandb", "tensorbord"])


def test_missing_package_is_refused_naming_tracker_and_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(tr.TrackerError, match=r"'mlflow' needs the package mlflow"):
        tr.check_trackers(["mlflow"])


def test_options_for_an_unlisted_tracker_are_refused():
    with pytest.raises(tr.TrackerError, match="tracker_options has an entry for 'wandb'"):
        tr.check_trackers([], {"wandb": {"project": "x"}})
    with pytest.raises(tr.TrackerError, match="must be a list"):
        tr.check_trackers("wandb")


def test_scalar_row_drops_what_metrics_jsonl_stores_as_null():
    assert tr.scalar_row({"a": 1.0, "b": float("inf"), "c": None, "d": True, "e": "x"}) == {"a": 1.0, "d": 1, "e": "x"}


def test_images_are_normalised_to_uint8_rgb():
    from PIL import Image

    assert tr.to_uint8_hwc(np.ones((2, 3), np.float32)).tolist() == [[[255] * 3] * 3] * 2
    assert tr.to_uint8_hwc(Image.new("RGBA", (3, 2), (1, 2, 3, 4))).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        tr.to_uint8_hwc(np.zeros((2, 3, 5)))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_file_store_holds_the_rows_params_and_tags(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a plain folder store otherwise
    uri = f"file://{tmp_path}/mlruns"
    trackers = tr.Trackers(["mlflow"], {"mlflow": {"tracking_uri": uri}}, tmp_path)
    trackers.start("toy_nft", CONFIG, RUN_INFO, group="sweep1", tags={"arm": "nft", "seed": 0})
    run_id = trackers._live["mlflow"].tracker.info.run_id
    for row in ROWS:
        trackers.log(row, row["step"])
    trackers.finish()

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "sweep1"
    assert run.data.params["train.lr"] == "0.0001" and run.data.tags["arm"] == "nft"
    for tag, points in expected_scalars(ROWS).items():
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, tag)]
        assert_points(got, points, tag)


# ------------------------------------------------------------------------------------------------ resumed runs
def _attempts():
    """A run of 4 steps with evals at steps 0 and 2, killed after step 3 and resumed from a checkpoint at step 1:
    the second attempt redoes steps 2 and 3 (with the same values: resume is exact) and finishes."""
    rl = {s: {"step": s, "reward/mean": 0.1 * s, "loss": -0.01 * s} for s in range(1, 5)}
    ev = {s: {"step": s, "eval/reward": 0.2 + 0.1 * s} for s in (0, 2, 4)}
    first = [ev[0], rl[1], rl[2], ev[2], rl[3]]
    second = [rl[2], ev[2], rl[3], rl[4], ev[4]]
    table = [ev[0], rl[1], rl[2], ev[2], rl[3], rl[4], ev[4]]  # metrics.jsonl after the resume
    return first, second, table


def _feed(trackers, rows, images=False):
    for row in rows:
        trackers.log(row, row["step"])
        if images and any(k.startswith("eval/") for k in row):
            trackers.log_images(f"eval/grid_{row['step']}", np.full((4, 4, 3), row["step"], np.uint8), row["step"])


@needs_tb
def test_a_resumed_run_logs_redone_steps_to_tensorboard_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first, second, table = _attempts()
    killed = tr.Trackers(["tensorboard"], None, tmp_path)
    killed.start("r", CONFIG)
    _feed(killed, first, images=True)
    # no finish(): the first attempt was killed (TensorBoard's writer flushes every row)
    resumed = tr.Trackers(["tensorboard"], None, tmp_path)
    resumed.start("r", CONFIG)
    _feed(resumed, second, images=True)
    resumed.finish()
    killed._live.clear()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for tag, points in expected_scalars(table).items():
        got = sorted((e.step, e.value) for e in events.Scalars(tag))
        assert_points(got, points, tag, rel=1e-6)  # each step once
    assert sorted(e.step for e in events.Images("eval/grid_2")) == [2]
    assert sorted(e.step for e in events.Images("eval/grid_4")) == [4]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_a_resumed_run_continues_the_same_mlflow_run_without_repeating_steps(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path}/mlruns"
    first, second, table = _attempts()
    ids = []
    for rows in (first, second):
        trackers = tr.Trackers(["mlflow"], {"mlflow": {"tracking_uri": uri}}, tmp_path / "run")
        trackers.start("toy_nft", CONFIG, RUN_INFO, group="sweep1")
        ids.append(trackers._live["mlflow"].tracker.info.run_id)
        _feed(trackers, rows)
        trackers.finish()
    assert ids[0] == ids[1]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    for tag, points in expected_scalars(table).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(ids[0], tag))
        assert_points(got, points, tag)


@needs_wandb
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}.items():
        monkeypatch.setenv(key, value)
    first, second, table = _attempts()
    ids = []
    for rows in (first, second):
        trackers = tr.Trackers(["wandb"], {"wandb": {"project": "diffrl-test"}}, tmp_path)
        trackers.start("toy_nft", CONFIG, RUN_INFO)
        ids.append(trackers._live["wandb"].tracker.id)
        _feed(trackers, rows)
        trackers.finish()
    assert ids[0] == ids[1] == json.loads((tmp_path / tr.STATE_FILE).read_text())["ids"]["wandb"]
    histories = []
    for run_dir in sorted((tmp_path / "wandb").glob("offline-run-*")):
        histories += _wandb_records(run_dir)[0]
    # W&B merges the rows of one step into one history row; per metric, each step must come once
    for tag in ("reward/mean", "loss", "eval/reward"):
        got = sorted((h["_step"], h[tag]) for h in histories if tag in h)
        assert got == [(r["step"], r[tag]) for r in table if tag in r], tag


def test_rows_already_logged_are_skipped_by_position_within_the_step(tmp_path):
    """The skip rule without any tracker package: a fake live tracker records what it gets."""
    got = []

    class Fake:
        def log(self, values, step):
            got.append((step, dict(values)))

    first, second, table = _attempts()
    for rows in (first, second):
        trackers = tr.Trackers([], None, tmp_path)
        trackers._state = trackers._read_state()
        trackers._logged = tuple(trackers._state.get("logged", (-1, -1)))
        trackers._live = {"fake": Fake()}
        _feed(trackers, rows)
    assert got == [(r["step"], r) for r in table]
    assert json.loads((tmp_path / tr.STATE_FILE).read_text())["logged"] == [4, 1]
