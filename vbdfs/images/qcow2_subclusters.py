"""Extended L2 entries (qcow2 `extended_l2=on`): 32 subclusters per cluster.

An extended L2 entry is the standard 64-bit descriptor followed by a 64-bit
bitmap: bit s (0..31) says subcluster s is allocated (its data lies at the
cluster's host offset + s * subcluster size), bit 32+s that it reads as
zeros; neither means it falls through to the backing file (or reads zeros
without one). The descriptor's zero flag is unused; compressed clusters
have a zero bitmap and are whole-cluster as in standard images.

The engine keeps L2 tables as arrays of 64-bit words, so entry i is word 2i
and its bitmap word 2i+1. Qcow2Image calls the methods here instead of its
standard ones when the image has extended entries; the standard paths are
unchanged. Writing:
* into a cluster of its own (COPIED): in place; a subcluster that was not
  allocated is completed first where the write does not cover it (from the
  backing file, or zeros), then marked allocated;
* into an unallocated cluster: a fresh cluster (it reads as zeros), of which
  only the subclusters the write touches are completed and marked
  allocated; the others keep their zero bit or keep falling through;
* into a cluster shared with a snapshot: a fresh cluster, into which only
  the allocated subclusters the write does not cover are copied; the bitmap
  is kept but for the subclusters written;
* into a compressed cluster: a fresh cluster with all of its content, every
  subcluster allocated.
Zeroing sets zero bits (whole clusters drop their host cluster); parts of
subclusters are written as zeros.
"""

from __future__ import annotations

from .base import ImageError
from .fileops import pread_full, pwrite_full

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00
EXT_RESERVED = 0x3F000000000001FF      # the zero flag (bit 0) is unused with extended entries
ALL = 0xFFFFFFFF
ZERO_ALL = ALL << 32

# kinds, as in qcow2._map
_DATA, _ZERO, _UNALLOC, _COMPRESSED = range(4)


class SubclusterMixin:
    def _x_entry(self, ents, i: int, g: int) -> tuple[int, int, int]:
        """(entry, bitmap, host offset or 0) of L2 index i, checked."""
        e, b = ents[2 * i], ents[2 * i + 1]
        if e & COMPRESSED:
            if b:
                self._x_bad(e, g, "a compressed cluster with a subcluster bitmap")
            return e, b, 0
        off = e & OFFSET_MASK
        external = self.dfd != self.fd      # a data file's offset 0 is COPIED
        limit = self._data_end if external else self._file_end
        if e & EXT_RESERVED or off & (self.cs - 1) or off >= limit or (
                not off and e & COPIED and not external):
            self._x_bad(e, g, "invalid or points outside the file")
        if b & (b >> 32) & ALL:
            self._x_bad(e, g, f"subcluster bitmap {b:#x} marks subclusters both "
                              f"allocated and zero")
        if not off and not (external and e & COPIED) and b & ALL:
            self._x_bad(e, g, f"subcluster bitmap {b:#x} allocates subclusters of an "
                              f"unallocated cluster")
        return e, b, off

    def _x_bad(self, e: int, g: int, why: str):
        raise ImageError(f"{self.path}: L2 entry for guest offset "
                         f"{g << self.cluster_bits:#x} ({e:#x}): {why}")

    def _x_kind(self, b: int, s: int) -> int:
        if b >> s & 1:
            return _DATA
        return _ZERO if b >> (32 + s) & 1 else _UNALLOC

    # --- mapping ---------------------------------------------------------------
    def _x_map(self, ents, pos: int, g: int, tab_end: int) -> tuple[int, int, int]:
        """_map() for extended entries, once it has found the L2 table (entries
        `ents`) of guest cluster g: runs of one kind within a cluster (and
        across wholly unallocated clusters) up to tab_end."""
        bits, cs = self.cluster_bits, self.cs
        sbits = bits - 5
        i = g & self.l2_mask
        e, b, off = self._x_entry(ents, i, g)
        cend = min(tab_end, (g + 1) << bits)
        if e & COMPRESSED:
            return _COMPRESSED, e, cend - pos
        if not e and not b:             # wholly unallocated: skip its neighbours too
            nxt = cend
            while nxt < tab_end and not ents[2 * (i + 1)] and not ents[2 * (i + 1) + 1]:
                i += 1
                nxt = min(tab_end, nxt + cs)
            return _UNALLOC, 0, nxt - pos
        s = (pos & (cs - 1)) >> sbits
        kind = self._x_kind(b, s)
        nxt = min(cend, (g << bits) + ((s + 1) << sbits))
        while nxt < cend and self._x_kind(b, (nxt & (cs - 1)) >> sbits) == kind:
            nxt = min(cend, nxt + (1 << sbits))
        host = off + (pos & (cs - 1)) if kind == _DATA else 0
        return kind, host, nxt - pos

    # --- writing ---------------------------------------------------------------
    def _x_write_table(self, t, pos: int, end: int, mv: memoryview, base: int) -> None:
        bits, cs = self.cluster_bits, self.cs
        sbits = bits - 5
        ents = t.entries
        while pos < end:
            g = pos >> bits
            i = g & self.l2_mask
            e, b, off = self._x_entry(ents, i, g)
            cbase = g << bits
            run_end = min(end, cbase + cs)
            lo, hi = pos - cbase, run_end - cbase
            s0, s1 = lo >> sbits, (hi - 1) >> sbits
            touched = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
            data = mv[pos - base:run_end - base]
            if e & (COPIED | COMPRESSED) == COPIED:         # ours: in place
                self._check_guest(off >> bits, 1, "writing", g)
                self._x_complete(g, off, b, lo, hi, s0, s1)
                pwrite_full(self.dfd, data, off + lo)
                nb = (b | touched) & ~(touched << 32)
            else:
                if e & (COMPRESSED | OFFSET_MASK):
                    self._check_free(e, g)
                external = self.dfd != self.fd
                host = cbase if external else self._alloc_some(1)[0]
                if e and not e & COMPRESSED:    # shared: copy the allocated subclusters
                    for s in range(32):             # the write does not cover
                        a = s << sbits
                        if b >> s & 1 and not (lo <= a and a + (1 << sbits) <= hi):
                            pwrite_full(self.dfd, pread_full(self.dfd, 1 << sbits, off + a),
                                        host + a)
                    self._x_complete(g, host, b, lo, hi, s0, s1, fresh=not external)
                    pwrite_full(self.dfd, data, host + lo)
                    nb = (b | touched) & ~(touched << 32)
                elif e:         # compressed: the whole cluster, decompressed
                    n = min(cs, self.size - cbase)
                    buf = bytearray(self._read_held(cbase, n))
                    buf[lo:hi] = data
                    pwrite_full(self.dfd, buf, host)
                    nb = ALL
                else:           # unallocated: only the touched subclusters
                    self._x_complete(g, host, b, lo, hi, s0, s1, fresh=not external)
                    pwrite_full(self.dfd, data, host + lo)
                    nb = (b | touched) & ~(touched << 32)
                self._release(e)
                ents[2 * i] = host | COPIED
            ents[2 * i + 1] = nb
            t.dirty = True
            pos = run_end

    def _x_complete(self, g: int, host: int, b: int, lo: int, hi: int, s0: int, s1: int,
                    fresh: bool = False) -> None:
        """Before a write of [lo, hi) of cluster g: fill the parts of its first and
        last subclusters the write does not cover, if they are not allocated yet,
        with what they read as now (backing data or zeros; a fresh cluster
        already reads zeros)."""
        sbits = self.cluster_bits - 5
        cbase = g << self.cluster_bits
        for s, a, z in ((s0, s0 << sbits, lo), (s1, hi, (s1 + 1) << sbits)):
            if a >= z or b >> s & 1:
                continue
            if b >> (32 + s) & 1 or self.backing is None:
                if not fresh:
                    pwrite_full(self.dfd, bytes(z - a), host + a)
                continue
            buf = self._backing_read(cbase + a, z - a)
            if not fresh or any(buf):
                pwrite_full(self.dfd, buf, host + a)

    # --- zeroing ---------------------------------------------------------------
    def _x_zero(self, offset: int, length: int) -> None:
        self._dirty = True
        if self.dfd != self.fd:     # zeros written, so a raw data file stays equal to the disk
            step = 1 << 20
            for pos in range(offset, offset + length, step):
                n = min(step, offset + length - pos)
                self._write(pos, memoryview(self._zero_bytes(n)))
            return
        bits, cs = self.cluster_bits, self.cs
        sbits = bits - 5
        scs = 1 << sbits
        pos, end = offset, offset + length
        while pos < end:
            g = pos >> bits
            cbase = g << bits
            cend = min(end, cbase + cs)
            lo, hi = pos - cbase, cend - cbase
            # Parts of subclusters are written as zeros.
            a = -(-lo // scs) * scs
            z = hi // scs * scs
            if a >= z:
                self._write(pos, memoryview(bytes(cend - pos)))
                pos = cend
                continue
            if lo < a:
                self._write(pos, memoryview(bytes(a - lo)))
            if z < hi:
                self._write(cbase + z, memoryview(bytes(hi - z)))
            self._sync_if_many_frees()
            self._x_zero_subclusters(g, a >> sbits, (z >> sbits) - 1)
            pos = cend

    def _zero_bytes(self, n: int) -> bytes:
        return self._zeros[:n] if n <= self.cs else bytes(n)

    def _x_zero_subclusters(self, g: int, s0: int, s1: int) -> None:
        """Make subclusters s0..s1 of cluster g read as zeros."""
        bits = self.cluster_bits
        l1i = g >> self.l2_bits
        mask = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
        t = self._l2(l1i)
        e = b = 0
        if t is not None:
            e, b, off = self._x_entry(t.entries, g & self.l2_mask, g)
        if b >> 32 & mask == mask or (self.backing is None and not e and not b & mask):
            return          # already zero: do not dirty (or copy) the table
        whole = mask == ALL
        if e & COMPRESSED or (e & OFFSET_MASK and not e & COPIED):
            if not whole:   # shared or compressed: a private copy with those zeros
                sbits = bits - 5
                self._write((g << bits) + (s0 << sbits),
                            memoryview(bytes((s1 - s0 + 1) << sbits)))
                return
        if e & (COMPRESSED | OFFSET_MASK) and whole:
            self._check_free(e, g, "zeroing")
        t = self._l2_for_write(l1i)
        i = g & self.l2_mask
        if whole:
            self._release(t.entries[2 * i])
            t.entries[2 * i] = 0
            t.entries[2 * i + 1] = ZERO_ALL
        else:
            t.entries[2 * i + 1] = (t.entries[2 * i + 1] | mask << 32) & ~mask
        t.dirty = True
