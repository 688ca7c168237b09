//! The runtime's TOML configuration.
//!
//! Every section is optional; an empty file gives a runtime that answers every IC it knows and only
//! logs a host's shutdown request. Unknown keys are refused so a typo is an error, not a silent default.

use crate::services::ServiceKind;
use hvisd_ic::shutdown::ShutdownAction;
use serde::Deserialize;
use std::path::Path;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which services answer their offers.
    #[serde(default)]
    pub services: ServicesConfig,
    /// What a shutdown request from the host does.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

/// `[services]`: each service can be turned off, e.g. when another daemon still owns it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    /// Answer heartbeats.
    #[serde(default = "yes")]
    pub heartbeat: bool,
    /// Answer shutdown requests.
    #[serde(default = "yes")]
    pub shutdown: bool,
    /// Take time samples.
    #[serde(default = "yes")]
    pub timesync: bool,
    /// Key/value exchange.
    #[serde(default = "yes")]
    pub kvp: bool,
}

fn yes() -> bool {
    true
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            heartbeat: true,
            shutdown: true,
            timesync: true,
            kvp: true,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// `log` (default): record the request and do nothing else. `command`: run `command`.
    #[serde(default)]
    pub action: ShutdownActionName,
    /// The program and arguments run when `action = "command"`, e.g. `["systemctl", "poweroff"]`.
    #[serde(default)]
    pub command: Vec<String>,
}

/// The names `[shutdown] action` accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownActionName {
    /// Only log.
    #[default]
    Log,
    /// Run the configured command.
    Command,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key.
    #[error("config {path}: {source}")]
    Parse {
        /// The path.
        path: String,
        /// What the TOML parser said (with line and column).
        source: toml::de::Error,
    },
    /// A value is inconsistent with another.
    #[error("config {path}: {field}: {why}")]
    Invalid {
        /// The path.
        path: String,
        /// The field, e.g. `shutdown.command`.
        field: &'static str,
        /// What is wrong and how to fix it.
        why: &'static str,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        if config.shutdown.action == ShutdownActionName::Command && config.shutdown.command.is_empty() {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field: "shutdown.command",
                why: "action = \"command\" needs a command, e.g. command = [\"systemctl\", \"poweroff\"]",
            });
        }
        Ok(config)
    }

    /// Whether `kind` answers its offers.
    pub fn service_enabled(&self, kind: ServiceKind) -> bool {
        match kind {
            ServiceKind::Heartbeat => self.services.heartbeat,
            ServiceKind::Shutdown => self.services.shutdown,
            ServiceKind::TimeSync => self.services.timesync,
            ServiceKind::Kvp => self.services.kvp,
        }
    }

    /// The shutdown action as the service takes it.
    pub fn shutdown_action(&self) -> ShutdownAction {
        match self.shutdown.action {
            ShutdownActionName::Log => ShutdownAction::LogOnly,
            ShutdownActionName::Command => ShutdownAction::Command(self.shutdown.command.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_enables_everything_and_only_logs_shutdown() {
        let config = Config::parse("", "test").unwrap();
        assert!(ServiceKind::ALL.iter().all(|k| config.service_enabled(*k)));
        assert!(matches!(config.shutdown_action(), ShutdownAction::LogOnly));
    }

    #[test]
    fn unknown_keys_and_incomplete_command_are_refused() {
        let err = Config::parse("[services]\nheartbeet = false\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("heartbeet"), "{err}");
        let err = Config::parse("[shutdown]\naction = \"command\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("shutdown.command"), "{err}");
    }
}
