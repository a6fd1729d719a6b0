"""The settings JSON Schema: validation against it, its errors in words, and its unknown keys.

No I/O beyond reading `settings_schema.json` shipped beside this module. Messages never echo a
value: only JSON paths, expected types and the schema's own hints (`x-hint`, `x-problem`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any, cast

from jsonschema import Draft202012Validator, ValidationError

Path = tuple[str | int, ...]

ESCAPED_JSON_HINT = (
    "This is JSON inside a string, usually from PowerShell quoting (\\\" escapes). Pass the file "
    "content unchanged: -SettingString (Get-Content -Raw settings.json) in PowerShell, or "
    "--settings @settings.json with az"
)
_TYPE_WORDS = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


@cache
def schema() -> dict[str, Any]:
    """The parsed settings schema."""
    text = resources.files("akvvm_ext").joinpath("settings_schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def json_path(path: Sequence[str | int]) -> str:
    """`a.b[1].c` for ("a", "b", 1, "c"); `settings` for the root."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "settings"


def sentence(path: Sequence[str | int], problem: str, hint: str = "") -> str:
    """`<json path>: <problem>. <hint>.` as users read it."""
    text = f"{json_path(path)}: {problem}."
    if not hint:
        return text
    return f"{text} {hint}" if hint.endswith((".", "!", "?")) else f"{text} {hint}."


def json_type(value: object) -> str:
    """The JSON type name of a parsed JSON value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names = {str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), "unknown")


def described(value: object) -> str:
    """`a string`, `an array`, `a boolean`...: the JSON type of `value` in words."""
    kind = json_type(value)
    return "a boolean" if kind == "boolean" else _TYPE_WORDS.get(kind, kind)


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (`#/$defs/<name>`) to its definition."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: dict[str, Any] = schema()["$defs"][ref.rsplit("/", 1)[-1]]
    return resolve(target)


def problems(raw: object) -> list[tuple[Path, str]]:
    """Every schema violation in `raw`: its path and its sentence, one per path."""
    found: dict[Path, str] = {}
    for error in _validator().iter_errors(raw):
        path, problem, hint = _words(error)
        # one problem per place: `if`/`else` may restate a type error
        found.setdefault(path, sentence(path, problem, hint))
    return list(found.items())


def document_order(path: Path) -> tuple[tuple[int, str], ...]:
    """Sort key that lists paths as the schema orders keys, array items by index."""
    order = _key_order()
    return tuple((p, "") if isinstance(p, int) else (order.get(p, len(order)), p) for p in path)


@cache
def _key_order() -> dict[str, int]:
    names: list[str] = []
    pending = [schema()]
    while pending:
        node = resolve(pending.pop(0))
        for key in ("items", "then", "else"):
            if isinstance(node.get(key), dict):
                pending.append(node[key])
        for name, child in node.get("properties", {}).items():
            if name not in names:
                names.append(name)
                pending.append(child)
    return {name: index for index, name in enumerate(names)}


def _words(error: ValidationError) -> tuple[Path, str, str]:
    path: Path = tuple(error.absolute_path)
    node: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
    hint = str(node.get("x-hint", ""))
    keyword, expected = str(error.validator), cast(Any, error.validator_value)
    instance: Any = error.instance
    if keyword == "required":
        missing = next((k for k in expected if k not in instance), "?")
        prop = resolve(node.get("properties", {}).get(missing, {}))
        return (*path, missing), "is missing", str(prop.get("x-hint", ""))
    if keyword == "type":
        return path, f"must be {_type_words(expected)}, not {described(instance)}", (
            _type_hint(expected, instance, hint))
    if keyword == "pattern":
        return path, str(node.get("x-problem", "does not have the expected form")), hint
    if keyword == "enum":
        return path, "must be one of " + ", ".join(json.dumps(v) for v in expected), hint
    return path, _bound_words(keyword, expected), hint


def _bound_words(keyword: str, expected: object) -> str:
    words = {
        "minimum": f"must be at least {expected}",
        "maximum": f"must be at most {expected}",
        "minLength": "must not be empty" if expected == 1 else f"needs {expected} characters",
        "maxLength": f"must be at most {expected} characters long",
    }
    return words.get(keyword, f"is not valid ({keyword})")


def _type_words(expected: object) -> str:
    names = [expected] if isinstance(expected, str) else list(expected)  # type: ignore[call-overload]
    return " or ".join(_TYPE_WORDS.get(str(n), str(n)) for n in names)


def _type_hint(expected: object, instance: object, hint: str) -> str:
    wanted = {expected} if isinstance(expected, str) else set(expected)  # type: ignore[call-overload]
    if not isinstance(instance, str):
        return hint
    text = instance.strip()
    if wanted & {"object", "array"} and (text[:1] in ("{", "[") or '\\"' in text):
        return ESCAPED_JSON_HINT
    if "boolean" in wanted and text.lower() in ("true", "false"):
        return f"Write {text.lower()} without quotes"
    if "array" in wanted and "," in text:
        return "A comma-separated string is not accepted. " + hint
    return hint


def unknown_keys(raw: object) -> list[tuple[Path, tuple[str, ...]]]:
    """Paths of keys the schema does not know, anywhere in `raw`, each with the known keys there."""
    return list(_unknown(schema(), raw, ()))


def _unknown(
    node: dict[str, Any], value: object, path: Path
) -> Iterator[tuple[Path, tuple[str, ...]]]:
    node = resolve(node)
    if "if" in node:
        branch = "then" if json_type(value) == node["if"].get("type") else "else"
        node = resolve(node[branch])
    if isinstance(value, dict) and "properties" in node:
        known: dict[str, Any] = node["properties"]
        for key, item in value.items():
            if key in known:
                yield from _unknown(known[key], item, (*path, key))
            else:
                yield (*path, key), tuple(known)
    elif isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            yield from _unknown(node["items"], item, (*path, index))


def hint_for(definition: str, key: str) -> str:
    """The `x-hint` of property `key` of `$defs/<definition>`."""
    node = resolve(schema()["$defs"][definition])["properties"][key]
    return str(resolve(node).get("x-hint", ""))
