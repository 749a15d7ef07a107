//! Prometheus metrics of a server (`GET /metrics`, the text format), named `soulbox_*`:
//! sandboxes by state and template (read when scraped), creates by template and outcome with
//! their latency, executions by kind, API answers by status class, and the native tier's pool
//! of prepared sandboxes.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use soulbox_runtime::{ListFilter, SandboxManager, SandboxState};

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

/// The metrics of a server.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    creates: Family<CreateLabels, Counter>,
    create_seconds: Family<TemplateLabels, Histogram>,
    executions: Family<KindLabels, Counter>,
    responses: Family<StatusLabels, Counter>,
    sandboxes: Family<SandboxLabels, Gauge>,
    native_pool: Gauge,
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
        let create_seconds = Family::<TemplateLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms to about 4 s.
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
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
        let responses = Family::<StatusLabels, Counter>::default();
        registry.register("api_responses", "API answers, by status class", responses.clone());
        let sandboxes = Family::<SandboxLabels, Gauge>::default();
        registry.register("sandboxes", "Live sandboxes, by state and template", sandboxes.clone());
        let native_pool = Gauge::default();
        registry.register(
            "native_pool_sandboxes",
            "Prepared native sandboxes waiting in the pool",
            native_pool.clone(),
        );
        Self { registry, creates, create_seconds, executions, responses, sandboxes, native_pool }
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

    /// Counts an execution of `kind` (`process`, `cell`).
    pub fn execution(&self, kind: &str) {
        self.executions.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    /// Counts an API answer with `status`.
    pub fn response(&self, status: u16) {
        let class = format!("{}xx", status / 100);
        self.responses.get_or_create(&StatusLabels { class }).inc();
    }

    /// The metrics in Prometheus' text format, with the gauges read now.
    pub fn render(
        &self,
        manager: Option<&Arc<SandboxManager>>,
        native_pool: Option<usize>,
    ) -> String {
        self.sandboxes.clear();
        if let Some(manager) = manager {
            for record in manager.list(&ListFilter::default()).sandboxes {
                let state = match record.state {
                    SandboxState::Running => "running",
                    SandboxState::Paused => "paused",
                };
                let labels = SandboxLabels { state: state.to_owned(), template: record.template };
                self.sandboxes.get_or_create(&labels).inc();
            }
        }
        self.native_pool.set(native_pool.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
