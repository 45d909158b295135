"""Content fingerprints: files, folders, arrays, code and params (for manifests and stage caching)."""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def sha256_bytes(b: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def array_content_hash(arrays: list[np.ndarray]) -> str:
    """sha256 over the raw C-order bytes of the arrays, in order.

    Zip timestamps make .npz bytes irreproducible, so the arrays (not the file) are hashed;
    this is the definition DATA.md uses for the MedMNIST files.
    """
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def tree_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's sorted relative paths with their file hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def imported_files(roots: list[str], source_root: str | Path, packages: tuple[str, ...],
                   skip: Callable[[str, str], bool] | None = None) -> list[str]:
    """The files of ``packages`` (dotted names, under ``source_root``) that importing the modules ``roots`` can
    execute: each module's file, the ``__init__.py`` of every package on its path, and, transitively, every module
    of ``packages`` it imports anywhere in its body (top-level or inside a function; ``from a import b`` counts
    ``a.b`` when that is a module, and, when ``a`` is a package that re-exports ``b``, the module its
    ``__init__`` takes ``b`` from), except under ``if TYPE_CHECKING:``, which never runs, and the imports
    ``skip(importer, imported)`` says to leave out. Sorted paths relative to ``source_root``.

    Why not ``modulefinder``: it imports nothing but also follows the standard library and third-party packages,
    which is slow and beside the point here; only the project's own code decides whether a stage's cached output
    is still what its code would produce. A module reached only through ``importlib`` with a computed name is not
    seen: the project's stages import what they run by name."""
    root = Path(source_root)

    def path_of(module: str) -> Path | None:
        base = root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def ours(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
        """The module an ``ImportFrom`` in ``module`` imports from."""
        if not node.level:
            return node.module or ""
        anchor = module.split(".") if is_package else module.split(".")[:-1]  # relative: from its package upwards
        anchor = anchor[:len(anchor) - node.level + 1]
        return ".".join([*anchor, node.module] if node.module else anchor)

    trees: dict[Path, ast.Module] = {}

    def tree_of(path: Path) -> ast.Module:  # each file parsed once (a package's __init__ is read twice)
        if path not in trees:
            trees[path] = ast.parse(path.read_text(), filename=str(path))
        return trees[path]

    exports: dict[str, dict[str, str]] = {}

    def source_of(package: str, name: str) -> str | None:
        """The module a package's ``__init__`` takes ``name`` from (``from .sub import name``): a name imported
        through the package depends on that module, whatever the package's own imports are made to skip."""
        if package not in exports:
            exports[package] = {}
            path = path_of(package)
            if path is not None and path.name == "__init__.py":
                for node in tree_of(path).body:
                    if isinstance(node, ast.ImportFrom):
                        for alias in node.names:
                            exports[package][alias.asname or alias.name] = absolute(node, package, True)
        return exports[package].get(name)

    seen: dict[str, Path] = {}
    todo: list[tuple[str, str]] = [("", r) for r in roots]  # (importer, module)
    while todo:
        importer, module = todo.pop()
        if module in seen or not ours(module) or (skip is not None and importer and skip(importer, module)):
            continue
        path = path_of(module)
        if path is None:
            continue  # a name imported from a module, not a module
        seen[module] = path
        parts = module.split(".")
        todo += [("", ".".join(parts[:i])) for i in range(1, len(parts))]  # its packages' __init__ run first
        is_package = path.name == "__init__.py"
        for node in _runtime_nodes(tree_of(path)):
            if isinstance(node, ast.Import):
                todo += [(module, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = absolute(node, module, is_package)
                todo.append((module, base))
                for alias in node.names:
                    todo.append((module, f"{base}.{alias.name}"))
                    source = source_of(base, alias.name) if ours(base) else None
                    if source is not None:
                        todo.append((module, source))
    return sorted(p.relative_to(root).as_posix() for p in seen.values())


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` but the bodies of ``if TYPE_CHECKING:`` (their ``else`` kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [node.test, *node.orelse]
        else:
            stack += list(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def json_hash(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal params give equal hashes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_bytes(text.encode("utf-8"))
