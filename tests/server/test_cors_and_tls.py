"""--ssl-keyfile/--ssl-certfile and CORS (--allowed-origins, --allowed-methods, --allowed-headers)
over one `jaxserve serve`: HTTPS with a certificate signed by a CA this test makes, which httpx
and the openai client trust (a client without it is refused); browser preflights allowed and
refused per the flags, and the CORS headers of actual responses. Then the CORS rules alone."""
from __future__ import annotations

import datetime
import ipaddress
import ssl

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jaxserve.server.cors import ALL_METHODS, Cors
from serverlib import MODEL, running

PAGE = "http://app.example"  # the one origin the server allows
OTHER = "http://evil.example"


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA, and a key and certificate for 127.0.0.1 that it signed: (key path, cert path, CA path)."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jaxserve test CA")])
    ca = _certificate("jaxserve test CA", ca_key, ca_name, ca_key, ca=True)
    cert = _certificate("127.0.0.1", key, ca_name, ca_key, ca=False)
    paths = folder / "key.pem", folder / "cert.pem", folder / "ca.pem"
    paths[0].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


@pytest.fixture(scope="module")
def https(tmp_path_factory, tls):
    """The server over HTTPS, allowing the origin PAGE (given in vLLM's JSON form), GET and POST,
    and the headers Content-Type and Authorization; and an SSL context that trusts the test's CA."""
    key, cert, ca = tls
    trust = ssl.create_default_context(cafile=str(ca))
    args = ["--served-model-name", MODEL, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
            "--allowed-origins", f'["{PAGE}"]', "--allowed-methods", "GET", "POST",
            "--allowed-headers", "Content-Type", "Authorization"]
    with running(args, tmp_path_factory.mktemp("https") / "serve.log", verify=trust) as srv:
        yield srv, trust


def test_https_with_the_tests_ca_serves_and_an_untrusting_client_is_refused(https):
    srv, trust = https
    assert srv.url.startswith("https://")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", http_client=httpx.Client(verify=trust))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 3
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) == 3
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{srv.url}/health")  # the system's CAs never signed the test's certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(srv.url.replace("https://", "http://") + "/health")  # no plain HTTP on a TLS port


def _preflight(srv, trust, origin: str, method: str, headers: str | None = None) -> httpx.Response:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return httpx.options(f"{srv.url}/v1/chat/completions", headers=asked, verify=trust)


def test_a_preflight_of_the_allowed_origin_method_and_headers_is_allowed(https):
    srv, trust = https
    response = _preflight(srv, trust, PAGE, "POST", "content-type, authorization")
    assert response.status_code == 204
    h = response.headers
    assert h["access-control-allow-origin"] == PAGE and h["vary"] == "Origin"
    assert h["access-control-allow-methods"] == "GET, POST" and h["access-control-max-age"] == "600"
    assert set(h["access-control-allow-headers"].split(", ")) >= {"content-type", "authorization"}
    assert "access-control-allow-credentials" not in h and h["x-request-id"]
    # A route that does not exist is preflighted as any other: browsers ask before they know.
    other = httpx.options(f"{srv.url}/no/such/route", verify=trust, headers={
        "Origin": PAGE, "Access-Control-Request-Method": "GET"})
    assert other.status_code == 204


@pytest.mark.parametrize("origin, method, headers, flag", [
    (OTHER, "POST", None, "--allowed-origins"),
    (PAGE, "DELETE", None, "--allowed-methods"),
    (PAGE, "POST", "content-type, x-secret", "--allowed-headers"),
])
def test_a_preflight_outside_the_flags_is_refused(https, origin, method, headers, flag):
    srv, trust = https
    response = _preflight(srv, trust, origin, method, headers)
    assert response.status_code == 400
    assert flag in response.json()["error"]["message"] and response.json()["error"]["code"] == "cors_refused"
    if origin == OTHER:
        assert "access-control-allow-origin" not in response.headers


def test_actual_responses_name_an_allowed_origin_only(https):
    srv, trust = https
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    allowed = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Origin": PAGE}, verify=trust)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == PAGE
    assert allowed.headers["access-control-expose-headers"] == "X-Request-ID"
    # The server answers a foreign page's request (only a browser enforces CORS) without allowing it.
    foreign = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Origin": OTHER}, verify=trust)
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
    plain = httpx.get(f"{srv.url}/v1/models", verify=trust)  # no Origin: no CORS headers
    assert not [k for k in plain.headers if k.startswith("access-control-")]


# ---- the rules alone ------------------------------------------------------------------------------

def test_the_defaults_allow_any_origin_method_and_asked_header():
    cors = Cors(("*",), ("*",), ("*",), credentials=False)
    headers, refusal = cors.preflight({"origin": OTHER, "access-control-request-method": "PATCH",
                                       "access-control-request-headers": "X-Anything, Authorization"})
    assert refusal is None and headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in headers
    assert headers["Access-Control-Allow-Methods"] == ", ".join(ALL_METHODS)
    assert headers["Access-Control-Allow-Headers"] == "x-anything, authorization"  # echoed, as Starlette does
    assert cors.response_headers(OTHER)["Access-Control-Allow-Origin"] == "*" and cors.response_headers(None) == {}


def test_credentials_name_the_origin_rather_than_a_wildcard():
    cors = Cors(("*",), ("GET",), ("x-api-key",), credentials=True)
    headers, refusal = cors.preflight({"origin": PAGE, "access-control-request-method": "get",
                                       "access-control-request-headers": "Content-Type, X-API-Key"})
    assert refusal is None  # a safelisted header needs no flag; methods compare in upper case
    assert (headers["Access-Control-Allow-Origin"], headers["Vary"], headers["Access-Control-Allow-Credentials"]) == (
        PAGE, "Origin", "true")
    assert headers["Access-Control-Allow-Headers"] == "accept, accept-language, content-language, content-type, x-api-key"
    assert cors.response_headers(PAGE)["Access-Control-Allow-Credentials"] == "true"
    assert Cors.is_preflight("OPTIONS", {"origin": PAGE, "access-control-request-method": "GET"})
    assert not Cors.is_preflight("OPTIONS", {"origin": PAGE}) and not Cors.is_preflight(
        "GET", {"origin": PAGE, "access-control-request-method": "GET"})
