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

# What travels is JSON in the 0.3.7 layout: basic values as they are, lists, dicts, and any
# other object as the dict of its public attributes.  Types that JSON loses (tuple, set,
# bytes, dates, Decimal, UUID, registered classes) are sent in that degraded JSON form too,
# so a 0.3.7 peer reads them as lists, strings and dicts, and beside it goes a list of
# "type notes" (path, tag) that lets an mconnector peer restore them.  Notes come children
# first, so that restoring a note never has to look inside an already restored value.
# Nothing is unpickled or evaluated: a note can only build the fixed types below or a class
# that the receiving side registered itself.

_PLAIN = (str, int, float, bool, type(None))
_MAX_DEPTH = 200
_registry = {}           # name -> class, for classes restored by type notes
_registered_names = {}   # class -> name


def register(cls, name=None):
    """Let instances of `cls` travel as themselves between mconnector peers.

    Both sides register the class under the same name (default: its ``__qualname__``).
    Unregistered objects still travel, as the dict of their public attributes (0.3.7).
    Can be used as a class decorator.  Returns `cls`.
    """
    if not isinstance(cls, type):
        raise TypeError('register() takes a class, got %r' % (cls,))
    name = name or cls.__qualname__
    _registry[name] = cls
    _registered_names[cls] = name
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


def to_wire(value, notes=None):
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
    if depth > _MAX_DEPTH:
        raise CodecError('value nested deeper than %d levels (a cycle?)' % _MAX_DEPTH)
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
    elif isinstance(value, datetime.datetime):
        out, tag = value.isoformat(), 'datetime'
    elif isinstance(value, datetime.date):
        out, tag = value.isoformat(), 'date'
    elif isinstance(value, datetime.time):
        out, tag = value.isoformat(), 'time'
    elif isinstance(value, datetime.timedelta):
        out, tag = value.total_seconds(), 'timedelta'
    elif isinstance(value, decimal.Decimal):
        out, tag = str(value), 'decimal'
    elif isinstance(value, uuid.UUID):
        out, tag = str(value), 'uuid'
    elif isinstance(value, (list, tuple)):   # subclasses, namedtuples: as plain sequences
        out = [_encode(v, notes, path + (i,), depth) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        out = {_dict_key(k): _encode(v, notes, path + (_dict_key(k),), depth)
               for k, v in value.items()}
    else:
        attributes = _public_attributes(value)
        out = {k: _encode(v, notes, path + (k,), depth) for k, v in attributes.items()}
        name = _registered_names.get(type(value))
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


_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def _dict_key(key):
    # JSON keys are strings; json.dumps would turn None/bool/number keys into text anyway,
    # and fail on others.  Doing it here keeps sorted output possible.
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    return str(key)


def _restore_scalar(tag, value):
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
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(value, dict)):
        raise CodecError('malformed object note')
    _, name, keys = spec
    cls = _registry.get(name)
    if cls is None:
        return value            # not registered here: keep the 0.3.7 dict form
    obj = cls.__new__(cls)
    # Set state directly, as pickle does, so that __init__ and __setattr__ hooks of the
    # class are not run with wire data.
    state = getattr(obj, '__dict__', None)
    for key in keys:
        if key in value:
            if state is not None:
                state[key] = value[key]
            else:
                object.__setattr__(obj, key, value[key])
    return obj


def from_wire(data, notes=None):
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
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, binascii.Error) as exc:
            raise CodecError('type note %r does not fit the value: %s' % (note, exc)) from None
    return root[0]


def dumps(value, notes=None, sort_keys=False):
    """JSON text (as bytes) of `value` converted by to_wire()."""
    try:
        return json.dumps(to_wire(value, notes), sort_keys=sort_keys,
                          separators=(', ', ': ')).encode('utf-8')
    except (TypeError, ValueError) as exc:
        raise CodecError('cannot encode value: %s' % exc) from None


def loads(body):
    """Parse a JSON body (bytes or str).  Raises CodecError with a clear message."""
    try:
        if isinstance(body, (bytes, bytearray)):
            body = body.decode('utf-8')
        return json.loads(body)
    except UnicodeDecodeError:
        raise CodecError('body is not UTF-8') from None
    except RecursionError:
        raise CodecError('JSON nested too deeply') from None
    except ValueError as exc:
        raise CodecError('body is not valid JSON: %s' % exc) from None


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

# (pools: issue 3)


# ###########################################################################################
# 10. Command line
# ###########################################################################################

# (filled in below)
