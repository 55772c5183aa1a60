//! The one HTTP purge sink. Every provider goes the same way through a batch, here: check each
//! item ([`Provider::check`]; rejections before anything is sent), cut the accepted ones into
//! requests ([`Provider::jobs`]; by default chunks of `limits.items_per_request`), send them with
//! at most `limits.concurrency` in flight per node and narrow item-level rejections to the
//! culprit ([`run_jobs`]), then verify and report ([`finish`]). Rate limits, retries and their
//! metrics are the shared [`super::http::Sender`]'s, which each provider's [`Provider::send`]
//! calls with its own request builder and answer interpreter.
//!
//! A provider therefore supplies only what differs: which kinds it serves, which items it
//! accepts, how it cuts requests when the default does not fit (Varnish per node, Akamai by body
//! size, CloudFront by path), how one request is built and signed, and how an answer is read.
//! `purge_sink!` makes it a [`crate::sink::Sink`].

use async_trait::async_trait;

use super::http::Failure;
use super::verify::Verifier;
use super::{chunk, finish, partition, run_jobs, Job, Limits};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError, SinkReport};

/// What a provider supplies to the shared purge sink.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The configured name: a metric label and a log field.
    fn name(&self) -> &str;

    /// The kinds of item this provider purges.
    fn kinds(&self) -> &'static [ItemKind];

    /// The resolved `limits` (items per request, concurrency).
    fn limits(&self) -> &Limits;

    /// The post-purge freshness check, when configured.
    fn verifier(&self) -> Option<&Verifier>;

    /// Whether the provider accepts `item` of `kind`; `Err` rejects it (dead-lettered) with the
    /// reason, before anything is sent.
    fn check(&self, kind: ItemKind, item: &str) -> Result<(), String>;

    /// Cuts the accepted items of `kind` (indices into the batch's list) into requests.
    fn jobs(&self, batch: &Invalidations, kind: ItemKind, accepted: &[usize]) -> Vec<Job> {
        let _ = batch;
        chunk(accepted, self.limits().items_per_request, None, |_| 0)
            .into_iter()
            .map(|items| Job { node: 0, kind, items })
            .collect()
    }

    /// Builds one job's request, sends it through the shared sender (rate limits, retries,
    /// metrics), and interprets the answer: `Ok(Err(failure))` for a permanent refusal.
    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError>;

    /// Whether the provider answers right now (for `/readyz`).
    async fn ping(&self) -> bool;
}

/// The accessors of [`Provider`] every provider answers from its own fields, which it keeps
/// under these names: `name: String`, `limits: Limits`, `verifier: Option<Verifier>`. Invoked
/// inside each `impl Provider`.
macro_rules! provider_fields {
    () => {
        fn name(&self) -> &str {
            &self.name
        }

        fn limits(&self) -> &$crate::sink::cdn::Limits {
            &self.limits
        }

        fn verifier(&self) -> Option<&$crate::sink::cdn::verify::Verifier> {
            self.verifier.as_ref()
        }
    };
}
pub(crate) use provider_fields;

/// The shared path of every provider's `invalidate`.
pub async fn purge<P: Provider + ?Sized>(
    provider: &P,
    batch: &Invalidations,
    shutdown: &Shutdown,
) -> Result<SinkReport, SinkError> {
    let mut rejected = Vec::new();
    let mut jobs = Vec::new();
    for &kind in provider.kinds() {
        let accepted = partition(batch, kind, |item| provider.check(kind, item), &mut rejected);
        jobs.extend(provider.jobs(batch, kind, &accepted));
    }
    let send = |job: Job| provider.send(job, batch, shutdown);
    rejected.extend(run_jobs(jobs, provider.limits().concurrency, send).await?);
    Ok(finish(batch, provider.kinds(), rejected, provider.verifier()))
}

/// Makes a [`Provider`] a [`crate::sink::Sink`] through [`purge`]: one line per provider.
macro_rules! purge_sink {
    ($provider:ty) => {
        #[async_trait::async_trait]
        impl $crate::sink::Sink for $provider {
            fn name(&self) -> &str {
                $crate::sink::cdn::purge::Provider::name(self)
            }

            fn kinds(&self) -> &'static [$crate::sink::ItemKind] {
                $crate::sink::cdn::purge::Provider::kinds(self)
            }

            async fn invalidate(
                &self,
                batch: &$crate::sink::Invalidations,
                shutdown: &$crate::shutdown::Shutdown,
            ) -> Result<$crate::sink::SinkReport, $crate::sink::SinkError> {
                $crate::sink::cdn::purge::purge(self, batch, shutdown).await
            }

            async fn ping(&self) -> bool {
                $crate::sink::cdn::purge::Provider::ping(self).await
            }
        }
    };
}

pub(crate) use purge_sink;
