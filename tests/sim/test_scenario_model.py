"""The scenario model (``pagehint.sim.scenario_model``): the shipped scenarios are valid
documents, the model's defaults are ``Scenario``'s, every ``Scenario`` is checked when it is
made, sizes are whole bytes, and ``pagehint simulate --schema`` prints the model's JSON
schema, which names every key the shipped files use. The command line's refusals are in
tests/cli/test_cli_simulate.py."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from typing import Any

import pytest

from pagehint.cli import main
from pagehint.sim import (
    Scenario,
    ScenarioError,
    WorkloadSpec,
    load_scenario,
    parse_size,
    scenario_from_dict,
    shipped_scenarios,
)
from pagehint.sim.kvm_model import KvmRunParams, kvm_scenario
from pagehint.sim.scenario_model import (
    ScenarioDocument,
    scenario_json_schema,
    validate_document,
)


@pytest.mark.parametrize("name", sorted(shipped_scenarios()))
def test_every_shipped_scenario_is_a_valid_document(name: str) -> None:
    path = shipped_scenarios()[name]
    doc = tomllib.loads(path.read_text())
    model = validate_document(doc, source=str(path))
    assert isinstance(model, ScenarioDocument)
    assert model.name == name == load_scenario(name).name


def test_the_models_defaults_are_the_scenarios() -> None:
    assert scenario_from_dict({}) == Scenario()
    assert scenario_from_dict({"guest": {}, "link": {}, "migration": {}}) == Scenario()


def test_every_scenario_is_checked_when_it_is_made() -> None:
    with pytest.raises(ScenarioError, match=r"^scenario custom: \[guest\] memory: 4097 bytes"):
        Scenario(memory=4097)
    s = Scenario(name="x", memory=1 << 30)
    with pytest.raises(ScenarioError, match=r"^scenario x: \[guest\] seed: must be at least 0"):
        replace(s, seed=-1)
    with pytest.raises(ScenarioError, match=r"\[workload\] pages_per_s: must be a finite"):
        replace(s, workload=WorkloadSpec("idle", {"pages_per_s": float("nan")}))
    with pytest.raises(ScenarioError, match=r"\[\[history\]\] #1 rate: must be more than 0"):
        replace(s, history=(WorkloadSpec("memory-hog", {"size": "1G", "rate": 0}),))
    with pytest.raises(ScenarioError, match=r"\[guest\] init_on_alloc: must be true or false"):
        replace(s, init_on_alloc="false")  # type: ignore[arg-type]


def test_the_kvm_models_scenarios_are_valid() -> None:
    """kvm_model builds Scenarios in code: they pass the same checks."""
    assert kvm_scenario(KvmRunParams()).memory == 256 << 20
    assert kvm_scenario(KvmRunParams(memory=64 << 20, write_blocks=100, free_blocks=1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5G", 512 << 20), ("1.5K", 1536), ("4096", 4096), (8.0, 8), ("2GB", 2 << 30)],
)
def test_sizes_are_exact(text: str | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1.5", "0.1G", 1.5, float("inf"), float("nan"), True])
def test_sizes_are_whole_bytes(text: Any) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def _properties(schema: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in ref:
        ref = schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]
    props: dict[str, Any] = ref["properties"]
    return props


def test_schema_option_prints_the_models_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--schema"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    schema = json.loads(out)
    assert schema == scenario_json_schema()
    top = schema["properties"]
    assert set(top) == {
        "name",
        "description",
        "published",
        "guest",
        "history",
        "workload",
        "link",
        "migration",
    }
    assert schema["additionalProperties"] is False
    guest = _properties(schema, top["guest"])
    assert guest["init_on_alloc"]["type"] == "boolean"
    assert guest["seed"]["type"] == "integer" and guest["seed"]["minimum"] == 0
    assert "string" in json.dumps(guest["memory"])  # sizes: bytes or "8G"
    assert "description" in guest["used"]
    kinds = set(top["workload"]["discriminator"]["mapping"])
    assert kinds == {
        "idle",
        "memory-hog",
        "steady-writer",
        "kernel-compile",
        "write-free",
        "used-writer",
    }
    # Every key the shipped files use is in the schema.
    for path in shipped_scenarios().values():
        doc = tomllib.loads(path.read_text())
        for table, keys in doc.items():
            if isinstance(keys, dict) and table != "published":
                props = (
                    _properties(schema, top[table])
                    if table != "workload"
                    else _properties(
                        schema, {"$ref": top[table]["discriminator"]["mapping"][keys["kind"]]}
                    )
                )
                assert set(keys) <= set(props), (path.name, table)
            else:
                assert table in top
