"""The storage directory: STORE/INSTANCE/{manifest.json, sda, sdb, ...}.

Every change to an instance happens under its lock (an OFD lock on
STORE/.vbdfs/locks/INSTANCE, so it works before the directory exists and
across nodes on shared storage), and the manifest is replaced atomically:
write a temp file, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import stat
import struct
import types

from ..images import ImageError, create_image, open_image
from ..images import qcow2_header
from ..images.confined import UnsafeFile, open_regular, stat_regular
from ..images.fileops import fsync_dir, write_atomic
from ..log import get_logger
from . import leases, paths
from .locks import LockBusy, ofd_lock
from .manifest import (DRIVERS, FORMATS, MANIFEST, MAX_DISKS, MAX_SIZE, Disk, Manifest,
                       ManifestError)
from .names import InvalidName, check_instance_name, disk_index, disk_name

log = get_logger(__name__)

STATE_DIR = ".vbdfs"   # not a valid instance name, so never listed as one


class StoreError(Exception):
    """A store operation failed; the message names the instance, disk or path."""


class DiskSpec(types.SimpleNamespace):
    """A disk to create. size None: adopt() takes the file's size; format
    None: adopt() probes the file, once."""

    def __init__(self, size: int | None, format: str | None = "raw", driver: str = "loop"):
        super().__init__(size=size, format=format, driver=driver)


RENAME_JOURNAL = f".{MANIFEST}.rename"   # the new manifest while a rename is under way
CONVERT_JOURNAL = f".{MANIFEST}.convert"  # the new manifest while a convert swaps an image


def convert_temps(disk: Disk) -> list[str]:
    """A convert's copies of disk (named .sdX.convert-PID beside it)."""
    return sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(disk.path)),
                                         f".{disk.name}.convert-*")))


class Store:
    def __init__(self, root: str, whitelist_file: str = "/etc/ganeti/file-storage-paths"):
        # Resolved, so that manifests name one spelling of every path.
        self.root = os.path.realpath(root)
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
            # Whatever it is: one that is not a regular file is listed, as broken.
            if os.path.lexists(os.path.join(self.root, name, MANIFEST)):
                names.append(name)
        return sorted(names)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.instance_dir(name))

    # --- manifests -----------------------------------------------------
    def load(self, name: str) -> Manifest:
        path = self.manifest_path(name)
        try:
            text = _read_manifest(path, self.root)
        except FileNotFoundError:
            raise StoreError(f"instance {name} does not exist in {self.root}") from None
        except UnsafeFile as e:
            raise ManifestError(str(e)) from None
        except OSError as e:
            raise ManifestError(f"{path}: {e.strerror}") from None
        m = Manifest.from_json(text, where=path)
        meta_dir = os.path.dirname(path)
        rename_journal = os.path.join(meta_dir, RENAME_JOURNAL)
        if m.name != name:
            hint = ""
            if os.path.exists(rename_journal):
                hint = (f" (a rename was interrupted: {RENAME_JOURNAL} next to it holds the "
                        "new manifest; move it over the manifest to finish the rename)")
            raise ManifestError(f"{path}: names instance {m.name!r}, expected {name!r}{hint}")
        if os.path.exists(rename_journal):
            # Some data directories may already carry the new name: the disks
            # named here can be missing, and remove would orphan them.
            raise ManifestError(
                f"{path}: a rename of this instance was interrupted ({rename_journal} holds "
                "the manifest under the new name). If every disk file this manifest names "
                "still exists, nothing was moved: delete the journal. Otherwise finish it: "
                "rename this directory to the new name and move the journal over "
                "manifest.json there.")
        self._check_convert(m, path)
        for d in m.disks:
            self.check_disk_path(name, d.name, d.path, where=path)
        return m

    def _check_convert(self, m: Manifest, path: str) -> None:
        """Refuse an instance whose convert was interrupted, saying which way to go.

        The image may already be in the new format while the manifest names
        the old one: serving it so could let a guest overwrite qcow2 metadata,
        or have a raw disk's own bytes parsed as a qcow2 header. Which way is
        decided by the converted copy, never by a header a guest could write:
        convert renames its temp file over the disk only after the journal is
        written, and on failure removes the journal before the temp file.
        """
        journal = os.path.join(os.path.dirname(path), CONVERT_JOURNAL)
        if not os.path.exists(journal):
            return
        temps = [t for d in m.disks for t in convert_temps(d)]
        if temps:
            how = (f"the disk was not swapped yet and is as it was: delete {journal} and "
                   f"{', '.join(temps)}")
        else:
            how = f"the converted image is in place: move {journal} over {path}"
        raise ManifestError(f"{path}: a convert of this instance was interrupted; {how}")

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
        # Whoever can write the (shared) storage must not redirect a disk elsewhere.
        for p in (inst_dir, path):
            if os.path.islink(p):
                raise ManifestError(f"{where}: disk {disk}: {p} is a symlink; vbdfs does "
                                    "not follow symlinks in the store")
        if parent == self.root:
            return
        try:
            real = paths.check_custom_dir(parent, self.whitelist_file)
        except paths.UnsafePath as e:
            raise ManifestError(f"{where}: disk {disk}: {e}") from None
        if real != parent:
            raise ManifestError(f"{where}: disk {disk}: {parent} leads through a symlink "
                                f"to {real}")

    def disk_root(self, path: str) -> str:
        """The directory a disk file is opened below (confined.open_regular):
        the store, or the whitelisted custom directory of its instance."""
        parent = os.path.dirname(os.path.dirname(path))
        if parent == self.root:
            return parent
        try:
            real = paths.check_custom_dir(parent, self.whitelist_file)
        except paths.UnsafePath as e:
            raise UnsafeFile(path, f"is outside the store: {e}") from None
        if real != parent:
            raise UnsafeFile(path, f"is outside the store: {parent} leads through a "
                             f"symlink to {real}")
        return parent

    def open_disk(self, disk: Disk, read_only: bool = False):
        """The disk's Image; refused unless it is a regular file inside its directory."""
        return open_image(disk.path, disk.format, read_only=read_only,
                          store_root=self.disk_root(disk.path))

    def stat_disk(self, disk: Disk) -> os.stat_result:
        """The disk file's stat, by open_disk()'s rules (UnsafeFile if it breaks them)."""
        return stat_regular(disk.path, self.disk_root(disk.path))

    def save(self, manifest: Manifest) -> None:
        """Replace the manifest atomically. The caller holds the instance lock."""
        write_atomic(self.manifest_path(manifest.name), manifest.to_json().encode())

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool = True):
        """Serialize changes to one instance (across processes and nodes).

        An OFD lock belongs to its open file: taking the same instance's lock
        twice in one process blocks forever, so never nest lock(name).
        """
        check_instance_name(name)
        path = os.path.join(self.state_dir("locks"), name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                ofd_lock(fd, exclusive=True, wait=False)
            except LockBusy:
                if not wait:
                    raise LockBusy(f"instance {name} is locked by another process") from None
                log.warning("instance %s is locked by another process; waiting", name)
                ofd_lock(fd, exclusive=True, wait=True)
            yield
        finally:
            os.close(fd)   # closing the only descriptor releases the OFD lock

    @contextlib.contextmanager
    def lock_many(self, *names: str):
        """Several instances' locks, always taken in sorted order (no deadlock)."""
        with contextlib.ExitStack() as stack:
            for name in sorted(set(names)):
                stack.enter_context(self.lock(name))
            yield

    def _check_root(self) -> None:
        self.check_exists()
        try:
            paths.check_not_forbidden(self.root)
        except paths.UnsafePath as e:
            raise StoreError(f"store {self.root} refused: {e}") from None

    def _data_dir(self, name: str, directory: str | None) -> str:
        """Where the disk files go: STORE/NAME or, whitelisted, DIR/NAME."""
        if directory is not None:
            directory = paths.check_custom_dir(directory, self.whitelist_file)
            if directory == self.root:
                directory = None
        return paths.join_below(directory or self.root, name)

    @staticmethod
    def check_specs(name: str, disks) -> None:
        for i, spec in enumerate(disks):
            if spec.format is not None and spec.format not in FORMATS:
                raise StoreError(f"instance {name} disk {i}: unknown format {spec.format!r}")
            if spec.driver not in DRIVERS:
                raise StoreError(f"instance {name} disk {i}: unknown driver {spec.driver!r}")
            if spec.size is not None and spec.size <= 0:
                raise StoreError(f"instance {name} disk {i}: size must be positive")
            if spec.size is not None and (spec.size % 512 or spec.size > MAX_SIZE):
                # A block device is whole 512-byte sectors; loop would drop a partial one.
                raise StoreError(f"instance {name} disk {i}: size {spec.size} is not a whole "
                                 "number of 512-byte sectors (or is too large)")
        if not disks:
            raise StoreError(f"instance {name}: no disks")
        if len(disks) > MAX_DISKS:
            raise StoreError(f"instance {name}: {len(disks)} disks, at most {MAX_DISKS}")

    # --- lifecycle -----------------------------------------------------
    def create(self, name: str, disks: list[DiskSpec], directory: str | None = None,
               os_name: str = "", primary: str = "", secondary: str = "",
               ganeti: str | None = None) -> Manifest:
        """Create an instance with new sparse disks. On any error nothing is left behind.

        ganeti: "" for a Ganeti ExtStorage volume (see Manifest)."""
        self._check_root()
        meta_dir = self.instance_dir(name)
        data_dir = self._data_dir(name, directory)
        self.check_specs(name, disks)
        for i, spec in enumerate(disks):
            if spec.size is None:
                raise StoreError(f"instance {name} disk {i}: no size given")
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
                             secondary=secondary, ganeti=ganeti)
                for i, spec in enumerate(disks):
                    path = os.path.join(data_dir, disk_name(i))
                    fmt = spec.format or "raw"
                    # Listed first: an engine can fail after creating the file (EFBIG),
                    # and the directory is ours, fresh, so the name is no one else's.
                    made.append(path)
                    create_image(path, fmt, spec.size).close()
                    m.disks.append(Disk(index=i, format=fmt, driver=spec.driver,
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

    def adopt(self, name: str, disks: list[DiskSpec] | None = None,
              directory: str | None = None, os_name: str = "", primary: str = "",
              secondary: str = "", driver: str = "loop") -> Manifest:
        """Make an instance of disk files already in its directory (`reuse`).

        The files must be named sda, sdb, ... by index, be regular files with
        one link, and be the only entries there (but for the external data file
        a qcow2 disk names next to it). With disks=None every sdX
        found is adopted. A disk's format, if not given, is probed here, once,
        and recorded; it is never probed again (a guest can write any header
        into a raw disk). On error nothing changes: adopted files stay as they were.
        """
        self._check_root()
        meta_dir = self.instance_dir(name)
        data_dir = self._data_dir(name, directory)
        if disks is not None:
            self.check_specs(name, disks)
        with self.lock(name):
            if os.path.lexists(os.path.join(meta_dir, MANIFEST)):
                raise StoreError(f"instance {name} already exists ({meta_dir})")
            if data_dir != meta_dir and os.path.lexists(meta_dir):
                raise StoreError(f"instance {name}: {meta_dir} already exists")
            st = _lstat(data_dir)
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"instance {name}: nothing to reuse: {data_dir} "
                                 "is not a directory")
            specs = self._adoptable(name, data_dir, disks, driver)
            m = Manifest(name=name, disks=[], os=os_name, primary=primary, secondary=secondary)
            for i, spec in enumerate(specs):
                path = os.path.join(data_dir, disk_name(i))
                root = self.disk_root(path)
                fmt = spec.format or probe_format(path, root)
                if spec.format == "raw" and qcow2_header.MAGIC == _head(path, 4, root):
                    log.warning("instance %s: reusing %s as raw, as asked, although it "
                                "starts with a qcow header", name, path)
                try:
                    with open_image(path, fmt, read_only=True, store_root=root) as img:
                        size = img.size
                except (OSError, ImageError) as e:
                    raise StoreError(f"instance {name}: cannot reuse {path} as {fmt}: {e}") \
                        from None
                if spec.size is not None and spec.size != size:
                    raise StoreError(f"instance {name}: {path} is {size} bytes, "
                                     f"but disk {i} was given as {spec.size}")
                if size == 0:
                    raise StoreError(f"instance {name}: {path} is empty")
                m.disks.append(Disk(index=i, format=fmt, driver=spec.driver, size=size,
                                    path=path))
            made = meta_dir != data_dir
            try:
                if made:
                    os.mkdir(meta_dir, 0o700)
                self.save(m)
                fsync_dir(self.root)
            except BaseException:
                _remove_quietly(os.path.join(meta_dir, MANIFEST))
                if made:
                    _remove_quietly(meta_dir)
                raise
        return m

    @staticmethod
    def _adoptable(name: str, data_dir: str, disks, driver: str) -> list[DiskSpec]:
        """The specs to adopt, or StoreError naming every missing or misnamed file."""
        found, misnamed = {}, []
        for entry in sorted(os.listdir(data_dir)):
            try:
                index = disk_index(entry)
            except InvalidName:
                misnamed.append(entry)
                continue
            if index >= MAX_DISKS:
                misnamed.append(entry)
            else:
                found[index] = entry
        if disks is None:
            count = 0
            while count in found:
                count += 1
            disks = [DiskSpec(size=None, format=None, driver=driver)] * count
        problems = []
        if not disks:
            problems.append(f"no disk files (sda, sdb, ...) in {data_dir}")
        missing = [disk_name(i) for i in range(len(disks)) if i not in found]
        if missing:
            problems.append("missing " + ", ".join(os.path.join(data_dir, n) for n in missing))
        extra = [found[i] for i in sorted(found) if i >= len(disks)]
        if extra:
            problems.append(f"not among the {len(disks)} disks to reuse: "
                            + ", ".join(os.path.join(data_dir, n) for n in extra))
        if misnamed:    # a qcow2 disk's external data file, next to it, is its own
            data_files = {qcow2_header.data_file_of(os.path.join(data_dir, found[i]), data_dir)
                          for i in found}
            misnamed = [e for e in misnamed if e not in data_files]
        if misnamed:
            problems.append("misnamed (disks must be named sda, sdb, ... by index): "
                            + ", ".join(os.path.join(data_dir, n) for n in misnamed))
        for i in range(len(disks)):
            if i not in found:
                continue
            path = os.path.join(data_dir, found[i])
            st = _lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode):
                problems.append(f"{path} is not a regular file (symlinks and devices "
                                "are not adopted)")
            elif st.st_nlink != 1:
                problems.append(f"{path} has {st.st_nlink} hard links; adopt only a file "
                                "that nothing else names")
        if problems:
            raise StoreError(f"instance {name}: cannot reuse: " + "; ".join(problems))
        return disks

    def remove(self, name: str, check=None) -> None:
        """Delete the disk files, the manifest and the directories.

        check(manifest), if given, runs under the lock first and raises to refuse.
        """
        self._check_root()
        with self.lock(name):
            m = self.load(name)
            if check is not None:
                check(m)
            meta_dir = self.instance_dir(name)
            owned = self.owned_data_files(m, m.disks)     # read from the images: before they go
            for d in m.disks:
                _remove_quietly(d.path)
            for path in owned:          # after the images: a crash between leaks, breaks nothing
                _remove_quietly(path)
            data_dirs = {os.path.dirname(d.path) for d in m.disks} - {meta_dir}
            for directory in data_dirs | {meta_dir}:
                _remove_leftovers(directory)
            # Manifest last: a crash half-way leaves a listed instance, not orphans.
            os.unlink(os.path.join(meta_dir, MANIFEST))
            for d in sorted(data_dirs) + [meta_dir]:
                _remove_quietly(d)
            fsync_dir(self.root)

    def owned_data_files(self, m: Manifest, disks) -> list[str]:
        """The external data files that only these qcow2 disks of instance m use
        (adopted with them: `vbdctl add -t file,reuse`), which go when they go.
        Owned: next to its disk, a regular file with one name, not a disk, and
        named as data file by no disk of any instance but these (an instance
        whose manifest cannot be read might name it: then nothing is owned)."""
        mine = {d.path for d in disks}
        wanted = set()
        for d in disks:
            path = self._data_file_path(d)
            if path is None or os.path.dirname(path) != os.path.dirname(d.path):
                continue
            st = _lstat(path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                wanted.add(path)
        for name in self.instances() if wanted else ():
            try:
                others = self.load(name).disks if name != m.name else m.disks
            except (StoreError, ManifestError, OSError):
                return []
            for other in others:
                wanted.discard(other.path)                # a disk is never a data file
                if other.path not in mine:
                    wanted.discard(self._data_file_path(other))
        return sorted(wanted)

    def _data_file_path(self, d) -> str | None:
        """Where a qcow2 disk's header says its external data file is, or None."""
        if d.format != "qcow2":
            return None
        try:
            name = qcow2_header.data_file_of(d.path, self.disk_root(d.path))
        except OSError:
            return None
        if not name:
            return None
        return os.path.normpath(os.path.join(os.path.dirname(d.path), name))

    def rename(self, old: str, new: str, check=None) -> Manifest:
        """Rename an instance: its directories (store and custom) and manifest.

        Both locks are held, in sorted order. Each directory rename is atomic;
        the commit point is the rename of STORE/OLD to STORE/NEW, after which
        the new manifest (written beforehand as RENAME_JOURNAL) replaces the
        old. A failure before the commit undoes the directory renames.
        """
        self._check_root()
        check_instance_name(new)
        if old == new:
            raise StoreError(f"instance {old}: the new name is the same")
        with self.lock_many(old, new):
            m = self.load(old)
            if check is not None:
                check(m)
            old_meta, new_meta = self.instance_dir(old), self.instance_dir(new)
            if os.path.lexists(new_meta):
                raise StoreError(f"cannot rename {old} to {new}: {new_meta} already exists")
            moves = []
            for src in sorted({os.path.dirname(d.path) for d in m.disks} - {old_meta}):
                parent = paths.check_custom_dir(os.path.dirname(src), self.whitelist_file)
                dst = paths.join_below(parent, new)
                if os.path.lexists(dst):
                    raise StoreError(f"cannot rename {old} to {new}: {dst} already exists")
                moves.append((src, dst))
            where = {src: dst for src, dst in moves}
            where[old_meta] = new_meta
            new_m = Manifest(name=new, os=m.os, primary=m.primary, secondary=m.secondary,
                             disks=[d.replace(path=os.path.join(
                                 where[os.path.dirname(d.path)], d.name)) for d in m.disks])
            journal = os.path.join(old_meta, RENAME_JOURNAL)
            write_atomic(journal, new_m.to_json().encode())
            done = []
            try:
                for src, dst in moves + [(old_meta, new_meta)]:
                    os.rename(src, dst)
                    done.append((src, dst))
            except BaseException as e:
                for src, dst in reversed(done):
                    os.rename(dst, src)
                _remove_quietly(journal)
                if isinstance(e, OSError):
                    raise StoreError(f"cannot rename {old} to {new}: {e}") from None
                raise
            os.rename(os.path.join(new_meta, RENAME_JOURNAL), os.path.join(new_meta, MANIFEST))
            fsync_dir(new_meta)
            for d in {self.root} | {os.path.dirname(dst) for _, dst in moves}:
                fsync_dir(d)
        return new_m

    def read_only_reason(self, disk: Disk) -> str | None:
        """Why disk's image opens only read-only (qcow2 dirty, corrupt, ...), or None.

        None too when the image cannot be opened at all: that is an error of
        its own, reported where the disk is used.
        """
        try:        # open_disk never opens a FIFO or device for I/O, nor leaves the store
            with self.open_disk(disk, read_only=True) as img:
                return img.read_only_reason
        except (OSError, ImageError):
            return None

    def grow(self, name: str, disk, new_size: int | None = None, growth: int | None = None,
             check=None, node: str = "") -> Disk:
        """Grow one disk to new_size bytes, or by growth bytes (never shrink).

        The image grows first and the manifest after, so a crash in between
        leaves an image larger than the manifest says, which the daemon
        tolerates (it serves the image's size).
        """
        self._check_root()
        with self.lock(name):
            m = self.load(name)
            d = m.disk(disk)
            if (new_size is None) == (growth is None):
                raise ValueError("give new_size or growth")
            if growth is not None:
                if growth <= 0:
                    raise StoreError(f"instance {name} disk {d.name}: growth must be positive")
                new_size = d.size + growth
            if new_size < d.size:
                raise StoreError(f"instance {name} disk {d.name}: cannot shrink from "
                                 f"{d.size} to {new_size} bytes")
            if new_size == d.size:
                raise StoreError(f"instance {name} disk {d.name} is already {d.size} bytes")
            if check is not None:
                check(m)
            # The write lease keeps every daemon (any node) and qemu from
            # writing the image while its tables are rewritten.
            try:
                lease = leases.acquire(d.path, self.state_dir("leases"), name, d.name,
                                       node or os.uname().nodename, by="vbdctl grow",
                                       root=self.disk_root(d.path))
            except leases.LeaseBusy as e:
                raise StoreError(f"instance {name} disk {d.name}: cannot grow: {e}") from None
            try:
                with self.open_disk(d) as img:
                    if img.size < new_size:
                        img.resize(new_size)
                        img.flush()
                d.size = new_size
                self.save(m)
            except (OSError, ImageError) as e:
                raise StoreError(f"instance {name} disk {d.name}: {e}") from None
            finally:
                lease.release()
        return d

    def create_staged(self, name: str, fill, directory: str | None = None, os_name: str = "",
                      primary: str = "", secondary: str = "",
                      ganeti: str | None = None) -> Manifest:
        """Create an instance whose disk files fill(staged_dir) writes (import).

        fill runs under the instance's lock with a fresh hidden directory next
        to the data directory (same filesystem; a dot name is never an
        instance) and returns one DiskSpec (size, format, driver) per file
        sda, sdb, ... it made there. The directory then becomes the data
        directory and the manifest is written last, so no half-made instance
        is ever listed; on any error everything is removed.
        """
        import shutil
        import tempfile
        self._check_root()
        meta_dir = self.instance_dir(name)
        data_dir = self._data_dir(name, directory)
        with self.lock(name):
            def check_free():
                for d in {meta_dir, data_dir}:
                    if os.path.lexists(d):
                        raise StoreError(f"instance {name} already exists ({d})")
            check_free()
            # A killed import's staging directory: no import of this name can
            # be running (we hold its lock), so it is garbage.
            parent = os.path.dirname(data_dir)
            for stale in glob.glob(os.path.join(glob.escape(parent), f".{name}.staged-*")):
                log.warning("removing %s, left by an import that was killed", stale)
                shutil.rmtree(stale, ignore_errors=True)
            staged = tempfile.mkdtemp(prefix=f".{name}.staged-", dir=parent)
            made: list[str] = []
            try:
                disks = fill(staged)
                self.check_specs(name, disks)
                check_free()
                os.rename(staged, data_dir)
                made.append(data_dir)
                if meta_dir != data_dir:
                    os.mkdir(meta_dir, 0o700)
                    made.append(meta_dir)
                m = Manifest(name=name, os=os_name, primary=primary, secondary=secondary,
                             ganeti=ganeti, disks=[Disk(index=i, format=s.format, driver=s.driver, size=s.size,
                                         path=os.path.join(data_dir, disk_name(i)))
                                    for i, s in enumerate(disks)])
                self.save(m)
                for d in {self.root, os.path.dirname(data_dir)}:
                    fsync_dir(d)
            except BaseException as e:
                _remove_quietly(os.path.join(meta_dir, MANIFEST))
                for d in [staged] + made:
                    shutil.rmtree(d, ignore_errors=True)
                if isinstance(e, (OSError, ImageError)):
                    raise StoreError(f"instance {name}: {e}") from None
                raise
        return m


def _read_manifest(path: str, root: str) -> bytes:
    """Read a manifest; retry once on ESTALE, which NFS and GlusterFS clients
    return when another node renamed a new manifest over the one they had."""
    try:
        return _head(path, 1 << 20, root)
    except OSError as e:
        if e.errno != errno.ESTALE:
            raise
    return _head(path, 1 << 20, root)


def _head(path: str, n: int, root: str | None) -> bytes:
    with open(open_regular(path, os.O_RDONLY, root), "rb") as f:
        return f.read(n)


def probe_format(path: str, root: str) -> str:
    """'qcow2', 'qcow' (version 1) or 'raw' from the file's header. Only for
    adoption: the result is recorded in the manifest and the file is never
    probed again."""
    head = _head(path, 8, root)
    if head[:4] == qcow2_header.MAGIC:
        version = struct.unpack(">I", head[4:8])[0] if len(head) == 8 else 0
        if version in (2, 3):
            return "qcow2"
        if version == 1:
            return "qcow"
        raise StoreError(f"{path} is a qcow version {version} image; only versions 1 (qcow) "
                         "2 and 3 (qcow2) are supported")
    return "raw"


def _lstat(path: str):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None

def _remove_leftovers(directory: str) -> None:
    """Our own temp files a killed vbdctl left (a convert's copy, a manifest's temp)."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(".") and (".convert-" in entry or
                                      entry.startswith(f".{MANIFEST}.tmp.")):
            _remove_quietly(os.path.join(directory, entry))


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
