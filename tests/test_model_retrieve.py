"""`GET /v1/models/{model}` (the openai client's `models.retrieve`), as the Rust SMG 1.13's
binary answers it (checked side by side, with and without --api-key): the model's object
of the `/v1/models` list, an id with slashes as it is or percent-encoded, 404
`model_not_found` for a model no worker serves, 405 `allow: GET,HEAD` for other methods,
open like `/v1/models`; from every data-plane process of `smg launch --processes 2`."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests import mockutil
from tests.gatewayutil import Gateway, pinned_clients, running_gateway

MODEL = "org/m-1"
KEY = "sek-retrieve"
OBJECT = {"id": MODEL, "object": "model", "created": 0, "owned_by": "self_hosted"}


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with (
        mockutil.start_mock_workers(1, "--model", MODEL) as mocks,
        running_gateway(["--worker-urls", *mocks.urls, "--api-key", KEY]) as gw,
    ):
        gw.wait_ready()
        yield gw


def test_the_openai_client_retrieves_a_model(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    got = client.models.retrieve(MODEL)
    assert (got.id, got.owned_by, got.object) == (MODEL, "self_hosted", "model")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.code == "model_not_found"
    assert missing.value.body["message"] == "No worker available for model 'nope'"


def test_every_process_answers_and_the_route_is_open(gateway: Gateway) -> None:
    with pinned_clients(gateway.url, 1) as pinned:
        for index, (client,) in pinned.items():
            for path in ("/v1/models/org/m-1", "/v1/models/org%2Fm-1", "/v1/models/org/m%2D1"):
                answer = client.get(path)  # no key: open, as /v1/models (1.13 too)
                assert answer.headers["x-smg-process"] == index
                assert (answer.status_code, answer.json()) == (200, OBJECT), path
            head = client.head("/v1/models/org/m-1")
            assert (head.status_code, head.content) == (200, b"")
            for method in ("DELETE", "POST"):
                answer = client.request(method, "/v1/models/org/m-1")
                assert answer.status_code == 405
                assert answer.headers["allow"] == "GET,HEAD"
                assert (
                    answer.json()["error"]["message"]
                    == f"Invalid URL ({method} /v1/models/org/m-1)"
                )
            answer = client.get("/v1/models/")
            assert (answer.status_code, answer.json()["error"]["code"]) == (404, "unknown_url")
