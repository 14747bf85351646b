/* The split and vocabulary lookup of smg.tokenizer.fastpath in one pass over a str: the pieces
 * the cl100k / Llama 3 Split pattern (or Qwen2's, one digit a piece) finds, each looked up by
 * its UTF-8 bytes in the vocabulary.
 *
 * Why C: on a 1,024-token prompt decoded from random ids (~6,000 characters, ~700 pieces) the
 * `regex` module's findall took ~0.55 ms and looking its pieces up in a 127K-entry dict another
 * ~0.55 ms: the dict's index, its entry and the key's str object are three cache misses a piece,
 * ~150-250 ns each on the dev VM. Here a piece's slot holds its key inline (keys of up to 24
 * bytes, 99.7% of Llama 3's), so a lookup is one miss, and no str is made for a piece that is an
 * entry.
 *
 * The pattern, alternatives in order (each position takes the first that matches; every character
 * matches one, so the pieces cover the text):
 *   A1 (?i:'s|'t|'re|'ve|'m|'ll|'d)   A2 [^\r\n\p{L}\p{N}]?\p{L}+   A3 \p{N}{1,3} (Qwen2: \p{N})
 *   A4 ` ?[^\s\p{L}\p{N}]+[\r\n]*`    A5 \s*[\r\n]+   A6 \s+(?!\S)   A7 \s+
 * Classes come from a table the caller builds with the `regex` module itself (fastpath's
 * _char_classes): L, N and \s disjoint, and which contraction letter a character matches under
 * (?i). A5-A7 on a whitespace run [i, j): A5 ends after the run's last \r or \n when it has one;
 * else A6 takes the run at the end of the text and the run but its last character before a
 * non-space (backtracking to where the lookahead holds), which needs two; else A7 the one space.
 * tests/test_tokenizer_pieces.py checks the pieces against `regex`'s findall. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define API 1
#define CODE_POINTS 0x110000
#define CLASS_L 1
#define CLASS_N 2
#define CLASS_S 4
#define FOLD_SHIFT 4 /* bits 4-7: 1 + the index in FOLD_LETTERS, 0 for none */
#define MAX_KEY 255
#define INLINE_KEY 24

enum { FOLD_S = 1, FOLD_T, FOLD_R, FOLD_E, FOLD_V, FOLD_M, FOLD_L, FOLD_D };

typedef struct {
    uint32_t id;
    uint16_t len; /* 0: a free slot (no entry is empty) */
    uint16_t check; /* the hash's top 16 bits */
    union {
        char bytes[INLINE_KEY];
        uint64_t offset; /* into far_keys, for a key over INLINE_KEY bytes */
    } key;
} slot_t;

typedef struct {
    PyObject_HEAD
    uint8_t *classes;
    slot_t *slots;
    size_t slots_bytes;
    uint64_t mask;
    char *far_keys;
    Py_ssize_t size;
    int max_digits;
} PiecesObject;

static inline uint64_t key_hash(const unsigned char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a, then a finalizer for the low bits */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    return h ^ (h >> 32);
}

static inline const char *slot_key(const PiecesObject *self, const slot_t *slot) {
    return slot->len <= INLINE_KEY ? slot->key.bytes : self->far_keys + slot->key.offset;
}

/* The id of the entry with these bytes, or -1. */
static inline int64_t find(const PiecesObject *self, const unsigned char *s, size_t n) {
    uint64_t h = key_hash(s, n);
    uint16_t check = (uint16_t)(h >> 48);
    for (uint64_t i = h & self->mask;; i = (i + 1) & self->mask) {
        const slot_t *slot = &self->slots[i];
        if (slot->len == 0) return -1;
        if (slot->len == n && slot->check == check && memcmp(slot_key(self, slot), s, n) == 0)
            return slot->id;
    }
}

static void pieces_dealloc(PiecesObject *self) {
    PyMem_Free(self->classes);
    if (self->slots != NULL) munmap(self->slots, self->slots_bytes);
    PyMem_Free(self->far_keys);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int fill(PiecesObject *self, PyObject *entries) {
    Py_ssize_t count = PySequence_Fast_GET_SIZE(entries);
    PyObject **items = PySequence_Fast_ITEMS(entries);
    size_t far_bytes = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *key;
        Py_ssize_t id;
        if (!PyTuple_Check(items[k])) {
            PyErr_SetString(PyExc_TypeError, "vocab must be a sequence of (bytes, id)");
            return -1;
        }
        if (!PyArg_ParseTuple(items[k], "Sn", &key, &id)) return -1;
        Py_ssize_t n = PyBytes_GET_SIZE(key);
        if (n == 0 || n > MAX_KEY || id < 0 || (uint64_t)id > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a key is empty or over 255 bytes, or an id over 2^32");
            return -1;
        }
        if (n > INLINE_KEY) far_bytes += (size_t)n;
    }
    uint64_t slots = 16;
    while (slots < 2 * (uint64_t)count) slots <<= 1;
    self->slots_bytes = slots * sizeof(slot_t);
    void *mem = mmap(NULL, self->slots_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        PyErr_NoMemory();
        return -1;
    }
#ifdef MADV_HUGEPAGE
    madvise(mem, self->slots_bytes, MADV_HUGEPAGE); /* fewer TLB misses; advice only */
#endif
    self->slots = mem; /* anonymous memory is zeroed: every slot free */
    self->mask = slots - 1;
    self->far_keys = PyMem_Malloc(far_bytes ? far_bytes : 1);
    if (self->far_keys == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t far_used = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *key = PyTuple_GET_ITEM(items[k], 0);
        uint32_t id = (uint32_t)PyLong_AsSsize_t(PyTuple_GET_ITEM(items[k], 1));
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(key);
        size_t n = (size_t)PyBytes_GET_SIZE(key);
        if (find(self, s, n) >= 0) {
            PyErr_SetString(PyExc_ValueError, "a key is given twice");
            return -1;
        }
        uint64_t h = key_hash(s, n);
        uint64_t i = h & self->mask;
        while (self->slots[i].len != 0) i = (i + 1) & self->mask;
        slot_t *slot = &self->slots[i];
        slot->id = id;
        slot->len = (uint16_t)n;
        slot->check = (uint16_t)(h >> 48);
        if (n <= INLINE_KEY) {
            memcpy(slot->key.bytes, s, n);
        } else {
            memcpy(self->far_keys + far_used, s, n);
            slot->key.offset = far_used;
            far_used += n;
        }
    }
    self->size = count;
    return 0;
}

static PyObject *pieces_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"classes", "max_digits", "vocab", NULL};
    Py_buffer classes;
    int max_digits;
    PyObject *vocab;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iO", names, &classes, &max_digits, &vocab))
        return NULL;
    PiecesObject *self = NULL;
    PyObject *entries = NULL;
    if (classes.len != CODE_POINTS || max_digits < 1) {
        PyErr_SetString(PyExc_ValueError, "classes must be 0x110000 bytes and max_digits >= 1");
        goto done;
    }
    entries = PySequence_Fast(vocab, "vocab must be a sequence of (bytes, id)");
    if (entries == NULL) goto done;
    self = (PiecesObject *)type->tp_alloc(type, 0);
    if (self == NULL) goto done;
    self->max_digits = max_digits;
    self->classes = PyMem_Malloc(CODE_POINTS);
    if (self->classes == NULL) {
        PyErr_NoMemory();
        Py_CLEAR(self);
        goto done;
    }
    memcpy(self->classes, classes.buf, CODE_POINTS);
    if (fill(self, entries) < 0) Py_CLEAR(self);
done:
    Py_XDECREF(entries);
    PyBuffer_Release(&classes);
    return (PyObject *)self;
}

#define AT(k) PyUnicode_READ(kind, data, (k))
#define CLS(c) (classes[(c)])
#define OTHER(c) ((CLS(c) & (CLASS_L | CLASS_N | CLASS_S)) == 0)
#define NEWLINE(c) ((c) == '\r' || (c) == '\n')

/* The end of the piece that starts at i. */
static inline Py_ssize_t piece_end(const PiecesObject *self, int kind, const void *data,
                                   Py_ssize_t i, Py_ssize_t n) {
    const uint8_t *classes = self->classes;
    Py_UCS4 c = AT(i);
    if (c == '\'' && i + 1 < n) { /* A1 */
        int f1 = CLS(AT(i + 1)) >> FOLD_SHIFT;
        if (f1 == FOLD_S || f1 == FOLD_T || f1 == FOLD_M || f1 == FOLD_D) return i + 2;
        if (i + 2 < n) {
            int f2 = CLS(AT(i + 2)) >> FOLD_SHIFT;
            if ((f1 == FOLD_R && f2 == FOLD_E) || (f1 == FOLD_V && f2 == FOLD_E) ||
                (f1 == FOLD_L && f2 == FOLD_L))
                return i + 3;
        }
    }
    uint8_t cls = CLS(c);
    Py_ssize_t j;
    if (cls & CLASS_L) { /* A2 without its prefix */
        for (j = i + 1; j < n && (CLS(AT(j)) & CLASS_L); j++) {
        }
        return j;
    }
    if (!(cls & CLASS_N) && !NEWLINE(c) && i + 1 < n && (CLS(AT(i + 1)) & CLASS_L)) { /* A2 */
        for (j = i + 2; j < n && (CLS(AT(j)) & CLASS_L); j++) {
        }
        return j;
    }
    if (cls & CLASS_N) { /* A3 */
        for (j = i + 1; j < n && j - i < self->max_digits && (CLS(AT(j)) & CLASS_N); j++) {
        }
        return j;
    }
    if (OTHER(c) || (c == ' ' && i + 1 < n && OTHER(AT(i + 1)))) { /* A4 */
        for (j = i + 1; j < n && OTHER(AT(j)); j++) {
        }
        while (j < n && NEWLINE(AT(j))) j++;
        return j;
    }
    /* c is whitespace: A5, A6, A7 */
    Py_ssize_t last_newline = -1;
    for (j = i; j < n && (CLS(AT(j)) & CLASS_S); j++) {
        if (NEWLINE(AT(j))) last_newline = j;
    }
    if (last_newline >= 0) return last_newline + 1;
    if (j == n || j - i < 2) return j;
    return j - 1;
}

/* The UTF-8 bytes of text[i:j] into buf (MAX_KEY bytes); their count, or MAX_KEY + 1 when
 * longer (no entry is). */
static inline size_t utf8_of(int kind, const void *data, Py_ssize_t i, Py_ssize_t j,
                             unsigned char *buf) {
    size_t n = 0;
    for (Py_ssize_t k = i; k < j; k++) {
        Py_UCS4 c = AT(k);
        size_t width = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
        if (n + width > MAX_KEY) return MAX_KEY + 1;
        if (c < 0x80) {
            buf[n++] = (unsigned char)c;
        } else if (c < 0x800) {
            buf[n++] = (unsigned char)(0xC0 | (c >> 6));
            buf[n++] = (unsigned char)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            buf[n++] = (unsigned char)(0xE0 | (c >> 12));
            buf[n++] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            buf[n++] = (unsigned char)(0x80 | (c & 0x3F));
        } else {
            buf[n++] = (unsigned char)(0xF0 | (c >> 18));
            buf[n++] = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
            buf[n++] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            buf[n++] = (unsigned char)(0x80 | (c & 0x3F));
        }
    }
    return n;
}

/* scan(text) -> (items, missing): per piece in order, its id (int) when the piece is a
 * vocabulary entry, else the piece (str); missing = how many are str. */
static PyObject *pieces_scan(PiecesObject *self, PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "scan() takes a str");
        return NULL;
    }
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    PyObject *items = PyList_New(0);
    if (items == NULL) return NULL;
    Py_ssize_t missing = 0;
    unsigned char buf[MAX_KEY + 4];
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = piece_end(self, kind, data, i, n);
        size_t len = utf8_of(kind, data, i, j, buf);
        int64_t id = len <= MAX_KEY ? find(self, buf, len) : -1;
        PyObject *item;
        if (id >= 0) {
            item = PyLong_FromLongLong(id);
        } else {
            item = PyUnicode_Substring(text, i, j);
            missing++;
        }
        if (item == NULL || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(item);
        i = j;
    }
    return Py_BuildValue("(Nn)", items, missing);
}

static PyMethodDef pieces_methods[] = {
    {"scan", (PyCFunction)pieces_scan, METH_O,
     "scan(text) -> (items, missing): each piece's id, or the piece where it is no entry"},
    {NULL, NULL, 0, NULL},
};

static PyObject *pieces_size(PiecesObject *self, void *closure) {
    return PyLong_FromSsize_t(self->size);
}

static PyGetSetDef pieces_getset[] = {
    {"size", (getter)pieces_size, NULL, "vocabulary entries", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PiecesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "smg.tokenizer._pieces.Pieces",
    .tp_basicsize = sizeof(PiecesObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pieces(classes, max_digits, vocab): the Split pattern's pieces and their ids",
    .tp_new = pieces_new,
    .tp_dealloc = (destructor)pieces_dealloc,
    .tp_methods = pieces_methods,
    .tp_getset = pieces_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "smg.tokenizer._pieces",
                                    "The fast path's split and vocabulary lookup in C.", -1, NULL};

PyMODINIT_FUNC PyInit__pieces(void) {
    if (PyType_Ready(&PiecesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&PiecesType);
    if (PyModule_AddObject(m, "Pieces", (PyObject *)&PiecesType) < 0 ||
        PyModule_AddIntConstant(m, "API", API) < 0) {
        Py_DECREF(&PiecesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
