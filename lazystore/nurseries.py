"""What to report when a trio nursery fails: one error out of its group."""

from __future__ import annotations

import trio

from lazystore.errors import LazystoreError


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a nursery's exception group stands for: its first
    LazystoreError (an expected failure, with its one-line message), else its
    first error that is not a cancellation (a failed task's siblings end
    Cancelled), else the group itself."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for wanted in (LazystoreError, BaseException):
        for leaf in leaves:
            if isinstance(leaf, wanted) and not isinstance(leaf, trio.Cancelled):
                return leaf
    return group
