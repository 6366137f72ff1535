//! The journal mode as processes: instances and nats-server SIGKILLed under
//! load from many clients, then started again. Every `202` reaches the
//! database exactly once; a request that got no certain answer (no
//! response, a reset, a `504`) counts at most once.

use std::{
    collections::BTreeMap,
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

/// Per key: increments answered 202, and those without a certain answer.
#[derive(Default)]
struct Tally {
    acked: [AtomicI64; KEYS],
    ambiguous: [AtomicI64; KEYS],
    refused: AtomicI64,
}

impl Tally {
    fn acked_total(&self) -> i64 {
        self.acked.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }
}

/// `CLIENTS` clients sending +1 on `KEYS` keys to the current targets.
struct Load {
    targets: Arc<RwLock<Vec<String>>>,
    tally: Arc<Tally>,
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(targets: Vec<String>) -> Self {
        let targets = Arc::new(RwLock::new(targets));
        let tally = Arc::new(Tally::default());
        let running = Arc::new(AtomicBool::new(true));
        let tasks = (0..CLIENTS)
            .map(|client| {
                let (targets, tally, running) = (
                    Arc::clone(&targets),
                    Arc::clone(&tally),
                    Arc::clone(&running),
                );
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap();
                    let mut i = client;
                    while running.load(Ordering::SeqCst) {
                        i += 1;
                        let key = i % KEYS;
                        let target = {
                            let targets = targets.read();
                            targets[i % targets.len()].clone()
                        };
                        let answer = http
                            .post(format!("{target}/increment"))
                            .header("content-type", "application/json")
                            .body(format!(r#"{{"key":"k{key}","value":1}}"#))
                            .send()
                            .await;
                        match answer.map(|r| r.status().as_u16()) {
                            Ok(202) => {
                                tally.acked[key].fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(503) => {
                                tally.refused.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Ok(status) => {
                                assert!(
                                    status == 504,
                                    "only 202, 503 or 504 under faults: {status}"
                                );
                                tally.ambiguous[key].fetch_add(1, Ordering::SeqCst);
                            }
                            Err(_) => {
                                tally.ambiguous[key].fetch_add(1, Ordering::SeqCst);
                                // The instance is gone: do not spin on it.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            targets,
            tally,
            running,
            tasks,
        }
    }

    fn retarget(&self, targets: Vec<String>) {
        *self.targets.write() = targets;
    }

    /// Waits until `more` further increments were answered 202.
    async fn until_acked_more(&self, more: i64, what: &str) {
        let goal = self.tally.acked_total() + more;
        // Generous: with a cluster node killed, a stream leader is elected
        // again and clients reconnect; on two busy cores that took up to
        // a minute in a full test run.
        eventually(Duration::from_secs(120), what, || {
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

/// Waits until every 202 is stored, then checks that nothing is stored
/// more than once: per key, acked ≤ stored ≤ acked + ambiguous.
async fn assert_exact(db: &TestDb, tally: &Tally) -> BTreeMap<String, i64> {
    let acked: Vec<i64> = tally
        .acked
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    let ambiguous: Vec<i64> = tally
        .ambiguous
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    eventually(Duration::from_secs(60), "every 202 is stored", || async {
        let stored = db.counters().await;
        (0..KEYS).all(|k| stored.get(&format!("k{k}")).copied().unwrap_or(0) >= acked[k])
    })
    .await;
    let stored = db.counters().await;
    for k in 0..KEYS {
        let value = stored[&format!("k{k}")];
        assert!(
            value <= acked[k] + ambiguous[k],
            "k{k}: stored {value} > {} answered 202 + {} ambiguous: counted twice",
            acked[k],
            ambiguous[k]
        );
    }
    println!(
        "journal: {} answered 202, {} ambiguous, {} refused (503); stored {}",
        acked.iter().sum::<i64>(),
        ambiguous.iter().sum::<i64>(),
        tally.refused.load(Ordering::SeqCst),
        stored.values().sum::<i64>()
    );
    stored
}

fn journal_flags(nats: &NatsServer) -> Vec<String> {
    vec!["--journal-url".to_owned(), nats.url()]
}

async fn start(db: &TestDb, dir: &std::path::Path, nats: &NatsServer) -> Service {
    let flags = journal_flags(nats);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Service::start_with(db, dir, &flags).await
}

db_tests!(
    a_sigkilled_instance_loses_no_202,
    a_sigkilled_nats_server_loses_no_202,
);

async fn a_sigkilled_instance_loses_no_202(db: TestDb) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let first = start(&db, dir.path(), &nats).await;
    let load = Load::start(vec![first.base.clone()]);
    load.until_acked_more(3_000, "3,000 increments taken").await;
    first.kill().await;
    let second = start(&db, dir.path(), &nats).await;
    load.retarget(vec![second.base.clone()]);
    load.until_acked_more(1_000, "1,000 more taken by the restarted instance")
        .await;
    let tally = load.stop().await;
    assert_exact(&db, &tally).await;
    second.terminate();
    assert!(second.wait_for_exit().await.success());
}

async fn a_sigkilled_nats_server_loses_no_202(db: TestDb) {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let service = start(&db, dir.path(), &nats).await;
    let load = Load::start(vec![service.base.clone()]);
    load.until_acked_more(3_000, "3,000 increments taken").await;
    nats.kill();
    let tally = Arc::clone(&load.tally);
    eventually(Duration::from_secs(30), "503s while NATS is down", || {
        std::future::ready(tally.refused.load(Ordering::SeqCst) >= 10)
    })
    .await;
    nats.restart();
    load.until_acked_more(2_000, "2,000 more taken once NATS is back")
        .await;
    let tally = load.stop().await;
    assert_exact(&db, &tally).await;
    service.terminate();
    assert!(service.wait_for_exit().await.success());
}

/// Two instances; the lease holder is SIGKILLed (the survivor writes what
/// it had journaled), then the survivor too; a new instance finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_sigkilled_leaves_nothing_stranded() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let nats = NatsServer::start();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = start(&db, dir_a.path(), &nats).await;
    let b = start(&db, dir_b.path(), &nats).await;
    let load = Load::start(vec![a.base.clone(), b.base.clone()]);
    load.until_acked_more(3_000, "3,000 increments taken by two instances")
        .await;
    let (writer, survivor) = if is_writer(&a.base).await {
        (a, b)
    } else {
        (b, a)
    };
    writer.kill().await;
    load.retarget(vec![survivor.base.clone()]);
    eventually(
        Duration::from_secs(30),
        "the survivor takes the lease",
        || is_writer(&survivor.base),
    )
    .await;
    load.until_acked_more(2_000, "2,000 more taken by the survivor")
        .await;
    survivor.kill().await;
    let fresh = start(&db, dir_a.path(), &nats).await;
    load.retarget(vec![fresh.base.clone()]);
    load.until_acked_more(500, "500 more taken by a fresh instance")
        .await;
    let tally = load.stop().await;
    assert_exact(&db, &tally).await;
    fresh.terminate();
    assert!(fresh.wait_for_exit().await.success());
}

async fn is_writer(base: &str) -> bool {
    let Ok(response) = reqwest::get(format!("{base}/metrics")).await else {
        return false;
    };
    response.text().await.is_ok_and(|text| {
        text.lines()
            .any(|line| line == "increment_journal_writer 1")
    })
}

/// A three-node JetStream cluster with an R3 stream: one node SIGKILLed
/// under load, then started again; no `202` is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_a_three_node_cluster_sigkilled_loses_no_202() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut cluster = testkit::NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let urls = cluster.urls();
    let service = Service::start_with(
        &db,
        dir.path(),
        &["--journal-url", &urls, "--journal-replicas", "3"],
    )
    .await;
    let load = Load::start(vec![service.base.clone()]);
    load.until_acked_more(3_000, "3,000 increments taken").await;
    cluster.nodes[0].kill();
    load.until_acked_more(2_000, "2,000 more taken with a node down")
        .await;
    cluster.nodes[0].restart();
    load.until_acked_more(1_000, "1,000 more with the node back")
        .await;
    let tally = load.stop().await;
    assert_exact(&db, &tally).await;
    service.terminate();
    assert!(service.wait_for_exit().await.success());
}
