//! The connection to NATS and the JetStream operations every part of Baton shares: publishing an
//! event exactly once, and reading a release's whole history.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{KeyValueErrorKind, PublishErrorKind};
pub use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, RawMessageErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{ConnectOptions, HeaderMap};
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::event::{Event, Role};
use crate::names::ReleaseId;
use crate::subject::{self, EventSubject};

pub use baton_proto::v1::Source;

pub const EVENTS_STREAM: &str = "BATON_EVENTS";
pub const DLQ_STREAM: &str = "BATON_DLQ";
pub const LOCKS_BUCKET: &str = "BATON_LOCKS";
pub const CONFIG_BUCKET: &str = "BATON_CONFIG";
pub const LOGS_BUCKET: &str = "BATON_LOGS";

/// The NATS users of Baton: the administrator (who applies the bus), people and CI (`cli` to
/// release, `config` to change configuration), and one per agent. See [`crate::busauth`].
pub use crate::busauth::USERS as NATS_USERS;

/// The servers of a comma-separated URL list (`nats://a:4222,nats://b:4222`): every server of a
/// cluster, so that the client reaches the bus while any one is up (and it learns of the others
/// the servers announce).
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse().map_err(|e| {
                Error::Url(format!(
                    "NATS URL {} is not valid: {e}",
                    crate::names::redact_url(u)
                ))
            })
        })
        .collect::<Result<_>>()?;
    if addrs.is_empty() {
        return Err(Error::Url("no NATS URL given (--nats-url)".into()));
    }
    Ok(addrs)
}

/// How often the client pings the server: a dead broker is noticed within a few of these.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most events one release may have. A release is a few dozen events; the bound keeps a
/// flood of commands on one release from running an agent out of memory: a history longer than
/// this is refused (the trigger is dead-lettered) instead of read.
pub const MAX_EVENTS_PER_RELEASE: u64 = 1000;

/// Standard NATS connection options, by flag or environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated
    #[arg(
        long = "nats-url",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    /// A folder of Baton credentials (`<user>.nk` nkey seeds); the file of this program's user is used
    #[arg(long = "credentials", env = "BATON_CREDENTIALS")]
    pub credentials_dir: Option<PathBuf>,
    /// An nkey seed file
    #[arg(long = "nats-nkey", env = "BATON_NATS_NKEY")]
    pub nkey_file: Option<PathBuf>,
    /// A NATS credentials file (JWT and seed)
    #[arg(long = "nats-creds", env = "BATON_NATS_CREDS")]
    pub creds_file: Option<PathBuf>,
    /// NATS user name (with --nats-password)
    #[arg(long = "nats-user", env = "BATON_NATS_USER")]
    pub user: Option<String>,
    /// NATS password
    #[arg(
        long = "nats-password",
        env = "BATON_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// A CA certificate (PEM) to verify the server's TLS certificate; turns TLS on
    #[arg(long = "nats-tls-ca", env = "BATON_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl NatsArgs {
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Default::default()
        }
    }

    /// Connection options for `user` (the credentials folder's `<user>.nk`, unless a specific
    /// credential was given).
    pub async fn connect_options(&self, user: &str) -> Result<ConnectOptions> {
        let mut options = if let Some(path) = &self.creds_file {
            ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| Error::ReadCredentials {
                    path: path.clone(),
                    source,
                })?
        } else if let Some(path) = self.nkey_file.clone().or_else(|| {
            self.credentials_dir
                .as_ref()
                .map(|d| d.join(format!("{user}.nk")))
        }) {
            let seed = std::fs::read_to_string(&path).map_err(|source| Error::ReadCredentials {
                path: path.clone(),
                source,
            })?;
            let seed = seed.trim().to_owned();
            if !seed.starts_with("SU") {
                return Err(Error::Credentials(format!(
                    "{} does not hold a user nkey seed",
                    path.display()
                )));
            }
            ConnectOptions::with_nkey(seed)
        } else if let (Some(user), Some(password)) = (&self.user, &self.password) {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        } else if self.user.is_some() || self.password.is_some() {
            return Err(Error::Credentials(
                "--nats-user and --nats-password go together".into(),
            ));
        } else {
            ConnectOptions::new()
        };
        if let Some(ca) = &self.tls_ca {
            if !ca.is_file() {
                return Err(Error::ReadCredentials {
                    path: ca.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(options)
    }
}

/// How to behave when the server can't be reached at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialConnect {
    /// Fail at once with a clear error (the CLI).
    FailFast,
    /// Keep trying in the background (daemons, which must come up before or after the broker).
    Retry,
}

/// A connection to the bus with JetStream, and a feed of the server's errors (permission
/// violations arrive asynchronously; publish uses the feed to turn them into clear errors).
#[derive(Clone)]
pub struct Bus {
    /// Whether reads of a stream may be answered by any of its replicas (see
    /// [`Bus::reading_from_any_replica`]).
    any_replica: bool,
    /// The handles of the buckets used so far (see [`Bus::kv`]).
    buckets: Arc<std::sync::Mutex<std::collections::HashMap<String, jetstream::kv::Store>>>,
    client: async_nats::Client,
    js: jetstream::Context,
    server_errors: broadcast::Sender<String>,
    source: Arc<baton_proto::v1::Source>,
}

impl Bus {
    pub async fn connect(
        args: &NatsArgs,
        user: &str,
        source: baton_proto::v1::Source,
        initial: InitialConnect,
    ) -> Result<Bus> {
        let (server_errors, _) = broadcast::channel(64);
        let errors = server_errors.clone();
        let name = format!("baton-{}", source.agent);
        let mut options = args
            .connect_options(user)
            .await?
            .name(name)
            .ping_interval(PING_INTERVAL)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(REQUEST_TIMEOUT))
            // Replies come to this user's own inbox prefix, the only one it may subscribe to.
            .custom_inbox_prefix(crate::busauth::inbox_prefix(user))
            .max_reconnects(None)
            // Reconnect quickly: a restarted broker should be picked up in well under a second.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).min(2_000))
            })
            .event_callback(move |event| {
                let errors = errors.clone();
                async move {
                    match &event {
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!(error = %e, "nats server error");
                            let _ = errors.send(e.to_string());
                        }
                        async_nats::Event::Connected => tracing::info!("connected to nats"),
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from nats"),
                        other => tracing::info!(event = %other, "nats connection event"),
                    }
                }
            });
        if initial == InitialConnect::Retry {
            options = options.retry_on_initial_connect();
        }
        let servers = server_addrs(&args.url)?;
        let client = options
            .connect(servers.as_slice())
            .await
            .map_err(|source| Error::Connect {
                url: crate::names::redact_url(&args.url),
                source,
            })?;
        let js = jetstream::new(client.clone());
        Ok(Bus {
            client,
            js,
            server_errors,
            source: Arc::new(source),
            buckets: Arc::default(),
            any_replica: false,
        })
    }

    /// This bus, its stream reads answered by whichever replica answers first (a direct get)
    /// instead of by each stream's leader: for people's reads (`baton status`, `logs`, `list`,
    /// a release followed live), which then answer at once while a stream elects a leader, and
    /// even with no quorum. A replica may be a few messages behind its leader, never ahead or
    /// out of order: such a read may miss the newest events for a moment, which a person's view
    /// can, and an agent's decision must not — agents read from the leader.
    pub fn reading_from_any_replica(mut self) -> Bus {
        self.any_replica = true;
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn source(&self) -> baton_proto::v1::Source {
        (*self.source).clone()
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes an event on its subject with its id as `Nats-Msg-Id` and waits for the stream's
    /// acknowledgement. A retry of the same logical event (same id) is stored once. Returns the
    /// stream sequence and whether the stream had it already.
    pub async fn publish(&self, subject: &EventSubject, event: &Event) -> Result<(u64, bool)> {
        let subject = subject.to_string();
        let mut headers = HeaderMap::new();
        headers.insert("Baton-Event-Type", event.event_type.as_str());
        let publish = PublishMessage::build()
            .payload(event.encode().into())
            // Headers first: `message_id` adds to them, `headers` would replace them.
            .headers(headers)
            .message_id(event.id());
        self.publish_raw(&subject, publish).await
    }

    /// Publishes to a stream subject and awaits the ack; a permission violation for the subject is
    /// reported as [`Error::PermissionDenied`] at once instead of as a time-out.
    pub async fn publish_raw(&self, subject: &str, publish: PublishMessage) -> Result<(u64, bool)> {
        let mut errors = self.server_errors.subscribe();
        let ack = async {
            // No server answers for the stream while its replicas elect a leader (the old one
            // gone): the same message, under the same id, is sent again until one does.
            let mut waits = crate::retry::policy(PUBLISH_ACK_TIMEOUT);
            loop {
                let sent = match self
                    .js
                    .send_publish(subject.to_owned(), publish.clone())
                    .await
                {
                    Ok(future) => future.await,
                    Err(e) => Err(e),
                };
                match sent {
                    Err(e) if e.kind() == PublishErrorKind::StreamNotFound => match waits.next() {
                        Some(wait) => {
                            tracing::debug!(%subject, "no stream answered; publishing again");
                            tokio::time::sleep(wait).await;
                        }
                        None => {
                            return Err(Error::Publish {
                                subject: subject.to_owned(),
                                source: e,
                            })
                        }
                    },
                    other => {
                        return other.map_err(|source| Error::Publish {
                            subject: subject.to_owned(),
                            source,
                        })
                    }
                }
            }
        };
        let denied = async {
            loop {
                match errors.recv().await {
                    Ok(e) if is_permission_violation(&e, subject) => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(PUBLISH_ACK_TIMEOUT, ack) => match r {
                Ok(Ok(ack)) => Ok((ack.sequence, ack.duplicate)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Error::PublishTimeout { subject: subject.to_owned(), seconds: PUBLISH_ACK_TIMEOUT.as_secs() }),
            },
            () = denied => Err(Error::PermissionDenied { subject: subject.to_owned() }),
        }
    }

    /// Every message of the event stream on `filter`, in stream order, as it is now (nothing
    /// when there is none).
    pub async fn read_events(
        &self,
        filter: &str,
    ) -> std::result::Result<Vec<StreamMessage>, String> {
        Ok(self.read_events_up_to(filter, u64::MAX).await?.0)
    }

    /// The first `limit` messages of the event stream on `filter`, in stream order, and whether
    /// there are more.
    ///
    /// Each message is asked of the stream's leader by sequence (`STREAM.MSG.GET` with
    /// `next_by_subj`), not through a consumer: an ephemeral consumer is placed on a random
    /// replica of the stream — nats-server 2.9 does not skip a server that is down — so one
    /// server of three down made a third of all reads wait for their time-out. A get costs no
    /// write to the cluster's metadata either, and the leader's answer holds every event it has
    /// acknowledged.
    pub async fn read_events_up_to(
        &self,
        filter: &str,
        limit: u64,
    ) -> std::result::Result<(Vec<StreamMessage>, bool), String> {
        let mut reader = StreamReader::new(self, EVENTS_STREAM, filter, 1).await?;
        let mut out = Vec::new();
        while (out.len() as u64) < limit {
            match reader.next_now().await? {
                Some(message) => out.push(message),
                None => return Ok((out, false)),
            }
        }
        let more = reader.next_now().await?.is_some();
        Ok((out, more))
    }

    /// Follows the event stream on `filter` from stream sequence `from`: each message once, in
    /// order, as it is stored (see [`StreamReader::next`]).
    pub async fn follow_events(
        &self,
        filter: &str,
        from: u64,
    ) -> std::result::Result<StreamReader, String> {
        StreamReader::new(self, EVENTS_STREAM, filter, from).await
    }

    /// Reads `stream` on `filter` from its first message, in order, without a consumer (see
    /// [`read_events_up_to`](Self::read_events_up_to) for why).
    pub async fn read_stream(
        &self,
        stream: &str,
        filter: &str,
    ) -> std::result::Result<StreamReader, String> {
        StreamReader::new(self, stream, filter, 1).await
    }

    /// Every event of a release, in stream order, decoded. Messages that fail to decode are
    /// skipped with a warning (they were dead-lettered when they arrived). A release with more
    /// than [`MAX_EVENTS_PER_RELEASE`] events is refused.
    pub async fn release_history(&self, release_id: ReleaseId) -> Result<Vec<Event>> {
        let (events, more) = self
            .release_history_head(release_id, MAX_EVENTS_PER_RELEASE)
            .await?;
        if more {
            return Err(Error::HistoryTooLong {
                release_id: release_id.to_string(),
                limit: MAX_EVENTS_PER_RELEASE,
            });
        }
        Ok(events)
    }

    /// The first `limit` events of a release, decoded, and whether it has more — enough to end
    /// a release whose whole history is too long to read.
    pub async fn release_history_head(
        &self,
        release_id: ReleaseId,
        limit: u64,
    ) -> Result<(Vec<Event>, bool)> {
        let (messages, more) = self
            .read_events_up_to(&subject::release_events(release_id), limit)
            .await
            .map_err(|message| Error::History {
                release_id: release_id.to_string(),
                message,
            })?;
        let mut events = Vec::with_capacity(messages.len());
        for message in messages {
            match EventSubject::parse(message.subject.as_str())
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    Event::decode(
                        &message.payload,
                        Some(s.event_type),
                        Some(&s.release_id.to_string()),
                    )
                    .map_err(|e| e.to_string())
                }) {
                Ok(event) => events.push(event),
                Err(reason) => {
                    tracing::warn!(subject = %message.subject, %reason, "skipping an invalid event in history")
                }
            }
        }
        Ok((events, more))
    }

    /// A key-value bucket of the bus (locks, configuration). Its handle is made once per
    /// connection, from the bucket's stream info, which only the stream's leader gives: asked
    /// again (3 s each, with back-off, for up to 30 s) while the stream elects a leader, then
    /// kept, so that no later read or write of the bucket waits on it.
    pub async fn kv(&self, bucket: &str) -> Result<jetstream::kv::Store> {
        if let Some(store) = self.lock_buckets().get(bucket) {
            return Ok(store.clone());
        }
        let failed = |message: String| Error::Stream {
            stream: format!("KV_{bucket}"),
            message,
        };
        let mut waits = crate::retry::policy(READ_BUDGET);
        let store = loop {
            let failure =
                match tokio::time::timeout(BUCKET_TIMEOUT, self.js.get_key_value(bucket)).await {
                    Ok(Ok(store)) => break store,
                    // A bucket that does not exist is not waited for.
                    Ok(Err(e)) if e.kind() == KeyValueErrorKind::InvalidStoreName => {
                        return Err(failed(e.to_string()))
                    }
                    Ok(Err(e)) if e.to_string().contains("stream not found") => {
                        return Err(failed(e.to_string()))
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {}s", BUCKET_TIMEOUT.as_secs()),
                };
            match waits.next() {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(failed(failure)),
            }
        };
        self.lock_buckets().insert(bucket.to_owned(), store.clone());
        Ok(store)
    }

    fn lock_buckets(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, jetstream::kv::Store>> {
        // A panic while the map is held leaves it whole: a poisoned lock is used as it is.
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The role a user name stands for, for logs.
    pub fn role(&self) -> Option<Role> {
        self.source.agent.parse().ok()
    }
}

/// How long one get waits for the stream's leader: short, so that a get sent while the stream
/// elects a new leader (its old one gone) is sent again soon after the election.
const GET_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a get that any replica may answer waits: one that reached a replica that does not
/// answer (one catching up) is sent again, most likely to another, instead of holding a
/// person's read for seconds.
const REPLICA_GET_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one request for a bucket's stream info waits for the stream's leader.
const BUCKET_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a read keeps asking before it gives up: longer than an election takes.
const READ_BUDGET: Duration = Duration::from_secs(30);
/// How often a follower asks for the next message while there is none: from the first wait to
/// the longest, doubling while the stream stays quiet.
const FOLLOW_POLL: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// Reads a stream on one filter in order, one message per get from the stream's leader: the
/// history of a release, a release followed live, the keys of a bucket.
pub struct StreamReader {
    stream: jetstream::stream::Stream<()>,
    any_replica: bool,
    filter: String,
    next_sequence: u64,
    poll: Duration,
}

impl StreamReader {
    async fn new(
        bus: &Bus,
        stream: &str,
        filter: &str,
        from: u64,
    ) -> std::result::Result<StreamReader, String> {
        // No request: the handle only names the stream.
        let stream = bus
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok(StreamReader {
            stream,
            any_replica: bus.any_replica,
            filter: filter.to_owned(),
            next_sequence: from.max(1),
            poll: FOLLOW_POLL.0,
        })
    }

    /// The sequence the next message will have at least.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// The next message as the stream is now, or `None` when there is none yet. A get that
    /// finds no leader (an election) or no answer is sent again, for up to [`READ_BUDGET`].
    pub async fn next_now(&mut self) -> std::result::Result<Option<StreamMessage>, String> {
        let started = tokio::time::Instant::now();
        let mut waits = crate::retry::policy(READ_BUDGET);
        loop {
            let timeout = if self.any_replica {
                REPLICA_GET_TIMEOUT
            } else {
                GET_TIMEOUT
            };
            let failure = match tokio::time::timeout(timeout, self.get()).await {
                Ok(Got::Message(message)) => {
                    self.next_sequence = message.sequence + 1;
                    return Ok(Some(message));
                }
                Ok(Got::End) => return Ok(None),
                Ok(Got::Refused(e)) => return Err(format!("{}: {e}", self.filter)),
                Ok(Got::Failed(e)) => e,
                Err(_) => format!("no answer within {timeout:?}"),
            };
            match waits.next() {
                Some(wait) => {
                    tracing::debug!(filter = %self.filter, sequence = self.next_sequence, %failure, "reading the event stream again");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Err(format!(
                        "{failure} (still failing after {}s)",
                        started.elapsed().as_secs()
                    ))
                }
            }
        }
    }

    /// One get of the first message from `next_sequence` on.
    async fn get(&self) -> Got {
        if self.any_replica {
            match self
                .stream
                .direct_get_next_for_subject(&self.filter, Some(self.next_sequence))
                .await
            {
                Ok(message) => Got::Message(message),
                Err(e) => match e.kind() {
                    DirectGetErrorKind::NotFound => Got::End,
                    DirectGetErrorKind::InvalidSubject => Got::Refused(e.to_string()),
                    _ => Got::Failed(e.to_string()),
                },
            }
        } else {
            match self
                .stream
                .get_first_raw_message_by_subject(&self.filter, self.next_sequence)
                .await
            {
                Ok(message) => Got::Message(message),
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Got::End,
                Err(e) if is_permanent(&e.kind()) => Got::Refused(e.to_string()),
                Err(e) => Got::Failed(e.to_string()),
            }
        }
    }

    /// The next message, waiting for it to be stored: asks again every 100 ms, then less often
    /// (up to every second) while nothing comes.
    pub async fn next(&mut self) -> std::result::Result<StreamMessage, String> {
        loop {
            if let Some(message) = self.next_now().await? {
                self.poll = FOLLOW_POLL.0;
                return Ok(message);
            }
            tokio::time::sleep(self.poll).await;
            self.poll = (self.poll * 2).min(FOLLOW_POLL.1);
        }
    }
}

/// Whether a message of a bucket's stream holds a value (a put), not the marker of a key's
/// deletion or purge.
pub fn is_kv_put(message: &StreamMessage) -> bool {
    message
        .headers
        .get("KV-Operation")
        .is_none_or(|op| op.as_str() == "PUT")
}

/// What one get found.
enum Got {
    Message(StreamMessage),
    /// No message from that sequence on (yet).
    End,
    /// A get that will fail the same way again.
    Refused(String),
    /// A get worth sending again (no leader, no answer).
    Failed(String),
}

/// A get that fails the same way when sent again: a bad filter, or no such stream.
fn is_permanent(kind: &RawMessageErrorKind) -> bool {
    match kind {
        RawMessageErrorKind::InvalidSubject => true,
        RawMessageErrorKind::JetStream(e) => {
            e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
        }
        _ => false,
    }
}

fn is_permission_violation(error: &str, subject: &str) -> bool {
    let lower = error.to_ascii_lowercase();
    lower.contains("permissions violation") && error.contains(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_violations_are_matched_to_their_subject() {
        let e =
            "nats: Permissions Violation for Publish to \"baton.v1.events.a.b.c.deploy.started\"";
        assert!(is_permission_violation(
            e,
            "baton.v1.events.a.b.c.deploy.started"
        ));
        assert!(!is_permission_violation(
            e,
            "baton.v1.events.a.b.c.build.started"
        ));
        assert!(!is_permission_violation(
            "nats: authorization violation",
            "x"
        ));
    }
}
