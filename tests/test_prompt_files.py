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
