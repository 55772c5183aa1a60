//! Histograms observed once per event and added to once per batch: the staleness figures.
//!
//! The pipeline observes about six histograms per event. `prometheus::local::LocalHistogram`
//! already added to the shared histogram once per batch, but its `observe` scans the bucket
//! bounds one by one (up to 26 for the staleness buckets) and the crate has no way to add a
//! bucket's count at once, so a [`Tally`] finds the bucket by binary search, counts per bucket,
//! and adds its counts, count and sum to its [`BatchHistogram`] in one step (one lock, not one
//! atomic update per event). The same value observed by several histograms with the same
//! bounds (a finished event's staleness, per table and per sink) is placed once ([`Placed`]).
//!
//! What is exported is exactly what `prometheus::Histogram` exports: a `BatchHistogram` is
//! built, labelled and collected through the crate's own `MetricVec` and `Registry`, and makes
//! the same `proto::Histogram` (cumulative buckets, count, sum), so names, labels, buckets and
//! values are unchanged; a value above every bound (or NaN) is counted only in `+Inf`, as the
//! crate counts it, and sums add in the same order as a `LocalHistogram`'s.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc, Describer, Metric, MetricVec, MetricVecBuilder};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::HistogramOpts;

/// The most bounds a [`BatchHistogram`] may have (the staleness buckets have 26): a [`Tally`]
/// counts in a fixed array, without allocating.
const MAX_BOUNDS: usize = 31;

/// A histogram added to by [`Tally`]s. Cloning it shares the series (as `Histogram` does).
#[derive(Clone)]
pub struct BatchHistogram {
    core: Arc<Core>,
}

struct Core {
    desc: Desc,
    label_pairs: Vec<LabelPair>,
    /// The finite upper bounds, ascending (`+Inf` is implicit).
    bounds: &'static [f64],
    totals: Mutex<Totals>,
}

/// Everything observed so far. Behind one lock, so a scrape sees every bucket, the count and
/// the sum of the same batches.
#[derive(Default)]
struct Totals {
    /// Per bound, non-cumulative; the last slot counts the values above every bound (and NaN).
    counts: [u64; MAX_BOUNDS + 1],
    count: u64,
    sum: f64,
}

/// The labelled family: `prometheus`' own `MetricVec` (series made on first use, the same
/// label checks and ordering), holding [`BatchHistogram`]s.
pub type BatchHistogramVec = MetricVec<Builder>;

/// Makes the series of a [`BatchHistogramVec`] over its bounds.
#[derive(Clone)]
pub struct Builder {
    bounds: &'static [f64],
}

impl MetricVecBuilder for Builder {
    type M = BatchHistogram;
    type P = HistogramOpts;

    fn build<V: AsRef<str>>(&self, opts: &HistogramOpts, values: &[V]) -> prometheus::Result<BatchHistogram> {
        BatchHistogram::with_label_values(opts, self.bounds, values)
    }
}

/// Why bounds cannot be a histogram's (checked once, when the metric is defined).
fn check_bounds(bounds: &[f64]) -> prometheus::Result<()> {
    if bounds.is_empty() || bounds.len() > MAX_BOUNDS {
        return Err(prometheus::Error::Msg(format!("between 1 and {MAX_BOUNDS} bounds, not {}", bounds.len())));
    }
    if !bounds.windows(2).all(|w| matches!(w, [a, b] if a < b)) || bounds.iter().any(|b| !b.is_finite()) {
        return Err(prometheus::Error::Msg("histogram bounds must be finite and increasing".into()));
    }
    Ok(())
}

/// A family labelled with `labels` over `bounds` (which must be finite and increasing).
pub fn vec(name: &str, help: &str, labels: &[&str], bounds: &'static [f64]) -> prometheus::Result<BatchHistogramVec> {
    check_bounds(bounds)?;
    let opts = HistogramOpts::new(name, help)
        .buckets(bounds.to_vec())
        .variable_labels(labels.iter().map(|l| l.to_string()).collect());
    MetricVec::create(MetricType::HISTOGRAM, Builder { bounds }, opts)
}

impl BatchHistogram {
    /// An unlabelled histogram over `bounds` (which must be finite and increasing).
    pub fn new(name: &str, help: &str, bounds: &'static [f64]) -> prometheus::Result<BatchHistogram> {
        check_bounds(bounds)?;
        BatchHistogram::with_label_values::<&str>(&HistogramOpts::new(name, help), bounds, &[])
    }

    fn with_label_values<V: AsRef<str>>(
        opts: &HistogramOpts,
        bounds: &'static [f64],
        values: &[V],
    ) -> prometheus::Result<BatchHistogram> {
        let desc = opts.describe()?;
        if desc.variable_labels.len() != values.len() {
            return Err(prometheus::Error::InconsistentCardinality {
                expect: desc.variable_labels.len(),
                got: values.len(),
            });
        }
        // As `prometheus` makes a series' labels: variable then constant ones, sorted by name.
        let mut label_pairs: Vec<LabelPair> = desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.clone());
                pair.set_value(value.as_ref().to_owned());
                pair
            })
            .collect();
        label_pairs.extend(desc.const_label_pairs.iter().cloned());
        label_pairs.sort();
        let totals = Mutex::new(Totals::default());
        Ok(BatchHistogram { core: Arc::new(Core { desc, label_pairs, bounds, totals }) })
    }

    /// A local tally of this histogram, added to it by [`Tally::flush`] (or when dropped).
    pub fn tally(&self) -> Tally {
        Tally { histogram: self.clone(), counts: [0; MAX_BOUNDS + 1], count: 0, sum: 0.0 }
    }

    /// Observes one value at once (for a figure observed once per batch, not per event).
    pub fn observe(&self, value: f64) {
        self.tally().observe(value);
    }

    fn add(&self, tally: &Tally) {
        let mut totals = self.core.totals.lock().unwrap_or_else(PoisonError::into_inner);
        for (total, n) in totals.counts.iter_mut().zip(tally.counts) {
            *total += n;
        }
        totals.count += tally.count;
        totals.sum += tally.sum;
    }

    /// What `prometheus::Histogram` reports for the same observations.
    fn proto(&self) -> proto::Histogram {
        let (counts, count, sum) = {
            let totals = self.core.totals.lock().unwrap_or_else(PoisonError::into_inner);
            (totals.counts, totals.count, totals.sum)
        };
        let mut cumulative = 0;
        let buckets = self
            .core
            .bounds
            .iter()
            .zip(counts)
            .map(|(bound, n)| {
                cumulative += n;
                let mut bucket = proto::Bucket::default();
                bucket.set_cumulative_count(cumulative);
                bucket.set_upper_bound(*bound);
                bucket
            })
            .collect();
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_sum(sum);
        histogram.set_sample_count(count);
        histogram.set_bucket(buckets);
        histogram
    }
}

impl Metric for BatchHistogram {
    fn metric(&self) -> proto::Metric {
        let mut metric = proto::Metric::from_label(self.core.label_pairs.clone());
        metric.set_histogram(self.proto());
        metric
    }
}

/// An unlabelled one is registered on its own (as `prometheus::Histogram` is).
impl Collector for BatchHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.core.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut family = MetricFamily::default();
        family.set_name(self.core.desc.fq_name.clone());
        family.set_help(self.core.desc.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(vec![self.metric()]);
        vec![family]
    }
}

/// A value with its bucket found, to add to several tallies over the same bounds with one
/// search ([`Tally::place`], [`Tally::add`]).
#[derive(Debug, Clone, Copy)]
pub struct Placed {
    value: f64,
    bucket: usize,
    bounds: &'static [f64],
}

/// Observations counted locally and added to a [`BatchHistogram`] at once: what one stage
/// observed of one batch. Added when flushed, or when dropped (as a `LocalHistogram` is).
pub struct Tally {
    histogram: BatchHistogram,
    counts: [u64; MAX_BOUNDS + 1],
    count: u64,
    sum: f64,
}

/// The bucket `value` falls in: the first bound it is at most, else `bounds.len()` (above
/// every bound, or NaN: only `+Inf` counts it, as in `prometheus`).
fn bucket_of(bounds: &[f64], value: f64) -> usize {
    // Written as the negation of `<=` on purpose: NaN is at most no bound.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    bounds.partition_point(|bound| !(value <= *bound))
}

impl Tally {
    pub fn observe(&mut self, value: f64) {
        let placed = self.place(value);
        self.add(placed);
    }

    /// `value` with its bucket in this tally's histogram.
    pub fn place(&self, value: f64) -> Placed {
        let bounds = self.histogram.core.bounds;
        Placed { value, bucket: bucket_of(bounds, value), bounds }
    }

    /// Observes a placed value (placed again if it was placed over other bounds).
    pub fn add(&mut self, placed: Placed) {
        let bounds = self.histogram.core.bounds;
        let bucket = match std::ptr::eq(placed.bounds, bounds) {
            true => placed.bucket,
            false => bucket_of(bounds, placed.value),
        };
        if let Some(n) = self.counts.get_mut(bucket) {
            *n += 1;
        }
        self.count += 1;
        self.sum += placed.value;
    }

    /// Adds what was observed to the histogram, and starts over.
    pub fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        self.histogram.add(self);
        self.counts = [0; MAX_BOUNDS + 1];
        self.count = 0;
        self.sum = 0.0;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.5, 1.0, 2.5];

    /// The text exposition of one registry holding `collector`.
    fn exposition(collector: Box<dyn Collector>) -> String {
        use prometheus::Encoder;
        let registry = prometheus::Registry::new();
        registry.register(collector).unwrap();
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    /// Values on, between, below and above the bounds, negative, infinite and NaN.
    fn values() -> Vec<f64> {
        let mut values = vec![
            0.0,
            -1.0,
            0.001,
            0.0010000001,
            0.0025,
            0.003,
            0.5,
            0.49999,
            1.0,
            2.5,
            2.5000001,
            7.0,
            1e9,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            values.push((seed % 4_000_000) as f64 / 1_000_000.0);
        }
        values
    }

    /// The same observations through `prometheus`' own histogram (observed locally and flushed
    /// in the same batches) and through a tally: the same exposition, byte for byte.
    fn same_exposition(values: &[f64], batch: usize) {
        let theirs =
            prometheus::HistogramVec::new(HistogramOpts::new("h_seconds", "Help.").buckets(BOUNDS.to_vec()), &["sink"])
                .unwrap();
        let ours = vec("h_seconds", "Help.", &["sink"], BOUNDS).unwrap();
        for sink in ["a", "b"] {
            for chunk in values.chunks(batch) {
                let local = theirs.with_label_values(&[sink]).local();
                let mut tally = ours.with_label_values(&[sink]).tally();
                for v in chunk {
                    local.observe(*v);
                    tally.observe(*v);
                }
                local.flush();
                tally.flush();
            }
        }
        // A series looked up and never observed exists in both, with zeros.
        theirs.with_label_values(&["idle"]);
        ours.with_label_values(&["idle"]);
        let expected = exposition(Box::new(theirs));
        assert!(values.is_empty() || expected.contains("h_seconds_bucket{sink=\"a\",le=\"+Inf\"}"), "{expected}");
        assert_eq!(exposition(Box::new(ours)), expected);

        let theirs =
            prometheus::Histogram::with_opts(HistogramOpts::new("p_seconds", "Plain.").buckets(BOUNDS.to_vec()))
                .unwrap();
        let ours = BatchHistogram::new("p_seconds", "Plain.", BOUNDS).unwrap();
        for chunk in values.chunks(batch) {
            let local = theirs.local();
            let mut tally = ours.tally();
            for v in chunk {
                local.observe(*v);
                tally.observe(*v);
            }
            // Flushed when dropped, both.
        }
        assert_eq!(exposition(Box::new(ours)), exposition(Box::new(theirs)));
    }

    #[test]
    fn a_tally_exports_what_prometheus_exports_for_the_same_values() {
        let values = values();
        for batch in [1, 7, 500, 10_000] {
            same_exposition(&values, batch);
        }
        same_exposition(&[], 1);
    }

    #[test]
    fn nan_is_counted_and_summed_as_prometheus_does() {
        // NaN falls in no finite bucket and makes the sum NaN: the same exposition.
        same_exposition(&[0.2, f64::NAN, 3.0], 2);
    }

    #[test]
    fn a_value_placed_once_counts_in_every_tally_it_is_added_to() {
        let one = BatchHistogram::new("one_seconds", "One.", BOUNDS).unwrap();
        let two = BatchHistogram::new("two_seconds", "Two.", BOUNDS).unwrap();
        let other: &'static [f64] = &[0.001, 10.0];
        let three = BatchHistogram::new("three_seconds", "Three.", other).unwrap();
        let theirs =
            prometheus::Histogram::with_opts(HistogramOpts::new("three_seconds", "Three.").buckets(other.to_vec()))
                .unwrap();
        let (mut a, mut b, mut c) = (one.tally(), two.tally(), three.tally());
        for v in values() {
            let placed = a.place(v);
            a.add(placed);
            b.add(placed);
            // Over other bounds: placed again.
            c.add(placed);
            theirs.observe(v);
        }
        drop((a, b, c));
        let rename = |text: String| text.replace("two_seconds", "one_seconds").replace("Two.", "One.");
        assert_eq!(rename(exposition(Box::new(two))), exposition(Box::new(one)));
        assert_eq!(exposition(Box::new(three)), exposition(Box::new(theirs)));
    }

    #[test]
    fn bounds_must_be_finite_increasing_and_few_enough() {
        assert!(BatchHistogram::new("x", "X.", &[]).is_err());
        assert!(BatchHistogram::new("x", "X.", &[1.0, 1.0]).is_err());
        assert!(BatchHistogram::new("x", "X.", &[2.0, 1.0]).is_err());
        assert!(BatchHistogram::new("x", "X.", &[1.0, f64::INFINITY]).is_err());
        assert!(BatchHistogram::new("x", "X.", &[0.0; MAX_BOUNDS + 1]).is_err());
        let many: &'static [f64] = Box::leak((0..MAX_BOUNDS).map(|i| i as f64).collect::<Vec<_>>().into_boxed_slice());
        assert!(BatchHistogram::new("x", "X.", many).is_ok());
    }
}
