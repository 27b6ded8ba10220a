"""Render the config JSON Schema as a Markdown reference (kept in the README).

``python -m microbleed.schema_doc --update README.md`` rewrites the block
between the ``config-reference`` markers; a test checks it is current, so the
README documents every config key with its default.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

__all__ = ["render", "update_readme", "SCHEMA_PATH"]

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schemas" / "config.schema.yaml"
CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        merged = dict(target)
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return node


def _type(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    if "oneOf" in node or "anyOf" in node:
        return " \\| ".join(_type(alt) for alt in node.get("oneOf", node.get("anyOf")))
    t = node.get("type", "")
    return " \\| ".join(t) if isinstance(t, list) else str(t)


def _rows(node: dict[str, Any], root: dict[str, Any], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    node = _resolve(node, root)
    for key, child in node.get("properties", {}).items():
        child = _resolve(child, root)
        path = f"{prefix}.{key}" if prefix else key
        default = json.dumps(child["default"]) if "default" in child else ""
        yield path, _type(child), default, " ".join(str(child.get("description", "")).split())
        if "properties" in child or isinstance(child.get("additionalProperties"), dict):
            yield from _rows(child, root, path)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and prefix:
        yield from _rows(extra, root, f"{prefix}.<name>")


def _config_value(config: dict[str, Any], path: str) -> str:
    """JSON of ``path`` (dotted) in ``config``, or "" when absent (and for per-name entries)."""
    node: Any = config
    for part in path.split("."):
        if part == "<name>" or not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return "" if isinstance(node, dict) else json.dumps(node)


def render(schema_path: Path = SCHEMA_PATH, config_path: Path | None = CONFIG_PATH) -> str:
    """Markdown table of every config key: key, type, the schema's default (the paper's values,
    what a key left out of every config file gets), the value in ``config_path`` when it differs
    (``config/config.yaml`` is always read first, so a run gets that value unless a
    ``--configfile`` changes it), description."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    config = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    lines = ["| key | type | schema default | config.yaml | description |", "|---|---|---|---|---|"]
    for path, typ, default, desc in _rows(schema, schema, ""):
        here = _config_value(config, path)
        here = here if here and (not default or json.loads(here) != json.loads(default)) else ""
        lines.append(f"| `{path}` | {typ} | {f'`{default}`' if default else ''} | {f'`{here}`' if here else ''} "
                     f"| {desc} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, schema_path: Path = SCHEMA_PATH) -> bool:
    """Rewrite the reference block of ``readme``; return True if it changed."""
    text = Path(readme).read_text()
    block = f"{START}\n{render(schema_path)}{END}"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: markers {START} ... {END} not found")
    new = pattern.sub(lambda _: block, text)
    if new != text:
        from .io import atomic_path
        with atomic_path(readme) as tmp:
            tmp.write_text(new)
    return new != text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--update", type=Path, help="README to update in place")
    args = parser.parse_args()
    if args.update:
        update_readme(args.update)
    else:
        print(render(), end="")


if __name__ == "__main__":
    main()
