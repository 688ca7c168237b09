//! Time sync IC messages: `struct ictimesync_data` (versions 1 and 3) and
//! `struct ictimesync_ref_data` (version 4 and later).
//!
//! Host times count 100 ns units since 1601-01-01 UTC (Windows `FILETIME`).

use super::{IcParseError, IcVersion};
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// 100 ns units from 1601-01-01 to 1970-01-01 (Linux's `WLTIMEDELTA`).
pub const WLTIMEDELTA: u64 = 116_444_736_000_000_000;

/// `struct ictimesync_data` (message versions below 4.0).
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct TimesyncMsg {
    /// Host UTC time, 100 ns units since 1601.
    pub parenttime: U64,
    /// Guest time as the host last saw it; unused by Linux.
    pub childtime: U64,
    /// Round-trip estimate; unused by Linux.
    pub roundtriptime: U64,
    /// See [`TimesyncFlags`].
    pub flags: u8,
}

/// `struct ictimesync_ref_data` (message version 4.0 and later).
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct TimesyncRefMsg {
    /// Host UTC time, 100 ns units since 1601.
    pub parenttime: U64,
    /// The partition reference counter (100 ns ticks) when the host took `parenttime`.
    pub vmreferencetime: U64,
    /// See [`TimesyncFlags`].
    pub flags: u8,
    /// Leap second indicator (NTP-style).
    pub leapflags: u8,
    /// Stratum of the host's clock.
    pub stratum: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

const _: () = assert!(size_of::<TimesyncMsg>() == 25);
const _: () = assert!(size_of::<TimesyncRefMsg>() == 22);

/// The first message version that carries [`TimesyncRefMsg`]: Linux picks the layout by
/// `negotiated > 3.0`.
pub const REF_DATA_MIN_VERSION: IcVersion = IcVersion::new(3, 1);

/// `flags` of a time message: an open bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct TimesyncFlags(pub u8);

impl TimesyncFlags {
    /// A probe: no time to apply.
    pub const PROBE: TimesyncFlags = TimesyncFlags(0);
    /// A hard sync request (after boot or restore): the guest should step its clock.
    pub const SYNC: TimesyncFlags = TimesyncFlags(1);
    /// A periodic sample: a hint the guest may use.
    pub const SAMPLE: TimesyncFlags = TimesyncFlags(2);

    /// True if `SYNC` is set.
    pub fn is_sync(self) -> bool {
        self.0 & Self::SYNC.0 != 0
    }

    /// True if `SAMPLE` is set.
    pub fn is_sample(self) -> bool {
        self.0 & Self::SAMPLE.0 != 0
    }
}

/// One time message, whichever layout it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimeSample {
    /// Host UTC time, 100 ns units since 1601.
    pub parent_time: u64,
    /// Reference counter at `parent_time` (version 4 only).
    pub reference_time: Option<u64>,
    /// Flags.
    pub flags: TimesyncFlags,
    /// Leap indicator (version 4 only).
    pub leap_flags: Option<u8>,
    /// Stratum (version 4 only).
    pub stratum: Option<u8>,
}

impl TimeSample {
    /// True if `version` uses the reference-time layout.
    pub fn uses_ref_layout(version: IcVersion) -> bool {
        version >= REF_DATA_MIN_VERSION
    }

    /// Parses a time message body in the layout of the negotiated message `version`.
    pub fn parse(body: &[u8], version: IcVersion) -> Result<Self, IcParseError> {
        if Self::uses_ref_layout(version) {
            let (m, _) =
                TimesyncRefMsg::read_from_prefix(body).map_err(|_| IcParseError::Truncated {
                    what: "ictimesync_ref_data",
                    need: size_of::<TimesyncRefMsg>(),
                    got: body.len(),
                })?;
            Ok(TimeSample {
                parent_time: m.parenttime.get(),
                reference_time: Some(m.vmreferencetime.get()),
                flags: TimesyncFlags(m.flags),
                leap_flags: Some(m.leapflags),
                stratum: Some(m.stratum),
            })
        } else {
            let (m, _) =
                TimesyncMsg::read_from_prefix(body).map_err(|_| IcParseError::Truncated {
                    what: "ictimesync_data",
                    need: size_of::<TimesyncMsg>(),
                    got: body.len(),
                })?;
            Ok(TimeSample {
                parent_time: m.parenttime.get(),
                reference_time: None,
                flags: TimesyncFlags(m.flags),
                leap_flags: None,
                stratum: None,
            })
        }
    }

    /// Builds the body for message `version` (what the host sends). Fields the layout lacks are
    /// sent as zero.
    pub fn build(&self, version: IcVersion) -> Vec<u8> {
        if Self::uses_ref_layout(version) {
            TimesyncRefMsg {
                parenttime: U64::new(self.parent_time),
                vmreferencetime: U64::new(self.reference_time.unwrap_or(0)),
                flags: self.flags.0,
                leapflags: self.leap_flags.unwrap_or(0),
                stratum: self.stratum.unwrap_or(0),
                reserved: [0; 3],
            }
            .as_bytes()
            .to_vec()
        } else {
            TimesyncMsg {
                parenttime: U64::new(self.parent_time),
                flags: self.flags.0,
                ..Default::default()
            }
            .as_bytes()
            .to_vec()
        }
    }

    /// Host time as nanoseconds since the Unix epoch (negative before 1970).
    pub fn host_time_unix_nanos(&self) -> i128 {
        (i128::from(self.parent_time) - i128::from(WLTIMEDELTA)) * 100
    }
}

/// Converts nanoseconds since the Unix epoch to host time units (100 ns since 1601), saturating
/// at the ends of the `u64` range.
pub fn unix_nanos_to_parent_time(unix_nanos: i128) -> u64 {
    let t = unix_nanos.div_euclid(100) + i128::from(WLTIMEDELTA);
    t.clamp(0, i128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn version_4_uses_the_reference_layout_and_3_does_not() {
        assert!(TimeSample::uses_ref_layout(IcVersion::new(4, 0)));
        assert!(!TimeSample::uses_ref_layout(IcVersion::new(3, 0)));
        assert!(!TimeSample::uses_ref_layout(IcVersion::new(1, 0)));
    }

    #[test]
    fn samples_round_trip_in_both_layouts() {
        let v4 = TimeSample {
            parent_time: WLTIMEDELTA + 10,
            reference_time: Some(77),
            flags: TimesyncFlags::SAMPLE,
            leap_flags: Some(1),
            stratum: Some(2),
        };
        let body = v4.build(IcVersion::new(4, 0));
        assert_eq!(body.len(), 22);
        assert_eq!(TimeSample::parse(&body, IcVersion::new(4, 0)), Ok(v4));

        let v3 = TimeSample {
            parent_time: 5,
            reference_time: None,
            flags: TimesyncFlags::SYNC,
            leap_flags: None,
            stratum: None,
        };
        let body = v3.build(IcVersion::new(3, 0));
        assert_eq!(body.len(), 25);
        assert_eq!(body[24], 1);
        assert_eq!(TimeSample::parse(&body, IcVersion::new(3, 0)), Ok(v3));
    }

    #[test]
    fn a_v4_sized_body_is_too_short_for_v3() {
        let err = TimeSample::parse(&[0; 22], IcVersion::new(3, 0)).unwrap_err();
        assert_eq!(
            err,
            IcParseError::Truncated {
                what: "ictimesync_data",
                need: 25,
                got: 22
            }
        );
    }

    #[test]
    fn host_time_converts_to_the_unix_epoch() {
        let s = TimeSample {
            parent_time: WLTIMEDELTA + 15,
            reference_time: None,
            flags: TimesyncFlags::SAMPLE,
            leap_flags: None,
            stratum: None,
        };
        assert_eq!(s.host_time_unix_nanos(), 1500);
        assert_eq!(unix_nanos_to_parent_time(1500), WLTIMEDELTA + 15);
        assert_eq!(unix_nanos_to_parent_time(i128::MIN / 2), 0);
    }

    proptest! {
        #[test]
        fn parse_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..40),
            major in 0u16..6,
        ) {
            let _ = TimeSample::parse(&bytes, IcVersion::new(major, 0));
        }

        #[test]
        fn unix_time_round_trips_at_100ns_resolution(t in 0u64..u64::MAX / 2) {
            let s = TimeSample {
                parent_time: t,
                reference_time: None,
                flags: TimesyncFlags::SAMPLE,
                leap_flags: None,
                stratum: None,
            };
            prop_assert_eq!(unix_nanos_to_parent_time(s.host_time_unix_nanos()), t);
        }
    }
}
