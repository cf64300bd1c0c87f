# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The sparse-table row index and id dedup with segment sums (Cython).

Owns the mapping of uint64 row ids to int64 row slots (``RowIndex``: an
open-addressing hash table with linear probing, power-of-two capacity, load
factor at most 0.7, growth by rehash and deletion by backward shift, so there
are no tombstones), and the dedup of one push's ids with the fixed-order sum
of their rows (``dedup_segments``, ``segment_sum``), with a cheap test for
whether a push repeats a row at all (``has_repeats``).

Slot assignment is deterministic and independent of the table's layout
(capacity, hash, growth history): a new id takes the most recently freed slot
(the free list is LIFO) or else the next never-used slot, in the order the ids
first appear in the input. Two replicas that apply the same batches in the
same order therefore hold the same id -> slot map, whatever their capacity.

Growth: a full table doubles, except that inside a large batch, once 1024
ids have shown the batch's rate of new ids, it grows once for the rest of the
batch (capped at 64x the size when ids repeat within the batch). Tables of
2 MiB and more are fresh anonymous mappings on transparent huge pages (Linux):
the kernel supplies zeroed pages (empty buckets are all-zero), and random
probes take few TLB misses. Batch loops hash each id 16 positions ahead of its
probe and prefetch its bucket, so many cache misses are in flight at once.

Every method works on whole arrays with the GIL released; a per-index lock
serialises calls from several threads. The dict/numpy twins in
``reference.py`` are the test oracle. Imports nothing from the package.
"""

from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset

from cython cimport floating

import numpy as np


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    /* with write intent: most probes of lookup_or_insert and delete write */
    #define ROWINDEX_PREFETCH(p) __builtin_prefetch((const void *)(p), 1)
    #else
    #define ROWINDEX_PREFETCH(p) ((void)(p))
    #endif
    """
    void ROWINDEX_PREFETCH(const void *p) noexcept nogil

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Zeroed memory for a table. From 2 MiB up (Linux) it is a fresh anonymous
       mapping, 2 MiB aligned and asked to live on transparent huge pages: the
       kernel hands out zero pages as they are first written (no fill pass), and
       random probes take far fewer TLB misses. */
    typedef struct { void *raw; size_t len; } rowindex_block;

    static void *rowindex_zalloc(size_t bytes, rowindex_block *blk) {
        blk->raw = NULL;
        blk->len = 0;
    #if defined(__linux__)
        const size_t huge = (size_t)2 << 20;
        if (bytes >= huge) {
            size_t rounded = (bytes + huge - 1) & ~(huge - 1);
            size_t len = rounded + huge;
            void *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
            if (raw == MAP_FAILED) return NULL;
            char *p = (char *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
    #if defined(MADV_HUGEPAGE)
            madvise(p, rounded, MADV_HUGEPAGE);
    #endif
            blk->raw = raw;
            blk->len = len;
            return p;
        }
    #endif
        blk->raw = calloc(bytes ? bytes : 1, 1);
        return blk->raw;
    }

    static void rowindex_zfree(rowindex_block *blk) {
    #if defined(__linux__)
        if (blk->len) { munmap(blk->raw, blk->len); blk->raw = NULL; blk->len = 0; return; }
    #endif
        free(blk->raw);
        blk->raw = NULL;
    }
    """
    ctypedef struct rowindex_block:
        void *raw
        size_t len
    void *rowindex_zalloc(size_t nbytes, rowindex_block *blk) noexcept nogil
    void rowindex_zfree(rowindex_block *blk) noexcept nogil


ctypedef struct Entry:
    uint64_t key
    int64_t slot1       # slot + 1; 0: the bucket is empty (so zeroed memory is empty)


cdef enum:
    MIN_LOG2_CAPACITY = 4
    MAX_LOG2_CAPACITY = 48  # 4 PiB of buckets: allocation fails long before
    PREFETCH_AHEAD = 16     # a power of two
    RATE_SAMPLE = 1024      # ids seen before a batch's rate of new ids sizes growth
    GROWTH_CAP = 64         # at most this many times the size in one growth


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    # MurmurHash3's fmix64 (a bijection); the home bucket is taken from the high
    # bits, so doubling the table sends bucket b to 2b or 2b + 1 and a rehash
    # walks both tables almost sequentially.
    z ^= z >> 33
    z *= <uint64_t>0xFF51AFD7ED558CCDULL
    z ^= z >> 33
    z *= <uint64_t>0xC4CEB9FE1A85EC53ULL
    return z ^ (z >> 33)


cdef inline int _log2_for(int64_t n) noexcept nogil:
    """The smallest log2 capacity that holds ``n`` entries under the load factor."""
    cdef int lg = MIN_LOG2_CAPACITY
    while lg < MAX_LOG2_CAPACITY and ((<int64_t>1) << lg) * 7 // 10 < n:
        lg += 1
    return lg


cdef class RowIndex:
    """uint64 row id -> int64 row slot; see the module docstring for the rules.

    ``RowIndex(capacity_hint=0)`` sizes the table for ``capacity_hint`` ids
    without growing. Methods write into arrays the caller owns.
    """

    cdef Entry *_table
    cdef rowindex_block _block      # the allocation behind _table
    cdef uint64_t _mask
    cdef int _shift
    cdef int64_t _capacity
    cdef int64_t _max_size
    cdef int64_t _size
    cdef int64_t _next_slot
    cdef int64_t *_free
    cdef int64_t _free_len
    cdef int64_t _free_cap
    cdef PyThread_type_lock _lock

    def __cinit__(self, int64_t capacity_hint=0):
        if capacity_hint < 0:
            raise ValueError("capacity_hint must be >= 0")
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError("cannot allocate the RowIndex lock")
        if self._alloc_table(_log2_for(capacity_hint)) < 0:
            raise MemoryError("cannot allocate the RowIndex table")

    def __dealloc__(self):
        rowindex_zfree(&self._block)
        free(self._free)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    # -- locking (the GIL is held on entry and exit) --------------------------

    cdef inline void _acquire(self):
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)

    cdef inline void _release(self):
        PyThread_release_lock(self._lock)

    # -- table primitives (nogil, no Python objects) --------------------------

    cdef int _alloc_table(self, int lg) noexcept nogil:
        """Replace the table by an empty one of 2**lg buckets (the old one is
        freed; a rehash keeps it alive through ``_rehash``'s own copy)."""
        cdef int64_t cap = (<int64_t>1) << lg
        cdef rowindex_block block
        cdef Entry *t = <Entry *>rowindex_zalloc(cap * sizeof(Entry), &block)
        if t == NULL:
            return -1
        rowindex_zfree(&self._block)
        self._block = block
        self._table = t
        self._capacity = cap
        self._mask = <uint64_t>(cap - 1)
        self._shift = 64 - lg
        self._max_size = cap * 7 // 10
        return 0

    cdef inline uint64_t _home(self, uint64_t key) noexcept nogil:
        return _mix(key) >> self._shift

    cdef inline Py_ssize_t _find_h(self, uint64_t key, uint64_t h) noexcept nogil:
        """The bucket holding ``key`` (whose hash is ``h``), or the empty bucket
        that ends its probe."""
        cdef uint64_t pos = h >> self._shift
        cdef Entry *t = self._table
        while t[pos].slot1 and t[pos].key != key:
            pos = (pos + 1) & self._mask
        return <Py_ssize_t>pos

    cdef inline Py_ssize_t _find(self, uint64_t key) noexcept nogil:
        return self._find_h(key, _mix(key))

    cdef int _rehash(self, int lg) noexcept nogil:
        cdef Entry *old = self._table
        cdef rowindex_block old_block = self._block
        cdef int64_t old_cap = self._capacity, i
        cdef Py_ssize_t pos
        if ((<int64_t>1) << lg) <= old_cap:
            return -1               # at MAX_LOG2_CAPACITY: cannot grow
        self._block.raw = NULL      # keep the old table until it is copied
        self._block.len = 0
        if self._alloc_table(lg) < 0:
            self._block = old_block
            return -1
        for i in range(old_cap):
            if old[i].slot1:
                pos = self._find(old[i].key)
                self._table[pos] = old[i]
        rowindex_zfree(&old_block)
        return 0

    cdef int _reserve(self, int64_t n) noexcept nogil:
        """Grow so that ``n`` entries fit under the load factor."""
        cdef int lg = _log2_for(n)
        if ((<int64_t>1) << lg) <= self._capacity:
            return 0
        return self._rehash(lg)

    cdef int _push_free(self, int64_t slot) noexcept nogil:
        cdef int64_t cap
        cdef int64_t *grown
        if self._free_len == self._free_cap:
            cap = self._free_cap * 2 if self._free_cap else 64
            grown = <int64_t *>realloc(self._free, cap * sizeof(int64_t))
            if grown == NULL:
                return -1
            self._free = grown
            self._free_cap = cap
        self._free[self._free_len] = slot
        self._free_len += 1
        return 0

    # The batch loops hash each id once, PREFETCH_AHEAD positions ahead of its
    # probe, keep the hash in a ring and prefetch its home bucket, so that many
    # cache misses are in flight at once. The hash does not depend on the
    # capacity, so the ring stays valid across a rehash.

    cdef inline uint64_t _ahead(self, const uint64_t[::1] ids, Py_ssize_t j,
                                uint64_t *ring) noexcept nogil:
        cdef uint64_t h = _mix(ids[j])
        ring[j & (PREFETCH_AHEAD - 1)] = h
        ROWINDEX_PREFETCH(&self._table[h >> self._shift])
        return h

    cdef void _lookup(self, const uint64_t[::1] ids, int64_t[::1] out) noexcept nogil:
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef uint64_t h
        cdef uint64_t ring[PREFETCH_AHEAD]
        for i in range(min(n, PREFETCH_AHEAD)):
            self._ahead(ids, i, ring)
        for i in range(n):
            h = ring[i & (PREFETCH_AHEAD - 1)]
            if i + PREFETCH_AHEAD < n:
                self._ahead(ids, i + PREFETCH_AHEAD, ring)
            out[i] = self._table[self._find_h(ids[i], h)].slot1 - 1

    cdef int64_t _lookup_or_insert(self, const uint64_t[::1] ids, int64_t[::1] out,
                                   int64_t *created) noexcept nogil:
        """Returns the number of rows created, or -1 when memory ran out (the
        positions before the failing one are then applied and written)."""
        cdef Py_ssize_t i, pos, n = ids.shape[0]
        cdef int64_t slot, expect, made = 0, repeats = 0
        cdef int64_t batch_first_slot = self._next_slot
        cdef double estimate
        cdef uint64_t key, h
        cdef uint64_t ring[PREFETCH_AHEAD]
        for i in range(min(n, PREFETCH_AHEAD)):
            self._ahead(ids, i, ring)
        for i in range(n):
            h = ring[i & (PREFETCH_AHEAD - 1)]
            if i + PREFETCH_AHEAD < n:
                self._ahead(ids, i + PREFETCH_AHEAD, ring)
            key = ids[i]
            pos = self._find_h(key, h)
            slot = self._table[pos].slot1 - 1
            if slot < 0:
                if self._size >= self._max_size:
                    # Double; or, once the batch has shown its rate of new ids,
                    # grow once for the rest of it (1M fresh ids cost one rehash of
                    # ~1.4k entries, not one per doubling). If ids repeat within the
                    # batch, its early rate of new ids overestimates the rest, so
                    # the estimate is then capped at GROWTH_CAP times the size.
                    expect = self._size + 1
                    if i >= RATE_SAMPLE:
                        estimate = <double>made / <double>i * <double>(n - i)
                        if repeats:
                            estimate = min(estimate, <double>self._size * GROWTH_CAP)
                        expect += <int64_t>estimate
                    if self._rehash(_log2_for(expect)) < 0:
                        return -1
                    pos = self._find_h(key, h)
                if self._free_len:
                    self._free_len -= 1
                    slot = self._free[self._free_len]
                else:
                    slot = self._next_slot
                    self._next_slot += 1
                self._table[pos].key = key
                self._table[pos].slot1 = slot + 1
                self._size += 1
                if created != NULL:
                    created[made] = i
                made += 1
            elif slot >= batch_first_slot:
                repeats += 1        # an id this batch has already inserted
            out[i] = slot
        return made

    cdef int64_t _delete(self, const uint64_t[::1] ids) noexcept nogil:
        """Returns the number of ids removed, or -1 when memory ran out."""
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef uint64_t hole, pos, home, h, mask = self._mask
        cdef int64_t removed = 0
        cdef Entry *t = self._table
        cdef uint64_t ring[PREFETCH_AHEAD]
        for i in range(min(n, PREFETCH_AHEAD)):
            self._ahead(ids, i, ring)
        for i in range(n):
            h = ring[i & (PREFETCH_AHEAD - 1)]
            if i + PREFETCH_AHEAD < n:
                self._ahead(ids, i + PREFETCH_AHEAD, ring)
            hole = <uint64_t>self._find_h(ids[i], h)
            if not t[hole].slot1:
                continue
            if self._push_free(t[hole].slot1 - 1) < 0:
                return -1
            # Backward-shift deletion: pull later entries of the cluster into the
            # hole unless that would move them before their home bucket.
            pos = hole
            while True:
                pos = (pos + 1) & mask
                if not t[pos].slot1:
                    break
                home = self._home(t[pos].key)
                if ((pos - home) & mask) >= ((pos - hole) & mask):
                    t[hole] = t[pos]
                    hole = pos
            t[hole].slot1 = 0
            self._size -= 1
            removed += 1
        return removed

    # -- public methods --------------------------------------------------------

    def lookup(self, const uint64_t[::1] ids not None, int64_t[::1] out not None):
        """Write the slot of every id into ``out`` (same length), -1 where absent."""
        if out.shape[0] != ids.shape[0]:
            raise ValueError(f"out has {out.shape[0]} slots for {ids.shape[0]} ids")
        self._acquire()
        try:
            with nogil:
                self._lookup(ids, out)
        finally:
            self._release()

    def lookup_or_insert(self, const uint64_t[::1] ids not None, int64_t[::1] out not None,
                         int64_t[::1] created=None):
        """Write the slot of every id into ``out``, inserting the absent ones.

        New ids get slots in the order they first appear in ``ids`` (a repeated
        id gets the slot of its first occurrence). Returns the number of rows
        created, k; with ``created`` (at least len(ids) long) the input positions
        that created a row are written to ``created[:k]``, in order.
        """
        cdef int64_t made
        cdef int64_t *created_ptr = NULL
        if out.shape[0] != ids.shape[0]:
            raise ValueError(f"out has {out.shape[0]} slots for {ids.shape[0]} ids")
        if created is not None:
            if created.shape[0] < ids.shape[0]:
                raise ValueError(f"created has {created.shape[0]} slots for {ids.shape[0]} ids")
            if created.shape[0]:
                created_ptr = &created[0]
        self._acquire()
        try:
            with nogil:
                made = self._lookup_or_insert(ids, out, created_ptr)
        finally:
            self._release()
        if made < 0:
            raise MemoryError("cannot grow the RowIndex table")
        return made

    def delete(self, const uint64_t[::1] ids not None):
        """Remove the ids (absent ones are ignored); return how many were removed.

        Their slots go to the free list in input order and are reused last freed
        first."""
        cdef int64_t removed
        self._acquire()
        try:
            with nogil:
                removed = self._delete(ids)
        finally:
            self._release()
        if removed < 0:
            raise MemoryError("cannot grow the RowIndex free list")
        return removed

    def reserve(self, int64_t n):
        """Grow the table now so that ``n`` ids fit without further growth."""
        cdef int rc
        if n < 0:
            raise ValueError("n must be >= 0")
        self._acquire()
        try:
            with nogil:
                rc = self._reserve(n)
        finally:
            self._release()
        if rc < 0:
            raise MemoryError("cannot grow the RowIndex table")

    def clear(self):
        """Remove every id and forget every slot (the capacity is kept)."""
        self._acquire()
        try:
            with nogil:
                memset(self._table, 0, self._capacity * sizeof(Entry))
            self._size = 0
            self._next_slot = 0
            self._free_len = 0
        finally:
            self._release()

    def __len__(self):
        return self._size

    @property
    def capacity(self):
        """Number of buckets (a power of two; at most 0.7 of them are used)."""
        return self._capacity

    @property
    def num_slots(self):
        """Slots ever handed out (high-water mark): the row storage a caller needs."""
        return self._next_slot

    def _by_slot(self):
        """(ids, slots) of every entry, in increasing slot order (GIL held)."""
        cdef Py_ssize_t i, k = 0
        cdef int64_t s
        present_arr = np.zeros(self._next_slot, dtype=np.uint8)
        key_arr = np.empty(self._next_slot, dtype=np.uint64)
        ids_arr = np.empty(self._size, dtype=np.uint64)
        slots_arr = np.empty(self._size, dtype=np.int64)
        cdef unsigned char[::1] present = present_arr
        cdef uint64_t[::1] key_of = key_arr
        cdef uint64_t[::1] ids_v = ids_arr
        cdef int64_t[::1] slots_v = slots_arr
        with nogil:
            for i in range(self._capacity):
                s = self._table[i].slot1 - 1
                if s >= 0:
                    present[s] = 1
                    key_of[s] = self._table[i].key
            for s in range(self._next_slot):
                if present[s]:
                    ids_v[k] = key_of[s]
                    slots_v[k] = s
                    k += 1
        return ids_arr, slots_arr

    def items(self):
        """(ids, slots) snapshot arrays (uint64, int64) in increasing slot order."""
        self._acquire()
        try:
            return self._by_slot()
        finally:
            self._release()

    def ids(self):
        """A uint64 array of the ids held, in increasing slot order."""
        return self.items()[0]

    def slots(self):
        """An int64 array of the slots in use, increasing (pairs with ``ids()``)."""
        return self.items()[1]

    def free_slots(self):
        """The free list as an int64 array, bottom to top (the last is reused first)."""
        cdef Py_ssize_t i
        cdef int64_t[::1] view
        self._acquire()
        try:
            arr = np.empty(self._free_len, dtype=np.int64)
            view = arr
            with nogil:
                for i in range(self._free_len):
                    view[i] = self._free[i]
            return arr
        finally:
            self._release()

    def restore(self, const uint64_t[::1] ids not None, const int64_t[::1] slots not None,
                int64_t num_slots, const int64_t[::1] free_slots not None):
        """Replace the contents with a snapshot taken by ``items()``, ``num_slots``
        and ``free_slots()``, so later inserts assign the same slots as the
        index the snapshot came from (the capacity becomes that of a fresh
        index sized for the snapshot).

        The ids must be distinct, the slots distinct and in [0, num_slots), and
        the free slots exactly the rest of [0, num_slots); otherwise ValueError
        and the index is left as it was.
        """
        cdef Py_ssize_t i, pos, n = ids.shape[0], nf = free_slots.shape[0]
        cdef int64_t s
        cdef int bad = 0
        cdef RowIndex fresh
        if slots.shape[0] != n:
            raise ValueError(f"{n} ids but {slots.shape[0]} slots")
        if num_slots < 0 or n + nf != num_slots:
            raise ValueError(f"{n} slots in use and {nf} free do not make num_slots={num_slots}")
        seen_arr = np.zeros(num_slots, dtype=np.uint8)
        cdef unsigned char[::1] seen = seen_arr
        fresh = RowIndex(n)
        with nogil:
            for i in range(n + nf):
                s = slots[i] if i < n else free_slots[i - n]
                if s < 0 or s >= num_slots or seen[s]:
                    bad = 1
                    break
                seen[s] = 1
            if not bad:
                for i in range(n):
                    pos = fresh._find(ids[i])
                    if fresh._table[pos].slot1:
                        bad = 2
                        break
                    fresh._table[pos].key = ids[i]
                    fresh._table[pos].slot1 = slots[i] + 1
                    fresh._size += 1
            if not bad:
                for i in range(nf):
                    if fresh._push_free(free_slots[i]) < 0:
                        bad = 3
                        break
        if bad == 1:
            raise ValueError("slots and free slots must be distinct values in [0, num_slots)")
        if bad == 2:
            raise ValueError("ids must be distinct")
        if bad == 3:
            raise MemoryError("cannot allocate the RowIndex free list")
        fresh._next_slot = num_slots
        self._acquire()
        try:
            self._swap(fresh)  # fresh now holds the old contents and frees them
        finally:
            self._release()

    cdef void _swap(self, RowIndex other) noexcept:
        self._table, other._table = other._table, self._table
        self._block, other._block = other._block, self._block
        self._mask, other._mask = other._mask, self._mask
        self._shift, other._shift = other._shift, self._shift
        self._capacity, other._capacity = other._capacity, self._capacity
        self._max_size, other._max_size = other._max_size, self._max_size
        self._size, other._size = other._size, self._size
        self._next_slot, other._next_slot = other._next_slot, self._next_slot
        self._free, other._free = other._free, self._free
        self._free_len, other._free_len = other._free_len, self._free_len
        self._free_cap, other._free_cap = other._free_cap, self._free_cap

    def __repr__(self):
        return (f"RowIndex(len={self._size}, capacity={self._capacity}, "
                f"num_slots={self._next_slot}, free={self._free_len})")


def dedup_segments(const uint64_t[::1] ids not None, int64_t[::1] inverse not None,
                   uint64_t[::1] unique not None, RowIndex scratch=None):
    """Dedup ``ids`` keeping first-appearance order.

    Writes the distinct ids into ``unique[:k]`` in the order they first appear
    and, per input position i, the index into ``unique`` of ``ids[i]`` into
    ``inverse[i]``; returns k. ``inverse`` and ``unique`` must be len(ids) long.
    ``scratch``, when given, is cleared and used as the hash table (so a caller
    can keep one and allocate nothing per call); its contents are lost.
    """
    cdef Py_ssize_t i, n = ids.shape[0]
    cdef int64_t k
    cdef RowIndex table
    if inverse.shape[0] != n or unique.shape[0] < n:
        raise ValueError(f"inverse and unique must have {n} slots")
    table = scratch if scratch is not None else RowIndex(n)
    table.clear()
    table.reserve(n)
    table._acquire()
    try:
        with nogil:
            # A fresh index hands out slots 0, 1, ... in first-appearance order:
            # the slots are the inverse. ``unique`` doubles as the positions buffer.
            k = table._lookup_or_insert(ids, inverse, <int64_t *>&unique[0] if n else NULL)
            if k >= 0:
                for i in range(k):
                    unique[i] = ids[<Py_ssize_t>unique[i]]
    finally:
        table._release()
    if k < 0:
        raise MemoryError("cannot grow the dedup table")
    return k


def has_repeats(const int64_t[::1] slots not None, unsigned char[::1] marks not None):
    """True when a value occurs twice in ``slots``.

    ``marks`` is caller-owned scratch, all zero and longer than the largest
    slot; it is all zero again on return, so a caller keeps one and allocates
    nothing per call. Cost: two passes over ``slots`` with one byte touched per
    slot (a hash table for the same answer costs ~10x more). ValueError,
    leaving ``marks`` zero, if a slot lies outside [0, len(marks)).
    """
    cdef Py_ssize_t i, done, n = slots.shape[0], m = marks.shape[0]
    cdef int64_t s
    cdef bint repeat = False, bad = False
    with nogil:
        done = n
        for i in range(n):
            s = slots[i]
            if s < 0 or s >= m:
                bad = True
                done = i
                break
            if marks[s]:
                repeat = True
                done = i
                break
            marks[s] = 1
        for i in range(done):
            marks[slots[i]] = 0
    if bad:
        raise ValueError(f"slot {slots[done]} is outside [0, {m})")
    return repeat


def segment_sum(const floating[:, ::1] values not None, const int64_t[::1] inverse not None,
                floating[:, ::1] out not None):
    """``out[s] = sum of values[i] over i with inverse[i] == s``, summed in input order.

    ``out`` (num_segments, dim) is overwritten; every row of it is written, rows
    no input maps to become zeros. The order of the additions is fixed (input
    order), so the result is bit-identical across runs and processes. Raises
    ValueError before writing anything if an index is outside [0, num_segments).
    """
    cdef Py_ssize_t i, j, s, n = values.shape[0], dim = values.shape[1]
    cdef Py_ssize_t m = out.shape[0], bad = -1
    if inverse.shape[0] != n:
        raise ValueError(f"inverse has {inverse.shape[0]} entries for {n} rows")
    if out.shape[1] != dim:
        raise ValueError(f"out has rows of {out.shape[1]}, values of {dim}")
    with nogil:
        for i in range(n):
            if inverse[i] < 0 or inverse[i] >= m:
                bad = i
                break
        if bad < 0:
            if m * dim:
                memset(&out[0, 0], 0, m * dim * sizeof(floating))
            for i in range(n):
                s = <Py_ssize_t>inverse[i]
                for j in range(dim):
                    out[s, j] += values[i, j]
    if bad >= 0:
        raise ValueError(f"inverse[{bad}] = {inverse[bad]} is outside [0, {m})")
