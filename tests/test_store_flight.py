"""The one single flight (lazystore.store.flight): one run per key, shared
results and errors, and its cancellation rule."""

from __future__ import annotations

import pytest
import trio

from lazystore.errors import StoreError, SubstituterError
from lazystore.store.flight import Flights


class Gone(StoreError):
    pass


async def test_concurrent_callers_share_one_run() -> None:
    runs: list[int] = []

    async def work() -> int:
        runs.append(1)
        await trio.sleep(0.01)
        return 42

    results: list[int] = []
    async with trio.open_nursery() as owner:
        flights = Flights(owner)

        async def caller() -> None:
            results.append(await flights.run(("fetch", "k"), work))

        async with trio.open_nursery() as callers:
            for _ in range(20):
                callers.start_soon(caller)
            await trio.sleep(0.001)
            assert ("fetch", "k") in flights and flights.count("fetch") == 1
    assert runs == [1] and results == [42] * 20 and ("fetch", "k") not in flights


@pytest.mark.allow_log
async def test_every_caller_gets_the_error_as_a_fresh_store_error(
        caplog: pytest.LogCaptureFixture) -> None:
    async def gone() -> None:
        await trio.sleep(0.01)
        raise Gone("x is in none of the substituters")

    async def broken() -> None:
        raise SubstituterError("NAR of x does not match its NarHash")

    async def bug() -> None:
        raise KeyError("oops")

    caught: dict[str, list[BaseException]] = {"gone": [], "broken": [], "bug": []}
    async with trio.open_nursery() as owner:
        flights = Flights(owner)

        async def caller(kind: str, fn: object) -> None:
            try:
                await flights.run((kind, "x"), fn)  # type: ignore[arg-type]
            except StoreError as exc:
                caught[kind].append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(caller, "gone", gone)
                callers.start_soon(caller, "broken", broken)
                callers.start_soon(caller, "bug", bug)
    assert [type(e) for e in caught["gone"]] == [Gone] * 3  # the class is kept
    assert len({id(e) for e in caught["gone"]}) == 3  # one object per caller
    assert [type(e) for e in caught["broken"]] == [StoreError] * 3
    assert str(caught["broken"][0]) == "NAR of x does not match its NarHash"
    assert "bug of x failed: KeyError('oops')" == str(caught["bug"][0])
    assert any(r.levelname == "ERROR" and "bug of x failed unexpectedly" in r.getMessage()
               for r in caplog.records)


async def test_a_cancelled_caller_does_not_cancel_the_flight() -> None:
    finished: list[str] = []
    gate = trio.Event()

    async def work() -> str:
        await gate.wait()
        finished.append("work")
        return "done"

    async with trio.open_nursery() as owner:
        flights = Flights(owner)
        with trio.move_on_after(0.01) as scope:
            await flights.run(("fetch", "k"), work)
        assert scope.cancelled_caught and ("fetch", "k") in flights  # it goes on
        result: list[str] = []

        async def late() -> None:
            result.append(await flights.run(("fetch", "k"), work))

        owner.start_soon(late)
        await trio.sleep(0.01)
        gate.set()
    assert finished == ["work"] and result == ["done"]  # one run, shared with the latecomer


async def test_with_no_caller_left_the_flight_still_finishes() -> None:
    finished: list[str] = []

    async def work() -> None:
        await trio.sleep(0.05)
        finished.append("work")

    async with trio.open_nursery() as owner:
        flights = Flights(owner)
        with trio.move_on_after(0.01):
            await flights.run(("fetch", "k"), work)
        assert finished == []
    assert finished == ["work"]


async def test_closing_the_owner_cancels_the_flight_and_tells_its_callers() -> None:
    errors: list[str] = []

    async def forever() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as outer:
        owner_scope = trio.CancelScope()

        async def owner() -> None:
            with owner_scope:
                async with trio.open_nursery() as nursery:
                    flights.append(Flights(nursery))
                    await trio.sleep_forever()

        flights: list[Flights] = []
        outer.start_soon(owner)
        await trio.sleep(0.01)

        async def caller() -> None:
            try:
                await flights[0].run(("fetch", "k"), forever)
            except StoreError as exc:
                errors.append(str(exc))

        outer.start_soon(caller)
        await trio.sleep(0.01)
        owner_scope.cancel()
    assert errors == ["fetch of k was cancelled"]
