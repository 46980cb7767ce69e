"""vbdfs: file-based virtual block devices for Xen Dom0.

Disk images (sparse raw or qcow2) kept as files in a storage directory are
served through a FUSE filesystem as plain raw files, so that loop, blktap's
aio driver, dd and backup tools work on every disk.
"""

__version__ = "0.1.0"
