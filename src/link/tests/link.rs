//! Real QUIC on loopback: pinned mutual TLS accepts the peer and refuses an
//! impostor, frames cross both ways, bad frames are errors, a vanished peer
//! is noticed.

use std::time::Duration;

use pairbd_link::{generate_certificate, Endpoint, Identity, LinkConfig, LinkError};
use pairbd_repl_proto::{DiskState, Message, NodeState, Role};

fn identity(name: &str) -> Identity {
    let (cert, key) = generate_certificate(name).unwrap();
    Identity::from_pem(&cert, &key).unwrap()
}

fn endpoint(me: &Identity, peer: &Identity, ping: Duration) -> Endpoint {
    Endpoint::bind(LinkConfig {
        identity: me.clone(),
        peer_cert: peer.cert.clone(),
        bind: "127.0.0.1:0".parse().unwrap(),
        ping_timeout: ping,
    })
    .unwrap()
}

/// A failure guard, not a synchronisation: generous, and only hit on a bug.
const GUARD: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_cross_both_ways() {
    let (a, b) = (identity("alpha"), identity("beta"));
    let ea = endpoint(&a, &b, Duration::from_secs(1));
    let eb = endpoint(&b, &a, Duration::from_secs(1));
    let addr = eb.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let link = eb.accept().await.unwrap();
        let (mut tx, mut rx) = link.split();
        let m = rx.recv(|n| vec![0u8; n]).await.unwrap();
        assert_eq!(
            m,
            Message::Write {
                seq: 1,
                offset: 4096,
                payload: vec![5u8; 65536],
                fua: true
            }
        );
        tx.send(&Message::<Vec<u8>>::Ack { seq: 1 }).await.unwrap();
        let m = rx.recv(|n| vec![0u8; n]).await.unwrap();
        assert_eq!(
            m,
            Message::State(NodeState {
                role: Role::Primary,
                disk: DiskState::UpToDate
            })
        );
        (eb, tx, rx)
    });
    let link = ea.connect(addr).await.unwrap();
    let (mut tx, mut rx) = link.split();
    tx.send(&Message::Write {
        seq: 1,
        offset: 4096,
        payload: vec![5u8; 65536],
        fua: true,
    })
    .await
    .unwrap();
    let ack: Message<Vec<u8>> = rx.recv(|n| vec![0u8; n]).await.unwrap();
    assert_eq!(ack, Message::Ack { seq: 1 });
    tx.send(&Message::<Vec<u8>>::State(NodeState {
        role: Role::Primary,
        disk: DiskState::UpToDate,
    }))
    .await
    .unwrap();
    tokio::time::timeout(GUARD, accept).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_with_the_same_name_is_refused_and_the_real_peer_still_gets_in() {
    let (a, b) = (identity("alpha"), identity("beta"));
    let impostor = identity("alpha");
    let eb = endpoint(&b, &a, Duration::from_secs(1));
    let addr = eb.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let link = eb.accept().await.unwrap();
        let (_tx, mut rx) = link.split();
        let m: Message<Vec<u8>> = rx.recv(|n| vec![0u8; n]).await.unwrap();
        (eb, m)
    });
    // The impostor trusts beta's real certificate, but beta does not trust it.
    let ei = endpoint(&impostor, &b, Duration::from_secs(1));
    let r = ei.connect(addr).await;
    if let Ok(link) = r {
        // The handshake may complete on the client side before the server's
        // verdict arrives; the stream must fail then.
        let (mut tx, mut rx) = link.split();
        let _ = tx.send(&Message::<Vec<u8>>::Flush { seq: 1 }).await;
        let got = tokio::time::timeout(GUARD, rx.recv(|n| vec![0u8; n]))
            .await
            .unwrap();
        assert!(got.is_err(), "the impostor got an answer");
    }
    // And alpha refuses a server that is not beta.
    let fake_beta = identity("beta");
    let efake = endpoint(&fake_beta, &a, Duration::from_secs(1));
    let fake_addr = efake.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = efake.accept().await;
    });
    let ea = endpoint(&a, &b, Duration::from_secs(1));
    let e = ea
        .connect(fake_addr)
        .await
        .err()
        .expect("a fake beta is refused");
    assert!(matches!(e, LinkError::Connect { .. }), "{e}");
    // The real alpha still gets in.
    let link = ea.connect(addr).await.unwrap();
    let (mut tx, _rx) = link.split();
    tx.send(&Message::<Vec<u8>>::Flush { seq: 9 })
        .await
        .unwrap();
    let (_eb, m) = tokio::time::timeout(GUARD, accepted)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m, Message::Flush { seq: 9 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_is_an_error_for_the_receiver() {
    let (a, b) = (identity("alpha"), identity("beta"));
    let ea = endpoint(&a, &b, Duration::from_secs(1));
    let eb = endpoint(&b, &a, Duration::from_secs(1));
    let addr = eb.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let link = eb.accept().await.unwrap();
        let (_tx, mut rx) = link.split();
        let r = rx.recv(|n| vec![0u8; n]).await;
        (eb, r.map(|_: Message<Vec<u8>>| ()))
    });
    let link = ea.connect(addr).await.unwrap();
    let (mut tx, _rx) = link.split();
    tx.send_raw(&[0x55; 64]).await.unwrap();
    let (_eb, r) = tokio::time::timeout(GUARD, receiver)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(LinkError::Frame(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_noticed() {
    let (a, b) = (identity("alpha"), identity("beta"));
    let ea = endpoint(&a, &b, Duration::from_millis(500));
    // The peer runs on a runtime of its own; dropping that runtime stops its
    // endpoint dead, with no goodbye, as a killed process would.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let eb = rt.block_on(async { endpoint(&b, &a, Duration::from_millis(500)) });
        addr_tx.send(eb.local_addr().unwrap()).unwrap();
        let link = rt.block_on(eb.accept()).unwrap();
        stop_rx.recv().unwrap();
        std::mem::forget(link);
        std::mem::forget(eb);
        drop(rt);
    });
    let addr = addr_rx.recv().unwrap();
    let link = ea.connect(addr).await.unwrap();
    let handle = link.handle();
    let (mut tx, _rx) = link.split();
    tx.send(&Message::<Vec<u8>>::Flush { seq: 1 })
        .await
        .unwrap();
    stop_tx.send(()).unwrap();
    peer.join().unwrap();
    let started = std::time::Instant::now();
    let reason = tokio::time::timeout(GUARD, handle.closed())
        .await
        .expect("loss noticed");
    eprintln!("loss noticed after {:?}: {reason}", started.elapsed());
}
