from mconnector import Microservice

Micro = Microservice(__name__)

@Micro.typing('/helloworld')
@Micro.reply
def helloworld(name):
    return 'Welcome %s' % (name)

if __name__ == '__main__':
    Micro.run()
