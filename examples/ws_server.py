"""The 0.3.7 tutorial's first websocket example (chapter 7): a websocket server alone.

    python examples/ws_server.py        # ws://127.0.0.1:8765/hello, Ctrl+C stops it

sk.run() serves in a background thread and returns; that thread keeps the script alive
until Ctrl+C, which closes the connections (1001) and exits without a traceback.
"""

import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import SocketServer

sk = SocketServer(__name__)


@sk.router('/hello')
def test(message):
    print(message)
    return 'ok:' + message


def main():
    sk.run()
    # you can put a flask server here
    # Socket Server run in a seperate threads, not affect flask server


if __name__ == '__main__':
    main()
