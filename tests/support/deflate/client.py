"""A sans-I/O `websockets` client on a raw socket, so the bytes on the wire
can be counted: `client.py <host:port> <path> <token> <deflate:0|1> <n>`.
Sends one text message of <n> repetitive characters, waits for its echo,
and prints one JSON line: the 101's status and extensions header, whether
the echo matched, and the bytes read from the socket after the 101."""
import json
import socket
import sys

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

addr, path, token, deflate, n = sys.argv[1:6]
host, port = addr.rsplit(":", 1)
sock = socket.create_connection((host, int(port)), timeout=10)
extensions = [ClientPerMessageDeflateFactory()] if deflate == "1" else None
proto = ClientProtocol(parse_uri(f"ws://{addr}{path}"), extensions=extensions)
request = proto.connect()
request.headers["Authorization"] = f"Bearer {token}"
proto.send_request(request)
sock.sendall(b"".join(proto.data_to_send()))

out = {"status": None, "extensions": None, "echoed": False, "wire_bytes": 0, "hello": None}
message = ("chat " * (int(n) // 5 + 1))[: int(n)]
after_handshake = False
sent = False
done = False
while not done:
    data = sock.recv(65536)
    if not data:
        break
    if after_handshake:
        out["wire_bytes"] += len(data)
    proto.receive_data(data)
    for event in proto.events_received():
        if isinstance(event, Response):
            out["status"] = event.status_code
            out["extensions"] = event.headers.get("Sec-WebSocket-Extensions")
            if event.status_code != 101:
                done = True
                break
            after_handshake = True
            # Bytes pipelined behind the 101 in the same read (none here:
            # the runtime only speaks when spoken to).
        elif event.opcode == Opcode.TEXT and b'"type":"portcullis.hello"' in event.data:
            # The gateway's own first frame (SPEC §9, `portcullis=v1` in
            # the path): whether it arrived compressed (RSV1) is recorded.
            out["hello"] = {"text": event.data.decode(), "rsv1": event.rsv1}
        elif event.opcode == Opcode.TEXT:
            out["echoed"] = event.data.decode() == message
            done = True
    if after_handshake and not sent:
        proto.send_text(message.encode())
        sock.sendall(b"".join(proto.data_to_send()))
        sent = True
    if proto.handshake_exc is not None:
        out["error"] = str(proto.handshake_exc)
        done = True
if out["status"] == 101:
    # Close cleanly and wait for the gateway's answer and the end of TCP.
    proto.send_close(1000)
    sock.sendall(b"".join(proto.data_to_send()))
    while data := sock.recv(65536):
        proto.receive_data(data)
sock.close()
print(json.dumps(out), flush=True)
