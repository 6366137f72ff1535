//! A minimal HTTP/1.1 keep-alive client over a tokio `TcpStream`: one request
//! at a time per connection, responses framed by `Content-Length` or chunked
//! encoding. Small and allocation-free per request, so the load generator
//! spends its CPU on the server under test rather than on itself.

use std::{io, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// `http://host:port[/path]`, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host: String,
    /// The path in the URL, if any (`None` for `/` or nothing).
    pub path: Option<String>,
}

impl Target {
    /// Parses and resolves `url` (plain `http` only).
    ///
    /// # Errors
    /// A malformed URL, another scheme, or a host that does not resolve.
    pub async fn resolve(url: &str) -> io::Result<Self> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{m}: {url}"));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| invalid("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(invalid("missing host"));
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !p.contains(']')
        }) {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await?
            .next()
            .ok_or_else(|| invalid("host does not resolve"))?;
        Ok(Self {
            addr,
            host: authority.to_owned(),
            path: (!path.is_empty() && path != "/").then(|| path.to_owned()),
        })
    }
}

/// What a response said, as far as a load generator cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The server will close the connection (`Connection: close` or HTTP/1.0).
    pub close: bool,
    /// Body bytes (decoded length for chunked bodies).
    pub body_len: usize,
}

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Start of unread bytes in `buf`.
    start: usize,
    /// The body of the last response, when asked to keep it.
    pub body: Vec<u8>,
}

const READ_CHUNK: usize = 16 * 1024;

impl Conn {
    /// # Errors
    /// The connect failed.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(READ_CHUNK * 2),
            start: 0,
            body: Vec::new(),
        })
    }

    /// Writes `request` (a whole HTTP/1.1 request) and reads its response.
    /// The body is kept in [`body`](Self::body) when `keep_body`.
    ///
    /// # Errors
    /// I/O errors, a connection closed before a whole response, or a
    /// malformed response (`InvalidData`).
    pub async fn round_trip(&mut self, request: &[u8], keep_body: bool) -> io::Result<Reply> {
        self.stream.write_all(request).await?;
        self.read_response(keep_body).await
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let len = self.buf.len();
        if self.buf.capacity() - len < READ_CHUNK {
            // Compact before growing.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(READ_CHUNK);
        }
        // Into the spare capacity, without zeroing it first.
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a whole response",
            ));
        }
        Ok(())
    }

    async fn read_response(&mut self, keep_body: bool) -> io::Result<Reply> {
        // Status line and headers.
        let (status, close, head_len, framing) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf[self.start..]) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let status = response.code.unwrap_or(0);
                    let mut close = response.version == Some(0);
                    let mut framing = Framing::UntilClose;
                    for h in response.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let len = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .ok_or_else(|| invalid_data("bad content-length"))?;
                            framing = Framing::Length(len);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            if contains_token(h.value, b"chunked") {
                                framing = Framing::Chunked;
                            }
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            if contains_token(h.value, b"close") {
                                close = true;
                            } else if contains_token(h.value, b"keep-alive") {
                                close = false;
                            }
                        }
                    }
                    if status == 204 || status == 304 || (100..200).contains(&status) {
                        framing = Framing::Length(0);
                    }
                    break (status, close, head_len, framing);
                }
                Ok(httparse::Status::Partial) => self.fill().await?,
                Err(e) => return Err(invalid_data(&format!("bad response head: {e}"))),
            }
        };
        self.start += head_len;
        if keep_body {
            self.body.clear();
        }
        let body_len = match framing {
            Framing::Length(len) => {
                while self.buf.len() - self.start < len {
                    self.fill().await?;
                }
                if keep_body {
                    self.body
                        .extend_from_slice(&self.buf[self.start..self.start + len]);
                }
                self.start += len;
                len
            }
            Framing::Chunked => self.read_chunked(keep_body).await?,
            Framing::UntilClose => {
                let mut total = 0;
                loop {
                    total += self.buf.len() - self.start;
                    if keep_body {
                        self.body.extend_from_slice(&self.buf[self.start..]);
                    }
                    self.start = self.buf.len();
                    if self.fill().await.is_err() {
                        break;
                    }
                }
                return Ok(Reply {
                    status,
                    close: true,
                    body_len: total,
                });
            }
        };
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Reply {
            status,
            close,
            body_len,
        })
    }

    async fn read_line(&mut self) -> io::Result<std::ops::Range<usize>> {
        loop {
            if let Some(i) = self.buf[self.start..].windows(2).position(|w| w == b"\r\n") {
                let line = self.start..self.start + i;
                self.start += i + 2;
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn read_chunked(&mut self, keep_body: bool) -> io::Result<usize> {
        let mut total = 0;
        loop {
            let line = self.read_line().await?;
            let text =
                std::str::from_utf8(&self.buf[line]).map_err(|_| invalid_data("bad chunk size"))?;
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(size_text, 16).map_err(|_| invalid_data("bad chunk size"))?;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let line = self.read_line().await?;
                    if line.is_empty() {
                        return Ok(total);
                    }
                }
            }
            while self.buf.len() - self.start < size + 2 {
                self.fill().await?;
            }
            if keep_body {
                self.body
                    .extend_from_slice(&self.buf[self.start..self.start + size]);
            }
            self.start += size + 2;
            total += size;
        }
    }
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn invalid_data(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

fn contains_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

/// Appends a whole request with a JSON body to `out`.
pub fn write_request(out: &mut Vec<u8>, path: &str, host: &str, extra_headers: &str, body: &[u8]) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    );
    out.extend_from_slice(body);
}

/// One request on a fresh connection; returns the status and the body.
///
/// # Errors
/// As [`Conn::round_trip`].
pub async fn post_once(
    target: &Target,
    path: &str,
    extra_headers: &str,
    body: &[u8],
) -> io::Result<(u16, Vec<u8>)> {
    let mut conn = Conn::connect(target.addr).await?;
    let mut request = Vec::new();
    write_request(&mut request, path, &target.host, extra_headers, body);
    let reply = conn.round_trip(&request, true).await?;
    Ok((reply.status, std::mem::take(&mut conn.body)))
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    /// A server that answers each request (read loosely) with the next canned
    /// response, in pieces to exercise partial reads.
    async fn canned(responses: Vec<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            for response in responses {
                let _ = socket.read(&mut buf).await.unwrap();
                for piece in response.chunks(7) {
                    socket.write_all(piece).await.unwrap();
                    socket.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn frames_length_chunked_and_close() {
        let addr = canned(vec![
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 14\r\n\r\n{\"accepted\":3}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno",
        ])
        .await;
        let mut conn = Conn::connect(addr).await.unwrap();
        let mut req = Vec::new();
        write_request(&mut req, "/increment", "h", "", b"{}");
        let r = conn.round_trip(&req, false).await.unwrap();
        assert_eq!((r.status, r.close, r.body_len), (202, false, 0));
        let r = conn.round_trip(&req, true).await.unwrap();
        assert_eq!((r.status, r.body_len), (202, 14));
        assert_eq!(conn.body, b"{\"accepted\":3}");
        let r = conn.round_trip(&req, true).await.unwrap();
        assert_eq!((r.status, r.body_len), (200, 5));
        assert_eq!(conn.body, b"abcde");
        let r = conn.round_trip(&req, false).await.unwrap();
        assert_eq!((r.status, r.close, r.body_len), (503, true, 2));
        assert!(conn.round_trip(&req, false).await.is_err());
    }

    #[tokio::test]
    async fn urls_resolve() {
        let t = Target::resolve("http://127.0.0.1:4000/increments")
            .await
            .unwrap();
        assert_eq!(t.addr.port(), 4000);
        assert_eq!(t.host, "127.0.0.1:4000");
        assert_eq!(t.path.as_deref(), Some("/increments"));
        let t = Target::resolve("http://localhost:81").await.unwrap();
        assert_eq!(t.path, None);
        assert!(Target::resolve("https://x").await.is_err());
    }
}
