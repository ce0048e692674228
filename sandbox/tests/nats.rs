//! nats-server under the sandbox: JetStream data survives a SIGKILL and a restart on the same
//! port, and the users of the bus configuration get the permissions it gives them.

use async_nats::jetstream::{self, stream};
use baton_sandbox::Sandbox;

#[tokio::test]
async fn jetstream_stream_survives_kill9_and_restart() {
    let sandbox = Sandbox::start_nats_only().await.unwrap();
    let nats = sandbox.nats();
    let admin = jetstream::new(nats.connect("admin").await.unwrap());
    admin
        .create_stream(stream::Config {
            name: "SANDBOX_TEST".into(),
            subjects: vec!["sandbox.test.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..3 {
        admin
            .publish("sandbox.test.a", format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let old_pid = nats.pid().unwrap();
    nats.kill9().await.unwrap();
    assert_eq!(nats.pid(), None);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", nats.port()))
            .await
            .is_err(),
        "nothing listens after kill9"
    );

    nats.start_again().await.unwrap();
    assert_ne!(nats.pid(), Some(old_pid));
    let admin = jetstream::new(nats.connect("admin").await.unwrap());
    let info = admin
        .get_stream("SANDBOX_TEST")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 3);

    nats.restart().await.unwrap();
    let admin = jetstream::new(nats.connect("admin").await.unwrap());
    let mut stream = admin.get_stream("SANDBOX_TEST").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 3);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn every_user_of_the_bus_config_connects_with_its_own_seed() {
    let sandbox = Sandbox::shared_nats_only().unwrap();
    for user in baton_sandbox::NATS_USERS {
        let client = sandbox.nats_client(user).await.unwrap();
        client.flush().await.unwrap();
        let seed =
            std::fs::read_to_string(sandbox.nats().credentials_dir().join(format!("{user}.nk")))
                .unwrap();
        assert_eq!(seed, sandbox.nats().seed(user).unwrap());
    }
    assert!(sandbox.nats_client("nobody").await.is_err());
}

/// Runs on its own runtime, alongside the test above, against the same shared server.
#[tokio::test]
async fn the_shared_sandbox_serves_every_test_runtime() {
    use futures::StreamExt;

    let sandbox = Sandbox::shared_nats_only().unwrap();
    let client = sandbox.nats_client("admin").await.unwrap();
    let mut requests = client.subscribe("sandbox.echo").await.unwrap();
    client.flush().await.unwrap();
    let responder = tokio::spawn(async move {
        let request = requests.next().await.unwrap();
        client
            .publish(request.reply.unwrap(), request.payload)
            .await
            .unwrap();
        client.flush().await.unwrap();
    });
    let requester = sandbox.nats_client("admin").await.unwrap();
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        requester.request("sandbox.echo", "ping".into()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply.payload, "ping");
    responder.await.unwrap();
}
