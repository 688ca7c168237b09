//! Host actions for the small integration components: heartbeat, shutdown, time samples.

use super::*;

impl HostSimulator {
    pub(super) async fn act_ic(
        &mut self,
        action: &Action,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::Heartbeat {
                name,
                count,
                sequence,
            } => {
                let mut rounds = Vec::new();
                for n in 0..u64::from(*count) {
                    let seq = sequence.wrapping_add(n);
                    let started = Instant::now();
                    let mut body = vec![0u8; size_of::<heartbeat::HeartbeatMsg>()];
                    heartbeat::write_seq_num(&mut body, seq)
                        .map_err(|e| SimError::BadArgument(e.to_string()))?;
                    let reply = self.request(name, &body, timeout).await?;
                    let answered = heartbeat::read_seq_num(&reply.body)
                        .map_err(|e| SimError::BadReply(e.to_string()))?;
                    rounds.push(json!({
                        "sent": seq,
                        "received": answered,
                        "status": status_json(reply.status),
                        "rtt_us": started.elapsed().as_micros() as u64,
                    }));
                    if answered != seq.wrapping_add(1) || reply.status != 0 {
                        entry.insert("rounds".into(), json!(rounds));
                        return Err(SimError::BadReply(format!(
                            "heartbeat {seq} answered with {answered}, status {}",
                            status_json(reply.status)
                        )));
                    }
                }
                entry.insert("name".into(), json!(name));
                entry.insert("rounds".into(), json!(rounds));
                Ok(())
            }
            Action::Shutdown {
                name,
                flags,
                reason_code,
                message,
            } => {
                let kind_flags = shutdown::ShutdownFlags(*flags);
                let body = shutdown::ShutdownRequest {
                    reason_code: *reason_code,
                    timeout_seconds: 0,
                    flags: *flags,
                    kind: kind_flags.kind(),
                    force: kind_flags.force(),
                    message: message.clone(),
                }
                .build();
                entry.insert("name".into(), json!(name));
                entry.insert(
                    "sent".into(),
                    json!({"flags": flags, "reason_code": reason_code, "message": message}),
                );
                let reply = self.request(name, &body, timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                Ok(())
            }
            Action::Timesync { name, flags } => {
                let version = self
                    .channel(name)?
                    .ic
                    .negotiated()
                    .map(|n| n.message)
                    .ok_or_else(|| {
                        SimError::BadArgument(format!(
                            "channel {name:?} has no negotiated versions"
                        ))
                    })?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as i128)
                    .unwrap_or(0);
                let sample = timesync::TimeSample {
                    parent_time: timesync::unix_nanos_to_parent_time(now),
                    reference_time: Some(0),
                    flags: timesync::TimesyncFlags(*flags),
                    leap_flags: Some(0),
                    stratum: Some(2),
                };
                let body = sample.build(version);
                entry.insert("name".into(), json!(name));
                entry.insert(
                    "sent".into(),
                    json!({"flags": flags, "parent_time": sample.parent_time}),
                );
                let reply = self.request(name, &body, timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                Ok(())
            }
            other => Err(SimError::BadArgument(format!(
                "{} is not a ic action",
                other.kind()
            ))),
        }
    }
}
