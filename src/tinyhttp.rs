//! Just enough of an HTTP/1.1 server for certd's own two listeners: the
//! http-01 responder and the metrics endpoint. One request per connection,
//! bounded size and time, `Connection: close`; every task owned by the
//! caller's `TaskTracker` and stopped by its `CancellationToken`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Requests larger than this are not for certd.
const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The request line, which is all certd's listeners look at.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(code: u16, body: impl Into<String>) -> Self {
        Self {
            code,
            content_type: "text/plain",
            body: body.into(),
        }
    }
}

/// Serves `listener` until `cancel` fires, answering each request with
/// `handler`.
pub fn serve<H, F>(
    listener: TcpListener,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    handler: H,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    let cancel = cancel.clone();
    let conns = tracker.clone();
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Transient (e.g. out of file descriptors): back off
                    // briefly instead of spinning.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            let cancel = cancel.clone();
            conns.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    _ = tokio::time::timeout(REQUEST_TIMEOUT, one(stream, &*handler)) => {}
                }
            });
        }
    });
}

/// Binds `addr`; the address actually bound (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    Ok((listener, local))
}

async fn one<H, F>(mut stream: TcpStream, handler: &H)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_REQUEST {
            let _ = stream
                .write_all(&encode(&Response::text(431, ""), false))
                .await;
            return;
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let request = Request {
        method: parts.next().unwrap_or("").to_owned(),
        target: parts.next().unwrap_or("").to_owned(),
    };
    let head = request.method == "HEAD";
    let response = if matches!(request.method.as_str(), "GET" | "HEAD") {
        handler(request).await
    } else {
        Response::text(405, "")
    };
    let _ = stream.write_all(&encode(&response, head)).await;
    let _ = stream.shutdown().await;
}

fn encode(r: &Response, head: bool) -> Vec<u8> {
    let reason = match r.code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.code,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(r.body.as_bytes());
    }
    out
}
