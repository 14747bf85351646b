"""Wrap a core wasm module (text) into an smg:gateway component (text) that wasmtime compiles directly.

The wrapper is what `wasm-tools component embed smg/wasm/smg.wit --world smg` + `wasm-tools component new`
(1.262) produce, printed once: the types instance import, the canonical lifts and the two interface exports. The
core module follows the canonical ABI names wit-component expects: it exports `memory`, `cabi_realloc`,
`smg:gateway/middleware-on-request#on-request` (13 flat params: 6 (ptr, len) pairs and an i64; returns a pointer
to the action) and `smg:gateway/middleware-on-response#on-response` (status, headers ptr/len, body ptr/len).
Action layout at the returned pointer: u8 case at +0 (0 continue, 1 reject, 2 modify); reject's u16 at +4;
modify: status option tag +4 / value +6, headers-set +8/+12, headers-add +16/+20, headers-remove +24/+28,
body-replace option tag +32, ptr +36, len +40. A header is 16 bytes (name ptr, len, value ptr, len).
Used by the tests and the WAT examples; a real guest (Rust, componentize-py) is built by its own toolchain.
"""

# The shim component and instance wit-component writes for each interface export: the same
# text but for the interface (`kind`), the function's parameter name and the record it takes.
_SHIM = """  (component $smg:gateway/middleware-on-{kind}-shim-component
    (type (record (field "name" string) (field "value" string)))
    (import "import-type-header" (type (eq 0)))
    (type (list 1))
    (type (list u8))
    {record}
    (import "import-type-{kind}" (type (eq 4)))
    (type (option u16))
    (type (list string))
    (type (option 3))
    (type (record (field "status" 6) (field "headers-set" 2) (field "headers-add" 2) (field "headers-remove" 7) (field "body-replace" 8)))
    (import "import-type-modify-action" (type (eq 9)))
    (type (variant (case "continue") (case "reject" u16) (case "modify" 10)))
    (import "import-type-action" (type (eq 11)))
    (import "import-type-{kind}0" (type (eq 5)))
    (import "import-type-action0" (type (eq 12)))
    (type (func (param "{param}" 13) (result 14)))
    (import "import-func-on-{kind}" (func (type 15)))
    (export "{kind}" (type 5))
    (export "action" (type 12))
    (type (func (param "{param}" 16) (result 17)))
    (export "on-{kind}" (func 0) (func (type 18)))
  )
  (instance $smg:gateway/middleware-on-{kind}-shim-instance (instantiate $smg:gateway/middleware-on-{kind}-shim-component
      (with "import-func-on-{kind}" (func $on-{kind}))
      (with "import-type-header" (type $header))
      (with "import-type-{kind}" (type ${kind}))
      (with "import-type-modify-action" (type $modify-action))
      (with "import-type-action" (type $action))
      (with "import-type-{kind}0" (type ${kind}))
      (with "import-type-action0" (type $action))
    )
  )
  (export $smg:gateway/middleware-on-{kind} "smg:gateway/middleware-on-{kind}" (instance $smg:gateway/middleware-on-{kind}-shim-instance))
"""
_REQUEST_RECORD = '(type (record (field "method" string) (field "path" string) (field "query" string) (field "headers" 2) (field "body" 3) (field "request-id" string) (field "now-epoch-ms" u64)))'
_RESPONSE_RECORD = '(type (record (field "status" u16) (field "headers" 2) (field "body" 3)))'


def _shim(kind: str, param: str, record: str) -> str:
    return _SHIM.replace("{kind}", kind).replace("{param}", param).replace("{record}", record)


_OUTER = """(component
  (type $ty-smg:gateway/middleware-types
    (instance
      (type (record (field "name" string) (field "value" string)))
      (export "header" (type (eq 0)))
      (type (list 1))
      (type (list u8))
      (type (record (field "method" string) (field "path" string) (field "query" string) (field "headers" 2) (field "body" 3) (field "request-id" string) (field "now-epoch-ms" u64)))
      (export "request" (type (eq 4)))
      (type (option u16))
      (type (list string))
      (type (option 3))
      (type (record (field "status" 6) (field "headers-set" 2) (field "headers-add" 2) (field "headers-remove" 7) (field "body-replace" 8)))
      (export "modify-action" (type (eq 9)))
      (type (variant (case "continue") (case "reject" u16) (case "modify" 10)))
      (export "action" (type (eq 11)))
      (type (record (field "status" u16) (field "headers" 2) (field "body" 3)))
      (export "response" (type (eq 13)))
    )
  )
  (import "smg:gateway/middleware-types" (instance $smg:gateway/middleware-types (type $ty-smg:gateway/middleware-types)))
  (core module $main
{core}
  )
  (alias export $smg:gateway/middleware-types "request" (type $request))
  (alias export $smg:gateway/middleware-types "action" (type $action))
  (alias export $smg:gateway/middleware-types "response" (type $response))
  (core instance $main (instantiate $main))
  (alias core export $main "memory" (core memory $memory))
  (type (func (param "req" $request) (result $action)))
  (alias core export $main "smg:gateway/middleware-on-request#on-request" (core func $smg:gateway/middleware-on-request#on-request))
  (alias core export $main "cabi_realloc" (core func $cabi_realloc))
  (func $on-request (type 4) (canon lift (core func $smg:gateway/middleware-on-request#on-request) (memory $memory) (realloc $cabi_realloc) string-encoding=utf8))
  (alias export $smg:gateway/middleware-types "header" (type $header))
  (alias export $smg:gateway/middleware-types "modify-action" (type $modify-action))
{request_shim}
  (type (func (param "resp" $response) (result $action)))
  (alias core export $main "smg:gateway/middleware-on-response#on-response" (core func $smg:gateway/middleware-on-response#on-response))
  (func $on-response (type 7) (canon lift (core func $smg:gateway/middleware-on-response#on-response) (memory $memory) (realloc $cabi_realloc) string-encoding=utf8))
{response_shim}
)
"""
_TEMPLATE = _OUTER.replace("{request_shim}\n", _shim("request", "req", _REQUEST_RECORD)).replace(
    "{response_shim}\n", _shim("response", "resp", _RESPONSE_RECORD)
)


def component_wat(core_module_fields: str) -> str:
    """The component text for a core module given as its fields (what goes inside `(module ...)`)."""
    return _TEMPLATE.replace("{core}", core_module_fields)
