"""KV block allocation: a free list, per-sequence block tables, reference counts and prefix sharing.

A full block is identified by the hash of its tokens chained with its predecessor's hash, so two prompts with
the same prefix share the same physical blocks (like vLLM's automatic prefix caching). A released block keeps
its contents and hash until it is handed out again, so a repeated prompt finds its prefix even after the first
request has finished. Block 0 is the worker's null block and is never handed out.

A table's `salt` (the request's cache_salt, as in vLLM) starts its chain: only requests with the same salt share
blocks, so one tenant cannot learn from cache hits (cached_prompt_tokens, latency) which prompts another sent.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()  # kept to rule out hash collisions on a prefix hit


@dataclass
class BlockTable:
    """The blocks of one sequence, in order, and how many of its first tokens were found already cached."""

    # an int32 array rather than a list: a worker call's table rows are the tables' bytes joined, with no
    # conversion of every id at every step
    block_ids: array = field(default_factory=lambda: array("i"))
    num_cached_tokens: int = 0
    num_hashed_blocks: int = 0
    last_hash: int | None = None
    salt: str = ""  # the request's cache_salt: the prefix cache is shared only among tables with the same salt

    def __post_init__(self) -> None:
        self.block_ids = array("i", self.block_ids)
        assert self.block_ids.itemsize == 4


class NoFreeBlocks(Exception):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        """num_blocks counts the worker's null block 0, which is kept out of the free list."""
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in the order they should be reused: least recently released first
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up by allocate_prompt (vLLM's prefix_cache_queries)
        self.prefix_hits = 0  # of those, tokens found in cached blocks
        self.evictions = 0  # cached blocks overwritten for other contents (least recently used first)

    @property
    def total_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of the blocks held by sequences (free blocks that still cache a prefix count as free)."""
        return 1.0 - self.num_free / max(1, self.total_blocks)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    # ---- allocation ------------------------------------------------------------------------------------------
    def _take_free(self) -> int:
        if not self._free:
            raise NoFreeBlocks()
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]  # its cached contents are about to be overwritten
            self.evictions += 1
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def allocate_prompt(self, table: BlockTable, tokens: list[int], lookup: bool = True) -> None:
        """Reuses cached full blocks of the prompt's prefix; sets num_cached_tokens. Allocates nothing else.
        lookup=False finds nothing (and counts no query): a prompt whose every position's logits are needed (prompt
        logprobs) is computed whole, as vLLM does; its blocks are still published as it computes them."""
        assert not table.block_ids
        parent = self.chain_hash(None, ("cache_salt", table.salt)) if table.salt else None
        # the last prompt token is always recomputed: its logits are needed to sample the first new token
        for start in range(0, len(tokens) - self.block_size if lookup else 0, self.block_size):
            chunk = tuple(tokens[start:start + self.block_size])
            h = self.chain_hash(parent, chunk)
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            self._ref(block_id)
            table.block_ids.append(block_id)
            parent = h
        table.num_hashed_blocks = len(table.block_ids)
        table.last_hash = parent
        table.num_cached_tokens = len(table.block_ids) * self.block_size
        self.prefix_queries += len(tokens) if lookup else 0
        self.prefix_hits += table.num_cached_tokens

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table.block_ids) <= self.num_free

    def grow(self, table: BlockTable, num_tokens: int) -> list[int]:
        """Makes the table cover num_tokens positions; returns the new block ids. All or nothing."""
        needed = self.blocks_for(num_tokens) - len(table.block_ids)
        if needed > self.num_free:
            raise NoFreeBlocks()
        new = [self._take_free() for _ in range(max(0, needed))]
        table.block_ids.extend(new)
        return new

    def grow_all(self, tables: list[BlockTable], num_tokens: list[int]) -> None:
        """grow() for several tables at once (a decode step's rows entering a new block); the caller made sure
        the free blocks suffice."""
        block_size, take = self.block_size, self._take_free
        for table, n in zip(tables, num_tokens):
            ids = table.block_ids
            for _ in range(-(-n // block_size) - len(ids)):
                ids.append(take())

    def register_full_blocks(self, table: BlockTable, tokens: list[int], num_computed: int) -> None:
        """Publishes the hashes of blocks whose every token is final and in the cache, for later prefix hits."""
        full = min(num_computed, len(tokens)) // self.block_size
        for index in range(table.num_hashed_blocks, min(full, len(table.block_ids))):
            start = index * self.block_size
            chunk = tuple(tokens[start:start + self.block_size])
            h = self.chain_hash(table.last_hash, chunk)
            block = self.blocks[table.block_ids[index]]
            block.hash, block.tokens = h, chunk
            self._by_hash.setdefault(h, block.block_id)
            table.last_hash = h
            table.num_hashed_blocks = index + 1

    def release(self, table: BlockTable) -> None:
        """Drops the table's references; blocks nobody uses go back to the free list, contents kept for reuse."""
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        del table.block_ids[:]
        table.num_cached_tokens = table.num_hashed_blocks = 0
        table.last_hash = None

    def forget_cached_contents(self) -> None:
        """After a worker restart the KV contents are gone: no hash may match any more."""
        self._by_hash.clear()
        for block in self.blocks:
            block.hash, block.tokens = None, ()
