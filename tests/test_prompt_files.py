"""Prompt sources: the toy splits, and the real file formats on the project's own small fixtures."""
import json
import re
from pathlib import Path

import pytest

from diffrl_bench.geneval import validate_metadata
from diffrl_bench.prompts import PromptFileError, load_prompts, quoted_target

DATA = Path(__file__).parent / "data" / "prompts"
GENEVAL = DATA / "geneval_metadata.jsonl"
OCR = DATA / "ocr_prompts.txt"
DRAWBENCH = DATA / "drawbench_prompts.txt"


def test_toy_sources_unchanged():
    train, heldout, everything = (load_prompts(f"toy:{s}") for s in ("train", "heldout", "all"))
    assert (len(train), len(heldout), len(everything)) == (85, 38, 123)
    assert {p.text for p in train} | {p.text for p in heldout} == {p.text for p in everything}
    with pytest.raises(ValueError, match="data.eval_prompts: unknown toy split 'test'"):
        load_prompts("toy:test", "data.eval_prompts")


def test_toy_metadata_is_valid_geneval_metadata():
    # The GenEval server and client validate with the same function, so toy prompts can be sent to it.
    for prompt in load_prompts("toy:all"):
        validate_metadata(prompt.metadata)


def test_geneval_jsonl_keeps_whole_records():
    prompts = load_prompts(f"geneval:{GENEVAL}")
    records = [json.loads(line) for line in GENEVAL.read_text().splitlines() if line.strip()]
    assert len(prompts) == len(records) == 7  # the blank line is skipped
    assert [p.text for p in prompts] == [r["prompt"] for r in records]
    assert [p.metadata for p in prompts] == records
    assert {p.metadata["tag"] for p in prompts} == {"single_object", "two_object", "counting", "colors", "position",
                                                     "color_attr"}
    # A bare .jsonl path means the same format.
    assert [p.metadata for p in load_prompts(str(GENEVAL))] == records


def test_ocr_file_targets():
    prompts = load_prompts(f"ocr:{OCR}")
    assert [p.metadata["ocr_target"] for p in prompts] == ["Fresh Bread Daily", "OPEN 24 HOURS", "Soup of the Day",
                                                           "Hello 2025"]
    assert prompts[0].text.startswith("A bakery window") and prompts[0].text.endswith("glass.")
    # Loaded as plain lines (bare .txt), the same targets are found.
    assert [p.metadata for p in load_prompts(str(OCR))] == [p.metadata for p in prompts]


def test_plain_lines_file():
    prompts = load_prompts(f"lines:{DRAWBENCH}")
    assert [p.text for p in prompts] == [
        "A storefront with 'Open Late' written on it.",
        "An armchair shaped like an avocado, floating above a calm lake.",
        'A poster that says "Quiet Please" hanging in a library.',
        "Three red cubes stacked on a blue sphere.",
    ]
    # Single quotes are not an OCR target (Flow-GRPO reads straight double quotes only).
    assert [p.metadata for p in prompts] == [{}, {}, {"ocr_target": "Quiet Please"}, {}]


def test_quoted_target():
    assert quoted_target('a sign "OPEN" and "CLOSED"') == "OPEN"
    assert quoted_target("no quotes") is None
    assert quoted_target('unclosed "quote') is None


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}'


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('["a photo of a dog"]', "must be a JSON object"),
    ('{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}', "'prompt' must be a non-empty string"),
    ('{"include": [{"class": "dog", "count": 1}], "prompt": "a dog"}', "missing 'tag'"),
    ('{"tag": "single_object", "prompt": "a dog"}', "'include' must be a non-empty list"),
    ('{"tag": "single_object", "include": [], "prompt": "a dog"}', "'include' must be a non-empty list"),
    ('{"tag": "counting", "include": [{"class": "dog", "count": 0}], "prompt": "no dogs"}', r"include\[0\].count"),
    ('{"tag": "counting", "include": [{"class": "dog", "count": "2"}], "prompt": "two dogs"}', r"include\[0\].count"),
    ('{"tag": "counting", "include": [{"class": "dog", "count": true}], "prompt": "a dog"}', r"include\[0\].count"),
    ('{"tag": "single_object", "include": [{"class": "", "count": 1}], "prompt": "a"}', r"include\[0\].class"),
    ('{"tag": "colors", "include": [{"class": "dog", "count": 1, "colour": "red"}], "prompt": "a red dog"}',
     r"unknown keys \['colour'\]"),
    ('{"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, '
     '"position": ["beside", 0]}], "prompt": "a dog beside a cat"}', r"include\[1\].position must be"),
    ('{"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 1]}, '
     '{"class": "cat", "count": 1}], "prompt": "a dog left of a cat"}', "needs an earlier include clause"),
    ('{"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3, '
     '"color": "red"}], "prompt": "two dogs"}', r"exclude\[0\] has unknown keys"),
    ('{"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": {"class": "dog"}, '
     '"prompt": "two dogs"}', "'exclude' must be a list"),
])
def test_geneval_malformed_line_names_file_and_line(tmp_path, line, problem):
    path = _write(tmp_path, "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(PromptFileError, match=problem) as info:
        load_prompts(f"geneval:{path}", "data.eval_prompts")
    assert str(info.value).startswith(f"data.eval_prompts: {path}:3: ")


def test_ocr_lines_need_a_quoted_target(tmp_path):
    path = _write(tmp_path, "ocr.txt", ['a sign reading "OPEN"', "a sign with no text", 'a "closed" door'])
    with pytest.raises(PromptFileError, match=rf"data.train_prompts: {re.escape(str(path))}:2: no text in double"):
        load_prompts(f"ocr:{path}")
    path = _write(tmp_path, "ocr_empty.txt", ['a sign reading " "'])
    with pytest.raises(PromptFileError, match=rf"{re.escape(str(path))}:1: the quoted text to render is empty"):
        load_prompts(f"ocr:{path}")


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PromptFileError, match=rf"data.train_prompts: prompt file '{re.escape(str(missing))}' not"):
        load_prompts(str(missing))
    with pytest.raises(PromptFileError, match="is a directory"):
        load_prompts(f"lines:{tmp_path}")
    blank = _write(tmp_path, "blank.txt", ["", "   ", ""])
    with pytest.raises(PromptFileError, match=rf"data.eval_prompts: {re.escape(str(blank))} holds no prompts"):
        load_prompts(str(blank), "data.eval_prompts")
    with pytest.raises(ValueError, match=r"unknown prompt source 'prompts.csv'.*geneval:PATH"):
        load_prompts("prompts.csv")
    with pytest.raises(ValueError, match="names no file"):
        load_prompts("ocr:")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 sign\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=rf"{re.escape(str(latin1))}:2: not UTF-8"):
        load_prompts(str(latin1))


# ------------------------------------------------------------------------- checks of a run's use, before the model
from diffrl_bench.config import ConfigError, load_config  # noqa: E402
from diffrl_bench.prompts import (check_model_vocabulary, check_prompts_per_step,  # noqa: E402
                                  validate_prompt_sources)
from diffrl_bench.toy import domain  # noqa: E402

TOY_WORDS = " ".join(sorted(domain.vocabulary()))


def test_prompt_errors_are_config_errors_so_the_cli_prints_one_line(tmp_path):
    # cli.main turns a ConfigError into one logged line and exit code 2, instead of a traceback.
    with pytest.raises(ConfigError, match="unknown prompt source 'prompts.csv'"):
        load_prompts("prompts.csv")
    with pytest.raises(PromptFileError, match="data.train_prompts: empty prompt source"):
        load_prompts("  ")
    with pytest.raises(PromptFileError, match="data.eval_prompts: unknown toy split 'test'"):
        load_prompts("toy:test", "data.eval_prompts")


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = _write(tmp_path, "p.txt", ["", "a red square", "   ", "\t", "two blue circles", ""])
    prompts = load_prompts(str(path))
    assert [(p.text, p.where) for p in prompts] == [("a red square", f"{path}:2"), ("two blue circles", f"{path}:5")]
    assert load_prompts("toy:heldout")[2].where == "toy:heldout #3"


def _toy_model_cfg(path="builtin:toy_base"):
    return load_config("toy_nft", [f"model.path={path}"]).model


def test_geneval_prompts_on_the_toy_model_name_the_word_and_line(tmp_path):
    path = _write(tmp_path, "g.jsonl", [
        '{"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"}',
        "",
        '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}',
    ])
    prompts = load_prompts(str(path), "data.eval_prompts")
    with pytest.raises(PromptFileError) as info:
        check_model_vocabulary(prompts, _toy_model_cfg(), "data.eval_prompts")
    assert str(info.value) == (
        f"data.eval_prompts: {path}:3: model.backend 'toy_unet' (model.path 'builtin:toy_base') cannot take prompt "
        f"'a photo of a dog': word 'dog' is not in the toy model's vocabulary (20 words: {TOY_WORDS})")


def test_a_toy_prompt_longer_than_the_model_takes_is_refused(tmp_path, tiny_model_dir):
    path = _write(tmp_path, "long.txt", ["a red square", " ".join(["red"] * 13)])
    with pytest.raises(PromptFileError, match=rf"{re.escape(str(path))}:2: .* 13 words; the toy model takes at most 12"):
        check_model_vocabulary(load_prompts(str(path)), _toy_model_cfg(tiny_model_dir), "data.train_prompts")
    # Prompts of the toy domain pass for any toy model built on its vocabulary.
    check_model_vocabulary(load_prompts("toy:all"), _toy_model_cfg(tiny_model_dir), "data.train_prompts")


def test_more_prompts_per_step_than_the_set_holds_is_refused(tmp_path):
    path = _write(tmp_path, "three.txt", ["a red square", "a blue circle", "a green triangle"])
    prompts = load_prompts(str(path))
    check_prompts_per_step(3, prompts, str(path))
    with pytest.raises(PromptFileError) as info:
        check_prompts_per_step(4, prompts, str(path))
    assert str(info.value) == (f"rollout.prompts_per_step = 4 is larger than the 3 prompts of data.train_prompts = "
                               f"'{path}'; a step draws distinct prompts, so lower rollout.prompts_per_step or use a "
                               f"larger prompt set")


def test_validate_prompt_sources_checks_everything_before_the_model(tmp_path, monkeypatch):
    from diffrl_bench import models

    # Building a model here would defeat the purpose: fail loudly if anything tries.
    monkeypatch.setattr(models, "build_policy", lambda *a, **k: pytest.fail("a model was built"))
    good = validate_prompt_sources(load_config("toy_nft"))
    assert [len(good[k]) for k in ("data.train_prompts", "data.eval_prompts")] == [85, 38]
    assert list(validate_prompt_sources(load_config("toy_nft"), train=False)) == ["data.eval_prompts"]

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(PromptFileError, match=rf"data.train_prompts: prompt file '{re.escape(str(missing))}' not found"):
        validate_prompt_sources(load_config("toy_nft", [f"data.train_prompts={missing}"]))
    with pytest.raises(PromptFileError, match="rollout.prompts_per_step = 86 is larger than the 85 prompts"):
        validate_prompt_sources(load_config("toy_nft", ["rollout.prompts_per_step=86"]))
    # eval does not draw training steps: its check ignores prompts_per_step.
    validate_prompt_sources(load_config("toy_nft", ["rollout.prompts_per_step=86"]), train=False)


def test_a_reward_needing_metadata_refuses_plain_prompt_files_at_start(tmp_path):
    from diffrl_bench.reward_harness import RewardConfigError

    path = _write(tmp_path, "plain.txt", ["a red square", "two blue circles"])
    cfg = load_config("toy_nft", [f"data.train_prompts=lines:{path}", "rollout.prompts_per_step=2"])
    with pytest.raises(RewardConfigError) as info:
        validate_prompt_sources(cfg)
    assert str(info.value) == (
        f"reward.components: reward 'toy_geneval' needs prompt metadata ['tag', 'include'], but data.train_prompts "
        f"prompt {path}:1 ('a red square') has no ['tag', 'include']; use prompts that carry it (e.g. GenEval "
        f"metadata: geneval:PATH / a .jsonl file, or toy:*) or another reward")
    cfg = load_config("toy_nft", [f"data.eval_prompts={path}"])
    with pytest.raises(RewardConfigError, match=rf"^eval.rewards: reward 'toy_geneval' .* {re.escape(str(path))}:1 "):
        validate_prompt_sources(cfg)


REAL = Path("/work/shared/datasets")


@pytest.mark.skipif(not REAL.is_dir(), reason="the shared real prompt files are not on this machine")
def test_real_prompt_files_load_in_their_formats():
    geneval, ocr, drawbench = (REAL / "geneval/test_metadata.jsonl", REAL / "ocr/test.txt", REAL / "drawbench/test.txt")
    lines = {path: [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
             for path in (geneval, ocr, drawbench)}
    records = [json.loads(line) for line in lines[geneval]]
    assert [p.metadata for p in load_prompts(f"geneval:{geneval}")] == records
    ocr_prompts = load_prompts(f"ocr:{ocr}")
    assert [p.metadata["ocr_target"] for p in ocr_prompts] == [line.split('"')[1] for line in lines[ocr]]
    assert [p.text for p in load_prompts(f"lines:{drawbench}")] == [line.strip() for line in lines[drawbench]]
    # GenEval's real prompts on the toy model: the first prompt with a word outside the toy vocabulary is named.
    vocabulary = set(domain.vocabulary())
    number, word = next((n, w) for n, r in enumerate(records, 1) for w in r["prompt"].split() if w not in vocabulary)
    with pytest.raises(PromptFileError, match=rf"{re.escape(str(geneval))}:{number}: .*word {word!r} is not"):
        validate_prompt_sources(load_config("toy_nft", [f"data.eval_prompts=geneval:{geneval}"]), train=False)
