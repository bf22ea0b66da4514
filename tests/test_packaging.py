"""Packaging: the wheel ships ``jaxattn`` and ``pallas_kernels`` only (``experiments`` and ``configs`` run from the
repository), its core requirements are the ones the library imports, and an editable install imports the package
from any folder, including one next to a clone folder named ``jaxattn`` (which Python would otherwise import as an
empty namespace package)."""

import email.parser
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = {"jaxattn", "pallas_kernels"}
# what a build or the editable install needs, plus experiments/ and configs/ to show they stay out of the wheel
SOURCES = ("pyproject.toml", "README.md", "jaxattn", "pallas_kernels", "experiments", "configs")


def _setuptools_config():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _copy_sources(dst: pathlib.Path) -> pathlib.Path:
  """Copies the files a build needs into ``dst`` (a build writes build/ and *.egg-info next to pyproject.toml)."""
  dst.mkdir(parents=True)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for name in SOURCES:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dst / name, ignore=ignore)
    else:
      shutil.copy2(src, dst / name)
  return dst


def _pip(*args, timeout=300):
  proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def _library_packages():
  """Every directory of the library that holds Python files, as a dotted package name."""
  return {".".join(p.parent.relative_to(ROOT).parts) for top in LIBRARY for p in (ROOT / top).rglob("*.py")
          if "__pycache__" not in p.parts}


def test_package_config_finds_the_library_and_nothing_else():
  cfg = _setuptools_config()
  find = cfg["packages"]["find"]
  found = setuptools.find_packages(where=str(ROOT / find["where"][0]), include=find["include"],
                                   exclude=find.get("exclude", ()))
  assert {p.split(".")[0] for p in found} == LIBRARY, found
  missing = _library_packages() - set(found)  # a folder without __init__.py would be left out of the wheel
  assert not missing, f"library folders the wheel would miss (add an __init__.py): {sorted(missing)}"
  # The root package dir makes `pip install -e .` write a plain .pth (the repository root on sys.path) instead of
  # setuptools' import-hook finder, which loses against a `jaxattn/` folder in the script's directory.
  assert cfg["package-dir"] == {"": "."}


def test_wheel_contains_only_the_library_and_declares_used_requirements(tmp_path):
  src = _copy_sources(tmp_path / "src")
  _pip("wheel", "--no-deps", "-q", str(src), "-w", str(tmp_path / "dist"))
  (wheel,) = (tmp_path / "dist").glob("jaxattn-*.whl")
  with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
  tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
  assert tops == LIBRARY, sorted(tops)
  sources = {p.relative_to(src).as_posix() for top in LIBRARY for p in (src / top).rglob("*.py")}
  assert sources and not sources - names, sorted(sources - names)
  core = {re.split(r"[<>=!~ \[;]", r)[0].lower() for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
  assert core == {"jax", "numpy", "chex"}, core


def _readme_quickstart() -> str:
  text = (ROOT / "README.md").read_text()
  match = re.search(r"## Quickstart\n.*?```python\n(.*?)```", text, re.S)
  assert match, "README.md has no python block under ## Quickstart"
  return match.group(1)


@pytest.mark.slow
def test_editable_install_quickstart_runs_next_to_a_clone_named_jaxattn(tmp_path):
  """The README's quickstart saved as a script in the folder that holds the clone (the clone folder is named
  ``jaxattn`` like the package): it must import the installed package, not the clone folder as a namespace."""
  clone = _copy_sources(tmp_path / "jaxattn")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  _pip("--python", str(python), "install", "--no-deps", "-q", "-e", str(clone))
  pth = [p for p in venv.glob("lib/python*/site-packages/__editable__*jaxattn*.pth")]
  assert len(pth) == 1 and pth[0].read_text().strip() == str(clone), [p.read_text() for p in pth]

  script = tmp_path / "quickstart.py"
  script.write_text(_readme_quickstart() + "\nprint('JAXATTN_FILE', jaxattn.__file__)\n")
  proc = subprocess.run([str(python), script.name], cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"JAXATTN_FILE {clone / 'jaxattn' / '__init__.py'}" in proc.stdout
  # experiments run from the repository root
  proc = subprocess.run([str(python), "-m", "experiments", "--help"], cwd=clone, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "mqar" in proc.stdout, proc.stdout + proc.stderr
