"""py_guard: a Python guest for smg's WASM middleware (built into a component with componentize-py).

OnRequest: a POST with a body must be JSON naming an allowed model (mock-model, gpt-4o): not JSON -> 400, another model -> 403;
otherwise the request goes on with `x-smg-py-guard: checked` set. OnResponse: adds `x-smg-py-guard: seen`.
`wit_world` is the bindings package componentize-py generates from smg/wasm/smg.wit at build time.
"""

import json

from wit_world import exports
from wit_world.imports.middleware_types import (
    Action,
    Action_Modify,
    Action_Reject,
    Header,
    ModifyAction,
    Request,
    Response,
)

ALLOWED_MODELS = {"mock-model", "gpt-4o"}


def _add_header(name: str, value: str, *, set_: bool) -> Action:
    header = [Header(name, value)]
    return Action_Modify(
        ModifyAction(None, header if set_ else [], [] if set_ else header, [], None)
    )


class MiddlewareOnRequest(exports.MiddlewareOnRequest):
    def on_request(self, req: Request) -> Action:
        if req.method == "POST" and req.body:
            try:
                payload = json.loads(req.body)
            except ValueError:
                return Action_Reject(400)
            if not isinstance(payload, dict) or payload.get("model") not in ALLOWED_MODELS:
                return Action_Reject(403)
        return _add_header("x-smg-py-guard", "checked", set_=True)


class MiddlewareOnResponse(exports.MiddlewareOnResponse):
    def on_response(self, resp: Response) -> Action:
        return _add_header("x-smg-py-guard", "seen", set_=False)
