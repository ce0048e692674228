//! `baton bus status`: where each stream and bucket of the bus has its replicas — which server
//! leads it, which follow and whether they are current — so an operator can see what a server
//! down means before it matters: a stream with a leader and a quorum takes every write.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use baton_core::busconfig::Definitions;
use serde::Serialize;

use crate::Output;

/// How long one stream's info may take: its leader answers, or the stream has none.
const INFO_TIMEOUT: Duration = Duration::from_secs(3);

/// One replica of a stream.
#[derive(Debug, Serialize)]
pub struct Replica {
    pub name: String,
    pub leader: bool,
    /// Has every message the leader has (or is the leader).
    pub current: bool,
    pub offline: bool,
    /// Messages behind the leader.
    pub lag: u64,
}

/// What one stream looks like from its leader.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub replicas: usize,
    pub leader: Option<String>,
    pub peers: Vec<Replica>,
    pub messages: u64,
    pub bytes: u64,
    /// Why the stream did not answer (no leader: writes wait until one is elected).
    pub error: Option<String>,
}

impl StreamStatus {
    /// A leader and a majority of its replicas current: writes are acknowledged.
    pub fn writable(&self) -> bool {
        let current = self
            .peers
            .iter()
            .filter(|p| p.current && !p.offline)
            .count();
        self.leader.is_some() && current > self.replicas / 2
    }

    fn failed(name: &str, error: String) -> StreamStatus {
        StreamStatus {
            stream: name.to_owned(),
            replicas: 0,
            leader: None,
            peers: Vec::new(),
            messages: 0,
            bytes: 0,
            error: Some(error),
        }
    }
}

/// The names of every stream behind the bus's definitions: streams, buckets, object stores.
fn stream_names(defs: &Definitions) -> Vec<String> {
    let mut names: Vec<String> = defs.streams.keys().cloned().collect();
    names.extend(defs.kv.iter().map(|k| format!("KV_{}", k.bucket)));
    names.extend(defs.objects.iter().map(|o| format!("OBJ_{}", o.bucket)));
    names
}

async fn stream_status(js: &jetstream::Context, name: &str) -> StreamStatus {
    let info = async {
        let mut stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
        stream.info().await.cloned().map_err(|e| e.to_string())
    };
    let info = match tokio::time::timeout(INFO_TIMEOUT, info).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return StreamStatus::failed(name, e),
        Err(_) => {
            return StreamStatus::failed(
                name,
                format!("no answer within {}s: no leader", INFO_TIMEOUT.as_secs()),
            )
        }
    };
    let cluster = info.cluster.clone().unwrap_or_default();
    let mut peers = Vec::new();
    if let Some(leader) = &cluster.leader {
        peers.push(Replica {
            name: leader.clone(),
            leader: true,
            current: true,
            offline: false,
            lag: 0,
        });
    }
    peers.extend(cluster.replicas.iter().map(|p| Replica {
        name: p.name.clone(),
        leader: false,
        current: p.current,
        offline: p.offline,
        lag: p.lag.unwrap_or(0),
    }));
    StreamStatus {
        stream: name.to_owned(),
        replicas: info.config.num_replicas.max(1),
        leader: cluster.leader,
        peers,
        messages: info.state.messages,
        bytes: info.state.bytes,
        error: None,
    }
}

/// Every stream's status; false when one of them can't take writes.
pub async fn run(js: &jetstream::Context, output: Output) -> anyhow::Result<bool> {
    let defs = Definitions::embedded().context("the bus definitions")?;
    let mut all = Vec::new();
    for name in stream_names(&defs) {
        all.push(stream_status(js, &name).await);
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&all)?),
        Output::Text => {
            println!(
                "{:<18} {:>8}  {:<10} {:<40} {:>10} {:>12}",
                "STREAM", "REPLICAS", "LEADER", "FOLLOWERS", "MESSAGES", "BYTES"
            );
            for s in &all {
                if let Some(e) = &s.error {
                    println!("{:<18} {e}", s.stream);
                    continue;
                }
                let followers: Vec<String> = s
                    .peers
                    .iter()
                    .filter(|p| !p.leader)
                    .map(|p| {
                        let state = match (p.offline, p.current) {
                            (true, _) => "offline".to_owned(),
                            (false, true) => "current".to_owned(),
                            (false, false) => format!("{} behind", p.lag),
                        };
                        format!("{} {state}", p.name)
                    })
                    .collect();
                println!(
                    "{:<18} {:>8}  {:<10} {:<40} {:>10} {:>12}",
                    s.stream,
                    s.replicas,
                    s.leader.as_deref().unwrap_or("-"),
                    if followers.is_empty() {
                        "-".to_owned()
                    } else {
                        followers.join(", ")
                    },
                    s.messages,
                    s.bytes
                );
            }
            let stuck: Vec<&str> = all
                .iter()
                .filter(|s| !s.writable())
                .map(|s| s.stream.as_str())
                .collect();
            if stuck.is_empty() {
                println!("every stream has a leader and a quorum: writes are acknowledged");
            } else {
                println!("no leader or no quorum, writes wait: {}", stuck.join(", "));
            }
        }
    }
    Ok(all.iter().all(StreamStatus::writable))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, leader: bool, current: bool, offline: bool) -> Replica {
        Replica {
            name: name.into(),
            leader,
            current,
            offline,
            lag: 0,
        }
    }

    #[test]
    fn a_stream_takes_writes_with_a_leader_and_a_current_majority() {
        let status = |leader: Option<&str>, replicas, peers| StreamStatus {
            stream: "S".into(),
            replicas,
            leader: leader.map(str::to_owned),
            peers,
            messages: 0,
            bytes: 0,
            error: None,
        };
        let table = [
            (
                status(Some("a"), 1, vec![peer("a", true, true, false)]),
                true,
            ),
            (
                status(
                    Some("a"),
                    3,
                    vec![
                        peer("a", true, true, false),
                        peer("b", false, true, false),
                        peer("c", false, false, true),
                    ],
                ),
                true,
            ),
            (
                status(
                    Some("a"),
                    3,
                    vec![
                        peer("a", true, true, false),
                        peer("b", false, false, true),
                        peer("c", false, false, true),
                    ],
                ),
                false,
            ),
            (status(None, 3, Vec::new()), false),
        ];
        for (s, writable) in table {
            assert_eq!(s.writable(), writable, "{s:?}");
        }
    }
}
