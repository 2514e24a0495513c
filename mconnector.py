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

Map of this file, each section using only those before it:

  1. Basics          imports, the exception tree and its table of HTTP statuses, the
                     shared asyncio loop thread
  2. Values          the codec: Python values <-> the JSON that travels (both directions)
  3. Routing         rule patterns such as /item/<id:int>, shared by HTTP and websockets
  4. HTTP core       sans-I/O HTTP/1.1 in both roles (HTTPConnection: framing, keep-alive,
                     every limit), request signing (secretKey), Response
  5. WebSocket core  sans-I/O RFC 6455: handshake, frames, the connection state machine,
                     permessage-deflate (RFC 7692)
  6. Listener        Microservice: decorators, dispatch (no I/O), mconnector.request (the
                     call a rule answers), /_mc/ health, rules and metrics, the WSGI entry
  7. WebSocket app   SocketServer: routes and handlers
  8. Clients         Friend (keep-alive connections, retries, errors as exceptions),
                     AsyncFriend (the same on asyncio streams), TestClient (in process)
                     and SocketClient
  9. Serving shell   one selector loop for both apps: workers, deadlines, TLS, graceful
                     stop, one signal router
 10. Pools           ordered execution per key over any concurrent.futures.Executor
 11. Command line    python -m mconnector serve | call | rules | ws, and process supervision:
                     serve --workers N, the reloader of run(debug=True) and serve --debug
"""

# mypy: ignore-errors
# (The public API is annotated, the function bodies not yet: a program that holds this file
# beside its code gets its types without reports on its insides.  .ci/run checks it.)
from __future__ import annotations      # annotations are text: typing is not imported to run

import base64
import binascii
import bisect
import contextvars
import enum
import errno
import functools
import itertools
import json
import logging
import os
import queue
import re
import select
import selectors
import socket
import sys
import threading
import time

# Heavier modules (asyncio, ssl, http.client, inspect, hashlib, uuid, decimal, datetime,
# concurrent.futures, multiprocessing) are imported where they are first needed: importing
# this module must stay cheap (under 30 ms).  The codec asks sys.modules for datetime,
# decimal and uuid: a value of those types cannot exist before its module is imported.

TYPE_CHECKING = False
if TYPE_CHECKING:
    # For type checkers only (mypy and pyright take TYPE_CHECKING for true): the
    # decorators return the function they got, so a TypeVar keeps its signature on every
    # Python.  ParamSpec (the pools' submit()) and Self are typing's own from 3.11 on; a
    # check for an older Python sees them as Any (the module tells mypy to ignore its
    # insides), so nothing beyond the standard library is named.
    import asyncio
    import concurrent.futures
    import ssl
    from typing import (Any, AsyncIterator, Callable, Dict, Iterable, Iterator, List, Literal,
                        Mapping, Optional, Sequence, Tuple, TypeVar, Union)
    from typing import ParamSpec, Self
    F = TypeVar('F', bound=Callable[..., Any])
    T = TypeVar('T')
    C = TypeVar('C', bound=type)
    P = ParamSpec('P')
    Headers = Dict[str, str]                    # lower-case names, as the HTTP core reads them
    HeaderPairs = Iterable[Tuple[str, str]]     # (name, value) pairs to send
    Peer = Tuple[str, Optional[int]]            # (host, port)
    Message = Union[str, bytes]                 # a websocket message as received
    Event = Union['RequestHead', 'ResponseHead', bytes, '_Sentinel']

__version__ = '1.3.0'

__all__ = [
    # listener and sender
    'Microservice', 'SanicApp', 'Friend', 'AsyncFriend', 'TestClient', 'Response', 'request',
    'RequestContext', 'timeit',
    # values
    'register', 'to_wire', 'from_wire', 'dumps', 'loads',
    # routing and HTTP pieces
    'Rule', 'Router', 'HTTPConnection', 'RequestHead', 'ResponseHead', 'NEED_DATA', 'PAUSED',
    'END_OF_MESSAGE', 'CLOSED', 'parse_request_line', 'parse_header_line', 'parse_status_line',
    'parse_header_block',
    # security
    'sign_request', 'verify_request', 'NonceCache', 'server_ssl_context',
    # errors
    'MConnectorError', 'CodecError', 'RouteError', 'HTTPError', 'RemoteError', 'CallError',
    'BadRequest', 'AuthError', 'Forbidden', 'NotFound', 'MethodNotAllowed', 'RequestTimeout',
    'LengthRequired', 'PayloadTooLarge', 'URITooLong', 'UnsupportedMediaType', 'UpgradeRequired',
    'HeadersTooLarge', 'Unimplemented', 'ServiceUnavailable', 'VersionNotSupported',
    'NetworkError', 'Unreachable',
    'CallTimeout', 'DeadlineExceeded', 'PoolError', 'PoolClosed', 'TaskNotPicklable', 'WorkerLost',
    # websockets
    'SocketServer', 'SocketClient', 'WebSocket', 'WebSocketProtocol', 'WebSocketError',
    'HandshakeError', 'WebSocketProtocolError', 'PayloadTooBig', 'ConnectionClosed',
    'WebSocketTimeout', 'Opcode', 'CloseCode', 'WebSocketState',
    # ordered pools
    'KeyedExecutor', 'DistributedThreads', 'DistributedProcess', 'Worker',
    # command line
    'main',
]

log = logging.getLogger('mconnector')
access_log = logging.getLogger('mconnector.access')     # one line per request, in debug mode


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
     |    |    +-- LengthRequired 411, PayloadTooLarge 413, URITooLong 414,
     |    |        UnsupportedMediaType 415, HeadersTooLarge 431
     |    +-- AuthError              401: missing or wrong token (Forbidden 403)
     |    +-- NotFound               404 unknown rule, 405 (subclass MethodNotAllowed)
     |    +-- RequestTimeout 408 (also TimeoutError), UpgradeRequired 426,
     |        Unimplemented 501 (also NotImplementedError), ServiceUnavailable 503,
     |        VersionNotSupported 505: one class per status (_STATUS_ERRORS)
     +-- HTTPError                   a message the HTTP core refuses; .status to answer with,
     |                               None when the peer was the server
     +-- NetworkError (also ConnectionError)
     |    +-- Unreachable            nothing listens at the address
     |    +-- CallTimeout (also TimeoutError)
     |         +-- DeadlineExceeded  a call inside a rule whose caller gave up: not sent
     +-- WebSocketError              HandshakeError, WebSocketProtocolError,
     |                               PayloadTooBig, ConnectionClosed, WebSocketTimeout
     +-- PoolError                   the ordered pools' errors
          +-- PoolClosed (also RuntimeError)     submit after shutdown
          +-- TaskNotPicklable (also TypeError)  a process pool cannot send the task
          +-- WorkerLost                         the process running the task died
    """


class CodecError(MConnectorError, ValueError):
    """A value cannot be encoded, or a body cannot be decoded."""


class RouteError(MConnectorError, ValueError):
    """A rule pattern is malformed."""


class RemoteError(MConnectorError):
    """The remote function raised; `type` and `message` are the remote exception's."""

    def __init__(self, type_name: str, message: str, rule: Optional[str] = None,
                 address: Optional[str] = None, traceback: Optional[str] = None) -> None:
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

    status: Optional[int] = None

    def __init__(self, message: str, status: Optional[int] = None, rule: Optional[str] = None,
                 address: Optional[str] = None) -> None:
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
    """400: the body or the arguments do not fit the function (its signature is named)."""
    status = 400


class AuthError(CallError):
    """401: token or signature missing or wrong; the function did not run."""
    status = 401


class Forbidden(AuthError, PermissionError):
    """403: the listener refuses this caller (a websocket Origin not allowed, say)."""
    status = 403


class NotFound(CallError):
    """404: the listener has no such rule."""
    status = 404


class MethodNotAllowed(NotFound):
    """405: the rule exists but does not take this HTTP method."""
    status = 405


class RequestTimeout(CallError, TimeoutError):
    """408: the request did not arrive whole within the listener's request_timeout."""
    status = 408


class LengthRequired(BadRequest):
    """411: a body-carrying method came with neither Content-Length nor chunked coding."""
    status = 411


class PayloadTooLarge(BadRequest):
    """413: the body is over the listener's max_body."""
    status = 413


class URITooLong(BadRequest):
    """414: the request line is over MAX_LINE bytes."""
    status = 414


class UnsupportedMediaType(BadRequest):
    """415: the body is not of the type the listener takes."""
    status = 415


class UpgradeRequired(CallError):
    """426: a websocket handshake asked for a protocol version other than 13."""
    status = 426


class HeadersTooLarge(BadRequest):
    """431: too many header lines, or one too long, or a head over its limit."""
    status = 431


class Unimplemented(CallError, NotImplementedError):
    """501: the request uses a feature the listener does not have (a transfer coding)."""
    status = 501


class ServiceUnavailable(CallError):
    """503: the listener is stopping, or its application failed to start."""
    status = 503


class VersionNotSupported(CallError):
    """505: an HTTP major version other than 1."""
    status = 505


# The one table that pairs statuses with exceptions: the listener names its refusals from
# it (the "type" of the error body) and Friend raises from it.  500 is RemoteError.
_STATUS_ERRORS = {cls.status: cls for cls in (
    BadRequest, AuthError, Forbidden, NotFound, MethodNotAllowed, RequestTimeout,
    LengthRequired, PayloadTooLarge, URITooLong, UnsupportedMediaType, UpgradeRequired,
    HeadersTooLarge, Unimplemented, ServiceUnavailable, VersionNotSupported)}


class NetworkError(MConnectorError, ConnectionError):
    """The call did not complete because of the network."""


class Unreachable(NetworkError):
    """Nothing answers at the address (refused, unknown host, no route)."""


class CallTimeout(NetworkError, TimeoutError):
    """No answer within the timeout."""


class DeadlineExceeded(CallTimeout):
    """A call made inside a rule was not sent: the rule's own caller has given up."""


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


async def _as_coroutine(awaitable):
    return await awaitable


def _readable(sock, timeout=0.0):
    """Whether bytes (or the end of the stream) wait on `sock`, within `timeout` seconds.
    poll() where the system has it: select() refuses descriptors over 1023."""
    if getattr(sock, 'pending', None) is not None and sock.pending():
        return True
    if hasattr(select, 'poll'):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else int(timeout * 1000 + 0.999)))
    return bool(select.select([sock], [], [], timeout)[0])


# ###########################################################################################
# 2. Values: the codec
# ###########################################################################################

# What travels is JSON in the 0.3.7 layout: basic values as they are, lists, dicts, and any
# other object as the dict of its public attributes.  Types that JSON loses (tuple, set,
# bytes, dates, Decimal, UUID, registered classes) are sent in that degraded JSON form too,
# so a 0.3.7 peer reads them as lists, strings and dicts, and beside it goes a list of
# "type notes" (path, tag) that lets an mconnector peer restore them.  Notes come children
# first, so that restoring a note never has to look inside an already restored value.
# Nothing is unpickled or evaluated: a note can only build the fixed types below or a class
# that the receiving side registered itself.

_PLAIN = (str, int, float, bool, type(None))
MAX_DEPTH = 200         # nesting of values, both ways (JSON bodies included)
_registry = {}           # name -> class, for classes restored by type notes
_registered_names = {}   # class -> name
_rebuilders = {}         # class -> function(state) -> instance, made at its first use


def register(cls: C, name: Optional[str] = None) -> C:
    """Let instances of `cls` travel as themselves between mconnector peers.

    Both sides register the class under the same name (default: its ``__qualname__``).
    The receiving side rebuilds an instance only through what the class declares, with
    the state that travelled (the instance's attributes, dunder names never): a
    ``from_wire(state)`` classmethod, else ``__setstate__(state)``, else its own
    ``__init__``, called with the parameters that name travelled attributes, else its
    ``__slots__``.  Nothing else is set.  Raises TypeError for a class that declares none
    of these.  Unregistered objects still travel, as the dict of their public attributes
    (0.3.7).  Can be used as a class decorator.  Returns `cls`.
    """
    if not isinstance(cls, type):
        raise TypeError('register() takes a class, got %r' % (cls,))
    if not (callable(getattr(cls, 'from_wire', None)) or hasattr(cls, '__setstate__')
            or cls.__init__ is not object.__init__ or _slot_names(cls)):
        raise TypeError('register(%s): the class declares no way to be rebuilt: give it '
                        '__init__ parameters, __slots__, __setstate__ or a from_wire '
                        'classmethod' % cls.__qualname__)
    name = name or cls.__qualname__
    _registry[name] = cls
    _registered_names[cls] = name
    _rebuilders.pop(cls, None)
    return cls


def _public_attributes(obj):
    """The 0.3.7 view of an object: names from dir() without dunders or methods."""
    out = {}
    for name in dir(obj):
        if name.startswith('__'):
            continue
        try:
            value = getattr(obj, name)
        except Exception:       # a property that raises is left out, as 0.3.7 would fail
            continue
        if not callable(value):
            out[name] = value
    return out


def _instance_state(obj):
    try:
        return dict(vars(obj))
    except TypeError:           # __slots__ classes have no __dict__
        return {n: getattr(obj, n) for n in _slot_names(type(obj)) if hasattr(obj, n)}


def _slot_names(cls):
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get('__slots__', ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return [n for n in names if n not in ('__dict__', '__weakref__')]


def to_wire(value: Any, notes: Optional[List[Any]] = None) -> Any:
    """Return `value` as JSON-ready data; append type notes to `notes` when it is a list.

    Raises CodecError for values that cannot travel (cycles, over-deep nesting).
    """
    try:
        return _encode(value, notes, (), 0)
    except RecursionError:
        raise CodecError('value nested too deeply to encode') from None


def _encode(value, notes, path, depth):
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return value
    if kind is float:
        if value - value == 0.0:            # finite
            return value
        # NaN and infinities are not JSON: they travel as text with a note.
        if notes is not None:
            notes.append([list(path), 'float'])
        return 'NaN' if value != value else 'Infinity' if value > 0 else '-Infinity'
    if depth > MAX_DEPTH:
        raise CodecError('value nested deeper than %d levels (a cycle?)' % MAX_DEPTH)
    depth += 1
    if kind is list or kind is tuple:
        out = [v if type(v) in _PLAIN_TYPES else _encode(v, notes, path + (i,), depth)
               for i, v in enumerate(value)]
        if kind is tuple and notes is not None:
            notes.append([list(path), 'tuple'])
        return out
    if kind is dict:
        return {(k if type(k) is str else _dict_key(k)):
                (v if type(v) in _PLAIN_TYPES else _encode(v, notes, path + (_dict_key(k),), depth))
                for k, v in value.items()}
    if isinstance(value, _PLAIN):          # subclasses: bool, IntEnum, str subclasses
        return value
    tag = None
    if isinstance(value, (set, frozenset)):
        try:
            items = sorted(value)
        except TypeError:
            items = list(value)
        out = [_encode(v, notes, path + (i,), depth) for i, v in enumerate(items)]
        tag = 'frozenset' if isinstance(value, frozenset) else 'set'
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out = base64.b64encode(bytes(value)).decode('ascii')
        tag = 'bytes'
    elif _is_instance(value, 'datetime', 'datetime'):
        out, tag = value.isoformat(), 'datetime'
    elif _is_instance(value, 'datetime', 'date'):
        out, tag = value.isoformat(), 'date'
    elif _is_instance(value, 'datetime', 'time'):
        out, tag = value.isoformat(), 'time'
    elif _is_instance(value, 'datetime', 'timedelta'):
        out, tag = value.total_seconds(), 'timedelta'
    elif _is_instance(value, 'decimal', 'Decimal'):
        out, tag = str(value), 'decimal'
    elif _is_instance(value, 'uuid', 'UUID'):
        out, tag = str(value), 'uuid'
    elif isinstance(value, (list, tuple)):   # subclasses, namedtuples: as plain sequences
        out = [_encode(v, notes, path + (i,), depth) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        out = {_dict_key(k): _encode(v, notes, path + (_dict_key(k),), depth)
               for k, v in value.items()}
    else:
        name = _registered_names.get(type(value))
        if name is None and not _own_class(type(value)):
            raise _NoWireForm(value, path)
        attributes = _public_attributes(value)
        out = {k: _encode(v, notes, path + (k,), depth) for k, v in attributes.items()}
        if name is not None and notes is not None:
            state = _instance_state(value)
            notes.append([list(path), ['object', name, sorted(state)]])
            for k in state:
                if k not in out:        # private or callable state still has to travel
                    out[k] = _encode(state[k], notes, path + (k,), depth)
        return out
    if notes is not None:
        notes.append([list(path), tag])
    return out


_PLAIN_TYPES = frozenset({str, int, bool, type(None)})     # float: see _encode


@functools.lru_cache(maxsize=None)
def _own_class(cls):
    """Whether `cls` comes from the program, not with Python.  Instances of the program's
    classes travel as their attributes (0.3.7); Python's own types that have no form above
    (locks, functions, complex, generators, sockets...) would arrive as {} or as nonsense."""
    top = (cls.__module__ or '').partition('.')[0]
    if top == '__main__':
        return True
    names = getattr(sys, 'stdlib_module_names', None)      # 3.10+
    if names is not None:
        return top not in names
    module = sys.modules.get(top)
    if module is None:
        return True
    path = getattr(module, '__file__', None)
    if path is None:
        return False            # built into the interpreter
    import sysconfig
    path = os.path.abspath(path)
    inside = lambda directory: path.startswith(os.path.abspath(directory) + os.sep)
    return not any(inside(sysconfig.get_path(key)) for key in ('stdlib', 'platstdlib')) or \
        any(inside(sysconfig.get_path(key)) for key in ('purelib', 'platlib'))


class _NoWireForm(CodecError):
    """A value of a type that has no form on the wire, and the path of keys and indexes
    that led to it, for a message that says where it sat (args[0], result['k'])."""

    def __init__(self, value, path):
        kind = type(value)
        self.kind = kind.__qualname__ if kind.__module__ == 'builtins' else \
            '%s.%s' % (kind.__module__, kind.__qualname__)
        self.path = tuple(path)
        self.generator = hasattr(value, '__next__') or hasattr(value, '__anext__')
        super().__init__(self.at('value'))

    def at(self, root, skip=0, hint=None):
        where = root + ''.join('[%r]' % (step,) for step in self.path[skip:])
        if hint is None:
            hint = ('send a list of its items' if self.generator else
                    'send None, bool, numbers, str, bytes, dates, Decimal, UUID, lists, '
                    'tuples, sets, dicts, or instances of your own classes')
        return '%s (of type %s) has no wire form: %s' % (where, self.kind, hint)


def _is_instance(value, module, name):
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def _dict_key(key):
    # JSON keys are strings; json.dumps would turn None/bool/number keys into text anyway,
    # and fail on others.  Doing it here keeps sorted output possible.
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    return str(key)


def _restore_scalar(tag, value):
    import datetime
    import decimal
    import uuid
    if tag == 'float':
        if value not in ('NaN', 'Infinity', '-Infinity'):
            raise CodecError('a float note points at %r' % (value,))
        return float(value)
    if tag == 'tuple':
        return tuple(value)
    if tag == 'set':
        return set(value)
    if tag == 'frozenset':
        return frozenset(value)
    if tag == 'bytes':
        return base64.b64decode(value.encode('ascii'), validate=True)
    if tag == 'datetime':
        return datetime.datetime.fromisoformat(value)
    if tag == 'date':
        return datetime.date.fromisoformat(value)
    if tag == 'time':
        return datetime.time.fromisoformat(value)
    if tag == 'timedelta':
        return datetime.timedelta(seconds=value)
    if tag == 'decimal':
        return decimal.Decimal(value)
    if tag == 'uuid':
        return uuid.UUID(value)
    raise CodecError('unknown type note %r' % (tag,))


def _restore_object(spec, value):
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(value, dict)
            and isinstance(spec[2], list)):
        raise CodecError('malformed object note')
    _, name, keys = spec
    cls = _registry.get(name)
    if cls is None:
        return value            # not registered here: keep the 0.3.7 dict form
    state = {key: value[key] for key in keys
             if type(key) is str and key in value and not key.startswith('__')}
    rebuild = _rebuilders.get(cls)
    if rebuild is None:
        rebuild = _rebuilders[cls] = _rebuilder(cls)
    try:
        return rebuild(state)
    except CodecError:
        raise
    except Exception as exc:    # the class's own code refused the state
        raise CodecError('cannot rebuild %s: %s: %s'
                         % (name, type(exc).__name__, exc)) from None


def _rebuilder(cls):
    """How instances of a registered class are made from travelled state, from what the
    class declares (see register)."""
    hook = getattr(cls, 'from_wire', None)
    if callable(hook):
        return hook
    if hasattr(cls, '__setstate__'):
        def rebuild(state):
            obj = cls.__new__(cls)
            obj.__setstate__(state)
            return obj
        return rebuild
    if cls.__init__ is not object.__init__:
        import inspect
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        try:
            parameters = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):
            parameters = ()
        names = [p.name for p in list(parameters)[1:] if p.kind in kinds]
        return lambda state: cls(**{n: state[n] for n in names if n in state})
    # Through each slot's own descriptor: a property of the same name is never run.
    slots = {}
    for klass in reversed(cls.__mro__):
        declared = klass.__dict__.get('__slots__', ())
        for slot in [declared] if isinstance(declared, str) else declared:
            descriptor = klass.__dict__.get(slot)
            if not slot.startswith('__') and hasattr(descriptor, '__set__'):
                slots[slot] = descriptor

    def rebuild(state):
        obj = cls.__new__(cls)
        for key, value in state.items():
            descriptor = slots.get(key)
            if descriptor is not None:
                descriptor.__set__(obj, value)
        return obj
    return rebuild


def from_wire(data: Any, notes: Optional[List[Any]] = None) -> Any:
    """Undo to_wire(): restore the values that `notes` describe, in place where possible.

    `data` is what json.loads returned.  Raises CodecError for notes that do not fit it.
    """
    if not notes:
        return data
    if not isinstance(notes, list):
        raise CodecError('type notes must be a list')
    root = [data]
    for note in notes:
        try:
            path, tag = note
            parent, key = root, 0
            for step in path:
                parent, key = parent[key], step
            value = parent[key]
            if isinstance(tag, list):
                restored = _restore_object(tag, value)
            elif tag in ('tuple', 'set', 'frozenset') and not isinstance(value, list):
                raise CodecError('a %s note points at %s' % (tag, type(value).__name__))
            else:
                restored = _restore_scalar(tag, value)
            parent[key] = restored
        except CodecError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
                binascii.Error) as exc:
            # (ArithmeticError: a timedelta of 1e300 seconds overflows, Decimal('x') is
            # decimal.InvalidOperation)
            raise CodecError('type note %s does not fit the value: %s: %s'
                             % (str(note)[:200], type(exc).__name__, exc)) from None
    return root[0]


def _wire_encoder(sort_keys):
    """JSONEncoder(allow_nan=False, sort_keys=...).encode, for values that to_wire() made.
    Its C encoder is made once here, where JSONEncoder.encode() makes one at every call
    (most of its cost for a small value); without the cycle check, which needs a dict of
    its own per call: to_wire() has refused cycles already."""
    make = json.encoder.c_make_encoder
    if make is None:        # a json without its C part
        return json.JSONEncoder(allow_nan=False, sort_keys=sort_keys).encode
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii,
                  None, ': ', ', ', sort_keys, False, False)
    return lambda value: ''.join(encode(value, 0))


_to_json = _wire_encoder(False)
_to_sorted_json = _wire_encoder(True)


def dumps(value: Any, notes: Optional[List[Any]] = None, sort_keys: bool = False) -> bytes:
    """JSON text (as bytes) of `value` converted by to_wire()."""
    data = to_wire(value, notes)
    try:
        return (_to_sorted_json if sort_keys else _to_json)(data).encode('utf-8')
    except (TypeError, ValueError) as exc:
        raise CodecError('cannot encode value: %s' % exc) from None


def _refuse_constant(name):
    raise CodecError('%s is not JSON (send floats that are not finite as values, '
                     'mconnector senders do)' % name)


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CodecError('duplicate key %r in a JSON object' % duplicate[:100])
    return obj


# Strict parsing at the speed of json's own C parser.  The plain parse already refuses NaN
# and Infinity (parse_constant is called for nothing else).  Infinities from numbers out of
# range and duplicate keys are refused by hooks as the body is parsed (a call per object
# and per float), and the depth by passes of C over the body's bytes; never by a walk of
# the value in Python.  A body that was parsed plainly first (for the token of a 0.3.7
# sender: see Microservice._authorize) is checked by a second parse with the hooks, or,
# where it has many objects for its size, by one pass of the C encoder over its value.
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_CURLY_AS_SQUARE = bytes.maketrans(b'{}', b'[]')
_ESCAPE = re.compile(rb'\\.', re.S)
_STRING = re.compile(rb'"[^"]*"')
_BRACKET_RUN = re.compile(rb'\[+|\]+')
_EASY_LEVELS = 8
_BYTES_PER_HOOK = 128       # bodies with fewer objects than one per this many bytes ...
_SMALL_BODY = 65536         # ... or this small are parsed again with the hooks
_CHECK_ENCODER = json.JSONEncoder(allow_nan=False, check_circular=False)   # no cycles: parsed
_OUT_OF_RANGE = 'a number in the body is out of range (it would be infinite)'


def _int_digits_limit(text):
    # Interpreters before the int digit limit (CPython < 3.8.14, 3.9.14, 3.10.7) would
    # convert a 16 MB integer in quadratic time.
    if len(text) > 4300:
        raise CodecError('integer of over 4300 digits')
    return int(text)


def _finite_float(text):
    value = float(text)
    if value - value != 0.0:
        raise CodecError(_OUT_OF_RANGE)
    return value


_PARSE_OPTIONS = {'parse_constant': _refuse_constant}
if not hasattr(sys, 'get_int_max_str_digits'):
    _PARSE_OPTIONS['parse_int'] = _int_digits_limit
_decoder = json.JSONDecoder(**_PARSE_OPTIONS)
_hooks_decoder = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=_finite_float,
                                  **_PARSE_OPTIONS)


def _json_bytes(body):
    return body.encode('utf-8', 'surrogatepass') if isinstance(body, str) else bytes(body)


def _parse_json(body, decoder=_decoder):
    """The value of a JSON body (bytes or str), parsed by json's C parser: no NaN or
    Infinity, UTF-8 only.  With the default decoder, what an unauthenticated request may
    cost.  Raises CodecError."""
    try:
        return decoder.decode(body if isinstance(body, str) else bytes(body).decode('utf-8'))
    except CodecError:
        raise
    except UnicodeDecodeError:
        raise CodecError('body is not UTF-8') from None
    except RecursionError:
        raise CodecError('JSON nested deeper than %d levels' % MAX_DEPTH) from None
    except ValueError as exc:
        raise CodecError('body is not valid JSON: %s' % exc) from None


def _check_json(body, value):
    """Refuse what json.loads lets through: nesting over MAX_DEPTH, numbers out of range
    (1e999 is parsed as infinity), duplicate keys.  `value` is what `body` (bytes or str)
    parsed to with _parse_json()."""
    data = _json_bytes(body)
    objects = data.count(b'{')
    _check_depth(data, objects)
    if objects * _BYTES_PER_HOOK < len(data) or len(data) <= _SMALL_BODY:
        _parse_json(body, _hooks_decoder)
        return
    try:
        # Written again by the C encoder, which refuses infinities, the value has one
        # ':' per key it kept: fewer than the body's means a key came twice.
        again = _CHECK_ENCODER.encode(value)
    except ValueError:
        raise CodecError(_OUT_OF_RANGE) from None
    except RecursionError:
        raise CodecError('JSON nested deeper than %d levels' % MAX_DEPTH) from None
    colons = data.count(b':')
    if b'\\' in data:
        # A ':' in the body's strings may be written \u003a; a '\\u003a' is counted too,
        # and sends the body to the exact check below for nothing.
        colons += data.count(b'\\u003a') + data.count(b'\\u003A')
    if again.count(':') != colons:
        _parse_json(body, _hooks_decoder)       # raises naming the key


def _check_depth(data, objects):
    if objects + data.count(b'[') > MAX_DEPTH and _too_deep(data):
        raise CodecError('JSON nested deeper than %d levels' % MAX_DEPTH)


def _too_deep(data):
    """Whether the brackets outside the strings of valid JSON `data` nest deeper than
    MAX_DEPTH, in passes of C over bytes."""
    if b'\\' in data:
        data = _ESCAPE.sub(b'', data)
    data = data.translate(_CURLY_AS_SQUARE, _NOT_STRUCTURE)
    if b'"' in data:
        data = data.replace(b'""', b'')        # the strings without brackets: most of them
        if b'"' in data:
            data = _STRING.sub(b'', data)
    # Each pass takes the innermost level away everywhere: most bodies are gone in a few,
    # and what is left (the deep parts) has few runs of brackets to count.
    for _ in range(_EASY_LEVELS):
        if not data:
            return False
        data = data.replace(b'[]', b'')
    depth = peak = 0
    for run in _BRACKET_RUN.findall(data):
        if run[0] == 91:      # '['
            depth += len(run)
            if depth > peak:
                peak = depth
        else:
            depth -= len(run)
    return peak + _EASY_LEVELS > MAX_DEPTH


def loads(body: Union[bytes, str]) -> Any:
    """Parse a JSON body (bytes or str) strictly: UTF-8, no NaN or Infinity, no number out
    of range, no duplicate keys, nesting within MAX_DEPTH.  Raises CodecError with a
    clear message."""
    value = _parse_json(body, _hooks_decoder)
    data = _json_bytes(body)
    _check_depth(data, data.count(b'{'))
    return value


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
             lambda text: __import__('uuid').UUID(text)),
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

    def __init__(self, rule: str) -> None:
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
        elif _IDENTIFIER.match(kind):
            # As a regex, a word would match only itself: surely a misspelt type.
            raise RouteError('rule %r: unknown parameter type %r (the types are %s; a regex '
                             'must be more than a word)'
                             % (self.rule, kind, ', '.join(_PARAM_TYPES)))
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
    def is_static(self) -> bool:
        return self.regex is None

    def match(self, path: str) -> Optional[Dict[str, Any]]:
        """The parameters of `path` converted to their types, or None if it does not match."""
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

    def __init__(self) -> None:
        self._static: Dict[str, Tuple[Rule, Any]] = {}
        self._patterns: List[Tuple[Rule, Any]] = []

    def add(self, rule: Union[str, Rule], target: Any) -> Rule:
        """Route `rule` (text or Rule) to `target`; a pattern added again replaces the old."""
        compiled = rule if isinstance(rule, Rule) else Rule(rule)
        if compiled.is_static:
            self._static[compiled.rule] = (compiled, target)
        else:
            self._patterns = [p for p in self._patterns if p[0].rule != compiled.rule]
            self._patterns.append((compiled, target))
        return compiled

    def find(self, path: str) -> Tuple[Any, Optional[Dict[str, Any]]]:
        """Return (target, params) for `path`, or (None, None)."""
        hit = self._static.get(path)
        if hit is not None:
            return hit[1], {}
        for compiled, target in self._patterns:
            params = compiled.match(path)
            if params is not None:
                return target, params
        return None, None

    def __iter__(self) -> Iterator[Tuple[Rule, Any]]:
        for compiled, target in self._static.values():
            yield compiled, target
        yield from self._patterns

    def __len__(self) -> int:
        return len(self._static) + len(self._patterns)


# ###########################################################################################
# 4. HTTP: the sans-I/O protocol core (RFC 9112), both roles
# ###########################################################################################

# Every framing decision and every limit of HTTP/1.1 is made here, on bytes, with no socket
# and no clock: HTTPConnection reads requests and writes responses for the listener (the
# built-in server, the WSGI entry for bodies a WSGI server left chunked, the websocket
# handshake), and writes requests and reads responses for Friend and SocketClient.  The
# shells only move bytes and keep time.

# Limits on what a peer may send, as named constants (settable per Microservice).  8 KiB per
# line and 100 header lines follow common servers (nginx's default buffer, Apache's
# LimitRequestFields); 16 MiB of body is generous for calls that carry JSON arguments.
MAX_LINE = 8192
MAX_HEADERS = 100
MAX_BODY = 16 * 1024 * 1024
MAX_HEAD = MAX_LINE * (MAX_HEADERS + 2)      # a whole head: what the two above allow
ASSEMBLE = 65536        # bodies up to this size are delivered with their head (see next_event)
_MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions
_CHUNK_SLACK = 65536    # chunk framing allowed beyond the size of the data it frames

_STATUS_TEXT = {
    100: 'Continue', 101: 'Switching Protocols', 200: 'OK', 204: 'No Content', 400: 'Bad Request', 401: 'Unauthorized',
    403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed', 408: 'Request Timeout', 414: 'URI Too Long',
    411: 'Length Required', 413: 'Content Too Large', 415: 'Unsupported Media Type',
    426: 'Upgrade Required', 431: 'Request Header Fields Too Large',
    500: 'Internal Server Error', 501: 'Not Implemented', 503: 'Service Unavailable',
    505: 'HTTP Version Not Supported',
}

_TOKEN_CHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")   # RFC 9110 token
_METHOD_OK = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET_OK = re.compile(r'[\x21-\x7e]+\Z')          # visible ASCII: no controls, no spaces


class HTTPError(MConnectorError):
    """A message the HTTP core refuses.  `status` is what a server answers with (400, 411,
    413, 414, 431, 501, 505...); None when the refused message was a server's reply."""

    def __init__(self, status: Optional[int], message: str, headers: HeaderPairs = ()) -> None:
        self.status = status
        self.message = message
        self.headers = list(headers)
        super().__init__(status, message)

    def __str__(self):
        return self.message if self.status is None else '%d %s' % (self.status, self.message)


_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (/[\x21-\x7e]*) HTTP/1\.([0-9])\r?\n")


class _NotHTTP(HTTPError):
    """What a peer that does not speak HTTP sent instead of a reply."""

    def __init__(self, data):
        self.tls = data[:1] in (b'\x15', b'\x16') and data[1:2] == b'\x03'   # a TLS record
        line = data.split(b'\n', 1)[0].strip().decode('latin-1')
        super().__init__(None, 'it answered in TLS' if self.tls else 'it sent %r' % line[:80])


def parse_request_line(line: bytes) -> Tuple[str, str, Tuple[int, int]]:
    """b'POST /rule?x=1 HTTP/1.1\\r\\n' -> ('POST', '/rule?x=1', (1, 1)).

    Raises HTTPError (400, or 505 for an HTTP major version other than 1).
    """
    match = _REQUEST_LINE.fullmatch(line)
    if match:                   # the usual line; anything else is looked at closely below
        method, target, minor = match.groups()
        return method.decode('ascii'), target.decode('ascii'), (1, minor[0] - 48)
    try:
        text = line.decode('ascii').rstrip('\r\n')
    except UnicodeDecodeError:
        raise HTTPError(400, 'request line is not ASCII') from None
    parts = text.split(' ')
    if len(parts) != 3:
        raise HTTPError(400, 'malformed request line %r' % text[:100])
    method, target, version = parts
    if not _METHOD_OK.match(method):
        raise HTTPError(400, 'malformed method %r' % method[:20])
    if not version.startswith('HTTP/') or len(version) != 8 or version[6] != '.' \
            or not (version[5] in '0123456789' and version[7] in '0123456789'):
        raise HTTPError(400, 'malformed HTTP version %r' % version[:20])
    if version[5] != '1':
        raise HTTPError(505, 'only HTTP/1.x is served')
    if not _TARGET_OK.match(target):
        raise HTTPError(400, 'control character or space in the request target %r' % target[:100])
    if not (target.startswith('/') or target == '*' or target.startswith(('http://', 'https://'))):
        raise HTTPError(400, 'malformed request target %r' % target[:100])
    return method, target, (1, int(version[7]))


def parse_header_line(line: bytes, headers: Headers) -> None:
    """Add one b'Name: value\\r\\n' line to `headers` (lower-case names -> str values).

    Repeated fields are joined with ', ' (RFC 9110 5.3).  Raises HTTPError(400).
    """
    name, sep, value = line.partition(b':')
    # The usual names are letters, digits and '-': checked without the regex.
    if not sep or not (name.replace(b'-', b'').isalnum() or _TOKEN_CHARS.match(name)):
        # Obsolete line folding and spaces before the colon are refused, as RFC 9112
        # 5.1-5.2 asks of servers: they are how request smuggling starts.
        raise HTTPError(400, 'malformed header line %r' % line[:100])
    key = name.lower().decode('ascii')
    value = value.strip(b' \t\r\n')
    if b'\r' in value or b'\n' in value or b'\x00' in value:
        raise HTTPError(400, 'control character in header %r' % key)
    text = value.decode('latin-1')
    old = headers.get(key)
    headers[key] = text if old is None else old + ', ' + text


# The usual head: well-formed lines with CRLF, checked whole by one pass of C, then split
# by str methods.  Anything else goes line by line through parse_header_line, which says
# what is wrong with it.
_BLANK_LINE = re.compile(rb'\n\r?\n')
_FIELD_NAME = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}"
_FIELD_VALUE = rb'[^\r\n\x00]{0,%d}' % MAX_LINE
# It runs on the block decoded once as Latin-1 (each byte one character, so the classes and
# the lengths are those of the bytes): the fields come out as the str they are kept as.
_FIELD_BLOCK = re.compile((rb'(?:%s:%s\r\n)*\r\n' % (_FIELD_NAME, _FIELD_VALUE)).decode('latin-1'))
_STATUS_LINE = re.compile(rb'HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r?\n')
_CHUNK_SIZE = re.compile(rb'([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]{0,%d})?\r\n' % _MAX_CHUNK_LINE)
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+;=%-]*)(?::[0-9]*)?\Z")   # RFC 3986


def _list_tokens(value):
    """The lower-case elements of a comma-separated header (RFC 9110 5.6.1)."""
    return [t.strip().lower() for t in value.split(',') if t.strip()]


def parse_header_block(block: bytes) -> Headers:
    """b'Name: value\\r\\n...\\r\\n' (header lines and the blank line) -> dict with
    lower-case names; repeated fields joined with ', '.  Raises HTTPError: 431 for more
    than MAX_HEADERS lines or one over MAX_LINE bytes, 400 for anything malformed."""
    if block.count(b'\n') > MAX_HEADERS + 1:
        raise HTTPError(431, 'more than %d header lines' % MAX_HEADERS)
    text = block.decode('latin-1')
    if _FIELD_BLOCK.fullmatch(text):
        headers = {}
        # Each line is a name (no colon in it), a colon and a value: the last two items
        # are the empty line and what follows its CRLF.
        for line in text.split('\r\n')[:-2]:
            name, _, value = line.partition(':')
            key = name.lower()
            value = value.strip(' \t')
            if key in headers:
                headers[key] += ', ' + value
            else:
                headers[key] = value
        return headers
    headers = {}
    lines = block.split(b'\n')
    for line in lines[:-1]:
        if line in (b'', b'\r'):
            return headers
        if len(line) >= MAX_LINE:
            raise HTTPError(431, 'header line too long')
        parse_header_line(line + b'\n', headers)
    raise HTTPError(431 if len(lines[-1]) > MAX_LINE else 400,
                    'header line too long' if len(lines[-1]) > MAX_LINE else 'truncated head')


def parse_status_line(line: bytes) -> Tuple[Tuple[int, int], int, str]:
    """b'HTTP/1.1 200 OK\\r\\n' -> ((1, 1), 200, 'OK').  Raises HTTPError (status None),
    quoting the line, when it is not a status line of HTTP/1.0 or 1.1."""
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise HTTPError(None, 'malformed status line %r' % bytes(line[:80]))
    minor, status, reason = match.groups()
    return (1, minor[0] - 48), int(status), (reason or b'').decode('latin-1')


def host_header(host, port, secure):
    """The Host header for host:port: IPv6 in brackets, the scheme's default port left out."""
    shown = '[%s]' % host if ':' in host else host
    return shown if port == (443 if secure else 80) else '%s:%d' % (shown, port)


class RequestHead:
    """Event: a request's head.  `headers` maps lower-case names to values (repeated
    fields joined with ', ')."""

    __slots__ = ('method', 'target', 'version', 'headers')

    def __init__(self, method: str, target: str, version: Tuple[int, int],
                 headers: Headers) -> None:
        self.method, self.target, self.version, self.headers = method, target, version, headers

    def __repr__(self):
        return '<RequestHead %s %s>' % (self.method, self.target)


class ResponseHead:
    """Event: a response's head (`status`, `reason`, `version`, `headers`)."""

    __slots__ = ('status', 'reason', 'version', 'headers')

    def __init__(self, status: int, reason: str, version: Tuple[int, int],
                 headers: Headers) -> None:
        self.status, self.reason, self.version, self.headers = status, reason, version, headers

    def __repr__(self):
        return '<ResponseHead %d>' % self.status


class _Sentinel:
    __slots__ = ('name',)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_DATA = _Sentinel('NEED_DATA')            # feed more bytes with receive_data()
PAUSED = _Sentinel('PAUSED')                  # a message is done; respond, or start_next_cycle()
END_OF_MESSAGE = _Sentinel('END_OF_MESSAGE')  # the body (if any) is complete
CLOSED = _Sentinel('CLOSED')                  # the peer ended the connection between messages

# What a connection waits for from its peer.
_HEAD, _HELD, _BODY, _DONE, _SWITCHED, _GONE = range(6)


class _BodyReader:
    """The framing of one body: `length` bytes, chunked (length None), or until the end of
    input (length -1).  read() decodes what a buffer holds, however many chunks carried it,
    into one piece, so that memory follows the data and not the chunk count."""

    __slots__ = ('remaining', 'limit', 'server', 'total', 'framing', 'chunked', 'trailer',
                 'done')

    def __init__(self, length, limit, server=True):
        self.chunked = length is None
        self.remaining = length         # of the body (Content-Length), or of the chunk
        self.limit = limit
        self.server = server            # whether refusals carry a status to answer with
        self.total = 0                  # data bytes so far
        self.framing = 0                # chunk-size lines, CRLFs and trailers so far
        self.trailer = False
        self.done = length == 0

    def fail(self, status, message):
        raise HTTPError(status if self.server else None, message)

    def read(self, buf, eof):
        """Consume from `buf` (a bytearray); return the data decoded (bytes, maybe b'')."""
        if self.chunked:
            return self._read_chunked(buf, eof)
        if self.remaining < 0:                      # until the end of input
            data = bytes(buf)
            buf.clear()
            self.total += len(data)
            if self.total > self.limit:
                self.fail(413, 'body over the %d bytes allowed' % self.limit)
            self.done = eof
            return data
        take = min(self.remaining, len(buf))
        if take == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:take])
            del buf[:take]
        self.remaining -= take
        self.done = not self.remaining
        if not self.done and eof:
            self.fail(400, 'body shorter than its Content-Length (%d bytes missing)'
                      % self.remaining)
        return data

    def _read_chunked(self, buf, eof):
        out = bytearray()
        pos = 0
        size = len(buf)
        while not self.done:
            if self.trailer:                    # trailer fields: checked, and ignored
                end = buf.find(b'\n', pos)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        self.fail(431, 'chunked trailer over %d bytes' % MAX_HEAD)
                    break
                line = buf[pos:end + 1]
                pos = end + 1
                self.framing += len(line)
                if line in (b'\r\n', b'\n'):
                    self.done = True
                elif self.framing > MAX_HEAD:
                    self.fail(431, 'chunked trailer over %d bytes' % MAX_HEAD)
                else:
                    parse_header_line(bytes(line), {})
            elif self.remaining is None:        # a chunk-size line
                match = _CHUNK_SIZE.match(buf, pos)
                if match is None:
                    if b'\n' in buf[pos:pos + _MAX_CHUNK_LINE] or size - pos >= _MAX_CHUNK_LINE:
                        # RFC 9112 7.1: hexadecimal digits only; no sign, no 0x, no
                        # spaces or underscores (int(x, 16) would take those).
                        self.fail(400, 'malformed chunk size line %r'
                                  % bytes(buf[pos:pos + 40].split(b'\n')[0]))
                    break
                pos = match.end()
                self.framing += pos - match.start() + 2     # its line and the data's CRLF
                length = int(match.group(1), 16)
                if not length:
                    self.trailer = True
                    self.framing -= 2
                    continue
                self.total += length
                if self.total > self.limit:
                    self.fail(413, 'body over the %d bytes allowed' % self.limit)
                if self.framing > self.total + _CHUNK_SLACK:
                    self.fail(400, 'chunk framing larger than the data it frames '
                                   '(too many tiny chunks)')
                self.remaining = length
            elif self.remaining:                # a chunk's data
                take = min(self.remaining, size - pos)
                if not take:
                    break
                out += buf[pos:pos + take]
                pos += take
                self.remaining -= take
            else:                               # the CRLF after a chunk's data
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b'\r\n':
                    self.fail(400, 'chunk data longer than its size')
                pos += 2
                self.remaining = None
        del buf[:pos]
        if eof and not self.done:
            self.fail(400, 'truncated chunked body')
        return bytes(out)


def _request_framing(head, max_body, length_required=('POST', 'PUT', 'PATCH')):
    """The _BodyReader that a request head calls for (None: no body), or HTTPError.
    RFC 9112 6: Transfer-Encoding (HTTP/1.1 only, chunked only, never with Content-Length),
    else Content-Length, else no body, which `length_required` methods may not omit."""
    headers = head.headers
    coding = headers.get('transfer-encoding')
    length = headers.get('content-length')
    if coding is not None:
        if head.version < (1, 1):
            raise HTTPError(400, 'Transfer-Encoding in an HTTP/1.0 request')
        if length is not None:
            raise HTTPError(400, 'both Content-Length and Transfer-Encoding')
        if coding.strip().lower() != 'chunked':
            raise HTTPError(501, 'transfer coding %r (only chunked is supported)' % coding[:40])
        return _BodyReader(None, max_body)
    if length is not None:
        size = _content_length(length, 400)
        if size > max_body:
            raise HTTPError(413, 'body of %d bytes, over the %d allowed' % (size, max_body))
        return _BodyReader(size, max_body) if size else None
    if head.method in length_required:
        raise HTTPError(411, '%s needs a Content-Length (or chunked body)' % head.method)
    return None


def _content_length(text, status):
    """The value of a Content-Length field; HTTPError (with `status`) when it is not one
    number of ASCII digits (repeated fields arrive joined with ', ', and are refused)."""
    text = text.strip()
    # (str methods, not a pattern: isdigit() alone would take '²' and other digits)
    if not (len(text) <= 18 and text.isascii() and text.isdigit()):
        raise HTTPError(status, 'malformed Content-Length %r' % text[:20])
    return int(text)


class HTTPConnection:
    """One HTTP/1.1 connection without I/O, in either role, in the manner of h11.

    Bytes in: receive_data(data), with b'' for the end of input.  Events out: next_event()
    returns RequestHead (server role) or ResponseHead (client role), then the body as
    `bytes` pieces, then END_OF_MESSAGE; NEED_DATA when it needs more input, PAUSED once a
    message is done (until start_next_cycle(), or for good after a 101), CLOSED when the
    peer ended the connection between messages.  Bytes out: send_request(),
    send_response(), send_data(), send_end() and send_continue() return the bytes of each
    outgoing piece, for one write each.

    It owns keep-alive (`keep_alive`), body framing (Content-Length; chunked, with strict
    hexadecimal sizes and framing bounded by the data; 100-continue) and every limit, and
    raises HTTPError for what a peer must not send: on the server side with the status to
    answer (400, 411, 413, 414, 431, 501, 505), on the client side with status None.

    A request whose Content-Length body is at most `assemble` bytes (and which does not
    wait for 100 Continue) is delivered only once it is whole: its RequestHead, then its
    body and END_OF_MESSAGE at once.  A shell can thus wait for small requests without
    giving them a thread; larger and chunked bodies come as they arrive.
    """

    def __init__(self, client: bool = False, max_body: int = MAX_BODY, max_head: int = MAX_HEAD,
                 assemble: int = ASSEMBLE, length_required: Sequence[str] = ('POST', 'PUT', 'PATCH'),
                 keep_alive_timeout: Optional[float] = None) -> None:
        self.client = client
        self.max_body = max_body
        self.max_head = max_head
        self.assemble = assemble
        self.length_required = length_required
        self.keep_alive_timeout = keep_alive_timeout    # announced in Keep-Alive: timeout=N
        self.keep_alive = True
        self.head = None                # the head of the message being received
        self.expects_continue = False   # the peer waits for send_continue() before its body
        self._buf = bytearray()
        self._eof = False
        self._state = _HEAD
        self._body = None
        self._method = None             # of the request in flight (HEAD: no body, either way)
        self._streaming = None          # our body: 'chunked', 'raw' (HTTP/1.0), None
        self._head_only = False
        self._host_checked = None       # the last Host a request of this connection named

    @property
    def trailing_data(self) -> Tuple[bytes, bool]:
        """(bytes received after the current message, whether input has ended): after a
        101, the first bytes of the new protocol."""
        return bytes(self._buf), self._eof

    def buffered(self) -> int:
        """How many unprocessed bytes are waiting (of a pipelined request, say)."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the peer; b'' means that its input has ended."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        state = self._state
        if state is _BODY:
            body = self._body
            # (a body read whole, as a small one is with its head, has nothing left to read)
            data = body.read(self._buf, self._eof) if not body.done else None
            if data:
                return data
            if body.done:
                self._body = None
                self._state = _DONE
                return END_OF_MESSAGE
            return NEED_DATA
        if state is _HEAD:
            return self._next_head()
        if state is _HELD:
            if len(self._buf) < self._body.remaining and not self._eof:
                return NEED_DATA
            self._state = _BODY
            return self.head
        if state is _GONE:
            return CLOSED
        return PAUSED

    def _refuse(self, status, message):
        self.keep_alive = False
        self._state = _GONE
        raise HTTPError(None if self.client else status, message)

    def _next_head(self):
        buf = self._buf
        if not buf and not self._eof:       # (a client asks before the reply has come)
            return NEED_DATA
        if not self.client:
            # (the usual first byte, a method's capital letter, needs no closer look)
            if buf and not 65 <= buf[0] <= 90:
                while buf[:2] == b'\r\n' or buf[:1] == b'\n':   # RFC 9112 2.2: ignored
                    del buf[:2 if buf[:1] == b'\r' else 1]
                if buf and buf[:1] != b'\r' and not _TOKEN_CHARS.match(buf[:1]):
                    # No method starts so; a TLS handshake would wait for its line end
                    # forever.
                    self._refuse(400, 'a TLS handshake: this listener takes http://, not '
                                 'https://' if buf[:2] == b'\x16\x03' else
                                 'malformed request line')
        elif buf and not b'HTTP/'.startswith(bytes(buf[:5])):
            # Said at the first bytes: a peer of another protocol may wait for us forever.
            self.keep_alive = False
            self._state = _GONE
            raise _NotHTTP(bytes(buf[:200]))
        match = _BLANK_LINE.search(buf)
        line_end = buf.find(b'\n', 0, MAX_LINE + 1)
        if line_end < 0 and len(buf) > MAX_LINE or line_end >= MAX_LINE:
            self._refuse(414 if b' ' in buf[:20] else 400, 'request line too long'
                         if not self.client else 'status line too long')
        if match is None:
            if len(buf) > self.max_head:
                self._refuse(431, 'head over %d bytes' % self.max_head)
            if self._eof:
                if buf:
                    self._refuse(400, 'connection closed in the middle of a head')
                self._state = _GONE
                self.keep_alive = False
                return CLOSED
            return NEED_DATA
        end = match.end()
        if end > self.max_head:
            self._refuse(431, 'head over %d bytes' % self.max_head)
        # (a line that starts with neither CR nor LF is not empty)
        if buf[0] in b'\r\n' and buf[:line_end + 1].rstrip(b'\r\n') == b'':
            self._refuse(400, 'empty status line')
        first = bytes(buf[:line_end + 1])
        block = bytes(buf[line_end + 1:end])
        del buf[:end]
        try:
            headers = parse_header_block(block)
            if self.client:
                return self._response_head(first, headers)
            return self._request_head(first, headers)
        except HTTPError as exc:
            self._refuse(exc.status, exc.message)

    def _request_head(self, line, headers):
        method, target, version = parse_request_line(line)
        self._method = method
        host = headers.get('host')
        if version >= (1, 1) and host is None:
            raise HTTPError(400, 'HTTP/1.1 request without a Host header')
        if host is not None and host != self._host_checked:     # (once per connection)
            if not _HOST.match(host):
                raise HTTPError(400, 'more than one Host header' if ',' in host else
                                'malformed Host header %r' % host[:60])
            self._host_checked = host
        connection = headers.get('connection')
        connection = _list_tokens(connection) if connection else ()
        self.keep_alive = 'close' not in connection if version >= (1, 1) \
            else 'keep-alive' in connection
        self.head = head = RequestHead(method, target, version, headers)
        body = _request_framing(head, self.max_body, self.length_required)
        self.expects_continue = body is not None and version >= (1, 1) and \
            headers.get('expect', '').lower() == '100-continue'
        self._body = body or _BodyReader(0, 0)
        if body is not None and not body.chunked and body.remaining <= self.assemble \
                and not self.expects_continue \
                and len(self._buf) < body.remaining and not self._eof:
            self._state = _HELD             # (next_event() gives the head once it is whole)
            return NEED_DATA
        self._state = _BODY
        return head

    def _response_head(self, line, headers):
        version, status, reason = parse_status_line(line)
        if 100 <= status < 200 and status != 101:
            return self._next_head()        # an interim answer: the real one follows
        self.head = head = ResponseHead(status, reason, version, headers)
        connection = headers.get('connection')
        self.keep_alive = self.keep_alive and version >= (1, 1) and \
            not (connection and 'close' in _list_tokens(connection))
        if status == 101:
            self._state = _SWITCHED
            return head
        coding = headers.get('transfer-encoding')
        length = headers.get('content-length')
        if self._method == 'HEAD' or status in (204, 304) or status < 200:
            reader = _BodyReader(0, 0, False)
        elif coding is not None:
            if coding.strip().lower() != 'chunked':
                raise HTTPError(None, 'reply in transfer coding %r' % coding[:40])
            reader = _BodyReader(None, self.max_body, False)
        elif length is not None:
            size = _content_length(length, None)
            if size > self.max_body:
                raise HTTPError(None, 'reply of %d bytes, over the %d allowed (max_reply)'
                                % (size, self.max_body))
            reader = _BodyReader(size, self.max_body, False)
        else:
            self.keep_alive = False             # the body ends when the connection does
            reader = _BodyReader(-1, self.max_body, False)
        self._body = reader
        self._state = _BODY
        return head

    def start_next_cycle(self) -> None:
        """After a complete exchange on a kept-alive connection: ready for the next one."""
        if self._state is not _DONE or self._streaming is not None or not self.keep_alive:
            raise RuntimeError('no complete exchange to move on from')
        self._state = _HEAD
        self.head = self._method = None
        self.expects_continue = self._head_only = False

    # -- bytes out ------------------------------------------------------------------------

    def send_request(self, method: str, target: str, headers: HeaderPairs,
                     body: bytes = b'') -> bytes:
        """The bytes of a request (`headers`: (name, value) pairs, Host among them)."""
        self._method = method
        lines = ['%s %s HTTP/1.1\r\n' % (method, target)]
        lines += ['%s: %s\r\n' % item for item in headers]
        if body or method not in ('GET', 'HEAD', 'OPTIONS', 'DELETE'):
            lines.append('Content-Length: %d\r\n' % len(body))
        lines.append('\r\n')
        return ''.join(lines).encode('latin-1') + body

    def send_continue(self) -> bytes:
        """'100 Continue', once, for a peer that waits for it before sending its body."""
        if not self.expects_continue:
            return b''
        self.expects_continue = False
        return b'HTTP/1.1 100 Continue\r\n\r\n'

    def close_after_response(self) -> None:
        """The response about to be sent ends the connection (Connection: close)."""
        self.keep_alive = False

    def send_response(self, status: int, headers: HeaderPairs,
                      body: Optional[bytes] = b'') -> bytes:
        """The bytes of a response's head, and of `body` when it is bytes; body None: the
        body follows through send_data() and send_end().  Answers to HEAD, and 204 and 304
        answers, carry no body (204 not even its framing); after 101 the connection
        belongs to the new protocol."""
        self.expects_continue = False
        if self._state is _HELD or self._state is _BODY and not self._body.done:
            # Answered before the request was read whole: the rest cannot be told apart
            # from a next request.
            self.keep_alive = False
        if status == 101:
            self._state = _SWITCHED
            return _head_bytes(status, headers, None, True, False)
        head = self.head
        version = head.version if head is not None else (1, 1)
        bodiless = status in (204, 304) or status < 200
        self._head_only = self._method == 'HEAD' or bodiless
        streamed = body is None
        if streamed and not self._head_only:
            self._streaming = 'chunked' if version >= (1, 1) else 'raw'
            if self._streaming == 'raw':
                self.keep_alive = False             # the body ends where the connection does
        elif streamed:
            self._streaming = 'none'
        keep_alive = self.keep_alive
        ours = b''                                  # our lines, after the caller's
        if keep_alive:
            if self.keep_alive_timeout is not None:
                ours = b'Keep-Alive: timeout=%d\r\n' % self.keep_alive_timeout
            if version < (1, 1):
                ours += b'Connection: keep-alive\r\n'
        if status == 204 or status < 200:
            length = None                           # RFC 9110 8.6: no Content-Length
        elif streamed:
            length = None
        else:
            length = len(body)
        # (a HEAD answer says how the body would have come: chunked, as to a GET)
        chunked = self._streaming == 'chunked' or \
            streamed and not bodiless and version >= (1, 1)
        data = _head_bytes(status, headers, length, keep_alive, chunked, ours)
        if streamed:
            return data
        self._finish_ours()
        return data if self._head_only else data + body

    @property
    def sends_body(self) -> bool:
        """Whether the answer being sent has a body (not for HEAD, 204, 304)."""
        return not self._head_only

    def send_data(self, data: bytes) -> bytes:
        """One piece of a streamed body (b'' sends nothing)."""
        if not data or self._head_only:
            return b''
        if self._streaming == 'chunked':
            return b'%x\r\n%s\r\n' % (len(data), data)
        return bytes(data)

    def send_end(self) -> bytes:
        """The end of a streamed body."""
        chunked = self._streaming == 'chunked'
        self._streaming = None
        self._finish_ours()
        return b'0\r\n\r\n' if chunked else b''

    def _finish_ours(self):
        if not self.keep_alive:
            self._state = _GONE if self._state is not _SWITCHED else _SWITCHED


_date_cache = [0, b'']       # the second, and its Date line


def _date_line():
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        _date_cache[:] = [now, ('Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n' % (
            ('Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun')[t.tm_wday], t.tm_mday,
            ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov',
             'Dec')[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)).encode('ascii')]
    return _date_cache[1]


_STATUS_LINES = {}          # status -> its status line and our Server line, for the known ones


def _head_bytes(status, headers, length, keep_alive, chunked, ours=b''):
    start = _STATUS_LINES.get(status)
    if start is None:
        start = b'HTTP/1.1 %d %s\r\nServer: mconnector/%s\r\n' % (
            status, _STATUS_TEXT.get(status, 'Unknown').encode('ascii'),
            __version__.encode('ascii'))
        if status in _STATUS_TEXT:
            _STATUS_LINES[status] = start
    lines = [start, _date_line()]
    for name, value in headers:
        lines.append(b'%s: %s\r\n' % (name.encode('ascii'), value.encode('latin-1')))
    lines.append(ours)
    if chunked:
        lines.append(b'Transfer-Encoding: chunked\r\n')
    elif length is not None:
        lines.append(b'Content-Length: %d\r\n' % length)
    if not keep_alive:
        lines.append(b'Connection: close\r\n')
    lines.append(b'\r\n')
    return b''.join(lines)


def _closing_response(status, headers, body):
    """The bytes of a whole response that ends its connection, outside any exchange (a
    refused handshake, a listener that cannot start)."""
    http = HTTPConnection()
    http.close_after_response()
    return http.send_response(status, headers, body)


def split_target(target):
    """'/a%20b?x=1&y=2' -> ('/a b', {'x': '1', 'y': '2'})."""
    if '?' not in target and '%' not in target and target[:1] == '/':
        return target, {}
    from urllib.parse import parse_qsl, unquote
    if target.startswith(('http://', 'https://')):
        target = '/' + target.split('/', 3)[-1] if target.count('/') >= 3 else '/'
    path, _, query = target.partition('?')
    path = unquote(path) if '%' in path else path
    return path, (dict(parse_qsl(query, keep_blank_values=True)) if query else {})


# Signed calls.  With a shared secretKey, the sender adds three headers and the listener
# refuses (401) any request whose signature does not verify, whose timestamp is outside
# the window, or whose nonce it has already seen inside the window (a replay):
#
#   X-MC-Timestamp: 1700000000                      (integer Unix seconds)
#   X-MC-Nonce:     32 hex digits, random per request
#   X-MC-Signature: hex HMAC-SHA256(key, the UTF-8 of the text below)
#
#   METHOD "\n" TARGET "\n" TIMESTAMP "\n" NONCE "\n" hex SHA-256 of the body
#   and for each signed header the request carries, in the order of their names:
#   "\n" name ":" value                             (name in lower case, value trimmed)
#
# TARGET is the request target as sent (path and query); the key is the secret's UTF-8.
# The signed headers are those that change how a listener or a websocket server reads
# the request: Authorization (tokens), Sec-WebSocket-Protocol, and every header whose
# name starts with X-MConnector (type notes, and any such header added later).  A header
# added, removed or changed on the way changes the text, and the signature fails.
SIGNATURE_WINDOW = 300      # seconds either side of the listener's clock
_SIGNED_HEADERS = frozenset({'authorization', 'sec-websocket-protocol'})
_SIGNED_PREFIX = 'x-mconnector'
_TIMESTAMP_OK = re.compile(r'[0-9]{1,12}\Z')
_NONCE_OK = re.compile(r'[\x21-\x7e]{1,64}\Z')
_SIGNATURE_OK = re.compile(r'[0-9a-fA-F]{64}\Z')


def _signed_headers(headers):
    """The signed header lines of `headers` (a mapping of lower-case names to values)."""
    return ''.join(['\n%s:%s' % (name, headers[name].strip()) for name in sorted(headers)
                    if name in _SIGNED_HEADERS or name.startswith(_SIGNED_PREFIX)])


def _signature(key, method, target, timestamp, nonce, body, headers=None):
    """hex HMAC-SHA256 of one request, as the scheme above says."""
    import hashlib
    import hmac
    message = '%s\n%s\n%s\n%s\n%s%s' % (method, target, timestamp, nonce,
                                         hashlib.sha256(body).hexdigest(),
                                         _signed_headers(headers) if headers else '')
    return hmac.new(key.encode('utf-8'), message.encode('utf-8'), hashlib.sha256).hexdigest()


def sign_request(key: str, method: str, target: str, body: bytes,
                 timestamp: Optional[float] = None, nonce: Optional[str] = None,
                 headers: HeaderPairs = ()) -> List[Tuple[str, str]]:
    """The headers that sign one request with `key` (str), as a list of (name, value).

    `headers` are the (name, value) pairs the request will carry: those the listener
    reads (see the scheme above) are signed with it, so sign once they are all there."""
    timestamp = str(int(time.time() if timestamp is None else timestamp))
    nonce = nonce or os.urandom(16).hex()
    fields = {}
    for name, value in headers.items() if hasattr(headers, 'items') else headers:
        name = name.lower()
        fields[name] = fields[name] + ', ' + value.strip() if name in fields else value.strip()
    signature = _signature(key, method, target, timestamp, nonce, body, fields)
    return [('X-MC-Timestamp', timestamp), ('X-MC-Nonce', nonce), ('X-MC-Signature', signature)]


class NonceCache:
    """The nonces of signed requests seen within the signature window, so that each
    signed request is accepted once.

    NonceCache(window=300, path=None)

    Without `path`, in this process's memory.  With `path`, also in a SQLite file that
    every process opening it shares (the workers of `serve --workers` or gunicorn, a
    listener started again): a nonce one of them accepted, the others refuse, until it
    is older than twice the window.  The memory stays in front of the file and refuses
    this process's own replays without a query; the file is opened at the first nonce
    (and again in a forked child).  The file must be on a local disk: SQLite's locks do
    not hold on network file systems.
    """

    def __init__(self, window: float = SIGNATURE_WINDOW,
                 path: Optional[str] = None) -> None:
        self.window = window
        self.path = None if path is None else os.fspath(path)
        self._seen = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0
        self._db = None
        self._db_pid = None
        self._next_db_prune = 0.0

    def add(self, nonce: str, now: float) -> bool:
        """Record `nonce`; return False if it was already seen inside the window.  Raises
        HTTPError(503) when the file cannot be used (the error is logged)."""
        with self._lock:
            if now >= self._next_prune:
                cutoff = now - 2 * self.window
                self._seen = {n: t for n, t in self._seen.items() if t > cutoff}
                self._next_prune = now + self.window / 10
            if nonce in self._seen:
                return False
            if self.path is not None and not self._add_to_file(nonce, now):
                return False
            self._seen[nonce] = now
            return True

    def _add_to_file(self, nonce, now):
        try:
            import sqlite3
        except ImportError as exc:      # a Python built without it
            self._unavailable('%s (NonceCache() without a path keeps nonces in memory, for '
                              'one process)' % exc)
        try:
            db = self._connect()
            if now >= self._next_db_prune:
                db.execute('DELETE FROM nonces WHERE seen < ?', (now - 2 * self.window,))
                self._next_db_prune = now + self.window / 10
            return db.execute('INSERT OR IGNORE INTO nonces VALUES (?, ?)',
                              (nonce, now)).rowcount == 1
        except (sqlite3.Error, OSError) as exc:
            self.close()
            self._unavailable(exc)

    def _unavailable(self, error):
        log.error('the nonce store %s cannot be used, signed calls are refused: %s',
                  self.path, error)
        raise HTTPError(503, 'replay protection unavailable (see the listener\'s log)')

    def _connect(self):
        if self._db is not None and self._db_pid == os.getpid():
            return self._db
        import sqlite3
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Several processes start at once: the first to take the lock creates the table.
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute('PRAGMA journal_mode=WAL')       # readers never wait for a writer
            db.execute('PRAGMA synchronous=NORMAL')     # no fsync per call; a crash keeps it
            db.execute('CREATE TABLE IF NOT EXISTS nonces '
                       '(nonce TEXT PRIMARY KEY, seen REAL NOT NULL)')
            db.execute('CREATE INDEX IF NOT EXISTS nonces_by_age ON nonces (seen)')
        except BaseException:
            db.close()
            raise
        self._db, self._db_pid = db, os.getpid()
        return db

    def close(self):
        """Close the file (it is opened again when needed)."""
        db, self._db = self._db, None
        if db is not None and self._db_pid == os.getpid():
            db.close()


def _nonce_store_path(key):
    """Where a listener or websocket server with secretKey `key` keeps its nonces when it
    is not told: $MCONNECTOR_NONCE_STORE, else one file per key (and per user) in the
    temporary directory, so that the processes of one service on one machine share it."""
    path = os.environ.get('MCONNECTOR_NONCE_STORE')
    if path:
        return path
    import hashlib
    import hmac
    import tempfile
    name = hmac.new(key.encode('utf-8'), b'mconnector nonce store', hashlib.sha256).hexdigest()
    user = os.getuid() if hasattr(os, 'getuid') else os.environ.get('USERNAME', 'user')
    directory = os.path.join(tempfile.gettempdir(), 'mconnector-%s' % user)
    if hasattr(os, 'getuid') and os.path.lexists(directory):
        import stat
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OSError('%s belongs to another user: set MCONNECTOR_NONCE_STORE '
                          'or nonce_store=' % directory)
    return os.path.join(directory, 'nonces-%s.sqlite3' % name[:16])


def _replay_cache(owner):
    """The NonceCache of a listener or websocket server, made at its first signed request
    from its `nonce_store` (None: the default file; a path; a NonceCache)."""
    cache = owner._nonces
    if cache is None:
        store = owner.nonce_store
        if hasattr(store, 'add'):
            cache = store
        else:
            try:
                path = store if store is not None else _nonce_store_path(owner.secretKey)
            except OSError as exc:
                log.error('no nonce store, signed calls are refused: %s', exc)
                raise HTTPError(503, 'replay protection unavailable (see the listener\'s '
                                'log)') from None
            cache = NonceCache(path=path)
        owner._nonces = cache
    return cache


def verify_request(key: str, method: str, target: str, headers: Mapping[str, str], body: bytes,
                   nonces: NonceCache, now: Optional[float] = None) -> None:
    """Raise HTTPError(401) unless the request carries a valid, fresh, unreplayed signature.

    `headers` maps lower-case names to values (the signed ones among them are checked,
    see the scheme above); `nonces` is a NonceCache."""
    import hmac
    now = time.time() if now is None else now
    timestamp = headers.get('x-mc-timestamp', '').strip()
    nonce = headers.get('x-mc-nonce', '').strip()
    given = headers.get('x-mc-signature', '').strip()
    if not (timestamp and nonce and given):
        raise HTTPError(401, 'this listener takes signed calls only (secretKey)')
    if not _TIMESTAMP_OK.match(timestamp):
        raise HTTPError(401, 'malformed signature timestamp (integer Unix seconds)')
    if abs(now - int(timestamp)) > nonces.window:
        raise HTTPError(401, 'signature timestamp outside the %ds window' % nonces.window)
    if not _NONCE_OK.match(nonce):
        raise HTTPError(401, 'malformed nonce (1 to 64 visible ASCII characters)')
    if not _SIGNATURE_OK.match(given):
        raise HTTPError(401, 'malformed signature (64 hexadecimal digits)')
    expected = _signature(key, method, target, timestamp, nonce, body, headers)
    if not hmac.compare_digest(expected, given.lower()):
        raise HTTPError(401, 'bad signature')
    if not nonces.add(nonce, now):
        raise HTTPError(401, 'replayed request (nonce already seen)')


class Response:
    """What a handler answers: a status, headers, and a body (bytes, or an iterable of
    bytes to send chunked)."""

    __slots__ = ('status', 'headers', 'body')

    def __init__(self, status: int = 200, body: Union[bytes, Iterable[bytes]] = b'',
                 headers: HeaderPairs = (),
                 content_type: Optional[str] = 'application/json') -> None:
        self.status = status
        self.body = body
        self.headers = [('Content-Type', content_type)] if content_type else []
        self.headers.extend(headers)

    @classmethod
    def error(cls, status: int, type_name: str, message: str, headers: HeaderPairs = (),
              traceback: Optional[str] = None) -> Response:
        error = {'status': status, 'type': type_name, 'message': message}
        if traceback:
            error['traceback'] = traceback
        return cls(status, json.dumps({'error': error}).encode('utf-8'), headers)

    @classmethod
    def refusal(cls, exc: HTTPError) -> Response:
        """The error response for an HTTPError, its type named from _STATUS_ERRORS."""
        return cls.error(exc.status, _STATUS_ERRORS.get(exc.status, CallError).__name__,
                         exc.message, exc.headers)


# ###########################################################################################
# 5. WebSocket core: sans-I/O RFC 6455
# ###########################################################################################

# RFC 6455 without a socket in sight.  Three layers, all on bytes:
#   - the opening handshake: an HTTP head in, a checked request (or an HTTP error) out, and the
#     client's mirror image of it, with the negotiation of permessage-deflate (RFC 7692);
#   - frames: _ws_frame() builds one, WebSocketProtocol parses them as bytes arrive;
#   - WebSocketProtocol, the connection's state machine: feed it with receive_data(), then take
#     events() for the application and data_to_send() for the wire.  It compresses and
#     inflates messages itself when the handshake negotiated permessage-deflate.
# Sockets and threads come in later sections; the tests drive it with hand-built bytes.


_WS_GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'     # RFC 6455 section 1.3
_WS_VERSION = '13'
_WS_MAX_SIZE = 2 ** 20          # largest message accepted, 1 MiB as the websockets package does
_WS_MAX_HEAD = 16384            # opening handshake head, 16 KiB as h11 (and node, Apache) allow
_WS_HANDSHAKE_TIMEOUT = 10.0    # seconds for a new connection to complete its opening handshake
_WS_CLOSE_TIMEOUT = 10.0        # seconds to wait for the peer's side of the closing handshake
_WS_PING_INTERVAL = 20.0        # keep-alive: a ping every 20 s, as the websockets package does ...
_WS_PING_TIMEOUT = 20.0         # ... and a peer that has not answered it 20 s later is dropped
_WS_RECV_SIZE = 262144          # one recv_into() takes up to 256 KiB
_WS_PART = 16384                # a frame arriving in pieces is taken in pieces of 16 KiB or more
_WS_WRITE_TIMEOUT = 60.0        # a peer that takes no byte for a minute is gone
# permessage-deflate: LZ77 windows of 4 KiB and zlib's memLevel 5, the websockets package's
# defaults.  zlib's compressor takes (1 << (windowBits + 2)) + (1 << (memLevel + 9)) bytes
# (zconf.h): 32 KiB with these, 256 KiB with zlib's own defaults.  Messages under 64 bytes
# go uncompressed: deflate saves next to nothing on them, and a connection that sends only
# those never allocates a compressor.
_WS_DEFLATE_WINDOW_BITS = 12
_WS_DEFLATE_MEM_LEVEL = 5
_WS_COMPRESS_MIN_SIZE = 64
_WS_DEFLATE_TAIL = b'\x00\x00\xff\xff'   # RFC 7692 7.2.1: the end of a sync flush, not sent


def _ws_max_frames(max_size):
    """The default limit on the frames of one message: one per 64 bytes of max_size (the
    smallest fragments Autobahn sends), and never under 1024; none when max_size is None
    (no limit: a message may be as long as the peer makes it)."""
    return None if max_size is None else max(1024, max_size // 64)


class WebSocketError(MConnectorError):
    """Root of the websocket errors.

    WebSocketError
     +-- HandshakeError            the opening handshake failed; .status (HTTP), .path
     +-- WebSocketProtocolError    the peer broke RFC 6455; ends the connection with 1002
     +-- PayloadTooBig             a message or frame over the limit; ends it with 1009
     +-- ConnectionClosed          (also ConnectionError) .code, .reason, .rcvd, .sent
     +-- WebSocketTimeout          (also TimeoutError) nothing arrived in time
    """


class HandshakeError(WebSocketError):
    """The opening handshake failed: the server refused it, or the request or answer was not
    a valid websocket upgrade.  `status` is the HTTP status (sent or received), `path` the
    resource asked for; `headers` holds extra response headers the server sends with it."""

    def __init__(self, status: int, message: str, path: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        self.status = status
        self.message = message
        self.path = path
        self.headers = headers or {}
        super().__init__(status, message, path)

    def __str__(self):
        where = ' for %s' % self.path if self.path else ''
        status = 'HTTP %s ' % self.status if self.status else ''   # 0: no HTTP answer came
        return 'websocket handshake%s failed: %s%s' % (where, status, self.message)


class WebSocketProtocolError(WebSocketError):
    """The peer sent something RFC 6455 forbids (close code 1002)."""


class PayloadTooBig(WebSocketError):
    """A message (or frame) is larger than the limit set (close code 1009).  `what` is
    'message' or 'frame' (`size` in bytes), or 'frames' (`size`: a message's frames)."""

    def __init__(self, size: int, max_size: int, what: str = 'message') -> None:
        self.size = size
        self.max_size = max_size
        self.what = what
        super().__init__(size, max_size, what)

    def __str__(self):
        if self.what == 'frames':
            return 'message of %d frames over the limit of %d' % (self.size, self.max_size)
        return '%s of %d bytes over the limit of %d' % (self.what, self.size, self.max_size)


class ConnectionClosed(WebSocketError, ConnectionError):
    """The websocket connection is closed.  `code` and `reason` say why: the peer's close frame
    when one arrived, else ours, else 1006 (the TCP connection ended without a close frame).
    `rcvd` and `sent` are the (code, reason) pairs of the close frames received and sent, or
    None.  `ok` is true for a normal ending (1000, 1001, or a close frame without a code)."""

    def __init__(self, rcvd: Optional[Tuple[int, str]] = None,
                 sent: Optional[Tuple[int, str]] = None) -> None:
        self.rcvd = rcvd
        self.sent = sent
        self.code, self.reason = rcvd or sent or (CloseCode.ABNORMAL, '')
        super().__init__(self.code, self.reason)

    @property
    def ok(self) -> bool:
        return self.code in (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS)

    def __str__(self):
        try:
            name = CloseCode(self.code).name.lower().replace('_', ' ')
        except ValueError:
            name = 'application code'
        text = 'websocket connection closed: %d (%s)' % (self.code, name)
        return text + (' %s' % self.reason if self.reason else '')


class WebSocketTimeout(WebSocketError, TimeoutError):
    """Nothing arrived within the timeout; the connection itself is still usable."""


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close codes (RFC 6455 7.4.1) this module sends or names."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005            # never on the wire: the close frame carried no code
    ABNORMAL = 1006             # never on the wire: the connection ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015        # never on the wire


class WebSocketState(enum.IntEnum):
    """Where a connection stands in its closing handshake."""

    OPEN = 1        # messages flow both ways
    CLOSING = 2     # we sent a close frame and wait for the peer's
    CLOSED = 3      # closing handshake done, connection failed, or stream ended: no more input


def _ws_close_code_ok(code):
    """May `code` travel in a close frame?  RFC 6455 7.4: 1000-1003, 1007-1011 and the codes
    IANA registered since (1012-1014), 3000-4999 for libraries and applications; 1004-1006,
    1015 and anything else are protocol errors."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


_WS_XOR_TABLES = [None] * 256     # byte -> byte ^ k, one table per key byte, built on demand
_WS_MASK_PIECE = 65536            # large payloads are masked this much at a time (a multiple of 4)


def _ws_mask(data, key):
    """XOR `data` with the 4-byte `key` repeated (RFC 6455 5.3); the same call unmasks.

    Never a Python loop per byte.  Up to 4 KiB the payload is one big integer XORed with the
    key repeated (one XOR in C).  Above that, bytes.translate() with an XOR table maps each
    of the four interleaved byte lanes: fewer instructions than the big integer on every
    Python from 3.8 to 3.13, as it allocates less.  A large payload goes through in pieces
    of _WS_MASK_PIECE bytes, each masked while it is still in the CPU's caches."""
    n = len(data)
    if n <= 4096:
        if not n:
            return b''
        keys = bytes(key) * (n // 4) + bytes(key[:n % 4])
        return (int.from_bytes(data, 'little') ^ int.from_bytes(keys, 'little')).to_bytes(n, 'little')
    if n <= _WS_MASK_PIECE:
        return bytes(_ws_mask_lanes(data, key))
    return b''.join(_ws_mask_pieces(data, key))


def _ws_mask_lanes(data, key):
    out = bytearray(data)
    for lane in range(4):
        k = key[lane]
        table = _WS_XOR_TABLES[k]
        if table is None:
            table = _WS_XOR_TABLES[k] = bytes(b ^ k for b in range(256))
        out[lane::4] = out[lane::4].translate(table)
    return out


def _ws_mask_pieces(data, key):
    """`data` masked, as a list of bytes-like pieces to be joined (no copy of the whole)."""
    with memoryview(data) as view:
        return [_ws_mask_lanes(view[i:i + _WS_MASK_PIECE], key)
                for i in range(0, len(data), _WS_MASK_PIECE)]


def _ws_frame(opcode, payload=b'', fin=True, mask_key=None, rsv1=False):
    """One frame as bytes: header, then the payload (masked with `mask_key` when given; clients
    MUST mask every frame, servers MUST NOT, RFC 6455 5.1).  `rsv1` marks the first frame of
    a compressed message (RFC 7692 6)."""
    n = len(payload)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, 'big')
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, 'big')
    if mask_key is not None:
        if n > _WS_MASK_PIECE:
            # Joined with the header at once: the payload is copied once, not twice.
            return b''.join([head, mask_key] + _ws_mask_pieces(payload, mask_key))
        return head + mask_key + _ws_mask(payload, mask_key)
    return head + payload


def _ws_close_payload(code, reason=''):
    """The payload of a close frame.  Raises ValueError for a code that may not be sent or a
    reason over 123 bytes (a control frame carries at most 125)."""
    if not _ws_close_code_ok(code):
        raise ValueError('close code %r may not be sent' % (code,))
    data = reason.encode('utf-8')
    if len(data) > 123:
        raise ValueError('close reason over 123 bytes')
    return int(code).to_bytes(2, 'big') + data


class _WsPartialFrame:
    """A frame whose header has been read and whose payload is still arriving: the pieces
    received so far (unmasked), and what is left of it."""

    __slots__ = ('first', 'left', 'key', 'parts')

    def __init__(self, first, length, key):
        self.first = first              # the header's first byte: FIN, RSV1, opcode
        self.left = length
        self.key = key                  # the mask key turned to the next piece's offset
        self.parts = []

    def take(self, buf, pos, n):
        """Take the next `n` bytes of the payload from buf[pos:]."""
        with memoryview(buf) as view:
            key = self.key
            if key is None:
                self.parts.append(bytes(view[pos:pos + n]))
            else:
                # Pieces as they come out of the mask: payload() copies them once, joined.
                self.parts += _ws_mask_pieces(view[pos:pos + n], key)
                turn = n & 3
                if turn:
                    self.key = key[turn:] + key[:turn]
        self.left -= n

    def payload(self):
        parts, self.parts = self.parts, []
        return bytes(parts[0]) if len(parts) == 1 else b''.join(parts)


class WebSocketProtocol:
    """The state machine of one websocket connection, on bytes only (no socket, no thread).

    Feed it with receive_data(data) as bytes arrive (b'' when the stream ends); events()
    then parses what was received, up to and including the next whole message, and returns
    what happened as (opcode, value) pairs.  One message at a time, so that the application
    answers a message before a bad frame behind it fails the connection (the order Autobahn
    3.2, 4.x and 5.15 check); `pending` says that events() has more to give without input.

        (Opcode.TEXT, str), (Opcode.BINARY, bytes)   a whole message (fragments joined)
        (Opcode.PING, bytes), (Opcode.PONG, bytes)   control frames (pings are answered already)
        (Opcode.CLOSE, (code, reason))               no more input: the peer's close frame,
                                                     our error code, or 1006 for a lost stream

    send(), ping(), pong(), close() and fail() queue frames; data_to_send() returns every
    queued byte, in order, as one bytes object (one write).

        OPEN --close()--> CLOSING --peer's close frame--> CLOSED
        OPEN --peer's close frame (echoed at once)------> CLOSED
        any  --protocol error: fail(), close frame sent-> CLOSED
        any  --end of stream----------------------------> CLOSED

    What the peer sends never raises: every fault becomes a close frame, with its code chosen
    in one place (_receive): WebSocketProtocolError 1002, invalid UTF-8 1007, PayloadTooBig
    1009, anything else 1011 (logged, no details to the peer).  Once CLOSED, input is ignored.
    send() raises ConnectionClosed once a close frame was sent or received.

    `deflate` holds the permessage-deflate parameters the opening handshake negotiated (see
    _ws_deflate_accept and _ws_deflate_check_answer), None for none.  With them, send()
    compresses every message of 64 bytes or more (RSV1 set), and compressed messages from
    the peer are inflated, uncompressed ones taken as they are.  A compressed message is
    held to max_size as it inflates, so a small frame cannot expand past it (1009).
    """

    def __init__(self, client: bool = False, max_size: Optional[int] = _WS_MAX_SIZE,
                 max_frame_size: Optional[int] = None,
                 max_frames: Optional[int] = None, deflate: Optional[_WsDeflate] = None) -> None:
        self.client = client
        self.max_size = max_size
        self.max_frame_size = max_size if max_frame_size is None else max_frame_size
        # Frames of one message, empty ones included: without a count, zero-length
        # continuations would make a message that never ends and costs nothing to send.
        self.max_frames = _ws_max_frames(max_size) if max_frames is None else max_frames
        self.state = WebSocketState.OPEN
        self.close_rcvd = None          # (code, reason) of the peer's close frame
        self.close_sent = None          # (code, reason) of ours
        self._buf = bytearray()
        self._need = 2                  # bytes the next parse step needs in _buf
        self._partial = None            # the _WsPartialFrame whose payload is arriving
        self._eof = False
        self._events = []
        self._out = []
        self._frag_opcode = None        # opcode of the fragmented message being assembled
        self._frag_parts = []
        self._frag_size = 0
        self._frag_frames = 0
        self._decoder = None            # incremental UTF-8 check of a fragmented text
        self.deflate = deflate
        self._deflater = None           # zlib objects, made when first needed
        self._inflater = None
        self._frag_compressed = False   # the fragmented message being assembled is compressed

    # -- input --------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes received from the peer; b'' means the stream ended."""
        if self.state is WebSocketState.CLOSED:
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def pending(self) -> bool:
        """True when events() may return more without new input."""
        return self.state is not WebSocketState.CLOSED and (len(self._buf) >= self._need or self._eof)

    def events(self) -> List[Tuple[Opcode, Any]]:
        """Parse on, up to the next whole message, and return (and forget) the events since
        the last call, oldest first."""
        if self.state is not WebSocketState.CLOSED:
            if len(self._buf) >= self._need:
                self._receive()
            if self._eof and self.state is not WebSocketState.CLOSED and len(self._buf) < self._need:
                self._frag_parts = []
                self._partial = None
                self.state = WebSocketState.CLOSED
                self._events.append((Opcode.CLOSE, (CloseCode.ABNORMAL, '')))
        events = self._events
        self._events = []
        return events

    def _receive(self):
        try:
            self._parse()
        except WebSocketProtocolError as exc:
            self.fail(CloseCode.PROTOCOL_ERROR, str(exc))
        except UnicodeDecodeError:
            self.fail(CloseCode.INVALID_DATA, 'invalid UTF-8')
        except PayloadTooBig as exc:
            self.fail(CloseCode.MESSAGE_TOO_BIG, str(exc))
        except Exception:
            log.exception('websocket frame handling failed')
            self.fail(CloseCode.INTERNAL_ERROR)

    def _parse(self):
        buf = self._buf
        end = len(buf)
        pos = 0
        client = self.client
        while self.state is not WebSocketState.CLOSED:
            frame = self._partial
            if frame is not None:
                # The rest of a frame whose header came earlier: what has arrived of its
                # payload is taken now, unmasked, in pieces of at least _WS_PART bytes.
                take = frame.left if frame.left < end - pos else end - pos
                if take < frame.left and take < _WS_PART:
                    self._need = min(frame.left, _WS_PART)
                    break
                frame.take(buf, pos, take)
                pos += take
                if frame.left:
                    continue
                self._partial = None
                first = frame.first
                opcode = first & 0x0F
                fin = first & 0x80
                payload = frame.payload()
            else:
                if end - pos < 2:
                    self._need = 2
                    break
                first = buf[pos]
                second = buf[pos + 1]
                length = second & 0x7F
                head = 2
                if length == 126:
                    head = 4
                    if end - pos < 4:
                        self._need = 4
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 4], 'big')
                elif length == 127:
                    head = 10
                    if end - pos < 10:
                        self._need = 10
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 10], 'big')
                masked = second & 0x80
                if masked:
                    head += 4
                # Everything about the header is checked now, before waiting for its payload:
                # a 2**63-byte length or a bad opcode is refused at once, not after a stall.
                opcode = first & 0x0F
                fin = first & 0x80
                self._check_header(first, opcode, fin, masked, client, length)
                total = head + length
                if end - pos < total:
                    if end - pos < head:
                        self._need = head
                        break
                    # A frame that did not come whole is taken as it arrives, not held in
                    # the buffer until its last byte: the buffer stays small, and the
                    # payload is unmasked in pieces that are still in the CPU's caches.
                    self._partial = _WsPartialFrame(
                        first, length, bytes(buf[pos + head - 4:pos + head]) if masked else None)
                    pos += head
                    continue
                # Through a memoryview, the payload is copied once, not sliced and then copied.
                with memoryview(buf) as view:
                    if masked:
                        payload = _ws_mask(view[pos + head:pos + total], buf[pos + head - 4:pos + head])
                    else:
                        payload = bytes(view[pos + head:pos + total])
                pos += total
            if first & 0x40 or self._frag_compressed and not opcode:
                payload = self._inflate(payload, opcode, fin)
            self._frame(opcode, fin, payload)
            if opcode < 8 and fin:
                self._need = 2
                break
        else:
            buf.clear()
            return
        if pos:
            del buf[:pos]

    def _check_header(self, first, opcode, fin, masked, client, length):
        if first & 0x70:
            if first & 0x30 or self.deflate is None:
                raise WebSocketProtocolError('reserved bits set, but no extension was negotiated')
            if not 1 <= opcode <= 2:
                # RFC 7692 6: RSV1 marks the first frame of a compressed data message only.
                raise WebSocketProtocolError('RSV1 set on a %s frame' % (
                    'continuation' if opcode == Opcode.CONTINUATION else 'control'))
        if opcode >= 8:
            if opcode > 10:
                raise WebSocketProtocolError('unknown opcode %d' % opcode)
            if not fin:
                raise WebSocketProtocolError('fragmented control frame')
            if length > 125:
                raise WebSocketProtocolError('control frame payload over 125 bytes')
        elif opcode > 2:
            raise WebSocketProtocolError('unknown opcode %d' % opcode)
        elif opcode == Opcode.CONTINUATION:
            if self._frag_opcode is None:
                raise WebSocketProtocolError('continuation frame with no message to continue')
        elif self._frag_opcode is not None:
            raise WebSocketProtocolError('new message before the fragmented one ended')
        # RFC 6455 5.1: "The server MUST close the connection upon receiving a frame that is
        # not masked" and "A client MUST close a connection if it detects a masked frame".
        if client:
            if masked:
                raise WebSocketProtocolError('masked frame from the server')
        elif not masked:
            raise WebSocketProtocolError('unmasked frame from the client')
        if length >> 63:
            raise WebSocketProtocolError('frame length with its most significant bit set')
        if opcode < 8:
            # None for any of the three limits is no limit.
            if self.max_frame_size is not None and length > self.max_frame_size:
                raise PayloadTooBig(length, self.max_frame_size, 'frame')
            if self.max_size is not None and self._frag_size + length > self.max_size:
                raise PayloadTooBig(self._frag_size + length, self.max_size)
            if opcode == Opcode.CONTINUATION and self.max_frames is not None and \
                    self._frag_frames >= self.max_frames:
                raise PayloadTooBig(self._frag_frames + 1, self.max_frames, 'frames')

    def _frame(self, opcode, fin, payload):
        if opcode == Opcode.TEXT:
            if fin:
                self._events.append((Opcode.TEXT, payload.decode('utf-8')))
            else:
                import codecs
                self._decoder = codecs.getincrementaldecoder('utf-8')()
                self._start_fragments(opcode, self._decoder.decode(payload), len(payload))
        elif opcode == Opcode.BINARY:
            if fin:
                self._events.append((Opcode.BINARY, payload))
            else:
                self._start_fragments(opcode, payload, len(payload))
        elif opcode == Opcode.CONTINUATION:
            self._frag_size += len(payload)
            self._frag_frames += 1
            if self._frag_opcode == Opcode.TEXT:
                # The decoder raises on the first invalid sequence, even mid-message: a bad
                # fragment fails the connection at once (Autobahn 6.4 checks this).
                part = self._decoder.decode(payload, bool(fin))
                if part:
                    self._frag_parts.append(part)
            elif payload:
                self._frag_parts.append(payload)
            if fin:
                parts = self._frag_parts
                message = (''.join(parts) if self._frag_opcode == Opcode.TEXT
                           else b''.join(parts))
                self._events.append((self._frag_opcode, message))
                self._frag_opcode = self._decoder = None
                self._frag_parts = []
                self._frag_size = self._frag_frames = 0
        elif opcode == Opcode.PING:
            # RFC 6455 5.5.2: answer with a Pong "with identical Application data".
            if self.close_sent is None:
                self._out.append(_ws_frame(Opcode.PONG, payload, mask_key=self._mask_key()))
            self._events.append((Opcode.PING, payload))
        elif opcode == Opcode.PONG:
            self._events.append((Opcode.PONG, payload))
        else:
            self._receive_close(payload)

    def _inflate(self, payload, opcode, fin):
        """The payload of a compressed message's frame, inflated (RFC 7692 7.2.2), never
        more than what max_size leaves for this message."""
        import zlib
        inflater = self._inflater
        if inflater is None:
            bits = self.deflate.server_max_window_bits if self.client else \
                self.deflate.client_max_window_bits
            inflater = self._inflater = zlib.decompressobj(-bits)
        if opcode:
            self._frag_compressed = not fin
        elif fin:
            self._frag_compressed = False
        # zlib stops at max_length bytes of output: one byte over the room left proves the
        # message too big before more memory is spent on it.  (max_length=0 is no limit.)
        room = None if self.max_size is None else self.max_size - (0 if opcode else self._frag_size)
        limit = 0 if room is None else room + 1
        try:
            data = inflater.decompress(payload, limit)
            if fin and (room is None or len(data) <= room):
                limit = 0 if room is None else room + 1 - len(data)
                data += inflater.decompress(_WS_DEFLATE_TAIL, limit)
        except zlib.error as exc:
            raise WebSocketProtocolError('compressed data that does not inflate: %s' % exc) from None
        if room is not None and len(data) > room:
            raise PayloadTooBig(self.max_size - room + len(data), self.max_size)
        if fin and (inflater.eof or (self.deflate.client_no_context_takeover if not self.client
                                     else self.deflate.server_no_context_takeover)):
            # The peer resets its window after each message (or ended its stream with a
            # final block): so does the inflater, and its memory goes until the next one.
            self._inflater = None
        return data

    def _compress(self, payload):
        import zlib
        deflater = self._deflater
        if deflater is None:
            bits = self.deflate.client_max_window_bits if self.client else \
                self.deflate.server_max_window_bits
            # zlib refuses an 8-bit window for raw deflate and makes it 9; that is safe: its
            # matches reach back at most 512 - 262 bytes, inside a 256-byte window.
            deflater = self._deflater = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -max(bits, 9), _WS_DEFLATE_MEM_LEVEL)
        data = deflater.compress(payload) + deflater.flush(zlib.Z_SYNC_FLUSH)
        if self.deflate.client_no_context_takeover if self.client else \
                self.deflate.server_no_context_takeover:
            self._deflater = None
        # A sync flush ends with an empty stored block, whose last 4 bytes are not sent.
        return data[:-4] if data.endswith(_WS_DEFLATE_TAIL) else data

    def _start_fragments(self, opcode, first_part, size):
        self._frag_opcode = opcode
        self._frag_parts = [first_part]
        self._frag_size = size
        self._frag_frames = 1

    def _receive_close(self, payload):
        if len(payload) == 1:
            raise WebSocketProtocolError('close frame with a 1-byte payload')
        if payload:
            code = int.from_bytes(payload[:2], 'big')
            if not _ws_close_code_ok(code):
                raise WebSocketProtocolError('invalid close code %d' % code)
            reason = payload[2:].decode('utf-8')
        else:
            code, reason = CloseCode.NO_STATUS, ''
        self.close_rcvd = (code, reason)
        if self.close_sent is None:
            # RFC 6455 5.5.1: the endpoint sends a Close frame in response, "typically echoing
            # the status code it received".
            self._out.append(_ws_frame(Opcode.CLOSE, payload[:2], mask_key=self._mask_key()))
            self.close_sent = (code, '')
        self.state = WebSocketState.CLOSED
        self._events.append((Opcode.CLOSE, (code, reason)))

    # -- output -------------------------------------------------------------------------------

    def _mask_key(self):
        return os.urandom(4) if self.client else None

    def send(self, message: Union[str, bytes, bytearray, memoryview]) -> None:
        """Queue a message: str as text, bytes-like as binary.  Raises ConnectionClosed once
        a close frame was sent or received, TypeError for anything else."""
        if isinstance(message, str):
            opcode, payload = Opcode.TEXT, message.encode('utf-8')
        elif isinstance(message, (bytes, bytearray, memoryview)):
            opcode, payload = Opcode.BINARY, message
        else:
            raise TypeError('a websocket message is str or bytes, not %s' % type(message).__name__)
        if self.close_sent is not None or self.state is WebSocketState.CLOSED:
            raise ConnectionClosed(self.close_rcvd, self.close_sent)
        if self.deflate is not None and len(payload) >= _WS_COMPRESS_MIN_SIZE:
            self._out.append(_ws_frame(opcode, self._compress(payload), mask_key=self._mask_key(),
                                       rsv1=True))
            return
        self._out.append(_ws_frame(opcode, payload, mask_key=self._mask_key()))

    def send_frame(self, frame: bytes) -> None:
        """Queue a whole message frame built already (a server's, by _ws_frame): the same
        bytes may be queued on many connections.  Raises ConnectionClosed as send() does."""
        if self.close_sent is not None or self.state is WebSocketState.CLOSED:
            raise ConnectionClosed(self.close_rcvd, self.close_sent)
        self._out.append(frame)

    def ping(self, payload: bytes = b'') -> None:
        """Queue a ping.  Raises ValueError over 125 bytes, ConnectionClosed when closing."""
        self._control(Opcode.PING, payload)

    def pong(self, payload: bytes = b'') -> None:
        """Queue an unsolicited pong (a one-way heartbeat).  Raises as ping() does."""
        self._control(Opcode.PONG, payload)

    def _control(self, opcode, payload):
        if len(payload) > 125:
            raise ValueError('a control frame carries at most 125 bytes')
        if self.close_sent is not None or self.state is WebSocketState.CLOSED:
            raise ConnectionClosed(self.close_rcvd, self.close_sent)
        self._out.append(_ws_frame(opcode, bytes(payload), mask_key=self._mask_key()))

    def close(self, code: int = CloseCode.NORMAL, reason: str = '') -> None:
        """Start the closing handshake (OPEN -> CLOSING); does nothing once closing or closed.
        Raises ValueError for a code that may not be sent or a reason over 123 bytes."""
        payload = _ws_close_payload(code, reason)
        if self.state is not WebSocketState.OPEN:
            return
        self._out.append(_ws_frame(Opcode.CLOSE, payload, mask_key=self._mask_key()))
        self.close_sent = (code, reason)
        self.state = WebSocketState.CLOSING

    def fail(self, code: int = CloseCode.INTERNAL_ERROR, reason: str = '') -> None:
        """Fail the connection (RFC 6455 7.1.7): send a close frame with `code` unless one was
        sent already, ignore all further input, and report CLOSE."""
        if self.state is WebSocketState.CLOSED:
            return
        if self.close_sent is None:
            data = reason.encode('utf-8')[:123].decode('utf-8', 'ignore')
            self._out.append(_ws_frame(Opcode.CLOSE, _ws_close_payload(code, data),
                                       mask_key=self._mask_key()))
            self.close_sent = (code, data)
        self.state = WebSocketState.CLOSED
        self._buf = bytearray()
        self._partial = None
        self._frag_parts = []
        self._events.append((Opcode.CLOSE, (code, reason)))

    def data_to_send(self) -> bytes:
        """Return (and forget) every queued byte as one bytes object, b'' if none."""
        out = self._out
        if not out:
            return b''
        self._out = []
        return out[0] if len(out) == 1 else b''.join(out)


# -- opening handshake (RFC 6455 section 4) -----------------------------------------------------


def _ws_accept(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    import hashlib
    return base64.b64encode(hashlib.sha1(key.encode('ascii') + _WS_GUID).digest()).decode('ascii')


def _ws_head(data, client=False):
    """The head event that `data` (the bytes of one head) parses to through the HTTP core,
    with the handshake's 16 KiB limit.  Raises HandshakeError (400, 431; status 0 for an
    answer that is not HTTP)."""
    http = HTTPConnection(client=client, max_head=_WS_MAX_HEAD, length_required=())
    http.receive_data(data)
    http.receive_data(b'')
    try:
        event = http.next_event()
    except HTTPError as exc:
        raise HandshakeError(exc.status or 0, exc.message) from None
    if event is CLOSED or event is NEED_DATA:
        raise HandshakeError(400 if not client else 0, 'no head')
    return event


class _WsRequest:
    """A checked opening handshake, as the server saw it; `deflate` holds the
    permessage-deflate parameters accepted, or None."""

    __slots__ = ('target', 'path', 'query', 'headers', 'key', 'subprotocol', 'origin', 'deflate')

    def __init__(self, target, headers, key, subprotocol, deflate=None):
        from urllib.parse import unquote
        self.target = target
        raw_path, _, self.query = target.partition('?')
        self.path = unquote(raw_path)
        self.headers = headers
        self.key = key
        self.subprotocol = subprotocol
        self.origin = headers.get('origin')
        self.deflate = deflate


def _ws_check_request(head, subprotocols=(), origins=None, compression=None):
    """Check a client's opening handshake (RFC 6455 4.2.1), a RequestHead from the HTTP
    core, and return a _WsRequest.

    The subprotocol chosen is the first of `subprotocols` (the server's preference) that the
    client offered, or None.  With compression='deflate', the first acceptable
    permessage-deflate offer is accepted (see _ws_deflate_accept).  Raises HandshakeError:
    400 for anything that is not a valid upgrade, 426 (with Sec-WebSocket-Version: 13) for
    another protocol version, 403 for an Origin not in `origins` (when `origins` is given)."""
    method, target, version, headers = head.method, head.target, head.version, head.headers
    path = target.partition('?')[0] or None
    if method != 'GET':
        raise HandshakeError(400, 'a websocket handshake is a GET, not %s' % method[:16], path)
    if version != (1, 1):
        raise HandshakeError(400, 'a websocket handshake needs HTTP/1.1', path)
    if not target.startswith('/'):
        raise HandshakeError(400, 'the request target must be a path', None)
    if 'host' not in headers:
        raise HandshakeError(400, 'no Host header', path)
    if 'websocket' not in _list_tokens(headers.get('upgrade', '')):
        raise HandshakeError(400, 'not a websocket upgrade (Upgrade: websocket missing)', path)
    if 'upgrade' not in _list_tokens(headers.get('connection', '')):
        raise HandshakeError(400, 'not a websocket upgrade (Connection: Upgrade missing)', path)
    if headers.get('sec-websocket-version', '').strip() != _WS_VERSION:
        raise HandshakeError(426, 'websocket version 13 only', path,
                             {'Sec-WebSocket-Version': _WS_VERSION})
    key = headers.get('sec-websocket-key', '').strip()
    try:
        if len(base64.b64decode(key.encode('ascii'), validate=True)) != 16:
            raise ValueError(key)
    except (ValueError, binascii.Error):
        raise HandshakeError(400, 'invalid Sec-WebSocket-Key', path) from None
    if origins is not None and headers.get('origin') not in origins:
        raise HandshakeError(403, 'origin not allowed', path)
    offered = [t.strip() for t in headers.get('sec-websocket-protocol', '').split(',')]
    chosen = next((p for p in subprotocols or () if p in offered), None)
    deflate = None
    if compression == 'deflate' and 'sec-websocket-extensions' in headers:
        deflate = _ws_deflate_accept(headers['sec-websocket-extensions'])
    return _WsRequest(target, headers, key, chosen, deflate)


def _ws_accept_response(request):
    """The 101 answer to a checked request, as bytes."""
    lines = ['HTTP/1.1 101 Switching Protocols', 'Upgrade: websocket', 'Connection: Upgrade',
             'Sec-WebSocket-Accept: ' + _ws_accept(request.key)]
    if request.subprotocol:
        lines.append('Sec-WebSocket-Protocol: ' + request.subprotocol)
    if request.deflate is not None:
        lines.append('Sec-WebSocket-Extensions: ' + request.deflate.response())
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def _ws_error_response(error):
    """The HTTP answer that refuses a handshake, from a HandshakeError, as bytes."""
    body = (error.message + '\n').encode('utf-8')
    headers = [('Content-Type', 'text/plain; charset=utf-8')] + list(error.headers.items())
    return _closing_response(error.status, headers, body)


def _ws_client_headers(host, key, subprotocols=None, origin=None, headers=None,
                       compression=None):
    """The header fields of the client's opening handshake."""
    fields = [('Host', host), ('Upgrade', 'websocket'), ('Connection', 'Upgrade'),
              ('Sec-WebSocket-Key', key), ('Sec-WebSocket-Version', _WS_VERSION)]
    if subprotocols:
        fields.append(('Sec-WebSocket-Protocol', ', '.join(subprotocols)))
    if compression == 'deflate':
        fields.append(('Sec-WebSocket-Extensions', _WS_DEFLATE_OFFER))
    if origin:
        fields.append(('Origin', origin))
    return fields + list((headers or {}).items())


def _ws_check_response(head, key, target, subprotocols=None, compression=None):
    """Check the server's answer to our handshake (RFC 6455 4.1), a ResponseHead from the
    HTTP core, and return (the subprotocol it chose or None, the permessage-deflate
    parameters it accepted or None).  Raises HandshakeError naming `target` and the status
    when the server refused, or when its 101 is not a valid websocket answer (an extension
    we did not offer, an invalid permessage-deflate answer among them)."""
    path = target.partition('?')[0]
    status, reason, headers = head.status, head.reason, head.headers
    if status != 101:
        raise HandshakeError(status, reason.strip() or 'refused', path)
    if 'websocket' not in _list_tokens(headers.get('upgrade', '')):
        raise HandshakeError(status, 'answer without Upgrade: websocket', path)
    if 'upgrade' not in _list_tokens(headers.get('connection', '')):
        raise HandshakeError(status, 'answer without Connection: Upgrade', path)
    if headers.get('sec-websocket-accept', '').strip() != _ws_accept(key):
        raise HandshakeError(status, 'wrong Sec-WebSocket-Accept', path)
    deflate = None
    if headers.get('sec-websocket-extensions', '').strip():
        if compression != 'deflate':
            raise HandshakeError(status, 'the server chose an extension we did not offer', path)
        try:
            deflate = _ws_deflate_check_answer(headers['sec-websocket-extensions'])
        except ValueError as exc:
            raise HandshakeError(status, str(exc), path) from None
    chosen = headers.get('sec-websocket-protocol', '').strip() or None
    if chosen is not None and chosen not in (subprotocols or ()):
        raise HandshakeError(status, 'the server chose a subprotocol we did not offer', path)
    return chosen, deflate


# -- permessage-deflate negotiation (RFC 7692 section 7.1) ---------------------------------------

# Sec-WebSocket-Extensions (RFC 6455 9.1): extension *( ";" param [ "=" (token | quoted) ] ),
# comma-separated; a quoted value must be a token once unquoted.
_WS_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_WS_EXT_ELEMENT = re.compile(r'((?:[^,"]|"(?:[^"\\]|\\.)*"?)*)(,|\Z)')
_WS_EXT_NAME = re.compile(r'[ \t]*(%s)[ \t]*' % _WS_TOKEN)
_WS_EXT_PARAM = re.compile(r';[ \t]*(%s)(?:[ \t]*=[ \t]*(%s|"(?:[^"\\]|\\.)*"))?[ \t]*'
                           % (_WS_TOKEN, _WS_TOKEN))
_WS_TOKEN_ONLY = re.compile(_WS_TOKEN + r'\Z')
_WS_WINDOW_BITS = re.compile(r'(?:[89]|1[0-5])\Z')      # no leading zeros (RFC 7692 7.1.2)
_WS_DEFLATE_PARAMS = ('server_no_context_takeover', 'client_no_context_takeover',
                      'server_max_window_bits', 'client_max_window_bits')
# Our window asked for first; then the same without it, for servers that cannot limit theirs.
_WS_DEFLATE_OFFER = ('permessage-deflate; server_max_window_bits=%d; client_max_window_bits=%d, '
                     'permessage-deflate; client_max_window_bits=%d'
                     % ((_WS_DEFLATE_WINDOW_BITS,) * 3))


def _ws_check_compression(compression):
    if compression not in ('deflate', None):
        raise ValueError("compression is 'deflate' or None, not %r" % (compression,))


def _ws_parse_extensions(value):
    """A Sec-WebSocket-Extensions value -> [(name, [(param, value or None), ...]), ...], in
    order.  An element that breaks the grammar comes as (None, []): it is declined (or
    refused) on its own, without the elements around it being lost."""
    elements = []
    pos = 0
    while True:
        match = _WS_EXT_ELEMENT.match(value, pos)
        text = match.group(1)
        if text.strip(' \t'):
            elements.append(_ws_parse_extension(text))
        if not match.group(2):
            return elements
        pos = match.end()


def _ws_parse_extension(text):
    match = _WS_EXT_NAME.match(text)
    if match is None:
        return None, []
    name, pos, params = match.group(1), match.end(), []
    while pos < len(text):
        match = _WS_EXT_PARAM.match(text, pos)
        if match is None:
            return None, []
        param, arg = match.group(1, 2)
        if arg is not None and arg.startswith('"'):
            arg = re.sub(r'\\(.)', r'\1', arg[1:-1])
            if not _WS_TOKEN_ONLY.match(arg):
                return None, []
        params.append((param, arg))
        pos = match.end()
    return name, params


class _WsDeflate:
    """The permessage-deflate parameters of one connection (RFC 7692 7.1): whether each side
    resets its LZ77 window after every message, and the window each side compresses with
    (base-2 logarithm, 8 to 15)."""

    __slots__ = ('server_no_context_takeover', 'client_no_context_takeover',
                 'server_max_window_bits', 'client_max_window_bits')

    def __init__(self, server_no_context_takeover=False, client_no_context_takeover=False,
                 server_max_window_bits=15, client_max_window_bits=15):
        self.server_no_context_takeover = server_no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.server_max_window_bits = server_max_window_bits
        self.client_max_window_bits = client_max_window_bits

    def response(self):
        """The server's Sec-WebSocket-Extensions value that accepts these parameters."""
        text = 'permessage-deflate'
        if self.server_no_context_takeover:
            text += '; server_no_context_takeover'
        if self.client_no_context_takeover:
            text += '; client_no_context_takeover'
        text += '; server_max_window_bits=%d' % self.server_max_window_bits
        if self.client_max_window_bits < 15:    # under 15 only when the client offered it
            text += '; client_max_window_bits=%d' % self.client_max_window_bits
        return text

    def __repr__(self):
        return '_WsDeflate(%s)' % ', '.join('%s=%r' % (name, getattr(self, name))
                                            for name in self.__slots__)


def _ws_deflate_params(params, response):
    """The parameters of one permessage-deflate element as a dict, checked as RFC 7692 7.1
    says (names it defines, each once, the right values); ValueError says what is wrong.
    client_max_window_bits without a value (allowed in an offer only) is None."""
    found = {}
    for name, value in params:
        if name not in _WS_DEFLATE_PARAMS:
            raise ValueError('unknown permessage-deflate parameter %r' % name[:40])
        if name in found:
            raise ValueError('permessage-deflate parameter %s given twice' % name)
        if name.endswith('takeover'):
            if value is not None:
                raise ValueError('permessage-deflate parameter %s takes no value' % name)
            found[name] = True
        elif value is None:
            if response or name == 'server_max_window_bits':
                raise ValueError('permessage-deflate parameter %s needs a value' % name)
            found[name] = None
        elif not _WS_WINDOW_BITS.match(value):
            raise ValueError('invalid permessage-deflate %s=%s' % (name, value[:20]))
        else:
            found[name] = int(value)
    return found


def _ws_deflate_accept(value, window_bits=_WS_DEFLATE_WINDOW_BITS):
    """The server's side: the parameters that accept the first acceptable permessage-deflate
    offer of a Sec-WebSocket-Extensions value, or None.  An offer with a parameter RFC 7692
    does not define, a duplicate or an invalid value is declined, and the next one looked at
    (RFC 7692 5).  Both windows are held to `window_bits` where the offer lets us choose:
    ours always, the client's when it offered client_max_window_bits."""
    for name, params in _ws_parse_extensions(value):
        if name != 'permessage-deflate':
            continue
        try:
            offer = _ws_deflate_params(params, response=False)
        except ValueError:
            continue
        client_bits = 15
        if 'client_max_window_bits' in offer:
            client_bits = min(offer['client_max_window_bits'] or 15, window_bits)
        return _WsDeflate('server_no_context_takeover' in offer,
                          'client_no_context_takeover' in offer,
                          min(offer.get('server_max_window_bits', 15), window_bits), client_bits)
    return None


def _ws_deflate_check_answer(value):
    """The client's side: the parameters of the server's Sec-WebSocket-Extensions answer to
    _WS_DEFLATE_OFFER.  Raises ValueError (the connection fails, RFC 7692 5) for anything but
    one valid permessage-deflate element."""
    elements = _ws_parse_extensions(value)
    if len(elements) != 1 or elements[0][0] != 'permessage-deflate':
        raise ValueError('the server chose an extension we did not offer')
    answer = _ws_deflate_params(elements[0][1], response=True)
    # Our offers promise a window of at most _WS_DEFLATE_WINDOW_BITS: a larger value in the
    # answer only permits what we do anyway.
    return _WsDeflate('server_no_context_takeover' in answer,
                      'client_no_context_takeover' in answer,
                      answer.get('server_max_window_bits', 15),
                      min(answer.get('client_max_window_bits', 15), _WS_DEFLATE_WINDOW_BITS))


# ###########################################################################################
# 6. Listener: Microservice
# ###########################################################################################

_ALL_RULES = '*'          # the token key that guards every rule
_SEND_KEYS = frozenset(['args', 'kwargs', 'token', 'types'])     # of a friend.send() body
_JSON_KINDS = {list: 'an array', str: 'a string', int: 'a number', float: 'a number',
               bool: 'a boolean', type(None): 'null'}
_ADMIN_PREFIX = '/_mc/'   # health, rules and metrics of the listener itself
_ADMIN_PAGES = ('health', 'rules', 'metrics')
_PROMETHEUS_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


class _Endpoint:
    """One function behind one rule: how its request becomes arguments, and its answer
    becomes a body (the mode), and its signature for clear 400s."""

    __slots__ = ('rule', 'func', 'mode', 'methods', 'signature', 'name', 'keywords')

    def __init__(self, rule, func, mode, methods):
        self.rule = rule
        self.func = func
        self.mode = mode
        self.methods = methods
        self.name = getattr(func, '__name__', repr(func))
        import inspect
        try:
            self.signature = inspect.signature(func)
        except (TypeError, ValueError):    # some builtins have none: calls are not pre-checked
            self.signature = None
        # The names it takes by keyword; None: any (**kwargs, or no signature to tell).
        self.keywords = None
        if self.signature is not None:
            kinds = {p.kind for p in self.signature.parameters.values()}
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                self.keywords = frozenset(
                    name for name, p in self.signature.parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def check_arguments(self, args, kwargs):
        """Raise HTTPError(400) naming the signature when the call would not bind."""
        if self.signature is not None:
            try:
                self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                # bind() names the first problem only: a misspelt keyword is then reported
                # as the missing argument it was meant to be.
                problems = _binding_problems(self.signature, args, kwargs) or [str(exc)]
                raise HTTPError(400, '%s%s: %s' % (self.name, self.signature,
                                                   '; '.join(problems))) from None

    def takes(self, name):
        """Whether the function has a parameter `name` that a keyword can give."""
        parameter = self.signature and self.signature.parameters.get(name)
        return bool(parameter) and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                      parameter.KEYWORD_ONLY)


def _binding_problems(signature, args, kwargs):
    """Every reason why f(*args, **kwargs) does not bind to `signature`, as text."""
    import difflib
    import inspect
    P = inspect.Parameter
    params = list(signature.parameters.values())
    kinds = {p.kind for p in params}
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    by_keyword = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    filled = {p.name for p in positional[:len(args)]}
    problems = []
    if len(args) > len(positional) and P.VAR_POSITIONAL not in kinds:
        problems.append('takes %d positional argument%s but %d were given'
                        % (len(positional), '' if len(positional) == 1 else 's', len(args)))
    twice = [name for name in kwargs if name in filled and name in by_keyword]
    if twice:
        problems.append('got several values for %s' % ', '.join(map(repr, twice)))
    missing = [p.name for p in params if p.default is P.empty and p.name not in filled and
               p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and
               not (p.name in kwargs and p.name in by_keyword)]
    if missing:
        problems.append('missing argument%s %s' % ('' if len(missing) == 1 else 's',
                                                   ', '.join(map(repr, missing))))
    if P.VAR_KEYWORD not in kinds:
        for name in kwargs:
            if name not in by_keyword:
                close = difflib.get_close_matches(name, sorted(by_keyword - set(kwargs)), 1)
                problems.append('unexpected keyword argument %r%s'
                                % (name, ' (did you mean %r?)' % close[0] if close else ''))
    return problems


# -- the call being answered, for the code that answers it: mconnector.request --------------

_current_request = contextvars.ContextVar('mconnector.request')
# W3C Trace Context: version, trace-id, parent-id, flags (an all-zero id is invalid).
_TRACEPARENT = re.compile(r'[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-'
                          r'([0-9a-f]{2})(?:-.*)?\Z')


class RequestContext:
    """What a rule or a websocket handler knows of the call it answers, beside its
    arguments: `mconnector.request` while it runs, in the thread or task that runs it.

    `method`, `target` (as sent: path and query), `path` (decoded), `rule` (the pattern
    that matched, such as '/user/<name>'), `headers` (lower-case names; a websocket's are
    its handshake's), `remote_address` (the TCP peer's (host, port); port None when a WSGI
    server does not say), `client` (the caller's host: the peer's, or the one that a proxy
    named in trusted_proxies forwarded), `deadline` (the time.monotonic() at which the
    caller gives up, when it said so: Friend and AsyncFriend do) and `time_left`.
    """

    __slots__ = ('method', 'target', 'path', 'rule', 'headers', 'remote_address', 'deadline',
                 '_trusted', '_trace')

    method: str
    target: str
    path: str
    rule: Optional[str]
    headers: Headers
    remote_address: Optional[Peer]
    deadline: Optional[float]

    def __init__(self, method: str, target: str, path: str, rule: Optional[str],
                 headers: Headers, remote_address: Optional[Sequence[Any]] = None,
                 trusted: Optional[Callable[[str], bool]] = None) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.rule = rule
        self.headers = headers
        self.remote_address = tuple(remote_address[:2]) if remote_address else None
        self._trusted = trusted
        self._trace = None
        self.deadline = None
        timeout = headers.get('x-mc-timeout')          # (_TIMEOUT_HEADER, in lower case)
        if timeout is not None:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = -1.0
            if 0 <= seconds < 1e9:          # (NaN is neither)
                self.deadline = time.monotonic() + seconds

    @property
    def trace_id(self) -> str:
        """The W3C trace id of the call: the caller's (from its `traceparent`), or one made
        here when it sent none (or a malformed one)."""
        return self._trace_parts()[0]

    @property
    def span_id(self) -> str:
        """This call's own span: the parent-id of the calls a rule makes."""
        return self._trace_parts()[1]

    def _trace_parts(self):
        if self._trace is None:
            match = _TRACEPARENT.match(self.headers.get('traceparent', ''))
            trace, flags = (match.group(1), match.group(3)) if match else \
                (os.urandom(16).hex(), '01')
            self._trace = (trace, os.urandom(8).hex(), flags)
            if not match:       # as if the caller had sent it: the access log reads it there
                self.headers['traceparent'] = '00-%s-%s-%s' % self._trace
        return self._trace

    def trace_headers(self) -> List[Tuple[str, str]]:
        """`traceparent` (this call's trace, this span as the parent) and `tracestate` (as
        it came), for the calls a rule makes: Friend adds them by itself."""
        trace, span, flags = self._trace_parts()
        fields = [('traceparent', '00-%s-%s-%s' % (trace, span, flags))]
        state = self.headers.get('tracestate')
        if state:
            fields.append(('tracestate', state))
        return fields

    @property
    def time_left(self) -> Optional[float]:
        """Seconds until the caller gives up (0.0 once it has), or None when it did not
        say."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def client(self) -> Optional[str]:
        """The caller's host.  Behind proxies named in trusted_proxies, the last address
        of X-Forwarded-For that is not one of them (proxies append the peer they got the
        request from), else the peer's own."""
        host = self.remote_address[0] if self.remote_address else None
        trusted = self._trusted
        if trusted is None or host is None or not trusted(host):
            return host
        hops = [hop.strip() for hop in self.headers.get('x-forwarded-for', '').split(',')]
        hops = [hop for hop in hops if hop]
        for hop in reversed(hops):
            if not trusted(hop):
                return hop
        return hops[0] if hops else host

    def __repr__(self):
        return '<RequestContext %s %s from %s>' % (self.method, self.target, self.client)


class _RequestProxy:
    """mconnector.request: the RequestContext of the call being answered in this thread
    or task.  False outside of one, where its attributes raise RuntimeError."""

    __slots__ = ()

    def __getattr__(self, name):
        current = _current_request.get(None)
        if current is None:
            raise RuntimeError('mconnector.request is only set while a rule or a websocket '
                               'handler runs (in its own thread or task)')
        return getattr(current, name)

    def __bool__(self):
        return _current_request.get(None) is not None

    def __repr__(self):
        current = _current_request.get(None)
        return '<mconnector.request: %s>' % ('no call being answered here' if current is None
                                              else repr(current)[1:-1])


if TYPE_CHECKING:
    request: RequestContext
else:
    request = _RequestProxy()


def _call_in_request(request, fn, /, *args, **kwargs):
    """fn(*args, **kwargs) with `request` as mconnector.request, in this thread."""
    token = _current_request.set(request)
    try:
        return fn(*args, **kwargs)
    finally:
        _current_request.reset(token)


async def _in_request(request, awaitable):
    """Await `awaitable` with `request` as mconnector.request (in the task that runs this,
    whose context is its own)."""
    _current_request.set(request)
    return await awaitable


def _pieces_in_request(request, pieces):
    """The pieces of a streamed answer, each produced with `request` as
    mconnector.request, in whichever thread asks for it."""
    try:
        while True:
            token = _current_request.set(request)
            try:
                piece = next(pieces)
            except StopIteration:
                return
            finally:
                _current_request.reset(token)
            yield piece
    finally:
        _close_stream(pieces)


def _trusted_proxies(proxies):
    """A test of host text for trusted_proxies (addresses, networks such as '10.0.0.0/8',
    or '*' for any peer), or None when there are none."""
    if not proxies:
        return None
    if isinstance(proxies, str):
        proxies = [proxies]
    if '*' in proxies:
        return lambda host: True
    import ipaddress
    networks = [ipaddress.ip_network(proxy, strict=False) for proxy in proxies]

    def trusted(host):
        try:
            address = ipaddress.ip_address(host.strip('[]'))
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in networks)
    return trusted


def _mark(func, mode):
    """Wrap `func` so that typing() knows its mode; the wrapper still calls it locally,
    and is a coroutine function when `func` is one (for inspect, asyncio and frameworks
    that look before they call)."""
    if _is_coroutine_function(func):
        @functools.wraps(func)
        async def endpoint(*args, **kwargs):
            return await func(*args, **kwargs)
    else:
        @functools.wraps(func)
        def endpoint(*args, **kwargs):
            return func(*args, **kwargs)
    endpoint._mconnector_mode = mode
    if hasattr(func, '__await__') or _is_coroutine_function(func):
        # Keep `await helloworld()` working for local callers of an async endpoint.
        endpoint._mconnector_async = True
    return endpoint


def _is_coroutine_function(func):
    code = getattr(getattr(func, '__wrapped__', func), '__code__', None)
    return code is not None and bool(code.co_flags & 0x80)   # CO_COROUTINE


def _normalise_token(token, rule):
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError('the token of %s must be a string, got %r' % (
            'every rule' if rule == _ALL_RULES else rule, token))
    return token.encode('utf-8')


def _token_table(owner, token):
    """{rule: token} from a `token` argument: one string for every rule, or a dict."""
    if isinstance(token, str):
        return {_ALL_RULES: token}
    if token is not None and not isinstance(token, dict):
        raise TypeError('%s: token must be a string (one token for every rule) or a '
                        '{rule: token} dict, got %r' % (owner, token))
    return token or {}


def _token_matches(expected, given):
    if not isinstance(given, str):
        return False
    import hmac
    return hmac.compare_digest(expected, given.encode('utf-8', 'surrogatepass'))


_JSON_OBJECT_START = re.compile(rb'[ \t\r\n]*\{')


def _is_json(content_type):
    """Whether a Content-Type value names application/json (parameters allowed)."""
    return content_type is not None and \
        content_type.partition(';')[0].strip().lower() == 'application/json'


def _query_value(text):
    """Query and command-line values are JSON where they parse, else the text itself."""
    try:
        return loads(text)
    except CodecError:
        return text


# Counters for GET /_mc/metrics.  A request costs one lock-free count when it starts and
# one short lock section when it ends: with the timing, about 2 us of the listener's own
# 15 us per call (bench/bench_handle.py); the Prometheus text is built only when asked for.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_NO_RULE = '(none)'         # the rule label of requests that matched no rule
_OTHER_METHOD = '(other)'   # the method label of methods that no rule takes


class _Metrics:
    """What a listener has done since it was created: requests by rule, method and status,
    latency by rule, requests in flight, bytes in and out."""

    def __init__(self):
        import itertools
        self.lock = threading.Lock()
        self.started_count = itertools.count()   # next() is atomic: no lock to start
        # (rule, method, status) -> [requests, seconds in all, count per latency bucket...]
        self.requests = {}
        self.refusals = {}          # (method, status) -> requests refused by the HTTP layer
        # Methods that get their own label: any other is counted as _OTHER_METHOD, so that
        # invented methods cannot add series without end.
        self.methods = {'GET', 'HEAD', 'OPTIONS'}
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.time()
        self.started_monotonic = time.monotonic()

    def begin(self):
        next(self.started_count)

    def end(self, rule, method, status, seconds, _buckets=_LATENCY_BUCKETS):
        index = bisect.bisect_left(_buckets, seconds) + 2
        key = (rule, method if method in self.methods else _OTHER_METHOD, status)
        lock = self.lock
        lock.acquire()      # (not `with`: measurably slower on this path)
        try:
            counts = self.requests.get(key)
            if counts is None:
                counts = self.requests[key] = [0, 0.0] + [0] * (len(_buckets) + 1)
            counts[0] += 1
            counts[1] += seconds
            counts[index] += 1
        finally:
            lock.release()

    @property
    def in_flight(self):
        # repr(itertools.count) is 'count(N)': the one way to read it without advancing it.
        started = int(repr(self.started_count)[6:-1])
        with self.lock:
            return started - sum(counts[0] for counts in self.requests.values())

    def refused(self, method, status):
        """A request the HTTP layer refused before the listener saw it (400, 413, 431...)."""
        key = (method if method in self.methods else _OTHER_METHOD if method else '-', status)
        with self.lock:
            self.refusals[key] = self.refusals.get(key, 0) + 1

    def transferred(self, received, sent):
        with self.lock:
            self.bytes_in += received
            self.bytes_out += sent

    def uptime(self):
        return time.monotonic() - self.started_monotonic

    def prometheus(self, name, connections=None):
        """The counters in Prometheus' text exposition format (version 0.0.4)."""
        in_flight = self.in_flight
        with self.lock:
            requests = [(key, counts[:]) for key, counts in self.requests.items()]
            refusals = list(self.refusals.items())
            bytes_in, bytes_out = self.bytes_in, self.bytes_out
        latency = {}
        for (rule, _, _), counts in requests:
            total = latency.setdefault(rule, [0.0] * (len(counts) - 1))
            for n, value in enumerate(counts[1:]):
                total[n] += value
        requests = sorted([(key, counts[0]) for key, counts in requests] +
                          [((_NO_RULE, method, status), count)
                           for (method, status), count in refusals])
        service = 'service="%s"' % _label(name)
        out = []

        def family(metric, kind, help_text):
            out.append('# HELP mconnector_%s %s\n# TYPE mconnector_%s %s\n'
                       % (metric, help_text, metric, kind))
        family('requests_total', 'counter', 'Requests answered, by rule, method and status.')
        for (rule, method, status), count in requests:
            out.append('mconnector_requests_total{%s,rule="%s",method="%s",status="%d"} %d\n'
                       % (service, _label(rule), _label(method), status, count))
        family('request_duration_seconds', 'histogram',
               'Time from a whole request to its response (the head of a streamed one).')
        for rule, counts in sorted(latency.items()):
            labels = '%s,rule="%s"' % (service, _label(rule))
            total = 0
            for bound, count in zip(_LATENCY_BUCKETS + ('+Inf',), counts[1:]):
                total += count
                out.append('mconnector_request_duration_seconds_bucket{%s,le="%s"} %d\n'
                           % (labels, bound, total))
            out.append('mconnector_request_duration_seconds_sum{%s} %.6f\n' % (labels, counts[0]))
            out.append('mconnector_request_duration_seconds_count{%s} %d\n' % (labels, total))
        family('requests_in_flight', 'gauge', 'Requests being answered now.')
        out.append('mconnector_requests_in_flight{%s} %d\n' % (service, in_flight))
        if connections is not None:
            opened, accepted = connections
            family('connections_open', 'gauge', 'Connections open now.')
            out.append('mconnector_connections_open{%s} %d\n' % (service, opened))
            family('connections_total', 'counter', 'Connections accepted.')
            out.append('mconnector_connections_total{%s} %d\n' % (service, accepted))
        family('received_bytes_total', 'counter',
               'Bytes of requests received (heads and bodies; bodies only under WSGI).')
        out.append('mconnector_received_bytes_total{%s} %d\n' % (service, bytes_in))
        family('sent_bytes_total', 'counter',
               'Bytes of responses sent (heads and bodies; bodies only under WSGI).')
        out.append('mconnector_sent_bytes_total{%s} %d\n' % (service, bytes_out))
        family('start_time_seconds', 'gauge', 'When the listener was created (Unix time).')
        out.append('mconnector_start_time_seconds{%s} %.3f\n' % (service, self.started))
        return ''.join(out).encode('utf-8')


def _label(value):
    """A Prometheus label value, escaped."""
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def _alias(name):
    """A read-write property that is another name for attribute `name` (PEP 8 spellings
    beside 0.3.7's own: secret_key for secretKey, last_message for lastMessage)."""
    return property(lambda self: getattr(self, name),
                    lambda self, value: setattr(self, name, value),
                    doc='Another name for %s.' % name)


class _Deferred:
    """The answer of an async rule still to run: its coroutine, what turns the finished
    future into a Response, and what counts that Response for /_mc/metrics."""

    __slots__ = ('coroutine', 'settle', 'count')

    def __init__(self, coroutine, settle):
        self.coroutine = coroutine
        self.settle = settle
        self.count = None

    def run(self, deliver):
        """Run the coroutine on the shared loop; deliver(Response) once it has ended."""
        import asyncio

        def done(future):
            response = self.settle(future)
            self.count(response.status)
            deliver(response)
        asyncio.run_coroutine_threadsafe(_as_coroutine(self.coroutine),
                                         _event_loop()).add_done_callback(done)


# What web pages may do (see README, Security).  A call's body must be application/json,
# which a page of another origin cannot send without a CORS preflight; the preflight is
# answered only for the origins of Microservice(cors=...).  Browsers also say where a
# request comes from (Sec-Fetch-Site), which keeps pages of other sites off GET rules too.
_CORS_HEADERS = ('Content-Type', 'Authorization', 'X-MConnector', 'X-MConnector-Types',
                 'X-MC-Timestamp', 'X-MC-Nonce', 'X-MC-Signature')
_CORS_OPTIONS = frozenset({'origins', 'methods', 'headers', 'credentials', 'max_age'})


class _Cors:
    """The origins whose pages may call a listener, and what their preflights are told."""

    def __init__(self, spec):
        if isinstance(spec, str) or not hasattr(spec, 'keys'):
            spec = {'origins': spec}
        unknown = set(spec) - _CORS_OPTIONS
        if unknown:
            raise TypeError('cors= takes %s, not %s' % (', '.join(sorted(_CORS_OPTIONS)),
                                                        ', '.join(sorted(unknown))))
        origins = spec.get('origins', '*')
        origins = [origins] if isinstance(origins, str) else list(origins)
        for origin in origins:
            if origin != '*' and not re.match(r'https?://[^/\s]+\Z', origin):
                raise ValueError('a cors origin is scheme://host[:port] or *, not %r' % origin)
        self.any = '*' in origins
        self.origins = frozenset(o.lower() for o in origins if o != '*')
        methods = spec.get('methods')
        self.methods = None if methods is None else \
            ', '.join(m.upper() for m in ([methods] if isinstance(methods, str) else methods))
        headers = spec.get('headers', _CORS_HEADERS)
        self.headers = ', '.join([headers] if isinstance(headers, str) else headers)
        self.credentials = bool(spec.get('credentials', False))
        if self.credentials and self.any:
            raise ValueError("cors credentials=True needs the origins listed, not '*'")
        self.max_age = int(spec.get('max_age', 600))

    def allows(self, origin):
        return origin is not None and (self.any or origin.lower() in self.origins)

    def answer_headers(self, origin):
        """The headers that let a page of `origin` (allowed) read an answer."""
        if self.any and not self.credentials:
            return [('Access-Control-Allow-Origin', '*'),
                    ('Access-Control-Expose-Headers', 'X-MConnector-Types')]
        headers = [('Access-Control-Allow-Origin', origin), ('Vary', 'Origin'),
                   ('Access-Control-Expose-Headers', 'X-MConnector-Types')]
        if self.credentials:
            headers.append(('Access-Control-Allow-Credentials', 'true'))
        return headers


class Microservice:
    """A listener: functions decorated with typing()/route() answer calls from Friends.

    Microservice(name, port=5000, host='0.0.0.0', debug=None, token=None, secretKey=None)

    `token` is {rule: token} for per-rule tokens ({'*': token} or a plain string guards
    every rule).  Rules added with `@M.typing(rule, token=...)` get their own.  A call
    without the right token is refused with 401 and the function is not run.
    `secretKey`, when set, makes every call carry a valid HMAC signature (see
    sign_request); others are refused with 401.

    Limits: `max_body` bytes of request body (413 above it, before it is read);
    `request_timeout` seconds for a request to arrive whole once started (slow senders are
    dropped); `timeout` seconds before an idle keep-alive connection is closed;
    `max_workers` requests served at once (more connections wait, idle ones cost no
    thread).  Heads: 8 KiB per line, 100 header lines (431/414 above).

    Stopping (stop(), or SIGTERM or Ctrl+C during run()) is graceful: new connections are
    refused at once, requests in flight are answered for up to `grace` seconds, idle
    keep-alive connections are closed.

    `admin` (default True) answers GET /_mc/health, /_mc/rules and /_mc/metrics
    (Prometheus text) and reserves the /_mc/ prefix; a listener-wide token, and the
    secretKey, apply to them too.  With a listener-wide token, a request without it gets
    401 whatever its path, so that the rules cannot be listed by trying paths.

    `nonce_store`: where the nonces of signed calls are kept, so that a signed call runs
    once however many processes serve it and across restarts: a SQLite file path, shared
    by the processes that name it (default: $MCONNECTOR_NONCE_STORE, else one file per
    secretKey in the temporary directory), or a NonceCache.

    Web pages: a call's body must be application/json (415 otherwise), and requests that
    browsers mark as coming from another site are refused (403).  `cors` lets the pages of
    some origins call the rules: '*', an origin ('https://app.example'), a list of them, or
    a dict with `origins`, `methods` (default: those the rules take), `headers` (default:
    Content-Type, Authorization and the X-MConnector and X-MC- headers), `credentials`
    (default False) and `max_age` (seconds, 600).  Off by default.  OPTIONS is answered
    with the methods of the rule in `Allow`.
    """

    def __init__(self, name: str, port: int = 5000, host: str = '0.0.0.0',
                 debug: Optional[bool] = None, token: Union[str, Mapping[str, str], None] = None,
                 secretKey: Optional[str] = None, timeout: float = 15.0, max_body: int = MAX_BODY,
                 max_workers: int = 64, request_timeout: float = 10.0, grace: float = 10.0,
                 admin: bool = True, nonce_store: Optional[str] = None, cors: Any = None,
                 trusted_proxies: Union[str, Iterable[str], None] = None) -> None:
        self.name = name
        self.trusted_proxies = trusted_proxies
        self._trusted = _trusted_proxies(trusted_proxies)
        self.grace = grace
        self.admin = admin
        self._metrics = _Metrics()
        self.host = host
        self.port = port
        self.debug = bool(debug)
        self.secretKey = secretKey
        self.nonce_store = nonce_store
        self._nonces = None             # the NonceCache, made at the first signed call
        self._cors = None if cors is None else _Cors(cors)
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.max_workers = max_workers
        self.stats = {'connections': 0}   # connections accepted since creation
        self._reporting = None          # the pid that writes this listener's metrics
        self.max_body = max_body
        self._tokens = {}
        for rule, value in _token_table('Microservice(%r)' % (name,), token).items():
            self.setToken(rule, value)
        self._router = Router()
        self._rules = {}            # rule text -> {METHOD: _Endpoint}
        self._server = None
        self._thread = None
        self._app = None
        self._tls = False

    def __repr__(self):
        return '<Microservice %r at %s>' % (self.name, self.url)

    # -- registering functions ---------------------------------------------------------

    def typing(self, rule: str, token: Optional[str] = None,
               methods: Union[str, Iterable[str]] = ('POST',)) -> Callable[[F], F]:
        """Decorator: calls to `rule` run the function below.

        Put a mode decorator under it (@M.reply, @M.json, @M.dict, @M.stream); without
        one the function is served as by @M.reply.  `methods` are the HTTP methods
        accepted ('POST' by default; add 'GET' to take arguments from the query string
        too).  `token`, when given, must come with every call.  Raises RouteError for a
        malformed rule.
        """
        if isinstance(methods, str):
            methods = (methods,)
        methods = tuple(m.upper() for m in methods)
        compiled = Rule(rule)

        def decorator(func):
            mode = getattr(func, '_mconnector_mode', 'reply')
            self._add(compiled, func, mode, methods)
            if token is not None:
                self.setToken(rule, token)
            return func
        return decorator

    route = typing

    def _add(self, compiled, func, mode, methods):
        if self.admin and compiled.rule.startswith(_ADMIN_PREFIX):
            raise RouteError('%s: rules under %s are reserved for the listener itself '
                             '(Microservice(..., admin=False) frees them)'
                             % (compiled.rule, _ADMIN_PREFIX))
        table = self._rules.get(compiled.rule)
        if table is None:
            table = self._rules[compiled.rule] = {}
            self._router.add(compiled, table)
        for method in methods:
            taken = table.get(method)
            if taken is not None and taken.func is not func:
                raise RouteError('%s %s is already served by %s(): a second function would '
                                 'replace it (give it another rule, or other methods)'
                                 % (method, compiled.rule, taken.name))
        endpoint = _Endpoint(compiled.rule, func, mode, methods)
        for method in methods:
            table[method] = endpoint
        self._metrics.methods.update(methods)

    @staticmethod
    def reply(func: F) -> F:
        """Mode decorator: the body is {"args": [...], "kwargs": {...}, "token": ...};
        the answer is a JSON list of the returned values (a tuple gives several)."""
        return _mark(func, 'reply')

    @staticmethod
    def json(func: F) -> F:
        """Mode decorator: the JSON object of the body is the keyword arguments; the answer
        is wrapped in a list as with reply."""
        return _mark(func, 'json')

    async_json = json

    @staticmethod
    def dict(func: F) -> F:
        """Mode decorator: like json, but the answer is the converted value itself."""
        return _mark(func, 'dict')

    @staticmethod
    def stream(func: F) -> F:
        """Mode decorator: like dict, sent in chunks; a generator's items are streamed as
        the elements of a JSON list as they are produced."""
        return _mark(func, 'stream')

    def setToken(self, rule: str, token: str) -> None:
        """Require `token` for calls to `rule` ('*' for every rule)."""
        if rule != _ALL_RULES:
            Rule(rule)
        self._tokens[rule] = _normalise_token(token, rule)

    def removeToken(self, rule: str) -> bool:
        """Stop requiring a token for `rule`; returns whether one was set."""
        return self._tokens.pop(rule, None) is not None

    set_token = setToken
    remove_token = removeToken
    secret_key = _alias('secretKey')

    @property
    def rules(self) -> Dict[str, List[str]]:
        """{rule: sorted methods} of everything this listener answers."""
        return {rule: sorted(table) for rule, table in self._rules.items()}

    # -- what the listener says about itself: /_mc/health, /_mc/rules, /_mc/metrics -------

    def describe(self) -> Dict[str, Any]:
        """The rules as GET /_mc/rules gives them: methods, mode, function, parameter
        names, and whether a token is required (never the token itself)."""
        rules = []
        for rule, table in sorted(self._rules.items()):
            seen = []
            for method, endpoint in sorted(table.items()):
                if endpoint in seen:
                    continue
                seen.append(endpoint)
                signature = endpoint.signature
                doc = (getattr(endpoint.func, '__doc__', None) or '').strip()
                rules.append({
                    'rule': rule,
                    'methods': sorted(m for m, e in table.items() if e is endpoint),
                    'mode': endpoint.mode,
                    'function': endpoint.name,
                    'params': [str(p) for p in signature.parameters.values()]
                    if signature is not None else None,
                    'token': bool(self._tokens.get(rule) or self._tokens.get(_ALL_RULES)),
                    'doc': doc.splitlines()[0] if doc else '',
                })
        return {'name': self.name, 'rules': rules}

    def health(self) -> Dict[str, Any]:
        """What GET /_mc/health answers: status ('ok', or 'stopping' once a graceful
        stop has begun), the listener's name, and its uptime in seconds."""
        server = self._server
        stopping = server is not None and server.stopping
        return {'status': 'stopping' if stopping else 'ok', 'name': self.name,
                'uptime_s': round(self._metrics.uptime(), 3)}

    def metrics(self) -> bytes:
        """The Prometheus text that GET /_mc/metrics answers, as bytes: this process's
        counters; under `serve --workers N`, those of every worker, each with its own
        `worker` label (a scrape reaches one worker, and answers for the service)."""
        text = self.metrics_text()
        folder = os.environ.get(_METRICS_DIR_ENV)
        if not folder:
            return text
        _write_metrics(folder, text)
        return _merge_metrics(folder)

    def metrics_text(self) -> bytes:
        """This process's counters alone, as Prometheus text."""
        server = self._server
        connections = None if server is None else (len(server.connections),
                                                   self.stats['connections'])
        return self._metrics.prometheus(self.name, connections)

    def _admin(self, method, path, headers, body):
        expected = self._tokens.get(_ALL_RULES)
        if expected is not None:
            self._authorize(expected, path, headers, body)
        if method == 'OPTIONS':
            return Response(204, headers=[('Allow', 'GET, HEAD, OPTIONS')], content_type=None)
        if method not in ('GET', 'HEAD'):
            raise HTTPError(405, '%s takes GET, not %s' % (path, method),
                            [('Allow', 'GET, HEAD, OPTIONS')])
        name = path[len(_ADMIN_PREFIX):]
        if name == 'health':
            health = self.health()
            return Response(200 if health['status'] == 'ok' else 503, dumps(health))
        if name == 'rules':
            return Response(200, dumps(self.describe()))
        if name == 'metrics':
            return Response(200, self.metrics(), content_type=_PROMETHEUS_TYPE)
        raise HTTPError(404, 'no %s on %s (there are /_mc/health, /_mc/rules and /_mc/metrics)'
                        % (path, self.name))

    # -- answering a request (shared by every server shell) ----------------------------

    def handle(self, method: str, target: str, headers: Headers, body: bytes,
               signed_target: Optional[str] = None, client: Optional[Peer] = None) -> Response:
        """Answer one request: the whole of the listener's logic, with no I/O.

        `headers` maps lower-case names to values; `body` is bytes (a call's comes with
        'content-type': 'application/json').  Returns a Response; never raises for
        anything a peer can send.  Every server shell (the built-in
        server, WSGI) calls this, and it counts what /_mc/metrics shows.
        `signed_target`: the target as the sender wrote it, when `target` differs (the
        path below a WSGI mount point); a secretKey signature covers that one.
        `client`: the peer's (host, port), for mconnector.request.
        """
        return self._handle(method, target, headers, body, signed_target, client=client)

    def _handle(self, method, target, headers, body, signed_target=None, defer=False,
                client=None):
        # defer: an async rule's coroutine is not awaited here but handed back in a
        # _Deferred, for the serving shell to run on the asyncio loop, holding no worker.
        metrics = self._metrics
        metrics.begin()
        started = time.perf_counter()
        rule = _NO_RULE
        response = None
        try:
            # A browser's preflight carries no token or signature, and its answer is the
            # same for every path.
            if method == 'OPTIONS' and self._cors is not None and 'origin' in headers \
                    and 'access-control-request-method' in headers:
                response = self._preflight(headers)
                return response
            if self.secretKey:
                verify_request(self.secretKey, method, signed_target or target, headers, body,
                               _replay_cache(self))
            path, query = split_target(target)
            if self.admin and path.startswith(_ADMIN_PREFIX):
                if path[len(_ADMIN_PREFIX):] in _ADMIN_PAGES:   # unknown ones: no new label
                    rule = path
                response = self._admin(method, path, headers, body)
            else:
                endpoint, params = self._endpoint(method, path, headers, body)
                if type(endpoint) is str:       # an OPTIONS the rule does not take itself
                    rule = params
                    response = Response(204, headers=[('Allow', endpoint)], content_type=None)
                else:
                    rule = endpoint.rule
                    call = RequestContext(method, target, path, rule, headers, client,
                                          self._trusted)
                    response = self._dispatch(endpoint, method, path, query, params, headers,
                                              body, defer, call)
        except HTTPError as exc:
            response = Response.refusal(exc)
        finally:
            # (no response: an exception escaped, and the shell will send a 500)
            if type(response) is _Deferred:
                response.count = lambda status: metrics.end(rule, method, status,
                                                            time.perf_counter() - started)
            else:
                metrics.end(rule, method, 500 if response is None else response.status,
                            time.perf_counter() - started)
        if self._cors is not None and 'origin' in headers:
            self._cors_answer(response, headers['origin'])
        return response

    def _preflight(self, headers):
        """The answer to a browser's CORS preflight (an OPTIONS that asks for a method)."""
        origin = headers['origin']
        cors = self._cors
        if not cors.allows(origin):
            raise HTTPError(403, 'origin %s may not call %s (Microservice(cors=...) lists '
                            'the origins that may)' % (origin[:200], self.name))
        methods = cors.methods or ', '.join(sorted(self._metrics.methods))
        answer = cors.answer_headers(origin) + [
            ('Access-Control-Allow-Methods', methods),
            ('Access-Control-Allow-Headers', cors.headers),
            ('Access-Control-Max-Age', str(cors.max_age))]
        if headers.get('access-control-request-private-network', '').lower() == 'true':
            answer.append(('Access-Control-Allow-Private-Network', 'true'))
        return Response(204, headers=answer, content_type=None)

    def _cors_answer(self, response, origin):
        """Add what lets an allowed origin's page read `response` (a Response, or a
        _Deferred whose Response is still to come)."""
        if not self._cors.allows(origin):
            return
        extra = self._cors.answer_headers(origin)
        if type(response) is _Deferred:
            settle = response.settle

            def settled(done):
                answer = settle(done)
                answer.headers = answer.headers + extra
                return answer
            response.settle = settled
        else:
            # (a new list: a rule may answer with the same Response every time)
            response.headers = response.headers + extra

    def _endpoint(self, method, path, headers, body):
        """(endpoint, path parameters) of a request; for an OPTIONS that the rule does not
        take itself, (the Allow value, the rule).  Raises HTTPError: 404, 405, or 401
        first when a listener-wide token is missing."""
        table, params = self._router.find(path)
        endpoint = None
        if table is not None:
            endpoint = table.get(method) or (table.get('GET') if method == 'HEAD' else None)
        if endpoint is not None:
            return endpoint, params
        # Without the listener-wide token, no answer tells which rules exist.
        expected = self._tokens.get(_ALL_RULES)
        if expected is not None:
            self._authorize(expected, path, headers, body)
        if table is None:
            raise HTTPError(404, 'no rule %s on %s' % (path, self.name))
        methods = set(table) | {'OPTIONS'}
        if 'GET' in methods:
            methods.add('HEAD')
        allowed = ', '.join(sorted(methods))
        if method == 'OPTIONS':
            return allowed, next(iter(table.values())).rule
        raise HTTPError(405, '%s takes %s, not %s' % (path, allowed, method[:20]),
                        [('Allow', allowed)])

    def _dispatch(self, endpoint, method, path, query, params, headers, body, defer=False,
                  call=None):
        mode = endpoint.mode
        expected = self._tokens.get(endpoint.rule) or self._tokens.get(_ALL_RULES)
        # Authorization comes first: without the token, a request costs at most the plain
        # parse of its body (for the 0.3.7 token in it), and nothing it carries is restored.
        data = None
        if expected is not None:
            data = self._authorize(expected, endpoint.rule, headers, body)
        if mode == 'raw':
            args, kwargs = [], {}
        else:
            site = headers.get('sec-fetch-site')
            if site is not None and site not in ('same-origin', 'none') and not (
                    self._cors is not None and self._cors.allows(headers.get('origin'))):
                raise HTTPError(403, 'a web page of another site may not call %s (browsers '
                                'say so in Sec-Fetch-Site: Microservice(cors=...) lets '
                                'origins in)' % endpoint.rule)
            # (an empty POST too: a page can send one without a preflight)
            given = headers.get('content-type')
            if (body or method not in ('GET', 'HEAD')) and given != 'application/json' \
                    and not _is_json(given):
                raise HTTPError(415, 'a call to %s takes an application/json body '
                                '(Content-Type: application/json), not %s'
                                % (endpoint.rule, given[:100] if given else 'no Content-Type'))
            data = self._parse_body(body, data) if body else {}
            if mode == 'reply':
                args, kwargs = self._reply_arguments(data, path)
            else:
                if not isinstance(data, dict):
                    raise HTTPError(400, '%s takes a JSON object of keyword arguments' % path)
                if 'x-mconnector-types' in headers:
                    try:
                        data = from_wire(data, loads(headers['x-mconnector-types']))
                    except CodecError as exc:
                        raise HTTPError(400, str(exc)) from None
                args, kwargs = [], data
                if expected is not None:
                    kwargs.pop('token', None)
            if mode != 'reply' and 'args' in kwargs and 'kwargs' in kwargs and \
                    _SEND_KEYS.issuperset(kwargs) and not endpoint.takes('args'):
                raise HTTPError(400, '%s is an @M.%s rule: it takes one JSON object of keyword '
                                'arguments, as friend.json() and mconnector call --json send '
                                'them, not the {"args": [...], "kwargs": {...}} of '
                                'friend.send()' % (path, mode))
        # A page's address carries what browsers and campaigns add (?utm_source=...): the
        # Flask-like view passes only what the function takes.  A rule's query is its
        # arguments, so one it cannot take is the caller's mistake (400).
        keywords = endpoint.keywords if mode == 'raw' else None
        for name, value in query.items():
            if keywords is None or name in keywords:
                kwargs.setdefault(name, _query_value(value) if mode != 'raw' else value)
        kwargs.update(params)
        typed = mode != 'raw' and 'x-mconnector' in headers
        try:
            token = _current_request.set(call)      # (inline: this is every call's path)
            try:
                result = endpoint.func(*args, **kwargs)
            finally:
                _current_request.reset(token)
            if hasattr(result, '__await__'):
                result = _in_request(call, result)
                if defer:
                    return _Deferred(result, functools.partial(
                        self._settle, endpoint, args, kwargs, mode, typed, call))
                result = _run_coroutine(result)
        except Exception as exc:
            return self._raised(endpoint, args, kwargs, exc)
        return self._answer(mode, result, typed, call)

    def _raised(self, endpoint, args, kwargs, exc):
        if isinstance(exc, TypeError):
            # Binding only now keeps it off the common path; a call that does not bind
            # never entered the function, so this is the caller's mistake.
            endpoint.check_arguments(args, kwargs)
        return self._failure(endpoint, exc)

    def _settle(self, endpoint, args, kwargs, mode, typed, call, done):
        """The Response of an async rule whose coroutine `done` (a future) has ended."""
        try:
            try:
                result = done.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:       # CancelledError included: the loop stopped
                if not isinstance(exc, Exception):
                    return Response.error(503, 'ServiceUnavailable', 'the listener stopped')
                return self._raised(endpoint, args, kwargs, exc)
            return self._answer(mode, result, typed, call)
        except HTTPError as exc:
            return Response.refusal(exc)

    @staticmethod
    def _parse_body(body, parsed=None):
        """The body's value, checked strictly (parsed already when it carried the token)."""
        try:
            if parsed is None:
                return loads(body)
            _check_json(body, parsed)     # parsed already, for its token
            return parsed
        except CodecError as exc:
            raise HTTPError(400, str(exc)) from None

    @staticmethod
    def _reply_arguments(data, path):
        if not isinstance(data, dict) or not _SEND_KEYS.issuperset(data):
            # Such a body is meant for an @M.json rule; its keys would be dropped here.
            if isinstance(data, dict):
                got = 'an object with the keys %s' % ', '.join(
                    sorted(repr(key[:40]) for key in data)[:10])
            else:
                got = _JSON_KINDS.get(type(data), 'a JSON value')
            raise HTTPError(400, '%s takes {"args": [...], "kwargs": {...}}, as friend.send() '
                            'and mconnector call send them (not friend.json(), nor call '
                            '--json), got %s' % (path, got))
        args = data.get('args') or []
        kwargs = data.get('kwargs') or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise HTTPError(400, '"args" must be a list and "kwargs" an object')
        notes = data.get('types')
        if notes:
            try:
                args, kwargs = from_wire([args, kwargs], notes)
            except CodecError as exc:
                raise HTTPError(400, str(exc)) from None
        return args, kwargs

    @staticmethod
    def _authorize(expected, rule, headers, body):
        """Raise HTTPError(401) unless the request carries the token `expected`: in an
        Authorization: Bearer header, else (0.3.7 senders) as the "token" of a JSON object
        body.  Returns the body's value when it was parsed to find the token, else None;
        only json's own parser has seen it then, nothing has been restored."""
        auth = headers.get('authorization', '')
        data = None
        if auth[:7].lower() == 'bearer ':
            given = auth[7:].strip()
        else:
            given = None
            if body and _is_json(headers.get('content-type')) and \
                    _JSON_OBJECT_START.match(body):
                try:
                    data = _parse_json(body)
                except CodecError:
                    data = None
                if isinstance(data, dict):
                    given = data.get('token')
        if not _token_matches(expected, given):
            raise HTTPError(401, 'missing or wrong token for %s' % rule,
                            [('WWW-Authenticate', 'Bearer')])
        return data

    def _failure(self, endpoint, exc):
        type_name = type(exc).__name__
        log.log(logging.ERROR if self.debug else logging.WARNING,
                '%s raised %s: %s', endpoint.rule, type_name, exc,
                exc_info=self.debug)
        trace = None
        if self.debug:
            import traceback
            trace = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return Response.error(500, type_name, str(exc), traceback=trace)

    @staticmethod
    def _answer(mode, result, typed, call=None):
        # The answer of @M.dict and @M.stream is the returned value itself, where that of
        # the other modes is the list of the returned values, which senders unwrap (0.3.7's
        # did, for every mode): an mconnector sender is told not to unwrap this one.
        headers = [('X-MConnector-Mode', mode)] if typed and mode in ('dict', 'stream') else []
        wrapped = mode in ('reply', 'json') and type(result) is not tuple
        notes = [] if typed else None
        try:
            if mode == 'raw':
                return _raw_answer(result)
            if mode == 'stream':
                pieces = _stream_json(result, notes)
                if notes:
                    headers.append(('X-MConnector-Types', '1'))
                if call is not None:
                    # A generator's body runs as its pieces are asked for, on a worker or
                    # in the WSGI server: it sees its request all the same.
                    pieces = _pieces_in_request(call, pieces)
                return Response(200, pieces, headers)
            if mode != 'dict':
                result = [result] if wrapped else list(result)
            if type(result) is list and _PLAIN_TYPES.issuperset(map(type, result)):
                # The usual result (a string, a number...) is JSON as it is: no walk, no
                # notes.
                body = _to_sorted_json(result).encode('utf-8')
            else:
                body = dumps(result, notes, sort_keys=True)
        except _NoWireForm as exc:
            hint = None
            if exc.generator and len(exc.path) == wrapped:      # the returned value itself
                hint = ('return a list, or serve the rule with @M.stream, which sends the '
                        'items of a generator as they are produced')
            return Response.error(500, 'CodecError', exc.at('result', wrapped, hint))
        except CodecError as exc:
            return Response.error(500, 'CodecError', str(exc))
        if notes:
            body = _typed_reply(body, notes)
            headers.append(('X-MConnector-Types', '1'))
        return Response(200, body, headers)

    # -- serving -----------------------------------------------------------------------

    def start(self, port: Optional[int] = None, host: Optional[str] = None,
              debug: Optional[bool] = None, **tls: Any) -> Self:
        """Serve in a background thread and return self; `port=0` picks a free port,
        readable afterwards as `M.port` (and `M.url`).  TLS options as for run().
        Raises OSError if the address is taken."""
        self._bind(port, host, debug, **tls)
        self._log_listening()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name='mconnector-%s' % self.name, daemon=True)
        self._thread.start()
        return self

    def run(self, port: Optional[int] = None, host: Optional[str] = None,
            debug: Optional[bool] = None, ssl_context: Optional[ssl.SSLContext] = None,
            certfile: Optional[str] = None, keyfile: Optional[str] = None,
            cafile: Optional[str] = None, sock: Optional[socket.socket] = None,
            reload: Optional[bool] = None) -> None:
        """Serve until SIGTERM or Ctrl+C (or stop() from another thread), then return.

        Stopping is graceful (see the class): a second Ctrl+C stops at once.
        TLS: pass an `ssl_context` (server side), or `certfile` (and `keyfile` unless the
        key is in it); `cafile` then also asks every client for a certificate signed by
        one of those CAs (mutual TLS).  `sock`: a bound, listening socket to serve
        instead of binding host and port (one inherited from a supervising process).

        `reload` (default: as `debug`) restarts the service when one of its source files
        changes, on the same port: this process binds the port and keeps it, and runs the
        script again in a child process that serves; it exits (SystemExit) with the
        child's status once stopped, instead of returning.
        """
        _default_logging()
        tls = dict(ssl_context=ssl_context, certfile=certfile, keyfile=keyfile, cafile=cafile)
        if sock is None:
            sock = _reload_child_socket()
            if sock is not None:
                return self._run_reload_child(port, host, debug, sock, tls)
            if _reload_wanted(self.debug if debug is None else debug, reload):
                raise SystemExit(_reload(
                    self.name, self.host if host is None else host,
                    self.port if port is None else port, bool(ssl_context or certfile),
                    self.grace, _script_command(), os.environ, sys.argv[0]))
        self._serve_until_stopped(port, host, debug, sock, tls)

    def _run_reload_child(self, port, host, debug, sock, tls):
        """run() in the child of a reloader: serve the inherited socket until a source
        file changes, then stop gracefully and exit with the status that asks the
        reloader for a new child."""
        changed = []

        def on_change(path):
            log.info('%s: %s changed: reloading', self.name, path)
            changed.append(path)
            server = self._server
            if server is not None:
                # The reloader keeps the socket open: connections waiting in its backlog
                # are the next child's to serve.
                server.keep_backlog = True
                server.stop()
        self._serve_until_stopped(port, host, debug, sock, tls,
                                  on_serving=functools.partial(_watch, on_change))
        if changed:
            raise SystemExit(_EXIT_RELOAD)

    def _serve_until_stopped(self, port, host, debug, sock, tls, on_serving=None):
        try:
            self._bind(port, host, debug, sock=sock, **tls)
        except OSError as exc:      # (or the TLS files: not found, not PEM...)
            _cannot_listen(exc if isinstance(exc, _CannotListen) else
                           _CannotListen(self.name, self.host, self.port, exc))
        server = self._server
        signals = []
        restore = _on_stop_signals(functools.partial(self._stop_signal, server, signals))
        self._log_listening()
        if on_serving is not None:
            on_serving()
        try:
            server.serve_forever()
            if signals:
                log.info('%s: stopping (%s): answering the %d request(s) in flight, for %ss '
                         'at most', self.name, _signal_name(signals[0]),
                         self._metrics.in_flight, self.grace)
            self._close(self.grace)
        finally:
            restore()
            _ws_stop_all()      # websocket servers the script started beside this one

    @staticmethod
    def _stop_signal(server, signals, signum):
        # A signal handler runs between two bytecodes of the main thread, which may hold
        # any lock at that moment, and may even run inside another handler: it takes
        # none (server.stop() and hurry() only set flags and write to a socket), and the
        # stop is logged by the serving loop once it has returned.
        signals.append(signum)
        # Only a second Ctrl+C hurries the stop, not any second signal: under a supervisor
        # one Ctrl+C reaches this process twice, as SIGINT from the terminal and SIGTERM
        # from the parent, in either order.
        if signals.count(_SIGINT) > 1:
            server.hurry()
        else:
            server.stop()

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop serving, gracefully: refuse new connections at once, answer the requests
        in flight for up to `grace` seconds (default: the listener's own), close every
        connection, and wait for the serving thread."""
        server = self._server
        if server is None:
            return
        server.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self._close(self.grace if grace is None else grace)

    def _close(self, grace=0.0):
        server = self._server
        if server is not None:
            cut = server.close_all(grace)
            self._server = None
            if cut:
                log.warning('%s: stopped, %d request(s) cut short %s', self.name, cut,
                            'by a second Ctrl+C' if server.hurried else 'after %ss' % grace)
            else:
                log.info('%s: stopped', self.name)

    def __enter__(self) -> Self:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bind(self, port, host, debug, ssl_context=None, certfile=None, keyfile=None,
              cafile=None, sock=None):
        if self._server is not None:
            raise RuntimeError('%s is already serving at %s' % (self.name, self.url))
        if port is not None:
            self.port = port
        if host is not None:
            self.host = host
        if debug is not None:
            self.debug = bool(debug)
        if ssl_context is None and certfile:
            ssl_context = server_ssl_context(certfile, keyfile, cafile)
        self._tls = ssl_context is not None
        if sock is None:
            sock = _listening_socket(self.host, self.port, name=self.name)
        else:
            self.host = sock.getsockname()[0]
        self._server = _Server(self.name, sock, lambda conn: _HTTPSession(conn, self),
                               self.max_workers, ssl_context, self.request_timeout,
                               self.request_timeout)
        self.port = self._server.server_address[1]

    def _log_listening(self):
        # Logged once stop signals are routed: whoever waits for this line may send one.
        count = len(self._rules)
        log.info('%s: listening on %s (%d rule%s)', self.name, self.url, count,
                 '' if count == 1 else 's')

    @property
    def url(self) -> str:
        return _url(self.host, self.port, self._tls)

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) actually bound while serving, else as configured."""
        return self._server.server_address[:2] if self._server else (self.host, self.port)

    # -- other shells ------------------------------------------------------------------

    def wsgi(self, environ: Dict[str, Any],
             start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The listener as a WSGI application (PEP 3333), for gunicorn, uWSGI, mod_wsgi or
        wsgiref: `gunicorn app1:Micro` serves the same rules with the same answers, since
        both this and the built-in server call handle().  The Microservice itself is
        this application too (calling it is calling wsgi)."""
        if self._reporting != os.getpid():      # each worker of a WSGI server, once
            self._reporting = os.getpid()
            _report_metrics(self)
        headers = {key[5:].replace('_', '-').lower(): value
                   for key, value in environ.items() if key.startswith('HTTP_')}
        for key in ('CONTENT_TYPE', 'CONTENT_LENGTH'):
            if environ.get(key):
                headers[key.replace('_', '-').lower()] = environ[key]
        method = environ['REQUEST_METHOD']
        try:
            body = self._wsgi_body(environ, method, headers)
        except HTTPError as exc:
            self._metrics.refused(method, exc.status)
            response = Response.refusal(exc)
        else:
            target, sent_target = _wsgi_targets(environ)
            port = environ.get('REMOTE_PORT')
            client = (environ.get('REMOTE_ADDR'), int(port) if port and port.isdigit() else None)
            response = self.handle(method, target, headers, body, sent_target, client)
            self._metrics.transferred(len(body), len(response.body)
                                      if isinstance(response.body, bytes) else 0)
        body = response.body
        headers = response.headers
        if method == 'HEAD':
            # No body (PEP 3333 leaves that to the application), but the length it has.
            if isinstance(body, bytes):
                headers = headers + [('Content-Length', str(len(body)))]
            elif hasattr(body, 'close'):
                body.close()
            body = b''
        start_response('%d %s' % (response.status, _STATUS_TEXT.get(response.status, '')),
                       headers)
        return [body] if isinstance(body, bytes) else body

    __call__ = wsgi

    def _wsgi_body(self, environ, method, headers):
        """The request body, framed by the same rules and limits as the built-in server's.
        A server that decoded a chunked body says so with wsgi.input_terminated (gunicorn,
        mod_wsgi); one that passes it on as it came (wsgiref) leaves the decoding to us."""
        stream = environ['wsgi.input']
        if environ.get('wsgi.input_terminated'):
            headers = {k: v for k, v in headers.items() if k != 'content-length'}
            reader = _BodyReader(-1, self.max_body)         # until the input ends
        else:
            protocol = environ.get('SERVER_PROTOCOL', 'HTTP/1.1')
            version = (1, 0) if protocol == 'HTTP/1.0' else (1, 1)
            reader = _request_framing(RequestHead(method, '', version, headers), self.max_body)
            if reader is None:
                return b''
        # Reads never go past the body: exactly the rest of a Content-Length, one line of
        # a chunked body at a time.
        readline = getattr(stream, 'readline', None)
        buf = bytearray()
        parts = []
        while not reader.done:
            if reader.chunked and readline is not None:
                data = readline(65536)
            else:
                size = 65536 if reader.remaining < 0 else min(reader.remaining, 65536)
                data = stream.read(size)
            buf += data
            parts.append(reader.read(buf, not data))
        return b''.join(parts)

    def test_client(self, remote_address: Peer = ('127.0.0.1', None),
                    **options: Any) -> TestClient:
        """A Friend whose calls this listener answers in process, with no socket and no
        thread, whether or not it is serving: see TestClient."""
        return TestClient(self, remote_address, **options)

    @property
    def app(self) -> _FlaskLike:
        """A Flask-like view of this listener: `@app.route(rule)` serves GET by default and
        gives the function the route's parameters and query string as keyword arguments;
        `app.run()` serves."""
        if self._app is None:
            self._app = _FlaskLike(self)
        return self._app


SanicApp = Microservice


def timeit(func: F) -> F:
    """Decorator, as 0.3.7's: each call of `func` logs how long it took, in the line 0.3.7
    printed ("'name'  1.23 ms"), at INFO through the mconnector logger; with no logging
    configured at all, the line is printed, as 0.3.7 did.  Async functions too."""
    def report(started):
        line = '%r  %2.2f ms' % (func.__name__, (time.perf_counter() - started) * 1000)
        if log.hasHandlers():
            log.info('%s', line)
        else:
            print(line)

    if _is_coroutine_function(func):
        @functools.wraps(func)
        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                report(started)
    else:
        @functools.wraps(func)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                report(started)
    return timed


def _wsgi_targets(environ):
    """(target to route: the path below the mount point, target as the sender wrote it,
    which signatures cover byte for byte)."""
    from urllib.parse import quote

    def encoded(path):      # WSGI paths arrive decoded, as latin-1 text of the bytes
        return quote(path.encode('latin-1'), safe='/:@!$&\'()*+,;=-._~')
    query = '?' + environ['QUERY_STRING'] if environ.get('QUERY_STRING') else ''
    target = encoded(environ.get('PATH_INFO', '') or '/') + query
    raw = environ.get('RAW_URI') or environ.get('REQUEST_URI')   # gunicorn, uWSGI
    if not (raw and raw.startswith('/')):
        raw = encoded(environ.get('SCRIPT_NAME', '') + (environ.get('PATH_INFO', '') or '/'))
        raw += query
    return target, raw



class _FlaskLike:
    def __init__(self, service: Microservice) -> None:
        self.service = service
        self.name = service.name

    def route(self, rule: str, methods: Iterable[str] = ('GET',),
              **options: Any) -> Callable[[F], F]:
        """Decorator, as Flask's: the return value is the response (str as HTML, bytes,
        dict or list as JSON, or a (body, status) tuple)."""
        def decorator(func):
            self.service._add(Rule(rule), func, 'raw', tuple(m.upper() for m in methods))
            return func
        return decorator

    def run(self, host: Optional[str] = None, port: Optional[int] = None,
            debug: Optional[bool] = None, **options: Any) -> None:
        self.service.run(port=port, host=host, debug=debug, reload=options.get('use_reloader'))


def _raw_answer(result):
    status = 200
    if type(result) is tuple and len(result) == 2 and isinstance(result[1], int):
        result, status = result
    if isinstance(result, str):
        return Response(status, result.encode('utf-8'), content_type='text/html; charset=utf-8')
    if isinstance(result, (bytes, bytearray)):
        return Response(status, bytes(result), content_type='application/octet-stream')
    if isinstance(result, Response):
        return result
    return Response(status, dumps(result))


def _async_items(agen):
    """The items of an async generator, produced on the shared loop, one at a time."""
    while True:
        try:
            yield _run_coroutine(_as_coroutine(agen.__anext__()))
        except StopAsyncIteration:
            return


def _stream_json(result, notes=None, chunk=64 * 1024):
    """The pieces of a streamed answer.  Any value but a generator is encoded here, before
    the head goes out, so that one with no wire form is answered 500, not cut short, and
    its type notes (appended to `notes`) can be announced in the head."""
    if hasattr(result, '__aiter__') and hasattr(result, '__anext__'):
        result = _async_items(result)
    if result is not None and not isinstance(result, (str, bytes, dict, list, tuple)) \
            and hasattr(result, '__iter__') and not hasattr(result, '__dict__'):
        return _stream_items(result)
    body = dumps(result, notes)
    if notes:
        body = _typed_reply(body, notes)
    return (body[start:start + chunk] for start in range(0, len(body), chunk))


def _typed_reply(body, notes):
    """A reply's JSON `body` with the type notes that restore its values (X-MConnector-Types)."""
    return b'{"result": %s, "types": %s}' % (body, json.dumps(notes).encode('utf-8'))


def _stream_items(items):
    """A generator's items as a JSON list, sent as they are produced."""
    yield b'['
    for n, item in enumerate(items):
        try:
            data = dumps(item)
        except _NoWireForm as exc:
            raise CodecError(exc.at('result[%d]' % n)) from None
        yield b', ' + data if n else data
    yield b']'


_SIGINT = 2


def _default_logging():
    """Show INFO lines from run() when the application configured no logging (as Flask does)."""
    root = logging.getLogger()
    if not root.handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)


def server_ssl_context(certfile: str, keyfile: Optional[str] = None,
                       cafile: Optional[str] = None) -> ssl.SSLContext:
    """A server-side SSLContext; with `cafile`, clients must present a certificate."""
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    if cafile:
        context.load_verify_locations(cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# ###########################################################################################
# 7. WebSocket server: SocketServer, its routes and handlers
# ###########################################################################################

def _ws_reply(value):
    """A router handler's return value as a message: str and bytes as they are, anything else
    as JSON text (0.3.7 could only send str)."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


# Servers started with run(), for the command line's `serve` and the Microservice's run().
_ws_running = set()

# Flow control.  64 KiB as the websockets package had it (its asyncio side now has 32 KiB),
# the low-water mark a quarter of it as there.  The hard limit leaves room for a few
# messages of max_size (1 MiB) on top of write_limit.
_WS_WRITE_LIMIT = 65536
_WS_WRITE_HARD_LIMIT = 4 * 2 ** 20
_WS_SLOW = ('skip', 'close')


def _ws_write_marks(limit):
    """(high, low) water marks from a write_limit: an int (low: a quarter of it) or a
    (high, low) pair.  Raises ValueError for marks out of order, TypeError for other types."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        high, low = limit, limit // 4
    elif isinstance(limit, tuple) and len(limit) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in limit):
        high, low = limit
    else:
        raise TypeError('write_limit is a number of bytes or a (high, low) pair, not %r'
                        % (limit,))
    if not 0 <= low <= high:
        raise ValueError('write_limit (%r): the low-water mark must be from 0 to the high one'
                         % (limit,))
    return high, low


def _ws_flush_all(connections):
    """In the loop: hand what a broadcast queued to each connection."""
    for ws in connections:
        ws._flush()


def _ws_stop_all(timeout=None):
    """Stop every websocket server started with run()."""
    for server in list(_ws_running):
        server.stop(timeout)


class SocketServer:
    """A websocket server (RFC 6455) on routes, as 0.3.7's minisocket.SocketServer.

        sk = SocketServer(__name__)

        @sk.router('/hello/<name>')        # or @sk.route: called for every message
        def hello(message, name):          # str for text, bytes for binary
            return 'hello %s: %s' % (name, message)   # a non-None return value is sent back

        @sk.render('/chat')                # called with the connection after the first message
        async def chat(ws, message):
            await ws.send('got ' + message)
            reply = await ws.recv()

        sk.run()                           # serves in the background and returns

    A router connection ends (close 1000) after the message 'exit' has been handled; a render
    connection when the handler returns.  A handler that raises ends its connection with 1011
    (the error is logged, not sent).  A path that matches no route is refused with HTTP 404.

    Options: `subprotocols` (the server's preference order), `origins` (allowed Origin values;
    others get 403; None allows all), `max_size` (largest message, 1 MiB; larger: close 1009),
    `max_frame_size` (default: max_size), `max_frames` (frames of one message, empty ones
    included: one per 64 bytes of max_size, at least 1024; None for any of these three: no
    limit), `handshake_timeout` (10 s),
    `ping_interval` and `ping_timeout` (20 s each; None turns keep-alive off),
    `close_timeout` (10 s), `compression` ('deflate', the default: accept a client's
    permessage-deflate offer, RFC 7692; None: decline every extension), `nonce_store`
    (where the nonces of signed handshakes are kept, as for a Microservice), `write_limit`
    (bytes queued for a peer over which send() waits and broadcast() leaves it out, 64 KiB;
    or a (high, low) pair, low default a quarter), `write_hard_limit` (a peer that lets more
    than this wait behind the message it is taking is closed with 1008, 4 MiB),
    `ssl_context` (serve wss://), `secretKey` (handshakes must be signed, as calls to a
    Microservice with a secretKey are: 401 otherwise), `max_workers` (handlers written with
    `def` that run at once, 64; `async def` ones run on the asyncio loop and take none).

    Connections wait in the serving shell's selector loop: an idle one costs no thread.
    broadcast() sends one message to many of them without waiting; a handler's send()
    waits while its peer is over write_limit, and drain() waits for it to catch up.
    """

    def __init__(self, name: Optional[str] = None, *,
                 subprotocols: Optional[Iterable[str]] = None,
                 origins: Optional[Iterable[Optional[str]]] = None,
                 max_size: Optional[int] = _WS_MAX_SIZE, max_frame_size: Optional[int] = None,
                 max_frames: Optional[int] = None, nonce_store: Optional[str] = None,
                 handshake_timeout: float = _WS_HANDSHAKE_TIMEOUT,
                 ping_interval: Optional[float] = _WS_PING_INTERVAL,
                 ping_timeout: Optional[float] = _WS_PING_TIMEOUT,
                 close_timeout: float = _WS_CLOSE_TIMEOUT,
                 ssl_context: Optional[ssl.SSLContext] = None, secretKey: Optional[str] = None,
                 max_workers: int = 64,
                 trusted_proxies: Union[str, Iterable[str], None] = None,
                 compression: Optional[str] = 'deflate',
                 write_limit: Union[int, Tuple[int, int]] = _WS_WRITE_LIMIT,
                 write_hard_limit: int = _WS_WRITE_HARD_LIMIT) -> None:
        _ws_check_compression(compression)
        self._write_marks = _ws_write_marks(write_limit)
        self._write_limit = write_limit
        self.write_hard_limit = write_hard_limit
        self.name = name
        self.compression = compression
        self.trusted_proxies = trusted_proxies
        self._trusted = _trusted_proxies(trusted_proxies)
        self.secretKey = secretKey
        self.nonce_store = nonce_store
        self._nonces = None             # the NonceCache, made at the first signed handshake
        self.subprotocols = list(subprotocols or ())
        self.origins = None if origins is None else set(origins)
        self.max_size = max_size
        self.max_frame_size = max_frame_size
        self.max_frames = max_frames
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.ssl_context = ssl_context
        self.max_workers = max_workers
        self.routes = Router()
        self.connections = set()                # the open websockets (as handlers see them)
        self._server = None
        self._thread = None
        self._lock = threading.Lock()
        self._stop_timeout = None
        self._stopped = threading.Event()       # the serving loop has ended
        self._restore_signals = None

    # -- flow control -------------------------------------------------------------------------

    @property
    def write_limit(self) -> Union[int, Tuple[int, int]]:
        """Bytes queued for one peer over which send() waits and broadcast() leaves the peer
        out; an int (the low-water mark, where waiting ends, is a quarter of it) or a
        (high, low) pair.  A change applies to connections opened after it."""
        return self._write_limit

    @write_limit.setter
    def write_limit(self, limit):
        marks = _ws_write_marks(limit)
        if marks[0] > getattr(self, '_write_hard_limit', marks[0]):
            raise ValueError('write_limit %d is over write_hard_limit %d: raise that first'
                             % (marks[0], self._write_hard_limit))
        self._write_marks, self._write_limit = marks, limit

    @property
    def write_hard_limit(self) -> int:
        """Bytes a peer may leave waiting: a connection that has more than this queued behind
        the message it is taking, when more is queued for it, is closed with 1008 and what it
        left is dropped.  At least write_limit.  A change applies to connections opened
        after it."""
        return self._write_hard_limit

    @write_hard_limit.setter
    def write_hard_limit(self, limit):
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError('write_hard_limit is a number of bytes, not %r' % (limit,))
        if limit < self._write_marks[0]:
            raise ValueError('write_hard_limit %d is under write_limit %d'
                             % (limit, self._write_marks[0]))
        self._write_hard_limit = limit

    def broadcast(self, message: Any, path: Optional[str] = None,
                  connections: Optional[Iterable[Any]] = None, *,
                  slow: Literal['skip', 'close'] = 'skip') -> Tuple[int, List[Any]]:
        """Send `message` to every open connection (on `path` when given: a connection's
        path, such as '/chat/7', or the rule it came by, such as '/chat/<room:int>'), or to
        the given `connections` (the objects handlers get).  Returns (sent, behind): how
        many connections it was queued to, and the list of those left out for being behind
        (a write left more than write_limit queued for them, and they are not yet down to
        the low-water mark).

        str goes as a text message, bytes-like as binary, any other value as JSON text (as
        a router handler's return value does).  The frame is built once and the same bytes
        are queued to each connection, uncompressed (RFC 7692 lets a sender send any
        message uncompressed, also where permessage-deflate was agreed).

        It never waits, for the loop or for a slow peer: the connections take the message
        from the serving loop's thread.  A peer that is behind is skipped
        (slow='skip'), or closed with 1013, try again later (slow='close'): what it had
        queued is dropped.  Call it from any thread, a handler's (an `async def` one too:
        no await) or yours; connections that open or close meanwhile get it or are
        left out, nothing else.  Raises ValueError for another `slow`, TypeError for
        a connection that is not this server's kind (a client's, say)."""
        if slow not in _WS_SLOW:
            raise ValueError("slow is 'skip' or 'close', not %r" % (slow,))
        message = _ws_reply(message)
        if isinstance(message, str):
            frame = _ws_frame(Opcode.TEXT, message.encode('utf-8'))
        else:
            frame = _ws_frame(Opcode.BINARY, message)
        # A copy taken at once (in C, holding the GIL): the loop adds and removes meanwhile.
        targets = tuple(self.connections) if connections is None else connections
        sent = 0
        behind = []
        flushes = {}                    # serving shell -> the connections it is to flush
        for given in targets:
            ws = given._ws if isinstance(given, _AsyncWebSocket) else given
            if not isinstance(ws, _ServerWebSocket):
                raise TypeError("broadcast() sends on the server's connections (what its "
                                'handlers get), not on %r' % (given,))
            if path is not None and ws.path != path and ws.request.rule != path:
                continue
            offered = ws._offer(frame)
            if offered == 'behind':
                behind.append(given)
                if slow == 'close':
                    ws.conn.server.call_soon(ws._cast_off, CloseCode.TRY_AGAIN_LATER,
                                             'too slow: messages were left out')
            elif offered is not None:
                sent += 1
                if offered == 'flush':
                    flushes.setdefault(ws.conn.server, []).append(ws)
        for server, batch in flushes.items():
            server.call_soon(_ws_flush_all, batch)
        return sent, behind

    # -- routes -------------------------------------------------------------------------------

    def router(self, rule: str) -> Callable[[F], F]:
        """Decorator: call the function for every message on `rule`, as f(message, *params)."""
        def decorate(handler):
            self.add_route(rule, handler)
            return handler
        return decorate

    route = router

    def render(self, rule: str) -> Callable[[F], F]:
        """Decorator: call the function once per connection on `rule`, after its first
        message, as f(ws, message, *params); it talks on `ws` as it likes."""
        def decorate(handler):
            self.add_route(rule, handler, render=True)
            return handler
        return decorate

    def add_route(self, rule: str, handler: Callable[..., Any], render: bool = False) -> None:
        """Route `rule` to `handler` (a router handler, or a render one).  Raises RouteError
        for a malformed rule, or one that another handler already serves."""
        compiled = Rule(rule)
        for existing, (other, *_) in self.routes:
            if existing.rule == compiled.rule and other is not handler:
                raise RouteError('%s is already served by %s(): a second handler would '
                                 'replace it' % (compiled.rule, getattr(other, '__name__', other)))
        self.routes.add(compiled, (handler, render, compiled.rule))

    # -- serving ------------------------------------------------------------------------------

    @property
    def server_address(self) -> Optional[Tuple[str, int]]:
        return None if self._server is None else self._server.server_address[:2]

    @property
    def port(self) -> Optional[int]:
        return None if self._server is None else self._server.server_address[1]

    def _bind(self, host, port):
        with self._lock:
            if self._server is not None:
                raise RuntimeError('this SocketServer is already running')
            sock = _listening_socket(host, port, name='websocket server %s' % self.name
                                     if self.name else 'websocket server')
            self._server = _Server(self.name or 'ws', sock, lambda conn: _WsHandshake(conn, self),
                                   self.max_workers, self.ssl_context, self.handshake_timeout,
                                   _WS_WRITE_TIMEOUT)
            self._stop_timeout = None
            self._stopped.clear()
        if _PRESTART and threading.current_thread() is threading.main_thread():
            self._server.workers.prestart()
            if any(_is_coroutine_function(handler) for handler in self._handlers()):
                _event_loop()

    def _log_listening(self, host):
        # Logged once stop signals are routed: whoever waits for this line may send one.
        _default_logging()
        log.info('websocket server %s on ws%s://%s:%d', self.name or '',
                 's' if self.ssl_context else '', host, self.port)

    def _handlers(self):
        return [target[0] for _, target in self.routes]

    def run(self, host: str = '127.0.0.1', port: int = 8765) -> Self:
        """Start serving on host:port (port 0: any free port, see .port) in a background
        thread and return self at once.  That thread keeps the process alive until stop(),
        SIGTERM or Ctrl+C, so a script that only calls run() serves until then.  Raises
        OSError when the address cannot be bound, RuntimeError when already running."""
        self._bind(host, port)
        _ws_running.add(self)
        _starting.append(self)
        try:
            self._restore_signals = _on_stop_signals(self._on_signal, foreground=False)
            self._log_listening(host)
            self._thread = threading.Thread(target=self._serve,
                                            name='mconnector-ws-%d' % self.port)
            self._thread.start()
        finally:
            _starting.remove(self)
        return self

    def serve_forever(self, host: str = '127.0.0.1', port: int = 8765) -> None:
        """Serve in this thread until stop(), SIGTERM or Ctrl+C.  When run() already
        started it, wait for it to stop instead."""
        if self._thread is not None:
            while not self._stopped.wait(0.5):
                pass
            return
        self._bind(host, port)
        restore = _on_stop_signals(self._on_signal)
        self._log_listening(host)
        try:
            self._serve()
        finally:
            restore()

    def _on_signal(self, signum):
        self._server.stop()

    def _serve(self):
        server = self._server
        try:
            server.serve_forever()
            timeout = self.close_timeout if self._stop_timeout is None else self._stop_timeout
            server.close_all(timeout)
        finally:
            with self._lock:
                self._server = None
            _ws_running.discard(self)
            self._stopped.set()
            log.info('websocket server %s stopped', self.name or '')

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop listening, close every connection with 1001 (going away), wait up to
        `timeout` seconds (default close_timeout) for their closing handshakes, then drop
        whatever is left.  Returns once stopped; calling it again does nothing."""
        server = self._server
        if server is None:
            return
        if timeout is not None:
            self._stop_timeout = timeout
        server.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
        elif self._thread is None:          # serve_forever() in another thread
            self._stopped.wait()
        restore, self._restore_signals = self._restore_signals, None
        if restore is not None:
            restore()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ###########################################################################################
# 8. Clients: Friend, and SocketClient for websockets
# ###########################################################################################

_SENDER_HEADERS = (('Content-Type', 'application/json'), ('X-MConnector', __version__),
                   ('User-Agent', 'mconnector/%s' % __version__))
# The seconds a sender still waits for its answer, sent with every try (relative, so that
# the two clocks need not agree); the listener offers it as mconnector.request.time_left.
_TIMEOUT_HEADER = 'X-MC-Timeout'


_NO_SETTINGS = {}               # (read only) the settings of a rule that has none
_reply_decoder = json.JSONDecoder()     # json.loads() of a str, without its checks of type


class _Reply:
    """The last raw answer a Friend got: status, headers (lower-case names), body."""

    __slots__ = ('status', 'headers', 'body')

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self):
        return '<reply %d, %d bytes>' % (self.status, len(self.body))


def _unwrap(value):
    """One value for a one-item list, a tuple for several, as a local call returns them."""
    if type(value) is list:
        return value[0] if len(value) == 1 else tuple(value)
    return value


def _rule_path(rule):
    """The rule a sender calls: its leading "/" may be left out, as on the command line."""
    if not isinstance(rule, str):
        raise TypeError('a rule is a path such as "/helloworld", got %r' % (rule,))
    return rule if rule[:1] == '/' or rule == _ALL_RULES else '/' + rule


def _is_ip_address(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return True
    return False


def _connection_is_stale(sock):
    # A keep-alive connection the listener closed (idle timeout, restart) reads as EOF.
    # Finding that out before writing means no request is ever re-sent after it may have
    # run: a request is only retried when it could not have been written.
    # Over TLS, readable may only mean session tickets arrived: read to find out.
    try:
        if not _readable(sock):
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(1)            # b'' (closed) or stray bytes: either way, unusable
        finally:
            sock.settimeout(timeout)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        ssl = sys.modules.get('ssl')
        if ssl is not None and isinstance(exc, ssl.SSLWantReadError):
            return False            # only TLS records with no data in them: alive
    except ValueError:
        pass
    return True


class Friend:
    """A sender: calls the rules of a listener at `address` like local functions.

    Friend(name, address, token=None, ruleMethods=None, timeout=30.0, retries=2)

    `address` may also be a list of the URLs of a service's instances, and a host name with
    several addresses is as many instances: calls spread over them, and one refused at
    connect time moves to the next (see the README, "Several instances").

    `token` is {rule: token} (or one string for every rule); `ruleMethods` is
    {rule: 'GET'|'PUT'|...} (POST otherwise).  Connections are kept alive and reused, so
    one Friend may be used from many threads at once.  Remote failures raise:
    RemoteError (the function raised), the CallError of the listener's status (AuthError,
    NotFound, BadRequest, PayloadTooLarge...), CallTimeout, Unreachable, NetworkError (all
    MConnectorError; the last three also ConnectionError).

    `timeout` bounds the whole call (connecting, sending, the complete reply, and any
    retries); a reply over `max_reply` bytes (default MAX_BODY, as the listener's
    max_body) raises NetworkError before it is read.

    A call that cannot have reached the function (refused, no connection) is tried
    `retries` more times, after `backoff` seconds doubling each time (with jitter); one
    that may have run is repeated only for GET rules and rules marked idempotent.
    `secretKey` signs every call (see sign_request).  For https:// addresses the
    certificate is verified (`cafile=` adds a CA file; `verify=False` turns checking
    off; `certfile`/`keyfile` present a client certificate).
    """

    lastMessage: Any
    lastreply: Optional[_Reply]
    address: str
    _rules: Dict[str, Dict[str, Any]]
    _aside_until: float
    _refusals: int

    def __init__(self, name: str, address: Union[str, Sequence[str]],
                 token: Union[str, Mapping[str, str], None] = None,
                 ruleMethods: Optional[Mapping[str, str]] = None, timeout: float = 30.0,
                 secretKey: Optional[str] = None, cafile: Optional[str] = None,
                 verify: bool = True, ssl_context: Optional[ssl.SSLContext] = None,
                 certfile: Optional[str] = None, keyfile: Optional[str] = None,
                 retries: int = 2, backoff: float = 0.05, max_reply: int = MAX_BODY,
                 headers: Optional[Mapping[str, str]] = None, set_aside: float = 5.0) -> None:
        from urllib.parse import urlsplit
        self.name = name
        self._members = None
        self._looked_up = None      # when a host name's addresses were last looked up
        self._turn = itertools.count()
        self.set_aside = set_aside
        options = dict(token=token, ruleMethods=ruleMethods, timeout=timeout,
                       secretKey=secretKey, cafile=cafile, verify=verify,
                       ssl_context=ssl_context, certfile=certfile, keyfile=keyfile,
                       backoff=backoff, max_reply=max_reply, headers=headers)
        if not isinstance(address, str):
            # Several instances of one service: a Friend of each, which this one picks from.
            addresses = list(address)
            if not addresses or not all(isinstance(a, str) for a in addresses):
                raise ValueError('Friend(%r): the address is a URL, or a list of URLs of the '
                                 'instances of one service, got %r' % (name, address))
            Friend.__init__(self, name, addresses[0], retries=retries, set_aside=set_aside,
                            **options)
            self._looked_up = None
            self._members = [self._instance(Friend(name, one, retries=0, **options))
                             for one in addresses]
            self.address = ', '.join(member.address for member in self._members)
            return
        given = address
        if '://' not in address:
            address = 'http://' + address
        parts = urlsplit(address)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise ValueError('a listener address is http://HOST:PORT or https://HOST:PORT, '
                             'got %r' % (given,))
        try:
            port = parts.port
        except ValueError:
            raise ValueError('the port of %r is not a number from 0 to 65535' % (given,)) from None
        self.address = address.rstrip('/')
        self._scheme = parts.scheme
        self._host = parts.hostname
        # The 0.3.7 README's own example sends to http://0.0.0.0:5000, the listener's
        # bind-all address; Linux connects that to this host, Windows and macOS refuse it.
        self._connect_host = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(self._host, self._host)
        if not _is_ip_address(self._connect_host):
            self._looked_up = float('-inf')
            self._options = options
        self._port = port or (443 if parts.scheme == 'https' else 80)
        self._prefix = parts.path.rstrip('/')
        self._host_header = host_header(self._host, self._port, parts.scheme == 'https')
        self.timeout = timeout
        self.max_reply = max_reply
        self.retries = retries
        self.backoff = backoff
        self.secretKey = secretKey
        self._ssl = ssl_context
        self._cafile = cafile
        self._verify = verify
        self._client_cert = (certfile, keyfile) if certfile else None
        self._rules = {}
        self._default_token = token if isinstance(token, str) else None
        if self._default_token is None:
            for rule, value in _token_table('Friend(%r)' % (name,), token).items():
                self.setRule(rule, token=value)
        for rule, method in (ruleMethods or {}).items():
            self.setRule(rule, method=method)
        self._extra_headers = tuple((headers or {}).items())
        self.max_idle = 16           # idle keep-alive connections kept for reuse
        self._idle = []
        self._loops = {}             # event loop -> _LoopConnections, for the async calls
        self._idle_lock = threading.Lock()
        self.lastMessage = None
        self.lastreply = None

    def __repr__(self):
        return '<Friend %r at %s>' % (self.name, self.address)

    # -- per-rule settings ----------------------------------------------------------------

    def setRule(self, rule: str, method: Optional[str] = None, token: Optional[str] = None,
                idempotent: Optional[bool] = None) -> None:
        """Remember the HTTP method, the token, and whether calls to `rule` may be repeated
        (`idempotent=True`: a call whose connection broke after it was sent is retried)."""
        if token is not None and not isinstance(token, str):
            raise TypeError('Friend(%r): the token of %s must be a string, got %r'
                            % (self.name, rule, token))
        settings = self._rules.setdefault(_rule_path(rule), {})
        if method is not None:
            settings['method'] = method.upper()
        if token is not None:
            settings['token'] = token
        if idempotent is not None:
            settings['idempotent'] = bool(idempotent)

    def removeToken(self, rule: str) -> bool:
        """Stop sending a token with calls to `rule`; returns whether one was set."""
        return self._rules.get(_rule_path(rule), {}).pop('token', None) is not None

    set_rule = setRule
    remove_token = removeToken
    secret_key = _alias('secretKey')
    last_message = _alias('lastMessage')
    last_reply = _alias('lastreply')

    def _method(self, rule):
        return self._rules.get(rule, _NO_SETTINGS).get('method', 'POST')

    def _token(self, rule):
        return self._rules.get(rule, _NO_SETTINGS).get('token', self._default_token)

    # -- calls ------------------------------------------------------------------------------

    def send(self, rule: str, *args: Any, **kwargs: Any) -> Any:
        """Call the function behind `rule` with these arguments and return its result:
        one value as itself, several as a tuple.  Raises what the call met (see class)."""
        return self._call(*self._send_request(rule, args, kwargs))

    def _send_request(self, rule, args, kwargs):
        """What _call() takes for send(rule, *args, **kwargs)."""
        rule = _rule_path(rule)
        notes = []
        if _PLAIN_TYPES.issuperset(map(type, args)) and \
                _PLAIN_TYPES.issuperset(map(type, kwargs.values())):
            # The usual arguments (strings, numbers...) travel as they are, without a walk.
            wire_args, wire_kwargs = list(args), kwargs
        else:
            try:
                wire_args, wire_kwargs = to_wire([list(args), kwargs], notes)
            except _NoWireForm as exc:
                raise CodecError(exc.at('kwargs' if exc.path[0] else 'args', 1)) from None
        token = self._token(rule)
        payload = {'args': wire_args, 'kwargs': wire_kwargs, 'token': token}
        if notes:
            payload['types'] = notes
        try:
            body = _to_json(payload).encode('utf-8')
        except (TypeError, ValueError) as exc:
            raise CodecError('cannot encode the arguments: %s' % exc) from None
        return self._method(rule), rule, body, token

    def json(self, rule: str, method: Optional[str] = None, **kwargs: Any) -> Any:
        """Send `kwargs` as one JSON object (for @M.json, @M.dict, @M.async_json rules) and
        return the answer: the returned value of @M.dict and @M.stream rules as it was
        returned, that of others unwrapped as send() does.  `method` defaults to the rule's."""
        return self._call(*self._json_request(rule, method, kwargs))

    def _json_request(self, rule, method, kwargs):
        """What _call() takes for json(rule, method, **kwargs)."""
        rule = _rule_path(rule)
        notes = []
        try:
            body = dumps(kwargs, notes)
        except _NoWireForm as exc:
            raise CodecError(exc.at('kwargs')) from None
        # The body is the arguments themselves, so type notes go in a header; past a few
        # KiB they are left out and the values arrive in their plain JSON form.
        extra = (('X-MConnector-Types', json.dumps(notes)),) if notes else ()
        if extra and len(extra[0][1]) > 4096:
            extra = ()
        return (method or self._method(rule)).upper(), rule, body, self._token(rule), extra

    def rules(self) -> List[Dict[str, Any]]:
        """The listener's rules (GET /_mc/rules): a list of dicts with rule, methods, mode,
        function, params, token (whether one is required) and doc."""
        return self._call('GET', _ADMIN_PREFIX + 'rules', b'', self._token(_ALL_RULES))['rules']

    def health(self) -> Dict[str, Any]:
        """The listener's GET /_mc/health: {'status': 'ok', 'name': ..., 'uptime_s': ...}.
        Raises CallError with status 503 while it is stopping."""
        return self._call('GET', _ADMIN_PREFIX + 'health', b'', self._token(_ALL_RULES))

    async def send_async(self, rule: str, *args: Any, **kwargs: Any) -> Any:
        """send() for asyncio code, on asyncio streams: no thread, a pool of keep-alive
        connections per event loop.  Cancelling the awaiting task closes the connection
        of the call and raises CancelledError."""
        return await self._call_async(*self._send_request(rule, args, kwargs))

    async def json_async(self, rule: str, method: Optional[str] = None, **kwargs: Any) -> Any:
        """json() for asyncio code, as send_async()."""
        return await self._call_async(*self._json_request(rule, method, kwargs))

    def close(self) -> None:
        """Close the idle connections (a later call opens a new one): those of threads,
        and those of event loops (at once for the loop running in this thread, soon for
        loops running in others)."""
        for member in self._members or ():
            member.close()
        with self._idle_lock:
            idle, self._idle = self._idle, []
            loops, self._loops = self._loops, {}
        for conn in idle:
            conn.close()
        for pool in loops.values():
            pool.close_soon()

    async def aclose(self) -> None:
        """close(), then wait until the connections of this event loop are closed."""
        import asyncio
        with self._idle_lock:
            pool = self._loops.get(asyncio.get_running_loop())
        writers = [conn.writer for conn in (pool.idle if pool is not None else ())
                   if conn.writer is not None]
        self.close()
        for writer in writers:
            try:
                await writer.wait_closed()
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method, rule, body, token, extra=()):
        reply = self._exchange(method, rule, body, self._headers(token, extra))
        return self._received(rule, reply)

    async def _call_async(self, method, rule, body, token, extra=()):
        reply = await self._exchange_async(method, rule, body, self._headers(token, extra))
        return self._received(rule, reply)

    def _headers(self, token, extra):
        headers = _SENDER_HEADERS + self._extra_headers + extra
        if token is not None:
            headers = headers + (('Authorization', 'Bearer ' + token),)
        return headers

    def _received(self, rule, reply):
        self.lastreply = reply
        value = self._decode(rule, reply)
        self.lastMessage = value
        return value

    def _decode(self, rule, reply):
        content_type = reply.headers.get('content-type', '')
        data = reply.body
        if 'json' in content_type or (data[:1] in (b'[', b'{') and not content_type):
            # Replies are read leniently (NaN, as Flask writes it for 0.3.7, is a float);
            # the strict loads() is for what a listener takes from anyone.
            try:
                data = _reply_decoder.decode(data.decode('utf-8'))
            except (ValueError, RecursionError):
                data = reply.body.decode('utf-8', 'replace')
        else:
            data = data.decode('utf-8', 'replace')
        if reply.status >= 400 or reply.status < 200:
            raise self._error(rule, reply.status, data)
        if reply.headers.get('x-mconnector-types') and isinstance(data, dict):
            try:
                data = from_wire(data['result'], data['types'])
            except (KeyError, TypeError):
                raise CodecError('malformed typed reply from %s%s' % (self.address, rule)) from None
        if reply.headers.get('x-mconnector-mode') in ('dict', 'stream'):
            return data         # the returned value itself, not the list of values
        return _unwrap(data)

    def _error(self, rule, status, data):
        error = data.get('error') if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = str(error.get('message', ''))
            type_name = str(error.get('type', 'Exception'))
        else:
            text = str(data).strip()
            # An HTML error page (Flask's, a proxy's) says no more than its status.
            if not text or text[:1] == '<':
                text = _STATUS_TEXT.get(status, 'error')
            message = text[:500]
            type_name = 'Exception'
        if status == 500:
            return RemoteError(type_name, message, rule, self.address,
                               error.get('traceback') if error else None)
        return _STATUS_ERRORS.get(status, CallError)(message, status, rule, self.address)

    # -- the connection -------------------------------------------------------------------

    # A call takes an idle connection (the most recently used, so a sequential caller
    # keeps one) or opens one, and gives it back when the reply has been read: as many
    # connections as calls in flight, none left behind by threads that ended.

    def _acquire(self):
        while True:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                context = self._ssl_context() if self._scheme == 'https' else None
                return _ClientConnection(self._connect_host, self._port, context,
                                         self._host, self.max_reply)
            if conn.reusable() and not _connection_is_stale(conn.sock):
                return conn
            conn.close()

    def _release(self, conn):
        if conn.sock is not None:
            with self._idle_lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
            conn.close()

    def _ssl_context(self):
        if self._ssl is None:
            import ssl
            context = ssl.create_default_context(cafile=self._cafile)
            if not self._verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self._client_cert:
                context.load_cert_chain(*self._client_cert)
            self._ssl = context
        return self._ssl

    # -- several instances ----------------------------------------------------------------

    # A host name is looked up again this often, so that instances added to (or removed
    # from) a name's records are called (or left) within this many seconds.
    resolve_every = 30.0

    def _instance(self, member):
        """`member`, a Friend of one instance, made part of this one: rules and tokens set
        on this Friend count for all."""
        member._rules = self._rules
        member._aside_until = 0.0
        member._refusals = 0
        member._looked_up = None
        return member

    def _resolve(self, infos):
        """Take the addresses that getaddrinfo gave for the host name as its instances.  A
        name with several addresses of one family is several instances, one per address
        (each connecting to its address, with the name in Host and for TLS); a name with at
        most one address per family (localhost: 127.0.0.1 and ::1) stays one instance, whose
        connections try its addresses in turn.  Instances that stay keep their state."""
        families = {}
        for family, _, _, _, sockaddr in infos:
            found = families.setdefault(family, [])
            if sockaddr[0] not in found:
                found.append(sockaddr[0])
        addresses = next((found for found in families.values() if len(found) > 1), None)
        old = {member._connect_host: member for member in self._members or ()}
        if addresses is None:
            self._members = None
        else:
            members = []
            for address in addresses:
                member = old.pop(address, None)
                if member is None:
                    member = self._instance(Friend(self.name, self.address, retries=0,
                                                   **self._options))
                    member._connect_host = address
                    log.info('%s: %s is at %s', self.name, self.address, address)
                members.append(member)
            self._members = members
        for member in old.values():
            member.close()

    def _resolve_due(self):
        return (self._looked_up is not None
                and time.monotonic() - self._looked_up >= self.resolve_every)

    def _lookup(self):
        self._looked_up = time.monotonic()      # first, so that one thread looks up
        try:
            infos = socket.getaddrinfo(self._connect_host, self._port, type=socket.SOCK_STREAM)
        except OSError:         # the call reports it, as Unreachable
            return
        self._resolve(infos)

    async def _lookup_async(self):
        import asyncio
        self._looked_up = time.monotonic()
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self._connect_host, self._port, type=socket.SOCK_STREAM)
        except OSError:
            return
        self._resolve(infos)

    def _member(self, members, tried):
        """The next instance to call, round robin: one not set aside, else (all are) the
        one whose time aside ends first.  One whose time aside has passed is asked for its
        /_mc/health before it takes calls again."""
        now = time.monotonic()
        start = next(self._turn)
        for i in range(len(members)):
            member = members[(start + i) % len(members)]
            if member in tried:
                continue
            if member._aside_until == 0.0:
                return member
            if member._aside_until <= now:
                try:
                    member._call('GET', _ADMIN_PREFIX + 'health', b'', member._token(_ALL_RULES))
                except MConnectorError:
                    member._aside_until = now + self.set_aside
                    continue
                member._aside_until = 0.0
                member._refusals = 0
                log.info('%s: %s answers again', self.name, member.address)
                return member
        left = [member for member in members if member not in tried]
        return min(left, key=lambda member: member._aside_until) if left else None

    def _refused(self, member):
        member._refusals += 1
        if member._refusals >= 2 and member._aside_until == 0.0:
            member._aside_until = time.monotonic() + self.set_aside
            log.warning('%s: %s refuses calls: set aside for %ss', self.name, member.address,
                        self.set_aside)

    def _spread(self, members, method, rule, body, headers):
        """For a Friend of several instances: the call on one of them, moved to the next
        when it cannot have reached the function (refused: safe for any rule); `retries`
        more rounds over them all, after `backoff`, when every one refused."""
        error = None
        for round_ in range(self.retries + 1):
            tried = []
            member = self._member(members, tried)
            while member is not None:
                try:
                    reply = member._exchange(method, rule, body, headers)
                except Unreachable as exc:
                    error = exc
                    self._refused(member)
                    tried.append(member)
                    member = self._member(members, tried)
                    continue
                member._refusals = 0
                return reply
            if round_ < self.retries:
                time.sleep(min(2.0, self.backoff * 2 ** round_))
        raise error

    async def _spread_async(self, members, method, rule, body, headers):
        """_spread() for the asyncio senders."""
        import asyncio
        error = None
        for round_ in range(self.retries + 1):
            tried = []
            member = self._member(members, tried)
            while member is not None:
                try:
                    reply = await member._exchange_async(method, rule, body, headers)
                except Unreachable as exc:
                    error = exc
                    self._refused(member)
                    tried.append(member)
                    member = self._member(members, tried)
                    continue
                member._refusals = 0
                return reply
            if round_ < self.retries:
                await asyncio.sleep(min(2.0, self.backoff * 2 ** round_))
        raise error

    def _exchange(self, method, rule, body, headers):
        if self._resolve_due():
            self._lookup()
        members = self._members         # once: a lookup in another thread may change it
        if members is not None:
            return self._spread(members, method, rule, body, headers)
        tries = _Tries(self, method, rule, body, headers)
        while True:
            try:
                return self._attempt(*tries.next_request())
            except _Failed as failed:
                delay = tries.delay_after(failed)
            time.sleep(delay)

    async def _exchange_async(self, method, rule, body, headers):
        import asyncio
        if self._resolve_due():
            await self._lookup_async()
        members = self._members
        if members is not None:
            return await self._spread_async(members, method, rule, body, headers)
        tries = _Tries(self, method, rule, body, headers)
        while True:
            try:
                return await self._attempt_async(*tries.next_request())
            except _Failed as failed:
                delay = tries.delay_after(failed)
            await asyncio.sleep(delay)

    def _attempt(self, method, target, headers, body, where, deadline):
        """One try: the reply, or _Failed saying whether the request may have arrived."""
        conn = self._acquire()
        reused = conn.sock is not None
        try:
            conn.send(method, target, headers, body, deadline)
            reply, keep_alive = conn.receive(deadline)
        except (OSError, HTTPError) as exc:
            conn.close()
            raise self._failed(exc, where, conn.sent, reused)
        if keep_alive:
            self._release(conn)
        else:
            conn.close()
        return reply

    async def _attempt_async(self, method, target, headers, body, where, deadline):
        """_attempt() on this event loop's connections."""
        import asyncio
        pool = self._loop_pool()
        if pool.closer is None:
            await pool.watch()
        conn = pool.acquire(self)
        reused = conn.writer is not None
        try:
            # One timer for the whole try (cheaper than one per step).
            reply, keep_alive = await _in_time(conn.exchange(method, target, headers, body),
                                               deadline)
        except (OSError, HTTPError) as exc:
            conn.abort()
            raise self._failed(exc, where, conn.sent, reused)
        except asyncio.CancelledError:
            # Whatever was written or is on its way back, the connection is not reused:
            # closing it is how the listener learns that the caller is gone.
            conn.abort()
            raise
        if keep_alive:
            pool.release(conn, self.max_idle)
        else:
            conn.close()
        return reply

    def _failed(self, exc, where, sent, reused):
        """The _Failed of a try that met `exc`, after the request was written whole
        (`sent`) or before, on a kept-alive connection (`reused`) or a new one."""
        return self._lost(exc, where) if sent else self._not_sent(exc, where, reused)

    def _not_sent(self, exc, where, reused=False):
        """The _Failed of a try whose request cannot have arrived (`exc`: an OSError)."""
        if isinstance(exc, socket.timeout):
            return _Failed(CallTimeout('no connection to %s within %ss' % (where, self.timeout)))
        if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
            return _Failed(Unreachable('cannot reach %s: %s' % (where, exc)))
        refused = self._tls_refusal(exc)
        if refused is not None:
            return _Failed(refused, retry=False)
        # A kept-alive connection that fails the write was closed by the listener: the
        # request never reached it, and goes again at once, on another connection.
        return _Failed(Unreachable('cannot reach %s: %s' % (where, exc)), again=reused)

    def _lost(self, exc, where):
        """The _Failed of a try whose request was sent (`exc`: OSError or HTTPError)."""
        if isinstance(exc, socket.timeout):
            return _Failed(CallTimeout('%s did not answer within %ss' % (where, self.timeout)), True)
        if isinstance(exc, _NotHTTP):
            if exc.tls:
                error = NetworkError('%s answered in TLS: call https://%s'
                                     % (self.address, self.address.partition('://')[2]))
            else:
                error = NetworkError('%s does not answer in HTTP: %s' % (self.address,
                                                                         exc.message))
            return _Failed(error, True, retry=False)
        if isinstance(exc, HTTPError):
            return _Failed(NetworkError('%s sent a reply that cannot be read (the call may have '
                                        'run): %s' % (where, exc.message)), True, retry=False)
        refused = self._tls_refusal(exc)
        if refused is not None:
            return _Failed(refused, retry=False)
        if isinstance(exc, _ClosedEarly):
            what = 'closed the connection'
        elif isinstance(exc, ConnectionResetError):
            what = 'reset the connection'
        else:
            what = 'lost the connection (%s)' % (exc or type(exc).__name__)
        return _Failed(NetworkError('%s %s without answering (the call may have run)'
                                    % (where, what)), True)

    def _loop_pool(self):
        """The idle connections of this Friend on the running event loop."""
        import asyncio
        loop = asyncio.get_running_loop()
        with self._idle_lock:
            pool = self._loops.get(loop)
            if pool is None:
                for other in [key for key in self._loops if key.is_closed()]:
                    del self._loops[other]
                pool = self._loops[loop] = _LoopConnections(loop)
        return pool

    def _async_connection(self):
        """A new, unconnected connection for this event loop."""
        context = self._ssl_context() if self._scheme == 'https' else None
        return _AsyncConnection(self._connect_host, self._port, context, self._host,
                                self.max_reply)


    def _tls_refusal(self, exc):
        """The error for a TLS alert that says why no call could run on this connection:
        this client's certificate refused by mutual TLS, or a listener without TLS."""
        reason = getattr(exc, 'reason', None) or ''
        if 'ALERT' in reason and ('CERTIFICATE' in reason or 'UNKNOWN_CA' in reason
                                  or 'ACCESS_DENIED' in reason):
            why = reason.partition('ALERT_')[2].replace('_', ' ').lower()
            return NetworkError('%s refused the client certificate (%s), so the call did not '
                                'run: give Friend a certfile= (and keyfile=) that the listener '
                                'trusts' % (self.address, why))
        if reason == 'WRONG_VERSION_NUMBER':
            return NetworkError('%s does not answer in TLS: call http://%s'
                                % (self.address, self.address.partition('://')[2]))
        return None


class AsyncFriend(Friend):
    """A Friend for asyncio code: the same options, errors, retries and whole-call
    timeout, with send(), json(), rules() and health() as coroutines, on asyncio streams
    (any event loop, uvloop's too).  Each event loop keeps its own idle keep-alive
    connections, closed when asyncio.run() ends it, or by aclose().  Cancelling a call
    closes its connection and raises CancelledError.

        async with AsyncFriend('app1', 'http://127.0.0.1:5000') as app1:
            answers = await asyncio.gather(*(app1.send('/helloworld', n) for n in names))
    """

    send = Friend.send_async
    json = Friend.json_async

    async def rules(self) -> List[Dict[str, Any]]:
        """Friend.rules(), awaited."""
        return (await self._call_async('GET', _ADMIN_PREFIX + 'rules', b'',
                                       self._token(_ALL_RULES)))['rules']

    async def health(self) -> Dict[str, Any]:
        """Friend.health(), awaited."""
        return await self._call_async('GET', _ADMIN_PREFIX + 'health', b'',
                                      self._token(_ALL_RULES))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self):
        return '<AsyncFriend %r at %s>' % (self.name, self.address)


class TestClient(Friend):
    """M.test_client(): a Friend (the same methods, options, results, exceptions, tokens
    and signatures) whose calls go to M's dispatch in the calling thread, as bytes through
    the HTTP core both ways, without a socket.  `remote_address` is the peer that the rules
    see in mconnector.request; `options` are Friend's (token, secretKey, headers, timeout,
    ruleMethods...).  A rule slower than `timeout` raises CallTimeout once it has returned.
    """

    __test__ = False        # not a test case, for runners that collect Test* names

    def __init__(self, service: Microservice, remote_address: Peer = ('127.0.0.1', None),
                 **options: Any) -> None:
        super().__init__(options.pop('name', 'test'), service.url, **options)
        self._looked_up = None      # no network: the service answers in this process
        self.service = service
        self.remote_address = remote_address

    def __repr__(self):
        return '<TestClient of %r>' % self.service.name

    def _acquire(self):
        conn = _ClientConnection(self._connect_host, self._port, max_reply=self.max_reply)
        conn.sock = _InProcess(self.service, self.remote_address)
        conn.http = HTTPConnection(client=True, max_body=self.max_reply)
        return conn

    def _release(self, conn):
        conn.close()

    async def _attempt_async(self, *attempt):
        # The listener answers in the calling thread, and an async rule on the shared
        # loop: not in this event loop's thread, which it would block.
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(None, self._attempt, *attempt)


class _InProcess:
    """The socket of a TestClient's connection: the request written to it is answered by
    the listener's handle() at once, framed by the listener's HTTP core; recv() reads the
    answer."""

    def __init__(self, service, remote_address):
        self.service = service
        self.remote_address = remote_address
        self.http = HTTPConnection(max_body=service.max_body,
                                   keep_alive_timeout=service.timeout)
        self.head = None
        self.parts = []
        self.answer = bytearray()

    def settimeout(self, timeout):
        pass

    def sendall(self, data):
        http = self.http
        http.receive_data(bytes(data))
        while True:
            try:
                event = http.next_event()
            except HTTPError as exc:
                self.service._metrics.refused(self.head.method if self.head else None,
                                              exc.status)
                self._write(Response.refusal(exc))
                return
            if event is NEED_DATA or event is PAUSED or event is CLOSED:
                return
            if type(event) is bytes:
                self.parts.append(event)
            elif event is END_OF_MESSAGE:
                head, body = self.head, b''.join(self.parts)
                self.head, self.parts = None, []
                self._write(self.service.handle(head.method, head.target, head.headers, body,
                                                client=self.remote_address))
            else:
                self.head = event

    def _write(self, response):
        http, body = self.http, response.body
        if isinstance(body, (bytes, bytearray)):
            self.answer += http.send_response(response.status, response.headers, bytes(body))
            return
        self.answer += http.send_response(response.status, response.headers, None)
        if not http.sends_body:
            _close_stream(body)
        else:
            try:
                for piece in body:
                    self.answer += http.send_data(piece)
            except Exception as exc:    # as the serving shell does: the stream is cut
                log.warning('stream failed: %s: %s', type(exc).__name__, exc)
                return
        self.answer += http.send_end()

    def recv(self, size):
        data = bytes(self.answer[:size])
        del self.answer[:size]
        return data

    def close(self):
        pass


class _Tries:
    """The tries of one call, for Friend's sync and async paths alike: the request of
    each, and whether and when to try again."""

    __slots__ = ('friend', 'method', 'target', 'headers', 'body', 'where', 'idempotent',
                 'deadline', 'count')

    def __init__(self, friend, method, rule, body, headers):
        self.friend = friend
        self.method = method
        self.body = body
        self.where = '%s%s' % (friend.address, rule)
        self.target = target = friend._prefix + rule
        if friend.secretKey:
            headers = headers + tuple(sign_request(friend.secretKey, method, target, body,
                                                   headers=headers))
        self.headers = (('Host', friend._host_header),) + headers
        self.idempotent = method in ('GET', 'HEAD', 'OPTIONS') or \
            friend._rules.get(rule, _NO_SETTINGS).get('idempotent', False)
        # `timeout` bounds the whole call, retries included: connect, send, whole reply.
        now = time.monotonic()
        self.deadline = now + friend.timeout
        self.count = 0
        # Made inside a rule: its caller's deadline bounds this call too, and its trace goes
        # on (so that the access logs of a chain of services join up).
        inside = _current_request.get(None)
        if inside is not None:
            if inside.deadline is not None and inside.deadline < self.deadline:
                self.deadline = inside.deadline
                if self.deadline <= now:
                    raise DeadlineExceeded('%s not sent: the caller of %s has given up'
                                           % (self.where, inside.rule))
            self.headers += tuple(inside.trace_headers())

    def next_request(self):
        """The arguments of _attempt() for the next try.  The time left goes with it, so
        that the listener knows how long its caller waits (mconnector.request.time_left)."""
        left = max(0.0, self.deadline - time.monotonic())
        headers = self.headers + ((_TIMEOUT_HEADER, '%.3f' % left),)
        return self.method, self.target, headers, self.body, self.where, self.deadline

    def delay_after(self, failed):
        """Seconds to wait before the next try after `failed`; raises the call's error
        when there is to be none."""
        # A call that cannot have reached the function is tried again; one that may have
        # run only when the rule is idempotent; a silent listener never.
        if failed.again:
            return 0.0
        error = failed.error
        retry = self.count < self.friend.retries and failed.retry and (not failed.sent or (
            self.idempotent and not isinstance(error, CallTimeout)))
        if not retry:
            raise error from None
        self.count += 1
        import random
        delay = min(2.0, self.friend.backoff * 2 ** (self.count - 1)) * (0.5 + random.random() / 2)
        if time.monotonic() + delay >= self.deadline:
            raise error from None
        log.debug('%s: attempt %d failed, again in %.3fs', self.where, self.count, delay)
        return delay

class _ClosedEarly(ConnectionError):
    """The listener ended the connection before the first byte of its reply."""


class _Failed(Exception):
    """An attempt's error, whether the request may have reached the listener, and whether
    another attempt could fare better (not after a reply that broke the protocol)."""

    def __init__(self, error, sent=False, retry=True, again=False):
        super().__init__(error)
        self.error = error
        self.sent = sent
        self.retry = retry
        self.again = again          # at once, without counting as a try (see _not_sent)


@functools.lru_cache(maxsize=16)
def _keep_alive_timeout(hint):
    """The seconds in a Keep-Alive header ('timeout=15, max=100'), or None."""
    match = re.search(r'timeout=(\d+)', hint)
    return int(match.group(1)) if match else None


_TIMEOUT_SLACK = 0.001      # how far a socket operation's timeout may be from the time left


def _remaining(deadline):
    """Seconds left until `deadline` (time.monotonic()); socket.timeout once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout('deadline passed')
    return left


class _ClientConnection:
    """One keep-alive HTTP/1.1 connection of a sender: a socket and the core of section 4.

    Each request is one write.  (http.client parses headers through the email package,
    which measured as about half of the sender's CPU time per call.)
    """

    __slots__ = ('host', 'port', 'context', 'sock', 'http', 'server_hostname', 'reuse_until',
                 'max_reply', 'head', 'parts', 'sent', 'timeout')

    def __init__(self, host, port, context=None, server_hostname=None, max_reply=MAX_BODY):
        self.host = host
        self.port = port
        self.context = context
        self.server_hostname = server_hostname or host
        self.max_reply = max_reply
        self.sock = None
        self.http = None
        self.reuse_until = None     # from the listener's Keep-Alive: timeout=N
        self.head = None            # of the reply being read, and its body so far
        self.parts = []
        self.sent = False           # the request being sent is all written
        self.timeout = None         # what the socket was last given by settimeout()

    def reusable(self):
        """False once the listener may be closing this connection as idle."""
        return self.reuse_until is None or time.monotonic() < self.reuse_until

    def send(self, method, target, headers, body, deadline):
        self.sent = False
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), _remaining(deadline))
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.context is not None:
                    sock.settimeout(_remaining(deadline))
                    sock = self.context.wrap_socket(sock, server_hostname=self.server_hostname)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            self.http = HTTPConnection(client=True, max_body=self.max_reply)
            self.timeout = None
        self._time_left(deadline)
        self.sock.sendall(self.http.send_request(method, target, headers, body))
        self.sent = True

    def _time_left(self, deadline):
        """Give the socket's next operation the time left until `deadline`.  Each
        settimeout() is a system call: within _TIMEOUT_SLACK of what the socket has, it is
        left as it is (a sequential caller's calls all have about the same time left)."""
        left = deadline - time.monotonic()      # (_remaining(), without a call: twice a call)
        if left <= 0:
            raise socket.timeout('deadline passed')
        if self.timeout is None or abs(self.timeout - left) > _TIMEOUT_SLACK:
            self.sock.settimeout(left)
            self.timeout = left

    def receive(self, deadline):
        """Read one reply before `deadline`: (_Reply, keep_alive).  Raises HTTPError for a
        reply the core refuses, OSError for the network, socket.timeout at the deadline."""
        # (bytes left from the last read may hold it; none: it cannot be whole yet)
        reply = self._reply() if self.http.buffered() else None
        while reply is None:
            self._time_left(deadline)
            self.http.receive_data(self.sock.recv(65536))
            reply = self._reply()
        return reply

    def _reply(self):
        """(_Reply, keep_alive) once the core holds a whole reply; None while it needs more
        bytes."""
        http = self.http
        while True:
            event = http.next_event()
            if event is NEED_DATA:
                return None
            if event is END_OF_MESSAGE:
                break
            if type(event) is bytes:
                self.parts.append(event)
            elif event is CLOSED:
                raise _ClosedEarly('connection closed before the reply')
            else:
                self.head = event
        head, parts = self.head, self.parts
        self.head, self.parts = None, []
        headers = head.headers
        keep_alive = http.keep_alive
        hint = headers.get('keep-alive')
        if hint is not None and keep_alive:
            # The listener closes connections idle for `timeout` seconds: a request sent
            # just then would cross its close, and could not safely be sent again.  So the
            # connection is not reused from a little before that moment on.
            timeout = _keep_alive_timeout(hint)
            if timeout is not None:
                self.reuse_until = time.monotonic() + timeout - min(1.0, timeout / 4)
        if keep_alive:
            http.start_next_cycle()
        body = parts[0] if len(parts) == 1 else b''.join(parts)
        return _Reply(head.status, headers, body), keep_alive

    def close(self):
        sock, self.sock = self.sock, None
        if sock is not None:
            self.http = None
            sock.close()


async def _in_time(coroutine, deadline):
    """Await `coroutine` until `deadline` (time.monotonic()); socket.timeout after that,
    as a socket says it, once the coroutine has been cancelled."""
    import asyncio
    left = deadline - time.monotonic()
    if left <= 0:
        coroutine.close()
        raise socket.timeout('deadline passed')
    try:
        return await asyncio.wait_for(coroutine, left)
    except asyncio.TimeoutError:
        raise socket.timeout('deadline passed') from None


class _AsyncConnection(_ClientConnection):
    """A _ClientConnection on asyncio streams: the same core, the same replies, awaited
    on the event loop that opened it."""

    __slots__ = ('reader', 'writer')

    def __init__(self, host, port, context=None, server_hostname=None, max_reply=MAX_BODY):
        super().__init__(host, port, context, server_hostname, max_reply)
        self.reader = self.writer = None

    def reusable(self):
        """False once the listener closed this idle connection, or may be closing it."""
        writer = self.writer
        return writer is not None and not writer.is_closing() and not self.reader.at_eof() \
            and super().reusable()

    async def send(self, method, target, headers, body):
        self.sent = False
        if self.writer is None:
            import asyncio
            tls = {} if self.context is None else {
                'ssl': self.context, 'server_hostname': self.server_hostname}
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, **tls)
            self.http = HTTPConnection(client=True, max_body=self.max_reply)
            sock = self.writer.get_extra_info('socket')
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        self.writer.write(self.http.send_request(method, target, headers, body))
        await self.writer.drain()
        self.sent = True

    async def exchange(self, method, target, headers, body):
        """send(), then receive(): one awaitable for one timer."""
        await self.send(method, target, headers, body)
        return await self.receive()

    async def receive(self):
        """receive() of _ClientConnection, awaited; the caller bounds it in time."""
        reply = self._reply()
        while reply is None:
            self.http.receive_data(await self.reader.read(65536))
            reply = self._reply()
        return reply

    def abort(self):
        """Drop the connection at once, with whatever it had still to write."""
        writer, self.writer = self.writer, None
        if writer is not None:
            self.http = self.reader = None
            writer.transport.abort()

    def close(self):
        writer, self.writer = self.writer, None
        if writer is not None:
            self.http = self.reader = None
            writer.close()


class _LoopConnections:
    """A Friend's idle connections on one event loop.  Only that loop's thread touches
    them, but close_soon()."""

    def __init__(self, loop):
        self.loop = loop
        self.idle = []
        self.closer = None

    async def watch(self):
        """Close the connections when the loop ends: asyncio.run() (and uvloop.run())
        close every async generator still alive before closing the loop, this one among
        them; its connections would otherwise be left to the collector, each with a
        ResourceWarning."""
        import asyncio

        async def closer():
            try:
                yield
            finally:
                self.close(abort=True)
                await asyncio.sleep(0)      # the transports' last callbacks
        self.closer = closer()
        await self.closer.__anext__()

    def acquire(self, friend):
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable():
                return conn
            conn.close()
        return friend._async_connection()

    def release(self, conn, max_idle):
        if len(self.idle) < max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self, abort=False):
        idle, self.idle = self.idle, []
        for conn in idle:
            if abort:
                conn.abort()
            else:
                conn.close()

    def close_soon(self):
        """close() from any thread: at once in the loop's own, else through the loop."""
        import asyncio
        if self.loop.is_closed():
            self.idle = []
            return
        try:
            here = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            here = False
        if here:
            self.close()
            return
        try:
            self.loop.call_soon_threadsafe(self.close)
        except RuntimeError:            # it closed meanwhile
            pass


# The client's websocket: the thread that calls recv() is the one that reads the socket (no
# reader thread per connection, no hand-off between threads), so pings are answered and
# keep-alive pings sent whenever someone waits for a message.

class _WebSocketBase:
    """What both sides of a websocket connection offer beyond send, recv, ping, close."""

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_code(self) -> Optional[int]:
        return None if self._closed is None else self._closed.code

    @property
    def close_reason(self) -> Optional[str]:
        return None if self._closed is None else self._closed.reason

    @property
    def compression(self) -> Optional[str]:
        """'deflate' when the handshake negotiated permessage-deflate, else None."""
        return None if self._proto.deflate is None else 'deflate'

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.recv()
            except ConnectionClosed as exc:
                if exc.ok:
                    return
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self):
        state = 'closed %s' % self.close_code if self.closed else 'open'
        return '<WebSocket %s %s %s>' % ('client' if self._client else 'server', self.path, state)


class WebSocket(_WebSocketBase):
    """One open websocket connection, the client's side: what SocketClient() returns.
    (A render handler written with `def` gets the server's side, with the same methods;
    an `async def` one gets them awaitable.)

      send(message)             str as a text message, bytes as a binary one
      recv(timeout=None)        the next message, str or bytes
      ping(data=None)           a threading.Event, set when the pong comes back
      close(code=1000, reason='')
      for message in ws: ...    messages until the connection closes normally
      with ws: ...              closes it on the way out

    send, ping and close may be called from any thread, also while another one waits in
    recv(); one thread receives at a time.  Attributes: path, query, headers, origin,
    subprotocol, compression, remote_address, closed, close_code, close_reason.  (The
    server's side also has drain() and buffered: it queues what it sends, this side does
    not.)

    send() writes to the socket in the calling thread: nothing is queued in the process,
    and a server that does not read makes it block, for 60 s at most in all (then the
    connection is dropped and it raises ConnectionClosed, 1006).
    """

    def __init__(self, sock: socket.socket, protocol: WebSocketProtocol, *, path: str = '/',
                 query: str = '', headers: Optional[Headers] = None,
                 subprotocol: Optional[str] = None, remote_address: Optional[Any] = None,
                 leftover: bytes = b'', ping_interval: Optional[float] = _WS_PING_INTERVAL,
                 ping_timeout: Optional[float] = _WS_PING_TIMEOUT,
                 close_timeout: float = _WS_CLOSE_TIMEOUT) -> None:
        import collections
        self.path = path
        self.query = query
        self.headers = headers or {}
        self.origin = self.headers.get('origin')
        self.subprotocol = subprotocol
        self.remote_address = remote_address
        self.close_timeout = close_timeout
        self._sock = sock
        self._proto = protocol
        self._client = protocol.client
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._proto_lock = threading.Lock()
        self._messages = collections.deque()
        self._closed = None                     # the ConnectionClosed to raise, once closed
        self._eof = False
        self._done = threading.Event()          # set once the socket is closed
        self._pings = {}                        # payload -> Event, oldest first
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        now = time.monotonic()
        self._next_ping = now + ping_interval if ping_interval else None
        self._pong_deadline = None
        self._rbuf = bytearray(_WS_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._ssl = hasattr(sock, 'pending')
        try:
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        except (ImportError, AttributeError):   # Windows has no poll()
            self._poller = None
        sock.settimeout(_WS_WRITE_TIMEOUT)
        if leftover:
            self._feed(leftover)

    # -- receiving ----------------------------------------------------------------------------

    def recv(self, timeout: Optional[float] = None) -> Message:
        """Return the next message: str for text, bytes for binary.

        Messages that arrived before the close are still returned; after them it raises
        ConnectionClosed (.code, .reason say why).  Raises WebSocketTimeout when `timeout`
        seconds pass with no message; the connection stays usable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._read_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise WebSocketTimeout('no websocket message within %s s' % timeout)
        try:
            while not self._messages:
                if self._closed is not None:
                    raise self._closed
                if self._proto.pending:
                    self._pump()
                else:
                    self._read_once(deadline)
            return self._messages.popleft()
        finally:
            self._read_lock.release()

    def _read_once(self, deadline):
        """Wait for bytes (sending keep-alive pings meanwhile), then feed them to the protocol.
        Raises WebSocketTimeout at `deadline`."""
        now = time.monotonic()
        wake = deadline
        for t in (self._next_ping, self._pong_deadline):
            if t is not None and (wake is None or t < wake):
                wake = t
        if not self._wait_readable(None if wake is None else wake - now):
            now = time.monotonic()
            if self._pong_deadline is not None and now >= self._pong_deadline:
                log.info('websocket %s: no pong within %s s, dropping the peer',
                         self.path, self._ping_timeout)
                self._fail(CloseCode.INTERNAL_ERROR, 'keepalive ping timeout')
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._close_socket()
                return
            if self._next_ping is not None and now >= self._next_ping:
                self._send_keepalive(now)
            if deadline is not None and now >= deadline:
                raise WebSocketTimeout('no websocket message in time')
            return
        try:
            n = self._sock.recv_into(self._rbuf)
        except OSError:         # reset, or closed under us by stop(): the stream has ended
            n = 0
        self._feed(self._rview[:n] if n else b'')

    def _wait_readable(self, timeout):
        if timeout is not None and timeout < 0:
            timeout = 0
        if self._ssl and self._sock.pending():
            return True
        if self._poller is not None:
            try:
                ready = self._poller.poll(None if timeout is None else int(timeout * 1000 + 0.999))
            except OSError:
                return True     # let recv_into() report what went wrong
            return bool(ready)
        try:
            return bool(select.select([self._sock], [], [], timeout)[0])
        except (OSError, ValueError):
            return True

    def _feed(self, data):
        if not data:
            self._eof = True
        with self._proto_lock:
            self._proto.receive_data(data)
        self._pump()

    def _pump(self):
        with self._proto_lock:
            events = self._proto.events()
            flush = bool(self._proto._out)
        if flush:
            self._flush()
        for opcode, value in events:
            if opcode == Opcode.TEXT or opcode == Opcode.BINARY:
                self._messages.append(value)
            elif opcode == Opcode.PONG:
                self._got_pong(value)
            elif opcode == Opcode.CLOSE:
                self._closed = ConnectionClosed(self._proto.close_rcvd, self._proto.close_sent)
                self._teardown()

    def _teardown(self):
        """The websocket is closed: end the TCP connection.  RFC 6455 7.1.1: the server
        closes it first; the client waits for that.  Either way, what is still in flight is
        read and dropped, so that closing never turns into a reset that loses our close frame."""
        if not self._client:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + self.close_timeout
        while not self._eof and self._wait_readable(deadline - time.monotonic()):
            try:
                if not self._sock.recv_into(self._rbuf):
                    break
            except OSError:
                break
        self._close_socket()

    def _close_socket(self):
        try:
            self._sock.close()
        except OSError:
            pass
        self._done.set()
        for event in self._pings.values():
            event.set()
        self._pings.clear()

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: Union[str, bytes, bytearray, memoryview]) -> None:
        """Send a message: str as text, bytes-like as binary (one write per frame).
        Raises ConnectionClosed once the connection is closing or closed, TypeError for any
        other type."""
        with self._write_lock:
            with self._proto_lock:
                self._proto.send(message)
                out = self._proto.data_to_send()
            self._write(out)

    def _write(self, data):
        # Called with _write_lock held: the protocol's queue and the socket stay in one order.
        try:
            self._sock.sendall(data)
        except OSError:
            with self._proto_lock:
                self._proto.receive_data(b'')
                self._proto.events()
            if self._closed is None:
                self._closed = ConnectionClosed(self._proto.close_rcvd, None)
            self._abort()
            raise self._closed from None

    def _flush(self):
        with self._write_lock:
            with self._proto_lock:
                out = self._proto.data_to_send()
            if out:
                try:
                    self._write(out)
                except ConnectionClosed:
                    pass

    def ping(self, data: Optional[bytes] = None) -> threading.Event:
        """Send a ping; return a threading.Event that is set when its pong arrives (pongs are
        read while some thread is in recv() or close()).  `data` (at most 125 bytes)
        defaults to 4 random bytes.  Raises ConnectionClosed when closing or closed."""
        data = os.urandom(4) if data is None else bytes(data)
        with self._write_lock:
            with self._proto_lock:
                self._proto.ping(data)
                out = self._proto.data_to_send()
                event = self._pings.setdefault(data, threading.Event())
            self._write(out)
        return event

    def _send_keepalive(self, now):
        self._next_ping = now + self._ping_interval
        try:
            self.ping()
        except ConnectionClosed:
            return
        if self._pong_deadline is None and self._ping_timeout:
            self._pong_deadline = now + self._ping_timeout

    def _got_pong(self, data):
        # RFC 6455 5.5.3: a pong answers the most recent ping, so it settles the older ones
        # too.  A pong nobody asked for is fine (a heartbeat) and ignored.
        with self._proto_lock:
            if data not in self._pings:
                return
            for payload in list(self._pings):
                self._pings.pop(payload).set()
                if payload == data:
                    break
        self._pong_deadline = None

    # -- closing ------------------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL, reason: str = '') -> None:
        """Close the connection: send a close frame, wait up to close_timeout for the peer's
        answer, then end the TCP connection.  Does nothing more when already closed.  Raises
        ValueError for a code that may not be sent (1005, 1006, 1015, ...) or a reason over
        123 bytes."""
        _ws_close_payload(code, reason)
        self._start_close(code, reason)
        if self._read_lock.acquire(timeout=self.close_timeout):
            try:
                deadline = time.monotonic() + self.close_timeout
                while self._closed is None and time.monotonic() < deadline:
                    try:
                        if self._proto.pending:
                            self._pump()
                        else:
                            self._read_once(deadline)
                    except WebSocketTimeout:
                        break
            finally:
                self._read_lock.release()
        if not self._done.is_set():
            self._abort()

    def _start_close(self, code, reason='', lock_timeout=None):
        """Send our close frame without waiting for the answer; False if the socket could
        not be written within `lock_timeout`."""
        if not self._write_lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout):
            return False
        try:
            with self._proto_lock:
                self._proto.close(code, reason)
                out = self._proto.data_to_send()
            if out:
                try:
                    self._write(out)
                except ConnectionClosed:
                    pass
        finally:
            self._write_lock.release()
        return True

    def _fail(self, code, reason=''):
        with self._proto_lock:
            self._proto.fail(code, reason)
            self._proto.events()
            if self._closed is None:
                self._closed = ConnectionClosed(None, self._proto.close_sent)
        self._flush()

    def _abort(self):
        """End the TCP connection now, without (more of) a closing handshake; a thread
        blocked reading it wakes up and sees the end of the stream."""
        if self._closed is None:
            self._closed = ConnectionClosed(self._proto.close_rcvd, self._proto.close_sent)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._read_lock.acquire(blocking=False):
            try:
                self._close_socket()
            finally:
                self._read_lock.release()


def _ws_read_head(sock, http, deadline):
    """Feed `http` (an HTTPConnection) from `sock` until it has a head, and return that
    event (or CLOSED).  Raises HTTPError for a head it refuses, OSError (socket.timeout)
    when the peer is too slow or leaves."""
    while True:
        event = http.next_event()
        if event is not NEED_DATA:
            return event
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout('handshake timeout')
        sock.settimeout(remaining)
        http.receive_data(sock.recv(4096))


def _ws_split_url(url):
    """(secure, host, port, target, host_header) of a ws:// or wss:// URL (ws:// assumed)."""
    from urllib.parse import urlsplit
    if '://' not in url:
        url = 'ws://' + url
    parts = urlsplit(url)
    if parts.scheme not in ('ws', 'wss'):
        raise ValueError('a websocket URL starts with ws:// or wss://, not %r' % url)
    secure = parts.scheme == 'wss'
    host = parts.hostname or 'localhost'
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError('the port of %r is not a number from 0 to 65535' % url) from None
    target = (parts.path or '/') + ('?' + parts.query if parts.query else '')
    return secure, host, port, target, host_header(host, port, secure)


def _ws_connect(url, *, timeout=_WS_HANDSHAKE_TIMEOUT, subprotocols=None, origin=None,
                headers=None, ssl_context=None, max_size=_WS_MAX_SIZE, max_frame_size=None,
                max_frames=None, ping_interval=_WS_PING_INTERVAL,
                ping_timeout=_WS_PING_TIMEOUT, close_timeout=_WS_CLOSE_TIMEOUT, secretKey=None,
                compression='deflate'):
    _ws_check_compression(compression)
    secure, host, port, target, host_field = _ws_split_url(url)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout)
    except socket.timeout:
        raise WebSocketTimeout('no answer from %s:%d within %s s' % (host, port, timeout)) from None
    except OSError as exc:
        raise Unreachable('cannot connect to %s:%d: %s' % (host, port, exc)) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            import ssl
            context = ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode('ascii')
        http = HTTPConnection(client=True, max_head=_WS_MAX_HEAD)
        fields = _ws_client_headers(host_field, key, subprotocols, origin, headers, compression)
        if secretKey:
            fields += sign_request(secretKey, 'GET', target, b'', headers=fields)
        sock.sendall(http.send_request('GET', target, fields))
        head = _ws_read_head(sock, http, deadline)
        if head is CLOSED:
            raise ConnectionResetError('the server closed the connection during the handshake')
        chosen, deflate = _ws_check_response(head, key, target, subprotocols, compression)
        leftover = http.trailing_data[0]
    except HTTPError as exc:
        sock.close()
        raise HandshakeError(0, 'the answer is not HTTP: %s' % exc.message,
                             target.partition('?')[0]) from None
    except socket.timeout:
        sock.close()
        raise WebSocketTimeout('websocket handshake with %s took over %s s' % (url, timeout)) from None
    except (OSError, ValueError) as exc:
        sock.close()
        raise NetworkError('websocket handshake with %s failed: %s' % (url, exc)) from None
    except BaseException:
        sock.close()
        raise
    from urllib.parse import unquote
    raw_path, _, query = target.partition('?')
    protocol = WebSocketProtocol(True, max_size, max_frame_size, max_frames, deflate)
    return WebSocket(sock, protocol, path=unquote(raw_path), query=query, subprotocol=chosen,
                     remote_address=sock.getpeername()[:2], leftover=leftover,
                     ping_interval=ping_interval, ping_timeout=ping_timeout,
                     close_timeout=close_timeout)


def SocketClient(host: str = 'localhost:8765', url: str = '/', **options: Any) -> WebSocket:
    """Open a websocket connection to ws://HOST{url} and return it (a WebSocket).

    `host` is 'HOST:PORT' as in 0.3.7, or a whole ws:// or wss:// URL (then `url`, when not
    '/', is appended to it).  Options: timeout (for the TCP connection and the handshake,
    10 s), subprotocols, origin, headers (extra request headers), ssl_context (for wss://),
    max_size, max_frame_size, max_frames, ping_interval, ping_timeout, close_timeout,
    secretKey (sign the handshake for a SocketServer that has one), compression ('deflate',
    the default: offer permessage-deflate, RFC 7692; None: offer no extension).

    Raises Unreachable when nothing accepts the TCP connection, HandshakeError when the
    server refuses the upgrade (.status, e.g. 404, and .path), WebSocketTimeout when the
    handshake takes too long."""
    if '://' in host:
        address = host.rstrip('/') + url if url != '/' else host
    else:
        address = 'ws://%s%s' % (host, url if url.startswith('/') else '/' + url)
    return _ws_connect(address, **options)


def _ws_command(url, timeout=None):
    """python -m mconnector ws URL: send each line read from stdin as a text message, print
    each message received (binary ones as their repr).  After the end of stdin, wait until
    the connection has been quiet for `timeout` seconds (default 1) so that pending replies
    are printed, then close.  Returns the exit code: 0 for a normal close, 1 otherwise."""
    quiet = 1.0 if timeout is None else timeout
    try:
        conn = _ws_connect(url, **({} if timeout is None else {'timeout': max(timeout, 1.0)}))
    except (WebSocketError, NetworkError, ValueError) as exc:
        print('mconnector: %s' % exc, file=sys.stderr)
        return 1
    done = threading.Event()
    activity = [time.monotonic()]

    def pump():
        try:
            for line in sys.stdin:
                conn.send(line.rstrip('\r\n'))
                activity[0] = time.monotonic()
        except (ConnectionClosed, OSError, ValueError):
            pass
        done.set()

    threading.Thread(target=pump, name='mconnector-ws-stdin', daemon=True).start()
    try:
        while True:
            wait = quiet if not done.is_set() else activity[0] + quiet - time.monotonic()
            if done.is_set() and wait <= 0:
                conn.close()
                break
            try:
                message = conn.recv(timeout=max(wait, 0.01))
            except WebSocketTimeout:
                continue
            activity[0] = time.monotonic()
            print(message if isinstance(message, str) else repr(message), flush=True)
    except ConnectionClosed as exc:
        if not exc.ok:
            print('mconnector: %s' % exc, file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        conn.close()
        return 130
    return 0 if conn.close_code in (CloseCode.NORMAL, CloseCode.GOING_AWAY) else 1


# ###########################################################################################
# 9. Serving shell: one selector loop, workers, deadlines, TLS, graceful stop, signals
# ###########################################################################################

# The listener and the websocket server are served by the same shell.  One thread runs a
# selector loop that owns every socket: it accepts, does TLS handshakes without blocking,
# feeds the bytes it reads to the protocol cores (sections 4 and 5), writes what they and
# the handlers queued, and keeps each connection's deadline.  A bounded pool of worker
# threads runs handlers only, so a connection costs a worker while its function runs, and
# never while it is idle, trickles its request in, or is slow to read its answer.  `async
# def` functions run on the shared asyncio loop (section 1) and hold no worker.

_TICK = 0.5                 # how often deadlines are checked
_RECV = 65536
_BACKLOG = 1024             # the listen backlog: bursts wait in the kernel
_HIGH_WATER = 262144        # bytes queued for a slow reader before its producer waits
_HOLD = 0.002               # a worker that has answered waits this long for the next request
_LINGER = 2.0               # after our last byte, what the peer still sends is read (and
                            # dropped) this long, so that closing does not reset the answer
# CPython 3.12.0 and 3.12.1 refuse to start threads once the main thread has ended
# (gh-113964), which is when a script that only called SocketServer.run() serves: there,
# the threads a server may need are started with it.
_PRESTART = sys.version_info[:3] in ((3, 12, 0), (3, 12, 1))


class _Workers:
    """At most `size` threads running tasks in the order submitted; submit() never blocks.
    Threads start when a task would otherwise wait, and stay."""

    def __init__(self, name, size):
        self.name = name
        self.size = size
        self._tasks = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._waiting = 0

    def prestart(self):
        if _PRESTART:
            with self._lock:
                missing, self._threads = self.size - self._threads, self.size
            for _ in range(missing):
                self._start()

    def waiting(self):
        """How many tasks wait for a thread."""
        return max(0, self._waiting - self._idle)

    def submit(self, fn, *args):
        self._tasks.put((fn, args))
        with self._lock:
            # Counted against the idle threads with the tasks already waiting: an idle
            # thread may be about to take an earlier one.
            self._waiting += 1
            start = self._waiting > self._idle and self._threads < self.size
            if start:
                self._threads += 1
        if start:
            self._start()

    def _start(self):
        try:
            threading.Thread(target=self._run, daemon=True,
                             name='%s-%d' % (self.name, self._threads)).start()
        except RuntimeError:        # at interpreter shutdown: the running threads serve
            with self._lock:
                self._threads -= 1

    def _run(self):
        while True:
            with self._lock:
                self._idle += 1
            task = self._tasks.get()
            with self._lock:
                self._idle -= 1
                if task is None:
                    self._threads -= 1
                    return
                self._waiting -= 1
            fn, args = task
            try:
                fn(*args)
            except Exception:
                log.exception('%s: a task failed', self.name)

    def close(self):
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._tasks.put(None)


class _Server:
    """One serving shell: a listening socket, the selector loop that owns it and every
    connection accepted from it, the workers, and the graceful stop.

    `session(conn)` makes the object that speaks the protocol of a new connection (see
    _HTTPSession and _WsHandshake).  serve_forever() runs the loop until stop(), then
    closes the listening socket (connecting is refused from then on) and returns;
    close_all(grace) goes on serving the connections still busy, for `grace` seconds at
    most, then closes them all.  stop() and hurry() are safe in signal handlers.
    """

    def __init__(self, name, sock, session, max_workers, ssl_context=None,
                 handshake_timeout=10.0, write_timeout=60.0):
        sock.setblocking(False)
        self.name = name
        self.socket = sock
        self.server_address = sock.getsockname()
        self.session = session
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.write_timeout = write_timeout      # a reader that takes no byte this long is gone
        self.workers = _Workers('mconnector-' + name, max_workers)
        self.connections = set()
        self.accepted = 0
        self.keep_backlog = False               # on stop, leave waiting connections queued
        self.stopping = False
        self.hurried = False
        import collections
        self._calls = collections.deque()       # (fn, args) for the loop's thread to run
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector.register(sock, selectors.EVENT_READ, self)
        self._listening = True
        self._next_tick = 0.0
        self._sleeping = False
        self._recv_view = memoryview(bytearray(_RECV))

    def call_soon(self, fn, *args):
        """Run fn(*args) in the loop's thread, soon; from any thread."""
        self._calls.append((fn, args))
        if self._sleeping:              # (a busy loop looks at its calls anyway)
            self.wake()

    def defer(self, fn, *args):
        """call_soon() from the loop's own thread: no need to wake it."""
        self._calls.append((fn, args))

    def wake(self):
        try:
            self._wake_w.send(b'x')
        except OSError:     # full (a wake-up is pending anyway) or closed
            pass

    def stop(self):
        self.stopping = True
        self.wake()

    def hurry(self):
        """End the wait for what is in flight (a second Ctrl+C)."""
        self.hurried = True
        self.stop()

    # -- the loop -----------------------------------------------------------------------------

    def serve_forever(self):
        try:
            while not self.stopping:
                self._run_once(time.monotonic() + _TICK)
        finally:
            self._stop_listening()

    def close_all(self, grace=0.0):
        """Serve the connections still at work (a request, an answer, a closing handshake)
        for up to `grace` seconds, then close every one.  Returns the number of requests
        cut short."""
        self._stop_listening()
        deadline = time.monotonic() + grace
        while not self.hurried and any(conn.busy() for conn in self.connections):
            now = time.monotonic()
            if now >= deadline:
                break
            self._run_once(min(deadline, now + _TICK))
        # A connection whose answer is all sent holds no request, even while the worker
        # that wrote it waits for the next one (_HTTPSession._hold).
        cut = sum(1 for conn in self.connections if conn.busy() and
                  (conn.out or not getattr(conn.session, 'answered', False)))
        for conn in list(self.connections):
            conn.close()
        while self._calls:          # what the closing scheduled (ends of handlers)
            self._run_calls()
        self.workers.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        return cut

    def _run_once(self, until):
        # _sleeping is set before _calls is looked at: a call added after that look
        # finds it set, and wakes the select.
        self._sleeping = True
        timeout = 0 if self._calls else max(0.0, until - time.monotonic())
        ready = self._selector.select(timeout)
        self._sleeping = False
        for key, mask in ready:
            conn = key.data
            if conn is None:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            elif conn is self:
                self._accept()
            else:
                try:
                    if mask & selectors.EVENT_READ:
                        conn.on_readable()
                    if mask & selectors.EVENT_WRITE and not conn.closed:
                        conn.on_writable()
                except Exception:
                    log.exception('%s: error while serving %s', self.name, conn.address[0])
                    conn.close()
        self._run_calls()
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + _TICK
            for conn in list(self.connections):
                conn.tick(now)

    def _run_calls(self):
        for _ in range(len(self._calls)):
            fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception('%s: error in the serving loop', self.name)

    def _accept(self):
        for _ in range(64):         # a burst at a time, then the others get their turn
            try:
                # Non-blocking: several processes may share this socket (serve --workers),
                # and the one that loses the race for a connection must not wait.
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # out of file descriptors, say: try again later
                log.warning('%s: cannot accept: %s', self.name, exc)
                return
            self._adopt(sock, address)

    def _adopt(self, sock, address):
        self.accepted += 1
        try:
            _Conn(self, sock, address)
        except (OSError, ValueError) as exc:
            log.debug('%s: connection from %s dropped: %s', self.name, address[0], exc)
            sock.close()

    def _stop_listening(self):
        if not self._listening:
            return
        self._listening = False
        self._selector.unregister(self.socket)
        if not self.keep_backlog:
            # Connections the kernel completed before the stop were accepted: a request
            # they carry is answered.
            while True:
                try:
                    sock, address = self.socket.accept()
                except OSError:
                    break
                self._adopt(sock, address)
        self.socket.close()
        for conn in list(self.connections):
            conn.session.stop()


class _Conn:
    """One accepted connection: its socket (TLS done without blocking), the bytes waiting
    to be written, its deadline, and the session that speaks its protocol."""

    def __init__(self, server, sock, address):
        self.server = server
        self.address = address
        self.out = bytearray()
        self.deadline = None            # set by the session: when it gives up on the peer
        self.reading = True
        self.closed = False
        self.finishing = False          # close once `out` is written
        self.lingering = None           # ... then read and drop until this time
        self.progress = time.monotonic()    # of the last write
        self.received = self.sent = 0
        self.low_water = 0              # the session hears flushed() once `out` is this short
        self.mask = 0
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = server.ssl_context is not None
        self.want = selectors.EVENT_READ if self.tls else 0     # of the TLS handshake
        if self.tls:
            import ssl
            self._blocked = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                             ssl.SSLWantWriteError)
            sock = server.ssl_context.wrap_socket(sock, server_side=True,
                                                  do_handshake_on_connect=False)
            self.deadline = time.monotonic() + server.handshake_timeout
        else:
            self._blocked = (BlockingIOError, InterruptedError)
        self.sock = sock
        server.connections.add(self)
        self.session = server.session(self)
        if not self.tls:
            self.session.start()
        self._update()

    def busy(self):
        return self.lingering is None and not self.closed and self.session.busy()

    def _update(self):
        if self.closed:
            return
        if self.want:
            mask = self.want
        else:
            mask = selectors.EVENT_READ if self.reading or self.lingering is not None else 0
            if self.out:
                mask |= selectors.EVENT_WRITE
        if mask != self.mask:
            selector = self.server._selector
            if not self.mask:
                selector.register(self.sock, mask, self)
            elif not mask:
                selector.unregister(self.sock)
            else:
                selector.modify(self.sock, mask, self)
            self.mask = mask

    def pause(self):
        self.reading = False
        self._update()

    def resume(self):
        if not self.closed and not self.finishing:
            self.reading = True
            self._update()

    # -- events from the loop -----------------------------------------------------------------

    def on_readable(self):
        if self.want:
            return self._handshake()
        # Into the loop's one buffer, then copied at its size: recv(n) would allocate n bytes
        # and shrink them for every read, which leaves the heap fragmented by idle peers.
        view = self.server._recv_view
        while not self.closed and (self.reading or self.lingering is not None):
            try:
                data = bytes(view[:self.sock.recv_into(view)])
            except self._blocked:
                return
            except OSError:             # reset by the peer: as good as closed
                data = b''
            if self.lingering is not None:
                if not data:
                    self.close()
                continue
            self.received += len(data)
            self.session.received(data)
            if not data:
                return
            if len(data) < _RECV and not (self.tls and self.sock.pending()):
                return

    def on_writable(self):
        if self.want:
            return self._handshake()
        self.flush()

    def _handshake(self):
        import ssl
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            self.want = selectors.EVENT_WRITE
        except (OSError, ValueError) as exc:
            log.debug('%s: TLS handshake with %s failed: %s', self.server.name,
                      self.address[0], exc)
            if isinstance(exc, ssl.SSLError):
                self._refuse_plain_http()
            self.close()
            return
        else:
            self.want = 0
            self.deadline = None
            self.session.start()
            self._update()
            self.on_readable()          # what came with the handshake's last records
            return
        self._update()

    def _refuse_plain_http(self):
        """Answer, in plain HTTP, a plain HTTP request that came instead of a TLS
        handshake (as nginx does): its sender learns why, not just that it was reset."""
        sock = self.sock
        try:        # below the TLS layer; OpenSSL has read the first bytes, not the rest
            rest = socket.socket.recv(sock, _RECV)
        except OSError:
            return
        if not re.match(rb'[^\r\n]* HTTP/1\.[01]\r?\n', rest):
            return
        response = Response.error(400, 'BadRequest', 'this listener takes https://, not '
                                                     'http://')
        try:
            socket.socket.send(sock, _closing_response(response.status, response.headers,
                                                       response.body))
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError:
            pass

    def tick(self, now):
        if self.lingering is not None:
            if now >= self.lingering:
                self.close()
        elif self.out and now - self.progress > self.server.write_timeout:
            log.info('%s: dropping %s, it took no byte of its answer for %ss',
                     self.server.name, self.address[0], self.server.write_timeout)
            self.close()
        elif self.want:
            if now >= self.deadline:
                self.close()
        else:
            self.session.tick(now)

    # -- what sessions call -------------------------------------------------------------------

    def write(self, data):
        if data and not self.closed:
            if not self.out:
                self.progress = time.monotonic()
            self.out += data
            self.flush()

    def flush(self):
        out = self.out
        while out:
            try:
                if self.tls:            # a retried TLS write must offer the same bytes
                    sent = self.sock.send(bytes(out[:_HIGH_WATER]))
                else:
                    with memoryview(out) as view:
                        sent = self.sock.send(view[:_HIGH_WATER])
            except self._blocked:
                break
            except OSError:
                self.close()
                return
            del out[:sent]
            self.sent += sent
            self.progress = time.monotonic()
        if not out and self.finishing:
            self._linger()
            return
        if len(out) <= self.low_water:
            self.server.defer(self._flushed)
        self._update()

    def _flushed(self):
        if len(self.out) <= self.low_water and not self.closed:
            self.session.flushed()

    def finish(self):
        """Close once everything queued is written."""
        if self.closed or self.finishing:
            return
        self.finishing = True
        self.reading = False
        if self.out:
            self._update()
        else:
            self._linger()

    def _linger(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.lingering = time.monotonic() + _LINGER
        self._update()

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.mask:
            try:
                self.server._selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        try:
            # At once, even while a worker waits on the socket (which would delay the
            # close until it lets go): the peer must not send on a connection we left.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.connections.discard(self)
        session, self.session = self.session, None     # no cycle left for the collector
        session.lost()


class _HTTPSession:
    """The listener's side of one connection: requests read through the HTTP core, each
    answered by the Microservice's dispatch on a worker (or on the asyncio loop, for an
    async rule), answers written in order; streamed answers are produced on a worker a
    batch at a time, as the peer takes them."""

    def __init__(self, conn, service):
        self.conn = conn
        self.service = service
        self.http = HTTPConnection(max_body=service.max_body, keep_alive_timeout=service.timeout)
        self.head = None
        self.parts = []
        self.working = False            # from a whole request to the end of its answer
        self.started = None             # when the request being read began
        self.stream = None              # the iterator of a streamed answer
        self.producing = False          # a worker is taking the stream's next batch
        self.holding = False            # a worker waits for the next request (_hold)
        self.answered = False           # the answer written by a worker is all sent
        self.status = None
        self.begun = 0.0
        service.stats['connections'] += 1

    def start(self):
        self.conn.deadline = time.monotonic() + self.service.timeout

    def busy(self):
        return self.working or self.holding or self.started is not None

    def received(self, data):
        self.http.receive_data(data)
        if not self.working:
            self._advance()

    def _advance(self):
        conn, http = self.conn, self.http
        while not conn.closed:
            try:
                event = http.next_event()
            except HTTPError as exc:
                self.working = True
                self._refuse(exc)
                return
            if event is NEED_DATA:
                if http.expects_continue:       # curl waits a second for it over 1 KiB
                    conn.write(http.send_continue())
                if self.started is None and (self.head is not None or http.buffered()):
                    self._begin()
                return
            if type(event) is bytes:
                self.parts.append(event)
            elif event is END_OF_MESSAGE:
                parts, self.parts = self.parts, []
                body = parts[0] if len(parts) == 1 else b''.join(parts)
                del parts
                self.working = True
                conn.deadline = None            # the function may take its time
                conn.pause()                    # the worker may read the next request
                conn.server.workers.submit(self._handle, self.head, body)
                return
            elif event is CLOSED:
                conn.close()
                return
            elif event is PAUSED:
                return
            else:
                self.head = event
                self.answered = False
                self.begun = time.perf_counter()
                if self.started is None:
                    self._begin()

    def _refuse(self, exc):
        self.service._metrics.refused(self.head.method if self.head else None, exc.status)
        self._answer(Response.refusal(exc))

    def _begin(self):
        self.started = time.monotonic()
        self.conn.deadline = self.started + self.service.request_timeout

    def _handle(self, head, body):
        """On a worker: the answer.  A whole one, on a plain socket, is written from here
        at once rather than after waking the loop (which neither reads nor writes this
        connection meanwhile: it is paused); then the caller's next request, when it
        comes at once, is served here too (see _hold)."""
        while True:
            try:
                answer = self.service._handle(head.method, head.target, head.headers, body,
                                              defer=True, client=self.conn.address)
            except Exception:           # handle() answers everything a peer can send
                log.exception('%s: error while answering %s', self.service.name, head.target)
                answer = Response.error(500, 'InternalError', 'the listener failed: see its log')
            call_soon = self.conn.server.call_soon
            if isinstance(answer, _Deferred):
                answer.run(lambda response: call_soon(self._answer, response))
                return
            if type(answer.body) is not bytes or self.conn.tls or self.conn.out:
                call_soon(self._answer, answer)
                return
            if not self._write_now(answer):
                return
            request = self._hold()
            if request is None:
                call_soon(self._reopen)
                return
            if not request:                 # refused: the loop answers
                return
            head, body = request

    def _write_now(self, response):
        """Write a whole answer from the worker; True when the exchange is over and the
        connection stays open (else the loop has been told what to do)."""
        conn, http, server = self.conn, self.http, self.conn.server
        if server.stopping:
            http.close_after_response()
        data = http.send_response(response.status, response.headers, response.body)
        self.status = response.status
        self.answered = True            # before the peer can have it and ask for a stop
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            server.call_soon(conn.close)
            return False
        conn.sent += sent
        if sent < len(data):            # the rest when the peer takes it; then _done
            self.answered = False
            server.call_soon(conn.write, data[sent:])
            return False
        if not http.keep_alive or server.stopping:
            server.call_soon(self._done)
            return False
        self._count()
        http.start_next_cycle()
        return True

    def _hold(self):
        """On the worker that has just answered: the next request, when the caller sends
        it within _HOLD seconds and it arrives whole, as (head, body); else None, and
        the loop takes the connection back (with what arrived); () when the loop has
        been told to refuse what arrived.  No worker is held while others wait for one."""
        conn, http, server = self.conn, self.http, self.conn.server
        if server.stopping or server.workers.waiting():
            return None
        self.holding = True             # busy: a stop waits for the hold to end
        try:
            if not _readable(conn.sock, _HOLD):
                return None
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return None
        except (OSError, ValueError):
            data = b''
        finally:
            self.holding = False
        conn.received += len(data)
        http.receive_data(data)
        parts = []
        self.working = True             # (busy still, while what came is looked at)
        while data:
            try:
                event = http.next_event()
            except HTTPError as exc:    # answered from the loop
                self.parts = parts
                self.working = True
                server.call_soon(self._refuse, exc)
                return ()
            if type(event) is RequestHead:
                self.head = event
                self.answered = False
                self.begun = time.perf_counter()
            elif type(event) is bytes:
                parts.append(event)
            elif event is END_OF_MESSAGE:
                return self.head, parts[0] if len(parts) == 1 else b''.join(parts)
            else:
                break
        self.parts = parts
        self.working = False
        return None

    def _reopen(self):
        """In the loop: a connection back from a worker, its next request to be read."""
        conn = self.conn
        if conn.closed:
            return
        conn.deadline = time.monotonic() + self.service.timeout
        conn.resume()
        self._advance()
        if conn.server.stopping and not conn.closed:
            self.stop()

    def _answer(self, response):
        conn, http = self.conn, self.http
        if conn.closed:
            _close_stream(response.body)
            return
        if conn.server.stopping:
            http.close_after_response()     # a request sent after this one would be lost
        self.status = response.status
        body = response.body
        if isinstance(body, (bytes, bytearray)):
            conn.write(http.send_response(response.status, response.headers, body))
            self.answered = True
            return
        conn.write(http.send_response(response.status, response.headers, None))
        if not http.sends_body:
            _close_stream(body)
            conn.write(http.send_end())
            self.answered = True
            return
        self.stream = iter(body)
        self.producing = True
        conn.server.workers.submit(self._produce, self.stream)

    def _produce(self, stream):
        """On a worker: the next batch of a streamed answer, up to _HIGH_WATER bytes."""
        batch, size, end = [], 0, False
        try:
            while size < _HIGH_WATER:
                data = next(stream)
                if data:
                    batch.append(data)
                    size += len(data)
        except StopIteration:
            end = True
        except Exception as exc:        # a generator that failed halfway: cut the stream
            log.warning('stream failed: %s: %s', type(exc).__name__, exc)
            end = None
        self.conn.server.call_soon(self._stream_batch, batch, end)

    def _stream_batch(self, batch, end):
        conn, http = self.conn, self.http
        self.producing = False
        if conn.closed:
            _close_stream(self.stream)
            return
        data = b''.join([http.send_data(piece) for piece in batch])
        if end is None:
            self.stream = None
            http.close_after_response()
            conn.write(data)
            conn.finish()
            self.working = False
            return
        if end:
            self.stream = None
            data += http.send_end()
            self.answered = True
        conn.write(data)

    def flushed(self):
        if self.stream is not None:
            if not self.producing:      # the peer took the last batch: the next one
                self.producing = True
                self.conn.server.workers.submit(self._produce, self.stream)
        elif self.working and self.status is not None:
            self._done()

    def _count(self):
        """An exchange is over: counted, logged, forgotten."""
        conn, service = self.conn, self.service
        sent = conn.sent
        service._metrics.transferred(conn.received, sent)
        conn.received = conn.sent = 0
        if service.debug and self.head is not None:
            trace = _TRACEPARENT.match(self.head.headers.get('traceparent', ''))
            access_log.info('%s %s "%s %s" %d %d bytes %.1f ms trace=%s', service.name,
                            conn.address[0], self.head.method, self.head.target, self.status,
                            sent, (time.perf_counter() - self.begun) * 1000,
                            trace.group(1) if trace else '-')
        self.working = False
        self.status = self.head = self.started = None

    def _done(self):
        self._count()
        if not self.http.keep_alive or self.conn.server.stopping:
            self.conn.finish()
            return
        self.http.start_next_cycle()
        self._reopen()

    def tick(self, now):
        deadline = self.conn.deadline
        if deadline is None or now < deadline:
            return
        if self.started is None:
            self.conn.close()           # idle for `timeout` seconds
            return
        log.info('%s: dropping %s, request not in within %ss', self.service.name,
                 self.conn.address[0], self.service.request_timeout)
        self.service._metrics.refused(self.head.method if self.head else None, 408)
        self.working = True
        self.conn.deadline = None
        self.http.close_after_response()
        self._answer(Response.refusal(HTTPError(
            408, 'request not in within %ss' % self.service.request_timeout)))

    def stop(self):
        # Idle when the stop begins: closed, unless its next request is already here.
        if not self.conn.closed and not self.busy() and not self.http.buffered() \
                and not _readable(self.conn.sock):
            self.conn.close()

    def lost(self):
        if self.stream is not None:
            _close_stream(self.stream)


def _close_stream(body):
    close = getattr(body, 'close', None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


class _WsHandshake:
    """A websocket server's side of a new connection, until its opening handshake is done:
    then the connection's session becomes a _ServerWebSocket."""

    def __init__(self, conn, app):
        self.conn = conn
        self.app = app
        self.http = HTTPConnection(max_head=_WS_MAX_HEAD, length_required=())

    def start(self):
        self.conn.deadline = time.monotonic() + self.app.handshake_timeout

    def busy(self):
        return False

    def received(self, data):
        conn, app = self.conn, self.app
        self.http.receive_data(data)
        try:
            head = self.http.next_event()
            if head is NEED_DATA:
                return
            if head is CLOSED:
                conn.close()
                return
            request = _ws_check_request(head, app.subprotocols, app.origins, app.compression)
            if app.secretKey:
                try:
                    verify_request(app.secretKey, 'GET', request.target, request.headers, b'',
                                   _replay_cache(app))
                except HTTPError as exc:
                    raise HandshakeError(exc.status, exc.message, request.path) from None
            target, params = app.routes.find(request.path)
            if target is None:
                raise HandshakeError(404, 'no websocket route for %s' % request.path,
                                     request.path)
            if conn.server.stopping:
                raise HandshakeError(503, 'the server is stopping', request.path)
        except Exception as exc:
            if isinstance(exc, HTTPError):
                exc = HandshakeError(exc.status, exc.message)
            elif not isinstance(exc, HandshakeError):   # answered all the same, and logged
                log.exception('%s: websocket handshake failed', conn.address[0])
                exc = HandshakeError(500, 'the server failed: see its log')
            log.info('%s: %s', conn.address[0], exc)
            conn.write(_ws_error_response(exc))
            conn.finish()
            return
        conn.write(_ws_accept_response(request))
        conn.deadline = None
        ws = _ServerWebSocket(conn, app, request, target[0], target[1],
                              tuple(params.values()), target[2])
        conn.session = ws
        leftover = self.http.trailing_data[0]
        if leftover:
            ws.received(leftover)

    def tick(self, now):
        if now >= self.conn.deadline:
            log.debug('websocket handshake from %s dropped: too slow', self.conn.address[0])
            self.conn.close()

    def stop(self):
        self.conn.close()

    def flushed(self):
        pass

    def lost(self):
        pass


class _ServerWebSocket(_WebSocketBase):
    """The server side of one websocket connection.  The loop drives it (received, tick,
    flushed, lost); handlers use it from workers (send, recv, ping, close: what a `def`
    render handler gets) or from the asyncio loop through _AsyncWebSocket.  Router
    handlers run on a worker per message, in order; `async def` ones on the asyncio loop.
    """

    _client = False

    def __init__(self, conn, app, request, handler, render, args, rule=None):
        import collections
        self.conn = conn
        self.app = app
        self.request = RequestContext('GET', request.target, request.path, rule,
                                      request.headers, conn.address, app._trusted)
        self.path = request.path
        self.query = request.query
        self.headers = request.headers
        self.origin = request.origin
        self.subprotocol = request.subprotocol
        self.remote_address = conn.address[:2]
        self.close_timeout = app.close_timeout
        self._proto = WebSocketProtocol(False, app.max_size, app.max_frame_size, app.max_frames,
                                        request.deflate)
        self._cond = threading.Condition()      # guards what both sides touch
        self._messages = collections.deque()
        self._closed = None                     # the ConnectionClosed to raise, once closed
        self._done = False                      # the TCP connection is closed
        self._wakers = []                       # asyncio futures of waiting coroutines
        self._pings = {}                        # payload -> Event, oldest first
        self._flushing = False                  # a flush is scheduled in the loop
        self._handler, self._render, self._args = handler, render, args
        self._async = _is_coroutine_function(handler)
        self._running = False                   # a router's turn, or a `def` render handler
        self._started = False                   # the render handler was started
        self._outstanding = False               # a message the handler has not taken
        self._task = None                       # the asyncio future of an async handler
        self._close_by = None                   # when the closing handshake is given up
        now = time.monotonic()
        self._next_ping = now + app.ping_interval if app.ping_interval else None
        self._pong_deadline = None
        # Flow control: the limits in force when the connection opened.
        self._high, self._low = app._write_marks
        self._hard = app._write_hard_limit
        conn.low_water = self._low
        self._drainers = 0                      # threads in send() or drain() waiting for room
        # Set by the loop once a write leaves more than write_limit waiting, cleared when
        # the queue is down to the low-water mark: what broadcast() goes by.  (conn.out,
        # read from another thread, may still hold bytes the kernel took a moment ago.)
        self._behind = False
        # Where each write queued in conn.out ends (counted as conn.sent counts), so that
        # a peer cast off keeps whole frames only: the loop's thread alone touches it.
        # Made when first needed (an empty deque is 600 bytes; most peers never lag).
        self._marks = None
        if conn.out:                            # the 101 answer, not taken yet
            self._marks = collections.deque((conn.sent + len(conn.out),))
        app.connections.add(self)

    # -- from the loop ------------------------------------------------------------------------

    def start(self):
        pass

    def busy(self):
        return not self._done

    def received(self, data):
        with self._cond:
            self._proto.receive_data(data)
        self._pump()

    def _pump(self):
        # The protocol gives one message at a time (see WebSocketProtocol): the next is
        # taken once the handler has taken this one (a router's: once it has answered
        # it), so that what follows a message, a close frame say, waits its turn; reading
        # pauses meanwhile.
        conn = self.conn
        while not conn.closed and not self._outstanding:
            with self._cond:
                events = self._proto.events()
                out = self._proto.data_to_send()
                more = self._proto.pending
            self._write(out)
            for opcode, value in events:
                if opcode == Opcode.TEXT or opcode == Opcode.BINARY:
                    self._deliver(value)
                elif opcode == Opcode.PONG:
                    self._got_pong(value)
                elif opcode == Opcode.CLOSE:
                    self._set_closed()
                    # RFC 6455 7.1.1: the server ends the TCP connection first.
                    conn.finish()
            if not more:
                break
        if self._outstanding and conn.reading:
            conn.pause()

    def _deliver(self, message):
        if self._render and not self._started:
            self._started = True
            self._start_handler(message)        # it has the message: the next may come
            return
        self._outstanding = True
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()
            self._wake_coroutines()
            start = not self._render and not self._running
            if start:
                self._running = True
        if start:
            self._start_router()

    def _took(self):
        """The handler has taken its message (a router: has answered it): the next one."""
        self.conn.server.call_soon(self._resume)

    def _resume(self):
        self._outstanding = False
        conn = self.conn
        if not conn.closed and not conn.finishing:
            conn.resume()
            self._pump()

    def tick(self, now):
        if self._close_by is not None and now >= self._close_by:
            self.conn.close()               # the peer never finished the closing handshake
        elif self._outstanding:
            return                          # not reading while a handler is busy
        elif self._pong_deadline is not None and now >= self._pong_deadline:
            log.info('websocket %s: no pong within %s s, dropping the peer', self.path,
                     self.app.ping_timeout)
            self._fail(CloseCode.INTERNAL_ERROR, 'keepalive ping timeout')
            self.conn.close()
        elif self._next_ping is not None and now >= self._next_ping:
            self._next_ping = now + self.app.ping_interval
            try:
                self.ping()
            except ConnectionClosed:
                return
            if self._pong_deadline is None and self.app.ping_timeout:
                self._pong_deadline = now + self.app.ping_timeout

    def flushed(self):
        self._behind = False
        # (Read without the lock: a waiter counts itself, under it, before it looks at the
        # queue, so either it sees the queue short already or this sees it waiting.)
        if self._drainers or self._wakers:
            with self._cond:
                self._cond.notify_all()     # senders waiting for room
                self._wake_coroutines()

    def stop(self):
        self._start_close(CloseCode.GOING_AWAY, 'server shutting down')
        if self._task is not None:
            self._task.cancel()

    def lost(self):
        self._done = True
        self._set_closed()
        self.app.connections.discard(self)
        self.conn.out = bytearray()         # what a lost peer never took is freed at once
        self._marks = None
        with self._cond:
            self._proto.data_to_send()
        if self._task is not None:
            self._task.cancel()

    def _set_closed(self):
        with self._cond:
            if self._closed is None:
                self._closed = ConnectionClosed(self._proto.close_rcvd, self._proto.close_sent)
            self._cond.notify_all()
            self._wake_coroutines()
            pings, self._pings = self._pings, {}
        for event in pings.values():
            event.set()

    def _wake_coroutines(self):
        # (with _cond held) the waiting coroutines look again.
        wakers, self._wakers = self._wakers, []
        for future in wakers:
            future.get_loop().call_soon_threadsafe(_ws_wake, future)

    def _flush(self):
        with self._cond:
            self._flushing = False
            out = self._proto.data_to_send()
        self._write(out)

    def _write(self, data):
        """In the loop: queue whole frames on the connection, unless it has more than
        write_hard_limit bytes waiting already behind the write the peer is taking (one big
        message is no reason): then the peer is cast off (1008)."""
        conn = self.conn
        if not data or conn.closed:
            return
        if len(conn.out) > self._hard and self._queued_behind_head() > self._hard:
            log.info('websocket %s: %s lets over %d bytes wait, closing it (1008)',
                     self.path, conn.address[0], self._hard)
            self._cast_off(CloseCode.POLICY_VIOLATION, 'too much data left unread')
            return
        conn.write(data)
        if conn.out:
            if len(conn.out) > self._high:
                self._behind = True
            marks = self._marks
            if marks is None:
                import collections
                marks = self._marks = collections.deque()
            while marks and marks[0] <= conn.sent:
                marks.popleft()
            marks.append(conn.sent + len(conn.out))

    def _queued_behind_head(self):
        """In the loop: the bytes queued behind the write the peer is in the middle of."""
        conn = self.conn
        for end in self._marks or ():
            if end > conn.sent:
                return conn.sent + len(conn.out) - end
        return 0

    def _cast_off(self, code, reason):
        """In the loop: close a peer that falls behind.  What waits for it is dropped (the
        frame it is in the middle of excepted), our close frame queued behind, and the TCP
        connection ended once that is written or close_timeout has passed."""
        conn = self.conn
        with self._cond:
            if conn.closed or self._proto.state is not WebSocketState.OPEN:
                return
            self._proto.data_to_send()          # messages not handed to the connection yet
            self._proto.fail(code, reason)
            self._proto.events()
            close = self._proto.data_to_send()
        marks = self._marks or ()
        for end in marks:
            if end > conn.sent:
                del conn.out[end - conn.sent:]
                break
        self._marks = None
        conn.write(close)
        self._set_closed()
        conn.finish()
        self._close_by = time.monotonic() + self.close_timeout

    def _queue_flush(self):
        # (with _cond held) what the protocol has to send goes out from the loop.
        if not self._flushing:
            self._flushing = True
            self.conn.server.call_soon(self._flush)

    # -- handlers -----------------------------------------------------------------------------

    def _start_handler(self, message):
        if self._async:
            import asyncio
            coroutine = self._handler(_AsyncWebSocket(self), message, *self._args)
            self._task = asyncio.run_coroutine_threadsafe(_in_request(self.request, coroutine),
                                                          _event_loop())
            self._task.add_done_callback(self._handler_done)
        else:
            self._running = True
            self.conn.server.workers.submit(_call_in_request, self.request, self._run_render,
                                            message)

    def _run_render(self, message):
        try:
            self._handler(self, message, *self._args)
        except ConnectionClosed:
            pass
        except Exception:
            self._handler_failed()
            return
        self._start_close(CloseCode.NORMAL)

    def _handler_done(self, task):
        if task.cancelled():        # stop(): the closing is under way
            return
        error = task.exception()
        if error is None or isinstance(error, ConnectionClosed):
            self._start_close(CloseCode.NORMAL)
        else:
            self._handler_failed(error)

    def _handler_failed(self, error=None):
        log.error('websocket handler %s for %s failed', getattr(self._handler, '__name__',
                                                                self._handler), self.path,
                  exc_info=error or True)
        self._start_close(CloseCode.INTERNAL_ERROR)

    def _start_router(self):
        if self._async:
            import asyncio
            self._task = asyncio.run_coroutine_threadsafe(
                _in_request(self.request, self._route_async()), _event_loop())
            self._task.add_done_callback(self._router_done)
        else:
            self.conn.server.workers.submit(_call_in_request, self.request, self._route)

    def _next_message(self):
        with self._cond:
            if self._messages and self._closed is None:
                return self._messages.popleft()
            self._running = False
            return None

    def _route(self):
        """On a worker: the router handler for each waiting message, in order."""
        while True:
            message = self._next_message()
            if message is None:
                return
            try:
                reply = self._handler(message, *self._args)
                if reply is not None:
                    self.send(_ws_reply(reply))
            except ConnectionClosed:
                return
            except Exception:
                with self._cond:
                    self._running = False
                self._handler_failed()
                return
            if message == 'exit':
                self._start_close(CloseCode.NORMAL)
            self._took()

    async def _route_async(self):
        connection = _AsyncWebSocket(self)      # its send() waits without blocking the loop
        while True:
            message = self._next_message()
            if message is None:
                return
            reply = await self._handler(message, *self._args)
            if reply is not None:
                await connection.send(_ws_reply(reply))
            if message == 'exit':
                self._start_close(CloseCode.NORMAL)
            self._took()

    def _router_done(self, task):
        # (a message that came as the turn ended started the next turn: see _deliver)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, ConnectionClosed):
            with self._cond:
                self._running = False
            self._handler_failed(error)

    # -- the connection, for handlers ---------------------------------------------------------

    def recv(self, timeout: Optional[float] = None) -> Message:
        """Return the next message: str for text, bytes for binary.  Messages that came
        before the close are still returned; then ConnectionClosed.  WebSocketTimeout
        after `timeout` seconds without a message (the connection stays usable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._messages:
                if self._closed is not None:
                    raise self._closed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WebSocketTimeout('no websocket message within %s s' % timeout)
                self._cond.wait(remaining)
            message = self._messages.popleft()
        self._took()
        return message

    def _take(self, future):
        """For a coroutine's recv(): a message, or None after registering `future` to be
        woken when there may be one.  Raises ConnectionClosed."""
        with self._cond:
            if self._messages:
                message = self._messages.popleft()
            elif self._closed is not None:
                raise self._closed
            else:
                self._wakers.append(future)
                return None
        self._took()
        return message

    def send(self, message: Union[str, bytes, bytearray, memoryview]) -> None:
        """Send a message: str as text, bytes-like as binary.  When that leaves more than
        the server's write_limit queued for the peer, wait (as drain() does) until the
        peer has taken all but the low-water mark.  Raises ConnectionClosed once closing or
        closed (also when the connection ends while waiting), TypeError for any other type."""
        with self._cond:
            if self._closed is not None:
                raise self._closed
            self._proto.send(message)
            self._queue_flush()
            if self.buffered > self._high:
                self._wait_for_room(None)

    def drain(self, timeout: Optional[float] = None) -> None:
        """Wait until what is queued for the peer is down to the low-water mark (a quarter
        of write_limit), for a handler that streams and wants to know the peer keeps up.
        Returns at once when it is.  Raises ConnectionClosed once the connection is closed
        (also when that happens while waiting), WebSocketTimeout after `timeout` seconds
        (the connection stays usable)."""
        with self._cond:
            self._wait_for_room(None if timeout is None else time.monotonic() + timeout)

    def _wait_for_room(self, deadline):
        # (with _cond held)
        self._drainers += 1
        try:
            while True:
                if self._closed is not None:
                    raise self._closed
                if self.buffered <= self._low:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WebSocketTimeout('the peer did not take its data in time')
                self._cond.wait(remaining)
        finally:
            self._drainers -= 1

    @property
    def buffered(self) -> int:
        """Bytes queued for the peer and not yet handed to the kernel (0 once closed)."""
        pending = self._proto._out          # (read once: data_to_send() replaces the list)
        return len(self.conn.out) + (sum(map(len, pending)) if pending else 0)

    def _offer(self, frame):
        """From any thread, for a broadcast: queue `frame`.  Returns None when closing,
        'behind' when over write_limit and not yet down to the low-water mark (or with more
        than write_limit queued that the loop has not taken yet), 'flush' when queued and
        the caller is to schedule the flush, 'queued' when one is scheduled already."""
        with self._cond:
            if self._closed is not None or self._proto.state is not WebSocketState.OPEN:
                return None
            pending = self._proto._out
            if self._behind or (pending and sum(map(len, pending)) > self._high):
                return 'behind'
            self._proto.send_frame(frame)
            if self._flushing:
                return 'queued'
            self._flushing = True
            return 'flush'

    def ping(self, data: Optional[bytes] = None) -> threading.Event:
        """Send a ping; return a threading.Event that is set when its pong arrives.
        `data` (at most 125 bytes) defaults to 4 random bytes."""
        data = os.urandom(4) if data is None else bytes(data)
        with self._cond:
            if self._closed is not None:
                raise self._closed
            self._proto.ping(data)
            event = self._pings.setdefault(data, threading.Event())
            self._queue_flush()
        return event

    def _got_pong(self, data):
        # RFC 6455 5.5.3: a pong answers the most recent ping, so it settles the older ones
        # too.  A pong nobody asked for is fine (a heartbeat) and ignored.
        with self._cond:
            if data not in self._pings:
                return
            settled = []
            for payload in list(self._pings):
                settled.append(self._pings.pop(payload))
                if payload == data:
                    break
        for event in settled:
            event.set()
        self._pong_deadline = None

    def close(self, code: int = CloseCode.NORMAL, reason: str = '') -> None:
        """Close the connection: send a close frame, wait up to close_timeout for the
        peer's answer (the server then ends the TCP connection).  Raises ValueError for a
        code that may not be sent or a reason over 123 bytes."""
        _ws_close_payload(code, reason)
        self._start_close(code, reason)
        deadline = time.monotonic() + self.close_timeout
        with self._cond:
            while not self._done and self._closed is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)

    def _start_close(self, code, reason=''):
        with self._cond:
            if self._proto.state is not WebSocketState.OPEN:
                return
            self._proto.close(code, reason)
            self._queue_flush()
        self.conn.server.call_soon(self._closing)

    def _closing(self):
        if self._close_by is None:
            self._close_by = time.monotonic() + self.close_timeout
        self._resume()                      # the peer's answer is to be read

    def _fail(self, code, reason=''):
        with self._cond:
            self._proto.fail(code, reason)
            self._proto.events()
            out = self._proto.data_to_send()
        self._write(out)
        self._set_closed()


def _ws_wake(future):
    if not future.done():
        future.set_result(None)


class _AsyncWebSocket:
    """What an `async def` render handler gets: the connection, with awaitable recv, send,
    drain, ping and close.  Nothing here blocks the asyncio loop or uses an executor."""

    def __init__(self, ws: _ServerWebSocket) -> None:
        self._ws = ws

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def recv(self, timeout: Optional[float] = None) -> Message:
        import asyncio
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            future = loop.create_future()
            message = self._ws._take(future)
            if message is not None:
                return message
            remaining = None if deadline is None else deadline - loop.time()
            try:
                await asyncio.wait_for(future, remaining)
            except asyncio.TimeoutError:
                raise WebSocketTimeout('no websocket message within %s s' % timeout) from None

    async def send(self, message: Union[str, bytes, bytearray, memoryview]) -> None:
        """As the blocking send(): over write_limit, it awaits drain()."""
        ws = self._ws
        with ws._cond:
            if ws._closed is not None:
                raise ws._closed
            ws._proto.send(message)
            ws._queue_flush()
            if ws.buffered <= ws._high:
                return
        await self.drain()

    async def drain(self, timeout: Optional[float] = None) -> None:
        """As the blocking drain(), awaited: the asyncio loop runs on meanwhile."""
        import asyncio
        ws = self._ws
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            future = loop.create_future()
            with ws._cond:
                if ws._closed is not None:
                    raise ws._closed
                if ws.buffered <= ws._low:
                    return
                ws._wakers.append(future)
            remaining = None if deadline is None else deadline - loop.time()
            try:
                await asyncio.wait_for(future, remaining)
            except asyncio.TimeoutError:
                raise WebSocketTimeout('the peer did not take its data in time') from None

    async def ping(self, data: Optional[bytes] = None) -> threading.Event:
        return self._ws.ping(data)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = '') -> None:
        import asyncio
        ws = self._ws
        _ws_close_payload(code, reason)
        ws._start_close(code, reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ws.close_timeout
        while ws._closed is None and loop.time() < deadline:
            future = loop.create_future()
            with ws._cond:
                if ws._closed is not None:
                    break
                ws._wakers.append(future)
            try:
                await asyncio.wait_for(future, deadline - loop.time())
            except asyncio.TimeoutError:
                break

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    async def _messages(self):
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed as exc:
                if exc.ok:
                    return
                raise


# -- signals: one router for every server in the process --

_stop_callbacks = []        # [callback, foreground] entries, in the order registered
_starting = []              # non-empty while the main thread is starting a server
_saved_handlers = {}        # signum -> the handler ours replaced


def _on_stop_signals(callback, foreground=True):
    """Route SIGTERM and SIGINT (Ctrl+C) to callback(signum) until the returned function
    is called.  `foreground`: the main thread waits in a serving loop that the callback
    ends; otherwise (servers in the background only) the signal then also does what
    Python's default would (KeyboardInterrupt, or exit 0 for SIGTERM) while the main
    thread runs.  Only Python's own handlers are replaced, and only from the main thread.
    """
    entry = [callback, foreground]
    if threading.current_thread() is threading.main_thread():
        import signal
        if not _saved_handlers:
            import atexit
            atexit.unregister(_ignore_echo_at_exit)     # (registered once)
            atexit.register(_ignore_echo_at_exit)
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL),
                                (signal.SIGINT, signal.default_int_handler)):
            try:
                if signal.getsignal(signum) in (default, _echo_signal):
                    signal.signal(signum, _stop_signal)
                    _saved_handlers[signum] = default
            except (ValueError, OSError):
                pass
    _stop_callbacks.append(entry)

    def restore():
        if entry in _stop_callbacks:
            _stop_callbacks.remove(entry)
        if not _stop_callbacks and threading.current_thread() is threading.main_thread():
            import signal
            # Right after a stop by signal, its echo may still be on its way (timeout(1)
            # signals the process, then its whole group): it must not kill what stopped.
            echo = time.monotonic() - _last_stop_signal[0] < _SIGNAL_ECHO
            for signum, old in list(_saved_handlers.items()):
                try:
                    if signal.getsignal(signum) is _stop_signal:
                        signal.signal(signum, _echo_signal if echo else old)
                except (ValueError, OSError):
                    pass
                if not echo:
                    _saved_handlers.pop(signum, None)
    return restore


_SIGNAL_ECHO = 1.0              # seconds after a stop signal in which another is its echo
_last_stop_signal = [-_SIGNAL_ECHO]     # time.monotonic() of the last one


def _ignore_echo_at_exit():
    # The interpreter's last steps put SIG_DFL back where Python handlers were: an echo
    # arriving then would still kill the process, unless it is ignored outright.
    import signal
    if time.monotonic() - _last_stop_signal[0] < _SIGNAL_ECHO:
        for signum in _saved_handlers:
            try:
                signal.signal(signum, signal.SIG_IGN)
            except (ValueError, OSError):
                pass


def _echo_signal(signum, frame):
    """A stop signal after the stop that one before it asked for: dropped while it may be
    that one's echo; later, what the handler that ours replaced would have done."""
    import signal
    if time.monotonic() - _last_stop_signal[0] < _SIGNAL_ECHO:
        return
    old = _saved_handlers.pop(signum, signal.SIG_DFL)
    signal.signal(signum, old)
    if callable(old):
        return old(signum, frame)
    if old == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def _stop_signal(signum, frame):
    # A handler runs between two bytecodes of the main thread, which may hold any lock
    # then, and may even run inside another handler: the callbacks take none (they set
    # flags and write to sockets), and the stops are logged by the serving loops.
    import signal
    _last_stop_signal[0] = time.monotonic()
    entries = list(_stop_callbacks)
    for callback, _ in entries:
        callback(signum)
    if any(foreground for _, foreground in entries) or _starting:
        return      # the main thread is in our code, which returns once stopped
    if not threading.main_thread().is_alive() or _in_interpreter_shutdown(frame):
        return      # the interpreter waits for the serving threads: they are stopping
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(0)         # SIGTERM: a clean stop is the expected answer


def _in_interpreter_shutdown(frame):
    # (some CPython versions still call the main thread alive inside threading._shutdown)
    shutdown = getattr(getattr(threading, '_shutdown', None), '__code__', None)
    while frame is not None:
        if frame.f_code is shutdown:
            return True
        frame = frame.f_back
    return False


def _signal_name(signum):
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return 'signal %d' % signum


def _interrupt(signum):
    raise KeyboardInterrupt


# ###########################################################################################
# 10. Pools: ordered per key over any Executor
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


class WorkerLost(PoolError):
    """The worker process running a task died before the task finished."""


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

_running = threading.local()        # .pool: the token of the pool whose task runs here


def _run_task(token, fn, args, kwargs, number):
    """What the executor runs for a task (`number` only makes each call unique)."""
    outer = getattr(_running, 'pool', None)
    _running.pool = token
    try:
        return fn(*args, **kwargs)
    finally:
        _running.pool = outer


_task_numbers = itertools.count()


def _pools_at_exit():
    # As ThreadPoolExecutor does at the end of a script: tasks submitted (also after a
    # shutdown(wait=False)) run before the interpreter goes, none is silently dropped.
    # Registered after the executors' own exit hooks, it runs before them.
    for pool in list(_live_pools):
        if pool._pending:
            log.info('pool: %d task(s) still to run at exit', pool._pending)
            with pool._lock:
                pool._idle_waiters += 1
                try:
                    while pool._pending:
                        pool._idle.wait()
                finally:
                    pool._idle_waiters -= 1


def _register_pools_at_exit():
    register = getattr(threading, '_register_atexit', None)
    if register is None:        # CPython 3.8: its executors use atexit
        import atexit
        register = atexit.register
    try:
        register(_pools_at_exit)
    except RuntimeError:        # already shutting down
        pass


class _LivePools:
    """The pools alive, for the exit hook (registered with the first pool)."""

    def __init__(self):
        self._pools = None

    def add(self, pool):
        if self._pools is None:
            import weakref
            self._pools = weakref.WeakSet()
            _register_pools_at_exit()
        self._pools.add(pool)

    def __iter__(self):
        return iter(self._pools or ())


_live_pools = _LivePools()


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

    def __init__(self, executor: concurrent.futures.Executor, out_queue: Optional[Any] = None,
                 max_watching: Optional[int] = None, check_pickle: Optional[bool] = None,
                 shutdown_executor: bool = True) -> None:
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
        self._token = id(self)      # tells _run_task which pool a task belongs to
        self._own_futures = False   # a Future of ours for every task (see DistributedProcess)
        _live_pools.add(self)
        # Woken with None when the pool is collected, so that the thread ends with it.
        pool_ref = weakref.ref(self, lambda _, put=self._done.put: put(None))
        self._settler_thread = threading.Thread(
            target=_settler, args=(pool_ref, self._done), name='mconnector-settler',
            daemon=True)
        self._settler_thread.start()

    # -- submitting ---------------------------------------------------------------------

    @property
    def executor(self) -> concurrent.futures.Executor:
        """The wrapped executor."""
        return self._executor

    @property
    def pending(self) -> int:
        """Number of tasks submitted and not yet finished."""
        return self._pending

    @property
    def busy_keys(self) -> int:
        """Number of keys with a task running or waiting."""
        return len(self._queues)

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """Schedule `fn(*args, **kwargs)` with no key and no order; return its Future.

        Raises what `submit_id` raises.
        """
        return self.submit_id(None, fn, *args, **kwargs)

    def submit_id(self, key: Any, fn: Callable[P, T], /, *args: P.args,
                  **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
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
        future = self._future_class() if self._own_futures or \
            key is not None and key in self._queues else None
        task = _Task(self, key, fn, args, kwargs, future)
        if self._check_pickle and not self._picklable(task):
            return task.future
        with self._lock:
            if self._closed:
                raise PoolClosed('cannot schedule new futures after shutdown')
            # (never in the settler, nor in a task of this pool: either would wait for
            # itself, with every slot held by tasks waiting for a slot)
            if self.max_watching and self._pending >= self.max_watching \
                    and threading.current_thread() is not self._settler_thread \
                    and getattr(_running, 'pool', None) != self._token:
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
            inner = self._submit(task)
        except BaseException as exc:        # broken or shut down executor
            task.future = self._future_class()
            task.future.set_running_or_notify_cancel()
            following = self._settle(task, None, exc)
            if following is not None:
                self._dispatch(following)
            return task.future
        inner.add_done_callback(task)
        return inner

    def _submit(self, task):
        # The task travels as the arguments of _run_task, never as the executor's own
        # keyword arguments (dask's submit takes key=, pure=, workers=...), with a number
        # of its own, so that an executor that merges identical calls (dask, pure=True)
        # never merges two tasks.
        call = (_run_task, self._token, task.fn, task.args, task.kwargs, next(_task_numbers))
        try:
            return self._executor.submit(*call)
        except BaseException as exc:
            if not self._renew(exc):
                raise
        return self._executor.submit(*call)

    @staticmethod
    def _broken(exc):
        import concurrent.futures
        return isinstance(exc, concurrent.futures.BrokenExecutor)

    def _renew(self, exc):
        """After the executor broke (a worker process died): a fresh one, if this pool can
        make one (DistributedProcess can); True when it did."""
        return False

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
                inner = self._submit(task)
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
                if exc is not None and self._broken(exc):
                    exc = WorkerLost('the worker process running task %s (key %r) died: '
                                     '%s' % (getattr(task.fn, '__qualname__', task.fn),
                                             task.key, exc))
                    self._renew(exc)
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

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
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
        import inspect
        try:
            params = inspect.signature(self._executor.shutdown).parameters
        except (TypeError, ValueError):
            return
        if 'cancel_futures' in params:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _close_executor(self):
        # In the settler thread, once closed and idle.  An executor whose shutdown() takes
        # no `wait` is not a concurrent.futures one: a dask Client's shutdown() would stop
        # the whole cluster, where close() lets this client go.
        if self._shutdown_executor and not self._executor_closed:
            self._executor_closed = True
            import inspect
            executor = self._executor
            try:
                shutdown = getattr(executor, 'shutdown', None)
                try:
                    waits = 'wait' in inspect.signature(shutdown).parameters
                except (TypeError, ValueError):
                    waits = False
                if waits:
                    shutdown(wait=True)
                elif callable(getattr(executor, 'close', None)):
                    executor.close()
                elif shutdown is not None:
                    shutdown()
            except Exception:
                log.exception('pool: shutting down %r failed', executor)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
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

    def __init__(self, out_queue: Optional[Any] = None, max_workers: int = 4,
                 max_watching: Optional[int] = 100, worker: Any = None, maxsize: int = 0,
                 delay: float = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor
        _compat_arguments(type(self), worker, maxsize, delay)
        super().__init__(ThreadPoolExecutor(max_workers, thread_name_prefix='mconnector-pool'),
                         out_queue=out_queue, max_watching=max_watching)
        self.max_workers = max_workers


class DistributedProcess(KeyedExecutor):
    """Per-key ordered tasks on a ProcessPoolExecutor of `max_workers` processes.

    As DistributedThreads, plus: tasks (function and arguments) and results must pickle;
    a task that does not fails its Future with TaskNotPicklable at submit time.

    Where the default start method is fork (Linux), forkserver is used instead, as forking
    a process that runs threads can deadlock the child; `mp_context` chooses another.  The
    function must then be importable by name from a module (a script's own functions are,
    when its main code is behind `if __name__ == '__main__':`), not a lambda or a nested
    function.  Results reach `out_queue` from this process, so a `queue.Queue` works as
    well as a `multiprocessing.Queue`.  Raises ValueError if max_workers <= 0.
    """

    def __init__(self, out_queue: Optional[Any] = None, max_workers: int = 4,
                 max_watching: Optional[int] = 100, worker: Any = None, maxsize: int = 0,
                 delay: float = 1, *, mp_context: Optional[Any] = None) -> None:
        from concurrent.futures import ProcessPoolExecutor
        _compat_arguments(type(self), worker, maxsize, delay)
        if mp_context is None:
            import multiprocessing
            # fork() in a process that runs threads (this module's listener, its asyncio
            # loop) can deadlock a child; forkserver forks from a clean server process, and
            # is the default Python 3.14 chose for Linux.
            if multiprocessing.get_context().get_start_method() == 'fork' and \
                    'forkserver' in multiprocessing.get_all_start_methods():
                mp_context = multiprocessing.get_context('forkserver')
        self._make_executor = functools.partial(ProcessPoolExecutor, max_workers,
                                                mp_context=mp_context)
        super().__init__(self._make_executor(), out_queue=out_queue,
                         max_watching=max_watching, check_pickle=True)
        self.max_workers = max_workers
        self._own_futures = True    # so that a task lost with its process fails as WorkerLost

    def _renew(self, exc):
        # A worker that died (os._exit, a crash, the OOM killer) breaks a
        # ProcessPoolExecutor for good: the tasks it was running fail with WorkerLost,
        # and the later ones run on a fresh executor.
        if not self._broken(exc) or self._closed:
            return False
        with self._lock:
            broken = self._executor
            if not getattr(broken, '_broken', True):
                return True             # renewed already, by another task's failure
            self._executor = self._make_executor()
        log.warning('pool: a worker process died (%s): later tasks run on a fresh pool', exc)
        broken.shutdown(wait=False)
        return True


class _StopWorker:
    """The marker `Worker.stop` puts on the queue; compared by type, as it may be pickled."""

    def __repr__(self):
        return '<Worker stop marker>'


class Worker(threading.Thread):
    """A thread that calls `f(item)` for every item taken from `out_queue`, forever.

    Works with `queue.Queue` and `multiprocessing.Queue`; calls `task_done()` after each
    item where the queue has it, so `out_queue.join()` works.  An exception from `f` is
    logged and the loop goes on.  Daemon by default (the 0.3.7 README sets it anyway).
    """

    def __init__(self, out_queue: Any, f: Callable[[Any], Any], name: Optional[str] = None,
                 daemon: bool = True) -> None:
        super().__init__(name=name or 'mconnector-worker', daemon=daemon)
        self.out_queue = out_queue
        self.f = f

    def run(self) -> None:
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

    def stop(self) -> None:
        """Put a stop marker on the queue: the worker that takes it ends after the items
        put before it.  With several Workers on one queue, call it once per worker."""
        self.out_queue.put(_StopWorker())


# ###########################################################################################
# 11. Command line
# ###########################################################################################

def _load_target(target):
    """Import TARGET ('app1', 'pkg.app', 'path/app1.py', each optionally ':attribute')."""
    import importlib
    import importlib.util
    target, _, attribute = target.partition(':') if not os.path.exists(target) else (target, '', '')
    if target.endswith('.py') or os.path.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise SystemExit('mconnector: no such file: %s' % target)
        directory, filename = os.path.split(path)
        sys.path.insert(0, directory)
        name = os.path.splitext(filename)[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise SystemExit(_import_failure(target, name, exc)) from None
    else:
        if '' not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise SystemExit(_import_failure(target, target, exc)) from None
    return module, attribute


def _import_failure(target, name, exc):
    """What serve says when TARGET fails to import: the traceback of the user's own code,
    without the frames of this module and of importlib, or one line if none are left."""
    import importlib
    import traceback
    ours = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(importlib.__file__)))
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith(('<frozen ',) + ours)]
    error = ''.join(traceback.format_exception_only(type(exc), exc)).rstrip('\n')
    if not frames:
        if isinstance(exc, ModuleNotFoundError) and exc.name and \
                (name + '.').startswith(exc.name + '.'):
            return ('mconnector: cannot import %s: no module %r on the path (run serve from '
                    'the directory that holds it, or name the file: serve path/to/%s.py)'
                    % (target, exc.name, name.rpartition('.')[2]))
        return 'mconnector: cannot import %s:%s%s' % (target, '\n' if '\n' in error else ' ',
                                                     error)
    return ('mconnector: cannot import %s:\nTraceback (most recent call last):\n%s%s'
            % (target, ''.join(traceback.format_list(frames)), error))


def _find_servers(module, attribute):
    """The Microservice and websocket servers that `module` defines (or the one named)."""
    if attribute:
        try:
            values = [getattr(module, attribute)]
        except AttributeError:
            raise SystemExit('mconnector: %s has no attribute %r' % (module.__name__, attribute))
    else:
        values = list(vars(module).values())
    services, sockets, seen = [], [], set()
    for value in values:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, _FlaskLike):
            value = value.service
        if isinstance(value, Microservice):
            services.append(value)
        elif isinstance(value, SocketServer):
            sockets.append(value)
    return services, sockets


def _serve_logging(options):
    _default_logging()
    if options.debug:
        log.setLevel(logging.DEBUG if options.debug > 1 else logging.INFO)


def _load_servers(options):
    """Import the target of `serve` and return its ([Microservice], [SocketServer])."""
    module, attribute = _load_target(options.target)
    services, sockets = _find_servers(module, attribute)
    if not services and not sockets:
        raise SystemExit('mconnector: %s defines no Microservice (nor SocketServer)' % options.target)
    if len(services) > 1:
        names = ', '.join(sorted(k for k, v in vars(module).items() if v in services))
        raise SystemExit('mconnector: %s defines several Microservices (%s): name one as %s:NAME'
                         % (options.target, names, options.target))
    _serve_logging(options)     # after the import: the app may configure logging itself
    return services, sockets


def _serve_command(options):
    for option, port in (('--port', options.port), ('--ws-port', options.ws_port)):
        if port is not None and not 0 <= port <= 65535:
            _usage_error('%s takes a port from 0 to 65535, not %d' % (option, port))
    if options.listen_fd is not None or options.reuse_port:
        return _serve_worker(options)
    reload = _serve_reloads(options)
    if options.workers is not None or reload:
        return _serve_supervised(options, reload)
    services, sockets = _load_servers(options)
    if _RELOAD_FD_ENV in os.environ:
        _check_supervised(options, services, sockets, workers=False)
    ws_port = options.ws_port
    if ws_port is None and not services and options.port is not None:
        if len(sockets) > 1:            # one port cannot serve them all
            raise SystemExit('mconnector: %s defines %d websocket servers: --port serves one; '
                             'run them separately' % (options.target, len(sockets)))
        ws_port = options.port          # a module of websocket servers only: --port is theirs
    for server in sockets:
        kwargs = {} if ws_port is None else {'port': ws_port}
        if options.host is not None:
            kwargs['host'] = options.host
        try:
            server.run(**kwargs)
        except _CannotListen as exc:
            _ws_stop_all()
            _cannot_listen(exc)
    try:
        if services:
            if options.grace is not None:
                services[0].grace = options.grace
            # reload=False: here either reloading is off, or this is the reload child,
            # which run() recognises by the socket its parent hands over.
            services[0].run(port=options.port, host=options.host,
                            debug=True if options.debug else None, certfile=options.certfile,
                            keyfile=options.keyfile, cafile=options.cafile, reload=False)
        else:
            # Only the websocket servers' threads serve: wait for a stop signal.  Its
            # handler interrupts the wait with an exception rather than set an Event, as
            # a handler must not take a lock the interrupted thread may hold.
            restore = _on_stop_signals(_interrupt)
            try:
                threading.Event().wait()
            finally:
                restore()
    except KeyboardInterrupt:
        pass
    finally:
        for server in sockets:
            server.stop()
        _ws_stop_all()
    return 0


def _argument(text):
    """Command-line values are JSON where they parse ('1', '[1, 2]', '"x"'), else text."""
    return _query_value(text)


def _call_command(options):
    args, kwargs = [], {}
    for item in options.args:
        name, sep, value = item.partition('=')
        if sep and _IDENTIFIER.match(name):
            kwargs[name] = _argument(value)
        else:
            args.append(_argument(item))
    if options.json and args:
        _usage_error('--json takes NAME=VALUE arguments only')
    friend = _cli_friend(options, timeout=options.timeout, secretKey=options.secret_key,
                         verify=not options.insecure, cafile=options.cafile, retries=0)
    rule = _rule_path(options.rule)
    friend.setRule(rule, method=options.method, token=options.token)
    deadline = time.monotonic() + options.wait
    try:
        while True:
            try:
                if options.json:
                    result = friend.json(rule, **kwargs)
                else:
                    result = friend.send(rule, *args, **kwargs)
                break
            except Unreachable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)     # the listener is still starting: ask again
    except MConnectorError as exc:
        sys.stderr.write('mconnector: %s: %s\n' % (type(exc).__name__, exc))
        return 1
    finally:
        friend.close()
    sys.stdout.write(json.dumps(to_wire(result), indent=2, ensure_ascii=False, default=str) + '\n')
    return 0


def _usage_error(message):
    """A mistake in the command line: one line, and exit status 2 (as argparse's own)."""
    sys.stderr.write('mconnector: %s\n' % message)
    raise SystemExit(2)


def _cli_friend(options, **settings):
    """The Friend of `call` and `rules`, or a usage error for a URL it cannot call."""
    try:
        return Friend('cli', options.url, **settings)
    except ValueError as exc:
        websocket = options.url.startswith(('ws://', 'wss://'))
        _usage_error('%s%s' % (exc, ' (websockets: mconnector ws URL)' if websocket else ''))


def _rules_command(options):
    friend = _cli_friend(options, timeout=options.timeout, secretKey=options.secret_key,
                         token=options.token, verify=not options.insecure,
                         cafile=options.cafile, retries=0)
    try:
        rules = friend.rules()
    except MConnectorError as exc:
        sys.stderr.write('mconnector: %s: %s\n' % (type(exc).__name__, exc))
        return 1
    finally:
        friend.close()
    if options.json:
        sys.stdout.write(json.dumps(rules, indent=2, ensure_ascii=False) + '\n')
        return 0
    rows = [('RULE', 'METHODS', 'PARAMETERS', 'TOKEN', 'FUNCTION')]
    for rule in rules:
        rows.append((rule['rule'], ','.join(rule['methods']),
                     ', '.join(rule['params']) if rule['params'] is not None else '?',
                     'yes' if rule['token'] else 'no',
                     rule['function'] + (' - ' + rule['doc'] if rule['doc'] else '')))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        sys.stdout.write('  '.join(cell.ljust(width) for cell, width in zip(row, widths))
                         + '  ' + row[4] + '\n')
    return 0


def _ws_cli(options):
    try:
        _ws_split_url(options.url)
    except ValueError as exc:
        _usage_error(exc)
    return _ws_command(options.url, timeout=options.timeout)


# -- process supervision: --workers and the reloader ----------------------------------------
#
# Two kinds of parent process, sharing one shell (_Supervisor):
#   - `serve --workers N`: N worker processes, each a full listener, serve one port.  On
#     Linux each worker binds its own socket with SO_REUSEPORT and the kernel spreads the
#     connections; the parent binds one too, without listening, to resolve --port 0 and to
#     keep the port while it restarts workers.  Elsewhere the parent creates one listening
#     socket and the workers inherit it (the listener accepts without blocking, so they
#     can share it).  A worker that dies is replaced.
#   - the reloader (run(debug=True), `serve --debug`): the process the user started binds
#     the port, keeps it, and runs the same command again as a child that serves the
#     inherited socket (its fd is named in the environment) and watches the mtimes of
#     its modules' source files.  On a change the child stops gracefully and exits with
#     _EXIT_RELOAD; the parent starts a new one.  Connections that arrive in between wait
#     in the listen backlog of the socket the parent keeps.
# The children of `serve` run `python -m mconnector`, not this file by its path: only an
# import reads the bytecode cache, a path has every child compile the whole module again.
# Parents poll for stop signals and dead children (_POLL), which needs nothing from how
# _on_stop_signals installs its handlers; children poll for their parent (_watch), as a
# parent killed with SIGKILL must not leave orphans holding the port.

RELOAD_INTERVAL = 1.0       # seconds between two looks at the sources (see _reload_interval)
_RELOAD_FD_ENV = 'MCONNECTOR_RELOAD_FD'     # "PID:FD": the reloader's pid and socket's fd
_EXIT_RELOAD = 3            # a reload child's status for "a source changed: start me again"
_EXIT_BOOT_FAILED = 4       # a worker's status for "cannot load the app": retrying is futile
_QUICK_DEATH = 1.0          # a worker dead this soon after its start counts as a failed start
_MAX_QUICK_DEATHS = 3       # consecutive failed starts before the parent gives up
_DEFAULT_GRACE = 10.0       # Microservice's default grace, for a parent that did not import it
_STOP_MARGIN = 5.0          # beyond the grace, before a child that does not stop is killed
_POLL = 0.1                 # seconds a parent lets a stop signal or a child's death wait


def _reload_interval():
    """RELOAD_INTERVAL, unless MCONNECTOR_RELOAD_INTERVAL says otherwise (tests shorten it)."""
    try:
        return float(os.environ.get('MCONNECTOR_RELOAD_INTERVAL', RELOAD_INTERVAL))
    except ValueError:
        return RELOAD_INTERVAL


def _url(host, port, tls):
    """The URL a listener on (host, port) answers at, as logged."""
    host = host or '0.0.0.0'
    return '%s://%s:%s' % ('https' if tls else 'http', '[%s]' % host if ':' in host else host,
                           port)


def _listening_socket(host, port, listen=True, reuse_port=False, name=None):
    """A TCP socket bound to (host, port), listening unless told otherwise.  With a `name`
    (of the server), a failure is a _CannotListen that names it and the address."""
    host = host or '0.0.0.0'
    try:
        port = int(port)
        if not 0 <= port <= 65535:
            raise OSError(errno.EINVAL, 'a port is a number from 0 to 65535')
        sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
    except (OSError, ValueError) as exc:
        if name is None:
            raise
        raise _CannotListen(name, host, port, exc) from None
    try:
        if os.name == 'posix':      # a restart must not wait for TIME_WAIT to pass
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(_BACKLOG)
    except BaseException as exc:
        sock.close()
        if name is None or not isinstance(exc, (OSError, OverflowError)):
            raise
        raise _CannotListen(name, host, port, exc) from None
    return sock


class _CannotListen(OSError):
    """An address that cannot be listened on, in the one message that start(), run() and
    serve give for it: 'NAME: cannot listen on HOST:PORT: REASON' (the errno kept)."""

    def __init__(self, name, host, port, exc):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        super().__init__(getattr(exc, 'errno', None) or errno.EINVAL,
                         '%s: cannot listen on %s:%s: %s' % (name, host, port, reason))

    def __str__(self):
        return self.strerror


def _cannot_listen(exc):
    """The main loop of a script or command: one clear line and exit status 1, not a
    traceback (as Flask's run does)."""
    log.error('%s', exc)
    raise SystemExit(1) from None


def _bind_or_exit(name, host, port, **options):
    """_listening_socket(), or _cannot_listen()."""
    try:
        return _listening_socket(host, port, name=name, **options)
    except _CannotListen as exc:
        _cannot_listen(exc)


def _reuse_port_wanted():
    """SO_REUSEPORT spreads connections over the workers' sockets on Linux only (BSD and
    macOS accept the option without balancing).  MCONNECTOR_REUSE_PORT=0 turns it off."""
    return (hasattr(socket, 'SO_REUSEPORT') and sys.platform.startswith('linux')
            and os.environ.get('MCONNECTOR_REUSE_PORT') != '0')


def _exit_status(code):
    if code is not None and code < 0:
        return 'was killed by %s' % _signal_name(-code)
    return 'exited with status %s' % code


def _python(*args):
    """A command running this interpreter as it runs (its -X, -W, -O... options)."""
    import subprocess
    return [sys.executable] + subprocess._args_from_interpreter_flags() + list(args)


def _module_command(argv):
    """(command, environment) of a child `python -m mconnector ARGV` that imports this very
    file.  Its directory goes first on PYTHONPATH, unless it is a site directory: every
    child searches those anyway, and one put before the standard library could shadow it."""
    import site
    import sysconfig
    path = os.path.abspath(__file__)
    env = dict(os.environ)
    if sys.flags.ignore_environment:        # -E, -I: PYTHONPATH would not reach the child
        return _python(path, *argv), env
    here, name = os.path.split(os.path.splitext(path)[0])
    if here not in (sysconfig.get_path('purelib'), sysconfig.get_path('platlib'),
                    site.getusersitepackages()):
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [here, env.get('PYTHONPATH')]))
    return _python('-m', name, *argv), env


class _Supervisor:
    """The parent of workers or of reload children, as a context: it collects the stop
    signals in `signals`, and on leaving stops the children still running."""

    def __init__(self, name, grace):
        self.name, self.grace = name, grace
        self.signals, self.children = [], []

    def __enter__(self):
        self._restore = _on_stop_signals(self.signals.append)
        return self

    def __exit__(self, *exc_info):
        try:
            self._stop()
        finally:
            self._restore()

    def start(self, command, fds, env):
        import subprocess
        child = subprocess.Popen(command, pass_fds=fds, env=env)
        child.started = time.monotonic()
        self.children.append(child)
        log.debug('%s: started process %d', self.name, child.pid)

    def wait(self, seconds=float('inf')):
        """The first child to exit within `seconds`, no longer counted among the children;
        None once the time is up, or at once when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while not self.signals and time.monotonic() < deadline:
            for child in self.children:
                if child.poll() is not None:
                    self.children.remove(child)
                    return child
            time.sleep(_POLL)
        return None

    def _stop(self):
        """SIGTERM every child (each stops gracefully), wait for them up to the grace and
        a margin, then SIGKILL those left; a second Ctrl+C kills them at once."""
        if not self.children:
            return
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + self.grace + _STOP_MARGIN
        while (any(child.poll() is None for child in self.children)
               and time.monotonic() < deadline and self.signals.count(_SIGINT) < 2):
            time.sleep(_POLL)
        for child in self.children:
            if child.poll() is None:
                log.warning('%s: process %d did not stop: killing it', self.name, child.pid)
                child.kill()
            child.wait()
        log.info('%s: stopped', self.name)


def _watch(on_change=None):
    """In a child, a daemon thread that stops this process as SIGTERM does once its parent
    is gone, and calls on_change(path) once, if given, when the source file of a loaded
    module changes.  The first look at the files is taken now; a module imported later is
    watched from the look that first sees it."""
    import signal
    parent, interval, seen = os.getppid(), _reload_interval(), {}

    def changed():
        for module in list(sys.modules.values()):
            path = getattr(module, '__file__', None)
            if isinstance(path, str):
                try:
                    mtime = os.stat(path).st_mtime_ns
                except OSError:     # an editor may be replacing it: look again next time
                    continue
                if seen.setdefault(path, mtime) != mtime:
                    return path
        return None

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
            path = on_change and changed()
            if path:
                return on_change(path)
        log.warning('parent process %d is gone: stopping', parent)
        os.kill(os.getpid(), signal.SIGTERM)
    if on_change:
        changed()
    threading.Thread(target=watch, name='mconnector-watch', daemon=True).start()


# -- the reloader --

def _reload_child_socket():
    """In a reload child's main thread: the listening socket its reloader hands over."""
    value = os.environ.get(_RELOAD_FD_ENV)
    if not value or threading.current_thread() is not threading.main_thread():
        return None
    # Taken once: children of the app must not take the name of an fd they do not have.
    del os.environ[_RELOAD_FD_ENV]
    pid, _, fd = value.partition(':')
    if pid != str(os.getppid()):
        return None
    return socket.socket(fileno=int(fd))


def _reload_wanted(debug, reload):
    """Whether run() should become a reloader (in the main thread of a POSIX system)."""
    if not (debug if reload is None else reload) or \
            threading.current_thread() is not threading.main_thread():
        return False
    if os.name != 'posix':
        log.warning('reloading on changes needs a POSIX system: serving without it')
        return False
    if _script_command() is None:
        log.warning('reloading on changes needs a program started from a file or with -m: '
                    'serving without it')
        return False
    return True


def _script_command():
    """The command that started this program, to start it again; None for python -c and
    the interactive prompt."""
    main = sys.modules.get('__main__')
    spec = getattr(main, '__spec__', None)
    if spec is not None and spec.name and spec.name != '__main__':     # python -m NAME
        name = spec.name[:-len('.__main__')] if spec.name.endswith('.__main__') else spec.name
        return _python('-m', name, *sys.argv[1:])
    if sys.argv and sys.argv[0] and os.path.exists(sys.argv[0]):
        return _python(os.path.abspath(sys.argv[0]), *sys.argv[1:])
    return None


def _reload(name, host, port, tls, grace, command, env, app):
    """Keep the port, and serve it from children running `command`, started again at once
    when one asks for it (_EXIT_RELOAD), after a change of a .py file beside the `app`
    file (or under the working directory) when one fails.  Returns 0, once stopped by a
    signal or once a child ends well."""
    app = app if os.path.exists(app) else app.partition(':')[0]     # serve's FILE:NAME
    directory = os.path.dirname(os.path.abspath(app)) if os.path.exists(app) else os.getcwd()
    with _Supervisor(name, grace) as supervisor, _bind_or_exit(name, host, port) as sock:
        log.info('%s: serving %s, restarting on source changes (reloader %d)', name,
                 _url(host, sock.getsockname()[1], tls), os.getpid())
        env = dict(env, **{_RELOAD_FD_ENV: '%d:%d' % (os.getpid(), sock.fileno())})
        while True:
            before = _py_mtimes(directory)
            supervisor.start(command, [sock.fileno()], env)
            child = supervisor.wait()
            if child is None:
                return 0
            if child.returncode == 0:
                log.info('%s: the service ended', name)
                return 0
            if child.returncode == _EXIT_RELOAD:
                continue
            log.warning('%s: the service %s: waiting for a change of a .py file under %s',
                        name, _exit_status(child.returncode), directory)
            changed = None
            while not changed:
                # Calls get a 503 that says why at once, instead of hanging in the backlog.
                _answer_unavailable(sock, '%s failed to start: fix it (see its log), it '
                                          'restarts on the next change' % name)
                supervisor.wait(_reload_interval())
                if supervisor.signals:
                    return 0
                changed = sorted(set(_py_mtimes(directory).items()) ^ set(before.items()))
            log.info('%s: %s changed: restarting', name, changed[0][0])


def _answer_unavailable(sock, message):
    """Answer 503 on every connection waiting on `sock`, without waiting for any."""
    response = Response.error(503, 'ServiceUnavailable', message)
    data = _closing_response(response.status, response.headers, response.body)
    sock.setblocking(False)     # (the next child sets its own mode on this shared socket)
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        try:
            conn.settimeout(0.2)
            conn.recv(65536)    # the request: closing with it unread would reset the answer
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()


_SKIPPED_DIRECTORIES = frozenset(['__pycache__', 'node_modules', 'site-packages',
                                  'dist-packages'])


def _py_mtimes(directory):
    """{path: mtime} of the .py files under `directory` (hidden directories, caches and
    installed packages left out)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in _SKIPPED_DIRECTORIES]
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(root, name)
                try:
                    found[path] = os.stat(path).st_mtime_ns
                except OSError:
                    pass
    return found


# -- the metrics of a service of several workers --
#
# Each worker writes its counters, as Prometheus text, to a file of its own in a folder the
# supervisor made (every second, and when scraped); a scrape merges the files of the
# workers alive, labelling each series with its worker's pid.

_METRICS_DIR_ENV = 'MCONNECTOR_METRICS_DIR'
_METRICS_EVERY = 1.0


def _write_metrics(folder, text):
    path = os.path.join(folder, '%d.prom' % os.getpid())
    # A scrape and the reporting thread may write at once: each through a file of its own.
    scratch = '%s.%d.tmp' % (path, threading.get_ident())
    try:
        with open(scratch, 'wb') as f:
            f.write(text)
        os.replace(scratch, path)               # readers see a whole file, old or new
    except OSError as exc:
        log.debug('metrics: cannot write %s: %s', path, exc)


def _merge_metrics(folder):
    """The files of `folder` as one exposition: each family's HELP and TYPE once, then the
    series of every worker, with worker="pid"."""
    families, order = {}, []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    for name in names:
        if not name.endswith('.prom'):
            continue
        pid = name[:-5]
        if not pid.isdigit() or (int(pid) != os.getpid() and not _process_alive(int(pid))):
            continue
        try:
            with open(os.path.join(folder, name), 'rb') as f:
                lines = f.read().decode('utf-8').splitlines()
        except OSError:
            continue
        current = None
        for line in lines:
            if line.startswith('# HELP ') or line.startswith('# TYPE '):
                current = line.split(' ', 3)[2]
                if current not in families:
                    families[current] = ([], [])
                    order.append(current)
                if line not in families[current][0]:
                    families[current][0].append(line)
            elif line and current is not None:
                metric, brace, rest = line.partition('{')
                labelled = '%s{worker="%s",%s' % (metric, pid, rest) if brace else \
                    '%s{worker="%s"} %s' % (metric.split(' ')[0], pid, line.split(' ', 1)[1])
                families[current][1].append(labelled)
    out = []
    for family in order:
        heads, samples = families[family]
        out += heads + samples
    return ('\n'.join(out) + '\n').encode('utf-8')


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _report_metrics(service):
    """In a worker: write the counters every _METRICS_EVERY seconds, for the scrapes that
    reach the other workers."""
    folder = os.environ.get(_METRICS_DIR_ENV)
    if not folder:
        return

    def report():
        while True:
            _write_metrics(folder, service.metrics_text())
            time.sleep(_METRICS_EVERY)
    threading.Thread(target=report, name='mconnector-metrics', daemon=True).start()


# -- serve --workers, serve --debug --

def _serve_supervised(options, reload):
    """`serve` as the parent of workers (--workers) or of reload children (--debug)."""
    if options.workers is not None and options.workers < 1:
        _usage_error('--workers takes a number of processes, 1 or more')
    if options.workers and reload:
        _usage_error('--workers and reloading (--debug) do not go together: add --no-reload, '
                     'or drop --workers')
    if os.name != 'posix':
        raise SystemExit('mconnector: --workers needs a POSIX system')
    host, port, grace = options.host, options.port, options.grace
    if host is None or port is None:    # with both given, the parent need not import the app
        services, sockets = _load_servers(options)
        _check_supervised(options, services, sockets, bool(options.workers))
        host = services[0].host if host is None else host
        port = services[0].port if port is None else port
        grace = services[0].grace if grace is None else grace
    grace = _DEFAULT_GRACE if grace is None else grace
    _serve_logging(options)
    tls = bool(options.certfile)
    if options.workers:
        return _serve_workers(options, host, port, grace, tls)
    return _reload(options.target, host, port, tls, grace, *_module_command(options.argv),
                   options.target)


def _serve_reloads(options):
    """--debug without --no-reload, in the process the user started (not in its child)."""
    if not options.debug or options.no_reload or _RELOAD_FD_ENV in os.environ:
        return False
    if os.name != 'posix':
        _serve_logging(options)
        log.warning('reloading on changes needs a POSIX system: serving without it')
        return False
    return True


def _check_supervised(options, services, sockets, workers):
    """Refuse what several processes cannot serve together."""
    what = '--workers' if workers else 'reloading (--debug)'
    if not services:
        raise SystemExit('mconnector: %s serves a Microservice, and %s defines websocket '
                         'servers only%s' % (what, options.target,
                                             '' if workers else ': add --no-reload'))
    if workers and sockets:
        raise SystemExit('mconnector: --workers cannot share the websocket server(s) of %s '
                         'between processes: serve them without --workers'
                         % options.target)


def _sweep_metrics_folders():
    """Remove the metrics folders of supervisors that are gone: one killed (SIGKILL, or
    with its workers' whole process group) cannot remove its own.  The folder's name
    carries its supervisor's pid."""
    import shutil
    import tempfile
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len('mconnector-metrics-'):].partition('-')[0]
        if name.startswith('mconnector-metrics-') and pid.isdigit() and \
                not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _serve_workers(options, host, port, grace, tls):
    """Bind (or reserve) the port, keep options.workers workers serving it, and replace
    those that die; returns the exit status (1 when the workers cannot start)."""
    sock = None
    if _reuse_port_wanted():
        try:        # reserved, not listening: connections go to the workers' sockets only
            sock = _listening_socket(host, port, listen=False, reuse_port=True)
            listen, fds = ['--reuse-port'], []
        except OSError:
            pass
    if sock is None:
        sock = _bind_or_exit(options.target, host, port)
        listen, fds = ['--listen-fd', str(sock.fileno())], [sock.fileno()]
    port = sock.getsockname()[1]
    log.info('%s: %d workers serving %s (supervisor %d)', options.target, options.workers,
             _url(host, port, tls), os.getpid())
    # The same `serve` options, with the address resolved: the last --host and --port win.
    command, env = _module_command(options.argv + ['--host', host, '--port', str(port)]
                                   + listen)
    import shutil
    import tempfile
    _sweep_metrics_folders()
    env[_METRICS_DIR_ENV] = metrics = tempfile.mkdtemp(
        prefix='mconnector-metrics-%d-' % os.getpid())
    quick_deaths = 0
    try:
        with _Supervisor(options.target, grace) as supervisor, sock:
            while True:
                while len(supervisor.children) < options.workers:
                    supervisor.start(command, fds, env)
                worker = supervisor.wait()
                if worker is None:
                    return 0
                try:    # its counters leave the service's with it
                    os.unlink(os.path.join(metrics, '%d.prom' % worker.pid))
                except OSError:
                    pass
                code = worker.returncode
                quick = time.monotonic() - worker.started < _QUICK_DEATH
                quick_deaths = quick_deaths + 1 if quick else 0
                if code == _EXIT_BOOT_FAILED or quick_deaths >= _MAX_QUICK_DEATHS:
                    log.error('%s: worker %d could not start (it %s): giving up, the reason is '
                              'above', options.target, worker.pid, _exit_status(code))
                    return 1
                log.warning('%s: worker %d %s: starting another', options.target, worker.pid,
                            _exit_status(code))
    finally:
        shutil.rmtree(metrics, ignore_errors=True)


def _serve_worker(options):
    """`serve` in a worker: load the app (a failure is reported with _EXIT_BOOT_FAILED,
    so that the parent stops trying), then serve the shared or SO_REUSEPORT socket."""
    try:
        services, sockets = _load_servers(options)
        _check_supervised(options, services, sockets, workers=True)
    except SystemExit as exc:
        _serve_logging(options)
        log.error('%s', exc.code if isinstance(exc.code, str) else
                  '%s: the app exited while loading (%s)' % (options.target, exc.code))
        raise SystemExit(_EXIT_BOOT_FAILED) from None
    except Exception:
        _serve_logging(options)
        log.exception('%s: cannot load the app', options.target)
        raise SystemExit(_EXIT_BOOT_FAILED) from None
    if options.reuse_port:
        try:
            sock = _bind_or_exit(options.target, options.host, options.port, reuse_port=True)
        except SystemExit:
            raise SystemExit(_EXIT_BOOT_FAILED) from None
    else:
        sock = socket.socket(fileno=options.listen_fd)
    _watch()
    if options.grace is not None:
        services[0].grace = options.grace
    services[0]._reporting = os.getpid()
    _report_metrics(services[0])
    services[0].run(sock=sock, debug=True if options.debug else None, reload=False,
                    certfile=options.certfile, keyfile=options.keyfile, cafile=options.cafile)
    return 0


def _parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            # argparse's "PROG COMMAND: error:" would be a second prefix beside ours.
            self.print_usage(sys.stderr)
            self.exit(2, 'mconnector: %s\n' % message)

    parser = Parser(
        prog='mconnector',
        description='Services that call each other like local functions (standard library only).')
    parser.add_argument('-V', '--version', action='version', version='mconnector ' + __version__)
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    commands.required = True

    serve = commands.add_parser(
        'serve', help='run the Microservice (and websocket servers) that a module defines',
        description='Import TARGET and serve the Microservice it defines, plus any '
                    'SocketServer, until SIGTERM or Ctrl+C; stopping answers the calls in '
                    'flight first, then exits 0.')
    serve.add_argument('target', metavar='TARGET',
                       help='module name (app1), file (path/app1.py), optionally :NAME')
    serve.add_argument('--host', help="address to bind (default: the service's own, 0.0.0.0)")
    serve.add_argument('--port', type=int, help="port (default: the service's own, 5000)")
    serve.add_argument('--ws-port', type=int,
                       help='port for the websocket server beside a Microservice (a module of '
                            'websocket servers only takes --port)')
    serve.add_argument('--debug', action='count', default=0,
                       help='log every request, return tracebacks, restart when a source '
                            'file changes (twice: debug logging)')
    serve.add_argument('--grace', type=float, metavar='SECONDS',
                       help="on SIGTERM or Ctrl+C, answer the calls in flight for this long "
                            "at most (default: the service's own, 10)")
    serve.add_argument('--certfile', help='serve HTTPS with this certificate (PEM)')
    serve.add_argument('--keyfile', help='private key of --certfile, if not inside it')
    serve.add_argument('--cafile', help='with --certfile: require client certificates '
                                        'signed by these CAs (mutual TLS)')
    serve.add_argument('--workers', type=int, metavar='N',
                       help='serve from N processes sharing the port; a worker that dies '
                            'is replaced')
    serve.add_argument('--no-reload', action='store_true',
                       help='with --debug: do not restart when a source file changes')
    # How a worker started by --workers listens: on the parent's socket, inherited as this
    # fd, or on its own socket bound with SO_REUSEPORT.
    serve.add_argument('--listen-fd', type=int, help=argparse.SUPPRESS)
    serve.add_argument('--reuse-port', action='store_true', help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve_command, subparser=serve)

    call = commands.add_parser(
        'call', help='call a rule and print the answer as JSON',
        description='Call RULE on the listener at URL.  ARGS are positional arguments and '
                    'NAME=VALUE keyword arguments; each value is JSON where it parses '
                    '(1, 2.5, true, [1,2], {"a":1}) and a string otherwise.')
    call.add_argument('url', metavar='URL', help='listener address, e.g. http://127.0.0.1:5000')
    call.add_argument('rule', metavar='RULE', help='the rule, e.g. /helloworld')
    call.add_argument('args', metavar='ARGS', nargs='*', help='VALUE or NAME=VALUE')
    call.add_argument('--token', help='token for the rule')
    call.add_argument('--method', help='HTTP method (default POST)')
    call.add_argument('--json', action='store_true',
                      help='send NAME=VALUE pairs as one JSON object (for @M.json rules)')
    call.add_argument('--timeout', type=float, default=30.0, help='seconds (default 30)')
    call.add_argument('--wait', type=float, default=0.0, metavar='SECONDS',
                      help='while nothing listens at URL, keep trying this long (default 0)')
    call.add_argument('--cafile', help='CA certificates for https:// listeners')
    call.add_argument('--secret-key', help='sign the call with this shared key (secretKey)')
    call.add_argument('--insecure', action='store_true', help='do not verify https certificates')
    call.set_defaults(run=_call_command, subparser=call)

    rules = commands.add_parser(
        'rules', help="list a running listener's rules",
        description='Print the rules of the listener at URL (from its GET /_mc/rules): '
                    'methods, parameters, and whether a token is required.')
    rules.add_argument('url', metavar='URL', help='listener address, e.g. http://127.0.0.1:5000')
    rules.add_argument('--token', help="the listener-wide token, if it has one")
    rules.add_argument('--json', action='store_true', help='print the JSON as it came')
    rules.add_argument('--timeout', type=float, default=10.0, help='seconds (default 10)')
    rules.add_argument('--cafile', help='CA certificates for https:// listeners')
    rules.add_argument('--secret-key', help='sign the request with this shared key (secretKey)')
    rules.add_argument('--insecure', action='store_true', help='do not verify https certificates')
    rules.set_defaults(run=_rules_command, subparser=rules)

    ws = commands.add_parser(
        'ws', help='interactive websocket client',
        description='Connect to a websocket URL; lines read from standard input are sent, '
                    'messages received are printed.')
    ws.add_argument('url', metavar='URL', help='e.g. ws://127.0.0.1:8765/hello')
    ws.add_argument('--timeout', type=float, default=None,
                    help='seconds for the handshake, and of quiet after the end of input '
                         'before closing (default: 10 and 1)')
    ws.set_defaults(run=_ws_cli, subparser=ws)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """Entry point of `python -m mconnector` and of the `mconnector` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    options, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops taking `call`'s ARGS at the first option: `call URL RULE --json
        # a=1` leaves a=1 over.  Values after options are still values, in their order.
        if options.run is _call_command and not any(item.startswith('--') for item in extra):
            options.args.extend(extra)
        else:
            options.subparser.error('unrecognized arguments: %s' % ' '.join(extra))
    options.argv = argv         # for `serve` to start its children with the same options
    try:
        return options.run(options)
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    # User code run by `serve` imports mconnector: give it this very module, not a second
    # copy whose classes would not be the ones the command looks for.
    sys.modules.setdefault('mconnector', sys.modules[__name__])
    sys.exit(main())
