/*
 * Compiled fast path of the circuit breaker (veritas_resilience/circuit_breaker.py).
 *
 * A decorated `async def` normally costs a second coroutine per call: the wrapper's own. That
 * frame alone costs more than the whole breaker logic. Here the wrapper is a C callable that
 * returns a small awaitable (a `Call`) driving the wrapped coroutine directly, with the
 * semantics of an `async def` wrapper:
 *
 *   - nothing is admitted until the first step of the await;
 *   - while the breaker is on its fast path (CLOSED), the wrapped coroutine is created when the
 *     wrapper is called, as it would be without the breaker; otherwise the arguments are kept
 *     and the wrapped function is called only once the breaker admits the call, so a rejection
 *     creates no coroutine at all;
 *   - results and errors are reported to the breaker's Python methods; only the CLOSED success
 *     path and the plain OPEN rejection are decided here.
 *
 * All policy stays in Python. The breaker tells its Core which path calls take whenever that
 * changes (Core.set_path: its generation while the CLOSED fast path applies; the time it may
 * half-open while OPEN with no hook to tell of rejections; else None), and provides
 *   _failures, _acquire(),
 *   _on_result(permit, value), _on_exception(permit, exc), _fast_success_reset(gen)
 * _observe(start) and, read once into a Core: _n_success, _n_rejected (itertools.count), _now,
 * _name, _record_duration.
 * circuit_breaker.py works in pure Python when this module is missing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

#if PY_VERSION_HEX < 0x030A0000
#error "veritas_resilience._speedups needs Python 3.10 or newer"
#endif

static PyObject *s_failures, *s_now,
    *s_acquire, *s_on_result, *s_on_exception, *s_fast_success_reset, *s_n_success,
    *s_n_rejected, *s_name, *s_close, *s_throw, *s_qualname, *s_open_text,
    *s_record_duration, *s_observe, *s_call_sync;
static PyObject *g_closed_state = NULL; /* CircuitState.CLOSED */
static PyObject *g_open_error = NULL;   /* CircuitOpenError */

/* ---------------------------------------------------------------------------------------- */
/* helpers that work the same on Python 3.10 to 3.14                                         */

static PyObject *
fetch_exception(void)
{
    /* The raised exception (new reference, normalized, traceback attached); clears it. */
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static void
restore_exception(PyObject *exc)
{
    /* Raises `exc` again; steals the reference. */
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, tb);
#endif
}

static int
get_optional_attr(PyObject *obj, PyObject *name, PyObject **result)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}

static PyObject *
call_method0(PyObject *obj, PyObject *name)
{
    PyObject *argv[2] = {NULL, obj};
    return PyObject_VectorcallMethod(name, argv + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *
call_method1(PyObject *obj, PyObject *name, PyObject *a)
{
    PyObject *argv[3] = {NULL, obj, a};
    return PyObject_VectorcallMethod(name, argv + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *
call_method2(PyObject *obj, PyObject *name, PyObject *a, PyObject *b)
{
    PyObject *argv[4] = {NULL, obj, a, b};
    return PyObject_VectorcallMethod(name, argv + 1, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static int
set_stop_iteration(PyObject *value)
{
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (exc == NULL) {
        return -1;
    }
    PyErr_SetObject(PyExc_StopIteration, exc);
    Py_DECREF(exc);
    return 0;
}

/* Call `obj.close()` if it has one; -1 with an error set if that raised. */
static int
close_awaitable(PyObject *obj)
{
    PyObject *close = NULL;
    if (get_optional_attr(obj, s_close, &close) < 0) {
        return -1;
    }
    if (close == NULL) {
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* The iterator `await awaitable` drives. New reference or NULL. */
static PyObject *
await_iter(PyObject *awaitable)
{
    if (PyCoro_CheckExact(awaitable)) {
        return Py_NewRef(awaitable);
    }
    PyAsyncMethods *am = Py_TYPE(awaitable)->tp_as_async;
    if (am == NULL || am->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(awaitable)->tp_name);
        return NULL;
    }
    PyObject *it = am->am_await(awaitable);
    if (it == NULL) {
        return NULL;
    }
    if (PyCoro_CheckExact(it) || !PyIter_Check(it)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned %s",
                     PyCoro_CheckExact(it) ? "a coroutine" : "a non-iterator");
        Py_DECREF(it);
        return NULL;
    }
    return it;
}

/* ---------------------------------------------------------------------------------------- */
/* Core: what a call needs from its breaker, read once                                      */

typedef struct {
    PyObject_HEAD
    PyObject *breaker;
    PyObject *n_success; /* itertools.count: next() is one C call, exact across threads */
    PyObject *n_rejected;
    PyObject *now; /* the clock's monotonic() */
    PyObject *name;
    int timed;          /* the duration histogram is on */
    Py_ssize_t path;    /* the generation on the CLOSED fast path, PATH_OPEN or PATH_PYTHON */
    double open_until;  /* with PATH_OPEN: when the breaker may half-open */
} CoreObject;

enum { PATH_PYTHON = -1, PATH_OPEN = -3 };

static PyTypeObject Core_Type;

static PyObject *
Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *breaker;
    if (!PyArg_ParseTuple(args, "O:Core", &breaker)) {
        return NULL;
    }
    CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->breaker = Py_NewRef(breaker);
    self->path = PATH_PYTHON;
    self->open_until = 0.0;
    self->n_success = PyObject_GetAttr(breaker, s_n_success);
    self->n_rejected = self->n_success ? PyObject_GetAttr(breaker, s_n_rejected) : NULL;
    self->now = self->n_rejected ? PyObject_GetAttr(breaker, s_now) : NULL;
    self->name = self->now ? PyObject_GetAttr(breaker, s_name) : NULL;
    PyObject *timed = self->name ? PyObject_GetAttr(breaker, s_record_duration) : NULL;
    self->timed = timed ? PyObject_IsTrue(timed) : -1;
    Py_XDECREF(timed);
    if (self->timed < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
Core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->breaker);
    Py_VISIT(self->n_success);
    Py_VISIT(self->n_rejected);
    Py_VISIT(self->now);
    Py_VISIT(self->name);
    return 0;
}

static int
Core_clear(CoreObject *self)
{
    Py_CLEAR(self->breaker);
    Py_CLEAR(self->n_success);
    Py_CLEAR(self->n_rejected);
    Py_CLEAR(self->now);
    Py_CLEAR(self->name);
    return 0;
}

static void
Core_dealloc(CoreObject *self)
{
    PyObject_GC_UnTrack(self);
    Core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *deferred_call(CoreObject *core, PyObject *fn, PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames);

static PyObject *
Core_call(CoreObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "call() needs the function to call");
        return NULL;
    }
    return deferred_call(self, args[0], args + 1, nargs - 1, kwnames);
}

static PyObject *
Core_set_path(CoreObject *self, PyObject *path)
{
    if (path == Py_None) {
        self->path = PATH_PYTHON;
    }
    else if (PyFloat_Check(path)) {
        self->open_until = PyFloat_AS_DOUBLE(path);
        self->path = PATH_OPEN;
    }
    else {
        Py_ssize_t gen = PyLong_AsSsize_t(path);
        if (gen == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (gen < 0) {
            PyErr_SetString(PyExc_ValueError, "a generation is >= 0");
            return NULL;
        }
        self->path = gen;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Core_methods[] = {
    {"set_path", (PyCFunction)Core_set_path, METH_O,
     "set_path(path): the generation (int) on the CLOSED fast path, the time the breaker may "
     "half-open (float) while OPEN with no hook to tell of rejections, or None."},
    {"call", (PyCFunction)(void (*)(void))Core_call, METH_FASTCALL | METH_KEYWORDS,
     "call(fn, /, *args, **kwargs): await fn(*args, **kwargs) through the breaker; fn is "
     "called only once the breaker admits the call."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Core_members[] = {
    {"breaker", T_OBJECT, offsetof(CoreObject, breaker), READONLY, "The breaker."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Core_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "veritas_resilience._speedups.Core",
    .tp_doc = "Core(breaker): the parts of a breaker the compiled path reads once.",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Core_new,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
};

/* ---------------------------------------------------------------------------------------- */
/* Call: one call through a breaker, awaited once                                           */

enum { CALL_NEW = 0, CALL_RUNNING = 1, CALL_DONE = 2 };

typedef struct {
    PyObject_HEAD
    CoreObject *core;
    PyObject *awaitable; /* what the wrapped function returned, until the call starts */
    PyObject *fn;        /* or: fn(*args, **kwargs) to call once admitted */
    PyObject *args;
    PyObject *kwargs;
    PyObject *iter;   /* the iterator being driven, once started */
    PyObject *permit; /* the Python path's permit; NULL on the fast path */
    PyObject *start;  /* the fast path's start time, when the histogram is on */
    Py_ssize_t gen;   /* the fast path's generation */
    int status;
} CallObject;

static PyTypeObject Call_Type;

static CallObject *
call_alloc(CoreObject *core)
{
    CallObject *self = PyObject_GC_New(CallObject, &Call_Type);
    if (self == NULL) {
        return NULL;
    }
    self->core = (CoreObject *)Py_NewRef(core);
    self->awaitable = self->fn = self->args = self->kwargs = NULL;
    self->iter = self->permit = self->start = NULL;
    self->gen = -1;
    self->status = CALL_NEW;
    PyObject_GC_Track(self);
    return self;
}

static int
Call_traverse(CallObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->core);
    Py_VISIT(self->awaitable);
    Py_VISIT(self->fn);
    Py_VISIT(self->args);
    Py_VISIT(self->kwargs);
    Py_VISIT(self->iter);
    Py_VISIT(self->permit);
    Py_VISIT(self->start);
    return 0;
}

static int
Call_clear(CallObject *self)
{
    Py_CLEAR(self->core);
    Py_CLEAR(self->awaitable);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->args);
    Py_CLEAR(self->kwargs);
    Py_CLEAR(self->iter);
    Py_CLEAR(self->permit);
    Py_CLEAR(self->start);
    return 0;
}

static void
Call_dealloc(CallObject *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    Call_clear(self);
    PyObject_GC_Del(self);
}

/* The permit the Python side expects for a fast-path call: (gen, 0, CLOSED, start). */
static PyObject *
fast_permit(Py_ssize_t generation, PyObject *start)
{
    PyObject *gen = PyLong_FromSsize_t(generation);
    if (gen == NULL) {
        return NULL;
    }
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) {
        Py_DECREF(gen);
        return NULL;
    }
    PyObject *permit = PyTuple_Pack(4, gen, zero, g_closed_state, start ? start : Py_None);
    Py_DECREF(gen);
    Py_DECREF(zero);
    return permit;
}

/* A call ended with the exception now raised: report it to the breaker and leave it raised.
 * `permit` is the Python path's permit, or NULL for the fast path at `gen`. */
static void
report_exception(CoreObject *core, PyObject *permit, Py_ssize_t gen, PyObject *start)
{
    PyObject *exc = fetch_exception();
    if (exc == NULL) {
        return;
    }
    permit = permit != NULL ? Py_NewRef(permit) : fast_permit(gen, start);
    PyObject *r = NULL;
    if (permit != NULL) {
        r = call_method2(core->breaker, s_on_exception, permit, exc);
        Py_DECREF(permit);
    }
    if (r == NULL) {
        /* Reporting failed: raise that error, with the call's own as its context. */
        PyObject *failure = fetch_exception();
        if (failure != NULL) {
            PyException_SetContext(failure, exc);
            restore_exception(failure);
        }
        else {
            restore_exception(exc);
        }
        return;
    }
    Py_DECREF(r);
    restore_exception(exc);
}

/* A fast-path call at `gen` succeeded. -1 with an error set if reporting failed. */
static int
report_fast_success(CoreObject *core, Py_ssize_t gen, PyObject *start)
{
    PyObject *breaker = core->breaker;
    if (start != NULL) {
        PyObject *r = call_method1(breaker, s_observe, start);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
    }
    PyObject *counted = PyIter_Next(core->n_success);
    if (counted == NULL) {
        return -1;
    }
    Py_DECREF(counted);
    PyObject *failures = PyObject_GetAttr(breaker, s_failures);
    if (failures == NULL) {
        return -1;
    }
    int nonzero = PyObject_IsTrue(failures);
    Py_DECREF(failures);
    if (nonzero < 0) {
        return -1;
    }
    if (nonzero) {
        PyObject *generation = PyLong_FromSsize_t(gen);
        if (generation == NULL) {
            return -1;
        }
        PyObject *r = call_method1(breaker, s_fast_success_reset, generation);
        Py_DECREF(generation);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
    }
    return 0;
}

static void
record_exception(CallObject *self)
{
    report_exception(self->core, self->permit, self->gen, self->start);
}

/* The call returned `value` (borrowed). -1 with an error set if reporting failed. */
static int
record_result(CallObject *self, PyObject *value)
{
    if (self->permit != NULL) {
        PyObject *r = call_method2(self->core->breaker, s_on_result, self->permit, value);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
        return 0;
    }
    return report_fast_success(self->core, self->gen, self->start);
}

/* Drop what an unstarted call holds, closing a coroutine so that it warns of nothing. */
static void
discard_unstarted(CallObject *self)
{
    PyObject *awaitable = self->awaitable;
    self->awaitable = NULL;
    Py_CLEAR(self->fn);
    Py_CLEAR(self->args);
    Py_CLEAR(self->kwargs);
    if (awaitable == NULL) {
        return;
    }
    if (PyCoro_CheckExact(awaitable)) {
        PyObject *exc = PyErr_Occurred() ? fetch_exception() : NULL;
        if (close_awaitable(awaitable) < 0) {
            PyErr_WriteUnraisable(awaitable);
        }
        if (exc != NULL) {
            restore_exception(exc);
        }
    }
    Py_DECREF(awaitable);
}

/* Raise the rejection of an open breaker at time `now` (reopening at `reopen_at`), when no
 * hook wants to hear of it: count it and raise CircuitOpenError(name, "open", retry_after). */
static void
reject_open(CoreObject *core, double now, double reopen_at)
{
    PyObject *counted = PyIter_Next(core->n_rejected);
    if (counted == NULL) {
        return;
    }
    Py_DECREF(counted);
    PyObject *retry_after = PyFloat_FromDouble(reopen_at - now);
    if (retry_after == NULL) {
        return;
    }
    PyObject *args = PyTuple_Pack(3, core->name, s_open_text, retry_after);
    Py_DECREF(retry_after);
    if (args == NULL) {
        return;
    }
    /* CircuitOpenError has no __init__ of its own: BaseException's __new__ keeps the args, and
     * calling it directly skips the type call and an __init__ that would only set them again. */
    PyTypeObject *cls = (PyTypeObject *)g_open_error;
    PyObject *err = cls->tp_new(cls, args, NULL);
    Py_DECREF(args);
    if (err == NULL) {
        return;
    }
    PyErr_SetObject((PyObject *)Py_TYPE(err), err);
    Py_DECREF(err);
}

/* While OPEN with no hook to tell: 1 (with CircuitOpenError raised) if the breaker rejects now,
 * 0 if its open time is over (Python then half-opens it), -1 on another error. */
static int
rejected_while_open(CoreObject *core)
{
    double reopen_at = core->open_until;
    PyObject *t = PyObject_CallNoArgs(core->now);
    if (t == NULL) {
        return -1;
    }
    double now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    if (now == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (now < reopen_at) {
        reject_open(core, now, reopen_at);
        return 1;
    }
    return 0;
}

/* Admit the call (the first step of the await). -1 with an error set when rejected. */
static int
admit(CallObject *self)
{
    CoreObject *core = self->core;
    PyObject *breaker = core->breaker;
    Py_ssize_t gen = core->path;
    if (gen >= 0) {
        self->gen = gen;
        if (core->timed) {
            self->start = PyObject_CallNoArgs(core->now);
            if (self->start == NULL) {
                return -1;
            }
        }
        return 0;
    }
    if (gen == PATH_OPEN && rejected_while_open(core)) {
        return -1;
    }
    /* Everything else (half-open, forced open, the slow policies, hooks) is decided in Python. */
    PyObject *permit = call_method0(breaker, s_acquire);
    if (permit == NULL) {
        return -1;
    }
    self->permit = permit;
    return 0;
}

/* Start the call: admit it, then find what to drive. -1 with an error set on failure (an
 * error from calling the function is reported as the call's outcome). */
static int
start(CallObject *self)
{
    if (admit(self) < 0) {
        self->status = CALL_DONE;
        discard_unstarted(self);
        return -1;
    }
    self->status = CALL_RUNNING;
    PyObject *awaitable = self->awaitable;
    self->awaitable = NULL;
    if (awaitable == NULL) {
        awaitable = PyObject_Call(self->fn, self->args, self->kwargs);
        Py_CLEAR(self->fn);
        Py_CLEAR(self->args);
        Py_CLEAR(self->kwargs);
    }
    if (awaitable != NULL) {
        self->iter = await_iter(awaitable);
        Py_DECREF(awaitable);
    }
    if (self->iter == NULL) {
        self->status = CALL_DONE;
        record_exception(self);
        return -1;
    }
    return 0;
}

/* The driven iterator finished with `r`: report the outcome. */
static PySendResult
finish(CallObject *self, PySendResult r, PyObject **presult)
{
    self->status = CALL_DONE;
    Py_CLEAR(self->iter);
    if (r == PYGEN_RETURN) {
        if (record_result(self, *presult) < 0) {
            Py_CLEAR(*presult);
            return PYGEN_ERROR;
        }
        return PYGEN_RETURN;
    }
    record_exception(self);
    return PYGEN_ERROR;
}

static PySendResult
Call_am_send(CallObject *self, PyObject *arg, PyObject **presult)
{
    *presult = NULL;
    if (self->status != CALL_RUNNING) {
        if (self->status == CALL_DONE) {
            PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
            return PYGEN_ERROR;
        }
        if (arg != Py_None) {
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        if (start(self) < 0) {
            return PYGEN_ERROR;
        }
    }
    PySendResult r = PyIter_Send(self->iter, arg, presult);
    if (r == PYGEN_NEXT) {
        return r;
    }
    return finish(self, r, presult);
}

static PyObject *
Call_iternext(CallObject *self)
{
    PyObject *result;
    PySendResult r = Call_am_send(self, Py_None, &result);
    if (r == PYGEN_NEXT) {
        return result;
    }
    if (r == PYGEN_RETURN) {
        if (result == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        else {
            set_stop_iteration(result);
        }
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
Call_send(CallObject *self, PyObject *arg)
{
    PyObject *result;
    PySendResult r = Call_am_send(self, arg, &result);
    if (r == PYGEN_NEXT) {
        return result;
    }
    if (r == PYGEN_RETURN) {
        set_stop_iteration(result);
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
Call_throw(CallObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    if (self->status != CALL_RUNNING) {
        /* Like a coroutine thrown into before it started: raise it here, count nothing. */
        self->status = CALL_DONE;
        discard_unstarted(self);
        PyObject *typ = args[0];
        if (PyExceptionInstance_Check(typ)) {
            PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        }
        else if (PyExceptionClass_Check(typ)) {
            PyObject *value = nargs > 1 ? args[1] : Py_None;
            PyObject *tb = nargs > 2 && args[2] != Py_None ? args[2] : NULL;
            PyErr_Restore(Py_NewRef(typ), Py_NewRef(value), Py_XNewRef(tb));
            restore_exception(fetch_exception());
        }
        else {
            PyErr_SetString(PyExc_TypeError,
                            "exceptions must be classes or instances deriving from "
                            "BaseException");
        }
        return NULL;
    }
    PyObject *argv[5] = {NULL, self->iter, NULL, NULL, NULL};
    for (Py_ssize_t i = 0; i < nargs; i++) {
        argv[i + 2] = args[i];
    }
    PyObject *result = PyObject_VectorcallMethod(
        s_throw, argv + 1, (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (result != NULL) {
        return result; /* the driven coroutine handled it and is suspended again */
    }
    PyObject *value = NULL;
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *stop = fetch_exception();
        value = PyObject_GetAttrString(stop, "value");
        Py_DECREF(stop);
        if (value != NULL) {
            if (finish(self, PYGEN_RETURN, &value) == PYGEN_RETURN) {
                set_stop_iteration(value);
                Py_DECREF(value);
            }
            return NULL;
        }
    }
    finish(self, PYGEN_ERROR, &value);
    return NULL;
}

/* close(): the call is abandoned. The driven coroutine gets GeneratorExit, and so does the
 * breaker: neither success nor failure, and a half-open slot is given back. */
static PyObject *
Call_close(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->status != CALL_RUNNING) {
        self->status = CALL_DONE;
        discard_unstarted(self);
        Py_RETURN_NONE;
    }
    PyObject *iter = self->iter;
    self->iter = NULL;
    self->status = CALL_DONE;
    int closed = close_awaitable(iter);
    Py_DECREF(iter);
    if (closed < 0) {
        record_exception(self);
        return NULL;
    }
    PyErr_SetNone(PyExc_GeneratorExit);
    record_exception(self);
    PyObject *exc = fetch_exception();
    if (exc == NULL || PyErr_GivenExceptionMatches(exc, PyExc_GeneratorExit)) {
        Py_XDECREF(exc);
        Py_RETURN_NONE;
    }
    restore_exception(exc); /* reporting failed: say so */
    return NULL;
}

static void
Call_finalize(CallObject *self)
{
    /* An unstarted call is left alone: the wrapped coroutine's own finalizer then warns that
     * it was never awaited, as it would without the breaker. */
    if (self->status != CALL_RUNNING) {
        return;
    }
    PyObject *exc = PyErr_Occurred() ? fetch_exception() : NULL;
    PyObject *r = Call_close(self, NULL);
    if (r == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    else {
        Py_DECREF(r);
    }
    if (exc != NULL) {
        restore_exception(exc);
    }
}

static PyObject *
Call_await(CallObject *self)
{
    return Py_NewRef(self);
}

static PyObject *
Call_repr(CallObject *self)
{
    static const char *const names[] = {"pending", "running", "done"};
    return PyUnicode_FromFormat("<call through circuit breaker %R (%s) at %p>",
                                self->core ? self->core->name : Py_None, names[self->status],
                                self);
}

static PyObject *
Call_get_breaker(CallObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->core ? self->core->breaker : Py_None);
}

static PyObject *
Call_get_cr_await(CallObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->iter != NULL ? self->iter : Py_None);
}

static PyObject *
Call_get_cr_running(CallObject *self, void *Py_UNUSED(closure))
{
    Py_RETURN_FALSE;
}

static PyMethodDef Call_methods[] = {
    {"send", (PyCFunction)Call_send, METH_O, "send(value): the next value the call yields."},
    {"throw", (PyCFunction)(void (*)(void))Call_throw, METH_FASTCALL,
     "throw(exc): raise an exception inside the call."},
    {"close", (PyCFunction)Call_close, METH_NOARGS, "close(): abandon the call."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Call_getset[] = {
    {"breaker", (getter)Call_get_breaker, NULL, "The breaker the call goes through.", NULL},
    {"cr_await", (getter)Call_get_cr_await, NULL, "What the call is awaiting, or None.", NULL},
    {"cr_running", (getter)Call_get_cr_running, NULL, "False between steps.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyAsyncMethods Call_as_async = {
    .am_await = (unaryfunc)Call_await,
    .am_send = (sendfunc)Call_am_send,
};

static PyTypeObject Call_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "veritas_resilience._speedups.Call",
    .tp_doc = "One call through a circuit breaker; a coroutine to await once.",
    .tp_basicsize = sizeof(CallObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)Call_dealloc,
    .tp_finalize = (destructor)Call_finalize,
    .tp_traverse = (traverseproc)Call_traverse,
    .tp_clear = (inquiry)Call_clear,
    .tp_as_async = &Call_as_async,
    .tp_iternext = (iternextfunc)Call_iternext,
    .tp_methods = Call_methods,
    .tp_getset = Call_getset,
    .tp_repr = (reprfunc)Call_repr,
};

/* A call that calls fn(*args, **kwnames-values) only once admitted. */
static PyObject *
deferred_call(CoreObject *core, PyObject *fn, PyObject *const *args, Py_ssize_t nargs,
              PyObject *kwnames)
{
    CallObject *call = call_alloc(core);
    if (call == NULL) {
        return NULL;
    }
    call->fn = Py_NewRef(fn);
    call->args = PyTuple_New(nargs);
    if (call->args == NULL) {
        Py_DECREF(call);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(call->args, i, Py_NewRef(args[i]));
    }
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        call->kwargs = PyDict_New();
        if (call->kwargs == NULL) {
            Py_DECREF(call);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            if (PyDict_SetItem(call->kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) <
                0) {
                Py_DECREF(call);
                return NULL;
            }
        }
    }
    return (PyObject *)call;
}

/* ---------------------------------------------------------------------------------------- */
/* Guarded: an `async def` decorated with a breaker                                           */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    CoreObject *core;
    PyObject *fn;
    PyObject *dict;
    PyObject *weakreflist;
} GuardedObject;

static PyObject *
Guarded_vectorcall(GuardedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->core->path < 0) {
        return deferred_call(self->core, self->fn, args, PyVectorcall_NARGS(nargsf), kwnames);
    }
    PyObject *coro = PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    if (coro == NULL) {
        return NULL;
    }
    CallObject *call = call_alloc(self->core);
    if (call == NULL) {
        Py_DECREF(coro);
        return NULL;
    }
    call->awaitable = coro;
    return (PyObject *)call;
}

/* A plain function through the breaker: the CLOSED fast path and the plain OPEN rejection
 * here, everything else through the breaker's call_sync(). */
static PyObject *
Guarded_sync_vectorcall(GuardedObject *self, PyObject *const *args, size_t nargsf,
                        PyObject *kwnames)
{
    CoreObject *core = self->core;
    Py_ssize_t gen = core->path;
    if (gen >= 0 && !core->timed) {
        PyObject *result = PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
        if (result == NULL) {
            report_exception(core, NULL, gen, NULL);
            return NULL;
        }
        if (report_fast_success(core, gen, NULL) < 0) {
            Py_DECREF(result);
            return NULL;
        }
        return result;
    }
    if (gen == PATH_OPEN) {
        int rejected = rejected_while_open(core);
        if (rejected) {
            return NULL;
        }
    }
    /* breaker.call_sync(fn, *args, **kwargs) */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t total = nargs + nkw;
    PyObject *small[8];
    PyObject **argv = total + 3 <= 8 ? small : PyMem_Malloc((size_t)(total + 3) * sizeof(PyObject *));
    if (argv == NULL) {
        return PyErr_NoMemory();
    }
    argv[1] = core->breaker;
    argv[2] = self->fn;
    for (Py_ssize_t i = 0; i < total; i++) {
        argv[i + 3] = args[i];
    }
    PyObject *result = PyObject_VectorcallMethod(
        s_call_sync, argv + 1, (size_t)(nargs + 2) | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
    if (argv != small) {
        PyMem_Free(argv);
    }
    return result;
}

static PyObject *
Guarded_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"core", "fn", "sync", NULL};
    PyObject *core, *fn;
    int sync = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O|$p:Guarded", kwlist, &Core_Type, &core,
                                     &fn, &sync)) {
        return NULL;
    }
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "fn must be callable");
        return NULL;
    }
    GuardedObject *self = (GuardedObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall =
        (vectorcallfunc)(sync ? Guarded_sync_vectorcall : Guarded_vectorcall);
    self->core = (CoreObject *)Py_NewRef(core);
    self->fn = Py_NewRef(fn);
    self->dict = NULL;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

static int
Guarded_traverse(GuardedObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->core);
    Py_VISIT(self->fn);
    Py_VISIT(self->dict);
    return 0;
}

static int
Guarded_clear(GuardedObject *self)
{
    Py_CLEAR(self->core);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->dict);
    return 0;
}

static void
Guarded_dealloc(GuardedObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    Guarded_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Guarded_descr_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
Guarded_repr(GuardedObject *self)
{
    PyObject *name = PyObject_GetAttr((PyObject *)self, s_qualname);
    if (name == NULL) {
        PyErr_Clear();
        name = PyObject_Repr(self->fn);
        if (name == NULL) {
            return NULL;
        }
    }
    PyObject *r = PyUnicode_FromFormat("<function %S at %p through circuit breaker %R>", name,
                                       self, self->core->name);
    Py_DECREF(name);
    return r;
}

static PyObject *
Guarded_reduce(GuardedObject *self, PyObject *Py_UNUSED(ignored))
{
    /* Pickled by reference, like a function: the module attribute of that name. */
    return PyObject_GetAttr((PyObject *)self, s_qualname);
}

static PyMethodDef Guarded_methods[] = {
    {"__reduce__", (PyCFunction)Guarded_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Guarded_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Guarded_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "veritas_resilience._speedups.Guarded",
    .tp_doc = "Guarded(core, fn, *, sync=False): a function whose calls go through a breaker "
              "(an async def; with sync=True a plain function).",
    .tp_basicsize = sizeof(GuardedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = Guarded_new,
    .tp_dealloc = (destructor)Guarded_dealloc,
    .tp_traverse = (traverseproc)Guarded_traverse,
    .tp_clear = (inquiry)Guarded_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(GuardedObject, vectorcall),
    .tp_dictoffset = offsetof(GuardedObject, dict),
    .tp_weaklistoffset = offsetof(GuardedObject, weakreflist),
    .tp_descr_get = Guarded_descr_get,
    .tp_repr = (reprfunc)Guarded_repr,
    .tp_methods = Guarded_methods,
    .tp_getset = Guarded_getset,
};

/* ---------------------------------------------------------------------------------------- */
/* module                                                                                   */

static PyObject *
mod_setup(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *closed_state, *open_error;
    if (!PyArg_ParseTuple(args, "OO!:setup", &closed_state, &PyType_Type, &open_error)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)open_error, (PyTypeObject *)PyExc_BaseException) ||
        ((PyTypeObject *)open_error)->tp_init != ((PyTypeObject *)PyExc_BaseException)->tp_init) {
        PyErr_SetString(PyExc_TypeError, "open_error must be an exception without __init__");
        return NULL;
    }
    Py_XSETREF(g_closed_state, Py_NewRef(closed_state));
    Py_XSETREF(g_open_error, Py_NewRef(open_error));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"setup", (PyCFunction)mod_setup, METH_VARARGS,
     "setup(closed_state, open_error): the breaker module's constants."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "veritas_resilience._speedups",
    .m_doc = "Compiled fast path of the circuit breaker (private).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                                                                     \
    do {                                                                                      \
        var = PyUnicode_InternFromString(text);                                              \
        if (var == NULL) {                                                                    \
            return NULL;                                                                      \
        }                                                                                     \
    } while (0)

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(s_failures, "_failures");
    INTERN(s_now, "_now");
    INTERN(s_acquire, "_acquire");
    INTERN(s_on_result, "_on_result");
    INTERN(s_on_exception, "_on_exception");
    INTERN(s_fast_success_reset, "_fast_success_reset");
    INTERN(s_n_success, "_n_success");
    INTERN(s_n_rejected, "_n_rejected");
    INTERN(s_name, "_name");
    INTERN(s_close, "close");
    INTERN(s_throw, "throw");
    INTERN(s_qualname, "__qualname__");
    INTERN(s_open_text, "open");
    INTERN(s_record_duration, "_record_duration");
    INTERN(s_observe, "_observe");
    INTERN(s_call_sync, "call_sync");
    if (PyType_Ready(&Core_Type) < 0 || PyType_Ready(&Call_Type) < 0 ||
        PyType_Ready(&Guarded_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&Core_Type) < 0 ||
        PyModule_AddObjectRef(m, "Call", (PyObject *)&Call_Type) < 0 ||
        PyModule_AddObjectRef(m, "Guarded", (PyObject *)&Guarded_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
