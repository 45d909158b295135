"""The shape of the library: package import graph (packages, edges, cycles) and lines per package, now and at an
earlier commit, so the layered-library refactor is measured, not asserted.

    medexperts bench architecture [--before 65a3f98]

Edges count every import between two packages of ``components`` (and ``flows`` as one package), including
imports inside functions (grimp, the graph import-linter checks). Writes bench/results/architecture.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] != "components" or len(parts) == 1 else ".".join(parts[:2])


def _lines(tree: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in sorted((tree / "components").rglob("*.py")) + sorted((tree / "flows").rglob("*.py")):
        rel = f.relative_to(tree).with_suffix("")
        pkg = _package(".".join(rel.parts).removesuffix(".__init__"))
        out[pkg] = out.get(pkg, 0) + len(f.read_text().splitlines())
    return dict(sorted(out.items()))


def measure(tree: Path) -> dict[str, Any]:
    """Graph of the ``components`` and ``flows`` packages found under ``tree`` (built in a child process so the
    right tree is imported)."""
    # run in ``tree``: `python -c` puts the working folder first on the path, so that tree's packages are imported
    code = """
import json
import grimp
g = grimp.build_graph("components", "flows", cache_dir=None)
print(json.dumps(sorted({(a, b) for a in g.modules for b in g.find_modules_directly_imported_by(a)})))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tree)
    modules = __import__("json").loads(proc.stdout)
    edges = sorted({(_package(a), _package(b)) for a, b in modules if _package(a) != _package(b)})
    packages = sorted({p for e in edges for p in e})
    cycles = sorted({tuple(sorted((a, b))) for a, b in edges if (b, a) in edges})
    return {"packages": packages, "edges": [list(e) for e in edges], "cycles": [list(c) for c in cycles],
            "n_packages": len(packages), "n_edges": len(edges), "n_cycles": len(cycles), "lines": _lines(tree)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench architecture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="65a3f98", help="commit to compare with (default: before the refactor)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "components", "flows"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        before = measure(old)
    after = measure(ROOT)
    for name, m in (("before", before), ("after", after)):
        print(f"{name}: {m['n_packages']} packages, {m['n_edges']} edges, {m['n_cycles']} cycles {m['cycles']}")
    write_result("architecture", {"params": {"before_commit": args.before}, "before": before, "after": after})


if __name__ == "__main__":
    main()
