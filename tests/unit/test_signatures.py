"""Request signatures checked against their owners' own vectors and code: Genesys' published
AudioHook signature example (developer center, "AudioHook protocol: authentication") and
Twilio's helper library, ``twilio.request_validator.RequestValidator``."""

from __future__ import annotations

import pytest
from twilio.request_validator import RequestValidator

from server.edges.telephony import signatures
from server.edges.telephony.signatures import NonceCache, SignatureError, check_audiohook

pytestmark = pytest.mark.unit

# Genesys' example request, exactly as published.
GENESYS_SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU="
GENESYS_KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"
GENESYS_CREATED = 1641013200
GENESYS_TARGET = "/api/v1/voicebiometrics/ws"
GENESYS_HEADERS = {
    "host": "audiohook.example.com",
    "audiohook-organization-id": "d7934305-0972-4844-938e-9060eef73d05",
    "audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c0",
    "audiohook-correlation-id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "x-api-key": GENESYS_KEY,
    "signature-input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" '
    '"audiohook-session-id" "audiohook-correlation-id" "x-api-key");'
    f'keyid="{GENESYS_KEY}";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";alg="hmac-sha256";'
    f"created={GENESYS_CREATED};expires=3282026430",
    "signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
}


def check(headers=None, *, now=GENESYS_CREATED + 1.0, key=GENESYS_KEY, nonces=None, secret=None):
    check_audiohook(
        secret or GENESYS_SECRET,
        key,
        GENESYS_TARGET,
        headers or GENESYS_HEADERS,
        nonces or NonceCache(),
        now,
    )


def test_genesys_published_example_verifies():
    check()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"signature": "sig1=:NZBwzBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:"}, "does not match"),
        ({"audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c1"}, "does not match"),
        ({"host": "evil.example.com"}, "does not match"),
        ({"signature": ""}, "not signed"),
        ({"signature-input": 'sig1=("@request-target");keyid="x"'}, "does not cover"),
        ({"signature-input": "sig1=(", "signature": "sig1=:AA==:"}, "structured field"),
    ],
)
def test_a_changed_request_is_refused_and_the_reason_names_no_secret(change, why):
    with pytest.raises(SignatureError) as info:
        check({**GENESYS_HEADERS, **change})
    assert why in str(info.value)
    assert GENESYS_SECRET not in str(info.value) and "NZBw" not in str(info.value)


def test_a_wrong_secret_or_a_keyid_that_is_not_the_api_key_is_refused():
    with pytest.raises(SignatureError, match="does not match"):
        check(secret="b3RoZXIgc2VjcmV0")
    with pytest.raises(SignatureError, match="keyid"):
        check(key="another-api-key-0000")


def test_stale_future_and_expired_signatures_are_refused():
    with pytest.raises(SignatureError, match="created"):
        check(now=GENESYS_CREATED + signatures.SIGNATURE_MAX_AGE_S + 1)
    with pytest.raises(SignatureError, match="created"):
        check(now=GENESYS_CREATED - signatures.SIGNATURE_SKEW_S - 1)
    with pytest.raises(SignatureError, match="expired"):
        headers = {
            **GENESYS_HEADERS,
            "signature-input": GENESYS_HEADERS["signature-input"].replace(
                "expires=3282026430", f"expires={GENESYS_CREATED}"
            ),
        }
        check(headers, now=GENESYS_CREATED + 1)


def test_a_nonce_is_accepted_once():
    nonces = NonceCache()
    check(nonces=nonces)
    with pytest.raises(SignatureError, match="nonce"):
        check(nonces=nonces)


def test_the_nonce_cache_forgets_after_the_max_age_and_is_bounded(monkeypatch):
    now = [0.0]
    nonces = NonceCache(clock=lambda: now[0])
    assert nonces.first_use("a") and not nonces.first_use("a")
    now[0] = signatures.SIGNATURE_MAX_AGE_S + 1  # a signature that old is refused anyway
    assert nonces.first_use("a")
    monkeypatch.setattr(signatures, "NONCES_KEPT", 10)
    for i in range(100):
        nonces.first_use(f"n{i}")
    assert len(nonces._seen) <= 10


TWILIO_TOKEN = "12345678901234567890123456789012"


@pytest.mark.parametrize(
    ("scheme", "host", "target", "signed_url"),
    [
        ("http", "127.0.0.1:5000", "/telephony/twilio", "ws://127.0.0.1:5000/telephony/twilio"),
        (
            "https",
            "voice.example.com",
            "/telephony/twilio",
            "wss://voice.example.com/telephony/twilio",
        ),
        # Twilio may or may not write the default port: both spellings hold, as in its library
        (
            "https",
            "voice.example.com",
            "/telephony/twilio",
            "wss://voice.example.com:443/telephony/twilio",
        ),
        ("https", "voice.example.com:443", "/t/twilio?x=1", "wss://voice.example.com/t/twilio?x=1"),
    ],
)
def test_our_twilio_check_accepts_what_twilios_own_library_signs(scheme, host, target, signed_url):
    validator = RequestValidator(TWILIO_TOKEN)
    signature = validator.compute_signature(signed_url, {})
    assert validator.validate(signed_url, {}, signature)
    signatures.check_twilio(TWILIO_TOKEN, signature, signatures.twilio_urls(scheme, host, target))


def test_a_twilio_signature_for_another_url_token_or_none_is_refused():
    urls = signatures.twilio_urls("https", "voice.example.com", "/telephony/twilio")
    other = RequestValidator(TWILIO_TOKEN).compute_signature(
        "wss://evil.example.com/telephony/twilio", {}
    )
    wrong_token = RequestValidator("x" * 32).compute_signature(urls[0], {})
    for signature in (other, wrong_token, "", None):
        with pytest.raises(SignatureError):
            signatures.check_twilio(TWILIO_TOKEN, signature, urls)
