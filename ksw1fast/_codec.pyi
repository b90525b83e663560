# The compiled codec has exactly the API of its pure-Python twin.
from ksw1fast.codec import *  # noqa: F401,F403
from ksw1fast.codec import FrameParser as FrameParser
