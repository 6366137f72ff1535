//! Clients that retry with an `Idempotency-Key` until they get a `202`,
//! while the instance is killed or restarted under them: with the key, the
//! totals are exact — not "at most once" for the requests whose answer was
//! lost, but once each.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use parking_lot::RwLock;
use testkit::{NatsServer, TestDb, db_tests, eventually};

use crate::service::Service;

const KEYS: usize = 8;
const CLIENTS: usize = 16;

/// Per counter key: requests answered 202 (each sent until it was).
#[derive(Default)]
struct Tally {
    acked: [AtomicI64; KEYS],
    /// Sends that got no certain answer and were sent again.
    retries: AtomicI64,
}

impl Tally {
    fn acked_total(&self) -> i64 {
        self.acked.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }
}

/// `CLIENTS` clients; request `n` of client `c` adds 1 to `k{n % KEYS}`
/// under the key `c{c}-{n}`, sent until it is answered 202.
struct RetryingLoad {
    target: Arc<RwLock<String>>,
    tally: Arc<Tally>,
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RetryingLoad {
    fn start(target: String) -> Self {
        let target = Arc::new(RwLock::new(target));
        let tally = Arc::new(Tally::default());
        let running = Arc::new(AtomicBool::new(true));
        let tasks = (0..CLIENTS)
            .map(|client| {
                let (target, tally, running) = (
                    Arc::clone(&target),
                    Arc::clone(&tally),
                    Arc::clone(&running),
                );
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap();
                    let mut n = 0;
                    // A request once sent is sent until it is answered 202,
                    // even after the stop: its fate must be certain.
                    while running.load(Ordering::SeqCst) {
                        n += 1;
                        let counter = n % KEYS;
                        let key = format!("\"c{client}-{n}\"");
                        loop {
                            let url = format!("{}/increment", target.read());
                            let answer = http
                                .post(url)
                                .header("content-type", "application/json")
                                .header("idempotency-key", &key)
                                .body(format!(r#"{{"key":"k{counter}","value":1}}"#))
                                .send()
                                .await;
                            match answer.map(|r| r.status().as_u16()) {
                                Ok(202) => {
                                    tally.acked[counter].fetch_add(1, Ordering::SeqCst);
                                    break;
                                }
                                Ok(status) => {
                                    assert!(
                                        matches!(status, 503 | 504),
                                        "only 202, 503 or 504 under faults: {status}"
                                    );
                                }
                                Err(_) => {}
                            }
                            tally.retries.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            target,
            tally,
            running,
            tasks,
        }
    }

    fn retarget(&self, target: String) {
        *self.target.write() = target;
    }

    async fn until_acked_more(&self, more: i64, what: &str) {
        let goal = self.tally.acked_total() + more;
        eventually(Duration::from_secs(60), what, || {
            std::future::ready(self.tally.acked_total() >= goal)
        })
        .await;
    }

    async fn stop(self) -> Arc<Tally> {
        self.running.store(false, Ordering::SeqCst);
        for task in self.tasks {
            task.await.expect("a load client panicked");
        }
        self.tally
    }
}

/// Waits until every request is stored, then checks it is stored once.
async fn assert_exactly_once(db: &TestDb, tally: &Tally) {
    let acked: Vec<i64> = tally
        .acked
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    eventually(
        Duration::from_secs(60),
        "every request is stored",
        || async {
            let stored = db.counters().await;
            (0..KEYS).all(|k| stored.get(&format!("k{k}")).copied().unwrap_or(0) >= acked[k])
        },
    )
    .await;
    let stored = db.counters().await;
    for k in 0..KEYS {
        assert_eq!(
            stored[&format!("k{k}")],
            acked[k],
            "k{k}: each request once, whatever its retries"
        );
    }
    println!(
        "idempotency: {} requests, {} retries; stored {}",
        acked.iter().sum::<i64>(),
        tally.retries.load(Ordering::SeqCst),
        stored.values().sum::<i64>()
    );
}

db_tests!(
    with_the_journal_retries_across_a_sigkill_count_once,
    retries_across_a_sigterm_restart_count_once,
);

async fn with_the_journal_retries_across_a_sigkill_count_once(db: TestDb) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--journal-url", &nats.url()];
    let first = Service::start_with(&db, dir.path(), &flags).await;
    let load = RetryingLoad::start(first.base.clone());
    load.until_acked_more(2_000, "2,000 requests taken").await;
    first.kill().await;
    let second = Service::start_with(&db, dir.path(), &flags).await;
    load.retarget(second.base.clone());
    load.until_acked_more(1_000, "1,000 more taken by the restarted instance")
        .await;
    let tally = load.stop().await;
    assert!(
        tally.retries.load(Ordering::SeqCst) > 0,
        "the kill left requests without an answer"
    );
    assert_exactly_once(&db, &tally).await;
    second.terminate();
    assert!(second.wait_for_exit().await.success());
}

async fn retries_across_a_sigterm_restart_count_once(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let first = Service::start(&db, dir.path()).await;
    let load = RetryingLoad::start(first.base.clone());
    load.until_acked_more(2_000, "2,000 requests taken").await;
    first.terminate();
    assert!(first.wait_for_exit().await.success());
    let second = Service::start(&db, dir.path()).await;
    load.retarget(second.base.clone());
    load.until_acked_more(1_000, "1,000 more taken by the new instance")
        .await;
    let tally = load.stop().await;
    assert!(
        tally.retries.load(Ordering::SeqCst) > 0,
        "the restart left requests without an answer"
    );
    assert_exactly_once(&db, &tally).await;
    second.terminate();
    assert!(second.wait_for_exit().await.success());
}
