"""``ragguard.call_options``: per-call options that follow the code setting them, and nothing else."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import ragguard
from ragguard._call_options import current_call_options


def test_defaults_nesting_and_restore() -> None:
    assert current_call_options() == ragguard.CallOptions()
    with ragguard.call_options(scope="a", coalesce_key="k") as outer:
        assert outer.scope == "a"
        with ragguard.call_options(cache=False, scope=None) as inner:
            assert inner == ragguard.CallOptions(cache=False, scope=None, coalesce_key="k")
        assert current_call_options() is outer
    assert current_call_options() == ragguard.CallOptions()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"cache": 1}, "cache"), ({"scope": ""}, "scope"), ({"coalesce_key": 3}, "coalesce_key")]
)
def test_bad_values_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match), ragguard.call_options(**kwargs):  # type: ignore[arg-type]
        pass


@pytest.mark.anyio
async def test_options_follow_into_child_tasks_but_not_into_siblings() -> None:
    seen: dict[str, str | None] = {}

    async def child(name: str) -> None:
        await anyio.lowlevel.checkpoint()
        seen[name] = current_call_options().scope

    async with anyio.create_task_group() as tg:
        with ragguard.call_options(scope="tenant"):
            tg.start_soon(child, "inside")
        tg.start_soon(child, "outside")
    assert seen == {"inside": "tenant", "outside": None}
