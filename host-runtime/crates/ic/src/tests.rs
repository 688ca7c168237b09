//! The host side ([`crate::host`]) against the guest side ([`crate::IcGuest`]) in one process, for
//! every small service, every version the host may offer, and hostile packets.

use crate::heartbeat::HeartbeatService;
use crate::host::{self, HostError, IcHost, offers};
use crate::shutdown::{ActionTaken, ShutdownAction, ShutdownService};
use crate::timesync::TimesyncService;
use crate::versions::{HEARTBEAT_VERSIONS, SHUTDOWN_VERSIONS, TIMESYNC_VERSIONS};
use crate::{IcError, IcGuest, IcService, NegotiateOutcome, Negotiated};
use hvisd_protocol::ic::shutdown::{ShutdownFlags, ShutdownRequest};
use hvisd_protocol::ic::timesync::{TimeSample, TimesyncFlags, WLTIMEDELTA};
use hvisd_protocol::ic::{
    ICMSG_HDR, IcFlags, IcVersion, MAX_IC_PACKET_SIZE, MessageType, parse_packet, status,
};
use proptest::prelude::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn v(major: u16, minor: u16) -> IcVersion {
    IcVersion::new(major, minor)
}

/// Negotiates `guest` with a host offering `fw`/`msg`; returns the host end and the outcome.
async fn negotiate<S: IcService>(
    guest: &mut IcGuest<S>,
    message_type: MessageType,
    fw: &[IcVersion],
    msg: &[IcVersion],
) -> (IcHost, NegotiateOutcome) {
    let mut host = IcHost::new(message_type, fw, msg);
    let request = host.negotiate_request().unwrap();
    let reply = guest
        .on_packet(&request)
        .await
        .expect("a well-formed negotiate is answered")
        .expect("negotiate always gets a reply");
    assert_eq!(
        reply.len(),
        request.len(),
        "replies keep the request's length"
    );
    let outcome = host.on_negotiate_response(&reply).unwrap();
    (host, outcome)
}

fn assert_last_error<S: IcService>(guest: &IcGuest<S>, expected: &str) {
    let last = guest.status().last_error.as_deref().unwrap_or_default();
    assert!(
        last.contains(expected),
        "last error {last:?} lacks {expected:?}"
    );
}

fn agreed(framework: IcVersion, message: IcVersion) -> NegotiateOutcome {
    NegotiateOutcome::Negotiated(Negotiated { framework, message })
}

/// Negotiates `guest` against the simulator's default offers for `message_type`.
async fn negotiate_defaults<S: IcService>(
    guest: &mut IcGuest<S>,
    message_type: MessageType,
) -> (IcHost, NegotiateOutcome) {
    let offer = offers::for_message_type(message_type).expect("a service message type");
    negotiate(guest, message_type, offers::FRAMEWORK, offer).await
}

fn heartbeat_body(seq: u64) -> Vec<u8> {
    let mut body = vec![0u8; 40];
    body[..8].copy_from_slice(&seq.to_le_bytes());
    body
}

async fn beat(guest: &mut IcGuest<HeartbeatService>, host: &mut IcHost, seq: u64) -> (u32, u64) {
    let request = host.request(&heartbeat_body(seq)).unwrap();
    let reply = guest.on_packet(&request).await.unwrap().unwrap();
    assert_eq!(reply.len(), request.len());
    let checked = host.on_reply(&reply).unwrap();
    assert_eq!(
        checked.header.flags(),
        IcFlags::TRANSACTION | IcFlags::RESPONSE
    );
    let seq = u64::from_le_bytes(checked.body[..8].try_into().unwrap());
    (checked.status, seq)
}

/// Every framework x message version pair the host could offer alone, plus the full offer.
fn single_offers(fw: &[IcVersion], msg: &[IcVersion]) -> Vec<(Vec<IcVersion>, Vec<IcVersion>)> {
    let mut out = vec![(fw.to_vec(), msg.to_vec())];
    for &f in fw {
        for &m in msg {
            out.push((vec![f], vec![m]));
        }
    }
    out
}

#[tokio::test]
async fn heartbeat_negotiates_every_offered_pair_and_answers_seq_plus_one() {
    for (fw, msg) in single_offers(&[v(1, 0), v(2, 0), v(3, 0)], &[v(1, 0), v(3, 0), v(4, 0)]) {
        let mut guest = IcGuest::new(HeartbeatService::new());
        let (mut host, outcome) = negotiate(&mut guest, MessageType::HEARTBEAT, &fw, &msg).await;
        let expected_fw = [v(3, 0), v(1, 0)].into_iter().find(|x| fw.contains(x));
        let expected_msg = HEARTBEAT_VERSIONS.iter().copied().find(|x| msg.contains(x));
        match (expected_fw, expected_msg) {
            (Some(framework), Some(message)) => {
                let n = Negotiated { framework, message };
                assert_eq!(outcome, NegotiateOutcome::Negotiated(n), "{fw:?} {msg:?}");
                assert_eq!(guest.negotiated(), Some(n));
                assert_eq!(beat(&mut guest, &mut host, 41).await, (status::HV_S_OK, 42));
                assert_eq!(guest.service().beats(), 1);
                assert_eq!(guest.service().last_seq_num(), Some(41));
            }
            _ => {
                assert_eq!(outcome, NegotiateOutcome::NoCommonVersion, "{fw:?} {msg:?}");
                assert_eq!(guest.negotiated(), None);
                // Without agreed versions the service is never reached.
                assert_eq!(
                    beat(&mut guest, &mut host, 41).await,
                    (status::HV_E_FAIL, 41)
                );
                assert_eq!(guest.service().beats(), 0);
            }
        }
    }
}

#[tokio::test]
async fn full_offers_pick_the_linux_preferred_versions() {
    let mut hb = IcGuest::new(HeartbeatService::new());
    let (_, outcome) = negotiate_defaults(&mut hb, MessageType::HEARTBEAT).await;
    assert_eq!(outcome, agreed(v(3, 0), v(3, 0)));
    let mut sd = IcGuest::new(ShutdownService::new(ShutdownAction::LogOnly));
    let (_, outcome) = negotiate_defaults(&mut sd, MessageType::SHUTDOWN).await;
    assert_eq!(outcome, agreed(v(3, 0), v(3, 2)));
    let mut ts = IcGuest::new(TimesyncService::new());
    let (_, outcome) = negotiate_defaults(&mut ts, MessageType::TIMESYNC).await;
    assert_eq!(outcome, agreed(v(3, 0), v(4, 0)));
}

#[tokio::test]
async fn heartbeat_sequence_number_wraps_at_u64_max() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let (mut host, _) = negotiate_defaults(&mut guest, MessageType::HEARTBEAT).await;
    assert_eq!(
        beat(&mut guest, &mut host, u64::MAX).await,
        (status::HV_S_OK, 0)
    );
}

#[tokio::test]
async fn short_heartbeat_body_is_dropped_with_a_clear_error() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let (mut host, _) = negotiate_defaults(&mut guest, MessageType::HEARTBEAT).await;
    let request = host.request(&[1, 2, 3, 4]).unwrap();
    assert!(guest.on_packet(&request).await.unwrap().is_none());
    let status = guest.status();
    assert_eq!(status.failures, 1);
    assert_eq!(
        status.last_error.as_deref(),
        Some("malformed heartbeat message from host: heartbeat seq_num: need 8 bytes, got 4")
    );
    assert_eq!(guest.service().beats(), 0);
}

#[tokio::test]
async fn message_of_another_type_gets_hv_e_fail_like_linux() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let (_, outcome) = negotiate_defaults(&mut guest, MessageType::HEARTBEAT).await;
    let NegotiateOutcome::Negotiated(n) = outcome else {
        panic!("negotiation failed")
    };
    let request = host::message(MessageType::SHUTDOWN, n, &heartbeat_body(5), 9).unwrap();
    let reply = guest.on_packet(&request).await.unwrap().unwrap();
    let checked = host::parse_reply(&reply, MessageType::SHUTDOWN, 9).unwrap();
    assert_eq!(checked.status, status::HV_E_FAIL);
    assert_eq!(&checked.body[..8], &5u64.to_le_bytes(), "body left alone");
    assert_last_error(&guest, "unexpected IC message type 3");
}

#[tokio::test]
async fn message_before_negotiation_is_refused_without_reaching_the_service() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let mut host = IcHost::new(MessageType::HEARTBEAT, offers::FRAMEWORK, offers::HEARTBEAT);
    assert_eq!(beat(&mut guest, &mut host, 7).await, (status::HV_E_FAIL, 7));
    assert_eq!(guest.service().beats(), 0);
    assert_last_error(&guest, "before version negotiation");
}

#[tokio::test]
async fn renegotiation_replaces_the_agreed_versions() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    negotiate(&mut guest, MessageType::HEARTBEAT, &[v(3, 0)], &[v(3, 0)]).await;
    negotiate(&mut guest, MessageType::HEARTBEAT, &[v(1, 0)], &[v(1, 0)]).await;
    assert_eq!(
        guest.negotiated(),
        Some(Negotiated {
            framework: v(1, 0),
            message: v(1, 0)
        })
    );
    assert_eq!(guest.status().negotiations, 2);
    // A failed renegotiation leaves the channel un-negotiated.
    negotiate(&mut guest, MessageType::HEARTBEAT, &[v(2, 0)], &[v(1, 0)]).await;
    assert_eq!(guest.negotiated(), None);
}

#[tokio::test]
async fn ring_padding_after_the_body_is_kept_in_the_reply() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let (mut host, _) = negotiate_defaults(&mut guest, MessageType::HEARTBEAT).await;
    let mut request = host.request(&heartbeat_body(1)).unwrap();
    request.extend_from_slice(&[0xaa; 4]);
    let reply = guest.on_packet(&request).await.unwrap().unwrap();
    assert_eq!(reply.len(), request.len());
    assert_eq!(&reply[reply.len() - 4..], &[0xaa; 4]);
    assert_eq!(host.on_reply(&reply).unwrap().status, status::HV_S_OK);
}

#[tokio::test]
async fn truncated_and_oversized_packets_are_errors_without_reply() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let err = guest.on_packet(&[0; ICMSG_HDR - 1]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "heartbeat IC: packet from host dropped: vmbuspipe_hdr + icmsg_hdr: need 28 bytes, got 27"
    );
    let big = vec![0u8; MAX_IC_PACKET_SIZE + 1];
    assert!(matches!(
        guest.on_packet(&big).await,
        Err(IcError::Malformed { .. })
    ));
    assert_eq!(guest.status().failures, 2);
}

#[tokio::test]
async fn negotiate_with_counts_past_the_packet_is_an_error() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let mut request = host::negotiate_request(&[v(3, 0)], &[v(3, 0)], 0).unwrap();
    request[ICMSG_HDR + 2] = 90; // icmsg_vercnt far past the 2 versions carried
    let err = guest.on_packet(&request).await.unwrap_err();
    assert!(matches!(err, IcError::MalformedNegotiate { .. }), "{err}");
    assert_eq!(guest.negotiated(), None);
    request[ICMSG_HDR + 2] = 200; // above Linux's 100-version limit
    assert!(guest.on_packet(&request).await.is_err());
}

#[tokio::test]
async fn negotiate_too_short_for_its_counts_header_is_an_error() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let request = host::negotiate_request(&[v(3, 0)], &[v(3, 0)], 0).unwrap();
    assert!(guest.on_packet(&request[..ICMSG_HDR + 3]).await.is_err());
}

#[tokio::test]
async fn shutdown_is_logged_only_by_default_for_every_version() {
    for &version in SHUTDOWN_VERSIONS {
        let mut guest = IcGuest::new(ShutdownService::new(ShutdownAction::default()));
        let (mut host, _) =
            negotiate(&mut guest, MessageType::SHUTDOWN, &[v(3, 0)], &[version]).await;
        let request = ShutdownRequest {
            reason_code: 0x8000_0000,
            timeout_seconds: 60,
            flags: ShutdownFlags::FORCE.0,
            kind: ShutdownFlags::FORCE.kind(),
            force: true,
            message: "host maintenance".into(),
        };
        let packet = host.request(&request.build()).unwrap();
        let reply = guest.on_packet(&packet).await.unwrap().unwrap();
        assert_eq!(host.on_reply(&reply).unwrap().status, status::HV_S_OK);
        let outcome = guest.service().last_outcome().unwrap();
        assert_eq!(outcome.action, ActionTaken::Logged);
        assert_eq!(outcome.request, request);
    }
}

fn shutdown_request(flags: u32) -> Vec<u8> {
    ShutdownRequest {
        reason_code: 0x8000_0000,
        timeout_seconds: 30,
        flags,
        kind: ShutdownFlags(flags).kind(),
        force: flags & 1 != 0,
        message: "simulated".into(),
    }
    .build()
}

async fn shutdown_guest(action: ShutdownAction) -> (IcGuest<ShutdownService>, IcHost) {
    let mut guest = IcGuest::new(ShutdownService::new(action));
    let (host, _) = negotiate_defaults(&mut guest, MessageType::SHUTDOWN).await;
    (guest, host)
}

#[tokio::test]
async fn a_finished_shutdown_command_is_reaped_without_another_request() {
    let (mut guest, mut host) = shutdown_guest(ShutdownAction::Command(vec!["true".into()])).await;
    let packet = host.request(&shutdown_request(3)).unwrap();
    guest.on_packet(&packet).await.unwrap().unwrap();
    let ActionTaken::CommandStarted { pid } = guest.service().last_outcome().unwrap().action else {
        panic!("the command did not start");
    };
    // No further request and the service dropped: the command must not stay a zombie.
    drop(guest);
    let stat = format!("/proc/{pid}/stat");
    let start = std::time::Instant::now();
    loop {
        match std::fs::read_to_string(&stat) {
            Err(_) => break, // reaped
            Ok(text) => {
                let state = text.rsplit(')').next().unwrap_or("").trim_start();
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(5),
                    "pid {pid} not reaped: {state}"
                );
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[tokio::test]
async fn shutdown_command_runs_with_the_request_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("request");
    let script = format!(
        "printf '%s %s %s %s' \"$HVISD_SHUTDOWN_KIND\" \"$HVISD_SHUTDOWN_FORCE\" \
         \"$HVISD_SHUTDOWN_TIMEOUT\" \"$HVISD_SHUTDOWN_MESSAGE\" > '{}'",
        out.display()
    );
    let action = ShutdownAction::Command(vec!["sh".into(), "-c".into(), script]);
    let (mut guest, mut host) = shutdown_guest(action).await;
    let packet = host.request(&shutdown_request(3)).unwrap();
    let reply = guest.on_packet(&packet).await.unwrap().unwrap();
    assert_eq!(host.on_reply(&reply).unwrap().status, status::HV_S_OK);
    assert!(matches!(
        guest.service().last_outcome().unwrap().action,
        ActionTaken::CommandStarted { .. }
    ));
    let exit = guest.service_mut().wait_for_command().unwrap().unwrap();
    assert!(exit.success());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "restart 1 30 simulated"
    );
}

#[tokio::test]
async fn shutdown_command_that_cannot_start_answers_hv_e_fail() {
    let action = ShutdownAction::Command(vec!["/nonexistent/hvisd-test-poweroff".into()]);
    let (mut guest, mut host) = shutdown_guest(action).await;
    let packet = host.request(&shutdown_request(0)).unwrap();
    let reply = guest.on_packet(&packet).await.unwrap().unwrap();
    assert_eq!(host.on_reply(&reply).unwrap().status, status::HV_E_FAIL);
    assert!(matches!(
        &guest.service().last_outcome().unwrap().action,
        ActionTaken::CommandFailed(msg) if msg.contains("hvisd-test-poweroff")
    ));
}

#[tokio::test]
async fn shutdown_refuses_unknown_flags_and_hibernate_unless_enabled() {
    let (mut guest, mut host) = shutdown_guest(ShutdownAction::LogOnly).await;
    for flags in [6, 4, 5, 0x10] {
        let packet = host.request(&shutdown_request(flags)).unwrap();
        let reply = guest.on_packet(&packet).await.unwrap().unwrap();
        assert_eq!(host.on_reply(&reply).unwrap().status, status::HV_E_FAIL);
        assert!(matches!(
            guest.service().last_outcome().unwrap().action,
            ActionTaken::Refused(_)
        ));
    }
    let service = guest.into_service().allow_hibernate(true);
    let mut guest = IcGuest::new(service);
    let (mut host, _) = negotiate_defaults(&mut guest, MessageType::SHUTDOWN).await;
    let packet = host.request(&shutdown_request(4)).unwrap();
    let reply = guest.on_packet(&packet).await.unwrap().unwrap();
    assert_eq!(host.on_reply(&reply).unwrap().status, status::HV_S_OK);
}

#[tokio::test]
async fn shutdown_body_shorter_than_linux_requires_is_dropped() {
    let (mut guest, mut host) = shutdown_guest(ShutdownAction::LogOnly).await;
    let packet = host.request(&shutdown_request(0)[..100]).unwrap();
    assert!(guest.on_packet(&packet).await.unwrap().is_none());
    assert!(guest.service().last_outcome().is_none());
}

fn fixed_clock(unix_secs: u64) -> Box<dyn Fn() -> SystemTime + Send> {
    Box::new(move || UNIX_EPOCH + Duration::from_secs(unix_secs))
}

#[tokio::test]
async fn timesync_records_the_offset_for_every_version_and_echoes_the_sample() {
    let guest_now = 1_700_000_000u64;
    for &version in TIMESYNC_VERSIONS {
        let mut guest = IcGuest::new(TimesyncService::with_clock(fixed_clock(guest_now)));
        let (mut host, _) =
            negotiate(&mut guest, MessageType::TIMESYNC, &[v(3, 0)], &[version]).await;
        // Host is 2.5 s ahead of the guest.
        let host_time = WLTIMEDELTA + (guest_now * 10_000_000) + 25_000_000;
        let sample = TimeSample {
            parent_time: host_time,
            reference_time: TimeSample::uses_ref_layout(version).then_some(123),
            flags: TimesyncFlags::SAMPLE,
            leap_flags: TimeSample::uses_ref_layout(version).then_some(0),
            stratum: TimeSample::uses_ref_layout(version).then_some(2),
        };
        let body = sample.build(version);
        let packet = host.request(&body).unwrap();
        let reply = guest.on_packet(&packet).await.unwrap().unwrap();
        let checked = host.on_reply(&reply).unwrap();
        assert_eq!(checked.status, status::HV_S_OK);
        assert_eq!(checked.body, &body[..], "timesync replies echo the sample");
        let record = guest.service().last().unwrap();
        assert_eq!(record.sample, sample, "version {version}");
        assert_eq!(record.offset_nanos, 2_500_000_000);
        assert_eq!(
            record.guest_time_unix_nanos,
            guest_now as i128 * 1_000_000_000
        );
    }
}

#[tokio::test]
async fn timesync_v4_body_too_short_is_dropped() {
    let mut guest = IcGuest::new(TimesyncService::new());
    let (mut host, _) = negotiate_defaults(&mut guest, MessageType::TIMESYNC).await;
    let packet = host.request(&[0; 21]).unwrap();
    assert!(guest.on_packet(&packet).await.unwrap().is_none());
    assert_eq!(guest.service().samples(), 0);
    assert_last_error(&guest, "ictimesync_ref_data: need 22 bytes, got 21");
}

#[tokio::test]
async fn host_rejects_replies_that_do_not_answer_its_request() {
    let mut guest = IcGuest::new(HeartbeatService::new());
    let (mut host, _) = negotiate_defaults(&mut guest, MessageType::HEARTBEAT).await;
    let request = host.request(&heartbeat_body(1)).unwrap();
    // The request itself is not a response.
    assert!(matches!(
        host.on_reply(&request),
        Err(HostError::NotAResponse { flags: 3 })
    ));
    let reply = guest.on_packet(&request).await.unwrap().unwrap();
    let id = parse_packet(&reply).unwrap().header.ictransaction_id;
    assert!(matches!(
        host::parse_reply(&reply, MessageType::HEARTBEAT, id.wrapping_add(1)),
        Err(HostError::TransactionMismatch { .. })
    ));
    assert!(matches!(
        host::parse_reply(&reply, MessageType::KVP_EXCHANGE, id),
        Err(HostError::WrongType { .. })
    ));
    host.on_reply(&reply).unwrap();
    assert_eq!(host.on_reply(&reply), Err(HostError::Unsolicited));
}

#[test]
fn host_rejects_a_negotiate_reply_choosing_unoffered_versions() {
    let mut guest_view = host::negotiate_request(&[v(3, 0)], &[v(9, 0)], 4).unwrap();
    // Forge the guest's answer: counts 1/1, framework 3.0, message 4.0 (not offered).
    let body = &mut guest_view[ICMSG_HDR..];
    body[..4].copy_from_slice(&[1, 0, 1, 0]);
    body[12..16].copy_from_slice(&[4, 0, 0, 0]);
    guest_view[ICMSG_HDR - 3] = (IcFlags::TRANSACTION | IcFlags::RESPONSE).0;
    assert_eq!(
        host::parse_negotiate_response(&guest_view, &[v(3, 0)], &[v(9, 0)], 4),
        Err(HostError::VersionNotOffered {
            kind: "message",
            version: v(4, 0)
        })
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("current-thread runtime")
}

proptest! {
    #[test]
    fn random_packets_never_panic_and_replies_keep_the_length(
        bytes in proptest::collection::vec(any::<u8>(), 0..160),
        negotiated_first in any::<bool>(),
    ) {
        runtime().block_on(async {
            let mut guest = IcGuest::new(HeartbeatService::new());
            if negotiated_first {
                negotiate_defaults(&mut guest, MessageType::HEARTBEAT).await;
            }
            if let Ok(Some(reply)) = guest.on_packet(&bytes).await {
                assert_eq!(reply.len(), bytes.len());
                let hdr = parse_packet(&reply).unwrap().header;
                assert_eq!(hdr.flags(), IcFlags::TRANSACTION | IcFlags::RESPONSE);
                assert_eq!(&reply[..8], &bytes[..8], "vmbuspipe_hdr is echoed");
            }
        });
    }

    #[test]
    fn random_bodies_of_valid_headers_never_panic_any_service(
        body in proptest::collection::vec(any::<u8>(), 0..2200),
        message_type in 0u16..9,
    ) {
        runtime().block_on(async {
            let mut hb = IcGuest::new(HeartbeatService::new());
            let (mut host, _) =
                negotiate_defaults(&mut hb, MessageType::HEARTBEAT).await;
            hostile_body(&mut hb, &mut host, &body, message_type).await;

            let mut sd = IcGuest::new(ShutdownService::new(ShutdownAction::LogOnly));
            let (mut host, _) =
                negotiate_defaults(&mut sd, MessageType::SHUTDOWN).await;
            hostile_body(&mut sd, &mut host, &body, message_type).await;

            let mut ts = IcGuest::new(TimesyncService::new());
            let (mut host, _) =
                negotiate_defaults(&mut ts, MessageType::TIMESYNC).await;
            hostile_body(&mut ts, &mut host, &body, message_type).await;
        });
    }
}

/// Sends `body` as a message of `message_type` and checks any reply keeps the packet's length.
async fn hostile_body<S: IcService>(
    guest: &mut IcGuest<S>,
    host: &mut IcHost,
    body: &[u8],
    message_type: u16,
) {
    let packet = retype(host.request(body).unwrap(), message_type);
    if let Ok(Some(reply)) = guest.on_packet(&packet).await {
        assert_eq!(reply.len(), packet.len());
    }
}

/// Rewrites the message type of a packet (to send a service the wrong type or a negotiate).
fn retype(mut packet: Vec<u8>, message_type: u16) -> Vec<u8> {
    packet[12..14].copy_from_slice(&message_type.to_le_bytes());
    packet
}
