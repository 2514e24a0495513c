"""The sender of the 0.3.7 tutorial (chapters 3 to 6), its code as the tutorial shows it with
only the imports changed; start tutorial_listener.py first.

    python examples/tutorial_sender.py
"""
import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import Friend

aFriend= Friend('Corgi', 'http://0.0.0.0:5000') # this is: you're finding friend in your head.
# You can call him with a cute name like 'Puppy','Teddy' or 'Corgi'.
# But you must always remember his real-name is 'http://0.0.0.0:5000' to know actually who he is

message = aFriend.send('/helloworld','Mr. Close friend') # then you can send him a message


# the class of chapter 6, which its sender uses too
class testservice(object):
    name = 'test'
    Purpose = 'For test only'
    empty = None
    def __init__(self, value):
        self.value = value

    def onemethod(self):
        pass


print(
    """##############################
    Test return string
    """)
aFriend= Friend('app1', 'http://localhost:5000')
print('Test: return a simple string')
x = aFriend.send('/str', 'A variable value', key='A keyword variable value')
print('x=', x, type(x))
print('==========================')
print('Test: return multiple string')
x, y, z = aFriend.send('/str2', 'A variable value',
                key='A keyword variable value')
print('x=' ,x, type(x))
print('y=', y, type(y))
print('z=', z, type(z))

print(
    """##############################
    Test return a int, float
    """)
aFriend= Friend('app1', 'http://localhost:5000')
print('Test: return a simple Value')
x = aFriend.send('/int', 2018, key=312)
print('x=', x, type(x))
print('==========================')
print('Test: return a simple Value')
x = aFriend.send('/float', 2.018, key=3.12)
print('x=', x, type(x))
print('==========================')
print('Test: return multiple Value')
x, y, z = aFriend.send('/int3', 3.1427,
                    key=1000000000)
print('x=', x, type(x))
print('y=', y, type(y))
print('z=', z, type(z))

print(
    """##############################
    Test return a list, dict
    """)
aFriend= Friend('app1', 'http://localhost:5000')
print('Test: return a simple Value')
x = aFriend.send('/list', [12,34,45], key=['abc','zyz'])
print('x=', x, type(x))
print('==========================')
print('Test: return a simple Value')
x = aFriend.send('/dict', {'keyword':['anything']}, key={'int':20,'str':'adfafsa','float':0.2323})
print('x=', x, type(x))
print('==========================')
print('Test: return multiple Value')
x, y, z = aFriend.send('/list3', {'keyword': ['anything']},
                    key=['abc', 'zyz'])
print('x=', x, type(x))
print('y=', y, type(y))
print('z=', z, type(z))

print(
"""##############################
Test return NoneType, Class, use of Token
""")
aFriend= Friend('app1', 'http://localhost:5000')
print('Test: return a simple Value')
x = aFriend.send('/None', [12, 34, 45], key=['abc', 'zyz'])
print('x=', x, type(x))
print('==========================')
print('Test: return a simple Value with token')
aFriend.setRule('/class', token='123456')
x = aFriend.send('/class', {'keyword': ['anything']},
            key={'int': 20, 'str': 'adfafsa', 'float': 0.2323})
print('x=', x, type(x))
print('==========================')
print('Test: return multiple Value')
aFriend.setRule('/class2', token='123456')
x,y,z = aFriend.send('/class2', {'keyword': ['anything']},
            key={'int': 20, 'str': 'adfafsa', 'float': 0.2323})
print('x=', x, type(x))
print('y=', y, type(y))
print('z=', z, type(z))

# Test send class and list of class object
print('\n Test: send class and list of class object')
aFriend.setRule('/class3', token='123456')
t1 = testservice('value1')
t2 = testservice('value2')
x, y, z = aFriend.send('/class3', [t1,t2],
                    key={'t1': t1, 't2': t2, 'list': [t1, t2]})
print('x=', x, type(x))
print('y=', y, type(y))
print('z=', z, type(z))

# in client side
print('=================Response json===============')
x = aFriend.json('/json', a=12,b='This is a text',c={'dict':'a dict'})
print('Synchonous POST:', x)
y = aFriend.json('/json1', method='GET' , a={'dict': 'a only dict'})
print('Asynchonous GET:', y)
z = aFriend.json('/json1', a={'dict': 'a only dict'})
print('Asynchonous POST:', z)
