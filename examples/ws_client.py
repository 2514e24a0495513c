"""The 0.3.7 tutorial's websocket client example (chapter 7), with mconnector's SocketClient
in place of the websockets package: no asyncio needed, the connection is a plain object.

    python examples/ws_server.py &      # or any server with a /hello route
    python examples/ws_client.py

Type names; the answer 'close' (or an empty line, or Ctrl+D) ends the conversation.
"""

import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import SocketClient


def hello():
    with SocketClient('localhost:8765', '/hello') as websocket:
        name = input("What's your name? ")
        websocket.send(name)
        print(f"> {name}")
        greeting = websocket.recv()
        print(f"< {greeting}")
        while greeting != 'close':
            try:
                name = input("What's your name? ")
            except EOFError:
                break
            if not name:
                break
            websocket.send(name)
            greeting = websocket.recv()
            print(f"< {greeting}")


if __name__ == '__main__':
    hello()
