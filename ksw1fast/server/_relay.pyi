# The compiled relay has exactly the API of its pure-Python twin.
from ksw1fast.server.relay import *  # noqa: F401,F403
from ksw1fast.server.relay import GatewayListener as GatewayListener, Stream as Stream, \
    TcpStream as TcpStream, UdpStream as UdpStream
