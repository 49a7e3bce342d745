//! A WebSocket echo server on fanfare's own framing (`fanfare_server::ws`),
//! for the protocol conformance run in scripts/test.sh (the Autobahn cases,
//! which need an echo server; the gateway is not one).
//!
//!     cargo run --release -p fanfare-server --example ws_echo -- 127.0.0.1:9001
//!
//! Text and binary messages are echoed as one frame, pings answered, the close
//! handshake answered; framing errors close with the code `WsError` names.

use std::convert::Infallible;

use fanfare_server::ws::{self, Incoming, OP_BINARY, OP_CLOSE, OP_PONG, OP_TEXT, WsConn};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Large enough for every Autobahn case that is run (9.* sends up to 16 MiB).
const MAX_MESSAGE: usize = 64 << 20;

async fn echo<S>(conn: &mut WsConn<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let sent = match conn.read().await {
            Ok(Incoming::Text(p)) => {
                let data = conn.payload(p).to_vec();
                conn.send(OP_TEXT, &data).await
            }
            Ok(Incoming::Binary(p)) => {
                let data = conn.payload(p).to_vec();
                conn.send(OP_BINARY, &data).await
            }
            Ok(Incoming::Ping(p)) => {
                let data = conn.payload(p).to_vec();
                conn.send(OP_PONG, &data).await
            }
            Ok(Incoming::Close(code, _)) => {
                let _ = match code {
                    Some(c) => conn.send_close(c, "").await,
                    None => conn.send(OP_CLOSE, &[]).await,
                };
                return;
            }
            Err(e) => {
                if let Some(code) = e.close_code() {
                    let _ = conn.send_close(code, "").await;
                }
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("ws_echo listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|mut req| async move {
                let resp = match ws::check_upgrade(&req) {
                    Ok(key) => {
                        let on_upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = on_upgrade.await else { return };
                            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                                return;
                            };
                            let mut conn = WsConn::new(
                                parts.io.into_inner(),
                                &parts.read_buf,
                                4096,
                                MAX_MESSAGE,
                            );
                            echo(&mut conn).await;
                        });
                        ws::switching_protocols(&key)
                    }
                    Err((status, text)) => {
                        let mut r = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(text.as_bytes()),
                        ));
                        *r.status_mut() = status;
                        r
                    }
                };
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}
