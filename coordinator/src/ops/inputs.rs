//! The bytes the jobs known read from each input location (each store a job reads), from the
//! job manager's status snapshots at scrape time: `status`'s "read from" lines as metrics.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shardmerge_proto as pb;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InputLabels {
    input: String,
}

/// Read so far and planned, by input location, summed over the jobs known.
pub(super) struct InputGauges {
    read: Family<InputLabels, Gauge>,
    planned: Family<InputLabels, Gauge>,
}

impl InputGauges {
    pub(super) fn register(r: &mut Registry) -> Self {
        let read = Family::<InputLabels, Gauge>::default();
        r.register(
            "shardmerge_job_input_read_bytes",
            "Input bytes read from storage so far by the accepted tasks of the jobs known, by \
             input location (a model's folder or prefix: the store it is read from), every pass \
             included",
            read.clone(),
        );
        let planned = Family::<InputLabels, Gauge>::default();
        r.register(
            "shardmerge_job_input_read_planned_bytes",
            "Input bytes the jobs known read from storage by their plans, by input location",
            planned.clone(),
        );
        InputGauges { read, planned }
    }

    /// Sets the gauges from `jobs` (inputs no job reads any more are dropped).
    pub(super) fn set(&self, jobs: &[pb::JobStatus]) {
        let mut by: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for i in jobs.iter().flat_map(|s| &s.inputs) {
            let e = by.entry(i.input.as_str()).or_default();
            e.0 = e.0.saturating_add(i.bytes_read);
            e.1 = e.1.saturating_add(i.bytes_read_total);
        }
        self.read.clear();
        self.planned.clear();
        for (input, (read, planned)) in by {
            let l = InputLabels {
                input: input.to_string(),
            };
            self.read.get_or_create(&l).set(as_i64(read));
            self.planned.get_or_create(&l).set(as_i64(planned));
        }
    }
}

/// A byte count as a gauge's value (saturating).
pub(super) fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
