//! Who may do what on the bus: the NATS users of Baton and their permissions, derived from the
//! bus definitions (`bus-config/`) and the clusters the agents serve, and written as the
//! `accounts` block of a nats-server configuration (`baton bus auth`).
//!
//! The rules (DESIGN.md §7):
//! - every agent publishes only the event types it owns and its own dead letters;
//! - it uses only its own durable consumers — create, info, next and ack on its own names; the
//!   durables of every other user are denied by name (a consumer's name is one subject token,
//!   so they can't be matched by a prefix), while short-lived ordered consumers for reading the
//!   event stream stay open to all;
//! - its replies come to its own inbox prefix (`_INBOX_<user>`), and it may subscribe to no other;
//! - it reads and writes only the buckets its job needs; only the builder writes build logs;
//! - people and CI are two users: `cli` may release and send commands, `config` may change the
//!   configuration; neither may do the other's part;
//! - the administrator (`baton bus apply`) is the only user without limits.
//!
//! Nothing secret is written: each user's nkey is `$BATON_NKEY_<USER>`, which nats-server reads
//! from its environment.

use std::fmt::Write as _;

use crate::busconfig::Definitions;
use crate::event::{EventType, Role};
use crate::subject;

/// The event stream, the dead letters, and the streams behind the buckets.
pub const EVENTS: &str = "BATON_EVENTS";
pub const DLQ: &str = "BATON_DLQ";
pub const CONFIG_BUCKET: &str = "BATON_CONFIG";
pub const LOCKS_BUCKET: &str = "BATON_LOCKS";
pub const LOGS_BUCKET: &str = "BATON_LOGS";
/// The notifier's outbox, and the durable consumer that sends what is in it (created by the
/// notifier itself: it is not an event consumer of the shared runtime).
pub const NOTIFY: &str = "BATON_NOTIFY";
pub const NOTIFY_DURABLE: &str = "notifier-deliveries";

/// Every NATS user of Baton, in the order the configuration lists them.
pub const USERS: [&str; 9] = [
    "admin",
    "cli",
    "config",
    "builder",
    "deployer",
    "health-checker",
    "rollback",
    "metrics",
    "notifier",
];

/// The inbox prefix of a user: replies to its requests arrive under `<prefix>.>`.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{}", user.replace(['.', '*', '>', ' '], "_"))
}

/// The environment variable that holds a user's public nkey for nats-server.
pub fn nkey_env_var(user: &str) -> String {
    format!("BATON_NKEY_{}", user.to_uppercase().replace('-', "_"))
}

/// One user's permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish_allow: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
    /// May answer requests sent to it (the reply subject of each request, once).
    pub allow_responses: bool,
}

/// JetStream API subjects that nobody but the administrator may call: the event log is
/// append-only, and no one removes another's consumers or moves a stream's leader.
const JS_DENY: &[&str] = &[
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.BATON_EVENTS",
    "$JS.API.STREAM.PURGE.BATON_DLQ",
    "$JS.API.STREAM.PURGE.BATON_NOTIFY",
    "$JS.API.STREAM.PURGE.KV_BATON_CONFIG",
    "$JS.API.STREAM.PURGE.KV_BATON_LOCKS",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.LEADER.STEPDOWN.>",
    "$JS.API.STREAM.PEER.REMOVE.>",
    "$JS.API.CONSUMER.DELETE.BATON_EVENTS.>",
    "$JS.API.CONSUMER.DELETE.BATON_DLQ.>",
    "$JS.API.CONSUMER.DELETE.BATON_NOTIFY.>",
    "$JS.API.CONSUMER.LEADER.STEPDOWN.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
    "$JS.API.ACCOUNT.>",
];

/// Reading a stream: its info, single messages (also the last one of a subject).
fn read_stream(out: &mut Vec<String>, stream: &str) {
    out.extend([
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
    ]);
}

/// Short-lived consumers (ordered reads, KV watches) of any name on `stream`; on the event
/// stream the durables of others are denied by name on top of this.
fn ephemeral_consumers(out: &mut Vec<String>, stream: &str) {
    out.extend([
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
        // The flow-control replies of ordered push consumers (KV watches and histories).
        format!("$JS.FC.{stream}.>"),
    ]);
}

/// Everything one durable consumer's owner does with it.
fn durable_subjects(stream: &str, durable: &str) -> [String; 6] {
    [
        format!("$JS.API.CONSUMER.CREATE.{stream}.{durable}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{durable}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.{durable}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"),
        format!("$JS.ACK.{stream}.{durable}.>"),
    ]
}

fn kv_read(out: &mut Vec<String>, bucket: &str) {
    let stream = format!("KV_{bucket}");
    read_stream(out, &stream);
    ephemeral_consumers(out, &stream);
}

fn kv_write(out: &mut Vec<String>, bucket: &str) {
    kv_read(out, bucket);
    out.push(format!("$KV.{bucket}.>"));
}

fn objects_read(out: &mut Vec<String>, bucket: &str) {
    let stream = format!("OBJ_{bucket}");
    read_stream(out, &stream);
    ephemeral_consumers(out, &stream);
}

fn objects_write(out: &mut Vec<String>, bucket: &str) {
    objects_read(out, bucket);
    // An object is replaced whole under its name: its old chunks are purged.
    out.push(format!("$JS.API.STREAM.PURGE.OBJ_{bucket}"));
    out.push(format!("$O.{bucket}.>"));
}

fn role_of(user: &str) -> Option<Role> {
    Role::AGENTS.into_iter().find(|r| r.as_str() == user)
}

/// The permissions of `user`, given the bus definitions and the clusters agents serve (the
/// per-cluster consumers exist once per cluster). `None` for the administrator, who has no
/// limits, and for a name that is not one of [`USERS`].
pub fn permissions(defs: &Definitions, clusters: &[String], user: &str) -> Option<Permissions> {
    if user == "admin" || !USERS.contains(&user) {
        return None;
    }
    let consumers = defs.concrete_consumers(clusters);
    let role = role_of(user);
    let mut p = Permissions {
        subscribe_allow: vec![format!("{}.>", inbox_prefix(user))],
        ..Permissions::default()
    };
    let allow = &mut p.publish_allow;
    allow.push("$JS.API.INFO".into());
    // Everyone reads the event stream: it is the history.
    read_stream(allow, EVENTS);
    ephemeral_consumers(allow, EVENTS);
    match user {
        "cli" => {
            for t in EventType::ALL.iter().filter(|t| t.owner() == Role::Cli) {
                allow.push(subject::events_of_type(*t));
            }
            allow.push(subject::api(">"));
            allow.extend(["$JS.API.STREAM.NAMES".into(), "$JS.API.STREAM.LIST".into()]);
            kv_read(allow, CONFIG_BUCKET);
            kv_read(allow, LOCKS_BUCKET);
            objects_read(allow, LOGS_BUCKET);
            read_stream(allow, DLQ);
            ephemeral_consumers(allow, DLQ);
            // `baton bus status`: the outbox's replicas and counts, never its messages.
            allow.push(format!("$JS.API.STREAM.INFO.{NOTIFY}"));
            p.subscribe_allow.push(subject::all_events());
        }
        "config" => {
            allow.extend(["$JS.API.STREAM.NAMES".into(), "$JS.API.STREAM.LIST".into()]);
            kv_write(allow, CONFIG_BUCKET);
        }
        _ => {}
    }
    if let Some(role) = role {
        for t in EventType::ALL.iter().filter(|t| t.owner() == role) {
            allow.push(subject::events_of_type(*t));
        }
        allow.push(subject::dlq(role));
        allow.push(format!("$JS.API.STREAM.INFO.{DLQ}"));
        for c in consumers.iter().filter(|c| c.agent == role) {
            allow.extend(durable_subjects(&c.stream, &c.durable));
        }
        match role {
            Role::Builder => {
                kv_read(allow, CONFIG_BUCKET);
                objects_write(allow, LOGS_BUCKET);
            }
            Role::Deployer | Role::Rollback => {
                kv_read(allow, CONFIG_BUCKET);
                kv_write(allow, LOCKS_BUCKET);
            }
            Role::HealthChecker => kv_read(allow, CONFIG_BUCKET),
            Role::Metrics => {
                p.subscribe_allow.push(subject::api(">"));
                p.allow_responses = true;
            }
            Role::Notifier => {
                kv_read(allow, CONFIG_BUCKET);
                allow.push(subject::all_notifications());
                allow.push(format!("$JS.API.STREAM.INFO.{NOTIFY}"));
                allow.extend(durable_subjects(NOTIFY, NOTIFY_DURABLE));
            }
            Role::Cli => {}
        }
    }
    // Every durable that is not this user's own, by name.
    for c in consumers.iter().filter(|c| Some(c.agent) != role) {
        p.publish_deny
            .extend(durable_subjects(&c.stream, &c.durable));
    }
    if role != Some(Role::Notifier) {
        p.publish_deny
            .extend(durable_subjects(NOTIFY, NOTIFY_DURABLE));
    }
    p.publish_deny.extend(JS_DENY.iter().map(|s| s.to_string()));
    dedup(&mut p.publish_allow);
    dedup(&mut p.publish_deny);
    Some(p)
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::BTreeSet::new();
    v.retain(|s| seen.insert(s.clone()));
}

fn quoted_list(out: &mut String, indent: &str, items: &[String]) {
    out.push_str("[\n");
    for item in items {
        let _ = writeln!(out, "{indent}  \"{item}\"");
    }
    let _ = write!(out, "{indent}]");
}

/// The `accounts` block of nats-server's configuration: one account, `BATON`, with JetStream,
/// and every user of [`USERS`] with its permissions. `clusters` are the clusters whose agents
/// this bus serves; add one and render again.
pub fn render(defs: &Definitions, clusters: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Baton's NATS users and their permissions. Generated by `baton bus auth --clusters {}`;\n\
         # generate it again when a cluster is added or bus-config/ changes. Each nkey comes from\n\
         # the server's environment (`baton bus credentials` writes the values to nkeys.env).",
        clusters.join(",")
    );
    out.push_str("accounts {\n  BATON {\n    jetstream: enabled\n    users: [\n");
    for user in USERS {
        let var = nkey_env_var(user);
        match permissions(defs, clusters, user) {
            None => {
                let _ = writeln!(
                    out,
                    "      # {user}: no limits (applies the bus definitions)"
                );
                let _ = writeln!(out, "      {{ nkey: ${var} }}");
            }
            Some(p) => {
                let _ = writeln!(out, "      # {user}");
                let _ = writeln!(out, "      {{");
                let _ = writeln!(out, "        nkey: ${var}");
                out.push_str("        permissions: {\n          publish: {\n            allow: ");
                quoted_list(&mut out, "            ", &p.publish_allow);
                out.push_str("\n            deny: ");
                quoted_list(&mut out, "            ", &p.publish_deny);
                out.push_str("\n          }\n          subscribe: { allow: ");
                quoted_list(&mut out, "          ", &p.subscribe_allow);
                out.push_str(" }\n");
                if p.allow_responses {
                    out.push_str("          allow_responses: true\n");
                }
                out.push_str("        }\n      }\n");
            }
        }
    }
    out.push_str("    ]\n  }\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(user: &str) -> Permissions {
        let defs = Definitions::embedded().unwrap();
        permissions(&defs, &["c1".to_string(), "c2".to_string()], user).unwrap()
    }

    #[test]
    fn an_agent_may_use_its_own_durables_and_no_other() {
        let p = perms("deployer");
        assert!(p.publish_allow.contains(
            &"$JS.API.CONSUMER.MSG.NEXT.BATON_EVENTS.deployer-c1-release-requested".into()
        ));
        assert!(p
            .publish_allow
            .contains(&"$JS.ACK.BATON_EVENTS.deployer-c2-release-requested.>".into()));
        assert!(p
            .publish_deny
            .contains(&"$JS.API.CONSUMER.MSG.NEXT.BATON_EVENTS.builder-release-requested".into()));
        assert!(p
            .publish_deny
            .contains(&"$JS.ACK.BATON_EVENTS.rollback-c1-release-requested.>".into()));
        assert!(!p
            .publish_allow
            .iter()
            .any(|s| s.starts_with("$JS.ACK.BATON_EVENTS.builder")));
        assert_eq!(p.subscribe_allow, vec!["_INBOX_deployer.>".to_string()]);
    }

    #[test]
    fn buckets_follow_each_job() {
        let writes = |user: &str, prefix: &str| {
            perms(user)
                .publish_allow
                .iter()
                .any(|s| s.starts_with(prefix))
        };
        assert!(writes("builder", "$O.BATON_LOGS."));
        for user in [
            "cli",
            "config",
            "deployer",
            "health-checker",
            "rollback",
            "metrics",
        ] {
            assert!(
                !writes(user, "$O.BATON_LOGS."),
                "{user} may write build logs"
            );
        }
        assert!(writes("config", "$KV.BATON_CONFIG."));
        for user in [
            "cli",
            "builder",
            "deployer",
            "health-checker",
            "rollback",
            "metrics",
        ] {
            assert!(
                !writes(user, "$KV.BATON_CONFIG."),
                "{user} may write the configuration"
            );
        }
        assert!(writes("deployer", "$KV.BATON_LOCKS.") && writes("rollback", "$KV.BATON_LOCKS."));
        assert!(!writes("cli", "$KV.BATON_LOCKS."));
        assert!(!writes("config", "baton.v1.events."), "config may release");
        assert!(writes("cli", "baton.v1.events.*.*.*.release.requested"));
        assert!(!writes("metrics", "$JS.API.DIRECT.GET.KV_BATON_CONFIG"));
    }

    #[test]
    fn only_the_notifier_fills_and_drains_the_outbox() {
        let n = perms("notifier");
        assert!(n.publish_allow.contains(&"baton.v1.notify.>".to_string()));
        assert!(n
            .publish_allow
            .contains(&"$JS.ACK.BATON_NOTIFY.notifier-deliveries.>".to_string()));
        assert!(n
            .publish_allow
            .contains(&"$JS.API.DIRECT.GET.KV_BATON_CONFIG".to_string()));
        assert!(
            !n.publish_allow
                .iter()
                .any(|s| s.starts_with("baton.v1.events.")),
            "the notifier publishes no event"
        );
        for user in [
            "cli",
            "config",
            "builder",
            "deployer",
            "health-checker",
            "rollback",
            "metrics",
        ] {
            let p = perms(user);
            assert!(
                !p.publish_allow
                    .iter()
                    .any(|s| s.starts_with("baton.v1.notify")),
                "{user} may write notifications"
            );
            assert!(
                p.publish_deny.contains(
                    &"$JS.API.CONSUMER.MSG.NEXT.BATON_NOTIFY.notifier-deliveries".to_string()
                ),
                "{user} may take the notifier's deliveries"
            );
        }
    }

    #[test]
    fn the_rendered_block_names_every_user_by_its_nkey_variable() {
        let defs = Definitions::embedded().unwrap();
        let text = render(&defs, &["prod".to_string()]);
        for user in USERS {
            assert!(
                text.contains(&format!("nkey: ${}", nkey_env_var(user))),
                "{user}"
            );
        }
        assert!(text.contains("\"_INBOX_health-checker.>\""));
        assert!(!text.contains("nkey: SU"), "a seed in the configuration");
    }
}
