"""Secret environment values: sealed at once, stored and carried only as envelopes, never answered or logged.

Each test runs the real pipeline (API, scheduler, simulated provisioner over a real nats-server) on
SQLite and on PostgreSQL, and then reads what was written: the raw database file, the rows of every
table, the JetStream store, what the provisioners were sent, and every log line, for the plaintext.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import nats
import pytest
from google.protobuf import field_mask_pb2, json_format
from sqlalchemy import text
from sqlalchemy.engine import make_url

from apphosting import bus, db, logs, secrets
from apphosting.logs import redact
from apphosting.nats_server import NatsServer, free_port, wait_for_port
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.store import rewrap_secrets
from tests.support.grpc_errors import details_of
from tests.support.stack import Stack, eventually

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

PLAIN = "pl41n-s3cr3t-" + uuid.uuid4().hex
CHANGED = "ch4ng3d-s3cr3t-" + uuid.uuid4().hex
SECRET_TABLES = ("deployments", "deployment_events", "deployment_releases", "outbox")


def assert_absent(blob: bytes | str) -> None:
    """Neither plaintext is in `blob`."""
    raw = blob.encode() if isinstance(blob, str) else blob
    assert PLAIN.encode() not in raw
    assert CHANGED.encode() not in raw


def secret(name: str, value: str | None = None, ref: tuple[str, str] | None = None) -> pb.SecretEnvironmentVariable:
    entry = pb.SecretEnvironmentVariable(name=name)
    if value is not None:
        entry.value = value
    if ref is not None:
        entry.secret_ref.name, entry.secret_ref.key = ref
    return entry


def request(*entries: pb.SecretEnvironmentVariable, **fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    return pb.CreateAppHostingDeploymentRequest(
        geographic_region="eu",
        deployment_name=fields.pop("name", "web"),
        app_type="container",
        docker_image="nginx:1.27",
        secret_environment_variables=list(entries),
        **fields,
    )


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "secret-keys.json"
    secrets.new_key_file(path)
    return str(path)


async def running(stub: Stub, deployment_id: str, release: int = 1) -> pb.Deployment:
    found: list[pb.Deployment] = []

    async def check() -> bool:
        found[:] = [await stub.GetDeployment(pb.GetDeploymentRequest(id=deployment_id))]
        d = found[0]
        return d.status == pb.DEPLOYMENT_STATUS_RUNNING and not d.reconciling and d.healthy_release >= release

    await eventually(check, within=60)
    return found[0]


def versions(deployment: pb.Deployment) -> dict[str, int]:
    return {entry.name: entry.version for entry in deployment.secret_environment_variables}


async def update_secrets(
    stub: Stub, deployment: pb.Deployment, *entries: pb.SecretEnvironmentVariable
) -> pb.Deployment:
    change = pb.Deployment(id=deployment.id, secret_environment_variables=list(entries))
    return await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=change, update_mask=field_mask_pb2.FieldMask(paths=["secret_environment_variables"])
        )
    )


async def database_dump(database_url: str) -> bytes:
    """Every row of the tables that could hold a spec, as text; and for SQLite the raw file bytes too."""
    url = make_url(database_url)
    dump = b""
    if url.get_backend_name() == "sqlite":
        base = Path(url.database or "")
        for path in (base, base.with_name(base.name + "-wal")):
            if path.exists():
                dump += path.read_bytes()
    engine = db.make_engine(database_url)
    try:
        async with engine.connect() as connection:
            for table in SECRET_TABLES:
                rows = (await connection.execute(text(f"SELECT * FROM {table}"))).all()
                # Each value whole (a Row's repr shortens long ones); JSON keeps non-ASCII as escapes, so
                # the raw text of each string is added as well.
                for row in rows:
                    dump += json.dumps(list(row), default=str).encode()
                    dump += "".join(str(value) for value in row).encode()
    finally:
        await engine.dispose()
    return dump


def jetstream_store(server: NatsServer) -> bytes:
    return b"".join(path.read_bytes() for path in Path(server.store_dir).rglob("*") if path.is_file())


async def test_plaintext_reaches_no_store_answer_log_or_job(
    stack: Stack, nats_server: NatsServer, database_url: str, key_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Every line of ours, but not aiosqlite's line per call to its thread: that thread formats each call's
    # arguments (rows of all four tables for a create) under the capture handler's lock, which the event loop
    # then waits for on every line it logs. What reaches the database is checked in its dump below.
    # (Set first: set_level also sets the handler's level, which the second call leaves at DEBUG.)
    caplog.set_level(logging.INFO, logger="aiosqlite")
    caplog.set_level(logging.DEBUG)
    # Each record with the deployment and request it was logged for, as the processes' handler has them.
    caplog.handler.addFilter(logs.ContextFilter())
    jobs: list[bus_pb2.ProvisionJob] = []
    client = await nats.connect(nats_server.url)

    async def on_job(msg: Any) -> None:
        jobs.append(bus_pb2.ProvisionJob.FromString(msg.data))

    await client.subscribe(bus.JOBS_SUBJECTS, cb=on_job)
    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)

    created = await stub.CreateAppHostingDeployment(
        request(secret("DB_PASSWORD", PLAIN), secret("API_TOKEN", ref=("shared-credentials", "token")))
    )
    assert versions(created) == {"DB_PASSWORD": 1, "API_TOKEN": 1}
    assert created.secret_environment_variables[1].secret_ref.name == "shared-credentials"
    assert not any(entry.value for entry in created.secret_environment_variables)
    first = await running(stub, created.id)

    # The same value keeps its version; a name alone keeps the stored value; a new value goes up.
    same = await update_secrets(stub, first, secret("DB_PASSWORD", PLAIN), secret("API_TOKEN"))
    assert versions(same) == {"DB_PASSWORD": 1, "API_TOKEN": 1}
    await running(stub, created.id, release=2)
    changed = await update_secrets(stub, same, secret("DB_PASSWORD", CHANGED), secret("API_TOKEN"))
    assert versions(changed) == {"DB_PASSWORD": 2, "API_TOKEN": 1}
    final = await running(stub, created.id, release=3)

    answers: list[bytes] = [final.SerializeToString()]
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest())
    answers.append(listed.SerializeToString())
    releases = await stub.ListReleases(pb.ListReleasesRequest(id=created.id))
    assert [versions_of(r.spec) for r in releases.releases] == [
        {"DB_PASSWORD": 2, "API_TOKEN": 1},
        {"DB_PASSWORD": 1, "API_TOKEN": 1},
        {"DB_PASSWORD": 1, "API_TOKEN": 1},
    ]
    answers.append(releases.SerializeToString())
    async for item in stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id, since_revision=1)):
        answers.append(item.SerializeToString())
        if item.deployment.revision >= final.revision:
            break
    for answer in answers:
        assert_absent(answer)

    # What the provisioners were sent: sealed values that open to the plaintext, and nothing else of it.
    await eventually(lambda: _true(len(jobs) >= 3))
    ring = secrets.load(key_file)
    last = jobs[-1]
    assert [(s.name, s.version) for s in last.sealed_secrets] == [("DB_PASSWORD", 2)]
    assert ring.open(last.sealed_secrets[0].envelope, created.id, "DB_PASSWORD") == CHANGED
    for job in jobs:
        without_envelopes = bus_pb2.ProvisionJob()
        without_envelopes.CopyFrom(job)
        for sealed in without_envelopes.sealed_secrets:
            sealed.ClearField("envelope")
        shown = json_format.MessageToJson(without_envelopes).encode() + without_envelopes.SerializeToString()
        assert_absent(shown)
        for sealed in job.sealed_secrets:
            assert_absent(sealed.envelope)
    stopped = await stub.StopDeployment(pb.StopDeploymentRequest(id=created.id))
    await eventually(lambda: _true(any(j.operation == bus_pb2.OPERATION_STOP for j in jobs)), within=60)
    assert [list(j.sealed_secrets) for j in jobs if j.operation == bus_pb2.OPERATION_STOP] == [[]]
    assert stopped.id == created.id
    await client.close()

    stored = await database_dump(database_url)
    assert b"DB_PASSWORD" in stored  # the names are stored: the dump read what it should
    assert_absent(stored)
    store = jetstream_store(nats_server)
    assert_absent(store)
    rendered = logs.JsonFormatter()
    logged = "\n".join(f"{rendered.format(r)} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    assert created.id in logged
    assert_absent(logged)


def versions_of(spec: pb.CreateAppHostingDeploymentRequest) -> dict[str, int]:
    return {entry.name: entry.version for entry in spec.secret_environment_variables}


async def _true(value: bool) -> bool:
    return value


async def test_bad_entries_are_named_by_field_and_index(stack: Stack, key_file: str) -> None:
    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateAppHostingDeployment(
            request(
                secret("1BAD", "x"),
                secret("OK", "x"),
                secret("OK", "y"),
                secret("EMPTY"),
                secret("REF", ref=("Not_A_Name", "key/with/slash")),
                secret("HUGE", "x" * 40_000),
            )
        )
    details = details_of(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(details.violations) == {
        "secret_environment_variables[0].name",
        "secret_environment_variables[2].name",
        "secret_environment_variables[3]",
        "secret_environment_variables[4].secret_ref.name",
        "secret_environment_variables[4].secret_ref.key",
        "secret_environment_variables[5].value",
    }
    assert "x" * 100 not in str(raised.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateAppHostingDeployment(request(secret("1BAD", PLAIN), name="Not A Name"))
    assert list(details_of(raised.value).violations) == ["deployment_name", "secret_environment_variables[0].name"]
    assert PLAIN not in str(raised.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateAppHostingDeployment(request(secret("PORT", "x"), environment_variables=["PORT=80"]))
    assert details_of(raised.value).violations["secret_environment_variables[0].name"][0] == "DUPLICATE"
    created = await running(stub, (await stub.CreateAppHostingDeployment(request(secret("KEEP", "x")))).id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await update_secrets(stub, created, secret("MISSING"))
    assert set(details_of(raised.value).violations) == {"deployment.secret_environment_variables[0]"}


async def test_without_a_key_file_only_references_are_accepted(stack: Stack) -> None:
    stub = await stack.add_api()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateAppHostingDeployment(request(secret("DB_PASSWORD", PLAIN)))
    details = details_of(raised.value)
    assert details.violations["secret_environment_variables[0].value"][0] == "NOT_SUPPORTED"
    assert PLAIN not in str(raised.value.details())
    created = await stub.CreateAppHostingDeployment(request(secret("TOKEN", ref=("creds", "token"))))
    assert versions(created) == {"TOKEN": 1}


async def test_rotation_add_key_rewrap_remove_old_key(stack: Stack, database_url: str, key_file: str) -> None:
    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)
    created = await stub.CreateAppHostingDeployment(request(secret("DB_PASSWORD", PLAIN)))
    await running(stub, created.id)
    old = secrets.load(key_file)

    new_id = secrets.add_key(key_file)
    both = secrets.load(key_file)
    assert both.sealing_id == new_id
    assert len(both.keys) == 2
    counts = await rewrap_secrets(database_url, both)
    assert (counts.values, counts.rewrapped, counts.deployments) == (1, 1, 1)
    again = await rewrap_secrets(database_url, both)
    assert again.rewrapped == 0

    secrets.write_key_file(key_file, [k for k in both.keys if k[0] != old.sealing_id])
    rotated = await stack.add_api(secret_key_file=key_file)
    # The value still opens with the new key alone: setting it again keeps its version.
    same = await update_secrets(rotated, created, secret("DB_PASSWORD", PLAIN))
    assert versions(same) == {"DB_PASSWORD": 1}
    url = make_url(database_url)
    engine = db.make_engine(database_url)
    try:
        async with engine.connect() as connection:
            spec = (await connection.execute(text("SELECT spec FROM deployments"))).scalar_one()
    finally:
        await engine.dispose()
    envelope = (spec if isinstance(spec, dict) else json.loads(spec))["secret_environment_variables"][0]
    assert secrets.key_id_of(envelope["envelope"]) == new_id
    assert secrets.load(key_file).open(envelope["envelope"], created.id, "DB_PASSWORD") == PLAIN
    assert url.get_backend_name() in ("sqlite", "postgresql")


def test_key_file_errors_say_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(secrets.SecretKeyError, match="does not exist; make one with"):
        secrets.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"id": "a", "key": "c2hvcnQ="}]}')
    with pytest.raises(secrets.SecretKeyError, match=r"keys\[0\].key must be the base64 of 32"):
        secrets.load(bad)
    path = tmp_path / "k.json"
    secrets.new_key_file(path)
    ring = secrets.load(path)
    envelope = ring.seal("v", "d1", "N")
    with pytest.raises(secrets.SecretKeyError, match="another deployment or name"):
        ring.open(envelope, "d2", "N")
    other = tmp_path / "other.json"
    secrets.new_key_file(other)
    with pytest.raises(secrets.SecretKeyError, match="has no key"):
        secrets.load(other).open(envelope, "d1", "N")


def test_log_redaction_covers_requests_in_every_printed_form() -> None:
    message = request(secret("DB_PASSWORD", PLAIN), secret("B", 'with "quotes" ' + CHANGED))
    for shown in (
        str(message),
        json_format.MessageToJson(message),
        repr(json_format.MessageToDict(message, preserving_proto_field_name=True)),
        f"apphosting deploy web --secret-env DB_PASSWORD={PLAIN}",
    ):
        assert_absent(redact(shown))


def test_dev_makes_a_key_file(tmp_path: Path) -> None:
    from apphosting_cli.dev import dev_secret_key_file

    path = dev_secret_key_file(tmp_path)
    assert secrets.load(path).keys
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    assert dev_secret_key_file(tmp_path) == path


async def test_rest_accepts_values_and_answers_names_and_versions(stack: Stack, key_file: str) -> None:
    from apphosting_cli.rest import RestGateway, RestOptions
    from apphosting_client import ClientConfig

    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)
    gateway = RestGateway(
        RestOptions(listen="127.0.0.1:0", client=ClientConfig(address=f"127.0.0.1:{stack.apis[0].port}"))
    )
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            created = await http.post(
                "/deployments/app-hosting",
                json={
                    "geographic_region": "eu",
                    "deployment_name": "rest-web",
                    "app_type": "container",
                    "docker_image": "nginx:1.27",
                    "secret_environment_variables": [
                        {"name": "DB_PASSWORD", "value": PLAIN},
                        {"name": "TOKEN", "secret_ref": {"name": "creds", "key": "token"}},
                    ],
                },
            )
            assert created.status_code == 201, created.text
            assert_absent(created.text)
            deployment_id = created.json()["id"]
            assert created.json()["secret_environment_variables"] == [
                {"name": "DB_PASSWORD", "version": 1, "secret_ref": None},
                {"name": "TOKEN", "version": 1, "secret_ref": {"name": "creds", "key": "token"}},
            ]
            await running(stub, deployment_id)
            patched = await http.patch(
                f"/deployments/{deployment_id}",
                json={"secret_environment_variables": [{"name": "DB_PASSWORD", "value": CHANGED}, {"name": "TOKEN"}]},
            )
            assert patched.status_code == 200, patched.text
            assert {e["name"]: e["version"] for e in patched.json()["secret_environment_variables"]} == {
                "DB_PASSWORD": 2,
                "TOKEN": 1,
            }
            await running(stub, deployment_id, release=2)
            unknown = await http.patch(
                f"/deployments/{deployment_id}",
                json={
                    "secret_environment_variables": [{"name": "NOT_STORED"}, {"name": "DB_PASSWORD", "value": PLAIN}]
                },
            )
            assert unknown.status_code == 422, unknown.text
            assert [e["loc"] for e in unknown.json()["detail"]] == [["body", "secret_environment_variables", 0]]
            bad = await http.post(
                "/deployments/app-hosting",
                json={
                    "geographic_region": "eu",
                    "deployment_name": "rest-bad",
                    "app_type": "container",
                    "docker_image": "nginx:1.27",
                    "secret_environment_variables": [{"name": "9X", "value": PLAIN}],
                },
            )
            assert bad.status_code == 422, bad.text
            assert_absent(bad.text)
            assert ["body", "secret_environment_variables", 0, "name"] in [e["loc"] for e in bad.json()["detail"]]
            for path in (f"/deployments/{deployment_id}", "/deployments", f"/deployments/{deployment_id}/releases"):
                answer = await http.get(path)
                assert answer.status_code == 200, (path, answer.text)
                assert "DB_PASSWORD" in answer.text
                assert_absent(answer.text)
    finally:
        await gateway.stop()


async def test_cli_takes_values_from_files_and_flags_and_shows_none(
    stack: Stack, key_file: str, tmp_path: Path
) -> None:
    from tests.e2e.test_user_cli import cli

    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)
    port = stack.apis[0].port
    value_file = tmp_path / "db-password"
    value_file.write_text(PLAIN + "\n")
    deployed = await cli(
        port,
        "deploy",
        "--name",
        "cli-web",
        "--region",
        "eu",
        "--image",
        "nginx:1.27",
        "--secret-env",
        f"DB_PASSWORD@{value_file}",
        "--secret-ref",
        "TOKEN=creds/token",
        "-o",
        "json",
    )
    assert deployed.code == 0, deployed
    assert_absent(deployed.out + deployed.err)
    shown = json.loads(deployed.out)
    assert {e["name"]: e.get("version") for e in shown["secret_environment_variables"]} == {
        "DB_PASSWORD": "1",
        "TOKEN": "1",
    }
    stored = await running(stub, shown["id"])
    ring = secrets.load(key_file)
    sealed = await _stored_envelope(stack.database_url, shown["id"])
    assert ring.open(sealed, shown["id"], "DB_PASSWORD") == PLAIN  # the file's trailing newline is not kept
    updated = await cli(port, "update", stored.id, "--secret-env", f"DB_PASSWORD={CHANGED}", "-o", "json")
    assert updated.code == 0, updated
    assert_absent(updated.out + updated.err)
    after = json.loads(updated.out)
    assert {e["name"]: e.get("version") for e in after["secret_environment_variables"]} == {
        "TOKEN": "1",
        "DB_PASSWORD": "2",
    }
    fetched = await cli(port, "get", stored.id, "-o", "json")
    assert fetched.code == 0, fetched
    assert_absent(fetched.out)
    refused = await cli(port, "deploy", "--name", "x", "--region", "eu", "--image", "nginx:1", "--secret-env", "NOPE")
    assert refused.code != 0
    assert "--secret-env takes NAME=VALUE" in refused.err


async def _stored_envelope(database_url: str, deployment_id: str) -> str:
    engine = db.make_engine(database_url)
    try:
        async with engine.connect() as connection:
            spec = (
                await connection.execute(text("SELECT spec FROM deployments WHERE id = :id"), {"id": deployment_id})
            ).scalar_one()
    finally:
        await engine.dispose()
    document = spec if isinstance(spec, dict) else json.loads(spec)
    entry = next(e for e in document["secret_environment_variables"] if e["name"] == "DB_PASSWORD")
    return str(entry["envelope"])


def test_real_processes_log_and_store_no_plaintext_and_rotate_keys(tmp_path: Path) -> None:
    """`apphosting dev` (its own key file), the user CLI, then `apphosting secrets`: as an operator runs them."""
    port = free_port()
    deployment_id = "(none made)"
    data = tmp_path / "data"
    logs_out, logs_err = (tmp_path / "dev.out").open("w"), (tmp_path / "dev.err").open("w")
    command = ["dev", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--rest-listen", "off"]
    command += ["--metrics-listen", "off", "--simulate-delay", "0.01", "--log-level", "DEBUG", "--log-format", "json"]
    dev = subprocess.Popen(
        [sys.executable, "-m", "apphosting_cli", *command],
        stdout=logs_out,
        stderr=logs_err,
    )
    value_file = tmp_path / "value"
    value_file.write_text(PLAIN)
    try:
        wait_for_port(port, timeout=90)
        env = {**os.environ, "APPHOSTING_ADDR": f"127.0.0.1:{port}", "APPHOSTING_TOKEN_FILE": str(data / "dev-token")}
        env.pop("APPHOSTING_TOKEN", None)

        def user(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                [sys.executable, "-m", "apphosting_cli", *args],
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, done
            assert_absent(done.stdout + done.stderr)
            return done

        user(
            "deploy",
            "-n",
            "proc",
            "--region",
            "eu",
            "--image",
            "nginx:1.27",
            "--secret-env",
            f"DB_PASSWORD@{value_file}",
            "--wait",
        )
        listed = json.loads(user("list", "-o", "json").stdout)
        deployment_id = next(d["id"] for d in listed if d["name"] == "proc")
        user("update", deployment_id, "--secret-env", "DB_PASSWORD@-", "--wait", stdin=CHANGED + "\n")
        shown = json.loads(user("get", deployment_id, "-o", "json").stdout)
        assert [(e["name"], e["version"]) for e in shown["secret_environment_variables"]] == [("DB_PASSWORD", "2")]
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait()
        logs_out.close()
        logs_err.close()
    logged = (tmp_path / "dev.out").read_text() + (tmp_path / "dev.err").read_text()
    assert deployment_id in logged  # the logs were read: they name the deployment
    assert_absent(logged)
    files = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file() and p.name != "secret-keys.json")
    assert b"DB_PASSWORD" in files
    assert_absent(files)

    key_file = data / "secret-keys.json"
    database = f"sqlite:///{data / 'apphosting.db'}"
    old = secrets.load(key_file)

    def admin(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "apphosting_cli", "secrets", *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done
        return done.stdout

    admin("add-key", str(key_file))
    assert "re-wrapped" in admin("rewrap", "--database-url", database, "--secret-key-file", str(key_file))
    assert " 0 re-wrapped" in admin("rewrap", "--database-url", database, "--secret-key-file", str(key_file))
    rotated = secrets.load(key_file)
    secrets.write_key_file(key_file, [k for k in rotated.keys if k[0] != old.sealing_id])
    envelope = asyncio.run(_stored_envelope(database, deployment_id))
    assert secrets.load(key_file).open(envelope, deployment_id, "DB_PASSWORD") == CHANGED
    missing = subprocess.run(
        [sys.executable, "-m", "apphosting_cli", "secrets", "rewrap", "--secret-key-file", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "does not exist; make one with `apphosting secrets new-key-file" in missing.stderr


async def test_promote_seals_the_values_again_for_the_copy(stack: Stack, key_file: str) -> None:
    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)
    created = await stub.CreateAppHostingDeployment(
        request(secret("DB_PASSWORD", PLAIN), secret("TOKEN", ref=("creds", "token")))
    )
    await running(stub, created.id)
    promoted = await stub.PromoteDeployment(pb.PromoteDeploymentRequest(id=created.id, new_name="web-copy"))
    copy = promoted.target
    assert versions(copy) == {"DB_PASSWORD": 1, "TOKEN": 1}
    assert_absent(promoted.SerializeToString())
    ring = secrets.load(key_file)
    envelope = await _stored_envelope(stack.database_url, copy.id)
    assert ring.open(envelope, copy.id, "DB_PASSWORD") == PLAIN
    with pytest.raises(secrets.SecretKeyError):
        ring.open(envelope, created.id, "DB_PASSWORD")


async def test_an_api_with_a_missing_or_malformed_key_file_does_not_start(
    database_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    from apphosting import CannotStart
    from services.deployments.app import ApiOptions, ApiServer

    malformed = tmp_path / "bad.json"
    malformed.write_text("{}")
    for path, says in ((tmp_path / "none.json", "does not exist"), (malformed, 'must hold "keys"')):
        server = ApiServer(
            ApiOptions(
                listen="127.0.0.1:0",
                database_url=database_url,
                nats_url=nats_server.url,
                auth=None,
                secret_key_file=str(path),
            )
        )
        with pytest.raises(CannotStart, match=says):
            await server.start()
        await server.stop()
