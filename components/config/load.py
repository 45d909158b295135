"""The one loader: read every stage file, merge the profile and dotted overrides, validate.

Unknown keys are errors; every validation error names the file (stage file or profile) and the dotted key.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from components.config.params import SECTIONS, Params
from components.core.errors import ParamsError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset VAR without default is an error."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ParamsError(f"environment variable {name} is not set (used in a params path)")

    return _ENV.sub(sub, value)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: {p} is not a mapping")
    node[leaf] = value


def _has_path(tree: Any, loc: tuple[Any, ...]) -> bool:
    """Whether ``tree`` sets the value at ``loc`` (a list sets all its items: a profile or --set replaces lists)."""
    for part in loc:
        if isinstance(tree, list):
            return True
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return False
    return True


def _format_error(exc: ValidationError, file_for: Any) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if not loc:  # a rule across sections (Params validator): its message names the keys
            lines.append(f"params: {err['msg'].removeprefix('Value error, ')}")
            continue
        key = ".".join(str(p) for p in loc[1:]) or "(top level)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{file_for(loc)}: key '{key}': {err['msg']}{got}")
    return "; ".join(lines)


def profile_names(params_dir: Path) -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in (params_dir / "profiles").glob("*.yaml"))


def load_params(
    params_dir: str | Path = "params",
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Params:
    """Read every stage file, merge the profile and dotted overrides, validate.

    ``profile`` defaults to ``pipeline.profile``; ``overrides`` maps ``section.key.sub`` to a value.
    """
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: params folder not found (run from the project folder)")
    raw = {s: _read_yaml(params_dir / f"{s}.yaml") for s in SECTIONS}
    name = profile or raw["pipeline"].get("profile", "quick")
    profile_path = params_dir / "profiles" / f"{name}.yaml"
    if not profile_path.is_file():
        raise ParamsError(
            f"unknown profile {name!r}: no {profile_path}; available: {profile_names(params_dir)}"
        )
    prof = _read_yaml(profile_path)
    unknown = sorted(set(prof) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{profile_path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    bad = [s for s in SECTIONS if prof.get(s) is not None and not isinstance(prof[s], dict)]
    if bad:
        raise ParamsError(f"{profile_path}: section(s) {bad} must be mappings of overrides")
    merged = {s: _deep_merge(raw[s], prof.get(s) or {}) for s in SECTIONS}
    merged["pipeline"]["profile"] = name
    unknown = sorted({d.split(".")[0] for d in overrides or {}} - set(SECTIONS))
    if unknown:
        raise ParamsError(f"--set: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    set_tree: dict[str, Any] = {}  # what --set changed, to blame it (not a file) for its own bad values
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)
        _set_dotted(set_tree, dotted, value)

    def file_for(loc: tuple[Any, ...]) -> str:
        section = str(loc[0])
        if _has_path(set_tree, loc):
            return "--set"
        if _has_path(prof, loc):
            return str(profile_path)
        return str(params_dir / f"{section}.yaml")

    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        raise ParamsError(_format_error(exc, file_for)) from None
