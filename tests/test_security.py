"""The public API's optional protection: TLS from a certificate and key, a bearer token (UNAUTHENTICATED without
it; health checks stay open), and no absolute filesystem path in GetServerInfo."""
from __future__ import annotations

import datetime
import ipaddress
import ssl

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.processes import start_scheduler
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc

TOKEN = "test-token-1234"


def self_signed(tmp_path) -> tuple[str, str, bytes]:
    """(cert path, key path, cert PEM) of a certificate for 127.0.0.1 and localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), pem


@pytest.fixture(scope="module")
def secured(services, tmp_path_factory):
    """A second scheduler in front of the session's worker, with TLS and a token. Every request below is refused
    (auth, or validation after auth) before it reaches the worker, so it never writes into the session's KV pool."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key, pem = self_signed(tmp)
    creds = grpc.ssl_channel_credentials(root_certificates=pem)
    scheduler = start_scheduler(services["worker"].address, tmp, credentials=creds,
                                extra=["--tls-cert", cert, "--tls-key", key, "--api-token", TOKEN])
    scheduler.cert = cert
    yield scheduler, creds
    scheduler.stop()


def test_tls_and_token_let_a_client_in(secured):
    scheduler, creds = secured
    with grpc.secure_channel(scheduler.address, creds) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=[("authorization", f"Bearer {TOKEN}")])
        assert info.total_kv_blocks > 0
        assert not info.model_path.startswith("/") and "/" not in info.model_path  # a name, not a path
        with pytest.raises(grpc.RpcError) as err:  # past the token, refused by validation
            list(stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_tokens=0)),
                               metadata=[("authorization", f"Bearer {TOKEN}")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]])
def test_without_the_token_calls_are_unauthenticated(secured, metadata):
    scheduler, creds = secured
    with grpc.secure_channel(scheduler.address, creds) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for call in (lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata),
                     lambda: list(stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata)),
                     lambda: stub.Abort(pb.AbortRequest(request_id="x"), metadata=metadata)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in err.value.details()
        # health checks stay open, for probes
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_clients_cannot_talk_to_a_tls_server(secured):
    scheduler, _ = secured
    with grpc.insecure_channel(scheduler.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            scheduler_pb2_grpc.SchedulerStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_http_api_serves_tls_and_needs_the_token_too(secured):
    """The OpenAI-compatible door is no weaker than gRPC: the same certificate, the same token on /v1/."""
    scheduler, _ = secured
    url = scheduler.http_url.replace("http://", "https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=scheduler.cert), timeout=10) as client:
        assert client.get(f"{url}/health").status_code == 200  # probes stay open
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            refused = client.get(f"{url}/v1/models", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        models = client.get(f"{url}/v1/models", headers={"authorization": f"Bearer {TOKEN}"})
        assert models.status_code == 200 and models.json()["data"][0]["id"]
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP gets no answer from a TLS port
        httpx.get(f"{scheduler.http_url}/health", timeout=5)
