"""TLS over real channels: the gRPC server (and mutual TLS), and the NATS connection."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from apphosting import bus
from apphosting.nats_server import free_port, nats_server_binary, wait_for_port
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from tests.integration.test_api import create_request
from tests.security.conftest import ApiFactory, bearer, token_for


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    directory: Path, name: str, *, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, server: bool
) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer[0].subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    pem.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pem, certificate, key


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # signed by another CA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, ca_cert, ca_key = _issue(tmp_path, "ca", issuer=None, server=False)
    server, _, _ = _issue(tmp_path, "server", issuer=(ca_cert, ca_key), server=True)
    client, _, _ = _issue(tmp_path, "client", issuer=(ca_cert, ca_key), server=False)
    _, other_cert, other_key = _issue(tmp_path, "other-ca", issuer=None, server=False)
    stranger, _, _ = _issue(tmp_path, "stranger", issuer=(other_cert, other_key), server=False)
    return Pki(ca, server, client, stranger)


def _credentials(pki: Pki, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def _create(port: int, credentials: grpc.ChannelCredentials) -> pb.Deployment:
    metadata = bearer(token_for(str(uuid.uuid4())))
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
        return await stub.CreateAppHostingDeployment(create_request(), metadata=metadata, timeout=10)


async def test_grpc_over_tls(secure_api_factory: ApiFactory, pki: Pki) -> None:
    api = await secure_api_factory(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    created = await _create(api.server.port, _credentials(pki))
    assert created.status == pb.DEPLOYMENT_STATUS_PENDING
    # A plaintext client gets no answer from a TLS port.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.server.port}") as channel:
        stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_mutual_tls_needs_a_client_certificate_from_the_ca(secure_api_factory: ApiFactory, pki: Pki) -> None:
    api = await secure_api_factory(
        tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), tls_client_ca=str(pki.ca.cert)
    )
    assert (await _create(api.server.port, _credentials(pki, pki.client))).id
    for refused in (_credentials(pki), _credentials(pki, pki.stranger)):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _create(api.server.port, refused)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await api.rows() == 1


@pytest.fixture
def tls_nats(pki: Pki) -> Iterator[str]:
    """A nats-server that speaks only TLS and wants a client certificate signed by the test CA."""
    port = free_port()
    server = subprocess.Popen(
        [
            nats_server_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "--tlsverify",
            "--tlscert",
            str(pki.server.cert),
            "--tlskey",
            str(pki.server.key),
            "--tlscacert",
            str(pki.ca.cert),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"tls://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_nats_over_mutual_tls(tls_nats: str, pki: Pki) -> None:
    security = bus.NatsSecurity(
        tls_ca_file=str(pki.ca.cert), tls_cert_file=str(pki.client.cert), tls_key_file=str(pki.client.key)
    )
    nc = await bus.connect(tls_nats, "tls-test", security=security)
    try:
        sub = await nc.subscribe("hello")
        await nc.publish("hello", b"over tls")
        assert (await sub.next_msg(timeout=5)).data == b"over tls"
    finally:
        await nc.close()
    # Without a client certificate the server refuses the connection.
    without = bus.NatsSecurity(tls_ca_file=str(pki.ca.cert)).options()
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        await nats.connect(tls_nats, allow_reconnect=False, connect_timeout=2, **without)
