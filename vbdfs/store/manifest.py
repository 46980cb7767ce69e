"""The manifest: what a raw image has no header for.

One JSON file per instance directory. It is read from disk that other nodes
(or a careless hand) may have written, so from_json() validates every field
and raises ManifestError with a message naming the problem.
"""

from __future__ import annotations

import json
import os
import re
import types

from ..images import FORMATS
from .names import InvalidName, check_instance_name, disk_name

MANIFEST = "manifest.json"
VERSION = 1
DRIVERS = ("loop", "blktap", "blktap2", "qdisk")
MAX_DISKS = 128
MAX_SIZE = (1 << 63) - 1    # the largest file size Linux has
# What Ganeti's ExtStorageDevice.SetInfo passes on (it replaces anything else with '_').
GANETI_METADATA_RE = re.compile(r"[-A-Za-z0-9_+.]{0,128}\Z")


class ManifestError(Exception):
    pass


class NoSuchDisk(LookupError):
    """Manifest.disk() found no such disk; the message names the instance and its disks."""

    def __str__(self) -> str:
        return self.args[0]


# Records are SimpleNamespace subclasses (attributes, repr and == for free)
# rather than dataclasses: importing dataclasses and building the classes
# cost vbdctl ~10 ms of start-up, most of a small export's overhead.
class Disk(types.SimpleNamespace):
    def __init__(self, index: int, format: str, driver: str, size: int, path: str):
        # size: virtual bytes; path: the image file, absolute
        super().__init__(index=index, format=format, driver=driver, size=size, path=path)

    def replace(self, **changes) -> "Disk":
        return Disk(**{**vars(self), **changes})

    @property
    def name(self) -> str:
        return disk_name(self.index)

    @property
    def logical_id(self) -> list:
        # Ganeti's file disks carry [driver, path]; the format joins them here.
        return [self.driver, self.format, self.path]

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "format": self.format,
                "driver": self.driver, "size": self.size, "logical_id": self.logical_id}


class Manifest(types.SimpleNamespace):
    # ganeti: None for vbdctl's instances; for a Ganeti ExtStorage volume the
    # metadata Ganeti gave with setinfo (e.g. "originstname+inst1"), "" until then.
    def __init__(self, name: str, disks: list[Disk], os: str = "", primary: str = "",
                 secondary: str = "", ganeti: str | None = None):
        super().__init__(name=name, disks=disks, os=os, primary=primary, secondary=secondary,
                         ganeti=ganeti)

    def replace(self, **changes) -> "Manifest":
        return Manifest(**{**vars(self), **changes})

    def disk(self, name_or_index) -> Disk:
        for d in self.disks:
            if d.name == name_or_index or str(d.index) == str(name_or_index):
                return d
        raise NoSuchDisk(f"instance {self.name} has no disk {name_or_index} (it has "
                         f"{', '.join(d.name for d in self.disks) or 'none'})")

    def to_dict(self) -> dict:
        out = {"version": VERSION, "name": self.name, "os": self.os,
               "nodes": {"primary": self.primary, "secondary": self.secondary},
               "disks": [d.to_dict() for d in self.disks]}
        if self.ganeti is not None:
            out["ganeti"] = {"metadata": self.ganeti}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON: {e}") from None
        except RecursionError:
            raise ManifestError(f"{where}: nested too deeply to be a manifest") from None
        return cls.from_dict(raw, where)

    @classmethod
    def from_dict(cls, raw, where: str = "manifest") -> "Manifest":
        def fail(msg):
            raise ManifestError(f"{where}: {msg}")

        if not isinstance(raw, dict):
            fail("top level is not an object")
        if raw.get("version") != VERSION:
            fail(f"unsupported manifest version {raw.get('version')!r} (this vbdfs reads {VERSION})")
        name = raw.get("name")
        try:
            check_instance_name(name)
        except InvalidName as e:
            fail(str(e))
        nodes = raw.get("nodes", {})
        if not isinstance(nodes, dict):
            fail("nodes is not an object")
        strs = {"os": raw.get("os", ""), "primary": nodes.get("primary", ""),
                "secondary": nodes.get("secondary", "")}
        for k, v in strs.items():
            if not isinstance(v, str) or "\0" in v or "\n" in v or len(v) > 255:
                fail(f"{k} is not a short string")
        disks_raw = raw.get("disks")
        if not isinstance(disks_raw, list) or len(disks_raw) > MAX_DISKS:
            fail(f"disks is not a list of at most {MAX_DISKS}")
        disks = []
        for i, d in enumerate(disks_raw):
            if not isinstance(d, dict):
                fail(f"disk {i} is not an object")
            if d.get("index") != i or type(d.get("index")) is not int:
                fail(f"disk {i} has index {d.get('index')!r}: indices must be 0, 1, 2, ... in order")
            if d.get("name", disk_name(i)) != disk_name(i):
                fail(f"disk {i} is named {d.get('name')!r}, expected {disk_name(i)!r}")
            fmt, drv, size = d.get("format"), d.get("driver"), d.get("size")
            if fmt not in FORMATS:
                fail(f"disk {i} has unknown format {fmt!r}")
            if drv not in DRIVERS:
                fail(f"disk {i} has unknown driver {drv!r}")
            if type(size) is not int or not 0 <= size <= MAX_SIZE:
                fail(f"disk {i} has a bad size {size!r}")
            lid = d.get("logical_id")
            if (not isinstance(lid, list) or len(lid) != 3 or lid[0] != drv or lid[1] != fmt
                    or not isinstance(lid[2], str) or not os.path.isabs(lid[2])):
                fail(f"disk {i} has a bad logical_id {lid!r}")
            disks.append(Disk(index=i, format=fmt, driver=drv, size=size, path=lid[2]))
        ganeti = raw.get("ganeti")
        if ganeti is not None:
            meta = ganeti.get("metadata") if isinstance(ganeti, dict) else None
            if not isinstance(meta, str) or not GANETI_METADATA_RE.match(meta):
                fail(f"ganeti metadata {meta!r} is not what Ganeti's setinfo gives "
                     "(letters, digits, '-', '_', '+', '.'; at most 128)")
            ganeti = meta
        return cls(name=name, disks=disks, ganeti=ganeti, **strs)
