"""The one error reported out of a failed nursery (lazystore.nurseries.first_error)."""

from __future__ import annotations

import pytest
import trio

from lazystore.errors import LazystoreError, StoreError
from lazystore.nurseries import first_error


async def _fail_in_nursery(*errors: BaseException) -> BaseExceptionGroup:
    async def fail(exc: BaseException) -> None:
        raise exc

    async def wait() -> None:
        await trio.sleep_forever()  # cancelled when a sibling fails

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            for exc in errors:
                nursery.start_soon(fail, exc)
    return info.value


async def test_a_failed_task_is_reported_not_its_cancelled_siblings() -> None:
    error = RuntimeError("boom")
    assert first_error(await _fail_in_nursery(error)) is error


async def test_an_expected_failure_is_reported_before_other_errors() -> None:
    expected = StoreError("the one line for the user")
    group = BaseExceptionGroup("g", [ValueError("x"), BaseExceptionGroup("inner", [expected])])
    assert first_error(group) is expected
    assert isinstance(first_error(await _fail_in_nursery(expected)), LazystoreError)


def test_without_an_expected_failure_the_first_leaf_is_reported() -> None:
    first, second = ValueError("x"), KeyboardInterrupt()
    nested = BaseExceptionGroup("g", [BaseExceptionGroup("inner", [first]), second])
    assert first_error(nested) is first
