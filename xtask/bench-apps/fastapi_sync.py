"""FastAPI with sync (`def`) endpoints: Starlette runs each request in its threadpool, so CPU
work contends for the GIL with the event loop and the other requests (`cargo xtask bench
peers`)."""

import os
import time

from fastapi import FastAPI, Response

import benchcommon

benchcommon.started()

app = FastAPI()


@app.get("/")
def root(response: Response, burn_ms: int = 0, delay_ms: int = 0):
    if burn_ms:
        benchcommon.burn(burn_ms)
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    response.headers["X-Pid"] = benchcommon.pid()
    return {"pid": os.getpid(), "burn_ms": burn_ms, "delay_ms": delay_ms}
