"""vbdctl list, and the options every command shares."""

import json
import os
import subprocess
import sys

from conftest import MiB, make_instance


def vbdctl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vbdfs.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_list_text_and_json(store):
    make_instance(store, "web", 64 * MiB)
    make_instance(store, "db", MiB, MiB)
    r = vbdctl("--store", store.root, "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["Instance", "Disks", "Size"]
    assert [l.split()[0] for l in lines[1:]] == ["db", "web"]
    r = vbdctl("--store", store.root, "list", "--output", "json")
    items = json.loads(r.stdout)
    assert [(i["name"], i["disks"], i["size"]) for i in items] == [("db", 2, 2 * MiB),
                                                                   ("web", 1, 64 * MiB)]


def test_list_reports_broken_manifest_and_fails(store):
    make_instance(store, "web", MiB)
    make_instance(store, "bad", MiB)
    open(store.manifest_path("bad"), "w").write("[]")
    r = vbdctl("--store", store.root, "list", "--output", "json")
    assert r.returncode == 1
    items = {i["name"]: i for i in json.loads(r.stdout)}
    assert "top level is not an object" in items["bad"]["error"]
    assert items["web"]["disks"] == 1


def test_store_from_env_and_flag_precedence(store, tmp_path):
    make_instance(store, "web", MiB)
    env = dict(os.environ, VBDFS_STORE=store.root, VBDFS_CONFIG=str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text(f'store = "{tmp_path}/elsewhere"\n')
    r = vbdctl("list", "--output", "json", env=env)
    assert [i["name"] for i in json.loads(r.stdout)] == ["web"]
    r = vbdctl("--store", str(tmp_path / "missing"), "list", env=env)
    assert r.returncode == 1 and "missing does not exist" in r.stderr


def test_usage_errors_exit_2():
    assert vbdctl("no-such-command").returncode == 2
    assert vbdctl().returncode == 2


def test_command_table_matches_the_modules():
    """vbdctl loads only the invoked command's module: its table must be right."""
    import argparse
    import importlib
    from vbdfs import cli
    for module in set(cli.COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"vbdfs.cli.{module}").register(sub)
        registered = set(sub.choices)
        assert registered == {c for c, m in cli.COMMANDS.items() if m == module}, module
    assert cli.command_in(["--store", "export", "-v", "list", "x"]) == "list"
    assert cli.command_in(["--node", "n1", "export", "web", "/tmp"]) == "export"
    assert cli.command_in(["-v"]) is None


def test_help_lists_every_command():
    r = vbdctl("--help")
    from vbdfs import cli
    assert r.returncode == 0
    for command in cli.COMMANDS:
        assert f"    {command} " in r.stdout, command
