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


def test_a_stage_hashes_the_code_it_imports_and_not_a_later_stages() -> None:
    """The fingerprint's code is the stage's import closure: a fix in fusion or FedKIM does not retrain the
    foundation; the experts' methods are the experts' code; promote ships the whole library in its models."""
    from flows.stages import stage_code

    library = {p.relative_to(PROJECT).as_posix() for p in (PROJECT / "components").rglob("*.py")}
    for name in ORDER:
        code = stage_code(name)
        assert {"flows/stages.py", f"flows/stage_impl/{name}.py", f"components/stages/{name}.py"} <= set(code)
        assert all((PROJECT / f).is_file() for f in code)
        assert "flows/stage_logs.py" not in code  # MLflow records are made after the output is complete
        assert not {f"flows/stage_impl/{other}.py" for other in ORDER if other != name} & set(code)
    foundation = set(stage_code("foundation"))
    assert {"components/nn/foundation.py", "components/training/trainer.py", "components/core/fingerprint.py",
            "components/__init__.py", "components/nn/__init__.py"} <= foundation
    assert not {f for f in foundation if f.startswith(("components/fusion/", "components/federated/",
                                                       "components/decompose/", "components/moe/",
                                                       "components/tracking/registry.py",
                                                       "components/stages/experts.py"))}
    # the params package imports every section's model; one the stage does not read is not its code
    assert {"components/config/foundation.py", "components/config/params.py"} <= foundation
    assert "components/config/federated.py" not in foundation
    assert "components/config/federated.py" in stage_code("federated")
    assert "components/config/experts.py" in stage_code("routing")  # it builds LoraParams to load the experts
    assert "components/experts/methods.py" in stage_code("experts")
    assert "components/federated/fedkim.py" in stage_code("federated")
    assert "components/experts/prompt.py" in stage_code("decompose")  # it loads the experts' bundles
    assert library <= set(stage_code("promote"))  # its models carry a copy of the library


def test_the_import_closure_follows_every_kind_of_import(tmp_path: Path) -> None:
    from components.core.fingerprint import imported_files

    pkg = tmp_path / "pkg"
    for folder in (pkg, pkg / "sub", pkg / "other"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    files = {
        "pkg/root.py": "import os\nfrom typing import TYPE_CHECKING\nfrom pkg.sub import a\nfrom pkg.sub.b import name\n"
                       "if TYPE_CHECKING:\n    from pkg.other import typed_only\nelse:\n    import pkg.other.fallback\n\n"
                       "def later():\n    import pkg.other.lazy\n",
        "pkg/sub/a.py": "from . import c\nfrom .. import top\n",  # relative, from the module and its parent
        "pkg/sub/b.py": "name = 1\n",
        "pkg/sub/c.py": "",
        "pkg/top.py": "",
        "pkg/other/lazy.py": "",
        "pkg/other/fallback.py": "",
        "pkg/other/typed_only.py": "",
        "pkg/other/unused.py": "import pkg.root\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    assert imported_files(["pkg.root"], tmp_path, ("pkg",)) == sorted([
        "pkg/__init__.py", "pkg/root.py", "pkg/sub/__init__.py", "pkg/sub/a.py", "pkg/sub/b.py", "pkg/sub/c.py",
        "pkg/top.py", "pkg/other/__init__.py", "pkg/other/lazy.py", "pkg/other/fallback.py"])
    assert imported_files(["pkg.sub.a"], tmp_path, ("pkg.sub",)) == ["pkg/sub/__init__.py", "pkg/sub/a.py",
                                                                      "pkg/sub/c.py"]  # other packages not followed
    skipped = imported_files(["pkg.root"], tmp_path, ("pkg",), skip=lambda importer, module: module == "pkg.sub.a")
    assert "pkg/sub/a.py" not in skipped and "pkg/sub/c.py" not in skipped and "pkg/sub/b.py" in skipped
    # a name taken through a package that re-exports it depends on its module, even when the package's own
    # import of that module is skipped
    (pkg / "cfg").mkdir()
    (pkg / "cfg" / "__init__.py").write_text("from pkg.cfg.one import One\nfrom .two import Two\n")
    (pkg / "cfg" / "one.py").write_text("")
    (pkg / "cfg" / "two.py").write_text("")
    (pkg / "user.py").write_text("from pkg.cfg import Two\n")
    assert imported_files(["pkg.user"], tmp_path, ("pkg",), skip=lambda importer, module: importer == "pkg.cfg") == [
        "pkg/__init__.py", "pkg/cfg/__init__.py", "pkg/cfg/two.py", "pkg/user.py"]
