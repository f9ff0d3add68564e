"""The DPS protocol rules, pure: token encryption, signing, classification, Retry-After."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.dps.protocol import (
    classify,
    hint,
    parse_retry_after,
    sign,
    throttled,
    token_encryption,
)
from pipeline.schemas import AllocateRequest

ORG = "o15735524440141"

# --------------------------------------------------------------------------------------
# Pure functions, signing


def test_token_encryption_is_sha256_of_key_timestamp_secret():
    expected = hashlib.sha256(b"demo-app-key" + b"1700000000000" + b"demo-app-secret").hexdigest()
    got = token_encryption("demo-app-key", 1700000000000, "demo-app-secret")
    assert got == expected
    assert got == "aa3dbd256274525928efdc00818d2254c70e20945bd4b5d93dce11c31aecf403"


def test_sign_allocate_vector():
    body = b'{"sn":"SN-1"}'
    params = {"orgId": ORG, "action": "allocate"}
    expected = hashlib.sha256(
        b"tok-123" + b"action" + b"allocate" + b"orgId" + ORG.encode() + body
        + b"1700000000123" + b"demo-app-secret"
    ).hexdigest()  # fmt: skip
    got = sign("tok-123", params, body, 1700000000123, "demo-app-secret")
    assert got == expected
    assert got == "af2e56d3f2b487f7be723dfc850e5d9f9ae2e02146f66f8e21c7ee7943d87950"


def test_sign_doc_example_sorts_params_and_appends_body():
    # https://{apigw}/m/v1/b?k3=v3&k1=v1&k2=v2 -> paramsData "k1v1k2v2k3v3" + body
    body = b'{"a":1}'
    got = sign("tok", {"k3": "v3", "k1": "v1", "k2": "v2"}, body, 1700000000000, "sec")
    expected = hashlib.sha256(b"tok" + b"k1v1k2v2k3v3" + body + b"1700000000000" + b"sec")
    assert got == expected.hexdigest()
    assert got == "3c2cb8cab1c1799bd156b0be39cc87116019ecac3ab0994216b229745b8441bc"


def test_sign_uses_raw_values_and_body_bytes():
    body = '{"sn": "é"}'.encode()
    got = sign("t", {"orgId": "o 1&x=é"}, body, 1, "s")
    assert got == hashlib.sha256("torgIdo 1&x=é".encode() + body + b"1s").hexdigest()
    # One byte of whitespace in the body changes the signature: it is signed as sent.
    assert sign("t", {}, b'{"sn":"a"}', 1, "s") != sign("t", {}, b'{"sn": "a"}', 1, "s")
    assert sign("t", {}, b"", 1, "s") == hashlib.sha256(b"t1s").hexdigest()


@given(st.dictionaries(st.text(), st.text(), max_size=6), st.binary(max_size=64))
def test_sign_ignores_parameter_order(params, body):
    reordered = dict(reversed(list(params.items())))
    assert sign("tok", params, body, 42, "sec") == sign("tok", reordered, body, 42, "sec")


# --------------------------------------------------------------------------------------
# Pure functions, classification and Retry-After


@pytest.mark.parametrize(
    ("http_status", "code", "outcome"),
    [
        (200, 0, "ok"),
        (201, 0, "ok"),
        (200, 35400, "rejected"),
        (200, 35404, "rejected"),
        (200, 35601, "rejected"),
        (200, 35603, "rejected"),
        (200, 99400, "rejected"),
        (200, 12345, "rejected"),
        (400, None, "transient"),
        (404, None, "transient"),
        (409, 409, "rejected"),
        (429, None, "transient"),
        (429, 429, "transient"),
        (500, None, "transient"),
        (502, None, "transient"),
        (503, None, "transient"),
        (504, 0, "transient"),
        (200, 1005, "transient"),
        (200, 1203, "transient"),
        (200, 1001, "transient"),
        (200, 1002, "transient"),
        (200, 1003, "transient"),
        (200, 1004, "transient"),
        (401, 1202, "transient"),
        (200, 1204, "transient"),
        (401, 497, "transient"),
        (200, 497, "transient"),
        (401, None, "transient"),
        (403, None, "transient"),
        (200, 429, "transient"),
        (200, 503, "transient"),
        (200, None, "transient"),
        (302, None, "transient"),
    ],
)
def test_classify(http_status, code, outcome):
    assert classify(http_status, code) == outcome


KEY_AND_SECRET = "check sink.dps.app_key and sink.dps.app_secret"


@pytest.mark.parametrize(
    ("http_status", "code", "expected"),
    [
        # The gateway's authentication codes: only the operator can fix those.
        (
            200,
            1001,
            (
                "check sink.dps.app_key (a repeated token request: is the app key shared with "
                "another client, or this host's clock wrong?)"
            ),
        ),
        (200, 1002, "check sink.dps.app_key (the API gateway does not know it)"),
        (200, 1003, KEY_AND_SECRET),
        (
            401,
            1004,
            "check this host's clock and sink.dps.base_url (the gateway refused a parameter)",
        ),
        (401, 1202, f"{KEY_AND_SECRET} (a parameter was empty)"),
        (200, 1204, f"{KEY_AND_SECRET} (the token refresh failed)"),
        (
            401,
            497,
            "check sink.dps.app_secret and this host's clock (the request signature was refused)",
        ),
        # No DPS envelope: the gateway, a proxy, or nothing DPS-like at base_url.
        (401, None, KEY_AND_SECRET),
        (403, None, "check that the application (sink.dps.app_key) may call DPS in sink.org_id"),
        (404, None, "check sink.dps.base_url (no DPS API answers there)"),
        # Cured by retrying, or DPS judging the record: no hint.
        (404, 35404, None),
        (200, 35601, None),
        (200, 0, None),
        (500, 500, None),
        (503, None, None),
        (429, 429, None),
        (200, 1005, None),
        (200, 1203, None),
    ],
)
def test_hint_names_what_the_operator_should_check(http_status, code, expected):
    assert hint(http_status, code) == expected


@pytest.mark.parametrize(
    ("http_status", "code", "expected"),
    [
        (429, 429, True),
        (429, None, True),
        (200, 429, True),
        (503, None, False),
        (200, 0, False),
        (500, 500, False),
    ],
)
def test_throttled_is_http_or_legacy_429(http_status, code, expected):
    assert throttled(http_status, code) is expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("-4", 0.0),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value, seconds):
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now=now) == seconds


def test_allocate_request_leaves_device_data_out_when_none():
    assert msgspec.json.encode(AllocateRequest(sn="SN-1")) == b'{"sn":"SN-1"}'
