//! The shutdown service: parses the host's request and carries out a configured action.
//!
//! hvisd never powers the machine off by itself: the default action only logs. An operator who
//! wants Linux's behaviour configures a command (e.g. `systemctl poweroff`); it is started, not
//! awaited, so the reply reaches the host before the command takes effect, as Linux schedules its
//! power-off after sending the reply. The command learns the request from its environment:
//! `HVISD_SHUTDOWN_KIND` (`poweroff`, `restart`, `hibernate`), `HVISD_SHUTDOWN_FORCE` (`0`/`1`),
//! `HVISD_SHUTDOWN_REASON` (hex), `HVISD_SHUTDOWN_TIMEOUT` (seconds) and `HVISD_SHUTDOWN_MESSAGE`.

use crate::service::{IcMessageInfo, IcService, IcServiceError, IcStatus};
use crate::versions::{SHUTDOWN_VERSIONS, UTIL_FRAMEWORK_VERSIONS};
use hvisd_protocol::guid::{Guid, class_id};
use hvisd_protocol::ic::shutdown::{ShutdownKind, ShutdownRequest};
use hvisd_protocol::ic::{IcVersion, MessageType, status};
use std::process::{Child, Command, ExitStatus, Stdio};

const NAME: &str = "shutdown";

/// What the service does with an accepted request.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownAction {
    /// Log the request and answer `HV_S_OK`; do nothing else.
    #[default]
    LogOnly,
    /// Start this program (argv) with the request in its environment.
    Command(Vec<String>),
}

/// What happened with one request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionTaken {
    /// The request was refused (reason given) and answered `HV_E_FAIL`.
    Refused(String),
    /// The request was logged only.
    Logged,
    /// The command was started with this process id.
    CommandStarted {
        /// Process id of the command.
        pid: u32,
    },
    /// The command could not be started (reason given); answered `HV_E_FAIL`.
    CommandFailed(String),
}

/// One handled request and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShutdownOutcome {
    /// The request as parsed.
    pub request: ShutdownRequest,
    /// The status sent to the host.
    pub status: u32,
    /// What was done.
    pub action: ActionTaken,
}

/// The shutdown service.
#[derive(Debug, Default)]
pub struct ShutdownService {
    action: ShutdownAction,
    allow_hibernate: bool,
    last: Option<ShutdownOutcome>,
    child: Option<CommandRun>,
}

/// A started shutdown command. A thread of its own waits for it, so it is reaped when it exits
/// whatever happens to the service (no zombie, even if no further request comes).
#[derive(Debug)]
struct CommandRun {
    exit: std::sync::Arc<(
        std::sync::Mutex<Option<std::io::Result<ExitStatus>>>,
        std::sync::Condvar,
    )>,
}

impl CommandRun {
    fn start(mut child: Child) -> std::io::Result<Self> {
        let exit = std::sync::Arc::new((std::sync::Mutex::new(None), std::sync::Condvar::new()));
        let done = exit.clone();
        std::thread::Builder::new()
            .name("hvisd-shutdown-cmd".into())
            .spawn(move || {
                let status = child.wait();
                let (slot, cv) = &*done;
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                cv.notify_all();
            })?;
        Ok(Self { exit })
    }

    fn running(&self) -> bool {
        self.exit
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    fn wait(self) -> std::io::Result<ExitStatus> {
        let (slot, cv) = &*self.exit;
        let mut status = slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(status) = status.take() {
                return status;
            }
            status = cv.wait(status).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl ShutdownService {
    /// A service with `action`; hibernate requests are refused, as Linux refuses them when the
    /// guest cannot hibernate.
    pub fn new(action: ShutdownAction) -> Self {
        ShutdownService {
            action,
            ..Default::default()
        }
    }

    /// Accept hibernate requests (passing them to the action) instead of refusing them.
    pub fn allow_hibernate(mut self, allow: bool) -> Self {
        self.allow_hibernate = allow;
        self
    }

    /// The configured action.
    pub fn action(&self) -> &ShutdownAction {
        &self.action
    }

    /// The last request handled and what was done.
    pub fn last_outcome(&self) -> Option<&ShutdownOutcome> {
        self.last.as_ref()
    }

    /// Waits for the last started command to exit and returns its status (`None` if no command
    /// is running). Blocks the thread: for tests and for an orderly exit of the daemon.
    pub fn wait_for_command(&mut self) -> Option<std::io::Result<ExitStatus>> {
        self.child.take().map(CommandRun::wait)
    }

    /// Forgets a previous command that has exited (its thread reaped it).
    fn reap(&mut self) {
        if self.child.as_ref().is_some_and(|c| !c.running()) {
            self.child = None;
        }
    }

    fn start_command(&mut self, argv: &[String], req: &ShutdownRequest) -> ActionTaken {
        let Some((program, args)) = argv.split_first() else {
            return ActionTaken::CommandFailed("the shutdown command is empty".into());
        };
        let spawned = Command::new(program)
            .args(args)
            .env("HVISD_SHUTDOWN_KIND", req.kind.as_str())
            .env("HVISD_SHUTDOWN_FORCE", if req.force { "1" } else { "0" })
            .env("HVISD_SHUTDOWN_REASON", format!("{:#x}", req.reason_code))
            .env("HVISD_SHUTDOWN_TIMEOUT", req.timeout_seconds.to_string())
            .env("HVISD_SHUTDOWN_MESSAGE", &req.message)
            .stdin(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => {
                let pid = child.id();
                match CommandRun::start(child) {
                    Ok(run) => {
                        self.child = Some(run);
                        ActionTaken::CommandStarted { pid }
                    }
                    Err(e) => ActionTaken::CommandFailed(format!(
                        "started {program:?} (pid {pid}) but cannot watch it: {e}"
                    )),
                }
            }
            Err(e) => ActionTaken::CommandFailed(format!("cannot start {program:?}: {e}")),
        }
    }
}

impl IcService for ShutdownService {
    fn name(&self) -> &'static str {
        NAME
    }

    fn class_id(&self) -> Guid {
        class_id::SHUTDOWN
    }

    fn framework_versions(&self) -> &'static [IcVersion] {
        UTIL_FRAMEWORK_VERSIONS
    }

    fn message_versions(&self) -> &'static [IcVersion] {
        SHUTDOWN_VERSIONS
    }

    async fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> Result<IcStatus, IcServiceError> {
        info.expect_type(NAME, MessageType::SHUTDOWN)?;
        let request =
            ShutdownRequest::parse(body).map_err(|e| IcServiceError::malformed(NAME, e))?;
        self.reap();
        let action = match request.kind {
            ShutdownKind::Invalid(flags) => {
                ActionTaken::Refused(format!("flags {flags:#x} name no known request"))
            }
            ShutdownKind::Hibernate if !self.allow_hibernate => {
                ActionTaken::Refused("hibernation is not enabled on this guest".into())
            }
            _ if self.child.is_some() => {
                ActionTaken::Refused("the previous shutdown command is still running".into())
            }
            _ => match self.action.clone() {
                ShutdownAction::LogOnly => ActionTaken::Logged,
                ShutdownAction::Command(argv) => self.start_command(&argv, &request),
            },
        };
        let status = match action {
            ActionTaken::Logged | ActionTaken::CommandStarted { .. } => status::HV_S_OK,
            ActionTaken::Refused(_) | ActionTaken::CommandFailed(_) => status::HV_E_FAIL,
        };
        hvisd_protocol::throttled!(
            warn,
            kind = request.kind.as_str(),
            force = request.force,
            reason = format_args!("{:#x}", request.reason_code),
            timeout_s = request.timeout_seconds,
            host_message = %hvisd_protocol::text::Escaped::new(&request.message),
            action = ?action,
            "shutdown request from host"
        );
        self.last = Some(ShutdownOutcome {
            request,
            status,
            action,
        });
        Ok(status)
    }
}
