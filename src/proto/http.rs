//! Small HTTP/1.1 syntax helpers shared by every request parser in the server: the WebSocket upgrade
//! (`proto::handshake`), the admin API (`admin::http`), authentication (`auth`) and history recovery
//! (`history`).
//!
//! Owns: splitting a request-target into path and query (RFC 9112 §3.2), reading one parameter from a query
//! string (raw, or form-decoded), comma-separated header lists and their tokens (RFC 9110 §5.6.1, §5.6.2),
//! case-insensitive prefixes (URI schemes, authentication schemes). Every function borrows from its input and
//! allocates only to percent-decode.
//! Does not own: parsing a request head (callers use `httparse`), which status a malformed input gets (each
//! caller maps [`UnsupportedTarget`] and `None` to its own error), or what any parameter or token means.

use std::borrow::Cow;

/// A request-target that is neither origin-form nor absolute-form with an `http` or `https` scheme
/// (RFC 9112 §3.2): asterisk-form, authority-form, or garbage. The caller picks the status (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request-target is neither origin-form nor absolute-form")]
pub struct UnsupportedTarget;

/// Splits a request-target into its raw (still percent-encoded) path and query, the query without its `?`
/// and `""` when absent.
///
/// Origin-form (`/path?query`) is what clients send; absolute-form (`http://host/path?query`) must also be
/// accepted by a server (RFC 9112 §3.2.2), so its scheme and authority are dropped, and an empty path in it
/// means `/` (RFC 9110 §4.2.3). The path always starts with `/`. A fragment is not looked for: the caller
/// decides whether `#` is an error (RFC 9112 §3.2: a request-target carries none).
pub fn split_target(target: &str) -> Result<(&str, &str), UnsupportedTarget> {
    let origin_form = if target.starts_with('/') {
        target
    } else {
        // absolute-form: scheme "://" authority path-abempty [ "?" query ]; schemes are case-insensitive
        // (RFC 3986 §3.1).
        let rest = strip_prefix_ignore_case(target, "http://")
            .or_else(|| strip_prefix_ignore_case(target, "https://"))
            .ok_or(UnsupportedTarget)?;
        // The path starts at the first '/' or '?' after the authority.
        rest.find(['/', '?']).map_or("", |i| &rest[i..])
    };
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    let path = if path.is_empty() { "/" } else { path };
    debug_assert!(path.starts_with('/'));
    Ok((path, query))
}

/// The `name=value` pairs of a query string, split on `&` and then on the first `=`, still raw. Empty pairs
/// (`a=1&&b=2`) are skipped; a bare `name` has the value `""`.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// The raw value of the first query parameter whose raw name is `name`, not percent-decoded, so a caller can
/// split it on literal delimiters (`since=a%2Cb@E:1,c@E:2`) before decoding the parts.
/// `None` when the parameter is absent; `Some("")` for `name=` or a bare `name`.
pub fn query_raw<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query_pairs(query)
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The value of the first query parameter called `name`, percent-decoded with `+` as space
/// (application/x-www-form-urlencoded, the form browsers and URL libraries write). Names are compared after
/// decoding too. Invalid UTF-8 after decoding is replaced with U+FFFD. Borrows when there is nothing to
/// decode. `None` when the parameter is absent; `Some("")` for `name=` or a bare `name`.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query_pairs(query)
        .find(|(key, _)| form_decode(key) == name)
        .map(|(_, value)| form_decode(value))
}

fn form_decode(s: &str) -> Cow<'_, str> {
    // '+' must become a space before percent-decoding, so that "%2B" still decodes to '+'.
    if s.contains('+') {
        let spaced = s.replace('+', " ");
        Cow::Owned(
            percent_encoding::percent_decode_str(&spaced)
                .decode_utf8_lossy()
                .into_owned(),
        )
    } else {
        percent_encoding::percent_decode_str(s).decode_utf8_lossy()
    }
}

/// Strips optional whitespace, SP and HTAB, from both ends of a field value or list element (RFC 9110
/// §5.6.3 OWS).
pub fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// The elements of a comma-separated field value (RFC 9110 §5.6.1 `#element`), each stripped of OWS. Empty
/// elements (`a, , b`) are skipped: §5.6.1 says a recipient must accept and ignore them. Elements are
/// returned as sent; whether they compare case-insensitively is the caller's rule (see [`has_token`]).
pub fn list_items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
        .map(trim_ows)
        .filter(|item| !item.is_empty())
}

/// Whether a comma-separated list names `token`, ASCII case-insensitively: the rule for `Connection` options
/// (RFC 9110 §7.6.1) and `Upgrade` protocol names (§7.8), e.g. `Connection: keep-alive, Upgrade`. A field that
/// repeats is one list (§5.3), so callers OR the answers of its lines.
pub fn has_token(list: &str, token: &str) -> bool {
    list_items(list).any(|item| item.eq_ignore_ascii_case(token))
}

/// Whether `s` is an RFC 9110 §5.6.2 token: one or more tchar. Anything written into a header from outside
/// must be one, or CR/LF could inject fields.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `s` without `prefix`, the prefix matched ASCII case-insensitively (URI schemes, RFC 3986 §3.1;
/// authentication schemes, RFC 9110 §11.1). `None` when `s` does not start with it.
pub fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The credentials of an `Authorization` value if its scheme is `scheme`: `Bearer abc` gives `abc` for
/// `"bearer"`. The scheme is case-insensitive (RFC 9110 §11.1) and separated from the credentials by one or
/// more spaces (RFC 9110 §11.4 `1*SP`; RFC 6750 §2.1 for Bearer). The value is trimmed first. `None` for
/// another scheme or a scheme with nothing after it.
pub fn credentials<'a>(authorization: &'a str, scheme: &str) -> Option<&'a str> {
    let rest = strip_prefix_ignore_case(authorization.trim(), scheme)?;
    // The scheme must end here: "Bearerx y" is the scheme "Bearerx".
    rest.starts_with(' ').then(|| rest.trim_start_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- request-target ----

    #[test]
    fn origin_form_splits_at_the_first_question_mark() {
        assert_eq!(split_target("/ws?token=abc"), Ok(("/ws", "token=abc")));
        assert_eq!(split_target("/a?b?c"), Ok(("/a", "b?c")));
        assert_eq!(split_target("/ws"), Ok(("/ws", "")));
        assert_eq!(split_target("/ws?"), Ok(("/ws", "")));
    }

    #[test]
    fn absolute_form_drops_scheme_and_authority() {
        assert_eq!(
            split_target("http://example.com/ws?token=abc"),
            Ok(("/ws", "token=abc"))
        );
        assert_eq!(
            split_target("HTTPS://example.com:8443/a/b"),
            Ok(("/a/b", ""))
        );
    }

    #[test]
    fn absolute_form_with_an_empty_path_is_the_root() {
        assert_eq!(split_target("http://example.com"), Ok(("/", "")));
        assert_eq!(split_target("http://example.com?x=1"), Ok(("/", "x=1")));
    }

    #[test]
    fn other_target_forms_are_unsupported() {
        for target in ["*", "example.com:443", "", "ws://example.com/ws", "ws"] {
            assert_eq!(split_target(target), Err(UnsupportedTarget), "{target:?}");
        }
    }

    #[test]
    fn fragments_are_left_to_the_caller() {
        assert_eq!(split_target("/ws#x"), Ok(("/ws#x", "")));
    }

    // ---- query strings ----

    #[test]
    fn query_param_percent_decodes_and_plus_is_space() {
        assert_eq!(
            query_param("a=1&name=J%C3%B6rg+M%2B", "name").as_deref(),
            Some("Jörg M+")
        );
    }

    #[test]
    fn query_param_absent_is_none_and_bare_is_empty() {
        assert_eq!(query_param("a=1&b", "c"), None);
        assert_eq!(query_param("a=1&b", "b").as_deref(), Some(""));
        assert_eq!(query_param("", "a"), None);
    }

    #[test]
    fn query_param_first_occurrence_wins() {
        assert_eq!(query_param("a=1&a=2", "a").as_deref(), Some("1"));
    }

    #[test]
    fn query_param_borrows_when_nothing_to_decode() {
        assert!(matches!(
            query_param("token=abc.def", "token"),
            Some(Cow::Borrowed("abc.def"))
        ));
    }

    #[test]
    fn query_param_name_is_decoded_too() {
        assert_eq!(query_param("us%65r=x", "user").as_deref(), Some("x"));
    }

    #[test]
    fn query_param_invalid_utf8_is_replaced() {
        assert_eq!(query_param("a=%FF", "a").as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn query_raw_keeps_percent_escapes() {
        assert_eq!(
            query_raw("token=x&since=a%2Cb@E:1,c@E:2", "since"),
            Some("a%2Cb@E:1,c@E:2")
        );
        assert_eq!(query_raw("recover", "recover"), Some(""));
        assert_eq!(query_raw("a=1", "since"), None);
    }

    #[test]
    fn query_raw_compares_raw_names_and_first_wins() {
        assert_eq!(query_raw("us%65r=x&user=y&user=z", "user"), Some("y"));
        assert_eq!(query_raw("a=1&&a=2", "a"), Some("1"));
        assert_eq!(query_raw("a=b=c", "a"), Some("b=c"));
    }

    // ---- header lists and tokens ----

    #[test]
    fn list_items_trim_ows_and_skip_empty_elements() {
        let items: Vec<&str> = list_items(" a ,\tb,, ,c\t").collect();
        assert_eq!(items, ["a", "b", "c"]);
        assert_eq!(list_items("").count(), 0);
    }

    #[test]
    fn has_token_is_case_insensitive_and_whole_token() {
        assert!(has_token("keep-alive, Upgrade", "upgrade"));
        assert!(has_token("h2c , WebSocket", "websocket"));
        assert!(!has_token("websocketx", "websocket"));
        assert!(!has_token("web socket", "websocket"));
        assert!(!has_token("", "upgrade"));
    }

    #[test]
    fn tokens_are_tchar_only() {
        assert!(is_token("densepush.v1"));
        assert!(is_token("!#$%&'*+-.^_`|~09azAZ"));
        assert!(!is_token(""));
        assert!(!is_token("a b"));
        assert!(!is_token("chat\r\nSet-Cookie: x"));
        assert!(!is_token("a,b"));
    }

    #[test]
    fn strip_prefix_ignores_ascii_case_only() {
        assert_eq!(strip_prefix_ignore_case("HTTP://x", "http://"), Some("x"));
        assert_eq!(strip_prefix_ignore_case("http:", "http://"), None);
        assert_eq!(strip_prefix_ignore_case("ftp://x", "http://"), None);
        // A prefix length inside a multi-byte character is no match, not a panic.
        assert_eq!(strip_prefix_ignore_case("é", "a"), None);
    }

    #[test]
    fn credentials_need_the_scheme_then_spaces() {
        assert_eq!(credentials("Bearer abc", "bearer"), Some("abc"));
        assert_eq!(credentials("  bEaReR   abc ", "bearer"), Some("abc"));
        assert_eq!(credentials("Basic abc", "bearer"), None);
        assert_eq!(credentials("Bearerabc", "bearer"), None);
        assert_eq!(credentials("Bearer", "bearer"), None);
        assert_eq!(credentials("Bearer   ", "bearer"), None);
        assert_eq!(credentials("Bearer\tabc", "bearer"), None);
    }

    proptest! {
        #[test]
        fn split_target_never_panics_and_keeps_the_target_text(target in "\\PC{0,40}") {
            if let Ok((path, query)) = split_target(&target) {
                prop_assert!(path.starts_with('/'));
                prop_assert!(!path.contains('?'));
                // Both parts are the target's own text (or the implied root).
                prop_assert!(path == "/" || target.contains(path));
                prop_assert!(target.contains(query));
            }
        }

        #[test]
        fn query_lookups_never_panic_and_agree_when_nothing_is_encoded(
            query in "[a-c=&%+]{0,24}",
            name in "[a-c]{1,2}",
        ) {
            let raw = query_raw(&query, &name);
            let decoded = query_param(&query, &name);
            if !query.contains(['%', '+']) {
                prop_assert_eq!(raw, decoded.as_deref());
            }
        }

        #[test]
        fn has_token_finds_a_token_wherever_it_is_listed(
            before in prop::collection::vec("[a-z0-9-]{1,8}", 0..4),
            after in prop::collection::vec("[a-z0-9-]{1,8}", 0..4),
            token in "[a-z]{1,8}",
            upper in any::<bool>(),
        ) {
            let listed = if upper { token.to_ascii_uppercase() } else { token.clone() };
            let list = before.iter().chain([&listed]).chain(&after).cloned().collect::<Vec<_>>().join(" ,\t");
            prop_assert!(has_token(&list, &token));
        }
    }
}
