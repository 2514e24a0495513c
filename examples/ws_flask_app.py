"""The 0.3.7 tutorial's second websocket example (chapter 7): a websocket server beside an
HTTP app.

    python examples/ws_flask_app.py     # ws://127.0.0.1:8765/hello and http://127.0.0.1:5000/

sk.run() returns at once; app.run() then blocks in the main thread.  Ctrl+C stops both.
"""

import time

import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import SocketServer, Microservice

sk = SocketServer(__name__)
app = Microservice('Flask_app').app


@app.route('/')
def helloworld():
    time.sleep(2)
    return 'Sleep 2s before response'


@sk.router('/hello')
def test(message):
    print(message)
    return 'ok:' + message


def socket_runner():
    sk.run()


def main():
    socket_runner()
    print('start web framework')
    app.run()


if __name__ == '__main__':
    main()
