"""The page allocator: reference counts, LRU reuse, prefix-cache hits, the reserved page."""
from jaxserve.block_pool import NULL_PAGE, BlockPool, chain_hashes


def test_page_zero_is_never_allocated_and_exhaustion_takes_nothing():
    pool = BlockPool(num_pages=5, block_size=4)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
    assert pool.allocate(1) is None and pool.num_free_pages == 0
    pool.release(pages)
    assert pool.num_free_pages == 4 and pool.usage == 0.0


def test_prefix_lookup_finds_registered_full_pages_and_keeps_last_token():
    pool = BlockPool(num_pages=10, block_size=4)
    tokens = list(range(12))
    pages = pool.allocate(3)
    pool.register_full_pages(pages, chain_hashes(tokens, 4), 0)
    pool.release(pages)
    # A longer prompt sharing 12 tokens hits all three pages ...
    hit, hashes = pool.lookup_prefix(tokens + [99])
    assert hit == pages and hashes == chain_hashes(tokens, 4)
    # ... the same prompt leaves its last page to recompute (its last token's logits are needed).
    assert pool.lookup_prefix(tokens)[0] == pages[:2]
    # A different first page breaks the chain even when later pages are equal.
    assert pool.lookup_prefix([7] + tokens[1:] + [99])[0] == []


def test_taken_cached_pages_are_shared_and_evicted_only_when_free():
    pool = BlockPool(num_pages=4, block_size=2)
    tokens = [1, 2, 3, 4]
    pages = pool.allocate(2)
    pool.register_full_pages(pages, chain_hashes(tokens, 2), 0)
    hit, _ = pool.lookup_prefix(tokens + [5])
    pool.take(hit)
    assert [pool.ref_counts[p] for p in pages] == [2, 2]
    pool.release(pages)
    assert pool.num_free_pages == 1          # still held by the second user
    pool.release(hit)
    assert pool.num_free_pages == 3
    # Allocating every page evicts the cached ones: no stale hit afterwards.
    taken = pool.allocate(3)
    assert pool.lookup_prefix(tokens + [5])[0] == []
    pool.release(taken)


def test_disabled_prefix_caching_never_hits():
    pool = BlockPool(num_pages=4, block_size=2, enable_prefix_caching=False)
    pages = pool.allocate(2)
    pool.register_full_pages(pages, chain_hashes([1, 2, 3, 4], 2), 0)
    assert pool.lookup_prefix([1, 2, 3, 4, 5]) == ([], [])
