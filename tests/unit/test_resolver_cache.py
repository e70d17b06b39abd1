"""The create path's DNS cache: one lookup per name at a time, answers and failures kept a while."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from apphosting.netguard import CachingResolver, Unresolvable, resolve_public


class SlowDns:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, host: str) -> Sequence[str]:
        self.asked.append(host)
        await self.release.wait()
        if host not in self.answers:
            raise OSError(f"{host}: name or service not known")
        return self.answers[host]


async def test_concurrent_lookups_of_one_name_ask_once_and_the_answer_is_kept() -> None:
    dns = SlowDns({"charts.example.com": ["93.184.216.34"]})
    now = [0.0]
    cache = CachingResolver(dns, ttl=60, clock=lambda: now[0])
    waiting = [asyncio.create_task(cache("charts.example.com")) for _ in range(20)]
    await asyncio.sleep(0)
    dns.release.set()
    assert {tuple(a) for a in await asyncio.gather(*waiting)} == {("93.184.216.34",)}
    assert await cache("charts.example.com") == ["93.184.216.34"]
    assert dns.asked == ["charts.example.com"]
    now[0] = 61
    await cache("charts.example.com")
    assert dns.asked == ["charts.example.com"] * 2


async def test_a_failure_is_kept_and_a_caller_that_gives_up_leaves_the_lookup_running() -> None:
    dns = SlowDns({})
    cache = CachingResolver(dns, failure_ttl=30, clock=lambda: 0.0)
    with pytest.raises(Unresolvable):
        await resolve_public("gone.example.com", resolver=cache, resolve_seconds=0.01)
    dns.release.set()
    await asyncio.sleep(0.01)
    with pytest.raises(OSError, match="not known"):
        await cache("gone.example.com")
    assert dns.asked == ["gone.example.com"]
