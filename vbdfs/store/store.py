"""The storage directory: STORE/INSTANCE/{manifest.json, sda, sdb, ...}.

Every change to an instance happens under its lock (an OFD lock on
STORE/.vbdfs/locks/INSTANCE, so it works before the directory exists and
across nodes on shared storage), and the manifest is replaced atomically:
write a temp file, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os

from ..images import ImageError, create_image
from ..images.fileops import fsync_dir
from . import paths
from .locks import locked_file
from .manifest import DRIVERS, FORMATS, MANIFEST, Disk, Manifest, ManifestError
from .names import InvalidName, check_instance_name, disk_name

log = logging.getLogger(__name__)

STATE_DIR = ".vbdfs"   # not a valid instance name, so never listed as one


class StoreError(Exception):
    """A store operation failed; the message names the instance, disk or path."""


@dataclasses.dataclass
class DiskSpec:
    size: int
    format: str = "raw"
    driver: str = "loop"


class Store:
    def __init__(self, root: str, whitelist_file: str = "/etc/ganeti/file-storage-paths"):
        self.root = os.path.abspath(root)
        self.whitelist_file = whitelist_file

    # --- layout --------------------------------------------------------
    def check_exists(self) -> None:
        if not os.path.isdir(self.root):
            raise StoreError(f"store {self.root} does not exist or is not a directory")

    def instance_dir(self, name: str) -> str:
        return paths.join_below(self.root, check_instance_name(name))

    def manifest_path(self, name: str) -> str:
        return os.path.join(self.instance_dir(name), MANIFEST)

    def state_dir(self, *sub: str) -> str:
        path = os.path.join(self.root, STATE_DIR, *sub)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def instances(self) -> list[str]:
        """Names of the directories that hold a manifest (valid or not)."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        names = []
        for name in entries:
            try:
                check_instance_name(name)
            except InvalidName:
                continue
            if os.path.isfile(os.path.join(self.root, name, MANIFEST)):
                names.append(name)
        return sorted(names)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.instance_dir(name))

    # --- manifests -----------------------------------------------------
    def load(self, name: str) -> Manifest:
        path = self.manifest_path(name)
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20)
        except FileNotFoundError:
            raise StoreError(f"instance {name} does not exist in {self.root}") from None
        except OSError as e:
            raise ManifestError(f"{path}: {e.strerror}") from None
        m = Manifest.from_json(text, where=path)
        if m.name != name:
            raise ManifestError(f"{path}: names instance {m.name!r}, expected {name!r}")
        for d in m.disks:
            self.check_disk_path(name, d.name, d.path, where=path)
        return m

    def check_disk_path(self, instance: str, disk: str, path: str, where: str) -> None:
        """A disk file is DIR/INSTANCE/DISK with DIR the store or a whitelisted directory."""
        try:
            norm = paths.normalise(path)
        except paths.UnsafePath as e:
            raise ManifestError(f"{where}: disk {disk}: {e}") from None
        inst_dir, base = os.path.split(norm)
        parent, inst = os.path.split(inst_dir)
        if base != disk or inst != instance or norm != path:
            raise ManifestError(f"{where}: disk {disk} path {path} is not "
                                f".../{instance}/{disk}")
        if parent == self.root:
            return
        try:
            paths.check_custom_dir(parent, self.whitelist_file)
        except paths.UnsafePath as e:
            raise ManifestError(f"{where}: disk {disk}: {e}") from None

    def save(self, manifest: Manifest) -> None:
        """Replace the manifest atomically. The caller holds the instance lock."""
        path = self.manifest_path(manifest.name)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f".{MANIFEST}.tmp.{os.getpid()}")
        data = manifest.to_json().encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(directory)

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool = True):
        """Serialize changes to one instance (across processes and nodes)."""
        check_instance_name(name)
        with locked_file(os.path.join(self.state_dir("locks"), name), wait=wait):
            yield

    # --- lifecycle -----------------------------------------------------
    def create(self, name: str, disks: list[DiskSpec], directory: str | None = None,
               os_name: str = "", primary: str = "", secondary: str = "") -> Manifest:
        """Create an instance with new sparse disks. On any error nothing is left behind."""
        self.check_exists()
        meta_dir = self.instance_dir(name)
        if directory is not None:
            directory = paths.check_custom_dir(directory, self.whitelist_file)
            if directory == self.root:
                directory = None
        data_dir = paths.join_below(directory or self.root, name)
        for i, spec in enumerate(disks):
            if spec.format not in FORMATS:
                raise StoreError(f"instance {name} disk {i}: unknown format {spec.format!r}")
            if spec.driver not in DRIVERS:
                raise StoreError(f"instance {name} disk {i}: unknown driver {spec.driver!r}")
            if spec.size <= 0:
                raise StoreError(f"instance {name} disk {i}: size must be positive")
        made: list[str] = []
        with self.lock(name):
            if os.path.lexists(meta_dir):
                raise StoreError(f"instance {name} already exists ({meta_dir})")
            if data_dir != meta_dir and os.path.lexists(data_dir):
                raise StoreError(f"instance {name}: {data_dir} already exists")
            try:
                os.mkdir(meta_dir, 0o700)
                made.append(meta_dir)
                if data_dir != meta_dir:
                    os.mkdir(data_dir, 0o700)
                    made.append(data_dir)
                m = Manifest(name=name, disks=[], os=os_name, primary=primary,
                             secondary=secondary)
                for i, spec in enumerate(disks):
                    path = os.path.join(data_dir, disk_name(i))
                    create_image(path, spec.format, spec.size).close()
                    made.append(path)
                    m.disks.append(Disk(index=i, format=spec.format, driver=spec.driver,
                                        size=spec.size, path=path))
                self.save(m)
                fsync_dir(self.root)
            except BaseException as e:
                for path in reversed(made):
                    _remove_quietly(path)
                if isinstance(e, (OSError, ImageError)):
                    raise StoreError(f"instance {name}: {e}") from None
                raise
        return m

    def remove(self, name: str) -> None:
        """Delete the disk files, the manifest and the directories."""
        with self.lock(name):
            m = self.load(name)
            meta_dir = self.instance_dir(name)
            for d in m.disks:
                _remove_quietly(d.path)
            data_dirs = {os.path.dirname(d.path) for d in m.disks} - {meta_dir}
            # Manifest last: a crash half-way leaves a listed instance, not orphans.
            os.unlink(os.path.join(meta_dir, MANIFEST))
            for d in sorted(data_dirs) + [meta_dir]:
                _remove_quietly(d)
            fsync_dir(self.root)


def _remove_quietly(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            log.warning("leaving %s: not empty", path)
        else:
            raise
