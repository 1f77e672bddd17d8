//! Audited reads per second with durable group commit, against the same reads with audit
//! disabled, on the embedded SQLite default.
//!
//! Run with `scripts/bench` (it builds the release binary first). Two release brokers run
//! side by side on this machine, one audited and one not, each with one secret. 32 client
//! tasks read that secret in a loop over keep-alive connections, aimed at one broker at a
//! time: the load switches between the two every slice, in the order ABBA ABBA..., so that
//! a neighbour's burst or a slow drift of the shared machine lands on both about equally.
//! After each switch the requests still aimed at the other broker drain before counting
//! starts.
//!
//! Besides reads per second, it reports each broker's CPU time per read (user and system,
//! from /proc), which the machine's noise disturbs far less than throughput.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custos_end_to_end::{Broker, BrokerOptions, DatabaseKind};
use serde_json::json;

const CLIENTS: usize = 32;
const WARM_UP: Duration = Duration::from_secs(2);
/// How long the load stays on one broker before it switches.
const SLICE: Duration = Duration::from_millis(1000);
/// Left uncounted after a switch, while requests sent before it finish.
const SETTLE: Duration = Duration::from_millis(150);
/// Slices per broker.
const SLICES: usize = 16;

const AUDITED: usize = 0;
const UNAUDITED: usize = 1;

/// The phase the clients read: the slice number times two, plus one while counting. A
/// read is counted only if the phase did not change while it was under way.
struct Load {
    phase: AtomicU64,
    target: AtomicU64,
    reads: [AtomicU64; 2],
    stop: AtomicU64,
}

async fn start_broker(audit_enabled: bool) -> Broker {
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
    broker
}

/// CPU time the process has used so far, user and system, over all its threads.
fn cpu_time(process_id: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{process_id}/stat"))
        .expect("the broker's /proc entry is readable");
    // The command name may hold spaces; the fields after its closing parenthesis don't.
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ, which Linux fixes at 100 for what /proc reports whatever the kernel's tick.
    let ticks_per_second = 100;
    Duration::from_millis(ticks * 1000 / ticks_per_second)
}

#[derive(Debug, Default, Clone)]
struct Tally {
    reads: u64,
    time: Duration,
    cpu: Duration,
    /// Reads per second of each slice, in order.
    slices: Vec<f64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let brokers = [start_broker(true).await, start_broker(false).await];
    let urls: Vec<String> = brokers
        .iter()
        .map(|broker| broker.url("/v1/secrets/secret/bench"))
        .collect();
    let tokens: Vec<String> = brokers
        .iter()
        .map(|broker| broker.root_token.clone())
        .collect();
    let process_ids: Vec<u32> = brokers
        .iter()
        .map(|broker| broker.process_id().expect("the broker runs"))
        .collect();

    let load = Arc::new(Load {
        phase: AtomicU64::new(0),
        target: AtomicU64::new(AUDITED as u64),
        reads: [AtomicU64::new(0), AtomicU64::new(0)],
        stop: AtomicU64::new(0),
    });
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (load, urls, tokens) = (load.clone(), urls.clone(), tokens.clone());
        let http = reqwest::Client::new();
        clients.push(tokio::spawn(async move {
            while load.stop.load(Ordering::Relaxed) == 0 {
                let phase = load.phase.load(Ordering::Acquire);
                let target = load.target.load(Ordering::Acquire) as usize;
                let response = http
                    .get(&urls[target])
                    .bearer_auth(&tokens[target])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                if phase % 2 == 1 && load.phase.load(Ordering::Acquire) == phase {
                    load.reads[target].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Both brokers warm up (connections, caches) before anything is counted.
    for target in [AUDITED, UNAUDITED] {
        load.target.store(target as u64, Ordering::Release);
        tokio::time::sleep(WARM_UP).await;
    }

    let mut tallies = [Tally::default(), Tally::default()];
    let order = [AUDITED, UNAUDITED, UNAUDITED, AUDITED];
    for slice in 0..SLICES * 2 {
        let target = order[slice % order.len()];
        let base = (slice as u64 + 1) * 2;
        load.phase.store(base, Ordering::Release);
        load.target.store(target as u64, Ordering::Release);
        tokio::time::sleep(SETTLE).await;

        let reads_before = load.reads[target].load(Ordering::Relaxed);
        let cpu_before = cpu_time(process_ids[target]);
        let started = Instant::now();
        load.phase.store(base + 1, Ordering::Release);
        tokio::time::sleep(SLICE).await;
        load.phase.store(base + 2, Ordering::Release);
        let elapsed = started.elapsed();
        let cpu = cpu_time(process_ids[target]).saturating_sub(cpu_before);
        let reads = load.reads[target].load(Ordering::Relaxed) - reads_before;

        let tally = &mut tallies[target];
        tally.reads += reads;
        tally.time += elapsed;
        tally.cpu += cpu;
        tally.slices.push(reads as f64 / elapsed.as_secs_f64());
    }
    load.stop.store(1, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    let records = brokers[AUDITED].audit_records().await.len() as u64;
    assert!(
        records >= tallies[AUDITED].reads,
        "every counted audited read has its record"
    );
    for broker in brokers {
        broker.finish().await;
    }

    report(&tallies[AUDITED], &tallies[UNAUDITED]);
}

fn report(audited: &Tally, unaudited: &Tally) {
    let rate = |tally: &Tally| tally.reads as f64 / tally.time.as_secs_f64();
    let cpu_per_read = |tally: &Tally| tally.cpu.as_secs_f64() * 1e6 / tally.reads as f64;
    let cost = |audited: f64, unaudited: f64| (1.0 - audited / unaudited) * 100.0;

    // Slices k of each broker were run next to each other (ABBA), so their ratio is the
    // paired measure; its median shrugs off a slice that a neighbour's burst hit.
    let mut paired: Vec<f64> = audited
        .slices
        .iter()
        .zip(&unaudited.slices)
        .map(|(with_audit, without_audit)| cost(*with_audit, *without_audit))
        .collect();
    paired.sort_by(f64::total_cmp);
    let median_cost = paired[paired.len() / 2];

    let (audited_rate, unaudited_rate) = (rate(audited), rate(unaudited));
    println!(
        "{SLICES} slices of {} ms per broker, {CLIENTS} clients, SQLite, durable group commit",
        SLICE.as_millis()
    );
    println!(
        "audited reads:            {audited_rate:.0}/s  ({:.0} us of broker CPU per read)",
        cpu_per_read(audited)
    );
    println!(
        "reads with audit disabled: {unaudited_rate:.0}/s  ({:.0} us of broker CPU per read)",
        cpu_per_read(unaudited)
    );
    println!(
        "audit cost: {:.1}% of throughput (target: under 15%); median of paired slices {:.1}% \
         (from {:.1}% to {:.1}%)",
        cost(audited_rate, unaudited_rate),
        median_cost,
        paired[0],
        paired[paired.len() - 1]
    );
}
