"""Tests for mconnector: real listeners on loopback (port 0), real senders, real bytes.

Run with:  python -m unittest -v test_mconnector
"""

import ast
import concurrent.futures
import functools
import json
import os
import queue
import random
import shutil
import re
import socket
import subprocess
import sys
import threading
import time
import unittest
import unittest.mock

import mconnector
from mconnector import Friend, Microservice


HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for(predicate, timeout=5.0, interval=0.005):
    """Poll `predicate` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ==========================================================================================
# Routing
# ==========================================================================================


class RuleTest(unittest.TestCase):
    def test_sanic_and_flask_styles(self):
        r = mconnector.Rule('/item/<id:int>/<int:x>/<name>/<p:path>')
        self.assertEqual(r.match('/item/3/-4/bob/a/b'), {'id': 3, 'x': -4, 'name': 'bob', 'p': 'a/b'})
        self.assertIsNone(r.match('/item/x/4/bob/a'))

    def test_typed_parameters(self):
        self.assertEqual(mconnector.Rule('/n/<v:number>').match('/n/2.5'), {'v': 2.5})
        self.assertIsNone(mconnector.Rule('/a/<v:alpha>').match('/a/ab1'))
        u = '12345678-1234-1234-1234-123456789abc'
        import uuid
        self.assertEqual(mconnector.Rule('/u/<v:uuid>').match('/u/' + u), {'v': uuid.UUID(u)})
        self.assertEqual(mconnector.Rule('/r/<c:[a-z]{3}>').match('/r/abc'), {'c': 'abc'})
        self.assertIsNone(mconnector.Rule('/r/<c:[a-z]{3}>').match('/r/abcd'))

    def test_bad_rules(self):
        for bad in ('nope', '/x/<1a>', '/x/<a>/<a>', '/x/<a:(b)>', '/x/<a:[>'):
            with self.assertRaises(mconnector.RouteError, msg=bad):
                mconnector.Rule(bad)


# ==========================================================================================
# Values, HTTP, listener, sender, command line
# ==========================================================================================

class Service:
    """A live listener on 127.0.0.1, port 0, for one test; stopped by the test's cleanup.

    Test classes whose `shell` is 'wsgi' get the listener through its WSGI entry, served by
    the standard library's wsgiref (threaded), instead of the built-in server."""

    @staticmethod
    def start(test, service, **friend_options):
        if getattr(test, 'shell', 'builtin') == 'wsgi':
            serve_wsgi(test, service)
        else:
            service.start(port=0, host='127.0.0.1')
            test.addCleanup(service.stop)
        friend = Friend('test', service.url, **friend_options)
        test.addCleanup(friend.close)
        return friend


def serve_wsgi(test, app):
    """Serve the WSGI application `app` (a Microservice) with wsgiref on 127.0.0.1, port 0,
    until the test's cleanup; sets app.host and app.port so that app.url points at it."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass
    server = Server(('127.0.0.1', 0), Quiet)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05})
    thread.start()
    test.addCleanup(thread.join)
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    app.host, app.port = '127.0.0.1', server.server_port
    return server


def builtin_server_only(test_method):
    """For what the HTTP server itself does (parsing heads, keep-alive, 100-continue):
    under WSGI, that is the WSGI server's job, not the listener's."""
    @functools.wraps(test_method)
    def test(self):
        if getattr(self, 'shell', 'builtin') != 'builtin':
            self.skipTest('the HTTP layer is the WSGI server\'s own')
        return test_method(self)
    return test


def status_of(reply):
    """The status code of a raw HTTP reply (HTTP/1.1 from the built-in server, HTTP/1.0
    from wsgiref)."""
    return int(reply[9:12]) if reply[:7] == b'HTTP/1.' else None


def raw_request(port, data, read_until_close=True, timeout=5):
    """Send raw bytes to 127.0.0.1:port and return what comes back (until close)."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and b'\r\n\r\n' in b''.join(chunks):
                break
        return b''.join(chunks)


def load_example(name):
    """Import examples/NAME.py as a module (its prints silenced), as `serve` would."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location('example_' + name,
                                                  os.path.join(HERE, 'examples', name + '.py'))
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    return module


class CodecTest(unittest.TestCase):
    """Values on the wire: the 0.3.7 layout, and type notes between mconnector peers."""

    def round_trip(self, value):
        notes = []
        data = json.loads(json.dumps(mconnector.to_wire(value, notes)))
        return mconnector.from_wire(data, json.loads(json.dumps(notes)))

    def test_plain_values_pass_unchanged(self):
        value = {'s': 'x', 'i': 1, 'f': 2.5, 'b': True, 'n': None, 'l': [1, [2]], 'd': {'k': {}}}
        notes = []
        self.assertEqual(mconnector.to_wire(value, notes), value)
        self.assertEqual(notes, [])

    def test_objects_travel_as_their_public_attributes(self):
        class Thing:
            kind = 'k'
            empty = None
            def __init__(self, value):
                self.value = value
            def method(self):
                pass
        wire = mconnector.to_wire([Thing(Thing(1))])
        self.assertEqual(wire, [{'empty': None, 'kind': 'k',
                                 'value': {'empty': None, 'kind': 'k', 'value': 1}}])

    def test_types_json_loses_are_restored(self):
        import datetime
        import decimal
        import uuid
        value = {'t': (1, (2, 3)), 's': {1, 2}, 'fs': frozenset({(1, 2)}), 'b': b'\x00\xff',
                 'dt': datetime.datetime(2020, 1, 2, 3, 4, 5, 6), 'd': datetime.date(2020, 1, 2),
                 'tm': datetime.time(1, 2, 3), 'td': datetime.timedelta(seconds=1.5),
                 'dec': decimal.Decimal('1.10'), 'u': uuid.UUID(int=5), 'l': [(1,), {'x': (2,)}]}
        self.assertEqual(self.round_trip(value), value)
        self.assertIsInstance(self.round_trip(value)['l'][0], tuple)

    def test_registered_class_is_rebuilt_recursively(self):
        @mconnector.register
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
            def __eq__(self, other):
                return type(other) is Point and (self.x, self.y) == (other.x, other.y)
        value = [Point(1, Point(2, 3)), {'p': Point((4,), None)}]
        self.assertEqual(self.round_trip(value), value)

    def test_degraded_form_for_plain_json_peers(self):
        import datetime
        wire = mconnector.to_wire({'t': (1, 2), 'b': b'hi', 'd': datetime.date(2020, 1, 2)})
        self.assertEqual(wire, {'t': [1, 2], 'b': 'aGk=', 'd': '2020-01-02'})

    def test_bad_notes_and_cycles_are_clear_errors(self):
        for data, notes in (([1], [[[0], 'tuple']]), ([1], [[[5], 'set']]), ({}, 'x'),
                            (['x'], [[[0], 'bytes']]), ([1], [[[0], 'pickle']])):
            with self.assertRaises(mconnector.CodecError, msg=notes):
                mconnector.from_wire(data, notes)
        loop = []
        loop.append(loop)
        with self.assertRaises(mconnector.CodecError):
            mconnector.to_wire(loop)
        for body in (b'{', b'\xff', b'[' * 100000):
            with self.assertRaises(mconnector.CodecError):
                mconnector.loads(body)


class HTTPCoreTest(unittest.TestCase):
    """The sans-I/O HTTP pieces, on bytes."""

    def test_request_line(self):
        self.assertEqual(mconnector.parse_request_line(b'POST /a?b=1 HTTP/1.1\r\n'),
                         ('POST', '/a?b=1', (1, 1)))
        for bad, status in ((b'GET /\r\n', 400), (b'GET  / HTTP/1.1\r\n', 400),
                            (b'GET / HTTP/2.0\r\n', 505), (b'G(T / HTTP/1.1\r\n', 400),
                            (b'GET x HTTP/1.1\r\n', 400), (b'GET / HTTP/1.10\r\n', 400),
                            (b'\xff / HTTP/1.1\r\n', 400)):
            with self.assertRaises(mconnector.HTTPError, msg=bad) as caught:
                mconnector.parse_request_line(bad)
            self.assertEqual(caught.exception.status, status)

    def test_header_lines(self):
        headers = {}
        mconnector.parse_header_line(b'Content-Type: application/json\r\n', headers)
        mconnector.parse_header_line(b'X-A: 1\r\n', headers)
        mconnector.parse_header_line(b'x-a:2 \r\n', headers)
        self.assertEqual(headers, {'content-type': 'application/json', 'x-a': '1, 2'})
        for bad in (b'no colon\r\n', b' folded: x\r\n', b'Bad Name: x\r\n', b'X: a\x00b\r\n'):
            with self.assertRaises(mconnector.HTTPError, msg=bad):
                mconnector.parse_header_line(bad, {})

    def test_header_block_agrees_with_the_line_parser(self):
        rng = random.Random(9112)
        names = [b'Host', b'X-A', b'x-a', b'Content-Length', b'a.b~c', b'Accept']
        for _ in range(300):
            lines = [b'%s:%s%s%s\r\n' % (rng.choice(names), rng.choice([b'', b' ', b'\t ']),
                                          bytes(rng.choice(b'abc ,;=\x80\xff') for _ in range(rng.randint(0, 12))),
                                          rng.choice([b'', b' ']))
                     for _ in range(rng.randint(0, 6))]
            expected = {}
            for line in lines:
                mconnector.parse_header_line(line, expected)
            self.assertEqual(mconnector.parse_header_block(b''.join(lines) + b'\r\n'), expected)
        for bad, status in ((b'X: 1\r\n', 400), (b'X:1\r\nBad Name: 2\r\n\r\n', 400),
                            (b'X: ' + b'a' * 9000 + b'\r\n\r\n', 431),
                            (b'X: 1\r\n' * 101 + b'\r\n', 431)):
            with self.assertRaises(mconnector.HTTPError) as caught:
                mconnector.parse_header_block(bad)
            self.assertEqual(caught.exception.status, status, bad[:30])

# ==========================================================================================
# HTTP/1.1 core, by RFC section
# ==========================================================================================

H1_STOPS = (mconnector.END_OF_MESSAGE, mconnector.PAUSED, mconnector.CLOSED)


def h1_feed(conn, data, eof=False, step=None):
    """Feed `data` to `conn` (at once, or `step` bytes at a time; then the end of input if
    `eof`; b'' alone feeds nothing) and collect its events up to the first END_OF_MESSAGE,
    PAUSED or CLOSED, or a final NEED_DATA when the input ran out first.  NEED_DATA between
    pieces is left out."""
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    pieces = [piece for piece in pieces if piece] + ([b''] if eof else [])
    events = []
    for piece in pieces or [None]:         # no data: the events of what is buffered
        if piece is not None:
            conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is mconnector.NEED_DATA:
                break
            events.append(event)
            if event in H1_STOPS:
                return events
    events.append(mconnector.NEED_DATA)
    return events


def h1_server(data, eof=False, step=None, **options):
    """A server-role connection fed `data`: (connection, events)."""
    conn = mconnector.HTTPConnection(**options)
    return conn, h1_feed(conn, data, eof, step)


def h1_client(data, method='GET', eof=False, step=None, **options):
    """A client-role connection that sent `method /` and was answered `data`."""
    conn = mconnector.HTTPConnection(client=True, **options)
    conn.send_request(method, '/', [('Host', 'example.com')])
    return conn, h1_feed(conn, data, eof, step)


def h1_head_and_body(events):
    """The head event and the body bytes of one complete message's events."""
    pieces = events[1:-1]
    if events[-1] is not mconnector.END_OF_MESSAGE or not all(
            type(piece) is bytes and piece for piece in pieces):
        raise AssertionError('not one whole message: %r' % (events[:6],))
    return events[0], b''.join(pieces)


def h1_chunked(*chunks, trailer=b''):
    """A chunked body of the given data pieces."""
    return b''.join(b'%x\r\n%s\r\n' % (len(c), c) for c in chunks) + b'0\r\n' + trailer + b'\r\n'


POST_CHUNKED = b'POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n'


def h1_post(length, body=b'', extra=b''):
    return b'POST /up HTTP/1.1\r\nHost: a\r\n%sContent-Length: %s\r\n\r\n%s' % (
        extra, length if isinstance(length, bytes) else str(length).encode(), body)


class H1Case(unittest.TestCase):
    """assertRefused / assertAccepted for the RFC 9112 classes below."""

    def assertRefused(self, data, status, word=None, eof=False, step=None, client=False,
                      method='GET', **options):
        """Feeding `data` raises HTTPError with `status` (None: client role), its message
        containing `word`; returns the exception."""
        with self.assertRaises(mconnector.HTTPError, msg=bytes(data[:80])) as caught:
            if client:
                h1_client(data, method, eof, step, **options)
            else:
                h1_server(data, eof, step, **options)
        exc = caught.exception
        self.assertEqual(exc.status, status, '%r: %s' % (bytes(data[:80]), exc))
        if word is not None:
            self.assertIn(word, str(exc))
        return exc

    def assertAccepted(self, data, step=None, **options):
        """`data` is one whole request: returns (head, body, connection)."""
        conn, events = h1_server(data, step=step, **options)
        self.assertIsInstance(events[0], mconnector.RequestHead, events)
        head, body = h1_head_and_body(events)
        return head, body, conn


class RFC9112Section2_2MessageParsingTest(H1Case):
    """Message parsing: robustness the RFC asks for, and what it asks to refuse."""

    def test_empty_lines_before_the_request_line_are_ignored(self):
        head, body, _ = self.assertAccepted(b'\r\n\r\n\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n')
        self.assertEqual((head.method, head.target, head.version), ('GET', '/a', (1, 1)))
        head, _, _ = self.assertAccepted(b'\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n', step=1)
        self.assertEqual(head.target, '/b')

    def test_only_empty_lines_then_end_of_input_is_a_clean_close(self):
        conn, events = h1_server(b'\r\n\r\n', eof=True)
        self.assertEqual(events, [mconnector.CLOSED])
        self.assertFalse(conn.keep_alive)

    def test_bare_lf_is_tolerated_as_a_line_end_in_heads(self):
        data = b'POST /x HTTP/1.1\nHost: a\nX-A:  1 \nContent-Length: 2\n\nok'
        for step in (None, 1):
            head, body, _ = self.assertAccepted(data, step=step)
            self.assertEqual(head.headers, {'host': 'a', 'x-a': '1', 'content-length': '2'})
            self.assertEqual(body, b'ok')

    def test_whitespace_between_start_line_and_first_field_is_refused(self):
        self.assertRefused(b'GET / HTTP/1.1\r\n Host: a\r\n\r\n', 400, 'malformed header')
        self.assertRefused(b'GET / HTTP/1.1\r\n\tHost: a\r\n\r\n', 400)

    def test_bare_cr_in_a_field_is_refused(self):
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n', 400, 'control')

    def test_end_of_input_inside_a_head_is_400(self):
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\n', 400, 'middle of a head', eof=True)

    def test_a_refused_head_closes_the_connection(self):
        conn = mconnector.HTTPConnection()
        conn.receive_data(b'GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n')
        with self.assertRaises(mconnector.HTTPError):
            conn.next_event()
        self.assertFalse(conn.keep_alive)
        self.assertIs(conn.next_event(), mconnector.CLOSED)   # the rest is not a request
        self.assertIn(b'\r\nConnection: close\r\n', conn.send_response(400, [], b'bad'))

    def test_byte_at_a_time_heads_parse_as_whole_ones(self):
        data = (b'\r\nPUT /p?q=1 HTTP/1.1\r\nHost: h\r\nX-Multi: a\r\nx-multi: b\r\n'
                b'Content-Length: 5\r\n\r\nhello')
        whole = self.assertAccepted(data)
        split = self.assertAccepted(data, step=1)
        self.assertEqual(whole[0].headers, split[0].headers)
        self.assertEqual(whole[0].headers['x-multi'], 'a, b')
        self.assertEqual((whole[1], split[1]), (b'hello', b'hello'))


class RFC9112Section3RequestLineTest(H1Case):
    """request-line = method SP request-target SP HTTP-version."""

    def test_request_target_forms(self):
        for target in (b'/a/b?c=d&e', b'*', b'http://example.com/x'):
            head, _, _ = self.assertAccepted(b'OPTIONS %s HTTP/1.1\r\nHost: a\r\n\r\n' % target)
            self.assertEqual(head.target, target.decode())

    def test_control_characters_and_spaces_in_the_target_are_400(self):
        for char in (b'\x00', b'\x1b', b'\x7f', b' ', b'\t', b'\x01', b'\xe9'):
            self.assertRefused(b'GET /a%sb HTTP/1.1\r\nHost: a\r\n\r\n' % char, 400)
        self.assertRefused(b'GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n', 400, 'control character')

    def test_major_version_other_than_1_is_505(self):
        for version in (b'HTTP/2.0', b'HTTP/3.0', b'HTTP/0.9'):
            self.assertRefused(b'GET / %s\r\nHost: a\r\n\r\n' % version, 505, 'HTTP/1')

    def test_malformed_versions_are_400(self):
        for version in (b'http/1.1', b'HTTP/1', b'HTTP/1.1.1', b'HTTP/11', b'HTTP/1.x', b'HTTX/1.1'):
            self.assertRefused(b'GET / %s\r\nHost: a\r\n\r\n' % version, 400)

    def test_http_1_0_request_line(self):
        head, _, _ = self.assertAccepted(b'GET / HTTP/1.0\r\n\r\n')
        self.assertEqual(head.version, (1, 0))

    def test_request_line_of_8000_octets_is_accepted(self):
        # RFC 9112 3: recipients are RECOMMENDED to support request lines of 8000 octets.
        target = b'/' + b'a' * (8000 - len(b'GET / HTTP/1.1\r\n'))
        head, _, _ = self.assertAccepted(b'GET %s HTTP/1.1\r\nHost: a\r\n\r\n' % target)
        self.assertEqual(len(head.target), len(target))

    def test_request_line_over_8192_bytes_is_414_before_the_head_ends(self):
        self.assertRefused(b'GET /' + b'a' * 9000, 414, 'too long')
        self.assertRefused(b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\nHost: a\r\n\r\n', 414)
        self.assertRefused(b'GET /' + b'a' * 9000, 414, step=1000)

    def test_a_long_header_line_is_not_414(self):
        data = b'GET / HTTP/1.1\r\nHost: a\r\nX: ' + b'a' * 9000
        conn, events = h1_server(data)
        self.assertEqual(events, [mconnector.NEED_DATA])
        self.assertRefused(data + b'\r\n\r\n', 431)


class RFC9112Section3_2HostTest(H1Case):
    def test_http_1_1_without_host_is_400(self):
        self.assertRefused(b'GET / HTTP/1.1\r\nX: 1\r\n\r\n', 400, 'Host')

    def test_two_host_lines_are_400(self):
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400, 'Host')
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n', 400, 'Host')
        self.assertRefused(b'GET / HTTP/1.1\r\nHost:\r\nHost:\r\n\r\n', 400)

    def test_http_1_0_without_host_is_accepted(self):
        head, body, _ = self.assertAccepted(b'GET /old HTTP/1.0\r\n\r\n')
        self.assertNotIn('host', head.headers)

    def test_empty_host_is_accepted(self):
        # RFC 9110 7.2: a target URI without authority is sent with an empty Host.
        head, _, _ = self.assertAccepted(b'GET / HTTP/1.1\r\nHost:\r\n\r\n')
        self.assertEqual(head.headers['host'], '')
        head, _, _ = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n')
        self.assertEqual(head.headers['host'], '[::1]:8080')

    def test_host_with_an_invalid_value_is_400(self):
        # RFC 9112 3.2: "A server MUST respond with a 400 ... to any request message that
        # contains ... a Host header field with an invalid field value."
        # Host = uri-host [ ":" port ]; none of these is one.
        for value in (b'a b', b'a/b', b'user@a', b'a:port'):
            self.assertRefused(b'GET / HTTP/1.1\r\nHost: %s\r\n\r\n' % value, 400)


class RFC9112Section5FieldSyntaxTest(H1Case):
    def test_field_values_lose_surrounding_whitespace_and_names_their_case(self):
        head, _, _ = self.assertAccepted(
            b'GET / HTTP/1.1\r\nHOST: a\r\nX-Thing: \t a  b \t\r\nX-Empty:\r\nX-Latin: caf\xe9\r\n\r\n')
        self.assertEqual(head.headers, {'host': 'a', 'x-thing': 'a  b', 'x-empty': '',
                                        'x-latin': 'caf\xe9'})

    def test_repeated_fields_are_joined_in_order(self):
        head, _, _ = self.assertAccepted(
            b'GET / HTTP/1.1\r\nHost: a\r\nAccept: x\r\nX: 1\r\naccept: y\r\n\r\n')
        self.assertEqual(head.headers['accept'], 'x, y')

    def test_obs_fold_is_400(self):
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n', 400, 'malformed header')
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\t2\r\n\r\n', 400)

    def test_whitespace_before_the_colon_is_400(self):
        # RFC 9112 5.1: "A server MUST reject ... with a response status code of 400".
        self.assertRefused(b'GET / HTTP/1.1\r\nHost : a\r\n\r\n', 400, 'malformed header')
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nContent-Length\t: 0\r\n\r\n', 400)

    def test_malformed_field_lines_are_400(self):
        for line in (b': x', b'no colon', b'X(y): 1', b'X\x00: 1', b'X: a\x00b', b'\xe9: 1'):
            self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\n%s\r\n\r\n' % line, 400)

    def test_100_field_lines_accepted_101_are_431(self):
        lines = b''.join(b'X-%d: %d\r\n' % (i, i) for i in range(100))
        head, _, _ = self.assertAccepted(b'GET / HTTP/1.0\r\n' + lines + b'\r\n')
        self.assertEqual(len(head.headers), 100)
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\n' + lines + b'\r\n', 431, '100')

    def test_head_over_max_head_is_431_complete_or_not(self):
        head = b'GET / HTTP/1.1\r\nHost: a\r\n' + b''.join(
            b'X-%02d: %s\r\n' % (i, b'v' * 1000) for i in range(20))          # 20 KB
        self.assertRefused(head, 431, '16384', max_head=16384)                # incomplete
        self.assertRefused(head + b'\r\n', 431, '16384', max_head=16384)      # complete
        self.assertRefused(head, 431, max_head=16384, step=997)
        head_, _, _ = self.assertAccepted(head + b'\r\n', max_head=32768)
        self.assertEqual(head_.headers['x-19'], 'v' * 1000)

    def test_header_line_over_8192_bytes_is_431(self):
        self.assertRefused(b'GET / HTTP/1.1\r\nHost: a\r\nX: %s\r\n\r\n' % (b'a' * 9000), 431)


class RFC9112Section6_1TransferEncodingTest(H1Case):
    def test_chunked_is_decoded_and_case_insensitive(self):
        for coding in (b'chunked', b'Chunked', b'CHUNKED', b' chunked '):
            _, body, _ = self.assertAccepted(
                b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:%s\r\n\r\n%s'
                % (coding, h1_chunked(b'abc')))
            self.assertEqual(body, b'abc')

    def test_transfer_encoding_in_http_1_0_is_400(self):
        self.assertRefused(b'POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
                           400, '1.0')
        self.assertRefused(b'POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n'
                           b'Content-Length: 5\r\n\r\nhello', 400)

    def test_transfer_encoding_with_content_length_is_400(self):
        for fields in (b'Transfer-Encoding: chunked\r\nContent-Length: 5',
                       b'Content-Length: 5\r\nTransfer-Encoding: chunked'):
            self.assertRefused(b'POST / HTTP/1.1\r\nHost: a\r\n%s\r\n\r\nhello' % fields, 400,
                               'Content-Length')

    def test_unknown_codings_are_501(self):
        for coding in (b'gzip', b'deflate', b'gzip, chunked', b'identity', b'x-custom'):
            self.assertRefused(b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: %s\r\n\r\n'
                               % coding, 501, 'chunked')

    def test_chunked_not_last_or_twice_is_refused(self):
        for coding in (b'chunked, gzip', b'chunked, chunked'):
            conn = mconnector.HTTPConnection()
            conn.receive_data(b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: %s\r\n\r\n'
                              b'0\r\n\r\n' % coding)
            with self.assertRaises(mconnector.HTTPError) as caught:
                conn.next_event()
            self.assertIn(caught.exception.status, (400, 501))
            self.assertFalse(conn.keep_alive)


class RFC9112Section6_2ContentLengthTest(H1Case):
    def test_content_length_body(self):
        _, body, _ = self.assertAccepted(h1_post(5, b'hello'))
        self.assertEqual(body, b'hello')
        _, body, _ = self.assertAccepted(h1_post(b'00005', b'hello'))     # 1*DIGIT
        self.assertEqual(body, b'hello')
        _, body, _ = self.assertAccepted(h1_post(0))
        self.assertEqual(body, b'')
        _, body, _ = self.assertAccepted(
            b'GET / HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\nabc')
        self.assertEqual(body, b'abc')

    def test_non_ascii_digits_are_400(self):
        # '\xb2' (superscript two) is str.isdigit(), and int() takes other scripts' digits.
        for value in (b'\xb2', b'1\xb2', b'\xb9', b'\xd9\xa3'):
            self.assertRefused(h1_post(value, b'xx'), 400, 'Content-Length')

    def test_very_long_numbers_are_400_not_a_crash(self):
        # int() of over 4300 digits raises ValueError on Python 3.11+.
        self.assertRefused(h1_post(b'1' * 4992, b'x'), 400, 'Content-Length')
        self.assertRefused(h1_post(b'0' * 4992 + b'1', b'x'), 400)

    def test_signs_lists_and_other_bases_are_400(self):
        for value in (b'-1', b'+5', b'5, 6', b'5, 5', b' 0x5', b'1_0', b'5.0', b'1e3', b'',
                      b'five', b'5 5'):
            self.assertRefused(h1_post(value, b'hello'), 400, 'Content-Length')
        self.assertRefused(b'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n'
                           b'Content-Length: 6\r\n\r\nhello!', 400)

    def test_over_max_body_is_413_before_the_body_arrives(self):
        exc = self.assertRefused(h1_post(101), 413, '100', max_body=100)
        self.assertIn('101', exc.message)
        self.assertRefused(h1_post(10 ** 17), 413)
        _, body, _ = self.assertAccepted(h1_post(100, b'x' * 100), max_body=100)
        self.assertEqual(len(body), 100)

    def test_body_methods_without_length_are_411(self):
        for method in (b'POST', b'PUT', b'PATCH'):
            self.assertRefused(b'%s / HTTP/1.1\r\nHost: a\r\n\r\n' % method, 411, method.decode())
        head, body, _ = self.assertAccepted(b'DELETE / HTTP/1.1\r\nHost: a\r\n\r\n')
        self.assertEqual(body, b'')
        head, body, _ = self.assertAccepted(b'POST / HTTP/1.1\r\nHost: a\r\n\r\n',
                                            length_required=())
        self.assertEqual(head.method, 'POST')

    def test_body_shorter_than_its_length_then_end_of_input_is_400(self):
        self.assertRefused(h1_post(5, b'abc'), 400, 'shorter', eof=True)
        self.assertRefused(h1_post(100000, b'abc'), 400, 'shorter', eof=True)   # streamed
        self.assertRefused(h1_post(5), 400, eof=True)

    def test_small_bodies_come_whole_with_their_head(self):
        conn, events = h1_server(h1_post(10, b'01234'))
        self.assertEqual(events, [mconnector.NEED_DATA])                    # no head yet
        events = h1_feed(conn, b'56789')
        self.assertIsInstance(events[0], mconnector.RequestHead)
        self.assertEqual(events[1:], [b'0123456789', mconnector.END_OF_MESSAGE])

    def test_large_bodies_come_as_they_arrive(self):
        conn, events = h1_server(h1_post(10, b'01234'), assemble=4)
        self.assertIsInstance(events[0], mconnector.RequestHead)
        self.assertEqual(events[1:], [b'01234', mconnector.NEED_DATA])
        self.assertEqual(h1_feed(conn, b'56789ABC'), [b'56789', mconnector.END_OF_MESSAGE])
        self.assertEqual(conn.trailing_data, (b'ABC', False))              # not the body's


class RFC9112Section7_1ChunkedTest(H1Case):
    def test_chunks_with_extensions_and_trailers_decode(self):
        body = (b'5;name=value\r\nhello\r\n6 ; a="b c";flag\r\n world\r\n'
                b'A\r\n0123456789\r\n0;last\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n')
        for step in (None, 1, 7):
            _, data, _ = self.assertAccepted(POST_CHUNKED + body, step=step)
            self.assertEqual(data, b'hello world0123456789')

    def test_empty_chunked_body(self):
        _, data, _ = self.assertAccepted(POST_CHUNKED + b'0\r\n\r\n')
        self.assertEqual(data, b'')

    def test_chunk_sizes_are_hexadecimal_digits_only(self):
        for size in (b'0Xf', b'0xf', b'0_f', b' f', b'+f', b'-1', b'0x5', b'g', b'', b'f f',
                     b'1' * 17):
            self.assertRefused(POST_CHUNKED + size + b'\r\n' + b'x' * 15 + b'\r\n0\r\n\r\n',
                               400, 'chunk size')
        _, data, _ = self.assertAccepted(POST_CHUNKED + b'F\r\n' + b'x' * 15 + b'\r\n0\r\n\r\n')
        self.assertEqual(data, b'x' * 15)

    def test_chunk_data_longer_than_its_size_is_400(self):
        self.assertRefused(POST_CHUNKED + b'3\r\nhello\r\n0\r\n\r\n', 400, 'longer')

    def test_truncated_chunked_body_is_400(self):
        for body in (b'5\r\nhel', b'5\r\nhello\r\n', b'5\r\nhello\r\n0\r\n', b'5'):
            self.assertRefused(POST_CHUNKED + body, 400, 'truncated', eof=True)

    def test_total_over_max_body_is_413(self):
        self.assertRefused(POST_CHUNKED + h1_chunked(b'x' * 6, b'y' * 6), 413, '10', max_body=10)
        self.assertRefused(POST_CHUNKED + b'ffffffffffffffff\r\n', 413)     # before the data
        _, data, _ = self.assertAccepted(POST_CHUNKED + h1_chunked(b'x' * 5, b'y' * 5),
                                         max_body=10)
        self.assertEqual(data, b'xxxxxyyyyy')

    def test_tiny_chunks_are_bounded_by_the_data(self):
        self.assertRefused(POST_CHUNKED + b'2\r\nab\r\n' * 300000 + b'0\r\n\r\n', 400, 'framing')

    def test_many_reasonable_chunks_decode_as_one_piece(self):
        chunks = [bytes([65 + i % 26]) * 64 for i in range(1000)]
        conn, events = h1_server(POST_CHUNKED + h1_chunked(*chunks))
        self.assertEqual(len(events), 3, events[:5])          # head, ONE piece, end
        self.assertEqual(events[1], b''.join(chunks))
        self.assertIs(events[2], mconnector.END_OF_MESSAGE)

    def test_byte_at_a_time_gives_the_same_body(self):
        rng = random.Random(7112)
        chunks = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))) for _ in range(30)]
        data = POST_CHUNKED + h1_chunked(*chunks, trailer=b'X-T: 1\r\n')
        whole = self.assertAccepted(data)[1]
        for step in (1, 2, 3, 17):
            self.assertEqual(self.assertAccepted(data, step=step)[1], whole)
        self.assertEqual(whole, b''.join(chunks))

    def test_chunk_line_limit_does_not_depend_on_how_bytes_arrive(self):
        # A 2000-byte chunk-size line (extensions) is refused when it arrives in pieces
        # (_MAX_CHUNK_LINE); it must be refused the same way when it arrives at once.
        data = POST_CHUNKED + b'5;' + b'e' * 2000 + b'\r\nhello\r\n0\r\n\r\n'
        self.assertRefused(data, 400, 'chunk size', step=100)
        self.assertRefused(data, 400, 'chunk size')

    def test_malformed_trailer_is_400(self):
        self.assertRefused(POST_CHUNKED + b'0\r\n folded\r\n\r\n', 400)
        self.assertRefused(POST_CHUNKED + b'0\r\nX : 1\r\n\r\n', 400)

    def test_a_refused_body_closes_the_connection(self):
        conn = mconnector.HTTPConnection()
        conn.receive_data(POST_CHUNKED + b'3\r\nhello\r\n0\r\n\r\n')
        self.assertIsInstance(conn.next_event(), mconnector.RequestHead)
        with self.assertRaises(mconnector.HTTPError):
            conn.next_event()
        answer = conn.send_response(400, [], b'bad chunk')
        self.assertIn(b'\r\nConnection: close\r\n', answer)
        self.assertFalse(conn.keep_alive)
        self.assertIs(conn.next_event(), mconnector.CLOSED)


class RFC9112Section9_3PersistenceTest(H1Case):
    def keep_alive_of(self, data):
        return self.assertAccepted(data)[2].keep_alive

    def test_keep_alive_rules(self):
        self.assertTrue(self.keep_alive_of(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n'))
        self.assertFalse(self.keep_alive_of(b'GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n'))
        self.assertFalse(self.keep_alive_of(b'GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n'))
        self.assertFalse(self.keep_alive_of(b'GET / HTTP/1.1\r\nHost: a\r\nConnection: te, close\r\n\r\n'))
        self.assertFalse(self.keep_alive_of(b'GET / HTTP/1.0\r\n\r\n'))
        self.assertTrue(self.keep_alive_of(b'GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n'))
        self.assertTrue(self.keep_alive_of(b'GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n'))

    def test_responses_say_whether_the_connection_stays(self):
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n')
        answer = conn.send_response(200, [('Content-Type', 'text/plain')], b'hi')
        self.assertTrue(answer.startswith(b'HTTP/1.1 200 OK\r\n'), answer)
        self.assertTrue(answer.endswith(b'\r\nContent-Length: 2\r\n\r\nhi'), answer)
        self.assertNotIn(b'Connection:', answer)
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n')
        self.assertIn(b'\r\nConnection: close\r\n', conn.send_response(200, [], b'hi'))
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n')
        self.assertIn(b'\r\nConnection: keep-alive\r\n', conn.send_response(200, [], b'hi'))
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n')
        conn.close_after_response()
        self.assertIn(b'\r\nConnection: close\r\n', conn.send_response(200, [], b'hi'))

    def test_no_request_is_read_after_connection_close(self):
        conn, events = h1_server(b'GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n'
                                 b'GET /2 HTTP/1.1\r\nHost: a\r\n\r\n')
        conn.send_response(200, [], b'one')
        self.assertRaises(RuntimeError, conn.start_next_cycle)
        self.assertIs(conn.next_event(), mconnector.CLOSED)

    def test_pipelined_requests_come_one_after_another(self):
        data = (b'GET /1 HTTP/1.1\r\nHost: a\r\n\r\n'
                b'POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\r\n'   # stray CRLF
                b'POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n'
                b'2\r\nde\r\n0\r\n\r\n'
                b'GET /4 HTTP/1.1\r\nHost: a\r\n\r\n')
        conn = mconnector.HTTPConnection()
        conn.receive_data(data)
        seen = []
        for number in range(4):
            head, body = h1_head_and_body(h1_feed(conn, b''))
            seen.append((head.target, body))
            self.assertIs(conn.next_event(), mconnector.PAUSED)      # until we answer
            self.assertIs(conn.next_event(), mconnector.PAUSED)
            conn.send_response(200, [], b'ok')
            conn.start_next_cycle()
        self.assertEqual(seen, [('/1', b''), ('/2', b'abc'), ('/3', b'de'), ('/4', b'')])
        self.assertIs(conn.next_event(), mconnector.NEED_DATA)
        conn.receive_data(b'')
        self.assertIs(conn.next_event(), mconnector.CLOSED)

    def test_keep_alive_timeout_is_announced(self):
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n', keep_alive_timeout=7)
        self.assertIn(b'\r\nKeep-Alive: timeout=7\r\n', conn.send_response(200, [], b''))
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n')
        self.assertNotIn(b'Keep-Alive', conn.send_response(200, [], b''))
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n',
                                         keep_alive_timeout=7)
        self.assertNotIn(b'Keep-Alive', conn.send_response(200, [], b''))

    def test_an_answer_before_the_body_was_read_ends_the_connection(self):
        # A streamed body: the head came, the body did not.
        conn, events = h1_server(h1_post(100000, b'abc'))
        self.assertIsInstance(events[0], mconnector.RequestHead)
        answer = conn.send_response(413, [], b'too big')
        self.assertFalse(conn.keep_alive)
        self.assertIn(b'\r\nConnection: close\r\n', answer)
        # A held small body, refused before it was whole.
        conn, events = h1_server(h1_post(10, b'abc'))
        self.assertEqual(events, [mconnector.NEED_DATA])
        self.assertIn(b'\r\nConnection: close\r\n', conn.send_response(401, [], b'no'))
        self.assertFalse(conn.keep_alive)
        # The same request read whole keeps the connection.
        _, _, conn = self.assertAccepted(h1_post(3, b'abc'))
        conn.send_response(200, [], b'')
        self.assertTrue(conn.keep_alive)

    def test_http_1_0_keep_alive_with_a_streamed_answer_says_close_only(self):
        # A close-delimited body ends the connection: the head must not also promise
        # keep-alive (RFC 9112 9.3: the header then contradicts the framing).
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n',
                                         keep_alive_timeout=5)
        head = conn.send_response(200, [], None)
        self.assertFalse(conn.keep_alive)
        self.assertIn(b'\r\nConnection: close\r\n', head)
        self.assertNotIn(b'keep-alive', head.lower())


class RFC9110Section10_1_1ExpectContinueTest(H1Case):
    def test_head_comes_before_a_small_body_and_continue_is_sent_once(self):
        conn, events = h1_server(h1_post(5, extra=b'Expect: 100-continue\r\n'))
        self.assertIsInstance(events[0], mconnector.RequestHead)
        self.assertEqual(events[1:], [mconnector.NEED_DATA])
        self.assertTrue(conn.expects_continue)
        self.assertEqual(conn.send_continue(), b'HTTP/1.1 100 Continue\r\n\r\n')
        self.assertFalse(conn.expects_continue)
        self.assertEqual(conn.send_continue(), b'')
        self.assertEqual(h1_feed(conn, b'hello'), [b'hello', mconnector.END_OF_MESSAGE])

    def test_expectation_value_is_case_insensitive_and_works_with_chunked(self):
        conn, _ = h1_server(h1_post(5, extra=b'Expect: 100-Continue\r\n'))
        self.assertTrue(conn.expects_continue)
        conn, _ = h1_server(POST_CHUNKED.replace(b'Host: a\r\n', b'Host: a\r\nExpect: 100-continue\r\n'))
        self.assertTrue(conn.expects_continue)

    def test_no_expectation_without_a_body_or_in_http_1_0(self):
        conn, events = h1_server(b'GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n')
        self.assertFalse(conn.expects_continue)
        self.assertEqual(conn.send_continue(), b'')
        conn, events = h1_server(b'POST / HTTP/1.0\r\nExpect: 100-continue\r\n'
                                 b'Content-Length: 2\r\n\r\nok')
        self.assertFalse(conn.expects_continue)         # RFC 9110 10.1.1: ignored in 1.0
        self.assertEqual(h1_head_and_body(events)[1], b'ok')

    def test_a_final_answer_instead_of_continue(self):
        conn, _ = h1_server(h1_post(5, extra=b'Expect: 100-continue\r\n'))
        answer = conn.send_response(413, [], b'no')
        self.assertTrue(answer.startswith(b'HTTP/1.1 413 '))
        self.assertEqual(conn.send_continue(), b'')
        self.assertFalse(conn.keep_alive)               # the body may or may not follow


class RFC9110Section9_3_2HeadTest(H1Case):
    def test_answer_to_head_is_the_head_only_with_the_length_of_the_body(self):
        _, _, conn = self.assertAccepted(b'HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n')
        answer = conn.send_response(200, [('Content-Type', 'text/plain')], b'hello')
        self.assertTrue(answer.endswith(b'\r\nContent-Length: 5\r\n\r\n'), answer)
        self.assertNotIn(b'hello', answer)
        conn.start_next_cycle()                          # and the connection goes on

    def test_streamed_answer_to_head_has_no_chunks(self):
        _, _, conn = self.assertAccepted(b'HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n')
        head = conn.send_response(200, [], None)
        self.assertTrue(head.endswith(b'\r\n\r\n'))
        self.assertEqual(conn.send_data(b'hello'), b'')
        self.assertEqual(conn.send_end(), b'')
        self.assertTrue(conn.keep_alive)
        conn.start_next_cycle()

    def test_get_after_head_gets_its_body(self):
        conn, _ = h1_server(b'HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n')
        conn.send_response(200, [], b'body')
        conn.start_next_cycle()
        h1_head_and_body(h1_feed(conn, b''))
        self.assertTrue(conn.send_response(200, [], b'body').endswith(b'\r\n\r\nbody'))


class RFC9112Section7StreamedResponseTest(H1Case):
    def test_http_1_1_streams_chunked_and_the_client_decodes_it(self):
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n')
        out = conn.send_response(200, [('Content-Type', 'text/plain')], None)
        self.assertIn(b'\r\nTransfer-Encoding: chunked\r\n', out)
        self.assertNotIn(b'Content-Length', out)
        pieces = [conn.send_data(b'hello'), conn.send_data(b''), conn.send_data(b' world' * 100)]
        self.assertEqual(pieces[0], b'5\r\nhello\r\n')
        self.assertEqual(pieces[1], b'')                 # never an early last-chunk
        end = conn.send_end()
        self.assertEqual(end, b'0\r\n\r\n')
        self.assertTrue(conn.keep_alive)
        conn.start_next_cycle()
        client, events = h1_client(out + b''.join(pieces) + end)
        head, body = h1_head_and_body(events)
        self.assertEqual((head.status, body), (200, b'hello' + b' world' * 100))

    def test_http_1_0_streams_until_close(self):
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.0\r\n\r\n')
        out = conn.send_response(200, [], None)
        self.assertFalse(conn.keep_alive)
        self.assertIn(b'\r\nConnection: close\r\n', out)
        self.assertNotIn(b'Transfer-Encoding', out)
        self.assertNotIn(b'Content-Length', out)
        self.assertEqual(conn.send_data(b'hello'), b'hello')
        self.assertEqual(conn.send_end(), b'')
        self.assertRaises(RuntimeError, conn.start_next_cycle)

    def test_no_content_answers_carry_no_framing(self):
        # RFC 9110 8.6 / RFC 9112 6.1: "A server MUST NOT send a Content-Length [or a
        # Transfer-Encoding] header field in any response with a status code of ... 204".
        # A chunked 204 would also leave '0\r\n\r\n' on the connection, where the client
        # (which reads no body after 204) takes it for the next status line.
        for body in (b'', None):
            with self.subTest(body=body):
                _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\n\r\n')
                out = conn.send_response(204, [], body)
                if body is None:
                    out += conn.send_data(b'') + conn.send_end()
                self.assertNotIn(b'Content-Length', out)
                self.assertNotIn(b'Transfer-Encoding', out)
                self.assertTrue(out.endswith(b'\r\n\r\n') and out.count(b'\r\n\r\n') == 1,
                                out)

    def test_a_streamed_204_then_the_next_answer_reads_back(self):
        server, _ = h1_server(b'GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n')
        wire = server.send_response(204, [], None) + server.send_end()
        server.start_next_cycle()
        h1_head_and_body(h1_feed(server, b''))
        wire += server.send_response(200, [], b'two')
        client, events = h1_client(wire)
        self.assertEqual(events[0].status, 204)
        self.assertIs(events[1], mconnector.END_OF_MESSAGE)
        client.start_next_cycle()
        client.send_request('GET', '/2', [('Host', 'a')])
        try:
            head, body = h1_head_and_body(h1_feed(client, b''))
        except mconnector.HTTPError as exc:
            self.fail('the answer after a streamed 204 is unreadable: %s' % exc)
        self.assertEqual((head.status, body), (200, b'two'))

    def test_switching_protocols_has_no_framing(self):
        _, _, conn = self.assertAccepted(b'GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n'
                                         b'Connection: Upgrade\r\n\r\n')
        out = conn.send_response(101, [('Upgrade', 'websocket'), ('Connection', 'Upgrade')], b'')
        self.assertTrue(out.startswith(b'HTTP/1.1 101 Switching Protocols\r\n'))
        self.assertNotIn(b'Content-Length', out)
        self.assertNotIn(b'Connection: close', out)

    def test_requests_sent_are_read_back(self):
        client = mconnector.HTTPConnection(client=True)
        for method, body in (('POST', b'{"a": 1}'), ('POST', b''), ('GET', b''), ('PUT', b'x')):
            data = client.send_request(method, '/r?x=1', [('Host', 'h'), ('X-A', 'b')], body)
            head, got, _ = self.assertAccepted(data)
            self.assertEqual((head.method, head.target, got), (method, '/r?x=1', body))
            self.assertEqual(head.headers['x-a'], 'b')
        self.assertNotIn(b'Content-Length', client.send_request('GET', '/', [('Host', 'h')]))


class RFC9112Section4StatusLineTest(H1Case):
    """The client role: status lines and reply framing."""

    def test_malformed_status_lines_are_refused_quoting_them(self):
        for line in (b'HTTP/1.1 2000 OK', b'HTTP/1.1 200x', b'HTTP/2 200', b'HTTP/1.1 20 OK',
                     b'HTTP/1.2 200 OK', b'http/1.1 200 OK', b'HTTP/1.1 099 X', b'ICY 200 OK'):
            exc = self.assertRefused(line + b'\r\nContent-Length: 0\r\n\r\n', None, client=True)
            self.assertIn(line.decode(), exc.message)
            self.assertIn(line.decode(), str(exc))

    def test_reason_phrase_may_be_empty_or_absent(self):
        for line, reason in ((b'HTTP/1.1 200', ''), (b'HTTP/1.1 200 ', ''),
                             (b'HTTP/1.1 404 Not Found', 'Not Found'),
                             (b'HTTP/1.0 200 Tr\xe8s bien', 'Tr\xe8s bien')):
            _, events = h1_client(line + b'\r\nContent-Length: 2\r\n\r\nok')
            head, body = h1_head_and_body(events)
            self.assertEqual((head.status, head.reason, body), (int(line[9:12]), reason, b'ok'))

    def test_interim_100_is_skipped(self):
        data = (b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n'
                b'HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok')
        for step in (None, 1):
            _, events = h1_client(data, 'POST', step=step)
            head, body = h1_head_and_body(events)
            self.assertEqual((head.status, body), (201, b'ok'))

    def test_101_leaves_the_new_protocol_in_trailing_data(self):
        conn, events = h1_client(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n'
                                 b'Connection: Upgrade\r\n\r\n\x81\x05hello')
        self.assertEqual(events[0].status, 101)
        self.assertEqual(events[1:], [mconnector.PAUSED])
        self.assertEqual(conn.trailing_data, (b'\x81\x05hello', False))

    def test_reply_over_max_body_is_refused_from_its_head(self):
        exc = self.assertRefused(b'HTTP/1.1 200 OK\r\nContent-Length: 10000000000000\r\n\r\n',
                                 None, client=True, max_body=1000)
        self.assertIn('max_reply', exc.message)
        self.assertIn('allowed', exc.message)
        self.assertRefused(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n',
                           None, 'allowed', client=True, max_body=1000)
        self.assertRefused(b'HTTP/1.1 200 OK\r\n\r\n' + b'x' * 1001, None, 'allowed',
                           client=True, max_body=1000)

    def test_reply_framing_errors_have_no_status(self):
        for data in (b'HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n',
                     b'HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n',
                     b'HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n',
                     b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n',
                     b'HTTP/1.1 200 OK\r\nX : 1\r\n\r\n',
                     b'HTTP/1.1 200 OK\r\nX: ' + b'x' * 9000 + b'\r\n\r\n'):
            self.assertRefused(data, None, client=True)
        self.assertRefused(b'HTTP/1.1 200 ' + b'x' * 9000, None, 'status line too long',
                           client=True)
        self.assertRefused(b'HTTP/1.1 200 OK\r\n' + b'x' * 17000, None, '16384',
                           client=True, max_head=16384)
        self.assertRefused(b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab', None, 'shorter',
                           client=True, eof=True)

    def test_no_body_after_head_204_and_304(self):
        for method, data in (('HEAD', b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n'),
                             ('HEAD', b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'),
                             ('GET', b'HTTP/1.1 204 No Content\r\n\r\n'),
                             ('GET', b'HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n')):
            conn, events = h1_client(data + b'HTTP/1.1 200 OK\r\n', method)
            self.assertEqual(len(events), 2, (data, events))
            self.assertIs(events[1], mconnector.END_OF_MESSAGE)
            self.assertTrue(conn.keep_alive)
            self.assertEqual(conn.trailing_data, (b'HTTP/1.1 200 OK\r\n', False))

    def test_body_until_close_without_length(self):
        conn, events = h1_client(b'HTTP/1.1 200 OK\r\n\r\nabc')
        self.assertEqual(events[1:], [b'abc', mconnector.NEED_DATA])
        self.assertFalse(conn.keep_alive)
        self.assertEqual(h1_feed(conn, b'def', eof=True), [b'def', mconnector.END_OF_MESSAGE])

    def test_chunked_reply(self):
        data = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n' + h1_chunked(
            b'hello', b' ', b'world', trailer=b'X-T: 1\r\n')
        for step in (None, 1):
            conn, events = h1_client(data, step=step)
            self.assertEqual(h1_head_and_body(events)[1], b'hello world')
            self.assertTrue(conn.keep_alive)

    def test_transfer_encoding_overrides_content_length(self):
        # RFC 9112 6.3 (3).
        _, events = h1_client(b'HTTP/1.1 200 OK\r\nContent-Length: 99\r\n'
                              b'Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n')
        self.assertEqual(h1_head_and_body(events)[1], b'ok')

    def test_reply_persistence(self):
        for data, keep in ((b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n', True),
                           (b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n', False),
                           (b'HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n', False)):
            conn, events = h1_client(data)
            h1_head_and_body(events)
            self.assertEqual(conn.keep_alive, keep, data)


class StatusTableTest(unittest.TestCase):
    def test_every_status_has_its_own_class(self):
        table = mconnector._STATUS_ERRORS
        self.assertTrue({400, 401, 403, 404, 405, 408, 411, 413, 414, 431, 501, 505} <= set(table))
        for status, cls in table.items():
            self.assertEqual(cls.status, status, cls)
            self.assertTrue(issubclass(cls, mconnector.CallError), cls)
            self.assertEqual(cls('m').status, status)
            self.assertIn(str(status), str(cls('m')))
        names = [cls.__name__ for cls in table.values()]
        self.assertEqual(len(names), len(set(names)), names)

    def test_builtin_bases(self):
        table = mconnector._STATUS_ERRORS
        self.assertTrue(issubclass(table[408], TimeoutError))
        self.assertTrue(issubclass(table[403], PermissionError))
        self.assertTrue(issubclass(table[403], mconnector.AuthError))
        self.assertTrue(issubclass(table[501], NotImplementedError))

    def test_every_status_the_core_raises_is_in_the_table(self):
        for status in (400, 411, 413, 414, 431, 501, 505):
            self.assertIn(status, mconnector._STATUS_ERRORS)

    def test_refusal_names_its_error(self):
        response = mconnector.Response.refusal(mconnector.HTTPError(413, 'x'))
        self.assertEqual(response.status, 413)
        error = json.loads(response.body.decode('utf-8'))['error']
        self.assertEqual((error['status'], error['type'], error['message']),
                         (413, 'PayloadTooLarge', 'x'))
        error = json.loads(mconnector.Response.refusal(
            mconnector.HTTPError(431, 'big')).body)['error']
        self.assertEqual(error['type'], 'HeadersTooLarge')


if __name__ == '__main__':
    unittest.main()


# The 0.3.7 tutorial's documented output (chapters 4, 5 and 6, and its json example),
# verbatim.  Its timing lines came from timers around each chapter that the tutorial's code
# does not show; the banners that its code prints before chapters 4 and 5 and in the middle
# of 4 it leaves out (TUTORIAL_BANNERS).  The tutorial shows its lines without their
# leading spaces.
TUTORIAL_OUTPUT = """\
Test: return a simple string
x= A variable value-A keyword variable value <class 'str'>
==========================
Test: return multiple string
x= A variable value <class 'str'>
y= A keyword variable value <class 'str'>
z= A variable value-A keyword variable value <class 'str'>
'testStr'  23.17 ms
Test: return a simple Value
x= 2330 <class 'int'>
==========================
Test: return a simple Value
x= 5.138 <class 'float'>
==========================
Test: return multiple Value
x= 1000000003.1427 <class 'float'>
y= 1000000000000000000 <class 'int'>
z= 9.87656329 <class 'float'>
Test: return a simple Value
x= [12, 34, 45, 'abc', 'zyz'] <class 'list'>
==========================
Test: return a simple Value
x= {'dict': {'keyword': ['anything']}, 'float': 0.2323, 'int': 20, 'str': 'adfafsa'} <class 'dict'>
==========================
Test: return multiple Value
x= {'keyword': ['anything']} <class 'dict'>
y= ['abc', 'zyz', 'other value'] <class 'list'>
z= None <class 'NoneType'>
'testListDict'  22.19 ms
##############################
Test return NoneType, Class, use of Token

Test: return a simple Value
x= None <class 'NoneType'>
==========================
Test: return a simple Value with token
x= {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': {'keyword': ['anything']}} <class 'dict'>
==========================
Test: return multiple Value
x= {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': {'float': 0.2323, 'int': 20, 'str': 'adfafsa'}} <class 'dict'>
y= {'keyword': ['anything']} <class 'dict'>
z= None <class 'NoneType'>

Test: send class and list of class object
x= {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': {'list': [{'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}, {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value2'}], 't1': {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}, 't2': {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value2'}}} <class 'dict'>
y= {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': [{'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}, {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value2'}]} <class 'dict'>
z= [{'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': [{'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}, {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value2'}]}, {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': {'list': [{'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}, {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value2'}], 't1': {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}, 't2': {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value2'}}}] <class 'list'>
'testClassType'  19.20 ms
=================Response json===============
Synchonous POST: {'1': 12, '2': 'This is a text', '3': {'dict': 'a dict'}}
Asynchonous GET: {'dict': 'a only dict'}
Asynchonous POST: {'dict': 'a only dict'}
"""
TUTORIAL_BANNERS = [['##############################', 'Test return %s' % what, '']
                    for what in ('string', 'a int, float', 'a list, dict')]
TIMING_LINE = r"'\w+'  \d+\.\d\d ms"


class Tutorial037Test(unittest.TestCase):
    """The 0.3.7 tutorial's chapters 3-6, through the example files that hold its code with
    only the imports changed, and the outputs the tutorial shows."""

    @classmethod
    def setUpClass(cls):
        cls.module = load_example('tutorial_listener')
        cls.service = cls.module.Micro
        cls.service.start(port=0, host='127.0.0.1')
        cls.friend = Friend('app1', cls.service.url)

    @classmethod
    def tearDownClass(cls):
        cls.friend.close()
        cls.service.stop()

    def test_quickstart(self):
        app1 = load_example('app1')
        friend = Service.start(self, app1.Micro)
        self.assertEqual(friend.send('/helloworld', 'Mr. Developer'), 'Welcome Mr. Developer')
        # chapter 3 is in the tutorial's listener too
        self.assertEqual(self.friend.send('/helloworld', 'Mr. Close friend'),
                         'Welcome Mr. Close friend')

    def test_strings_and_numbers(self):
        f = self.friend
        self.assertEqual(f.send('/str', 'A variable value', key='A keyword variable value'),
                         'A variable value-A keyword variable value')
        self.assertEqual(f.send('/str2', 'a', key='b'), ('a', 'b', 'a-b'))
        x = f.send('/int', 2018, key=312)
        self.assertEqual((x, type(x)), (2330, int))
        self.assertAlmostEqual(f.send('/float', 2.018, key=3.12), 5.138)
        x, y, z = f.send('/int3', 3.1427, key=1000000000)
        self.assertEqual((x, y), (1000000003.1427, 1000000000000000000))
        self.assertAlmostEqual(z, 9.87656329)

    def test_lists_and_dicts(self):
        f = self.friend
        self.assertEqual(f.send('/list', [12, 34, 45], key=['abc', 'zyz']),
                         [12, 34, 45, 'abc', 'zyz'])
        x = f.send('/dict', {'keyword': ['anything']}, key={'int': 20, 'str': 'adfafsa', 'float': 0.2323})
        self.assertEqual(str(x), "{'dict': {'keyword': ['anything']}, 'float': 0.2323, "
                                 "'int': 20, 'str': 'adfafsa'}")
        self.assertEqual(f.send('/list3', {'keyword': ['anything']}, key=['abc', 'zyz']),
                         ({'keyword': ['anything']}, ['abc', 'zyz', 'other value'], None))

    def test_none_classes_and_tokens(self):
        f = Friend('app1', self.service.url)
        self.addCleanup(f.close)
        self.assertIsNone(f.send('/None', [12, 34, 45], key=['abc', 'zyz']))
        with self.assertRaises(mconnector.AuthError):
            f.send('/class', {'keyword': ['anything']}, key={})
        f.setRule('/class', token='123456')
        x = f.send('/class', {'keyword': ['anything']}, key={'int': 20})
        self.assertEqual(str(x), "{'Purpose': 'For test only', 'empty': None, 'name': 'test', "
                                 "'value': {'keyword': ['anything']}}")
        f.setRule('/class3', token='123456')
        t1, t2 = self.module.testservice('value1'), self.module.testservice('value2')
        x, y, z = f.send('/class3', [t1, t2], key={'t1': t1, 't2': t2, 'list': [t1, t2]})
        one = {'Purpose': 'For test only', 'empty': None, 'name': 'test', 'value': 'value1'}
        two = dict(one, value='value2')
        self.assertEqual(y, dict(one, value=[one, two]))
        self.assertEqual(z, [y, x])
        self.assertEqual(x['value']['list'], [one, two])

    def test_json_and_async_json_and_timeit(self):
        f = self.friend
        with self.assertLogs('mconnector', 'INFO') as logs:     # the listener's @timeit
            self.assertEqual(f.json('/json', a=12, b='This is a text', c={'dict': 'a dict'}),
                             {'1': 12, '2': 'This is a text', '3': {'dict': 'a dict'}})
        self.assertRegex(logs.output[0], "INFO:mconnector:'TestReceiveJson'  \\d+\\.\\d\\d ms$")
        self.assertEqual(f.json('/json1', method='GET', a={'dict': 'a only dict'}),
                         {'dict': 'a only dict'})
        self.assertEqual(f.json('/json1', a={'dict': 'a only dict'}), {'dict': 'a only dict'})

    def test_listener_and_sender_print_what_the_tutorial_shows(self):
        import re
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        listener = ServeProcess(self, folder.name, 'examples/tutorial_listener.py', '--host',
                                '127.0.0.1', '--port', '0')
        url = listener.url()
        path = os.path.join(HERE, 'examples', 'tutorial_sender.py')
        with open(path) as f:
            sender = f.read()
        # The tutorial's addresses, pointed at the listener on its free port.
        for address in ('http://localhost:5000', 'http://0.0.0.0:5000'):
            self.assertIn(address, sender)
            sender = sender.replace(address, url)
        sender = '__file__ = %r\n' % path + sender     # (it finds mconnector from there)
        out = subprocess.run([sys.executable, '-c', sender], cwd=HERE, capture_output=True,
                             text=True, timeout=30, env=dict(os.environ, PYTHONPATH=HERE))
        self.assertEqual((out.returncode, out.stderr), (0, ''))
        printed = [line.strip() for line in out.stdout.splitlines()]
        for banner in TUTORIAL_BANNERS:
            at = next(n for n in range(len(printed)) if printed[n:n + 3] == banner)
            del printed[at:at + 3]
        self.assertEqual(printed, [line for line in TUTORIAL_OUTPUT.splitlines()
                                   if not re.fullmatch(TIMING_LINE, line)])
        listener.terminate()
        # What the listener itself prints, and the line of its @timeit
        self.assertEqual(listener.output(listener.out_path), 'one cat here\n')
        self.assertRegex(listener.output(), "INFO 'TestReceiveJson'  \\d+\\.\\d\\d ms\n")


class ListenerTest(unittest.TestCase):
    """Rules, modes, errors and statuses as a sender and curl see them."""

    shell = 'builtin'

    def setUp(self):
        self.calls = []
        M = self.M = Microservice('svc', token={'/secret': 's3cret'})

        @M.typing('/echo', methods=['GET', 'POST'])
        @M.reply
        def echo(*args, **kwargs):
            self.calls.append('echo')
            return args, kwargs

        @M.typing('/add')
        @M.reply
        def add(a, b=1):
            return a + b

        @M.typing('/boom')
        @M.reply
        def boom(x):
            raise KeyError('no such thing: %s' % x)

        @M.typing('/secret')
        @M.reply
        def secret():
            self.calls.append('secret')
            return 'in'

        @M.typing('/user/<name>/<id:int>', methods=['GET', 'POST'])
        @M.reply
        def user(name, id, extra=None):
            return name, id, extra

        @M.route('/flask/<int:n>/<v:number>')
        @M.reply
        def flask_style(n, v):
            return n, v

        @M.typing('/guarded', token='t0k')
        @M.json
        def guarded(a):
            self.calls.append('guarded')
            return a

        @M.typing('/d')
        @M.dict
        def as_dict(a=1):
            return {'a': a}

        @M.typing('/stream')
        @M.stream
        def streamed(n):
            return {'items': list(range(n))}

        @M.typing('/gen')
        @M.stream
        def generated(n):
            for i in range(n):
                yield {'i': i}

        @M.typing('/agen')
        @M.stream
        async def async_generated(n):
            import asyncio
            for i in range(n):
                await asyncio.sleep(0)
                yield i * i

        @M.typing('/async')
        @M.reply
        async def asynchronous(x):
            import asyncio
            await asyncio.sleep(0)
            return x * 2, id(asyncio.get_running_loop())

        @M.app.route('/page/<name>')
        def page(name, q='none'):
            return '<b>%s %s</b>' % (name, q)

        self.friend = Service.start(self, M)
        self.port = M.port

    def test_several_values_come_back_as_a_tuple(self):
        self.assertEqual(self.friend.send('/echo', 1, 'two', k=[3]), ((1, 'two'), {'k': [3]}))
        self.assertEqual(self.friend.send('/add', 2, b=3), 5)

    def test_unknown_rule_404_and_wrong_method_405(self):
        with self.assertRaises(mconnector.NotFound) as caught:
            self.friend.send('/nowhere')
        self.assertEqual(caught.exception.status, 404)
        self.assertIn('/nowhere', str(caught.exception))
        self.friend.setRule('/add', method='DELETE')
        with self.assertRaises(mconnector.MethodNotAllowed) as caught:
            self.friend.send('/add', 1)
        self.assertEqual(caught.exception.status, 405)
        self.assertEqual(self.friend.lastreply.headers['allow'], 'OPTIONS, POST')

    def test_wrong_arguments_400_names_the_signature(self):
        with self.assertRaises(mconnector.BadRequest) as caught:
            self.friend.send('/add', 1, 2, 3)
        self.assertIn('add(a, b=1)', str(caught.exception))
        with self.assertRaises(mconnector.BadRequest):
            self.friend.send('/add', c=1)

    def test_bad_bodies_400_and_service_goes_on(self):
        for body in (b'{not json', b'[1, 2]', b'{"args": 5}', b'{"kwargs": []}', b'\xff\xfe',
                     b'{"args": [1], "types": [[[0, 0], "set"]]}', b'{"types": "x", "args": [1]}'):
            reply = raw_request(self.port, b'POST /add HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                                b'Content-Type: application/json\r\n'
                                b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
            self.assertEqual(status_of(reply), 400, (body, reply))
            self.assertEqual(json.loads(reply.split(b'\r\n\r\n', 1)[1])['error']['status'], 400)
        self.assertEqual(self.friend.send('/add', 1), 2)

    def test_exception_in_function_is_500_remote_error(self):
        with self.assertLogs('mconnector', 'WARNING') as logs, \
                self.assertRaises(mconnector.RemoteError) as caught:
            self.friend.send('/boom', 'x')
        error = caught.exception
        self.assertEqual((error.type, error.message), ('KeyError', "'no such thing: x'"))
        self.assertIsNone(error.remote_traceback)
        self.assertIn('/boom raised KeyError', logs.output[0])
        self.M.debug = True
        with self.assertLogs('mconnector', 'ERROR'), \
                self.assertRaises(mconnector.RemoteError) as caught:
            self.friend.send('/boom', 'y')
        self.assertIn('Traceback', caught.exception.remote_traceback)

    def test_token_refused_without_running_the_function(self):
        for token in (None, 'wrong', ''):
            friend = Friend('t', self.M.url, token={'/secret': token} if token is not None else None)
            self.addCleanup(friend.close)
            with self.assertRaises(mconnector.AuthError) as caught:
                friend.send('/secret')
            self.assertEqual(caught.exception.status, 401)
        self.assertEqual(self.calls, [])
        self.friend.setRule('/secret', token='s3cret')
        self.assertEqual(self.friend.send('/secret'), 'in')
        self.assertTrue(self.friend.removeToken('/secret'))
        with self.assertRaises(mconnector.AuthError):
            self.friend.send('/secret')
        self.assertTrue(self.M.removeToken('/secret'))
        self.assertEqual(self.friend.send('/secret'), 'in')

    def test_token_by_bearer_header_and_json_body(self):
        with self.assertRaises(mconnector.AuthError):
            self.friend.json('/guarded', a=1)
        self.assertEqual(self.calls, [])
        body = b'{"a": 5, "token": "t0k"}'
        reply = raw_request(self.port, b'POST /guarded HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                            b'Content-Type: application/json\r\n'
                            b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
        self.assertEqual(status_of(reply), 200, reply)
        self.assertTrue(reply.endswith(b'[5]'), reply)
        self.friend.setRule('/guarded', token='t0k')
        self.assertEqual(self.friend.json('/guarded', a=2), 2)

    def test_listener_wide_token(self):
        M = Microservice('locked', token='all')

        @M.typing('/x')
        def x():
            return 1
        friend = Service.start(self, M)
        with self.assertRaises(mconnector.AuthError):
            friend.send('/x')
        with Friend('ok', M.url, token='all') as friend:
            self.assertEqual(friend.send('/x'), 1)

    def test_route_parameters_and_query_string(self):
        self.assertEqual(self.friend.send('/user/bob/7', extra=[1]), ('bob', 7, [1]))
        self.assertEqual(self.friend.send('/flask/3/2.5'), (3, 2.5))
        with self.assertRaises(mconnector.NotFound):
            self.friend.send('/user/bob/seven')
        reply = raw_request(self.port, b'GET /user/ann/2?extra=%7B%22a%22%3A1%7D HTTP/1.1\r\nHost: x\r\n'
                            b'Connection: close\r\n\r\n')
        self.assertTrue(reply.endswith(b'["ann", 2, {"a": 1}]'), reply)
        reply = raw_request(self.port, b'GET /echo?a=1&b=text HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        self.assertTrue(reply.endswith(b'[[], {"a": 1, "b": "text"}]'), reply)

    def test_dict_stream_and_generator_modes(self):
        self.assertEqual(self.friend.json('/d', a=5), {'a': 5})
        self.assertEqual(self.friend.json('/stream', n=3), {'items': [0, 1, 2]})
        if self.shell == 'builtin':         # (wsgiref, an HTTP/1.0 server, cannot chunk)
            self.assertEqual(self.friend.lastreply.headers['transfer-encoding'], 'chunked')
        self.assertEqual(self.friend.json('/gen', n=3), [{'i': 0}, {'i': 1}, {'i': 2}])
        self.assertEqual(self.friend.json('/agen', n=4), [0, 1, 4, 9])

    def test_async_functions_share_one_loop(self):
        (x, loop1), (_, loop2) = self.friend.send('/async', 2), self.friend.send('/async', 3)
        self.assertEqual(x, 4)
        self.assertEqual(loop1, loop2)

    def test_flask_like_app(self):
        reply = raw_request(self.port, b'GET /page/ann?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        self.assertIn(b'Content-Type: text/html', reply)
        self.assertTrue(reply.endswith(b'<b>ann 1</b>'), reply)

    def test_flask_like_app_passes_only_the_query_parameters_the_function_takes(self):
        @self.M.app.route('/any')
        def any_query(**query):
            return query

        @self.M.app.route('/kw-only/<name>')
        def kw_only(name, *, page='1'):
            return '%s %s' % (name, page)
        for target, body in ((b'/page/ann?utm_source=x&q=2', b'<b>ann 2</b>'),
                             (b'/page/ann?name=eve', b'<b>ann none</b>'),   # the path's wins
                             (b'/kw-only/x?page=3&fbclid=y', b'x 3'),
                             (b'/any?a=1&b=', b'{"a": "1", "b": ""}')):
            reply = raw_request(self.port, b'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
                                % target)
            self.assertEqual(status_of(reply), 200, reply)
            self.assertTrue(reply.endswith(body), reply)
        # a rule's query string is its arguments: one it does not take is refused
        reply = raw_request(self.port, b'GET /user/ann/2?utm_source=x HTTP/1.1\r\nHost: x\r\n'
                            b'Connection: close\r\n\r\n')
        self.assertEqual(status_of(reply), 400, reply)

    @builtin_server_only
    def test_head_keep_alive_and_expect_continue(self):
        with socket.create_connection(('127.0.0.1', self.port), timeout=5) as sock:
            body = b'{"args": [1, 2]}'
            sock.sendall(b'POST /add HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n'
                         b'Content-Type: application/json\r\n'
                         b'Content-Length: %d\r\n\r\n' % len(body))
            self.assertEqual(sock.recv(100), b'HTTP/1.1 100 Continue\r\n\r\n')
            sock.sendall(body)
            first = sock.recv(4096)
            self.assertTrue(first.startswith(b'HTTP/1.1 200') and first.endswith(b'[3]'), first)
            sock.sendall(b'HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n')
            second = sock.recv(4096)
            self.assertTrue(second.startswith(b'HTTP/1.1 200') and second.endswith(b'\r\n\r\n'))

    @builtin_server_only
    def test_malformed_requests_get_400_and_service_goes_on(self):
        for data in (b'garbage\r\n\r\n', b'GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n',
                     b'POST /add HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n',
                     b'POST /add HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n',
                     b'GET /' + b'a' * 10000 + b' HTTP/1.1\r\n\r\n'):
            reply = raw_request(self.port, data)
            self.assertRegex(reply[:12], rb'HTTP/1.1 4\d\d', data[:40])
        reply = raw_request(self.port, b'POST /add HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n')
        self.assertTrue(reply.startswith(b'HTTP/1.1 413'), reply)
        self.assertEqual(self.friend.send('/add', 41), 42)


class WSGIListenerTest(ListenerTest):
    """Every listener test again, through the Microservice's WSGI entry under wsgiref:
    the same statuses, errors, tokens and streams as with the built-in server."""

    shell = 'wsgi'


def senders_service(**options):
    """The rules that the senders' tests call: /same answers its arguments (its runs
    counted in M.runs), /kw its keyword arguments, /slow once M.release is set (or 10 s
    have passed), /boom raises, /secret is there for a token."""
    M = Microservice('svc', **options)
    M.runs = []
    M.release = threading.Event()

    @M.typing('/same')
    def same(*args, **kwargs):
        M.runs.append(1)
        return args, kwargs

    @M.typing('/kw')
    @M.dict
    def kw(**kwargs):
        return kwargs

    @M.typing('/slow')
    def slow():
        M.release.wait(10)
        return 'late'

    @M.typing('/boom')
    def boom():
        raise KeyError('no such thing')

    @M.typing('/secret')
    def secret():
        return 'in'
    return M


class SenderTest(unittest.TestCase):
    """Friend: typed values, connections, timeouts, errors as exceptions."""

    def setUp(self):
        self.M = senders_service(timeout=30)
        self.release, self.runs = self.M.release, self.M.runs
        self.friend = Service.start(self, self.M)
        self.addCleanup(self.release.set)

    def test_types_json_loses_survive_between_peers(self):
        import datetime
        import decimal
        import uuid

        @mconnector.register
        class Money:
            def __init__(self, amount):
                self.amount = amount
        args = ((1, 2), {3}, frozenset({4}), b'\x00', datetime.datetime(2024, 5, 6, 7, 8),
                decimal.Decimal('0.1'), uuid.UUID(int=1), Money(decimal.Decimal('2.50')))
        got_args, got_kwargs = self.friend.send('/same', *args, when=datetime.date(2024, 1, 1))
        self.assertEqual(got_args[:7], args[:7])
        self.assertIsInstance(got_args, tuple)
        self.assertIsInstance(got_args[7], Money)
        self.assertEqual(got_args[7].amount, decimal.Decimal('2.50'))
        self.assertEqual(got_kwargs, {'when': datetime.date(2024, 1, 1)})

    def test_plain_json_peer_gets_plain_json(self):
        # What a 0.3.7 sender (requests.post(json=...)) sends and reads back.
        body = b'{"args": [[1, 2], "x"], "kwargs": {"k": {"a": null}}, "token": null}'
        reply = raw_request(self.M.port, b'POST /same HTTP/1.1\r\nHost: x\r\nContent-Type: application/json'
                            b'\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))
        self.assertTrue(reply.startswith(b'HTTP/1.1 200'), reply)
        self.assertEqual(json.loads(reply.split(b'\r\n\r\n', 1)[1]),
                         [[[1, 2], 'x'], {'k': {'a': None}}])

    def test_connection_is_kept_alive(self):
        for _ in range(6):
            self.friend.send('/same')
        self.assertEqual(self.M.stats['connections'], 1)

    def test_connection_closed_by_listener_is_replaced_without_resending(self):
        self.M.timeout = 0.2        # listener drops idle connections after 0.2 s
        self.friend.send('/same')
        sock = self.friend._idle[0].sock
        self.assertTrue(wait_for(lambda: mconnector._connection_is_stale(sock), 5))
        del self.runs[:]
        self.friend.send('/same', 1)
        self.assertEqual(self.runs, [1])
        self.assertEqual(self.M.stats['connections'], 2)

    def test_connection_is_not_reused_when_the_listener_may_be_closing_it(self):
        self.M.timeout = 1          # announced as Keep-Alive: timeout=1
        self.friend.send('/same')
        self.assertEqual(self.friend.lastreply.headers['keep-alive'], 'timeout=1')
        conn = self.friend._idle[0]
        self.assertTrue(wait_for(lambda: not conn.reusable(), 5))
        self.friend.send('/same')
        self.assertEqual(self.M.stats['connections'], 2)

    def test_many_threads_through_one_friend(self):
        results, errors = [], []

        def worker(n):
            try:
                for i in range(30):
                    results.append(self.friend.send('/same', n, i) == ((n, i), {}))
            except Exception as exc:
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(results, [True] * 240)

    def test_timeout_is_a_timeout_error(self):
        friend = Friend('impatient', self.M.url, timeout=0.2)
        self.addCleanup(friend.close)
        with self.assertRaises(mconnector.CallTimeout) as caught:
            friend.send('/slow')
        self.assertIsInstance(caught.exception, TimeoutError)
        self.assertIsInstance(caught.exception, ConnectionError)
        self.assertIn('/slow', str(caught.exception))
        self.release.set()
        self.assertEqual(friend.send('/same', 1), ((1,), {}))

    def test_nothing_listening_is_unreachable(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        friend = Friend('nobody', '127.0.0.1:%d' % port)
        with self.assertRaises(mconnector.Unreachable) as caught:
            friend.send('/x')
        self.assertIsInstance(caught.exception, ConnectionError)
        self.assertIsInstance(caught.exception, mconnector.MConnectorError)

    def test_listener_restarted_between_calls(self):
        self.assertEqual(self.friend.send('/same', 1), ((1,), {}))
        port = self.M.port
        self.M.stop()
        self.M.start(port=port, host='127.0.0.1')
        self.assertEqual(self.friend.send('/same', 2), ((2,), {}))

    def test_send_async(self):
        import asyncio

        async def main():
            return await asyncio.gather(self.friend.send_async('/same', 1, k=2),
                                        self.friend.json_async('/kw', k=3))
        self.assertEqual(asyncio.run(main()), [((1,), {'k': 2}), {'k': 3}])

    def test_last_message_and_reply(self):
        self.friend.send('/same', 'x')
        self.assertEqual(self.friend.lastMessage, (('x',), {}))
        self.assertEqual(self.friend.lastreply.status, 200)


def run_async(coroutine, timeout=20):
    """asyncio.run(coroutine), given up after `timeout` seconds."""
    import asyncio
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def until(predicate, timeout=5.0):
    """wait_for() for coroutines: poll `predicate` without blocking the event loop."""
    import asyncio
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


class AsyncSenderTest(unittest.TestCase):
    """AsyncFriend (and Friend's async methods): asyncio streams, no threads, the same
    answers and errors as Friend."""

    def setUp(self):
        M = self.M = senders_service(token={'/secret': 's3cret'})
        self.release = M.release
        self.addCleanup(self.release.set)
        self.gate = threading.Barrier(32, timeout=10)

        @M.typing('/gate')
        def gate():
            self.gate.wait()            # until 32 calls are in here at once
            return 'in'
        Service.start(self, M)

    def friend(self, cls=None, **options):
        friend = (cls or mconnector.AsyncFriend)('async', self.M.url, **options)
        self.addCleanup(friend.close)
        return friend

    def test_answers_and_errors_as_friend(self):
        import datetime
        friend = self.friend()

        async def main():
            values = await friend.send('/same', (1, 2), {3}, b'\x00', when=datetime.date(2024, 1, 1))
            kw = await friend.json('/kw', k=[1])
            with self.assertRaises(mconnector.RemoteError) as remote:
                await friend.send('/boom')
            with self.assertRaises(mconnector.NotFound):
                await friend.send('/nowhere')
            with self.assertRaises(mconnector.AuthError):
                await friend.send('/secret')
            friend.setRule('/secret', token='s3cret')
            secret = await friend.send('/secret')
            rules = [rule['rule'] for rule in await friend.rules()]
            return values, kw, remote.exception, secret, rules, await friend.health()
        with self.assertLogs('mconnector', 'WARNING'):
            values, kw, remote, secret, rules, health = run_async(main())
        self.assertEqual(values, (((1, 2), {3}, b'\x00'), {'when': datetime.date(2024, 1, 1)}))
        self.assertEqual(kw, {'k': [1]})
        self.assertEqual((remote.type, remote.message), ('KeyError', "'no such thing'"))
        self.assertEqual(secret, 'in')
        self.assertIn('/gate', rules)
        self.assertEqual(health['status'], 'ok')
        self.assertEqual(friend.lastMessage, health)
        self.assertEqual(self.M.stats['connections'], 1)       # one kept-alive connection

    def test_32_calls_are_in_the_rule_at_once(self):
        import asyncio
        for cls in (mconnector.AsyncFriend, Friend):
            with self.subTest(sender=cls.__name__):
                friend = self.friend(cls)
                call = friend.send if cls is mconnector.AsyncFriend else friend.send_async

                async def main():
                    return await asyncio.gather(*(call('/gate') for _ in range(32)))
                self.assertEqual(run_async(main()), ['in'] * 32)

    def test_cancelling_a_call_closes_its_connection(self):
        import asyncio
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(('127.0.0.1', 0))
        server.listen()
        arrived, ended = threading.Event(), threading.Event()

        def listen():                   # reads the request, then waits for its end
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                while True:
                    try:
                        data = conn.recv(65536)
                    except ConnectionResetError:
                        data = b''
                    if not data:
                        ended.set()
                        return
                    arrived.set()
        threading.Thread(target=listen, daemon=True).start()
        friend = mconnector.AsyncFriend('held', '127.0.0.1:%d' % server.getsockname()[1])
        self.addCleanup(friend.close)

        async def main():
            task = asyncio.ensure_future(friend.send('/held'))
            self.assertTrue(await until(arrived.is_set))
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            self.assertTrue(await until(ended.is_set))
            return friend._loop_pool().idle
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', ResourceWarning)
            self.assertEqual(run_async(main()), [])
        # (closed by the cancel, not by the collector)
        self.assertEqual([w for w in caught if issubclass(w.category, ResourceWarning)], [])
        # against a listener: the call after a cancelled one goes through
        friend = self.friend()

        async def again():
            task = asyncio.ensure_future(friend.send('/slow'))
            self.assertTrue(await until(lambda: self.M._metrics.in_flight == 1))
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            self.release.set()
            return await friend.send('/same', 1)
        self.assertEqual(run_async(again()), ((1,), {}))

    def test_timeout_bounds_the_whole_call(self):
        friend = self.friend(timeout=0.3)

        async def main():
            started = time.monotonic()
            with self.assertRaises(mconnector.CallTimeout) as caught:
                await friend.send('/slow')
            took = time.monotonic() - started
            self.release.set()
            return caught.exception, took, await friend.send('/same', 2)
        error, took, after = run_async(main())
        self.assertIsInstance(error, TimeoutError)
        self.assertIn('/slow did not answer within 0.3s', str(error))
        self.assertLess(took, 3)
        self.assertEqual(after, ((2,), {}))

    def test_nothing_listening_is_unreachable_after_the_retries(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        friend = mconnector.AsyncFriend('nobody', '127.0.0.1:%d' % port, retries=2, backoff=0.01)
        with self.assertRaises(mconnector.Unreachable) as caught:
            run_async(friend.send('/x'))
        self.assertIn('cannot reach http://127.0.0.1:%d/x' % port, str(caught.exception))

    def test_a_connection_the_listener_closed_is_replaced_without_resending(self):
        self.M.timeout = 0.2            # the listener drops idle connections after 0.2 s
        friend = self.friend()

        async def main():
            await friend.send('/same')
            conn = friend._loop_pool().idle[0]
            self.assertTrue(await until(lambda: not conn.reusable()))
            del self.M.runs[:]
            return await friend.send('/same', 1)
        self.assertEqual(run_async(main()), ((1,), {}))
        self.assertEqual(self.M.runs, [1])
        self.assertEqual(self.M.stats['connections'], 2)

    def test_each_event_loop_has_its_connections_closed_with_it(self):
        import gc
        import warnings
        friend = self.friend()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', ResourceWarning)
            for n in range(3):
                self.assertEqual(run_async(friend.send('/same', n)), ((n,), {}))
                # asyncio.run() has closed the loop, and its connection with it
                self.assertTrue(wait_for(lambda: len(self.M._server.connections) == 0))
            gc.collect()
        self.assertEqual([w for w in caught if issubclass(w.category, ResourceWarning)], [])
        self.assertEqual(self.M.stats['connections'], 3)

    def test_https_and_signed_calls(self):
        M = counting_service(secretKey='k')
        M.start(port=0, host='127.0.0.1', certfile=os.path.join(CERTS, 'server.pem'),
                keyfile=os.path.join(CERTS, 'server.key'))
        self.addCleanup(M.stop)
        friend = mconnector.AsyncFriend('tls', M.url, cafile=os.path.join(CERTS, 'ca.pem'),
                                        secretKey='k')

        async def main():
            async with friend:
                counts = [await friend.send('/count') for _ in range(3)]
            async with mconnector.AsyncFriend('unsigned', M.url, verify=False) as unsigned:
                with self.assertRaises(mconnector.AuthError):
                    await unsigned.send('/count')
            return counts
        self.assertEqual(run_async(main()), [1, 2, 3])
        self.assertEqual(M.stats['connections'], 2)

    def test_under_uvloop(self):
        # uvloop is an optional peer, never a dependency: looked for, and skipped without it.
        import importlib.util
        if importlib.util.find_spec('uvloop') is None:
            self.skipTest('uvloop is not installed')
        uvloop = importlib.import_module('uvloop')
        import asyncio
        friend = self.friend()

        async def main():
            self.assertIsInstance(asyncio.get_running_loop(), uvloop.Loop)
            first = await friend.send('/same', 1)
            return first, await asyncio.gather(*(friend.send('/gate') for _ in range(32)))
        loop = uvloop.new_event_loop()
        try:
            first, gated = loop.run_until_complete(asyncio.wait_for(main(), 20))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
        self.assertEqual((first, gated), (((1,), {}), ['in'] * 32))

    def test_async_rules_stay_coroutine_functions(self):
        import asyncio
        import inspect
        M = Microservice('inspected')
        for mode in (M.reply, M.json, M.dict, M.stream):
            @M.typing('/' + mode.__name__)
            @mode
            async def rule(x):
                return x
            self.assertTrue(inspect.iscoroutinefunction(rule), mode.__name__)
            self.assertEqual(asyncio.run(rule(5)), 5)
            self.assertEqual(str(inspect.signature(rule)), '(x)')
        self.assertFalse(inspect.iscoroutinefunction(M.reply(lambda: 1)))
        self.assertTrue(inspect.iscoroutinefunction(mconnector.AsyncFriend.send))


def seen(request):
    """What a rule tells of mconnector.request, as JSON can carry it."""
    return {'method': request.method, 'target': request.target, 'path': request.path,
            'rule': request.rule, 'who': request.headers.get('x-who'),
            'peer': request.remote_address[0], 'client': request.client,
            'time_left': request.time_left}


class RequestContextTest(unittest.TestCase):
    """mconnector.request inside sync and async rules, streams and the Flask-like view,
    set in the thread or task that runs the function and nowhere else."""

    shell = 'builtin'

    def setUp(self):
        from mconnector import request
        M = self.M = Microservice('ctx', trusted_proxies=['127.0.0.0/8'])
        self.both_in = threading.Barrier(2, timeout=10)
        arrived = [0]

        @M.typing('/who/<name>', methods=['GET', 'POST'])
        def who(name, extra=None):
            return seen(request)

        @M.typing('/who-async')
        async def who_async():
            import asyncio
            await asyncio.sleep(0)
            return seen(request)

        @M.typing('/gen')
        @M.stream
        def gen(n):
            for _ in range(n):
                yield request.headers.get('x-who')

        @M.typing('/agen')
        @M.stream
        async def agen(n):
            for _ in range(n):
                yield request.headers.get('x-who')

        @M.typing('/pair')
        def pair():
            self.both_in.wait()             # two calls in at once, on two workers
            return request.headers['x-who']

        @M.typing('/pair-async')
        async def pair_async():
            import asyncio
            arrived[0] += 1                 # (the one asyncio loop: no race)
            for _ in range(1000):
                if arrived[0] >= 2:
                    break
                await asyncio.sleep(0.005)
            return request.headers['x-who']

        @M.app.route('/page')
        def page():
            return '%s %s' % (request.method, request.rule)
        self.friend = Service.start(self, M, headers={'X-Who': 'ann'})
        self.port = M.port

    def test_sync_and_async_rules_see_their_request(self):
        for rule in ('/who/x', '/who-async'):
            with self.subTest(rule=rule):
                got = self.friend.send(rule)
                self.assertEqual(got['method'], 'POST')
                self.assertEqual((got['target'], got['path']), (rule, rule))
                self.assertEqual(got['rule'], '/who/<name>' if rule == '/who/x' else rule)
                self.assertEqual(got['who'], 'ann')
                self.assertEqual((got['peer'], got['client']), ('127.0.0.1', '127.0.0.1'))
                # the sender's own timeout (30 s), less what the call took so far
                self.assertTrue(25 < got['time_left'] <= 30, got['time_left'])
        self.assertFalse(mconnector.request)        # nothing leaks into the caller
        with self.assertRaises(RuntimeError):
            mconnector.request.headers

    def test_query_string_method_and_no_deadline_from_other_senders(self):
        reply = raw_request(self.port, b'GET /who/%C3%A9?extra=1 HTTP/1.1\r\nHost: x\r\n'
                            b'Connection: close\r\n\r\n')
        got = json.loads(reply.split(b'\r\n\r\n', 1)[1])[0]
        self.assertEqual((got['method'], got['target'], got['path']),
                         ('GET', '/who/%C3%A9?extra=1', '/who/\xe9'))
        self.assertIsNone(got['time_left'])
        self.assertIsNone(got['who'])

    def test_streams_see_their_request_as_they_are_produced(self):
        self.assertEqual(self.friend.json('/gen', n=3), ['ann', 'ann', 'ann'])
        self.assertEqual(self.friend.json('/agen', n=2), ['ann', 'ann'])

    def test_calls_at_once_each_see_their_own(self):
        for rule in ('/pair', '/pair-async'):
            with self.subTest(rule=rule):
                friends = [Friend(name, self.M.url, headers={'X-Who': name})
                           for name in ('bob', 'eve')]
                with concurrent.futures.ThreadPoolExecutor(2) as calls:
                    answers = list(calls.map(lambda f: f.send(rule), friends))
                for friend in friends:
                    friend.close()
                self.assertEqual(answers, ['bob', 'eve'])

    def test_a_worker_keeps_nothing_from_one_call_to_the_next(self):
        M = Microservice('one-worker', max_workers=1)

        @M.typing('/who')
        def who():
            return mconnector.request.headers.get('x-who')
        plain = Service.start(self, M)
        named = Friend('named', M.url, headers={'X-Who': 'ann'})
        self.addCleanup(named.close)
        self.assertEqual([named.send('/who'), plain.send('/who'), named.send('/who')],
                         ['ann', None, 'ann'])

    def test_the_forwarded_client_only_from_a_trusted_proxy(self):
        forwarded = {'X-Forwarded-For': '203.0.113.9, 10.0.0.1, 127.0.0.1'}
        with Friend('proxied', self.M.url, headers=forwarded) as friend:
            self.assertEqual(friend.send('/who/x')['client'], '10.0.0.1')
        self.M._trusted = mconnector._trusted_proxies(['127.0.0.1', '10.0.0.0/8'])
        with Friend('proxied', self.M.url, headers=forwarded) as friend:
            got = friend.send('/who/x')
        self.assertEqual((got['peer'], got['client']), ('127.0.0.1', '203.0.113.9'))
        self.M._trusted = None          # (trusted_proxies=None: the header is anyone's)
        with Friend('proxied', self.M.url, headers=forwarded) as friend:
            self.assertEqual(friend.send('/who/x')['client'], '127.0.0.1')

    def test_the_flask_like_view(self):
        reply = raw_request(self.port, b'GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        self.assertTrue(reply.endswith(b'GET /page'), reply)

    def test_async_sender_deadline(self):
        async def main():
            async with mconnector.AsyncFriend('a', self.M.url, timeout=5) as friend:
                return await friend.send('/who-async')
        self.assertTrue(0 < run_async(main())['time_left'] <= 5)


class WSGIRequestContextTest(RequestContextTest):
    """The same through the WSGI entry, under wsgiref."""

    shell = 'wsgi'


class WebSocketRequestContextTest(unittest.TestCase):
    """mconnector.request in websocket handlers: the handshake's headers and the route."""

    def test_every_kind_of_handler(self):
        from mconnector import request
        sk = mconnector.SocketServer('ctx', trusted_proxies='127.0.0.1')

        def told(message):
            return '%s %s %s %s %s' % (message, request.path, request.rule,
                                      request.headers.get('x-who'), request.client)

        @sk.router('/plain/<n:int>')
        def plain(message, n):
            return told(message)

        @sk.router('/async')
        async def asynchronous(message):
            return told(message)

        @sk.render('/render')
        def render(ws, message):
            ws.send(told(message))
            ws.send(told(ws.recv()))

        @sk.render('/render-async')
        async def render_async(ws, message):
            await ws.send(told(message))
            await ws.send(told(await ws.recv()))
        sk.run(port=0)
        self.addCleanup(sk.stop)
        headers = {'X-Who': 'ann', 'X-Forwarded-For': '198.51.100.7'}
        expected = {'/plain/3': '/plain/<n:int>', '/async': '/async', '/render': '/render',
                    '/render-async': '/render-async'}
        for path, rule in expected.items():
            with self.subTest(path=path):
                with mconnector.SocketClient('127.0.0.1:%d' % sk.port, path,
                                             headers=headers) as ws:
                    ws.send('a')
                    self.assertEqual(ws.recv(5), 'a %s %s ann 198.51.100.7' % (path, rule))
                    ws.send('b')
                    self.assertEqual(ws.recv(5), 'b %s %s ann 198.51.100.7' % (path, rule))


class TestClientTest(unittest.TestCase):
    """M.test_client(): Friend's answers, errors, tokens and signatures, in process."""

    def service(self, **options):
        M = senders_service(token={'/secret': 's3cret', '/locked': 'x'}, **options)

        @M.typing('/add', methods=['GET', 'POST'])
        def add(a, b=1):
            return a + b

        @M.typing('/locked')
        def locked():
            return 'never'

        @M.typing('/gen')
        @M.stream
        def gen(n):                 # a generator made by a plain function
            return ({'i': i} for i in range(n))

        @M.typing('/cut')
        @M.stream
        def cut():
            yield 1
            raise ValueError('halfway')

        @M.typing('/async')
        async def asynchronous(x):
            import asyncio
            await asyncio.sleep(0)
            return x * 2

        @M.typing('/who')
        def who():
            return seen(mconnector.request)

        @M.typing('/late')
        def late():             # runs until its caller has given up
            while mconnector.request.time_left:
                time.sleep(0.01)
            return 'late'
        return M

    CALLS = [
        lambda f: f.send('/add', 2, b=3),
        lambda f: f.send('/same', (1, 2), {3}, b'\x00', k=frozenset({4})),
        lambda f: f.json('/kw', a=[1], b={'c': None}),
        lambda f: f.json('/gen', n=3),
        lambda f: f.send('/async', 21),
        lambda f: f.send('/secret'),
        lambda f: f.json('/add', method='GET', a=1),
        lambda f: f.send('/boom'),
        lambda f: f.send('/nowhere'),
        lambda f: f.json('/add', method='DELETE', a=1),
        lambda f: f.send('/add', 1, 2, 3),
        lambda f: f.send('/locked'),
        lambda f: f.json('/cut'),
        lambda f: f.rules(),
        lambda f: f.health()['status'],
    ]

    def outcomes(self, friend):
        out = []
        for call in self.CALLS:
            try:
                value = call(friend)
            except mconnector.MConnectorError as exc:
                value = (type(exc).__name__, str(exc))
            reply = friend.lastreply
            out.append((value, reply.status, reply.headers.get('content-type'),
                        reply.headers.get('x-mconnector-types'), reply.headers.get('allow')))
        return out

    def test_the_same_outcomes_as_a_friend_over_a_socket(self):
        M = self.service()
        friend = Service.start(self, M, token={'/secret': 's3cret'})
        client = M.test_client(token={'/secret': 's3cret'})     # (the same address)
        with self.assertLogs('mconnector', 'WARNING'):
            expected = self.outcomes(friend)
            got = self.outcomes(client)
        self.assertEqual(got, expected)
        self.assertEqual(got[0][0], 5)
        self.assertEqual([type(value).__name__ if not isinstance(value, tuple) else value[0]
                          for value, *_ in got[7:13]],
                         ['RemoteError', 'NotFound', 'MethodNotAllowed', 'BadRequest',
                          'AuthError', 'NetworkError'])

    def test_signed_calls(self):
        M = self.service(secretKey='k')
        self.assertEqual(M.test_client(secretKey='k').send('/add', 1), 2)
        for client in (M.test_client(), M.test_client(secretKey='wrong')):
            with self.assertRaises(mconnector.AuthError):
                client.send('/add', 1)

    def test_in_process_with_its_request_and_timeout(self):
        M = self.service()
        client = M.test_client(headers={'X-Who': 'ann'}, remote_address=('10.1.2.3', 5555),
                               timeout=5)
        got = client.send('/who')
        self.assertEqual((got['who'], got['peer'], got['client'], got['rule']),
                         ('ann', '10.1.2.3', '10.1.2.3', '/who'))
        self.assertTrue(0 < got['time_left'] <= 5)
        self.assertFalse(mconnector.request)        # answered in this thread; nothing left
        self.assertIsNone(M._server)                # never served: no socket
        self.assertEqual(M.stats['connections'], 0)
        import asyncio
        self.assertEqual(asyncio.run(client.send_async('/async', 4)), 8)
        with self.assertRaises(mconnector.CallTimeout) as caught:
            M.test_client(timeout=0.2).send('/late')
        self.assertIn('/late did not answer within 0.2s', str(caught.exception))

    def test_the_readme_example(self):
        with open(os.path.join(HERE, 'README.md'), encoding='utf-8') as readme:
            section = readme.read().split('## Testing your service')[1]
        code = section.split('```python\n', 1)[1].split('```', 1)[0]
        out = subprocess.run([sys.executable, '-c', code + 'unittest.main()'],
                             cwd=os.path.join(HERE, 'examples'), capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, PYTHONPATH=HERE))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn('Ran 1 test', out.stderr)
class MistakesTest(unittest.TestCase):
    """Mistakes in calls and in definitions: each gets one clear message that says what came
    and what was expected, never a silent wrong value."""

    @classmethod
    def setUpClass(cls):
        M = cls.M = Microservice('mistakes')

        @M.typing('/pair')
        @M.reply
        def pair(a, b=None):
            return {'a': a, 'b': b}

        @M.typing('/hello')
        @M.reply
        def hello(name):
            return 'hello ' + name

        @M.typing('/j')
        @M.json
        def j(a=1):
            return a

        @M.typing('/takes_args')
        @M.json
        def takes_args(args, kwargs=None, token=None):
            return args

        @M.typing('/d')
        @M.dict
        def d(x):
            return x

        @M.typing('/s')
        @M.stream
        def s(x):
            return x

        @M.typing('/returns')
        @M.reply
        def returns(what):
            return {'lock': threading.Lock(), 'complex': 1j, 'pair': (1, 1j),
                    'generator': (i for i in range(3)),
                    'nested': {'k': [1, threading.Lock()]}}[what]

        @M.typing('/streams')
        @M.stream
        def streams():
            return {'k': threading.Lock()}

        M.start(port=0, host='127.0.0.1')
        cls.friend = Friend('mistakes', M.url)

    @classmethod
    def tearDownClass(cls):
        cls.friend.close()
        cls.M.stop()

    def raise_message(self, error, call, *args, **kwargs):
        with self.assertRaises(error) as caught:
            call(*args, **kwargs)
        return str(caught.exception)

    def test_a_reply_rule_refuses_a_json_object_and_names_its_keys(self):
        expected = ('/pair takes {"args": [...], "kwargs": {...}}, as friend.send() and mconnector '
                    'call send them (not friend.json(), nor call --json), got an object with the '
                    "keys 'a'")
        self.assertEqual(self.raise_message(mconnector.BadRequest, self.friend.json, '/pair', a=1),
                         'HTTP 400: %s (%s/pair)' % (expected, self.M.url))
        reply = raw_request(self.M.port, b'POST /pair HTTP/1.1\r\nHost: x\r\nContent-Length: 8'
                                         b'\r\nContent-Type: application/json'
                                         b'\r\nConnection: close\r\n\r\n{"a": 1}')
        self.assertEqual(status_of(reply), 400)
        self.assertEqual(json.loads(reply.partition(b'\r\n\r\n')[2])['error']['message'], expected)
        out = mconnector_command('call', self.M.url, '/pair', '--json', 'a=1')
        self.assertEqual((out.returncode, out.stderr),
                         (1, 'mconnector: BadRequest: HTTP 400: %s (%s/pair)\n' % (expected, self.M.url)))
        self.assertEqual(self.friend.send('/pair', a=1), {'a': 1, 'b': None})

    def test_send_to_a_json_rule_says_it_takes_friend_json(self):
        for rule, mode in (('/j', 'json'), ('/d', 'dict'), ('/s', 'stream')):
            self.assertEqual(
                self.raise_message(mconnector.BadRequest, self.friend.send, rule, x=1),
                'HTTP 400: %s is an @M.%s rule: it takes one JSON object of keyword arguments, '
                'as friend.json() and mconnector call --json send them, not the {"args": [...], '
                '"kwargs": {...}} of friend.send() (%s%s)' % (rule, mode, self.M.url, rule))
        self.assertEqual(self.friend.send('/takes_args', 1), [1])     # a function that asks

    def test_values_without_a_wire_form_name_their_type_and_place(self):
        kinds = ('send None, bool, numbers, str, bytes, dates, Decimal, UUID, lists, tuples, '
                 'sets, dicts, or instances of your own classes')
        f = self.friend
        for call, where, kind in (
                (lambda: f.send('/hello', threading.Lock()), 'args[0]', '_thread.lock'),
                (lambda: f.send('/hello', name=len), "kwargs['name']", 'builtin_function_or_method'),
                (lambda: f.send('/hello', [1, 1j]), 'args[0][1]', 'complex'),
                (lambda: f.send('/hello', lambda: 1), 'args[0]', 'function'),
                (lambda: f.json('/d', x={'k': object()}), "kwargs['x']['k']", 'object')):
            with self.subTest(where=where):
                self.assertEqual(self.raise_message(mconnector.CodecError, call),
                                 '%s (of type %s) has no wire form: %s' % (where, kind, kinds))
        self.assertEqual(self.raise_message(mconnector.CodecError, f.json, '/d', x=iter([])),
                         "kwargs['x'] (of type list_iterator) has no wire form: send a list of "
                         "its items")
        for what, where, kind in (('lock', 'result', '_thread.lock'), ('complex', 'result', 'complex'),
                                  ('pair', 'result[1]', 'complex'),
                                  ('nested', "result['k'][1]", '_thread.lock')):
            with self.subTest(what=what):
                self.assertEqual(self.raise_message(mconnector.RemoteError, f.send, '/returns', what),
                                 'CodecError: %s (of type %s) has no wire form: %s (%s/returns)'
                                 % (where, kind, kinds, self.M.url))
        self.assertEqual(self.raise_message(mconnector.RemoteError, f.send, '/returns', 'generator'),
                         'CodecError: result (of type generator) has no wire form: return a list, '
                         'or serve the rule with @M.stream, which sends the items of a generator '
                         'as they are produced (%s/returns)' % self.M.url)
        # Answered 500 before its head goes out, not cut short halfway:
        self.assertEqual(self.raise_message(mconnector.RemoteError, f.json, '/streams'),
                         "CodecError: result['k'] (of type _thread.lock) has no wire form: %s "
                         "(%s/streams)" % (kinds, self.M.url))

    def test_dict_and_stream_lists_arrive_as_returned(self):
        for rule in ('/d', '/s'):
            for value in ([5], [1, 2], [], {'k': [1]}, 5, (1, 2)):
                with self.subTest(rule=rule, value=value):
                    got = self.friend.json(rule, x=value)
                    self.assertEqual((got, type(got)), (value, type(value)))
        # A 0.3.7 sender, which sends no X-MConnector, gets the body 0.3.7 listeners sent
        # (and unwraps it as it did); an mconnector sender is told not to.
        for header, mode in ((b'', None), (b'X-MConnector: 1.2.0\r\n', b'dict')):
            reply = raw_request(self.M.port, b'POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: '
                                             b'10\r\nContent-Type: application/json\r\n'
                                             b'%sConnection: close\r\n\r\n{"x": [5]}' % header)
            head, _, body = reply.partition(b'\r\n\r\n')
            self.assertEqual(body, b'[5]')
            self.assertEqual(parse_head(head).get('x-mconnector-mode'), mode and mode.decode())

    def test_a_rule_without_its_leading_slash_is_called_as_on_the_command_line(self):
        self.assertEqual(self.friend.send('hello', 'x'), 'hello x')
        out = mconnector_command('call', self.M.url, 'hello', 'x')
        self.assertEqual((out.returncode, out.stdout), (0, '"hello x"\n'), out.stderr)

    def test_every_problem_of_the_arguments_is_named(self):
        self.assertEqual(self.raise_message(mconnector.BadRequest, self.friend.send, '/hello', nam='x'),
                         "HTTP 400: hello(name): missing argument 'name'; unexpected keyword "
                         "argument 'nam' (did you mean 'name'?) (%s/hello)" % self.M.url)
        self.assertEqual(self.raise_message(mconnector.BadRequest, self.friend.send, '/pair', 1, 2, 3),
                         'HTTP 400: pair(a, b=None): takes 2 positional arguments but 3 were given '
                         '(%s/pair)' % self.M.url)

    def test_definitions_fail_at_once_naming_the_rule_or_the_argument(self):
        M = Microservice('defs')

        def one():
            pass

        def two():
            pass
        M.typing('/x')(one)
        with self.assertRaises(mconnector.RouteError) as caught:
            M.typing('/x')(two)
        self.assertEqual(str(caught.exception), 'POST /x is already served by one(): a second '
                         'function would replace it (give it another rule, or other methods)')
        M.typing('/x', methods=['GET'])(two)        # another method of the same rule
        self.assertEqual(M.rules, {'/x': ['GET', 'POST']})
        types = 'string, str, int, number, float, alpha, path, uuid'
        for rule, kind in (('/item/<id:integer>', 'integer'), ('/item/<integer:id>', 'id')):
            with self.assertRaises(mconnector.RouteError) as caught:
                M.typing(rule)
            self.assertEqual(str(caught.exception), "rule %r: unknown parameter type %r (the "
                             "types are %s; a regex must be more than a word)" % (rule, kind, types))
        for make, message in (
                (lambda: Microservice('d', token=123), "Microservice('d'): token must be a string "
                 "(one token for every rule) or a {rule: token} dict, got 123"),
                (lambda: Microservice('d', token={'/x': 1}), 'the token of /x must be a string, '
                 'got 1'),
                (lambda: M.typing('/y', token=5)(one), 'the token of /y must be a string, got 5'),
                (lambda: Friend('f', 'http://127.0.0.1:1', token=123), "Friend('f'): token must "
                 "be a string (one token for every rule) or a {rule: token} dict, got 123"),
                (lambda: Friend('f', 'http://127.0.0.1:1').setRule('/x', token=5),
                 "Friend('f'): the token of /x must be a string, got 5")):
            with self.subTest(message=message), self.assertRaises(TypeError) as caught:
                make()
            self.assertEqual(str(caught.exception), message)
        sk = mconnector.SocketServer('defs')
        sk.router('/echo')(one)
        with self.assertRaises(mconnector.RouteError) as caught:
            sk.router('/echo')(two)
        self.assertEqual(str(caught.exception),
                         '/echo is already served by one(): a second handler would replace it')

    def test_a_taken_port_is_named_by_start_and_by_the_websocket_server(self):
        import errno
        with socket.socket() as taken:
            taken.bind(('127.0.0.1', 0))
            taken.listen()
            port = taken.getsockname()[1]
            for start, name in ((lambda: Microservice('late').start(port=port, host='127.0.0.1'), 'late'),
                                (lambda: mconnector.SocketServer('sk').run('127.0.0.1', port),
                                 'websocket server sk')):
                with self.subTest(name=name), self.assertRaises(OSError) as caught:
                    start()
                self.assertEqual(caught.exception.errno, errno.EADDRINUSE)
                self.assertEqual(str(caught.exception), '%s: cannot listen on 127.0.0.1:%d: '
                                 'Address already in use' % (name, port))
            with self.assertRaises(OSError) as caught:
                Microservice('far').start(port=99999, host='127.0.0.1')
            self.assertEqual(str(caught.exception), 'far: cannot listen on 127.0.0.1:99999: a '
                             'port is a number from 0 to 65535')


def parse_head(head):
    """The header fields of a raw reply's head, by lower-case name."""
    return mconnector.parse_header_block(head.partition(b'\r\n')[2] + b'\r\n\r\n')


def mconnector_command(*args, cwd=HERE, **options):
    """`python -m mconnector ARGS` run to its end."""
    return subprocess.run([sys.executable, '-m', 'mconnector'] + list(args), cwd=cwd,
                          capture_output=True, text=True, timeout=30, **options)


class CommandLineTest(unittest.TestCase):
    def run_cli(self, *args, **options):
        return mconnector_command(*args, **options)

    def test_help_and_version(self):
        out = self.run_cli('--help')
        self.assertEqual(out.returncode, 0)
        for command in ('serve', 'call', 'ws'):
            self.assertIn(command, out.stdout)
            self.assertEqual(self.run_cli(command, '--help').returncode, 0)
        self.assertIn(mconnector.__version__, self.run_cli('--version').stdout)
        self.assertEqual(self.run_cli('-V').stdout, 'mconnector %s\n' % mconnector.__version__)

    def test_usage_errors_are_one_line_and_exit_2(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            closed = 'http://127.0.0.1:%d' % s.getsockname()[1]
        listener = 'a listener address is http://HOST:PORT or https://HOST:PORT, got '
        for args, message in (
                (('call', 'ws://127.0.0.1:1', '/a'),
                 listener + "'ws://127.0.0.1:1' (websockets: mconnector ws URL)"),
                (('call', 'ftp://127.0.0.1:1', '/a'), listener + "'ftp://127.0.0.1:1'"),
                (('rules', 'wss://127.0.0.1:1'),
                 listener + "'wss://127.0.0.1:1' (websockets: mconnector ws URL)"),
                (('call', 'http://127.0.0.1:notaport', '/a'),
                 "the port of 'http://127.0.0.1:notaport' is not a number from 0 to 65535"),
                (('call', closed, '/a', '1', '--json'), '--json takes NAME=VALUE arguments only'),
                (('serve', 'examples/app1.py', '--port', '99999'),
                 '--port takes a port from 0 to 65535, not 99999'),
                (('serve', 'examples/app1.py', '--ws-port', '-1'),
                 '--ws-port takes a port from 0 to 65535, not -1'),
                (('serve', 'examples/app1.py', '--workers', '0'),
                 '--workers takes a number of processes, 1 or more'),
                (('ws', 'http://127.0.0.1:1/x'),
                 "a websocket URL starts with ws:// or wss://, not 'http://127.0.0.1:1/x'"),
                (('ws', 'ws://127.0.0.1:99999/x'),
                 "the port of 'ws://127.0.0.1:99999/x' is not a number from 0 to 65535")):
            with self.subTest(args=args):
                out = self.run_cli(*args)
                self.assertEqual((out.returncode, out.stderr), (2, 'mconnector: %s\n' % message))

    def test_a_bad_option_shows_its_commands_usage_and_every_error_one_prefix(self):
        for command, args in (('call', ('http://127.0.0.1:1', '/echo', '--x')),
                              ('serve', ('examples/app1.py', '--x')), ('ws', ('--x', 'ws://h'))):
            with self.subTest(command=command):
                out = self.run_cli(command, *args)
                self.assertEqual(out.returncode, 2)
                self.assertTrue(out.stderr.startswith('usage: mconnector %s ' % command), out.stderr)
                self.assertTrue(out.stderr.endswith('\nmconnector: unrecognized arguments: --x\n'),
                                out.stderr)
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        out = self.run_cli('ws', 'ws://127.0.0.1:%d/x' % port)
        self.assertEqual(out.returncode, 1)
        self.assertRegex(out.stderr, r'\Amconnector: cannot connect to 127\.0\.0\.1:%d: .*\n\Z' % port)
        out = self.run_cli('call', 'http://127.0.0.1:%d' % port, '/a')
        self.assertEqual(out.returncode, 1)
        self.assertRegex(out.stderr, r'\Amconnector: Unreachable: cannot reach .*\n\Z')

    def test_serve_of_an_app_that_cannot_be_imported_shows_the_users_own_traceback(self):
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        broken = os.path.join(folder.name, 'broken.py')
        with open(broken, 'w') as f:
            f.write('from mconnector import Microservice\nM = Microservice("broken")\n'
                    'raise RuntimeError("no settings")\n')
        traceback = ('mconnector: cannot import broken:\nTraceback (most recent call last):\n'
                     '  File "%s", line 3, in <module>\n    raise RuntimeError("no settings")\n'
                     % broken)
        env = dict(os.environ, PYTHONPATH=HERE)
        out = self.run_cli('serve', 'nosuchapp', cwd=folder.name, env=env)
        self.assertEqual((out.returncode, out.stderr), (1, (
            "mconnector: cannot import nosuchapp: no module 'nosuchapp' on the path (run serve "
            "from the directory that holds it, or name the file: serve path/to/nosuchapp.py)\n")))
        for args in (('broken',), ('broken.py',), ('broken', '--debug'), ('broken', '--workers', '2')):
            with self.subTest(args=args):
                out = self.run_cli('serve', *args, cwd=folder.name, env=env)
                self.assertEqual(out.returncode, 1)
                self.assertTrue(out.stderr.startswith(traceback.replace('broken:', args[0] + ':')),
                                out.stderr)
                self.assertTrue(out.stderr.endswith('RuntimeError: no settings\n'), out.stderr)
        # Where the children import the app (the address is given), they say the same.
        for option in ('--debug', '--workers'):
            with self.subTest(option=option):
                serve = ServeProcess(self, folder.name, 'broken', '--host', '127.0.0.1', '--port',
                                     '0', *([option, '2'] if option == '--workers' else [option]),
                                     cwd=folder.name, env={'PYTHONPATH': HERE})
                self.assertTrue(wait_for(lambda: 'RuntimeError: no settings' in serve.output(), 10),
                                serve.output())
                self.assertIn(traceback, serve.output())
                self.assertNotIn('mconnector.py', serve.output())
                self.assertNotIn('importlib', serve.output())

    def test_two_sigterms_at_once_are_one_clean_stop(self):
        # As timeout(1) sends them: to the process, then to its whole group.
        import signal
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        script = os.path.join(folder.name, 'script.py')
        with open(script, 'w') as f:        # run() with no logging configured
            f.write('from mconnector import Microservice\n'
                    'Microservice("script", port=0, host="127.0.0.1").run()\n')
        for gap in (0, 0.001, 0.003):
            for command in ([sys.executable, script],
                            [sys.executable, '-m', 'mconnector', 'serve', 'examples/app1.py',
                             '--host', '127.0.0.1', '--port', '0']):
                with self.subTest(gap=gap, command=command[1]):
                    serve = ServeProcess(self, folder.name, command=command,
                                         env={'PYTHONPATH': HERE})
                    serve.url()         # the start line reached the terminal
                    os.kill(serve.proc.pid, signal.SIGTERM)
                    time.sleep(gap)
                    try:
                        os.killpg(serve.proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    self.assertEqual(serve.proc.wait(10), 0, serve.output())
                    self.assertTrue(serve.output().endswith(': stopped\n'), serve.output())

    def test_call(self):
        M = Microservice('cli')

        @M.typing('/add')
        def add(a, b=0):
            return a + b

        @M.typing('/j')
        @M.json
        def j(name, n):
            return {'name': name, 'n': n}
        Service.start(self, M)
        out = self.run_cli('call', M.url, '/add', '40', 'b=2')
        self.assertEqual((out.returncode, json.loads(out.stdout)), (0, 42), out.stderr)
        out = self.run_cli('call', M.url, '/j', 'name=ann', 'n=[1]', '--json')
        self.assertEqual(json.loads(out.stdout), {'name': 'ann', 'n': [1]})
        out = self.run_cli('call', M.url, '/j', '--json', 'name=bo', '--timeout', '5', 'n=2')
        self.assertEqual(json.loads(out.stdout), {'name': 'bo', 'n': 2}, out.stderr)
        out = self.run_cli('rules', M.url)
        self.assertEqual(out.stdout.splitlines()[:2],
                         ['RULE  METHODS  PARAMETERS  TOKEN  FUNCTION',
                          '/add  POST     a, b=0      no     add'])
        with self.assertLogs('mconnector', 'WARNING'):
            out = self.run_cli('call', M.url, '/add', '"x"', '1')
        self.assertEqual(out.returncode, 1)
        self.assertIn('RemoteError', out.stderr)
        self.assertEqual(len(out.stderr.strip().splitlines()), 1)

    def test_serve_then_ctrl_c_exits_cleanly(self):
        import signal
        proc = subprocess.Popen(
            [sys.executable, '-m', 'mconnector', 'serve', 'examples/app1.py', '--host', '127.0.0.1',
             '--port', '0'], cwd=HERE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        line = proc.stderr.readline()
        self.assertIn('listening on http://127.0.0.1:', line)
        url = line.split('listening on ')[1].split()[0]
        with Friend('app1', url) as friend:
            self.assertEqual(friend.send('/helloworld', 'Mr. Developer'), 'Welcome Mr. Developer')
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn('Traceback', rest)

    def serve_a_stuck_call(self, *args):
        """`serve` of a service whose one call in flight never returns: (serve, answer)."""
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        app = os.path.join(folder.name, 'stuck.py')
        with open(app, 'w') as f:
            f.write('import threading\nfrom mconnector import Microservice\n'
                    'M = Microservice("stuck")\n\n@M.typing("/stuck")\ndef stuck():\n'
                    '    threading.Event().wait()\n')
        serve = ServeProcess(self, folder.name, app, '--host', '127.0.0.1', '--port', '0',
                             *args)
        url = serve.url()
        calls = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(calls.shutdown)
        answer = calls.submit(call_once, url, '/stuck')
        with Friend('ops', url) as ops:
            self.assertTrue(wait_for(lambda: metric_values(ops._call(
                'GET', '/_mc/metrics', b'', None))['mconnector_requests_in_flight{service="stuck"}'] == 2))
        return serve, answer

    def test_serve_grace_bounds_the_stop(self):
        serve, answer = self.serve_a_stuck_call('--grace', '0.2')
        serve.terminate()
        self.assertIn('1 request(s) cut short after 0.2s', serve.output())
        with self.assertRaises(mconnector.NetworkError):
            answer.result(5)

    def test_a_ctrl_c_after_sigterm_is_the_same_stop(self):
        # A supervised process gets both for one Ctrl+C: the terminal's, and its parent's.
        import signal
        serve, answer = self.serve_a_stuck_call('--grace', '0.5')
        serve.proc.send_signal(signal.SIGTERM)
        self.assertTrue(wait_for(lambda: 'stopping (SIGTERM)' in serve.output(), 5))
        serve.proc.send_signal(signal.SIGINT)
        self.assertEqual(serve.proc.wait(5), 0, serve.output())
        self.assertIn('1 request(s) cut short after 0.5s', serve.output())

    def test_a_second_ctrl_c_stops_at_once(self):
        import signal
        serve, answer = self.serve_a_stuck_call()       # the grace: 10 s
        serve.proc.send_signal(signal.SIGINT)
        self.assertTrue(wait_for(lambda: 'stopping (SIGINT)' in serve.output(), 5))
        self.assertIsNone(serve.proc.poll())
        serve.proc.send_signal(signal.SIGINT)
        self.assertEqual(serve.proc.wait(5), 0, serve.output())
        self.assertIn('1 request(s) cut short by a second Ctrl+C', serve.output())
        self.assertNotIn('Traceback', serve.output())
        with self.assertRaises(mconnector.NetworkError):
            answer.result(5)

    def test_run_on_a_taken_port_says_so_and_exits(self):
        with socket.socket() as taken:
            taken.bind(('127.0.0.1', 0))
            taken.listen()
            M = Microservice('late', port=taken.getsockname()[1], host='127.0.0.1')
            with self.assertLogs('mconnector', 'ERROR') as logs, self.assertRaises(SystemExit) as caught:
                M.run()
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(logs.output, ['ERROR:mconnector:late: cannot listen on 127.0.0.1:%d: '
                                       'Address already in use' % M.port])

    def test_serve_of_websocket_servers_alone_stops_on_a_signal(self):
        import signal
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        with open(os.path.join(folder.name, 'wsonly.py'), 'w') as f:
            f.write('from mconnector import SocketServer\nsk = SocketServer("wsonly")\n'
                    '@sk.router("/echo")\ndef echo(message):\n    return message\n')
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                serve = ServeProcess(self, folder.name, 'wsonly.py', '--host', '127.0.0.1',
                                     '--ws-port', '0', cwd=folder.name,
                                     env={'PYTHONPATH': HERE})
                with mconnector.SocketClient(serve.url(scheme='ws'), '/echo') as ws:
                    ws.send('ping')
                    self.assertEqual(ws.recv(5), 'ping')
                    serve.proc.send_signal(signum)
                    self.assertEqual(list(ws), [])
                    self.assertEqual(ws.close_code, 1001)
                self.assertEqual(serve.proc.wait(5), 0, serve.output())
                self.assertNotIn('Traceback', serve.output())

    def test_serve_starts_the_websocket_server_beside_the_listener(self):
        import signal
        import tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__('shutil').rmtree(folder))
        with open(os.path.join(folder, 'both.py'), 'w') as f:
            f.write('from mconnector import Microservice, SocketServer\n'
                    'M = Microservice(__name__)\n'
                    'sk = SocketServer(__name__)\n'
                    '@M.typing("/hi")\n'
                    'def hi(name):\n'
                    '    return "hi " + name\n'
                    '@sk.router("/echo")\n'
                    'def echo(message):\n'
                    '    return message\n')
        proc = subprocess.Popen(
            [sys.executable, '-m', 'mconnector', 'serve', os.path.join(folder, 'both.py'),
             '--host', '127.0.0.1', '--port', '0', '--ws-port', '0'], cwd=HERE,
            stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        http_url = ws_url = None
        while not (http_url and ws_url):
            line = proc.stderr.readline()
            self.assertTrue(line, 'serve ended before both servers started')
            if 'listening on http://' in line:
                http_url = line.split('listening on ')[1].split()[0]
            elif ' on ws://' in line:
                ws_url = line.split(' on ')[-1].split()[0]
        with Friend('both', http_url) as friend:
            self.assertEqual(friend.send('/hi', 'you'), 'hi you')
        with mconnector.SocketClient(ws_url, '/echo') as ws:
            ws.send('ping')
            self.assertEqual(ws.recv(5), 'ping')
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn('Traceback', proc.stderr.read())

    def test_serve_without_a_service_is_a_clear_error(self):
        out = self.run_cli('serve', 'json')
        self.assertNotEqual(out.returncode, 0)
        self.assertIn('defines no Microservice', out.stderr)


class ModuleTest(unittest.TestCase):
    def test_all_names_exist(self):
        for name in mconnector.__all__:
            self.assertTrue(hasattr(mconnector, name), name)

    def test_0_3_7_names_and_aliases(self):
        self.assertIs(mconnector.SanicApp, Microservice)
        self.assertIs(Microservice.route, Microservice.typing)
        self.assertIs(Friend.set_rule, Friend.setRule)
        self.assertIs(Friend.remove_token, Friend.removeToken)
        self.assertIs(Microservice.remove_token, Microservice.removeToken)
        friend = Friend('f', 'http://127.0.0.1:1', secretKey='k')
        self.assertEqual(friend.secret_key, 'k')
        friend.lastMessage = 'm'
        self.assertEqual((friend.last_message, friend.last_reply), ('m', None))
        self.assertEqual(Microservice('m', secretKey='s').secret_key, 's')

    def test_timeit_logs_each_call_as_0_3_7_printed_it(self):
        @mconnector.timeit
        def work(x):
            return x * 2

        @mconnector.timeit
        async def later(x):
            return x + 1
        import asyncio
        with self.assertLogs('mconnector', 'INFO') as logs:
            self.assertEqual(work(2), 4)
            self.assertEqual(asyncio.run(later(2)), 3)
        self.assertEqual(len(logs.output), 2)
        for line, name in zip(logs.output, ('work', 'later')):
            self.assertRegex(line, r"\AINFO:mconnector:'%s'  \d+\.\d\d ms\Z" % name)
        self.assertEqual(work.__name__, 'work')
        # With no logging configured at all, the line is printed, as 0.3.7 did.
        code = ('import mconnector\n@mconnector.timeit\ndef work():\n    pass\nwork()\n')
        out = subprocess.run([sys.executable, '-c', code], cwd=HERE, capture_output=True, text=True)
        self.assertRegex(out.stdout, r"\A'work'  \d+\.\d\d ms\n\Z")

    def test_import_stays_light(self):
        code = ('import sys, mconnector; heavy = {"asyncio", "ssl", "multiprocessing", '
                '"http.client", "concurrent.futures", "email.parser"} & set(sys.modules); '
                'print(sorted(heavy))')
        out = subprocess.run([sys.executable, '-c', code], cwd=HERE, capture_output=True, text=True)
        self.assertEqual(out.stdout.strip(), '[]', out.stderr)

    def test_no_symbolic_links(self):
        # A Windows checkout turns a link into a text file holding its target.
        links = [os.path.relpath(os.path.join(folder, name), HERE)
                 for folder, dirs, files in os.walk(HERE) if '.git' not in folder.split(os.sep)
                 for name in dirs + files if os.path.islink(os.path.join(folder, name))]
        self.assertEqual(links, [])

    def test_the_typed_example_runs(self):
        out = subprocess.run([sys.executable, os.path.join(HERE, 'examples', 'typed_service.py')],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.splitlines(), [
            "add: 42 | who: {'client': '127.0.0.1', 'rule': '/who', 'user': 'ann'}",
            'raised: TypeError', 'async: [1, 2, 3]', 'in process: 2 5', 'pool: 11'])

    def test_examples_run_from_anywhere(self):
        # Each finds the checkout's module one folder up, whatever the working directory.
        code = 'import runpy, sys; sys.argv = ["app1"]; runpy.run_path(%r); print("ok")' \
            % os.path.join(HERE, 'examples', 'app1.py')
        out = subprocess.run([sys.executable, '-I', '-c', code], cwd=os.path.dirname(HERE),
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.stdout.strip(), 'ok', out.stderr)


# ==========================================================================================
# Security and robustness
# ==========================================================================================

CERTS = os.path.join(HERE, 'tests', 'certs')


def counting_service(**options):
    """A listener with /count (counts its runs) and /echo rules."""
    M = Microservice('guarded', **options)
    M.runs = []

    @M.typing('/count', methods=['GET', 'POST'])
    def count(x=None):
        M.runs.append(x)
        return len(M.runs)

    @M.typing('/echo')
    @M.dict
    def echo(**kwargs):
        return kwargs
    return M


class SignedCallTest(unittest.TestCase):
    shell = 'builtin'

    def setUp(self):
        self.M = counting_service(secretKey='k3y')
        self.good = Service.start(self, self.M, secretKey='k3y')

    def test_signed_calls_run_and_others_never_do(self):
        self.assertEqual(self.good.send('/count', 1), 1)
        for friend in (Friend('none', self.M.url), Friend('wrong', self.M.url, secretKey='nope')):
            self.addCleanup(friend.close)
            with self.assertRaises(mconnector.AuthError):
                friend.send('/count', 2)
        self.assertEqual(self.M.runs, [1])

    def test_replayed_or_stale_signatures_are_refused(self):
        body = b'{"args": [7]}'
        signed = mconnector.sign_request('k3y', 'POST', '/count', body)
        head = b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n' % len(body)
        head += b'Content-Type: application/json\r\n'
        head += b''.join(b'%s: %s\r\n' % (k.encode(), v.encode()) for k, v in signed)
        first = raw_request(self.M.port, head + b'Connection: close\r\n\r\n' + body)
        again = raw_request(self.M.port, head + b'Connection: close\r\n\r\n' + body)
        self.assertEqual(status_of(first), 200, first)
        self.assertEqual(status_of(again), 401, again)
        self.assertIn(b'replayed', again)
        old = mconnector.sign_request('k3y', 'POST', '/count', body, timestamp=time.time() - 301)
        head = b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n' % len(body)
        head += b''.join(b'%s: %s\r\n' % (k.encode(), v.encode()) for k, v in old)
        self.assertIn(b'window', raw_request(self.M.port, head + b'\r\n' + body))
        tampered = raw_request(self.M.port, head.replace(b'/count', b'/echo') + b'\r\n' + body)
        self.assertEqual(status_of(tampered), 401, tampered)
        self.assertEqual(self.M.runs, [7])

    def test_signature_verifies_on_bytes(self):
        nonces = mconnector.NonceCache(window=300)
        headers = {k.lower(): v for k, v in
                   mconnector.sign_request('k', 'GET', '/a?b=1', b'', timestamp=1000, nonce='n1')}
        mconnector.verify_request('k', 'GET', '/a?b=1', headers, b'', nonces, now=1100)
        for key, method, target, body, now in (('k', 'GET', '/a?b=1', b'', 1100),   # replay
                                               ('x', 'GET', '/a?b=1', b'', 1100),
                                               ('k', 'GET', '/a?b=2', b'', 1100),
                                               ('k', 'GET', '/a?b=1', b'!', 1100),
                                               ('k', 'GET', '/a?b=1', b'', 1400)):
            with self.assertRaises(mconnector.HTTPError) as caught:
                mconnector.verify_request(key, method, target, headers, body,
                                          mconnector.NonceCache() if now != 1100 or key != 'k'
                                          or target != '/a?b=1' or body else nonces, now=now)
            self.assertEqual(caught.exception.status, 401)


class WSGISignedCallTest(SignedCallTest):
    """Signed calls through the WSGI entry: the signature covers the target as sent."""

    shell = 'wsgi'

    def test_mounted_under_a_prefix(self):
        # Routed on PATH_INFO, verified on SCRIPT_NAME + PATH_INFO: what the sender signed.
        def mounted(environ, start_response):
            from wsgiref.util import shift_path_info
            if shift_path_info(environ) != 'svc':
                start_response('404 Not Found', [('Content-Type', 'text/plain')])
                return [b'not here']
            return self.M(environ, start_response)
        server = serve_wsgi(self, mounted)
        with Friend('mounted', 'http://127.0.0.1:%d/svc' % server.server_port,
                    secretKey='k3y') as friend:
            self.assertEqual(friend.send('/count', 'm'), len(self.M.runs))
        self.assertEqual(self.M.runs[-1], 'm')


# ==========================================================================================
# Security: what a meddler on the path, a stranger and a web page can make a listener do
# ==========================================================================================

def signed_request(key, target, body, headers=(), signed_headers=None, method='POST'):
    """The bytes of a request signed with `key`; `signed_headers` (default: `headers`) are
    the headers the sender signed, `headers` those that travel (a meddler's changes)."""
    signature = mconnector.sign_request(key, method, target, body,
                                        headers=headers if signed_headers is None
                                        else signed_headers)
    fields = [('Host', 'x'), ('Content-Type', 'application/json'),
              ('Content-Length', str(len(body))), ('Connection', 'close')]
    fields += list(headers) + signature
    head = '%s %s HTTP/1.1\r\n%s\r\n' % (method, target,
                                          ''.join('%s: %s\r\n' % f for f in fields))
    return head.encode('latin-1') + body


def error_of(reply):
    """(status, message) of a raw HTTP reply carrying a JSON error."""
    body = reply.partition(b'\r\n\r\n')[2]
    return status_of(reply), json.loads(body)['error']['message']


class SignatureCoverageTest(unittest.TestCase):
    """A signed call cannot be read otherwise than its sender meant: the headers that the
    listener reads to interpret it are signed with it."""

    shell = 'builtin'

    def setUp(self):
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.runs = []
        M = self.M = Microservice('signed', secretKey='k3y', token={'/guarded': 't0k'},
                                  nonce_store=os.path.join(folder.name, 'nonces'))

        @M.typing('/kind')
        @M.json
        def kind(a):
            self.runs.append(a)
            return type(a).__name__

        @M.typing('/guarded')
        @M.json
        def guarded(a):
            self.runs.append(a)
            return a
        self.friend = Service.start(self, M, secretKey='k3y')

    def send(self, target, headers=(), signed_headers=None, body=b'{"a": "AAAA"}'):
        return raw_request(self.M.port, signed_request('k3y', target, body, headers,
                                                       signed_headers))

    def assertSigned(self, target, header):
        """`header` added on the way, or dropped, makes the signature fail."""
        for sent, signed in (([header], []), ([], [header])):
            self.assertEqual(error_of(self.send(target, sent, signed_headers=signed)),
                             (401, 'bad signature'))
        self.assertEqual(self.runs, [])

    def test_type_notes_added_on_the_way_are_refused(self):
        notes = ('X-MConnector-Types', '[[["a"], "bytes"]]')
        self.assertSigned('/kind', notes)
        self.assertTrue(self.send('/kind', [notes]).endswith(b'["bytes"]'))   # as signed
        self.assertTrue(self.send('/kind').endswith(b'["str"]'))
        self.assertEqual(self.friend.json('/kind', a=b'\x00'), 'bytes')      # Friend signs them
        self.assertEqual(self.runs, [b'\x00\x00\x00', 'AAAA', b'\x00'])

    def test_the_token_header_is_signed(self):
        bearer = ('Authorization', 'Bearer t0k')
        self.assertSigned('/guarded', bearer)
        self.assertEqual(status_of(self.send('/guarded', [bearer])), 200)
        self.friend.setRule('/guarded', token='t0k')
        self.assertEqual(self.friend.json('/guarded', a=2), 2)
        self.assertEqual(self.runs, ['AAAA', 2])

    def test_the_signed_text_is_the_one_documented(self):
        # As a client in another language would build it from the README.
        import hashlib
        import hmac
        body = b'{"a": 1}'
        text = '\n'.join(['POST', '/kind?x=1', '1700000000', 'n0nce',
                          hashlib.sha256(body).hexdigest(), 'authorization:Bearer t0k',
                          'sec-websocket-protocol:chat', 'x-mconnector:1.0',
                          'x-mconnector-types:[[["a"], "bytes"]]'])
        expected = hmac.new(b'k3y', text.encode('utf-8'), hashlib.sha256).hexdigest()
        headers = [('X-MConnector-Types', ' [[["a"], "bytes"]] '), ('Content-Type', 'text/x'),
                   ('authorization', 'Bearer t0k'), ('X-MConnector', '1.0'),
                   ('User-Agent', 'other'), ('Sec-WebSocket-Protocol', 'chat')]
        signed = dict(mconnector.sign_request('k3y', 'POST', '/kind?x=1', body, 1700000000,
                                              'n0nce', headers))
        self.assertEqual(signed['X-MC-Signature'], expected)
        received = {k.lower(): v.strip() for k, v in headers + list(signed.items())}
        received['x-forwarded-for'] = '10.0.0.1'        # what a proxy adds is not signed
        mconnector.verify_request('k3y', 'POST', '/kind?x=1', received, body,
                                  mconnector.NonceCache(), now=1700000000)

    def test_malformed_signature_headers_are_401_and_the_listener_goes_on(self):
        good = dict(mconnector.sign_request('k3y', 'POST', '/kind', b'{"a": 1}'))
        for name, value, message in (
                ('X-MC-Timestamp', '9' * 5000, 'malformed signature timestamp'),
                ('X-MC-Timestamp', '\xb2', 'malformed signature timestamp'),
                ('X-MC-Timestamp', '-1', 'malformed signature timestamp'),
                ('X-MC-Nonce', 'n' * 65, 'malformed nonce'),
                ('X-MC-Nonce', '\xe9t\xe9', 'malformed nonce'),
                ('X-MC-Signature', good['X-MC-Signature'][:-1] + '\xe9', 'malformed signature'),
                ('X-MC-Signature', 'zz' * 32, 'malformed signature')):
            fields = dict(good, **{name: value})
            head = ''.join('%s: %s\r\n' % f for f in fields.items())
            reply = raw_request(self.M.port, (
                'POST /kind HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                'Content-Length: 8\r\nConnection: close\r\n%s\r\n{"a": 1}' % head
            ).encode('latin-1'))
            status, text = error_of(reply)
            self.assertEqual(status, 401, (name, value[:10], reply[:200]))
            self.assertIn(message, text)
        self.assertEqual(self.runs, [])
        self.assertEqual(self.friend.json('/kind', a=1), 'int')


class WSGISignatureCoverageTest(SignatureCoverageTest):
    shell = 'wsgi'


class SignedCallsRunOnceTest(unittest.TestCase):
    """A signed call runs at most once per service: across its processes and restarts,
    through the nonce store that they share."""

    shell = 'builtin'

    def setUp(self):
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = folder.name
        self.store = os.path.join(self.folder, 'nonces.sqlite3')

    def start(self, **options):
        M = counting_service(secretKey='k3y', nonce_store=self.store, **options)
        Service.start(self, M)
        return M

    def test_a_replay_to_a_restarted_listener_is_refused(self):
        request = signed_request('k3y', '/count', b'{"args": [1]}')
        first = self.start()
        self.assertEqual(status_of(raw_request(first.port, request)), 200)
        if self.shell == 'builtin':
            first.stop()
        again = self.start()                    # a new process would start just so
        self.assertEqual(error_of(raw_request(again.port, request)),
                         (401, 'replayed request (nonce already seen)'))
        self.assertEqual((first.runs, again.runs), ([1], []))
        with Friend('signed', again.url, secretKey='k3y') as friend:
            self.assertEqual(friend.send('/count', 2), 1)

    def test_a_store_that_cannot_be_used_refuses_signed_calls_with_503(self):
        self.store = self.folder                # a directory: SQLite cannot open it
        M = self.start()
        with self.assertLogs('mconnector', 'ERROR') as logs:
            status, message = error_of(raw_request(
                M.port, signed_request('k3y', '/count', b'{"args": [1]}')))
        self.assertEqual(status, 503)
        self.assertIn('replay protection unavailable', message)
        self.assertIn(self.folder, logs.output[0])
        self.assertEqual(M.runs, [])

    def test_nonce_caches_on_one_file_share_what_they_saw(self):
        first = mconnector.NonceCache(window=300, path=self.store)
        second = mconnector.NonceCache(window=300, path=self.store)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        self.assertTrue(first.add('n1', 1000.0))
        self.assertFalse(first.add('n1', 1000.0))       # from memory
        self.assertFalse(second.add('n1', 1001.0))      # from the file
        self.assertTrue(second.add('n2', 1001.0))
        self.assertFalse(first.add('n2', 1002.0))
        self.assertTrue(second.add('n1', 1000.0 + 601))  # forgotten after twice the window

    def test_the_default_store_is_one_private_file_per_key(self):
        import stat
        import tempfile
        from unittest import mock
        paths = []
        with mock.patch.dict(os.environ):
            os.environ.pop('MCONNECTOR_NONCE_STORE', None)
            for key in ('k3y', 'k3y', 'other'):
                M = counting_service(secretKey=key)
                self.assertEqual(Service.start(self, M, secretKey=key).send('/count', 1), 1)
                paths.append(M._nonces.path)
            os.environ['MCONNECTOR_NONCE_STORE'] = self.store
            M = counting_service(secretKey='k3y')
            self.assertEqual(Service.start(self, M, secretKey='k3y').send('/count', 1), 1)
            self.assertEqual(M._nonces.path, self.store)
        self.assertEqual(paths[0], paths[1])
        self.assertNotEqual(paths[0], paths[2])
        folder = os.path.dirname(paths[0])
        self.assertEqual(os.path.dirname(folder), tempfile.gettempdir())
        self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700)
        self.assertTrue(os.path.exists(self.store))


class WSGISignedCallsRunOnceTest(SignedCallsRunOnceTest):
    shell = 'wsgi'


class AuthorizationFirstTest(unittest.TestCase):
    """Without its token, a guarded rule costs a request no more than a plain parse of its
    body: no type note is restored, no class built, no codec detail answered."""

    shell = 'builtin'

    def setUp(self):
        self.built, self.runs = [], []
        test = self

        class AuthorizationProbe:
            def __init__(self, x):
                test.built.append(x)
                self.x = x
        mconnector.register(AuthorizationProbe, 'AuthorizationProbe')
        M = self.M = Microservice('guarded', token={'/g': 't0k', '/j': 't0k'})

        @M.typing('/g')
        def g(*args):
            self.runs.append(args)
            return len(args)

        @M.typing('/j')
        @M.json
        def j(**kwargs):
            self.runs.append(kwargs)
            return len(kwargs)
        self.friend = Service.start(self, M)

    def post(self, target, body, headers=''):
        reply = raw_request(self.M.port, (
            'POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s'
            'Content-Length: %d\r\nConnection: close\r\n\r\n' % (target, headers, len(body))
        ).encode('latin-1') + body)
        return error_of(reply) if status_of(reply) != 200 else (200, reply)

    def test_nothing_is_decoded_or_built_without_the_token(self):
        probe = b'"types": [[[0, 0], ["object", "AuthorizationProbe", ["x"]]]]'
        unauthorized = (401, 'missing or wrong token for /g')
        for body in (b'{"args": [{"x": 1}], %s}' % probe,
                     b'{"args": [1e300], "types": [[[0, 0], "timedelta"]]}',
                     b'{"args": [1], "args": [2]}', b'{"args": [1e999]}', b'{not json',
                     b'[' + b'[],' * 100000 + b'[]]', b'{"args": [1], "token": "wrong"}'):
            self.assertEqual(self.post('/g', body), unauthorized, body[:40])
        notes = 'X-MConnector-Types: [[["a"], ["object", "AuthorizationProbe", ["x"]]]]\r\n'
        self.assertEqual(self.post('/j', b'{"a": {"x": 1}}', notes),
                         (401, 'missing or wrong token for /j'))
        self.assertEqual((self.built, self.runs), ([], []))
        # With the token (in the body, as 0.3.7 sends it, or in a header), the same bodies
        # are read, and refused for what they are.
        self.assertEqual(self.post('/g', b'{"args": [{"x": 1}], %s, "token": "t0k"}' % probe)[0],
                         200)
        self.assertEqual(self.post('/j', b'{"a": {"x": 2}}',
                                   notes + 'Authorization: Bearer t0k\r\n')[0], 200)
        self.assertEqual(self.built, [1, 2])
        status, message = self.post('/g', b'{"args": [1e300], "types": [[[0, 0], "timedelta"]],'
                                          b' "token": "t0k"}')
        self.assertEqual(status, 400)
        self.assertIn('OverflowError', message)
        self.assertEqual(self.post('/g', b'{"args": [1], "args": [2], "token": "t0k"}'),
                         (400, "duplicate key 'args' in a JSON object"))

    def test_with_the_token_in_a_large_body_the_body_is_checked_as_strictly(self):
        objects = b'{"k": "a\\u003ab"}, ' * 10000       # many objects: the C encoder's check
        for extra, expected in ((b'1', (200, 10001)),
                                (b'{"a": 1, "a": 2}', (400, "duplicate key 'a'")),
                                (b'1e999', (400, 'out of range')),
                                (b'[' * 200 + b']' * 200, (400, 'deeper than 200'))):
            status, reply = self.post('/g', b'{"token": "t0k", "args": [%s%s]}' % (objects, extra))
            self.assertEqual(status, expected[0], reply[:200])
            if status == 200:
                self.assertTrue(reply.endswith(b'[%d]' % expected[1]))
            else:
                self.assertIn(expected[1], reply)
        self.assertEqual(len(self.runs), 1)

    def test_a_listener_wide_token_answers_401_on_every_path(self):
        M = Microservice('locked', token='all')

        @M.typing('/x')
        def x():
            return 1
        Service.start(self, M)
        requests = (('POST', '/nowhere'), ('POST', '/x'), ('GET', '/x'), ('OPTIONS', '/x'),
                    ('OPTIONS', '/nowhere'), ('GET', '/_mc/health'), ('GET', '/_mc/rules'),
                    ('GET', '/_mc/nowhere'), ('DELETE', '/_mc/health'))
        for bearer, statuses in (('', [401] * 9),
                                 ('Authorization: Bearer all\r\n',
                                  [404, 200, 405, 204, 404, 200, 200, 404, 405])):
            got = [status_of(raw_request(M.port, (
                '%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s'
                'Content-Length: 2\r\nConnection: close\r\n\r\n{}' % (method, target, bearer)
            ).encode())) for method, target in requests]
            self.assertEqual(got, statuses, bearer)
        with Friend('ok', M.url, token='all') as friend:
            self.assertEqual(friend.send('/x'), 1)


class WSGIAuthorizationFirstTest(AuthorizationFirstTest):
    shell = 'wsgi'


class RegisteredClassRebuildTest(unittest.TestCase):
    """A registered class is rebuilt only through what it declares, whatever the note says."""

    def rebuild(self, name, state):
        return mconnector.from_wire(dict(state), [[[], ['object', name, sorted(state)]]])

    def test_only_init_parameters_are_set_and_never_a_dunder(self):
        class Account:
            def __init__(self, owner, balance=0):
                self.owner, self.balance = owner, balance
        mconnector.register(Account, 'Account')
        account = self.rebuild('Account', {'owner': 'ann', 'balance': 5, 'is_admin': True,
                                           '__class__': 'x', '__init__': 1, '__dict__': {}})
        self.assertIs(type(account), Account)
        self.assertEqual(vars(account), {'owner': 'ann', 'balance': 5})
        with self.assertRaises(mconnector.CodecError) as caught:
            self.rebuild('Account', {'balance': 1})
        self.assertIn("cannot rebuild Account: TypeError", str(caught.exception))

    def test_slots_are_set_through_their_own_descriptors(self):
        class Slotted:
            __slots__ = ('a',)

            @property
            def admin(self):
                return False

            @admin.setter
            def admin(self, value):
                raise AssertionError('a property setter ran with wire data')
        mconnector.register(Slotted, 'Slotted')
        obj = self.rebuild('Slotted', {'a': 1, 'admin': True, '__weakref__': 2})
        self.assertEqual((obj.a, obj.admin), (1, False))

    def test_hooks_the_class_provides_are_used(self):
        class Hooked:
            @classmethod
            def from_wire(cls, state):
                obj = cls.__new__(cls)
                obj.state = state
                return obj

        class Stateful:
            def __setstate__(self, state):
                self.got = state
        mconnector.register(Hooked, 'Hooked')
        mconnector.register(Stateful, 'Stateful')
        self.assertEqual(self.rebuild('Hooked', {'x': 1, '__init__': 2}).state, {'x': 1})
        self.assertEqual(self.rebuild('Stateful', {'y': 2, '__class__': 3}).got, {'y': 2})

    def test_a_class_that_declares_nothing_cannot_be_registered(self):
        class Bare:
            pass
        with self.assertRaises(TypeError) as caught:
            mconnector.register(Bare)
        self.assertIn('__init__ parameters, __slots__, __setstate__ or a from_wire',
                      str(caught.exception))

    def test_between_peers_a_forged_attribute_never_arrives(self):
        seen = []

        class Order:
            def __init__(self, item):
                self.item = item
        mconnector.register(Order, 'Order')
        M = Microservice('orders')

        @M.typing('/order')
        def order(o):
            seen.append(vars(o))
            return o
        friend = Service.start(self, M)
        self.assertEqual(friend.send('/order', Order('tea')).item, 'tea')
        body = (b'{"args": [{"item": "tea", "is_admin": true}], '
                b'"types": [[[0, 0], ["object", "Order", ["is_admin", "item"]]]]}')
        reply = raw_request(M.port, b'POST /order HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                            b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s'
                            % (len(body), body))
        self.assertEqual(status_of(reply), 200, reply)
        self.assertEqual(seen, [{'item': 'tea'}, {'item': 'tea'}])


class OutOfRangeTest(unittest.TestCase):
    """Numbers and type notes out of range are a 400, and the listener goes on."""

    shell = 'builtin'

    def test_numbers_and_notes_out_of_range_are_400(self):
        M = counting_service()
        friend = Service.start(self, M)
        for body, message in (
                (b'{"args": [1e999999]}', 'out of range'),
                (b'{"args": [-1e400]}', 'out of range'),
                (b'{"args": [%s]}' % (b'9' * 5000), 'not valid JSON'),
                (b'{"args": [1e300], "types": [[[0, 0], "timedelta"]]}', 'OverflowError'),
                (b'{"args": ["x"], "types": [[[0, 0], "decimal"]]}', 'InvalidOperation'),
                (b'{"args": [' + b'{"a": ' * 201 + b'1' + b'}' * 201 + b']}', 'deeper than 200')):
            reply = raw_request(M.port, b'POST /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                                b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s'
                                % (len(body), body))
            status, text = error_of(reply)
            self.assertEqual(status, 400, body[:30])
            self.assertIn(message, text)
        self.assertEqual(M.runs, [])
        self.assertEqual(friend.send('/count', 1e308), 1)

    def test_strict_parsing_agrees_with_json_on_what_it_accepts(self):
        # Small bodies, large ones with few objects, and large ones with many are checked
        # in different ways (one level deeper in the large ones): all agree with json.loads
        # on what they accept.
        def padded(text):
            return '[%s, "%s"]' % (text, 'x' * 70000)

        def dense(text):
            return '[%s%s]' % ('{"k": 0}, ' * 10000, text)
        for text in ('[' * 199 + ']' * 199, '{"a:b": 1, "c": "\\u003a"}',
                     '{"a": "\\\\u003a", "b": 1}',
                     '["[[[[", {"x": "]]]]"}]', '[' + '"\\"[",' * 300 + '1]', '1e308',
                     '{"k": "\\"", "\\u00e9": [1, 2, {"z": null}]}', '"x"'):
            for body in (text, padded(text), dense(text)):
                self.assertEqual(mconnector.loads(body.encode()), json.loads(body), text[:40])
        for text in ('{"a": 1, "a": 2}', '{"a": {"b": 1, "b": 2}}', '[NaN]', '[1e999]', '[-1e400]',
                     '[' * 201 + ']' * 201, '{"a": ' * 201 + '1' + '}' * 201):
            for body in (text, padded(text), dense(text)):
                with self.assertRaises(mconnector.CodecError, msg=text[:40]):
                    mconnector.loads(body)


class WSGIOutOfRangeTest(OutOfRangeTest):
    shell = 'wsgi'


class BrowserTest(unittest.TestCase):
    """What a web page can make a listener do: nothing without cors=, and what cors=
    allows with it."""

    shell = 'builtin'

    def setUp(self):
        self.runs = []
        self.M = self.service()
        self.friend = Service.start(self, self.M)

    def service(self, **options):
        M = Microservice('browsers', **options)

        @M.typing('/count', methods=['GET', 'POST'])
        def count(x=None):
            self.runs.append(x)
            return len(self.runs)

        @M.typing('/guarded', token='t0k')
        def guarded():
            self.runs.append('guarded')
        return M

    def request(self, method, target, headers='', body=b'', port=None):
        reply = raw_request(port or self.M.port, (
            '%s %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n'
            % (method, target, headers, len(body))).encode('latin-1') + body)
        head = reply.partition(b'\r\n\r\n')[0].decode('latin-1')
        headers = dict(line.split(': ', 1) for line in head.split('\r\n')[1:])
        return status_of(reply), {k.lower(): v for k, v in headers.items()}, \
            reply.partition(b'\r\n\r\n')[2]

    def test_a_call_body_that_is_not_json_is_415_and_runs_nothing(self):
        for content_type in ('text/plain;charset=UTF-8', 'application/x-www-form-urlencoded',
                             'multipart/form-data; boundary=x', None):
            header = 'Content-Type: %s\r\n' % content_type if content_type else ''
            for body in (b'{"args": [1]}', b''):
                status, _, reply = self.request('POST', '/count', header, body)
                self.assertEqual(status, 415, (content_type, body))
                self.assertIn('application/json', json.loads(reply)['error']['message'])
        status, _, reply = self.request('POST', '/count', 'Content-Type: Application/JSON; '
                                        'charset=utf-8\r\n', b'{"args": [1]}')
        self.assertEqual((status, reply), (200, b'[1]'))
        self.assertEqual(self.runs, [1])
        self.assertEqual(self.friend.send('/count', 2), 2)

    def test_the_readme_curl_lines_still_work(self):
        import shutil
        if shutil.which('curl') is None:
            self.skipTest('no curl')
        with open(os.path.join(HERE, 'README.md'), encoding='utf-8') as f:
            readme = f.read()
        line = next(l for l in readme.splitlines() if l.startswith('curl -X POST'))
        M = Microservice('readme')

        @M.typing('/helloworld')
        def helloworld(name):
            return 'Welcome %s' % name
        Service.start(self, M)
        import shlex
        command = [a.replace('http://127.0.0.1:5000', M.url) for a in shlex.split(line)]
        out = subprocess.run(command + ['-s'], capture_output=True, timeout=10)
        self.assertEqual(out.stdout, b'["Welcome curl"]', out.stderr)
        out = subprocess.run(['curl', '-s', M.url + '/_mc/health'], capture_output=True,
                             timeout=10)
        self.assertEqual(json.loads(out.stdout)['status'], 'ok')

    def test_pages_of_other_sites_cannot_call_even_get_rules(self):
        for site in ('cross-site', 'same-site'):
            status, _, reply = self.request('GET', '/count?x=1', 'Sec-Fetch-Site: %s\r\n'
                                            'Sec-Fetch-Mode: no-cors\r\n' % site)
            self.assertEqual(status, 403, reply)
            self.assertIn('another site', json.loads(reply)['error']['message'])
        for site in ('same-origin', 'none'):
            self.assertEqual(self.request('GET', '/count?x=2', 'Sec-Fetch-Site: %s\r\n' % site)[0],
                             200)
        self.assertEqual(self.runs, [2, 2])

    def test_without_cors_options_says_allow_and_nothing_for_pages(self):
        preflight = ('Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n'
                     'Access-Control-Request-Headers: content-type\r\n')
        status, headers, _ = self.request('OPTIONS', '/count', preflight)
        self.assertEqual((status, headers['allow']), (204, 'GET, HEAD, OPTIONS, POST'))
        self.assertNotIn('access-control-allow-origin', headers)
        self.assertEqual(self.request('OPTIONS', '/guarded')[1]['allow'], 'OPTIONS, POST')
        self.assertEqual(self.request('OPTIONS', '/_mc/health')[1]['allow'], 'GET, HEAD, OPTIONS')
        self.assertEqual(self.request('OPTIONS', '/nowhere')[0], 404)
        status, headers, _ = self.request('POST', '/count', 'Origin: https://app.example\r\n'
                                          'Content-Type: application/json\r\n', b'{}')
        self.assertEqual(status, 200)
        self.assertNotIn('access-control-allow-origin', headers)

    def test_cors_lets_the_listed_origins_in(self):
        M = self.service(cors={'origins': ['https://app.example'], 'credentials': True})

        @M.typing('/later')
        async def later():
            return 'async'
        Service.start(self, M)
        preflight = ('Origin: %s\r\nAccess-Control-Request-Method: POST\r\n'
                     'Access-Control-Request-Private-Network: true\r\n')
        status, headers, _ = self.request('OPTIONS', '/count', preflight % 'https://app.example',
                                          port=M.port)
        self.assertEqual(status, 204)
        self.assertEqual(headers['access-control-allow-origin'], 'https://app.example')
        self.assertEqual(headers['access-control-allow-methods'], 'GET, HEAD, OPTIONS, POST')
        self.assertIn('Authorization', headers['access-control-allow-headers'])
        self.assertEqual(headers['access-control-allow-credentials'], 'true')
        self.assertEqual(headers['access-control-allow-private-network'], 'true')
        self.assertEqual(headers['access-control-max-age'], '600')
        self.assertEqual(self.request('OPTIONS', '/nowhere', preflight % 'https://app.example',
                                      port=M.port)[0], 204)       # the same for every path
        status, headers, _ = self.request('OPTIONS', '/count', preflight % 'https://evil.example',
                                          port=M.port)
        self.assertEqual(status, 403)
        self.assertNotIn('access-control-allow-origin', headers)
        call = ('Origin: https://app.example\r\nSec-Fetch-Site: cross-site\r\n'
                'Content-Type: application/json\r\n')
        for target, expected in (('/count', (200, b'[1]')), ('/later', (200, b'["async"]'))):
            status, headers, reply = self.request('POST', target, call, b'{}', port=M.port)
            self.assertEqual((status, reply), expected)
            self.assertEqual(headers['access-control-allow-origin'], 'https://app.example')
            self.assertEqual(headers['vary'], 'Origin')
        status, headers, _ = self.request('POST', '/guarded', call, b'{}', port=M.port)
        self.assertEqual((status, headers['access-control-allow-origin']),
                         (401, 'https://app.example'))          # the page can read why
        status, headers, _ = self.request('POST', '/count', call.replace('app', 'evil'), b'{}',
                                          port=M.port)
        self.assertEqual(status, 403)
        self.assertNotIn('access-control-allow-origin', headers)
        self.assertEqual(self.runs, [None])

    def test_cors_settings_are_checked(self):
        for bad, error in (({'origins': '*', 'credentials': True}, ValueError),
                           ('app.example', ValueError), ({'origin': '*'}, TypeError)):
            with self.assertRaises(error, msg=bad):
                Microservice('x', cors=bad)
        M = self.service(cors='*')
        Service.start(self, M)
        status, headers, _ = self.request('POST', '/count', 'Origin: https://any.example\r\n'
                                          'Content-Type: application/json\r\n', b'{}', port=M.port)
        self.assertEqual((status, headers['access-control-allow-origin']), (200, '*'))


class WSGIBrowserTest(BrowserTest):
    shell = 'wsgi'


# ==========================================================================================
# Operations: /_mc/ endpoints, metrics, graceful stop
# ==========================================================================================

def metric_values(text):
    """{'name{labels}': value} of a Prometheus text page."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            key, _, value = line.rpartition(' ')
            values[key] = float(value)
    return values


class AdminTest(unittest.TestCase):
    """GET /_mc/health, /_mc/rules, /_mc/metrics as a load balancer, an operator and
    Prometheus see them."""

    shell = 'builtin'

    def setUp(self):
        M = self.M = Microservice('ops', token={'/guarded': 'g'})
        self.release = threading.Event()

        @M.typing('/add')
        def add(a, b=1):
            """Add two numbers.

            The rest of the docstring is not shown."""
            return a + b

        @M.typing('/guarded', methods=['GET', 'POST'])
        @M.json
        def guarded(x):
            return x

        @M.typing('/wait')
        def wait():
            return self.release.wait(10)

        self.friend = Service.start(self, M)
        self.addCleanup(self.release.set)

    def get(self, page, headers=b''):
        reply = raw_request(self.M.port, b'GET /_mc/%s HTTP/1.1\r\nHost: x\r\n%s'
                            b'Connection: close\r\n\r\n' % (page.encode(), headers))
        head, _, body = reply.partition(b'\r\n\r\n')
        return status_of(reply), head.decode('latin-1'), body

    def metrics(self):
        status, head, body = self.get('metrics')
        self.assertEqual(status, 200)
        self.assertIn('Content-Type: text/plain; version=0.0.4', head)
        return metric_values(body.decode('utf-8'))

    def test_health(self):
        status, head, body = self.get('health')
        health = json.loads(body)
        self.assertEqual((status, health['status'], health['name']), (200, 'ok', 'ops'))
        self.assertGreaterEqual(health['uptime_s'], 0)
        self.assertEqual(self.friend.health()['name'], 'ops')

    def test_rules_say_what_to_send_but_not_the_token(self):
        status, _, body = self.get('rules')
        self.assertEqual(status, 200)
        self.assertNotIn(b'"g"', body)
        rules = {rule['rule']: rule for rule in json.loads(body)['rules']}
        self.assertEqual(sorted(rules), ['/add', '/guarded', '/wait'])
        self.assertEqual(rules['/add'], {'rule': '/add', 'methods': ['POST'], 'mode': 'reply',
                                         'function': 'add', 'params': ['a', 'b=1'],
                                         'token': False, 'doc': 'Add two numbers.'})
        self.assertEqual((rules['/guarded']['methods'], rules['/guarded']['token']),
                         (['GET', 'POST'], True))
        self.assertEqual(self.friend.rules(), json.loads(body)['rules'])

    def test_metrics_count_requests_by_rule_method_and_status(self):
        for n in range(3):
            self.assertEqual(self.friend.send('/add', n), n + 1)
        with self.assertRaises(mconnector.NotFound):
            self.friend.send('/nowhere')
        with self.assertRaises(mconnector.AuthError):
            self.friend.json('/guarded', x=1)
        self.get('health')
        values = self.metrics()
        label = 'service="ops",rule="%s",method="%s",status="%d"'
        self.assertEqual(values['mconnector_requests_total{%s}' % (label % ('/add', 'POST', 200))], 3)
        self.assertEqual(values['mconnector_requests_total{%s}' % (label % ('(none)', 'POST', 404))], 1)
        self.assertEqual(values['mconnector_requests_total{%s}'
                                % (label % ('/guarded', 'POST', 401))], 1)
        self.assertEqual(values['mconnector_requests_total{%s}'
                                % (label % ('/_mc/health', 'GET', 200))], 1)
        buckets = [value for key, value in values.items() if key.startswith(
            'mconnector_request_duration_seconds_bucket{service="ops",rule="/add"')]
        self.assertEqual(len(buckets), 15)
        self.assertEqual(buckets, sorted(buckets))          # cumulative
        self.assertEqual(buckets[-1], 3)
        self.assertEqual(values['mconnector_request_duration_seconds_count'
                                '{service="ops",rule="/add"}'], 3)
        self.assertEqual(values['mconnector_requests_in_flight{service="ops"}'], 1)  # this one
        # (bodies only under WSGI: the heads are the WSGI server's)
        self.assertGreater(values['mconnector_received_bytes_total{service="ops"}'], 100)
        self.assertGreater(values['mconnector_sent_bytes_total{service="ops"}'], 100)
        if self.shell == 'builtin':
            self.assertEqual(values['mconnector_connections_open{service="ops"}'], 2)
            self.assertEqual(values['mconnector_connections_total{service="ops"}'], 3)
        sent = values['mconnector_sent_bytes_total{service="ops"}']
        self.assertEqual(self.metrics()['mconnector_requests_total{%s}'
                                        % (label % ('/_mc/metrics', 'GET', 200))], 1)
        self.assertGreater(self.metrics()['mconnector_sent_bytes_total{service="ops"}'], sent)

    def test_invented_methods_add_no_series(self):
        for n in range(300):
            reply = raw_request(self.M.port, b'M%d /add HTTP/1.1\r\nHost: x\r\nConnection: '
                                b'close\r\n\r\n' % n)
            self.assertEqual(status_of(reply), 405)
            raw_request(self.M.port, b'X%d /nowhere HTTP/1.1\r\nHost: x\r\nConnection: '
                        b'close\r\n\r\n' % n)
        self.assertEqual(self.friend.send('/add', 1), 2)
        status, head, body = self.get('metrics')
        totals = [line for line in body.decode().splitlines()
                  if line.startswith('mconnector_requests_total{')]
        label = 'mconnector_requests_total{service="ops",rule="%s",method="%s",status="%d"} %d'
        self.assertIn(label % ('(none)', '(other)', 405, 300), totals)
        self.assertIn(label % ('(none)', '(other)', 404, 300), totals)
        self.assertIn(label % ('/add', 'POST', 200, 1), totals)
        self.assertLessEqual(len(totals), 4)
        self.assertLess(len(body), 8000)

    def test_requests_in_flight(self):
        calls = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(calls.shutdown)

        def call():
            with Friend('w', self.M.url) as friend:
                return friend.send('/wait')
        waiting = [calls.submit(call) for _ in range(2)]
        key = 'mconnector_requests_in_flight{service="ops"}'
        self.assertTrue(wait_for(lambda: self.metrics()[key] == 3))
        self.release.set()
        self.assertEqual([f.result(5) for f in waiting], [True, True])
        self.assertEqual(self.metrics()[key], 1)

    def test_only_get_and_unknown_pages(self):
        reply = raw_request(self.M.port, b'POST /_mc/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n'
                            b'Connection: close\r\n\r\n')
        self.assertEqual(status_of(reply), 405)
        status, _, body = self.get('nope')
        self.assertEqual(status, 404)
        self.assertIn(b'/_mc/health', body)
        self.assertNotIn('rule="/_mc/nope"', self.get('metrics')[2].decode())

    def test_listener_wide_token_guards_them(self):
        M = Microservice('locked', token='all')
        Service.start(self, M)
        reply = raw_request(M.port, b'GET /_mc/rules HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        self.assertEqual(status_of(reply), 401)
        reply = raw_request(M.port, b'GET /_mc/rules HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer all\r\n'
                            b'Connection: close\r\n\r\n')
        self.assertEqual(status_of(reply), 200)
        with Friend('ok', M.url, token='all') as friend:
            self.assertEqual(friend.health()['status'], 'ok')

    @builtin_server_only
    def test_debug_mode_logs_each_request(self):
        self.M.debug = True
        with self.assertLogs('mconnector.access', 'INFO') as logs:
            self.friend.send('/add', 1)
            with self.assertRaises(mconnector.NotFound):
                self.friend.send('/nowhere')
            # (a line is written once its response is sent: the sender may be quicker)
            self.assertTrue(wait_for(lambda: len(logs.output) == 2))
        self.assertRegex(logs.output[0], r'ops 127\.0\.0\.1 "POST /add" 200 \d+ bytes [\d.]+ ms')
        self.assertIn('"POST /nowhere" 404', logs.output[1])

    def test_prefix_is_reserved_unless_admin_is_off(self):
        with self.assertRaises(mconnector.RouteError):
            self.M.typing('/_mc/mine')(lambda: 1)
        M = Microservice('plain', admin=False)
        M.typing('/_mc/mine')(lambda: 'mine')
        friend = Service.start(self, M)
        self.assertEqual(friend.send('/_mc/mine'), 'mine')
        with self.assertRaises(mconnector.NotFound):
            friend.health()


class WSGIAdminTest(AdminTest):
    """The same pages through the WSGI entry."""

    shell = 'wsgi'

    def test_served_by_wsgiref(self):
        self.friend.send('/add', 1)
        self.assertIn('WSGIServer', self.friend.lastreply.headers['server'])


def refuses_connections(port):
    """Whether connecting to 127.0.0.1:port is refused (nothing listens there)."""
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:    # caught in the backlog as the socket closed: ask again
        pass
    return False


def call_once(url, rule, *args):
    with Friend('once', url) as friend:
        return friend.send(rule, *args)


class GracefulStopTest(unittest.TestCase):
    """Stopping answers every call already accepted, refuses new ones at connect time, and
    closes idle keep-alive connections."""

    def slow_service(self, **options):
        M = Microservice('slow', **options)
        M.entered = threading.Semaphore(0)
        M.release = threading.Event()

        @M.typing('/slow')
        def slow(n):
            M.entered.release()
            M.release.wait(10)
            return n

        @M.typing('/quick')
        def quick():
            return 'q'
        M.start(port=0, host='127.0.0.1')
        self.addCleanup(M.stop)
        self.addCleanup(M.release.set)
        return M

    def test_calls_in_flight_are_answered_and_new_connections_refused(self):
        M = self.slow_service()
        idle = socket.create_connection(('127.0.0.1', M.port), timeout=5)
        self.addCleanup(idle.close)
        idle.sendall(b'POST /quick HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                     b'Content-Length: 0\r\n\r\n')
        self.assertTrue(idle.recv(4096).endswith(b'"q"]'))
        calls = concurrent.futures.ThreadPoolExecutor(5)
        self.addCleanup(calls.shutdown)
        answers = [calls.submit(call_once, M.url, '/slow', n) for n in range(5)]
        for _ in range(5):
            self.assertTrue(M.entered.acquire(timeout=5))
        stopper = threading.Thread(target=M.stop)
        stopper.start()
        self.assertTrue(wait_for(lambda: refuses_connections(M.port)))
        self.assertEqual(M.health()['status'], 'stopping')
        self.assertEqual(idle.recv(4096), b'')          # idle keep-alive: closed at once
        self.assertTrue(stopper.is_alive())             # still answering the five
        M.release.set()
        self.assertEqual([f.result(5) for f in answers], [0, 1, 2, 3, 4])
        stopper.join(5)
        self.assertFalse(stopper.is_alive())

    def test_grace_period_bounds_the_wait(self):
        M = self.slow_service(grace=0.2)
        calls = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(calls.shutdown)
        answer = calls.submit(call_once, M.url, '/slow', 1)
        self.assertTrue(M.entered.acquire(timeout=5))
        with self.assertLogs('mconnector', 'WARNING') as logs:
            M.stop()
        self.assertIn('1 request(s) cut short after 0.2s', logs.output[-1])
        with self.assertRaises(mconnector.NetworkError):
            answer.result(5)

    def test_a_stop_right_after_an_answer_cuts_nothing_short(self):
        # The caller's connection is idle (kept alive) once it has its answer, even while
        # the worker that answered still waits a moment for the next request.
        for _ in range(20):
            M = Microservice('quick')
            M.typing('/echo')(lambda x: x)
            M.start(port=0, host='127.0.0.1')
            with Friend('quick', M.url) as friend:
                self.assertEqual(friend.send('/echo', 1), 1)
                with self.assertLogs('mconnector', 'INFO') as logs:
                    M.stop(0)
            self.assertEqual([r.levelname for r in logs.records], ['INFO'], logs.output)
            self.assertIn('quick: stopped', logs.output[0])

    SCRIPT = '''
import os, sys
sys.path.insert(0, %r)
import mconnector
M = mconnector.Microservice('term')

@M.typing('/slow')
def slow(n):
    os.read(0, 3)               # each "go\\n" (3 bytes) from the test releases one call
    return n
M.run(port=0, host='127.0.0.1')
print('run returned', flush=True)
'''

    def test_sigterm_and_ctrl_c_answer_calls_in_flight_and_exit_0(self):
        import signal
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum.name):
                self.stop_process_with(signum)

    def stop_process_with(self, signum):
        import signal
        proc = subprocess.Popen([sys.executable, '-c', self.SCRIPT % HERE], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(proc.communicate)
        self.addCleanup(proc.kill)
        line = proc.stderr.readline()
        self.assertIn('listening on http://127.0.0.1:', line)
        url = line.split('listening on ')[1].split()[0]
        port = int(url.rsplit(':', 1)[1])
        calls = concurrent.futures.ThreadPoolExecutor(3)
        self.addCleanup(calls.shutdown)
        answers = [calls.submit(call_once, url, '/slow', n) for n in range(3)]
        with Friend('ops', url) as ops:
            def in_flight():
                metrics = metric_values(ops._call('GET', '/_mc/metrics', b'', None))
                return metrics['mconnector_requests_in_flight{service="term"}'] - 1
            self.assertTrue(wait_for(lambda: in_flight() == 3))
        proc.send_signal(signum)
        self.assertTrue(wait_for(lambda: refuses_connections(port)))
        self.assertIsNone(proc.poll())
        proc.stdin.write('go\n' * 3)
        proc.stdin.flush()
        self.assertEqual([f.result(5) for f in answers], [0, 1, 2])
        out, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(out, 'run returned\n')
        self.assertIn('stopping (%s): answering the 3 request(s) in flight' % signum.name, err)
        self.assertNotIn('Traceback', err)


class TLSTest(unittest.TestCase):
    def test_https_round_trip_verifies_the_certificate(self):
        M = counting_service()
        M.start(port=0, host='127.0.0.1', certfile=os.path.join(CERTS, 'server.pem'),
                keyfile=os.path.join(CERTS, 'server.key'))
        self.addCleanup(M.stop)
        self.assertTrue(M.url.startswith('https://'))
        with Friend('tls', M.url, cafile=os.path.join(CERTS, 'ca.pem')) as friend:
            self.assertEqual([friend.send('/count') for _ in range(3)], [1, 2, 3])
        self.assertEqual(M.stats['connections'], 1)
        with Friend('untrusting', M.url, retries=0) as friend:
            with self.assertRaises(mconnector.Unreachable) as caught:
                friend.send('/count')
            self.assertIn('CERTIFICATE_VERIFY_FAILED', str(caught.exception))
        with Friend('insecure', M.url, verify=False) as friend:
            self.assertEqual(friend.send('/count'), 4)

    def test_a_scheme_that_does_not_fit_the_listener_is_named(self):
        M = counting_service()
        M.start(port=0, host='127.0.0.1', certfile=os.path.join(CERTS, 'server.pem'),
                keyfile=os.path.join(CERTS, 'server.key'))
        self.addCleanup(M.stop)
        plain = 'http://127.0.0.1:%d' % M.port
        with Friend('plain', plain) as friend:
            with self.assertRaises(mconnector.BadRequest) as caught:
                friend.send('/count')
        self.assertEqual(str(caught.exception), 'HTTP 400: this listener takes https://, not '
                         'http:// (%s/count)' % plain)
        reply = raw_request(M.port, b'GET /count HTTP/1.1\r\nHost: x\r\n\r\n')     # as curl
        self.assertEqual(status_of(reply), 400)
        self.assertEqual(M.runs, [])
        N = counting_service()
        Service.start(self, N)
        address = '127.0.0.1:%d' % N.port
        with Friend('tls', 'https://' + address, retries=0) as friend:
            with self.assertRaises(mconnector.NetworkError) as caught:
                friend.send('/count')
        self.assertEqual(str(caught.exception), 'https://%s does not answer in TLS: call '
                         'http://%s' % (address, address))

    def test_mutual_tls_asks_for_a_client_certificate(self):
        M = counting_service()
        M.start(port=0, host='127.0.0.1', certfile=os.path.join(CERTS, 'server.pem'),
                keyfile=os.path.join(CERTS, 'server.key'), cafile=os.path.join(CERTS, 'ca.pem'))
        self.addCleanup(M.stop)
        ca = os.path.join(CERTS, 'ca.pem')
        with Friend('anonymous', M.url, cafile=ca) as friend:
            with self.assertRaises(mconnector.NetworkError) as caught:
                friend.send('/count')
        self.assertRegex(str(caught.exception), r'\A%s refused the client certificate \(certificate '
                         r'required\), so the call did not run: give Friend a certfile= \(and '
                         r'keyfile=\) that the listener trusts\Z' % re.escape(M.url))
        with Friend('known', M.url, cafile=ca, certfile=os.path.join(CERTS, 'client.pem'),
                    keyfile=os.path.join(CERTS, 'client.key')) as friend:
            self.assertEqual(friend.send('/count'), 1)
        self.assertEqual(M.runs, [None])


class SeveralInstancesTest(unittest.TestCase):
    """One Friend over three instances of a service, one stopped mid-run and started again."""

    def instance(self, n, port=0):
        M = Microservice('inst%d' % n)
        M.calls = []

        @M.typing('/who')
        def who(x):
            M.calls.append(x)
            return n
        M.start(port=port, host='127.0.0.1')
        self.addCleanup(M.stop, 0)
        return M

    def test_calls_spread_survive_a_stopped_instance_and_come_back_to_it(self):
        instances = [self.instance(n) for n in range(3)]
        with Friend('svc', [M.url for M in instances], set_aside=0.2, retries=0) as friend:
            answers = [friend.send('/who', i) for i in range(30)]
            self.assertEqual(sorted(set(answers)), [0, 1, 2])
            self.assertEqual([len(M.calls) for M in instances], [10, 10, 10])
            port = instances[1].port
            instances[1].stop(0)
            with self.assertLogs('mconnector', 'WARNING'):
                answers = [friend.send('/who', i) for i in range(30, 60)]
            self.assertNotIn(1, answers)                # every call answered elsewhere
            self.assertEqual(len(answers), 30)
            back = self.instance(1, port)
            deadline = time.monotonic() + 5
            while not back.calls and time.monotonic() < deadline:
                friend.send('/who', 'again')
            self.assertTrue(back.calls, 'the restarted instance never got a call')
        runs = [x for M in instances for x in M.calls if x != 'again']
        self.assertEqual(sorted(runs), list(range(60)))     # each call ran once

    def test_the_asyncio_senders_spread_too(self):
        import asyncio
        instances = [self.instance(n) for n in range(2)]
        friend = mconnector.AsyncFriend('svc', [M.url for M in instances])

        async def main():
            async with friend:
                return [await friend.send('/who', i) for i in range(4)]
        self.assertEqual(sorted(asyncio.run(main())), [0, 0, 1, 1])

    def test_every_instance_refusing_raises_unreachable(self):
        with socket.socket() as a, socket.socket() as b:
            a.bind(('127.0.0.1', 0))
            b.bind(('127.0.0.1', 0))
            urls = ['http://127.0.0.1:%d' % s.getsockname()[1] for s in (a, b)]
        with Friend('none', urls, retries=1, backoff=0.01) as friend:
            with self.assertRaises(mconnector.Unreachable):
                friend.send('/who', 1)
        with self.assertRaises(ValueError):
            Friend('bad', [])


class HostNameOfSeveralAddressesTest(unittest.TestCase):
    """A host name whose records list three addresses (as a DNS name of a service's instances
    does) is three instances for Friend.  The machine's resolver cannot be given such a name
    here, so getaddrinfo answers for the name 'svc.test' alone and asks the real one for
    everything else; the listeners, connections and calls are real."""

    def setUp(self):
        self.records = []
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host == 'svc.test':
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, '', (ip, port))
                        for ip in self.records]
            return real(host, port, *args, **kwargs)
        patcher = unittest.mock.patch('socket.getaddrinfo', getaddrinfo)
        patcher.start()
        self.addCleanup(patcher.stop)

    def instance(self, ip, port):
        M = Microservice(ip)
        M.calls = []

        @M.typing('/who')
        def who(x):
            M.calls.append(x)
            return ip
        try:
            M.start(port=port, host=ip)
        except MConnectorError as exc:
            self.skipTest('cannot listen on %s here: %s' % (ip, exc))
        self.addCleanup(M.stop, 0)
        return M

    def test_calls_spread_over_the_addresses_of_a_name_and_follow_its_records(self):
        first = self.instance('127.0.0.1', 0)
        port = first.port
        instances = [first] + [self.instance('127.0.0.%d' % n, port) for n in (2, 3)]
        self.records = ['127.0.0.1', '127.0.0.2', '127.0.0.3']
        friend = Friend('svc', 'http://svc.test:%d' % port, set_aside=0.2, retries=0)
        with friend:
            answers = [friend.send('/who', i) for i in range(30)]
            self.assertEqual([len(M.calls) for M in instances], [10, 10, 10])
            instances[1].stop(0)
            with self.assertLogs('mconnector', 'WARNING'):
                answers = [friend.send('/who', i) for i in range(30, 60)]
            self.assertNotIn('127.0.0.2', answers)
            back = self.instance('127.0.0.2', port)
            deadline = time.monotonic() + 5
            while not back.calls and time.monotonic() < deadline:
                friend.send('/who', 'again')
            self.assertTrue(back.calls, 'the restarted instance never got a call')
            # The records change: the name's instances follow at the next lookup.
            self.records = ['127.0.0.1', '127.0.0.3']
            friend.resolve_every = 0.0
            calls_before = len(back.calls)
            answers = {friend.send('/who', 'later') for _ in range(10)}
            self.assertEqual(answers, {'127.0.0.1', '127.0.0.3'})
            self.assertEqual(len(back.calls), calls_before)
        runs = [x for M in instances + [back] for x in M.calls if isinstance(x, int)]
        self.assertEqual(sorted(runs), list(range(60)))     # each call ran once

    def test_the_asyncio_senders_follow_the_name_too(self):
        import asyncio
        first = self.instance('127.0.0.1', 0)
        self.instance('127.0.0.2', first.port)
        self.records = ['127.0.0.1', '127.0.0.2']
        friend = mconnector.AsyncFriend('svc', 'http://svc.test:%d' % first.port)

        async def main():
            async with friend:
                return [await friend.send('/who', i) for i in range(4)]
        self.assertEqual(sorted(asyncio.run(main())), ['127.0.0.1'] * 2 + ['127.0.0.2'] * 2)

    def test_a_name_with_one_address_per_family_stays_one_instance(self):
        M = self.instance('127.0.0.1', 0)
        with Friend('local', 'http://localhost:%d' % M.port, retries=0) as friend:
            self.assertEqual([friend.send('/who', i) for i in range(3)], ['127.0.0.1'] * 3)
            self.assertIsNone(friend._members)


class CallChainTest(unittest.TestCase):
    """A chain of three services, A calls B calls C: the caller's deadline and its trace
    travel along with the calls that the rules make."""

    def chain(self, c_sleeps):
        C = Microservice('C')
        B = Microservice('B')
        A = Microservice('A')
        seen = {}

        @C.typing('/c')
        def c():
            seen['c'] = (mconnector.request.time_left, mconnector.request.trace_id,
                         mconnector.request.headers.get('tracestate'))
            time.sleep(c_sleeps)
            return 'c'

        @B.typing('/b')
        def b():
            seen['b'] = (mconnector.request.time_left, mconnector.request.trace_id)
            with Friend('C', C.url, timeout=10, retries=0) as to_c:
                return 'b' + to_c.send('/c')

        @A.typing('/a')
        def a():
            seen['a'] = mconnector.request.trace_id
            with Friend('B', B.url, timeout=10, retries=0) as to_b:
                return 'a' + to_b.send('/b')
        for M in (C, B, A):
            M.start(port=0, host='127.0.0.1')
            self.addCleanup(M.stop, 0)
        return A, seen

    def test_the_callers_deadline_bounds_every_call_down_the_chain(self):
        A, seen = self.chain(c_sleeps=0)
        trace = '4bf92f3577b34da6a3ce929d0e0e4736'
        with Friend('user', A.url, timeout=2,
                    headers={'traceparent': '00-%s-00f067aa0ba902b7-01' % trace,
                             'tracestate': 'vendor=opaque'}) as friend:
            self.assertEqual(friend.send('/a'), 'abc')
        left_at_b, trace_at_b = seen['b']
        left_at_c, trace_at_c, state_at_c = seen['c']
        self.assertLess(left_at_b, 2.0)         # A's 10 s became the user's 2 s
        self.assertLess(left_at_c, 2.0)         # and so did B's
        self.assertEqual((seen['a'], trace_at_b, trace_at_c), (trace, trace, trace))
        self.assertEqual(state_at_c, 'vendor=opaque')

    def test_a_call_whose_deadline_has_passed_is_not_started(self):
        A, seen = self.chain(c_sleeps=0)
        B = Microservice('B2')
        runs = []

        @B.typing('/late')
        def late():
            time.sleep(0.5)             # longer than its caller waits
            with Friend('C', A.url, timeout=10, retries=0) as to_a:
                try:
                    to_a.send('/a')
                except mconnector.DeadlineExceeded as exc:
                    runs.append(str(exc))
                    raise
        B.start(port=0, host='127.0.0.1')
        self.addCleanup(B.stop, 0)
        with Friend('user', B.url, timeout=0.3, retries=0) as friend:
            with self.assertRaises(mconnector.CallTimeout):
                friend.send('/late')
        self.assertTrue(wait_for(lambda: runs, 5))
        self.assertIn('has given up', runs[0])
        self.assertNotIn('a', seen)             # A never ran
        self.assertTrue(issubclass(mconnector.DeadlineExceeded, TimeoutError))

    def test_a_trace_is_made_when_missing_and_written_in_the_access_log(self):
        A, seen = self.chain(c_sleeps=0)
        A.debug = True
        with self.assertLogs('mconnector.access', 'INFO') as logs:
            with Friend('user', A.url) as friend:
                self.assertEqual(friend.send('/a'), 'abc')
            self.assertTrue(wait_for(lambda: len(logs.output) >= 1))
        made = seen['a']
        self.assertRegex(made, r'\A[0-9a-f]{32}\Z')
        self.assertEqual(seen['c'][1], made)
        self.assertIn('trace=%s' % made, logs.output[-1])


class ServingShellTest(unittest.TestCase):
    """The one serving shell: what waits in its loop costs no worker and no thread."""

    TLS = {'certfile': os.path.join(CERTS, 'server.pem'), 'keyfile': os.path.join(CERTS, 'server.key')}

    def test_async_rules_hold_no_worker(self):
        M = Microservice('async', max_workers=2)
        arrived = [0]

        @M.typing('/gate')
        async def gate():
            import asyncio
            arrived[0] += 1                 # (on the one asyncio loop: no race)
            for _ in range(500):            # each waits until all 40 are in at once
                if arrived[0] >= 40:
                    return 'in'
                await asyncio.sleep(0.01)
            return 'alone'
        M.start(port=0, host='127.0.0.1')
        self.addCleanup(M.stop)
        with concurrent.futures.ThreadPoolExecutor(40) as calls:
            answers = list(calls.map(lambda _: call_once(M.url, '/gate'), range(40)))
        self.assertEqual(answers, ['in'] * 40)
        self.assertTrue(inspect_is_coroutine(gate))

    def test_idle_websockets_cost_no_thread(self):
        sk = mconnector.SocketServer('idle', max_workers=4)
        sk.router('/echo')(lambda m: m)
        threads_before = threading.active_count()
        sk.run(port=0)
        self.addCleanup(sk.stop)
        idle = [raw_handshake(sk.port)[0] for _ in range(300)]
        self.addCleanup(lambda: [s.close() for s in idle])
        self.assertTrue(wait_for(lambda: len(sk.connections) == 300))
        # the loop, and the workers (all started at once on CPython 3.12.0 and 3.12.1)
        self.assertLessEqual(threading.active_count() - threads_before, 1 + sk.max_workers)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as ws:
            ws.send('through')
            self.assertEqual(ws.recv(5), 'through')

    def test_slow_peers_hold_no_worker(self):
        M = Microservice('slow-peers', max_workers=1, request_timeout=30)

        @M.typing('/flood', methods=['GET'])
        @M.stream
        def flood():
            for _ in range(64):
                yield {'x': 'x' * (1 << 20)}

        @M.typing('/ping')
        def ping():
            return 'pong'
        M.start(port=0, host='127.0.0.1', **self.TLS)
        self.addCleanup(M.stop)
        import ssl
        context = ssl.create_default_context(cafile=os.path.join(CERTS, 'ca.pem'))
        peers = []
        self.addCleanup(lambda: [s.close() for s in peers])
        for _ in range(5):          # a first byte of a TLS ClientHello, then nothing
            s = socket.create_connection(('127.0.0.1', M.port), timeout=5)
            s.sendall(b'\x16')
            peers.append(s)
        for head in (b'POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n' + b'{',
                     b'POST /ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{'):
            for _ in range(3):      # bodies that never end
                s = context.wrap_socket(socket.create_connection(('127.0.0.1', M.port), timeout=5),
                                        server_hostname='localhost')
                s.sendall(head)
                peers.append(s)
        for _ in range(3):          # streamed answers nobody reads
            s = context.wrap_socket(socket.create_connection(('127.0.0.1', M.port), timeout=5),
                                    server_hostname='localhost')
            s.sendall(b'GET /flood HTTP/1.1\r\nHost: x\r\n\r\n')
            peers.append(s)
        self.assertTrue(wait_for(lambda: M.stats['connections'] >= len(peers)))
        with Friend('normal', M.url, cafile=os.path.join(CERTS, 'ca.pem'), timeout=5) as friend:
            self.assertEqual([friend.send('/ping') for _ in range(3)], ['pong'] * 3)

    def test_a_trickled_request_is_answered_408_at_its_deadline(self):
        M = counting_service(request_timeout=0.5)
        friend = Service.start(self, M)
        with socket.create_connection(('127.0.0.1', M.port), timeout=5) as slow:
            slow.sendall(b'POST /count HTTP/1.1\r\n')
            started = time.monotonic()
            stop = threading.Event()
            self.addCleanup(stop.set)

            def trickle():          # a byte just before each sweep: still one deadline
                while not stop.wait(0.1):
                    try:
                        slow.sendall(b'X')
                    except OSError:
                        return
            threading.Thread(target=trickle, daemon=True).start()
            reply = read_until_eof(slow)
            stop.set()
        self.assertTrue(reply.startswith(b'HTTP/1.1 408 '), reply[:60])
        self.assertIn(b'Connection: close', reply)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(friend.send('/count', 1), 1)

    def test_calls_in_flight_at_a_stop_are_answered_with_connection_close(self):
        M = Microservice('closing')
        entered, release = threading.Event(), threading.Event()

        @M.typing('/slow')
        def slow():
            entered.set()
            release.wait(10)
            return 'done'
        M.start(port=0, host='127.0.0.1')
        self.addCleanup(M.stop)
        self.addCleanup(release.set)
        with socket.create_connection(('127.0.0.1', M.port), timeout=5) as sock:
            sock.sendall(b'POST /slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         b'Content-Length: 0\r\n\r\n')
            self.assertTrue(entered.wait(5))
            stopper = threading.Thread(target=M.stop)
            stopper.start()
            self.assertTrue(wait_for(lambda: refuses_connections(M.port)))
            release.set()
            reply = read_until_eof(sock)
        stopper.join(5)
        self.assertTrue(reply.startswith(b'HTTP/1.1 200 '), reply[:60])
        self.assertIn(b'\r\nConnection: close\r\n', reply)
        self.assertNotIn(b'Keep-Alive', reply)

    RENDER = '''
import sys
sys.path.insert(0, %r)
from mconnector import SocketServer
sk = SocketServer(__name__)

@sk.render('/render')
async def raw(ws, message):
    await ws.send('Render 1:' + message)
    again = await ws.recv()
    await ws.send('Render 2:' + again)

@sk.router('/hello')
def test(message):
    return 'ok:' + message

sk.run(port=0)
'''

    def test_the_render_example_serves_with_run_as_the_last_line(self):
        import signal
        proc = subprocess.Popen([sys.executable, '-c', self.RENDER % HERE], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(proc.communicate)
        self.addCleanup(proc.kill)
        line = proc.stderr.readline()
        self.assertIn('websocket server __main__ on ws://127.0.0.1:', line)
        port = int(line.rsplit(':', 1)[1])
        with mconnector.SocketClient('127.0.0.1:%d' % port, '/render') as ws:
            ws.send('a')
            self.assertEqual(ws.recv(5), 'Render 1:a')
            ws.send('b')
            self.assertEqual(ws.recv(5), 'Render 2:b')
            with self.assertRaises(mconnector.ConnectionClosed) as caught:
                ws.recv(5)
            self.assertEqual(caught.exception.code, 1000)
        with mconnector.SocketClient('127.0.0.1:%d' % port, '/hello') as ws:
            ws.send('x')
            self.assertEqual(ws.recv(5), 'ok:x')
            proc.send_signal(signal.SIGTERM)
            with self.assertRaises(mconnector.ConnectionClosed) as caught:
                ws.recv(5)
            self.assertEqual(caught.exception.code, 1001)
        out, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, err)
        self.assertNotIn('Traceback', err)

    BOTH = '''
import sys
sys.path.insert(0, %r)
import mconnector
sk = mconnector.SocketServer('ws')
sk.router('/echo')(lambda m: m)
M = mconnector.Microservice('http')
M.typing('/hi')(lambda: 'hi')
sk.run(port=0)
M.run(port=0, host='127.0.0.1')
print('run returned', flush=True)
'''

    def test_fifty_stops_right_after_a_probe_connection_all_exit_0(self):
        import re
        import signal
        scripts = {'listener and websocket server': self.BOTH % HERE,
                   'websocket server alone': self.RENDER % HERE}

        def one_stop(n):
            name = sorted(scripts)[n % 2]
            signum = (signal.SIGTERM, signal.SIGINT)[n // 2 % 2]
            proc = subprocess.Popen([sys.executable, '-c', scripts[name]], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                     signal.SIG_DFL))
            try:
                ports, err = [], ''
                while len(ports) < (2 if 'listener' in name else 1):
                    line = proc.stderr.readline()
                    err += line
                    if not line:
                        return name, signum, 'no address logged', err
                    ports += re.findall(r'://127\.0\.0\.1:(\d+)', line)
                for port in ports:          # a probe connection, then the signal at once
                    socket.create_connection(('127.0.0.1', int(port)), timeout=5).close()
                proc.send_signal(signum)
                out, rest = proc.communicate(timeout=15)
                return name, signum, proc.returncode, err + rest
            except subprocess.TimeoutExpired:
                proc.kill()
                return name, signum, 'still running 15 s after the signal', proc.communicate()[1]
        with concurrent.futures.ThreadPoolExecutor(4) as runs:
            results = list(runs.map(one_stop, range(50)))
        failed = [(name, signum, code, err[-500:]) for name, signum, code, err in results
                  if code != 0 or 'Traceback' in err]
        self.assertEqual(failed, [])

    def test_serve_applies_port_to_a_module_of_websocket_servers(self):
        import tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, folder)
        proc = ServeProcess(self, folder, 'examples/ws_server.py', '--host', '127.0.0.1',
                            '--port', '0')
        url = proc.url(scheme='ws')
        with mconnector.SocketClient(url[len('ws://'):], '/hello') as ws:
            ws.send('x')
            self.assertEqual(ws.recv(5), 'ok:x')
        proc.terminate()


def inspect_is_coroutine(func):
    import inspect
    return inspect.iscoroutinefunction(getattr(func, '__wrapped__', func))


class WorkerDispatchTest(unittest.TestCase):
    def test_requests_arriving_together_each_get_a_worker(self):
        # One idle worker and two requests ready at once: the second must get a worker of
        # its own, not wait behind the first one's function.
        M = Microservice('pair')
        entered = threading.Semaphore(0)
        release = threading.Event()

        @M.typing('/wait')
        def wait():
            entered.release()
            return release.wait(10)
        Service.start(self, M)
        self.addCleanup(release.set)
        raw_request(M.port, b'GET /_mc/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        pair = [socket.create_connection(('127.0.0.1', M.port), timeout=5) for _ in range(2)]
        for sock in pair:
            self.addCleanup(sock.close)
        self.assertTrue(wait_for(lambda: M.stats['connections'] == 3))
        for sock in pair:
            sock.sendall(b'POST /wait HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         b'Content-Length: 0\r\n\r\n')
        self.assertTrue(entered.acquire(timeout=5))
        self.assertTrue(entered.acquire(timeout=5), 'the second request got no worker')
        release.set()
        for sock in pair:
            self.assertTrue(sock.recv(4096).endswith(b'[true]'))


class LimitsTest(unittest.TestCase):
    def setUp(self):
        self.M = counting_service(max_body=4096, request_timeout=0.5, timeout=0.5, max_workers=4)
        self.friend = Service.start(self, self.M)

    def assertStatus(self, data, status):
        reply = raw_request(self.M.port, data)
        self.assertTrue(reply.startswith(b'HTTP/1.1 %d ' % status), (data[:60], reply[:60]))
        self.assertEqual(self.friend.send('/count', 'next'), len(self.M.runs))

    def test_each_limit_answers_its_status_and_serving_goes_on(self):
        self.assertStatus(b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\n\r\n', 414)
        self.assertStatus(b'GET /count HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 9000 + b'\r\n\r\n', 431)
        self.assertStatus(b'GET /count HTTP/1.1\r\nHost: x\r\n' + b'X-A: 1\r\n' * 101 + b'\r\n', 431)
        self.assertStatus(b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 4097\r\n\r\n', 413)
        self.assertStatus(b'POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                          b'1001\r\n' + b'a' * 4097 + b'\r\n0\r\n\r\n', 413)
        self.assertStatus(b'POST /count HTTP/1.1\r\nHost: x\r\n\r\n', 411)
        self.assertStatus(b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n', 400)
        self.assertStatus(b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n', 400)

    def test_json_that_is_not_strictly_json_is_400(self):
        for body in (b'{"args": [NaN]}', b'{"args": [1], "args": [2]}', b'{"args": [' + b'[' * 300 + b']' * 300 + b']}',
                     b'{"args": ["\xff"]}', b'{"args": [Infinity]}'):
            self.assertStatus(b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n'
                              b'Content-Type: application/json\r\nConnection: close\r\n\r\n%s'
                              % (len(body), body), 400)
        self.assertEqual(self.M.runs, ['next'] * 5)

    def test_nan_and_infinity_travel_between_peers(self):
        import math
        got = self.friend.json('/echo', a=float('nan'), b=[float('inf'), -float('inf')])
        self.assertTrue(math.isnan(got['a']))
        self.assertEqual(got['b'], [float('inf'), -float('inf')])

    def test_slow_sender_is_dropped_and_others_are_served(self):
        with socket.create_connection(('127.0.0.1', self.M.port), timeout=5) as slow:
            slow.sendall(b'POST /count HTTP/1.1\r\nHost: x\r\n')
            started = time.monotonic()
            self.assertEqual(self.friend.send('/count', 1), 1)
            dropped = None
            while dropped is None:          # trickle a header byte at a time until cut off
                try:
                    slow.sendall(b'X')
                    if slow.recv(1, socket.MSG_DONTWAIT) == b'':
                        dropped = time.monotonic() - started
                except BlockingIOError:
                    time.sleep(0.05)
                except OSError:
                    dropped = time.monotonic() - started
                self.assertLess(time.monotonic() - started, 5, 'slow sender never dropped')
        self.assertGreaterEqual(dropped, 0.5)

    def test_slow_senders_hold_no_worker(self):
        M = counting_service(max_workers=2, request_timeout=5)
        friend = Service.start(self, M)
        slow = []
        self.addCleanup(lambda: [s.close() for s in slow])
        for n in range(6):
            s = socket.create_connection(('127.0.0.1', M.port), timeout=5)
            s.sendall(b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n' if n % 2 else
                      b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                      b'Content-Length: 13\r\n\r\n{"ar')
            slow.append(s)
        self.assertTrue(wait_for(lambda: M.stats['connections'] >= 6, 5))
        started = time.monotonic()
        for n in range(3):
            self.assertEqual(friend.send('/count', n), n + 1)
        self.assertLess(time.monotonic() - started, 2.0)
        slow[0].sendall(b'gs": [9]}')          # a slow request that completes is served
        self.assertTrue(slow[0].recv(4096).startswith(b'HTTP/1.1 200'))
        self.assertEqual(M.runs, [0, 1, 2, 9])

    def test_kept_alive_connections_hold_no_worker_between_calls(self):
        M = counting_service(max_workers=1)
        first, second = Service.start(self, M), Friend('second', M.url)
        self.addCleanup(second.close)
        started = time.monotonic()
        for n in range(3):
            self.assertEqual(first.send('/count'), 2 * n + 1)      # one worker for both
            self.assertEqual(second.send('/count'), 2 * n + 2)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(M.stats['connections'], 2)

    def test_idle_keep_alive_connection_is_closed(self):
        with socket.create_connection(('127.0.0.1', self.M.port), timeout=5) as idle:
            idle.sendall(b'GET /count HTTP/1.1\r\nHost: x\r\n\r\n')
            self.assertTrue(idle.recv(4096).startswith(b'HTTP/1.1 200'))
            started = time.monotonic()
            self.assertEqual(idle.recv(1), b'')         # closed by the listener
            self.assertGreaterEqual(time.monotonic() - started, 0.4)

    def test_many_idle_connections_use_no_thread_and_a_client_is_answered(self):
        M = counting_service(max_workers=4)
        friend = Service.start(self, M)
        threads_before = threading.active_count()
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(1000):
            s = socket.create_connection(('127.0.0.1', M.port))
            s.sendall(b'GET /count HTTP/1.1\r\nHost: x\r\n\r\n' if len(idle) % 10 == 0 else b'')
            idle.append(s)
        self.assertTrue(wait_for(lambda: M.stats['connections'] >= 1000, 10))
        started = time.monotonic()
        self.assertLessEqual(friend.send('/count', 'me'), 101)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn('me', M.runs)
        self.assertLessEqual(threading.active_count() - threads_before, M.max_workers)
        self.assertTrue(wait_for(lambda: len(M.runs) == 101, 10), len(M.runs))


class ListenerFramingTest(unittest.TestCase):
    """What a hostile or unusual request does to a live listener: a clear 4xx in JSON, and
    the listener goes on serving.  Run again through the WSGI entry under wsgiref."""

    def setUp(self):
        self.M = counting_service(max_body=4096)

        @self.M.typing('/page', methods=['GET'])
        def page():
            return 'x' * 100
        self.friend = Service.start(self, self.M)

    def status(self, data):
        reply = raw_request(self.M.port, data)
        self.assertEqual(self.friend.send('/count', 'next'), len(self.M.runs))
        return status_of(reply), reply.partition(b'\r\n\r\n')[2]

    def test_chunked_body(self):
        status, body = self.status(
            b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
            b'Content-Type: application/json\r\nConnection: close\r\n\r\n'
            b'4;ext=1\r\n{"a"\r\n4\r\n: 1}\r\n0\r\nX-Trailer: t\r\n\r\n')
        self.assertEqual((status, json.loads(body)), (200, {'a': 1}))

    def test_chunk_sizes_that_are_not_strict_hexadecimal_are_refused(self):
        for size in (b'0Xf', b'0_f', b' f', b'+f', b'0x4'):
            status, body = self.status(
                b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
                b'Connection: close\r\n\r\n' + size + b'\r\n{"a": 1}\r\n0\r\n\r\n')
            self.assertEqual(status, 400, size)
            self.assertEqual(json.loads(body)['error']['type'], 'BadRequest')
            self.assertIn('chunk size', json.loads(body)['error']['message'])
        self.assertEqual(self.M.runs, ['next'] * 5)

    def test_one_byte_chunks_are_read_and_a_chunked_body_over_max_body_is_413(self):
        data = json.dumps({'a': 'b' * 3000}).encode()
        tiny = b''.join(b'1\r\n%s\r\n' % data[i:i + 1] for i in range(len(data)))
        status, body = self.status(b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: '
                                   b'chunked\r\nContent-Type: application/json\r\n'
                                   b'Connection: close\r\n\r\n' + tiny + b'0\r\n\r\n')
        self.assertEqual((status, json.loads(body)), (200, {'a': 'b' * 3000}))
        status, body = self.status(b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: '
                                   b'chunked\r\nConnection: close\r\n\r\n'
                                   + (b'400\r\n' + b'a' * 1024 + b'\r\n') * 5 + b'0\r\n\r\n')
        self.assertEqual(status, 413)
        self.assertIn('4096', json.loads(body)['error']['message'])

    def test_head_answers_have_no_body_and_say_its_length(self):
        with socket.create_connection(('127.0.0.1', self.M.port), timeout=5) as sock:
            sock.sendall(b'HEAD /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
            reply = read_until_eof(sock)
        head, _, body = reply.partition(b'\r\n\r\n')
        self.assertEqual(status_of(reply), 200)
        self.assertEqual(body, b'')
        self.assertIn(b'\r\nContent-Length: %d' % len(json.dumps(['x' * 100])), head)

    @builtin_server_only
    def test_malformed_heads_get_their_status_in_json(self):
        cases = [
            (b'GET /count\x00x HTTP/1.1\r\nHost: x\r\n\r\n', 400, 'target'),
            (b'GET /count\x1b HTTP/1.1\r\nHost: x\r\n\r\n', 400, 'target'),
            (b'GET /count\x7f HTTP/1.1\r\nHost: x\r\n\r\n', 400, 'target'),
            (b'GET /count HTTP/1.1\r\n\r\n', 400, 'Host'),
            (b'GET /count HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400, 'Host'),
            (b'POST /count HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400,
             'HTTP/1.0'),
            (b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: ' + b'9' * 4992 + b'\r\n\r\n',
             400, 'Content-Length'),
            (b'POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n', 400,
             'Content-Length'),
            (b'POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n', 501, 'chunked'),
            (b'GET /count HTTP/2.0\r\nHost: x\r\n\r\n', 505, 'HTTP/1'),
        ]
        for data, status, word in cases:
            got, body = self.status(data)
            self.assertEqual(got, status, data[:60])
            error = json.loads(body)['error']
            self.assertEqual(error['type'], mconnector._STATUS_ERRORS[status].__name__)
            self.assertIn(word, error['message'])
        self.assertEqual(self.M.runs, ['next'] * len(cases))

    @builtin_server_only
    def test_a_head_of_http_1_0_without_host_is_served(self):
        status, body = self.status(b'GET /count HTTP/1.0\r\n\r\n')
        self.assertEqual((status, json.loads(body)), (200, [1]))


class WSGIListenerFramingTest(ListenerFramingTest):
    """The same through the WSGI entry: wsgiref passes chunked bodies on undecoded, and
    leaves HEAD to the application."""

    shell = 'wsgi'


class SenderFramingTest(unittest.TestCase):
    """What Friend makes of replies that break HTTP, are too large, or come too slowly."""

    def raw_listener(self, reply, pace=None):
        """A listener that reads one request and sends `reply`: at once, or one byte every
        `pace` seconds.  Returns its port."""
        server = socket.socket()
        server.bind(('127.0.0.1', 0))
        server.listen()
        done = threading.Event()

        def serve():
            with server:
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    try:
                        if pace is None:
                            conn.sendall(reply)
                        else:
                            for i in range(len(reply)):
                                conn.sendall(reply[i:i + 1])
                                if done.wait(pace):
                                    break
                        done.wait(10)
                    except OSError:
                        pass
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(done.set)
        return server.getsockname()[1]

    def call(self, reply, pace=None, **options):
        port = self.raw_listener(reply, pace)
        with Friend('peer', '127.0.0.1:%d' % port, **options) as friend:
            return friend.send('/x')

    def test_malformed_status_lines_name_the_peer_and_what_it_sent(self):
        for line in (b'HTTP/1.1 2000 OK', b'HTTP/1.1 200x', b'HTTP/2 200 OK', b'SSH-2.0-OpenSSH'):
            with self.assertRaises(mconnector.NetworkError) as caught:
                self.call(line + b'\r\nContent-Length: 2\r\n\r\n[]')
            message = str(caught.exception)
            self.assertIn('127.0.0.1', message)
            self.assertIn(line.decode()[:12], message)

    def test_a_peer_that_does_not_speak_http_is_named_at_its_first_bytes(self):
        # The peer then waits for more, as an SSH server would: the call must not wait too.
        for sent, message in ((b'SSH-2.0-OpenSSH_8.9p1 Ubuntu-3\r\n',
                               "%s does not answer in HTTP: it sent 'SSH-2.0-OpenSSH_8.9p1 Ubuntu-3'"),
                              (b'\x15\x03\x03\x00\x02\x02\x46', '%s answered in TLS: call https://%s')):
            port = self.raw_listener(sent)
            address = '127.0.0.1:%d' % port
            with self.subTest(sent=sent), Friend('peer', address, timeout=30) as friend:
                with self.assertRaises(mconnector.NetworkError) as caught:
                    friend.send('/x')
                self.assertNotIsInstance(caught.exception, mconnector.CallTimeout)
                self.assertEqual(str(caught.exception),
                                 message.replace('%s', 'http://' + address, 1).replace('%s', address))
        port = self.raw_listener(b'SSH-2.0-OpenSSH_8.9p1 Ubuntu-3\r\n')
        with self.assertRaises(mconnector.HandshakeError) as caught:
            mconnector.SocketClient('127.0.0.1:%d' % port, '/x', timeout=30)
        self.assertEqual(str(caught.exception), "websocket handshake for /x failed: the answer is "
                         "not HTTP: it sent 'SSH-2.0-OpenSSH_8.9p1 Ubuntu-3'")

    def test_a_reply_over_max_reply_is_refused_before_it_is_read(self):
        with self.assertRaises(mconnector.NetworkError) as caught:
            self.call(b'HTTP/1.1 200 OK\r\nContent-Length: 10000000000000\r\n\r\n[1')
        self.assertIn('max_reply', str(caught.exception))
        with self.assertRaises(mconnector.NetworkError) as caught:
            self.call(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                      b'400\r\n' + b'1' * 1024 + b'\r\n', max_reply=1000)
        self.assertIn('1000', str(caught.exception))
        self.assertEqual(self.call(b'HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[7]',
                                   max_reply=3), 7)

    def test_timeout_bounds_the_whole_call_not_each_read(self):
        reply = b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n[' + b'1' * 38 + b']'
        started = time.monotonic()
        with self.assertRaises(mconnector.CallTimeout):
            self.call(reply, pace=0.1, timeout=1)
        self.assertLess(time.monotonic() - started, 2.5)

    def test_every_status_arrives_as_its_own_class_with_the_listeners_message(self):
        M = Microservice('limits', max_body=100)

        @M.typing('/echo')
        def echo(x):
            return x
        friend = Service.start(self, M)
        with self.assertRaises(mconnector.PayloadTooLarge) as caught:
            friend.send('/echo', 'x' * 200)
        self.assertIsInstance(caught.exception, mconnector.CallError)
        self.assertEqual(caught.exception.status, 413)
        self.assertIn('100', str(caught.exception))
        for status, cls in mconnector._STATUS_ERRORS.items():
            body = json.dumps({'error': {'status': status, 'type': cls.__name__,
                                         'message': 'said %d' % status}}).encode()
            reply = b'HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n' \
                    b'\r\n%s' % (status, len(body), body)
            with self.assertRaises(cls) as caught:
                self.call(reply, retries=0)
            self.assertIs(type(caught.exception), cls)
            self.assertEqual(caught.exception.status, status)
            self.assertIn('said %d' % status, str(caught.exception))

    def test_the_listener_does_not_load_http_server(self):
        code = ('import sys, mconnector; M = mconnector.Microservice("m"); '
                'M.start(port=0, host="127.0.0.1"); '
                'f = mconnector.Friend("f", M.url); f.rules(); M.stop(); '
                'print(sorted({"http.server", "http.client", "email", "mimetypes"} & set(sys.modules)))')
        out = subprocess.run([sys.executable, '-c', code], cwd=HERE, capture_output=True,
                             text=True, timeout=30)
        self.assertEqual(out.stdout.strip(), '[]', out.stderr)


class FaultsTest(unittest.TestCase):
    def free_port(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            return s.getsockname()[1]

    def test_refused_calls_are_retried_until_the_listener_is_up(self):
        port = self.free_port()
        M = counting_service()
        starter = threading.Timer(0.2, M.start, kwargs={'port': port, 'host': '127.0.0.1'})
        starter.start()
        self.addCleanup(M.stop)
        self.addCleanup(starter.join)
        with Friend('patient', '127.0.0.1:%d' % port, retries=8, backoff=0.05) as friend:
            self.assertEqual(friend.send('/count', 'once'), 1)
        self.assertEqual(M.runs, ['once'])

    def one_shot_listener(self, replies):
        """A raw listener: for each connection, read one request, then send the next of
        `replies` (None: close without answering).  Returns (port, requests seen)."""
        server = socket.socket()
        server.bind(('127.0.0.1', 0))
        server.listen()
        seen = []

        def serve():
            for reply in replies:
                conn, _ = server.accept()
                with conn:
                    seen.append(conn.recv(65536))
                    if reply is not None:
                        conn.sendall(reply)
            server.close()
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        return server.getsockname()[1], seen

    def test_a_call_that_may_have_run_is_not_repeated(self):
        port, seen = self.one_shot_listener([None])
        with Friend('careful', '127.0.0.1:%d' % port, retries=3) as friend:
            with self.assertRaises(mconnector.NetworkError) as caught:
                friend.send('/pay', 10)
        self.assertEqual(str(caught.exception), 'http://127.0.0.1:%d/pay closed the connection '
                         'without answering (the call may have run)' % port)
        self.assertEqual(len(seen), 1)

    def test_an_idempotent_call_is_repeated(self):
        ok = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n[42]'
        port, seen = self.one_shot_listener([None, ok])
        with Friend('bold', '127.0.0.1:%d' % port, retries=3) as friend:
            friend.setRule('/read', idempotent=True)
            self.assertEqual(friend.send('/read'), 42)
        self.assertEqual(len(seen), 2)

    def test_replies_of_other_servers_are_read(self):
        # HTTP/1.0 with the body ending at close, as simple servers answer; an HTML error page.
        old = b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n["Welcome x", 2]'
        page = (b'HTTP/1.1 404 NOT FOUND\r\nContent-Type: text/html\r\nContent-Length: 22\r\n'
                b'Connection: close\r\n\r\n<h1>Not Found</h1>\n\n\n\n')
        nan = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n'
               b'Connection: close\r\n\r\n[NaN, 1]')        # Flask's jsonify writes NaN so
        port, seen = self.one_shot_listener([old, page, nan])
        with Friend('old', '127.0.0.1:%d' % port) as friend:
            self.assertEqual(friend.send('/hello', 'x'), ('Welcome x', 2))
            with self.assertRaises(mconnector.NotFound) as caught:
                friend.send('/nope')
            value, one = friend.send('/nan')
        self.assertIn('Not Found', str(caught.exception))
        self.assertNotIn('<h1>', str(caught.exception))
        self.assertTrue(value != value and one == 1)
        self.assertEqual(len(seen), 3)

    def test_hanging_function_does_not_block_others(self):
        M = Microservice('hang')
        release = threading.Event()

        @M.typing('/hang')
        def hang():
            release.wait(10)

        @M.typing('/ok')
        def ok():
            return 'ok'
        friend = Service.start(self, M, timeout=0.3)
        self.addCleanup(release.set)        # before stop(), which answers calls in flight
        with self.assertRaises(mconnector.CallTimeout) as caught:
            friend.send('/hang')
        self.assertIn('%s/hang' % M.url, str(caught.exception))
        self.assertEqual(friend.send('/ok'), 'ok')


class FuzzTest(unittest.TestCase):
    """Malformed requests, thousands of them, from a fixed random generator: after each, a normal call
    still answers."""

    def test_malformed_requests_never_break_the_listener(self):
        rng = random.Random(6455)
        M = counting_service(request_timeout=0.3, max_body=4096)
        friend = Service.start(self, M)
        valid = (b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Content-Length: 8\r\n\r\n{"a": 1}')
        pieces = [b'GET', b'POST', b' ', b'/', b'/echo', b'/count?x=1', b'HTTP/1.1', b'HTTP/9.9',
                  b'\r\n', b'\n', b':', b'Content-Length: ', b'Transfer-Encoding: chunked',
                  b'99999999999999999999', b'-5', b'0', b'ff', b'{"args": [', b']}', b'NaN',
                  b'\x00', b'\xff\xfe', b'%', b'%zz', b'{"types": [[[0], "set"]]}', b'\r\n\r\n']
        deadline = time.monotonic() + 8
        cases = 0
        while cases < 3000 and time.monotonic() < deadline:
            kind = rng.random()
            if kind < 0.3:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
            elif kind < 0.7:
                data = b''.join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
            else:
                data = bytearray(valid)
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data[:rng.randint(1, len(data))])
            with socket.create_connection(('127.0.0.1', M.port), timeout=5) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                try:
                    reply = sock.recv(65536)
                except OSError:
                    reply = b''
                self.assertTrue(reply == b'' or reply.startswith(b'HTTP/1.1 '), (data, reply))
            if cases % 10 == 0:
                self.assertEqual(friend.json('/echo', n=cases), {'n': cases})
            cases += 1
        self.assertGreater(cases, 1000)
        self.assertEqual(friend.json('/echo', n='end'), {'n': 'end'})


# ==========================================================================================
# WebSocket
# ==========================================================================================

WS = mconnector
OP = mconnector.Opcode


def ws_frame(opcode, payload=b'', fin=True, mask=b'\x11\x22\x33\x44', rsv=0, length=None):
    """A frame built by hand (independently of mconnector._ws_frame); mask=None: unmasked."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, 'big')
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, 'big')
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code, reason=b''):
    return code.to_bytes(2, 'big') + reason


def all_events(proto):
    """Every event the protocol has to give (it hands out one message per call)."""
    events = proto.events()
    while proto.pending:
        more = proto.events()
        if not more:
            break
        events += more
    return events


def parse_server_frames(data):
    """Split unmasked frames written by a server into (fin, opcode, payload) triples."""
    frames = []
    while data:
        n = data[1] & 0x7F
        pos = 2
        if n == 126:
            n, pos = int.from_bytes(data[2:4], 'big'), 4
        elif n == 127:
            n, pos = int.from_bytes(data[2:10], 'big'), 10
        assert not data[1] & 0x80, 'a server frame must not be masked'
        frames.append((bool(data[0] & 0x80), data[0] & 0x0F, data[pos:pos + n]))
        data = data[pos + n:]
    return frames


class WsServerSide(unittest.TestCase):
    """A server-side protocol object fed with hand-built client frames."""

    def proto(self, **kwargs):
        return mconnector.WebSocketProtocol(client=False, **kwargs)

    def feed(self, proto, *frames):
        proto.receive_data(b''.join(frames))
        return all_events(proto)

    def assertClosedWith(self, proto, code):
        frames = parse_server_frames(proto.data_to_send())
        self.assertEqual(frames[-1][1], OP.CLOSE)
        self.assertEqual(int.from_bytes(frames[-1][2][:2], 'big'), code)
        self.assertEqual(proto.state, mconnector.WebSocketState.CLOSED)


class WsMaskingTest(unittest.TestCase):
    def test_mask_round_trip_and_known_value(self):
        key = b'\x01\x02\x03\x04'
        self.assertEqual(WS._ws_mask(b'\x00\x00\x00\x00\x00', key), b'\x01\x02\x03\x04\x01')
        data = os.urandom(100003)
        self.assertEqual(WS._ws_mask(WS._ws_mask(data, key), key), data)
        self.assertEqual(WS._ws_mask(b'', key), b'')

    def test_frame_lengths_7_16_64_bits(self):
        for n, head_len in ((125, 2), (126, 4), (65535, 4), (65536, 10)):
            frame = WS._ws_frame(OP.BINARY, b'x' * n)
            self.assertEqual(len(frame), head_len + n)
            self.assertEqual(parse_server_frames(frame), [(True, OP.BINARY, b'x' * n)])
            masked = WS._ws_frame(OP.BINARY, b'x' * n, mask_key=b'\x11\x22\x33\x44')
            self.assertEqual(masked, ws_frame(OP.BINARY, b'x' * n))


class RFC6455Section5_2BaseFramingTest(WsServerSide):
    def test_text_and_binary_messages(self):
        p = self.proto()
        events = self.feed(p, ws_frame(OP.TEXT, 'héllo'.encode()), ws_frame(OP.BINARY, b'\x00\xff'),
                           ws_frame(OP.TEXT, b'x' * 70000))
        self.assertEqual(events, [(OP.TEXT, 'héllo'), (OP.BINARY, b'\x00\xff'), (OP.TEXT, 'x' * 70000)])

    def test_byte_by_byte(self):
        p = self.proto()
        data = ws_frame(OP.TEXT, b'hello') + ws_frame(OP.BINARY, b'x' * 300)
        events = []
        for i in range(len(data)):
            p.receive_data(data[i:i + 1])
            events += all_events(p)
        self.assertEqual(events, [(OP.TEXT, 'hello'), (OP.BINARY, b'x' * 300)])

    def test_unmasked_client_frame_is_1002(self):
        p = self.proto()
        self.feed(p, ws_frame(OP.TEXT, b'hi', mask=None))
        self.assertClosedWith(p, 1002)

    def test_masked_server_frame_is_1002_for_the_client(self):
        p = mconnector.WebSocketProtocol(client=True)
        p.receive_data(ws_frame(OP.TEXT, b'hi'))
        self.assertEqual(all_events(p)[-1][0], OP.CLOSE)
        close = p.data_to_send()
        self.assertTrue(close[1] & 0x80, 'client frames are masked')
        self.assertEqual(WS._ws_mask(close[6:8], close[2:6]), b'\x03\xea')

    def test_rsv_bits_and_unknown_opcodes_are_1002(self):
        for frame in (ws_frame(OP.TEXT, b'a', rsv=0x40), ws_frame(OP.TEXT, b'a', rsv=0x10),
                      ws_frame(3, b''), ws_frame(7, b''), ws_frame(11, b''), ws_frame(15, b'')):
            p = self.proto()
            self.feed(p, frame)
            self.assertClosedWith(p, 1002)

    def test_huge_length_fails_before_any_payload(self):
        p = self.proto()
        header = bytes([0x82, 0xFF]) + (2 ** 63).to_bytes(8, 'big')
        self.feed(p, header)
        self.assertClosedWith(p, 1002)
        p = self.proto()
        self.feed(p, bytes([0x82, 0xFF]) + (2 ** 63 - 1).to_bytes(8, 'big'))
        self.assertClosedWith(p, 1009)

    def test_max_size_and_max_frame_size_are_1009(self):
        p = self.proto(max_size=1000)
        self.assertEqual(self.feed(p, ws_frame(OP.BINARY, b'x' * 1000)), [(OP.BINARY, b'x' * 1000)])
        self.feed(p, ws_frame(OP.BINARY, b'x' * 1001)[:4])      # the header alone is enough
        self.assertClosedWith(p, 1009)
        p = self.proto(max_size=1000)
        self.feed(p, ws_frame(OP.TEXT, b'x' * 600, fin=False), ws_frame(OP.CONTINUATION, b'x' * 600))
        self.assertClosedWith(p, 1009)
        p = self.proto(max_frame_size=10)
        self.feed(p, ws_frame(OP.TEXT, b'x' * 10, fin=False), ws_frame(OP.CONTINUATION, b'x' * 11))
        self.assertClosedWith(p, 1009)

    def test_large_frames_in_pieces_of_any_size(self):
        rng = random.Random(5)
        big = os.urandom(200003)
        text = 'é€x' * 30001
        for client in (False, True):
            mask = None if client else b'\x11\x22\x33\x44'
            data = (ws_frame(OP.BINARY, big, mask=mask) + ws_frame(OP.PING, b'p', mask=mask)
                    + ws_frame(OP.TEXT, text.encode()[:70001], fin=False, mask=mask)
                    + ws_frame(OP.CONTINUATION, text.encode()[70001:], mask=mask))
            for sizes in ((1, 7), (1000, 70000), (65536, 65536)):
                p = mconnector.WebSocketProtocol(client=client)
                events, pos = [], 0
                while pos < len(data):
                    n = rng.randint(*sizes)
                    p.receive_data(data[pos:pos + n])
                    pos += n
                    events += all_events(p)
                self.assertEqual(events, [(OP.BINARY, big), (OP.PING, b'p'), (OP.TEXT, text)])
            p = mconnector.WebSocketProtocol(client=client)
            p.receive_data(data[:150000])
            p.receive_data(b'')                         # the stream ends inside a frame
            self.assertEqual(all_events(p), [(OP.CLOSE, (1006, ''))])

    def test_max_size_none_is_no_limit(self):
        big = os.urandom(2 ** 20 + 1000)                # over the 1 MiB default
        for client in (False, True):
            mask = None if client else b'\x11\x22\x33\x44'
            p = mconnector.WebSocketProtocol(client=client, max_size=None)
            # a frame over the default max_frame_size, and more frames than the default count
            empty = ws_frame(OP.CONTINUATION, b'', fin=False, mask=mask)
            p.receive_data(ws_frame(OP.BINARY, big[:1000], fin=False, mask=mask) + empty * 2000
                           + ws_frame(OP.CONTINUATION, big[1000:], mask=mask))
            self.assertEqual(all_events(p), [(OP.BINARY, big)])
            self.assertEqual(p.data_to_send(), b'')
            self.assertEqual(p.state, mconnector.WebSocketState.OPEN)

    def test_only_documented_exceptions_escape_random_bytes(self):
        rng = random.Random(6455)
        for i in range(300):
            p = self.proto() if i % 2 else mconnector.WebSocketProtocol(client=True)
            for _ in range(5):
                p.receive_data(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))))
                all_events(p)
            p.data_to_send()
            if p.state is not mconnector.WebSocketState.CLOSED:
                p.receive_data(b'')
                self.assertEqual(all_events(p)[-1], (OP.CLOSE, (1006, '')))


class RFC6455Section5_4FragmentationTest(WsServerSide):
    def test_fragments_with_interleaved_ping(self):
        p = self.proto()
        events = self.feed(p, ws_frame(OP.TEXT, b'hel', fin=False), ws_frame(OP.PING, b'p1'),
                           ws_frame(OP.CONTINUATION, b'lo ', fin=False),
                           ws_frame(OP.CONTINUATION, 'wörld'.encode()),
                           ws_frame(OP.BINARY, b'a', fin=False), ws_frame(OP.CONTINUATION, b'b'))
        self.assertEqual(events, [(OP.PING, b'p1'), (OP.TEXT, 'hello wörld'), (OP.BINARY, b'ab')])
        self.assertEqual(parse_server_frames(p.data_to_send()), [(True, OP.PONG, b'p1')])

    def test_continuation_without_start_and_new_message_inside_are_1002(self):
        p = self.proto()
        self.feed(p, ws_frame(OP.CONTINUATION, b'x'))
        self.assertClosedWith(p, 1002)
        p = self.proto()
        self.feed(p, ws_frame(OP.TEXT, b'x', fin=False), ws_frame(OP.TEXT, b'y'))
        self.assertClosedWith(p, 1002)

    def test_every_frame_counts_toward_the_message_frame_limit(self):
        p = self.proto(max_frames=100)
        empty = ws_frame(OP.CONTINUATION, b'', fin=False)
        events = self.feed(p, ws_frame(OP.TEXT, b'a', fin=False), *[empty] * 98,
                           ws_frame(OP.CONTINUATION, b'b'))
        self.assertEqual(events, [(OP.TEXT, 'ab')])         # 100 frames: the limit itself
        events = self.feed(p, ws_frame(OP.BINARY, b'a', fin=False), *[empty] * 200)
        self.assertEqual(events, [(OP.CLOSE, (1009, 'message of 101 frames over the limit '
                                                    'of 100'))])
        self.assertClosedWith(p, 1009)
        self.assertEqual(mconnector.WebSocketProtocol().max_frames, 16384)   # 1 MiB / 64

    def test_message_answered_before_a_bad_frame_behind_it(self):
        p = self.proto()
        p.receive_data(ws_frame(OP.TEXT, b'first') + ws_frame(OP.TEXT, b'x', rsv=0x20))
        self.assertEqual(p.events(), [(OP.TEXT, 'first')])
        p.send('echo')
        self.assertEqual(p.events()[0][0], OP.CLOSE)
        frames = parse_server_frames(p.data_to_send())
        self.assertEqual([f[1] for f in frames], [OP.TEXT, OP.CLOSE])


class RFC6455Section5_5ControlFramesTest(WsServerSide):
    def test_ping_gets_pong_with_same_payload_and_pong_is_just_reported(self):
        p = self.proto()
        self.assertEqual(self.feed(p, ws_frame(OP.PING, b'x' * 125), ws_frame(OP.PONG, b'u')),
                         [(OP.PING, b'x' * 125), (OP.PONG, b'u')])
        self.assertEqual(parse_server_frames(p.data_to_send()), [(True, OP.PONG, b'x' * 125)])

    def test_long_or_fragmented_control_frames_are_1002(self):
        for frame in (ws_frame(OP.PING, b'x' * 126), ws_frame(OP.PING, b'x', fin=False),
                      ws_frame(OP.CLOSE, b'\x03\xe8' + b'x' * 124)):
            p = self.proto()
            self.feed(p, frame)
            self.assertClosedWith(p, 1002)

    def test_control_payload_limit_when_sending(self):
        p = self.proto()
        with self.assertRaises(ValueError):
            p.ping(b'x' * 126)


class RFC6455Section8_1Utf8Test(WsServerSide):
    def test_invalid_text_is_1007(self):
        p = self.proto()
        self.feed(p, ws_frame(OP.TEXT, b'\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80'))
        self.assertClosedWith(p, 1007)

    def test_first_bad_fragment_fails_at_once(self):
        p = self.proto()
        self.feed(p, ws_frame(OP.TEXT, b'\xce\xba\xe1\xbd\xb9', fin=False),
                  ws_frame(OP.CONTINUATION, b'\xf4\x90\x80\x80', fin=False))
        self.assertClosedWith(p, 1007)      # before the last fragment ever arrives

    def test_sequence_split_across_fragments_is_fine(self):
        p = self.proto()
        euro = '€'.encode()
        self.assertEqual(self.feed(p, ws_frame(OP.TEXT, euro[:1], fin=False),
                                   ws_frame(OP.CONTINUATION, euro[1:2], fin=False),
                                   ws_frame(OP.CONTINUATION, euro[2:])), [(OP.TEXT, '€')])


class RFC6455Section7ClosingTest(WsServerSide):
    def test_close_is_echoed_and_later_input_ignored(self):
        p = self.proto()
        events = self.feed(p, ws_frame(OP.TEXT, b'part', fin=False),
                           ws_frame(OP.CLOSE, close_payload(1000, b'bye')), ws_frame(OP.CONTINUATION, b'x'))
        self.assertEqual(events, [(OP.CLOSE, (1000, 'bye'))])
        self.assertEqual(parse_server_frames(p.data_to_send()), [(True, OP.CLOSE, b'\x03\xe8')])
        with self.assertRaises(mconnector.ConnectionClosed) as cm:
            p.send('late')
        self.assertEqual((cm.exception.code, cm.exception.reason), (1000, 'bye'))
        self.assertTrue(cm.exception.ok)

    def test_empty_close_gets_empty_close(self):
        p = self.proto()
        self.assertEqual(self.feed(p, ws_frame(OP.CLOSE, b'')), [(OP.CLOSE, (1005, ''))])
        self.assertEqual(parse_server_frames(p.data_to_send()), [(True, OP.CLOSE, b'')])

    def test_valid_and_invalid_close_codes(self):
        for code in (1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999):
            p = self.proto()
            self.assertEqual(self.feed(p, ws_frame(OP.CLOSE, close_payload(code))), [(OP.CLOSE, (code, ''))])
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
            p = self.proto()
            self.feed(p, ws_frame(OP.CLOSE, close_payload(code)))
            self.assertClosedWith(p, 1002)

    def test_one_byte_close_and_bad_reason(self):
        p = self.proto()
        self.feed(p, ws_frame(OP.CLOSE, b'\x03'))
        self.assertClosedWith(p, 1002)
        p = self.proto()
        self.feed(p, ws_frame(OP.CLOSE, close_payload(1000, b'\xff')))
        self.assertClosedWith(p, 1007)

    def test_our_close_then_theirs(self):
        p = self.proto()
        p.close(1001, 'going')
        self.assertEqual(p.state, mconnector.WebSocketState.CLOSING)
        self.assertEqual(parse_server_frames(p.data_to_send()), [(True, OP.CLOSE, b'\x03\xe9going')])
        self.assertEqual(self.feed(p, ws_frame(OP.TEXT, b'in flight'), ws_frame(OP.CLOSE, close_payload(1001))),
                         [(OP.TEXT, 'in flight'), (OP.CLOSE, (1001, ''))])
        self.assertEqual(p.data_to_send(), b'')        # no second close frame
        for code in (1005, 1006, 1015, 999):
            with self.assertRaises(ValueError):
                self.proto().close(code)

    def test_end_of_stream_is_1006(self):
        p = self.proto()
        p.receive_data(ws_frame(OP.TEXT, b'abc')[:3])
        p.receive_data(b'')
        self.assertEqual(all_events(p), [(OP.CLOSE, (1006, ''))])
        self.assertEqual(p.data_to_send(), b'')


class RFC6455Section4HandshakeTest(unittest.TestCase):
    KEY = 'dGhlIHNhbXBsZSBub25jZQ=='

    def request(self, **headers):
        base = {'Host': 'h', 'Upgrade': 'websocket', 'Connection': 'keep-alive, Upgrade',
                'Sec-WebSocket-Key': self.KEY, 'Sec-WebSocket-Version': '13'}
        base.update(headers)
        lines = ['GET /chat?x=1 HTTP/1.1'] + ['%s: %s' % kv for kv in base.items() if kv[1] is not None]
        return ('\r\n'.join(lines) + '\r\n\r\n').encode()

    def test_rfc_example_accept(self):
        self.assertEqual(WS._ws_accept(self.KEY), 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=')
        req = WS._ws_check_request(WS._ws_head(self.request(Origin='http://a')))
        self.assertEqual((req.path, req.query, req.origin), ('/chat', 'x=1', 'http://a'))
        self.assertIn(b'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n', WS._ws_accept_response(req))

    def test_refusals(self):
        for headers, status in (({'Upgrade': None}, 400), ({'Connection': 'close'}, 400),
                                ({'Sec-WebSocket-Key': 'short'}, 400), ({'Host': None}, 400),
                                ({'Sec-WebSocket-Version': '8'}, 426)):
            with self.assertRaises(mconnector.HandshakeError, msg=headers) as cm:
                WS._ws_check_request(WS._ws_head(self.request(**headers)))
            self.assertEqual(cm.exception.status, status)
        self.assertIn(b'Sec-WebSocket-Version: 13', WS._ws_error_response(cm.exception))
        with self.assertRaises(mconnector.HandshakeError) as cm:
            WS._ws_check_request(WS._ws_head(self.request(Origin='http://evil')),
                                 origins=['http://good'])
        self.assertEqual(cm.exception.status, 403)
        with self.assertRaises(mconnector.HandshakeError) as cm:
            WS._ws_check_request(WS._ws_head(b'POST / HTTP/1.1\r\nHost: h\r\n\r\n'))
        self.assertEqual(cm.exception.status, 400)

    def test_subprotocol_is_the_servers_first_choice_that_was_offered(self):
        req = WS._ws_check_request(WS._ws_head(self.request(**{'Sec-WebSocket-Protocol': 'b, c'})),
                                   ['a', 'c', 'b'])
        self.assertEqual(req.subprotocol, 'c')
        self.assertIn(b'Sec-WebSocket-Protocol: c\r\n', WS._ws_accept_response(req))
        self.assertIsNone(WS._ws_check_request(WS._ws_head(self.request()), ['a']).subprotocol)

    def test_client_checks_the_answer(self):
        ok = ('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
              'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n').encode()
        def check(data, target):
            return WS._ws_check_response(WS._ws_head(data, client=True), self.KEY, target)
        self.assertEqual(check(ok, '/x'), (None, None))
        with self.assertRaises(mconnector.HandshakeError):
            check(ok.replace(b's3p', b'xxx'), '/x')
        with self.assertRaises(mconnector.HandshakeError) as cm:
            check(b'HTTP/1.1 404 Not Found\r\n\r\n', '/x?q=1')
        self.assertEqual((cm.exception.status, cm.exception.path), (404, '/x'))
        self.assertIn('/x', str(cm.exception))


# -- permessage-deflate (RFC 7692) ----------------------------------------------------------------

def deflated(data, compressor=None, wbits=-12):
    """`data` compressed as RFC 7692 7.2.1 says: raw deflate, sync flush, tail removed."""
    import zlib
    c = compressor or zlib.compressobj(6, zlib.DEFLATED, wbits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b'\x00\x00\xff\xff')
    return out[:-4]


def inflated(data, decompressor=None, wbits=-15):
    import zlib
    d = decompressor or zlib.decompressobj(wbits)
    return d.decompress(data + b'\x00\x00\xff\xff')


def deflate_params(offer='permessage-deflate; client_max_window_bits'):
    return WS._ws_deflate_accept(offer)


class RFC7692Section7NegotiationTest(unittest.TestCase):
    KEY = 'dGhlIHNhbXBsZSBub25jZQ=='
    ANSWER = ('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
              'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n')

    def request(self, *extensions):
        lines = ['GET /chat HTTP/1.1', 'Host: h', 'Upgrade: websocket', 'Connection: Upgrade',
                 'Sec-WebSocket-Key: ' + self.KEY, 'Sec-WebSocket-Version: 13']
        lines += ['Sec-WebSocket-Extensions: ' + e for e in extensions]
        return WS._ws_head(('\r\n'.join(lines) + '\r\n\r\n').encode())

    def accepted(self, *extensions, compression='deflate'):
        request = WS._ws_check_request(self.request(*extensions), compression=compression)
        head = WS._ws_accept_response(request)
        found = re.findall(rb'Sec-WebSocket-Extensions: ([^\r]*)\r\n', head)
        return found[0].decode() if found else None

    def test_a_browsers_offer_gets_small_windows_on_both_sides(self):
        self.assertEqual(self.accepted('permessage-deflate; client_max_window_bits'),
                         'permessage-deflate; server_max_window_bits=12; client_max_window_bits=12')

    def test_no_offer_or_compression_off_answers_as_before(self):
        plain = WS._ws_accept_response(WS._ws_check_request(self.request()))
        self.assertEqual(WS._ws_accept_response(
            WS._ws_check_request(self.request(), compression='deflate')), plain)
        self.assertEqual(WS._ws_accept_response(WS._ws_check_request(
            self.request('permessage-deflate'), compression=None)), plain)
        self.assertNotIn(b'Extensions', plain)
        self.assertIsNone(self.accepted('x-webkit-deflate-frame', 'foo; a=1'))

    def test_parameters_as_offered(self):
        for offer, answer in (
                ('permessage-deflate', 'permessage-deflate; server_max_window_bits=12'),
                ('permessage-deflate; server_max_window_bits=8',
                 'permessage-deflate; server_max_window_bits=8'),
                ('permessage-deflate; server_max_window_bits=15; client_max_window_bits=9',
                 'permessage-deflate; server_max_window_bits=12; client_max_window_bits=9'),
                ('permessage-deflate; client_max_window_bits="10"',
                 'permessage-deflate; server_max_window_bits=12; client_max_window_bits=10'),
                ('permessage-deflate ;server_no_context_takeover ; client_no_context_takeover',
                 'permessage-deflate; server_no_context_takeover; client_no_context_takeover; '
                 'server_max_window_bits=12')):
            self.assertEqual(self.accepted(offer), answer, offer)

    def test_the_first_acceptable_of_several_offers_in_one_or_several_headers(self):
        offers = ('x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=16, '
                  'permessage-deflate; server_no_context_takeover, permessage-deflate')
        answer = 'permessage-deflate; server_no_context_takeover; server_max_window_bits=12'
        self.assertEqual(self.accepted(offers), answer)
        self.assertEqual(self.accepted('foo', 'permessage-deflate; bar',
                                       'permessage-deflate; server_no_context_takeover',
                                       'permessage-deflate'), answer)

    def test_invalid_offers_are_declined(self):
        for offer in ('permessage-deflate; unknown', 'permessage-deflate; unknown=1',
                      'permessage-deflate; server_no_context_takeover; server_no_context_takeover',
                      'permessage-deflate; client_max_window_bits=10; client_max_window_bits',
                      'permessage-deflate; server_no_context_takeover=1',
                      'permessage-deflate; client_no_context_takeover="x"',
                      'permessage-deflate; server_max_window_bits',
                      'permessage-deflate; server_max_window_bits=7',
                      'permessage-deflate; server_max_window_bits=16',
                      'permessage-deflate; server_max_window_bits=010',
                      'permessage-deflate; client_max_window_bits=abc',
                      'permessage-deflate; client_max_window_bits="1 0"',
                      'permessage-deflate;', 'permessage-deflate;; server_no_context_takeover',
                      'permessage-deflate server_no_context_takeover', '"permessage-deflate"',
                      'permessage-deflate; a="b, permessage-deflate"'):
            self.assertIsNone(self.accepted(offer), offer)
            self.assertIsNotNone(self.accepted(offer + ', permessage-deflate'), offer)
        # An open quote runs to the end of the header: nothing after it is an offer.
        self.assertIsNone(self.accepted('permessage-deflate; client_max_window_bits="10, '
                                        'permessage-deflate'))

    def test_the_client_offers_and_checks_the_answer(self):
        fields = dict(WS._ws_client_headers('h', self.KEY, compression='deflate'))
        self.assertEqual(fields['Sec-WebSocket-Extensions'],
                         'permessage-deflate; server_max_window_bits=12; client_max_window_bits=12, '
                         'permessage-deflate; client_max_window_bits=12')
        self.assertNotIn('Sec-WebSocket-Extensions', dict(WS._ws_client_headers('h', self.KEY)))

        def check(extensions, compression='deflate'):
            data = self.ANSWER + ''.join('Sec-WebSocket-Extensions: %s\r\n' % e for e in extensions)
            head = WS._ws_head((data + '\r\n').encode(), client=True)
            return WS._ws_check_response(head, self.KEY, '/x', compression=compression)[1]
        self.assertIsNone(check([]))
        params = check(['permessage-deflate; server_max_window_bits=10; client_max_window_bits=9'])
        self.assertEqual((params.server_max_window_bits, params.client_max_window_bits,
                          params.server_no_context_takeover, params.client_no_context_takeover),
                         (10, 9, False, False))
        params = check(['permessage-deflate; server_no_context_takeover; client_no_context_takeover'])
        self.assertEqual((params.server_max_window_bits, params.client_max_window_bits,
                          params.server_no_context_takeover, params.client_no_context_takeover),
                         (15, 12, True, True))
        for bad in (['permessage-deflate; client_max_window_bits'],
                    ['permessage-deflate; server_max_window_bits=7'],
                    ['permessage-deflate; server_max_window_bits=9; server_max_window_bits=9'],
                    ['permessage-deflate; x=1'], ['permessage-deflate;'],
                    ['permessage-deflate', 'permessage-deflate'], ['x-webkit-deflate-frame'],
                    ['permessage-deflate, foo']):
            with self.assertRaises(mconnector.HandshakeError, msg=bad) as cm:
                check(bad)
            self.assertEqual(cm.exception.status, 101)
        with self.assertRaises(mconnector.HandshakeError) as cm:
            check(['permessage-deflate'], compression=None)
        self.assertIn('extension we did not offer', str(cm.exception))
        with self.assertRaises(ValueError):
            mconnector.SocketServer(compression='gzip')


class RFC7692Section7CompressedFramesTest(WsServerSide):
    def proto(self, offer='permessage-deflate; client_max_window_bits', **kwargs):
        return mconnector.WebSocketProtocol(client=False, deflate=deflate_params(offer), **kwargs)

    def test_compressed_text_and_binary_from_the_client(self):
        p = self.proto()
        text = 'héllo wörld ' * 50
        events = self.feed(p, ws_frame(OP.TEXT, deflated(text.encode()), rsv=0x40),
                           ws_frame(OP.BINARY, deflated(b'\x00\xff' * 500), rsv=0x40),
                           ws_frame(OP.TEXT, b'\x00', rsv=0x40))      # RFC 7692 7.2.3.6: empty
        self.assertEqual(events, [(OP.TEXT, text), (OP.BINARY, b'\x00\xff' * 500), (OP.TEXT, '')])

    def test_the_server_compresses_what_pays_and_sends_small_messages_as_they_are(self):
        p = self.proto()
        p.send('x' * 1000)
        p.send(b'tiny')
        first = p.data_to_send()
        frames = parse_server_frames(first)
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(True, OP.TEXT), (True, OP.BINARY)])
        self.assertEqual(first[0], 0xC1)                        # FIN, RSV1, text
        self.assertLess(len(frames[0][2]), 100)
        self.assertEqual(inflated(frames[0][2], wbits=-12), b'x' * 1000)
        self.assertEqual(frames[1][2], b'tiny')
        self.assertEqual(first[len(first) - 6], 0x82)           # FIN, no RSV1, binary
        p = mconnector.WebSocketProtocol()
        p.send('x' * 1000)
        self.assertEqual(p.data_to_send()[0], 0x81)             # not negotiated: never

    def test_the_client_side_masks_compressed_frames_and_inflates_the_servers(self):
        params = WS._ws_deflate_check_answer('permessage-deflate; server_max_window_bits=10')
        p = mconnector.WebSocketProtocol(client=True, deflate=params)
        p.send('y' * 500)
        out = p.data_to_send()
        self.assertEqual((out[0], out[1] & 0x80), (0xC1, 0x80))
        n = out[1] & 0x7F
        self.assertEqual(inflated(WS._ws_mask(out[6:6 + n], out[2:6])), b'y' * 500)
        p.receive_data(ws_frame(OP.BINARY, deflated(b'z' * 3000, wbits=-10), mask=None, rsv=0x40))
        self.assertEqual(all_events(p), [(OP.BINARY, b'z' * 3000)])

    def test_fragmented_compressed_message_rsv1_on_the_first_frame_only(self):
        p = self.proto()
        data = deflated('fragments, fragments and fragments'.encode() * 30)
        a, b = len(data) // 3, 2 * len(data) // 3
        events = self.feed(p, ws_frame(OP.TEXT, data[:a], fin=False, rsv=0x40),
                           ws_frame(OP.PING, b'p'),
                           ws_frame(OP.CONTINUATION, data[a:b], fin=False),
                           ws_frame(OP.CONTINUATION, data[b:]))
        self.assertEqual(events, [(OP.PING, b'p'),
                                  (OP.TEXT, 'fragments, fragments and fragments' * 30)])

    def test_rsv1_where_it_may_not_be_is_1002(self):
        data = deflated(b'abc' * 30)
        for frames in ([ws_frame(OP.TEXT, data[:5], fin=False, rsv=0x40),
                        ws_frame(OP.CONTINUATION, data[5:], rsv=0x40)],
                       [ws_frame(OP.BINARY, data[:5], fin=False),
                        ws_frame(OP.CONTINUATION, data[5:], rsv=0x40)],
                       [ws_frame(OP.PING, b'', rsv=0x40)], [ws_frame(OP.CLOSE, b'', rsv=0x40)],
                       [ws_frame(OP.TEXT, data, rsv=0x60)], [ws_frame(OP.TEXT, data, rsv=0x10)]):
            p = self.proto()
            self.feed(p, *frames)
            self.assertClosedWith(p, 1002)
        p = mconnector.WebSocketProtocol()                      # no extension negotiated
        self.feed(p, ws_frame(OP.TEXT, data, rsv=0x40))
        self.assertClosedWith(p, 1002)

    def test_data_that_does_not_inflate_is_1002(self):
        p = self.proto()
        self.feed(p, ws_frame(OP.BINARY, b'\xff\xff\xff\xff garbage', rsv=0x40))
        self.assertClosedWith(p, 1002)

    def test_a_small_frame_that_inflates_past_max_size_is_1009_before_the_memory_is_spent(self):
        bomb = deflated(b'\x00' * 1000000)
        self.assertLess(len(bomb), 1100)
        p = self.proto(max_size=100000)
        self.assertEqual(self.feed(p, ws_frame(OP.BINARY, bomb, rsv=0x40)),
                         [(OP.CLOSE, (1009, 'message of 100001 bytes over the limit of 100000'))])
        self.assertClosedWith(p, 1009)
        # 200 MB of zeros in 200 KB: inflating it whole would take 200 MB.
        import tracemalloc
        bomb = deflated(b'\x00' * 200 * 10 ** 6)
        p = self.proto()
        tracemalloc.start()
        try:
            self.feed(p, ws_frame(OP.BINARY, bomb, rsv=0x40))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertClosedWith(p, 1009)
        self.assertLess(peak, 8 * 2 ** 20)

    def test_many_small_compressed_fragments_are_held_to_max_size_and_max_frames(self):
        import zlib
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        # Fragments of one deflate stream, each flushed (the tail is cut from the last only).
        parts = [c.compress(b'\x00' * 65536) + c.flush(zlib.Z_SYNC_FLUSH) for _ in range(20)]
        self.assertTrue(all(len(part) < 300 for part in parts))
        p = self.proto(max_size=2 ** 20)
        self.feed(p, ws_frame(OP.BINARY, parts[0], fin=False, rsv=0x40),
                  *[ws_frame(OP.CONTINUATION, part, fin=False) for part in parts[1:]])
        self.assertClosedWith(p, 1009)          # the 17th fragment passes 1 MiB
        p = self.proto(max_frames=50)
        empty = ws_frame(OP.CONTINUATION, b'', fin=False)
        self.feed(p, ws_frame(OP.BINARY, parts[0][:10], fin=False, rsv=0x40), *[empty] * 60)
        self.assertClosedWith(p, 1009)

    def test_compressed_and_uncompressed_messages_mixed(self):
        import zlib
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        p = self.proto()
        events = self.feed(p, ws_frame(OP.TEXT, deflated(b'one ' * 40, compressor=c), rsv=0x40),
                           ws_frame(OP.TEXT, b'plain'),
                           ws_frame(OP.TEXT, deflated(b'one ' * 40, compressor=c), rsv=0x40),
                           ws_frame(OP.BINARY, b'\x01\x02'))
        self.assertEqual(events, [(OP.TEXT, 'one ' * 40), (OP.TEXT, 'plain'),
                                  (OP.TEXT, 'one ' * 40), (OP.BINARY, b'\x01\x02')])
        p.send('x' * 200)
        p.send('x')
        p.send('x' * 200)
        frames = parse_server_frames(p.data_to_send())
        d = zlib.decompressobj(-12)
        self.assertEqual([inflated(frames[0][2], d), frames[1][2], inflated(frames[2][2], d)],
                         [b'x' * 200, b'x', b'x' * 200])

    def test_context_takeover_and_its_reset(self):
        import zlib
        message = ('{"user": "alice", "action": "typing", "room": 42}' * 3).encode()
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        first, second = deflated(message, compressor=c), deflated(message, compressor=c)
        self.assertLess(len(second), len(first) // 2)     # it refers back to the first
        p = self.proto()
        self.assertEqual(self.feed(p, ws_frame(OP.TEXT, first, rsv=0x40),
                                   ws_frame(OP.TEXT, second, rsv=0x40)),
                         [(OP.TEXT, message.decode())] * 2)
        # client_no_context_takeover: the server's window starts empty at every message,
        # so a message that refers back cannot be read.
        p = self.proto('permessage-deflate; client_no_context_takeover')
        self.assertEqual(self.feed(p, ws_frame(OP.TEXT, first, rsv=0x40),
                                   ws_frame(OP.TEXT, first, rsv=0x40)),
                         [(OP.TEXT, message.decode())] * 2)
        self.feed(p, ws_frame(OP.TEXT, first, rsv=0x40), ws_frame(OP.TEXT, second, rsv=0x40))
        self.assertClosedWith(p, 1002)
        # Ours: with takeover the second copy is smaller; server_no_context_takeover sends
        # the same bytes twice.
        for offer, same in (('permessage-deflate', False),
                            ('permessage-deflate; server_no_context_takeover', True)):
            p = self.proto(offer)
            p.send(message)
            p.send(message)
            (_, _, a), (_, _, b) = parse_server_frames(p.data_to_send())
            self.assertEqual(a == b, same, offer)
            d = zlib.decompressobj(-12)
            self.assertEqual(inflated(a, d), message)
            self.assertEqual(inflated(b, d if not same else None), message)

    def test_hostile_compressed_frames_end_in_a_close_code_never_an_exception(self):
        rng = random.Random(7692)
        good = deflated(b'{"a": [1, 2, 3]} ' * 50)
        for i in range(300):
            p = self.proto(max_size=rng.choice([100, 5000, 2 ** 20]))
            data = bytearray(good)
            for _ in range(rng.randint(0, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[:rng.randint(0, len(data))]) if i % 3 else os.urandom(60)
            cut = rng.randint(0, len(data))
            opcode = rng.choice([OP.TEXT, OP.BINARY])
            frames = [ws_frame(opcode, data[:cut], fin=False, rsv=0x40),
                      ws_frame(OP.CONTINUATION, data[cut:], rsv=rng.choice([0, 0, 0x40]))]
            events = self.feed(p, *frames)
            for kind, value in events:
                self.assertIn(kind, (OP.TEXT, OP.BINARY, OP.CLOSE))
                if kind == OP.CLOSE:
                    self.assertIn(value[0], (1002, 1007, 1009))
            self.assertTrue(p.data_to_send() or events)

    def test_an_8_bit_window_is_kept_by_what_the_server_sends(self):
        import zlib
        rng = random.Random(7692)
        words = [bytes(rng.choice(b'abcdefgh') for _ in range(rng.randint(1, 12)))
                 for _ in range(50)]
        p = self.proto('permessage-deflate; server_max_window_bits=8')
        d = zlib.decompressobj(-8)
        for _ in range(50):
            message = b' '.join(rng.choice(words) for _ in range(rng.randint(20, 400)))
            p.send(message)
            (_, _, payload), = parse_server_frames(p.data_to_send())
            self.assertEqual(inflated(payload, d), message)


# -- live server ------------------------------------------------------------------------------

TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUF2JyCRuVKl4HhjTvUH1zll3oJsUwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyODAzNTcyM1oYDzIxMjYxMTA0
MDM1NzIzWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQKJ0knh01nCDGD7kuUZFtgSHYTdDL2X6Km1eOYFTx1BUydK3liFw/i
BDuJ8g/YsKWK+p4BPAlTPfDp1abkKDoyo28wbTAdBgNVHQ4EFgQUwzmjwnwdoqQL
OclJVITuYIV/Fx0wHwYDVR0jBBgwFoAUwzmjwnwdoqQLOclJVITuYIV/Fx0wDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSAAwRQIgdfq/o45mc/KrjtAPco22IlOyVCwWInl1ZRg82cwcxwYCIQC6
pDTCd7FZPK5TaRXHvzmAdhsann06ZtzyEMvszSi8ag==
-----END CERTIFICATE-----
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgT7oPp8O6mKtiBrvr
qJgevCkmk2jYpL6YRHcrN+2OpFOhRANCAAQKJ0knh01nCDGD7kuUZFtgSHYTdDL2
X6Km1eOYFTx1BUydK3liFw/iBDuJ8g/YsKWK+p4BPAlTPfDp1abkKDoy
-----END PRIVATE KEY-----
"""


def raw_handshake(port, path='/echo', extra=b'', sock=None):
    """Open a raw socket (or take `sock`, connected) and do the opening handshake by hand;
    return (sock, head, rest of bytes)."""
    if sock is None:
        sock = socket.create_connection(('127.0.0.1', port), timeout=5)
    sock.sendall(b'GET ' + path.encode() + b' HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n'
                 b'Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'
                 b'Sec-WebSocket-Version: 13\r\n' + extra + b'\r\n')
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b'\r\n\r\n')
    return sock, head, rest


def read_until_eof(sock, data=b''):
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return data


class WebSocketServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        sk = cls.sk = mconnector.SocketServer('test', subprotocols=['chat', 'superchat'],
                                               max_size=100000, close_timeout=2)
        cls.seen = queue.Queue()

        @sk.router('/hello')                            # the 0.3.7 README's example
        def test(message):
            return 'ok:' + message

        @sk.route('/hello/<name>')
        def hello(message, name):
            return 'hello %s: %s' % (name, message)

        @sk.router('/add/<a:int>/<b:number>')
        def add(message, a, b):
            return a + b

        @sk.router('/echo')
        def echo(message):
            return message

        @sk.router('/async')
        async def asynchronous(message):
            import asyncio
            await asyncio.sleep(0)
            return 'async:' + message

        @sk.router('/quiet')
        def quiet(message):
            cls.seen.put(message)

        @sk.router('/boom')
        def boom(message):
            raise RuntimeError('secret detail')

        @sk.render('/render')                           # the 0.3.7 render style, unchanged
        async def render(websocket, message, *args):
            await websocket.send('first:' + message)
            while message != 'exit':
                message = await websocket.recv()
                await websocket.send('again:' + message)

        @sk.render('/sync/<n:int>')
        def sync_render(ws, message, n):
            for i in range(n):
                ws.send('%s:%d:%s:%s' % (message, i, ws.origin, ws.subprotocol))
            ws.send(ws.recv() + '!')

        sk.add_route('/added', lambda m: m.upper())
        sk.run(port=0)
        cls.port = sk.port

    @classmethod
    def tearDownClass(cls):
        cls.sk.stop()

    def client(self, path, **options):
        conn = mconnector.SocketClient('127.0.0.1:%d' % self.port, path, **options)
        self.addCleanup(conn.close)
        return conn

    def test_0_3_7_router_and_exit(self):
        c = self.client('/hello')
        for name in ('Alice', 'Bob'):
            c.send(name)
            self.assertEqual(c.recv(timeout=5), 'ok:' + name)
        c.send('exit')
        self.assertEqual(c.recv(timeout=5), 'ok:exit')
        with self.assertRaises(mconnector.ConnectionClosed) as cm:
            c.recv(timeout=5)
        self.assertEqual(cm.exception.code, 1000)
        self.assertTrue(c.closed)

    def test_path_parameters_typed_and_positional(self):
        c = self.client('/hello/World%20Wide')
        c.send('hi')
        self.assertEqual(c.recv(timeout=5), 'hello World Wide: hi')
        c = self.client('/add/2/0.5')
        c.send('x')
        self.assertEqual(c.recv(timeout=5), '2.5')      # non-str replies travel as JSON
        with self.assertRaises(mconnector.HandshakeError) as cm:
            mconnector.SocketClient('127.0.0.1:%d' % self.port, '/add/x/1')
        self.assertEqual(cm.exception.status, 404)
        self.assertIn('/add/x/1', str(cm.exception))

    def test_binary_in_binary_out_and_big_text(self):
        c = self.client('/echo')
        c.send(b'\x00\x01\xff')
        self.assertEqual(c.recv(timeout=5), b'\x00\x01\xff')
        c.send('é' * 40000)
        self.assertEqual(c.recv(timeout=5), 'é' * 40000)
        c.send(bytearray(b'ba'))
        self.assertEqual(c.recv(timeout=5), b'ba')

    def test_async_router_and_add_route_and_none_reply(self):
        c = self.client('/async')
        c.send('x')
        self.assertEqual(c.recv(timeout=5), 'async:x')
        c = self.client('/added')
        c.send('abc')
        self.assertEqual(c.recv(timeout=5), 'ABC')
        c = self.client('/quiet')
        c.send('one')
        self.assertEqual(self.seen.get(timeout=5), 'one')
        with self.assertRaises(mconnector.WebSocketTimeout):
            c.recv(timeout=0.05)
        c.send('two')           # still usable after a receive timeout
        self.assertEqual(self.seen.get(timeout=5), 'two')

    def test_async_render_as_in_0_3_7(self):
        c = self.client('/render')
        c.send('a')
        self.assertEqual(c.recv(timeout=5), 'first:a')
        c.send('b')
        self.assertEqual(c.recv(timeout=5), 'again:b')
        c.send('exit')
        self.assertEqual(list(c), ['again:exit'])        # then the server closes, 1000
        self.assertEqual(c.close_code, 1000)

    def test_plain_render_with_origin_and_subprotocol(self):
        c = self.client('/sync/2', origin='http://site', subprotocols=['superchat', 'chat'])
        self.assertEqual(c.subprotocol, 'chat')             # the server's preference wins
        c.send('m')
        self.assertEqual([c.recv(timeout=5), c.recv(timeout=5)],
                         ['m:0:http://site:chat', 'm:1:http://site:chat'])
        c.send('last')
        self.assertEqual(c.recv(timeout=5), 'last!')

    def test_handler_error_is_1011_without_details(self):
        c = self.client('/boom')
        with self.assertLogs('mconnector', 'ERROR'):
            c.send('x')
            with self.assertRaises(mconnector.ConnectionClosed) as cm:
                c.recv(timeout=5)
        self.assertEqual(cm.exception.code, 1011)
        self.assertNotIn('secret', cm.exception.reason)

    def test_ping_pong_and_with(self):
        with mconnector.SocketClient('ws://127.0.0.1:%d' % self.port, '/echo') as c:
            event = c.ping(b'abc')
            c.send('x')
            self.assertEqual(c.recv(timeout=5), 'x')        # the pong was read on the way
            self.assertTrue(event.wait(5))
        self.assertEqual(c.close_code, 1000)
        with self.assertRaises(mconnector.ConnectionClosed):
            c.send('after')

    def test_message_too_big_is_1009(self):
        c = self.client('/echo')
        c.send(b'x' * 100001)
        with self.assertRaises(mconnector.ConnectionClosed) as cm:
            c.recv(timeout=5)
        self.assertEqual(cm.exception.code, 1009)
        c = self.client('/echo', max_size=10)                # the client's own limit
        c.send('x' * 11)
        with self.assertRaises(mconnector.ConnectionClosed) as cm:
            c.recv(timeout=5)
        self.assertEqual(cm.exception.sent[0], 1009)

    def test_bad_handshakes_get_http_errors(self):
        for request, status in ((b'garbage\r\n\r\n', b'400'),
                                (b'GET /echo HTTP/1.1\r\nHost: x\r\n\r\n', b'400'),
                                (b'GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n'
                                 b'Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'
                                 b'Sec-WebSocket-Version: 8\r\n\r\n', b'426')):
            with socket.create_connection(('127.0.0.1', self.port), timeout=5) as s:
                s.sendall(request)
                answer = read_until_eof(s)
            self.assertTrue(answer.startswith(b'HTTP/1.1 ' + status), answer)
        self.assertIn(b'Sec-WebSocket-Version: 13', answer)
        sock, head, _ = raw_handshake(self.port, '/nowhere')
        sock.close()
        self.assertTrue(head.startswith(b'HTTP/1.1 404'))
        with self.assertRaises(mconnector.Unreachable):
            free = socket.socket()
            free.bind(('127.0.0.1', 0))
            port = free.getsockname()[1]
            free.close()
            mconnector.SocketClient('127.0.0.1:%d' % port)

    def test_raw_protocol_errors_get_their_close_codes(self):
        for frames, code in ((ws_frame(OP.TEXT, b'hi', mask=None), 1002),
                             (bytes([0x81, 0xFF]) + (2 ** 63).to_bytes(8, 'big'), 1002),
                             (ws_frame(OP.TEXT, b'\xff'), 1007),
                             (ws_frame(OP.CLOSE, b'\x03\xed'), 1002)):
            sock, head, rest = raw_handshake(self.port)
            self.assertTrue(head.startswith(b'HTTP/1.1 101'))
            self.assertIn(b's3pPLMBiTxaQ9kYGzzhZRbK+xOo=', head)
            sock.sendall(frames)
            frames_back = parse_server_frames(read_until_eof(sock, rest))
            sock.close()
            self.assertEqual(frames_back[-1][1], OP.CLOSE)
            self.assertEqual(int.from_bytes(frames_back[-1][2][:2], 'big'), code)

    def test_raw_ping_fragments_and_clean_close(self):
        sock, head, rest = raw_handshake(self.port)
        sock.sendall(ws_frame(OP.TEXT, b'ab', fin=False) + ws_frame(OP.PING, b'pp')
                     + ws_frame(OP.CONTINUATION, b'c') + ws_frame(OP.CLOSE, close_payload(1000)))
        frames = parse_server_frames(read_until_eof(sock, rest))    # the server ends TCP first
        sock.close()
        self.assertEqual(frames, [(True, OP.PONG, b'pp'), (True, OP.TEXT, b'abc'),
                                  (True, OP.CLOSE, b'\x03\xe8')])


class WebSocketLimitsTest(unittest.TestCase):
    def start(self, **options):
        sk = mconnector.SocketServer('limits', close_timeout=0.5, **options)
        sk.router('/echo')(lambda m: m)
        sk.run(port=0)
        self.addCleanup(sk.stop)
        return sk

    def test_a_handshake_head_over_16_kib_is_answered_431(self):
        sk = self.start()
        for extra in (b'X-Pad: ' + b'a' * 5000 + b'\r\n') * 4, b'X-Pad: ' + b'a' * 20000:
            # whole (four lines, 20 KB) and still coming (one line longer than the limit)
            sock, head, rest = raw_handshake(sk.port, extra=extra)
            with sock:
                self.assertTrue(head.startswith(b'HTTP/1.1 431 '), head[:60])
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as ws:
            ws.send('still serving')
            self.assertEqual(ws.recv(), 'still serving')

    def test_max_size_none_serves_messages_over_the_default_limit(self):
        sk = self.start(max_size=None)
        big = os.urandom(3 * 2 ** 20)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', max_size=None) as ws:
            ws.send(big)
            self.assertEqual(ws.recv(10), big)
            ws.send('x' * (2 ** 20 + 1))
            self.assertEqual(ws.recv(10), 'x' * (2 ** 20 + 1))

    def test_endless_empty_continuations_are_closed_1009(self):
        sk = self.start()
        sock, head, rest = raw_handshake(sk.port)
        with sock:
            empty = ws_frame(OP.CONTINUATION, b'', fin=False)
            sock.sendall(ws_frame(OP.TEXT, b'x', fin=False) + empty * 20000)
            frames = parse_server_frames(read_until_eof(sock, rest))
        self.assertEqual(frames[-1][1], OP.CLOSE)
        self.assertEqual(int.from_bytes(frames[-1][2][:2], 'big'), 1009)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as ws:
            ws.send('still serving')
            self.assertEqual(ws.recv(5), 'still serving')

    def test_stalled_half_frame_and_silent_peer_are_dropped(self):
        sk = self.start(ping_interval=0.1, ping_timeout=0.2)
        sock, head, rest = raw_handshake(sk.port)
        sock.sendall(ws_frame(OP.TEXT, b'hello')[:4])               # half a frame, then nothing
        started = time.monotonic()
        data = read_until_eof(sock, rest)
        sock.close()
        self.assertLess(time.monotonic() - started, 3)
        kinds = [f[1] for f in parse_server_frames(data)]
        self.assertIn(OP.PING, kinds)
        self.assertEqual(kinds[-1], OP.CLOSE)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as c:   # ours answers
            with self.assertRaises(mconnector.WebSocketTimeout):
                c.recv(timeout=0.5)                                 # pings answered meanwhile
            c.send('still here')
            self.assertEqual(c.recv(timeout=5), 'still here')

    def test_peer_that_never_answers_the_close_is_dropped(self):
        sk = self.start()                                           # close_timeout=0.5
        sock, head, rest = raw_handshake(sk.port)
        sock.sendall(ws_frame(OP.TEXT, b'exit'))                    # the router ends here
        started = time.monotonic()
        frames = parse_server_frames(read_until_eof(sock, rest))   # and we never answer
        sock.close()
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(frames, [(True, OP.TEXT, b'exit'), (True, OP.CLOSE, b'\x03\xe8')])

    def test_a_thousand_idle_connections(self):
        sk = self.start(handshake_timeout=1.0)
        import selectors
        idle = [socket.create_connection(('127.0.0.1', sk.port), timeout=5) for _ in range(1000)]
        try:
            with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as c:
                c.send('busy?')
                self.assertEqual(c.recv(timeout=5), 'busy?')
            with selectors.DefaultSelector() as sel:
                for s in idle:
                    sel.register(s, selectors.EVENT_READ)
                dropped = set()
                deadline = time.monotonic() + 10
                while len(dropped) < len(idle) and time.monotonic() < deadline:
                    for key, _ in sel.select(0.5):
                        if key.fileobj.recv(1) == b'':
                            dropped.add(key.fileobj)
                            sel.unregister(key.fileobj)
            self.assertEqual(len(dropped), 1000)
        finally:
            for s in idle:
                s.close()

    def test_stop_closes_connections_with_1001(self):
        sk = self.start()
        c = mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo')
        c.send('x')
        self.assertEqual(c.recv(timeout=5), 'x')
        got = []
        reader = threading.Thread(target=lambda: got.extend(c))
        reader.start()
        sk.stop()
        reader.join(5)
        self.assertEqual(c.close_code, 1001)
        self.assertIsNone(sk.port)
        with self.assertRaises(mconnector.Unreachable):
            mconnector.SocketClient('127.0.0.1:%d' % c.remote_address[1], '/echo')

    def test_wss(self):
        import ssl
        import tempfile
        with tempfile.NamedTemporaryFile('w', suffix='.pem', delete=False) as f:
            f.write(TEST_CERT)
        self.addCleanup(os.unlink, f.name)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(f.name)
        sk = self.start(ssl_context=server_ctx)
        client_ctx = ssl.create_default_context(cafile=f.name)
        with mconnector.SocketClient('wss://localhost:%d' % sk.port, '/echo', ssl_context=client_ctx) as c:
            c.send('secret' * 10000)
            self.assertEqual(c.recv(timeout=5), 'secret' * 10000)
        with self.assertRaises(mconnector.NetworkError):        # an unknown certificate
            mconnector.SocketClient('wss://localhost:%d' % sk.port, '/echo')


def slow_handshake(port, path='/echo'):
    """A raw client that reads nothing unless told: a 4 KiB receive buffer (set before it
    connects, so that the window it offers stays small), the handshake done by hand."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(('127.0.0.1', port))
    sock, head, rest = raw_handshake(port, path, sock=sock)
    assert head.startswith(b'HTTP/1.1 101'), head
    return sock, rest


class ServerFrames:
    """Reads a server's frames from a raw socket one at a time: (fin, opcode, payload), or
    None once the stream ends."""

    def __init__(self, sock, data=b''):
        self.sock = sock
        self.buf = bytearray(data)

    def _need(self, n):
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(262144)
            except ConnectionError:
                chunk = b''
            if not chunk:
                return False
            self.buf += chunk
        return True

    def next(self):
        if not self._need(2):
            return None
        n, pos = self.buf[1] & 0x7F, 2
        if n == 126:
            if not self._need(4):
                return None
            n, pos = int.from_bytes(self.buf[2:4], 'big'), 4
        elif n == 127:
            if not self._need(10):
                return None
            n, pos = int.from_bytes(self.buf[2:10], 'big'), 10
        if not self._need(pos + n):
            return None
        frame = (bool(self.buf[0] & 0x80), self.buf[0] & 0x0F, bytes(self.buf[pos:pos + n]))
        del self.buf[:pos + n]
        return frame

    def until_close(self):
        """The frames up to and including the close frame (or the end of the stream)."""
        frames = []
        while True:
            frame = self.next()
            if frame is None:
                return frames
            frames.append(frame)
            if frame[1] == OP.CLOSE:
                return frames


class WebSocketBroadcastTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        sk = cls.sk = mconnector.SocketServer('broadcast', close_timeout=5)
        cls.chosen = queue.Queue()

        @sk.router('/feed')
        def feed(message):
            return None

        @sk.render('/room/<n:int>')
        def room(ws, message, n):
            for message in ws:
                pass

        @sk.render('/pick')
        def pick(ws, message):
            cls.chosen.put((message, ws))
            for message in ws:
                pass

        @sk.render('/chat')
        async def chat(ws, message):
            while True:
                sk.broadcast(message + ' says hi', path='/chat')     # no await
                message = await ws.recv()

        @sk.router('/shout')
        def shout(message):
            sk.broadcast(message.upper(), path='/shout')
        sk.run(port=0)
        cls.port = sk.port

    @classmethod
    def tearDownClass(cls):
        cls.sk.stop()

    def clients(self, path, n):
        opened = []
        for _ in range(n):
            c = mconnector.SocketClient('127.0.0.1:%d' % self.port, path)
            self.addCleanup(c.close)
            opened.append(c)
        return opened

    def open_on(self, path):
        """How many of the server's connections are on `path`."""
        return sum(1 for ws in list(self.sk.connections) if ws.path == path)

    def test_fifty_clients_get_the_one_message_as_text_binary_or_json(self):
        clients = self.clients('/feed', 50)
        self.assertTrue(wait_for(lambda: self.open_on('/feed') == 50))
        self.assertEqual(self.sk.broadcast('news', path='/feed'), (50, []))
        self.assertEqual(self.sk.broadcast(b'\x00\xff', path='/feed'), (50, []))
        self.assertEqual(self.sk.broadcast({'n': [1, 2]}, path='/feed'), (50, []))
        for c in clients:
            self.assertEqual([c.recv(5), c.recv(5), c.recv(5)],
                             ['news', b'\x00\xff', '{"n": [1, 2]}'])

    def test_a_path_a_rule_or_chosen_connections_only(self):
        one, two = self.clients('/room/1', 3), self.clients('/room/2', 3)
        self.assertTrue(wait_for(lambda: self.open_on('/room/1') == 3
                                 and self.open_on('/room/2') == 3))
        self.assertEqual(self.sk.broadcast('for room 1', path='/room/1')[0], 3)
        self.assertEqual(self.sk.broadcast('for every room', path='/room/<n:int>')[0], 6)
        for c in one:
            self.assertEqual([c.recv(5), c.recv(5)], ['for room 1', 'for every room'])
        for c in two:
            self.assertEqual(c.recv(5), 'for every room')       # room 1's never came
        picked = self.clients('/pick', 2)
        for n, c in enumerate(picked):
            c.send('client %d' % n)
        chosen = dict(self.chosen.get(timeout=5) for _ in picked)
        self.assertEqual(self.sk.broadcast('just you', connections=[chosen['client 0']]),
                         (1, []))
        self.assertEqual(self.sk.broadcast('everyone', path='/pick'), (2, []))
        self.assertEqual([picked[0].recv(5), picked[0].recv(5)], ['just you', 'everyone'])
        self.assertEqual(picked[1].recv(5), 'everyone')
        with self.assertRaises(ValueError):
            self.sk.broadcast('x', slow='wait')
        with self.assertRaises(TypeError) as caught:        # a client's side, by mistake
            self.sk.broadcast('x', connections=picked)
        self.assertIn("server's connections", str(caught.exception))

    def test_from_async_and_plain_handlers(self):
        clients = self.clients('/chat', 4)
        self.assertTrue(wait_for(lambda: self.open_on('/chat') == 4))
        clients[0].send('ann')          # her handler starts and tells the room
        for c in clients:
            self.assertEqual(c.recv(5), 'ann says hi')
        clients = self.clients('/shout', 3)
        self.assertTrue(wait_for(lambda: self.open_on('/shout') == 3))
        clients[2].send('hey')          # a router handler, on a worker
        for c in clients:
            self.assertEqual(c.recv(5), 'HEY')

    def test_while_clients_come_and_go(self):
        steady = self.clients('/room/9', 5)
        self.assertTrue(wait_for(lambda: self.open_on('/room/9') == 5))
        stop = threading.Event()
        failures = []
        churned = []

        def churn():
            try:
                while not stop.is_set():
                    churned.append(1)
                    if random.random() < 0.5:
                        mconnector.SocketClient('127.0.0.1:%d' % self.port, '/room/9').close()
                    else:                   # gone without a closing handshake
                        sock, head, rest = raw_handshake(self.port, '/room/9')
                        sock.close()
            except Exception as exc:        # (reported below)
                failures.append(exc)
        churners = [threading.Thread(target=churn) for _ in range(3)]
        for t in churners:
            t.start()
        count = read = 0

        def read_all():         # the steady ones got every message, in order
            for c in steady:
                self.assertEqual([c.recv(5) for _ in range(read, count)],
                                 ['m%d' % i for i in range(read, count)])
            return count
        deadline = time.monotonic() + 30
        try:            # until 50 connections have come and gone meanwhile
            while (len(churned) < 50 or count < 300) and time.monotonic() < deadline:
                sent, behind = self.sk.broadcast('m%d' % count, path='/room/9')
                count += 1
                self.assertGreaterEqual(sent, 5)
                self.assertEqual(behind, [])
                if count % 200 == 0:
                    read = read_all()
        finally:
            stop.set()
            for t in churners:
                t.join(10)
        self.assertEqual(failures, [])
        self.assertGreaterEqual(len(churned), 50)
        read_all()


class WebSocketFlowControlTest(unittest.TestCase):
    def start(self, **options):
        sk = mconnector.SocketServer('flow', close_timeout=5, **options)
        sk.router('/echo')(lambda m: m)
        sk.router('/feed')(lambda m: None)
        sk.run(port=0)
        self.addCleanup(sk.stop)
        return sk

    def on(self, sk, path, n):
        self.assertTrue(wait_for(lambda: sum(1 for ws in list(sk.connections)
                                             if ws.path == path) == n))

    def slow_and_fast(self, sk, fast=10):
        slow, rest = slow_handshake(sk.port, '/feed')
        self.addCleanup(slow.close)
        clients = []
        for _ in range(fast):
            c = mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/feed')
            self.addCleanup(c.close)
            clients.append(c)
        self.on(sk, '/feed', fast + 1)
        return slow, rest, clients

    def test_a_slow_reader_is_skipped_and_the_others_get_every_message(self):
        sk = self.start(write_limit=16384)
        slow, rest, clients = self.slow_and_fast(sk)
        # Half of write_limit: a peer that keeps up never has more than that waiting.
        message = 'x' * 8192
        # The kernel takes a few MB for the peer that reads nothing; then it falls behind.
        deadline = time.monotonic() + 20
        count = 0
        while time.monotonic() < deadline:
            sent, behind = sk.broadcast(message)
            count += 1
            for c in clients:
                self.assertEqual(c.recv(5), message)       # it never waits for the slow one
            if behind:
                break
        self.assertEqual(len(behind), 1)
        self.assertEqual(sent, 10)
        (ws,) = behind
        self.assertGreater(ws.buffered, 16384)
        for _ in range(5):                                  # skipped, not closed
            self.assertEqual(sk.broadcast('small'), (10, [ws]))
        self.assertFalse(ws.closed)
        for c in clients:
            self.assertEqual([c.recv(5) for _ in range(5)], ['small'] * 5)
        frames = ServerFrames(slow, rest)       # it reads at last: what it was not left out of
        got = [frames.next() for _ in range(count - 1)]
        self.assertEqual(got, [(True, OP.TEXT, message.encode())] * (count - 1))
        # Once down to the low-water mark, it is back among the others.
        self.assertTrue(wait_for(lambda: sk.broadcast('caught up')[0] == 11))
        self.assertEqual(frames.next(), (True, OP.TEXT, b'caught up'))

    def test_a_slow_reader_is_closed_1013_when_asked(self):
        sk = self.start(write_limit=16384)
        slow, rest, clients = self.slow_and_fast(sk)
        deadline = time.monotonic() + 20
        behind = []
        while not behind and time.monotonic() < deadline:
            sent, behind = sk.broadcast(b'y' * 8192, slow='close')
            for c in clients:
                self.assertEqual(len(c.recv(5)), 8192)
        (ws,) = behind
        self.assertTrue(wait_for(lambda: ws.closed))
        self.assertEqual(ws.close_code, 1013)
        self.assertLess(ws.buffered, 8192 + 100)      # what it had queued is dropped
        frames = ServerFrames(slow, rest).until_close()
        self.assertEqual(frames[-1][:2], (True, OP.CLOSE))
        self.assertEqual(int.from_bytes(frames[-1][2][:2], 'big'), 1013)
        self.assertTrue(all(f == (True, OP.BINARY, b'y' * 8192) for f in frames[:-1]))
        self.assertEqual(sk.broadcast('still serving'), (10, []))
        for c in clients:
            self.assertEqual(c.recv(5), 'still serving')

    def test_a_peer_that_pings_and_never_reads_is_closed_1008(self):
        sk = self.start(write_limit=16384, write_hard_limit=65536)
        slow, rest = slow_handshake(sk.port, '/echo')
        self.addCleanup(slow.close)
        self.on(sk, '/echo', 1)
        (ws,) = list(sk.connections)
        ping = ws_frame(OP.PING, b'p' * 125) * 64
        slow.settimeout(0.5)
        deadline = time.monotonic() + 20
        with self.assertLogs('mconnector', 'INFO') as logs:
            while not ws.closed and time.monotonic() < deadline:
                try:
                    slow.sendall(ping)      # each one answered with a pong it never reads
                except socket.timeout:      # the server reads no more of it
                    break
            self.assertTrue(wait_for(lambda: ws.closed))
        self.assertIn('closing it (1008)', '\n'.join(logs.output))
        self.assertEqual(ws.close_code, 1008)
        self.assertLess(ws.buffered, 65536)            # its queue is freed (all but the
        #                                               pongs of one read, whose frames are cut)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as c:
            c.send('still serving')
            self.assertEqual(c.recv(5), 'still serving')
        slow.settimeout(5)
        frames = ServerFrames(slow, rest).until_close()
        self.assertTrue(all(f == (True, OP.PONG, b'p' * 125) for f in frames[:-1]))
        self.assertEqual(frames[-1][1], OP.CLOSE)
        self.assertEqual(int.from_bytes(frames[-1][2][:2], 'big'), 1008)

    def big_sender(self, sk, handler):
        """A render route on /big whose handler reports to a queue; its raw slow peer."""
        sk.render('/big')(handler)
        slow, rest = slow_handshake(sk.port, '/big')
        self.addCleanup(slow.close)
        slow.sendall(ws_frame(OP.TEXT, b'go'))
        return slow, rest

    def test_send_waits_for_a_slow_peer_over_write_limit(self):
        sk = self.start()                               # 64 KiB, low-water mark 16 KiB
        reports = queue.Queue()
        big = b'z' * 8000000                            # more than the kernel takes for it

        def sender(ws, message):
            reports.put(ws)
            ws.send(big)
            reports.put(('sent', ws.buffered))
            ws.recv()
        slow, rest = self.big_sender(sk, sender)
        ws = reports.get(timeout=5)
        self.assertTrue(wait_for(lambda: ws.buffered > 65536))
        self.assertTrue(reports.empty())                # still in send()
        frames = ServerFrames(slow, rest)
        self.assertEqual(frames.next(), (True, OP.BINARY, big))
        kind, left = reports.get(timeout=5)
        self.assertLessEqual(left, 16384)

    def test_one_message_over_the_hard_limit_is_no_reason_to_close(self):
        sk = self.start(write_limit=16384, write_hard_limit=65536)
        reports = queue.Queue()
        big = b'h' * 8000000

        def sender(ws, message):
            reports.put(ws)
            ws.send(big)                                # waits for the peer to take it
            reports.put('sent')
            ws.recv()
        slow, rest = self.big_sender(sk, sender)
        ws = reports.get(timeout=5)
        self.assertTrue(wait_for(lambda: ws.buffered > 65536))
        slow.sendall(ws_frame(OP.PING, b'are you there') * 20)     # pongs queue behind it
        frames = ServerFrames(slow, rest)
        self.assertEqual(frames.next(), (True, OP.BINARY, big))
        self.assertEqual([frames.next() for _ in range(20)],
                         [(True, OP.PONG, b'are you there')] * 20)
        self.assertEqual(reports.get(timeout=5), 'sent')
        self.assertFalse(ws.closed)

    def drain_test(self, make_handler):
        sk = self.start(write_limit=(16 * 2 ** 20, 65536), write_hard_limit=32 * 2 ** 20)
        reports = queue.Queue()
        slow, rest = self.big_sender(sk, make_handler(reports))
        self.assertEqual(reports.get(timeout=10), 'timed out')     # it waits for the reader
        frames = ServerFrames(slow, rest)
        self.assertEqual(frames.next(), (True, OP.BINARY, b'd' * 8000000))
        kind, left = reports.get(timeout=10)
        self.assertEqual(kind, 'drained')
        self.assertLessEqual(left, 65536)
        self.assertEqual(frames.next(), (True, OP.TEXT, b'done'))

    def test_drain_in_a_plain_handler(self):
        def make_handler(reports):
            def handler(ws, message):
                ws.send(b'd' * 8000000)             # under write_limit: no wait here
                try:
                    ws.drain(timeout=0.2)
                except mconnector.WebSocketTimeout:
                    reports.put('timed out')
                ws.drain()
                reports.put(('drained', ws.buffered))
                ws.send('done')
                ws.recv()
            return handler
        self.drain_test(make_handler)

    def test_drain_in_an_async_handler(self):
        def make_handler(reports):
            async def handler(ws, message):
                await ws.send(b'd' * 8000000)
                try:
                    await ws.drain(timeout=0.2)
                except mconnector.WebSocketTimeout:
                    reports.put('timed out')
                await ws.drain()
                reports.put(('drained', ws.buffered))
                await ws.send('done')
                await ws.recv()
            return handler
        self.drain_test(make_handler)

    def test_drain_raises_when_the_peer_leaves(self):
        sk = self.start(write_limit=(16 * 2 ** 20, 0), write_hard_limit=32 * 2 ** 20)
        reports = queue.Queue()

        def handler(ws, message):
            ws.send(b'd' * 8000000)
            reports.put('sent')
            try:
                ws.drain()
            except mconnector.ConnectionClosed as exc:
                reports.put(exc.code)
        slow, rest = self.big_sender(sk, handler)
        self.assertEqual(reports.get(timeout=5), 'sent')
        slow.close()
        self.assertEqual(reports.get(timeout=5), 1006)

    def test_an_async_router_waits_for_its_slow_peer_without_blocking_the_loop(self):
        sk = self.start()

        @sk.router('/big-async')
        async def big(message):
            return b'a' * 8000000                       # more than the kernel takes for it

        @sk.router('/echo-async')
        async def echo(message):
            return message
        slow, rest = slow_handshake(sk.port, '/big-async')
        self.addCleanup(slow.close)
        slow.sendall(ws_frame(OP.TEXT, b'go'))
        self.on(sk, '/big-async', 1)
        (ws,) = [ws for ws in list(sk.connections) if ws.path == '/big-async']
        self.assertTrue(wait_for(lambda: ws.buffered > 65536))     # its answer waits
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo-async') as c:
            for n in range(3):                          # the asyncio loop serves on
                c.send('ping %d' % n)
                self.assertEqual(c.recv(5), 'ping %d' % n)
        self.assertEqual(ServerFrames(slow, rest).next(), (True, OP.BINARY, b'a' * 8000000))

    def test_limits_are_checked(self):
        sk = mconnector.SocketServer('limits')
        self.assertEqual((sk.write_limit, sk.write_hard_limit), (65536, 4 * 2 ** 20))
        for bad, error in (('64k', TypeError), ((10, 20), ValueError), (-1, ValueError),
                           (8 * 2 ** 20, ValueError)):      # (over the hard limit)
            with self.assertRaises(error):
                sk.write_limit = bad
        with self.assertRaises(ValueError):
            sk.write_hard_limit = 1000
        sk.write_limit = (1000, 10)
        sk.write_hard_limit = 1000
        self.assertEqual((sk.write_limit, sk.write_hard_limit), ((1000, 10), 1000))
        with self.assertRaises(ValueError):
            mconnector.SocketServer('limits', write_limit=2 ** 20, write_hard_limit=2 ** 19)


class WebSocketSignedHandshakeTest(unittest.TestCase):
    def test_server_with_a_secret_key_takes_signed_handshakes_only(self):
        sk = mconnector.SocketServer('signed', secretKey='k3y')

        @sk.router('/echo')
        def echo(message):
            return message
        sk.run(host='127.0.0.1', port=0)
        self.addCleanup(sk.stop)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', secretKey='k3y') as ws:
            ws.send('signed')
            self.assertEqual(ws.recv(5), 'signed')
        for options in ({}, {'secretKey': 'wrong'}):
            with self.assertRaises(mconnector.HandshakeError) as caught:
                mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', **options)
            self.assertEqual(caught.exception.status, 401)

    def test_signed_handshakes_cover_the_subprotocol_and_malformed_ones_are_401(self):
        sk = mconnector.SocketServer('signed', secretKey='k3y', subprotocols=['chat', 'raw'])
        sk.router('/echo')(lambda message: message)
        sk.run(host='127.0.0.1', port=0)
        self.addCleanup(sk.stop)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', secretKey='k3y',
                                     subprotocols=['raw']) as ws:
            self.assertEqual(ws.subprotocol, 'raw')
        signed = mconnector.sign_request('k3y', 'GET', '/echo', b'',
                                         headers=[('Sec-WebSocket-Protocol', 'raw')])
        for fields, status in ((signed, b'101'),
                               (signed, b'401'),                    # replayed
                               (mconnector.sign_request('k3y', 'GET', '/echo', b''), b'401'),
                               ([('X-MC-Timestamp', '9' * 5000), ('X-MC-Nonce', 'n'),
                                 ('X-MC-Signature', 'a' * 64)], b'401'),
                               ([('X-MC-Timestamp', '\xb2'), ('X-MC-Nonce', 'n'),
                                 ('X-MC-Signature', '\xe9' * 64)], b'401')):
            extra = ('Sec-WebSocket-Protocol: raw\r\n' + ''.join(
                '%s: %s\r\n' % f for f in fields)).encode('latin-1')
            sock, head, rest = raw_handshake(sk.port, extra=extra)
            sock.close()
            self.assertEqual(head[9:12], status, (fields, head))
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', secretKey='k3y') as ws:
            ws.send('still serving')
            self.assertEqual(ws.recv(5), 'still serving')


OFFER = b'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n'


def compression_server(test, **options):
    """A SocketServer with an echo route and a render route that tells what it negotiated."""
    sk = mconnector.SocketServer('deflate', close_timeout=2, **options)
    sk.router('/echo')(lambda message: message)

    @sk.render('/seen')
    def seen(ws, message):
        ws.send('%s %s' % (ws.compression, ws.headers.get('sec-websocket-extensions')))
        for message in ws:
            ws.send(message)
    sk.run(host='127.0.0.1', port=0)
    test.addCleanup(sk.stop)
    return sk


def read_frame(sock, data=b''):
    """(first byte, payload, rest) of one unmasked frame from a raw socket."""
    while True:
        if len(data) >= 2:
            n, pos = data[1] & 0x7F, 2
            if n == 126 and len(data) >= 4:
                n, pos = int.from_bytes(data[2:4], 'big'), 4
            elif n == 127 and len(data) >= 10:
                n, pos = int.from_bytes(data[2:10], 'big'), 10
            if n < 126 or pos > 2:
                if len(data) >= pos + n:
                    return data[0], data[pos:pos + n], data[pos + n:]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError('closed before a whole frame')
        data += chunk


class WebSocketCompressionTest(unittest.TestCase):
    def test_socket_client_and_server_negotiate_and_compress_both_ways(self):
        sk = compression_server(self)
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/seen') as ws:
            self.assertEqual(ws.compression, 'deflate')
            ws.send('hello')
            self.assertEqual(ws.recv(5), 'deflate permessage-deflate; server_max_window_bits=12; '
                                         'client_max_window_bits=12, permessage-deflate; '
                                         'client_max_window_bits=12')
            for message in ('é' * 40000, b'\x00\x01' * 30000, 'small', b'', os.urandom(5000),
                            '{"k": 1}' * 1000):
                ws.send(message)
                self.assertEqual(ws.recv(5), message)

    def test_either_side_can_turn_it_off(self):
        for server, client in (({'compression': None}, {}), ({}, {'compression': None})):
            sk = compression_server(self, **server)
            with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/seen', **client) as ws:
                self.assertIsNone(ws.compression)
                ws.send('hello')
                expected = 'None None' if client else (
                    'None permessage-deflate; server_max_window_bits=12; client_max_window_bits=12, '
                    'permessage-deflate; client_max_window_bits=12')
                self.assertEqual(ws.recv(5), expected)
                ws.send('x' * 10000)
                self.assertEqual(ws.recv(5), 'x' * 10000)

    def test_a_client_that_offers_nothing_gets_the_same_bytes_as_before(self):
        heads = []
        for options in ({}, {'compression': None}):
            sk = compression_server(self, **options)
            sock, head, rest = raw_handshake(sk.port)
            heads.append(head)
            sock.sendall(ws_frame(OP.TEXT, b'x' * 1000))
            first, payload, rest = read_frame(sock, rest)
            self.assertEqual((first, payload), (0x81, b'x' * 1000))     # no RSV1
            sock.close()
        self.assertEqual(heads[0], heads[1])
        self.assertNotIn(b'Extensions', heads[0])

    def test_compressed_frames_on_the_wire(self):
        sk = compression_server(self)
        sock, head, rest = raw_handshake(sk.port, extra=OFFER)
        self.addCleanup(sock.close)
        self.assertIn(b'\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=12; '
                      b'client_max_window_bits=12', head)
        import zlib
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        d = zlib.decompressobj(-12)
        for message in (b'compress me ' * 100, b'compress me ' * 100):
            sock.sendall(ws_frame(OP.TEXT, deflated(message, compressor=c), rsv=0x40))
            first, payload, rest = read_frame(sock, rest)
            self.assertEqual(first, 0xC1)
            self.assertLess(len(payload), 100)
            self.assertEqual(inflated(payload, d), message)
        sock.sendall(ws_frame(OP.TEXT, b'not compressed'))
        self.assertEqual(read_frame(sock, rest)[:2], (0x81, b'not compressed'))

    def test_a_bomb_is_refused_with_1009_and_the_server_keeps_serving(self):
        sk = compression_server(self, max_size=100000)
        sock, head, rest = raw_handshake(sk.port, extra=OFFER)
        sock.sendall(ws_frame(OP.BINARY, deflated(b'\x00' * 10 ** 7), rsv=0x40))
        first, payload, rest = read_frame(sock, rest)
        self.assertEqual((first & 0x0F, int.from_bytes(payload[:2], 'big')), (OP.CLOSE, 1009))
        sock.close()
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo') as ws:
            ws.send('y' * 90000)
            self.assertEqual(ws.recv(5), 'y' * 90000)

    def test_the_websockets_package_as_client_and_as_server(self):
        # The websockets package is an optional peer: looked for, and skipped without it.
        import importlib.util
        if importlib.util.find_spec('websockets') is None:
            self.skipTest('the websockets package is not installed')
        sync_client = importlib.import_module('websockets.sync.client')
        sync_server = importlib.import_module('websockets.sync.server')
        sk = compression_server(self)
        with sync_client.connect('ws://127.0.0.1:%d/seen' % sk.port, open_timeout=5) as ws:
            self.assertEqual([type(e).__name__ for e in ws.protocol.extensions],
                             ['PerMessageDeflate'])
            ws.send('hello')
            self.assertTrue(ws.recv(5).startswith('deflate permessage-deflate'))
            for message in ('é' * 40000, b'\x00\x01' * 30000, 'small', '{"k": 1}' * 1000):
                ws.send(message)
                self.assertEqual(ws.recv(5), message)

        def echo(connection):
            for message in connection:
                connection.send(message)
        server = sync_server.serve(echo, '127.0.0.1', 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.shutdown)
        port = server.socket.getsockname()[1]
        with mconnector.SocketClient('127.0.0.1:%d' % port, '/') as ws:
            self.assertEqual(ws.compression, 'deflate')
            for message in ('é' * 40000, b'\x00\x01' * 30000, 'small', '{"k": 1}' * 1000):
                ws.send(message)
                self.assertEqual(ws.recv(5), message)


BROWSER_PAGE = '''<!doctype html><title>deflate</title><script>
const big = JSON.stringify(Array.from({length: 500}, (_, i) => ({id: i, name: "item " + i})));
const ws = new WebSocket("ws://127.0.0.1:%d/browser");
ws.binaryType = "arraybuffer";
const got = [];
ws.onopen = () => { ws.send(big); ws.send("small"); ws.send(new Uint8Array(5000).fill(7)); };
ws.onmessage = (event) => {
  got.push(event.data);
  if (got.length < 3) return;
  const ok = got[0] === big && got[1] === "small" && got[2].byteLength === 5000
             && new Uint8Array(got[2]).every((b) => b === 7);
  ws.send("result:" + (ok ? "echoed" : "mismatch") + ";" + ws.extensions);
};
</script>'''


class WebSocketBrowserCompressionTest(unittest.TestCase):
    """Headless Chromium (when /usr/bin/chromium exists) talks permessage-deflate with a
    SocketServer, on a page that a Microservice serves."""

    CHROMIUM = '/usr/bin/chromium'

    def test_chromium_negotiates_and_exchanges_compressed_messages(self):
        if not os.path.exists(self.CHROMIUM):
            self.skipTest('no %s' % self.CHROMIUM)
        import shutil
        import signal
        import tempfile
        seen = queue.Queue()
        sk = mconnector.SocketServer('browser', close_timeout=2)

        @sk.render('/browser')
        def browser(ws, message):
            seen.put((ws.compression, ws.headers.get('sec-websocket-extensions')))
            while not (isinstance(message, str) and message.startswith('result:')):
                ws.send(message)
                message = ws.recv(30)
            seen.put(message)
        sk.run(host='127.0.0.1', port=0)
        self.addCleanup(sk.stop)
        M = Microservice('page')
        M.app.route('/page')(lambda: BROWSER_PAGE % sk.port)       # raw: the page as text/html
        Service.start(self, M)
        profile = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, profile, True)
        chromium = subprocess.Popen(
            [self.CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
             '--no-first-run', '--disable-background-networking', '--disable-component-update',
             '--disable-sync', '--user-data-dir=' + profile, M.url + '/page'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def stop_chromium():
            try:
                os.killpg(chromium.pid, signal.SIGKILL)
            except OSError:
                pass
            chromium.wait(10)
        self.addCleanup(stop_chromium)
        deadline = time.monotonic() + 90
        results = []
        while len(results) < 2:
            try:
                results.append(seen.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                self.fail('no answer from chromium within 90 s (exit status %s)' % chromium.poll())
        compression, offer = results[0]
        self.assertEqual(compression, 'deflate')
        self.assertIn('permessage-deflate', offer)
        self.assertEqual(results[1], 'result:echoed;permessage-deflate; server_max_window_bits=12; '
                                     'client_max_window_bits=12')


class WebSocketProcessTest(unittest.TestCase):
    """The 0.3.7 tutorial's ways of running a server, in a real process, ended with a real
    SIGINT."""

    SCRIPT = '''
import sys, time
sys.path.insert(0, %r)
from mconnector import SocketServer
sk = SocketServer(__name__)

@sk.router('/hello')
def test(message):
    return 'ok:' + message

sk.run(port=0)
print(sk.port, flush=True)
if sys.argv[1] == 'blocking':           # as a script that runs an HTTP server after sk.run()
    try:
        while True:
            time.sleep(0.02)
    except KeyboardInterrupt:
        print('main interrupted', flush=True)
'''

    def run_and_interrupt(self, mode, signum=None):
        import signal
        # (SIGINT as in a terminal, even where these tests run as a background job)
        proc = subprocess.Popen([sys.executable, '-c', self.SCRIPT % HERE, mode], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            port = int(proc.stdout.readline())
            c = mconnector.SocketClient('127.0.0.1:%d' % port, '/hello')
            c.send('a')
            self.assertEqual(c.recv(timeout=5), 'ok:a')
            if mode == 'only-run':                      # the main thread has finished by now
                self.assertIsNone(proc.poll())
            got = []
            reader = threading.Thread(target=lambda: got.extend(c))   # a client waiting
            reader.start()
            proc.send_signal(signum or signal.SIGINT)
            out, err = proc.communicate(timeout=10)
            reader.join(5)
            self.assertEqual((got, c.close_code), ([], 1001))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertNotIn('Traceback', err)
        self.assertEqual(proc.returncode, 0, err)
        # No logging configured: still the start line, on the terminal.
        self.assertRegex(err, r'\A\S+ \S+ INFO websocket server __main__ on ws://127\.0\.0\.1:%d\n'
                         % port)
        return out

    def test_only_run_serves_until_ctrl_c(self):
        self.run_and_interrupt('only-run')

    def test_run_then_blocking_main(self):
        self.assertIn('main interrupted', self.run_and_interrupt('blocking'))

    def test_sigterm_closes_with_1001_and_exits_0(self):
        import signal
        for mode in ('only-run', 'blocking'):
            with self.subTest(mode=mode):
                self.assertNotIn('main interrupted', self.run_and_interrupt(mode, signal.SIGTERM))

    def test_ws_command_from_a_pipe(self):
        sk = mconnector.SocketServer('cli')
        sk.router('/hello/<name>')(lambda m, name: '%s says %s' % (name, m))
        sk.run(port=0)
        self.addCleanup(sk.stop)
        code = 'import sys, mconnector; sys.exit(mconnector._ws_command(sys.argv[1], 0.3))'
        proc = subprocess.run([sys.executable, '-c', code, 'ws://127.0.0.1:%d/hello/ann' % sk.port],
                              input='one\ntwo\n', capture_output=True, text=True, timeout=10, cwd=HERE)
        self.assertEqual((proc.returncode, proc.stdout), (0, 'ann says one\nann says two\n'), proc.stderr)
        proc = subprocess.run([sys.executable, '-c', code, 'ws://127.0.0.1:%d/nope' % sk.port],
                              input='', capture_output=True, text=True, timeout=10, cwd=HERE)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('404', proc.stderr)


# ==========================================================================================
# Pools
# ==========================================================================================

# Imported here rather than at the top so that this section merges on its own.


# Tasks for the process pools must be importable by name from a module.

def _timed_task(key, seq, pause):
    start = time.monotonic()
    if pause:
        time.sleep(pause)
    return key, seq, start, time.monotonic(), os.getpid()


def _kwargs_task(a, b=0, *, key=None, fn=None, f=None):
    return a, b, key, fn, f


def _failing_task(key, seq):
    if seq % 3 == 1:
        raise ValueError('task %s/%s fails' % (key, seq))
    return key, seq


class _InlineExecutor(concurrent.futures.Executor):
    """A real, if minimal, third-party Executor: runs each task inside submit()."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _drain(q, count, timeout=10.0):
    """Take `count` items from a queue.Queue or multiprocessing.Queue."""
    deadline = time.monotonic() + timeout
    return [q.get(timeout=max(0.0, deadline - time.monotonic())) for _ in range(count)]


def _per_key(pairs):
    """[(key, seq), ...] -> {key: [seq, ...]} in the order given."""
    out = {}
    for key, seq in pairs:
        out.setdefault(key, []).append(seq)
    return out


class _OrderProbe:
    """Records, for thread tasks, the order they ran in per key and any overlap in a key."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = set()
        self.ran = {}
        self.overlaps = []

    def task(self, key, seq, pause):
        with self.lock:
            if key in self.running:
                self.overlaps.append((key, seq))
            self.running.add(key)
        if pause:
            time.sleep(pause)
        with self.lock:
            self.running.discard(key)
            self.ran.setdefault(key, []).append(seq)
        return key, seq


def _workload(tasks, keys, max_pause, variant):
    rng = random.Random(variant)
    counters = {}
    out = []
    for _ in range(tasks):
        key = 'k%d' % rng.randrange(keys)
        seq = counters[key] = counters.get(key, -1) + 1
        pause = rng.random() * max_pause if rng.random() < 0.3 else 0
        out.append((key, seq, pause))
    return out


class ThreadPoolOrderTest(unittest.TestCase):
    def test_order_per_key_many_keys_random_durations(self):
        probe = _OrderProbe()
        out = queue.Queue()
        work = _workload(3000, 60, 0.0005, variant=1)
        with mconnector.DistributedThreads(out_queue=out, max_workers=8,
                                           max_watching=500) as pool:
            futures = [pool.submit_id(key, probe.task, key, seq, pause)
                       for key, seq, pause in work]
        self.assertEqual(probe.overlaps, [])
        expected = _per_key((key, seq) for key, seq, _ in work)
        self.assertEqual(probe.ran, expected)
        self.assertEqual([f.result() for f in futures], [(k, s) for k, s, _ in work])
        self.assertEqual(_per_key(out.get_nowait() for _ in range(len(work))), expected)
        self.assertTrue(out.empty())
        self.assertEqual(pool.pending, 0)
        self.assertEqual(pool.busy_keys, 0)

    def test_unkeyed_tasks_all_run(self):
        with mconnector.DistributedThreads(max_workers=4) as pool:
            futures = [pool.submit(pow, i, 2) for i in range(500)]
            futures.append(pool.submit_id(None, pow, 3, 3))
        self.assertEqual([f.result() for f in futures], [i * i for i in range(500)] + [27])

    def test_keyword_arguments_arrive(self):
        with mconnector.DistributedThreads() as pool:
            # Even those named like submit_id's own parameters.
            f1 = pool.submit_id('k', _kwargs_task, 1, b=2, key='K', fn='F', f='f')
            f2 = pool.submit(_kwargs_task, a=5, key=7)
        self.assertEqual(f1.result(), (1, 2, 'K', 'F', 'f'))
        self.assertEqual(f2.result(), (5, 0, 7, None, None))

    def test_exceptions_land_in_futures_and_out_queue_and_key_goes_on(self):
        out = queue.Queue()
        with mconnector.DistributedThreads(out_queue=out, max_workers=3) as pool:
            futures = [pool.submit_id(key, _failing_task, key, seq)
                       for seq in range(9) for key in ('a', 'b')]
        outcomes = [out.get_nowait() for _ in futures]
        for i, f in enumerate(futures):
            if (i // 2) % 3 == 1:
                self.assertIsInstance(f.exception(), ValueError)
            else:
                self.assertEqual(f.result(), (('a', 'b')[i % 2], i // 2))
        per_key = {}
        for item in outcomes:
            if isinstance(item, ValueError):
                key, seq = str(item).split()[1].split('/')
                per_key.setdefault(key, []).append(('error', int(seq)))
            else:
                per_key.setdefault(item[0], []).append(('ok', item[1]))
        expected = [('error' if s % 3 == 1 else 'ok', s) for s in range(9)]
        self.assertEqual(per_key, {'a': expected, 'b': expected})

    def test_keys_are_forgotten(self):
        with mconnector.DistributedThreads(max_workers=4, max_watching=0) as pool:
            for i in range(2000):
                pool.submit_id(('row', i), abs, -i)
        self.assertEqual(pool.busy_keys, 0)
        self.assertEqual(pool._queues, {})

    def test_unhashable_key(self):
        with mconnector.DistributedThreads() as pool:
            with self.assertRaises(TypeError):
                pool.submit_id(['a'], abs, 1)
            self.assertEqual(pool.pending, 0)


class PoolLifecycleTest(unittest.TestCase):
    def test_shutdown_waits_for_every_task(self):
        gate = threading.Event()
        pool = mconnector.DistributedThreads(max_workers=2)
        try:
            futures = [pool.submit_id(i % 3, gate.wait, 5) for i in range(12)]
            closer = threading.Thread(target=pool.shutdown)
            closer.start()
            closer.join(0.05)
            self.assertTrue(closer.is_alive(), 'shutdown returned with tasks pending')
            with self.assertRaises(mconnector.PoolClosed):
                pool.submit(abs, 1)
            gate.set()
            closer.join(5)
            self.assertFalse(closer.is_alive())
            self.assertTrue(all(f.done() and f.result() is True for f in futures))
            self.assertEqual(pool.pending, 0)
        finally:
            gate.set()
            pool.shutdown()

    def test_submit_after_shutdown_is_a_runtime_error(self):
        pool = mconnector.DistributedThreads()
        pool.shutdown()
        pool.shutdown()         # harmless
        with self.assertRaises(RuntimeError):
            pool.submit_id(1, abs, 1)

    def test_backpressure_blocks_and_releases(self):
        gate = threading.Event()
        with mconnector.DistributedThreads(max_workers=2, max_watching=3) as pool:
            try:
                for i in range(3):
                    pool.submit_id(i, gate.wait, 5)
                self.assertEqual(pool.pending, 3)
                fourth = []
                submitter = threading.Thread(
                    target=lambda: fourth.append(pool.submit_id('x', abs, -4)))
                submitter.start()
                submitter.join(0.05)
                self.assertTrue(submitter.is_alive(), 'submit did not block at max_watching')
                self.assertEqual(pool.pending, 3)
                gate.set()
                submitter.join(5)
                self.assertFalse(submitter.is_alive())
                self.assertEqual(fourth[0].result(5), 4)
            finally:
                gate.set()

    def test_blocked_submit_raises_when_the_pool_shuts_down(self):
        gate = threading.Event()
        pool = mconnector.DistributedThreads(max_workers=1, max_watching=1)
        try:
            pool.submit(gate.wait, 5)
            errors = []

            def submit():
                try:
                    pool.submit(abs, 1)
                except mconnector.PoolClosed as exc:
                    errors.append(exc)

            submitter = threading.Thread(target=submit)
            submitter.start()
            self.assertTrue(wait_for(lambda: pool._space_waiters == 1))
            pool.shutdown(wait=False)
            submitter.join(5)
            self.assertEqual(len(errors), 1)
        finally:
            gate.set()
            pool.shutdown()

    def test_cancel_futures_and_cancelled_tasks_keep_the_key_moving(self):
        gate = threading.Event()
        pool = mconnector.DistributedThreads(max_workers=2)
        try:
            first = pool.submit_id('k', gate.wait, 5)
            second = pool.submit_id('k', abs, -2)
            third = pool.submit_id('k', abs, -3)
            self.assertTrue(second.cancel())        # waiting behind its key: cancellable
            queued = [pool.submit_id('k', abs, -i) for i in range(5)]
            pool.shutdown(wait=False, cancel_futures=True)
            self.assertTrue(all(f.cancelled() for f in queued + [third]))
            gate.set()
            self.assertIs(first.result(5), True)
            pool.shutdown()
            self.assertEqual(pool.busy_keys, 0)
        finally:
            gate.set()
            pool.shutdown()

    def test_any_executor_even_an_inline_one(self):
        # A long queue behind one key drains without recursion, in order, in the settler.
        gate = threading.Event()
        ran = []
        with mconnector.KeyedExecutor(_InlineExecutor()) as pool:
            holder = threading.Thread(target=pool.submit_id, args=('k', gate.wait, 5))
            holder.start()
            self.assertTrue(wait_for(lambda: pool.pending == 1))
            futures = [pool.submit_id('k', ran.append, i) for i in range(3000)]
            gate.set()
            holder.join(5)
        self.assertEqual(ran, list(range(3000)))
        self.assertTrue(all(f.done() for f in futures))

    def test_executor_that_refuses_fails_the_futures(self):
        executor = concurrent.futures.ThreadPoolExecutor(1)
        executor.shutdown()
        out = queue.Queue()
        with mconnector.KeyedExecutor(executor, out_queue=out) as pool:
            futures = [pool.submit_id('k', abs, -i) for i in range(3)] + [pool.submit(abs, 1)]
        for f in futures:
            self.assertIsInstance(f.exception(), RuntimeError)
        self.assertEqual(out.qsize(), 4)

    def test_compat_arguments(self):
        with self.assertWarns(DeprecationWarning):
            pool = mconnector.DistributedThreads(worker=object, maxsize=5, delay=0.1)
        pool.shutdown()

    def test_import_stays_cheap(self):
        code = ('import sys, mconnector; '
                'print([m for m in ("concurrent.futures", "multiprocessing", "pickle") '
                'if m in sys.modules])')
        out = subprocess.run([sys.executable, '-c', code], cwd=HERE, check=True,
                             capture_output=True, text=True).stdout
        self.assertEqual(out.strip(), '[]')


class WorkerTest(unittest.TestCase):
    def test_worker_calls_f_survives_errors_and_stops(self):
        q = queue.Queue()
        seen = []

        def f(item):
            if item == 'bad':
                raise ValueError(item)
            seen.append(item)

        worker = mconnector.Worker(q, f)
        self.assertTrue(worker.daemon)
        with self.assertLogs('mconnector', 'ERROR'):
            worker.start()
            for item in (1, 'bad', 2):
                q.put(item)
            q.join()            # task_done() is called for every item
        worker.stop()
        worker.join(5)
        self.assertFalse(worker.is_alive())
        self.assertEqual(seen, [1, 2])


# The 0.3.7 README's chapter-8 data, and its flow with tiny durations.
CHAPTER8_POLL = (
    [(1, 'Nguyen'), (1, 'Minh'), (1, 'Tuan'), (2, 'Vu'), (3, 'Ai do khac'), (2, 'Kim'),
     (2, 'Oanh')] + [(4, str(i)) for i in range(1, 9)] + [(5, str(i)) for i in range(101, 106)]
    + [(6, 'Test watching')] + [(i, 'Test watching') for i in range(6, 23)])


def _chapter8_wait_on_b(b):
    time.sleep(random.random() * 0.002)
    return 'working on b=%s' % b


def _chapter8_wait_on_a(a):
    time.sleep(random.random() * 0.002)
    return 'working on a=%s' % a


def _exit_task(code):
    os._exit(code)


def _square(x):
    return x * x


class _DaskLikeExecutor:
    """Stands in for dask.distributed's Client, with its submit() signature: `key`,
    `pure` (identical calls share one result) and `workers` are its own options, and its
    shutdown() takes no argument."""

    def __init__(self):
        self.results = {}
        self.runs = 0
        self.closed = False

    def submit(self, fn, *args, key=None, pure=True, workers=None, **kwargs):
        future = concurrent.futures.Future()
        key = key or repr((fn, args, sorted(kwargs.items()))) if pure else object()
        if key not in self.results:
            self.runs += 1
            self.results[key] = fn(*args, **kwargs)
        future.set_result(self.results[key])
        return future

    def shutdown(self):
        raise AssertionError('this would stop the whole cluster')

    def close(self):
        self.closed = True


class PoolSurvivalTest(unittest.TestCase):
    """Pools over any executor keep their promises: arguments stay the task's, no task
    is merged or dropped, a dead worker process fails only its own task."""

    def test_task_arguments_never_become_the_executors_options(self):
        executor = _DaskLikeExecutor()
        pool = mconnector.KeyedExecutor(executor)
        with self.assertLogs('mconnector', 'DEBUG') as logs:
            runs = [pool.submit_id('row1', _kwargs_task, 'v') for _ in range(3)]
            keyed = [pool.submit_id('k', _kwargs_task, n, key='k') for n in range(2)]
            pool.shutdown()
            mconnector.log.debug('done')        # (assertLogs needs one line at least)
        self.assertEqual([f.result(5) for f in runs], [('v', 0, None, None, None)] * 3)
        self.assertEqual([f.result(5) for f in keyed], [(0, 0, 'k', None, None),
                                                        (1, 0, 'k', None, None)])
        self.assertEqual(executor.runs, 5)          # identical tasks are never merged
        self.assertTrue(executor.closed)
        self.assertFalse([line for line in logs.output if 'ERROR' in line], logs.output)

    def test_tasks_that_submit_to_their_own_full_pool_do_not_deadlock(self):
        pool = mconnector.DistributedThreads(max_workers=2, max_watching=2)
        children = []

        def parent(n):          # with both slots held by parents, a child finds none
            children.extend(pool.submit_id('child%d' % n, _square, n + i) for i in range(3))
            return n
        parents = [pool.submit_id('p%d' % n, parent, n) for n in range(2)]
        self.assertEqual([f.result(10) for f in parents], [0, 1])
        pool.shutdown()
        self.assertEqual(sorted(f.result(0) for f in children), [0, 1, 1, 4, 4, 9])

    SCRIPT = '''
import sys, time
sys.path.insert(0, %r)
import mconnector
pool = mconnector.DistributedThreads(max_workers=2)

def work(key, n):
    time.sleep(0.001)
    sys.stdout.write('%%d %%d\\n' %% (key, n))
for n in range(200):
    pool.submit_id(n %% 20, work, n %% 20, n)
pool.shutdown(wait=False)
'''

    def test_the_end_of_a_script_runs_every_task_after_shutdown_without_wait(self):
        out = subprocess.run([sys.executable, '-c', self.SCRIPT % HERE], capture_output=True,
                             text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = [tuple(map(int, line.split())) for line in out.stdout.splitlines()]
        self.assertEqual(len(lines), 200, out.stderr)
        for key in range(20):
            self.assertEqual([n for k, n in lines if k == key], list(range(key, 200, 20)))

    def test_the_cluster_example_keeps_order_or_says_what_it_skipped(self):
        out = subprocess.run([sys.executable, os.path.join(HERE, 'examples', 'cluster_pools.py')],
                             capture_output=True, text=True, timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = out.stdout.splitlines()
        self.assertEqual(len(lines), 2, out.stdout)
        for engine, line in zip(('dask.distributed', 'ray'), lines):
            self.assertTrue(line.startswith(engine + ': '), line)
            self.assertTrue(line.endswith('each key in order') or 'not installed' in line, line)

    def test_a_dead_worker_process_fails_its_task_and_later_ones_run(self):
        with mconnector.DistributedProcess(max_workers=2) as pool:
            self.assertEqual(pool.submit_id('a', _square, 3).result(30), 9)
            with self.assertLogs('mconnector', 'WARNING') as logs:
                dead = pool.submit_id('a', _exit_task, 1)
                with self.assertRaises(mconnector.WorkerLost) as caught:
                    dead.result(30)
                later = [pool.submit_id('a', _square, n) for n in range(4)]
                self.assertEqual([f.result(30) for f in later], [0, 1, 4, 9])
        self.assertIn('_exit_task', str(caught.exception))
        self.assertIn('fresh pool', '\n'.join(logs.output))


class ProcessPoolTest(unittest.TestCase):
    """One process pool for all of these: starting one costs time."""

    @classmethod
    def setUpClass(cls):
        cls.out = queue.Queue()
        cls.pool = mconnector.DistributedProcess(out_queue=cls.out, max_workers=4,
                                                 max_watching=200)

    @classmethod
    def tearDownClass(cls):
        cls.pool.shutdown()

    def setUp(self):
        self.assertEqual(self.pool.pending, 0)
        while not self.out.empty():
            self.out.get_nowait()

    def test_order_per_key_with_processes(self):
        work = _workload(2000, 40, 0.0005, variant=2)
        futures = [self.pool.submit_id(key, _timed_task, key, seq, pause)
                   for key, seq, pause in work]
        results = [f.result(30) for f in futures]
        runs = {}
        for key, seq, start, end, pid in results:
            runs.setdefault(key, []).append((seq, start, end))
        for key, run in runs.items():
            self.assertEqual([seq for seq, _, _ in run], list(range(len(run))))
            for (_, _, end), (seq, start, _) in zip(run, run[1:]):
                self.assertLessEqual(end, start, 'key %s task %d overlapped' % (key, seq))
        self.assertGreater(len({r[4] for r in results}), 1, 'only one process worked')
        outcomes = _drain(self.out, len(work))
        self.assertEqual(_per_key((r[0], r[1]) for r in outcomes),
                         _per_key((key, seq) for key, seq, _ in work))

    def test_kwargs_exceptions_and_unpicklable_tasks(self):
        ok = self.pool.submit_id('k', _kwargs_task, 1, b=2, key='K', f='f')
        bad = self.pool.submit_id('k', lambda: 1)
        self.assertIsInstance(bad.exception(0), mconnector.TaskNotPicklable)
        self.assertIn('lambda', str(bad.exception()))
        unpicklable_arg = self.pool.submit_id('k', _kwargs_task, threading.Lock())
        self.assertIsInstance(unpicklable_arg.exception(0), mconnector.TaskNotPicklable)
        failing = [self.pool.submit_id('k', _failing_task, 'k', seq) for seq in range(3)]
        self.assertEqual(ok.result(10), (1, 2, 'K', None, 'f'))
        self.assertEqual(failing[0].result(10), ('k', 0))
        self.assertIsInstance(failing[1].exception(10), ValueError)
        self.assertEqual(failing[2].result(10), ('k', 2))
        outcomes = _drain(self.out, 6)
        self.assertEqual(sum(isinstance(o, mconnector.TaskNotPicklable) for o in outcomes), 2)
        rest = [o for o in outcomes if not isinstance(o, mconnector.TaskNotPicklable)]
        self.assertEqual(rest[0], (1, 2, 'K', None, 'f'))
        self.assertEqual(rest[1:2], [('k', 0)])
        self.assertIsInstance(rest[2], ValueError)
        self.assertEqual(rest[3], ('k', 2))


class Chapter8ExampleTest(unittest.TestCase):
    """The 0.3.7 README's chapter-8 flow: every id's items come out in submission order."""

    def expected(self, prefix):
        return _per_key((i, '%s=%r' % (prefix, {'id': i, 'x': x})) for i, x in CHAPTER8_POLL)

    def by_id(self, lines):
        out = {}
        for line in lines:
            item = ast.literal_eval(line.split('=', 1)[1])   # the dict's repr, as printed
            out.setdefault(item['id'], []).append(line)
        return out

    def test_threads_with_worker(self):
        poll = [{'id': i, 'x': x} for i, x in CHAPTER8_POLL]
        thread_out_queue = queue.Queue()
        printed = []
        pool = mconnector.DistributedThreads(max_workers=4, max_watching=100,
                                             out_queue=thread_out_queue)
        for item in poll:
            pool.submit_id(item['id'], _chapter8_wait_on_a, item)
        t = mconnector.Worker(thread_out_queue, printed.append)
        t.daemon = True
        t.start()
        pool.shutdown()
        thread_out_queue.join()
        t.stop()
        t.join(5)
        self.assertEqual(self.by_id(printed), self.expected('working on a'))

    def test_processes_with_multiprocessing_queue(self):
        import multiprocessing
        poll = [{'id': i, 'x': x} for i, x in CHAPTER8_POLL]
        process_out_queue = multiprocessing.Queue()
        pool2 = mconnector.DistributedProcess(max_workers=4, max_watching=100,
                                              out_queue=process_out_queue)
        for item in poll:
            pool2.submit_id(item['id'], _chapter8_wait_on_b, item)
        pool2.shutdown()
        lines = _drain(process_out_queue, len(poll))
        process_out_queue.close()
        process_out_queue.join_thread()
        self.assertEqual(self.by_id(lines), self.expected('working on b'))


# ==========================================================================================
# Process supervision: serve --workers, reload on changes
# ==========================================================================================

PID_APP = '''\
import os
from mconnector import Microservice
M = Microservice('procs')

@M.typing('/pid')
def pid():
    return os.getpid()
'''

WORD_APP = '''\
from mconnector import Microservice
M = Microservice('words')

@M.typing('/word')
def word():
    return %r
'''


class ServeProcess:
    """`python -m mconnector serve ARGS` (or `command`) in a session of its own, stdout and
    stderr in files; the test's cleanup kills its whole process group (parent and
    children) if still there."""

    def __init__(self, test, folder, *args, env=None, command=None, cwd=HERE):
        import signal
        self.test = test
        self.signal = signal
        self.log_path = os.path.join(folder, 'serve.log')
        self.out_path = os.path.join(folder, 'serve.out')
        if command is None:
            command = [sys.executable, '-m', 'mconnector', 'serve'] + list(args)
        with open(self.log_path, 'wb') as log_file, open(self.out_path, 'wb') as out_file:
            # SIGINT as in a terminal, even when these tests run where it is ignored (a
            # background job of a non-interactive shell).
            self.proc = subprocess.Popen(
                command, cwd=cwd, stdout=out_file, stderr=log_file, start_new_session=True,
                env=dict(os.environ, MCONNECTOR_RELOAD_INTERVAL='0.05', **(env or {})),
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        test.addCleanup(self.kill)

    def kill(self):
        try:
            os.killpg(self.proc.pid, self.signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self, path=None):
        with open(path or self.log_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def url(self, timeout=5, scheme='http'):
        """The first `scheme` URL the process logged."""
        import re
        found = wait_for(lambda: re.search(scheme + r'://127\.0\.0\.1:\d+', self.output()),
                         timeout)
        self.test.assertTrue(found, 'no %s URL logged:\n%s' % (scheme, self.output()))
        return found.group(0)

    def terminate(self, timeout=5):
        """SIGTERM the parent: it must exit 0, in time."""
        self.proc.send_signal(self.signal.SIGTERM)
        self.test.assertEqual(self.proc.wait(timeout), 0, self.output())


def try_call(url, rule, timeout=2):
    """The result of one call over a new connection, or None if the call failed."""
    try:
        with Friend('procs', url, timeout=timeout, retries=0) as friend:
            return friend.send(rule)
    except mconnector.MConnectorError:
        return None


def process_gone(pid):
    """No such process, or only its zombie: an orphan's zombie waits for init to reap it,
    which some containers' init does slowly."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rpartition(')')[2].split()[0] == 'Z'
    except OSError:
        return False


class SupervisionTest(unittest.TestCase):
    def setUp(self):
        import tempfile
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = folder.name

    def write_app(self, text, name='app.py'):
        path = os.path.join(self.folder, name)
        with open(path, 'w') as f:
            f.write(text)
        # In the future, so that a rewrite within the same second is seen as a change.
        self.writes = getattr(self, 'writes', 0) + 1
        later = time.time() + 100 + self.writes
        os.utime(path, (later, later))
        return path

    def serve(self, *args, env=None):
        return ServeProcess(self, self.folder, self.app, '--host', '127.0.0.1', '--port', '0',
                            *args, env=env)

    def distinct_pids(self, serve, url, count):
        """Pids of the workers answering calls over new connections, once `count` are seen."""
        pids = set()
        self.assertTrue(wait_for(lambda: pids.add(try_call(url, '/pid')) or
                                 len(pids - {None}) >= count, 10), serve.output())
        return pids - {None}

    def test_a_workers_counters_file_is_whole_while_several_threads_write_it(self):
        # A scrape and the reporting thread of one worker write the same file at times.
        import tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        texts = [(b'# HELP m Help of writer %d.\n' % n) + b'm %d\n' % n * 2000 for n in range(4)]
        path = os.path.join(folder, '%d.prom' % os.getpid())
        stop = threading.Event()

        def write(text):
            while not stop.is_set():
                mconnector._write_metrics(folder, text)
        writers = [threading.Thread(target=write, args=(text,)) for text in texts]
        for writer in writers:
            writer.start()
        try:
            seen = set()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    with open(path, 'rb') as f:
                        seen.add(f.read())
                except FileNotFoundError:
                    pass
        finally:
            stop.set()
            for writer in writers:
                writer.join()
        self.assertTrue(seen)
        self.assertLessEqual(seen, set(texts))
        self.assertEqual([n for n in os.listdir(folder) if n.endswith('.tmp')], [])

    def test_one_scrape_of_a_service_of_workers_counts_them_all(self):
        import re
        import tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, folder, True)
        proc = ServeProcess(self, folder, 'examples/app1.py', '--host', '127.0.0.1', '--port',
                            '0', '--workers', '2')
        url = proc.url()
        def hello():
            try:
                with Friend('once', url, retries=0) as friend:    # a new connection each:
                    return friend.send('/helloworld', 'x')        # the kernel spreads them
            except mconnector.Unreachable:
                return None                 # the workers are still starting
        self.assertTrue(wait_for(hello, 10))
        for _ in range(19):
            self.assertEqual(hello(), 'Welcome x')

        def scrape():
            with Friend('ops', url) as ops:
                text = ops._call('GET', '/_mc/metrics', b'', None)
            calls = sum(value for key, value in metric_values(text).items()
                        if key.startswith('mconnector_requests_total{')
                        and 'rule="/helloworld"' in key)
            return calls, set(re.findall(r'worker="(\d+)"', text)), text
        self.assertTrue(wait_for(lambda: scrape()[:2][0] == 20 and len(scrape()[1]) == 2, 10),
                        scrape()[2][:2000])
        calls, workers, text = scrape()
        self.assertEqual(text.count('# TYPE mconnector_requests_total counter'), 1)
        proc.terminate()

    def test_a_signed_call_replayed_to_every_worker_runs_once(self):
        self.app = self.write_app(PID_APP.replace(
            "Microservice('procs')", "Microservice('procs', secretKey='k3y')"))
        serve = self.serve('--workers', '2', env={
            'MCONNECTOR_NONCE_STORE': os.path.join(self.folder, 'nonces.sqlite3')})
        url = serve.url()
        port = int(url.rpartition(':')[2])

        def signed_pid():
            try:
                with Friend('signed', url, secretKey='k3y', timeout=2, retries=0) as friend:
                    return friend.send('/pid')
            except mconnector.MConnectorError:
                return None
        pids = set()
        self.assertTrue(wait_for(lambda: pids.add(signed_pid()) or len(pids - {None}) >= 2,
                                 10), serve.output())
        request = signed_request('k3y', '/pid', b'{"args": []}')
        statuses = [status_of(raw_request(port, request)) for _ in range(20)]
        self.assertEqual(sorted(statuses), [200] + [401] * 19, serve.output())

    def test_the_metrics_folder_of_a_killed_supervisor_is_removed_by_the_next(self):
        import signal
        self.app = self.write_app(PID_APP)
        tmp = os.path.join(self.folder, 'tmp')
        os.mkdir(tmp)
        env = {'TMPDIR': tmp}
        killed = self.serve('--workers', '1', env=env)
        url = killed.url()
        self.assertTrue(wait_for(lambda: try_call(url, '/pid'), 10))  # the folder is there
        first = os.listdir(tmp)
        self.assertEqual([name.split('-')[2] for name in first], [str(killed.proc.pid)],
                         killed.output())
        killed.kill()                   # the whole group at once: nothing cleans up
        self.assertEqual(os.listdir(tmp), first)
        serve = self.serve('--workers', '1', env=env)
        url = serve.url()
        self.assertTrue(wait_for(lambda: try_call(url, '/pid'), 10))
        self.assertEqual([name.split('-')[2] for name in os.listdir(tmp)],
                         [str(serve.proc.pid)])
        serve.terminate()
        self.assertEqual(os.listdir(tmp), [])

    def test_workers_share_the_port_and_dead_ones_are_replaced(self):
        import signal
        self.app = self.write_app(PID_APP)
        modes = [('inherited socket', {'MCONNECTOR_REUSE_PORT': '0'})]
        if mconnector._reuse_port_wanted():
            modes.insert(0, ('SO_REUSEPORT', {}))
        for mode, env in modes:
            with self.subTest(mode):
                serve = self.serve('--workers', '2', env=env)
                url = serve.url()
                first = self.distinct_pids(serve, url, 2)
                victim = sorted(first)[0]
                os.kill(victim, signal.SIGKILL)
                seen = set()

                def replaced():
                    pid = try_call(url, '/pid')
                    seen.add(pid)
                    return pid is not None and pid not in first
                self.assertTrue(wait_for(replaced, 10), serve.output())
                self.assertIn('worker %d was killed by SIGKILL' % victim, serve.output())
                serve.terminate()
                everyone = (first | seen) - {None}
                self.assertTrue(wait_for(lambda: all(map(process_gone, everyone)), 5),
                                [pid for pid in everyone if not process_gone(pid)])

    def test_ctrl_c_lets_requests_in_flight_finish_then_everything_exits_0(self):
        import signal
        mark = os.path.join(self.folder, 'started')
        self.app = self.write_app(PID_APP + (
            '\n@M.typing("/slow")\n'
            'def slow():\n'
            '    import time\n'
            '    open(%r, "w").close()\n'
            '    deadline = time.monotonic() + 10\n'     # answered only once the stop began
            '    while M.health()["status"] != "stopping" and time.monotonic() < deadline:\n'
            '        time.sleep(0.01)\n'
            '    return "done" if time.monotonic() < deadline else "never stopped"\n' % mark))
        for args in (['--workers', '2'], ['--debug']):
            with self.subTest(args[0]):
                serve = self.serve(*args)
                url = serve.url()
                pids = self.distinct_pids(serve, url, 2 if '--workers' in args else 1)
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    slow = pool.submit(try_call, url, '/slow', 10)
                    self.assertTrue(wait_for(lambda: os.path.exists(mark), 5), serve.output())
                    # As a terminal does: SIGINT to the parent and its children at once;
                    # the parent then sends SIGTERM to children that are already stopping.
                    os.killpg(serve.proc.pid, signal.SIGINT)
                    self.assertEqual(slow.result(10), 'done', serve.output())
                self.assertEqual(serve.proc.wait(5), 0, serve.output())
                self.assertNotIn('Traceback', serve.output())
                self.assertNotIn('cut short', serve.output())
                self.assertTrue(wait_for(lambda: all(map(process_gone, pids)), 5))
                os.remove(mark)

    def test_workers_stop_when_their_parent_is_killed(self):
        self.app = self.write_app(PID_APP)
        serve = self.serve('--workers', '2')
        url = serve.url()
        pids = self.distinct_pids(serve, url, 2)
        serve.proc.kill()
        serve.proc.wait()
        self.assertTrue(wait_for(lambda: all(map(process_gone, pids)), 5), serve.output())
        self.assertIn('parent process %d is gone' % serve.proc.pid, serve.output())

    def test_workers_that_cannot_load_the_app_make_the_parent_give_up(self):
        self.app = self.write_app('import mconnector\nraise RuntimeError("no way to start")\n')
        serve = self.serve('--workers', '2')
        self.assertEqual(serve.proc.wait(10), 1)
        out = serve.output()
        self.assertIn('RuntimeError: no way to start', out)
        self.assertIn('giving up', out)

    def test_what_cannot_be_supervised_is_refused_clearly(self):
        self.app = self.write_app('from mconnector import SocketServer\nsk = SocketServer("s")\n')
        cases = [(['--workers', '2', '--debug'], 'add --no-reload'),
                 (['--workers', '0'], '1 or more'),
                 (['--workers', '2', '--port', '0'], 'websocket servers only'),
                 (['--debug', '--port', '0'], 'websocket servers only: add --no-reload')]
        for args, message in cases:
            out = subprocess.run([sys.executable, '-m', 'mconnector', 'serve', self.app] + args,
                                 cwd=HERE, capture_output=True, text=True, timeout=10)
            self.assertNotEqual(out.returncode, 0, args)
            self.assertIn(message, out.stderr, args)

    def test_debug_reloads_a_changed_app_on_the_same_port(self):
        self.app = self.write_app(WORD_APP % 'one')
        serve = self.serve('--debug')
        url = serve.url()
        self.assertEqual(try_call(url, '/word'), 'one', serve.output())
        self.write_app(WORD_APP % 'two')
        self.assertTrue(wait_for(lambda: try_call(url, '/word') == 'two', 10), serve.output())
        self.assertIn('app.py changed: reloading', serve.output())
        serve.terminate()

    def test_the_reloader_waits_for_a_fix_when_the_app_fails(self):
        self.app = self.write_app('from mconnector import Microservice\nM = Microservice(\n')
        serve = self.serve('--debug', '--no-reload')
        self.assertNotEqual(serve.proc.wait(10), 0)     # --no-reload: nobody waits for a fix
        serve = self.serve('--debug')
        url = serve.url()
        self.assertTrue(wait_for(lambda: 'waiting for a change' in serve.output(), 10),
                        serve.output())
        with Friend('early', url, retries=0) as friend, \
                self.assertRaises(mconnector.CallError) as caught:
            friend.send('/word')        # answered at once, not left hanging
        self.assertEqual(caught.exception.status, 503)
        self.assertIn('failed to start', str(caught.exception))
        self.write_app(WORD_APP % 'fixed')
        self.assertTrue(wait_for(lambda: try_call(url, '/word') == 'fixed', 10), serve.output())
        serve.terminate()

    def test_a_taken_port_fails_once_early(self):
        self.app = self.write_app(WORD_APP % 'never imported')
        with socket.socket() as taken:
            taken.bind(('127.0.0.1', 0))
            taken.listen()
            port = str(taken.getsockname()[1])
            for args in (['--debug'], ['--workers', '2']):
                out = subprocess.run(
                    [sys.executable, '-m', 'mconnector', 'serve', self.app, '--host',
                     '127.0.0.1', '--port', port] + args,
                    cwd=HERE, capture_output=True, text=True, timeout=10)
                self.assertEqual(out.returncode, 1, args)
                self.assertIn('Address already in use', out.stderr, args)
                self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)

    def test_children_import_the_module_of_their_parent(self):
        # The parent runs the file by its path, from elsewhere: its children still import
        # that very file (-m), as only an import can take its bytecode from the cache.
        self.app = self.write_app('import mconnector\nM = mconnector.Microservice("m")\n'
                                  '@M.typing("/how")\ndef how():\n'
                                  '    return "%s %s" % (getattr(mconnector.__spec__, "name", None),'
                                  ' mconnector.__file__)\n')
        for args in (['--workers', '1'], ['--debug']):
            with self.subTest(args[0]):
                serve = ServeProcess(
                    self, self.folder, cwd=self.folder, env={'PYTHONPATH': ''},
                    command=[sys.executable, os.path.join(HERE, 'mconnector.py'), 'serve',
                             self.app, '--host', '127.0.0.1', '--port', '0'] + args)
                url = serve.url()
                self.assertTrue(wait_for(lambda: try_call(url, '/how'), 10), serve.output())
                self.assertEqual(try_call(url, '/how'),
                                 'mconnector ' + os.path.join(HERE, 'mconnector.py'))
                serve.terminate()

    def test_an_installed_module_is_found_without_pythonpath(self):
        from unittest import mock
        here = os.path.dirname(os.path.abspath(mconnector.__file__))
        with mock.patch('sysconfig.get_path', return_value=here), \
                mock.patch.dict(os.environ, {'PYTHONPATH': 'elsewhere'}):
            command, env = mconnector._module_command(['serve', 'app'])
        self.assertEqual(command[-4:], ['-m', 'mconnector', 'serve', 'app'])
        self.assertEqual(env['PYTHONPATH'], 'elsewhere')    # site-packages not put before it

    def test_run_debug_in_a_script_reloads_it(self):
        script = self.write_app(
            'from mconnector import Microservice\n'
            'M = Microservice("script", host="127.0.0.1", port=0)\n'
            '@M.typing("/word")\n'
            'def word():\n'
            '    return "one"\n'
            'if __name__ == "__main__":\n'
            '    M.run(debug=True)\n'
            '    print("after run", flush=True)\n', name='script.py')
        run = ServeProcess(self, self.folder, command=[sys.executable, script],
                           cwd=self.folder, env={'PYTHONPATH': HERE})
        url = run.url()
        self.assertEqual(try_call(url, '/word'), 'one', run.output())
        with open(script) as f:
            text = f.read()
        self.write_app(text.replace('"one"', '"two"'), name='script.py')
        self.assertTrue(wait_for(lambda: try_call(url, '/word') == 'two', 10), run.output())
        run.terminate()
        self.assertEqual(run.output(run.out_path), 'after run\n')     # in the last child only

    def test_the_command_that_starts_the_program_again(self):
        import types
        from unittest import mock
        main = types.ModuleType('__main__')
        main.__spec__ = types.SimpleNamespace(name='pkg.__main__')
        with mock.patch.dict(sys.modules, {'__main__': main}), \
                mock.patch.object(sys, 'argv', ['/x/pkg/__main__.py', 'a', '-b']):
            command = mconnector._script_command()
        self.assertEqual(command[0], sys.executable)
        self.assertEqual(command[-4:], ['-m', 'pkg', 'a', '-b'])
        main.__spec__ = None
        with mock.patch.dict(sys.modules, {'__main__': main}), \
                mock.patch.object(sys, 'argv', [os.path.relpath(__file__), 'a']):
            self.assertEqual(mconnector._script_command()[-2:], [os.path.abspath(__file__), 'a'])
        with mock.patch.dict(sys.modules, {'__main__': main}), \
                mock.patch.object(sys, 'argv', ['-c']):
            self.assertIsNone(mconnector._script_command())

    def test_start_never_reloads(self):
        self.assertFalse(mconnector._reload_wanted(False, None))
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(
            mconnector._reload_wanted(True, None)))
        thread.start()
        thread.join()
        self.assertEqual(outcome, [False])
        M = Microservice('quiet', debug=True)
        M.start(port=0, host='127.0.0.1')
        self.addCleanup(M.stop)
        self.assertNotIn(mconnector._RELOAD_FD_ENV, os.environ)


if __name__ == '__main__':
    unittest.main()
