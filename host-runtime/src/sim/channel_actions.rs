//! Host actions for channels: offer, negotiate, rescind, wait for the guest to close, pause, crash.

use super::*;

impl HostSimulator {
    pub(super) async fn act_channel(
        &mut self,
        action: &Action,
        script: &Script,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::Offer {
                service,
                name,
                instance_id,
                ring_size,
                framework_versions,
                message_versions,
                negotiate,
            } => {
                let kind = ServiceKind::from_name(service).ok_or_else(|| {
                    SimError::BadArgument(format!(
                        "unknown service {service:?}; known: heartbeat, shutdown, timesync, kvp"
                    ))
                })?;
                let name = name.clone().unwrap_or_else(|| service.clone());
                if self.channels.contains_key(&name) {
                    return Err(SimError::BadArgument(format!(
                        "a channel named {name:?} is already offered; rescind it or pick another name"
                    )));
                }
                let instance_id = match instance_id {
                    Some(text) => text.parse().map_err(|_| {
                        SimError::BadArgument(format!("instance_id {text:?} is not a GUID"))
                    })?,
                    None => random_guid(),
                };
                let offer = Offer {
                    class_id: kind.class_id(),
                    instance_id,
                    ring_size: ring_size.unwrap_or(script.ring_size),
                    pipe: PipeMode::Message,
                    conn_from_host: None,
                };
                entry.insert("name".into(), json!(name));
                entry.insert("service".into(), json!(kind.name()));
                entry.insert("instance_id".into(), json!(instance_id.to_string()));
                // A crashed host may have left this instance's directory behind; the host owns ROOT.
                let dir = self.root.join(instance_id.to_string());
                if dir.exists() {
                    shm_host::rescind(&dir)?;
                }
                let published = shm_host::publish_offer(&self.root, &offer)?;
                let started = Instant::now();
                let label = format!("host {} {}", kind.name(), instance_id);
                let channel = published.accept(timeout, &label).await?;
                entry.insert(
                    "connect_us".into(),
                    json!(started.elapsed().as_micros() as u64),
                );
                self.channels.insert(
                    name.clone(),
                    HostChannel {
                        service: kind,
                        channel,
                        ring_path: dir.join("ring"),
                        dir: Some(dir),
                        ring_size: offer.ring_size,
                        ic: IcHost::new(kind.message_type(), ic_host::offers::FRAMEWORK, &[]),
                        next_request_id: 1,
                    },
                );
                if *negotiate {
                    self.negotiate(&name, framework_versions, message_versions, timeout, entry)
                        .await?;
                }
                Ok(())
            }
            Action::Negotiate {
                name,
                framework_versions,
                message_versions,
            } => {
                self.negotiate(name, framework_versions, message_versions, timeout, entry)
                    .await
            }
            Action::ExpectClosed { name } => {
                let ch = self.channel(name)?;
                let mut packets = Vec::new();
                let outcome = tokio::time::timeout(timeout, async {
                    loop {
                        packets.clear();
                        if let Err(e) = ch.channel.recv_batch(&mut packets, 16).await {
                            return e;
                        }
                    }
                })
                .await;
                entry.insert("name".into(), json!(name));
                match outcome {
                    Ok(ChannelError::Closed { .. }) => {
                        if let Some(ch) = self.channels.remove(name)
                            && let Some(dir) = &ch.dir
                        {
                            let _ = shm_host::rescind(dir);
                        }
                        entry.insert("closed_by_guest".into(), json!(true));
                        Ok(())
                    }
                    Ok(e) => Err(e.into()),
                    Err(_) => Err(SimError::Timeout(timeout)),
                }
            }
            Action::Rescind { name } => {
                let ch = self
                    .channels
                    .remove(name)
                    .ok_or_else(|| SimError::NoChannel(name.clone()))?;
                if let Some(dir) = &ch.dir {
                    shm_host::rescind(dir)?;
                }
                entry.insert("name".into(), json!(name));
                Ok(())
            }
            Action::Sleep { ms } => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Ok(())
            }
            Action::Crash => {
                // A host that dies leaves its files and sockets behind; the guest must cope.
                std::process::exit(101);
            }
            other => Err(SimError::BadArgument(format!(
                "{} is not a channel action",
                other.kind()
            ))),
        }
    }
}
