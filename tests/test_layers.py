"""The dependency rules of DESIGN.md section 2, checked on the source's import statements.

protocol and kernels are independent leaves; server modules never import clients;
clients never import server modules; only protocol/transport.py (and the raw-zmq
benchmark baselines) import zmq; nothing imports tests or bench.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pserver": "pserver", "kernels": "pserver.kernels", "protocol": "pserver.protocol",
            "clients": "pserver.clients"}
SERVER_MODULES = ("pserver.config", "pserver.optim", "pserver.tables", "pserver.wal",
                  "pserver.sessions", "pserver.snapshot", "pserver.shard", "pserver.server",
                  "pserver.supervisor", "pserver.export", "pserver.replica",
                  "pserver.replog", "pserver.apply", "pserver.aggregate", "pserver.commands",
                  "pserver.peers", "pserver.cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module imported by ``path`` (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def _sources() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))


def _hits(imports: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {i for i in imports if any(i == p or i.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_respects_the_layers(path: Path) -> None:
    module = _module_name(path)
    imports = _imports(path)
    forbidden: tuple[str, ...] = ("tests", "bench")
    if module.startswith("pserver.protocol"):
        forbidden += ("pserver.kernels", "pserver.clients", *SERVER_MODULES)
    elif module.startswith("pserver.kernels"):
        forbidden += ("pserver.protocol", "pserver.clients", *SERVER_MODULES, "zmq", "msgpack")
    elif module.startswith("pserver.clients"):
        forbidden += SERVER_MODULES
    elif module in SERVER_MODULES[:-1]:
        forbidden += ("pserver.clients",)
    if module not in ("pserver.protocol.transport", "pserver.benchmark.baselines",
                      "pserver.benchmark.plainps",
                      "pserver.benchmark.scenarios"):
        forbidden += ("zmq",)
    assert not _hits(imports, forbidden), f"{module} imports {sorted(_hits(imports, forbidden))}"


def test_the_checker_sees_relative_imports() -> None:
    imports = _imports(ROOT / "pserver" / "server.py")
    assert "pserver.shard" in imports
    assert "pserver.protocol.transport" in imports


@pytest.mark.parametrize("path", sorted((ROOT / "pserver" / "raft").glob("*.py")),
                         ids=lambda p: p.name)
def test_the_raft_core_is_pure(path: Path) -> None:
    """DESIGN: no sockets, clock, threads or files in pserver.raft; randomness injected."""
    banned = ("time", "socket", "threading", "os", "asyncio", "zmq", "logging",
              "pserver.protocol", "pserver.kernels", "pserver.clients", "pserver.server")
    assert not _hits(_imports(path), banned), f"{path.name} imports {_hits(_imports(path), banned)}"
