//! Audited reads per second with durable group commit, against the same reads with audit
//! disabled, on the embedded SQLite default.
//!
//! Run with `scripts/bench` (it builds the release binary first). Both brokers run the
//! release `custos` binary on this machine; 32 client tasks read one secret in a loop
//! over keep-alive connections for a fixed time after a warm-up. The two configurations
//! alternate over several rounds; the best round of each is the headline, which damps the
//! noise of a shared machine, and the medians are shown beside it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custos_end_to_end::{Broker, BrokerOptions, DatabaseKind};
use serde_json::json;

const CLIENTS: usize = 32;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
const ROUNDS: usize = 5;

async fn reads_per_second(audit_enabled: bool) -> f64 {
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    options.audit_enabled = audit_enabled;
    options.log_level = "warn".to_owned();
    let broker = Broker::start_with(options).await;
    broker
        .write(
            "secret/bench",
            json!({"username": "app", "password": "correct horse"}),
        )
        .await
        .expect(200);

    let url = broker.url("/v1/secrets/secret/bench");
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (url, token) = (url.clone(), broker.root_token.clone());
        let (counting, stop, reads) = (counting.clone(), stop.clone(), reads.clone());
        let http = reqwest::Client::new();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = http.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                if counting.load(Ordering::Relaxed) {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    tokio::time::sleep(WARM_UP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let counted = reads.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    if audit_enabled {
        let records = broker.audit_records().await.len();
        assert!(
            records as u64 >= counted,
            "every counted read has its record"
        );
    }
    broker.finish().await;
    counted as f64 / elapsed.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut audited = Vec::new();
    let mut unaudited = Vec::new();
    for round in 1..=ROUNDS {
        let with_audit = reads_per_second(true).await;
        let without_audit = reads_per_second(false).await;
        println!("round {round}: audited {with_audit:.0}/s, unaudited {without_audit:.0}/s");
        audited.push(with_audit);
        unaudited.push(without_audit);
    }

    let best = |values: &[f64]| values.iter().copied().fold(0.0, f64::max);
    let median = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let cost = |audited: f64, unaudited: f64| (1.0 - audited / unaudited) * 100.0;
    let (best_audited, best_unaudited) = (best(&audited), best(&unaudited));
    let (median_audited, median_unaudited) = (median(&audited), median(&unaudited));
    println!();
    println!("audited reads (durable group commit, SQLite): {best_audited:.0}/s");
    println!("reads with audit disabled:                    {best_unaudited:.0}/s");
    println!(
        "audit cost: {:.1}% of throughput (target: under 15%); medians {median_audited:.0}/s \
         and {median_unaudited:.0}/s, {:.1}%",
        cost(best_audited, best_unaudited),
        cost(median_audited, median_unaudited)
    );
}
