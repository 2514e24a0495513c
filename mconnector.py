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

# RFC 6455 without a socket in sight.  Three layers, all on bytes:
#   - the opening handshake: an HTTP head in, a checked request (or an HTTP error) out, and the
#     client's mirror image of it;
#   - frames: _ws_frame() builds one, WebSocketProtocol parses them as bytes arrive;
#   - WebSocketProtocol, the connection's state machine: feed it with receive_data(), then take
#     events() for the application and data_to_send() for the wire.
# Section 8 puts sockets and threads around it; the tests drive it with hand-built bytes.

import enum  # noqa: E402  (already loaded by `re`; kept here so that merges stay in this section)

_WS_GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'     # RFC 6455 section 1.3
_WS_VERSION = '13'
_WS_MAX_SIZE = 2 ** 20          # largest message accepted, 1 MiB as the websockets package does
_WS_MAX_HEAD = 16384            # opening handshake head, 16 KiB as h11 (and node, Apache) allow
_WS_MAX_HEADERS = 128           # as the websockets package
_WS_HANDSHAKE_TIMEOUT = 10.0    # seconds for a new connection to complete its opening handshake
_WS_CLOSE_TIMEOUT = 10.0        # seconds to wait for the peer's side of the closing handshake
_WS_PING_INTERVAL = 20.0        # keep-alive: a ping every 20 s, as the websockets package does ...
_WS_PING_TIMEOUT = 20.0         # ... and a peer that has not answered it 20 s later is dropped


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

    def __init__(self, status, message, path=None, headers=None):
        self.status = status
        self.message = message
        self.path = path
        self.headers = headers or {}
        super().__init__(status, message, path)

    def __str__(self):
        where = ' for %s' % self.path if self.path else ''
        return 'websocket handshake%s failed: HTTP %s %s' % (where, self.status, self.message)


class WebSocketProtocolError(WebSocketError):
    """The peer sent something RFC 6455 forbids (close code 1002)."""


class PayloadTooBig(WebSocketError):
    """A message (or frame) is larger than the limit set (close code 1009)."""

    def __init__(self, size, max_size, what='message'):
        self.size = size
        self.max_size = max_size
        self.what = what
        super().__init__(size, max_size, what)

    def __str__(self):
        return '%s of %d bytes over the limit of %d' % (self.what, self.size, self.max_size)


class ConnectionClosed(WebSocketError, ConnectionError):
    """The websocket connection is closed.  `code` and `reason` say why: the peer's close frame
    when one arrived, else ours, else 1006 (the TCP connection ended without a close frame).
    `rcvd` and `sent` are the (code, reason) pairs of the close frames received and sent, or
    None.  `ok` is true for a normal ending (1000, 1001, or a close frame without a code)."""

    def __init__(self, rcvd=None, sent=None):
        self.rcvd = rcvd
        self.sent = sent
        self.code, self.reason = rcvd or sent or (CloseCode.ABNORMAL, '')
        super().__init__(self.code, self.reason)

    @property
    def ok(self):
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
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
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
    OPEN = 1        # messages flow both ways
    CLOSING = 2     # we sent a close frame and wait for the peer's
    CLOSED = 3      # closing handshake done, connection failed, or stream ended: no more input


def _ws_close_code_ok(code):
    """May `code` travel in a close frame?  RFC 6455 7.4: 1000-1003, 1007-1011 and the codes
    IANA registered since (1012-1014), 3000-4999 for libraries and applications; 1004-1006,
    1015 and anything else are protocol errors."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


_WS_XOR_TABLES = [None] * 256     # byte -> byte ^ k, one table per key byte, built on demand


def _ws_mask(data, key):
    """XOR `data` with the 4-byte `key` repeated (RFC 6455 5.3); the same call unmasks.

    Never a Python loop per byte.  Up to 4 KiB the payload is one big integer XORed with the
    key repeated (one XOR in C).  Above that, bytes.translate() with an XOR table maps each
    of the four interleaved byte lanes: measured here 2 to 2.5 times faster than the big
    integer from 16 KiB to 16 MiB, as it allocates less (1 MB: 1.5 ms against 3.4 ms)."""
    n = len(data)
    if n <= 4096:
        if not n:
            return b''
        keys = bytes(key) * (n // 4) + bytes(key[:n % 4])
        return (int.from_bytes(data, 'little') ^ int.from_bytes(keys, 'little')).to_bytes(n, 'little')
    out = bytearray(data)
    for lane in range(4):
        k = key[lane]
        table = _WS_XOR_TABLES[k]
        if table is None:
            table = _WS_XOR_TABLES[k] = bytes(b ^ k for b in range(256))
        out[lane::4] = out[lane::4].translate(table)
    return bytes(out)


def _ws_frame(opcode, payload=b'', fin=True, mask_key=None):
    """One frame as bytes: header, then the payload (masked with `mask_key` when given; clients
    MUST mask every frame, servers MUST NOT, RFC 6455 5.1)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, 'big')
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, 'big')
    if mask_key is not None:
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
    """

    def __init__(self, client=False, max_size=_WS_MAX_SIZE, max_frame_size=None):
        self.client = client
        self.max_size = max_size
        self.max_frame_size = max_size if max_frame_size is None else max_frame_size
        self.state = WebSocketState.OPEN
        self.close_rcvd = None          # (code, reason) of the peer's close frame
        self.close_sent = None          # (code, reason) of ours
        self._buf = bytearray()
        self._need = 2                  # bytes the next parse step needs in _buf
        self._eof = False
        self._events = []
        self._out = []
        self._frag_opcode = None        # opcode of the fragmented message being assembled
        self._frag_parts = []
        self._frag_size = 0
        self._decoder = None            # incremental UTF-8 check of a fragmented text

    # -- input --------------------------------------------------------------------------------

    def receive_data(self, data):
        """Take bytes received from the peer; b'' means the stream ended."""
        if self.state is WebSocketState.CLOSED:
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def pending(self):
        """True when events() may return more without new input."""
        return self.state is not WebSocketState.CLOSED and (len(self._buf) >= self._need or self._eof)

    def events(self):
        """Parse on, up to the next whole message, and return (and forget) the events since
        the last call, oldest first."""
        if self.state is not WebSocketState.CLOSED:
            if len(self._buf) >= self._need:
                self._receive()
            if self._eof and self.state is not WebSocketState.CLOSED and len(self._buf) < self._need:
                self._frag_parts = []
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
            # Everything about the header is checked now, before waiting for its payload: a
            # 2**63-byte length or a bad opcode is refused at once, not after a stall.
            opcode = first & 0x0F
            fin = first & 0x80
            self._check_header(first, opcode, fin, masked, client, length)
            total = head + length
            if end - pos < total:
                self._need = total
                break
            # Through a memoryview, the payload is copied once, not sliced and then copied.
            with memoryview(buf) as view:
                if masked:
                    payload = _ws_mask(view[pos + head:pos + total], buf[pos + head - 4:pos + head])
                else:
                    payload = bytes(view[pos + head:pos + total])
            pos += total
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
            raise WebSocketProtocolError('reserved bits set, but no extension was negotiated')
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
            if length > self.max_frame_size:
                raise PayloadTooBig(length, self.max_frame_size, 'frame')
            if self._frag_size + length > self.max_size:
                raise PayloadTooBig(self._frag_size + length, self.max_size)

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
            if self._frag_opcode == Opcode.TEXT:
                # The decoder raises on the first invalid sequence, even mid-message: a bad
                # fragment fails the connection at once (Autobahn 6.4 checks this).
                self._frag_parts.append(self._decoder.decode(payload, bool(fin)))
            else:
                self._frag_parts.append(payload)
            if fin:
                parts = self._frag_parts
                message = (''.join(parts) if self._frag_opcode == Opcode.TEXT
                           else b''.join(parts))
                self._events.append((self._frag_opcode, message))
                self._frag_opcode = self._decoder = None
                self._frag_parts = []
                self._frag_size = 0
        elif opcode == Opcode.PING:
            # RFC 6455 5.5.2: answer with a Pong "with identical Application data".
            if self.close_sent is None:
                self._out.append(_ws_frame(Opcode.PONG, payload, mask_key=self._mask_key()))
            self._events.append((Opcode.PING, payload))
        elif opcode == Opcode.PONG:
            self._events.append((Opcode.PONG, payload))
        else:
            self._receive_close(payload)

    def _start_fragments(self, opcode, first_part, size):
        self._frag_opcode = opcode
        self._frag_parts = [first_part]
        self._frag_size = size

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

    def send(self, message):
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
        self._out.append(_ws_frame(opcode, payload, mask_key=self._mask_key()))

    def ping(self, payload=b''):
        """Queue a ping.  Raises ValueError over 125 bytes, ConnectionClosed when closing."""
        self._control(Opcode.PING, payload)

    def pong(self, payload=b''):
        """Queue an unsolicited pong (a one-way heartbeat).  Raises as ping() does."""
        self._control(Opcode.PONG, payload)

    def _control(self, opcode, payload):
        if len(payload) > 125:
            raise ValueError('a control frame carries at most 125 bytes')
        if self.close_sent is not None or self.state is WebSocketState.CLOSED:
            raise ConnectionClosed(self.close_rcvd, self.close_sent)
        self._out.append(_ws_frame(opcode, bytes(payload), mask_key=self._mask_key()))

    def close(self, code=CloseCode.NORMAL, reason=''):
        """Start the closing handshake (OPEN -> CLOSING); does nothing once closing or closed.
        Raises ValueError for a code that may not be sent or a reason over 123 bytes."""
        payload = _ws_close_payload(code, reason)
        if self.state is not WebSocketState.OPEN:
            return
        self._out.append(_ws_frame(Opcode.CLOSE, payload, mask_key=self._mask_key()))
        self.close_sent = (code, reason)
        self.state = WebSocketState.CLOSING

    def fail(self, code=CloseCode.INTERNAL_ERROR, reason=''):
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
        self._frag_parts = []
        self._events.append((Opcode.CLOSE, (code, reason)))

    def data_to_send(self):
        """Return (and forget) every queued byte as one bytes object, b'' if none."""
        out = self._out
        if not out:
            return b''
        self._out = []
        return out[0] if len(out) == 1 else b''.join(out)


# -- opening handshake (RFC 6455 section 4) -----------------------------------------------------

_WS_REASONS = {101: 'Switching Protocols', 400: 'Bad Request', 403: 'Forbidden',
               404: 'Not Found', 426: 'Upgrade Required',
               431: 'Request Header Fields Too Large', 500: 'Internal Server Error',
               503: 'Service Unavailable'}


def _ws_accept(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode('ascii') + _WS_GUID).digest()).decode('ascii')


def _ws_parse_head(head):
    """Split an HTTP/1.1 head (bytes, up to the empty line) into the three parts of its start
    line and a dict of headers (lower-case names; repeated ones joined with ', ').  Raises
    HandshakeError 400 when it is malformed, 431 when it has too many headers."""
    lines = head.decode('latin-1').split('\n')
    start = lines[0].rstrip('\r').split(' ', 2)
    if len(start) != 3:
        raise HandshakeError(400, 'malformed start line')
    headers = {}
    count = 0
    for line in lines[1:]:
        line = line.rstrip('\r')
        if not line:
            continue
        name, sep, value = line.partition(':')
        # RFC 7230 3.2.4: no whitespace before the colon, no obsolete line folding.
        if not sep or not name or name != name.strip() or line[0] in ' \t':
            raise HandshakeError(400, 'malformed header line')
        count += 1
        if count > _WS_MAX_HEADERS:
            raise HandshakeError(431, 'more than %d headers' % _WS_MAX_HEADERS)
        name = name.lower()
        value = value.strip(' \t')
        headers[name] = headers[name] + ', ' + value if name in headers else value
    return start, headers


def _ws_tokens(value):
    return [t.strip() for t in value.split(',') if t.strip()]


class _WsRequest:
    """A checked opening handshake, as the server saw it."""

    __slots__ = ('target', 'path', 'query', 'headers', 'key', 'subprotocol', 'origin')

    def __init__(self, target, headers, key, subprotocol):
        from urllib.parse import unquote
        self.target = target
        raw_path, _, self.query = target.partition('?')
        self.path = unquote(raw_path)
        self.headers = headers
        self.key = key
        self.subprotocol = subprotocol
        self.origin = headers.get('origin')


def _ws_check_request(head, subprotocols=(), origins=None):
    """Check a client's opening handshake (RFC 6455 4.2.1) and return a _WsRequest.

    The subprotocol chosen is the first of `subprotocols` (the server's preference) that the
    client offered, or None.  Raises HandshakeError: 400 for anything that is not a valid
    upgrade, 426 (with Sec-WebSocket-Version: 13) for another protocol version, 403 for an
    Origin not in `origins` (when `origins` is given)."""
    (method, target, version), headers = _ws_parse_head(head)
    path = target.partition('?')[0] or None
    if method != 'GET':
        raise HandshakeError(400, 'a websocket handshake is a GET, not %s' % method[:16], path)
    if version != 'HTTP/1.1':
        raise HandshakeError(400, 'a websocket handshake needs HTTP/1.1', path)
    if not target.startswith('/'):
        raise HandshakeError(400, 'the request target must be a path', None)
    if 'host' not in headers:
        raise HandshakeError(400, 'no Host header', path)
    if 'websocket' not in [t.lower() for t in _ws_tokens(headers.get('upgrade', ''))]:
        raise HandshakeError(400, 'not a websocket upgrade (Upgrade: websocket missing)', path)
    if 'upgrade' not in [t.lower() for t in _ws_tokens(headers.get('connection', ''))]:
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
    offered = _ws_tokens(headers.get('sec-websocket-protocol', ''))
    chosen = next((p for p in subprotocols or () if p in offered), None)
    return _WsRequest(target, headers, key, chosen)


def _ws_accept_response(request):
    """The 101 answer to a checked request, as bytes (no extension is ever accepted)."""
    lines = ['HTTP/1.1 101 Switching Protocols', 'Upgrade: websocket', 'Connection: Upgrade',
             'Sec-WebSocket-Accept: ' + _ws_accept(request.key)]
    if request.subprotocol:
        lines.append('Sec-WebSocket-Protocol: ' + request.subprotocol)
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def _ws_error_response(error):
    """The HTTP answer that refuses a handshake, from a HandshakeError, as bytes."""
    body = (error.message + '\n').encode('utf-8')
    lines = ['HTTP/1.1 %d %s' % (error.status, _WS_REASONS.get(error.status, 'Error')),
             'Content-Type: text/plain; charset=utf-8', 'Content-Length: %d' % len(body),
             'Connection: close']
    lines += ['%s: %s' % item for item in error.headers.items()]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


def _ws_client_request(host, target, key, subprotocols=None, origin=None, headers=None):
    """The client's opening handshake as bytes."""
    lines = ['GET %s HTTP/1.1' % target, 'Host: ' + host, 'Upgrade: websocket',
             'Connection: Upgrade', 'Sec-WebSocket-Key: ' + key,
             'Sec-WebSocket-Version: ' + _WS_VERSION]
    if subprotocols:
        lines.append('Sec-WebSocket-Protocol: ' + ', '.join(subprotocols))
    if origin:
        lines.append('Origin: ' + origin)
    lines += ['%s: %s' % item for item in (headers or {}).items()]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def _ws_check_response(head, key, target, subprotocols=None):
    """Check the server's answer to our handshake (RFC 6455 4.1) and return the subprotocol
    it chose, or None.  Raises HandshakeError naming `target` and the status when the server
    refused, or when its 101 is not a valid websocket answer."""
    path = target.partition('?')[0]
    try:
        (version, status, reason), headers = _ws_parse_head(head)
        status = int(status)
    except (HandshakeError, ValueError):
        raise HandshakeError(0, 'the answer is not HTTP', path) from None
    if status != 101:
        raise HandshakeError(status, reason.strip() or 'refused', path)
    if 'websocket' not in [t.lower() for t in _ws_tokens(headers.get('upgrade', ''))]:
        raise HandshakeError(status, 'answer without Upgrade: websocket', path)
    if 'upgrade' not in [t.lower() for t in _ws_tokens(headers.get('connection', ''))]:
        raise HandshakeError(status, 'answer without Connection: Upgrade', path)
    if headers.get('sec-websocket-accept', '').strip() != _ws_accept(key):
        raise HandshakeError(status, 'wrong Sec-WebSocket-Accept', path)
    if headers.get('sec-websocket-extensions'):
        raise HandshakeError(status, 'the server chose an extension we did not offer', path)
    chosen = headers.get('sec-websocket-protocol', '').strip() or None
    if chosen is not None and chosen not in (subprotocols or ()):
        raise HandshakeError(status, 'the server chose a subprotocol we did not offer', path)
    return chosen


# ###########################################################################################
# 8. WebSocket I/O: SocketServer and SocketClient
# ###########################################################################################

# The shell around WebSocketProtocol.  The thread that calls recv() is the one that reads the
# socket (no reader thread per connection, no hand-off between threads on the hot path), so
# pings are answered and keep-alive pings sent whenever someone waits for a message; a
# server connection always has someone waiting, its own thread, between handler calls.

_WS_RECV_SIZE = 262144          # one recv_into() takes up to 256 KiB
_WS_WRITE_TIMEOUT = 60.0        # a peer that takes no byte for a minute is gone


class WebSocket:
    """One open websocket connection, client or server side.

    SocketClient() returns one; a render handler written with `def` gets one (an `async def`
    handler gets the same thing with awaitable methods).

      send(message)             str as a text message, bytes as a binary one
      recv(timeout=None)        the next message, str or bytes
      ping(data=None)           a threading.Event, set when the pong comes back
      close(code=1000, reason='')
      for message in ws: ...    messages until the connection closes normally
      with ws: ...              closes it on the way out

    send, ping and close may be called from any thread, also while another one waits in
    recv(); one thread receives at a time.  Attributes: path, query, headers, origin,
    subprotocol, remote_address, closed, close_code, close_reason.
    """

    def __init__(self, sock, protocol, *, path='/', query='', headers=None, subprotocol=None,
                 remote_address=None, leftover=b'', ping_interval=_WS_PING_INTERVAL,
                 ping_timeout=_WS_PING_TIMEOUT, close_timeout=_WS_CLOSE_TIMEOUT):
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
            import select
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        except (ImportError, AttributeError):   # Windows has no poll()
            self._poller = None
        sock.settimeout(_WS_WRITE_TIMEOUT)
        if leftover:
            self._feed(leftover)

    # -- receiving ----------------------------------------------------------------------------

    def recv(self, timeout=None):
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

    def __iter__(self):
        while True:
            try:
                yield self.recv()
            except ConnectionClosed as exc:
                if exc.ok:
                    return
                raise

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
        import select
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

    def send(self, message):
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

    def ping(self, data=None):
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

    @property
    def closed(self):
        return self._closed is not None

    @property
    def close_code(self):
        return None if self._closed is None else self._closed.code

    @property
    def close_reason(self):
        return None if self._closed is None else self._closed.reason

    def close(self, code=CloseCode.NORMAL, reason=''):
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

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = 'closed %s' % self.close_code if self.closed else 'open'
        return '<WebSocket %s %s %s>' % ('client' if self._client else 'server', self.path, state)


class _AsyncWebSocket:
    """What an `async def` render handler gets: the connection, with awaitable send, recv,
    ping and close.  recv() is served by the connection's own thread (it reads the socket
    while the coroutine awaits a future), so a waiting handler never blocks the shared loop;
    send() and the others run in the loop's executor."""

    def __init__(self, conn, loop, requests):
        self._conn = conn
        self._loop = loop
        self._requests = requests

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def recv(self, timeout=None):
        future = self._loop.create_future()
        self._requests.put((future, timeout))
        return await future

    async def send(self, message):
        await self._loop.run_in_executor(None, self._conn.send, message)

    async def ping(self, data=None):
        return await self._loop.run_in_executor(None, self._conn.ping, data)

    async def close(self, code=CloseCode.NORMAL, reason=''):
        await self._loop.run_in_executor(None, self._conn.close, code, reason)

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed as exc:
                if exc.ok:
                    return
                raise


def _ws_settle(future, value, error):
    if not future.done():
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


def _ws_reply(value):
    """A router handler's return value as a message: str and bytes as they are, anything else
    as JSON text (0.3.7 could only send str)."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


class _WsRequestHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.ws._serve_connection(self.request, self.client_address)


class _WsTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True           # a connection never keeps the process alive on its own
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 1024       # the listen backlog; socketserver's 5 is for toy loads

    def __init__(self, address, ws, family):
        self.address_family = family
        self.ws = ws
        super().__init__(address, _WsRequestHandler)

    def handle_error(self, request, client_address):
        log.exception('websocket connection from %s failed', client_address)


# Servers started with run(), for Ctrl+C and for the command line's `serve`.
_ws_running = set()
_ws_running_lock = threading.Lock()


def _ws_on_sigint(signum, frame):
    """Ctrl+C while websocket servers run: stop them, then do what Python's default handler
    does (KeyboardInterrupt in the main thread).  When the main thread has already finished
    (a script that only called sk.run(), the interpreter waiting for the serving thread),
    there is nobody to interrupt: stopping is the whole answer, and the process then exits
    cleanly instead of printing a traceback from inside the interpreter's shutdown."""
    servers = list(_ws_running)
    if not threading.main_thread().is_alive():
        for server in servers:
            if not server._stopping:      # a second Ctrl+C must not wait on the first
                server.stop()
        return
    for server in servers:
        threading.Thread(target=server.stop, name='mconnector-ws-stop').start()
    import signal
    signal.default_int_handler(signum, frame)


def _ws_install_sigint():
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        # Only Python's own handler is replaced (and only chained to): a program that set
        # its own keeps it.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _ws_on_sigint)
    except (ValueError, OSError):
        pass


def _ws_restore_sigint():
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGINT) is _ws_on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):
        pass


def _ws_stop_all(timeout=None):
    """Stop every websocket server started with run() (for the command line and the
    Microservice's run(), when it returns)."""
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
    `max_frame_size` (default: max_size), `handshake_timeout` (10 s), `ping_interval` and
    `ping_timeout` (20 s each; None turns keep-alive off), `close_timeout` (10 s),
    `ssl_context` (serve wss://).
    """

    def __init__(self, name=None, *, subprotocols=None, origins=None, max_size=_WS_MAX_SIZE,
                 max_frame_size=None, handshake_timeout=_WS_HANDSHAKE_TIMEOUT,
                 ping_interval=_WS_PING_INTERVAL, ping_timeout=_WS_PING_TIMEOUT,
                 close_timeout=_WS_CLOSE_TIMEOUT, ssl_context=None):
        self.name = name
        self.subprotocols = list(subprotocols or ())
        self.origins = None if origins is None else set(origins)
        self.max_size = max_size
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.ssl_context = ssl_context
        self.routes = Router()
        self.connections = set()
        self._server = None
        self._thread = None
        self._wake = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()       # the accept loop has ended
        self._stop_done = threading.Event()     # stop() has finished

    # -- routes -------------------------------------------------------------------------------

    def router(self, rule):
        """Decorator: call the function for every message on `rule`, as f(message, *params)."""
        def decorate(handler):
            self.add_route(rule, handler)
            return handler
        return decorate

    route = router

    def render(self, rule):
        """Decorator: call the function once per connection on `rule`, after its first
        message, as f(ws, message, *params); it talks on `ws` as it likes."""
        def decorate(handler):
            self.add_route(rule, handler, render=True)
            return handler
        return decorate

    def add_route(self, rule, handler, render=False):
        """Route `rule` to `handler` (a router handler, or a render one).  Raises RouteError
        for a malformed rule."""
        self.routes.add(rule, (handler, render))

    # -- serving ------------------------------------------------------------------------------

    @property
    def server_address(self):
        return None if self._server is None else self._server.server_address[:2]

    @property
    def port(self):
        return None if self._server is None else self._server.server_address[1]

    def _bind(self, host, port):
        with self._lock:
            if self._server is not None:
                raise RuntimeError('this SocketServer is already running')
            family = socket.AF_INET6 if ':' in host else socket.AF_INET
            self._server = _WsTCPServer((host, port), self, family)
            self._wake = socket.socketpair()
            self._stopping = False
            self._stopped.clear()
            self._stop_done.clear()

    def run(self, host='127.0.0.1', port=8765):
        """Start serving on host:port (port 0: any free port, see .port) in a background
        thread and return self at once.  That thread keeps the process alive until stop() or
        Ctrl+C, so a script that only calls run() serves until interrupted.  Raises OSError
        when the address cannot be bound, RuntimeError when already running."""
        self._bind(host, port)
        with _ws_running_lock:
            _ws_running.add(self)
        _ws_install_sigint()
        self._thread = threading.Thread(target=self._serve, name='mconnector-ws-%d' % self.port)
        self._thread.start()
        log.info('websocket server %s on ws://%s:%d', self.name or '', host, self.port)
        return self

    def serve_forever(self, host='127.0.0.1', port=8765):
        """Serve in this thread until stop() or Ctrl+C (which stops the server and returns).
        When run() already started it, wait for it to stop instead."""
        try:
            if self._thread is not None:
                while self._thread.is_alive():
                    self._thread.join(0.5)
                return
            self._bind(host, port)
            log.info('websocket server %s on ws://%s:%d', self.name or '', host, self.port)
            self._serve()
        except KeyboardInterrupt:
            self.stop()

    def _serve(self):
        import selectors
        server = self._server
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(server.socket, selectors.EVENT_READ)
                selector.register(self._wake[0], selectors.EVENT_READ)
                while not self._stopping:
                    for key, _ in selector.select():
                        if key.fileobj is not server.socket:
                            break
                        try:
                            request, address = server.get_request()
                        except OSError:
                            continue
                        try:
                            server.process_request(request, address)
                        except Exception:       # e.g. no thread can be started: drop it
                            server.handle_error(request, address)
                            server.shutdown_request(request)
        finally:
            server.server_close()
            self._stopped.set()

    def stop(self, timeout=None):
        """Stop listening, close every connection with 1001 (going away), wait up to
        `timeout` seconds (default close_timeout) for their closing handshakes, then drop
        whatever is left.  Returns once stopped; calling it again does nothing."""
        with self._lock:
            running, already = self._server is not None, self._stopping
            self._stopping = True
        if not running:
            return
        if already:
            self._stop_done.wait()
            return
        timeout = self.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            self._wake[1].send(b'x')
        except OSError:
            pass
        connections = list(self.connections)
        for conn in connections:
            if not conn._start_close(CloseCode.GOING_AWAY, 'server shutting down', 1.0):
                conn._abort()
            task = getattr(conn, '_task', None)
            if task is not None:
                task.cancel()
        for conn in connections:
            if not conn._done.wait(max(0.0, deadline - time.monotonic())):
                conn._abort()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        else:
            self._stopped.wait(max(0.1, deadline - time.monotonic()))
        for s in self._wake:
            s.close()
        with _ws_running_lock:
            _ws_running.discard(self)
            if not _ws_running:
                _ws_restore_sigint()
        with self._lock:
            self._server = None
            self._thread = None
        self._stop_done.set()
        log.info('websocket server %s stopped', self.name or '')

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # -- one connection, on its own thread ----------------------------------------------------

    def _serve_connection(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + self.handshake_timeout
        try:
            if self.ssl_context is not None:
                sock.settimeout(self.handshake_timeout)
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            head, leftover = _ws_read_head(sock, deadline)
        except (OSError, ValueError) as exc:
            log.debug('websocket handshake from %s dropped: %s', address, exc)
            return
        try:
            request = _ws_check_request(head, self.subprotocols, self.origins)
            target, params = self.routes.find(request.path)
            if target is None:
                raise HandshakeError(404, 'no websocket route for %s' % request.path, request.path)
            if self._stopping:
                raise HandshakeError(503, 'the server is stopping', request.path)
            sock.sendall(_ws_accept_response(request))
        except HandshakeError as exc:
            log.info('%s: %s', address[0], exc)
            try:
                sock.sendall(_ws_error_response(exc))
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        except OSError:
            return
        protocol = WebSocketProtocol(False, self.max_size, self.max_frame_size)
        conn = WebSocket(sock, protocol, path=request.path, query=request.query,
                         headers=request.headers, subprotocol=request.subprotocol,
                         remote_address=address, leftover=leftover,
                         ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                         close_timeout=self.close_timeout)
        self.connections.add(conn)
        try:
            self._dispatch(conn, target[0], target[1], tuple(params.values()))
        finally:
            self.connections.discard(conn)
            if not conn._done.is_set():
                conn._abort()

    def _dispatch(self, conn, handler, render, args):
        try:
            if render:
                message = conn.recv()
                if inspect.iscoroutinefunction(handler):
                    self._render_async(conn, handler, message, args)
                else:
                    handler(conn, message, *args)
            else:
                while True:
                    message = conn.recv()
                    reply = _call(handler, message, *args)
                    if reply is not None:
                        conn.send(_ws_reply(reply))
                    if message == 'exit':
                        break
            conn.close(CloseCode.NORMAL)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception('websocket handler %s for %s failed',
                          getattr(handler, '__name__', handler), conn.path)
            conn.close(CloseCode.INTERNAL_ERROR)

    def _render_async(self, conn, handler, message, args):
        """Run an async render handler on the shared loop while this thread serves its
        recv() calls, one at a time, in the order the handler made them."""
        import asyncio
        loop = _event_loop()
        requests = queue.SimpleQueue()
        ws = _AsyncWebSocket(conn, loop, requests)
        task = asyncio.run_coroutine_threadsafe(_as_coroutine(handler(ws, message, *args)), loop)
        conn._task = task
        task.add_done_callback(lambda _: requests.put(None))
        while True:
            item = requests.get()
            if item is None:
                break
            future, timeout = item
            try:
                value, error = conn.recv(timeout), None
            except Exception as exc:
                value, error = None, exc
            loop.call_soon_threadsafe(_ws_settle, future, value, error)
        if not task.cancelled():      # cancelled by stop(): nothing to report
            task.result()


def _ws_read_head(sock, deadline):
    """Read an HTTP head (up to the empty line) from `sock` before `deadline`; return it and
    the bytes that came after it.  Raises OSError (socket.timeout) when the peer is too slow
    or leaves, ValueError when the head is over _WS_MAX_HEAD."""
    data = bytearray()
    while True:
        end = data.find(b'\r\n\r\n')
        if end >= 0:
            return bytes(data[:end + 4]), bytes(data[end + 4:])
        if len(data) > _WS_MAX_HEAD:
            raise ValueError('handshake head over %d bytes' % _WS_MAX_HEAD)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout('handshake timeout')
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError('the peer left during the handshake')
        data += chunk


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
    port = parts.port or (443 if secure else 80)
    target = (parts.path or '/') + ('?' + parts.query if parts.query else '')
    shown = '[%s]' % host if ':' in host else host
    host_header = shown if port == (443 if secure else 80) else '%s:%d' % (shown, port)
    return secure, host, port, target, host_header


def _ws_connect(url, *, timeout=_WS_HANDSHAKE_TIMEOUT, subprotocols=None, origin=None,
                headers=None, ssl_context=None, max_size=_WS_MAX_SIZE, max_frame_size=None,
                ping_interval=_WS_PING_INTERVAL, ping_timeout=_WS_PING_TIMEOUT,
                close_timeout=_WS_CLOSE_TIMEOUT):
    secure, host, port, target, host_header = _ws_split_url(url)
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
        sock.sendall(_ws_client_request(host_header, target, key, subprotocols, origin, headers))
        head, leftover = _ws_read_head(sock, deadline)
        chosen = _ws_check_response(head, key, target, subprotocols)
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
    protocol = WebSocketProtocol(True, max_size, max_frame_size)
    return WebSocket(sock, protocol, path=unquote(raw_path), query=query, subprotocol=chosen,
                     remote_address=sock.getpeername()[:2], leftover=leftover,
                     ping_interval=ping_interval, ping_timeout=ping_timeout,
                     close_timeout=close_timeout)


def SocketClient(host='localhost:8765', url='/', **options):
    """Open a websocket connection to ws://HOST{url} and return it (a WebSocket).

    `host` is 'HOST:PORT' as in 0.3.7, or a whole ws:// or wss:// URL (then `url`, when not
    '/', is appended to it).  Options: timeout (for the TCP connection and the handshake,
    10 s), subprotocols, origin, headers (extra request headers), ssl_context (for wss://),
    max_size, max_frame_size, ping_interval, ping_timeout, close_timeout.

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
        print('mconnector ws: %s' % exc, file=sys.stderr)
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
            print('mconnector ws: %s' % exc, file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        conn.close()
        return 130
    return 0 if conn.close_code in (CloseCode.NORMAL, CloseCode.GOING_AWAY) else 1


# ###########################################################################################
# 9. Pools: ordered per key over any Executor
# ###########################################################################################

# (pools: issue 3)


# ###########################################################################################
# 10. Command line
# ###########################################################################################

# (filled in below)
