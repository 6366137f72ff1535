//! The crash window, measured: SIGKILL during load loses at most what was
//! accepted after the last successful flush, and nothing answered 200 with
//! `wait=true`.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use crate::service::Service;
use testkit::{TestDb, db_tests, eventually};

db_tests!(sigkill_loses_only_the_unflushed_window_and_no_durable_increment);

async fn sigkill_loses_only_the_unflushed_window_and_no_durable_increment(db: TestDb) {
    let spill = tempfile::tempdir().unwrap();
    let service = Service::start(&db, spill.path()).await;
    let url = format!("{}/increment", service.base);
    let running = Arc::new(AtomicBool::new(true));
    // Plain +1 increments on one key: sent, and answered 202.
    let plain_sent = Arc::new(AtomicI64::new(0));
    let plain_acked = Arc::new(AtomicI64::new(0));
    // The most plain 202s that were in before some wait=true request was
    // sent and then answered 200: those must survive the crash.
    let plain_durable = Arc::new(AtomicI64::new(0));
    // wait=true requests answered 200 so far.
    let durable_ok = Arc::new(AtomicI64::new(0));

    let plain: Vec<_> = (0..16)
        .map(|_| {
            let (url, running) = (url.clone(), Arc::clone(&running));
            let (sent, acked) = (Arc::clone(&plain_sent), Arc::clone(&plain_acked));
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while running.load(Ordering::SeqCst) {
                    sent.fetch_add(1, Ordering::SeqCst);
                    let answer = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(r#"{"key":"plain","value":1}"#)
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status() == 202 => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => break,
                    }
                }
            })
        })
        .collect();
    let durable: Vec<_> = (0..4)
        .map(|task| {
            let (url, running) = (url.clone(), Arc::clone(&running));
            let (acked, safe) = (Arc::clone(&plain_acked), Arc::clone(&plain_durable));
            let ok = Arc::clone(&durable_ok);
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut written = BTreeSet::new();
                let mut i = 0;
                while running.load(Ordering::SeqCst) {
                    let before = acked.load(Ordering::SeqCst);
                    let key = format!("durable-{task}-{i}");
                    i += 1;
                    let answer = client
                        .post(format!("{url}?wait=true"))
                        .header("content-type", "application/json")
                        .body(format!(r#"{{"key":"{key}","value":1}}"#))
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status() == 200 => {
                            written.insert(key);
                            safe.fetch_max(before, Ordering::SeqCst);
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        // 202: taken, not confirmed in time; 503: not taken.
                        Ok(r) if r.status() == 202 || r.status() == 503 => {}
                        _ => break,
                    }
                }
                written
            })
        })
        .collect();

    // Let a few flushes confirm (each 200 is one), with plain load between
    // them, then kill without any shutdown.
    eventually(
        Duration::from_secs(30),
        "flushes confirmed under load",
        || {
            std::future::ready(
                durable_ok.load(Ordering::SeqCst) >= 20
                    && plain_acked.load(Ordering::SeqCst) >= 2_000,
            )
        },
    )
    .await;
    service.kill().await;
    running.store(false, Ordering::SeqCst);
    for task in plain {
        task.await.unwrap();
    }
    let mut written = BTreeSet::new();
    for task in durable {
        written.extend(task.await.unwrap());
    }

    let counters = db.counters().await;
    let stored_plain = counters.get("plain").copied().unwrap_or(0);
    let acked = plain_acked.load(Ordering::SeqCst);
    let sent = plain_sent.load(Ordering::SeqCst);
    let safe = plain_durable.load(Ordering::SeqCst);
    println!(
        "crash window: {acked} plain increments answered 202, {stored_plain} stored, \
         {} lost ({} answered after the last confirmed flush); {} wait=true answered 200",
        acked - stored_plain.min(acked),
        acked - safe,
        written.len()
    );
    assert!(
        !written.is_empty() && safe > 0,
        "durable requests completed before the kill"
    );
    for key in &written {
        assert_eq!(
            counters.get(key),
            Some(&1),
            "{key} was answered 200: it must be stored"
        );
    }
    assert!(
        stored_plain >= safe,
        "everything accepted before a confirmed flush survives ({stored_plain} < {safe})"
    );
    assert!(
        stored_plain <= sent,
        "nothing is counted twice ({stored_plain} > {sent})"
    );
}
