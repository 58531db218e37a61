//! Client side of the local API, used by the live commands.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(socket: &Path) -> anyhow::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the I/O runtime")?;
        Ok(Client {
            socket: socket.to_path_buf(),
            rt,
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None::<&()>)
    }

    pub fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        self.rt.block_on(async {
            let resp = send(&self.socket, method, path, body).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .context("reading the agent's answer")?
                .to_bytes();
            if !status.is_success() {
                return Err(api_error(status, &bytes));
            }
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the agent's answer is not what this command expects: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        })
    }

    /// Streams a newline-delimited body, calling `line` for each line until the agent ends
    /// the stream or `line` returns false.
    pub fn stream(&self, path: &str, mut line: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
        self.rt.block_on(async {
            let resp = send(&self.socket, Method::GET, path, Vec::new()).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(api_error(status, &bytes));
            }
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.context("reading the event stream")?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = buf.drain(..=pos).collect();
                    let text = String::from_utf8_lossy(&l[..l.len() - 1]);
                    if !text.is_empty() && !line(&text) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    #[derive(serde::Deserialize)]
    struct E {
        error: String,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(e) => anyhow!("{}", e.error),
        Err(_) => anyhow!(
            "the agent answered {status}: {}",
            String::from_utf8_lossy(body)
        ),
    }
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<Response<Incoming>> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the fqdnwall agent at {} (is `fqdnwall run` running? \
             --api-socket or FQDNWALL_API_SOCKET name another socket)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("talking to the agent")?;
    tokio::spawn(async move {
        // The connection ends when the answer is read; its error, if any, surfaces on the
        // request itself.
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "fqdnwall")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    sender
        .send_request(req)
        .await
        .context("sending the request to the agent")
}
