//! The admin API's route table: maps a method and raw request path to a [`Route`] with its
//! percent-decoded path parameters.
//!
//! Owns: the list of admin endpoints, the allowed methods of each (for 405 + `Allow`), path-segment
//! decoding, and the target syntax a batch publish shares with the single publish routes ([`publish_target`]). Does not own: HTTP framing (`admin::http`), authentication, query strings, request bodies,
//! or validating user/client/channel names beyond "non-empty UTF-8".

use percent_encoding::percent_decode_str;

use super::http::Method;
use crate::message::Target;

/// An admin endpoint with its path parameters, percent-decoded, non-empty UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
// Variant docs name the path; the fields are its parameters, percent-decoded.
#[allow(missing_docs)]
pub enum Route {
    /// `POST /publish/user/{user}`
    PublishUser { user: String },
    /// `POST /publish/user/{user}/client/{client}`
    PublishUserClient { user: String, client: String },
    /// `POST /publish/channel/{channel}`
    PublishChannel { channel: String },
    /// `POST /publish/all`
    PublishAll,
    /// `POST /publish/batch`
    PublishBatch,
    /// `PUT|DELETE /subscriptions/user/{user}/channel/{channel}` (the handler tells subscribing from
    /// unsubscribing by the method)
    SubscribeUser { user: String, channel: String },
    /// `PUT|DELETE /subscriptions/user/{user}/client/{client}/channel/{channel}`
    SubscribeUserClient {
        user: String,
        client: String,
        channel: String,
    },
    /// `DELETE /connections/user/{user}`
    KickUser { user: String },
    /// `DELETE /connections/user/{user}/client/{client}`
    KickUserClient { user: String, client: String },
    /// `GET|HEAD /presence/user/{user}`
    Presence { user: String },
    /// `GET|HEAD|DELETE /history/{stream}` (the handler tells reading from deleting by the method)
    History { stream: String },
    /// `GET|HEAD /healthz`
    Healthz,
    /// `GET|HEAD /metrics`
    Metrics,
    /// `GET|HEAD /` and `/dashboard`: the live dashboard page (it carries no data itself)
    Dashboard,
    /// `GET|HEAD /stats`: the dashboard's numbers as JSON
    Stats,
}

/// Why a request did not reach a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// 404: no route has this path.
    NotFound,
    /// 405: the path exists but not for this method; `allow` is the `Allow` header value
    /// (RFC 9110 §15.5.6: a 405 response MUST carry `Allow`).
    MethodNotAllowed {
        /// The methods the path accepts.
        allow: &'static str,
    },
    /// 400: a path parameter is empty, badly percent-encoded, or not UTF-8 once decoded.
    BadSegment(&'static str),
}

impl RouteError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound => 404,
            RouteError::MethodNotAllowed { .. } => 405,
            RouteError::BadSegment(_) => 400,
        }
    }
}

/// One piece of a route pattern.
#[derive(Clone, Copy)]
enum Seg {
    /// Must equal the raw segment exactly.
    Lit(&'static str),
    /// Captured and percent-decoded.
    Param,
}
use Seg::{Lit, Param};

/// Most parameters any route captures.
const MAX_PARAMS: usize = 3;
/// Most segments any route has; longer paths cannot match.
const MAX_SEGMENTS: usize = 7;

const GET: &[Method] = &[Method::Get, Method::Head];
const POST: &[Method] = &[Method::Post];
const DELETE: &[Method] = &[Method::Delete];
const GET_DELETE: &[Method] = &[Method::Get, Method::Head, Method::Delete];
const PUT_DELETE: &[Method] = &[Method::Put, Method::Delete];

struct Entry {
    pattern: &'static [Seg],
    methods: &'static [Method],
    /// `Allow` value listing `methods` (RFC 9110 §10.2.1).
    allow: &'static str,
    /// Builds the route from the decoded parameters, in pattern order.
    build: fn([String; MAX_PARAMS]) -> Route,
}

static ROUTES: &[Entry] = &[
    Entry {
        pattern: &[Lit("publish"), Lit("user"), Param],
        methods: POST,
        allow: "POST",
        build: |[user, _, _]| Route::PublishUser { user },
    },
    Entry {
        pattern: &[Lit("publish"), Lit("user"), Param, Lit("client"), Param],
        methods: POST,
        allow: "POST",
        build: |[user, client, _]| Route::PublishUserClient { user, client },
    },
    Entry {
        pattern: &[Lit("publish"), Lit("channel"), Param],
        methods: POST,
        allow: "POST",
        build: |[channel, _, _]| Route::PublishChannel { channel },
    },
    Entry {
        pattern: &[Lit("publish"), Lit("all")],
        methods: POST,
        allow: "POST",
        build: |_| Route::PublishAll,
    },
    Entry {
        pattern: &[Lit("publish"), Lit("batch")],
        methods: POST,
        allow: "POST",
        build: |_| Route::PublishBatch,
    },
    Entry {
        pattern: &[
            Lit("subscriptions"),
            Lit("user"),
            Param,
            Lit("channel"),
            Param,
        ],
        methods: PUT_DELETE,
        allow: "PUT, DELETE",
        build: |[user, channel, _]| Route::SubscribeUser { user, channel },
    },
    Entry {
        pattern: &[
            Lit("subscriptions"),
            Lit("user"),
            Param,
            Lit("client"),
            Param,
            Lit("channel"),
            Param,
        ],
        methods: PUT_DELETE,
        allow: "PUT, DELETE",
        build: |[user, client, channel]| Route::SubscribeUserClient {
            user,
            client,
            channel,
        },
    },
    Entry {
        pattern: &[Lit("connections"), Lit("user"), Param],
        methods: DELETE,
        allow: "DELETE",
        build: |[user, _, _]| Route::KickUser { user },
    },
    Entry {
        pattern: &[Lit("connections"), Lit("user"), Param, Lit("client"), Param],
        methods: DELETE,
        allow: "DELETE",
        build: |[user, client, _]| Route::KickUserClient { user, client },
    },
    Entry {
        pattern: &[Lit("presence"), Lit("user"), Param],
        methods: GET,
        allow: "GET, HEAD",
        build: |[user, _, _]| Route::Presence { user },
    },
    Entry {
        pattern: &[Lit("history"), Param],
        methods: GET_DELETE,
        allow: "GET, HEAD, DELETE",
        build: |[stream, _, _]| Route::History { stream },
    },
    Entry {
        pattern: &[Lit("healthz")],
        methods: GET,
        allow: "GET, HEAD",
        build: |_| Route::Healthz,
    },
    Entry {
        pattern: &[Lit("metrics")],
        methods: GET,
        allow: "GET, HEAD",
        build: |_| Route::Metrics,
    },
    Entry {
        pattern: &[Lit("dashboard")],
        methods: GET,
        allow: "GET, HEAD",
        build: |_| Route::Dashboard,
    },
    Entry {
        pattern: &[Lit("stats")],
        methods: GET,
        allow: "GET, HEAD",
        build: |_| Route::Stats,
    },
];

/// Resolves `method` and the raw (still percent-encoded, query-free) `path` to a route.
///
/// A known path with the wrong method is reported before its parameters are decoded, so 405 wins over
/// a bad segment. A trailing slash is a different path (RFC 3986 §6.2.3 does not equate them), so it
/// is `NotFound`.
pub fn route(method: Method, path: &str) -> Result<Route, RouteError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(RouteError::NotFound);
    };
    if rest.is_empty() {
        // `/` is the dashboard, so an operator can open the admin address in a browser as it is.
        return if GET.contains(&method) {
            Ok(Route::Dashboard)
        } else {
            Err(RouteError::MethodNotAllowed { allow: "GET, HEAD" })
        };
    }
    if rest.ends_with('/') {
        return Err(RouteError::NotFound);
    }
    let mut segments = [""; MAX_SEGMENTS];
    let mut count = 0;
    for segment in rest.split('/') {
        let Some(slot) = segments.get_mut(count) else {
            return Err(RouteError::NotFound);
        };
        *slot = segment;
        count += 1;
    }
    let segments = &segments[..count];

    for entry in ROUTES {
        let Some(raw_params) = match_pattern(entry.pattern, segments) else {
            continue;
        };
        if !entry.methods.contains(&method) {
            return Err(RouteError::MethodNotAllowed { allow: entry.allow });
        }
        let mut params: [String; MAX_PARAMS] = Default::default();
        for (param, raw) in params.iter_mut().zip(raw_params) {
            if let Some(raw) = raw {
                *param = decode_segment(raw)?;
            }
        }
        return Ok((entry.build)(params));
    }
    Err(RouteError::NotFound)
}

/// A batch publish target, `user/{user}`, `user/{user}/client/{client}`, `channel/{channel}` or `all`: the path of
/// the single publish route after `/publish/`, with the same percent-decoding, so one spelling reaches the same
/// connections either way. `Err` says why it is not one.
pub fn publish_target(raw: &str) -> Result<Target, &'static str> {
    match route(Method::Post, &format!("/publish/{raw}")) {
        Ok(Route::PublishUser { user }) => Ok(Target::User(user)),
        Ok(Route::PublishUserClient { user, client }) => Ok(Target::UserClient(user, client)),
        Ok(Route::PublishChannel { channel }) => Ok(Target::Channel(channel)),
        Ok(Route::PublishAll) => Ok(Target::All),
        Err(RouteError::BadSegment(why)) => Err(why),
        Ok(_) | Err(_) => Err(
            "not a target: use user/{user}, user/{user}/client/{client}, channel/{channel} or all",
        ),
    }
}

/// Returns the raw parameter segments if `segments` has the shape of `pattern`.
fn match_pattern<'p>(
    pattern: &[Seg],
    segments: &[&'p str],
) -> Option<[Option<&'p str>; MAX_PARAMS]> {
    if pattern.len() != segments.len() {
        return None;
    }
    let mut params = [None; MAX_PARAMS];
    let mut captured = 0;
    for (seg, &raw) in pattern.iter().zip(segments) {
        match *seg {
            Lit(literal) if literal == raw => {}
            Lit(_) => return None,
            Param => {
                debug_assert!(captured < MAX_PARAMS, "route pattern has too many params");
                *params.get_mut(captured)? = Some(raw);
                captured += 1;
            }
        }
    }
    Some(params)
}

/// Percent-decodes one path segment (RFC 3986 §2.1), so `user%2F1` names the user `user/1`.
fn decode_segment(raw: &str) -> Result<String, RouteError> {
    if raw.is_empty() {
        return Err(RouteError::BadSegment("empty path segment"));
    }
    // RFC 3986 §2.1: pct-encoded = "%" HEXDIG HEXDIG. The decoder passes malformed escapes through
    // literally; rejecting them keeps one spelling per name.
    let bytes = raw.as_bytes();
    for (i, _) in raw.match_indices('%') {
        let well_formed = bytes
            .get(i + 1..i + 3)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit));
        if !well_formed {
            return Err(RouteError::BadSegment(
                "invalid percent-encoding in path segment",
            ));
        }
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| RouteError::BadSegment("path segment is not UTF-8 after percent-decoding"))?;
    debug_assert!(!decoded.is_empty());
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: Method, path: &str) -> Route {
        route(method, path).unwrap_or_else(|e| panic!("{method:?} {path}: {e:?}"))
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn every_route_matches_its_path_and_method() {
        let table = [
            (
                Method::Post,
                "/publish/user/u1",
                Route::PublishUser { user: s("u1") },
            ),
            (
                Method::Post,
                "/publish/user/u1/client/c1",
                Route::PublishUserClient {
                    user: s("u1"),
                    client: s("c1"),
                },
            ),
            (
                Method::Post,
                "/publish/channel/news",
                Route::PublishChannel { channel: s("news") },
            ),
            (Method::Post, "/publish/all", Route::PublishAll),
            (
                Method::Delete,
                "/connections/user/u1",
                Route::KickUser { user: s("u1") },
            ),
            (
                Method::Delete,
                "/connections/user/u1/client/c1",
                Route::KickUserClient {
                    user: s("u1"),
                    client: s("c1"),
                },
            ),
            (
                Method::Get,
                "/presence/user/u1",
                Route::Presence { user: s("u1") },
            ),
            (Method::Post, "/publish/batch", Route::PublishBatch),
            (
                Method::Put,
                "/subscriptions/user/u1/channel/news",
                Route::SubscribeUser {
                    user: s("u1"),
                    channel: s("news"),
                },
            ),
            (
                Method::Delete,
                "/subscriptions/user/u1/client/c1/channel/a%2Fb",
                Route::SubscribeUserClient {
                    user: s("u1"),
                    client: s("c1"),
                    channel: s("a/b"),
                },
            ),
            (Method::Get, "/healthz", Route::Healthz),
            (Method::Get, "/metrics", Route::Metrics),
            (Method::Get, "/", Route::Dashboard),
            (Method::Get, "/dashboard", Route::Dashboard),
            (Method::Head, "/dashboard", Route::Dashboard),
            (Method::Get, "/stats", Route::Stats),
        ];
        for (method, path, expected) in table {
            assert_eq!(ok(method, path), expected, "{method:?} {path}");
        }
    }

    #[test]
    fn head_is_allowed_wherever_get_is() {
        assert_eq!(ok(Method::Head, "/healthz"), Route::Healthz);
        assert_eq!(ok(Method::Head, "/metrics"), Route::Metrics);
        assert_eq!(
            ok(Method::Head, "/presence/user/u"),
            Route::Presence { user: s("u") }
        );
    }

    #[test]
    fn wrong_method_on_publish_is_405_allowing_post() {
        assert_eq!(
            route(Method::Get, "/publish/all"),
            Err(RouteError::MethodNotAllowed { allow: "POST" })
        );
        assert_eq!(
            route(Method::Head, "/publish/user/u/client/c"),
            Err(RouteError::MethodNotAllowed { allow: "POST" })
        );
    }

    #[test]
    fn wrong_method_on_connections_is_405_allowing_delete() {
        assert_eq!(
            route(Method::Post, "/connections/user/u"),
            Err(RouteError::MethodNotAllowed { allow: "DELETE" })
        );
    }

    #[test]
    fn wrong_method_on_get_routes_is_405_allowing_get_and_head() {
        for path in ["/healthz", "/metrics", "/presence/user/u"] {
            assert_eq!(
                route(Method::Post, path),
                Err(RouteError::MethodNotAllowed { allow: "GET, HEAD" }),
                "{path}"
            );
        }
        assert_eq!(
            route(Method::Other, "/healthz"),
            Err(RouteError::MethodNotAllowed { allow: "GET, HEAD" })
        );
    }

    #[test]
    fn method_check_precedes_segment_decoding() {
        assert_eq!(
            route(Method::Get, "/publish/user/%FF"),
            Err(RouteError::MethodNotAllowed { allow: "POST" })
        );
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for path in [
            "",
            "healthz",
            "/nope",
            "/publish",
            "/publish/user",
            "/publish/user/u/client",
            "/publish/user/u/device/d",
            "/publish/user/u/client/c/extra",
            "/a/b/c/d/e/f/g",
            "/HEALTHZ",
        ] {
            assert_eq!(
                route(Method::Get, path),
                Err(RouteError::NotFound),
                "{path:?}"
            );
        }
    }

    #[test]
    fn root_is_the_dashboard_for_get_only() {
        assert_eq!(route(Method::Head, "/"), Ok(Route::Dashboard));
        assert_eq!(
            route(Method::Post, "/"),
            Err(RouteError::MethodNotAllowed { allow: "GET, HEAD" })
        );
    }

    #[test]
    fn trailing_slash_is_not_found() {
        assert_eq!(route(Method::Get, "/healthz/"), Err(RouteError::NotFound));
        assert_eq!(
            route(Method::Post, "/publish/user/u/"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            route(Method::Post, "/publish/user/"),
            Err(RouteError::NotFound)
        );
    }

    #[test]
    fn literal_segments_are_not_percent_decoded() {
        assert_eq!(
            route(Method::Post, "/%70ublish/all"),
            Err(RouteError::NotFound)
        );
    }

    #[test]
    fn encoded_slash_is_part_of_the_name() {
        assert_eq!(
            ok(Method::Post, "/publish/user/user%2F1"),
            Route::PublishUser { user: s("user/1") }
        );
    }

    #[test]
    fn multibyte_utf8_is_decoded() {
        assert_eq!(
            ok(Method::Delete, "/connections/user/caf%C3%A9/client/a%20b"),
            Route::KickUserClient {
                user: s("café"),
                client: s("a b")
            }
        );
    }

    #[test]
    fn empty_segment_is_bad() {
        let err = route(Method::Post, "/publish/user//client/c").unwrap_err();
        assert_eq!(err, RouteError::BadSegment("empty path segment"));
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn segment_decoding_to_invalid_utf8_is_bad() {
        assert!(matches!(
            route(Method::Get, "/presence/user/%FF"),
            Err(RouteError::BadSegment(_))
        ));
        assert!(matches!(
            route(Method::Get, "/presence/user/%C3"),
            Err(RouteError::BadSegment(_))
        ));
    }

    #[test]
    fn malformed_percent_escape_is_bad() {
        for path in [
            "/presence/user/%",
            "/presence/user/a%4",
            "/presence/user/%zz",
        ] {
            assert_eq!(
                route(Method::Get, path),
                Err(RouteError::BadSegment(
                    "invalid percent-encoding in path segment"
                )),
                "{path}"
            );
        }
    }

    #[test]
    fn wrong_method_on_subscriptions_is_405_allowing_put_and_delete() {
        for path in [
            "/subscriptions/user/u/channel/c",
            "/subscriptions/user/u/client/k/channel/c",
        ] {
            assert_eq!(
                route(Method::Post, path),
                Err(RouteError::MethodNotAllowed {
                    allow: "PUT, DELETE"
                }),
                "{path}"
            );
        }
        assert_eq!(
            route(Method::Put, "/subscriptions/user/u/channel"),
            Err(RouteError::NotFound)
        );
    }

    #[test]
    fn batch_targets_use_the_publish_routes_syntax() {
        assert_eq!(publish_target("user/42"), Ok(Target::User(s("42"))));
        assert_eq!(
            publish_target("user/4%2F2/client/phone"),
            Ok(Target::UserClient(s("4/2"), s("phone")))
        );
        assert_eq!(
            publish_target("channel/news"),
            Ok(Target::Channel(s("news")))
        );
        assert_eq!(publish_target("all"), Ok(Target::All));
        for bad in ["batch", "", "user", "user/", "/user/1", "users/1", "all/x"] {
            assert!(publish_target(bad).is_err(), "{bad:?}");
        }
        assert_eq!(publish_target("user//client/c"), Err("empty path segment"));
        assert_eq!(
            publish_target("channel/%zz"),
            Err("invalid percent-encoding in path segment")
        );
    }

    #[test]
    fn route_error_statuses() {
        assert_eq!(RouteError::NotFound.status(), 404);
        assert_eq!(RouteError::MethodNotAllowed { allow: "POST" }.status(), 405);
    }
}
