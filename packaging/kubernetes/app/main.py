"""The example FastAPI app of packaging/kubernetes: one uvicorn process per corral worker,
serving corral's socket on fd 3 (`uvicorn main:app --fd 3`)."""

import os

from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
def healthz() -> str:
    # corral's readiness probe (ready = "http:/healthz"): 200 once the app can serve.
    return "ok"


@app.get("/")
def root() -> dict:
    return {"hello": "world", "worker": os.environ.get("CORRAL_WORKER"), "pid": os.getpid()}
