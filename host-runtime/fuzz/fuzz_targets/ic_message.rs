//! Host-controlled IC packets: the pipe/icmsg header parser and the guest framework driving the
//! heartbeat, shutdown (log only) and timesync services must never panic, and every reply must
//! keep the request's length and carry TRANSACTION|RESPONSE.
#![no_main]

use hvisd_ic::IcGuest;
use hvisd_ic::heartbeat::HeartbeatService;
use hvisd_ic::host::{IcHost, offers};
use hvisd_ic::service::IcService;
use hvisd_ic::shutdown::{ShutdownAction, ShutdownService};
use hvisd_ic::timesync::TimesyncService;
use hvisd_protocol::ic::{ICMSG_HDR, IcFlags, MessageType, parse_packet};
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::task::{Context, Poll, Waker};

/// The small services never wait, so one poll finishes them; loop anyway in case one ever does.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn drive<S: IcService>(service: S, message_type: MessageType, negotiate: bool, packet: &[u8]) {
    let mut guest = IcGuest::new(service);
    if negotiate {
        let offer = offers::for_message_type(message_type).expect("a service message type");
        let mut host = IcHost::new(message_type, offers::FRAMEWORK, offer);
        let request = host
            .negotiate_request()
            .expect("offers fit a negotiate request");
        let _ = block_on(guest.on_packet(&request));
    }
    if let Ok(Some(reply)) = block_on(guest.on_packet(packet)) {
        assert_eq!(reply.len(), packet.len());
        let header = parse_packet(&reply)
            .expect("a reply is a valid packet")
            .header;
        assert_eq!(header.flags(), IcFlags::TRANSACTION | IcFlags::RESPONSE);
        assert_eq!(&reply[..8], &packet[..8]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, packet)) = data.split_first() else {
        return;
    };
    if let Ok(p) = parse_packet(packet) {
        assert_eq!(p.body.len(), packet.len() - ICMSG_HDR);
    }
    let negotiate = mode & 1 != 0;
    match (mode >> 1) % 3 {
        0 => drive(
            HeartbeatService::new(),
            MessageType::HEARTBEAT,
            negotiate,
            packet,
        ),
        1 => drive(
            ShutdownService::new(ShutdownAction::LogOnly),
            MessageType::SHUTDOWN,
            negotiate,
            packet,
        ),
        _ => drive(
            TimesyncService::new(),
            MessageType::TIMESYNC,
            negotiate,
            packet,
        ),
    }
});
