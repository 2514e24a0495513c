"""Wrong calls that a type checker must report: `.ci/run` runs mypy --strict on this file
and checks that each line with a "wrong:" comment gets an error that says what follows."""
import asyncio

from mconnector import AsyncFriend, DistributedThreads, Friend, Microservice, request

M = Microservice('wrong')


@M.typing('/add')
@M.reply
def add(a: int, b: int = 1) -> int:
    return a + b


@M.typing('/later')
@M.json
async def later(n: int) -> str:
    await asyncio.sleep(0)
    return str(n)


add('one')                                          # wrong: "add" has incompatible type "str"
text: str = add(1)                                  # wrong: Incompatible types in assignment
add(1, c=2)                                         # wrong: Unexpected keyword argument "c"
number: int = asyncio.run(later(1))                 # wrong: Incompatible types in assignment
Friend('f', 'http://127.0.0.1:5000', timeout='slow')     # wrong: Argument "timeout" to "Friend"
AsyncFriend('f', 'http://127.0.0.1:5000', retries=None)  # wrong: Argument "retries" to "AsyncFriend"
M.typing(5)                                         # wrong: Argument 1 to "typing" of "Microservice"
DistributedThreads().submit(add, 'x')               # wrong: Argument 2 to "submit" of "KeyedExecutor"
left: float = request.time_left                     # wrong: Incompatible types in assignment
