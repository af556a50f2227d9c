/*
 * The AttributeValue fast path of orders_cdc/attrvalue.py, in C.
 *
 * It does exactly what attrvalue._fast_map / _fast_value do (the pure-Python fast path,
 * which stays the reference and the fallback when this module is not built):
 *   S -> the str, N -> Decimal (through the literal cache, else the Python number check),
 *   M -> dict, L -> list, BOOL -> bool, NULL: true -> None, SS (non-empty, all str) -> set,
 *   NS (non-empty, all str) -> set of Decimal (each through the cache or the number check),
 *   B (canonical base64 text) -> bytes, BS (non-empty, each canonical base64) -> set of bytes.
 * Anything else (a malformed value, B already as bytes) goes to the checked Python converter
 * `value_fn`; any exception makes the Python caller redo the whole value on the checked
 * path, which builds the error and its path. So this file only has to be right on the
 * happy path, and never more lenient than the checked converters.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *number_fn = NULL; /* str -> Decimal, with DynamoDB's range checks; fills the cache */
static PyObject *value_fn = NULL;  /* the checked converter for one AttributeValue */
static PyObject *number_cache = NULL; /* dict: literal -> Decimal */

static PyObject *tag_S, *tag_N, *tag_M, *tag_L, *tag_BOOL, *tag_NULL, *tag_SS, *tag_NS, *tag_B, *tag_BS;

static PyObject *fast_value_impl(PyObject *av);

static inline int
tag_is(PyObject *tag, PyObject *want)
{
    if (tag == want) {
        return 1;
    }
    /* orjson usually hands out the same key object, but not always: compare the text. */
    return PyUnicode_GET_LENGTH(tag) == PyUnicode_GET_LENGTH(want) && PyUnicode_Compare(tag, want) == 0;
}

static PyObject *
fast_map_impl(PyObject *m)
{
    PyObject *out, *name, *av, *value;
    Py_ssize_t pos = 0;

    if (!PyDict_CheckExact(m)) {
        PyErr_SetString(PyExc_TypeError, "attribute map must be a dict");
        return NULL;
    }
    if (Py_EnterRecursiveCall(" while unmarshalling an AttributeValue")) {
        return NULL;
    }
    out = PyDict_New();
    if (out == NULL) {
        goto fail;
    }
    while (PyDict_Next(m, &pos, &name, &av)) {
        value = fast_value_impl(av);
        if (value == NULL) {
            goto fail;
        }
        if (PyDict_SetItem(out, name, value) < 0) {
            Py_DECREF(value);
            goto fail;
        }
        Py_DECREF(value);
    }
    Py_LeaveRecursiveCall();
    return out;
fail:
    Py_XDECREF(out);
    Py_LeaveRecursiveCall();
    return NULL;
}

static PyObject *
fast_list_impl(PyObject *v)
{
    Py_ssize_t i, n = PyList_GET_SIZE(v);
    PyObject *out, *item;

    if (Py_EnterRecursiveCall(" while unmarshalling an AttributeValue")) {
        return NULL;
    }
    out = PyList_New(n);
    if (out == NULL) {
        Py_LeaveRecursiveCall();
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (i >= PyList_GET_SIZE(v)) { /* the input list was changed under us: not a real record */
            PyErr_SetString(PyExc_RuntimeError, "list changed size");
            goto fail;
        }
        item = fast_value_impl(PyList_GET_ITEM(v, i));
        if (item == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(out, i, item);
    }
    Py_LeaveRecursiveCall();
    return out;
fail:
    Py_DECREF(out);
    Py_LeaveRecursiveCall();
    return NULL;
}

/* A DynamoDB set on the wire: a non-empty list of strings (SS, and NS before conversion). */
static int
nonempty_strings(PyObject *v)
{
    Py_ssize_t i, n = PyList_GET_SIZE(v);

    if (n == 0) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        if (!PyUnicode_CheckExact(PyList_GET_ITEM(v, i))) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
string_set(PyObject *v)
{
    if (!nonempty_strings(v)) {
        return NULL; /* no exception set: the caller falls back */
    }
    return PySet_New(v);
}

static PyObject *
number(PyObject *v)
{
    PyObject *d = PyDict_GetItemWithError(number_cache, v);

    if (d != NULL) {
        return Py_NewRef(d);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_CallOneArg(number_fn, v);
}

/* Base64 text -> bytes, for exactly the inputs base64.b64decode(v, validate=True) accepts with
 * nothing to say: ASCII, a length that is a multiple of 4, only the standard alphabet, at
 * most two '=' and only at the end. Like it (binascii in non-strict mode), the unused low
 * bits of the last character are ignored. Anything else returns NULL without an exception,
 * and the caller falls back to the checked converter, which accepts or explains. */
static const signed char b64_value[256] = {
    ['A'] = 1, ['B'] = 2, ['C'] = 3, ['D'] = 4, ['E'] = 5, ['F'] = 6, ['G'] = 7, ['H'] = 8, ['I'] = 9,
    ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14, ['O'] = 15, ['P'] = 16, ['Q'] = 17,
    ['R'] = 18, ['S'] = 19, ['T'] = 20, ['U'] = 21, ['V'] = 22, ['W'] = 23, ['X'] = 24, ['Y'] = 25,
    ['Z'] = 26, ['a'] = 27, ['b'] = 28, ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32, ['g'] = 33,
    ['h'] = 34, ['i'] = 35, ['j'] = 36, ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41,
    ['p'] = 42, ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48, ['w'] = 49,
    ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54, ['2'] = 55, ['3'] = 56, ['4'] = 57,
    ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['+'] = 63, ['/'] = 64,
}; /* value + 1; 0: not in the alphabet */

static PyObject *
binary(PyObject *v)
{
    Py_ssize_t n, pad = 0, data, i, o = 0;
    const unsigned char *s;
    unsigned char *out;
    unsigned int acc = 0;
    int bits = 0;
    PyObject *result;

    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) {
        return NULL;
    }
    n = PyUnicode_GET_LENGTH(v);
    s = PyUnicode_1BYTE_DATA(v);
    if (n % 4 != 0) {
        return NULL;
    }
    while (pad < 2 && pad < n && s[n - 1 - pad] == '=') {
        pad++;
    }
    data = n - pad;
    if (pad && data % 4 < 2) { /* "====", "Q===": the checked path explains */
        return NULL;
    }
    result = PyBytes_FromStringAndSize(NULL, data * 3 / 4);
    if (result == NULL) {
        return NULL;
    }
    out = (unsigned char *)PyBytes_AS_STRING(result);
    for (i = 0; i < data; i++) {
        int value = b64_value[s[i]];
        if (value == 0) {
            Py_DECREF(result);
            return NULL;
        }
        acc = (acc << 6) | (unsigned int)(value - 1);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    return result;
}

/* NS and BS: a wire set (a non-empty list of strings) -> a set of each string converted.
 * NULL without an exception when an element is not a string or `convert` gives up
 * (binary() does, on unusual base64): the caller falls back to the checked converter. */
static PyObject *
converted_set(PyObject *v, PyObject *(*convert)(PyObject *))
{
    Py_ssize_t i, n = PyList_GET_SIZE(v);
    PyObject *out, *item;

    if (!nonempty_strings(v)) {
        return NULL;
    }
    out = PySet_New(NULL);
    if (out == NULL) {
        return NULL;
    }
    for (i = 0; i < n && i < PyList_GET_SIZE(v); i++) {
        item = convert(PyList_GET_ITEM(v, i));
        if (item == NULL || PySet_Add(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *
fast_value_impl(PyObject *av)
{
    PyObject *tag, *v, *d;
    Py_ssize_t pos = 0;

    if (!PyDict_CheckExact(av) || PyDict_GET_SIZE(av) != 1) {
        return PyObject_CallOneArg(value_fn, av);
    }
    PyDict_Next(av, &pos, &tag, &v);
    if (!PyUnicode_CheckExact(tag)) {
        return PyObject_CallOneArg(value_fn, av);
    }
    if (tag_is(tag, tag_S)) {
        if (PyUnicode_CheckExact(v)) {
            return Py_NewRef(v);
        }
    }
    else if (tag_is(tag, tag_N)) {
        if (PyUnicode_CheckExact(v)) {
            return number(v);
        }
    }
    else if (tag_is(tag, tag_M)) {
        if (PyDict_CheckExact(v)) {
            return fast_map_impl(v);
        }
    }
    else if (tag_is(tag, tag_L)) {
        if (PyList_CheckExact(v)) {
            return fast_list_impl(v);
        }
    }
    else if (tag_is(tag, tag_BOOL)) {
        if (PyBool_Check(v)) {
            return Py_NewRef(v);
        }
    }
    else if (tag_is(tag, tag_NULL)) {
        if (v == Py_True) {
            Py_RETURN_NONE;
        }
    }
    else if (tag_is(tag, tag_SS)) {
        if (PyList_CheckExact(v)) {
            d = string_set(v);
            if (d != NULL || PyErr_Occurred()) {
                return d;
            }
        }
    }
    else if (tag_is(tag, tag_NS)) {
        if (PyList_CheckExact(v)) {
            d = converted_set(v, number);
            if (d != NULL || PyErr_Occurred()) {
                return d;
            }
        }
    }
    else if (tag_is(tag, tag_B)) {
        d = binary(v);
        if (d != NULL || PyErr_Occurred()) {
            return d;
        }
    }
    else if (tag_is(tag, tag_BS)) {
        if (PyList_CheckExact(v)) {
            d = converted_set(v, binary);
            if (d != NULL || PyErr_Occurred()) {
                return d;
            }
        }
    }
    return PyObject_CallOneArg(value_fn, av);
}

static int
configured(void)
{
    if (number_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "orders_cdc._avfast.configure() was not called");
        return 0;
    }
    return 1;
}

static PyObject *
fast_map(PyObject *self, PyObject *m)
{
    return configured() ? fast_map_impl(m) : NULL;
}

static PyObject *
fast_value(PyObject *self, PyObject *av)
{
    return configured() ? fast_value_impl(av) : NULL;
}

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *n, *v, *cache;

    if (!PyArg_ParseTuple(args, "OOO!:configure", &n, &v, &PyDict_Type, &cache)) {
        return NULL;
    }
    if (!PyCallable_Check(n) || !PyCallable_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "number_fn and value_fn must be callable");
        return NULL;
    }
    Py_XSETREF(number_fn, Py_NewRef(n));
    Py_XSETREF(value_fn, Py_NewRef(v));
    Py_XSETREF(number_cache, Py_NewRef(cache));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(number_fn, value_fn, number_cache): the Python helpers the fast path defers to"},
    {"fast_map", fast_map, METH_O, "{name: AttributeValue} -> {name: value} (happy path only)"},
    {"fast_value", fast_value, METH_O, "AttributeValue -> value (happy path only)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_avfast", "The AttributeValue fast path of orders_cdc.attrvalue, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__avfast(void)
{
    tag_S = PyUnicode_InternFromString("S");
    tag_N = PyUnicode_InternFromString("N");
    tag_M = PyUnicode_InternFromString("M");
    tag_L = PyUnicode_InternFromString("L");
    tag_BOOL = PyUnicode_InternFromString("BOOL");
    tag_NULL = PyUnicode_InternFromString("NULL");
    tag_SS = PyUnicode_InternFromString("SS");
    tag_NS = PyUnicode_InternFromString("NS");
    tag_B = PyUnicode_InternFromString("B");
    tag_BS = PyUnicode_InternFromString("BS");
    if (!tag_S || !tag_N || !tag_M || !tag_L || !tag_BOOL || !tag_NULL || !tag_SS || !tag_NS || !tag_B || !tag_BS) {
        return NULL;
    }
    return PyModule_Create(&module);
}
