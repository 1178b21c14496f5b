//! A tiny HTTP/1.0-style responder for `GET /metrics`, on the relay's mio loop.
//!
//! One request per connection; the response is written and the connection closed. Bounded:
//! at most [`MAX_CONNS`] connections, [`MAX_REQUEST`] bytes of request, [`DEADLINE`] to
//! finish, so a slow or hostile scraper cannot hold memory or the loop.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

pub const MAX_CONNS: usize = 64;
pub const MAX_REQUEST: usize = 4096;
pub const DEADLINE: Duration = Duration::from_secs(10);

/// One metrics connection.
pub struct HttpConn {
    pub stream: TcpStream,
    pub started: Instant,
    request: Vec<u8>,
    response: Option<Vec<u8>>,
    written: usize,
    pub wants_write: bool,
}

/// What the loop should do with the connection next.
pub enum Next {
    /// Keep it registered (READABLE, plus WRITABLE if `wants_write`).
    Keep,
    /// Done or broken: deregister and drop.
    Close,
}

impl HttpConn {
    pub fn new(stream: TcpStream, now: Instant) -> Self {
        HttpConn {
            stream,
            started: now,
            request: Vec::new(),
            response: None,
            written: 0,
            wants_write: false,
        }
    }

    /// Reads what is available; once the request head is complete, builds the response
    /// with `render` and starts writing it.
    pub fn on_ready(&mut self, render: impl FnOnce() -> String) -> Next {
        if self.response.is_none() {
            let mut buf = [0u8; 1024];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Next::Close,
                    Ok(n) => {
                        self.request.extend_from_slice(&buf[..n]);
                        if self.request.len() > MAX_REQUEST {
                            return Next::Close;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Next::Close,
                }
            }
            if !self.request.windows(4).any(|w| w == b"\r\n\r\n")
                && !self.request.windows(2).any(|w| w == b"\n\n")
            {
                return Next::Keep;
            }
            let line = self.request.split(|b| *b == b'\n').next().unwrap_or(&[]);
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found; try /metrics\n".to_string())
            };
            let mut resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            resp.extend_from_slice(body.as_bytes());
            self.response = Some(resp);
        }
        let Some(resp) = &self.response else {
            return Next::Keep;
        };
        while self.written < resp.len() {
            match self.stream.write(&resp[self.written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wants_write = true;
                    return Next::Keep;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Next::Close
    }
}
