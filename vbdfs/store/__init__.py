"""The instance store: directories, manifests, locks and path safety."""

from .manifest import Disk, Manifest, ManifestError, NoSuchDisk, MANIFEST, FORMATS, DRIVERS
from .names import InvalidName, check_instance_name, disk_name, disk_index
from .paths import UnsafePath
from .sizes import SizeError, parse_growth, parse_size
from .store import DiskSpec, Store, StoreError

__all__ = ["Disk", "Manifest", "ManifestError", "NoSuchDisk", "MANIFEST", "FORMATS", "DRIVERS",
           "InvalidName", "check_instance_name", "disk_name", "disk_index",
           "UnsafePath", "DiskSpec", "Store", "StoreError",
           "SizeError", "parse_size", "parse_growth"]
