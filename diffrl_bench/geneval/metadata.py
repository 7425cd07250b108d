"""GenEval metadata records: the format check shared by the server (each request) and the prompt-file loader.

A record is `{"prompt", "tag", "include": [clause, ...], "exclude"?: [clause, ...]}`; an include clause is
`{class, count, color?, position?: [relation, j]}`, an exclude clause `{class, count}`. Standard library only (see
the package docstring).
"""
from __future__ import annotations

from typing import Any, Dict, List

RELATIONS = ("left of", "right of", "above", "below")
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


class MetadataError(ValueError):
    """A GenEval metadata record breaks the format; the message names the offending field."""


def _check_clause(clause: Any, where: str, allowed: set, n_before: int) -> None:
    if not isinstance(clause, dict):
        raise MetadataError(f"{where} must be an object like {{\"class\": \"dog\", \"count\": 1}}, got {clause!r}")
    unknown = set(clause) - allowed
    if unknown:
        raise MetadataError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    name = clause.get("class")
    if not isinstance(name, str) or not name.strip():
        raise MetadataError(f"{where}.class must be a non-empty string, got {name!r}")
    count = clause.get("count")
    # bool is an int subclass; `"count": true` is a typo, not a count of 1.
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise MetadataError(f"{where}.count must be an integer >= 1, got {count!r}")
    if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"].strip()):
        raise MetadataError(f"{where}.color must be a non-empty string, got {clause['color']!r}")
    if "position" in clause:
        position = clause["position"]
        if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                or isinstance(position[1], bool) or not isinstance(position[1], int)):
            raise MetadataError(f"{where}.position must be [relation, index] with relation in {list(RELATIONS)}, "
                                f"got {position!r}")
        # The rules resolve the reference while walking the clauses in order, so it must come earlier.
        if not 0 <= position[1] < n_before:
            raise MetadataError(f"{where}.position index {position[1]} must name an earlier include clause "
                                f"(0..{n_before - 1})" if n_before else
                                f"{where}.position needs an earlier include clause to refer to; there is none")


def validate_metadata(record: Any, require_prompt: bool = True) -> Dict[str, Any]:
    """Check one GenEval metadata record (`tag`, `include`, optional `exclude`, `prompt`); returns it unchanged."""
    if not isinstance(record, dict):
        raise MetadataError(f"a metadata record must be a JSON object, got {type(record).__name__}")
    if require_prompt:
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise MetadataError(f"'prompt' must be a non-empty string, got {prompt!r}")
    if "tag" in record and (not isinstance(record["tag"], str) or not record["tag"]):
        raise MetadataError(f"'tag' must be a non-empty string, got {record['tag']!r}")
    if require_prompt and "tag" not in record:
        raise MetadataError("missing 'tag' (the task family, e.g. \"counting\")")
    include = record.get("include")
    if not isinstance(include, list) or not include:
        raise MetadataError(f"'include' must be a non-empty list of clauses, got {include!r}")
    for i, clause in enumerate(include):
        _check_clause(clause, f"include[{i}]", _INCLUDE_KEYS, i)
    exclude = record.get("exclude", [])
    if not isinstance(exclude, list):
        raise MetadataError(f"'exclude' must be a list of clauses, got {exclude!r}")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"exclude[{i}]", _EXCLUDE_KEYS, 0)
    return record


def check_image_records(metadata: Any, prompts: List[str]) -> None:
    """One GenEval record per image, each valid: the check both geneval reward backends run before scoring."""
    if metadata is None or len(metadata) != len(prompts):
        raise ValueError(f"geneval: needs one GenEval metadata record per image, got "
                         f"{0 if metadata is None else len(metadata)} for {len(prompts)} images")
    for i, record in enumerate(metadata):
        try:
            validate_metadata(record, require_prompt=False)
        except MetadataError as error:
            raise ValueError(f"geneval: metadata of image {i} (prompt {prompts[i][:80]!r}) is not a GenEval "
                             f"record: {error}") from None
