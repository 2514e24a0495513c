"""Tests for mconnector: real listeners on loopback (port 0), real senders, real bytes.

Run with:  python -m unittest -v test_mconnector
"""

import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import unittest

import mconnector


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
# Values, HTTP, listener, sender, command line (issue 2)
# ==========================================================================================

# (core tests)


# ==========================================================================================
# WebSocket (issue 4)
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
        req = WS._ws_check_request(self.request(Origin='http://a'))
        self.assertEqual((req.path, req.query, req.origin), ('/chat', 'x=1', 'http://a'))
        self.assertIn(b'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n', WS._ws_accept_response(req))

    def test_refusals(self):
        for headers, status in (({'Upgrade': None}, 400), ({'Connection': 'close'}, 400),
                                ({'Sec-WebSocket-Key': 'short'}, 400), ({'Host': None}, 400),
                                ({'Sec-WebSocket-Version': '8'}, 426)):
            with self.assertRaises(mconnector.HandshakeError, msg=headers) as cm:
                WS._ws_check_request(self.request(**headers))
            self.assertEqual(cm.exception.status, status)
        self.assertIn(b'Sec-WebSocket-Version: 13', WS._ws_error_response(cm.exception))
        with self.assertRaises(mconnector.HandshakeError) as cm:
            WS._ws_check_request(self.request(Origin='http://evil'), origins=['http://good'])
        self.assertEqual(cm.exception.status, 403)
        with self.assertRaises(mconnector.HandshakeError) as cm:
            WS._ws_check_request(b'POST / HTTP/1.1\r\nHost: h\r\n\r\n')
        self.assertEqual(cm.exception.status, 400)

    def test_subprotocol_is_the_servers_first_choice_that_was_offered(self):
        req = WS._ws_check_request(self.request(**{'Sec-WebSocket-Protocol': 'b, c'}), ['a', 'c', 'b'])
        self.assertEqual(req.subprotocol, 'c')
        self.assertIn(b'Sec-WebSocket-Protocol: c\r\n', WS._ws_accept_response(req))
        self.assertIsNone(WS._ws_check_request(self.request(), ['a']).subprotocol)

    def test_client_checks_the_answer(self):
        ok = ('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
              'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n').encode()
        self.assertIsNone(WS._ws_check_response(ok, self.KEY, '/x'))
        with self.assertRaises(mconnector.HandshakeError):
            WS._ws_check_response(ok.replace(b's3p', b'xxx'), self.KEY, '/x')
        with self.assertRaises(mconnector.HandshakeError) as cm:
            WS._ws_check_response(b'HTTP/1.1 404 Not Found\r\n\r\n', self.KEY, '/x?q=1')
        self.assertEqual((cm.exception.status, cm.exception.path), (404, '/x'))
        self.assertIn('/x', str(cm.exception))


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


def raw_handshake(port, path='/echo', extra=b''):
    """Open a raw socket and do the opening handshake by hand; return (sock, rest of bytes)."""
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

        @sk.router('/hello')                            # the seed's example
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

        @sk.render('/render')                           # the seed's render style, unchanged
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

    def test_seed_router_and_exit(self):
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

    def test_async_render_as_in_the_seed(self):
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


class WebSocketProcessTest(unittest.TestCase):
    """The seed's ways of running a server, in a real process, ended with a real SIGINT."""

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

    def run_and_interrupt(self, mode):
        import signal
        proc = subprocess.Popen([sys.executable, '-c', self.SCRIPT % HERE, mode], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
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
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
            reader.join(5)
            self.assertEqual((got, c.close_code), ([], 1001))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertNotIn('Traceback', err)
        self.assertEqual(proc.returncode, 0, err)
        return out

    def test_only_run_serves_until_ctrl_c(self):
        self.run_and_interrupt('only-run')

    def test_run_then_blocking_main(self):
        self.assertIn('main interrupted', self.run_and_interrupt('blocking'))

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
# Pools (issue 3)
# ==========================================================================================

# (pool tests)


if __name__ == '__main__':
    unittest.main()
