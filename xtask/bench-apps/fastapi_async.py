"""FastAPI with `async def` endpoints that do their CPU work inside the event loop: while one
request burns, nothing else in this worker moves, and the connections it has accepted wait
(`cargo xtask bench peers`)."""

import asyncio
import os

from fastapi import FastAPI, Response

import benchcommon

benchcommon.started()

app = FastAPI()


@app.get("/")
async def root(response: Response, burn_ms: int = 0, delay_ms: int = 0):
    if burn_ms:
        benchcommon.burn(burn_ms)
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000.0)
    response.headers["X-Pid"] = benchcommon.pid()
    return {"pid": os.getpid(), "burn_ms": burn_ms, "delay_ms": delay_ms}
