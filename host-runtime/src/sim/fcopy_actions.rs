//! Host actions for guest file copy (fcopy): one whole `Copy-VMFile` over the fcopy channel.

use super::*;
use hvisd_protocol::fcopy::{CopyFlags, DATA_FRAGMENT, FcopyRequest, StartFcopy};
use hvisd_protocol::ic::status;

/// What an fcopy action must end with.
enum Expect {
    Ok,
    Fail,
    Status(u32),
}

fn expectation(text: &str) -> Result<Expect, SimError> {
    Ok(match text {
        "ok" => Expect::Ok,
        "fail" => Expect::Fail,
        other => {
            let known = [
                status::HV_S_OK,
                status::HV_E_FAIL,
                status::HV_ERROR_ALREADY_EXISTS,
                status::HV_ERROR_DISK_FULL,
                status::HV_ERROR_NOT_SUPPORTED,
                status::HV_E_ACCESSDENIED,
                status::HV_INVALIDARG,
            ];
            let by_name = known
                .into_iter()
                .find(|&code| status::name(code) == Some(other));
            let by_number = other
                .strip_prefix("0x")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok());
            Expect::Status(by_name.or(by_number).ok_or_else(|| {
                SimError::BadArgument(format!(
                    "fcopy expect {other:?}: \"ok\", \"fail\", a status name such as \
                     \"HV_ERROR_ALREADY_EXISTS\", or 0x-hex"
                ))
            })?)
        }
    })
}

/// Byte `i` of a `size` pattern, as tests recompute it.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

impl HostSimulator {
    pub(super) async fn act_fcopy(
        &mut self,
        action: &Action,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        let Action::Fcopy {
            name,
            path,
            file_name,
            text,
            size,
            file_size,
            overwrite,
            create_path,
            expect,
            cancel_after,
        } = action
        else {
            unreachable!("act_fcopy is only called for fcopy actions")
        };
        let expect = expectation(expect)?;
        let data: Vec<u8> = match (text, size) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(size)) => (0..*size).map(pattern_byte).collect(),
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return Err(SimError::BadArgument(
                    "fcopy: give `text` or `size`, not both".into(),
                ));
            }
        };
        let announced = file_size.unwrap_or(data.len() as u64);
        entry.insert("name".into(), json!(name));
        entry.insert("path".into(), json!(path));
        entry.insert("file_name".into(), json!(file_name));
        entry.insert("file_size".into(), json!(announced));

        let started = Instant::now();
        let start = FcopyRequest::Start(StartFcopy {
            file_name: file_name.clone(),
            path_name: path.clone(),
            flags: CopyFlags::new(*overwrite, *create_path),
            file_size: announced,
        })
        .build()
        .map_err(|e| SimError::BadArgument(format!("fcopy: {e}")))?;
        let reply = self.request(name, &start, timeout).await?;
        entry.insert("start".into(), status_json(reply.status));
        let mut outcome = reply.status;
        let mut sent = 0u64;
        let mut writes = 0u64;
        let mut cancelled = false;
        if outcome == status::HV_S_OK {
            for chunk in data.chunks(DATA_FRAGMENT) {
                if cancel_after.is_some_and(|after| sent >= after) {
                    break;
                }
                let body = FcopyRequest::Write {
                    offset: sent,
                    data: chunk,
                }
                .build()
                .map_err(|e| SimError::BadArgument(format!("fcopy: {e}")))?;
                let reply = self.request(name, &body, timeout).await?;
                writes += 1;
                if reply.status != status::HV_S_OK {
                    outcome = reply.status;
                    entry.insert(
                        "failed_write".into(),
                        json!({"offset": sent, "status": status_json(reply.status)}),
                    );
                    break;
                }
                sent += chunk.len() as u64;
            }
        }
        if outcome == status::HV_S_OK {
            let (last, key) = if cancel_after.is_some() {
                cancelled = true;
                (FcopyRequest::Cancel, "cancel")
            } else {
                (FcopyRequest::Complete, "complete")
            };
            let body = last
                .build()
                .map_err(|e| SimError::BadArgument(format!("fcopy: {e}")))?;
            let reply = self.request(name, &body, timeout).await?;
            entry.insert(key.into(), status_json(reply.status));
            outcome = reply.status;
        }
        let elapsed = started.elapsed();
        entry.insert("writes".into(), json!(writes));
        entry.insert("bytes_sent".into(), json!(sent));
        entry.insert("cancelled".into(), json!(cancelled));
        entry.insert("status".into(), status_json(outcome));
        entry.insert("copy_us".into(), json!(elapsed.as_micros() as u64));
        if sent > 0 && !elapsed.is_zero() {
            entry.insert(
                "mib_per_s".into(),
                json!(sent as f64 / elapsed.as_secs_f64() / (1024.0 * 1024.0)),
            );
        }
        let met = match expect {
            Expect::Ok => outcome == status::HV_S_OK,
            Expect::Fail => outcome != status::HV_S_OK,
            Expect::Status(want) => outcome == want,
        };
        if met {
            Ok(())
        } else {
            Err(SimError::BadReply(format!(
                "the copy ended with {}, which is not what `expect` asked for",
                status_json(outcome)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_by_word_name_or_number() {
        assert!(matches!(expectation("ok"), Ok(Expect::Ok)));
        assert!(matches!(expectation("fail"), Ok(Expect::Fail)));
        assert!(matches!(
            expectation("HV_ERROR_ALREADY_EXISTS"),
            Ok(Expect::Status(status::HV_ERROR_ALREADY_EXISTS))
        ));
        assert!(matches!(
            expectation("0x80070005"),
            Ok(Expect::Status(0x8007_0005))
        ));
        assert!(expectation("fine").is_err());
    }
}
