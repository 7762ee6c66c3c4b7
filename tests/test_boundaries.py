"""The import rules of design.md, each checked in a fresh interpreter by looking at ``sys.modules``.

* The torch-free core modules (``ctpd_core.spec``, ``.vocab``, ``.data``, ``.catalog``, ``.held_paths``, ``.checkpoint_layout``, ``.logs``) and every ``app``
  module import no torch (the API image carries none); ``app`` imports nothing of ``ctpd_core`` but those, and
  nothing of ``worker``.
* ``ctpd_core`` imports no fastapi, celery, sqlalchemy, redis, ``app`` or ``worker``: the method is a library.
* Nothing but the entry point imports ``ctpd_cli``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules_of(package: str) -> list[str]:
    """Every module of a package, found on disk (walking by import would import what we test)."""
    root = REPO / package
    names = []
    for path in sorted(root.rglob("*.py")):
        if "migrations" in path.relative_to(root).parts[:-1] and path.name != "__init__.py":
            continue  # Alembic scripts run inside Alembic's environment, not as importable modules
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _loaded_after_import(module: str) -> set[str]:
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"importing {module} failed:\n{result.stderr}")
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


TORCH = {"torch", "transformers", "tokenizers", "accelerate", "safetensors"}
SERVICE = {"fastapi", "celery", "sqlalchemy", "redis", "kombu", "uvicorn", "starlette", "app", "worker"}


TORCH_FREE_CORE = {"ctpd_core.spec", "ctpd_core.vocab", "ctpd_core.data", "ctpd_core.catalog", "ctpd_core.held_paths",
                   "ctpd_core.checkpoint_layout", "ctpd_core.logs", "ctpd_core.memory_plan"}


@pytest.mark.parametrize("module", [*sorted(TORCH_FREE_CORE), *_modules_of("app")])
def test_control_plane_imports_no_torch(module):
    loaded = _loaded_after_import(module)
    assert not (_top_level(loaded) & (TORCH | {"numpy"})), f"{module} pulls in {_top_level(loaded) & TORCH}"
    core = {name for name in loaded if name.startswith("ctpd_core.")}
    assert core <= TORCH_FREE_CORE, f"{module} imports {core - TORCH_FREE_CORE}"
    if module.startswith("app"):
        assert "worker" not in _top_level(loaded)


@pytest.mark.parametrize("module", _modules_of("ctpd_core"))
def test_core_imports_no_service_code(module):
    loaded = _top_level(_loaded_after_import(module))
    assert not (loaded & SERVICE), f"{module} pulls in {loaded & SERVICE}"
    assert "ctpd_cli" not in loaded


@pytest.mark.parametrize("module", _modules_of("app") + _modules_of("worker"))
def test_service_code_does_not_import_the_cli(module):
    assert "ctpd_cli" not in _top_level(_loaded_after_import(module))
