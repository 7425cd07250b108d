"""One headline rule (diffrl_bench/headline.py) for the Trainer's log line, its reward_vs_cost.png and the report."""
import logging

import matplotlib.figure
import pandas as pd
import pytest

from diffrl_bench.headline import frame_has, headline_column, metric_column
from diffrl_bench.report.runs import RunResult, resolve_metrics


def test_a_reward_without_strict_or_family_scores_is_headlined_by_its_mean():
    frame = pd.DataFrame({"eval/pickscore": [0.2, 0.3], "eval/ocr": [0.5, None]})
    assert headline_column(["pickscore", "ocr"], frame_has(frame)) == "eval/pickscore"
    assert metric_column("ocr", frame_has(frame)) == "eval/ocr"


def test_the_strict_geneval_score_wins_over_the_partial_forms():
    columns = {"eval/geneval", "eval/geneval.task_mean", "eval/geneval.strict.task_mean"}
    assert headline_column(["geneval"], columns.__contains__) == "eval/geneval.strict.task_mean"
    assert headline_column(["geneval"], {"eval/geneval", "eval/geneval.task_mean"}.__contains__) == \
        "eval/geneval.task_mean"
    # nothing logged yet: the preferred form, which the log line then shows as nan
    assert headline_column(["geneval"], set().__contains__) == "eval/geneval.strict.task_mean"


def test_the_report_and_the_trainer_pick_the_same_column():
    frame = pd.DataFrame({"step": [0], "eval/pickscore": [0.25], "eval/pickscore.task_mean": [None]})
    run = RunResult("arm", 0, None, frame, ["pickscore"], {})
    headline, _, _ = resolve_metrics([run])
    assert headline == headline_column(["pickscore"], frame_has(frame)) == "eval/pickscore"


@pytest.mark.slow
def test_a_pickscore_like_run_logs_its_mean_score_and_plots_it(tiny_run, tmp_path, monkeypatch, caplog):
    """Untagged eval prompts and a reward with neither a strict part nor families, as PickScore on its prompts."""
    from diffrl_bench.config import load_config
    from diffrl_bench.toy import domain
    from diffrl_bench.train import train

    prompts = tmp_path / "eval.txt"
    prompts.write_text("\n".join(p.text for p in domain.all_prompts()[:2]) + "\n")
    left_panels = []

    def record(fig, path, *args, **kwargs):
        if str(path).endswith("reward_vs_cost.png"):
            left_panels.append([line.get_ydata() for line in fig.axes[0].get_lines()])

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    cfg = load_config("toy_nft", tiny_run("train.steps=1", "eval.every=1", f"data.eval_prompts=lines:{prompts}",
                                          "eval.rewards=[test_brightness]"))
    with caplog.at_level(logging.INFO, logger="diffrl_bench"):
        out = train(cfg, progress=False)
    frame = pd.read_csv(out / "metrics.csv")
    assert "eval/test_brightness" in frame and "eval/test_brightness.task_mean" not in frame
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval at step")]
    assert logged and all("eval/test_brightness = " in m and not m.endswith("nan") for m in logged)
    assert left_panels and left_panels[-1], "the evaluation panel of reward_vs_cost.png is empty"
    assert list(left_panels[-1][0]) == list(frame["eval/test_brightness"].dropna())
