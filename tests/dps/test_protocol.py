"""The DPS protocol rules, pure: token encryption, signing, classification, Retry-After."""

from __future__ import annotations

import hashlib
import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.dps.emulator import EmulatedDevice
from pipeline.dps.emulator.search import matcher
from pipeline.dps.protocol import (
    DevicePage,
    classify,
    device_page,
    hint,
    is_allocated,
    parse_retry_after,
    search_expression,
    sign,
    throttled,
    token_encryption,
)
from pipeline.schemas import (
    AllocateRequest,
    DeleteDevicesRequest,
    Pagination,
    PaginationRequest,
    PvsDevice,
    ResetAllocationRequest,
    SearchRequest,
    Sorter,
)

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


# --------------------------------------------------------------------------------------
# Get, Search, Reset and Delete: requests and answers


def test_batch_and_search_requests_encode_as_documented():
    reset = ResetAllocationRequest(group_id="g", sns=["a", "b"])
    assert msgspec.json.encode(reset) == b'{"groupId":"g","sns":["a","b"]}'
    delete = DeleteDevicesRequest(group_id="g", sn_list=["a"])
    assert msgspec.json.encode(delete) == b'{"groupId":"g","snList":["a"]}'
    search = SearchRequest(expression="sn = 'a'")
    assert msgspec.json.encode(search) == b'{"expression":"sn = \'a\'"}'
    paged = SearchRequest(expression="x", pagination=PaginationRequest(page_no=2, page_size=50))
    assert msgspec.json.encode(paged) == (
        b'{"expression":"x","pagination":{"pageNo":2,"pageSize":50}}'
    )
    sorted_by = PaginationRequest(page_no=1, page_size=1, sorters=[Sorter(field="sn")])
    assert msgspec.json.encode(sorted_by) == (
        b'{"pageNo":1,"pageSize":1,"sorters":[{"field":"sn","order":"ASC"}]}'
    )
    with pytest.raises(msgspec.ValidationError, match=r"<= 1000 - at `\$.pageSize`"):
        msgspec.convert({"pageNo": 1, "pageSize": 1001}, PaginationRequest)


@pytest.mark.parametrize(
    ("criteria", "expression"),
    [
        ({"group_id": "g-1"}, "groupId = 'g-1'"),
        ({"sns": ["a", "b", "a"]}, "sn in ('a', 'b')"),
        ({"status": "allocated"}, "status = 'allocated'"),
        (
            {"group_id": "g", "sns": ("a",), "status": "init"},
            "groupId = 'g' and sn in ('a') and status = 'init'",
        ),
        ({"group_id": 'say "hi"'}, "groupId = 'say \"hi\"'"),
    ],
)
def test_search_expression(criteria, expression):
    assert search_expression(**criteria) == expression


@pytest.mark.parametrize(
    ("criteria", "error"),
    [
        ({}, "a search needs at least one criterion (group_id, sns or status)"),
        ({"sns": []}, "sns: an empty list matches nothing"),
        ({"sns": ["a", "o'b"]}, 'sn "o\'b": a search value cannot contain a single quote'),
        ({"status": "'"}, 'status "\'": a search value cannot contain a single quote'),
    ],
)
def test_search_expression_refusals(criteria, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        search_expression(**criteria)


_value = st.text(min_size=1, max_size=12).filter(lambda text: "'" not in text)


@given(_value, st.lists(_value, min_size=1, max_size=4), st.sampled_from(["init", "allocated"]))
def test_the_emulator_reads_the_expression_as_meant(group_id, sns, status):
    # What the client asks for is what the emulator's FQL subset matches.
    match = matcher(search_expression(group_id=group_id, sns=sns, status=status))

    def device(sn: str, group: str | None, allocated: bool) -> EmulatedDevice:
        return EmulatedDevice(
            sn=sn, group_id=group, product_key=None, manufacturer_org_id=None,
            registered_data={}, batch_order=1, create_time=1, update_time=1,
            allocated_time=1 if allocated else None,
        )  # fmt: skip

    allocated = status == "allocated"
    assert all(match(device(sn, group_id, allocated)) for sn in sns)
    assert not match(device(sns[0], group_id + "x", allocated))
    assert not match(device(sns[0], group_id, not allocated))
    other = "".join(sns) + "-other"
    assert not match(device(other, group_id, allocated))


@pytest.mark.parametrize(
    ("fields", "allocated"),
    [
        ({"allocateStatus": "allocated"}, True),
        ({"allocateStatus": "init", "status": {"currentStatus": "allocated"}}, False),
        ({"status": {"currentStatus": "allocated"}}, True),
        ({"status": {"currentStatus": "connected"}}, True),
        ({"status": {"currentStatus": "finished"}}, True),
        ({"status": {"currentStatus": "init"}}, False),
        ({"status": {"currentStatus": "discarded"}}, False),
        ({}, False),
    ],
)
def test_is_allocated(fields, allocated):
    device = msgspec.convert({"sn": "a"} | fields, PvsDevice)
    assert is_allocated(device) is allocated


@pytest.mark.parametrize(
    ("found", "page_no", "page_size", "total", "next_page"),
    [
        (10, 1, 10, 25, 2),
        (5, 3, 10, 25, None),
        (10, 2, 10, 20, None),
        (10, 1, 10, None, 2),
        (9, 1, 10, None, None),
        (0, 4, 10, 25, None),  # beyond the end, or an answer that contradicts itself
        (0, 1, 10, None, None),
    ],
)
def test_next_page(found, page_no, page_size, total, next_page):
    devices = [PvsDevice(sn=f"s{i}") for i in range(found)]
    page = DevicePage(devices=devices, page_no=page_no, page_size=page_size, total_size=total)
    assert page.next_page == next_page


def test_device_page_prefers_what_dps_said():
    devices = [PvsDevice(sn="a")]
    said = Pagination(page_no=2, page_size=5, total_size=6)
    page = device_page(devices, said, page_no=1, page_size=10, request_id="r")
    assert (page.page_no, page.page_size, page.total_size, page.request_id) == (2, 5, 6, "r")
    assert page.next_page is None
    page = device_page(devices, None, page_no=3, page_size=1)
    assert (page.page_no, page.page_size, page.total_size, page.next_page) == (3, 1, None, 4)
    nonsense = Pagination(page_no=1, page_size=0, total_size=5)
    page = device_page(devices, nonsense, page_no=1, page_size=10)
    assert (page.page_no, page.page_size, page.total_size, page.next_page) == (1, 10, None, None)
