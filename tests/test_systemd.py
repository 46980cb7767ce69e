"""The systemd unit is accepted by systemd-analyze verify."""

import os
import shutil
import subprocess
import sys

import pytest

UNIT = os.path.join(os.path.dirname(__file__), "..", "systemd", "vbdfs.service")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_unit_verifies(tmp_path):
    # The unit names the installed /usr/local/sbin/vbdfs; verify checks that
    # ExecStart exists, so point it at this checkout's venv for the test.
    text = open(UNIT).read()
    assert "ExecStart=/usr/local/sbin/vbdfs -f" in text
    vbdfs = os.path.join(os.path.dirname(sys.executable), "vbdfs")
    unit = tmp_path / "vbdfs.service"
    unit.write_text(text.replace("/usr/local/sbin/vbdfs", vbdfs))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [l for l in r.stderr.splitlines() if "vbdfs.service" in l]
    assert r.returncode == 0 and not problems, r.stderr
