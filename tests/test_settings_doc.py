"""The generated settings reference: current, complete, and its example valid."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from akvvm_ext import schema, settings_doc
from akvvm_ext.settings import parse

ROOT = Path(__file__).resolve().parent.parent


def test_committed_reference_is_current() -> None:
    """docs/settings.md equals what `python -m akvvm_ext.settings_doc` prints."""
    printed = subprocess.run([sys.executable, "-m", "akvvm_ext.settings_doc"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert printed == (ROOT / "docs" / "settings.md").read_text()


def test_every_schema_property_has_a_row_with_description() -> None:
    """Each property of each object in the schema appears with its full path and a description."""
    text = settings_doc.render()
    for title, node in settings_doc._objects("", schema.schema()):
        prefix = "" if title == "(top level)" else title + "."
        for key, child in node["properties"].items():
            assert f"| `{prefix}{key}` |" in text
            assert schema.resolve(child).get("description"), key


def test_documented_example_is_valid() -> None:
    """The example shown in the reference parses without problems."""
    settings = parse(schema.schema()["examples"][0])
    assert [c.link_name for c in settings.observed] == ["app1Cert1", "myvault.mycertificate2"]


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    """jsonschema accepts the schema file itself."""
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(schema.schema())
