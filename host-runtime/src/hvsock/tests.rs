//! The pipe stream run in-process: a guest and a host end over one anonymous mapping and a
//! socket pair, as the shm transport lays them out.

use super::pipe::{HvsockError, PipeStream, pipe_packet_len, send_chunk};
use crate::channel::{Channel, RingPair, Role};
use crate::doorbell::{Doorbell, DoorbellKind, seqpacket_pair};
use hvisd_protocol::hvsock::{HVS_MTU_SIZE, build_pipe_packet};
use hvisd_ring::{PACKET_TYPE_COMPLETION, PacketHeader, RingMem, SharedMapping, control};
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The two channels of one offer: (guest, host), with the mapping for peeking at control pages.
fn channel_pair(ring_size: usize) -> (Channel, Channel, Arc<SharedMapping>) {
    let map = SharedMapping::anonymous(2 * ring_size).unwrap();
    let guest_rings = RingPair::new(map.clone(), ring_size, Role::Guest).unwrap();
    guest_rings.set_feature_bits();
    let host_rings = RingPair::new(map.clone(), ring_size, Role::Host).unwrap();
    let (g, h) = seqpacket_pair().unwrap();
    let guest = Channel::new(
        guest_rings,
        Doorbell::new(g, DoorbellKind::Seqpacket).unwrap(),
        "guest pipe",
    );
    let host = Channel::new(
        host_rings,
        Doorbell::new(h, DoorbellKind::Seqpacket).unwrap(),
        "host pipe",
    );
    (guest, host, map)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn hvsock_error(e: &std::io::Error) -> &HvsockError {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Arc<HvsockError>>())
        .map(|arc| &**arc)
        .unwrap_or_else(|| panic!("not an HvsockError: {e:?}"))
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn bytes_and_fin_cross_in_both_directions() {
    let (guest, host, _map) = channel_pair(4 * 4096);
    let (mut guest, _gm) = PipeStream::new(guest);
    let (mut host, _hm) = PipeStream::new(host);
    host.write_all(b"hello guest").await.unwrap();
    host.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, guest.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello guest");
    // Half-closed: the guest still writes after the host's FIN.
    guest.write_all(b"hello host").await.unwrap();
    guest.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, host.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello host");
    // Reads after the FIN keep returning 0; writes after our own FIN fail.
    assert_eq!(guest.read(&mut [0u8; 4]).await.unwrap(), 0);
    let err = guest.write(b"late").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn a_short_read_gets_the_rest_of_the_packet_next_time() {
    let (guest, host, _map) = channel_pair(16 * 4096);
    let (guest, _gm) = PipeStream::new(guest);
    let (mut host, _hm) = PipeStream::new(host);
    let data = pattern(10_000, 3);
    host.write_all(&data).await.unwrap();
    host.shutdown().await.unwrap();
    let (mut rx, _tx) = guest.into_split();
    let mut got = Vec::new();
    let mut small = [0u8; 7];
    loop {
        let n = tokio::time::timeout(LIMIT, rx.read(&mut small))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(rx.buffered() <= HVS_MTU_SIZE);
        got.extend_from_slice(&small[..n]);
    }
    assert_eq!(got, data);
}

#[tokio::test]
async fn a_reader_that_stops_reading_stalls_the_writer_with_pending_send_sz() {
    let ring_size = 4 * 4096;
    let (guest, host, map) = channel_pair(ring_size);
    let (guest, _gm) = PipeStream::new(guest);
    let (host, _hm) = PipeStream::new(host);
    let (_grx, mut gtx) = guest.into_split();
    let (mut hrx, _htx) = host.into_split();
    let data = pattern(1 << 20, 9);
    // Write until the ring is full and the writer has to wait.
    let mut accepted = 0usize;
    while let Ok(n) =
        tokio::time::timeout(Duration::from_millis(100), gtx.write(&data[accepted..])).await
    {
        accepted += n.unwrap();
    }
    let data_len = ring_size - 4096;
    assert!(
        accepted < data_len,
        "{accepted} bytes accepted into a {data_len}-byte ring"
    );
    // The writer asked for room for its next packet (guest->host ring, first in the mapping).
    let (g2h, _) = hvisd_ring::ring_pair(map.clone(), ring_size).unwrap();
    let pending = g2h.control()[control::PENDING_SEND_SZ].load(Ordering::SeqCst) as usize;
    assert_eq!(pending, pipe_packet_len(send_chunk(data_len)));
    // The reader drains; the writer resumes and everything arrives intact.
    let writer = tokio::spawn(async move {
        gtx.write_all(&data[accepted..]).await.unwrap();
        gtx.shutdown().await.unwrap();
        data
    });
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, hrx.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let data = writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    assert_eq!(
        g2h.control()[control::PENDING_SEND_SZ].load(Ordering::SeqCst),
        0,
        "pending_send_sz cleared once written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_halves_run_full_duplex_on_different_tasks() {
    let (guest, host, _map) = channel_pair(4 * 4096);
    let (guest, _gm) = PipeStream::new(guest);
    let (host, _hm) = PipeStream::new(host);
    // The guest echoes; the host writes and reads at once. Small rings, 4 MiB: both rings fill
    // and drain many times, with each half waiting on the shared doorbell in its own task.
    let (mut grx, mut gtx) = guest.into_split();
    let echo = tokio::spawn(async move {
        let n = tokio::io::copy(&mut grx, &mut gtx).await.unwrap();
        gtx.shutdown().await.unwrap();
        n
    });
    let (mut hrx, mut htx) = host.into_split();
    let data = pattern(4 << 20, 1);
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        htx.write_all(&data).await.unwrap();
        htx.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), hrx.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echo.await.unwrap(), expected.len() as u64);
    assert!(got == expected);
}

/// A host end that writes raw packets.
async fn guest_reads_after(packets: &[(u16, Vec<u8>)]) -> (Vec<u8>, std::io::Error) {
    let (guest, mut host, _map) = channel_pair(8 * 4096);
    let (mut guest, _gm) = PipeStream::new(guest);
    for (packet_type, payload) in packets {
        let header = PacketHeader {
            packet_type: *packet_type,
            flags: 0,
            transaction_id: 0,
        };
        host.send(header, &[payload]).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(LIMIT, guest.read(&mut buf))
            .await
            .unwrap()
        {
            Ok(0) => panic!("EOF instead of an error"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => {
                // The error sticks.
                let again = guest.read(&mut buf).await.unwrap_err();
                assert_eq!(again.kind(), e.kind());
                return (got, e);
            }
        }
    }
}

#[tokio::test]
async fn hostile_packets_close_the_connection_with_a_clear_error() {
    let inband = hvisd_ring::PACKET_TYPE_DATA_INBAND;
    let good = build_pipe_packet(b"ok").unwrap();
    let mut over_mtu = vec![1, 0, 0, 0];
    over_mtu.extend_from_slice(&(HVS_MTU_SIZE as u32 + 1).to_le_bytes());
    over_mtu.resize(8 + HVS_MTU_SIZE + 8, 0);
    type Case<'a> = (Vec<(u16, Vec<u8>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                (inband, good.clone()),
                (PACKET_TYPE_COMPLETION, good.clone()),
            ],
            "type 11",
        ),
        (
            vec![
                (inband, good.clone()),
                (inband, vec![2, 0, 0, 0, 1, 0, 0, 0, 9]),
            ],
            "type 2",
        ),
        (
            vec![
                (inband, good.clone()),
                (inband, vec![1, 0, 0, 0, 200, 0, 0, 0, 9]),
            ],
            "claims 200 data bytes",
        ),
        (vec![(inband, good.clone()), (inband, over_mtu)], "MTU"),
        // An empty payload (a 3-byte one would be padded to 8 zero-filled bytes: a FIN).
        (
            vec![(inband, good.clone()), (inband, vec![])],
            "shorter than",
        ),
    ];
    for (packets, needle) in cases {
        let (got, err) = guest_reads_after(&packets).await;
        assert_eq!(got, b"ok", "bytes before the bad packet are delivered");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        let message = hvsock_error(&err).to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
}

#[tokio::test]
async fn a_host_that_vanishes_mid_stream_resets_the_connection_after_its_data() {
    let (guest, mut host, _map) = channel_pair(4 * 4096);
    let (mut guest, _gm) = PipeStream::new(guest);
    // Data, then the host is gone without a FIN.
    let packet = build_pipe_packet(b"partial").unwrap();
    host.send(PacketHeader::inband(0), &[&packet])
        .await
        .unwrap();
    drop(host);
    let mut got = Vec::new();
    let err = tokio::time::timeout(LIMIT, guest.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(got, b"partial");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(hvsock_error(&err).is_peer_closed());
    let err = guest.write(b"x").await.unwrap_err();
    assert!(hvsock_error(&err).is_peer_closed(), "{err}");
}

#[tokio::test]
async fn aborting_the_monitor_wakes_a_parked_reader_and_the_monitor_sees_halves_go() {
    let (guest, _host, _map) = channel_pair(4 * 4096);
    let (guest, mut monitor) = PipeStream::new(guest);
    let (mut rx, tx) = guest.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        rx.read(&mut buf).await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    monitor.abort();
    let err = tokio::time::timeout(LIMIT, reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    drop(tx);
    let summary = tokio::time::timeout(LIMIT, monitor.closed()).await.unwrap();
    assert!(summary.error.is_some());
}

#[tokio::test]
async fn dropping_the_writer_sends_the_fin_like_close() {
    let (guest, host, _map) = channel_pair(4 * 4096);
    let (mut guest, _gm) = PipeStream::new(guest);
    let (host, _hm) = PipeStream::new(host);
    let (hrx, mut htx) = host.into_split();
    htx.write_all(b"bye").await.unwrap();
    drop(htx);
    drop(hrx);
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, guest.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"bye");
}

#[test]
fn send_chunk_is_a_quarter_ring_within_the_mtu() {
    assert_eq!(send_chunk(4096), 1024 - 32);
    assert_eq!(send_chunk(5 * 4096), 5 * 1024 - 32);
    assert_eq!(send_chunk(1 << 20), HVS_MTU_SIZE);
    assert_eq!(pipe_packet_len(0), 32);
    assert_eq!(pipe_packet_len(1), 40);
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any split of the writes into packets, any size of reads, both directions with FIN, on a
    /// ring small enough (4 KiB of data) that packets wrap around its end many times.
    #[test]
    fn any_split_of_writes_reads_back_the_same_bytes(
        host_writes in proptest::collection::vec(1usize..3000, 1..24),
        guest_writes in proptest::collection::vec(1usize..3000, 0..12),
        read_sizes in proptest::collection::vec(1usize..5000, 1..16),
        seed in any::<u8>(),
    ) {
        let total_in: usize = host_writes.iter().sum();
        let total_out: usize = guest_writes.iter().sum();
        let data_in = pattern(total_in, seed);
        let data_out = pattern(total_out, seed.wrapping_add(1));
        let (got_in, got_out) = run(async {
            let (guest, host, _map) = channel_pair(2 * 4096);
            let (guest, _gm) = PipeStream::new(guest);
            let (host, _hm) = PipeStream::new(host);
            let (mut grx, mut gtx) = guest.into_split();
            let (mut hrx, mut htx) = host.into_split();
            let host_writer = async {
                let mut at = 0;
                for n in &host_writes {
                    htx.write_all(&data_in[at..at + n]).await.unwrap();
                    at += n;
                }
                htx.shutdown().await.unwrap();
            };
            let guest_writer = async {
                let mut at = 0;
                for n in &guest_writes {
                    gtx.write_all(&data_out[at..at + n]).await.unwrap();
                    at += n;
                }
                gtx.shutdown().await.unwrap();
            };
            let guest_reader = async {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 5000];
                for i in 0.. {
                    let size = read_sizes[i % read_sizes.len()];
                    let n = grx.read(&mut buf[..size]).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                got
            };
            let host_reader = async {
                let mut got = Vec::new();
                hrx.read_to_end(&mut got).await.unwrap();
                got
            };
            let all = async { tokio::join!(host_writer, guest_writer, guest_reader, host_reader) };
            let (_, _, got_in, got_out) = tokio::time::timeout(LIMIT, all).await.unwrap();
            (got_in, got_out)
        });
        prop_assert!(got_in == data_in);
        prop_assert!(got_out == data_out);
    }
}
