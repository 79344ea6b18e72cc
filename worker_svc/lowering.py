"""tinygrad 0.14.0's `lower_and_compile` (engine/realize.py), replaced: the same kernels, lowered and compiled the
same way, with two changes that decide how long graph capture takes.

1. Compiled programs are swapped into the calls directly. tinygrad swaps each one in with `ast.substitute`, which
   rewrites the kernel's whole AST to replace its root, and then substitutes the calls into the step's linear the
   same way, walking every kernel again: about a third of a worker restart's warm-up (bench.startup, NULL:CUDA).
2. A program store (worker_svc.capture_cache), when installed, is asked for the programs tinygrad lacks in memory
   before they are lowered, and given the ones lowered here.
"""
from __future__ import annotations

from typing import Protocol


class ProgramStore(Protocol):
    def load(self, key: tuple, renderer) -> object | None: ...
    def save(self, key: tuple, renderer, program) -> None: ...


_store: ProgramStore | None = None


def lower_and_compile(linear):
    """Every kernel call of `linear` with its compiled PROGRAM in place of its AST (tinygrad's own lowering and
    compilation for what neither its in-memory cache nor the store has: in its pool of processes, when it has one)."""
    from tinygrad.codegen import to_program_cache, to_program_key
    from tinygrad.engine import realize
    from tinygrad.uop.ops import UOp, Ops

    calls = {c: a for c in linear.toposort() if c.op is Ops.CALL and (a := realize._get_call_to_compile(c)) is not None}
    if not calls:
        return linear
    keys = {c: to_program_key(*a) for c, a in calls.items()}
    todo: dict[tuple, UOp] = {}
    for call, (ast, renderer) in calls.items():
        key = keys[call]
        if key in to_program_cache or key in todo:
            continue
        if _store is not None and (program := _store.load(key, renderer)) is not None:
            to_program_cache[key] = program
        else:
            todo[key] = call
    if todo:  # tinygrad compiles them into its cache; its swap costs little on this short linear
        _original(UOp(Ops.LINEAR, src=tuple(todo.values())))
        if _store is not None:
            for key, call in todo.items():
                _store.save(key, calls[call][1], to_program_cache[key])

    def swapped(call: UOp) -> UOp:
        ast, program = calls[call][0], to_program_cache[keys[call]]
        body = program if call.src[0] is ast else call.src[0].substitute({ast: program})
        return call.replace(src=(body, *call.src[1:]))

    swaps = {c: swapped(c) for c in calls}
    if linear.op is Ops.LINEAR and swaps.keys() <= set(linear.src):  # every call at the top: no rewrite needed
        return linear.replace(src=tuple(swaps.get(c, c) for c in linear.src))
    return linear.substitute(swaps, name="precompile kernels")


def _original(linear):
    from tinygrad.engine import realize

    return getattr(realize, "_tinygrad_lower_and_compile", realize.lower_and_compile)(linear)


def install(store: ProgramStore | None = None) -> None:
    """Use this lower_and_compile in this process (idempotent); with a store, also that store."""
    global _store
    from tinygrad.engine import realize

    if not hasattr(realize, "_tinygrad_lower_and_compile"):
        realize._tinygrad_lower_and_compile = realize.lower_and_compile
        realize.lower_and_compile = lower_and_compile
    if store is not None:
        _store = store
