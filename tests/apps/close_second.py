"""A worker for tests/http_upstream.rs: it answers the first request on each connection with
keep-alive, and closes the connection without answering when a second request comes on it (a
worker closing a keep-alive connection just as a request arrives, made deterministic). Each
POST it receives is a line on its output."""

import socket
import threading

listener = socket.socket(fileno=3)
listener.setblocking(True)


def serve(conn):
    with conn:
        buf = b""
        answered = False
        while True:
            try:
                data = conn.recv(65536)
            except OSError:  # a readiness probe's reset
                return
            if not data:
                return
            buf += data
            if b"\r\n\r\n" not in buf:
                continue
            if buf.startswith(b"POST "):
                # The test counts these: a POST the front sent twice shows as two lines.
                print(f"close_second: POST as request {2 if answered else 1} on its connection", flush=True)
            if answered:
                return
            buf = buf.split(b"\r\n\r\n", 1)[1]
            body = b"first request on its connection\n"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            answered = True


while True:
    c, _ = listener.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
