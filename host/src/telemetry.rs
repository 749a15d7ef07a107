//! Prometheus metrics of a server (`GET /metrics`, the text format), named `soulbox_*`, with
//! units in their names and `_total` on counters:
//!
//! - `soulbox_sandboxes{state,template}`: live sandboxes; `soulbox_tier_sandboxes{team,tier}`:
//!   those active in a tier (a kernel started, a native sandbox running).
//! - `soulbox_sandbox_creates_total{template,outcome}` and
//!   `soulbox_sandbox_create_duration_seconds{template}`.
//! - `soulbox_executions_total{kind}` (cells, processes, terminals started),
//!   `soulbox_execution_duration_seconds{tier}` and
//!   `soulbox_execution_terminations_total{tier,termination}` (how they ended: `exited`,
//!   `timed_out`, `memory_exceeded` for OOM kills, ..., `failed`), `soulbox_running_executions`.
//! - `soulbox_admission_refusals_total{reason}`, `soulbox_memory_available_bytes`.
//! - `soulbox_pool_sandboxes{tier,pool}`, `soulbox_pool_target_sandboxes{tier,pool}`,
//!   `soulbox_pool_hits_total{tier,pool}`, `soulbox_pool_misses_total{tier,pool}`: the native
//!   tier's prepared sandboxes (`pool="native"`, and `pool="template:<build>"` for each
//!   template in use) and the warm kernels of each language.
//! - `soulbox_team_cpu_seconds{team,tier}` and `soulbox_team_memory_bytes{team,tier}`: what
//!   each tenant's live sandboxes have used and hold now.
//! - `soulbox_api_responses_total{class}`.
//!
//! Gauges, and counters kept elsewhere (admission, the pool), are read when scraped.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use soulbox_runtime::{ExecutionObserver, SandboxState, Termination, Tier};

use crate::app::App;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CreateLabels {
    template: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabels {
    template: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    state: String,
    template: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    tier: String,
    /// `native` (prepared sandboxes), or a language (its warm kernels).
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TerminationLabels {
    tier: String,
    termination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TeamLabels {
    team: String,
    tier: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The metrics of a server.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    creates: Family<CreateLabels, Counter>,
    create_seconds: Family<TemplateLabels, Histogram>,
    executions: Family<KindLabels, Counter>,
    execution_seconds: Family<TierLabels, Histogram>,
    terminations: Family<TerminationLabels, Counter>,
    executions_running: Gauge,
    refusals: Family<ReasonLabels, Counter>,
    memory_available: Gauge,
    responses: Family<StatusLabels, Counter>,
    sandboxes: Family<SandboxLabels, Gauge>,
    tier_sandboxes: Family<TeamLabels, Gauge>,
    team_cpu_seconds: Family<TeamLabels, FloatGauge>,
    team_memory_bytes: Family<TeamLabels, Gauge>,
    pool_ready: Family<PoolLabels, Gauge>,
    pool_target: Family<PoolLabels, Gauge>,
    pool_hits: Family<PoolLabels, Counter>,
    pool_misses: Family<PoolLabels, Counter>,
}

/// Histogram buckets from 0.5 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("soulbox");
        let creates = Family::<CreateLabels, Counter>::default();
        registry.register(
            "sandbox_creates",
            "Sandbox creates, by template and outcome",
            creates.clone(),
        );
        let create_seconds =
            Family::<TemplateLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "sandbox_create_duration_seconds",
            "Time to create a sandbox, by template",
            create_seconds.clone(),
        );
        let executions = Family::<KindLabels, Counter>::default();
        registry.register(
            "executions",
            "Executions started in sandboxes, by kind",
            executions.clone(),
        );
        let execution_seconds =
            Family::<TierLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "execution_duration_seconds",
            "Time from an execution's acceptance to its end, by tier",
            execution_seconds.clone(),
        );
        let terminations = Family::<TerminationLabels, Counter>::default();
        registry.register(
            "execution_terminations",
            "Executions ended, by tier and how (timed_out, memory_exceeded for OOM kills...)",
            terminations.clone(),
        );
        let executions_running = Gauge::default();
        registry.register(
            "running_executions",
            "Executions holding a place in admission control now",
            executions_running.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "admission_refusals",
            "New work refused by admission control, by reason",
            refusals.clone(),
        );
        let memory_available = Gauge::default();
        registry.register(
            "memory_available_bytes",
            "Memory the server may still take (the host's, or its cgroup's if less)",
            memory_available.clone(),
        );
        let responses = Family::<StatusLabels, Counter>::default();
        registry.register("api_responses", "API answers, by status class", responses.clone());
        let sandboxes = Family::<SandboxLabels, Gauge>::default();
        registry.register("sandboxes", "Live sandboxes, by state and template", sandboxes.clone());
        let tier_sandboxes = Family::<TeamLabels, Gauge>::default();
        registry.register(
            "tier_sandboxes",
            "Live sandboxes active in a tier, by team",
            tier_sandboxes.clone(),
        );
        let team_cpu_seconds = Family::<TeamLabels, FloatGauge>::default();
        registry.register(
            "team_cpu_seconds",
            "CPU time used by a team's live sandboxes, by tier",
            team_cpu_seconds.clone(),
        );
        let team_memory_bytes = Family::<TeamLabels, Gauge>::default();
        registry.register(
            "team_memory_bytes",
            "Memory held by a team's live sandboxes now, by tier",
            team_memory_bytes.clone(),
        );
        let pool_ready = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_sandboxes",
            "Prepared sandboxes or warm kernels waiting in a pool",
            pool_ready.clone(),
        );
        let pool_target = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_target_sandboxes",
            "How many a pool aims to keep ready, from recent demand",
            pool_target.clone(),
        );
        let pool_hits = Family::<PoolLabels, Counter>::default();
        registry.register("pool_hits", "Takes served from a pool", pool_hits.clone());
        let pool_misses = Family::<PoolLabels, Counter>::default();
        registry.register("pool_misses", "Takes that found the pool empty", pool_misses.clone());
        Self {
            registry,
            creates,
            create_seconds,
            executions,
            execution_seconds,
            terminations,
            executions_running,
            refusals,
            memory_available,
            responses,
            sandboxes,
            tier_sandboxes,
            team_cpu_seconds,
            team_memory_bytes,
            pool_ready,
            pool_target,
            pool_hits,
            pool_misses,
        }
    }
}

/// A gauge's value from a count.
fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Brings a counter kept elsewhere up to `total`.
fn counter_to(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// How an execution ended, as a label.
fn termination_label(termination: Option<&Termination>) -> &'static str {
    match termination {
        None => "failed",
        Some(Termination::Exited { .. }) => "exited",
        Some(Termination::Signalled { .. }) => "signalled",
        Some(Termination::TimedOut { .. }) => "timed_out",
        Some(Termination::MemoryExceeded { .. }) => "memory_exceeded",
        Some(Termination::OutputLimitExceeded { .. }) => "output_limit_exceeded",
        Some(_) => "crashed",
    }
}

impl ExecutionObserver for Telemetry {
    fn execution_ended(&self, tier: Tier, termination: Option<&Termination>, took: Duration) {
        let tier = tier.to_string();
        self.execution_seconds
            .get_or_create(&TierLabels { tier: tier.clone() })
            .observe(took.as_secs_f64());
        let termination = termination_label(termination).to_owned();
        self.terminations.get_or_create(&TerminationLabels { tier, termination }).inc();
    }
}

impl Telemetry {
    /// Counts a create of `template` that took `seconds`, by its outcome (`created`,
    /// `refused`, `failed`).
    pub fn sandbox_create(&self, template: &str, outcome: &str, seconds: f64) {
        let labels = CreateLabels { template: template.to_owned(), outcome: outcome.to_owned() };
        self.creates.get_or_create(&labels).inc();
        if outcome == "created" {
            self.create_seconds
                .get_or_create(&TemplateLabels { template: template.to_owned() })
                .observe(seconds);
        }
    }

    /// Counts an execution of `kind` (`process`, `cell`, `terminal`).
    pub fn execution(&self, kind: &str) {
        self.executions.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    /// Counts an API answer with `status`.
    pub fn response(&self, status: u16) {
        let class = format!("{}xx", status / 100);
        self.responses.get_or_create(&StatusLabels { class }).inc();
    }

    /// The metrics in Prometheus' text format, with what is kept elsewhere read now.
    pub fn render(&self, app: &App) -> String {
        self.sandboxes.clear();
        self.tier_sandboxes.clear();
        self.team_cpu_seconds.clear();
        self.team_memory_bytes.clear();
        if let Some(manager) = app.manager() {
            let counts = manager.count_by(|record| {
                let state = match record.state {
                    SandboxState::Running => "running",
                    SandboxState::Paused => "paused",
                };
                (state, record.template.clone())
            });
            for ((state, template), count) in counts {
                let labels = SandboxLabels { state: state.to_owned(), template };
                self.sandboxes.get_or_create(&labels).set(gauge_value(count));
            }
            for ((team, tier), load) in manager.load_by_team() {
                let labels = TeamLabels { team, tier: tier.to_string() };
                self.tier_sandboxes.get_or_create(&labels).set(gauge_value(load.sandboxes));
                self.team_cpu_seconds.get_or_create(&labels).set(load.cpu_time.as_secs_f64());
                self.team_memory_bytes.get_or_create(&labels).set(gauge_value(load.memory_bytes));
            }
        }
        let admission = app.admission();
        self.executions_running.set(gauge_value(admission.executions_running()));
        // Every reason, zero included, so that rates are defined from the start.
        let refusals = admission.refusals();
        for reason in crate::admission::REFUSAL_REASONS {
            let counter = self.refusals.get_or_create(&ReasonLabels { reason: reason.to_owned() });
            counter_to(&counter, refusals.get(reason).copied().unwrap_or(0));
        }
        self.memory_available.set(gauge_value(soulbox_runtime::host_memory::available_bytes()));
        let mut pools = Vec::new();
        #[cfg(feature = "native")]
        pools.extend(app.native_pool().map(|stats| (Tier::Native, "native".to_owned(), stats)));
        #[cfg(feature = "native")]
        pools.extend(
            app.template_pools()
                .into_iter()
                .map(|(build, stats)| (Tier::Native, format!("template:{build}"), stats)),
        );
        #[cfg(feature = "wasm")]
        pools.extend(
            app.wasm()
                .warm_stats()
                .into_iter()
                .map(|(l, stats)| (Tier::Wasm, l.to_string(), stats)),
        );
        for (tier, pool, stats) in pools {
            let labels = PoolLabels { tier: tier.to_string(), pool };
            self.pool_ready.get_or_create(&labels).set(gauge_value(stats.ready));
            self.pool_target.get_or_create(&labels).set(gauge_value(stats.target));
            counter_to(&self.pool_hits.get_or_create(&labels), stats.hits);
            counter_to(&self.pool_misses.get_or_create(&labels), stats.misses);
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
