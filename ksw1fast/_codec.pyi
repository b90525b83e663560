# The compiled framing has exactly the API of its pure-Python twin.
from ksw1fast.protocol.frames import FrameParser as FrameParser
from ksw1fast.protocol.frames import encode_frame as encode_frame
from ksw1fast.protocol.frames import pack_header as pack_header
