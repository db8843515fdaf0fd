"""The semantic cache's index: cosine distance, partitions kept apart, bounds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragguard import InMemoryVectorIndex, VectorIndex, cosine_distance

pytestmark = pytest.mark.anyio


def test_cosine_distance_of_known_vectors() -> None:
    assert cosine_distance([1, 0], [1, 0]) == pytest.approx(0.0)
    assert cosine_distance([1, 0], [0, 3]) == pytest.approx(1.0)
    assert cosine_distance([1, 0], [-2, 0]) == pytest.approx(2.0)
    assert cosine_distance([0, 0], [1, 0]) == 2.0  # no direction: matches nothing
    with pytest.raises(ValueError, match="lengths"):
        cosine_distance([1, 0], [1, 0, 0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=8), st.floats(0.01, 100))
def test_cosine_distance_ignores_scale(vector: list[float], scale: float) -> None:
    distance = cosine_distance(vector, [x * scale for x in vector])
    if math.sqrt(sum(x * x for x in vector)) > 1e-6:
        assert distance == pytest.approx(0.0, abs=1e-9)


async def test_nearest_within_the_threshold_and_only_in_its_partition() -> None:
    index = InMemoryVectorIndex()
    assert isinstance(index, VectorIndex)
    await index.add("p", [1.0, 0.0, 0.0], "east")
    await index.add("p", [0.0, 1.0, 0.0], "north")
    await index.add("q", [1.0, 0.01, 0.0], "other-tenant")
    found = await index.nearest("p", [1.0, 0.05, 0.0], 0.01)
    assert found is not None
    assert found[0] == "east"
    assert found[1] < 0.01
    assert await index.nearest("p", [1.0, 1.0, 0.0], 0.01) is None  # 45°: too far
    assert await index.nearest("r", [1.0, 0.0, 0.0], 1.0) is None  # an empty partition
    assert await index.nearest("p", [0.0, 0.0, 0.0], 1.0) is None  # a zero query
    assert await index.nearest("p", [1.0, 0.0], 1.0) is None  # another model's dimensions never compare
    await index.remove("p", "east")
    assert await index.nearest("p", [1.0, 0.05, 0.0], 0.01) is None


async def test_each_partition_keeps_its_newest_entries() -> None:
    index = InMemoryVectorIndex(max_entries=2)
    for i, key in enumerate(("a", "b", "c")):
        vector = [0.0] * 3
        vector[i] = 1.0
        await index.add("p", vector, key)
    assert len(index) == 2
    assert await index.nearest("p", [1.0, 0.0, 0.0], 0.1) is None  # "a" was dropped
    assert await index.nearest("p", [0.0, 0.0, 1.0], 0.1) == ("c", pytest.approx(0.0))
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryVectorIndex(max_entries=0)
