"""WebhookSigner: key file lifecycle, and signatures checked the way a receiver checks them."""

from __future__ import annotations

import base64
import hashlib
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from kontext_server.domain.errors import ConfigError
from kontext_server.webhooks.signing import WebhookSigner

BODY = b'{"request_id":"r-1","status":"OK","payload":{"images":[]}}'


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def receiver_verifies(jwks: dict[str, object], headers: dict[str, str], body: bytes) -> bool:
    """What a webhook receiver does (fal's documented recipe), written independently."""
    message = "\n".join(
        [
            headers["X-Fal-Webhook-Request-Id"],
            headers["X-Fal-Webhook-User-Id"],
            headers["X-Fal-Webhook-Timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    signature = bytes.fromhex(headers["X-Fal-Webhook-Signature"])
    keys = jwks["keys"]
    assert isinstance(keys, list)
    for key in keys:
        if key["kty"] != "OKP" or key["crv"] != "Ed25519":
            continue
        public_key = Ed25519PublicKey.from_public_bytes(_b64url_decode(key["x"]))
        try:
            public_key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


def test_signature_verifies_with_the_published_jwks(tmp_path: Path) -> None:
    signer = WebhookSigner.load_or_create(tmp_path / "webhook.pem")
    headers = signer.headers("r-1", "key-7", BODY, timestamp=1_700_000_000)
    assert headers["X-Fal-Webhook-Request-Id"] == "r-1"
    assert headers["X-Fal-Webhook-User-Id"] == "key-7"
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    assert len(headers["X-Fal-Webhook-Signature"]) == 128  # 64 bytes, hex
    assert receiver_verifies(signer.jwks(), headers, BODY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("X-Fal-Webhook-Request-Id", "r-2"),
        ("X-Fal-Webhook-User-Id", "someone-else"),
        ("X-Fal-Webhook-Timestamp", "1700000001"),
    ],
)
def test_signature_covers_every_signed_header(tmp_path: Path, field: str, value: str) -> None:
    signer = WebhookSigner.load_or_create(tmp_path / "webhook.pem")
    headers = signer.headers("r-1", "key-7", BODY, timestamp=1_700_000_000)
    assert not receiver_verifies(signer.jwks(), {**headers, field: value}, BODY)


def test_signature_covers_the_body(tmp_path: Path) -> None:
    signer = WebhookSigner.load_or_create(tmp_path / "webhook.pem")
    headers = signer.headers("r-1", "key-7", BODY)
    assert not receiver_verifies(signer.jwks(), headers, BODY.replace(b"OK", b"KO"))


def test_timestamp_defaults_to_now(tmp_path: Path) -> None:
    signer = WebhookSigner.load_or_create(tmp_path / "webhook.pem")
    before = int(time.time())
    stamped = int(signer.headers("r-1", "u", BODY)["X-Fal-Webhook-Timestamp"])
    assert before <= stamped <= int(time.time())


def test_jwks_has_the_fields_receivers_expect(tmp_path: Path) -> None:
    [key] = WebhookSigner.load_or_create(tmp_path / "webhook.pem").jwks()["keys"]
    assert {k: key[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
    }
    assert len(_b64url_decode(key["x"])) == 32
    assert "=" not in key["x"]


def test_kid_is_the_rfc_7638_thumbprint() -> None:
    # RFC 8037 appendix A.1 (private key) and A.3 (its JWK thumbprint).
    private = Ed25519PrivateKey.from_private_bytes(
        _b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    )
    [key] = WebhookSigner(private).jwks()["keys"]
    assert key["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert key["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_key_file_is_created_private_and_reused_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "data" / "webhook.pem"
    first = WebhookSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = WebhookSigner.load_or_create(path)
    assert again.jwks() == first.jwks()
    headers = first.headers("r-1", "u", BODY)
    assert receiver_verifies(again.jwks(), headers, BODY)
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "webhook.pem"
    barrier = threading.Barrier(8)
    kids: list[str] = []

    def start() -> None:
        barrier.wait()
        kids.append(WebhookSigner.load_or_create(path).kid)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(kids) == 8
    assert set(kids) == {WebhookSigner.load_or_create(path).kid}


def test_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "webhook.pem"
    path.write_text("not a key")
    with pytest.raises(ConfigError, match="delete it to create a new one"):
        WebhookSigner.load_or_create(path)


def test_key_of_another_type_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "webhook.pem"
    path.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="is not an Ed25519 key"):
        WebhookSigner.load_or_create(path)
