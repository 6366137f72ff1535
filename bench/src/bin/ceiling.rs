//! `ceiling`: the servers increment is compared with.
//!
//! - `ceiling bare PORT`: hyper 1 (http1), answers every request with 202 and
//!   an empty body without reading it: the HTTP ceiling of this machine.
//! - `ceiling floor PORT`: poem (the workspace's version) parsing
//!   `Json<{key, value}>` with serde and answering 202: the framework floor,
//!   what any poem service pays before doing its own work. Also answers
//!   `POST /increments` (`{"increments": [...]}`) with 202 `{"accepted": n}`.
//!
//! `WORKERS` (default 1) sets the tokio worker threads; the accept loop runs
//! in `block_on` on the main thread, as in the anchors.

use std::{convert::Infallible, net::SocketAddr, process::ExitCode};

use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use poem::{
    EndpointExt, Route, handler, listener::TcpListener as PoemListener, post, web::Json as PoemJson,
};
use serde::Deserialize;

fn usage() -> ExitCode {
    eprintln!("usage: ceiling bare|floor PORT   (env WORKERS: tokio worker threads, default 1)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, port] = args.as_slice() else {
        return usage();
    };
    let Ok(port) = port.parse::<u16>() else {
        return usage();
    };
    let workers = match std::env::var("WORKERS") {
        Ok(w) => match w.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("ceiling: WORKERS must be a positive integer, found {w:?}");
                return ExitCode::from(2);
            }
        },
        Err(_) => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ceiling: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let result = match kind.as_str() {
        "bare" => runtime.block_on(bare(addr, workers)),
        "floor" => runtime.block_on(floor(addr, workers)),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceiling: {e}");
            ExitCode::from(1)
        }
    }
}

async fn bare(addr: SocketAddr, workers: usize) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("ceiling bare: hyper http1 on {addr}, {workers} worker thread(s)");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::ACCEPTED)
                        .body(Empty::<Bytes>::new())
                        .expect("static response"),
                )
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[derive(Deserialize)]
struct Increment {
    // Parsed like the service does; the floor does nothing with them.
    #[allow(dead_code)]
    key: String,
    #[allow(dead_code)]
    value: i64,
}

#[derive(Deserialize)]
struct IncrementBatch {
    increments: Vec<Increment>,
}

#[handler]
fn increment(PoemJson(_increment): PoemJson<Increment>) -> poem::http::StatusCode {
    poem::http::StatusCode::ACCEPTED
}

#[handler]
fn increments(PoemJson(batch): PoemJson<IncrementBatch>) -> poem::Response {
    poem::Response::builder()
        .status(poem::http::StatusCode::ACCEPTED)
        .content_type("application/json; charset=utf-8")
        .body(format!("{{\"accepted\":{}}}", batch.increments.len()))
}

async fn floor(addr: SocketAddr, workers: usize) -> std::io::Result<()> {
    eprintln!("ceiling floor: poem + serde Json on {addr}, {workers} worker thread(s)");
    let app = Route::new()
        .at("/increment", post(increment))
        .at("/increments", post(increments))
        .map_to_response();
    poem::Server::new(PoemListener::bind(addr)).run(app).await
}
