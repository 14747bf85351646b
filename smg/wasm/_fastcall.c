/* One WASM module call in one C call: lower the argument, a fresh store, instantiate, call, and
 * (for the common `continue`) lift, without a Python frame or ctypes call in between.
 *
 * Why C: through ctypes the same sequence costs a dozen foreign calls (each one converting and
 * checking its arguments, releasing and taking the GIL) and a Python-side packing of the argument
 * (~20 us of a ~70 us call on the shared 2-core box, README "WASM plugins"). Semantics are the
 * ctypes path's (smg.wasm.runtime.ModuleRunner._call), step for step: a NEW store per call (the
 * pooling allocator gives the instance a slot whose memory was reset to the module's image), the
 * epoch deadline set on it, WASI p2 with an empty context when the component imports WASI, the
 * store deleted before returning. The GIL is released while wasm runs, so the epoch ticker thread
 * (smg.wasm.runtime.EngineOwner) can interrupt a module that loops.
 *
 * No wasmtime headers ship with wasmtime-py: the dozen C API functions are called through the
 * addresses ctypes resolved (setup()), with the prototypes below, and the value layout is the one
 * smg/wasm/capi.py packs (checked there against wasmtime-py's ctypes structures at import):
 * val = {u8 kind; 7 pad; union at +8} = 32 bytes; a string, list or record is {size_t size; T *data}
 * in the union; a variant {name size, name data, val *payload}; a record entry {name size, name
 * data, val} = 48 bytes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t kind;
    uint8_t pad[7];
    uint64_t a, b, c;
} val_t;

typedef struct {
    uint64_t name_size;
    const char *name_data;
    val_t val;
} entry_t;

_Static_assert(sizeof(val_t) == 32, "val layout");
_Static_assert(sizeof(entry_t) == 48, "record entry layout");

typedef void *(*store_new_t)(void *, void *, void *);
typedef void *(*store_context_t)(void *);
typedef void (*store_delete_t)(void *);
typedef void (*set_deadline_t)(void *, uint64_t);
typedef void *(*instantiate_t)(void *, void *, void *, void *);
typedef bool (*get_func_t)(void *, void *, void *, void *);
typedef void *(*func_call_t)(void *, void *, const void *, size_t, void *, size_t);
typedef void (*val_delete_t)(void *);
typedef void *(*wasi_config_new_t)(void);
typedef void *(*set_wasi_t)(void *, void *);

static store_new_t store_new;
static store_context_t store_context;
static store_delete_t store_delete;
static set_deadline_t set_deadline;
static instantiate_t instantiate;
static get_func_t get_func;
static func_call_t func_call;
static val_delete_t val_delete;
static wasi_config_new_t wasi_config_new;
static set_wasi_t set_wasi;
static uint8_t K_U8, K_U16, K_U64, K_STRING, K_LIST, K_RECORD, K_VARIANT;
static bool ready;

/* Outcome codes of call(), besides None (the module answered `continue`). */
enum { R_LIFT = 1, R_NO_FUNC = 2, R_ERROR = 3 };

typedef struct {
    const char *name;
    uint64_t size;
} name_t;

#define NAME(s) {s, sizeof(s) - 1}
static const name_t REQUEST_FIELDS[7] = {NAME("method"),  NAME("path"), NAME("query"),
                                         NAME("headers"), NAME("body"), NAME("request-id"),
                                         NAME("now-epoch-ms")};
static const name_t RESPONSE_FIELDS[3] = {NAME("status"), NAME("headers"), NAME("body")};
static const name_t HEADER_NAME = NAME("name");
static const name_t HEADER_VALUE = NAME("value");

/* A str's UTF-8 (lone surrogates as "?", as str.encode("utf-8", "replace")); *hold keeps a
 * re-encoded copy alive. */
static const char *utf8(PyObject *s, Py_ssize_t *n, PyObject **hold) {
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "expected str");
        return NULL;
    }
    const char *p = PyUnicode_AsUTF8AndSize(s, n);
    if (p != NULL)
        return p;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        return NULL;
    PyErr_Clear();
    *hold = PyUnicode_AsEncodedString(s, "utf-8", "replace");
    if (*hold == NULL)
        return NULL;
    *n = PyBytes_GET_SIZE(*hold);
    return PyBytes_AS_STRING(*hold);
}

/* The argument, built in one malloc'd block: [record val][entries][header vals][header entries]
 * [body vals][strings]. Every string is copied in, so nothing points into a Python object once
 * the GIL is released. */
typedef struct {
    char *block;
    size_t cap;    /* the block's size */
    char *strings; /* the next free string byte */
} arg_t;

/* One block kept between calls (a typical request's fits), so a call does not malloc and free a
 * few KiB each time: taken and given back with the GIL held, so a call on another thread (while
 * this one runs wasm with the GIL released) finds none and allocates its own. Only the host's
 * staging copy: the module sees what the C API copies into its fresh instance. */
#define SPARE_MIN ((size_t)16 * 1024)
#define SPARE_MAX ((size_t)256 * 1024)
static char *spare;
static size_t spare_cap;

static char *take_block(size_t need, size_t *cap) {
    if (spare != NULL && spare_cap >= need) {
        char *block = spare;
        *cap = spare_cap;
        spare = NULL;
        return block;
    }
    *cap = need < SPARE_MIN ? SPARE_MIN : need;
    return PyMem_Malloc(*cap);
}

static void give_block(arg_t *arg) {
    if (arg->cap <= SPARE_MAX && (spare == NULL || spare_cap < arg->cap)) {
        PyMem_Free(spare); /* the smaller one, or NULL */
        spare = arg->block;
        spare_cap = arg->cap;
    } else {
        PyMem_Free(arg->block);
    }
}

static void set_string(arg_t *arg, val_t *v, const char *p, Py_ssize_t n) {
    v->kind = K_STRING;
    v->a = (uint64_t)n;
    v->b = (uint64_t)(uintptr_t)arg->strings;
    if (n)
        memcpy(arg->strings, p, (size_t)n);
    arg->strings += n;
}

static void set_entry(entry_t *e, const name_t *name) {
    e->name_size = name->size;
    e->name_data = name->name;
    memset(&e->val, 0, sizeof(val_t));
}

/* The argument's block laid out and allocated: [record val][entries][header vals][header entries]
 * [body vals][strings], the record and its (empty) field entries set; -1 (MemoryError) when
 * out of memory. */
typedef struct {
    val_t *record;
    entry_t *entries;
    val_t *hvals;
    entry_t *hentries;
    val_t *bvals;
} layout_t;

static int new_block(arg_t *arg, layout_t *l, const name_t *fields, int nfields, Py_ssize_t nh,
                     Py_ssize_t nb, size_t strbytes) {
    size_t o_entries = sizeof(val_t);
    size_t o_hvals = o_entries + (size_t)nfields * sizeof(entry_t);
    size_t o_hentries = o_hvals + (size_t)nh * sizeof(val_t);
    size_t o_body = o_hentries + (size_t)nh * 2 * sizeof(entry_t);
    size_t o_str = o_body + (size_t)nb * sizeof(val_t);
    char *block = take_block(o_str + strbytes + 1, &arg->cap);
    if (block == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    arg->block = block;
    arg->strings = block + o_str;
    l->record = (val_t *)block;
    l->entries = (entry_t *)(block + o_entries);
    l->hvals = (val_t *)(block + o_hvals);
    l->hentries = (entry_t *)(block + o_hentries);
    l->bvals = (val_t *)(block + o_body);
    memset(l->record, 0, sizeof(val_t));
    l->record->kind = K_RECORD;
    l->record->a = (uint64_t)nfields;
    l->record->b = (uint64_t)(uintptr_t)l->entries;
    for (int i = 0; i < nfields; i++)
        set_entry(&l->entries[i], &fields[i]);
    return 0;
}

/* list<u8> into `list` (the C API takes one val per byte, at `bvals`). */
static void lower_body(val_t *list, val_t *bvals, PyObject *body) {
    Py_ssize_t nb = PyBytes_GET_SIZE(body);
    const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(body);
    memset(bvals, 0, (size_t)nb * sizeof(val_t));
    for (Py_ssize_t i = 0; i < nb; i++) {
        bvals[i].kind = K_U8;
        bvals[i].a = bytes[i];
    }
    list->kind = K_LIST;
    list->a = (uint64_t)nb;
    list->b = (uint64_t)(uintptr_t)bvals;
}

/* A header record {name, value} at hval, its two entries at e (strings set by the caller). */
static void header_record(val_t *hval, entry_t *e) {
    memset(hval, 0, sizeof(val_t));
    hval->kind = K_RECORD;
    hval->a = 2;
    hval->b = (uint64_t)(uintptr_t)e;
    set_entry(&e[0], &HEADER_NAME);
    set_entry(&e[1], &HEADER_VALUE);
}

/* Lower `headers` (a list of (str, str)), `body` (bytes) and `nscalars` strings into arg; the
 * record's field vals are those of `fields` (nfields) and are filled by the caller except the
 * headers and body lists, at `hf` and `bf`. */
static int lower(arg_t *arg, const name_t *fields, int nfields, int hf, int bf,
                 PyObject *const *scalars, int nscalars, val_t **scalar_vals, PyObject *headers,
                 PyObject *body, val_t **record_out) {
    if (!PyList_Check(headers) || !PyBytes_Check(body)) {
        PyErr_SetString(PyExc_TypeError, "headers must be a list, body bytes");
        return -1;
    }
    Py_ssize_t nh = PyList_GET_SIZE(headers);
    Py_ssize_t nb = PyBytes_GET_SIZE(body);
    /* The UTF-8 of every string first, to size the block. */
    Py_ssize_t count = nscalars + 2 * nh;
    const char **ptrs = PyMem_Malloc(sizeof(char *) * (size_t)(count ? count : 1));
    Py_ssize_t *lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(count ? count : 1));
    PyObject **holds = PyMem_Calloc((size_t)(count ? count : 1), sizeof(PyObject *));
    int rc = -1;
    if (ptrs == NULL || lens == NULL || holds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t strbytes = 0;
    for (int i = 0; i < nscalars; i++) {
        if ((ptrs[i] = utf8(scalars[i], &lens[i], &holds[i])) == NULL)
            goto done;
        strbytes += (size_t)lens[i];
    }
    for (Py_ssize_t h = 0; h < nh; h++) {
        PyObject *pair = PyList_GET_ITEM(headers, h);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "a header must be a (name, value) tuple");
            goto done;
        }
        for (int k = 0; k < 2; k++) {
            Py_ssize_t j = nscalars + 2 * h + k;
            if ((ptrs[j] = utf8(PyTuple_GET_ITEM(pair, k), &lens[j], &holds[j])) == NULL)
                goto done;
            strbytes += (size_t)lens[j];
        }
    }
    layout_t l;
    if (new_block(arg, &l, fields, nfields, nh, nb, strbytes) < 0)
        goto done;
    val_t *record = l.record;
    entry_t *entries = l.entries;
    for (int i = 0; i < nscalars; i++)
        set_string(arg, scalar_vals[i], ptrs[i], lens[i]);
    val_t *hvals = l.hvals;
    entry_t *hentries = l.hentries;
    for (Py_ssize_t h = 0; h < nh; h++) {
        entry_t *e = &hentries[2 * h];
        header_record(&hvals[h], e);
        Py_ssize_t j = nscalars + 2 * h;
        set_string(arg, &e[0].val, ptrs[j], lens[j]);
        set_string(arg, &e[1].val, ptrs[j + 1], lens[j + 1]);
    }
    entries[hf].val.kind = K_LIST;
    entries[hf].val.a = (uint64_t)nh;
    entries[hf].val.b = (uint64_t)(uintptr_t)hvals;
    lower_body(&entries[bf].val, l.bvals, body);
    *record_out = record;
    rc = 0;
done:
    if (holds != NULL)
        for (Py_ssize_t i = 0; i < count; i++)
            Py_XDECREF(holds[i]);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    PyMem_Free(holds);
    return rc;
}

/* Store, instance, call; the GIL released throughout. Returns R_* or 0 for `continue` (its
 * value already freed); *res holds the result for R_LIFT, *err the wasmtime_error_t for R_ERROR. */
static int run(void *engine, void *linker, void *component, void *index, uint64_t deadline,
               int wasi, const val_t *arg, val_t *res, void **err) {
    /* The C API's instance and function handles: at most 32 bytes each (checked in
     * smg.wasm.runtime against wasmtime-py's structures). */
    _Alignas(16) unsigned char instance[32], func[32];
    int code = 0;
    void *store = store_new(engine, NULL, NULL);
    void *ctx = store_context(store);
    set_deadline(ctx, deadline);
    if (wasi && (*err = set_wasi(ctx, wasi_config_new())) != NULL) {
        code = R_ERROR;
        goto out;
    }
    if ((*err = instantiate(linker, ctx, component, instance)) != NULL) {
        code = R_ERROR;
        goto out;
    }
    if (!get_func(instance, ctx, index, func)) {
        code = R_NO_FUNC;
        goto out;
    }
    memset(res, 0, sizeof(val_t)); /* the C API assigns over it, dropping the old value */
    if ((*err = func_call(func, ctx, arg, 1, res, 1)) != NULL) {
        code = R_ERROR;
        goto out;
    }
    code = R_LIFT;
    if (res->kind == K_VARIANT && res->a == 8 && res->b &&
        memcmp((const void *)(uintptr_t)res->b, "continue", 8) == 0) {
        val_delete(res);
        code = 0;
    }
out:
    store_delete(store);
    return code;
}

static PyObject *finish(int code, val_t *res, void *err) {
    if (code == 0)
        Py_RETURN_NONE;
    if (code == R_LIFT) {
        val_t *kept = PyMem_RawMalloc(sizeof(val_t));
        if (kept == NULL) {
            val_delete(res);
            return PyErr_NoMemory();
        }
        *kept = *res; /* moved: the C API owns what it points to until release() */
        return Py_BuildValue("(iK)", R_LIFT, (unsigned long long)(uintptr_t)kept);
    }
    return Py_BuildValue("(iK)", code, (unsigned long long)(uintptr_t)err);
}

static int pointers(PyObject *const *args, void **out, int n) {
    for (int i = 0; i < n; i++) {
        out[i] = PyLong_AsVoidPtr(args[i]);
        if (out[i] == NULL && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* What both calls start with: the component to call (engine, linker, component, export index),
 * its epoch deadline and whether it imports WASI. */
typedef struct {
    void *p[4];
    uint64_t deadline;
    int wasi;
} target_t;

static int target(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                  target_t *t) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want);
        return -1;
    }
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "setup() was not called");
        return -1;
    }
    if (pointers(args, t->p, 4) < 0)
        return -1;
    t->deadline = PyLong_AsUnsignedLongLong(args[4]);
    t->wasi = PyObject_IsTrue(args[5]);
    return PyErr_Occurred() || t->wasi < 0 ? -1 : 0;
}

/* Run the lowered argument, free it, answer. */
static PyObject *call_lowered(const target_t *t, arg_t *arg, const val_t *record) {
    val_t res;
    void *err = NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = run(t->p[0], t->p[1], t->p[2], t->p[3], t->deadline, t->wasi, record, &res, &err);
    Py_END_ALLOW_THREADS
    give_block(arg);
    return finish(code, &res, err);
}

/* Both OnRequest calls' 13 arguments start the same: the target, and now-epoch-ms last (wrapped
 * to u64, as capi.lower_request's mask). */
static int request_target(const char *name, PyObject *const *args, Py_ssize_t nargs, target_t *t,
                          uint64_t *now) {
    if (target(name, args, nargs, 13, t) < 0)
        return -1;
    *now = PyLong_AsUnsignedLongLongMask(args[12]);
    return PyErr_Occurred() ? -1 : 0;
}

/* call_request(engine, linker, component, index, deadline, wasi, method, path, query, headers,
 * body, request_id, now_ms) -> None (continue) | (code, address) */
static PyObject *call_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    target_t t;
    uint64_t now;
    if (request_target("call_request", args, nargs, &t, &now) < 0)
        return NULL;
    arg_t arg = {0};
    val_t *record;
    val_t *scalar_vals[4];
    /* The scalars' string vals, moved into their entries once the block exists. */
    PyObject *scalars[4] = {args[6], args[7], args[8], args[11]};
    val_t tmp[4];
    memset(tmp, 0, sizeof(tmp));
    for (int i = 0; i < 4; i++)
        scalar_vals[i] = &tmp[i];
    if (lower(&arg, REQUEST_FIELDS, 7, 3, 4, scalars, 4, scalar_vals, args[9], args[10], &record) < 0)
        return NULL;
    entry_t *entries = (entry_t *)((char *)record + sizeof(val_t));
    entries[0].val = tmp[0];
    entries[1].val = tmp[1];
    entries[2].val = tmp[2];
    entries[5].val = tmp[3];
    entries[6].val.kind = K_U64;
    entries[6].val.a = now;
    return call_lowered(&t, &arg, record);
}

/* The gateway's own request, as parsed (smg.dataplane.server.Request), lowered without the
 * Python objects the str path needs: header names and values, the method and the request id
 * are Latin-1 bytes there, decoded as the gateway decodes them (Latin-1, names lower-cased), and
 * only the headers smg.wasm.chain.module_view shows a module are passed. The values are the str
 * path's exactly (tests/test_wasm_rawcall.py compares them field by field). */

/* UTF-8 bytes of a Latin-1 string: one per ASCII byte, two above. */
static size_t latin1_len(const unsigned char *p, Py_ssize_t n) {
    size_t m = (size_t)n;
    for (Py_ssize_t i = 0; i < n; i++)
        m += p[i] >> 7;
    return m;
}

/* str.lower() of a Latin-1 character: A-Z and U+00C0-U+00DE except U+00D7 move by 0x20, no
 * other Latin-1 character changes (and none lowers to more than one character). */
static unsigned char latin1_lower(unsigned char c) {
    if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7))
        return (unsigned char)(c + 0x20);
    return c;
}

static void set_latin1(arg_t *arg, val_t *v, const unsigned char *p, Py_ssize_t n, int lower) {
    unsigned char *out = (unsigned char *)arg->strings;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = lower ? latin1_lower(p[i]) : p[i];
        if (c < 0x80) {
            *out++ = c;
        } else {
            *out++ = (unsigned char)(0xC0 | (c >> 6));
            *out++ = (unsigned char)(0x80 | (c & 0x3F));
        }
    }
    v->kind = K_STRING;
    v->a = (uint64_t)(out - (unsigned char *)arg->strings);
    v->b = (uint64_t)(uintptr_t)arg->strings;
    arg->strings = (char *)out;
}

/* A value smg.wasm.chain.module_view shows (1.13's visible ASCII, tab allowed). */
static int shown(PyObject *value) {
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t n = PyBytes_GET_SIZE(value);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(p[i] == '\t' || (p[i] >= 0x20 && p[i] <= 0x7E)))
            return 0;
    return 1;
}

#define UBYTES(o) ((const unsigned char *)PyBytes_AS_STRING(o))

/* call_request_raw(engine, linker, component, index, deadline, wasi, method: bytes, path: str,
 * query: str, headers: list of (bytes, bytes), body: bytes, request_id: bytes, now_ms)
 * -> None (continue) | (code, address) */
static PyObject *call_request_raw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    target_t t;
    uint64_t now;
    if (request_target("call_request_raw", args, nargs, &t, &now) < 0)
        return NULL;
    PyObject *method = args[6], *headers = args[9], *body = args[10], *rid = args[11];
    if (!PyBytes_Check(method) || !PyBytes_Check(rid) || !PyBytes_Check(body) ||
        !PyList_Check(headers)) {
        PyErr_SetString(PyExc_TypeError, "method, request id and body must be bytes, headers a list");
        return NULL;
    }
    PyObject *holds[2] = {NULL, NULL};
    Py_ssize_t plen, qlen;
    PyObject *result = NULL;
    const char *path = utf8(args[7], &plen, &holds[0]);
    const char *query = path ? utf8(args[8], &qlen, &holds[1]) : NULL;
    if (query == NULL)
        goto done;
    Py_ssize_t nh = PyList_GET_SIZE(headers), kept = 0;
    size_t strbytes = latin1_len(UBYTES(method), PyBytes_GET_SIZE(method)) + (size_t)plen +
                      (size_t)qlen + latin1_len(UBYTES(rid), PyBytes_GET_SIZE(rid));
    for (Py_ssize_t h = 0; h < nh; h++) {
        PyObject *pair = PyList_GET_ITEM(headers, h);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "a header must be a (bytes, bytes) tuple");
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (shown(value)) {
            kept++;
            strbytes += latin1_len(UBYTES(name), PyBytes_GET_SIZE(name)) +
                        (size_t)PyBytes_GET_SIZE(value);
        }
    }
    arg_t arg;
    layout_t l;
    if (new_block(&arg, &l, REQUEST_FIELDS, 7, kept, PyBytes_GET_SIZE(body), strbytes) < 0)
        goto done;
    entry_t *entries = l.entries;
    set_latin1(&arg, &entries[0].val, UBYTES(method), PyBytes_GET_SIZE(method), 0);
    set_string(&arg, &entries[1].val, path, plen);
    set_string(&arg, &entries[2].val, query, qlen);
    val_t *hvals = l.hvals;
    entry_t *hentries = l.hentries;
    Py_ssize_t k = 0;
    for (Py_ssize_t h = 0; h < nh; h++) {
        PyObject *pair = PyList_GET_ITEM(headers, h);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (!shown(value))
            continue;
        entry_t *e = &hentries[2 * k];
        header_record(&hvals[k], e);
        set_latin1(&arg, &e[0].val, UBYTES(name), PyBytes_GET_SIZE(name), 1);
        set_string(&arg, &e[1].val, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
        k++;
    }
    entries[3].val.kind = K_LIST;
    entries[3].val.a = (uint64_t)kept;
    entries[3].val.b = (uint64_t)(uintptr_t)hvals;
    lower_body(&entries[4].val, l.bvals, body);
    set_latin1(&arg, &entries[5].val, UBYTES(rid), PyBytes_GET_SIZE(rid), 0);
    entries[6].val.kind = K_U64;
    entries[6].val.a = now;
    result = call_lowered(&t, &arg, l.record);
done:
    Py_XDECREF(holds[0]);
    Py_XDECREF(holds[1]);
    return result;
}

/* call_response(engine, linker, component, index, deadline, wasi, status, headers, body) */
static PyObject *call_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    target_t t;
    if (target("call_response", args, nargs, 9, &t) < 0)
        return NULL;
    unsigned long status = PyLong_AsUnsignedLongMask(args[6]); /* & 0xFFFF below, as capi's */
    if (PyErr_Occurred())
        return NULL;
    arg_t arg = {0};
    val_t *record;
    if (lower(&arg, RESPONSE_FIELDS, 3, 1, 2, NULL, 0, NULL, args[7], args[8], &record) < 0)
        return NULL;
    entry_t *entries = (entry_t *)((char *)record + sizeof(val_t));
    entries[0].val.kind = K_U16;
    entries[0].val.a = status & 0xFFFF;
    return call_lowered(&t, &arg, record);
}

/* release(address): free a result call() handed back for lifting. */
static PyObject *release(PyObject *self, PyObject *address) {
    void *kept = PyLong_AsVoidPtr(address);
    if (kept == NULL)
        return PyErr_Occurred() ? NULL : (Py_INCREF(Py_None), Py_None);
    val_delete(kept);
    PyMem_RawFree(kept);
    Py_RETURN_NONE;
}

/* setup(functions: tuple of 10 addresses, kinds: tuple of 7 ints) */
static PyObject *setup(PyObject *self, PyObject *args) {
    PyObject *fns, *kinds;
    if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &fns, &PyTuple_Type, &kinds))
        return NULL;
    if (PyTuple_GET_SIZE(fns) != 10 || PyTuple_GET_SIZE(kinds) != 7) {
        PyErr_SetString(PyExc_ValueError, "setup takes 10 function addresses and 7 kinds");
        return NULL;
    }
    void *f[10];
    for (int i = 0; i < 10; i++) {
        f[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(fns, i));
        if (f[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a NULL function address");
            return NULL;
        }
    }
    uint8_t k[7];
    for (int i = 0; i < 7; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(kinds, i));
        if (v < 0 || v > 255) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a value kind out of range");
            return NULL;
        }
        k[i] = (uint8_t)v;
    }
    store_new = (store_new_t)f[0];
    store_context = (store_context_t)f[1];
    store_delete = (store_delete_t)f[2];
    set_deadline = (set_deadline_t)f[3];
    instantiate = (instantiate_t)f[4];
    get_func = (get_func_t)f[5];
    func_call = (func_call_t)f[6];
    val_delete = (val_delete_t)f[7];
    wasi_config_new = (wasi_config_new_t)f[8];
    set_wasi = (set_wasi_t)f[9];
    K_U8 = k[0];
    K_U16 = k[1];
    K_U64 = k[2];
    K_STRING = k[3];
    K_LIST = k[4];
    K_RECORD = k[5];
    K_VARIANT = k[6];
    ready = true;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS, "Give the wasmtime C API function addresses and value kinds."},
    {"call_request", (PyCFunction)(void (*)(void))call_request, METH_FASTCALL,
     "One OnRequest call: None for continue, else (code, address)."},
    {"call_request_raw", (PyCFunction)(void (*)(void))call_request_raw, METH_FASTCALL,
     "One OnRequest call on the parsed request's bytes: None for continue, else (code, address)."},
    {"call_response", (PyCFunction)(void (*)(void))call_response, METH_FASTCALL,
     "One OnResponse call: None for continue, else (code, address)."},
    {"release", release, METH_O, "Free a result handed back for lifting."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "smg.wasm._fastcall",
                                    "One WASM module call in one C call (smg.wasm.runtime).", -1,
                                    methods};

/* Bump with any change to the functions' names, arguments or answers: smg.wasm.runtime uses the
   extension only when this equals its FASTCALL_API (a stale in-place build from an older checkout
   would otherwise fail every module call). */
#define FASTCALL_API 2

PyMODINIT_FUNC PyInit__fastcall(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "API", FASTCALL_API) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
