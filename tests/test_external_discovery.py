"""External workers, the pure parts: spec fields and classification, provider resolution,
the discovery key and headers, model-list pages, date-suffix grouping (Rust's own example),
the /workers model cards, the key rule of the fan-out, --backend start-up specs."""

from __future__ import annotations

import pytest

from smg.config import ConfigError
from smg.control import external
from smg.control.external import ModelCard
from smg.workers_spec import (
    SpecError,
    WorkerSpec,
    parse_worker_patch,
    parse_worker_spec,
    validate_worker_spec,
)


def test_runtime_type_spellings_are_rusts() -> None:
    for given, canonical in [
        ("external", "external"),
        ("EXTERNAL", "external"),
        ("SGLang", "sglang"),
        ("vllm", "vllm"),
        ("tensorrt-llm", "trtllm"),
        ("TRTLLM", "trtllm"),
        ("mlx", "mlx"),
        ("tokenspeed", "tokenspeed"),
        ("unspecified", "unspecified"),
    ]:
        body = f'{{"url": "http://h:1", "runtime_type": "{given}"}}'.encode()
        assert parse_worker_spec(body).runtime_type == canonical


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        (b'{"url": "http://h:1", "runtime_type": "bogus"}', "runtime_type", "must be one of"),
        (b'{"url": "http://h:1", "provider": "openai"}', "provider", "external workers only"),
        (
            b'{"url": "http://h:1", "runtime_type": "external", "provider": ""}',
            "provider",
            "visible ASCII",
        ),
        (
            b'{"url": "http://h:1", "runtime_type": "external", "provider": "a b"}',
            "provider",
            "visible ASCII",
        ),
        (
            b'{"url": "http://h:1", "runtime_type": "external", "provider": "' + b"p" * 65 + b'"}',
            "provider",
            "1-64",
        ),
        (b'{"url": "grpc://h:1", "runtime_type": "external"}', "url", "HTTP API"),
    ],
)
def test_external_spec_refusals(body: bytes, key: str, reason: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_worker_spec(body)
    assert isinstance(exc.value, ConfigError)
    assert exc.value.key == key
    assert reason in exc.value.reason


def test_neither_field_is_patchable() -> None:
    for field, value in (("runtime_type", '"external"'), ("provider", '"openai"')):
        with pytest.raises(SpecError) as exc:
            parse_worker_patch(f'{{"{field}": {value}}}'.encode())
        assert exc.value.key == field
        assert "cannot be changed with PATCH" in exc.value.reason


def test_classification() -> None:
    def spec(body: bytes) -> WorkerSpec:
        return parse_worker_spec(body)

    # runtime_type external, or unset with a provider's host (Rust ClassifyWorkerTypeStep).
    assert external.is_external(
        spec(b'{"url": "http://10.0.0.1:8000", "runtime_type": "external"}')
    )
    assert external.is_external(spec(b'{"url": "https://api.openai.com"}'))
    assert external.is_external(spec(b'{"url": "https://api.anthropic.com/"}'))
    assert not external.is_external(spec(b'{"url": "http://10.0.0.1:8000"}'))
    # An explicit engine runtime wins over the host.
    assert not external.is_external(
        spec(b'{"url": "https://api.openai.com", "runtime_type": "vllm"}')
    )
    assert external.is_external(
        spec(b'{"url": "https://api.openai.com", "runtime_type": "unspecified"}')
    )


def test_schemeless_external_url_becomes_https() -> None:
    assert parse_worker_spec(b'{"url": "api.x.ai"}').url == "https://api.x.ai"
    assert (
        parse_worker_spec(b'{"url": "llm.example.com:8443", "runtime_type": "external"}').url
        == "https://llm.example.com:8443"
    )
    with pytest.raises(SpecError):  # not external: a scheme is still required
        parse_worker_spec(b'{"url": "llm.example.com:8443"}')


def test_provider_resolution() -> None:
    def provider(body: bytes) -> str:
        return external.record_provider(parse_worker_spec(body))

    # The spec's (aliases folded), else the model's, else the host's, else host[:port].
    assert provider(b'{"url": "http://h:1", "runtime_type": "external", "provider": "Claude"}') == (
        "anthropic"
    )
    assert provider(b'{"url": "http://h:1", "runtime_type": "external", "provider": "MyCo"}') == (
        "MyCo"
    )
    assert (
        provider(b'{"url": "http://h:1", "runtime_type": "external", "model_id": "grok-3"}')
        == "xai"
    )
    assert provider(b'{"url": "https://api.openai.com"}') == "openai"
    assert (
        provider(b'{"url": "http://LLM.Example.com:9000/v1x", "runtime_type": "external"}')
        == "llm.example.com:9000"
    )
    assert provider(b'{"url": "https://other.example", "runtime_type": "external"}') == (
        "other.example"
    )
    assert provider(b'{"url": "http://[::1]:8000", "runtime_type": "external"}') == "[::1]:8000"
    long_host = b"a" * 60 + b".example"
    assert provider(b'{"url": "http://' + long_host + b':1", "runtime_type": "external"}') == (
        "a" * 60 + ".exa"
    )


def test_discovery_key_order() -> None:
    env = {"OPENAI_ADMIN_KEY": "admin-o", "ANTHROPIC_ADMIN_KEY": ""}
    assert external.discovery_key("openai", "spec-k", env) == "admin-o"
    assert external.discovery_key("anthropic", "spec-k", env) == "spec-k"  # empty env: unset
    assert external.discovery_key("anthropic", None, env) is None
    assert external.discovery_key("llm.example.com", "spec-k", env) == "spec-k"
    assert external.discovery_key("llm.example.com", None, env) is None


def test_needs_discovery() -> None:
    with_key = parse_worker_spec(
        b'{"url": "http://h:1", "runtime_type": "external", "api_key": "k"}'
    )
    no_key = parse_worker_spec(b'{"url": "http://h:1", "runtime_type": "external"}')
    one_model = parse_worker_spec(
        b'{"url": "http://h:1", "runtime_type": "external", "api_key": "k", "model_id": "m"}'
    )
    assert external.needs_discovery(with_key, "h:1", {})
    assert not external.needs_discovery(no_key, "h:1", {})  # wildcard
    assert external.needs_discovery(no_key, "openai", {"OPENAI_ADMIN_KEY": "a"})
    assert not external.needs_discovery(one_model, "h:1", {})


def test_key_headers() -> None:
    assert external.key_headers("anthropic", "sk-ant-1") == {
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant-1",
    }
    assert external.key_headers("anthropic", None) == {"anthropic-version": "2023-06-01"}
    assert external.key_headers("openai", "sk-1") == {"Authorization": "Bearer sk-1"}
    assert external.key_headers("h:1", None) == {}


def test_models_pages() -> None:
    openai = b'{"object":"list","data":[{"id":"gpt-4o","object":"model"},{"id":""},{"x":1}]}'
    assert external.parse_models_page(openai) == ([{"id": "gpt-4o", "object": "model"}], None)
    page = (
        b'{"data":[{"type":"model","id":"claude-a"},{"type":"model","id":"claude-b"}],'
        b'"has_more":true,"first_id":"claude-a","last_id":"claude-b"}'
    )
    models, after = external.parse_models_page(page)
    assert [m["id"] for m in models] == ["claude-a", "claude-b"]
    assert after == "claude-b"
    last = b'{"data":[{"type":"model","id":"claude-c"}],"has_more":false,"last_id":"claude-c"}'
    assert external.parse_models_page(last)[1] is None
    for bad in (b"nope", b"[]", b'{"data": {}}', b'{"object":"list"}'):
        with pytest.raises(external.DiscoveryError):
            external.parse_models_page(bad)


def test_grouping_rusts_example() -> None:
    ids = ["gpt-4o", "gpt-4o-2024-05-13", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20"]
    assert external.group_models(ids) == [
        ModelCard("gpt-4o", ("gpt-4o-2024-05-13", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20"))
    ]


def test_grouping_rules() -> None:
    ids = [
        "claude-3-5-sonnet-20241022",  # no dashes in the date: not a date suffix
        "o1-mini-2024-09",  # -YYYY-MM
        "o1-mini",
        "gpt-4o-2024-05-13",  # no undated id: the shortest (then first by name) is primary
        "gpt-4o-2024-08-06",
        "gpt-4o-2024-05-13",  # duplicate
        "x-1234-56-789",  # three digits: the -YYYY-MM part is not at the end
    ]
    assert external.group_models(ids) == [
        ModelCard("claude-3-5-sonnet-20241022", ()),
        ModelCard("o1-mini", ("o1-mini-2024-09",)),
        ModelCard("gpt-4o-2024-05-13", ("gpt-4o-2024-08-06",)),
        ModelCard("x-1234-56-789", ()),
    ]
    assert external.group_models([]) == []


def test_card_views_as_rust_shows_them() -> None:
    # The same ids the Rust 1.13 binary was given (its answer, cards in our order).
    ids = ["gpt-4o", "gpt-4o-2024-05-13", "gpt-4o-2024-08-06", "o1-mini", "my-model"]
    assert external.card_views(ids) == [
        {
            "id": "gpt-4o",
            "aliases": ["gpt-4o-2024-05-13", "gpt-4o-2024-08-06"],
            "model_type": ["chat", "completions", "responses", "vision", "tools"],
            "provider": "openai",
        },
        {
            "id": "o1-mini",
            "model_type": ["chat", "completions", "responses", "tools", "reasoning"],
            "provider": "openai",
        },
        {"id": "my-model", "model_type": ["chat", "completions", "responses", "tools"]},
    ]
    assert external.model_type("text-embedding-3-small") == ["embeddings"]
    assert external.model_type("dall-e-3") == ["image_gen"]
    assert external.model_type("whisper-1") == ["audio"]
    assert external.model_type("omni-moderation-latest") == ["moderation"]
    assert external.card_provider("claude-3-haiku") == "anthropic"
    assert external.card_provider("grok-2") == "xai"
    assert external.card_provider("gemini-2.0") == "gemini"
    assert external.card_provider("llama") is None


def test_key_may_go() -> None:
    both = ["openai", "anthropic"]
    assert external.key_may_go("sk-ant-x", "anthropic", both)
    assert not external.key_may_go("sk-ant-x", "openai", both)
    assert external.key_may_go("sk-proj-x", "openai", both)
    # Unattributed: only where exactly one external provider is registered.
    assert not external.key_may_go("sk-x", "openai", both)
    assert external.key_may_go("sk-x", "openai", ["openai"])
    assert not external.key_may_go("sk-x", "openai", [])


def test_merge_models_and_digest() -> None:
    assert external.merge_models(("a", "b"), ["b", "c"]) == ["a", "b", "c"]
    assert external.key_digest("k") != external.key_digest("j")
    assert external.key_digest(None) == external.key_digest("")
    assert b"kkkkkkkk" not in external.key_digest("kkkkkkkk")


def test_startup_spec_under_backend() -> None:
    plain = validate_worker_spec(WorkerSpec(url="http://10.0.0.1:8000"))
    assert external.startup_spec(plain, "sglang") is plain
    made = external.startup_spec(plain, "openai")
    assert (made.runtime_type, made.provider) == ("external", "openai")
    assert external.record_provider(made) == "openai"
    made = external.startup_spec(plain, "anthropic")
    assert (made.runtime_type, made.provider) == ("external", "anthropic")
    # The URL's host names the provider before the backend does.
    xai = validate_worker_spec(WorkerSpec(url="https://api.x.ai"))
    assert external.startup_spec(xai, "openai").provider == "xai"
    grpc = validate_worker_spec(WorkerSpec(url="grpc://h:1"))
    assert external.startup_spec(grpc, "openai") is grpc
