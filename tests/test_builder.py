"""MapAllocBuilder: immutable configuration, validated only at build()."""

from __future__ import annotations

import dataclasses

import pytest

from mmap_alloc import Layout, MapAlloc, MapAllocBuilder, Perm
from mmap_alloc._linux import PAGE_SIZE as P

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC

SETTERS = [
    ("read", (False,)),
    ("read", ()),
    ("write", (False,)),
    ("write", ()),
    ("exec", (True,)),
    ("exec", ()),
    ("no_write", ()),
    ("commit", (True,)),
    ("commit", ()),
    ("obj_size", (2 * P,)),
    ("obj_align", (16,)),
    ("huge_pagesize", (None,)),
]


def test_defaults_are_read_write_no_exec_no_commit_page_objects() -> None:
    alloc = MapAllocBuilder().build()
    assert isinstance(alloc, MapAlloc)
    assert alloc.requested_perms == R | W
    assert alloc.perms == R | W
    assert not alloc.commits
    assert alloc.page_size == P
    assert alloc.obj_layout == Layout(P, P)
    assert alloc.huge_pagesize is None


def test_default_builder_builds_what_map_alloc_makes() -> None:
    built, made = MapAllocBuilder().build(), MapAlloc()
    assert (built.perms, built.commits, built.page_size, built.obj_layout) == (
        made.perms,
        made.commits,
        made.page_size,
        made.obj_layout,
    )


@pytest.mark.parametrize(("name", "args"), SETTERS, ids=[f"{n}{a}" for n, a in SETTERS])
def test_every_setter_returns_a_new_builder_and_leaves_the_old_one_unchanged(
    name: str, args: tuple[object, ...]
) -> None:
    old = MapAllocBuilder()
    snapshot = dataclasses.replace(old)
    new = getattr(old, name)(*args)
    assert isinstance(new, MapAllocBuilder)
    assert new is not old
    assert old == snapshot == MapAllocBuilder()


def test_builders_cannot_be_changed_in_place() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MapAllocBuilder().readable = False  # type: ignore[misc]


def test_builders_compare_by_configuration() -> None:
    assert MapAllocBuilder().exec() == MapAllocBuilder().exec(True)
    assert MapAllocBuilder().exec() != MapAllocBuilder()
    assert hash(MapAllocBuilder().commit()) == hash(MapAllocBuilder().commit())


@pytest.mark.parametrize(
    ("builder", "perms"),
    [
        (MapAllocBuilder(), R | W),
        (MapAllocBuilder().read(False), W),
        (MapAllocBuilder().write(False), R),
        (MapAllocBuilder().no_write(), R),
        (MapAllocBuilder().exec(), R | W | X),
        (MapAllocBuilder().no_write().exec(), R | X),
        (MapAllocBuilder().read(False).no_write(), Perm.NONE),
        (MapAllocBuilder().read(False).no_write().exec(), X),
        (MapAllocBuilder().read(False).exec(), W | X),
        (MapAllocBuilder().exec().exec(False), R | W),
    ],
)
def test_permission_setters_configure_the_requested_perms(
    builder: MapAllocBuilder, perms: Perm
) -> None:
    alloc = builder.build()
    assert alloc.requested_perms == perms
    assert alloc.perms == perms  # Linux gives every combination exactly


def test_no_write_after_write_wins_and_vice_versa() -> None:
    assert MapAllocBuilder().write().no_write().build().perms == R
    assert MapAllocBuilder().no_write().write().build().perms == R | W


def test_commit_setter_makes_a_committing_allocator() -> None:
    assert MapAllocBuilder().commit().build().commits
    assert not MapAllocBuilder().commit().commit(False).build().commits


def test_object_layout_setters() -> None:
    alloc = MapAllocBuilder().obj_size(8 * P).obj_align(2 * P).build()
    assert alloc.obj_layout == Layout(8 * P, 2 * P)


def test_obj_align_may_be_larger_than_the_page() -> None:
    alloc = MapAllocBuilder().obj_size(1 << 21).obj_align(1 << 21).build()
    with alloc.alloc_obj() as region:
        assert region.address % (1 << 21) == 0


def test_obj_align_may_be_smaller_than_the_page() -> None:
    assert MapAllocBuilder().obj_align(1).build().obj_layout == Layout(P, 1)


def test_setters_check_nothing_until_build() -> None:
    builder = MapAllocBuilder().obj_size(3).obj_align(5).read("no")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        builder.build()


# ---------------------------------------------------------------- build() validation


@pytest.mark.parametrize("size", [1, P - 1, P + 1, P + P // 2, 3 * P // 2])
def test_build_refuses_an_obj_size_that_is_not_a_multiple_of_the_page(size: int) -> None:
    with pytest.raises(ValueError, match=f"obj_size={size} must be a multiple of the page size"):
        MapAllocBuilder().obj_size(size).build()


@pytest.mark.parametrize(("size", "align"), [(P, 2 * P), (3 * P, 2 * P), (2 * P, 4 * P)])
def test_build_refuses_an_obj_size_that_is_not_a_multiple_of_obj_align(
    size: int, align: int
) -> None:
    with pytest.raises(ValueError, match=f"must be a multiple of obj_align={align}"):
        MapAllocBuilder().obj_size(size).obj_align(align).build()


def test_build_refuses_the_default_obj_size_with_a_larger_obj_align() -> None:
    with pytest.raises(ValueError, match="must be a multiple of obj_align"):
        MapAllocBuilder().obj_align(2 * P).build()


@pytest.mark.parametrize("align", [0, -1, -P, 3, 12, P + 1, 3 * P])
def test_build_refuses_an_obj_align_that_is_not_a_power_of_two(align: int) -> None:
    with pytest.raises(ValueError, match="obj_align must be a positive power of two"):
        MapAllocBuilder().obj_align(align).build()


@pytest.mark.parametrize("size", [2**63, 2**64])
def test_build_refuses_an_obj_size_past_the_address_space_with_value_error(size: int) -> None:
    with pytest.raises(ValueError, match=f"obj_size={size} exceeds the address space"):
        MapAllocBuilder().obj_size(size).build()


@pytest.mark.parametrize("size", [0, -P])
def test_build_refuses_an_obj_size_that_is_not_positive(size: int) -> None:
    with pytest.raises(ValueError, match="obj_size must be positive"):
        MapAllocBuilder().obj_size(size).build()


@pytest.mark.parametrize("value", [True, 4096.0, "4096", b"1", [4096]], ids=repr)
@pytest.mark.parametrize("setter", ["obj_size", "obj_align", "huge_pagesize"])
def test_build_refuses_sizes_and_alignments_that_are_not_integers(
    setter: str, value: object
) -> None:
    with pytest.raises(TypeError, match=f"{setter} must be an integer"):
        getattr(MapAllocBuilder(), setter)(value).build()


@pytest.mark.parametrize("value", [1, 0, None, "yes", 1.0], ids=repr)
@pytest.mark.parametrize(
    ("setter", "name"),
    [("read", "read"), ("write", "write"), ("exec", "exec"), ("commit", "commit")],
)
def test_build_refuses_flags_that_are_not_bools(setter: str, name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        getattr(MapAllocBuilder(), setter)(value).build()


@pytest.mark.parametrize("size", [0, P, 3, 1 << 21 | 1, 1 << 40])
def test_build_refuses_a_huge_page_size_the_machine_lacks(size: int) -> None:
    with pytest.raises(ValueError, match="is not a huge page size of this machine"):
        MapAllocBuilder().huge_pagesize(size).build()


def test_huge_pagesize_none_means_normal_pages() -> None:
    alloc = MapAllocBuilder().huge_pagesize(None).build()
    assert alloc.page_size == P
    assert alloc.huge_pagesize is None


def test_obj_size_accepts_integer_like_values() -> None:
    np = pytest.importorskip("numpy")
    assert MapAllocBuilder().obj_size(np.int64(2 * P)).build().obj_layout.size == 2 * P
