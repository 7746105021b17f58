"""The reference pages stay true to the code: every run spec field, DHT record name, RPC method
and node flag is documented where docs/ and the README say it is."""
from __future__ import annotations

import dataclasses
import re

from node.cli import build_parser
from protocol.records import RECORD_NAMES
from protocol.runspec import SECTIONS
from tests.harness import REPO


def text(name: str) -> str:
    return (REPO / name).read_text()


def test_every_run_spec_field_has_a_row_with_its_default():
    page = text("docs/runspec.md")
    for section, cls in SECTIONS.items():
        part = page.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            row = next((line for line in part.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"docs/runspec.md has no row for {section}.{f.name}"
            default_column = row.split(" | ")[2]
            shown = re.findall(r"`([^`]*)`", default_column)
            if isinstance(f.default, str) and f.default:
                assert f'"{f.default}"' in shown, f"{section}.{f.name}: default {f.default!r} not in {row}"
            elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                numbers = [float(v) for v in shown if re.fullmatch(r"-?[0-9.e+-]+", v)]
                assert float(f.default) in numbers, f"{section}.{f.name}: default {f.default} not in {row}"


def test_every_record_name_and_rpc_method_is_in_the_protocol_page():
    page = text("docs/protocol.md")
    source = "\n".join(p.read_text() for folder in ("trainer", "node") for p in (REPO / folder).rglob("*.py"))
    records = set(RECORD_NAMES) | set(re.findall(r'_RECORD = "([a-z.]+)"', source))
    methods = set(re.findall(r'\("((?:pp|zo)\.[a-z]+)", self\._on_\w+\)', source))
    methods |= set(re.findall(r'serve\("([a-z.]+)"', source)) | {"ping", "echo"}
    assert {"pp.forward", "pp.state", "zo.commit", "pp.probe"} <= methods and "pp.claim" in records
    for name in records:
        assert f"swarmtrain/<run>/{name}`" in page, f"record {name} is not in docs/protocol.md"
    for method in methods:
        assert f"| `{method}` |" in page, f"RPC method {method} is not in docs/protocol.md"


def test_every_node_flag_is_documented():
    parser = build_parser()
    node = parser._subparsers._group_actions[0].choices["node"]
    flags = {option for action in node._actions for option in action.option_strings
             if option.startswith("--") and action.help != "==SUPPRESS=="} - {"--help"}
    docs = text("docs/operations.md") + text("README.md") + text("docs/recovery.md") + text("docs/zo.md") + \
        text("docs/pipeline.md")
    missing = sorted(flag for flag in flags if f"`{flag}" not in docs)
    assert not missing, f"flags of `swarmtrain node` documented nowhere: {missing}"
