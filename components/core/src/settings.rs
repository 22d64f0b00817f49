//! The app's tunable settings (Spin variables with defaults), typed, with each default in
//! one place: here. `spin.toml` declares the same defaults (a unit test holds the two
//! together), so a deployment that sets nothing gets the same values from either. The
//! required values (secrets, addresses) are not settings: they are read where needed and
//! their absence is an error.

/// Every setting, as read from the variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Tools and trace endpoints may use plain `http` (on-premises tools, tests).
    pub tools_allow_http: bool,
    /// Tools and trace endpoints may name private and loopback addresses.
    pub tools_allow_private_hosts: bool,
    /// The network around the app refuses private addresses (e.g. a Kubernetes
    /// NetworkPolicy), so URLs users set may name hosts though the runtime has no
    /// `block_networks`.
    pub network_blocks_private: bool,
    /// Each step attempt's log line carries its input and output (debugging only).
    pub log_step_payloads: bool,
    /// Requests per minute per caller (user or API key).
    pub rate_limit_per_minute: u64,
    /// Requests per minute per client IP, before authentication.
    pub rate_limit_ip_per_minute: u64,
    /// Failed logins per account per 15 minutes before the account is refused.
    pub login_failures_per_account: u64,
    /// Failed logins per IP per 15 minutes before the IP is refused.
    pub login_failures_per_ip: u64,
    /// Days a finished run keeps its steps' inputs and outputs; 0 keeps them forever.
    pub step_payload_retention_days: u64,
}

/// Each setting's variable and its default, as `spin.toml` spells it.
pub const DEFAULTS: [(&str, &str); 9] = [
    ("tools_allow_http", "false"),
    ("tools_allow_private_hosts", "false"),
    ("network_blocks_private", "false"),
    ("log_step_payloads", "false"),
    ("rate_limit_per_minute", "600"),
    ("rate_limit_ip_per_minute", "1200"),
    ("login_failures_per_account", "10"),
    ("login_failures_per_ip", "50"),
    ("step_payload_retention_days", "30"),
];

impl Settings {
    /// The settings from `lookup` (a variable's value, `None` when unset or not declared
    /// for the component asking); a value that does not parse counts as unset.
    pub fn read(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let default = |name: &str| {
            DEFAULTS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, d)| *d)
                .expect("every setting has a default")
        };
        let text = |name: &str| lookup(name).unwrap_or_else(|| default(name).into());
        let flag = |name: &str| text(name).trim() == "true";
        let number = |name: &str| {
            text(name)
                .trim()
                .parse()
                .unwrap_or_else(|_| default(name).parse().expect("a numeric default"))
        };
        Self {
            tools_allow_http: flag("tools_allow_http"),
            tools_allow_private_hosts: flag("tools_allow_private_hosts"),
            network_blocks_private: flag("network_blocks_private"),
            log_step_payloads: flag("log_step_payloads"),
            rate_limit_per_minute: number("rate_limit_per_minute"),
            rate_limit_ip_per_minute: number("rate_limit_ip_per_minute"),
            login_failures_per_account: number("login_failures_per_account"),
            login_failures_per_ip: number("login_failures_per_ip"),
            step_payload_retention_days: number("step_payload_retention_days"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_and_unreadable_values_take_the_defaults_and_set_ones_win() {
        let defaults = Settings::read(|_| None);
        assert_eq!(
            defaults,
            Settings {
                tools_allow_http: false,
                tools_allow_private_hosts: false,
                network_blocks_private: false,
                log_step_payloads: false,
                rate_limit_per_minute: 600,
                rate_limit_ip_per_minute: 1200,
                login_failures_per_account: 10,
                login_failures_per_ip: 50,
                step_payload_retention_days: 30,
            }
        );
        let set = Settings::read(|name| match name {
            "tools_allow_http" => Some(" true ".into()),
            "rate_limit_per_minute" => Some("7".into()),
            "login_failures_per_ip" => Some("many".into()),
            _ => None,
        });
        assert!(set.tools_allow_http);
        assert_eq!(set.rate_limit_per_minute, 7);
        assert_eq!(set.login_failures_per_ip, 50, "unreadable: the default");
    }

    #[test]
    fn spin_toml_declares_the_same_defaults() {
        let manifest = include_str!("../../../spin.toml");
        for (name, default) in DEFAULTS {
            let line = manifest
                .lines()
                .find(|l| l.starts_with(&format!("{name} = ")))
                .unwrap_or_else(|| panic!("spin.toml declares {name}"));
            assert!(
                line.contains(&format!("default = \"{default}\"")),
                "{name}: spin.toml says `{line}`, the code {default}"
            );
        }
    }
}
