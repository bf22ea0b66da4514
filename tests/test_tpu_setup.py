"""tpu_setup: every script parses (bash -n), --dry-run prints the expected gcloud commands and runs nothing, and
check_tpu.py passes on CPU."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUP = ROOT / "tpu_setup"
SCRIPTS = ("env.sh", "create.sh", "install.sh", "run.sh", "fetch.sh", "delete.sh")


def _env(tmp_path):
  # A fake gcloud that fails the test if anything tries to run it for real.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / "gcloud"
  fake.write_text("#!/usr/bin/env bash\necho 'gcloud must not run in --dry-run' >&2\nexit 99\n")
  fake.chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PROJECT="my-proj", ZONE="us-central2-b",
              TPU_NAME="t1", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="tpu-ubuntu2204-base")


def _dry(tmp_path, script, *args):
  out = subprocess.run(["bash", str(SETUP / script), "--dry-run", *args], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  out = subprocess.run(["bash", "-n", str(SETUP / script)], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  if script != "env.sh":
    assert os.access(SETUP / script, os.X_OK), f"{script} is not executable"


def test_create_dry_run(tmp_path):
  out = _dry(tmp_path, "create.sh", "--spot")
  assert ("gcloud compute tpus queued-resources create t1-qr --zone=us-central2-b --project=my-proj --node-id=t1 "
          "--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base --spot") in out
  assert "queued-resources describe t1-qr" in out
  assert "--spot" not in _dry(tmp_path, "create.sh")


def test_install_dry_run(tmp_path):
  out = _dry(tmp_path, "install.sh")
  assert "gcloud compute tpus tpu-vm ssh t1 --zone=us-central2-b --project=my-proj --worker=all" in out
  assert "jax[tpu]" in out and "[experiments]" in out and "check_tpu.py" in out and "git clone" in out


def test_run_dry_run_quotes_the_command(tmp_path):
  out = _dry(tmp_path, "run.sh", "--name", "exp", "--", "python", "-m", "experiments", "mqar", "--distributed")
  assert "--worker=all" in out
  assert "python\\ -m\\ experiments\\ mqar\\ --distributed" in out and "jaxattn_logs/exp.log" in out
  out = _dry(tmp_path, "run.sh", "--background", "--", "python", "-c", "print('a b')")
  assert "nohup" in out
  bad = subprocess.run(["bash", str(SETUP / "run.sh"), "--dry-run"], env=_env(tmp_path), capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "no command given" in bad.stderr


def test_fetch_and_delete_dry_run(tmp_path):
  out = _dry(tmp_path, "fetch.sh")
  assert "gcloud compute tpus tpu-vm scp --recurse t1:jaxattn/runs tpu_results/" in out
  assert "--worker=0" in out
  out = _dry(tmp_path, "delete.sh")
  assert "gcloud compute tpus queued-resources delete t1-qr --zone=us-central2-b --project=my-proj --force" in out


def test_unknown_flag_is_refused(tmp_path):
  out = subprocess.run(["bash", str(SETUP / "create.sh"), "--dry-run", "--bogus"], env=_env(tmp_path),
                       capture_output=True, text=True)
  assert out.returncode == 2 and "unknown argument --bogus" in out.stderr


def test_runbook_mentions_every_script():
  text = (SETUP / "README.md").read_text()
  for script in SCRIPTS[1:] + ("check_tpu.py",):
    assert script in text
  assert "--dry-run" in text and "--spot" in text and "delete" in text.lower()


def test_check_tpu_on_cpu():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, str(SETUP / "check_tpu.py")], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "psum over 4 devices = 4: ok" in out.stdout and "all checks passed" in out.stdout
