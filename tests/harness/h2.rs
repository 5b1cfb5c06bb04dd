//! A raw HTTP/2 client for the front's tests: frames written and read byte by byte over any
//! stream (a rustls one in the tests), so that a test can send what no real client sends (a
//! `Host` beside a different `:authority`) and watch what real clients hide (GOAWAY, pings).
//! It answers the server's SETTINGS and PINGs as a live client does, so the server's keep-alive
//! never closes the connection on its behalf.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
const ACK: u8 = 1;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// One frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// GOAWAY's error code.
    pub fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8).then(|| {
            u32::from_be_bytes([
                self.payload[4],
                self.payload[5],
                self.payload[6],
                self.payload[7],
            ])
        })
    }
}

/// A frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The client preface and an empty SETTINGS.
pub fn preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out
}

/// A HEADERS frame ending the stream (a GET), each field an HPACK literal without indexing
/// and with a new name (RFC 7541 6.2.2), so that no table state is involved.
pub fn get(stream: u32, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127, "short fields only");
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    frame(HEADERS, END_STREAM | END_HEADERS, stream, &block)
}

/// The `:status` of a response HEADERS frame when the server sent it as an HPACK static table
/// index (RFC 7541 appendix A: 200, 204, 206, 304, 400, 404, 500), as hyper does.
pub fn status(f: &Frame) -> Option<u16> {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *f.payload.first()?;
    (f.kind == HEADERS && (0x88..=0x8e).contains(&first)).then(|| STATIC[(first - 0x88) as usize])
}

/// Read frames until the server closes the connection (or `within` passes: a panic), answering
/// SETTINGS and PINGs. Every frame read, and how long it took.
pub fn until_closed<S: Read + Write>(s: &mut S, within: Duration) -> (Vec<Frame>, Duration) {
    let began = Instant::now();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        assert!(
            began.elapsed() < within,
            "the server did not close within {within:?}; frames: {frames:?}"
        );
        let n = match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let f = Frame {
                kind: buf[3],
                flags: buf[4],
                stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                payload: buf[9..9 + len].to_vec(),
            };
            buf.drain(..9 + len);
            let reply = match f.kind {
                SETTINGS if f.flags & ACK == 0 => Some(frame(SETTINGS, ACK, 0, &[])),
                PING if f.flags & ACK == 0 => Some(frame(PING, ACK, 0, &f.payload)),
                _ => None,
            };
            if let Some(r) = reply {
                // The server may have closed its side already: what it sent is still read.
                let _ = s.write_all(&r).and_then(|_| s.flush());
            }
            frames.push(f);
        }
    }
    (frames, began.elapsed())
}
