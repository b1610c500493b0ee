//! The admin API's handlers: a parsed request in, a [`Reply`] out.
//!
//! It owns what each route does — the key check and the body limits (also callable on a head alone, before its
//! body is read), publishing (single and batch), kicks, runtime subscriptions, presence, history, health, metrics
//! and the dashboard — and talks to the node through the
//! publish path (`publish`, which also holds the reactors and history) and the cluster to do it. It does not own
//! sockets, buffers or connection limits (`server`, `conn`), request framing (`http`), the route table (`route`),
//! or how a message is framed, stored and delivered (`publish`).

use super::batch;
use super::http::{Head, Method, Request};
use super::route::{self, Route, RouteError};
use super::stats;
use crate::cluster::Cluster;
use crate::dispatch::Subscription;
use crate::events::Events;
use crate::message::envelope::Position;
use crate::message::{self, Message, Target};
use crate::metrics::{self, AdminMetrics, ReactorMetrics, TargetKind};
use crate::publish::{BatchItem, Publisher};
use base64::Engine as _;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

/// Kick close code when the request names none: the 4000 range is for applications (RFC 6455 §7.4.2), and a
/// client can tell "you were removed" from a restart (1001) or an error.
pub const DEFAULT_KICK_CODE: u16 = 4000;
/// Messages a `GET /history` answers with when the request names no `limit`.
pub const DEFAULT_HISTORY_LIMIT: u64 = 100;
/// Most messages one `GET /history` answers with.
pub const MAX_HISTORY_LIMIT: u64 = 1_000;

/// The live dashboard: one self-contained page (inline CSS and JS, no network but `/stats` on this origin),
/// compiled into the binary.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// The dashboard's Content-Security-Policy: inline script and style only, fetches to this origin only.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'";

/// Kick close reason when the request names none.
pub const DEFAULT_KICK_REASON: &str = "disconnected by server";

/// What the handlers need from the configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Bearer key required on every route but `/healthz` and the dashboard page; `None` = open.
    pub api_key: Option<String>,
    /// Set when the server starts draining (SIGTERM): health checks answer 503 so load balancers stop
    /// sending clients, and publishes answer 503 instead of a 202 for connections that are closing.
    pub draining: Arc<AtomicBool>,
    /// `admin.max_publish_bytes`: the body of every route but the batch, and each batch message's payload.
    pub max_publish_bytes: usize,
    /// `admin.max_batch_bytes`: the body of `POST /publish/batch`.
    pub max_batch_bytes: usize,
    /// `admin.max_batch_targets`: targets in one batch.
    pub max_batch_targets: usize,
    /// `auth.max_id_bytes`: the longest channel name a subscription may add (as in a token).
    pub max_id_bytes: usize,
}

/// A response before it is written.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra header fields.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, value: serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: value.to_string().into_bytes(),
        }
    }

    /// `{\"error\": message}` with the status.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, serde_json::json!({ "error": message }))
    }
}

/// The handlers and everything they talk to.
pub struct Api {
    /// The publish path, and through it the reactors (kicks, presence, overload) and history (reads, deletes).
    publisher: Publisher,
    reactor_metrics: Vec<Arc<ReactorMetrics>>,
    metrics: Arc<AdminMetrics>,
    settings: ApiSettings,
    /// The cluster bridge, when `cluster.redis_url` is set: publishes and kicks go through Redis first.
    cluster: Option<Arc<Cluster>>,
    /// The TLS side, when `[tls]` is on (its counters are on `/metrics`).
    tls: Option<Arc<crate::tls::Tls>>,
    /// Live-upgrade counters and the last outcome (`/metrics`, `/healthz`).
    upgrade: Option<Arc<crate::handoff::give::UpgradeState>>,
    /// The connection events sender, when `events.webhook_url` is set (its counters are on `/metrics`).
    events: Option<Arc<Events>>,
}

impl Api {
    /// Handlers over this publish path, counters and (optional) cluster.
    pub fn new(
        publisher: Publisher,
        reactor_metrics: Vec<Arc<ReactorMetrics>>,
        metrics: Arc<AdminMetrics>,
        settings: ApiSettings,
        cluster: Option<Arc<Cluster>>,
    ) -> Api {
        Api {
            publisher,
            reactor_metrics,
            metrics,
            settings,
            cluster,
            tls: None,
            upgrade: None,
            events: None,
        }
    }

    /// Reports the connection events counters too.
    pub fn with_events(mut self, events: Option<Arc<Events>>) -> Api {
        self.events = events;
        self
    }

    /// Reports the TLS counters too.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::Tls>>) -> Api {
        self.tls = tls;
        self
    }

    /// Reports live upgrades too.
    pub fn with_upgrade(mut self, upgrade: Arc<crate::handoff::give::UpgradeState>) -> Api {
        self.upgrade = Some(upgrade);
        self
    }

    /// Joins the cluster once it is up (a successor starts its bridge after it took over).
    pub fn set_cluster(&mut self, cluster: Option<Arc<Cluster>>) {
        self.cluster = cluster;
    }

    /// Counts an answer by status class.
    pub fn count(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.metrics.requests_2xx,
            400..=499 => &self.metrics.requests_4xx,
            _ => &self.metrics.requests_5xx,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The key check, callable with a request head alone: the listener calls it before reading a body, so a
    /// client without the key never makes the server buffer one. `Err` holds the 401 to answer with.
    pub fn check_key(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<(), Reply> {
        // The dashboard page holds no data (its script fetches /stats, which needs the key), so it is served
        // to anyone who can reach the admin port; the page asks for the key when /stats answers 401. The key
        // is checked before a route is looked up, so without it a client cannot tell routes from 404s.
        let public = matches!(
            route::route(method, path),
            Ok(Route::Healthz | Route::Dashboard)
        );
        if public || self.authorized(authorization) {
            return Ok(());
        }
        let mut reply = Reply::error(
            401,
            "missing or wrong admin API key (Authorization: Bearer <key>)",
        );
        reply
            .headers
            .push(("WWW-Authenticate", "Bearer".to_string()));
        Err(reply)
    }

    /// What the listener checks when a request head is complete, before any of its body is read: the key,
    /// then the route's body limit (`admin.max_batch_bytes` for a batch, `admin.max_publish_bytes` for every
    /// other route), so an oversized body is refused with 413 without being buffered. `Err` holds the answer.
    pub fn admit(&self, head: &Head) -> Result<(), Reply> {
        self.check_key(head.method, &head.path, head.authorization.as_deref())?;
        let limit = match route::route(head.method, &head.path) {
            Ok(Route::PublishBatch) => self.settings.max_batch_bytes,
            _ => self.settings.max_publish_bytes,
        };
        if head.body_len > limit {
            return Err(Reply::error(
                413,
                super::http::HttpError::BodyTooLarge.message(),
            ));
        }
        Ok(())
    }

    /// Answers one request.
    pub fn handle(&self, request: &Request) -> Reply {
        let authorization = request.authorization.as_deref();
        if let Err(refusal) = self.check_key(request.method, &request.path, authorization) {
            return refusal;
        }
        let routed = route::route(request.method, &request.path);
        let route = match routed {
            Ok(route) => route,
            Err(RouteError::NotFound) => return Reply::error(404, "no such route"),
            Err(RouteError::MethodNotAllowed { allow }) => {
                let mut reply = Reply::error(405, "method not allowed");
                reply.headers.push(("Allow", allow.to_string()));
                return reply;
            }
            Err(RouteError::BadSegment(why)) => return Reply::error(400, why),
        };
        match route {
            Route::PublishUser { user } => {
                self.publish(Target::User(user), TargetKind::User, request)
            }
            Route::PublishUserClient { user, client } => self.publish(
                Target::UserClient(user, client),
                TargetKind::UserClient,
                request,
            ),
            Route::PublishChannel { channel } => {
                self.publish(Target::Channel(channel), TargetKind::Channel, request)
            }
            Route::PublishAll => self.publish(Target::All, TargetKind::All, request),
            Route::PublishBatch => self.publish_batch(request),
            Route::SubscribeUser { user, channel } => {
                self.subscribe(Target::User(user), channel, request)
            }
            Route::SubscribeUserClient {
                user,
                client,
                channel,
            } => self.subscribe(Target::UserClient(user, client), channel, request),
            Route::KickUser { user } => self.kick(Target::User(user), request),
            Route::KickUserClient { user, client } => {
                self.kick(Target::UserClient(user, client), request)
            }
            Route::Presence { user } => self.presence(user),
            Route::History { stream } => self.history_route(&stream, request),
            Route::Healthz => {
                let draining = self.settings.draining.load(Relaxed);
                Reply::json(
                    if draining { 503 } else { 200 },
                    serde_json::json!({
                        "status": if draining { "draining" } else { "ok" },
                        "cluster": self.cluster.as_ref().map_or("disabled", |c| c.health()),
                        "pid": std::process::id(),
                        "upgrade": self.upgrade.as_ref().map(|u| upgrade_json(u)),
                    }),
                )
            }
            Route::Metrics => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                headers: Vec::new(),
                body: self.metrics_text().into_bytes(),
            },
            Route::Stats => self.stats(),
            Route::Dashboard => Reply {
                status: 200,
                content_type: "text/html; charset=utf-8",
                headers: vec![
                    // Everything the page needs is inline; it may only fetch from this origin.
                    ("Content-Security-Policy", DASHBOARD_CSP.to_string()),
                    ("Cache-Control", "no-cache".to_string()),
                ],
                body: DASHBOARD_HTML.as_bytes().to_vec(),
            },
        }
    }

    /// The Prometheus exposition `/metrics` answers with (and `/stats` is built from).
    fn metrics_text(&self) -> String {
        let reactors: Vec<&ReactorMetrics> =
            self.reactor_metrics.iter().map(|m| m.as_ref()).collect();
        let mut text = metrics::render(&reactors, &self.metrics, metrics::resident_bytes());
        if let Some(cluster) = &self.cluster {
            cluster.render_metrics(&mut text);
        }
        self.publisher.history().render_metrics(&mut text);
        if let Some(tls) = &self.tls {
            tls.render_metrics(&mut text);
        }
        if let Some(upgrade) = &self.upgrade {
            upgrade.render_metrics(&mut text);
        }
        if let Some(events) = &self.events {
            events.render_metrics(&mut text);
        }
        text
    }

    fn stats(&self) -> Reply {
        let cluster = self.cluster.as_ref().map(|c| stats::ClusterState {
            link_up: c.is_up(),
            nodes: c.nodes_known(),
        });
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut reply = Reply::json(200, stats::document(&self.metrics_text(), cluster, now_ms));
        reply
            .headers
            .push(("Cache-Control", "no-store".to_string()));
        reply
    }

    fn authorized(&self, authorization: Option<&str>) -> bool {
        let Some(key) = self.settings.api_key.as_deref() else {
            return true;
        };
        let presented = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.trim().as_bytes(), key.as_bytes())
    }

    fn publish(&self, target: Target, kind: TargetKind, request: &Request) -> Reply {
        let binary = request
            .content_type
            .as_deref()
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/octet-stream"));
        if !binary && std::str::from_utf8(&request.body).is_err() {
            return Reply::error(
                400,
                "body is not valid UTF-8; send binary with Content-Type: application/octet-stream",
            );
        }
        if let Err(refusal) = self.refuse_while_busy() {
            return refusal;
        }
        // In a cluster the message goes onto the bus, and every node, this one included, delivers it from there
        // in bus order: a 202 promises it is on the bus, and a message Redis refused went nowhere.
        let history = self.publisher.history();
        let mut stamp = None;
        match &self.cluster {
            // A stream with shared history: Redis assigns the offset too.
            Some(cluster) if history.keeps(&target) => {
                let limits = history.settings().limits;
                let epoch = history.fresh_epoch();
                match cluster.publish_stamped(&target, binary, &request.body, &limits, &epoch) {
                    Ok(assigned) => stamp = Some(assigned),
                    Err(e) => return Reply::error(503, &e.to_string()),
                }
            }
            Some(cluster) => {
                if let Err(e) = cluster.publish(&target, binary, &request.body) {
                    return Reply::error(503, &e.to_string());
                }
            }
            None => {
                // Framed once, stored when the stream keeps history; every reactor and recipient shares it.
                self.publisher.publish(target, binary, &request.body);
            }
        }
        self.metrics.published[kind as usize].fetch_add(1, Relaxed);
        let mut answer = serde_json::json!({
            "accepted": true,
            "target": metrics::TARGET_LABELS[kind as usize],
            "bytes": request.body.len(),
            "binary": binary,
        });
        if self.cluster.is_some() {
            answer["cluster"] = true.into();
        }
        if let Some((epoch, offset)) = stamp {
            answer["epoch"] = epoch.into();
            answer["offset"] = offset.into();
        }
        Reply::json(202, answer)
    }

    /// The 503 for a publish while the node drains or its reactors are behind, if either is so.
    fn refuse_while_busy(&self) -> Result<(), Reply> {
        if self.settings.draining.load(Relaxed) {
            return Err(Reply::error(
                503,
                "shutting down: connections are closing; publish through another node",
            ));
        }
        // A reactor that is this far behind would only queue it longer: tell the backend to retry instead.
        if self.publisher.reactors().overloaded() {
            let mut reply = Reply::error(
                503,
                "overloaded: reactors are behind on earlier publishes; retry later",
            );
            reply.headers.push(("Retry-After", "1".to_string()));
            return Err(reply);
        }
        Ok(())
    }

    /// `POST /publish/batch`: the whole body is checked first (400/413 with nothing published), then each
    /// message is framed once for all its targets and the batch goes to every reactor as one command. In a
    /// cluster the whole batch is one bus entry (Redis places its messages to streams that keep history in their
    /// shared history in the same atomic step), and every node, this one included, delivers it from the bus, at
    /// one point of the bus order: a 202 promises it is on the bus; after a 503 it is there whole or not at all
    /// (never in part), as for a single publish whose answer from Redis was lost.
    fn publish_batch(&self, request: &Request) -> Reply {
        let limits = batch::Limits {
            max_targets: self.settings.max_batch_targets,
            max_payload_bytes: self.settings.max_publish_bytes,
        };
        let items = match batch::parse(&request.body, &limits) {
            Ok(items) => items,
            Err(e) => {
                let mut answer = serde_json::json!({ "error": e.to_string() });
                if let Some(index) = e.index() {
                    answer["index"] = index.into();
                }
                return Reply::json(e.status(), answer);
            }
        };
        if let Err(refusal) = self.refuse_while_busy() {
            return refusal;
        }
        let messages = items.len();
        let targets: usize = items.iter().map(|item| item.targets.len()).sum();
        let mut kinds = [0u64; metrics::TARGET_LABELS.len()];
        for target in items.iter().flat_map(|item| &item.targets) {
            kinds[target_kind(target) as usize] += 1;
        }
        let positions = match &self.cluster {
            None => {
                let counts: Vec<usize> = items.iter().map(|item| item.targets.len()).collect();
                let sent = self.publisher.publish_batch(items);
                positions_of(&sent, &counts)
            }
            Some(cluster) => match self.publish_batch_in_cluster(cluster, items) {
                Ok(positions) => positions,
                Err(reply) => return reply,
            },
        };
        // Counted once the batch is accepted, like single publishes (not after a 503).
        for (counter, n) in self.metrics.published.iter().zip(kinds) {
            counter.fetch_add(n, Relaxed);
        }
        self.metrics.batches.fetch_add(1, Relaxed);
        let mut answer = serde_json::json!({ "messages": messages, "targets": targets });
        if self.cluster.is_some() {
            answer["cluster"] = true.into();
        }
        if !positions.is_empty() {
            answer["positions"] = positions.into();
        }
        Reply::json(202, answer)
    }

    /// The cluster half of a batch: one bus entry ([`Cluster::publish_batch`]); nothing is delivered here
    /// directly, the bus reader delivers it like every other node's. The answer's `positions` come from Redis.
    fn publish_batch_in_cluster(
        &self,
        cluster: &Cluster,
        items: Vec<BatchItem>,
    ) -> Result<Vec<serde_json::Value>, Reply> {
        let history = self.publisher.history();
        let kept: Vec<bool> = items
            .iter()
            .flat_map(|item| item.targets.iter().map(|target| history.keeps(target)))
            .collect();
        let limits = history.settings().limits;
        let places = cluster
            .publish_batch(&items, &kept, &limits, &history.fresh_epoch())
            .map_err(|e| Reply::error(503, &e.to_string()))?;
        let kept_targets = items
            .iter()
            .enumerate()
            .flat_map(|(index, item)| {
                item.targets
                    .iter()
                    .enumerate()
                    .map(move |(j, t)| (index, j, t))
            })
            .zip(&kept)
            .filter(|(_, &kept)| kept)
            .map(|(target, _)| target);
        debug_assert_eq!(kept.iter().filter(|&&k| k).count(), places.len());
        Ok(kept_targets
            .zip(places)
            .map(|((index, j, target), (epoch, offset))| {
                position(index, j, &message::stream_of(target).0, &epoch, offset)
            })
            .collect())
    }

    /// `PUT|DELETE /subscriptions/user/{user}[/client/{client}]/channel/{channel}[?since=[EPOCH:]OFFSET]`.
    fn subscribe(&self, target: Target, channel: String, request: &Request) -> Reply {
        // The same rule as a token's channel names: they end up in the fanout index and in logs.
        if channel.len() > self.settings.max_id_bytes || channel.chars().any(char::is_control) {
            return Reply::error(
                400,
                &format!(
                    "channel name must be at most auth.max_id_bytes ({}) bytes without control characters",
                    self.settings.max_id_bytes
                ),
            );
        }
        let join = request.method == Method::Put;
        let since = match crate::proto::http::query_param(&request.query, "since") {
            None => None,
            Some(_) if !join => return Reply::error(400, "since is for PUT (subscribing) only"),
            Some(text) => match self.join_position(&channel, &text) {
                Ok(position) => Some(position),
                Err(why) => return Reply::error(400, why),
            },
        };
        if self.publisher.reactors().overloaded() {
            let mut reply = Reply::error(
                503,
                "overloaded: reactors are behind on earlier commands; retry later",
            );
            reply.headers.push(("Retry-After", "1".to_string()));
            return reply;
        }
        let change = Subscription {
            target,
            channel,
            join,
            since,
        };
        // In a cluster the change goes onto the bus like a kick, so every node applies it at the same point of
        // the bus order; this node's counts come back once its reactors applied it from there.
        let counts = match &self.cluster {
            Some(cluster) => match cluster.subscribe(&change) {
                Ok(counts) => counts,
                Err(e) => return Reply::error(503, &e.to_string()),
            },
            None => self.publisher.reactors().subscribe(change, true),
        };
        self.metrics.subscriptions[usize::from(!join)].fetch_add(1, Relaxed);
        match counts {
            Some(counts) => {
                let mut answer = serde_json::json!({ "connections": counts.changed });
                if join {
                    answer["at_limit"] = counts.at_limit.into();
                }
                // In a cluster the counts are this node's; the others apply the change on their own.
                if self.cluster.is_some() {
                    answer["cluster"] = true.into();
                }
                Reply::json(200, answer)
            }
            None => Reply::error(503, "a reactor did not answer in time"),
        }
    }

    /// A subscription's `since`: `OFFSET` (in the channel stream's current epoch) or `EPOCH:OFFSET` (a
    /// different epoch gets a `resync`, as at a reconnection).
    fn join_position(&self, channel: &str, since: &str) -> Result<Position, &'static str> {
        let history = self.publisher.history();
        if !history.settings().channel {
            return Err("since needs history for channels ([history] channel = true)");
        }
        let stream = format!("channel:{channel}");
        let (epoch, offset) = match since.rsplit_once(':') {
            Some((epoch, offset)) => (epoch.to_owned(), offset),
            None => (
                history
                    .epoch(&stream)
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                since,
            ),
        };
        let offset = offset
            .parse::<u64>()
            .map_err(|_| "since must be OFFSET or EPOCH:OFFSET, OFFSET a non-negative integer")?;
        Ok(Position {
            stream,
            epoch,
            offset,
        })
    }

    /// `GET /history/{stream}?since=&limit=` and `DELETE /history/{stream}`.
    fn history_route(&self, stream: &str, request: &Request) -> Reply {
        let history = self.publisher.history();
        let Some(kind) = message::kind_of(stream) else {
            return Reply::error(404, "not a stream: use user:{user}, channel:{name} or all");
        };
        if !history.settings().enabled(kind) {
            return Reply::error(404, "history is off for this kind of stream");
        }
        if request.method == Method::Delete {
            if let Some(cluster) = &self.cluster {
                if let Err(e) = cluster.delete_history(stream) {
                    return Reply::error(503, &e.to_string());
                }
            }
            let deleted = history.delete(stream);
            return Reply::json(
                200,
                serde_json::json!({ "stream": stream, "deleted": deleted }),
            );
        }
        let number = |name: &str, default: u64| -> Result<u64, Reply> {
            match crate::proto::http::query_param(&request.query, name) {
                None => Ok(default),
                Some(text) => text.parse().map_err(|_| {
                    Reply::error(400, &format!("{name} must be a non-negative integer"))
                }),
            }
        };
        let since = match number("since", 0) {
            Ok(n) => n,
            Err(reply) => return reply,
        };
        let limit = match number("limit", DEFAULT_HISTORY_LIMIT) {
            Ok(n) if (1..=MAX_HISTORY_LIMIT).contains(&n) => n,
            Ok(_) => return Reply::error(400, &format!("limit must be 1 to {MAX_HISTORY_LIMIT}")),
            Err(reply) => return reply,
        };
        let Some(page) = history.read(stream, since, limit as usize) else {
            return Reply::error(404, "no history held for this stream");
        };
        let messages: Vec<serde_json::Value> = page
            .entries
            .iter()
            .map(|e| {
                let (payload, binary) = (e.item.payload(), e.item.is_binary());
                let data = if binary {
                    base64::engine::general_purpose::STANDARD.encode(payload)
                } else {
                    String::from_utf8_lossy(payload).into_owned()
                };
                serde_json::json!({
                    "o": e.offset,
                    "client": e.client.as_deref(),
                    "binary": binary,
                    "data": data,
                })
            })
            .collect();
        Reply::json(
            200,
            serde_json::json!({
                "stream": stream,
                "epoch": &*page.epoch,
                "first": page.first,
                "last": page.last,
                "messages": messages,
            }),
        )
    }

    fn kick(&self, target: Target, request: &Request) -> Reply {
        let code = match crate::proto::http::query_param(&request.query, "code") {
            None => DEFAULT_KICK_CODE,
            Some(text) => match text.parse::<u16>() {
                Ok(code) => code,
                Err(_) => {
                    let codes = crate::proto::frame::KICK_CODES;
                    return Reply::error(400, &format!("code must be {codes}"));
                }
            },
        };
        let reason = crate::proto::http::query_param(&request.query, "reason")
            .map_or_else(|| DEFAULT_KICK_REASON.to_string(), |r| r.into_owned());
        // The one rule for a kick's close, shared with the cluster bus's decoder.
        if let Err(e) = crate::proto::frame::check_kick_close(code, &reason) {
            return Reply::error(400, &e.to_string());
        }
        // In a cluster the kick goes onto the bus like a publish, so every node applies it in the same order as
        // the messages around it; this node's count comes back once its reactors applied it from there.
        let closed = match &self.cluster {
            Some(cluster) => match cluster.kick(&target, code, &reason) {
                Ok(closed) => closed,
                Err(e) => return Reply::error(503, &e.to_string()),
            },
            None => self.publisher.reactors().kick(target, code, &reason, true),
        };
        self.metrics.kicks.fetch_add(1, Relaxed);
        match closed {
            Some(closed) => {
                let mut answer = serde_json::json!({ "closed": closed, "code": code });
                // In a cluster, `closed` counts this node's connections; the others close theirs on their own.
                if self.cluster.is_some() {
                    answer["cluster"] = true.into();
                }
                Reply::json(200, answer)
            }
            None => Reply::error(503, "a reactor did not answer in time"),
        }
    }

    fn presence(&self, user: String) -> Reply {
        match self.publisher.reactors().presence(&user).total() {
            Some(count) => match &self.cluster {
                None => Reply::json(
                    200,
                    serde_json::json!({ "user": &*user, "connections": count }),
                ),
                Some(cluster) => match cluster.presence(&user, count as u64) {
                    Ok(p) => Reply::json(
                        200,
                        serde_json::json!({
                            "user": &*user,
                            "connections": p.connections,
                            "nodes": p.nodes,
                            "nodes_known": p.nodes_known,
                        }),
                    ),
                    Err(e) => Reply::error(503, &e.to_string()),
                },
            },
            None => Reply::error(503, "a reactor did not answer in time"),
        }
    }
}

/// The last live upgrade's outcome, for `/healthz` (and `densepush upgrade`, which polls it).
fn upgrade_json(state: &crate::handoff::give::UpgradeState) -> serde_json::Value {
    use crate::handoff::give::Outcome;
    match &*state.last.lock().unwrap_or_else(|e| e.into_inner()) {
        None => serde_json::json!({ "last": null }),
        Some(Outcome::RolledBack {
            reason,
            detail,
            started_ms,
        }) => serde_json::json!({
            "last": "rolled_back", "reason": reason, "detail": detail, "started_ms": started_ms,
        }),
        Some(Outcome::Completed {
            from_pid,
            moved,
            pause_ms,
            total_ms,
            started_ms,
        }) => serde_json::json!({
            "last": "completed", "from_pid": from_pid, "moved": moved, "pause_ms": pause_ms,
            "total_ms": total_ms, "started_ms": started_ms,
        }),
    }
}

/// The metrics kind of a publish target.
fn target_kind(target: &Target) -> TargetKind {
    match target {
        Target::User(_) => TargetKind::User,
        Target::UserClient(..) => TargetKind::UserClient,
        Target::Channel(_) => TargetKind::Channel,
        Target::All => TargetKind::All,
    }
}

/// One stored message's place, for a batch answer: message `index`, its target `target` (both indexes into the
/// body), its stream, epoch and offset.
fn position(
    index: usize,
    target: usize,
    stream: &str,
    epoch: &str,
    offset: u64,
) -> serde_json::Value {
    serde_json::json!({
        "message": index,
        "target": target,
        "stream": stream,
        "epoch": epoch,
        "offset": offset,
    })
}

/// The places history gave a batch's stored messages, by message and target index: `sent` holds one message
/// per target, in the body's order, and message `i` of the body had `counts[i]` targets.
fn positions_of(sent: &[std::sync::Arc<Message>], counts: &[usize]) -> Vec<serde_json::Value> {
    let indexes = counts
        .iter()
        .enumerate()
        .flat_map(|(index, &count)| (0..count).map(move |target| (index, target)));
    sent.iter()
        .zip(indexes)
        .filter_map(|(message, (index, target))| {
            let stamp = message.stamp()?;
            let stream = message::stream_of(message.target()).0;
            Some(position(index, target, &stream, stamp.epoch, stamp.offset))
        })
        .collect()
}

/// Compares secrets in time that depends only on their lengths, so response timing does not reveal a prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::super::http::HttpError;
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn http_error_reply_is_json() {
        let reply = Reply::error(413, HttpError::BodyTooLarge.message());
        let value: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert!(value["error"].as_str().is_some());
    }
}
