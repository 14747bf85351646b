/* The byte-level BPE merge of one pre-tokenized piece, as `tokenizers`' BPE model does it
 * (models/bpe/word.rs `merge_all`, without dropout), for smg.tokenizer.fastpath.
 *
 * Why C: the fast path looks every piece up in the vocabulary first; a piece that is no entry
 * (~30% of a prompt decoded from random ids) went through the library's `model.tokenize`, ~4-5 us
 * a call, most of it the binding (a `Token` object per id, a String per symbol) rather than the
 * merging. This merge works on ids: ~0.3-0.6 us for the same piece.
 *
 * Semantics, step for step the library's: the word starts as one symbol per byte (the id of the
 * byte's ByteLevel character); the library keeps a heap of adjacent pairs ordered by (merge rank,
 * position of the left symbol) and merges the least until no adjacent pair is a merge. Its stale
 * heap entries are skipped by checking the pair still makes the same token; a symbol only grows to
 * the right, so a stale entry never passes that check, and the heap is the same as this: among
 * the current adjacent pairs that are merges, take the least rank, leftmost on a tie (a rank
 * belongs to one pair, so a tie is the same pair twice). Merges given twice keep the last rank (the
 * library collects them into a map). A piece longer than MAX_WORD bytes is left to the library. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <structmember.h>
#include <string.h>

#define MAX_WORD 512
#define NO_RANK UINT32_MAX

typedef struct {
    uint64_t key; /* left id << 32 | right id; EMPTY_KEY when free */
    uint32_t rank;
    uint32_t id; /* the merged token */
} slot_t;

/* No pair has it: ids are below 2^31 (checked when the table is built). */
#define EMPTY_KEY UINT64_MAX

typedef struct {
    PyObject_HEAD
    slot_t *slots;
    uint64_t mask;
    Py_ssize_t size; /* merges given */
    uint32_t byte_ids[256];
} MergesObject;

static inline uint64_t slot_hash(uint64_t key) {
    /* splitmix64's finalizer: pairs of nearby ids spread over the table. */
    key ^= key >> 30;
    key *= 0xbf58476d1ce4e5b9ULL;
    key ^= key >> 27;
    key *= 0x94d049bb133111ebULL;
    key ^= key >> 31;
    return key;
}

static inline const slot_t *lookup(const MergesObject *self, uint32_t left, uint32_t right) {
    uint64_t key = ((uint64_t)left << 32) | right;
    for (uint64_t i = slot_hash(key) & self->mask;; i = (i + 1) & self->mask) {
        const slot_t *slot = &self->slots[i];
        if (slot->key == key) return slot;
        if (slot->key == EMPTY_KEY) return NULL;
    }
}

static void merges_dealloc(MergesObject *self) {
    PyMem_Free(self->slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Merges(byte_ids, merges): byte_ids 256 native uint32 (the id of each byte's ByteLevel
 * character), merges n x 3 native uint32 (left id, right id, merged id) in rank order. */
static PyObject *merges_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"byte_ids", "merges", NULL};
    Py_buffer bytes_view, merges_view;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*:Merges", names, &bytes_view, &merges_view))
        return NULL;
    MergesObject *self = NULL;
    if (bytes_view.len != 256 * (Py_ssize_t)sizeof(uint32_t) ||
        merges_view.len % (3 * (Py_ssize_t)sizeof(uint32_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must be 256 uint32, merges n x 3 uint32");
        goto done;
    }
    size_t count = (size_t)merges_view.len / (3 * sizeof(uint32_t));
    if (count >= UINT32_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "too many merges");
        goto done;
    }
    self = (MergesObject *)type->tp_alloc(type, 0);
    if (self == NULL) goto done;
    memcpy(self->byte_ids, bytes_view.buf, sizeof(self->byte_ids));
    uint64_t capacity = 16;
    /* At most 2/3 full: 8 MiB for Llama 3's 280K merges (a probe stays in a cache line or two). */
    while (2 * capacity < 3 * (uint64_t)count) capacity <<= 1;
    self->slots = PyMem_Malloc(capacity * sizeof(slot_t));
    if (self->slots == NULL) {
        PyErr_NoMemory();
        Py_CLEAR(self);
        goto done;
    }
    memset(self->slots, 0xff, capacity * sizeof(slot_t));
    self->mask = capacity - 1;
    self->size = (Py_ssize_t)count;
    const uint32_t *row = merges_view.buf;
    for (size_t rank = 0; rank < count; rank++, row += 3) {
        if (row[0] >= 0x80000000u || row[1] >= 0x80000000u) {
            PyErr_SetString(PyExc_ValueError, "token id over 2^31");
            Py_CLEAR(self);
            goto done;
        }
        uint64_t key = ((uint64_t)row[0] << 32) | row[1];
        uint64_t i = slot_hash(key) & self->mask;
        while (self->slots[i].key != EMPTY_KEY && self->slots[i].key != key) i = (i + 1) & self->mask;
        self->slots[i].key = key; /* a pair given again: the last rank, as the library's map */
        self->slots[i].rank = (uint32_t)rank;
        self->slots[i].id = row[2];
    }
done:
    PyBuffer_Release(&bytes_view);
    PyBuffer_Release(&merges_view);
    return (PyObject *)self;
}

/* The rank and merged id of the pair (left, right), NO_RANK when it is no merge. */
static inline uint32_t pair_rank(const MergesObject *self, uint32_t left, uint32_t right,
                                 uint32_t *merged) {
    const slot_t *slot = lookup(self, left, right);
    if (slot == NULL) return NO_RANK;
    *merged = slot->id;
    return slot->rank;
}

/* merge(word: bytes) -> tuple of ids, or None for a word over MAX_WORD bytes or empty. */
static PyObject *merges_merge(MergesObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "merge takes bytes");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (n == 0 || n > MAX_WORD) Py_RETURN_NONE;
    const unsigned char *word = (const unsigned char *)PyBytes_AS_STRING(arg);
    uint32_t ids[MAX_WORD];
    /* rank[i], merged[i]: the pair (ids[i], ids[i + 1]); only the two pairs around a merge
       change, so each step looks up at most two pairs and scans the ranks. */
    uint32_t rank[MAX_WORD];
    uint32_t merged[MAX_WORD];
    for (Py_ssize_t i = 0; i < n; i++) ids[i] = self->byte_ids[word[i]];
    for (Py_ssize_t i = 0; i + 1 < n; i++) rank[i] = pair_rank(self, ids[i], ids[i + 1], &merged[i]);
    while (n > 1) {
        Py_ssize_t best = -1;
        uint32_t best_rank = NO_RANK;
        for (Py_ssize_t i = 0; i + 1 < n; i++) {
            if (rank[i] < best_rank) { /* strict: the leftmost of a tie */
                best_rank = rank[i];
                best = i;
            }
        }
        if (best < 0) break;
        ids[best] = merged[best];
        /* Drop symbol best + 1 and the pair it started. */
        memmove(&ids[best + 1], &ids[best + 2], (size_t)(n - best - 2) * sizeof(uint32_t));
        if (best + 3 <= n) { /* pairs best + 2 .. n - 2 move down one */
            memmove(&rank[best + 1], &rank[best + 2], (size_t)(n - best - 3) * sizeof(uint32_t));
            memmove(&merged[best + 1], &merged[best + 2], (size_t)(n - best - 3) * sizeof(uint32_t));
        }
        n--;
        if (best > 0) rank[best - 1] = pair_rank(self, ids[best - 1], ids[best], &merged[best - 1]);
        if (best + 1 < n) rank[best] = pair_rank(self, ids[best], ids[best + 1], &merged[best]);
    }
    PyObject *out = PyTuple_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *id = PyLong_FromUnsignedLong(ids[i]);
        if (id == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, id);
    }
    return out;
}

static PyMethodDef merges_methods[] = {
    {"merge", (PyCFunction)merges_merge, METH_O,
     "merge(word: bytes) -> tuple of ids (None: empty or over 512 bytes, left to the library)"},
    {NULL, NULL, 0, NULL}};

static PyMemberDef merges_members[] = {
    {"size", T_PYSSIZET, offsetof(MergesObject, size), READONLY, "merges given"},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject MergesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "smg.tokenizer._bpe.Merges",
    .tp_basicsize = sizeof(MergesObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A BPE model's merges by id pair: Merges(byte_ids, merges).merge(word)",
    .tp_new = merges_new,
    .tp_dealloc = (destructor)merges_dealloc,
    .tp_methods = merges_methods,
    .tp_members = merges_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "smg.tokenizer._bpe",
                                    "Byte-level BPE merges on ids (smg.tokenizer.fastpath).", -1,
                                    NULL};

/* Bump with any change to Merges' arguments or answers (see smg.tokenizer.fastpath). */
#define BPE_API 1

PyMODINIT_FUNC PyInit__bpe(void) {
    if (PyType_Ready(&MergesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&MergesType);
    if (PyModule_AddObject(m, "Merges", (PyObject *)&MergesType) < 0 ||
        PyModule_AddIntConstant(m, "API", BPE_API) < 0) {
        Py_DECREF(&MergesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
