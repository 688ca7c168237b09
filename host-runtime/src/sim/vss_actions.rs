//! Host actions for backups (VSS): a whole backup as Hyper-V runs one, and single operations.

use super::*;
use hvisd_protocol::ic::status::HV_S_OK;
use hvisd_protocol::vss::{self, VssOperation};

/// An operation by name (`freeze`, `hot_backup`...) or number.
fn operation(op: &Value) -> Result<VssOperation, SimError> {
    if let Some(n) = op.as_u64() {
        return u8::try_from(n)
            .map(VssOperation)
            .map_err(|_| SimError::BadArgument(format!("VSS operation {n} is not a u8")));
    }
    let name = op
        .as_str()
        .ok_or_else(|| SimError::BadArgument(format!("VSS operation {op}: a name or a number")))?;
    (0..=u8::MAX)
        .map(VssOperation)
        .find(|o| {
            o.name()
                .and_then(|n| n.strip_prefix("VSS_OP_"))
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .ok_or_else(|| SimError::BadArgument(format!("unknown VSS operation {name:?}")))
}

impl HostSimulator {
    /// Sends one VSS message; returns the status, the reply's `flags` and the time it took.
    async fn vss_request(
        &mut self,
        name: &str,
        op: VssOperation,
        timeout: Duration,
    ) -> Result<(u32, Option<u32>, Duration), SimError> {
        let started = std::time::Instant::now();
        let reply = self
            .request(name, &vss::build_message(op, 0), timeout)
            .await?;
        let flags = vss::VssRequest::parse(&reply.body).ok().map(|r| r.flags);
        Ok((reply.status, flags, started.elapsed()))
    }

    pub(super) async fn act_vss(
        &mut self,
        action: &Action,
        script: &Script,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::VssOp { name, op } => {
                let op = operation(op)?;
                entry.insert("name".into(), json!(name));
                entry.insert("sent".into(), json!(op.to_string()));
                let (status, flags, took) = self.vss_request(name, op, timeout).await?;
                entry.insert("status".into(), status_json(status));
                entry.insert("flags".into(), json!(flags));
                entry.insert("op_us".into(), json!(took.as_micros() as u64));
                Ok(())
            }
            Action::Backup {
                name,
                pause_ms,
                thaw,
                expect,
                during,
                mark,
            } => {
                let want_ok = match expect.as_str() {
                    "ok" => true,
                    "fail" => false,
                    other => {
                        return Err(SimError::BadArgument(format!(
                            "backup expect {other:?}: use \"ok\" or \"fail\""
                        )));
                    }
                };
                entry.insert("name".into(), json!(name));
                let (status, flags, took) = self
                    .vss_request(name, VssOperation::HOT_BACKUP, timeout)
                    .await?;
                entry.insert(
                    "hot_backup".into(),
                    json!({"status": status_json(status), "flags": flags, "us": took.as_micros() as u64}),
                );
                let (status, _, took) = self
                    .vss_request(name, VssOperation::FREEZE, timeout)
                    .await?;
                entry.insert(
                    "freeze".into(),
                    json!({"status": status_json(status), "us": took.as_micros() as u64}),
                );
                let froze = status == HV_S_OK;
                if froze != want_ok {
                    return Err(SimError::BadReply(format!(
                        "FREEZE answered {}, expected {expect}",
                        status_json(status)
                    )));
                }
                if !froze {
                    return Ok(());
                }
                if let Some(mark) = mark {
                    std::fs::write(mark, b"frozen\n").map_err(|e| {
                        SimError::BadArgument(format!("backup mark {}: {e}", mark.display()))
                    })?;
                }
                let mut nested = Vec::new();
                let mut nested_ok = true;
                for (i, a) in during.iter().enumerate() {
                    let started = std::time::Instant::now();
                    let mut e = serde_json::Map::new();
                    e.insert("step".into(), json!(i + 1));
                    e.insert("action".into(), json!(a.kind()));
                    let r = self.act_boxed(a, script, timeout, &mut e).await;
                    e.insert(
                        "elapsed_us".into(),
                        json!(started.elapsed().as_micros() as u64),
                    );
                    e.insert("ok".into(), json!(r.is_ok()));
                    if let Err(err) = r {
                        nested_ok = false;
                        e.insert("error".into(), json!(err.to_string()));
                    }
                    nested.push(Value::Object(e));
                }
                if !during.is_empty() {
                    entry.insert("during".into(), Value::Array(nested));
                }
                // (A zero-length tokio sleep still waits for the next timer tick.)
                if *pause_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(*pause_ms)).await;
                }
                entry.insert("paused_ms".into(), json!(pause_ms));
                if !*thaw {
                    entry.insert("thaw".into(), json!("not sent"));
                    return Ok(());
                }
                let (status, _, took) = self.vss_request(name, VssOperation::THAW, timeout).await?;
                entry.insert(
                    "thaw".into(),
                    json!({"status": status_json(status), "us": took.as_micros() as u64}),
                );
                let (done, _, _) = self
                    .vss_request(name, VssOperation::BU_COMPLETE, timeout)
                    .await?;
                entry.insert("bu_complete".into(), status_json(done));
                if status != HV_S_OK {
                    return Err(SimError::BadReply(format!(
                        "THAW answered {}",
                        status_json(status)
                    )));
                }
                if !nested_ok {
                    return Err(SimError::BadReply(
                        "an action during the freeze failed".into(),
                    ));
                }
                Ok(())
            }
            _ => unreachable!("act_vss is only called for VSS actions"),
        }
    }
}
