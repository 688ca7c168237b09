//! Guest-side version negotiation with the semantics of Linux's `vmbus_prep_negotiate_resp`.
//!
//! The host offers lists of framework and message versions; the guest walks its own tables in
//! preference order and takes the first version the host also offers. The answer is written into
//! the request's body in place: counts `1, 1` and the two chosen versions, or counts `0, 0` when
//! there is no common version. In the failure case the version slots are filled exactly as Linux
//! leaves them (the framework slot holds the matched framework version or the host's framework
//! count as a major number, the message slot the host's message count), so the reply is
//! byte-for-byte what a Linux guest would send.

use hvisd_protocol::ic::{IcParseError, IcVersion, NegotiateMessage, write_negotiate_response};

/// Versions both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Negotiated {
    /// Framework version.
    pub framework: IcVersion,
    /// Message (service) version.
    pub message: IcVersion,
}

/// Result of one negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NegotiateOutcome {
    /// A common framework and message version were found.
    Negotiated(Negotiated),
    /// The host offered no version the guest accepts (answered with counts 0).
    NoCommonVersion,
}

/// The first of `ours` (most preferred first) that appears in `offered`.
pub fn pick(ours: &[IcVersion], offered: &[IcVersion]) -> Option<IcVersion> {
    ours.iter().copied().find(|v| offered.contains(v))
}

/// Chooses versions for an already parsed offer.
pub fn select(
    offer: &NegotiateMessage,
    framework_versions: &[IcVersion],
    message_versions: &[IcVersion],
) -> NegotiateOutcome {
    match (
        pick(framework_versions, &offer.framework_versions),
        pick(message_versions, &offer.message_versions),
    ) {
        (Some(framework), Some(message)) => {
            NegotiateOutcome::Negotiated(Negotiated { framework, message })
        }
        _ => NegotiateOutcome::NoCommonVersion,
    }
}

/// Answers the negotiate request whose body (the bytes after `icmsg_hdr`) is `body`, in place.
///
/// A malformed offer (counts above 100 or a version table past the end of the packet) is an
/// error and `body` is left untouched; Linux would answer it with counts 0, hvisd drops it.
pub fn respond_in_place(
    body: &mut [u8],
    framework_versions: &[IcVersion],
    message_versions: &[IcVersion],
) -> Result<NegotiateOutcome, IcParseError> {
    let offer = NegotiateMessage::parse(body)?;
    let outcome = select(&offer, framework_versions, message_versions);
    let (counts, slots) = match outcome {
        NegotiateOutcome::Negotiated(n) => ((1, 1), [n.framework, n.message]),
        NegotiateOutcome::NoCommonVersion => {
            // The counts fit in u16 and were checked to be at most 100 by the parser.
            let framework_count = offer.framework_versions.len() as u16;
            let message_count = offer.message_versions.len() as u16;
            let framework_slot = pick(framework_versions, &offer.framework_versions)
                .unwrap_or(IcVersion::new(framework_count, 0));
            ((0, 0), [framework_slot, IcVersion::new(message_count, 0)])
        }
    };
    write_negotiate_response(body, counts.0, counts.1, slots)?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::{SHUTDOWN_VERSIONS, UTIL_FRAMEWORK_VERSIONS};
    use proptest::prelude::*;

    fn v(major: u16, minor: u16) -> IcVersion {
        IcVersion::new(major, minor)
    }

    fn offer(fw: &[IcVersion], msg: &[IcVersion]) -> Vec<u8> {
        NegotiateMessage {
            framework_versions: fw.to_vec(),
            message_versions: msg.to_vec(),
        }
        .build()
        .unwrap()
    }

    #[test]
    fn picks_the_guests_most_preferred_version_the_host_offers() {
        let mut body = offer(&[v(1, 0), v(3, 0)], &[v(1, 0), v(3, 0), v(3, 1)]);
        let outcome = respond_in_place(&mut body, UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS);
        assert_eq!(
            outcome,
            Ok(NegotiateOutcome::Negotiated(Negotiated {
                framework: v(3, 0),
                message: v(3, 1)
            }))
        );
        assert_eq!(&body[..4], &[1, 0, 1, 0]);
        assert_eq!(&body[8..16], &[3, 0, 0, 0, 3, 0, 1, 0]);
    }

    #[test]
    fn no_common_framework_is_answered_like_linux() {
        let mut body = offer(&[v(2, 0)], &[v(3, 0), v(1, 0)]);
        let outcome = respond_in_place(&mut body, UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS);
        assert_eq!(outcome, Ok(NegotiateOutcome::NoCommonVersion));
        // counts 0; slot 0 = {icframe_vercnt, 0}; slot 1 = {icmsg_vercnt, 0}.
        assert_eq!(&body[..4], &[0, 0, 0, 0]);
        assert_eq!(&body[8..16], &[1, 0, 0, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn common_framework_but_no_common_message_version_keeps_the_framework() {
        let mut body = offer(&[v(3, 0)], &[v(9, 9)]);
        let outcome = respond_in_place(&mut body, UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS);
        assert_eq!(outcome, Ok(NegotiateOutcome::NoCommonVersion));
        assert_eq!(&body[..4], &[0, 0, 0, 0]);
        assert_eq!(&body[8..16], &[3, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn counts_past_the_buffer_are_an_error_and_leave_the_body_alone() {
        let mut body = offer(&[v(3, 0)], &[v(3, 0)]);
        body[0] = 50;
        let before = body.clone();
        let err = respond_in_place(&mut body, UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS);
        assert!(matches!(
            err,
            Err(IcParseError::VersionsPastEnd { framework: 50, .. })
        ));
        assert_eq!(body, before);
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic_and_answers_are_offered_versions(
            bytes in proptest::collection::vec(any::<u8>(), 0..96)
        ) {
            let mut body = bytes.clone();
            match respond_in_place(&mut body, UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS) {
                Ok(NegotiateOutcome::Negotiated(n)) => {
                    let offer = NegotiateMessage::parse(&bytes).unwrap();
                    prop_assert!(offer.framework_versions.contains(&n.framework));
                    prop_assert!(offer.message_versions.contains(&n.message));
                    prop_assert_eq!(body.len(), bytes.len());
                }
                Ok(NegotiateOutcome::NoCommonVersion) => prop_assert_eq!(&body[..4], &[0u8; 4]),
                Err(_) => prop_assert_eq!(body, bytes),
            }
        }

        #[test]
        fn the_chosen_version_is_the_highest_common_one(
            fw in proptest::collection::vec((0u16..5, 0u16..3), 1..6),
            msg in proptest::collection::vec((0u16..5, 0u16..3), 1..6),
        ) {
            let fw: Vec<_> = fw.into_iter().map(|(a, b)| v(a, b)).collect();
            let msg: Vec<_> = msg.into_iter().map(|(a, b)| v(a, b)).collect();
            let expected_fw = UTIL_FRAMEWORK_VERSIONS.iter().filter(|x| fw.contains(x)).max();
            let expected_msg = SHUTDOWN_VERSIONS.iter().filter(|x| msg.contains(x)).max();
            let mut body = offer(&fw, &msg);
            let outcome = respond_in_place(&mut body, UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS)
                .unwrap();
            match (expected_fw, expected_msg) {
                (Some(&framework), Some(&message)) => prop_assert_eq!(
                    outcome,
                    NegotiateOutcome::Negotiated(Negotiated { framework, message })
                ),
                _ => prop_assert_eq!(outcome, NegotiateOutcome::NoCommonVersion),
            }
        }
    }
}
