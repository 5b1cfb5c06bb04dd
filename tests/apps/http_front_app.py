"""The app behind corral's HTTP front in tests/http_front.rs: a real FastAPI app under
`uvicorn --proxy-headers --forwarded-allow-ips=127.0.0.1`, as a user would run it."""

import asyncio
import hashlib
import os

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/whoami")
async def whoami(request: Request):
    return {
        "scheme": request.url.scheme,
        "url": str(request.url),
        "client": request.client.host if request.client else None,
        "x_forwarded_for": request.headers.get("x-forwarded-for"),
        "x_forwarded_host": request.headers.get("x-forwarded-host"),
        "forwarded": request.headers.get("forwarded"),
        "host": request.headers.get("host"),
        "http_version": request.scope.get("http_version"),
        "pid": os.getpid(),
    }


@app.websocket("/ws")
async def echo(ws: WebSocket):
    await ws.accept()
    try:
        while True:
            await ws.send_text(await ws.receive_text())
    except WebSocketDisconnect:
        pass


@app.get("/sse")
async def sse(release: str):
    """One event, then the next only once the test has created the file `release` (so the
    first can only have reached the client if nothing buffered the stream)."""

    async def events():
        yield "data: first\n\n"
        while not os.path.exists(release):
            await asyncio.sleep(0.05)
        yield "data: second\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/upload")
async def upload(request: Request):
    h = hashlib.sha256()
    n = 0
    async for chunk in request.stream():
        h.update(chunk)
        n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


CHUNK = bytes(range(256)) * 256  # 64 KiB


@app.get("/download")
async def download(mib: int):
    async def body():
        for _ in range(mib * 16):
            yield CHUNK

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"content-length": str(mib * 1024 * 1024)},
    )


@app.get("/slow")
async def slow(seconds: float):
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/die")
async def die():
    """The worker exits without answering: the front has no response to pass on."""
    os._exit(3)
