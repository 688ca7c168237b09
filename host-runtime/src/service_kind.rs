//! [`ServiceKind`]: which integration service a channel carries. A leaf module: the config, the
//! services and the simulator all name services through it.

use hvisd_protocol::guid::Guid;

/// The services hvisd runs on VMBus channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// Heartbeat: proves the guest is alive.
    Heartbeat,
    /// Shutdown: the host asks the guest to shut down or restart.
    Shutdown,
    /// Time synchronisation samples from the host.
    TimeSync,
    /// Key/value exchange.
    Kvp,
    /// Backups: freeze and thaw the file systems around a host snapshot.
    Vss,
    /// Guest file copy: the host writes files into the guest (`Copy-VMFile`).
    Fcopy,
}

impl ServiceKind {
    /// Every kind, in the order the simulator offers them.
    pub const ALL: [ServiceKind; 6] = [
        Self::Heartbeat,
        Self::Shutdown,
        Self::TimeSync,
        Self::Kvp,
        Self::Vss,
        Self::Fcopy,
    ];

    /// The name used in logs, config and simulator scripts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat",
            Self::Shutdown => "shutdown",
            Self::TimeSync => "timesync",
            Self::Kvp => "kvp",
            Self::Vss => "vss",
            Self::Fcopy => "fcopy",
        }
    }

    /// The VMBus interface type the host offers for this service.
    pub fn class_id(self) -> Guid {
        use hvisd_protocol::guid::class_id;
        match self {
            Self::Heartbeat => class_id::HEARTBEAT,
            Self::Shutdown => class_id::SHUTDOWN,
            Self::TimeSync => class_id::TIMESYNC,
            Self::Kvp => class_id::KVP,
            Self::Vss => class_id::VSS,
            Self::Fcopy => class_id::FCOPY,
        }
    }

    /// The IC message type the service's messages carry.
    pub fn message_type(self) -> hvisd_protocol::ic::MessageType {
        use hvisd_protocol::ic::MessageType;
        match self {
            Self::Heartbeat => MessageType::HEARTBEAT,
            Self::Shutdown => MessageType::SHUTDOWN,
            Self::TimeSync => MessageType::TIMESYNC,
            Self::Kvp => MessageType::KVP_EXCHANGE,
            Self::Vss => MessageType::VSS,
            Self::Fcopy => MessageType::FCOPY,
        }
    }

    /// The kind with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}
