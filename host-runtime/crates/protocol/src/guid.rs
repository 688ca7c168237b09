//! GUIDs as Hyper-V writes them: text 8-4-4-4-12 and Microsoft's mixed-endian binary layout.
//!
//! The binary layout is the one of Windows' `GUID` struct: `data1` as a little-endian u32, `data2`
//! and `data3` as little-endian u16s, then the 8 bytes of `data4` in order. That is what VMBus
//! offers, the shm transport's `control` socket and hvsock addresses carry; the text form is the
//! usual lowercase `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.

use std::fmt;
use std::str::FromStr;

/// A GUID in its logical fields (data1..data4), converted to/from text and the wire layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid {
    /// First group (stored little-endian on the wire).
    pub data1: u32,
    /// Second group (little-endian on the wire).
    pub data2: u16,
    /// Third group (little-endian on the wire).
    pub data3: u16,
    /// Last 8 bytes, in order.
    pub data4: [u8; 8],
}

/// Size of a GUID in its binary layout.
pub const GUID_SIZE: usize = 16;

/// Interface type GUIDs (VMBus `class_id`) of the integration components hvisd serves.
pub mod class_id {
    use super::Guid;

    /// Key/value pair exchange: a9a0f4e7-5a45-4d96-b827-8a841e8c03e6.
    pub const KVP: Guid = Guid::new(
        0xa9a0_f4e7,
        0x5a45,
        0x4d96,
        [0xb8, 0x27, 0x8a, 0x84, 0x1e, 0x8c, 0x03, 0xe6],
    );
    /// Volume shadow copy (backup freeze/thaw): 35fa2e29-ea23-4236-96ae-3a6ebacba440.
    pub const VSS: Guid = Guid::new(
        0x35fa_2e29,
        0xea23,
        0x4236,
        [0x96, 0xae, 0x3a, 0x6e, 0xba, 0xcb, 0xa4, 0x40],
    );
    /// Heartbeat: 57164f39-9115-4e78-ab55-382f3bd5422d.
    pub const HEARTBEAT: Guid = Guid::new(
        0x5716_4f39,
        0x9115,
        0x4e78,
        [0xab, 0x55, 0x38, 0x2f, 0x3b, 0xd5, 0x42, 0x2d],
    );
    /// Guest shutdown: 0e0b6031-5213-4934-818b-38d90ced39db.
    pub const SHUTDOWN: Guid = Guid::new(
        0x0e0b_6031,
        0x5213,
        0x4934,
        [0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed, 0x39, 0xdb],
    );
    /// Time synchronisation: 9527e630-d0ae-497b-adce-e80ab0175caf.
    pub const TIMESYNC: Guid = Guid::new(
        0x9527_e630,
        0xd0ae,
        0x497b,
        [0xad, 0xce, 0xe8, 0x0a, 0xb0, 0x17, 0x5c, 0xaf],
    );
    /// Guest file copy: 34d14be3-dee4-41c8-9ae7-6b174977c192.
    pub const FCOPY: Guid = Guid::new(
        0x34d1_4be3,
        0xdee4,
        0x41c8,
        [0x9a, 0xe7, 0x6b, 0x17, 0x49, 0x77, 0xc1, 0x92],
    );
}

/// The hvsock service GUID template for vsock ports: `<port>-facb-11e6-bd58-64006a7986d3`.
///
/// `data1` holds the port; Linux's `hv_sock` and Windows' `HV_GUID_VSOCK_TEMPLATE` agree on it.
pub const VSOCK_TEMPLATE: Guid = Guid::new(
    0,
    0xfacb,
    0x11e6,
    [0xbd, 0x58, 0x64, 0x00, 0x6a, 0x79, 0x86, 0xd3],
);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid::new(0, 0, 0, [0; 8]);

    /// Builds a GUID from its four logical fields.
    pub const fn new(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        Guid {
            data1,
            data2,
            data3,
            data4,
        }
    }

    /// Reads the 16-byte Microsoft mixed-endian layout.
    pub const fn from_bytes(b: [u8; GUID_SIZE]) -> Self {
        Guid {
            data1: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            data2: u16::from_le_bytes([b[4], b[5]]),
            data3: u16::from_le_bytes([b[6], b[7]]),
            data4: [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
        }
    }

    /// Writes the 16-byte Microsoft mixed-endian layout.
    pub const fn to_bytes(&self) -> [u8; GUID_SIZE] {
        let d1 = self.data1.to_le_bytes();
        let d2 = self.data2.to_le_bytes();
        let d3 = self.data3.to_le_bytes();
        let d4 = self.data4;
        [
            d1[0], d1[1], d1[2], d1[3], d2[0], d2[1], d3[0], d3[1], d4[0], d4[1], d4[2], d4[3],
            d4[4], d4[5], d4[6], d4[7],
        ]
    }

    /// The hvsock service GUID that stands for vsock port `port`.
    pub const fn for_vsock_port(port: u32) -> Self {
        Guid {
            data1: port,
            ..VSOCK_TEMPLATE
        }
    }

    /// The vsock port this GUID stands for, or `None` if it does not follow the vsock template.
    pub fn vsock_port(&self) -> Option<u32> {
        (self.data2 == VSOCK_TEMPLATE.data2
            && self.data3 == VSOCK_TEMPLATE.data3
            && self.data4 == VSOCK_TEMPLATE.data4)
            .then_some(self.data1)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// Why a string is not a GUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuidParseError {
    /// Wrong overall length (36 characters, or 38 with braces).
    #[error("GUID {text:?}: expected 36 characters as 8-4-4-4-12, got {len}")]
    Length {
        /// The rejected text (cut to 64 characters).
        text: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A dash is missing or a hex digit is not one.
    #[error("GUID {text:?}: character {position} should be {expected}")]
    Character {
        /// The rejected text.
        text: String,
        /// Byte offset of the offending character (after any opening brace).
        position: usize,
        /// What was expected there.
        expected: &'static str,
    },
}

impl FromStr for Guid {
    type Err = GuidParseError;

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case, optionally in braces).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = || s.chars().take(64).collect::<String>();
        let inner = s
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(s);
        let b = inner.as_bytes();
        if b.len() != 36 {
            return Err(GuidParseError::Length {
                text: shown(),
                len: s.len(),
            });
        }
        let mut nibbles = [0u8; 32];
        let mut n = 0;
        for (i, &c) in b.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(GuidParseError::Character {
                        text: shown(),
                        position: i,
                        expected: "'-'",
                    });
                }
                continue;
            }
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => {
                    return Err(GuidParseError::Character {
                        text: shown(),
                        position: i,
                        expected: "a hex digit",
                    });
                }
            };
            nibbles[n] = v;
            n += 1;
        }
        // Text order is big-endian per group, so the 16 bytes read off the text are the RFC layout.
        let mut be = [0u8; 16];
        for (i, byte) in be.iter_mut().enumerate() {
            *byte = (nibbles[2 * i] << 4) | nibbles[2 * i + 1];
        }
        Ok(Guid {
            data1: u32::from_be_bytes([be[0], be[1], be[2], be[3]]),
            data2: u16::from_be_bytes([be[4], be[5]]),
            data3: u16::from_be_bytes([be[6], be[7]]),
            data4: [be[8], be[9], be[10], be[11], be[12], be[13], be[14], be[15]],
        })
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Guid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GuidVisitor;
        impl serde::de::Visitor<'_> for GuidVisitor {
            type Value = Guid;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GUID as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Guid, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(GuidVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn class_ids_print_as_the_documented_text() {
        let table = [
            (class_id::KVP, "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6"),
            (class_id::VSS, "35fa2e29-ea23-4236-96ae-3a6ebacba440"),
            (class_id::HEARTBEAT, "57164f39-9115-4e78-ab55-382f3bd5422d"),
            (class_id::SHUTDOWN, "0e0b6031-5213-4934-818b-38d90ced39db"),
            (class_id::TIMESYNC, "9527e630-d0ae-497b-adce-e80ab0175caf"),
            (class_id::FCOPY, "34d14be3-dee4-41c8-9ae7-6b174977c192"),
        ];
        for (guid, text) in table {
            assert_eq!(guid.to_string(), text);
            assert_eq!(text.parse::<Guid>(), Ok(guid));
        }
    }

    #[test]
    fn binary_layout_is_microsoft_mixed_endian() {
        // Linux writes this GUID as GUID_INIT(0x57164f39, 0x9115, 0x4e78, 0xab, 0x55, ...), whose
        // bytes in memory start 39 4f 16 57 15 91 78 4e.
        let bytes = class_id::HEARTBEAT.to_bytes();
        assert_eq!(
            bytes,
            [
                0x39, 0x4f, 0x16, 0x57, 0x15, 0x91, 0x78, 0x4e, 0xab, 0x55, 0x38, 0x2f, 0x3b, 0xd5,
                0x42, 0x2d
            ]
        );
        assert_eq!(Guid::from_bytes(bytes), class_id::HEARTBEAT);
    }

    #[test]
    fn vsock_port_guid_follows_the_template_and_maps_back() {
        let g = Guid::for_vsock_port(0x3fe);
        assert_eq!(g.to_string(), "000003fe-facb-11e6-bd58-64006a7986d3");
        assert_eq!(g.vsock_port(), Some(0x3fe));
        assert_eq!(class_id::KVP.vsock_port(), None);
    }

    #[test]
    fn parse_accepts_upper_case_and_braces_and_rejects_junk() {
        let upper = "{34D14BE3-DEE4-41C8-9AE7-6B174977C192}";
        assert_eq!(upper.parse::<Guid>(), Ok(class_id::FCOPY));
        assert!(matches!(
            "34d14be3-dee4-41c8-9ae7-6b174977c19".parse::<Guid>(),
            Err(GuidParseError::Length { len: 35, .. })
        ));
        assert!(matches!(
            "34d14be3_dee4-41c8-9ae7-6b174977c192".parse::<Guid>(),
            Err(GuidParseError::Character { position: 8, .. })
        ));
        assert!(matches!(
            "34d14be3-dee4-41c8-9ae7-6b174977c19g".parse::<Guid>(),
            Err(GuidParseError::Character { position: 35, .. })
        ));
        // Multi-byte characters must not make the parser slice inside a character.
        assert!("é".repeat(18).parse::<Guid>().is_err());
    }

    #[test]
    fn serde_uses_the_text_form() {
        let json = serde_json::to_string(&class_id::VSS).expect("GUID serialises");
        assert_eq!(json, "\"35fa2e29-ea23-4236-96ae-3a6ebacba440\"");
        assert_eq!(
            serde_json::from_str::<Guid>(&json).ok(),
            Some(class_id::VSS)
        );
        assert!(serde_json::from_str::<Guid>("\"not-a-guid\"").is_err());
    }

    proptest! {
        #[test]
        fn text_and_binary_forms_round_trip(bytes in any::<[u8; 16]>()) {
            let g = Guid::from_bytes(bytes);
            prop_assert_eq!(g.to_bytes(), bytes);
            let text = g.to_string();
            prop_assert_eq!(text.len(), 36);
            prop_assert_eq!(text.to_lowercase(), text.clone());
            prop_assert_eq!(text.parse::<Guid>(), Ok(g));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,48}") {
            let _ = s.parse::<Guid>();
        }

        #[test]
        fn every_port_round_trips_through_its_guid(port in any::<u32>()) {
            prop_assert_eq!(Guid::for_vsock_port(port).vsock_port(), Some(port));
        }
    }
}
