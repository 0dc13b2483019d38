"""Indexes: bulk-loaded point trees with a lean C call, and the two-tier responder index.

Everything here works in projected metres and epoch seconds, and answers slots or
entry ids: validation, projection and the answers people read are the service's
(:mod:`gateway.geo.service`). rtree is not thread-safe, and nothing here locks: use
an index from one thread at a time (the event loop's; a rebuild in a worker thread
builds trees of its own and hands them over).

Point trees (facilities, responders' base locations)
    Bulk-loaded rtree indexes, built from numpy arrays through rtree's array stream
    (libspatialindex packs the tree in one pass: ~1 s for 1e6 points, 4-5x faster than
    a Python generator stream), with small nodes (16 entries), which made k=3 nearest
    queries ~30 % faster than the default 100 at 1e6 points. Nothing is ever deleted
    from them (a delete costs ~250 us at 1e6 entries, and needs the exact box).

    Queries call libspatialindex's ``Index_NearestNeighbors_id`` through the library
    rtree loaded, with reused buffers (:class:`PointTree`): rtree's Python wrapper
    adds ~4 us per call to the ~10 us of C work at 1e6 points. Responder slots are
    numbered in Z order of base locations, so that the per-slot arrays a query reads
    for a few neighbours share cache lines instead of costing a miss each.

Moving responders: a two-tier index
    Moving a point in an rtree (delete + insert) for 5,000 responders every 30 s would
    spend most of the event loop's time in deletes. Rebuilding a tree periodically
    instead blocks the loop for the whole build and makes positions lag by the rebuild
    period. So:

    * tier 1, the base rtree: eligible (non-supervisor) responders at their *base*
      locations: those on duty when it was built, plus those who came on duty since
      (inserted, ~10 us). Those who go off duty stay in it and are skipped, until the
      next rebuild (a registry reload), so that off-duty crowds do not make every
      query wade through them.
    * tier 2, a uniform grid hash (``dict[cell, set[slot]]``, one int per cell key)
      holding only responders with a *fresh live* fix. A move is a validation and
      projection (~2 us) plus, when the cell changes, two set operations: O(1);
      ~150,000 updates/s measured.

    A responder is in exactly one tier at a time: while its live fix is fresh, its tier-1
    entry is masked (skipped) and tier 2 has it at the live position; when the fix goes
    stale it leaves tier 2 and its tier-1 entry counts again (base location,
    ``stale=True``). Staleness is exact: each fix pushes ``(deadline, slot)`` onto a heap
    and every query/update first pops the expired deadlines (O(log n) amortised per fix;
    the heap is compacted when superseded deadlines pile up).

    A query merges both tiers without losing exactness (tested against brute force):
    it asks tier 1 for a batch of nearest entries, sized from the share of on-duty,
    unmasked, unexcluded entries so that a second call is needed about once in 1,000
    (binomial tail), and skips masked, off-duty and excluded entries; everything in
    tier 1 closer than the batch's last entry has then been seen. Tier 2 is then probed
    only in the cells overlapping the square around the current k-th best, clipped to
    the occupied part of the grid (or, when tier 1 had fewer than k, ring by ring
    outwards until a ring's minimum distance exceeds the k-th best; either way it scans
    the occupied cells directly when that is cheaper). If the k-th best is still farther
    than what tier 1 has covered, tier 1 is asked again with a 4x larger batch. The grid
    cell size follows the responder density (about one responder per cell on average,
    over the service area), so tier 2 costs a handful of dictionary probes.

    When live responders make up half of tier 1 or more (every phone reporting: the
    design point of 5,000 moving responders), a batch of nearest base entries would be
    mostly masked, so the order flips: tier 2 first (ring by ring), then one rtree
    intersection for the base entries within the k-th best distance found there: ~24 us
    instead of ~38 us at the median for 5,000 responders all live.

    Measured (``bench/geo.py``, shared 2-vCPU VM, 5,000 of the responders live): a full
    k=3 query, results included, costs ~25 us at the median at 1e5 and 1e6 responders
    (p99 ~47-54 us, pooled over 100,000 calls), of which ~11 us is the C call and ~5 us
    the three results with their geodesics; numpy brute force costs ~0.2 ms at 1e5 and
    ~2 ms at 1e6 points.
"""

from __future__ import annotations

import ctypes
import heapq
import math
from array import array
from bisect import insort
from collections.abc import Callable, Collection, Container, Iterable, Iterator, KeysView, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
import numpy.typing as npt
import structlog
from rtree import core as rtree_core
from rtree import index as rtree_index

from gateway.model import LonLat, Responder, ResponderRole

_log = structlog.get_logger(__name__)

# Small rtree nodes: fewer distance computations per visited leaf for point data.
_RTREE_CAPACITY: Final = 16
_RTREE_FILL: Final = 0.9

# Up to this many excluded ids are converted to slots per query (see _excluded_slots).
_EXCLUDE_CONVERT_MAX: Final = 64

# When live (tier-2) responders are at least this share of the base tree's entries, a
# query asks tier 2 first (see ResponderIndex.nearest).
_LIVE_FIRST_SHARE = 0.5

# Grid cell size bounds: below 20 m GPS noise alone moves people between cells on every
# fix; above 20 km a ring scan degenerates into a scan of everything.
_MIN_CELL_M: Final = 20.0
_MAX_CELL_M: Final = 20_000.0
_MIN_EXTENT_M: Final = 1_000.0

_SUPERVISOR: Final = ResponderRole.SUPERVISOR


def _z_order(xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """A stable permutation sorting points along a Z-order (Morton) curve.

    Coordinates are quantised to 16 bits over their bounding box and their bits
    interleaved; points near each other mostly end up near each other in the order.
    """
    if len(xs) == 0:
        return np.arange(0, dtype=np.intp)

    def quantised(v: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
        lo, hi = float(v.min()), float(v.max())
        scale = 65535.0 / (hi - lo) if hi > lo else 0.0
        return ((v - lo) * scale).astype(np.uint64)

    def spread(v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        # 16 bits -> the even bits of 32 ("part 1 by 1").
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    codes = spread(quantised(xs)) | (spread(quantised(ys)) << np.uint64(1))
    return np.argsort(codes, kind="stable")


# Prototypes for libspatialindex's C API as rtree loads it, with plain addresses for
# pointers: the call converts six integers and runs no errcheck hook.
_NEAREST_PROTO: Final = ctypes.CFUNCTYPE(
    ctypes.c_int,  # RTError: 0 when all is well
    ctypes.c_void_p,  # IndexH
    ctypes.c_void_p,  # double* pdMin
    ctypes.c_void_p,  # double* pdMax
    ctypes.c_uint32,  # nDimension
    ctypes.c_void_p,  # int64_t** ids (out, freed with Index_Free)
    ctypes.c_void_p,  # uint64_t* nResults (in: wanted; out: found, ties included)
)
_FREE_PROTO: Final = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _free_nothing(_address: int | None) -> None:
    """Stands in for Index_Free until the lean call is bound (never called then)."""


class PointTree:
    """A bulk-loaded rtree of points with a lean k-nearest call.

    ``rtree.Index.nearest`` spends ~4 us per call in Python around the C work (two
    property reads that are ctypes calls themselves, fresh ctypes buffers, a generator,
    casts, an errcheck hook), on top of ~11 us in libspatialindex for k=3 at 1e6 points.
    This calls the same C functions, ``Index_NearestNeighbors_id`` and
    ``Index_Intersects_id``, from the library rtree loaded (``rtree.core.rt``), with
    buffers reused across calls, and frees the result array with ``Index_Free`` as rtree
    does. If the library lacks these symbols, or an answer differs from rtree's on
    probes at construction, it falls back to ``Index.nearest`` / ``Index.intersection``.
    The buffers are shared: use one instance from one thread at a time (a GeoService is
    used from the event-loop thread only; a rebuild in a worker thread builds its own
    trees).
    """

    __slots__ = (
        "_args",
        "_box",
        "_box_args",
        "_count",
        "_fast",
        "_free",
        "_ids",
        "_intersects",
        "_out",
        "_point",
        "index",
    )

    def __init__(self, tree: rtree_index.Index, probe: tuple[float, float]) -> None:
        self.index = tree  # keeps the C index alive as long as its address is used
        self._point = (ctypes.c_double * 2)()
        self._count = ctypes.c_uint64(0)
        # Where the C call stores the address of the id array it allocates: one buffer
        # seen as an int64 pointer (to read the ids) and as an address (to free them).
        self._ids = ctypes.POINTER(ctypes.c_int64)()
        self._out = ctypes.c_void_p.from_buffer(self._ids)
        self._fast: Callable[..., int] | None = None
        self._free: Callable[[int | None], None] = _free_nothing
        self._args: tuple[int, int, int, int, int, int] = (0, 0, 0, 2, 0, 0)
        self._box = (ctypes.c_double * 4)()  # min x, min y, max x, max y
        self._box_args: tuple[int, int, int, int, int, int] = (0, 0, 0, 2, 0, 0)
        self._intersects: Callable[..., int] | None = None
        problem = self._bind(tree, probe)
        if problem is not None:
            _log.warning("geo.rtree.lean_call_unavailable", reason=problem)
            self._fast = self._intersects = None

    def _bind(self, tree: rtree_index.Index, probe: tuple[float, float]) -> str | None:
        """Set up the lean call; the reason it cannot be used, or None."""
        try:
            handle = ctypes.cast(tree.handle, ctypes.c_void_p).value
            self._fast = _NEAREST_PROTO(("Index_NearestNeighbors_id", rtree_core.rt))
            self._intersects = _NEAREST_PROTO(("Index_Intersects_id", rtree_core.rt))
            self._free = _FREE_PROTO(("Index_Free", rtree_core.rt))
        except (AttributeError, TypeError, ValueError, OSError, ctypes.ArgumentError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if not handle:
            return "the index has no C handle"
        point = ctypes.addressof(self._point)
        self._args = (
            handle,
            point,
            point,
            2,
            ctypes.addressof(self._out),
            ctypes.addressof(self._count),
        )
        box = ctypes.addressof(self._box)
        self._box_args = (
            handle,
            box,
            box + 2 * ctypes.sizeof(ctypes.c_double),
            2,
            ctypes.addressof(self._out),
            ctypes.addressof(self._count),
        )
        for n in (1, 3, 16):
            if self.nearest(probe[0], probe[1], n) != list(tree.nearest(probe, n)):
                return f"the lean call disagrees with Index.nearest for k={n}"
        for r in (0.0, 1.0, 1e3, 1e6):
            window = (probe[0] - r, probe[1] - r, probe[0] + r, probe[1] + r)
            if sorted(self.intersection(window)) != sorted(tree.intersection(window)):
                return f"the lean call disagrees with Index.intersection at {r} m"
        return None

    def nearest(self, x: float, y: float, n: int) -> list[int]:
        """Ids of the ``n`` entries nearest ``(x, y)``, nearest first.

        Like ``Index.nearest``, all entries tied at the n-th distance are included, so
        this may return more than ``n`` (and returns everything when there are fewer).

        Raises:
            rtree.exceptions.RTreeError: libspatialindex reported an error.
        """
        fast = self._fast
        if fast is None:
            return cast(list[int], list(self.index.nearest((x, y), n)))
        point = self._point
        point[0] = x
        point[1] = y
        self._count.value = n
        if fast(*self._args):
            # What rtree's errcheck would raise, with libspatialindex's message.
            return cast(list[int], list(self.index.nearest((x, y), n)))
        try:
            return self._ids[: self._count.value]
        finally:
            self._free(self._out.value)

    def insert(self, entry: int, x: float, y: float) -> None:
        """Add a point (~10 us; deleting one would cost ~250 us at 1e6 entries)."""
        self.index.insert(entry, (x, y, x, y))

    def intersection(self, box: tuple[float, float, float, float]) -> list[int]:
        """Ids of the entries in ``(min x, min y, max x, max y)``, edges included."""
        intersects = self._intersects
        if intersects is None:
            return cast(list[int], list(self.index.intersection(box)))
        window = self._box
        window[0], window[1], window[2], window[3] = box
        if intersects(*self._box_args):
            return cast(list[int], list(self.index.intersection(box)))  # raises its error
        try:
            return self._ids[: self._count.value]
        finally:
            self._free(self._out.value)


def point_tree(
    xs: npt.NDArray[np.float64],
    ys: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64] | None = None,
) -> PointTree | None:
    """Bulk-load points through rtree's array stream.

    ``ids[i]`` is the id of point ``(xs[i], ys[i])``; ids default to array positions.
    """
    if ids is None:
        ids = np.arange(len(xs), dtype=np.int64)
    if len(ids) == 0:
        return None
    props = rtree_index.Property()
    props.dimension = 2
    props.leaf_capacity = _RTREE_CAPACITY
    props.index_capacity = _RTREE_CAPACITY
    props.fill_factor = _RTREE_FILL
    coords = np.ascontiguousarray(np.column_stack((xs, ys)), dtype=np.float64)
    tree = rtree_index.Index(
        (np.ascontiguousarray(ids, dtype=np.int64), coords, coords), properties=props
    )
    return PointTree(tree, (float(xs[0]), float(ys[0])))


def _batch_for(k: int, valid: float, *, cap: int, miss: float = 1e-3) -> int:
    """The smallest n with P(fewer than k valid among n) <= ``miss``, at most ``cap``.

    Entries are valid independently with probability ``valid`` (binomial): e.g. k=3 at
    78 % valid gives 8, where a second rtree call would follow about once in 1,000.
    """
    if valid <= 0.0:
        return cap
    if valid >= 1.0:
        return k
    for n in range(k, cap):
        below = sum(math.comb(n, i) * valid**i * (1.0 - valid) ** (n - i) for i in range(k))
        if below <= miss:
            return n
    return cap


class _KBest:
    """Collects ``(d2, slot)`` candidates and tracks the k-th smallest ``d2`` seen.

    Ids are looked up only for the answer and for ties: each lookup touches a string
    object somewhere in a million, which costs a cache miss.
    """

    __slots__ = ("_best", "bound", "items", "k")

    def __init__(self, k: int) -> None:
        self.k = k
        self.bound = math.inf
        self._best: list[float] = []
        self.items: list[tuple[float, int]] = []

    def offer(self, d2: float, slot: int) -> None:
        if d2 > self.bound:
            return
        self.items.append((d2, slot))
        best = self._best
        insort(best, d2)
        if len(best) > self.k:
            best.pop()
        if len(best) == self.k:
            self.bound = best[-1]

    def seed_sorted(self) -> None:
        """Take ``items``, appended directly in nondecreasing distance, as the state."""
        best = [d2 for d2, _ in self.items[: self.k]]
        self._best = best
        if len(best) == self.k:
            self.bound = best[-1]

    def top(self, ids: Sequence[str]) -> list[int]:
        """The slots of the k best, nearest first; equal distances ordered by id."""
        items = self.items
        items.sort()
        k = self.k
        if len(items) > k:
            # Keep everything tied with the k-th: which of them make the cut is decided
            # by id below.
            last = items[k - 1][0]
            end = k
            while end < len(items) and items[end][0] == last:
                end += 1
            items = items[:end]
        for i in range(1, len(items)):
            if items[i][0] == items[i - 1][0]:
                items.sort(key=lambda item: (item[0], ids[item[1]]))
                break
        return [slot for _, slot in items[:k]]


class _ExcludedById:
    """Slots whose responder id is in a set of ids (see ``_excluded_slots``)."""

    __slots__ = ("_exclude", "_ids")

    def __init__(self, ids: Sequence[str], exclude: AbstractSet[str] | KeysView[str]) -> None:
        self._ids = ids
        self._exclude = exclude

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self._ids[slot] in self._exclude


# Grid cells are keyed by one int, gx * 2**32 + gy: probing a cell then costs an int
# addition and a dict lookup, no tuple to build and hash. Unique while |gy| < 2**31,
# which cells of at least _MIN_CELL_M metres guarantee for any projected coordinate.
_Cell = int
_GRID_SPAN: Final = 1 << 32
_HALF_SPAN: Final = 1 << 31


def _cell_key(gx: int, gy: int) -> _Cell:
    return gx * _GRID_SPAN + gy


def _cell_xy(key: _Cell) -> tuple[int, int]:
    gy = (key + _HALF_SPAN) % _GRID_SPAN - _HALF_SPAN
    return (key - gy) // _GRID_SPAN, gy


def _ring(cx: int, cy: int, r: int) -> list[_Cell]:
    """Cells at Chebyshev distance exactly ``r`` from ``(cx, cy)``."""
    span = _GRID_SPAN
    if r == 0:
        return [cx * span + cy]
    low, high = cy - r, cy + r
    cells = []
    for gx in range(cx - r, cx + r + 1):
        row = gx * span
        cells.append(row + low)
        cells.append(row + high)
    left, right = (cx - r) * span, (cx + r) * span
    for gy in range(low + 1, high):
        cells.append(left + gy)
        cells.append(right + gy)
    return cells


@dataclass(frozen=True, slots=True)
class Fix:
    """A live position report as accepted."""

    lonlat: LonLat
    x: float
    y: float
    timestamp: float
    accuracy_m: float | None


def cell_size(
    xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64], area_m: tuple[float, float] | None
) -> float:
    """A grid cell size for live positions: about one responder per cell on average.

    ``xs``/``ys`` are the eligible responders' base positions; ``area_m`` is the
    service area's ``(width, height)`` in metres where one is configured (that is
    where responders will move), else their extent counts.
    """
    if area_m is not None:
        width, height = area_m
    elif len(xs):
        width = float(xs.max() - xs.min())
        height = float(ys.max() - ys.min())
    else:
        width = height = _MIN_EXTENT_M
    width = max(width, _MIN_EXTENT_M)
    height = max(height, _MIN_EXTENT_M)
    per_cell = math.sqrt(width * height / max(len(xs), 1))
    return min(max(per_cell, _MIN_CELL_M), _MAX_CELL_M)


class ResponderIndex:
    """Responders by slot: the base tree (tier 1), the live grid (tier 2), duty, expiry.

    Args:
        responders: everyone in the registry, sorted by id (slots of responders at the
            same base keep that order, so slots are reproducible).
        xs, ys: their projected base locations, in the same order.
        cell_m: grid cell size for live positions; None: :func:`cell_size` of the
            eligible responders' bases over ``area_m``.
        area_m: the service area's projected ``(width, height)``, when configured.

    Slots are numbered in Z order of base locations. The per-slot sequences
    (``responders``, ``ids``, ``fix``, ``deadline``, ``on_duty``) and the counts
    (``duty_count``, ``tree_size``, ``eligible_count``, ``live``) are for reading;
    change them through the methods.
    """

    def __init__(
        self,
        responders: Sequence[Responder],
        xs: npt.NDArray[np.float64],
        ys: npt.NDArray[np.float64],
        *,
        cell_m: float | None = None,
        area_m: tuple[float, float] | None = None,
    ) -> None:
        # A query touches the per-slot arrays of a few neighbours; in Z order they share
        # cache lines and pages instead of costing a cache miss each (measured: ~4 us of
        # a k=3 query at 1e6 responders).
        order = _z_order(xs, ys)
        bx, by = xs[order], ys[order]
        ordered = [responders[i] for i in order.tolist()]
        self.responders: list[Responder] = ordered
        self.ids: list[str] = [r.responder_id for r in ordered]
        self.slot_of: dict[str, int] = {rid: i for i, rid in enumerate(self.ids)}
        n = len(ordered)
        self._base_x = array("d", bx.tolist())
        self._base_y = array("d", by.tolist())
        self._eligible = bytearray(r.role is not _SUPERVISOR for r in ordered)
        self.on_duty = bytearray(r.on_duty for r in ordered)
        self.duty_count = sum(
            1 for e, d in zip(self._eligible, self.on_duty, strict=True) if e and d
        )
        eligible_slots = np.flatnonzero(np.frombuffer(bytes(self._eligible), dtype=np.uint8))
        self._eligible_slots = eligible_slots.astype(np.int64)
        self.eligible_count = len(eligible_slots)
        # The tree is keyed by slot and holds the eligible responders on duty when it was
        # built, plus those who came on duty since (inserted; cheap). Those who went off
        # duty stay in it, skipped like masked entries (deleting is what is expensive),
        # until the next rebuild: a reload of the registry.
        self._in_tree = bytearray(
            e and d for e, d in zip(self._eligible, self.on_duty, strict=True)
        )
        tree_slots = np.flatnonzero(np.frombuffer(bytes(self._in_tree), dtype=np.uint8))
        self.tree_size = len(tree_slots)
        self._base_tree = point_tree(bx[tree_slots], by[tree_slots], tree_slots.astype(np.int64))

        # Live tier.
        self.fix: list[Fix | None] = [None] * n
        self.deadline = array("d", [-math.inf]) * n
        self._heap: list[tuple[float, int]] = []
        self.live: set[int] = set()  # slots with a fresh fix, any role
        self._cells: dict[_Cell, set[int]] = {}
        self._cell_of: dict[int, _Cell] = {}
        self._grid_box: list[int] = [0, -1, 0, -1]  # min cx, max cx, min cy, max cy
        self.cell_m = (
            cell_m
            if cell_m is not None
            else cell_size(bx[eligible_slots], by[eligible_slots], area_m)
        )
        self._batch_sizes: dict[tuple[int, int], int] = {}

    # ---- live fixes and duty -------------------------------------------------------------

    def fresh_fix(self, slot: int) -> Fix | None:
        """The slot's live fix if it is fresh (as of the last :meth:`expire`)."""
        return None if self.deadline[slot] == -math.inf else self.fix[slot]

    def fresh_fixes(self) -> Iterator[tuple[str, Fix]]:
        """``(responder id, fix)`` of every fresh fix (as of the last :meth:`expire`)."""
        deadline = self.deadline
        for slot, fix in enumerate(self.fix):
            if fix is not None and deadline[slot] != -math.inf:
                yield self.ids[slot], fix

    def apply_fix(self, slot: int, fix: Fix, deadline: float) -> None:
        """Make ``fix`` the slot's live position until ``deadline`` (epoch seconds)."""
        self.live.add(slot)
        self.fix[slot] = fix
        self.deadline[slot] = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, slot))
        if len(heap) > 4 * len(self.live) + 1024:
            # Superseded deadlines pile up with frequent fixes; keep one per live slot.
            self._heap = [(self.deadline[s], s) for s in self.live]
            heapq.heapify(self._heap)
        if self._eligible[slot]:
            self._grid_move(slot, fix.x, fix.y)

    def _grid_move(self, slot: int, x: float, y: float) -> None:
        c = self.cell_m
        gx, gy = math.floor(x / c), math.floor(y / c)
        key = _cell_key(gx, gy)
        old = self._cell_of.get(slot)
        if old == key:
            return
        if old is not None:
            self._grid_discard(slot, old)
        self._cells.setdefault(key, set()).add(slot)
        self._cell_of[slot] = key
        box = self._grid_box
        if box[0] > box[1]:
            box[:] = [gx, gx, gy, gy]
        else:
            box[0] = min(box[0], gx)
            box[1] = max(box[1], gx)
            box[2] = min(box[2], gy)
            box[3] = max(box[3], gy)

    def _grid_discard(self, slot: int, key: _Cell) -> None:
        members = self._cells[key]
        members.discard(slot)
        if not members:
            del self._cells[key]
            if not self._cells:
                self._grid_box[:] = [0, -1, 0, -1]

    def expire(self, now: float) -> None:
        """Drop the fixes whose deadline is ``now`` or earlier (their bases count again)."""
        heap = self._heap
        deadline = self.deadline
        while heap and heap[0][0] <= now:
            d, slot = heapq.heappop(heap)
            if deadline[slot] != d:
                continue  # superseded by a newer fix, or already expired
            deadline[slot] = -math.inf
            self.live.discard(slot)
            key = self._cell_of.pop(slot, None)
            if key is not None:
                self._grid_discard(slot, key)
            _log.debug("geo.position.stale", responder_id=self.ids[slot])

    def set_on_duty(self, slot: int, on_duty: bool) -> bool:
        """Set the slot's on-duty flag; returns the flag it had."""
        was = bool(self.on_duty[slot])
        self.on_duty[slot] = on_duty
        if self._eligible[slot] and was != on_duty:
            self.duty_count += 1 if on_duty else -1
        if on_duty and self._eligible[slot] and not self._in_tree[slot]:
            self._tree_insert(slot)
        return was

    def _tree_insert(self, slot: int) -> None:
        x, y = self._base_x[slot], self._base_y[slot]
        if self._base_tree is None:
            self._base_tree = point_tree(
                np.array([x]), np.array([y]), np.array([slot], dtype=np.int64)
            )
        else:
            self._base_tree.insert(slot, x, y)
        self._in_tree[slot] = 1
        self.tree_size += 1

    # ---- queries ---------------------------------------------------------------------------

    def nearest(
        self, qx: float, qy: float, k: int, exclude: Collection[str], now: float
    ) -> list[int]:
        """Slots of the k nearest on-duty, eligible responders not in ``exclude``.

        Nearest first by projected distance from the live fix, or the base location
        when there is no fresh fix at ``now``; ties broken by id. ``k`` must be >= 1.
        """
        self.expire(now)
        excluded: Container[int] = ()
        if exclude:
            # A bare string is a Collection[str] too; it means one id, not its letters.
            ids = (exclude,) if isinstance(exclude, str) else exclude
            excluded = self._excluded_slots(ids)
        if self.duty_count <= 0 or self._base_tree is None:
            return []
        if exclude and len(exclude) >= self.duty_count and not self._anyone_left(excluded):
            return []

        if self._cells and len(self._cell_of) >= _LIVE_FIRST_SHARE * self.tree_size:
            # Most of tier 1 is masked by live fixes: a batch of nearest base entries
            # would be mostly skipped. Ask tier 2 first, then tier 1 only for the base
            # entries within the k-th best distance found there.
            best = _KBest(k)
            self._scan_live(qx, qy, best, excluded)
            if best.bound != math.inf:
                # Padded: an entry exactly at the k-th distance must be seen (ties are
                # decided by id); anything farther is turned away by the bound.
                r = math.sqrt(best.bound) * (1.0 + 1e-9) + 1e-6
                hits = self._base_tree.intersection((qx - r, qy - r, qx + r, qy + r))
                self._offer_any_order(hits, qx, qy, best, excluded)
                return best.top(self.ids)
            # Fewer than k live ones qualify: tier 1 first, as usual.

        best = _KBest(k)
        tree = self._base_tree
        total = self.tree_size
        batch = self._first_batch(k, total, len(exclude))
        got = tree.nearest(qx, qy, batch)
        self._offer_base(got, qx, qy, best, excluded)
        if self._cells:
            self._scan_live(qx, qy, best, excluded)
        # rtree returns at least `batch` entries (all of them if fewer), nearest first and
        # with ties at the last distance included, so every entry not returned yet is
        # farther than the last one: stop once the k-th best is not farther than that.
        while len(got) < total:
            last = got[-1]
            dx = self._base_x[last] - qx
            dy = self._base_y[last] - qy
            if best.bound <= dx * dx + dy * dy:
                break
            seen = set(got)
            batch = min(batch * 4, total)
            got = tree.nearest(qx, qy, batch)
            self._offer_base([s for s in got if s not in seen], qx, qy, best, excluded)
        return best.top(self.ids)

    def _excluded_slots(self, ids: Collection[str]) -> Container[int]:
        """``ids`` as something that answers ``slot in ...``.

        A few ids become a set of slots. Many (a storm: every open alarm holds its
        responders) are not converted, which would cost O(ids) per query: a slot is
        looked up by its id instead, at the price of touching that id per candidate.
        """
        if len(ids) <= _EXCLUDE_CONVERT_MAX:
            slot_of = self.slot_of
            return {slot_of[r] for r in ids if r in slot_of}
        as_set = ids if isinstance(ids, (set, frozenset, KeysView)) else frozenset(ids)
        return _ExcludedById(self.ids, as_set)

    def _anyone_left(self, excluded: Container[int]) -> bool:
        """Whether an eligible, on-duty responder is not ``excluded`` (O(responders))."""
        on_duty = self.on_duty
        return any(on_duty[s] and s not in excluded for s in self._eligible_slots.tolist())

    def _first_batch(self, k: int, total: int, excluded: int = 0) -> int:
        # Ask for enough entries that k of them are almost surely valid (on duty, not
        # masked by a live fix): a second rtree call costs ~15 us, an extra entry in the
        # first ~0.7 us (entries past the k-th valid one are not even examined). Capped:
        # when nearly everyone is live, tier 2 supplies the answer and tier 1 only has to
        # confirm that nothing is closer.
        valid = (
            (self.duty_count / total)
            * (1.0 - len(self._cell_of) / total)
            * max(0.0, 1.0 - excluded / total)
        )
        # Round the share down (a larger batch), so that the cache stays small.
        key = (k, math.floor(valid * 100.0))
        size = self._batch_sizes.get(key)
        if size is None:
            size = _batch_for(k, key[1] / 100.0, cap=max(8 * k, 64))
            self._batch_sizes[key] = size
        return min(size, total)

    def _offer_base(
        self, slots: Sequence[int], qx: float, qy: float, best: _KBest, excluded: Container[int]
    ) -> None:
        """Offer tier-1 entries, given in rtree order (nearest first), to ``best``."""
        deadline = self.deadline
        on_duty = self.on_duty
        bx, by = self._base_x, self._base_y
        no_fix = -math.inf
        if not best.items:
            # The first batch (the common case): slots come nearest first, so the k-th
            # valid one sets the bound and only ties with it may follow.
            k = best.k
            items = best.items
            bound = math.inf
            for slot in slots:
                # A fresh fix masks the base entry: tier 2 has this responder.
                if deadline[slot] != no_fix or not on_duty[slot] or slot in excluded:
                    continue
                dx = bx[slot] - qx
                dy = by[slot] - qy
                d2 = dx * dx + dy * dy
                if d2 > bound:
                    break
                items.append((d2, slot))
                if len(items) == k:
                    bound = d2
            best.seed_sorted()
            return
        offer = best.offer
        for slot in slots:
            if deadline[slot] != no_fix or not on_duty[slot] or slot in excluded:
                continue
            dx = bx[slot] - qx
            dy = by[slot] - qy
            d2 = dx * dx + dy * dy
            if d2 > best.bound:
                break  # slots come nearest first: none of the rest can do better
            offer(d2, slot)

    def _offer_any_order(
        self, slots: Iterable[int], qx: float, qy: float, best: _KBest, excluded: Container[int]
    ) -> None:
        """Offer tier-1 entries in no particular order to ``best``."""
        deadline = self.deadline
        on_duty = self.on_duty
        bx, by = self._base_x, self._base_y
        no_fix = -math.inf
        for slot in slots:
            if deadline[slot] != no_fix or not on_duty[slot] or slot in excluded:
                continue
            dx = bx[slot] - qx
            dy = by[slot] - qy
            best.offer(dx * dx + dy * dy, slot)

    def _scan_live(self, qx: float, qy: float, best: _KBest, excluded: Container[int]) -> None:
        cells = self._cells
        c = self.cell_m
        box = self._grid_box
        bound = best.bound
        if bound != math.inf:
            # Only cells overlapping the square around the current k-th best can hold a
            # better candidate; clip it to the cells that are occupied at all.
            r = math.sqrt(bound)
            x0 = max(math.floor((qx - r) / c), box[0])
            x1 = min(math.floor((qx + r) / c), box[1])
            y0 = max(math.floor((qy - r) / c), box[2])
            y1 = min(math.floor((qy + r) / c), box[3])
            if x0 > x1 or y0 > y1:
                return
            if (x1 - x0 + 1) * (y1 - y0 + 1) <= len(cells):
                get = cells.get
                groups = [
                    found
                    for gx in range(x0, x1 + 1)
                    for key in range(gx * _GRID_SPAN + y0, gx * _GRID_SPAN + y1 + 1)
                    if (found := get(key))
                ]
                if groups:  # usually none when few responders are live
                    self._offer_live(groups, qx, qy, best, excluded)
                return
            self._offer_live(
                [
                    members
                    for key, members in cells.items()
                    if x0 <= (xy := _cell_xy(key))[0] <= x1 and y0 <= xy[1] <= y1
                ],
                qx,
                qy,
                best,
                excluded,
            )
            return
        # Tier 1 found fewer than k: search outwards ring by ring.
        cx = math.floor(qx / c)
        cy = math.floor(qy / c)
        fx = qx - cx * c
        fy = qy - cy * c
        # Distance from the query to the edge of its own cell: ring r is at least
        # (r - 1) * c + edge away.
        edge = min(fx, c - fx, fy, c - fy)
        max_r = max(cx - box[0], box[1] - cx, cy - box[2], box[3] - cy, 0)
        visited = 0
        occupied = len(cells)
        ring = 0
        while ring <= max_r:
            if ring:
                gap = (ring - 1) * c + edge
                if gap * gap > best.bound:
                    return
            ring_cells = 8 * ring if ring else 1
            if visited + ring_cells > occupied:
                # Fewer occupied cells than cells left to probe: scan them directly.
                groups = []
                for key, members in cells.items():
                    gx, gy = _cell_xy(key)
                    if max(abs(gx - cx), abs(gy - cy)) >= ring:
                        groups.append(members)
                self._offer_live(groups, qx, qy, best, excluded)
                return
            get = cells.get
            self._offer_live(
                [found for key in _ring(cx, cy, ring) if (found := get(key))],
                qx,
                qy,
                best,
                excluded,
            )
            visited += ring_cells
            ring += 1

    def _offer_live(
        self,
        groups: list[set[int]],
        qx: float,
        qy: float,
        best: _KBest,
        excluded: Container[int],
    ) -> None:
        """Offer the members of some grid cells to ``best``."""
        fixes = self.fix
        on_duty = self.on_duty
        offer = best.offer
        for members in groups:
            for slot in members:
                if not on_duty[slot] or slot in excluded:
                    continue
                fix = fixes[slot]
                if fix is None:  # pragma: no cover - grid members always have a fix
                    continue
                dx = fix.x - qx
                dy = fix.y - qy
                offer(dx * dx + dy * dy, slot)
