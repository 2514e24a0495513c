"""A listener and its senders with type annotations, as `mypy --strict` checks them.

    python examples/typed_service.py

Serves on a free port, calls itself with Friend, AsyncFriend and the test client, prints
what came back, and stops.  The mode decorators keep each function's signature for type
checkers: a call of `add` with a str, or its result used as a str, is reported.
"""
import asyncio
from typing import Dict, List, Optional

import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import (AsyncFriend, DistributedThreads, Friend, Microservice, RemoteError,
                        request)

M = Microservice('typed', host='127.0.0.1', port=0, trusted_proxies=['127.0.0.1'])


@M.typing('/add', methods=['GET', 'POST'])
@M.reply
def add(a: int, b: int = 1) -> int:
    return a + b


@M.typing('/who')
@M.dict
async def who() -> Dict[str, Optional[str]]:
    await asyncio.sleep(0)
    return {'client': request.client, 'rule': request.rule,
            'user': request.headers.get('x-user')}


@M.app.route('/page/<name>')
def page(name: str, q: str = 'none') -> str:
    return '<b>%s %s</b>' % (name, q)


def local_calls() -> int:
    # The decorated functions are still plain functions for local callers.
    return add(2, b=3)


async def async_calls(url: str) -> List[int]:
    async with AsyncFriend('typed-async', url, timeout=5.0) as friend:
        answers = await asyncio.gather(*(friend.send('/add', n) for n in range(3)))
        return [int(answer) for answer in answers]


def main() -> None:
    with M:
        url = M.url
        with Friend('typed', url, headers={'X-User': 'ann'}) as friend:
            total: int = friend.send('/add', 40, b=2)
            print('add:', total, '| who:', friend.json('/who'))
            try:
                friend.send('/add', 'text')
            except RemoteError as exc:
                print('raised:', exc.type)
        print('async:', asyncio.run(async_calls(url)))
    with M.test_client() as client:
        print('in process:', client.send('/add', 1), local_calls())
    with DistributedThreads(max_workers=2) as pool:
        future = pool.submit_id('key', add, 5, b=6)
        print('pool:', future.result())


if __name__ == '__main__':
    main()
