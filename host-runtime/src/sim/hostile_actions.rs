//! Host actions for a broken or hostile host: raw packets, corrupt rings, half-written packets, truncated ring files.

use super::*;

impl HostSimulator {
    pub(super) async fn act_hostile(
        &mut self,
        action: &Action,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::Raw {
                name,
                hex,
                expect_reply,
            } => {
                let bytes = decode_hex(hex).ok_or_else(|| {
                    SimError::BadArgument(format!("hex {hex:?} is not even-length hex"))
                })?;
                entry.insert("name".into(), json!(name));
                entry.insert("sent_len".into(), json!(bytes.len()));
                let ch = self.channel(name)?;
                let id = ch.next_request_id;
                ch.next_request_id += 1;
                ch.channel.send(PacketHeader::inband(id), &[&bytes]).await?;
                if *expect_reply {
                    let packet = recv_one(&mut ch.channel, timeout).await?;
                    entry.insert("received_hex".into(), json!(encode_hex(&packet.payload)));
                }
                Ok(())
            }
            Action::CorruptRing { name, field, value } => {
                let ch = self.channel(name)?;
                let (guest_to_host, host_to_guest) = raw_rings(ch)?;
                match field.as_str() {
                    // The guest reads the host-to-guest write_index and the guest-to-host read_index.
                    "write_index" => host_to_guest.control()[0].store(*value, Ordering::SeqCst),
                    "read_index" => guest_to_host.control()[1].store(*value, Ordering::SeqCst),
                    "packet" => {
                        // A published descriptor whose len8 is `value` (e.g. more than the ring holds).
                        let write = host_to_guest.control()[0].load(Ordering::SeqCst) as usize;
                        if write + 24 > host_to_guest.data_len() {
                            return Err(SimError::BadArgument(
                                "no room to place the corrupt packet without wrapping".into(),
                            ));
                        }
                        let desc = descriptor(2, u16::try_from(*value).unwrap_or(u16::MAX));
                        host_to_guest.write_at(write, &desc);
                        host_to_guest.write_at(write + 16, &[0u8; 8]);
                        host_to_guest.control()[0].store((write + 24) as u32, Ordering::SeqCst);
                    }
                    other => {
                        return Err(SimError::BadArgument(format!(
                            "field {other:?}: use write_index, read_index or packet"
                        )));
                    }
                }
                ch.channel.notify_peer()?;
                entry.insert("name".into(), json!(name));
                entry.insert("field".into(), json!(field));
                entry.insert("value".into(), json!(value));
                Ok(())
            }
            Action::PartialPacket { name } => {
                let ch = self.channel(name)?;
                let (_, host_to_guest) = raw_rings(ch)?;
                let write = host_to_guest.control()[0].load(Ordering::SeqCst) as usize;
                // Descriptor of a 48-byte heartbeat-sized packet, then only half its payload; the
                // index is not published, so a correct guest never sees any of it.
                let desc = descriptor(2, 8);
                let end = (write + 16).min(host_to_guest.data_len());
                host_to_guest.write_at(write, &desc[..end - write]);
                entry.insert("name".into(), json!(name));
                entry.insert("at".into(), json!(write));
                Ok(())
            }
            Action::TruncateRing { name, len } => {
                let ch = self.channel(name)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&ch.ring_path)
                    .and_then(|f| f.set_len(*len))
                    .map_err(|e| SimError::BadArgument(format!("truncating the ring file: {e}")))?;
                // Only the doorbell, no ring access: the guest looks and finds its memory gone.
                ch.channel.notify_peer()?;
                entry.insert("name".into(), json!(name));
                entry.insert("len".into(), json!(len));
                // The host's own mapping is as broken as the guest's: forget the channel (its
                // directory stays: the guest must close on its own, not because of a rescind).
                self.channels.remove(name);
                Ok(())
            }
            other => Err(SimError::BadArgument(format!(
                "{} is not a hostile action",
                other.kind()
            ))),
        }
    }
}
