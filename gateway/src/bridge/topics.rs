//! Topic templates made concrete for this gateway: rendering a device's topics, and finding
//! the device in an incoming command topic.

use crate::config::TopicsConfig;

/// The configured templates with `{gateway_id}` filled in.
#[derive(Debug, Clone)]
pub struct Topics {
    telemetry: String,
    events: String,
    status: String,
    commands: String,
    command_results: String,
    gateway_status: String,
    anomalies: String,
    gateway_anomalies: String,
    owner: String,
    /// Whether the commands template is scoped by `{gateway_id}`, so one wildcard
    /// subscription covers exactly this gateway's devices.
    commands_scoped: bool,
}

impl Topics {
    /// Fills `{gateway_id}` in every template (validated by the config).
    pub fn new(templates: &TopicsConfig, gateway_id: &str) -> Self {
        let fill = |t: &str| t.replace("{gateway_id}", gateway_id);
        Self {
            telemetry: fill(&templates.telemetry),
            events: fill(&templates.events),
            status: fill(&templates.status),
            commands: fill(&templates.commands),
            command_results: fill(&templates.command_results),
            gateway_status: fill(&templates.gateway_status),
            anomalies: fill(&templates.anomalies),
            gateway_anomalies: fill(&templates.gateway_anomalies),
            owner: templates.owner.clone(),
            commands_scoped: templates.commands.contains("{gateway_id}"),
        }
    }

    fn device(template: &str, device_id: &str) -> String {
        template.replace("{device_id}", device_id)
    }

    /// Where a device's telemetry goes.
    pub fn telemetry(&self, device_id: &str) -> String {
        Self::device(&self.telemetry, device_id)
    }

    /// Where a device's events go.
    pub fn events(&self, device_id: &str) -> String {
        Self::device(&self.events, device_id)
    }

    /// A device's retained status.
    pub fn status(&self, device_id: &str) -> String {
        Self::device(&self.status, device_id)
    }

    /// Where a device's command outcomes go.
    pub fn command_results(&self, device_id: &str) -> String {
        Self::device(&self.command_results, device_id)
    }

    /// Where a device's anomalies go; those about no device (an address guessing tokens) go
    /// to the gateway's anomalies topic.
    pub fn anomalies(&self, device_id: &str) -> String {
        if device_id.is_empty() {
            self.gateway_anomalies.clone()
        } else {
            Self::device(&self.anomalies, device_id)
        }
    }

    /// The gateway's own retained status (and Last Will).
    pub fn gateway_status(&self) -> &str {
        &self.gateway_status
    }

    /// The command subscription for one device.
    pub fn commands(&self, device_id: &str) -> String {
        Self::device(&self.commands, device_id)
    }

    /// One filter for every device's commands, when the template is scoped by this gateway's
    /// id; otherwise `None` and the bridge subscribes per device.
    pub fn commands_wildcard(&self) -> Option<String> {
        self.commands_scoped
            .then(|| Self::device(&self.commands, "+"))
    }

    /// Whether commands are addressed fleet-wide (the template has no `{gateway_id}`), so
    /// gateways claim devices on the owner topic and take only their own devices' commands.
    pub fn commands_fleet_wide(&self) -> bool {
        !self.commands_scoped
    }

    /// Where a device's owner claim is (retained, shared by every gateway).
    pub fn owner(&self, device_id: &str) -> String {
        Self::device(&self.owner, device_id)
    }

    /// The device an incoming command topic is for, if it matches the template.
    pub fn command_device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        Self::device_in(&self.commands, topic)
    }

    /// The device an incoming owner claim is about, if the topic is an owner topic.
    pub fn owner_device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        Self::device_in(&self.owner, topic)
    }

    /// The `{device_id}` level of `topic`, if it matches `template`.
    fn device_in<'t>(template: &str, topic: &'t str) -> Option<&'t str> {
        let mut device = None;
        let mut template = template.split('/');
        for level in topic.split('/') {
            match template.next()? {
                "{device_id}" if !level.is_empty() => device = Some(level),
                literal if literal == level => {}
                _ => return None,
            }
        }
        if template.next().is_some() {
            return None;
        }
        device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_templates_render_and_commands_parse_back() {
        let t = Topics::new(&TopicsConfig::default(), "gw1");
        assert_eq!(t.telemetry("d1"), "gateway/gw1/devices/d1/telemetry");
        assert_eq!(
            t.command_results("d1"),
            "gateway/gw1/devices/d1/commands/results"
        );
        assert_eq!(t.gateway_status(), "gateway/gw1/status");
        assert_eq!(
            t.commands_wildcard().as_deref(),
            Some("gateway/gw1/devices/+/commands")
        );
        assert_eq!(
            t.command_device("gateway/gw1/devices/d1/commands"),
            Some("d1")
        );
        assert_eq!(t.command_device("gateway/gw2/devices/d1/commands"), None);
        assert_eq!(
            t.command_device("gateway/gw1/devices/d1/commands/results"),
            None
        );
        assert_eq!(t.command_device("gateway/gw1/devices//commands"), None);
    }

    #[test]
    fn a_template_without_the_gateway_id_is_subscribed_per_device() {
        let templates = TopicsConfig {
            commands: "cmd/{device_id}".into(),
            ..TopicsConfig::default()
        };
        let t = Topics::new(&templates, "gw1");
        assert_eq!(t.commands_wildcard(), None);
        assert_eq!(t.commands("d9"), "cmd/d9");
        assert_eq!(t.command_device("cmd/d9"), Some("d9"));
        assert!(t.commands_fleet_wide());
        assert_eq!(t.owner("d9"), "devices/d9/owner");
        assert_eq!(t.owner_device("devices/d9/owner"), Some("d9"));
        assert_eq!(t.owner_device("cmd/d9"), None);
    }
}
