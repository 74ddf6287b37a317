"""A first check that the package imports and allocates."""

from mmap_alloc import MapAlloc


def test_alloc_returns_zeroed_page_aligned_region(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(1) as region:
        assert region.address % page == 0
        assert region.capacity == page
        assert bytes(region) == b"\0"
