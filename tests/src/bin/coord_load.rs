//! `coord-load`: the coordinator's own cost under a fleet, without the fleet. Submits a recipe
//! to a running coordinator, then N simulated worker slots (8 per worker process, each process
//! with its own connection) poll, renew once (unless `--no-renew`) and complete every task as fast as the coordinator hands them out, without
//! reading or writing any data. Prints the completions per second, the time per RPC (p50,
//! p99, max) and, given the coordinator's pid, its resident memory; exits 1 if any result was
//! refused or the job did not succeed.
//!
//! The fake completions are well formed, so the coordinator takes its real path (checks,
//! journal, commit) for every one: a write task reports the byte count of its range
//! (`bytes_written` = the range's length), a CRC-32 of that many zero bytes, and a part
//! receipt of the same length with the CRC-32C of those zeros and the part number the plan
//! reserved (multipart outputs); zeros are what a local output's preallocated (sparse)
//! temporary file holds where nothing was written. Statistics tasks cannot be faked (their
//! partials feed the merge), so use a recipe without statistics passes (task_arithmetic,
//! linear).
//!
//!   coord-load --coordinator http://127.0.0.1:50051 --recipe bench/70b/task_arithmetic.yml \
//!       --out /tmp/l70b-out --slots 64 [--pid PID]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use shardmerge_proto as pb;
use shardmerge_worker::client;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    coordinator: String,
    #[arg(long)]
    recipe: std::path::PathBuf,
    #[arg(long)]
    out: String,
    #[arg(long, default_value_t = 64)]
    slots: usize,
    /// The coordinator's process id, to report its memory
    #[arg(long)]
    pid: Option<u32>,
    /// Complete each task without renewing its lease first, as a real worker does with a
    /// task shorter than a third of the lease TTL (default: renew once, 3 RPCs per task)
    #[arg(long)]
    no_renew: bool,
}

#[derive(Default)]
struct Times {
    poll: Vec<f64>,
    renew: Vec<f64>,
    complete: Vec<f64>,
    /// CompleteTask calls the coordinator refused (`accepted: false`) or that failed
    refused: usize,
    /// When the last accepted completion returned
    last_done: Option<Instant>,
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// (CRC-32, CRC-32C) of `n` zero bytes.
fn zero_crcs(n: u64) -> (u32, u32) {
    let zeros = [0u8; 1 << 16];
    let mut h = crc32fast::Hasher::new();
    let mut c = 0u32;
    let mut left = n;
    while left > 0 {
        let k = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..k]);
        c = crc32c::crc32c_append(c, &zeros[..k]);
        left -= k as u64;
    }
    (h.finalize(), c)
}

/// A well-formed result of a write task that wrote zeros (see the module's note); the
/// checksums of each length are computed once (`crcs`), so that the tool spends its CPU on
/// RPCs, not on hashing zeros.
fn zero_result(task: Option<&pb::Task>, crcs: &mut HashMap<u64, (u32, u32)>) -> pb::TaskResult {
    let Some(pb::task::Kind::Write(w)) = task.and_then(|t| t.kind.as_ref()) else {
        return pb::TaskResult::default();
    };
    let Some(out) = w.output.as_ref() else {
        return pb::TaskResult::default();
    };
    let part_index = match &out.sink {
        Some(pb::output_target::Sink::Multipart(m)) => m.part_index,
        _ => 0,
    };
    let (crc, crc32c) = *crcs
        .entry(out.length)
        .or_insert_with(|| zero_crcs(out.length));
    // an audit (another process's result computed again) writes nothing and says so
    let audit = task.is_some_and(|t| t.audit);
    pb::TaskResult {
        bytes_read: 0,
        bytes_written: if audit { 0 } else { out.length },
        checksum: crc,
        part: Some(pb::PartReceipt {
            part_index,
            etag: String::new(),
            size: out.length,
            crc32c,
        }),
        stats: None,
        inputs: Vec::new(),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize] * 1e3
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let a = Args::parse();
    let recipe = std::fs::read_to_string(&a.recipe)
        .map_err(|e| format!("{}: cannot read recipe: {e}", a.recipe.display()))?;
    let mut c = client::client(&a.coordinator)?;
    let t0 = Instant::now();
    let job = c
        .submit_job(pb::SubmitJobRequest {
            recipe_yaml: recipe,
            output_uri: a.out.clone(),
            options: Some(pb::JobOptions {
                base_dir: std::env::current_dir()
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .into_owned(),
                ..Default::default()
            }),
            more_points: Vec::new(),
        })
        .await
        .map_err(|s| format!("submit: {}", s.message()))?
        .into_inner();
    let submit_s = t0.elapsed().as_secs_f64();
    let total = job.status.as_ref().map_or(0, |s| s.tasks_total);
    eprintln!(
        "submitted {} in {submit_s:.2}s: {total} tasks; {} slots",
        job.job_id, a.slots
    );
    if let Some(pid) = a.pid {
        eprintln!(
            "coordinator after planning: VmRSS {} MiB",
            status_kb(pid, "VmRSS:").unwrap_or(0) / 1024
        );
    }
    let times = Arc::new(Mutex::new(Times::default()));
    // a connection per simulated worker process (8 slots each), as a fleet has
    let mut conns = Vec::new();
    for _ in 0..a.slots.div_ceil(8) {
        conns.push(client::client(&a.coordinator)?);
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    let no_renew = a.no_renew;
    for slot in 0..a.slots {
        let mut c = conns[slot / 8].clone();
        let times = times.clone();
        handles.push(tokio::spawn(async move {
            let wid = format!("load-{}/{slot}", slot / 8);
            let mut idle = 0;
            let mut crcs = HashMap::new();
            loop {
                let t = Instant::now();
                let r = c
                    .poll_work(pb::PollWorkRequest {
                        worker_id: wid.clone(),
                        free_slots: 1,
                        slot_memory: 1 << 30,
                    })
                    .await;
                let dt = t.elapsed().as_secs_f64();
                let Ok(r) = r else { break };
                let r = r.into_inner();
                times
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .poll
                    .push(dt);
                if r.leases.is_empty() {
                    idle += 1;
                    if idle > 20 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(r.retry_after_ms.max(5) as u64)).await;
                    continue;
                }
                idle = 0;
                for lease in r.leases {
                    let t = Instant::now();
                    if !no_renew {
                        let _ = c
                            .renew_lease(pb::RenewLeaseRequest {
                                worker_id: wid.clone(),
                                lease_ids: vec![lease.lease_id.clone()],
                            })
                            .await;
                    }
                    let renew = t.elapsed().as_secs_f64();
                    let result = zero_result(lease.task.as_ref(), &mut crcs);
                    let t = Instant::now();
                    let accepted = c
                        .complete_task(pb::CompleteTaskRequest {
                            worker_id: wid.clone(),
                            lease_id: lease.lease_id,
                            result: Some(result),
                        })
                        .await;
                    let complete = t.elapsed().as_secs_f64();
                    let ok = accepted.is_ok_and(|r| r.into_inner().accepted);
                    let mut tm = times.lock().unwrap_or_else(|p| p.into_inner());
                    tm.refused += usize::from(!ok);
                    if ok {
                        tm.last_done = Some(Instant::now());
                    }
                    if !no_renew {
                        tm.renew.push(renew);
                    }
                    tm.complete.push(complete);
                }
            }
        }));
    }
    let mut peak_rss = 0;
    let mut sampler = tokio::time::interval(Duration::from_millis(200));
    while !handles.iter().all(|h| h.is_finished()) {
        sampler.tick().await;
        if let Some(pid) = a.pid {
            peak_rss = peak_rss.max(status_kb(pid, "VmRSS:").unwrap_or(0));
        }
    }
    // to the last accepted completion: the slots' idle polls at the end are not the job's
    let last_done = times.lock().unwrap_or_else(|p| p.into_inner()).last_done;
    let wall = last_done
        .map_or_else(|| start.elapsed(), |t| t.duration_since(start))
        .as_secs_f64();
    // the last completion may still be committing the checkpoint
    let st = loop {
        let st = c
            .get_job(pb::GetJobRequest {
                job_id: job.job_id.clone(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let running = [
            pb::JobState::Queued,
            pb::JobState::Running,
            pb::JobState::Committing,
        ]
        .iter()
        .any(|&s| s as i32 == st.state);
        if !running || start.elapsed() > Duration::from_secs(3600) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let state = pb::JobState::try_from(st.state)
        .map_or_else(|_| st.state.to_string(), |s| s.as_str_name().to_string());
    let mut guard = times.lock().unwrap_or_else(|p| p.into_inner());
    let refused = guard.refused;
    let Times {
        poll,
        renew,
        complete,
        ..
    } = &mut *guard;
    let accepted = complete.len() - refused;
    println!(
        "job {}: state {state}, tasks {}/{} in {wall:.2}s: {:.0} completions/s with {} slots \
         ({accepted} accepted, {refused} refused)",
        st.job_id,
        st.tasks_done,
        st.tasks_total,
        accepted as f64 / wall.max(1e-9),
        a.slots
    );
    for (name, v) in [
        ("PollWork", poll),
        ("RenewLease", renew),
        ("CompleteTask", complete),
    ] {
        println!(
            "{name:<13} n={:<6} p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    if let Some(pid) = a.pid {
        println!(
            "coordinator memory: peak RSS sampled {} MiB, VmHWM {} MiB",
            peak_rss / 1024,
            status_kb(pid, "VmHWM:").unwrap_or(0) / 1024
        );
    }
    if refused > 0 || st.state != pb::JobState::Succeeded as i32 {
        return Err(format!(
            "job {} ended {state} with {refused} results refused: the figures above do not \
             measure the coordinator's path for accepted work",
            st.job_id
        ));
    }
    Ok(())
}
