//! Why a configuration could not be loaded ([`ConfigError`]), and the parse errors of `toml` and serde
//! flattened into one line that names the key, the line, or the environment variable behind the value.
//!
//! It owns the wording of errors, not the decision that a value is wrong: that is `validate` (ranges and
//! cross-field rules), `env` (unknown variables) and serde (unknown keys and types, see `file`).

use super::FileConfig;
use std::path::PathBuf;

/// Why a configuration could not be loaded. `Display` is one line that names the key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML, or a key is unknown or has the wrong type. The message is toml's,
    /// flattened to one line, with the key path and the line number when known.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent with another; `reason` follows the key in `Display`.
    #[error("{key} {reason}")]
    Invalid {
        /// The dotted key, e.g. `websocket.pong_timeout_ms`.
        key: &'static str,
        /// What is wrong, starting with the offending value.
        reason: String,
    },
    /// A `DENSEPUSH_*` variable names no setting, or its value does not fit the setting's type.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong.
        reason: String,
    },
}

/// A [`ConfigError::Invalid`] about `key`; `reason` starts with the offending value.
pub(super) fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// A TOML syntax error, with its line and column when toml knows the position.
pub(super) fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            ConfigError::Parse(format!(
                "TOML syntax error at line {line}, column {col}: {message}"
            ))
        }
        None => ConfigError::Parse(format!("TOML syntax error: {message}")),
    }
}

/// A serde error from the merged tree carries the key path (toml prints it as a final
/// "in `a.b`" line) but no position; the same error from the original text carries the position.
/// When the key was overridden, the variable is named instead.
pub(super) fn shape_error(
    text: &str,
    error: &toml::de::Error,
    overridden: &[(String, String)],
) -> ConfigError {
    let message = error.message().trim();
    let display = error.to_string();
    let path = display
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("in `"))
        .and_then(|l| l.strip_suffix('`'))
        .filter(|p| !p.is_empty());
    let mut out = match path {
        // serde reports an unknown key against the table that holds it.
        Some(table) if message.starts_with("unknown field") => {
            format!(
                "{} in [{table}]",
                message.replacen("unknown field", "unknown key", 1)
            )
        }
        Some(key) => format!("{key}: {message}"),
        None if message.starts_with("unknown field") => {
            message.replacen("unknown field", "unknown section", 1)
        }
        None => message.to_owned(),
    };
    let from_env = path.and_then(|p| overridden.iter().rev().find(|(k, _)| k == p));
    if let Some((_, var)) = from_env {
        out.push_str(&format!(" (set by {var})"));
    } else if let Err(original) = toml::from_str::<FileConfig>(text) {
        // The line is only known when the offending value came from the file.
        if let Some(span) = original
            .span()
            .filter(|_| original.message().trim() == message)
        {
            out.push_str(&format!(" (line {})", line_col(text, span.start).0));
        }
    }
    debug_assert!(!out.contains('\n'));
    ConfigError::Parse(out.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn unknown_key_is_rejected_naming_key_and_section() {
        let msg = parse_error("[websocket]\nping_interval_ms = 30000\npong_timout_ms = 10000\n");
        assert!(msg.starts_with("unknown key `pong_timout_ms`"), "{msg}");
        assert!(msg.contains("in [websocket]"), "{msg}");
        assert!(msg.contains("(line 3)"), "{msg}");
    }

    #[test]
    fn unknown_section_is_rejected_naming_it() {
        let msg = parse_error("[sever]\nlisten = \"0.0.0.0:80\"\n");
        assert!(msg.starts_with("unknown section `sever`"), "{msg}");
        assert!(msg.contains("(line 1)"), "{msg}");
    }

    #[test]
    fn wrong_type_is_rejected_naming_key_and_line() {
        let msg = parse_error("[server]\npath = \"/ws\"\nreactors = \"four\"\n");
        assert!(
            msg.starts_with("server.reactors: invalid type: string \"four\""),
            "{msg}"
        );
        assert!(msg.ends_with("(line 3)"), "{msg}");
    }

    #[test]
    fn wrong_type_in_array_is_rejected_naming_key() {
        let msg = parse_error("[server]\nallowed_origins = [1]\n");
        assert!(msg.starts_with("server.allowed_origins"), "{msg}");
    }

    #[test]
    fn negative_integer_is_rejected_naming_key() {
        let msg = parse_error("[websocket]\nping_interval_ms = -1\n");
        assert!(
            msg.starts_with("websocket.ping_interval_ms: invalid value"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_enum_value_is_rejected_listing_choices() {
        let msg = parse_error("[log]\nlevel = \"verbose\"\n");
        assert!(
            msg.starts_with("log.level: unknown variant `verbose`"),
            "{msg}"
        );
        assert!(msg.contains("`trace`"), "{msg}");
        let msg = parse_error("[auth]\nmode = \"JWT\"\n");
        assert!(msg.starts_with("auth.mode:"), "{msg}");
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let msg = parse_error("[server]\nreactors 4\n");
        assert!(
            msg.starts_with("TOML syntax error at line 2, column "),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_key_is_rejected() {
        let msg = parse_error("[server]\nreactors = 1\nreactors = 2\n");
        assert!(msg.contains("reactors"), "{msg}");
    }

    #[test]
    fn section_that_is_not_a_table_is_rejected_naming_it() {
        let msg = parse_error("server = 5\n");
        assert!(
            msg.starts_with("server: invalid type: integer `5`, expected a [server] table"),
            "{msg}"
        );
    }

    #[test]
    fn every_error_displays_on_one_line() {
        let errors = [
            parse("[server]\nreactors 4").unwrap_err(),
            parse("[websocket]\npong_timout_ms = 1").unwrap_err(),
            parse("[server]\nreactors = \"x\"").unwrap_err(),
            parse("[server]\nmax_connections = 0").unwrap_err(),
            parse_env("", &[("DENSEPUSH_SERVER_NOPE", "1")]).unwrap_err(),
            Config::load(Path::new("/nonexistent/densepush.toml")).unwrap_err(),
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.is_empty(), "{msg:?}");
        }
    }
}
