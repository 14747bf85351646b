"""The Responses API's history (/v1/responses) for HTTP and external workers, on the history
store, as the Rust SMG 1.13's OpenAI router keeps it.

Pure parts (tested directly): the input as items, the upstream body built from a stored
chain (earlier turns' input + output items, then the new input; without
`previous_response_id` / `conversation`, so a worker that keeps no history still sees the
whole conversation; `instructions` are never carried over, OpenAI's rule), the record made
from an answer, the SSE scan for `response.completed`, and the GET/DELETE/input_items answers.
`Observer` is a pass-through `Translation` the Exchange feeds the worker's answer through;
it hands the finished answer to a callback, which starts the store write, and the answer's
last bytes wait for that write (`Observer.settle`): a client that reads the record, or
sends its next turn, the moment it has the answer finds it stored.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

from smg.dataplane.conversations import ConvError, bad_request, not_found, parse_list_query
from smg.history.records import ResponseRecord
from smg.history.store import random_hex
from smg.httpwire import invalid_url
from smg.translate.common import loads_object

if TYPE_CHECKING:
    from smg.history.store import HistoryStore

ROUTE = "/v1/responses"
PREFIX = ROUTE + "/"
MAX_CHAIN = 100  # responses followed back through previous_response_id
MAX_CONVERSATION_PAGES = 10  # of 100 items: the conversation's history sent upstream
MAX_EVENT_BYTES = 1 << 24  # a stream event held back until its end at most this long
ALLOW = {"response": "GET,HEAD,DELETE", "input_items": "GET,HEAD"}
DISABLED = (
    "previous_response_id and conversation need a history store: this gateway runs with "
    "--history-backend none"
)


def not_found_text(response_id: str) -> str:
    return f"No response found with id '{response_id}'"  # 1.13's words


# A stored turn whose record could not be written: 503 storage_unavailable with these words
# (the 1.13 binary answers so, with its backend's error after the colon).
STORE_FAILED = "The response was not stored: the history store is unavailable"

METRIC_PATHS = {"response": PREFIX + "{id}", "input_items": PREFIX + "{id}/input_items"}


# --- routes -----------------------------------------------------------------------------------


def match_route(path: str) -> tuple[str, str] | None:
    """(route, response id) for /v1/responses/{id}[/input_items]; None for any other path."""
    if not path.startswith(PREFIX):
        return None
    parts = path[len(PREFIX) :].split("/")
    if not parts[0] or len(parts) > 2:
        return None
    if len(parts) == 2:
        return ("input_items", unquote(parts[0])) if parts[1] == "input_items" else None
    return "response", unquote(parts[0])


# --- the request ------------------------------------------------------------------------------


def input_items(value: object) -> list[dict[str, Any]]:
    """A request's `input` as items, each with an id: a string is one user message."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or a list of items")
    items: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict):
            raise bad_request("each input item must be an object")
        shaped = dict(item)
        if "type" not in shaped and "role" in shaped:
            shaped["type"] = "message"
        if shaped.get("type") == "message" and isinstance(shaped.get("content"), str):
            role = shaped.get("role")
            kind = "output_text" if role == "assistant" else "input_text"
            part: dict[str, Any] = {"type": kind, "text": shaped["content"]}
            if kind == "output_text":
                part["annotations"] = []
            shaped["content"] = [part]
        shaped["id"] = input_item_id(shaped)
        if shaped.get("status") is None:
            shaped["status"] = "completed"  # as 1.13 stores (and sends) them
        items.append(shaped)
    return items


# The prefix of a new input item id, as 1.13's extract_input_items (persistence_utils.rs)
# makes them: not the Conversations API's (make_item_id), which has its own per type.
_INPUT_PREFIXES = {"function_call": "fc", "function_call_output": "fc", "message": "msg"}


def input_item_id(item: dict[str, Any]) -> str:
    """The item's own non-empty id, else a new one: fc_ / msg_ / item_ + 50 hex."""
    given = item.get("id")
    if isinstance(given, str) and given:
        return given
    return f"{_INPUT_PREFIXES.get(str(item.get('type')), 'item')}_{random_hex()}"


def conversation_id(body: dict[str, Any]) -> str | None:
    """`conversation` as an id string or {id}; None when not given."""
    value = body.get("conversation")
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise bad_request("'conversation' must be a conversation id or an object with its id")
    return value


MUTUALLY_EXCLUSIVE = (
    "__all__: Mutually exclusive parameters. Ensure you are only providing one of: "
    "'previous_response_id' or 'conversation'."
)


def history_fields(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """previous_response_id and conversation; both given -> 400, in 1.13's words."""
    previous = previous_id(body)
    conversation = conversation_id(body)
    if previous is not None and conversation is not None:
        raise ConvError(400, "mutually_exclusive_parameters", MUTUALLY_EXCLUSIVE)
    return previous, conversation


def previous_id(body: dict[str, Any]) -> str | None:
    value = body.get("previous_response_id")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise bad_request("'previous_response_id' must be a non-empty string")
    return value


def chain_items(chain: list[ResponseRecord]) -> list[dict[str, Any]]:
    """The earlier turns, oldest first: each one's input items, then its output items."""
    items: list[dict[str, Any]] = []
    for record in chain:
        items.extend(record.input_items)
        items.extend(record.output_items)
    return items


def upstream_body(
    body: dict[str, Any], history: list[dict[str, Any]], new_input: list[dict[str, Any]]
) -> dict[str, Any]:
    """The body the worker gets: the history then the new input (items as stored, ids and
    all), no history fields, and `store: false` (the gateway keeps the history), as 1.13."""
    out = {k: v for k, v in body.items() if k not in ("previous_response_id", "conversation")}
    out["input"] = history + new_input
    out["store"] = False
    return out


def record_of(
    answer: dict[str, Any],
    new_input: list[dict[str, Any]],
    previous: str | None,
    conversation: str | None,
) -> ResponseRecord | None:
    """The record of a finished answer (None: it has no id), with the history fields the
    worker never saw put back into its body."""
    response_id = answer.get("id")
    if not isinstance(response_id, str) or not response_id:
        return None
    body = dict(answer)
    body["previous_response_id"] = previous
    body["store"] = True  # the worker was sent store=false; a record exists only with true
    if conversation is not None:
        body["conversation"] = {"id": conversation}
    output = answer.get("output")
    created = answer.get("created_at")
    return ResponseRecord(
        id=response_id,
        created_at=int(created) if isinstance(created, (int, float)) else int(time.time()),
        model=str(answer.get("model") or ""),
        previous_response_id=previous,
        conversation_id=conversation,
        input_items=new_input,
        output_items=[i for i in output if isinstance(i, dict)] if isinstance(output, list) else [],
        body=body,
    )


# --- the answer, observed ---------------------------------------------------------------------


def _missing(value: object) -> bool:
    return value is None or value == ""


def patch_answer(
    answer: dict[str, Any],
    request: dict[str, Any],
    previous: str | None,
    conversation: str | None,
    store: bool,
) -> dict[str, Any]:
    """A finished response as the client gets it and as it is stored: the worker was sent
    no history fields and store=false, so 1.13's patch_response_with_request_metadata puts
    the request's back: previous_response_id, instructions, metadata, model (each only where
    the answer has none), store (always), safety_identifier from `user` (where the answer
    has it null), conversation (always, as {id})."""
    out = dict(answer)
    if previous is not None and _missing(out.get("previous_response_id")):
        out["previous_response_id"] = previous
    instructions = request.get("instructions")
    if isinstance(instructions, str) and _missing(out.get("instructions")):
        out["instructions"] = instructions
    metadata = request.get("metadata")
    if isinstance(metadata, dict) and _missing(out.get("metadata")):
        out["metadata"] = metadata
    out["store"] = store
    model = request.get("model")
    if isinstance(model, str) and _missing(out.get("model")):
        out["model"] = model
    user = request.get("user")
    if isinstance(user, str) and "safety_identifier" in out and out["safety_identifier"] is None:
        out["safety_identifier"] = user
    if conversation is not None:
        out["conversation"] = {"id": conversation}
    return out


def patch_event(
    event: dict[str, Any], previous: str | None, conversation: str | None, store: bool
) -> bool:
    """A stream's response.created / in_progress / completed event, in place, as 1.13's
    rewrite_streaming_block: store, previous_response_id (where missing), conversation.
    False: not one of those events."""
    if event.get("type") not in _RESPONSE_EVENTS:
        return False
    response = event.get("response")
    if not isinstance(response, dict):
        return False
    response["store"] = store
    if previous is not None and _missing(response.get("previous_response_id")):
        response["previous_response_id"] = previous
    if conversation is not None:
        response["conversation"] = {"id": conversation}
    return True


_RESPONSE_EVENTS = frozenset({"response.created", "response.in_progress", "response.completed"})
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _event_data(block: bytes) -> dict[str, Any] | None:
    """The JSON object of an SSE event's data lines (joined, as SSE does), else None."""
    lines = [line[5:].strip() for line in block.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        event = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _rebuilt(block: bytes, event: dict[str, Any], end: bytes) -> bytes:
    """`block` with its data lines replaced by one holding `event` (its other lines kept)."""
    kept = [line for line in block.splitlines() if not line.startswith(b"data:")]
    return b"\n".join([*kept, b"data: " + orjson.dumps(event)]) + end


def completed_response(event_data: bytes) -> dict[str, Any] | None:
    """The response of a `response.completed` event's data, else None."""
    try:
        event = orjson.loads(event_data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("type") != "response.completed":
        return None
    response = event.get("response")
    return response if isinstance(response, dict) else None


class Observer:
    """A pass-through Translation: the worker's answer goes to the client (a whole 2xx
    answer, and a stream's response.created / in_progress / completed events, get the
    request's fields back: `patch_answer`, `patch_event`); the finished response goes to
    `done`, which starts its store write and returns it (None: nothing stored).

    The answer's last bytes wait for that write (`settle`), as 1.13 writes the record
    before answering: a whole answer is held by the exchange anyway; a stream is relayed
    event by event up to its `response.completed` event, which is withheld with whatever
    follows and handed out by `finish()`. The write starts only when the stream ended
    whole (1.13 stores nothing from a stream the worker broke): its end is known there."""

    upstream_path = ROUTE.encode()

    def __init__(
        self,
        upstream: bytes,
        stream: bool,
        done: Callable[[dict[str, Any]], asyncio.Future[bool] | None],
        previous: str | None,
        conversation: str | None,
        store: bool = True,
        request: dict[str, Any] | None = None,
    ) -> None:
        self.upstream_body = upstream
        self.store = store
        self.stream = stream
        self.done = done
        self.previous = previous
        self.conversation = conversation
        self.request = request or {}
        # A stream's bytes since the last complete event (not yet relayed), and where the
        # search for its end resumes (a long event split over many reads is searched once).
        self.pending = b""
        self.scanned = 0
        self.given_up = False  # an event past MAX_EVENT_BYTES: relayed as it comes, unwatched
        self.completed: dict[str, Any] | None = None
        self.withheld: list[bytes] | None = None  # from the response.completed event on
        self.write: asyncio.Future[bool] | None = None
        self.seen = False  # the finished response went to `done`

    def response(self, status: int, body: bytes) -> bytes:
        if not 200 <= status < 300:
            return body
        answer = loads_object(body)
        if answer is None:
            return body
        patched = patch_answer(answer, self.request, self.previous, self.conversation, self.store)
        self._done(patched)
        return orjson.dumps(patched)

    def feed(self, data: bytes) -> bytes:
        """Complete events go out at once (a client can use no half event), the response
        ones patched; from response.completed on, everything is withheld."""
        if self.withheld is not None:
            self.withheld.append(data)
            return b""
        if self.given_up:
            return data
        buf = self.pending + data if self.pending else data
        out: list[bytes] = []
        start = 0  # the current event's first byte
        search = self.scanned
        while True:
            found = _EVENT_END.search(buf, search)
            if found is None:
                break
            end = found.end()
            block = buf[start:end]
            if b'"response":' not in block:
                out.append(block)
            else:
                event = _event_data(block)
                if event is None or not patch_event(
                    event, self.previous, self.conversation, self.store
                ):
                    out.append(block)
                elif event.get("type") == "response.completed":
                    self.completed = event["response"]
                    self.withheld = [_rebuilt(block[: found.start() - start], event, b"\n\n")]
                    self.withheld.append(buf[end:])
                    self.pending = b""
                    return b"".join(out)
                else:
                    out.append(_rebuilt(block[: found.start() - start], event, b"\n\n"))
            start = search = end
        self.pending = buf[start:]
        self.scanned = max(0, len(self.pending) - 3)  # an end may straddle the next read
        if len(self.pending) > MAX_EVENT_BYTES:  # no event is that long: stop looking
            self.given_up = True
            out.append(self.pending)
            self.pending = b""
        return b"".join(out)

    def finish(self) -> bytes:
        """The stream ended whole: the store write starts; what was withheld goes out
        (once `settle()`'s write is done)."""
        if self.withheld is None:
            rest, self.pending = self.pending, b""
            return rest
        assert self.completed is not None
        self._done(
            patch_answer(self.completed, self.request, self.previous, self.conversation, True)
        )
        withheld, self.withheld = self.withheld, []
        return b"".join(withheld)

    def settle(self) -> asyncio.Future[bool] | None:
        """After response() or finish() produced the answer's last bytes: the store write
        to wait for before writing them (None: nothing to wait for). The write is bounded
        by the store's op timeout; it ends False when it failed: the 1.13 binary then
        answers a whole response 503 storage_unavailable ("The response was not stored:
        ..."), and a stream goes out whole all the same (its failure only logged)."""
        return self.write

    def abort(self, code: str, message: str) -> bytes:
        """The worker broke the stream: a withheld response.completed is dropped with it
        (nothing was stored: the client never sees a finished response that is not)."""
        self.withheld = None
        body = orjson.dumps({"error": {"message": message, "type": "stream_error", "code": code}})
        return b"data: %b\n\ndata: [DONE]\n\n" % body

    def _done(self, answer: dict[str, Any]) -> None:
        if not self.seen:
            self.seen = True
            self.write = self.done(answer)


# --- the I/O ----------------------------------------------------------------------------------


async def find_response(
    store: HistoryStore, tenant: str, response_id: str
) -> tuple[ResponseRecord | None, str]:
    """The record and the tenant it is stored under (the caller's, or "": a record stored
    without a tenant stays readable by every caller, as conversations.owner)."""
    record = await store.get_response(tenant, response_id)
    if record is None and tenant:
        record = await store.get_response("", response_id)
        tenant = ""
    return record, tenant


async def load_chain(store: HistoryStore, tenant: str, response_id: str) -> list[ResponseRecord]:
    """The chain ending at `response_id`, oldest first; unknown -> 400, as 1.13."""
    chain: list[ResponseRecord] = []
    next_id: str | None = response_id
    while next_id is not None and len(chain) < MAX_CHAIN:
        record, _ = await find_response(store, tenant, next_id)
        if record is None:
            if not chain:
                raise ConvError(
                    400,
                    "previous_response_not_found",
                    f"Previous response with id '{response_id}' not found.",
                )
            break  # an earlier turn deleted: the chain starts after it
        chain.append(record)
        next_id = record.previous_response_id
    chain.reverse()
    return chain


async def conversation_items(
    store: HistoryStore, tenant: str, conv_id: str
) -> tuple[list[dict[str, Any]], str]:
    """The conversation's items, oldest first, and the tenant it is stored under."""
    from smg.dataplane.conversations import owner

    try:
        _conv, tenant = await owner(store, tenant, conv_id)
    except ConvError:
        raise not_found(f"No conversation found with id '{conv_id}'") from None
    items: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(MAX_CONVERSATION_PAGES):
        page = await store.list_items(tenant, conv_id, 100, "asc", after)
        if page is None:
            raise not_found(f"No conversation found with id '{conv_id}'")
        items.extend(item.body for item in page.items)
        if not page.has_more or not page.items:
            break
        after = page.items[-1].id
    return items, tenant


class Expansion:
    """A POST /v1/responses's history: its fields (`plan`, pure) and, when there is something
    to load or store (`active`), the store, the tenants, the earlier items and the new input
    (`expand`). The relayed path (DataPlane._responses_post) and the MCP tool loop
    (smg.dataplane.mcp_responses) both start from it."""

    __slots__ = (
        "active",
        "conv_tenant",
        "conversation",
        "history",
        "keep",
        "new_input",
        "previous",
        "store",
        "tenant",
    )

    def __init__(self, previous: str | None, conversation: str | None, keep: bool, active: bool):
        self.previous = previous
        self.conversation = conversation
        self.keep = keep  # `store`, default true
        self.active = active  # a history backend, and something to load or to store
        self.store: HistoryStore | None = None
        self.tenant = ""
        self.conv_tenant = ""  # the conversation's tenant ("" for one stored without any)
        self.history: list[dict[str, Any]] = []
        self.new_input: list[dict[str, Any]] = []

    def upstream(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body the model gets (upstream_body); an inactive one shapes its input here."""
        new_input = self.new_input if self.active else input_items(body.get("input", []))
        return upstream_body(body, self.history, new_input)

    def record(self, answer: dict[str, Any]) -> ResponseRecord | None:
        """The record to store for a finished answer; None: nothing to store."""
        if self.store is None or not self.keep:
            return None
        return record_of(answer, self.new_input, self.previous, self.conversation)


def plan(body: dict[str, Any], backend_on: bool) -> Expansion:
    """The history fields of a request body (400s: both given, a bad value, or history asked
    of a gateway with --history-backend none)."""
    previous, conversation = history_fields(body)
    keep = body.get("store", True) is not False
    named = previous is not None or conversation is not None
    if named and not backend_on:
        raise ConvError(400, "invalid_request", DISABLED)
    return Expansion(previous, conversation, keep, backend_on and (named or keep))


async def expand(
    body: dict[str, Any],
    backend_on: bool,
    open_store: Callable[[], tuple[HistoryStore, str]],
) -> Expansion:
    """`plan`, then for an active one: the store and tenant (`open_store`), the new input
    as items, and the history it names (the conversation's items, or the chain ending at
    previous_response_id), oldest first."""
    expansion = plan(body, backend_on)
    if not expansion.active:
        return expansion
    store, tenant = open_store()
    expansion.store, expansion.tenant, expansion.conv_tenant = store, tenant, tenant
    expansion.new_input = input_items(body.get("input", []))
    if expansion.conversation is not None:
        items, expansion.conv_tenant = await conversation_items(
            store, tenant, expansion.conversation
        )
        expansion.history.extend(items)
    if expansion.previous is not None:
        chain = await load_chain(store, tenant, expansion.previous)
        expansion.history.extend(chain_items(chain))
    return expansion


async def serve(
    store: HistoryStore, tenant: str, route: str, method: str, response_id: str, query: str
) -> dict[str, Any]:
    """GET/DELETE /v1/responses/{id}, GET .../input_items: the answer's JSON, or ConvError."""
    listing = parse_list_query(query) if route == "input_items" else None
    record, owner_tenant = await find_response(store, tenant, response_id)
    if record is None:
        raise not_found(not_found_text(response_id))
    if route == "response":
        if method == "DELETE":
            if not await store.delete_response(owner_tenant, response_id):
                raise not_found(not_found_text(response_id))
            return {"id": response_id, "object": "response.deleted", "deleted": True}  # 1.13
        return record.body
    assert listing is not None
    limit, order, after = listing
    items = list(record.input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after in ids:
            items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(items) > limit,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
    }


def check_method(route: str, method: str, path: str) -> str:
    if method not in ALLOW[route].split(","):
        raise ConvError(405, "method_not_allowed", invalid_url(method, path), allow=ALLOW[route])
    return "GET" if method == "HEAD" else method
