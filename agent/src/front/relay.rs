//! Moving a front connection's bytes between the client and the worker: in userspace through
//! rustls, or spliced through the kernel once kTLS holds the keys; a worker that will not take
//! the connection gets the client a 502.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};

use rustls::ServerConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::process::Counters;
use super::stats::Stat;
use super::tls::flush_tls;
use crate::sys;

pub(super) const COPY_CHUNK: usize = 64 * 1024;

pub(super) async fn bad_gateway(
    sock: &mut TcpStream,
    mut conn: ServerConnection,
) -> io::Result<()> {
    let body = "502 Bad Gateway: no worker of this app accepted the connection\n";
    let _ = write!(
        conn.writer(),
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.send_close_notify();
    flush_tls(sock, &mut conn).await
}

/// Move bytes both ways through rustls until both directions are done. Returns the plaintext
/// bytes moved.
pub(super) async fn proxy_userspace(
    mut sock: TcpStream,
    mut conn: ServerConnection,
    mut upstream: TcpStream,
) -> io::Result<u64> {
    let mut moved = 0u64;
    let mut net = vec![0u8; COPY_CHUNK];
    let mut plain = vec![0u8; COPY_CHUNK];
    let mut up = vec![0u8; COPY_CHUNK];
    let (mut client_done, mut upstream_done) = (false, false);
    loop {
        flush_tls(&mut sock, &mut conn).await?;
        if client_done && upstream_done {
            break;
        }
        tokio::select! {
            r = sock.read(&mut net), if !client_done => {
                let n = r?;
                if n == 0 {
                    // TCP EOF without close_notify (truncation) or after it: either way no more
                    // requests; the upstream gets a half-close and may still answer.
                    client_done = true;
                    let _ = upstream.shutdown().await;
                    continue;
                }
                let mut rd = &net[..n];
                while !rd.is_empty() {
                    conn.read_tls(&mut rd)?;
                    let state = conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    loop {
                        match conn.reader().read(&mut plain) {
                            Ok(0) => break,
                            Ok(m) => {
                                upstream.write_all(&plain[..m]).await?;
                                moved += m as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                    if state.peer_has_closed() && !client_done {
                        // close_notify: half-close towards the worker.
                        client_done = true;
                        let _ = upstream.shutdown().await;
                    }
                }
            }
            r = upstream.read(&mut up), if !upstream_done => {
                let n = r?;
                if n == 0 {
                    upstream_done = true;
                    conn.send_close_notify();
                    flush_tls(&mut sock, &mut conn).await?;
                    let _ = sock.shutdown().await;
                    // The worker is done: the client has nothing left to say that anyone reads.
                    client_done = true;
                    continue;
                }
                conn.writer().write_all(&up[..n])?;
                moved += n as u64;
            }
        }
    }
    Ok(moved)
}

/// How a spliced direction ended.
pub(super) enum PumpEnd {
    /// The source's end of stream (a worker's FIN, or a client's FIN without close_notify).
    Eof,
    /// The kTLS source has a record that is not application data next.
    Control,
}

/// splice `src` -> pipe -> `dst` until the source ends. Returns how it ended and the bytes.
pub(super) async fn pump(src: &TcpStream, dst: &TcpStream, moved: &mut u64) -> io::Result<PumpEnd> {
    let (pipe_r, pipe_w) = sys::ktls::pipe()?;
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    loop {
        let n = match src
            .async_io(Interest::READABLE, || {
                sys::ktls::splice(src_fd, pipe_w.as_raw_fd(), COPY_CHUNK)
            })
            .await
        {
            Ok(0) => return Ok(PumpEnd::Eof),
            Ok(n) => n,
            // splice refuses a record that is not data (linux/net/tls: EINVAL).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(PumpEnd::Control),
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            let m = dst
                .async_io(Interest::WRITABLE, || {
                    sys::ktls::splice(pipe_r.as_raw_fd(), dst_fd, left)
                })
                .await?;
            left -= m;
            *moved += m as u64;
        }
    }
}

/// kTLS both ways: the kernel decrypts what the client sends and encrypts what the worker
/// answers; splice moves the bytes without copying them through this process.
pub(super) async fn proxy_ktls(
    sock: TcpStream,
    upstream: TcpStream,
    counters: &Counters,
) -> io::Result<u64> {
    let client_to_worker = async {
        let mut moved = 0u64;
        loop {
            match pump(&sock, &upstream, &mut moved).await? {
                PumpEnd::Eof => {
                    counters.one(Stat::EofWithoutCloseNotify);
                    break;
                }
                PumpEnd::Control => {
                    let mut buf = [0u8; 16 * 1024 + 256];
                    let (kind, n) = sock
                        .async_io(Interest::READABLE, || {
                            sys::ktls::recv_record(sock.as_raw_fd(), &mut buf)
                        })
                        .await?;
                    match kind {
                        sys::ktls::RECORD_APPLICATION_DATA => {
                            write_all_shared(&upstream, &buf[..n]).await?;
                            moved += n as u64;
                        }
                        sys::ktls::RECORD_ALERT if n >= 2 && buf[1] == 0 => {
                            counters.one(Stat::CloseNotifyReceived);
                            break;
                        }
                        sys::ktls::RECORD_ALERT => {
                            counters.one(Stat::AlertsReceived);
                            return Err(io::Error::other("the client sent an alert"));
                        }
                        sys::ktls::RECORD_HANDSHAKE => {
                            // A KeyUpdate (or anything else post-handshake): the kernel cannot
                            // take new keys from a rustls that no longer exists. Close cleanly.
                            counters.one(Stat::PostHandshakeCloses);
                            return Err(io::Error::other("post-handshake message"));
                        }
                        _ => {
                            counters.one(Stat::AlertsReceived);
                            return Err(io::Error::other("unexpected record type"));
                        }
                    }
                }
            }
        }
        // The client is done sending: a half-close towards the worker, which may still answer.
        sys::ktls::shutdown_write(upstream.as_fd());
        Ok::<u64, io::Error>(moved)
    };
    let worker_to_client = async {
        let mut moved = 0u64;
        let end = pump(&upstream, &sock, &mut moved).await;
        // The worker is done (or failed): close_notify, then FIN.
        let _ = sock
            .async_io(Interest::WRITABLE, || {
                sys::ktls::send_record(
                    sock.as_raw_fd(),
                    sys::ktls::RECORD_ALERT,
                    &sys::ktls::CLOSE_NOTIFY,
                )
            })
            .await;
        sys::ktls::shutdown_write(sock.as_fd());
        end.map(|_| moved)
    };
    tokio::pin!(client_to_worker);
    tokio::pin!(worker_to_client);
    let mut total = 0;
    let mut client_done = false;
    loop {
        tokio::select! {
            r = &mut client_to_worker, if !client_done => {
                client_done = true;
                match r {
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
            r = &mut worker_to_client => {
                if let Ok(n) = r { total += n; }
                break;
            }
        }
    }
    Ok(total)
}

/// write_all through a shared reference (both directions of a connection use the stream).
pub(super) async fn write_all_shared(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
