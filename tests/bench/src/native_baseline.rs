//! The benchmark's baseline: a minimal native server (hyper + tokio-postgres) doing the same
//! work as the components it is compared with: `GET /healthz` answers a small JSON body and
//! `GET /pg/one` runs one query through a pool.
//!
//! Usage: native_baseline <listen addr> <database url>

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3001".into());
    let database_url = args.next().expect("a database URL");
    let config: tokio_postgres::Config = database_url.parse()?;
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = Arc::new(
        deadpool_postgres::Pool::builder(manager)
            .max_size(64)
            .build()?,
    );
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("baseline on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let pool = pool.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, pool.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    pool: Arc<deadpool_postgres::Pool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, r#"{"status":"ok"}"#.to_string()),
        "/pg/one" => match one_query(&pool).await {
            Ok(n) => (StatusCode::OK, format!(r#"{{"rows":{n}}}"#)),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(r#"{{"error":{:?}}}"#, e.to_string()),
            ),
        },
        _ => (StatusCode::NOT_FOUND, String::new()),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(res)
}

async fn one_query(pool: &deadpool_postgres::Pool) -> anyhow::Result<usize> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "select service_probe_id from service_probe where service_probe_id = $1",
            &[&1i32],
        )
        .await?;
    Ok(rows.len())
}
