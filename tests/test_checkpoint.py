"""Checkpoint integrity: a manifest written last, damaged files named on load, fallback to the newest intact one."""
import hashlib
import json
import logging

import pytest
import torch

from diffrl_bench import checkpoint as ckpt
from diffrl_bench.checkpoint import (CheckpointError, load_checkpoint, load_model_weights, newest_intact_checkpoint,
                                     save_checkpoint)


def _parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, {"train": torch.Generator().manual_seed(seed + 1)}


def _save(directory, step, seed=0, keep_last=5, snapshots=None):
    model, optimizer, generators = _parts(seed)
    return save_checkpoint(directory, step, model=model, optimizer=optimizer, snapshots=snapshots or {},
                           generators=generators, trainer_state={"step": step}, keep_last=keep_last)


def _load(path):
    model, optimizer, generators = _parts(seed=99)
    return load_checkpoint(path, model=model, optimizer=optimizer, generators=generators), model


def test_the_manifest_is_written_last_and_lists_every_file(tmp_path, monkeypatch):
    seen = {}
    real = ckpt.write_manifest

    def spy(path):
        seen["files"] = sorted(f.name for f in path.iterdir())
        real(path)

    monkeypatch.setattr(ckpt, "write_manifest", spy)
    path = _save(tmp_path, 1, snapshots={"old/weight": torch.zeros(3, 4)})
    files = sorted(f.name for f in path.iterdir() if f.name != "manifest.json")
    assert seen["files"] == files  # every other file was complete when the manifest was written
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert manifest == {name: {"bytes": (path / name).stat().st_size,
                               "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()} for name in files}
    assert set(files) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                          "snapshots.safetensors"}


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    return len(data), int(len(data) * keep)


def test_a_truncated_tensor_file_is_named_and_skipped(tmp_path, caplog):
    older, newer = _save(tmp_path, 2, seed=0), _save(tmp_path, 4, seed=1)
    full, cut = _truncate(newer / "optimizer.safetensors")
    message = (f"checkpoint {newer} is damaged: optimizer.safetensors has {cut} bytes, manifest.json records {full}")
    with pytest.raises(CheckpointError) as info:
        _load(newer)
    assert str(info.value) == message
    with caplog.at_level(logging.WARNING, logger="diffrl_bench"):
        assert newest_intact_checkpoint(tmp_path) == older
    assert f"skipping a damaged checkpoint: {message}" in caplog.text
    (state, _), model = _load(older)
    assert state == {"step": 2} and torch.equal(model.weight, _parts(seed=0)[0].weight)


def test_a_broken_state_json_is_named(tmp_path):
    path = _save(tmp_path, 3)
    text = (path / "state.json").read_text()
    (path / "state.json").write_text(text[:-1] + "]")  # same size, different content
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert str(info.value) == (f"checkpoint {path} is damaged: state.json does not match its SHA-256 in "
                               f"manifest.json (same size, different content)")
    assert newest_intact_checkpoint(tmp_path) is None


def test_a_missing_rng_file_is_named(tmp_path):
    older, newer = _save(tmp_path, 1), _save(tmp_path, 2)
    (newer / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        _load(newer)
    assert str(info.value) == f"checkpoint {newer} is damaged: rng.safetensors is missing"
    assert newest_intact_checkpoint(tmp_path) == older


def test_a_broken_manifest_is_named(tmp_path):
    path = _save(tmp_path, 1)
    (path / "manifest.json").write_text('{"files": ')
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step_0000001 is damaged: manifest.json is unreadable"):
        _load(path)


def test_eval_loading_only_the_weights_names_a_damaged_weights_file(tmp_path):
    path = _save(tmp_path, 1)
    _truncate(path / "model.safetensors", keep=0.9)
    with pytest.raises(CheckpointError, match=r"step_0000001 is damaged: model.safetensors has \d+ bytes"):
        load_model_weights(path, torch.nn.Linear(4, 3))


def test_checkpoints_without_a_manifest_still_load_and_are_checked_structurally(tmp_path):
    """Written before manifests existed: loadable when intact; a truncated or broken file is still named."""
    path = _save(tmp_path, 1, seed=3)
    (path / "manifest.json").unlink()
    (state, _), model = _load(path)
    assert state == {"step": 1} and torch.equal(model.weight, _parts(seed=3)[0].weight)
    assert newest_intact_checkpoint(tmp_path) == path

    size = (path / "model.safetensors").stat().st_size
    _truncate(path / "model.safetensors", keep=0.9)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert str(info.value) == (f"checkpoint {path} is damaged: model.safetensors: {int(size * 0.9)} bytes, but its "
                               f"header describes {size} (truncated or overwritten)")
    assert newest_intact_checkpoint(tmp_path) is None

    legacy = _save(tmp_path, 2)
    (legacy / "manifest.json").unlink()
    (legacy / "state.json").write_text('{"step": 2, "trainer"')
    with pytest.raises(CheckpointError, match=r"step_0000002 is damaged: state.json: not valid JSON"):
        _load(legacy)


def test_saving_after_a_fallback_sets_the_damaged_later_checkpoint_aside(tmp_path):
    """Resumed from step 2 because step 4 was damaged: the next save must not count step 4 among the kept ones."""
    _save(tmp_path, 2)
    damaged = _save(tmp_path, 4)
    _truncate(damaged / "model.safetensors")
    assert newest_intact_checkpoint(tmp_path).name == "step_0000002"
    _save(tmp_path, 3, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale_step_0000004", "step_0000002", "step_0000003"]
    assert newest_intact_checkpoint(tmp_path).name == "step_0000003"
