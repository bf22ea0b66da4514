"""Dependency direction: experiments -> jaxattn -> pallas_kernels -> jax, and only jaxattn.nn imports flax."""

import ast
import pathlib
import re
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> top-level packages it must never import
FORBIDDEN = {
    "pallas_kernels": {"jaxattn", "experiments", "configs", "flax", "optax", "orbax", "grain"},
    "jaxattn": {"experiments", "configs", "optax", "orbax", "grain"},
    "configs": {"experiments"},
}


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name.split(".")[0], a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module.split(".")[0], node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
  bad = []
  for path in sorted((ROOT / package).rglob("*.py")):
    rel = path.relative_to(ROOT)
    for top, full in _imports(path):
      forbidden = set(FORBIDDEN[package])
      if package == "jaxattn" and rel.parts[1] != "nn":
        forbidden.add("flax")
      if top in forbidden:
        bad.append(f"{rel} imports {full}")
  assert not bad, "\n".join(bad)


def test_public_surface_imports_without_flax_side_effects():
  import jaxattn
  assert callable(jaxattn.softmax_attention)
  assert hasattr(jaxattn.masks, "Causal") and hasattr(jaxattn.testing, "assert_close")


def _requirement_names(reqs):
  return {re.split(r"[<>=!~ \[;]", r)[0].lower().replace("-", "_") for r in reqs}


@pytest.mark.parametrize("package", ["jaxattn", "pallas_kernels"])
def test_third_party_imports_are_declared(package):
  """Every third-party module the wheel's packages import is a core requirement (or, for ``jaxattn.nn`` only, in
  the ``nn`` extra), so ``pip install jaxattn`` never meets a bare ``ModuleNotFoundError``."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  core = _requirement_names(project["dependencies"])
  nn_extra = _requirement_names(project["optional-dependencies"]["nn"])
  first_party = {"jaxattn", "pallas_kernels"}
  bad = []
  for path in sorted((ROOT / package).rglob("*.py")):
    rel = path.relative_to(ROOT)
    allowed = core | (nn_extra if rel.parts[:2] == ("jaxattn", "nn") else set())
    for top, full in _imports(path):
      if top not in sys.stdlib_module_names and top not in first_party and top.lower() not in allowed:
        bad.append(f"{rel} imports {full}, which pyproject.toml does not declare")
  assert not bad, "\n".join(bad)
