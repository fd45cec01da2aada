//! The CSI services answer over the unix socket, as the sidecars call them.

use hyper_util::rt::TokioIo;
use lvmlocal_proto::csi::v1::GetPluginInfoRequest;
use lvmlocal_proto::csi::v1::identity_client::IdentityClient;
use lvmlocal_proto::csi::v1::identity_server::IdentityServer;
use lvmlocal_proto::identity::IdentityService;
use lvmlocal_proto::rpc::RpcMetrics;
use lvmlocal_proto::server;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tonic::transport::{Endpoint, Server};
use tower::service_fn;

#[tokio::test]
async fn identity_answers_on_the_socket_and_stops_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    // A socket file left by an earlier run does not stop a new one.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());

    let endpoint = format!("unix://{}", socket.display());
    let path = server::socket_path(&endpoint).unwrap();
    let listener = server::bind(&path).unwrap();
    let router = Server::builder().add_service(IdentityServer::new(IdentityService::new(
        true,
        RpcMetrics::default(),
    )));
    let (stop_tx, stop) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server::serve(router, listener, &path, async {
            let _ = stop.await;
        })
        .await
    });

    let dial = socket.clone();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(service_fn(move |_| {
            let dial = dial.clone();
            async move { UnixStream::connect(dial).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    let info = IdentityClient::new(channel)
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "lvmlocal.io");

    stop_tx.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
