"""The output half of the experiment contract (``shared/design/experiments.md``), shared by every experiment.

A run directory holds ``results.json`` (config, fingerprint, environment, one record per finished cell),
``table.md``, ``verdict.txt`` and the plots. The functions here implement the parts every experiment repeats:

- :func:`prepare_out_dir` — the rules for an existing run directory (``--resume`` / ``--report`` / refuse) and for
  the committed references under ``experiments/results/`` (never a default output, never resumed from silently);
- :func:`write_json` — atomic ``results.json`` writes, so a killed run never leaves half a file;
- :func:`verdict_line` — the one ``VERDICT: reproduced | partly | not reproduced — why`` line;
- :func:`write_report` — ``table.md`` + ``verdict.txt`` + ``results.json`` and the final print (table, then verdict
  last);
- :func:`environment` — what ran it (jax version, backend, device kind, CPU count, git sha);
- :func:`run_experiment` — the run / resume / report skeleton (prepare the folder, compute unless ``--report``,
  then table, verdict, plots and the report files);
- :func:`preset_main` — the command line every preset experiment shares (``--preset --out --resume --report
  --no-progress``).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
from typing import Any, Callable, Mapping, Sequence

from experiments.common.config import ConfigError
from experiments.common.paths import is_reference_results

__all__ = ["VERDICTS", "environment", "prepare_out_dir", "preset_main", "run_experiment", "write_json", "verdict_line",
           "write_report"]

VERDICTS = ("reproduced", "partly", "not reproduced")


def _git_sha() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                         cwd=pathlib.Path(__file__).resolve().parents[2])
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
  """jax version, default backend, device kind, Python version, CPU count and the repository's git sha."""
  import jax
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "python": platform.python_version(), "cpu_count": os.cpu_count(), "git_sha": _git_sha()}


def write_json(path: str | os.PathLike, payload: Any) -> None:
  """Writes ``payload`` as indented JSON through a temporary file and an atomic rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=1) + "\n")
  os.replace(tmp, path)


def prepare_out_dir(out: str | os.PathLike, *, fingerprint: str, resume: bool = False, report: bool = False,
                    explicit_out: bool = True) -> dict | None:
  """Checks ``out`` for the run about to start; returns the earlier ``results.json`` content (or None).

  - an existing run is an error unless ``resume`` or ``report`` is set (the message says which flag to pass);
  - an existing run of other settings (another ``fingerprint``) is always an error: choose another ``--out``;
  - ``report`` needs an existing ``results.json``;
  - a folder under the committed ``experiments/results/`` is refused unless the user named it (``explicit_out``);
    even then an existing reference is only resumed or reported with the flag given.
  Creates ``out`` when the run may go ahead.
  """
  out = pathlib.Path(out)
  if is_reference_results(out) and not explicit_out:
    raise ConfigError(f"{out} is a committed reference under experiments/results/; it is never a default output")
  path = out / "results.json"
  old = json.loads(path.read_text()) if path.exists() else None
  if report and old is None:
    raise ConfigError(f"--report: no results.json in {out}; run the experiment first")
  if old is not None:
    if not (resume or report):
      raise ConfigError(f"{out} already holds a run; pass --resume to continue it, --report to rebuild its outputs, "
                        f"or --out to write elsewhere")
    if old.get("fingerprint") != fingerprint:
      raise ConfigError(f"{out} holds a run of other settings (fingerprint {old.get('fingerprint')} != "
                        f"{fingerprint}); choose another --out")
  out.mkdir(parents=True, exist_ok=True)
  return old


def verdict_line(verdict: str, reason: str) -> str:
  """``VERDICT: <verdict> — <reason>``; ``verdict`` must be one of :data:`VERDICTS`."""
  if verdict not in VERDICTS:
    raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
  if not reason.strip():
    raise ValueError("a verdict needs a reason")
  return f"VERDICT: {verdict} — {reason.strip()}"


def write_report(out: str | os.PathLike, payload: dict, *, title: str, table: str, verdict: str,
                 notes: Sequence[str] = (), plots: Sequence[str] = (), verbose: bool = True) -> None:
  """Writes ``table.md`` (title, table, notes, verdict), ``verdict.txt`` and ``results.json`` (``payload`` plus the
  table, notes and verdict); prints the table, the notes and, last, the verdict line."""
  if not verdict.startswith("VERDICT: "):
    raise ValueError(f"verdict must come from verdict_line(), got {verdict!r}")
  out = pathlib.Path(out)
  body = table.rstrip() + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + f"\n\n{verdict}\n"
  (out / "table.md").parent.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(f"# {title}\n\n{body}")
  (out / "verdict.txt").write_text(verdict + "\n")
  write_json(out / "results.json", {**payload, "table_markdown": table, "notes": list(notes), "verdict": verdict})
  if verbose:
    files = ", ".join(["results.json", "table.md", "verdict.txt", *plots])
    print(f"\noutputs in {out}/ ({files})\n\n{body.rstrip()}", flush=True)


def preset_main(name: str, doc: str | None, presets: Mapping[str, Any], run: Callable[..., Any],
                argv: Sequence[str] | None = None, *, model_root: bool = False) -> int:
  """The command line of a preset experiment: ``python -m experiments <name> [--preset P] [--out DIR] [--resume]
  [--report] [--no-progress]`` (plus ``--model-root`` where the experiment reuses a cached trained model).

  Calls ``run(presets[P], out, resume=, report=, progress=, explicit_out=[, model_root=])``; ``out`` defaults to
  ``runs/<name>/<preset>/``. A :class:`~experiments.common.config.ConfigError` raised by ``run`` propagates to the
  dispatcher (``experiments/__main__.py``), which prints it as one line with exit status 1; bad flags exit 2.
  """
  import argparse
  import sys

  from experiments.common import config as config_lib
  from experiments.common.paths import default_out_dir

  p = config_lib.ArgumentParser(prog=f"python -m experiments {name}", description=(doc or name).split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu", choices=sorted(presets))
  p.add_argument("--out", default=None, help=f"output folder (default runs/{name}/<preset>/)")
  p.add_argument("--resume", action="store_true", help="continue the run already in --out")
  p.add_argument("--report", action="store_true", help="compute nothing: rebuild the outputs from results.json")
  if model_root:
    p.add_argument("--model-root", default=None, help="where trained models are cached (default runs/longctx)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  cfg = presets[args.preset]
  out = pathlib.Path(args.out) if args.out else default_out_dir(name, cfg.name)
  extra = {"model_root": args.model_root} if model_root else {}
  run(cfg, out, resume=args.resume, report=args.report, progress=not args.no_progress,
      explicit_out=args.out is not None, **extra)
  return 0


def run_experiment(cfg, out: str | os.PathLike, *, title: str, compute: Callable[[pathlib.Path, dict], Any],
                   table: Callable[[dict], tuple[str, Sequence[str]]], verdict: Callable[[dict], str],
                   plots: Callable[[pathlib.Path, dict], Sequence[str]], resume: bool = False, report: bool = False,
                   explicit_out: bool = True, verbose: bool = True) -> dict:
  """The skeleton of an experiment whose ``results.json`` is one payload dict grown by ``compute``.

  Checks ``out`` (:func:`prepare_out_dir`, fingerprint of ``cfg``), starts the payload from the earlier run (or from
  ``preset`` / ``fingerprint`` / ``config``), runs ``compute(out, payload)`` unless ``report`` (it records finished
  work in ``payload`` and saves it with :func:`write_json` as it goes, so a killed run resumes), then writes
  ``table(payload) -> (markdown, notes)``, ``verdict(payload)`` and ``plots(out, payload) -> file names`` with
  :func:`write_report`. Returns the payload with the table and verdict.
  """
  from experiments.common import config as config_lib

  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  payload = dict(old) if old else dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg))
  for k in ("table_markdown", "notes", "verdict"):
    payload.pop(k, None)
  if not report:
    compute(out, payload)
  md, notes = table(payload)
  line = verdict(payload)
  files = plots(out, payload)
  write_report(out, payload, title=title, table=md, verdict=line, notes=notes, plots=files, verbose=verbose)
  return {**payload, "table_markdown": md, "verdict": line}
