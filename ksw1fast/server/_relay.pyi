# The compiled relay has exactly the API of its pure-Python twin.
from ksw1fast.server.relay import GatewayListener as GatewayListener
from ksw1fast.server.relay import Stream as Stream
from ksw1fast.server.relay import TcpStream as TcpStream
from ksw1fast.server.relay import UdpStream as UdpStream
