"""The systemd unit is accepted by systemd-analyze verify, and never pulls a guest's disk.

(tests/test_daemon_stop.py runs its ExecStop against a real mount.)"""

import os
import re
import shlex
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


def unit_lines():
    with open(UNIT) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith("#")]


def test_unit_never_kills_or_restarts_under_guests():
    lines = unit_lines()
    assert "RefuseManualStop=yes" in lines             # systemctl stop/restart: refused
    assert "SendSIGKILL=no" in lines and "TimeoutStopSec=infinity" in lines
    assert "KillMode=mixed" in lines and "KillSignal=SIGTERM" in lines
    before = [l for l in lines if l.startswith("Before=")][0].split("=")[1].split()
    assert "xendomains.service" in before              # so it stops after the domains
    assert not any(re.search(r"fusermount3? .*-z", l) for l in lines)   # no lazy unmount
    stop = [l for l in lines if l.startswith("ExecStop=")]
    assert [shlex.split(l.partition("=")[2]) for l in stop] == \
        [["-/usr/local/sbin/vbdctl", "daemon-stop", "--detach"]]
