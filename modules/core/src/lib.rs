//! The shared core of hapair's modules.
//!
//! Every hapair module is a small binary that performs one step of setting up
//! an active/passive pair (see the repository README for the map of steps).
//! What they have in common lives here, one concern per module:
//!
//! - [`protocol`]: how a module is called (by Ansible or by hand), how its
//!   arguments are parsed and checked, and the one JSON object it answers.
//! - [`secret`]: a string type for passwords that can't be printed by
//!   accident, and the scrubbing of secrets from every output.
//! - [`instance`]: the instance config (`/etc/hapair/instance.json`), the
//!   keys it knows and their types.
//! - [`fence`]: an old primary's writes stopped and kept stopped until it
//!   rejoins.
//! - [`files`]: atomic writes with owner and mode, and the file state that
//!   idempotency compares against.
//! - [`command`]: running external programs with captured output and errors
//!   that say what ran and what it printed.
//! - [`account`]: the cluster's OS account.
//! - [`detach`]: a follower that stops following: what breaking the pair
//!   and a failover share.
//! - [`ssh`]: the pair's SSH keys, authorized_keys and pinned host keys.
//! - [`wait`]: waiting for a condition, with a deadline.
//! - [`net`]: this host's addresses, and probes of a peer's ports.
//! - [`plan`]: the seam every changing module goes through: observe, plan,
//!   apply unless in check mode, and the result made from the plan.
//! - [`lock`]: one run at a time of a long step, and what a killed run left.
//! - [`services`]: systemd units: restart, reload, whether they run.
//! - [`postgres`]: the one place that knows PostgreSQL: queries, its
//!   configuration drop-in, roles and SCRAM verifiers, and the quoting of
//!   its connection strings and configuration values.
//! - [`monitor`]: the `hapair-monitor` daemon: the report over HTTP, with
//!   health gates, Prometheus metrics and a status page.
//! - [`status`]: the pair's replication as this host sees it, one section
//!   per service, each within a deadline (`/monitor/replication`).
//! - [`redis`] and [`kafka`]: the same for Redis and Kafka: their files,
//!   defaults and quoting.
//!
//! A module's `main` reads like its seed step: parse arguments, look at the
//! host, plan, apply unless in check mode, report. Nothing here knows about a
//! particular step.

pub mod account;
pub mod command;
pub mod detach;
#[cfg(feature = "doc-check")]
pub mod doc_check;
pub mod fence;
pub mod files;
pub mod instance;
pub mod kafka;
pub mod lock;
pub mod monitor;
pub mod net;
pub mod plan;
pub mod postgres;
pub mod protocol;
pub mod redis;
pub mod rsync;
pub mod secret;
pub mod services;
pub mod ssh;
pub mod status;
pub mod unsettled;
pub mod wait;

pub use plan::{Action, Plan};
pub use protocol::{Context, Diff, Outcome, Spec};
pub use secret::Secret;
