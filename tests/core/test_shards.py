"""Splitting a gateway list between ingest replicas (pure)."""

from __future__ import annotations

import pytest

from pipeline.config import Gateway
from pipeline.core.shards import Shard, shard_of, share


def test_shards_split_a_list_whole_and_without_overlap() -> None:
    gateways = [Gateway(device_id=f"gw-{i}") for i in range(40)]
    assert share(gateways, None) == gateways
    parts = [share(gateways, f"{i}/3") for i in range(3)]
    assert sorted(g.device_id for part in parts for g in part) == sorted(
        g.device_id for g in gateways
    )
    assert all(shard_of(g.device_id, 3) == i for i, part in enumerate(parts) for g in part)
    assert all(5 < len(part) < 25 for part in parts)  # a fair split of 40
    assert parts[0] == [g for g in gateways if g in parts[0]]  # list order kept


def test_the_hash_is_stable_across_processes() -> None:
    assert [shard_of(f"gw-{i}", 2) for i in range(1, 4)] == [0, 0, 0]
    assert [shard_of(name, 2) for name in ("a", "b")] == [1, 1]


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "1/0", "", "0/2/3"])
def test_a_shard_is_i_of_n(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected i/n with 0 <= i < n, got "):
        Shard.parse(text)
    assert Shard.parse("1/4") == Shard(1, 4)
    assert Shard(1, 4).takes("gw-x") is (shard_of("gw-x", 4) == 1)
