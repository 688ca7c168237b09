//! The `offer` file of the shm transport: what the host says about one channel.
//!
//! UTF-8, one `key=value` per line, unknown keys ignored (see `shared/specs/shm-transport.md`). The same
//! type serves the guest (parsing what a host wrote) and the simulator (writing offers), so the format
//! lives in one place. Pure: no I/O, fuzzed by `host-runtime/fuzz` (`shm_offer`).

use crate::guid::Guid;
use std::fmt::Write as _;

/// An offer file larger than this is refused without reading it whole.
pub const MAX_OFFER_FILE_LEN: u64 = 16 << 10;

/// How the packets of a channel are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeMode {
    /// Integration-component channel: packets carry `vmbuspipe_hdr` + `icmsg_hdr` messages.
    Message,
    /// hvsock channel (`pipe=byte`): every payload starts with a `vmpipe_proto_header`.
    Byte,
}

/// One channel offer as the host describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Interface type: the IC class id, or the hvsock service id.
    pub class_id: Guid,
    /// The channel instance; equal to the offer directory's name.
    pub instance_id: Guid,
    /// Bytes of one direction's ring, control page included.
    pub ring_size: u32,
    /// Packet framing.
    pub pipe: PipeMode,
    /// hvsock only: whether the host initiated the connection.
    pub conn_from_host: Option<bool>,
}

/// Why an offer file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// A required key is absent.
    #[error("offer: missing required key `{0}`")]
    Missing(&'static str),
    /// A key appears twice; which value was meant is unclear.
    #[error("offer: key `{0}` given twice")]
    Duplicate(String),
    /// A line has no `=`.
    #[error("offer line {line}: expected key=value, got {text:?}")]
    NotKeyValue {
        /// 1-based line number.
        line: usize,
        /// The offending line, cut to 80 characters.
        text: String,
    },
    /// A value does not parse.
    #[error("offer: `{key}` = {value:?} is not valid: {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value, cut to 80 characters.
        value: String,
        /// What a valid value looks like.
        why: &'static str,
    },
    /// `instance_id` differs from the directory the offer sits in.
    #[error("offer: instance_id {instance_id} does not match its directory {directory:?}")]
    InstanceMismatch {
        /// What the file says.
        instance_id: Guid,
        /// The directory name.
        directory: String,
    },
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

impl Offer {
    /// Parses an offer file's text.
    pub fn parse(text: &str) -> Result<Self, OfferError> {
        let mut class_id = None;
        let mut instance_id = None;
        let mut ring_size = None;
        let mut pipe = None;
        let mut conn_from_host = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(OfferError::NotKeyValue {
                    line: i + 1,
                    text: cut(line),
                });
            };
            let (key, value) = (key.trim(), value.trim());
            let guid = |key: &'static str| {
                value.parse::<Guid>().map_err(|_| OfferError::BadValue {
                    key,
                    value: cut(value),
                    why: "a GUID in 8-4-4-4-12 hex form",
                })
            };
            match key {
                "class_id" => set_once(&mut class_id, key, guid("class_id")?)?,
                "instance_id" => set_once(&mut instance_id, key, guid("instance_id")?)?,
                "ring_size" => {
                    let bad = || OfferError::BadValue {
                        key: "ring_size",
                        value: cut(value),
                        why: "a multiple of 4096 from 8192 to 64 MiB",
                    };
                    let size: u32 = value.parse().map_err(|_| bad())?;
                    // The one ring-size limit (hvisd-ring): a multiple of 4096, 8 KiB to 64 MiB.
                    hvisd_ring::check_ring_size(size as usize).map_err(|_| bad())?;
                    set_once(&mut ring_size, key, size)?;
                }
                "pipe" => {
                    let mode = match value {
                        "byte" => PipeMode::Byte,
                        "message" => PipeMode::Message,
                        _ => {
                            return Err(OfferError::BadValue {
                                key: "pipe",
                                value: cut(value),
                                why: "`byte` (hvsock) or absent",
                            });
                        }
                    };
                    set_once(&mut pipe, key, mode)?;
                }
                "conn_from_host" => {
                    let flag = match value {
                        "1" => true,
                        "0" => false,
                        _ => {
                            return Err(OfferError::BadValue {
                                key: "conn_from_host",
                                value: cut(value),
                                why: "0 or 1",
                            });
                        }
                    };
                    set_once(&mut conn_from_host, key, flag)?;
                }
                // The spec: unknown keys are ignored, so a newer host can add some.
                _ => {}
            }
        }
        Ok(Offer {
            class_id: class_id.ok_or(OfferError::Missing("class_id"))?,
            instance_id: instance_id.ok_or(OfferError::Missing("instance_id"))?,
            ring_size: ring_size.ok_or(OfferError::Missing("ring_size"))?,
            pipe: pipe.unwrap_or(PipeMode::Message),
            conn_from_host,
        })
    }

    /// Parses an offer and checks it against the name of the directory it was found in.
    pub fn parse_in_dir(text: &str, directory: &str) -> Result<Self, OfferError> {
        let offer = Self::parse(text)?;
        match directory.parse::<Guid>() {
            Ok(dir_id) if dir_id == offer.instance_id => Ok(offer),
            _ => Err(OfferError::InstanceMismatch {
                instance_id: offer.instance_id,
                directory: cut(directory),
            }),
        }
    }

    /// The offer file's text, as the host writes it.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(text, "class_id={}", self.class_id);
        let _ = writeln!(text, "instance_id={}", self.instance_id);
        let _ = writeln!(text, "ring_size={}", self.ring_size);
        if self.pipe == PipeMode::Byte {
            text.push_str("pipe=byte\n");
        }
        if let Some(from_host) = self.conn_from_host {
            let _ = writeln!(text, "conn_from_host={}", u8::from(from_host));
        }
        text
    }

    /// Bytes of the whole `ring` file: both directions.
    pub fn ring_file_len(&self) -> u64 {
        2 * u64::from(self.ring_size)
    }
}

fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), OfferError> {
    if slot.is_some() {
        return Err(OfferError::Duplicate(key.to_owned()));
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVP: &str = "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6";
    const INST: &str = "242ff919-07db-4180-9c2e-b86cb68c8c55";

    #[test]
    fn round_trips_through_text() {
        let offer = Offer {
            class_id: KVP.parse().unwrap(),
            instance_id: INST.parse().unwrap(),
            ring_size: 16384,
            pipe: PipeMode::Byte,
            conn_from_host: Some(false),
        };
        assert_eq!(Offer::parse_in_dir(&offer.to_text(), INST).unwrap(), offer);
    }

    #[test]
    fn ignores_unknown_keys_and_blank_lines() {
        let text =
            format!("class_id={KVP}\n\nfuture_key=whatever\ninstance_id={INST}\nring_size=8192\n");
        let offer = Offer::parse(&text).unwrap();
        assert_eq!(offer.ring_size, 8192);
        assert_eq!(offer.pipe, PipeMode::Message);
    }

    #[test]
    fn refuses_ring_sizes_the_spec_forbids() {
        for size in ["4096", "8193", "0", "-1", "99999999999", "1e6"] {
            let text = format!("class_id={KVP}\ninstance_id={INST}\nring_size={size}\n");
            assert!(
                matches!(
                    Offer::parse(&text),
                    Err(OfferError::BadValue {
                        key: "ring_size",
                        ..
                    })
                ),
                "{size} accepted"
            );
        }
    }

    #[test]
    fn refuses_missing_duplicate_and_mismatched_fields() {
        let text = format!("class_id={KVP}\nring_size=8192\n");
        assert_eq!(Offer::parse(&text), Err(OfferError::Missing("instance_id")));
        let text = format!("class_id={KVP}\nclass_id={KVP}\ninstance_id={INST}\nring_size=8192\n");
        assert_eq!(
            Offer::parse(&text),
            Err(OfferError::Duplicate("class_id".into()))
        );
        let text = format!("class_id={KVP}\ninstance_id={INST}\nring_size=8192\n");
        assert!(matches!(
            Offer::parse_in_dir(&text, KVP),
            Err(OfferError::InstanceMismatch { .. })
        ));
        assert!(matches!(
            Offer::parse("no equals sign"),
            Err(OfferError::NotKeyValue { line: 1, .. })
        ));
    }
}
