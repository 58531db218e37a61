//! gRPC through the proxy: a real tonic server and client over one HTTP/2 channel. The
//! service is written out by hand (what tonic-build would generate) so no protoc is needed.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use l7::{HttpPolicy, HttpProxy, HttpProxyConfig, L7EventKind, L7Verdict, ProxyMode, SecretDir};
use policy::model::HttpRule;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Status};

use common::*;

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    msg: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    msg: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `test.Echo` with methods `Allowed` and `Secret`, both echoing their input.
#[derive(Clone)]
struct EchoServer;

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "test.Echo";
}

struct Unary(&'static str);

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<Result<tonic::Response<EchoReply>, Status>>;
    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        let method = self.0;
        Box::pin(async move {
            Ok(tonic::Response::new(EchoReply {
                msg: format!("{method}: {}", req.into_inner().msg),
            }))
        })
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let method = match req.uri().path() {
            "/test.Echo/Allowed" => Some("Allowed"),
            "/test.Echo/Secret" => Some("Secret"),
            _ => None,
        };
        Box::pin(async move {
            Ok(match method {
                Some(m) => {
                    let codec = tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default();
                    let mut grpc = tonic::server::Grpc::new(codec);
                    grpc.unary(Unary(m), req).await
                }
                None => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

async fn start_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

async fn call(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &'static str,
    msg: &str,
) -> Result<String, Status> {
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let resp = grpc
        .unary(
            tonic::Request::new(EchoRequest { msg: msg.into() }),
            PathAndQuery::from_static(method),
            codec,
        )
        .await?;
    Ok(resp.into_inner().msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_method_gets_permission_denied_and_channel_keeps_working() {
    let server = start_server().await;
    let h = Harness::new();
    let mut events = h.events.subscribe();
    let policy = HttpPolicy::compile(
        &[HttpRule {
            method: Some("POST".into()),
            path: Some("/test\\.Echo/Allowed".into()),
            ..Default::default()
        }],
        &SecretDir::new("/nonexistent"),
    )
    .unwrap();
    h.policy.set_http(redirect(policy));
    let cfg = HttpProxyConfig::new(
        loopback0(),
        ProxyMode::Fixed {
            upstream: server,
            mark: None,
        },
    );
    let proxy = HttpProxy::bind(cfg, h.policy.clone(), h.events.clone()).unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run());

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);

    assert_eq!(
        call(&mut grpc, "/test.Echo/Allowed", "one").await.unwrap(),
        "Allowed: one"
    );
    let err = call(&mut grpc, "/test.Echo/Secret", "two")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "Access denied");
    // The same channel (one HTTP/2 connection) still serves allowed calls, also concurrently
    // with denied ones.
    let (mut g1, mut g2, mut g3) = (grpc.clone(), grpc.clone(), grpc.clone());
    let (a, b, c) = tokio::join!(
        call(&mut g1, "/test.Echo/Allowed", "three"),
        call(&mut g2, "/test.Echo/Secret", "four"),
        call(&mut g3, "/test.Echo/Allowed", "five"),
    );
    assert_eq!(a.unwrap(), "Allowed: three");
    assert_eq!(b.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(c.unwrap(), "Allowed: five");
    assert_eq!(h.events.stats().http.snapshot().connections, 1);

    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        let L7EventKind::Http {
            version,
            path,
            status,
            grpc_status,
            ..
        } = ev.kind
        else {
            panic!("http event")
        };
        assert_eq!(version, "HTTP/2");
        seen.push((path, ev.verdict, status, grpc_status));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|(p, v, s, g)| (p == "/test.Echo/Allowed"
        && *v == L7Verdict::Allowed
        && *s == 200
        && g.is_none())
        || (p == "/test.Echo/Secret" && *v == L7Verdict::Denied && *s == 200 && *g == Some(7))));
}
