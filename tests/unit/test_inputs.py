"""Request parsing for /v1/predict and /v1/predict/batch, without Ray."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from visionfleet.client import prepare
from serve_apps.inputs import ApiError, model_ref_from, parse_batch, parse_predict, read_body, request_id_from

PNG = b"\x89PNG\r\n\x1a\n fake but the parser does not decode"


def run(coro):
    return asyncio.run(coro)


def test_raw_json_multipart_give_the_same_image() -> None:
    for style in ("raw", "json", "multipart"):
        req = prepare(PNG, "image/png", style)
        inp = run(parse_predict(req.headers["Content-Type"], req.body))
        assert inp.images == [PNG], style


def test_json_options_and_data_url() -> None:
    body = json.dumps({"image": "data:image/png;base64," + base64.b64encode(PNG).decode(), "model": "demo", "version": 2, "top_k": 3})
    inp = run(parse_predict("application/json", body.encode()))
    assert inp.images == [PNG] and inp.model == "demo" and inp.version == "2" and inp.top_k == 3


@pytest.mark.parametrize(
    "ctype,body,status",
    [
        ("image/png", b"", 400),
        ("text/plain", b"hello", 415),
        (None, b"hello", 415),
        ("application/json", b"{not json", 400),
        ("application/json", b"[1, 2]", 400),
        ("application/json", b'{"img": "x"}', 400),
        ("application/json", b'{"image": "***"}', 400),
        ("application/json", b'{"image": 5}', 400),
        ("application/json", b'{"image": "aGk=", "top_k": -1}', 400),
        ("application/json", b'{"image": "aGk=", "model": ["x"]}', 400),
        ("multipart/form-data; boundary=zz", b"--zz\r\nbroken", 400),
        ("multipart/form-data", b"no boundary at all", 400),
    ],
)
def test_bad_bodies(ctype: str | None, body: bytes, status: int) -> None:
    with pytest.raises(ApiError) as exc:
        run(parse_predict(ctype, body))
    assert exc.value.status == status


def test_multipart_without_file_field() -> None:
    b = "--zz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndemo\r\n--zz--\r\n".encode()
    with pytest.raises(ApiError) as exc:
        run(parse_predict("multipart/form-data; boundary=zz", b))
    assert exc.value.status == 400


def test_batch_parsing_and_limits() -> None:
    body = json.dumps({"images": [base64.b64encode(PNG).decode()] * 3}).encode()
    assert len(run(parse_batch("application/json", body, max_items=3)).images) == 3
    with pytest.raises(ApiError) as exc:
        run(parse_batch("application/json", body, max_items=2))
    assert exc.value.status == 413
    with pytest.raises(ApiError) as exc:
        run(parse_batch("image/png", PNG, max_items=2))
    assert exc.value.status == 415
    with pytest.raises(ApiError) as exc:
        run(parse_batch("application/json", b'{"images": []}', max_items=2))
    assert exc.value.status == 400


def test_read_body_limits() -> None:
    async def stream(chunks):
        for c in chunks:
            yield c

    assert run(read_body(stream([b"ab", b"cd"]), None, 10)) == b"abcd"
    with pytest.raises(ApiError) as exc:
        run(read_body(stream([b"x" * 6, b"x" * 6]), None, 10))
    assert exc.value.status == 413
    with pytest.raises(ApiError) as exc:  # refused from the header, before reading
        run(read_body(stream([]), "100", 10))
    assert exc.value.status == 413
    with pytest.raises(ApiError) as exc:
        run(read_body(stream([]), "abc", 10))
    assert exc.value.status == 400


def test_model_ref_from() -> None:
    assert model_ref_from(None, None, "demo") == "demo"
    assert model_ref_from("m", "3", "demo") == "m:3"
    assert model_ref_from("m", "candidate", "demo") == "m@candidate"
    assert model_ref_from(None, "2", "demo") == "demo:2"
    assert model_ref_from("m:2", None, "demo") == "m:2"
    with pytest.raises(ApiError):
        model_ref_from("m:2", "3", "demo")


def test_request_id() -> None:
    assert request_id_from(None, "fallback") == "fallback"
    assert request_id_from("abc-1", "f") == "abc-1"
    with pytest.raises(ApiError):
        request_id_from("bad id with spaces", "f")


def test_absurdly_nested_json_is_a_400_not_a_crash() -> None:
    from serve_apps.v2 import parse_infer_request

    deep = b"[" * 100_000 + b"]" * 100_000
    for parse in (lambda: run(parse_predict("application/json", deep)), lambda: run(parse_batch("application/json", deep, 4))):
        with pytest.raises(ApiError) as exc:
            parse()
        assert exc.value.status == 400
    with pytest.raises(ApiError) as exc:
        parse_infer_request(deep, None)
    assert exc.value.status == 400
