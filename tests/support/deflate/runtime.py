"""An echo runtime on 127.0.0.1:0 built on the `websockets` library, which
negotiates permessage-deflate (RFC 7692) by default (`--no-deflate`: it
declines every offer). Prints its port, then for every connection a JSON
line with the Sec-WebSocket-Extensions request header it received."""
import asyncio
import json
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    offer = ws.request.headers.get("Sec-WebSocket-Extensions")
    print(json.dumps({"offer": offer}), flush=True)
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def main():
    compression = None if "--no-deflate" in sys.argv[1:] else "deflate"
    async with serve(
        echo, "127.0.0.1", 0, max_size=None, compression=compression
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Event().wait()


asyncio.run(main())
