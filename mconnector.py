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

# (pools: issue 3)


# ###########################################################################################
# 10. Command line
# ###########################################################################################

# (filled in below)
