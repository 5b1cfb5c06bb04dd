"""A plain WSGI app for gunicorn's sync workers (`cargo xtask bench peers`)."""

import json
import os
import time
from urllib.parse import parse_qs

import benchcommon

benchcommon.started()


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    burn_ms = int(query.get("burn_ms", ["0"])[0])
    delay_ms = int(query.get("delay_ms", ["0"])[0])
    if burn_ms:
        benchcommon.burn(burn_ms)
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    body = json.dumps({"pid": os.getpid(), "burn_ms": burn_ms, "delay_ms": delay_ms}).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Pid", benchcommon.pid()),
        ],
    )
    return [body]
