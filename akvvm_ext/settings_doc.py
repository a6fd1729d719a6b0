"""The settings reference, generated from the JSON Schema: `python -m akvvm_ext.settings_doc`.

Prints Markdown (docs/settings.md) with one table per object. No I/O besides stdout.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

from akvvm_ext import schema, urls

INTRO = """\
# Settings reference

Generated from `akvvm_ext/settings_schema.json` by `python -m akvvm_ext.settings_doc`
(`make docs`); do not edit by hand.

{description}

Check a settings file without touching anything: `bin/akvvm check <file>` takes the bare
settings object (what `az vm extension set --settings @settings.json` takes) or a waagent
`config/N.settings` file. It prints the effective plan as JSON and exits 0, or prints one
line per problem, `<json path>: <problem>. <hint>`, and exits 2.
"""

RULES = """\
## Rules beyond the tables

- Every problem is reported at once, each with its JSON path and a hint; values are never
  echoed (only URLs, paths and link names), so protected settings stay out of messages.
- Public and protected settings are merged, protected winning, objects merged key by key.
- Settings that arrive as a JSON string (PowerShell quoting, `\\"` escapes) are an error whose
  hint gives the fix: `-SettingString (Get-Content -Raw settings.json)` in PowerShell or
  `--settings @settings.json` with az.
- `check` reads files in UTF-8 (with or without BOM) or UTF-16 with BOM, and accepts a trailing
  comma before `]` or `}}` with a note (ARM templates tolerate it, as in the public docs' example;
  `az --settings` does not).
- Unknown keys are ignored with a note (scale-set deployments often put
  `autoUpgradeMinorVersion` and `enableAutomaticUpgrade` inside `secretsManagementSettings`).
- `observedCertificates[].url` is `https://<host>[:port]/secrets/<name>[/<version>]`: names are
  1-127 letters, digits and dashes, versions 32 hex digits. `/certificates/` URLs are refused
  with the `/secrets/` form as hint; `http`, a missing host, user info, query strings, fragments
  and other paths are refused.
- The host must be `<vault>.` followed by one of {suffixes};
  or end in (on a DNS label boundary) or equal one of `additionalVaultDnsSuffixes`, e.g.
  `["localhost"]` for a local stand-in: only for those hosts the SDK's challenge-resource check
  is relaxed.
- The vault name is the first DNS label of the host as written (case kept). Files are
  `<store>/<vault>.<name>.<version>`; the link is `<store>/<vault>.<name>` or
  `<store>/<customSymbolicLinkName>`. Two certificates may not share a link, nor version-file
  names, in one store directory; a link may not look like a version file.
- `aclEnabled: false` keeps `acls` validated but not applied (noted). Users and groups are
  looked up when applying, not when parsing: an unknown one is an error for that certificate.
- `msiClientId` is the client id (a GUID) of a user-assigned identity; a resource id gets a
  hint. Given without `msiEndpoint`, the default IMDS endpoint is used with it (noted).
- `pollingIntervalInS` as a JSON number is accepted with a note; below 300 s a note warns about
  Key Vault throttling.
"""


def render() -> str:
    """The whole Markdown document."""
    root = schema.schema()
    parts = [INTRO.format(description=root["description"])]
    example = json.dumps(root["examples"][0], indent=2)
    parts.append(f"## Example\n\n```json\n{example}\n```\n")
    parts.extend(_table(title, node) for title, node in _objects("", root))
    suffixes = ", ".join(f"`{s}`" for s in urls.KEY_VAULT_SUFFIXES)
    parts.append(RULES.format(suffixes=suffixes))
    return "\n".join(parts)


def _objects(path: str, node: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object schema reachable from `node`, depth first, with its JSON path."""
    node = schema.resolve(node)
    if "else" in node:
        node = schema.resolve(node["else"])
    if "properties" in node:
        yield path or "(top level)", node
        for key, child in node["properties"].items():
            yield from _objects(f"{path}.{key}" if path else key, child)
    elif "items" in node:
        yield from _objects(f"{path}[]", node["items"])


def _table(title: str, node: dict[str, Any]) -> str:
    lines = [f"## `{title}`" if title != "(top level)" else "## Top level", ""]
    if title != "(top level)" and node.get("description"):
        lines += [_html(node["description"]), ""]
    lines += ["| path | type | default | description | example |",
              "| --- | --- | --- | --- | --- |"]
    required = set(node.get("required", ()))
    prefix = "" if title == "(top level)" else title + "."
    for key, child in node["properties"].items():
        prop = schema.resolve(child)
        text = ("**Required.** " if key in required else "") + _html(prop.get("description", ""))
        cells = [f"`{prefix}{key}`", _type(prop), _json(prop, "default"), text,
                 _json(prop, "examples")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " or ".join(json.dumps(v) for v in prop["enum"])
    if "type" not in prop:
        return "any (ignored)"
    kinds = [prop["type"]] if isinstance(prop["type"], str) else prop["type"]
    text = " or ".join(kinds)
    if "items" in prop:
        items = schema.resolve(prop["items"])
        inner = items.get("type", "object")
        text += " of " + (" or ".join(inner) if isinstance(inner, list) else inner)
    return text


def _json(prop: dict[str, Any], key: str) -> str:
    if key not in prop:
        return ""
    value = prop[key][0] if key == "examples" else prop[key]
    return f"`{json.dumps(value)}`"


def main() -> int:
    """Print the reference to stdout."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
