"""A real installed distribution for plugin tests: a module and a ``.dist-info`` with entry points,
written into a directory that is put on ``sys.path``, so ``importlib.metadata`` finds it exactly
as it finds a ``pip install``-ed plugin package (no mocking of the metadata machinery)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def install_plugin(
    monkeypatch,
    root: Path,
    dist: str,
    modules: dict[str, str],
    entry_points: dict[str, dict[str, str]],
) -> None:
    """Write ``modules`` (name -> source) and a dist-info for ``dist`` declaring ``entry_points``
    (group -> {name: "module:attr"}) under ``root``, and put ``root`` first on ``sys.path``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(root))
    for name in modules:  # a module of the same name from an earlier test must not be reused
        monkeypatch.delitem(sys.modules, name, raising=False)
