"""The package's layers import one way: app → integrations → formats → core.

Read from the source with ``ast`` (imports inside functions count too), so a lazy import that
points the wrong way fails here as surely as a module-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lohakit"
#: layer -> the layers it may import (besides itself and the package root's metadata)
ALLOWED = {
    "core": {"core"},
    "formats": {"formats", "core"},
    "integrations": {"integrations", "formats", "core"},
    "app": {"app", "integrations", "formats", "core"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lohakit" and parts[1] in ALLOWED else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every lohakit import in ``path``."""
    package = ".".join(("lohakit",) + path.relative_to(SRC).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            out += [(node.lineno, n if _layer(n) or not _layer(mod) else mod) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.startswith("lohakit")]


FILES = sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] in ALLOWED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    layer = path.relative_to(SRC).parts[0]
    wrong = [(line, m) for line, m in _imports(path) if _layer(m) and _layer(m) not in ALLOWED[layer]]
    assert not wrong, f"{path.relative_to(SRC)} ({layer}) imports a layer above it: {wrong}"


def test_every_layer_has_files() -> None:
    assert {p.relative_to(SRC).parts[0] for p in FILES} == set(ALLOWED)


def test_public_paths_import() -> None:
    import lohakit
    import lohakit.diffusers
    import lohakit.formats.kohya
    import lohakit.lora
    from lohakit import LoHaConfig, LoHaModel, get_peft_model  # noqa: F401

    assert lohakit.diffusers.load_loha_weights is lohakit.integrations.diffusers.load_loha_weights
    assert lohakit.lora.to_lora is lohakit.integrations.lora.to_lora
