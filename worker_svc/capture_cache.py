"""A disk cache of what tinygrad derives at graph capture, so that a restarted worker skips most of its warm-up.

Capturing a bucket's graphs is tinygrad's Python work: scheduling the step's tensor graph into kernels, then
optimising, lowering and rendering each kernel (bench.startup measures it). tinygrad keeps both results in memory
only (schedule_cache, to_program_cache); its disk cache holds compiled binaries, keyed by source, which a kernel
only has once it was lowered and rendered. This module keeps both on disk, in tinygrad's cache database (CACHEDB,
~/.cache/tinygrad/cache.db; CACHELEVEL=0 turns it off, as it does tinygrad's own caches):

- schedules, keyed by the key of the function tinygrad schedules: a hash of the whole tensor graph (every op,
  shape, dtype, device and constant), so a change in the model's code or the buckets is a different key;
- lowered programs (kernel source and binary), keyed as tinygrad's in-memory cache keys them: the kernel AST, the
  renderer and its target, and the code-generation settings.

Both keys also include a fingerprint of everything else that decides the value: tinygrad's installed code and its
settings (ContextVars), the source of our patches to lowering (worker_svc.tuning, worker_svc.compat), the tuning
table's entries and the compiler. A stale entry is never used; it is only never hit again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import pickle
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger(__name__)

FORMAT = 2  # bump when what is stored changes
SCHEDULES, PROGRAMS = "tinyvllm_schedules", "tinyvllm_programs"
# settings that change how tinygrad reports or runs, not what it schedules or lowers
_NEUTRAL_SETTINGS = {"DEBUG", "VIZ", "PROFILE", "TRACK_MATCH_STATS", "CAPTURING", "PARALLEL", "CACHELEVEL",
                     "IGNORE_BEAM_CACHE", "NUM_CPU_THREADS"}


@dataclass
class Stats:
    """Hits and misses of this process, for the start-up log and tests."""

    schedule_hits: int = 0
    schedule_misses: int = 0
    program_hits: int = 0
    program_misses: int = 0


stats = Stats()
_active = False  # the disk is used only while warming up (`active`): not from serving threads, not per request
_code_fingerprint: str | None = None
_table_fingerprints: dict[int, str] = {}


def _code() -> str:
    """tinygrad's installed files (path, size, modification time) and the source of our patches to lowering."""
    global _code_fingerprint
    if _code_fingerprint is None:
        import tinygrad

        h = hashlib.sha256(f"format {FORMAT} tinygrad {getattr(tinygrad, '__version__', '?')}".encode())
        root = pathlib.Path(tinygrad.__file__).parent
        for path in sorted(root.rglob("*.py")):
            st = path.stat()
            h.update(f"{path.relative_to(root)} {st.st_size} {st.st_mtime_ns}\n".encode())
        here = pathlib.Path(__file__).parent
        for name in ("tuning.py", "compat.py", "capture_cache.py"):
            h.update((here / name).read_bytes())
        _code_fingerprint = h.hexdigest()
    return _code_fingerprint


def _settings() -> str:
    """tinygrad's current settings (ContextVars) that can change a schedule or a program."""
    from tinygrad.helpers import ContextVar

    return repr(sorted((k, repr(v.value)) for k, v in ContextVar._cache.items() if k not in _NEUTRAL_SETTINGS))


def _tuning() -> str:
    """The tuning table in use (worker_svc.tuning): its entries decide the optimisations a program was lowered with."""
    from worker_svc import tuning

    table = tuning._table
    if table is None:
        return "no table"
    if (fp := _table_fingerprints.get(id(table))) is None:
        body = json.dumps([table.device, tuning._key_device, tuning._record_min_bytes, table.entries], sort_keys=True)
        fp = _table_fingerprints[id(table)] = hashlib.sha256(body.encode()).hexdigest()
    return fp


_db: sqlite3.Connection | None = None  # our own connection to tinygrad's cache database, open inside `active`


def _open() -> sqlite3.Connection | None:
    """A connection of this thread to tinygrad's cache database (CACHEDB), or None where CACHELEVEL turns caching
    off. Not tinygrad's own connection: that one belongs to the thread that first opened it, and tinygrad's compile
    cache uses it from whichever thread compiles a kernel later (a serving thread)."""
    from tinygrad.helpers import CACHEDB, CACHELEVEL

    if CACHELEVEL < 1:
        return None
    os.makedirs(os.path.dirname(CACHEDB), exist_ok=True)
    db = sqlite3.connect(CACHEDB, timeout=60)
    db.execute(f"CREATE TABLE IF NOT EXISTS '{PROGRAMS}_{FORMAT}' (key text PRIMARY KEY, val blob)")
    db.execute(f"CREATE TABLE IF NOT EXISTS '{SCHEDULES}_{FORMAT}' "
               "(fp text, fkey blob, val blob, PRIMARY KEY (fp, fkey))")
    db.commit()
    return db


def _load(table: str, key: str) -> Any:
    """The stored value, or None (absent, caching off, or unreadable: then it is recomputed and stored again)."""
    if _db is None:
        return None
    try:
        row = _db.execute(f"SELECT val FROM '{table}_{FORMAT}' WHERE key=?", (key,)).fetchone()
        return None if row is None else pickle.loads(row[0])
    except Exception as exc:  # noqa: BLE001  (a damaged or foreign entry is a miss, never a failed start)
        log.warning("capture cache: entry %s of %s unreadable (%s); recomputing it", key[:12], table, exc)
        return None


def _structure_only(u) -> tuple:
    """A UOp pickled without the device buffer tinygrad attaches to some (UOp.__reduce__ pickles its contents).
    A schedule's intermediate buffers are placeholders that each use replaces with new ones, but tinygrad may have
    attached a buffer to one meanwhile (seen: the demo model's logits); what is stored is the structure alone."""
    from tinygrad.uop.ops import UOp

    return UOp, (u.op, u.dtype, u.src, u.arg, u.tag, u.metadata)


def dumps(value: Any) -> bytes:
    import copyreg
    import io

    from tinygrad.uop.ops import UOp

    out = io.BytesIO()
    pickler = pickle.Pickler(out)
    pickler.dispatch_table = {**copyreg.dispatch_table, UOp: _structure_only}
    pickler.dump(value)
    return out.getvalue()


def _store(table: str, key: str, value: Any) -> None:
    if _db is None:
        return
    try:
        _db.execute(f"REPLACE INTO '{table}_{FORMAT}' (key, val) VALUES (?, ?)", (key, dumps(value)))
        _db.commit()
    except Exception as exc:  # noqa: BLE001  (an entry not stored only makes the next start slower)
        log.warning("capture cache: could not store an entry of %s (%s)", table, exc)


def _disk_key(*parts: Any) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()


def program_key(key: tuple, renderer) -> str:
    """tinygrad's to_program_key (AST key, renderer type, target, settings) plus the tuning table and compiler."""
    ast_key, renderer_type, *rest = key
    compiler = getattr(renderer, "compiler", None)
    compiler_id = None if compiler is None else (type(compiler).__qualname__, getattr(compiler, "cachekey", None))
    return _disk_key("program", _code(), _settings(), _tuning(), ast_key.hex(),
                     f"{renderer_type.__module__}.{renderer_type.__qualname__}", repr(rest), repr(compiler_id))


def _schedules_fingerprint() -> str:
    return _disk_key("schedules", _code(), _settings())


def _load_schedules(cache: dict) -> set[bytes]:
    """Every stored schedule made under this fingerprint, put into tinygrad's schedule cache; their keys.

    tinygrad's cache is filled in place, not replaced by a disk-backed one: its scheduler looks the cache up
    through a copy of its module's globals taken when the pattern is first used (uop/ops.py
    deconstruct_function), so a replacement installed after the process's first schedule would never be seen."""
    if _db is None:
        return set()
    try:
        rows = _db.execute(f"SELECT fkey, val FROM '{SCHEDULES}_{FORMAT}' WHERE fp=?",
                           (_schedules_fingerprint(),)).fetchall()
    except Exception as exc:  # noqa: BLE001
        log.warning("capture cache: schedules unreadable (%s)", exc)
        return set()
    loaded = set()
    for fkey, val in rows:
        try:
            cache.setdefault(bytes(fkey), pickle.loads(val))
            loaded.add(bytes(fkey))
        except Exception as exc:  # noqa: BLE001  (a damaged entry is recomputed)
            log.warning("capture cache: a schedule is unreadable (%s)", exc)
    return loaded


def _store_schedules(cache: dict, keys: list[bytes]) -> None:
    if _db is None or not keys:
        return
    fp = _schedules_fingerprint()
    for fkey in keys:
        try:
            _db.execute(f"REPLACE INTO '{SCHEDULES}_{FORMAT}' (fp, fkey, val) VALUES (?, ?, ?)",
                        (fp, fkey, dumps(cache[fkey])))
        except Exception as exc:  # noqa: BLE001  (not stored: only the next start is slower)
            log.warning("capture cache: could not store a schedule (%s)", exc)
    _db.commit()


class DiskPrograms:
    """The program store of worker_svc.lowering: lowered, compiled kernels by tinygrad's in-memory cache key."""

    def load(self, key: tuple, renderer) -> Any:
        if not _active:
            return None
        if (program := _load(PROGRAMS, program_key(key, renderer))) is None:
            stats.program_misses += 1
        else:
            stats.program_hits += 1
        return program

    def save(self, key: tuple, renderer, program) -> None:
        if _active:
            _store(PROGRAMS, program_key(key, renderer), program)


@contextmanager
def active() -> Iterator[None]:
    """Use the disk inside this block (the warm-up, in the thread that runs it): tinygrad's cache database is a
    connection of the thread that opened it, and what runs after warm-up (a slot's first penalties, say) should
    not wait on the disk."""
    global _active, _db
    import tinygrad.schedule as schedule

    install()
    _db, _active = _open(), True
    cache = schedule.schedule_cache
    loaded = _load_schedules(cache)
    before = set(cache)
    try:
        yield
    finally:
        _active = False
        new = [k for k in cache if k not in before]
        stats.schedule_hits += len(loaded)
        stats.schedule_misses += len(new)
        _store_schedules(cache, new)
        if _db is not None:
            _db.close()
        _db = None


def install() -> None:
    """Give tinygrad's lowering the disk as a program store, in this process (idempotent; used only inside
    `active`)."""
    from worker_svc import lowering

    lowering.install(DiskPrograms())
