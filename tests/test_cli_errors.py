"""Hostile or careless arguments: one short line on stderr, the right exit status, no change.

README: exit status 0 done, 1 failed, 2 usage. Whatever the input (5,000 digits,
other scripts' digits, control characters, junk keys), vbdctl answers with one
line that names the problem, never a traceback or a copy of the whole input.
"""

import pytest

from conftest import MiB, vbdctl_runner
from test_cli_instances import snapshot
from vbdfs.cli.common import one_line
from vbdfs.store import SizeError, parse_growth, parse_size

BIG = "9" * 5000
JUNK = "x" * 5000


@pytest.mark.parametrize("args, code, says", [
    # the cases of issue 11
    (["grow", "good", "0", "+" + BIG], 2, "is too large"),
    (["add", "--disk", f"0:size={BIG}", "new"], 2, "is too large"),
    (["add", "--disk", "999:size=8M", "new"], 2, "disk index 999 is out of range"),
    (["add", "--disk", "0:size=\u0665M", "new"], 2, "is not a number"),
    # sizes
    (["grow", "--absolute", "good", "0", BIG], 2, "is too large"),
    (["grow", "good", "0", "+\u0665"], 2, "is not a number"),
    (["grow", "good", "0", "-" + BIG], 2, "is negative"),
    (["add", "--disk", "0:size=1." + "0" * 5000 + "1", "new"], 2, "too many digits"),
    (["add", "--disk", "0:size=8388608T", "new"], 2, "is too large"),
    (["add", "--disk", "0:size=5Q", "new"], 2, "unknown unit 'Q'"),
    (["add", "--disk", "0:size=", "new"], 2, "bad option 'size='"),
    (["add", "--disk", "0:size=1G,size=2G", "new"], 2, "size given twice"),
    # disk indices and options
    (["add", "--disk", BIG + ":size=8M", "new"], 2, "is out of range"),
    (["add", "--disk", "\u0661:size=8M", "new"], 2, "expected INDEX"),
    (["add", "--disk", "0:size=1G", "--disk", "127:size=1G", "new"], 2, "1, 2, 3, 4, 5, ..."),
    (["add", "--disk", f"0:size=1G,{JUNK}=1", "new"], 2, "bad option"),
    (["add", "--disk", f"0:size=1G,format={JUNK}", "new"], 2, "unknown format"),
    (["add", "-t", f"file,{JUNK}", "--disk", "0:size=1G", "new"], 2, "bad option"),
    # names
    (["add", "-n", JUNK, "--disk", "0:size=1G", "new"], 2, "is not a host name"),
    (["add", "-o", "a " * 3000, "--disk", "0:size=1G", "new"], 2, "OS name"),
    (["info", JUNK], 1, "5000 characters long"),
    (["info", "a/" + JUNK], 1, "contains '/'"),
    (["info", "a\x1b[2J\nb"], 1, "has characters other than"),
    (["rename", "good", JUNK], 1, "5000 characters long"),
    (["grow", "good", BIG, "+1G"], 1, "has no disk"),
    (["add", "-t", "file:path=/" + JUNK, "--disk", "0:size=1G", "new"], 1,
     "custom storage path"),
    (["list", "--output", JUNK], 2, "invalid choice"),
    (["mount", "good", "sda", "/nonexistent", "--partition", "\u0665"], 2, "expected 1, 2"),
    (["mount", "good", "sda", "/nonexistent", "--partition", BIG], 2, "expected 1, 2"),
    (["list"] + ["x" * 100] * 2000, 2, "and 1999 more"),
    (["add", "--disk", "0:size=5" + "Q" * 5000, "new"], 2, "is not a number"),
])
def test_bad_input_gives_one_short_line(store, tmp_path, args, code, says):
    run = vbdctl_runner(store, str(tmp_path / "mnt"))
    run("add", "--disk", "0:size=8M", "good", check=0)
    before = snapshot(store.root)
    r = run(*args)
    assert (r.returncode, r.stdout) == (code, ""), (r.returncode, r.stdout, r.stderr[:500])
    assert says in r.stderr, r.stderr[:500]
    assert "Traceback" not in r.stderr and "\x1b" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr[:500]
    # The store's own paths are as long as they are (pytest's are long).
    assert len(r.stderr.replace(str(tmp_path), "TMP")) < 200, r.stderr
    assert snapshot(store.root) == before


@pytest.mark.parametrize("text", ["\u0665", "\u0665M", "1\u0660G", "\uff11G", "1.\u0665G",
                                  "5\u2003G"])
def test_only_ascii_digits_are_sizes(text):
    with pytest.raises(SizeError, match="not a number"):
        parse_size(text)


@pytest.mark.parametrize("text, says", [(BIG, "too large"), ("0" * 30 + "1", "too many digits"),
                                        ("1." + "0" * 30, "too many digits"),
                                        ("+" + BIG + "T", "too large")])
def test_long_numbers_are_refused_not_converted(text, says):
    with pytest.raises(SizeError, match=says):
        parse_growth(text)


def test_sizes_still_parse():
    assert parse_size("8 M") == 8 * MiB
    assert parse_size("0001.5") == 2 * MiB
    assert parse_size("8388607T") == 8388607 << 40
    assert parse_growth("+1.0000000001G") == 1025 * MiB


def test_one_line_keeps_ordinary_messages():
    msg = "instance web: /srv/vbdfs/web/sda: size 8M is not a multiple of 512"
    assert one_line(msg) == msg
    path = "/" + "d" * 150 + "/sda"                   # a long but real path stays whole
    assert one_line(f"cannot open {path}") == f"cannot open {path}"
    line = one_line(f"disk 0 size '{BIG}' is too large")
    assert line.startswith("disk 0 size '9999") and line.endswith("(5002 characters) is too large")
    assert len(line) < 150
    assert one_line("a\nb\x1b[0m") == "a\\nb\\x1b[0m"
    many = one_line(" ".join(["word"] * 2000))
    assert len(many) < 700 and "(9999 characters)" in many
