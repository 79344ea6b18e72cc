"""Kernel tuning tables: the optimisations BEAM search found for a model's kernels, kept in a JSON file.

BEAM search makes tinygrad's kernels several times faster on GPUs, but searching a TinyLlama-sized model's buckets
from a cold cache takes over ten minutes. A tuning table records what one search found (kernel key -> the list of
tinygrad `Opt`s applied) so that a later start, on a fresh machine too, applies those optimisations directly and
compiles in parallel: no search. Kernels the table does not know get tinygrad's hand-coded heuristics, so a stale
table (another model shape, other buckets, a changed kernel) is never wrong, only slower.

`make tune` (`python -m bench.tune`) writes a table; the worker loads `tuning/<DEVICE>.json` (or `--tuning FILE`).
The table is loaded into this process and, through the compile-pool initializer (worker_svc.compat), into
tinygrad's compile workers, by the path in TINYVLLM_TUNING.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib

log = logging.getLogger(__name__)

ENV = "TINYVLLM_TUNING"
TUNING_DIR = pathlib.Path(__file__).resolve().parent.parent / "tuning"
FORMAT = 1
LARGE_BYTES = 4_000_000  # kernels this large are worth a table entry (`make tune`'s default --min-mb)


class TuningTable:
    """Kernel key (hex of the unoptimised kernel AST's key, per device) -> opts, as plain JSON values."""

    def __init__(self, entries: dict[str, list] | None = None, device: str = ""):
        self.device = device
        self.entries: dict[str, list] = dict(entries or {})
        self.hits = self.misses = 0
        self.large_misses: list[str] = []  # names of kernels of LARGE_BYTES or more that the table lacked

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "TuningTable":
        raw = json.loads(pathlib.Path(path).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: tuning format {raw.get('format')!r}, expected {FORMAT}")
        return cls(raw["kernels"], raw.get("device", ""))

    def save(self, path: str | pathlib.Path, meta: dict) -> None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({"format": FORMAT, "device": self.device, **meta})[:-1]
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(self.entries.items()))
        path.write_text(f'{head}, "kernels": {{\n{rows}\n}}}}\n')  # one line per kernel: readable diffs


def opt_to_json(opt) -> list:
    arg = list(opt.arg) if isinstance(opt.arg, tuple) else opt.arg
    return [opt.op.name, opt.axis, arg]


def opt_from_json(raw: list):
    from tinygrad.codegen.opt import Opt, OptOps

    op, axis, arg = raw
    return Opt(OptOps[op], axis, tuple(arg) if isinstance(arg, list) else arg)


_table: TuningTable | None = None
_record_min_bytes: int | None = None  # recording: kernels moving fewer bytes get the heuristics, not a search
_key_device: str | None = None  # look kernels up as if they ran on this device (the NULL device rendering for CUDA)


def kernel_bytes(ast) -> int:
    """Bytes of every buffer a kernel touches (upper bound): what decides whether searching it is worth it."""
    from tinygrad.uop.ops import Ops

    return sum(p.max_numel() * p.dtype.itemsize for p in ast.backward_slice if p.op is Ops.PARAM and p.arg.slot >= 0)


def kernel_key(ast, device: str | None = None) -> str:
    """The table's key of a kernel: its AST alone (its KernelInfo carries the BEAM width), with its buffers' device
    renamed to `device` if given (keys name the device the table was made on)."""
    from dataclasses import replace

    from tinygrad.uop.ops import Ops

    ast = ast.replace(arg=None)
    if device is not None:
        ast = ast.substitute({p: p.replace(arg=replace(p.arg, device=device)) for p in ast.toposort()
                              if p.op is Ops.PARAM and isinstance(p.arg.device, str) and p.arg.device != device})
    return ast.key.hex()


def _apply_opts(original, ast, ren, beam: int = 0):
    """tinygrad's apply_opts with the table consulted first; while recording, searches only large kernels."""
    from tinygrad.codegen.opt import KernelOptError
    from tinygrad.codegen.opt.postrange import Scheduler

    table = _table
    if table is None or ast.tag is not None or (ast.arg is not None and ast.arg.opts_to_apply is not None):
        return original(ast, ren, beam)
    k = Scheduler(ast, ren)
    k.convert_loop_to_global()
    key = kernel_key(k.ast, _key_device)
    name = ast.arg.name if ast.arg is not None and ast.arg.name != "test" else None
    if (opts := table.entries.get(key)) is not None:
        try:
            for raw in opts:
                k.apply_opt(opt_from_json(raw))
            table.hits += 1
            return k.get_optimized_ast(name_override=name)
        except KernelOptError as exc:  # a table made by another tinygrad version or device: fall back
            log.warning("tuning entry %s does not apply (%s); using heuristics", key[:12], exc)
    table.misses += 1
    large = kernel_bytes(ast) >= LARGE_BYTES
    if beam and _record_min_bytes is not None and kernel_bytes(ast) < _record_min_bytes:
        beam = 0  # small kernel: not worth a search
    out = original(ast, ren, beam)
    if large:
        from tinygrad.helpers import ansistrip

        table.large_misses.append(f"{ansistrip(out.arg.name)} ({key[:12]})")
    if beam and _record_min_bytes is not None:
        table.entries[key] = [opt_to_json(o) for o in out.arg.applied_opts]
    return out


def install(table: TuningTable, record_min_bytes: int | None = None, key_device: str | None = None) -> None:
    """Makes tinygrad consult `table` for every kernel it optimises in this process. With record_min_bytes, kernels
    of at least that many bytes that the table lacks are BEAM-searched (when BEAM/JITBEAM is on) and added.
    key_device: look kernels up as if their buffers were on that device (bench.startup: NULL renders for CUDA)."""
    global _table, _record_min_bytes, _key_device
    from tinygrad import codegen
    from tinygrad.codegen.opt import postrange

    _table, _record_min_bytes, _key_device = table, record_min_bytes, key_device
    original = getattr(postrange, "_tinyvllm_apply_opts", postrange.apply_opts)
    postrange._tinyvllm_apply_opts = original

    def apply_opts(ast, ren, beam=0):
        return _apply_opts(original, ast, ren, beam)

    postrange.apply_opts = apply_opts
    codegen.apply_opts = apply_opts  # codegen imported the name before we got here


def default_path(device: str) -> pathlib.Path:
    return TUNING_DIR / f"{device.split(':')[0]}.json"


def load_for(device: str, path: str | None) -> TuningTable | None:
    """The table to use: `path` if given ('' or 'none' for none), else the shipped one for the device, if any.
    Sets TINYVLLM_TUNING so that tinygrad's compile workers load the same table."""
    if path is not None and path.lower() in ("", "none"):
        return None
    file = pathlib.Path(path) if path else default_path(device)
    if not file.exists():
        if path:
            raise FileNotFoundError(f"tuning table {file} not found")
        return None
    table = TuningTable.load(file)
    if table.device and table.device != device.split(":")[0]:
        log.warning("tuning table %s is for %s, not %s: ignored", file, table.device, device)
        return None
    os.environ[ENV] = str(file)
    log.info("tuning table %s: %d kernels", file, len(table.entries))
    return table


def install_from_environment() -> None:
    """In a compile worker process: load the parent's table, if it named one."""
    if path := os.environ.get(ENV):
        install(TuningTable.load(path))
