//! A TCP forwarder that can be switched off and on, to take Postgres or Redis away from one app
//! without touching the shared servers other tests use.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
}

impl Proxy {
    /// Forwards a fresh local port to `target` (host:port).
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let epoch = Arc::new(AtomicU64::new(0));
        let (up2, epoch2) = (up.clone(), epoch.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let my_epoch = epoch2.load(Ordering::SeqCst);
                let epoch3 = epoch2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while epoch3.load(Ordering::SeqCst) == my_epoch {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = cut => {} }
                });
            }
        });
        Self { addr, up, epoch }
    }

    /// Cuts every open connection and refuses new ones.
    pub async fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // Connection tasks notice within one poll interval.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
