//! An hvsock pipe packet from the host (the payload after the VMBus descriptor, ring padding
//! included) and the host's `ROOT/control` reply: refused or parsed, never a panic; what parses
//! lies inside the packet, within the MTU, and round-trips through the writer.
#![no_main]

use hvisd_protocol::hvsock::{
    ConnectReply, ConnectRequest, HVS_MTU_SIZE, PipeFrame, PipePacket, VMPIPE_HEADER_SIZE,
    build_pipe_packet, parse_pipe_header, parse_pipe_packet,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let whole = parse_pipe_packet(payload);
    // The stream reads only the first 8 bytes and trusts the descriptor's length: it must
    // decide exactly as the whole-packet parser does.
    let head = &payload[..payload.len().min(VMPIPE_HEADER_SIZE)];
    let header = parse_pipe_header(head, payload.len());
    match (whole, header) {
        (Ok(PipePacket::Data(data)), Ok(PipeFrame::Data { len })) => {
            assert_eq!(data.len(), len);
            assert!(len >= 1 && len <= HVS_MTU_SIZE);
            assert_eq!(data, &payload[VMPIPE_HEADER_SIZE..VMPIPE_HEADER_SIZE + len]);
            let rebuilt = build_pipe_packet(data).expect("data within the MTU builds");
            assert_eq!(parse_pipe_packet(&rebuilt), Ok(PipePacket::Data(data)));
        }
        (Ok(PipePacket::Shutdown), Ok(PipeFrame::Shutdown)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("whole-packet {a:?} and header-only {b:?} parsers disagree"),
    }
    if let Ok(reply) = ConnectReply::parse(payload) {
        assert_eq!(payload.len(), 36);
        assert_eq!(&reply.to_bytes()[..], payload);
    }
    if let Ok(request) = ConnectRequest::parse(payload) {
        assert_eq!(&request.to_bytes()[..], payload);
    }
});
