"""Where every SD3.5 preset setting comes from: the table `configs/provenance/sd35m.yaml`, each setting's value as the
preset resolves it, and docs/presets.md rendered from the table (`python -m diffrl_bench.provenance`).

An entry of the table is the original's `value` with its `source` (`repo@commit:path:line`) or the reason it is
`harmonised` for the head-to-head. Where our preset differs, the entry adds `ours` (our value; `<no key>` when our
schema has no such setting yet) and a `status`: `kept` (on purpose), `not_reproduced` (needs code; `why` says what)
or `pending` (another change in flight sets it). tests/test_presets.py checks every entry against the loaded preset,
so the table and the presets cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml
from omegaconf import OmegaConf

from diffrl_bench.config import CONFIG_DIR, algo_config, load_config, resolve_sampler_options

TABLE = Path(CONFIG_DIR) / "provenance" / "sd35m.yaml"
DOC = Path(__file__).resolve().parents[1] / "docs" / "presets.md"
NO_KEY = "<no key>"
STATUSES = ("kept", "not_reproduced", "pending")


class _Missing:
    def __repr__(self) -> str:
        return NO_KEY


MISSING = _Missing()


def load_table(path: Path = TABLE) -> Dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def expected_value(entry: Dict[str, Any]) -> Any:
    """What our preset must resolve to: `ours` where it differs from the original, else the original's value."""
    return entry["ours"] if "ours" in entry else entry["value"]


def _walk(node: Any, parts: List[str]) -> Any:
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _defaults_of(callable_) -> Dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(callable_).parameters.items() if p.default is not p.empty}


def resolved_value(cfg, key: str) -> Any:
    """The value the run uses for dotted `key`: the preset's, else the default of the schema that owns the key
    (algorithm Config, backend options, reward constructor, sampler signature); MISSING if no schema has it."""
    container = OmegaConf.to_container(cfg, resolve=True)
    value = _walk(container, key.split("."))
    if value is not MISSING:
        return value
    parts = key.split(".")
    if parts[0] == "algo" and len(parts) == 2:
        return dataclasses.asdict(algo_config(cfg)).get(parts[1], MISSING)
    if parts[:2] == ["model", "options"] and len(parts) == 3:
        from diffrl_bench.backends.options import BackendOptions

        known = {f.name: f for f in dataclasses.fields(BackendOptions)}
        if parts[2] in known:
            return dataclasses.asdict(BackendOptions())[parts[2]]
        return MISSING
    if parts[:2] == ["reward", "options"] and len(parts) == 4:
        from diffrl_bench.registry import REWARDS

        return _defaults_of(REWARDS.get(parts[2])).get(parts[3], MISSING)
    if parts[0] in ("rollout", "eval") and parts[1:3] == ["sampler", "options"] and len(parts) == 4:
        section = cfg.rollout if parts[0] == "rollout" else cfg.eval
        return resolve_sampler_options(section.sampler).get(parts[3], MISSING)
    return MISSING


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def preset_keys(name: str) -> List[str]:
    """The dotted leaf keys the preset file itself sets (not its defaults), `name` excluded."""
    raw = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml"), resolve=False)
    out: List[str] = []

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                visit(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out.append(prefix)

    visit({k: v for k, v in raw.items() if k != "name"}, "")
    return out


def check_preset(name: str, entries: Dict[str, Dict[str, Any]]) -> List[str]:
    """Every disagreement between the table's entries for preset `name` and the loaded preset, as sentences."""
    problems = []
    path = Path(CONFIG_DIR) / f"{name}.yaml"
    if not path.exists():
        return [f"{TABLE.name}: preset {name!r} has entries but {path} does not exist"]
    cfg = load_config(name)
    for key, entry in entries.items():
        if ("source" in entry) == ("harmonised" in entry):
            problems.append(f"{name}: {key}: needs exactly one of `source` or `harmonised`")
        if ("ours" in entry) != ("status" in entry) or entry.get("status", "kept") not in STATUSES:
            problems.append(f"{name}: {key}: `ours` goes with a `status` in {STATUSES}")
        if entry.get("status") in ("not_reproduced", "pending") and not entry.get("why"):
            problems.append(f"{name}: {key}: status {entry['status']} needs a `why`")
        expected, actual = expected_value(entry), resolved_value(cfg, key)
        if expected == NO_KEY:
            if actual is not MISSING:
                problems.append(f"{name}: {key}: the table says our schema has no such key, but the preset "
                                f"resolves it to {actual!r}: update the entry")
        elif not same(actual, expected):
            problems.append(f"{name}: {key}: the table expects {expected!r}, the preset resolves {actual!r}")
    for key in preset_keys(name):
        if not any(key == k or key.startswith(k + ".") for k in entries):
            problems.append(f"{name}: the preset sets {key!r}, which has no entry in {TABLE.name}")
    return problems


# ------------------------------------------------------------------------------------------- docs/presets.md
def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    else:
        text = str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _origin(entry: Dict[str, Any]) -> str:
    if "source" in entry:
        return f"`{entry['source']}`"
    return f"harmonised for the head-to-head, because {entry['harmonised']}"


def render(table: Dict[str, Any]) -> str:
    out = [table["title"], "", table["intro"].strip(), "",
           "Generated from `diffrl_bench/configs/provenance/sd35m.yaml` by `python -m diffrl_bench.provenance`; "
           "tests/test_presets.py checks every entry against the loaded preset. Do not edit by hand.", "",
           "## Sources", ""]
    out += [f"- {name}: `{where}`" for name, where in table["sources"].items()]
    out += ["", "## Differences kept on purpose (method level)", ""]
    out += [f"- **{d['what']}**: {d['why']}" for d in table["kept_on_purpose"]]
    out += ["", "## Not yet reproduced (needs code)", ""]
    out += [f"- **{d['what']}** ({', '.join(d['presets'])}): {d['takes']}" for d in table["not_yet_reproduced"]]
    if not table["not_yet_reproduced"]:
        out += ["None: every difference found is either reproduced or listed above as kept on purpose."]
    out += ["", "## Evaluation CFG in the head-to-head sweeps", "", table["eval_cfg"].strip(), ""]
    for name, preset in table["presets"].items():
        out += [f"## {name}", ""]
        if preset.get("about"):
            out += [preset["about"].strip(), ""]
        out += ["| setting | original | ours | origin | notes |", "|---|---|---|---|---|"]
        for key, entry in preset["settings"].items():
            ours = _cell(entry["ours"]) + f" ({entry['status'].replace('_', ' ')})" if "ours" in entry else "same"
            notes = " ".join(x for x in (entry.get("why", ""), entry.get("note", "")) if x)
            out.append(f"| `{key}` | {_cell(entry['value'])} | {ours} | {_origin(entry)} | "
                       f"{notes.replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(load_table())
    if argv == ["--check"]:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python -m diffrl_bench.provenance", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
