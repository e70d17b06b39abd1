"""The pure half of image updates: a deployment's policy applied to a repository snapshot."""

from __future__ import annotations

import pytest

from apphosting.imagepolicy import Candidate
from apphosting.imageupdates import PolicyUnusable, Snapshot, Target, plan, policy_of, public_or_named
from apphosting.registry import AddressRefused

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def snapshot(*tags: str, digests: dict[str, str] | None = None) -> Snapshot:
    found = digests or {}
    return Snapshot("docker.io", "library/nginx", tuple(Candidate(tag, digest=found.get(tag)) for tag in tags))


def test_the_new_image_keeps_the_name_as_written() -> None:
    for written in ("nginx", "docker.io/library/nginx", "127.0.0.1:5000/team/web", "Registry.Example:443/a/b"):
        target = Target(f"{written}:1.2.3", "semver", "^1")
        done = plan(target, policy_of(target), snapshot("1.2.3", "1.4.0", "2.0.0"))
        assert done.new_docker_image == f"{written}:1.4.0"
        assert done.would_update
        assert done.current_tag == "1.2.3"
        assert done.update_reason == "image-updater: tag 1.4.0, highest semantic version within '^1': 1.4.0"


def test_the_digest_strategy_pins_the_followed_tag() -> None:
    target = Target("nginx:stable", "digest", "stable")
    done = plan(target, policy_of(target), snapshot("stable", "1.0", digests={"stable": DIGEST_A}))
    assert done.new_docker_image == f"nginx:stable@{DIGEST_A}"
    assert done.winner_digest == DIGEST_A
    pinned = Target(f"nginx:stable@{DIGEST_A}", "digest", "stable")
    same = plan(pinned, policy_of(pinned), snapshot("stable", digests={"stable": DIGEST_A}))
    assert not same.would_update
    assert same.current_digest == DIGEST_A
    assert same.new_docker_image == ""
    moved = plan(pinned, policy_of(pinned), snapshot("stable", digests={"stable": DIGEST_B}))
    assert moved.would_update
    assert moved.new_docker_image == f"nginx:stable@{DIGEST_B}"


def test_paused_says_what_it_would_do_and_does_not() -> None:
    target = Target("nginx:1.2.3", "semver", paused=True)
    done = plan(target, policy_of(target), snapshot("1.2.3", "1.2.4"))
    assert done.paused
    assert done.winner == "1.2.4"
    assert not done.would_update
    assert "paused since a rollback" in done.reason
    # Nothing to do is not reported as paused work.
    current = plan(target, policy_of(target), snapshot("1.2.3"))
    assert "paused" not in current.reason


def test_an_already_deployed_winner_is_no_update() -> None:
    target = Target("nginx:1.2.4", "semver")
    done = plan(target, policy_of(target), snapshot("1.2.3", "1.2.4"))
    assert not done.would_update
    assert done.new_docker_image == ""
    assert done.reason.endswith("(already deployed)")


@pytest.mark.parametrize(
    ("target", "field"),
    [
        (Target("nginx:1", "newest"), "image_update_strategy"),
        (Target("nginx:1", "semver", "^^1"), "image_update_constraint"),
        (Target("nginx:1", "digest"), "image_update_constraint"),
        (Target("nginx:1", "semver", allow_tags="regexp:(?=x)"), "image_allow_tags"),
        (Target("nginx:1", "semver", ignore_tags="[a"), "image_ignore_tags"),
    ],
)
def test_an_unusable_policy_names_its_field(target: Target, field: str) -> None:
    with pytest.raises(PolicyUnusable) as refused:
        policy_of(target)
    assert refused.value.field == field


async def test_the_guard_asks_public_hosts_and_the_named_ones_only() -> None:
    answers = {"registry.example.com": ["93.184.216.34"], "inward.example.com": ["10.0.0.5"]}

    async def resolver(host: str) -> list[str]:
        return answers[host]

    check = public_or_named(frozenset({"127.0.0.1:5000", "registry.internal:5000"}), resolver)
    await check("registry.example.com")
    await check("registry.example.com:443")
    await check("127.0.0.1:5000")
    await check("Registry.Internal:5000")
    for inward in ("inward.example.com", "10.0.0.1:443", "127.0.0.1:5001", "[::1]:5000", "localhost:5000"):
        with pytest.raises(AddressRefused):
            await check(inward)
