"""Block manager: allocation, growth across block boundaries, release, exhaustion, prefix sharing."""
from __future__ import annotations

import pytest

from scheduler_svc.block_manager import BlockManager, BlockTable, NoFreeBlocks


def test_null_block_is_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.total_blocks == bm.num_free == 4
    table = BlockTable()
    bm.grow(table, 16)
    assert sorted(table.block_ids) == [1, 2, 3, 4]


def test_growth_across_block_boundaries():
    bm = BlockManager(num_blocks=9, block_size=4)
    table = BlockTable()
    assert bm.grow(table, 1) and len(table.block_ids) == 1
    assert bm.grow(table, 4) == []  # still fits in the first block
    assert len(bm.grow(table, 5)) == 1  # position 4 starts block 2
    bm.grow(table, 12)
    assert len(table.block_ids) == 3 and bm.num_free == 5
    assert len(set(table.block_ids)) == 3


def test_release_returns_every_block():
    bm = BlockManager(num_blocks=9, block_size=4)
    a, b = BlockTable(), BlockTable()
    bm.grow(a, 10)
    bm.grow(b, 7)
    assert bm.num_free == 8 - 5
    bm.release(a)
    bm.release(b)
    assert bm.num_free == bm.total_blocks and not a.block_ids and not b.block_ids
    with pytest.raises(AssertionError):
        bm.release(BlockTable(block_ids=[1]))  # a block nobody holds


def test_running_out_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = BlockTable(), BlockTable()
    bm.grow(a, 8)
    assert not bm.can_grow(b, 8)
    with pytest.raises(NoFreeBlocks):
        bm.grow(b, 8)
    assert not b.block_ids and bm.num_free == 1
    assert bm.can_grow(b, 4)


def test_prefix_sharing_of_full_blocks():
    bm = BlockManager(num_blocks=12, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks + 3
    first = BlockTable()
    bm.allocate_prompt(first, prompt)
    assert first.num_cached_tokens == 0
    bm.grow(first, len(prompt))
    bm.register_full_blocks(first, prompt, num_computed=len(prompt))
    assert first.num_hashed_blocks == 2

    second = BlockTable()
    bm.allocate_prompt(second, prompt[:9] + [999, 998])  # same first two blocks, different tail
    assert second.num_cached_tokens == 8 and second.block_ids.tolist() == first.block_ids[:2].tolist()
    assert bm.blocks[first.block_ids[0]].ref_count == 2

    third = BlockTable()
    bm.allocate_prompt(third, [5] + prompt[1:])  # differs in the first token: nothing shared (chained hashes)
    assert third.num_cached_tokens == 0

    bm.release(first)
    bm.release(second)
    assert bm.num_free == bm.total_blocks
    again = BlockTable()
    bm.allocate_prompt(again, prompt)  # released blocks keep their contents until reused
    assert again.num_cached_tokens == 8


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    t = BlockTable()
    bm.allocate_prompt(t, prompt)
    bm.grow(t, 8)
    bm.register_full_blocks(t, prompt, 8)
    again = BlockTable()
    bm.allocate_prompt(again, prompt)
    assert again.num_cached_tokens == 4  # the block holding the last token is recomputed for its logits


def test_reused_block_forgets_its_hash():
    bm = BlockManager(num_blocks=3, block_size=2)  # two usable blocks
    prompt = [1, 2, 3]
    t = BlockTable()
    bm.allocate_prompt(t, prompt)
    bm.grow(t, 3)
    bm.register_full_blocks(t, prompt, 3)
    bm.release(t)
    hog = BlockTable()
    bm.grow(hog, 4)  # takes both blocks, overwriting the cached contents
    probe = BlockTable()
    bm.allocate_prompt(probe, prompt)
    assert probe.num_cached_tokens == 0


def test_cached_blocks_are_evicted_least_recently_used_and_only_when_needed():
    """Released blocks keep their prefix until the pool needs them; the one released longest ago goes first, and a
    hit makes a block recent again. Hit rate and evictions are counted; reference counts return to zero."""
    bm = BlockManager(num_blocks=10, block_size=4)  # 9 usable
    prompts = {name: [base + i for i in range(9)] for name, base in (("a", 100), ("b", 200), ("c", 300))}
    tables = {}
    for name, tokens in prompts.items():  # each: 2 full blocks cached, 3 blocks held
        t = tables[name] = BlockTable()
        bm.allocate_prompt(t, tokens)
        bm.grow(t, len(tokens))
        bm.register_full_blocks(t, tokens, len(tokens))
    assert bm.num_free == 0
    for name in ("a", "b"):
        bm.release(tables[name])
    assert bm.evictions == 0  # nothing overwritten while free blocks remain
    hit = BlockTable()
    bm.allocate_prompt(hit, prompts["a"])  # a's prefix becomes recently used again
    assert hit.num_cached_tokens == 8
    bm.release(hit)
    fresh = BlockTable()
    bm.grow(fresh, 4 * 4)  # 4 blocks: a's uncached tail, then all of b's (released before a's hit)
    assert bm.evictions == 2
    again_b, again_a = BlockTable(), BlockTable()
    bm.allocate_prompt(again_b, prompts["b"])
    bm.allocate_prompt(again_a, prompts["a"])
    assert again_b.num_cached_tokens == 0 and again_a.num_cached_tokens == 8
    assert 0 < bm.hit_rate < 1 and bm.prefix_hits == 16
    for t in (again_a, again_b, fresh, tables["c"]):
        bm.release(t)
    assert all(b.ref_count == 0 for b in bm.blocks) and bm.num_free == bm.total_blocks


def test_cache_salt_separates_prefix_caches():
    """Tables with another salt (or none) never find each other's blocks; the same salt shares them."""
    bm = BlockManager(num_blocks=12, block_size=4)
    prompt = list(range(100, 111))
    first = BlockTable(salt="tenant-a")
    bm.allocate_prompt(first, prompt)
    bm.grow(first, len(prompt))
    bm.register_full_blocks(first, prompt, num_computed=len(prompt))
    for salt, cached in (("tenant-b", 0), ("", 0), ("tenant-a", 8)):
        table = BlockTable(salt=salt)
        bm.allocate_prompt(table, prompt)
        assert table.num_cached_tokens == cached, salt
        bm.release(table)
    unsalted = BlockTable()
    bm.allocate_prompt(unsalted, prompt)
    bm.grow(unsalted, len(prompt))
    bm.register_full_blocks(unsalted, prompt, num_computed=len(prompt))
    salted = BlockTable(salt="tenant-b")
    bm.allocate_prompt(salted, prompt)
    assert salted.num_cached_tokens == 0  # nor does a salted request see the shared cache
