"""The listener of the 0.3.7 tutorial (chapters 3 to 6), its code as the tutorial shows it
with only the imports changed: run it, then tutorial_sender.py.

    python examples/tutorial_listener.py
"""
import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import Microservice, timeit

Micro = Microservice(__name__)


@Micro.typing('/helloworld') # this is the rule/topic he knows. If he don't know, he cannot reply
@Micro.reply # he is replying
def helloworld(name): # this is the process in side his head
    return 'Welcome %s' % (name) # the answer

# run a normal function in python
print('one cat here')

# return string
@Micro.typing('/str')
@Micro.reply
def string1(a,key):
    return a+'-'+key

# return multiple string
@Micro.typing('/str2')
@Micro.reply
def string2(a, key):
    return a, key, a+'-'+key

# return Integer and float
@Micro.typing('/int')
@Micro.reply
def int1(a, key):
    return a+key

@Micro.typing('/float')
@Micro.reply
def float2(a, key):
    return a+key


@Micro.typing('/int3')
@Micro.reply
def int3(a, key):
    return a+key, key*key, a*a

# test return list and dict
@Micro.typing('/list')
@Micro.reply
def list1(a, key):
    a.extend(key)
    return a


@Micro.typing('/dict')
@Micro.reply
def dict1(a, key):
    key['dict'] = a
    return key


@Micro.typing('/list3')
@Micro.reply
def list3(a, key):
    key.append('other value')
    c = None
    return a, key, c

# return None, class Object
@Micro.typing('/None')
@Micro.reply
def TestNoneValue(a, key):
    key.append('Do something in the server')

class testservice(object):
    name = 'test'
    Purpose = 'For test only'
    empty = None
    def __init__(self, value):
        self.value = value

    def onemethod(self):
        pass


@Micro.typing('/class',token='123456')
@Micro.reply
def TestClass(a, key):
    t = testservice(a)
    return t


@Micro.typing('/class2', token='123456')
@Micro.reply
def TestClass2(a, key):
    t = testservice(key)
    return t, a, None

@Micro.typing('/class3', token='123456')
@Micro.reply
def TestClass3(a, key):
    x = testservice(key)
    y = testservice(a)
    z = [y,x]
    return x, y, z

# in server side
@Micro.typing('/json')
@Micro.json
@timeit
def TestReceiveJson(a=1, b='string',c=None):
    return {'1':a,'2':b,'3':c}


# for async request (only apply to sanic)
@Micro.route('/json1', methods=['GET','POST'])
@Micro.async_json
async def TestReceiveJson2(a=None):
    return a


if __name__ == '__main__':
    Micro.run()
