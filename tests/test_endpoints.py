"""Which gateway of a site a device tries next (gateway/endpoints.py): pure choice."""

from __future__ import annotations

import pytest

from gateway.endpoints import FAILED_FOR, Endpoints, SiteLocator

A, B, C = ("10.0.0.1", 4433), ("10.0.0.2", 4433), ("10.0.0.3", 4433)


def test_the_first_gateway_that_has_not_failed_lately():
    e = Endpoints()
    assert e.choose([A, B, C], now=0) == A
    assert e.choose([A, B, C], avoid=A, now=1) == B  # A just failed
    assert e.choose([A, B, C], avoid=B, now=2) == C
    assert e.choose([A, B, C], avoid=C, now=3) == A  # all failed: the longest ago
    assert e.choose([A, B, C], now=3 + FAILED_FOR + 0.1) == A  # forgotten by now


def test_a_gateway_that_came_back_into_the_list_is_tried_again():
    e = Endpoints()
    e.choose([A, B], avoid=A, now=0)
    assert e.choose([B, C], now=1) == B  # the list follows discovery
    assert e.choose([A, C], now=2) == C
    with pytest.raises(LookupError):
        e.choose([], now=3)


async def test_the_fixed_list_gives_the_sites_pin():
    locate = SiteLocator([A, B], "sha256/pin")
    assert await locate() == (*A, "sha256/pin")
    assert await locate(A) == (*B, "sha256/pin")
