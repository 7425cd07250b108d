"""The run's records: the summary line `train` ends with, from a metrics table of known content."""
import json

from diffrl_bench.runlog import run_summary


def _write(directory, rows):
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_reads_the_first_and_last_evaluation_of_the_headline(tmp_path):
    _write(tmp_path, [
        {"step": 0, "eval/ocr": 0.25, "cost/device_s": 5.0},
        {"step": 1, "reward/mean": 0.3, "cost/device_s": 10.0},
        {"step": 2, "eval/ocr": 0.5, "eval/ocr.strict.task_mean": None, "cost/device_s": 3725.0},
    ])
    (tmp_path / "grid_end.png").write_bytes(b"")
    (tmp_path / "grid_start.png").write_bytes(b"")
    line = run_summary(tmp_path, ["ocr"], 65.0)
    # ocr has no strict part: its own column is the headline
    assert line == (f"done: held-out ocr: 0.2500 at step 0 -> 0.5000 at step 2; took 1m05s (1h02m05s device time "
                    f"over all attempts); figures in {tmp_path}: grid_end.png, grid_start.png")


def test_summary_without_evaluations_says_so(tmp_path):
    _write(tmp_path, [{"step": 1, "reward/mean": 0.3, "cost/device_s": 4.2}])
    assert run_summary(tmp_path, ["toy_geneval"], 4.0) == (
        f"done: no held-out evaluation (eval.every < 0); took 4s; results in {tmp_path}")


def test_run_info_records_what_shapes_a_cpu_runs_speed(monkeypatch):
    # Two runs' timings compare only under the same wait policy and allocator, so both are kept with the run.
    from diffrl_bench.runlog import run_info

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc_minimal.so.4")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = run_info("cpu (2 threads)", 1)["cpu_env"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4"
    assert env["GOMP_SPINCOUNT"] is None


def test_the_cpu_model_is_read_from_cpuinfo():
    from diffrl_bench.runlog import cpu_model

    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC 9B14\nstepping\t: 1\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert cpu_model(text) == "AMD EPYC 9B14"  # not `model`'s 17
    assert cpu_model("processor\t: 0\nmodel name\t:\n") is None
