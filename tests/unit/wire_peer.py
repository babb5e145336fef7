"""A toy backup target that speaks the remote protocol on stdin/stdout: the other process
of the pipe tests in test_wire.py (as ``blockguard serve`` is ssh's).

Usage: ``python wire_peer.py [VERSION ...]`` (the protocol versions it speaks; default the
real ones). Requests: ``echo`` answers its args and payload; ``reverse`` the payload
reversed; ``read`` a payload of ``args["size"]`` bytes of ``args["byte"]`` (as a pack is
fetched); ``fill`` is refused with PoolSpaceLow; ``die`` writes half a frame and exits
(a target killed mid-answer). A version mismatch exits 3 with the error on stderr.
"""

from __future__ import annotations

import os
import sys

from blockguard.errors import PoolSpaceLow, WireVersionMismatch
from blockguard.storage.remote.channel import PROTOCOL_VERSIONS, Channel
from blockguard.storage.remote.wire import Frame, FrameKind, encode_frame


def main(argv: list[str]) -> int:
    versions = [int(v) for v in argv] or list(PROTOCOL_VERSIONS)
    channel = Channel(sys.stdin.buffer, sys.stdout.buffer, peer="client")
    try:
        channel.answer_greeting(versions)
    except WireVersionMismatch as exc:
        print(exc, file=sys.stderr)
        return 3
    while (request := channel.next_request()) is not None:
        if request.op == "echo":
            channel.reply(request, {"echo": dict(request.args)}, request.payload)
        elif request.op == "reverse":
            channel.reply(request, {}, request.payload[::-1])
        elif request.op == "read":
            size, byte = int(request.args["size"]), int(request.args["byte"])
            channel.reply(request, {"size": size}, bytes([byte]) * size)
        elif request.op == "fill":
            channel.refuse(
                request, PoolSpaceLow(pool="remote", free=0, needed=len(request.payload))
            )
        elif request.op == "die":
            whole = encode_frame(Frame(FrameKind.RESPONSE, request.request_id, {}, b"x" * 100))
            sys.stdout.buffer.write(whole[: len(whole) // 2])
            sys.stdout.buffer.flush()
            os._exit(9)
    channel.bye()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
