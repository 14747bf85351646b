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

_TEMPLATE = """(component
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
  (component $smg:gateway/middleware-on-request-shim-component
    (type (record (field "name" string) (field "value" string)))
    (import "import-type-header" (type (eq 0)))
    (type (list 1))
    (type (list u8))
    (type (record (field "method" string) (field "path" string) (field "query" string) (field "headers" 2) (field "body" 3) (field "request-id" string) (field "now-epoch-ms" u64)))
    (import "import-type-request" (type (eq 4)))
    (type (option u16))
    (type (list string))
    (type (option 3))
    (type (record (field "status" 6) (field "headers-set" 2) (field "headers-add" 2) (field "headers-remove" 7) (field "body-replace" 8)))
    (import "import-type-modify-action" (type (eq 9)))
    (type (variant (case "continue") (case "reject" u16) (case "modify" 10)))
    (import "import-type-action" (type (eq 11)))
    (import "import-type-request0" (type (eq 5)))
    (import "import-type-action0" (type (eq 12)))
    (type (func (param "req" 13) (result 14)))
    (import "import-func-on-request" (func (type 15)))
    (export "request" (type 5))
    (export "action" (type 12))
    (type (func (param "req" 16) (result 17)))
    (export "on-request" (func 0) (func (type 18)))
  )
  (instance $smg:gateway/middleware-on-request-shim-instance (instantiate $smg:gateway/middleware-on-request-shim-component
      (with "import-func-on-request" (func $on-request))
      (with "import-type-header" (type $header))
      (with "import-type-request" (type $request))
      (with "import-type-modify-action" (type $modify-action))
      (with "import-type-action" (type $action))
      (with "import-type-request0" (type $request))
      (with "import-type-action0" (type $action))
    )
  )
  (export $smg:gateway/middleware-on-request "smg:gateway/middleware-on-request" (instance $smg:gateway/middleware-on-request-shim-instance))
  (type (func (param "resp" $response) (result $action)))
  (alias core export $main "smg:gateway/middleware-on-response#on-response" (core func $smg:gateway/middleware-on-response#on-response))
  (func $on-response (type 7) (canon lift (core func $smg:gateway/middleware-on-response#on-response) (memory $memory) (realloc $cabi_realloc) string-encoding=utf8))
  (component $smg:gateway/middleware-on-response-shim-component
    (type (record (field "name" string) (field "value" string)))
    (import "import-type-header" (type (eq 0)))
    (type (list 1))
    (type (list u8))
    (type (record (field "status" u16) (field "headers" 2) (field "body" 3)))
    (import "import-type-response" (type (eq 4)))
    (type (option u16))
    (type (list string))
    (type (option 3))
    (type (record (field "status" 6) (field "headers-set" 2) (field "headers-add" 2) (field "headers-remove" 7) (field "body-replace" 8)))
    (import "import-type-modify-action" (type (eq 9)))
    (type (variant (case "continue") (case "reject" u16) (case "modify" 10)))
    (import "import-type-action" (type (eq 11)))
    (import "import-type-response0" (type (eq 5)))
    (import "import-type-action0" (type (eq 12)))
    (type (func (param "resp" 13) (result 14)))
    (import "import-func-on-response" (func (type 15)))
    (export "response" (type 5))
    (export "action" (type 12))
    (type (func (param "resp" 16) (result 17)))
    (export "on-response" (func 0) (func (type 18)))
  )
  (instance $smg:gateway/middleware-on-response-shim-instance (instantiate $smg:gateway/middleware-on-response-shim-component
      (with "import-func-on-response" (func $on-response))
      (with "import-type-header" (type $header))
      (with "import-type-response" (type $response))
      (with "import-type-modify-action" (type $modify-action))
      (with "import-type-action" (type $action))
      (with "import-type-response0" (type $response))
      (with "import-type-action0" (type $action))
    )
  )
  (export $smg:gateway/middleware-on-response "smg:gateway/middleware-on-response" (instance $smg:gateway/middleware-on-response-shim-instance))
)
"""


def component_wat(core_module_fields: str) -> str:
    """The component text for a core module given as its fields (what goes inside `(module ...)`)."""
    return _TEMPLATE.replace("{core}", core_module_fields)
