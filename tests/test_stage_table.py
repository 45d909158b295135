"""The stage table is the one source of what each stage depends on: typed inputs, fingerprints, dvc.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_params
from components.stages.base import StageInputs, param
from flows.cli import STAGE_NAMES
from flows.dvc_yaml import render
from flows.stages import ORDER, STAGES, StageContext, fingerprint

PROJECT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_generated_from_the_stage_table() -> None:
    assert (PROJECT / "dvc.yaml").read_text() == render(), "run `medexperts dvc-yaml` and commit dvc.yaml"


def test_cli_lists_the_stages_of_the_table() -> None:
    assert STAGE_NAMES == ORDER


@pytest.mark.parametrize("name", ORDER)
def test_every_stage_input_names_the_param_it_reads(name: str) -> None:
    keys = STAGES[name].inputs.param_keys()
    params = load_params(PROJECT / "params", "tiny")
    inp = STAGES[name].inputs.from_params(params)
    assert set(inp.model_dump()) == set(keys)
    with pytest.raises(Exception, match="frozen"):
        setattr(inp, next(iter(keys)), None)


def test_an_input_without_its_param_key_is_refused() -> None:
    class Bad(StageInputs):
        seed: int = param("pipeline.seed")
        metric: str = "macro_f1"

    with pytest.raises(TypeError, match="Bad.metric: every stage input must be declared with param"):
        Bad.param_keys()


@pytest.mark.parametrize(("key", "value", "changes"), [
    ("fusion.lambdas", [0.3], {"fusion"}),
    ("evaluate.latency_repeats", 7, {"evaluate"}),
    ("evaluate.primary_metric", "accuracy", {"experts", "decompose", "federated", "routing", "fusion", "evaluate",
                                             "promote"}),
    ("federated.rounds", 2, {"federated"}),
    ("routing.tau", 2.0, {"routing"}),
    ("registry.margin", 0.5, {"promote"}),
    ("experts.probe.epochs", 7, {"experts", "decompose", "federated"}),
    ("pipeline.seed", 7, {"data", "foundation", "experts", "decompose", "federated", "routing", "fusion", "evaluate"}),
])
def test_a_param_changes_exactly_the_fingerprints_of_the_stages_that_read_it(tmp_path: Path, key: str, value: object,
                                                                            changes: set[str]) -> None:
    """Fingerprints hash the typed inputs only (upstream outputs absent here): a param moves the stages that read it."""
    def prints(overrides: dict[str, object]) -> dict[str, str]:
        ctx = StageContext(PROJECT, tmp_path, load_params(PROJECT / "params", "tiny", overrides))
        return {name: fingerprint(name, ctx)[0] for name in ORDER if name != "sources"}

    base, moved = prints({}), prints({key: value})
    assert {name for name in base if base[name] != moved[name]} == changes
