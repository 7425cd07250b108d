"""Checkpoint and resume under DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes over gloo (diffrl_bench/ds_checkpoint.py):
a run killed after a checkpoint and resumed logs the same curve, and ends with the same weights, as one that ran
through; DeepSpeed's pickled files are refused when their SHA-256 does not match the run's manifest or the
manifest does not list them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffrl_bench.checkpoint import ENGINE_DIR, MANIFEST, CheckpointError, checkpoint_dir, verify_checkpoint
from test_distributed import _free_port, _launcher_args  # tests/test_distributed.py

WORKER = Path(__file__).with_name("resume_worker.py")
CURVE = ("reward/", "loss/", "train/grad_norm", "train/optimizer_steps", "train/zero_variance_frac")
STEPS = 4


def _run(tmp_path, launcher_args, overrides, expect_ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), str(tmp_path), "toy_nft", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _curve(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith(CURVE)} for row in rows if "reward/mean" in row}


def _killed_copy(whole: Path, resumed: Path) -> None:
    """The folder of a run killed after logging its last step but before its final checkpoint: the newest
    checkpoint left is step 2's, and the metrics of steps 3 and 4 are there (the resumed run redoes them)."""
    shutil.copytree(whole, resumed)
    shutil.rmtree(checkpoint_dir(resumed / "checkpoints", STEPS))


def _engine_file(checkpoint: Path) -> Path:
    return sorted((checkpoint / ENGINE_DIR).rglob("*.pt"))[0]


def _resume_gives_the_uninterrupted_run(tmp_path, args, overrides) -> Path:
    """Run through; copy as killed after its last step's metrics; resume; compare. Returns the resumed folder."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(tmp_path, args, overrides(whole))
    _killed_copy(whole, resumed)
    _run(tmp_path, args, overrides(resumed))
    expected = _curve(whole)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _curve(resumed) == expected
    # The step-2 checkpoint holds DeepSpeed's partitions (one optimizer file per process) next to the harness's
    # files; the resumed run's final weights and snapshots equal the uninterrupted run's, bit for bit.
    step2 = checkpoint_dir(resumed / "checkpoints", 2)
    assert len(list((step2 / ENGINE_DIR).rglob("*optim_states.pt"))) == 2
    for name in ("model.safetensors", "snapshots.safetensors"):
        final = [load_file(str(checkpoint_dir(out / "checkpoints", STEPS) / name)) for out in (whole, resumed)]
        assert final[0] and final[0].keys() == final[1].keys()
        assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    initial = load_file(str(step2 / "model.safetensors"))
    trained = load_file(str(checkpoint_dir(whole / "checkpoints", STEPS) / "model.safetensors"))
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)  # the weights trained after step 2
    return resumed


COMMON = ["eval.every=-1", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep_last=3",
          "rollout.prompts_per_step=3", "rollout.chunk_size=3", "train.micro_batch_size=3", "optim.lr=1e-2"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["zero2", "zero3_partitioned"])
def test_toy_full_finetuning_resumes_with_the_uninterrupted_curve(tiny_run, tmp_path, launcher):
    """Checkpoints at steps 2 and 4. Step 4's rewards depend on step 3's Adam update, which uses the moments
    restored from DeepSpeed's optimizer partitions: a resume that lost them would change step 4's rewards."""
    args = _launcher_args(launcher, tmp_path)

    def overrides(out):
        return tiny_run(*COMMON, out=out)

    resumed = _resume_gives_the_uninterrupted_run(tmp_path, args, overrides)
    step2 = checkpoint_dir(resumed / "checkpoints", 2)
    if launcher != "zero2":
        return
    # A changed byte in one of DeepSpeed's files: the resumed run never unpickles it. It names the file, sets the
    # damaged checkpoint aside and falls back to the newest intact one (none here, so it starts again from step 0).
    target = _engine_file(step2)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    shutil.rmtree(checkpoint_dir(resumed / "checkpoints", STEPS))
    done = _run(tmp_path, args, overrides(resumed), expect_ok=False)
    assert "skipping a damaged checkpoint" in done.stderr and target.name in done.stderr and "SHA-256" in done.stderr
    assert "resumed from" not in done.stderr.lower() or "step_0000002" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher, finetune", [("zero3_partitioned", "lora"), ("zero2", "lora"),
                                                ("zero2", "full"), ("zero3_partitioned", "full")])
def test_tiny_sd3_resumes_with_the_uninterrupted_curve(tiny_sd3, tmp_path, launcher, finetune):
    """LoRA: DeepSpeed saves only theta's adapter; the frozen `old` adapter (inside the module DeepSpeed wraps, and
    under ZeRO-3 sharded with it) comes back from snapshots.safetensors, gathered on save and written back on
    resume. Full fine-tuning: DeepSpeed saves the whole transformer and its optimizer partitions; the snapshots
    are whole copies kept outside the engine."""
    args = _launcher_args(launcher, tmp_path)

    def overrides(out):
        return ["model.backend=sd3", f"model.path={tiny_sd3}", f"model.options.finetune={finetune}",
                f"output_dir={out}", "train.threads=1", "rollout.images_per_prompt=4", "rollout.sampler.num_steps=2",
                "rollout.sampler.shift=3.0", "algo.num_train_times=2", "reward.components.test_brightness=1.0",
                *COMMON]

    _resume_gives_the_uninterrupted_run(tmp_path, args, overrides)


def _manifested(tmp_path) -> Path:
    """A checkpoint-shaped folder with a fake DeepSpeed file, saved through the real writer (no DeepSpeed run)."""
    from diffrl_bench.checkpoint import save_checkpoint

    staging = tmp_path / "staging"
    (staging / "state").mkdir(parents=True)
    (staging / "state" / "mp_rank_00_model_states.pt").write_bytes(b"pretend pickle" * 10)
    model = torch.nn.Linear(2, 2)
    return save_checkpoint(tmp_path / "checkpoints", 1, model=model, optimizer=None, snapshots={},
                           generators={"noise": torch.Generator()}, trainer_state={"step": 1},
                           engine_state=staging)


def test_engine_files_are_listed_in_the_manifest_and_verify(tmp_path):
    path = _manifested(tmp_path)
    listed = json.loads((path / MANIFEST).read_text())["files"]
    assert f"{ENGINE_DIR}/state/mp_rank_00_model_states.pt" in listed
    assert not (tmp_path / "staging").exists()  # moved in, not copied
    verify_checkpoint(path)


def test_a_tampered_engine_file_is_refused_naming_it(tmp_path):
    path = _manifested(tmp_path)
    target = path / ENGINE_DIR / "state" / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes().replace(b"pretend", b"Pretend"))  # same size, different bytes
    with pytest.raises(CheckpointError, match=f"{ENGINE_DIR}/state/mp_rank_00_model_states.pt does not match its SHA-256"):
        verify_checkpoint(path)


def test_an_engine_file_missing_from_the_manifest_is_refused_naming_it(tmp_path):
    path = _manifested(tmp_path)
    (path / ENGINE_DIR / "state" / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    # Also when only another file is asked for: DeepSpeed files are never left unchecked.
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_9_mp_rank_00_optim_states.pt is not in its manifest"):
        verify_checkpoint(path, ["model.safetensors"])


def test_a_link_among_engine_files_is_refused(tmp_path):
    path = _manifested(tmp_path)
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"pretend pickle" * 10)  # same bytes: only the link gives it away
    target = path / ENGINE_DIR / "state" / "mp_rank_00_model_states.pt"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is a link"):
        verify_checkpoint(path)


def test_engine_files_without_a_manifest_are_refused(tmp_path):
    path = _manifested(tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"has DeepSpeed files .* but no {MANIFEST}"):
        verify_checkpoint(path)


def test_engine_state_is_loaded_only_from_the_runs_own_checkpoints(tmp_path):
    from diffrl_bench.ds_checkpoint import load_engine_state

    path = _manifested(tmp_path)
    with pytest.raises(CheckpointError, match="not in this run's checkpoint folder"):
        load_engine_state(object(), path, tmp_path / "other_run" / "checkpoints")


def test_a_deepspeed_checkpoint_is_not_resumed_without_deepspeed(tmp_path):
    from diffrl_bench.checkpoint import load_checkpoint

    path = _manifested(tmp_path)
    with pytest.raises(ValueError, match="written under DeepSpeed and this run is launched without it"):
        load_checkpoint(path, model=torch.nn.Linear(2, 2), optimizer=None, generators={"noise": torch.Generator()})
