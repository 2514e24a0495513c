"""mconnector: services that call each other like local functions, on the standard library alone.

A re-implementation of microservices-connector 0.3.7 (Flask, Sanic, requests, websockets
underneath) as one module with no dependency but Python 3.8+.  It speaks the 0.3.7 wire
(see README.md), so old and new services can call each other in both directions.

    from mconnector import Microservice, Friend

    M = Microservice(__name__)

    @M.typing('/helloworld')
    @M.reply
    def helloworld(name):
        return 'Welcome %s' % name

    M.run()                                   # in one process
    Friend('app1', 'http://127.0.0.1:5000').send('/helloworld', 'you')   # in another

Map of this file, in the order data flows:

  1. Basics          imports, limits, the exception tree, the shared asyncio loop thread
  2. Values          the codec: Python values <-> the JSON that travels (both directions)
  3. Routing         rule patterns such as /item/<id:int>, shared by HTTP and websockets
  4. HTTP            sans-I/O request-head parsing and response building
  5. Listener        Microservice: decorators, dispatch, the threaded HTTP server
  6. Sender          Friend: keep-alive client, reply unwrapping, errors as exceptions
  7. WebSocket core  sans-I/O RFC 6455: handshake, frames, the connection state machine
  8. WebSocket I/O   SocketServer (socketserver shell) and SocketClient
  9. Pools           ordered execution per key over any concurrent.futures.Executor
 10. Command line    python -m mconnector serve | call | ws
"""

import base64
import binascii
import datetime
import decimal
import functools
import hashlib
import hmac
import inspect
import io
import json
import logging
import os
import queue
import re
import socket
import socketserver
import sys
import threading
import time
import uuid

# asyncio, ssl, multiprocessing, http.client and concurrent.futures are imported where
# they are first needed: importing this module must stay cheap (under 30 ms).

__version__ = '1.0.0'

log = logging.getLogger('mconnector')


# ###########################################################################################
# 1. Basics: the exception tree, the shared event loop
# ###########################################################################################


class MConnectorError(Exception):
    """Root of every error this module raises on purpose.

    MConnectorError
     +-- CodecError                  a value cannot be encoded or a body decoded
     +-- RouteError                  a rule pattern is malformed
     +-- RemoteError                 the remote function raised (HTTP 500); .type, .message
     +-- CallError                   the listener refused the call; .status, .message
     |    +-- BadRequest             400: body or arguments do not fit the function
     |    +-- AuthError              401: missing or wrong token
     |    +-- NotFound               404 unknown rule, 405 (subclass MethodNotAllowed)
     +-- NetworkError (also ConnectionError)
     |    +-- Unreachable            nothing listens at the address
     |    +-- CallTimeout (also TimeoutError)
     +-- WebSocketError              see section 7
    """


class CodecError(MConnectorError, ValueError):
    """A value cannot be encoded, or a body cannot be decoded."""


class RouteError(MConnectorError, ValueError):
    """A rule pattern is malformed."""


class RemoteError(MConnectorError):
    """The remote function raised; `type` and `message` are the remote exception's."""

    def __init__(self, type_name, message, rule=None, address=None, traceback=None):
        self.type = type_name
        self.message = message
        self.rule = rule
        self.address = address
        self.remote_traceback = traceback
        super().__init__(type_name, message)

    def __str__(self):
        where = ' (%s%s)' % (self.address or '', self.rule or '') if self.rule else ''
        return '%s: %s%s' % (self.type, self.message, where)


class CallError(MConnectorError):
    """The listener refused the call with an HTTP status other than 500."""

    status = None

    def __init__(self, message, status=None, rule=None, address=None):
        if status is not None:
            self.status = status
        self.message = message
        self.rule = rule
        self.address = address
        super().__init__(message)

    def __str__(self):
        where = ' (%s%s)' % (self.address or '', self.rule or '') if self.rule else ''
        return 'HTTP %s: %s%s' % (self.status, self.message, where)


class BadRequest(CallError):
    status = 400


class AuthError(CallError):
    status = 401


class NotFound(CallError):
    status = 404


class MethodNotAllowed(NotFound):
    status = 405


class NetworkError(MConnectorError, ConnectionError):
    """The call did not complete because of the network."""


class Unreachable(NetworkError):
    """Nothing answers at the address (refused, unknown host, no route)."""


class CallTimeout(NetworkError, TimeoutError):
    """No answer within the timeout."""


# Async functions from every decorator run on one event loop, in one daemon thread, so
# that they can share async resources (clients, pools) the way they would in one Sanic app.
_loop = None
_loop_lock = threading.Lock()


def _event_loop():
    """The shared asyncio loop, started on first use in a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            import asyncio
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run():
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name='mconnector-asyncio', daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def _run_coroutine(coro, timeout=None):
    """Run `coro` on the shared loop from any other thread and return its result."""
    import asyncio
    return asyncio.run_coroutine_threadsafe(coro, _event_loop()).result(timeout)


def _call(func, *args, **kwargs):
    """Call a plain or an async function from a worker thread; return its result."""
    result = func(*args, **kwargs)
    if inspect.isawaitable(result):
        result = _run_coroutine(_as_coroutine(result))
    return result


async def _as_coroutine(awaitable):
    return await awaitable


# ###########################################################################################
# 2. Values: the codec
# ###########################################################################################

# (filled in below)


# ###########################################################################################
# 3. Routing: rule patterns shared by the listener and the websocket server
# ###########################################################################################

# A rule is a path with parameters: '/user/<name>', '/item/<id:int>' (Sanic order: name, then
# type or regex) or '/item/<int:id>' (Flask order, recognised by its converter names).
_PARAM_TYPES = {
    # type: (regex, converter)
    'string': (r'[^/]+', str),
    'str': (r'[^/]+', str),
    'int': (r'-?\d+', int),
    'number': (r'-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?', float),
    'float': (r'-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?', float),
    'alpha': (r'[A-Za-z]+', str),
    'path': (r'[^/].*?', str),
    'uuid': (r'[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}',
             uuid.UUID),
}
_FLASK_CONVERTERS = {'string', 'int', 'float', 'path', 'uuid'}
_PARAM = re.compile(r'<([^<>]+)>')
_IDENTIFIER = re.compile(r'[A-Za-z_]\w*\Z')


class Rule:
    """A compiled rule pattern.

    `match(path)` returns None or a dict of the parameters, converted to their types, in
    the order they appear in the rule (the websocket server passes them positionally).
    """

    __slots__ = ('rule', 'names', 'regex', '_converters')

    def __init__(self, rule):
        if not isinstance(rule, str) or not rule.startswith('/'):
            raise RouteError('a rule is a path starting with "/", got %r' % (rule,))
        self.rule = rule
        self.names = []
        self._converters = []
        parts = []
        pos = 0
        for m in _PARAM.finditer(rule):
            parts.append(re.escape(rule[pos:m.start()]))
            name, regex, convert = self._parse_param(m.group(1))
            if name in self.names:
                raise RouteError('parameter %r appears twice in rule %r' % (name, rule))
            self.names.append(name)
            self._converters.append(convert)
            parts.append('(%s)' % regex)
            pos = m.end()
        parts.append(re.escape(rule[pos:]))
        try:
            self.regex = re.compile(''.join(parts) + r'\Z') if self.names else None
        except re.error as exc:
            raise RouteError('bad regex in rule %r: %s' % (rule, exc)) from None

    def _parse_param(self, spec):
        name, sep, kind = (s.strip() for s in spec.partition(':'))
        if sep and name in _FLASK_CONVERTERS and _IDENTIFIER.match(kind):
            name, kind = kind, name
        if not _IDENTIFIER.match(name):
            raise RouteError('bad parameter name %r in rule %r' % (name, self.rule))
        if not sep:
            kind = 'string'
        if kind in _PARAM_TYPES:
            regex, convert = _PARAM_TYPES[kind]
        else:
            # Anything else is a regex; its own groups must not shift ours.
            try:
                if re.compile(kind).groups:
                    raise RouteError('use (?:...) instead of groups in rule %r' % self.rule)
            except re.error as exc:
                raise RouteError('bad regex %r in rule %r: %s' % (kind, self.rule, exc)) from None
            regex, convert = kind, str
        return name, regex, convert

    @property
    def is_static(self):
        return self.regex is None

    def match(self, path):
        if self.regex is None:
            return {} if path == self.rule else None
        m = self.regex.match(path)
        if m is None:
            return None
        params = {}
        for name, convert, text in zip(self.names, self._converters, m.groups()):
            try:
                params[name] = convert(text)
            except ValueError:
                return None
        return params

    def __repr__(self):
        return 'Rule(%r)' % self.rule


class Router:
    """Rules to targets; static paths by dict lookup first, then patterns in order."""

    def __init__(self):
        self._static = {}
        self._patterns = []

    def add(self, rule, target):
        compiled = rule if isinstance(rule, Rule) else Rule(rule)
        if compiled.is_static:
            self._static[compiled.rule] = (compiled, target)
        else:
            self._patterns = [p for p in self._patterns if p[0].rule != compiled.rule]
            self._patterns.append((compiled, target))
        return compiled

    def find(self, path):
        """Return (target, params) for `path`, or (None, None)."""
        hit = self._static.get(path)
        if hit is not None:
            return hit[1], {}
        for compiled, target in self._patterns:
            params = compiled.match(path)
            if params is not None:
                return target, params
        return None, None

    def __iter__(self):
        for compiled, target in self._static.values():
            yield compiled, target
        yield from self._patterns

    def __len__(self):
        return len(self._static) + len(self._patterns)


# ###########################################################################################
# 4. HTTP: sans-I/O request heads and responses
# ###########################################################################################

# (filled in below)


# ###########################################################################################
# 5. Listener: Microservice
# ###########################################################################################

# (filled in below)


# ###########################################################################################
# 6. Sender: Friend
# ###########################################################################################

# (filled in below)


# ###########################################################################################
# 7. WebSocket core: sans-I/O RFC 6455
# ###########################################################################################

# (websocket core: issue 4)


# ###########################################################################################
# 8. WebSocket I/O: SocketServer and SocketClient
# ###########################################################################################

# (websocket server and client: issue 4)


# ###########################################################################################
# 9. Pools: ordered per key over any Executor
# ###########################################################################################

# Tasks that share a key must run one after another, in the order they were submitted,
# while tasks of other keys run in parallel.  The ordering lives in KeyedExecutor alone:
# it keeps one FIFO per busy key and hands the wrapped executor only the head of each FIFO;
# the next task of a key is handed over once the previous one has finished.  It needs
# nothing of the executor but `submit` and `Future.add_done_callback`, so the same ordering
# holds over threads, processes or a cluster engine's executor.
#
# Each task has two futures: the one the caller gets at once (the task may wait behind
# others of its key before the executor ever sees it) and the executor's own.  The caller's
# future turns RUNNING when the task is handed over: from then on it cannot be cancelled,
# because the executor may already be running it and cancelling it then would be a lie.
#
# Completions are settled by one thread per pool (the "settler"): the executor's callback
# only puts the task on a SimpleQueue, and the settler reports the outcome, resolves the
# caller's future and hands over the next task of the key.  Settling in the executor's own
# threads instead made every worker a submitter too: measured on CPython 3.11 with 4
# threads, they then fight over the executor's locks and the GIL at about two context
# switches per task, 3 to 7 times slower than the bare executor.  With one settler the
# keyed pool runs near the bare executor's speed, and an inline executor, which completes
# futures inside `submit`, cannot recurse through long key queues.


class PoolError(MConnectorError):
    """A task could not be accepted or handed to a pool's executor."""


class PoolClosed(PoolError, RuntimeError):
    """`submit` or `submit_id` was called after `shutdown` (a RuntimeError, as Executor's)."""


class TaskNotPicklable(PoolError, TypeError):
    """A task for a process pool cannot be pickled; its Future holds this at submit time."""


class _Task:
    __slots__ = ('pool', 'key', 'fn', 'args', 'kwargs', 'future', 'inner')

    def __init__(self, pool, key, fn, args, kwargs, future):
        # The strong reference to the pool keeps it alive while any of its tasks is in
        # the executor, even if the caller dropped the pool: queued tasks must still run.
        self.pool = pool
        self.key = key
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.future = future
        self.inner = None

    def __call__(self, inner):
        # The executor's done-callback, in whichever thread completed `inner`.
        self.inner = inner
        self.pool._done.put(self)


def _settler(pool_ref, done):
    """The loop of a pool's settler thread; holds the pool only while it has work."""
    empty = queue.Empty
    while True:
        batch = [done.get()]
        # Whatever else has completed meanwhile is settled with it, under one lock, so a
        # busy pool takes its lock once per batch rather than once per task.
        try:
            while len(batch) < _SETTLE_BATCH:
                batch.append(done.get_nowait())
        except empty:
            pass
        pool = pool_ref()
        if pool is None:
            return
        try:
            pool._settle_batch([task for task in batch if task is not None])
        except BaseException:   # the settler must survive anything a task brings
            log.exception('pool: settling tasks failed')
        if pool._closed and not pool._pending:
            pool._close_executor()
            return
        del pool, batch


# Up to this many completions are settled under one lock; a few dozen already make the
# lock's cost per task negligible, and a bound keeps the first of a batch from waiting.
_SETTLE_BATCH = 64


class KeyedExecutor:
    """Per-key ordered execution over any `concurrent.futures.Executor`.

        with KeyedExecutor(ThreadPoolExecutor(8)) as pool:
            for row in rows:
                pool.submit_id(row['id'], save, row)

    Tasks submitted with the same key run one after another in submission order, each
    starting only once the previous one has finished (whether it returned or raised);
    tasks with different keys, and tasks without a key (`submit`, or key None), run in
    parallel as the executor allows.  A key is forgotten as soon as it has nothing left
    to run, so memory follows the busy keys, not every key ever seen.

    executor       the Executor that runs the tasks (anything with `submit` returning a
                   `concurrent.futures.Future`); shut down with this pool unless
                   `shutdown_executor` is false.
    out_queue      when given, every outcome is `put` on it, in per-key order, before the
                   task's Future is resolved: the return value, or the exception object
                   the task raised.  A bounded out_queue that fills up stalls the pool.
    max_watching   at most this many tasks may be pending (submitted, not finished);
                   `submit` blocks until one finishes.  0 or None: no bound.
    check_pickle   pickle each task at submit time and fail its Future at once with
                   TaskNotPicklable if that fails; None: only for a ProcessPoolExecutor.

    Outcomes are reported, and done-callbacks of the returned Futures run, in one thread
    per pool ("mconnector-settler"): a callback that blocks holds up every key.

    Raises TypeError if `executor` has no `submit`, ValueError for a negative max_watching.
    """

    def __init__(self, executor, out_queue=None, max_watching=None, check_pickle=None,
                 shutdown_executor=True):
        import concurrent.futures
        import weakref
        from collections import deque
        if not callable(getattr(executor, 'submit', None)):
            raise TypeError('KeyedExecutor needs an Executor, got %r' % (executor,))
        if max_watching is not None and max_watching < 0:
            raise ValueError('max_watching must be >= 0, got %r' % (max_watching,))
        if check_pickle is None:
            check_pickle = isinstance(executor, concurrent.futures.ProcessPoolExecutor)
        self._executor = executor
        self.out_queue = out_queue
        self.max_watching = max_watching or 0
        self._check_pickle = check_pickle
        self._shutdown_executor = shutdown_executor
        self._future_class = concurrent.futures.Future
        self._cancelled_error = concurrent.futures.CancelledError
        self._new_fifo = deque
        self._lock = threading.Lock()
        # Waiters are woken only when what they wait for may have come true, and a
        # completion with nobody waiting pays nothing for them.
        self._space = threading.Condition(self._lock)   # backpressured submitters
        self._space_waiters = 0
        self._idle = threading.Condition(self._lock)    # shutdown, waiting for pending == 0
        self._idle_waiters = 0
        self._queues = {}           # busy key -> deque of its waiting tasks
        self._pending = 0           # submitted and not finished, queued or handed over
        self._closed = False
        self._executor_closed = False
        self._done = queue.SimpleQueue()
        # Woken with None when the pool is collected, so that the thread ends with it.
        pool_ref = weakref.ref(self, lambda _, put=self._done.put: put(None))
        self._settler_thread = threading.Thread(
            target=_settler, args=(pool_ref, self._done), name='mconnector-settler',
            daemon=True)
        self._settler_thread.start()

    # -- submitting ---------------------------------------------------------------------

    @property
    def executor(self):
        """The wrapped executor."""
        return self._executor

    @property
    def pending(self):
        """Number of tasks submitted and not yet finished."""
        return self._pending

    @property
    def busy_keys(self):
        """Number of keys with a task running or waiting."""
        return len(self._queues)

    def submit(self, fn, /, *args, **kwargs):
        """Schedule `fn(*args, **kwargs)` with no key and no order; return its Future.

        Raises what `submit_id` raises.
        """
        return self.submit_id(None, fn, *args, **kwargs)

    def submit_id(self, key, fn, /, *args, **kwargs):
        """Schedule `fn(*args, **kwargs)` after every task submitted before with `key`.

        Returns a `concurrent.futures.Future` for the task: the executor's own when the
        task goes to it at once, else one of this pool's that turns RUNNING when the task
        is handed over.  Blocks while `max_watching` tasks are pending (but never in the
        settler thread, where it would wait for itself).  Raises PoolClosed after
        `shutdown`, also when it comes while blocked here, and TypeError for an unhashable
        key.  Whatever the task or the executor then raises goes to the Future instead,
        TaskNotPicklable included.
        """
        # Only a task that waits behind its key needs a Future of its own; peeking saves
        # creating one for the others, and the lock below settles any race.
        future = self._future_class() if key is not None and key in self._queues else None
        task = _Task(self, key, fn, args, kwargs, future)
        if self._check_pickle and not self._picklable(task):
            return task.future
        with self._lock:
            if self._closed:
                raise PoolClosed('cannot schedule new futures after shutdown')
            if self.max_watching and self._pending >= self.max_watching \
                    and threading.current_thread() is not self._settler_thread:
                self._space_waiters += 1
                try:
                    while not self._closed and self._pending >= self.max_watching:
                        self._space.wait()
                finally:
                    self._space_waiters -= 1
                if self._closed:
                    raise PoolClosed('cannot schedule new futures after shutdown')
            self._pending += 1
            if key is not None:
                waiting = self._queues.get(key)
                if waiting is not None:
                    if task.future is None:
                        task.future = self._future_class()
                    waiting.append(task)
                    return task.future
                self._queues[key] = self._new_fifo()
        if task.future is not None:
            self._dispatch(task)
            return task.future
        try:
            inner = self._executor.submit(fn, *args, **kwargs)
        except BaseException as exc:        # broken or shut down executor
            task.future = self._future_class()
            task.future.set_running_or_notify_cancel()
            following = self._settle(task, None, exc)
            if following is not None:
                self._dispatch(following)
            return task.future
        inner.add_done_callback(task)
        return inner

    def _picklable(self, task):
        """Return True if `task` pickles; else fail its Future (and report it) at once."""
        from multiprocessing.reduction import ForkingPickler
        try:
            ForkingPickler.dumps((task.fn, task.args, task.kwargs))
        except Exception as exc:
            name = getattr(task.fn, '__qualname__', None) or repr(task.fn)
            error = TaskNotPicklable(
                'task %s (key %r) cannot be pickled for a process pool: %s: %s; define the '
                'function at module level and pass picklable arguments'
                % (name, task.key, type(exc).__name__, exc))
            error.__cause__ = exc
            log.debug('rejected task %s: %s', name, error)
            task.future = self._future_class()
            task.future.set_exception(error)
            self._report(error)
            return False
        return True

    # -- running ------------------------------------------------------------------------

    def _dispatch(self, task):
        """Hand `task` to the executor; on the way, skip cancelled tasks and fail those the
        executor refuses, going on with the next task of their key."""
        while task is not None:
            if not task.future.set_running_or_notify_cancel():
                task = self._advance(task.key)      # cancelled while waiting: skip it
                continue
            try:
                inner = self._executor.submit(task.fn, *task.args, **task.kwargs)
            except BaseException as exc:            # broken or shut down executor
                task = self._settle(task, None, exc)
                continue
            inner.add_done_callback(task)
            task = None

    def _settle_batch(self, tasks):
        # In the settler thread: every `task.inner` is done.  Outcomes first, then the
        # keys are released, so an outcome is out before the next task of its key starts.
        for task in tasks:
            inner = task.inner
            future = task.future
            if inner.cancelled():
                if future is not None:
                    # Cancelled by the executor (shutdown with cancel_futures): ours is
                    # RUNNING already and can only carry the fact as an exception.
                    future.set_exception(self._cancelled_error())
            elif future is not None or self.out_queue is not None:
                exc = inner.exception()
                self._resolve(task, inner.result() if exc is None else None, exc)
            task.args = task.kwargs = task.fn = task.inner = task.pool = None
        for following in self._advance_many([task.key for task in tasks]):
            self._dispatch(following)

    def _settle(self, task, result, exc):
        """Resolve and report an outcome that did not come from the executor, release the
        key.  Returns the next task of the key, for the caller to dispatch."""
        self._resolve(task, result, exc)
        task.args = task.kwargs = task.fn = task.inner = task.pool = None
        return self._advance(task.key)

    def _resolve(self, task, result, exc):
        """Resolve the task's own Future if it has one; report the outcome on out_queue."""
        try:
            future = task.future
            if exc is not None:
                log.debug('task %r (key %r) raised %r', task.fn, task.key, exc)
            if future is not None:
                if exc is None:
                    future.set_result(result)
                else:
                    future.set_exception(exc)
            self._report(result if exc is None else exc)
        except BaseException:
            log.exception('pool: reporting a task outcome failed')

    def _report(self, value):
        if self.out_queue is not None:
            try:
                self.out_queue.put(value)
            except Exception:
                # A full or closed out_queue must not stall the keys: the Future still
                # holds the outcome.
                log.exception('pool: cannot put a result on out_queue')

    def _advance(self, key):
        """One task of `key` finished: return the next one of that key, or None."""
        following = self._advance_many((key,))
        return following[0] if following else None

    def _advance_many(self, keys):
        """Tasks of `keys` finished (a key once per task): return the next task of each
        key that has one, and forget the others."""
        followers = []
        queues = self._queues
        with self._lock:
            self._pending -= len(keys)
            for key in keys:
                if key is not None:
                    waiting = queues[key]
                    if waiting:
                        followers.append(waiting.popleft())
                    else:
                        del queues[key]
            if self._space_waiters:
                self._space.notify(len(keys))   # slots freed, as many submitters go on
            if not self._pending:
                if self._idle_waiters:
                    self._idle.notify_all()
                if self._closed:
                    self._done.put(None)    # the settler closes the executor and ends
        return followers

    # -- shutting down ------------------------------------------------------------------

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Refuse new tasks; with `wait`, return once every pending task has finished.

        As `Executor.shutdown`: `cancel_futures` cancels the tasks that have not started,
        those still waiting behind their key here and, where the executor supports it
        (Python 3.9+ executors), those it has not started yet (their Futures then hold a
        CancelledError, as they were already RUNNING here).  The wrapped executor is shut
        down once all tasks are done, unless `shutdown_executor` was false; with `wait`
        false that happens in the background.  Calling it again is harmless.  Never call
        it with `wait` from a task of this pool: it would wait for itself.
        """
        with self._lock:
            self._closed = True
            cancelled = []
            if cancel_futures:
                for waiting in self._queues.values():
                    cancelled.extend(waiting)
                    waiting.clear()
                self._pending -= len(cancelled)
                if self._idle_waiters and not self._pending:
                    self._idle.notify_all()
            if self._space_waiters:
                self._space.notify_all()        # blocked submitters must raise PoolClosed
            # Wake the settler: with nothing pending it closes the executor and ends.
            self._done.put(None)
        for task in cancelled:
            task.future.cancel()
        if cancel_futures and self._shutdown_executor:
            self._cancel_in_executor()
        if wait:
            with self._lock:
                self._idle_waiters += 1
                try:
                    while self._pending:
                        self._idle.wait()
                finally:
                    self._idle_waiters -= 1
            if threading.current_thread() is not self._settler_thread:
                self._settler_thread.join()

    def _cancel_in_executor(self):
        # Executor.shutdown gained cancel_futures in Python 3.9; third-party executors
        # may lack it too.
        try:
            params = inspect.signature(self._executor.shutdown).parameters
        except (TypeError, ValueError):
            return
        if 'cancel_futures' in params:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _close_executor(self):
        # In the settler thread, once closed and idle.
        if self._shutdown_executor and not self._executor_closed:
            self._executor_closed = True
            try:
                self._executor.shutdown(wait=True)
            except Exception:
                log.exception('pool: shutting down %r failed', self._executor)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown(wait=True)
        return False

    def __repr__(self):
        return '<%s pending=%d busy_keys=%d%s over %r>' % (
            type(self).__name__, self._pending, len(self._queues),
            ' closed' if self._closed else '', self._executor)


def _compat_arguments(cls, worker, maxsize, delay):
    # 0.3.7 took a worker class, a per-worker queue bound and a sleep between polls; the
    # executor replaces all three, so they are accepted and have no effect.
    if worker is not None:
        import warnings
        warnings.warn('%s: worker= is accepted for compatibility with 0.3.7 and ignored; '
                      'wrap your own executor in KeyedExecutor instead' % cls.__name__,
                      DeprecationWarning, stacklevel=3)


class DistributedThreads(KeyedExecutor):
    """Per-key ordered tasks on a ThreadPoolExecutor of `max_workers` threads.

    The 0.3.7 signature: `out_queue` receives every result (or exception object),
    `max_watching` bounds the pending tasks (submit blocks beyond it; 0 for no bound).
    `worker`, `maxsize` and `delay` are accepted and ignored: see KeyedExecutor.
    Raises ValueError if max_workers <= 0.
    """

    def __init__(self, out_queue=None, max_workers=4, max_watching=100, worker=None,
                 maxsize=0, delay=1):
        from concurrent.futures import ThreadPoolExecutor
        _compat_arguments(type(self), worker, maxsize, delay)
        super().__init__(ThreadPoolExecutor(max_workers, thread_name_prefix='mconnector-pool'),
                         out_queue=out_queue, max_watching=max_watching)
        self.max_workers = max_workers


class DistributedProcess(KeyedExecutor):
    """Per-key ordered tasks on a ProcessPoolExecutor of `max_workers` processes.

    As DistributedThreads, plus: tasks (function and arguments) and results must pickle;
    a task that does not fails its Future with TaskNotPicklable at submit time.  With the
    spawn or forkserver start method (`mp_context`, the default on Windows and macOS) the
    function must be importable by name from a module, not defined in `__main__` behind
    no `if __name__ == '__main__'` guard, nor be a lambda or a nested function.  Results
    reach `out_queue` from this process, so a `queue.Queue` works as well as a
    `multiprocessing.Queue`.  Raises ValueError if max_workers <= 0.
    """

    def __init__(self, out_queue=None, max_workers=4, max_watching=100, worker=None,
                 maxsize=0, delay=1, *, mp_context=None):
        from concurrent.futures import ProcessPoolExecutor
        _compat_arguments(type(self), worker, maxsize, delay)
        super().__init__(ProcessPoolExecutor(max_workers, mp_context=mp_context),
                         out_queue=out_queue, max_watching=max_watching, check_pickle=True)
        self.max_workers = max_workers


class _StopWorker:
    """The marker `Worker.stop` puts on the queue; compared by type, as it may be pickled."""

    def __repr__(self):
        return '<Worker stop marker>'


class Worker(threading.Thread):
    """A thread that calls `f(item)` for every item taken from `out_queue`, forever.

    Works with `queue.Queue` and `multiprocessing.Queue`; calls `task_done()` after each
    item where the queue has it, so `out_queue.join()` works.  An exception from `f` is
    logged and the loop goes on.  Daemon by default (the seed sets it anyway).
    """

    def __init__(self, out_queue, f, name=None, daemon=True):
        super().__init__(name=name or 'mconnector-worker', daemon=daemon)
        self.out_queue = out_queue
        self.f = f

    def run(self):
        get = self.out_queue.get
        task_done = getattr(self.out_queue, 'task_done', None)
        while True:
            item = get()
            try:
                if isinstance(item, _StopWorker):
                    return
                try:
                    self.f(item)
                except Exception:
                    log.exception('Worker %s: %r failed on %r', self.name, self.f, item)
            finally:
                if task_done is not None:
                    task_done()

    def stop(self):
        """Put a stop marker on the queue: the worker that takes it ends after the items
        put before it.  With several Workers on one queue, call it once per worker."""
        self.out_queue.put(_StopWorker())


# ###########################################################################################
# 10. Command line
# ###########################################################################################

# (filled in below)
