"""A Deployment is the same whichever way its record was read: through the ORM (Get) or as a Core row (List)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import json_format, timestamp_pb2

from apphosting.v1 import deployments_pb2 as pb
from services.deployments.convert import has, placement_to_json, placement_to_proto, row_to_proto, timestamp
from services.deployments.store import DeploymentStore
from services.deployments.tables import DeploymentRow


def _placement() -> dict[str, Any]:
    return placement_to_json(
        pb.PlacementExplanation(
            chosen_location_id="eu-a",
            candidates=[
                pb.PlacementCandidate(location_id="eu-a", score=0.75, chosen=True, weight=0.25),
                pb.PlacementCandidate(location_id="eu-b", score=0.5, reason="a lower score"),
            ],
            more=3,
            refusal="",
        )
    )


def _full_record(moment: datetime) -> DeploymentRow:
    """A record with every column set, and a spec with every field a Deployment echoes."""
    deployment_id = str(uuid.uuid4())
    spec = {
        "geographic_region": "eu",
        "deployment_name": "every-field",
        "app_type": "helm",
        "config": {"team": "web", "nested": {"list": [1, "two", None, True], "n": 1.5}},
        "cpu_request": 0.5,
        "memory_request_mb": 512,
        "replicas": 3,
        "container_port": 8080,
        "environment_variables": ["LOG_LEVEL=info", "MODE=prod"],
        "secret_environment_variables": [
            {"name": "TOKEN", "version": 2, "envelope": "sealed-bytes"},
            {"name": "DB_PASSWORD", "version": 1, "secret_ref": {"name": "db", "key": "password"}},
        ],
        "docker_image": "ghcr.io/acme/shop:1.4.2",
        "storage_size_gb": 2,
        "volumes": [{"path": "/data", "size_gb": 10, "purpose": "uploads"}, {"path": "/cache", "size_gb": 1}],
        "run_as_uid": 1000,
        "deployment_type": "docker",
        "helm_repo_url": "https://charts.example.test",
        "helm_chart_name": "nginx",
        "helm_chart_version": "18.2.4",
        "custom_values_yaml": "service:\n  type: ClusterIP\n",
        "image_update_strategy": "semver",
        "image_update_constraint": "^1.4",
        "image_allow_tags": "regexp:^1\\.[0-9]+$",
        "image_ignore_tags": "*-rc*",
        "kubernetes_version": "1.34",
    }
    return DeploymentRow(
        id=deployment_id,
        user_id=str(uuid.uuid4()),
        cluster_id=str(uuid.uuid4()),
        name="every-field",
        live_name=None,
        app_type="helm",
        status="deleting",
        phase="tearing-down",
        geographic_region="eu",
        spec=spec,
        request_id=str(uuid.uuid4()),
        request_hash="0" * 64,
        revision=9,
        location_id="eu-a",
        provider="kind",
        region="eu-west",
        cluster_status="running",
        cluster_error="was unreachable once",
        endpoint_url="https://every-field.apps.example.test",
        error_message="rollout stalled",
        git_path="apps/every-field",
        values_yaml="replicaCount: 3\n",
        is_adopted=True,
        source_namespace="legacy",
        cpu_millis=1500,
        memory_mb=1536,
        storage_gb=12,
        release=4,
        healthy_release=3,
        operation="delete",
        target_location="eu-a",
        promoted_from=str(uuid.uuid4()),
        promoted_to=str(uuid.uuid4()),
        image_updates_paused=True,
        placement=_placement(),
        record_bytes=2048,
        history_bytes=4096,
        created_at=moment - timedelta(days=3, microseconds=7),
        updated_at=moment - timedelta(seconds=5),
        deleted_at=moment,
    )


async def test_a_listed_row_converts_as_the_orm_record_does(store: DeploymentStore) -> None:
    moment = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    record = _full_record(moment)
    async with store.transaction() as session:
        session.add(record)

    through_orm = row_to_proto(await store.get(None, record.id) or pytest.fail("record not read"))
    (listed,) = await store.page(record.user_id, show_deleted=True, limit=2)

    assert listed["seq"] == record.seq
    assert row_to_proto(listed) == through_orm
    page = pb.ListDeploymentsResponse()
    assert row_to_proto(listed, add_to=page.deployments) == through_orm
    assert list(page.deployments) == [through_orm]
    unset = [
        field.name
        for field in pb.Deployment.DESCRIPTOR.fields
        if not (has(through_orm, field.name) if field.has_presence else getattr(through_orm, field.name))
    ]
    assert unset == [], "the record leaves these fields unset"
    assert through_orm.deleted_at.ToDatetime(tzinfo=UTC) == moment
    assert [entry.HasField("secret_ref") for entry in through_orm.secret_environment_variables] == [False, True]
    assert json_format.MessageToDict(through_orm.config) == record.spec["config"]


async def test_an_empty_config_is_still_set(store: DeploymentStore) -> None:
    record = _full_record(datetime.now(UTC))
    record.spec = {**record.spec, "config": {}}
    async with store.transaction() as session:
        session.add(record)
    (listed,) = await store.page(record.user_id, show_deleted=True, limit=1)
    assert row_to_proto(listed).HasField("config")
    assert row_to_proto(listed) == row_to_proto(record)


async def test_every_filter_of_a_page_selects_what_it_names(store: DeploymentStore) -> None:
    moment = datetime(2026, 3, 1, tzinfo=UTC)
    owner, other = str(uuid.uuid4()), str(uuid.uuid4())
    records = []
    for index, (status, region, owner_of, deleted) in enumerate(
        [
            ("running", "eu", owner, False),
            ("failed", "us", owner, False),
            ("deleting", "eu", owner, True),
            ("running", "us", other, False),
            ("pending", "eu", owner, False),
            ("failed", "eu", owner, False),
        ]
    ):
        record = _full_record(moment)
        record.name = record.live_name = f"filtered-{index}"
        record.status, record.geographic_region, record.user_id = status, region, owner_of
        record.deleted_at = moment if deleted else None
        records.append(record)
        async with store.transaction() as session:
            session.add(record)
    newest_first = sorted(records, key=lambda record: -record.seq)

    async def listed(user_id: str | None, **filters: Any) -> list[str]:
        return [row["name"] for row in await store.page(user_id, limit=10, **filters)]

    def expected(user_id: str | None, statuses: tuple[str, ...] = (), region: str = "", **rest: Any) -> list[str]:
        return [
            record.name
            for record in newest_first
            if (user_id is None or record.user_id == user_id)
            and (not statuses or record.status in statuses)
            and (not region or record.geographic_region == region)
            and (rest.get("show_deleted") or record.deleted_at is None)
            and (rest.get("before_seq") is None or record.seq < rest["before_seq"])
        ]

    middle = newest_first[2].seq
    users: tuple[str | None, ...] = (owner, None)
    for user_id in users:
        for statuses in ((), ("failed",), ("failed", "running", "deleting")):
            for region in ("", "eu"):
                for show_deleted in (False, True):
                    for before_seq in (None, middle):
                        filters: dict[str, Any] = {"show_deleted": show_deleted, "before_seq": before_seq}
                        assert await listed(
                            user_id, statuses=statuses, geographic_region=region, **filters
                        ) == expected(user_id, statuses, region, **filters), (user_id, statuses, region, filters)
    assert len(await store.page(owner, limit=2)) == 2


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 30, 15, 999999, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 30, 15, 1),
    ],
)
def test_timestamp_is_what_from_datetime_makes(moment: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment)
    assert timestamp(moment) == expected


def test_a_placement_with_fields_this_version_does_not_know_is_read_as_json_reads_it() -> None:
    stored = {**_placement(), "considered_at": "2026-03-01T00:00:00Z"}
    expected = json_format.ParseDict(stored, pb.PlacementExplanation(), ignore_unknown_fields=True)
    assert placement_to_proto(stored) == expected
    assert placement_to_proto(_placement()) == json_format.ParseDict(_placement(), pb.PlacementExplanation())


async def test_a_listed_spec_and_moments_read_as_the_orm_reads_them(store: DeploymentStore) -> None:
    """A page decodes JSON and moments itself (pydantic's parser, SQLite's text read in C): the same values."""
    record = _full_record(datetime(2026, 3, 1, 12, 30, 15, tzinfo=UTC))
    record.spec = {
        **record.spec,
        "config": {"note": 'naïve ☃ \u2028 "quoted"', "big": 2**53 + 1, "tiny": 1e-300, "third": 0.1, "empty": {}},
    }
    async with store.transaction() as session:
        session.add(record)

    (listed,) = await store.page(record.user_id, show_deleted=True, limit=1)

    assert listed["spec"] == record.spec
    assert listed["placement"] == record.placement
    assert [listed[name] for name in ("created_at", "updated_at", "deleted_at")] == [
        record.created_at,
        record.updated_at,
        record.deleted_at,
    ]
    assert listed["created_at"].tzinfo is not None
    assert row_to_proto(listed) == row_to_proto(await store.get(None, record.id) or pytest.fail("record not read"))
