"""
`resolve_output` and `resolve_job_output`: the trio shell over the walker
(spec/S3-refs.md, S3-1, S3-4, S3-6, S3-8 .. S3-10; the seed's M-1 and L-2).
"""

from __future__ import annotations

import collections
import pickle

import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from tests.strategies import ref_graphs, ref_trees
from tests.typed_hypothesis import given
from tests.walker_oracle import check_rebuilt, naive_substitute

A = tg.CacheRef("a", 3, "image/png")
B = tg.CacheRef("b")


class CountingResolver:
    """An identity-like resolver recording every call."""

    def __init__(self) -> None:
        self.calls: list[tg.CacheRef] = []
        self.results: dict[tg.CacheRef, object] = {}

    async def __call__(self, ref: tg.CacheRef) -> object:
        self.calls.append(ref)
        await trio.lowlevel.checkpoint()
        result = self.results[ref] = ("resolved", ref.ref, ref.size)
        return result


class FakeRepository:
    """Reads blobs by ref; records what it was asked for."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.asked: list[tg.CacheRef] = []

    async def get_output_by_ref(self, ref: tg.CacheRef) -> bytes:
        self.asked.append(ref)
        await trio.lowlevel.checkpoint()
        try:
            return self.blobs[ref.ref]
        except KeyError:
            raise tg.DanglingRefError(f"no blob for ref {ref.ref!r}") from None


async def test_resolves_every_ref_once() -> None:
    """S3-6: each distinct ref is resolved once, however often it appears."""
    resolver = CountingResolver()
    value = {"x": [A, A, {"y": (A, B)}], "z": {B}, "w": tg.CacheRef("b")}
    out = await tg.resolve_output(value, resolver)
    assert sorted(r.ref for r in resolver.calls) == ["a", "b"]
    assert out == {
        "x": [("resolved", "a", 3)] * 2 + [{"y": (("resolved", "a", 3), ("resolved", "b", None))}],
        "z": {("resolved", "b", None)},
        "w": ("resolved", "b", None),
    }


async def test_no_ref_returns_the_same_object_and_never_calls() -> None:
    """S3-4"""
    resolver = CountingResolver()
    value = {"a": [1, 2], "b": ({"c": 3},)}
    assert await tg.resolve_output(value, resolver) is value
    assert resolver.calls == []


async def test_json_schema_ref_is_untouched_and_resolver_never_called() -> None:
    """S3-1 (the seed's brand fix): ``{schema: {"$ref": "#/$defs/Foo"}}`` is data."""
    resolver = CountingResolver()
    value = {"schema": {"$ref": "#/$defs/Foo"}}
    assert await tg.resolve_output(value, resolver) is value
    assert resolver.calls == []


async def test_filter_selects_refs_and_is_called_once_per_distinct_ref() -> None:
    """S3-6: filtered-out refs stay refs; the filter sees each distinct ref once."""
    resolver = CountingResolver()
    seen: list[tg.CacheRef] = []

    def only_a(ref: tg.CacheRef) -> bool:
        seen.append(ref)
        return ref.ref == "a"

    value = [A, B, [A, B]]
    out = await tg.resolve_output(value, resolver, filter=only_a)
    assert out == [("resolved", "a", 3), B, [("resolved", "a", 3), B]]
    assert sorted(r.ref for r in seen) == ["a", "b"]
    assert resolver.calls == [A]
    # Nothing selected: the same object back.
    assert await tg.resolve_output(value, resolver, filter=lambda r: False) is value


async def test_concurrency_is_bounded_and_used() -> None:
    """S3-8: exactly ``max_concurrency`` calls in flight while more are pending."""
    in_flight = 0
    peak = 0
    release = trio.Event()

    async def parked(ref: tg.CacheRef) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        return ref.ref

    refs = [tg.CacheRef(f"r{i}") for i in range(20)]
    result: list[object] = []

    async def run() -> None:
        result.append(await tg.resolve_output(refs, parked, max_concurrency=3))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        assert in_flight == 3
        release.set()
    assert peak == 3
    assert result == [[f"r{i}" for i in range(20)]]


async def test_concurrency_bound_with_virtual_time(autojump_clock: trio.abc.Clock) -> None:
    """S3-8: with staggered resolvers the bound holds throughout."""
    in_flight = 0
    peak = 0

    async def slow(ref: tg.CacheRef) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(1 + int(ref.ref) % 3)
        in_flight -= 1
        return int(ref.ref)

    refs = [tg.CacheRef(str(i)) for i in range(30)]
    out = await tg.resolve_output({"refs": refs}, slow, max_concurrency=5)
    assert out == {"refs": list(range(30))}
    assert peak == 5


async def test_a_shared_limiter_bounds_several_calls(autojump_clock: trio.abc.Clock) -> None:
    """S3-8: with ``limiter=``, concurrent calls share one bound."""
    in_flight = 0
    peak = 0

    async def slow(ref: tg.CacheRef) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(1)
        in_flight -= 1
        return ref.ref

    shared = trio.CapacityLimiter(3)
    results: list[object] = []

    async def one(tag: str) -> None:
        refs = [tg.CacheRef(f"{tag}{i}") for i in range(5)]
        results.append(await tg.resolve_output(refs, slow, max_concurrency=8, limiter=shared))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "a")
        nursery.start_soon(one, "b")
    assert peak == 3
    assert sorted(map(str, results)) == sorted(str([f"{t}{i}" for i in range(5)]) for t in "ab")
    assert shared.borrowed_tokens == 0


async def test_cancel_while_waiting_for_a_shared_token() -> None:
    """Cancellation: parked on an exhausted shared limiter; nothing taken, nothing called."""
    shared = trio.CapacityLimiter(1)
    resolver = CountingResolver()
    await shared.acquire()
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: tg.resolve_output([A, B], resolver, limiter=shared))
                await trio.testing.wait_all_tasks_blocked()
                assert shared.statistics().tasks_waiting == 2  # one per worker
                scope.cancel()
        assert scope.cancelled_caught
    finally:
        shared.release()
    assert resolver.calls == []
    assert shared.statistics().tasks_waiting == 0
    assert shared.borrowed_tokens == 0


async def test_first_error_cancels_the_others_and_propagates_as_itself() -> None:
    """S3-9 (the seed's L-2): the first resolver error cancels the rest, no group."""
    cancelled: list[str] = []
    started: list[str] = []

    async def resolver(ref: tg.CacheRef) -> object:
        started.append(ref.ref)
        if ref.ref == "boom":
            await trio.testing.wait_all_tasks_blocked()
            raise KeyError("boom")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(ref.ref)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    refs = [tg.CacheRef("x1"), tg.CacheRef("x2"), tg.CacheRef("boom"), tg.CacheRef("x3")]
    with pytest.raises(KeyError, match="boom"):
        await tg.resolve_output(refs, resolver, max_concurrency=8)
    assert sorted(cancelled) == ["x1", "x2", "x3"]
    assert sorted(started) == ["boom", "x1", "x2", "x3"]


async def test_simultaneous_errors_propagate_the_first_only() -> None:
    """S3-9: calls already failing when the first error lands are dropped, no group."""
    go = trio.Event()

    async def resolver(ref: tg.CacheRef) -> object:
        await go.wait()
        raise ValueError(ref.ref)

    caught: list[BaseException] = []

    async def run() -> None:
        try:
            await tg.resolve_output([tg.CacheRef(f"r{i}") for i in range(3)], resolver)
        except ValueError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert len(caught) == 1
    assert type(caught[0]) is ValueError


async def test_error_stops_pending_refs_from_starting() -> None:
    """S3-9: refs not yet started when the first error happens are never resolved."""
    started: list[str] = []

    async def resolver(ref: tg.CacheRef) -> object:
        started.append(ref.ref)
        await trio.lowlevel.checkpoint()
        raise ValueError(ref.ref)

    refs = [tg.CacheRef(f"r{i}") for i in range(50)]
    with pytest.raises(ValueError, match=r"r\d+"):
        await tg.resolve_output(refs, resolver, max_concurrency=2)
    assert len(started) <= 2


async def test_no_ref_starts_after_an_error_even_without_yields() -> None:
    """S3-9: a resolver that fails without yielding stops every other ref from starting."""
    started: list[str] = []

    async def resolver(ref: tg.CacheRef) -> object:
        started.append(ref.ref)
        raise LookupError(ref.ref)

    with pytest.raises(LookupError):
        await tg.resolve_output(
            [tg.CacheRef(f"r{i}") for i in range(10)], resolver, max_concurrency=4
        )
    assert len(started) == 1


async def test_filter_error_propagates_before_any_call() -> None:
    resolver = CountingResolver()

    def bad(ref: tg.CacheRef) -> bool:
        raise RuntimeError("filter failed")

    with pytest.raises(RuntimeError, match="filter failed"):
        await tg.resolve_output([A], resolver, filter=bad)
    assert resolver.calls == []


async def test_cancel_while_resolvers_are_parked() -> None:
    """Cancellation: every call in flight is cancelled, no task left, input untouched."""
    cancelled: list[str] = []
    value = {"refs": [tg.CacheRef(f"r{i}") for i in range(6)]}
    before = pickle.dumps(value)

    async def resolver(ref: tg.CacheRef) -> object:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(ref.ref)
        raise AssertionError("unreachable")  # pragma: no cover

    finished = False
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal finished
                await tg.resolve_output(value, resolver, max_concurrency=4)
                finished = True  # pragma: no cover

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert len(cancelled) == 0
            scope.cancel()
    assert scope.cancelled_caught
    assert not finished
    assert len(cancelled) == 4  # the four in flight; the other two never started
    assert pickle.dumps(value) == before
    # Only this test's own task is left.
    root = trio.lowlevel.current_root_task()
    assert root is not None
    assert len(root.child_nurseries[0].child_tasks) == 1


async def test_ten_thousand_levels_deep() -> None:
    """S3-7: resolve_output never recurses."""
    value: object = [A]
    for _ in range(10_000):
        value = {"k": (value,)}
    out = await tg.resolve_output(value, CountingResolver())
    for _ in range(10_000):
        assert isinstance(out, dict)
        out = out["k"][0]
    assert out == [("resolved", "a", 3)]


async def test_is_a_checkpoint_even_with_nothing_to_do() -> None:
    """STYLE 8: a public async function is a checkpoint on every call."""
    resolver = CountingResolver()
    with trio.testing.assert_checkpoints():
        await tg.resolve_output({"a": 1}, resolver)
    with trio.testing.assert_checkpoints():
        await tg.resolve_output([A], resolver)
    with trio.testing.assert_checkpoints():
        await tg.resolve_job_output({"a": 1}, resolver, ports=["a"])


async def test_cancelled_before_start_never_calls() -> None:
    resolver = CountingResolver()
    with trio.CancelScope() as scope:
        scope.cancel()
        await tg.resolve_output([A], resolver)
    assert scope.cancelled_caught
    assert resolver.calls == []


@pytest.mark.parametrize(
    ("bad", "exc"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
async def test_max_concurrency_is_validated(bad: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="max_concurrency"):
        await tg.resolve_output([A], CountingResolver(), max_concurrency=bad)  # type: ignore[arg-type]


async def test_unhashable_value_for_a_set() -> None:
    async def to_list(ref: tg.CacheRef) -> object:
        return [ref.ref]

    with pytest.raises(TypeError, match="hashable"):
        await tg.resolve_output({A}, to_list)


# --- properties ------------------------------------------------------------------------------


@given(ref_trees)
def test_resolve_equals_substitution_and_is_idempotent(value: object) -> None:
    """S3-3, S3-4, S3-6 (property): an identity-like resolver gives the substituted value."""
    resolver = CountingResolver()
    out = trio.run(tg.resolve_output, value, resolver)
    table = {r: ("resolved", r.ref, r.size) for r in resolver.calls}
    assert len(resolver.calls) == len(set(resolver.calls))
    assert set(resolver.calls) == set(tg.collect_cache_refs(value))
    assert out == naive_substitute(value, table)
    again = trio.run(tg.resolve_output, out, resolver)
    assert again is out  # idempotent: nothing left to resolve
    if not table:
        assert out is value


@given(ref_graphs())
def test_resolve_graphs_keeps_sharing_and_cycles(value: object) -> None:
    """S3-5 (property)"""
    resolver = CountingResolver()
    out = trio.run(tg.resolve_output, value, resolver)
    check_rebuilt(value, out, resolver.results)


# --- resolve_job_output (S3-10) --------------------------------------------------------------


async def test_job_output_from_a_repository_gives_blobs() -> None:
    """S3-10: a repository source turns each ref into ``Blob(data, ref.mime)``."""
    repo = FakeRepository({"a": b"AAA", "b": b"B"})
    out = await tg.resolve_job_output({"image": A, "raw": B, "n": 1}, repo)
    assert out == {"image": tg.Blob(b"AAA", "image/png"), "raw": tg.Blob(b"B"), "n": 1}


async def test_job_output_from_a_resolver() -> None:
    resolver = CountingResolver()
    out = await tg.resolve_job_output([A], resolver)
    assert out == [("resolved", "a", 3)]


async def test_attacker_dollar_ref_never_reaches_the_repository() -> None:
    """S3-1 (the seed's cross-tenant case): ``{note: {"$ref": "cache://OTHER_RUN/secret"}}``."""
    repo = FakeRepository({"cache://OTHER_RUN/secret": b"secret"})
    output = {
        "note": {"$ref": "cache://OTHER_RUN/secret"},
        "branded": {"kind": "task-graph/CacheRef", "$ref": "cache://OTHER_RUN/secret"},
    }
    assert await tg.resolve_job_output(output, repo) is output
    assert repo.asked == []


async def test_ports_restrict_resolution_to_top_level_ports() -> None:
    """S3-10 (the seed's M-1): refs outside ``ports`` stay untouched, even equal ones."""
    repo = FakeRepository({"a": b"AAA", "b": b"B", "secret": b"S"})
    planted = tg.CacheRef("secret")
    output = {"image": A, "meta": {"thumb": planted, "also": A}, "other": [B]}
    out = await tg.resolve_job_output(output, repo, ports=["image"])
    assert out == {"image": tg.Blob(b"AAA", "image/png"), "meta": output["meta"], "other": [B]}
    assert out["meta"] is output["meta"]
    assert repo.asked == [A]
    assert output["image"] is A  # the input is untouched


async def test_ports_share_one_walk_and_keep_the_mapping_type() -> None:
    """S3-6, S3-10: a ref shared by two allowed ports is read once."""
    repo = FakeRepository({"a": b"AAA"})
    output = collections.OrderedDict(one=A, two=[A], three=B)
    out = await tg.resolve_job_output(output, repo, ports=("one", "two", "missing"))
    assert type(out) is collections.OrderedDict
    assert out == collections.OrderedDict(
        one=tg.Blob(b"AAA", "image/png"), two=[tg.Blob(b"AAA", "image/png")], three=B
    )
    assert repo.asked == [A]


async def test_ports_with_nothing_to_resolve_return_the_same_output() -> None:
    repo = FakeRepository({})
    output = {"image": "inline", "other": A}
    assert await tg.resolve_job_output(output, repo, ports=["image"]) is output
    assert await tg.resolve_job_output(output, repo, ports=[]) is output
    assert repo.asked == []


async def test_ports_on_a_non_dict_mapping_give_a_dict() -> None:
    from types import MappingProxyType

    repo = FakeRepository({"a": b"A"})
    out = await tg.resolve_job_output(MappingProxyType({"p": A, "q": 1}), repo, ports=["p"])
    assert out == {"p": tg.Blob(b"A", "image/png"), "q": 1}


async def test_dangling_ref_error_propagates_as_itself() -> None:
    repo = FakeRepository({})
    with pytest.raises(tg.DanglingRefError, match="no blob"):
        await tg.resolve_job_output({"image": A}, repo)


async def test_bad_arguments() -> None:
    repo = FakeRepository({})
    with pytest.raises(TypeError, match="single str"):
        await tg.resolve_job_output({"image": A}, repo, ports="image")
    with pytest.raises(TypeError, match="mapping"):
        await tg.resolve_job_output([A], repo, ports=["image"])
    with pytest.raises(TypeError, match="get_output_by_ref"):
        await tg.resolve_job_output([A], object())  # type: ignore[arg-type]


def test_repository_shape_is_a_ref_source() -> None:
    assert isinstance(FakeRepository({}), tg.RefSource)
