"""The prepared GPU check script parses (it only runs on the device machine)."""

import pathlib
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "device" / "gpu_check.sh"


def test_gpu_check_script_is_valid_bash():
  subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
