"""The one single flight (lazystore.flight): one run per key, shared results
and errors, and its cancellation rule."""

from __future__ import annotations

import pytest
import trio

from lazystore.errors import LazystoreError, SubstituterError
from lazystore.flight import Flights


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
            results.append(await flights.run("k", work))

        async with trio.open_nursery() as callers:
            for _ in range(20):
                callers.start_soon(caller)
            await trio.sleep(0.001)
            assert "k" in flights and len(flights) == 1
    assert runs == [1] and results == [42] * 20 and "k" not in flights


async def test_every_caller_gets_the_error_and_the_next_call_runs_again() -> None:
    runs: list[int] = []

    async def broken() -> None:
        runs.append(1)
        await trio.sleep(0.01)
        raise SubstituterError("NAR of x does not match its NarHash")

    caught: list[BaseException] = []
    async with trio.open_nursery() as owner:
        flights = Flights(owner)

        async def caller() -> None:
            with pytest.raises(SubstituterError) as info:
                await flights.run("x", broken)
            caught.append(info.value)

        async with trio.open_nursery() as callers:
            for _ in range(5):
                callers.start_soon(caller)
        assert len(caught) == 5 and runs == [1]
        assert str(caught[0]) == "NAR of x does not match its NarHash"
        await caller()  # a failed flight is not remembered: the next caller runs it
    assert runs == [1, 1]


async def test_a_cancelled_caller_does_not_cancel_the_flight() -> None:
    runs: list[str] = []
    gate = trio.Event()

    async def work() -> str:
        runs.append("work")
        await gate.wait()
        return "done"

    result: list[str] = []
    async with trio.open_nursery() as owner:
        flights = Flights(owner)
        with trio.move_on_after(0.01) as scope:
            await flights.run("k", work)
        assert scope.cancelled_caught and "k" in flights  # it goes on

        async def late() -> None:
            result.append(await flights.run("k", work))

        owner.start_soon(late)
        await trio.sleep(0.01)
        gate.set()
    assert runs == ["work"] and result == ["done"]  # one run, shared with the latecomer


async def test_with_no_caller_left_the_flight_still_finishes() -> None:
    finished: list[str] = []

    async def work() -> None:
        await trio.sleep(0.05)
        finished.append("work")

    async with trio.open_nursery() as owner:
        flights = Flights(owner)
        with trio.move_on_after(0.01):
            await flights.run("k", work)
        assert finished == []
    assert finished == ["work"]


async def test_closing_the_owner_ends_the_flight_with_the_owners_error() -> None:
    errors: list[str] = []
    flights: list[Flights] = []
    owner_scope = trio.CancelScope()

    async def owner() -> None:
        with owner_scope:
            async with trio.open_nursery() as nursery:
                flights.append(Flights(nursery, lambda key: LazystoreError(f"{key}: closing")))
                await trio.sleep_forever()

    async def caller() -> None:
        try:
            await flights[0].run("k", trio.sleep_forever)
        except LazystoreError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as outer:
        outer.start_soon(owner)
        await trio.sleep(0.01)
        outer.start_soon(caller)
        await trio.sleep(0.01)
        owner_scope.cancel()
    assert errors == ["k: closing"]
