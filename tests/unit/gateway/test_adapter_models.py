"""Models "BASE:ADAPTER" at the gateway: listed once the swarm covers them, answered with the
adapter's weights, and refused with model_not_found when no server holds the adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient
from tests.reference import greedy_ids, tokenizer

MODEL_ID = "tiny"
PROMPT = [1, 400, 401, 402, 403]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def client(tiny_model: Path, tiny_adapter: Path) -> Iterator[TestClient]:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID, adapters=[tiny_adapter])
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, swarm)) as c:
        yield c


def complete(client: TestClient, model: str) -> dict[str, object]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


def expected_text(model: Path, adapter: Path | None) -> str:
    return tokenizer(model).decode(greedy_ids(model, PROMPT, NEW_TOKENS, adapter))


def test_the_models_list_shows_the_base_and_each_covered_adapter(client: TestClient) -> None:
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids == [MODEL_ID, f"{MODEL_ID}:pirate"]
    assert client.get(f"/v1/models/{MODEL_ID}:pirate").status_code == 200


def test_an_adapter_request_answers_as_peft_and_the_base_as_before(
    client: TestClient, tiny_model: Path, tiny_adapter: Path
) -> None:
    pirate = complete(client, f"{MODEL_ID}:pirate")
    base = complete(client, MODEL_ID)
    assert pirate["model"] == f"{MODEL_ID}:pirate" and base["model"] == MODEL_ID
    pirate_text = pirate["choices"][0]["text"]  # type: ignore[index]
    base_text = base["choices"][0]["text"]  # type: ignore[index]
    assert pirate_text == expected_text(tiny_model, tiny_adapter)
    assert base_text == expected_text(tiny_model, None)
    assert pirate_text != base_text


@pytest.mark.parametrize("model", [f"{MODEL_ID}:parrot", "other:pirate", f"{MODEL_ID}:"])
def test_an_adapter_no_server_holds_is_model_not_found(client: TestClient, model: str) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert f"{MODEL_ID}:pirate" in error["message"]  # it says what is served


def test_without_servers_holding_it_an_adapter_is_not_listed(tiny_model: Path) -> None:
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, LocalSwarmClient(tiny_model, MODEL_ID))) as c:
        assert [card["id"] for card in c.get("/v1/models").json()["data"]] == [MODEL_ID]
        body = {"model": f"{MODEL_ID}:pirate", "prompt": "hi", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 404
