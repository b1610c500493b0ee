//! Environment overrides: each `DENSEPUSH_<SECTION>_<KEY>` variable replaces one key of the parsed file
//! before it is deserialized, typed after the key's default (so `DENSEPUSH_SERVER_REACTORS=4` is an
//! integer and `DENSEPUSH_ADMIN_API_KEY=12345` stays a string). Unknown sections and keys are errors
//! naming the variable.
//!
//! It owns reading the process environment and which variable set which key ([`blame_env`] adds that to a
//! validation error); it does not check values (`validate` does) nor read `auth.jwt_secret_env`'s variable.

use super::defaults::{ENV_NOT_OVERRIDES, ENV_PREFIX};
use super::{ConfigError, FileConfig};
use serde::Deserialize;

/// The process environment as UTF-8 pairs. `std::env::vars` would panic on a non-UTF-8 entry;
/// such entries are skipped unless they carry our prefix, which is an error.
pub(super) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with(ENV_PREFIX) => {
                return Err(ConfigError::Env {
                    var: name,
                    reason: "value is not valid UTF-8".into(),
                });
            }
            _ => {}
        }
    }
    Ok(env)
}

/// Every section and key with its default value, whose TOML type is the key's type.
pub(super) fn schema() -> toml::Table {
    // Serializing our own plain structs cannot fail; `schema_lists_every_section` covers it.
    toml::Table::try_from(FileConfig::default()).expect("FileConfig::default() serializes to TOML")
}

/// How an error message names the TOML type of `value`.
fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array like [\"a\", \"b\"]",
        toml::Value::Table(_) => "a table",
    }
}

/// The table's keys, comma-separated, for error messages.
pub(super) fn join_keys(table: &toml::Table) -> String {
    table
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes each `DENSEPUSH_<SECTION>_<KEY>` from `env` into `tree`. Returns `(dotted key, variable)`
/// for each override so later validation errors can say where a value came from.
pub(super) fn apply_env_overrides(
    tree: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let schema = schema();
    let mut overridden = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_NOT_OVERRIDES.contains(&var.as_str()) {
            continue;
        }
        let env_err = |reason: String| ConfigError::Env {
            var: var.clone(),
            reason,
        };
        let Some((section, key)) = rest
            .split_once('_')
            .filter(|(s, k)| !s.is_empty() && !k.is_empty())
        else {
            return Err(env_err(format!(
                "expected {ENV_PREFIX}<SECTION>_<KEY>, e.g. DENSEPUSH_SERVER_LISTEN"
            )));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let Some(toml::Value::Table(keys)) = schema.get(&section) else {
            return Err(env_err(format!(
                "unknown section [{section}]; sections are {}",
                join_keys(&schema)
            )));
        };
        let Some(default) = keys.get(&key) else {
            return Err(env_err(format!(
                "unknown key `{key}` in [{section}]; keys are {}",
                join_keys(keys)
            )));
        };
        let value = match default {
            // A string setting takes the text verbatim, even when it looks like a number.
            toml::Value::String(_) => toml::Value::String(raw.clone()),
            _ => toml::Value::deserialize(toml::de::ValueDeserializer::new(raw))
                .unwrap_or_else(|_| toml::Value::String(raw.clone())),
        };
        if std::mem::discriminant(&value) != std::mem::discriminant(default) {
            return Err(env_err(format!(
                "{section}.{key} must be {}, got `{raw}`",
                type_name(default)
            )));
        }
        // A section the file wrote as a non-table is left alone: deserializing reports it.
        if let toml::Value::Table(table) = tree
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            table.insert(key.clone(), value);
        }
        overridden.push((format!("{section}.{key}"), var.clone()));
    }
    Ok(overridden)
}

/// Adds the overriding variable's name to a validation error about an overridden key.
pub(super) fn blame_env(error: ConfigError, overridden: &[(String, String)]) -> ConfigError {
    match error {
        ConfigError::Invalid { key, reason } => {
            match overridden.iter().rev().find(|(k, _)| k == key) {
                Some((_, var)) => ConfigError::Invalid {
                    key,
                    reason: format!("{reason} (set by {var})"),
                },
                None => ConfigError::Invalid { key, reason },
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;
    use crate::config::AuthMode;
    use std::net::SocketAddr;

    #[test]
    fn schema_lists_every_section() {
        assert_eq!(
            join_keys(&schema()),
            "admin, auth, cluster, diagnostics, events, history, log, server, tls, websocket"
        );
    }

    #[test]
    fn env_overrides_a_string_key() {
        let c = parse_env(
            "[server]\nlisten = \"127.0.0.1:9000\"",
            &[("DENSEPUSH_SERVER_LISTEN", "127.0.0.2:7000")],
        )
        .unwrap();
        assert_eq!(
            c.server.listen,
            Some("127.0.0.2:7000".parse::<SocketAddr>().unwrap())
        );
    }

    #[test]
    fn env_overrides_an_integer_key() {
        let c = parse_env("", &[("DENSEPUSH_SERVER_REACTORS", "7")]).unwrap();
        assert_eq!(c.server.reactors, 7);
    }

    #[test]
    fn env_overrides_an_array_key() {
        let c = parse_env(
            "",
            &[(
                "DENSEPUSH_SERVER_ALLOWED_ORIGINS",
                r#"["https://a.example", "https://b.example"]"#,
            )],
        )
        .unwrap();
        assert_eq!(
            c.server.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn env_keeps_numeric_text_as_a_string_for_string_keys() {
        let c = parse_env("", &[("DENSEPUSH_ADMIN_API_KEY", "12345")]).unwrap();
        assert_eq!(c.admin.api_key.as_deref(), Some("12345"));
    }

    #[test]
    fn env_overrides_an_enum_key() {
        let c = parse_env(
            "",
            &[
                ("DENSEPUSH_LOG_LEVEL", "debug"),
                ("DENSEPUSH_AUTH_MODE", "none"),
            ],
        )
        .unwrap();
        assert_eq!(c.log.level, log::LevelFilter::Debug);
        assert_eq!(c.auth.mode, AuthMode::None);
    }

    #[test]
    fn env_override_of_jwt_secret_replaces_the_dev_secret() {
        let secret = "an-operator-chosen-secret-of-40-bytes-xx";
        let c = parse_env("", &[("DENSEPUSH_AUTH_JWT_SECRET", secret)]).unwrap();
        assert_eq!(c.auth.secret, secret.as_bytes());
        assert!(!c.uses_dev_secret());
    }

    #[test]
    fn env_unknown_key_is_rejected_naming_the_variable() {
        let (var, msg) = env_error("", &[("DENSEPUSH_SERVER_LISTNE", "0.0.0.0:1")]);
        assert_eq!(var, "DENSEPUSH_SERVER_LISTNE");
        assert!(msg.contains("unknown key `listne` in [server]"), "{msg}");
    }

    #[test]
    fn env_unknown_section_is_rejected_naming_the_variable() {
        let (var, msg) = env_error("", &[("DENSEPUSH_SERVR_LISTEN", "0.0.0.0:1")]);
        assert_eq!(var, "DENSEPUSH_SERVR_LISTEN");
        assert!(msg.contains("unknown section [servr]"), "{msg}");
    }

    #[test]
    fn env_variable_without_a_key_is_rejected() {
        let (var, _) = env_error("", &[("DENSEPUSH_SERVER", "x")]);
        assert_eq!(var, "DENSEPUSH_SERVER");
    }

    #[test]
    fn env_wrong_type_is_rejected_naming_the_variable_and_key() {
        let (var, msg) = env_error("", &[("DENSEPUSH_SERVER_REACTORS", "four")]);
        assert_eq!(var, "DENSEPUSH_SERVER_REACTORS");
        assert!(
            msg.contains("server.reactors must be an integer, got `four`"),
            "{msg}"
        );
    }

    #[test]
    fn env_value_failing_to_deserialize_names_the_variable() {
        let msg = match parse_env("", &[("DENSEPUSH_LOG_LEVEL", "loud")]) {
            Err(ConfigError::Parse(msg)) => msg,
            other => panic!("{other:?}"),
        };
        assert!(
            msg.starts_with("log.level: unknown variant `loud`"),
            "{msg}"
        );
        assert!(msg.ends_with("(set by DENSEPUSH_LOG_LEVEL)"), "{msg}");
    }

    #[test]
    fn env_config_path_variable_is_not_an_override() {
        assert!(parse_env("", &[("DENSEPUSH_CONFIG", "/etc/densepush.toml")]).is_ok());
    }

    #[test]
    fn env_log_filter_variable_is_not_an_override() {
        assert!(parse_env("", &[("DENSEPUSH_LOG", "densepush=debug")]).is_ok());
    }

    #[test]
    fn env_ignores_variables_without_the_prefix() {
        assert!(parse_env("", &[("HOME", "/root"), ("densepush_server_reactors", "x")]).is_ok());
    }

    #[test]
    fn validation_error_on_an_env_value_names_the_variable() {
        let (key, msg) = match parse_env("", &[("DENSEPUSH_SERVER_MAX_CONNECTIONS", "0")]) {
            Err(e @ ConfigError::Invalid { key, .. }) => (key, e.to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(key, "server.max_connections");
        assert!(
            msg.ends_with("(set by DENSEPUSH_SERVER_MAX_CONNECTIONS)"),
            "{msg}"
        );
    }

    #[test]
    fn cluster_redis_url_can_come_from_the_environment() {
        let c = parse_env(
            "",
            &[("DENSEPUSH_CLUSTER_REDIS_URL", "redis://10.0.0.1:6380")],
        )
        .unwrap()
        .cluster;
        assert_eq!(c.redis_url.as_deref(), Some("redis://10.0.0.1:6380"));
    }
}
