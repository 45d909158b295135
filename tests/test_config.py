"""Params: every shipped file and profile loads; typos and wrong types name the file and the key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from components.config import expand_env, load_params, profile_names
from components.core.errors import ParamsError

PARAMS = Path(__file__).resolve().parents[1] / "params"


@pytest.fixture()
def params_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(PARAMS, tmp_path / "params"))


@pytest.mark.parametrize("profile", profile_names(PARAMS))
def test_every_shipped_profile_loads(profile: str) -> None:
    params = load_params(PARAMS, profile)
    assert params.pipeline.profile == profile
    assert params.data.active


def test_profile_overrides_stage_file() -> None:
    quick, full = load_params(PARAMS, "quick"), load_params(PARAMS, "full")
    assert quick.experts.trainer.text.max_train_samples == 800
    assert full.experts.trainer.text.max_train_samples is None


def test_typo_names_file_and_key(params_copy: Path) -> None:
    path = params_copy / "experts.yaml"
    path.write_text(path.read_text().replace("rank: 8", "rnak: 8"))
    with pytest.raises(ParamsError, match=r"experts\.yaml: key 'lora\.rnak': Extra inputs are not permitted"):
        load_params(params_copy)


def test_wrong_type_names_file_and_key(params_copy: Path) -> None:
    path = params_copy / "experts.yaml"
    path.write_text(path.read_text().replace("rank: 8", "rank: eight"))
    with pytest.raises(ParamsError, match=r"experts\.yaml: key 'lora\.rank'.*'eight'"):
        load_params(params_copy)


def test_bad_value_in_profile_names_the_profile(params_copy: Path) -> None:
    (params_copy / "profiles" / "bad.yaml").write_text("experts:\n  lora: {rank: 0}\n")
    with pytest.raises(ParamsError, match=r"profiles/bad\.yaml: key 'lora\.rank': Input should be greater"):
        load_params(params_copy, "bad")


def test_unknown_active_task(params_copy: Path) -> None:
    path = params_copy / "data.yaml"
    path.write_text(path.read_text().replace("active: [pneumoniamnist,", "active: [pneumonia,"))
    with pytest.raises(ParamsError, match=r"data\.yaml.*unknown task\(s\) \['pneumonia'\]"):
        load_params(params_copy)


def test_unknown_profile_lists_available() -> None:
    with pytest.raises(ParamsError, match=r"unknown profile 'nope'.*available: \[.*'quick'"):
        load_params(PARAMS, "nope")


def test_malformed_yaml(params_copy: Path) -> None:
    (params_copy / "fusion.yaml").write_text("methods: [average\n")
    with pytest.raises(ParamsError, match=r"fusion\.yaml: not valid YAML"):
        load_params(params_copy)


def test_lambda_range(params_copy: Path) -> None:
    fusion = params_copy / "fusion.yaml"
    fusion.write_text(fusion.read_text() + "\nlambdas: [0.5, 3.0]\n")
    with pytest.raises(ParamsError, match=r"fusion\.yaml: key 'lambdas'.*\(0, 2\]"):
        load_params(params_copy)
    # the same value given with --set is blamed on --set
    with pytest.raises(ParamsError, match=r"^--set: key 'lambdas'.*\(0, 2\]"):
        load_params(PARAMS, overrides={"fusion.lambdas": [0.5, 3.0]})


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDEXPERTS_X", "/data")
    assert expand_env("${MEDEXPERTS_X}/a") == "/data/a"
    assert expand_env("${MEDEXPERTS_UNSET_Y:-../shared}/b") == "../shared/b"
    with pytest.raises(ParamsError, match="MEDEXPERTS_UNSET_Y is not set"):
        expand_env("${MEDEXPERTS_UNSET_Y}/b")


def test_profile_section_must_be_a_mapping(params_copy: Path) -> None:
    (params_copy / "profiles" / "bad.yaml").write_text("experts: 3\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: section\(s\) \['experts'\] must be mappings"):
        load_params(params_copy, "bad")


def test_corrupt_stage_files_are_artifact_errors(tmp_path: Path) -> None:
    from components.core.artifacts import read_json, stage_is_current
    from components.core.errors import ArtifactError

    (tmp_path / "_stage.json").write_text("[1, 2]")
    assert not stage_is_current(tmp_path, "x")  # corrupt: the stage simply runs again
    (tmp_path / "m.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_json(tmp_path / "m.json")


def test_a_bad_set_value_blames_set_not_a_params_file() -> None:
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, "tiny", {"experts.lora.rank": 0})
    assert str(err.value).startswith("--set: key 'lora.rank'") and "params/experts.yaml" not in str(err.value)
    with pytest.raises(ParamsError, match=r"--set: key 'lora.bogus': Extra inputs are not permitted"):
        load_params(PARAMS, "tiny", {"experts.lora.bogus": 1})
    with pytest.raises(ParamsError, match=r"--set: unknown section\(s\) \['expert'\]"):
        load_params(PARAMS, "tiny", {"expert.lora.rank": 4})


@pytest.mark.parametrize("trainer", [{"experts.trainer.text.strategy": "ddp", "experts.trainer.text.devices": 2},
                                     {"federated.injection.trainer.devices": "auto"},
                                     {"decompose.trainer.image.num_nodes": 2}])
def test_dask_runner_refuses_ddp_trainers_before_a_cluster_starts(trainer: dict) -> None:
    path = next(iter(trainer)).rsplit(".", 1)[0]
    with pytest.raises(ParamsError, match=rf"Lightning DDP cannot start its processes; multi-process trainers: "
                                          rf"\['{re.escape(path)} "):
        load_params(PARAMS, "tiny", {"pipeline.runner.kind": "dask", **trainer})
    load_params(PARAMS, "tiny", trainer)  # in-process, DDP is a params switch
    load_params(PARAMS, "tiny", {"pipeline.runner.kind": "dask"})  # one device per trainer: fine on Dask
