"""smg.parsers.select: which parsers a gRPC request gets (label > flag > model patterns)."""

from __future__ import annotations

from smg.grpc.types import GrpcModelInfo
from smg.parsers.select import ParserSelector, choose, entry_names
from smg.shm.directory import DirectoryEntry
from smg.workers_spec import WorkerSpec


def _entry(
    row: int = 0,
    labels: dict[str, str] | None = None,
    served: str = "",
    path: str = "",
    models: tuple[str, ...] = (),
) -> DirectoryEntry:
    spec = WorkerSpec(url="grpc://127.0.0.1:1", labels=labels or {})
    grpc = GrpcModelInfo(backend="vllm", served_model_name=served, model_path=path)
    return DirectoryEntry(row, 1, f"w{row}", spec.url, None, models, None, "vllm", None, spec, grpc)


def test_model_patterns_when_nothing_is_named() -> None:
    assert choose(["Qwen/Qwen3-8B"], {}, None, None) == ("qwen", "qwen3")
    assert choose(["Qwen/Qwen3-Coder-30B-A3B"], {}, None, None) == ("qwen_xml", "qwen3")
    assert choose(["deepseek-ai/DeepSeek-V3.1"], {}, None, None) == ("deepseek31", "deepseek_v31")
    assert choose(["moonshotai/Kimi-K2-Instruct"], {}, None, None) == ("kimik2", "kimi")
    assert choose(["my-model"], {}, None, None) == (None, None)
    assert choose([], {}, None, None) == (None, None)


def test_first_name_matching_each_kind_wins() -> None:
    # The request's model names no family; the served name does.
    assert choose(["mine", "", "meta-llama/Llama-3.2-3B"], {}, None, None) == ("llama", None)
    # Tool from the first name, reasoning from a later one.
    assert choose(["mistral-large", "qwen3-8b"], {}, None, None) == ("mistral", "qwen3")


def test_flag_beats_model_and_label_beats_flag() -> None:
    assert choose(["Qwen/Qwen3-8B"], {}, "json", "deepseek_r1") == ("json", "deepseek_r1")
    labels = {"tool_call_parser": "mistral", "reasoning_parser": "kimi"}
    assert choose(["Qwen/Qwen3-8B"], labels, "json", "deepseek_r1") == ("mistral", "kimi")
    # A label for one kind leaves the other to the flag / the model.
    assert choose(["Qwen/Qwen3-8B"], {"tool_call_parser": "llama"}, None, None) == (
        "llama",
        "qwen3",
    )


def test_unknown_names_fall_through() -> None:
    labels = {"tool_call_parser": "nope", "reasoning_parser": ""}
    assert choose(["Qwen/Qwen3-8B"], labels, None, None) == ("qwen", "qwen3")
    assert choose(["Qwen/Qwen3-8B"], labels, "json", None) == ("json", "qwen3")


def test_entry_names_order() -> None:
    entry = _entry(served="served", path="/models/Qwen3-8B", models=("served", "alias"))
    assert entry_names(entry, "asked") == [
        "asked",
        "served",
        "/models/Qwen3-8B",
        "served",
        "alias",
    ]
    assert entry_names(None, None) == []


def test_selector_caches_per_entry_object() -> None:
    selector = ParserSelector("json", None)
    first = _entry(path="/models/Qwen3-8B")
    assert selector.for_entry(first, None) == ("json", "qwen3")
    assert selector.for_entry(first, None) == ("json", "qwen3")
    assert selector.for_entry(first, "deepseek-r1") == ("json", "deepseek_r1")
    # A republished entry (labels patched) is a new object: resolved again.
    patched = _entry(labels={"tool_call_parser": "pythonic"}, path="/models/Qwen3-8B")
    assert selector.for_entry(patched, None) == ("pythonic", "qwen3")
    assert selector.for_entry(None, "kimi-k2") == ("json", "kimi")
