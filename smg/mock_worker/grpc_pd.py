"""PD (prefill/decode) roles of the gRPC mock engine: `smg mock-worker --grpc --pd-role ...`.

SGLang style (--grpc-backend sglang): the gateway sends the same GenerateRequest to both
legs at once with `disaggregated_params` {bootstrap_host, bootstrap_port, bootstrap_room};
as the HTTP mock (pd.py), a request without them is refused (INVALID_ARGUMENT), a prefill
records its room(s) (room + i for n > 1, as SGLang normalizes) and computes one token,
and a decode streams only once the room is "ready" at bootstrap_host:bootstrap_port
(bootstrap_port 0: the engine's own --bootstrap-port), else fails with INTERNAL.

vLLM style (--grpc-backend vllm, NIXL connector): sequential. The prefill must be tagged
kv_transfer_params_json {"do_remote_decode": true} (what a router sends a NixlConnector
kv_producer; INVALID_ARGUMENT otherwise); its GenerateComplete carries
kv_transfer_params_json {do_remote_prefill: true, do_remote_decode: false,
remote_block_ids, remote_engine_id, remote_host, remote_port (its bootstrap port),
remote_request_id ("kv-..." minted per request), tp_size}. A decode must carry exactly the
params its prefill returned: it asks remote_host:remote_port for remote_request_id and
compares them (INVALID_ARGUMENT without params, INTERNAL when they differ or never came).
GetServerInfo reports kv_connector "NixlConnector" and kv_role kv_producer/kv_consumer so
a router knows to tag the prefill leg.

vLLM with --kv-connector mooncake (push-based, as the Rust SMG drives MooncakeConnector):
GetServerInfo reports "MooncakeConnector" and kv_engine_id; the router mints a
transfer_id. The prefill must be tagged {"do_remote_decode": true, "transfer_id": T}; it
records T and returns no params. The decode must carry {"do_remote_prefill": true,
"transfer_id": T, "remote_engine_id": E, "remote_bootstrap_addr": "http://H:P"}: it asks
H:P for T, which must be ready and served by engine E.

Served by grpc.aio only (--grpc-impl aio is implied): a decode awaits its prefill before
its first message, which the fast server's synchronous ticker cannot.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import grpc

from smg.mock_worker.pd import (
    PREFILL,
    STATS_ROOMS,
    KvTransferError,
    RoomBook,
    await_rooms,
)

CONNECTORS = {"nixl": "NixlConnector", "mooncake": "MooncakeConnector"}
BLOCK_TOKENS = 16  # vLLM's default block size, for remote_block_ids


class PdRefused(Exception):
    """A request a PD engine refuses: end the call with this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class Leg:
    """What one Generate call of a PD engine does besides generating."""

    keys: list[int | str]  # rooms (SGLang) or the transfer id (vLLM) it records or awaits
    targets: list[tuple[str, int, int | str]]  # decode: where each key's prefill is
    expect: dict[str, Any] | None = None  # vLLM decode: the params its prefill returned
    params: dict[str, Any] | None = None  # vLLM prefill: the params it answers with
    engine_id: str | None = None  # Mooncake decode: the prefill engine it names


class GrpcPd:
    """One process's PD role: validation, the room book (prefill), the wait (decode)."""

    def __init__(
        self,
        role: str,
        backend: str,
        host: str,
        bootstrap_port: int,
        wait_s: float,
        connector: str = "nixl",
    ) -> None:
        self.role = role
        self.backend = backend
        self.host = host
        self.default_port = bootstrap_port
        self.wait_s = wait_s
        self.connector = connector
        self.engine_id = f"mock-{uuid.uuid4().hex[:12]}"
        self.book = RoomBook(engine_id=self.engine_id) if role == PREFILL else None
        self.bootstrap_port = 0  # where the prefill's bootstrap server listens (set later)
        self.kv_failures = 0

    @property
    def kv_connector(self) -> str:
        return CONNECTORS[self.connector]

    @property
    def kv_role(self) -> str:
        return "kv_producer" if self.role == PREFILL else "kv_consumer"

    # --- validation (pure) ------------------------------------------------------------------

    def leg(self, msg: Any) -> Leg:
        """The PD part of a GenerateRequest, or PdRefused."""
        if self.backend == "sglang":
            return self._sglang_leg(msg)
        return self._vllm_leg(msg)

    def _sglang_leg(self, msg: Any) -> Leg:
        dp = msg.disaggregated_params
        if not msg.HasField("disaggregated_params") or not dp.bootstrap_host:
            raise PdRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Invalid request: Disaggregated request received without bootstrap room id "
                "(disaggregated_params with bootstrap_host/port/room)",
            )
        n = max(1, msg.sampling_params.n)
        rooms: list[int | str] = [dp.bootstrap_room + i for i in range(n)]
        port = dp.bootstrap_port or self.default_port
        return Leg(rooms, [(dp.bootstrap_host, port, room) for room in rooms])

    def _vllm_leg(self, msg: Any) -> Leg:
        params = _params(msg)
        if self.connector == "mooncake":
            return self._mooncake_leg(params)
        if self.role == PREFILL:
            if params is None or params.get("do_remote_decode") is not True:
                raise PdRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "a PD prefill (NixlConnector kv_producer) needs kv_transfer_params_json "
                    '{"do_remote_decode": true}',
                )
            key = f"kv-{uuid.uuid4().hex}"
            blocks = -(-len(msg.tokenized.input_ids) // BLOCK_TOKENS)
            returned = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": list(range(1, blocks + 1)),
                "remote_engine_id": self.engine_id,
                "remote_host": self.host,
                "remote_port": self.bootstrap_port,
                "remote_request_id": key,
                "tp_size": 1,
            }
            return Leg([key], [], params=returned)
        if (
            params is None
            or params.get("do_remote_prefill") is not True
            or not isinstance(params.get("remote_host"), str)
            or not isinstance(params.get("remote_port"), int)
            or not str(params.get("remote_request_id", "")).startswith("kv-")
        ):
            raise PdRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a PD decode (NixlConnector kv_consumer) needs the kv_transfer_params_json "
                "its prefill returned (do_remote_prefill, remote_host, remote_port, "
                "remote_request_id)",
            )
        key = params["remote_request_id"]
        return Leg([key], [(params["remote_host"], params["remote_port"], key)], expect=params)

    def _mooncake_leg(self, params: dict[str, Any] | None) -> Leg:
        p = params or {}
        transfer = p.get("transfer_id")
        if self.role == PREFILL:
            if p.get("do_remote_decode") is not True or not _transfer_id(transfer):
                raise PdRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "a PD prefill (MooncakeConnector kv_producer) needs kv_transfer_params_json "
                    '{"do_remote_decode": true, "transfer_id": ...}',
                )
            return Leg([transfer], [])
        addr = p.get("remote_bootstrap_addr")
        host, port = _http_addr(addr) if isinstance(addr, str) else ("", 0)
        engine = p.get("remote_engine_id")
        if (
            p.get("do_remote_prefill") is not True
            or not _transfer_id(transfer)
            or not port
            or not isinstance(engine, str)
        ):
            raise PdRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a PD decode (MooncakeConnector kv_consumer) needs kv_transfer_params_json "
                "with do_remote_prefill, transfer_id, remote_engine_id and "
                "remote_bootstrap_addr http://HOST:PORT",
            )
        return Leg([transfer], [(host, port, transfer)], engine_id=engine)

    # --- the call's life --------------------------------------------------------------------

    async def before(self, leg: Leg, now: float) -> None:
        """Prefill: record the room(s). Decode: wait for them (PdRefused INTERNAL if not)."""
        if self.book is not None:
            self.book.start(leg.keys, now)
            return
        try:
            await await_rooms(leg.targets, self.wait_s, leg.expect, leg.engine_id)
        except KvTransferError as e:
            self.kv_failures += 1
            raise PdRefused(grpc.StatusCode.INTERNAL, str(e)) from None

    def decorate(self, leg: Leg, message: Any) -> None:
        """A vLLM prefill's GenerateComplete carries the params a decode needs."""
        if leg.params is not None and message.HasField("complete"):
            message.complete.kv_transfer_params_json = json.dumps(leg.params)

    def after(self, leg: Leg, ok: bool) -> None:
        if self.book is not None:
            self.book.finish(leg.keys, ok, leg.params)

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "role": self.role,
            "engine_id": self.engine_id,
            "bootstrap_port": self.bootstrap_port if self.book is not None else None,
            "rooms": None if self.book is None else self.book.listing(now, STATS_ROOMS),
            "rooms_recorded": None if self.book is None else len(self.book),
            "kv_failures": self.kv_failures,
        }


def _transfer_id(v: Any) -> bool:
    return (
        isinstance(v, str)
        and 0 < len(v) <= 200
        and v.isascii()
        and all(c.isalnum() or c in "._-" for c in v)
    )


def _http_addr(addr: str) -> tuple[str, int]:
    """("H", P) of "http://H:P", ("", 0) when it is not that."""
    rest = addr[len("http://") :] if addr.startswith("http://") else ""
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() and 0 < int(port) < 65536 else ("", 0)


def _params(msg: Any) -> dict[str, Any] | None:
    if not msg.HasField("kv_transfer_params_json"):
        return None
    try:
        value = json.loads(msg.kv_transfer_params_json)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
