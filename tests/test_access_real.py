"""Access control as clients meet it, with the real llama-server: the official openai and
anthropic SDKs with good, wrong and scoped keys, a child's port closed to everyone but routerd,
and HTTPS with a certificate made here (renewed on reload)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl

import anthropic
import httpx
import openai
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from routerd.front.keys import KeySettings
from tests.conftest import needs_real_llama
from tests.test_real_llama import MESSAGES, real_config

pytestmark = [pytest.mark.real, needs_real_llama]


def sdk(r, key: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=r.url + "/v1", api_key=key, max_retries=0, timeout=120, **kwargs)


async def test_openai_and_anthropic_sdks_with_good_wrong_and_scoped_keys(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    full, _ = r.daemon.gate.add("everything")
    scoped, _ = r.daemon.gate.add("small-only", KeySettings(models=("smollm2-*",)))

    answer = await trio.to_thread.run_sync(lambda: sdk(r, full).chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=4))
    assert answer.choices[0].message.content

    with pytest.raises(openai.AuthenticationError) as wrong:
        await trio.to_thread.run_sync(lambda: sdk(r, "rk-not-a-key").chat.completions.create(
            model="smollm2-135m", messages=MESSAGES, max_tokens=4))
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"

    seen = await trio.to_thread.run_sync(lambda: [m.id for m in sdk(r, scoped).models.list()])
    assert seen == ["smollm2-135m"]
    with pytest.raises(openai.NotFoundError):
        await trio.to_thread.run_sync(lambda: sdk(r, scoped).chat.completions.create(
            model="gemma3-270m", messages=MESSAGES, max_tokens=4))
    assert r.supervisor.running("gemma3-270m") is None  # nothing was started for it

    claude_style = anthropic.Anthropic(base_url=r.url, api_key=scoped, max_retries=0, timeout=120)
    message = await trio.to_thread.run_sync(lambda: claude_style.messages.create(
        model="smollm2-135m", max_tokens=8, messages=MESSAGES))
    assert message.content and message.content[0].text
    with pytest.raises(anthropic.AuthenticationError):
        await trio.to_thread.run_sync(lambda: anthropic.Anthropic(
            base_url=r.url, api_key="rk-wrong", max_retries=0).messages.create(
                model="smollm2-135m", max_tokens=8, messages=MESSAGES))


async def test_a_real_llama_server_refuses_anyone_but_routerd(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    through = await r.http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2})
    assert through.status_code == 200
    port = r.supervisor.running("smollm2-135m").port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as direct:
        straight = await direct.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert straight.status_code == 401
        assert (await direct.get("/slots")).status_code == 401
        assert (await direct.get("/health")).status_code == 200  # llama-server keeps /health open
    assert (await r.http.get("/upstream/smollm2-135m/slots")).status_code == 200


def self_signed(directory, serial: int) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def served_serial(port: int) -> int:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


async def test_https_with_a_self_signed_certificate_renewed_on_reload(start_routerd, tmp_path):
    certfile, keyfile = self_signed(tmp_path, serial=1001)
    data = real_config(tmp_path, **{"smollm2-135m": {}})
    data["server"].update({"certfile": certfile, "keyfile": keyfile})
    r = await start_routerd(data)
    assert r.url.startswith("https://")
    key, _ = r.daemon.gate.add("tls")
    trusted = httpx.Client(verify=ssl.create_default_context(cafile=certfile), trust_env=False)
    answer = await trio.to_thread.run_sync(lambda: sdk(r, key, http_client=trusted).chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=4))
    assert answer.choices[0].message.content
    with pytest.raises(openai.APIConnectionError):  # a client that does not trust it refuses
        await trio.to_thread.run_sync(lambda: sdk(r, key).models.list())

    port = int(r.url.rsplit(":", 1)[1])
    assert await trio.to_thread.run_sync(served_serial, port) == 1001
    self_signed(tmp_path, serial=2002)  # renewed in place, as certbot does
    await r.daemon.catalog_service.reload()
    assert await trio.to_thread.run_sync(served_serial, port) == 2002
    (tmp_path / "key.pem").write_text("garbage")
    with pytest.raises(Exception, match="certfile"):
        await r.daemon.catalog_service.reload()
    assert await trio.to_thread.run_sync(served_serial, port) == 2002  # the running certificate stays
