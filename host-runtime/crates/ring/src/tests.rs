//! Cross-module tests: writer and reader against each other, and against hostile control
//! pages, over real `MAP_SHARED` memory.

use std::sync::atomic::Ordering;
use std::time::Duration;

use proptest::prelude::*;

use crate::doorbell::{doorbell_pair, receive_until, send_blocking};
use crate::{
    MappedRing, PACKET_FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PAGE_SIZE, PacketHeader,
    RingError, RingMem, RingReader, RingWriter, SharedMapping, WriteError, control, packet_len,
};

/// A fresh zeroed ring of `ring_size` bytes in its own anonymous shared mapping.
/// The whole payload of `packet`, copied out of the ring.
fn payload_of<M: RingMem>(
    batch: &crate::ReadBatch<'_, M>,
    packet: &crate::IncomingPacket,
) -> Vec<u8> {
    let mut out = vec![0u8; packet.payload_len];
    batch.read_payload(packet, 0, &mut out).unwrap();
    out
}

fn new_ring(ring_size: usize) -> MappedRing {
    let map = SharedMapping::anonymous(ring_size).unwrap();
    MappedRing::new(map, 0, ring_size, "test ring").unwrap()
}

fn set_word(ring: &MappedRing, word: usize, value: u32) {
    ring.control()[word].store(value, Ordering::SeqCst);
}

fn word(ring: &MappedRing, word: usize) -> u32 {
    ring.control()[word].load(Ordering::SeqCst)
}

/// Both indices at `start`: an empty ring whose next packet begins there.
fn empty_at(ring: &MappedRing, start: usize) {
    set_word(ring, control::WRITE_INDEX, start as u32);
    set_word(ring, control::READ_INDEX, start as u32);
}

fn raw(ring: &MappedRing, offset: usize, len: usize) -> Vec<u8> {
    let data_len = ring.data_len();
    (0..len)
        .map(|i| {
            let mut b = [0u8];
            ring.read_at((offset + i) % data_len, &mut b);
            b[0]
        })
        .collect()
}

fn fill_data(ring: &MappedRing, byte: u8) {
    ring.write_at(0, &vec![byte; ring.data_len()]);
}

/// Payload bytes for packet `seq`: distinct per packet and position.
fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i * 7) as u8)
        .collect()
}

/// Writes a raw descriptor (and nothing else) at `at`, wrapping.
fn put_descriptor(ring: &MappedRing, at: usize, packet_type: u16, offset8: u16, len8: u16) {
    let mut d = [0u8; 16];
    d[0..2].copy_from_slice(&packet_type.to_le_bytes());
    d[2..4].copy_from_slice(&offset8.to_le_bytes());
    d[4..6].copy_from_slice(&len8.to_le_bytes());
    crate::write_wrapping(ring, at, &d);
}

#[test]
fn packet_bytes_are_exact_descriptor_payload_zero_padding_trailer() {
    let ring = new_ring(2 * PAGE_SIZE);
    fill_data(&ring, 0xAA);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let mut batch = writer.begin().unwrap();
    let header = PacketHeader {
        packet_type: 6,
        flags: PACKET_FLAG_COMPLETION_REQUESTED,
        transaction_id: 0x0102_0304_0506_0708,
    };
    batch.write(header, &[b"hello ", b"world!!"]).unwrap();
    assert!(batch.commit());

    let mut expected = vec![6, 0, 2, 0, 4, 0, 1, 0, 8, 7, 6, 5, 4, 3, 2, 1];
    expected.extend_from_slice(b"hello world!!");
    expected.extend_from_slice(&[0, 0, 0]);
    expected.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(raw(&ring, 0, 40), expected);
    assert_eq!(
        raw(&ring, 40, 8),
        vec![0xAA; 8],
        "nothing written past the packet"
    );
    assert_eq!(word(&ring, control::WRITE_INDEX), 40);

    let mut reader = RingReader::new(ring.clone()).unwrap();
    let mut batch = reader.begin().unwrap();
    let packet = batch.next().unwrap().unwrap();
    assert_eq!(packet.packet_type, 6);
    assert_eq!(packet.flags, PACKET_FLAG_COMPLETION_REQUESTED);
    assert_eq!(packet.transaction_id, 0x0102_0304_0506_0708);
    assert_eq!(payload_of(&batch, &packet), b"hello world!!\0\0\0");
    assert!(batch.next().unwrap().is_none());
    assert!(!batch.commit());
    assert_eq!(word(&ring, control::READ_INDEX), 40);
    assert_eq!(reader.stats().bad_trailers, 0);
}

#[test]
fn packets_wrap_correctly_from_every_start_index() {
    let ring = new_ring(2 * PAGE_SIZE);
    let data_len = ring.data_len();
    for len in [0usize, 1, 13, 16, 100, 1000] {
        let payload = pattern(len as u64, len);
        for start in (0..data_len).step_by(8) {
            fill_data(&ring, 0xAA);
            empty_at(&ring, start);
            let mut writer = RingWriter::new(ring.clone()).unwrap();
            let mut batch = writer.begin().unwrap();
            batch
                .write(PacketHeader::inband(start as u64), &[&payload])
                .unwrap();
            assert!(batch.commit());
            let total = packet_len(len);
            let end = (start + total) % data_len;
            assert_eq!(writer.write_index(), end);
            assert_eq!(word(&ring, control::WRITE_INDEX) as usize, end);
            let padded = len.next_multiple_of(8);
            assert_eq!(
                raw(&ring, start + 16 + padded, 8),
                ((start as u64) << 32).to_le_bytes(),
                "trailer of the packet at {start:#x}"
            );

            let mut reader = RingReader::new(ring.clone()).unwrap();
            let mut batch = reader.begin().unwrap();
            let packet = batch.next().unwrap().unwrap();
            assert_eq!(packet.transaction_id, start as u64);
            assert_eq!(packet.payload_len, padded);
            let got = payload_of(&batch, &packet);
            assert_eq!(&got[..len], &payload[..], "start {start:#x}");
            assert!(got[len..].iter().all(|&b| b == 0), "padding zero");
            // Any part of the payload can be copied on its own (hvsock's partial reads).
            if len > 3 {
                let mut part = vec![0u8; len - 3];
                batch.read_payload(&packet, 3, &mut part).unwrap();
                assert_eq!(&part[..], &payload[3..]);
            }
            assert!(batch.read_payload(&packet, padded, &mut [0u8; 1]).is_err());
            assert!(batch.next().unwrap().is_none());
            batch.commit();
            assert_eq!(reader.read_index(), end);
            assert_eq!(reader.stats().bad_trailers, 0);
        }
    }
}

#[test]
fn ring_never_fills_completely() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    assert_eq!(writer.max_payload_len(), 4064);
    let mut batch = writer.begin().unwrap();
    assert_eq!(
        batch.write(PacketHeader::inband(0), &[&[0u8; 4065]]),
        Err(WriteError::TooLarge {
            ring: "test ring",
            len: 4065,
            max: 4064
        })
    );
    // A packet of exactly the free space would make write_index == read_index.
    let err = batch.write(PacketHeader::inband(0), &[&[0u8; 4064], &[0u8; 8]]);
    assert!(matches!(err, Err(WriteError::TooLarge { .. })));
    batch
        .write(PacketHeader::inband(0), &[&[1u8; 4064]])
        .unwrap();
    assert_eq!(batch.free(), 8);
    assert_eq!(
        batch.write(PacketHeader::inband(1), &[]),
        Err(WriteError::Full {
            ring: "test ring",
            needed: 24,
            free: 8
        })
    );
    batch.commit();
    assert_eq!(word(&ring, control::WRITE_INDEX), 4088);
    assert_eq!(writer.free_space().unwrap(), 8);

    // Free space must exceed the packet: exactly equal is refused.
    let ring = new_ring(2 * PAGE_SIZE);
    empty_at(&ring, 0);
    set_word(&ring, control::READ_INDEX, 48);
    let mut writer = RingWriter::new(ring).unwrap();
    let mut batch = writer.begin().unwrap();
    assert_eq!(batch.free(), 48);
    assert!(matches!(
        batch.write(PacketHeader::inband(0), &[&[0u8; 24]]),
        Err(WriteError::Full {
            needed: 48,
            free: 48,
            ..
        })
    ));
    batch.write(PacketHeader::inband(0), &[&[0u8; 16]]).unwrap();
}

#[test]
fn writer_signals_only_when_the_ring_goes_from_empty_to_non_empty() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let mut reader = RingReader::new(ring.clone()).unwrap();

    assert!(
        !writer.begin().unwrap().commit(),
        "empty batch publishes nothing"
    );
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(1), &[b"a"]).unwrap();
    batch.write(PacketHeader::inband(2), &[b"b"]).unwrap();
    assert!(batch.commit(), "empty -> non-empty");
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(3), &[b"c"]).unwrap();
    assert!(!batch.commit(), "ring was not empty");

    let mut batch = reader.begin().unwrap();
    while batch.next().unwrap().is_some() {}
    assert!(
        !batch.commit(),
        "no pending_send_sz: no signal to the writer"
    );

    reader.set_interrupt_mask(true);
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(4), &[b"d"]).unwrap();
    assert!(!batch.commit(), "reader masked interrupts");
}

#[test]
fn writer_signals_when_reader_drained_after_begin() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let mut reader = RingReader::new(ring.clone()).unwrap();
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(1), &[b"a"]).unwrap();
    assert!(batch.commit());

    // The writer loads read_index while the ring is non-empty...
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(2), &[b"b"]).unwrap();
    // ...then the reader drains, unmasks and finds nothing (it is about to sleep)...
    let mut read = reader.begin().unwrap();
    while read.next().unwrap().is_some() {}
    read.commit();
    assert!(!reader.unmask_and_check().unwrap());
    // ...so the commit must signal although the ring looked non-empty at begin.
    assert!(batch.commit());
    assert!(reader.unmask_and_check().unwrap());
}

#[test]
fn reader_signals_when_free_space_crosses_pending_send_size() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let mut reader = RingReader::new(ring.clone()).unwrap();
    let mut batch = writer.begin().unwrap();
    // 10 packets of 400 bytes: 10 * packet_len(376) = 4000 of 4096.
    for i in 0..10 {
        batch
            .write(PacketHeader::inband(i), &[&[i as u8; 376]])
            .unwrap();
    }
    let needed = match batch.write(PacketHeader::inband(99), &[&[0; 1000]]) {
        Err(WriteError::Full { needed, free, .. }) => {
            assert_eq!((needed, free), (1024, 96));
            needed
        }
        other => panic!("expected Full, got {other:?}"),
    };
    batch.commit();
    writer.set_pending_send_size(needed as u32);
    assert_eq!(word(&ring, control::PENDING_SEND_SZ), 1024);
    assert!(writer.free_space().unwrap() <= needed);

    let read_one = |reader: &mut RingReader<MappedRing>| {
        let mut batch = reader.begin().unwrap();
        batch.next().unwrap().unwrap();
        batch.commit()
    };
    assert!(!read_one(&mut reader), "free 496: below 1024");
    assert!(!read_one(&mut reader), "free 896: below 1024");
    assert!(read_one(&mut reader), "free 1296: crossed 1024");
    assert!(!read_one(&mut reader), "free 1696: already above");
    assert!(writer.free_space().unwrap() > needed);
    writer.set_pending_send_size(0);
    assert!(!read_one(&mut reader), "pending cleared");

    // Free space exactly equal to pending_send_sz is not enough (a write needs more).
    let mut batch = writer.begin().unwrap();
    while batch.write(PacketHeader::inband(0), &[&[0; 376]]).is_ok() {}
    batch.commit();
    let free = writer.free_space().unwrap();
    writer.set_pending_send_size((free + 400) as u32);
    assert!(!read_one(&mut reader), "free == pending is not a crossing");
    assert!(read_one(&mut reader), "free > pending");
}

#[test]
fn unmask_and_check_clears_the_mask_and_reports_pending_packets() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let reader = RingReader::new(ring.clone()).unwrap();
    reader.set_interrupt_mask(true);
    assert_eq!(word(&ring, control::INTERRUPT_MASK), 1);
    assert!(!reader.unmask_and_check().unwrap());
    assert_eq!(word(&ring, control::INTERRUPT_MASK), 0);
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(0), &[]).unwrap();
    assert!(batch.commit());
    assert!(reader.unmask_and_check().unwrap());
    set_word(&ring, control::WRITE_INDEX, 0xff3);
    assert_eq!(
        reader.unmask_and_check().unwrap_err().to_string(),
        "test ring: write_index 0xff3 not 8-aligned"
    );
}

#[test]
fn control_fields_and_data_sit_at_the_spec_byte_offsets_of_the_file() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&vec![0u8; 4 * PAGE_SIZE]).unwrap();
    let map = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap();
    let (g2h, h2g) = crate::ring_pair(map, 2 * PAGE_SIZE).unwrap();
    let mut writer = RingWriter::new(g2h.clone()).unwrap();
    writer.set_feature_bits();
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(9), &[b"abc"]).unwrap();
    batch.commit();
    writer.set_pending_send_size(0x1234);
    let reader = RingReader::new(h2g).unwrap();
    reader.set_feature_bits();
    reader.set_interrupt_mask(true);

    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut bytes).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 32, "guest->host write_index");
    assert_eq!(u32_at(4), 0, "guest->host read_index");
    assert_eq!(u32_at(12), 0x1234, "guest->host pending_send_sz");
    assert_eq!(u32_at(64), 1, "guest->host feature_bits");
    assert_eq!(
        &bytes[PAGE_SIZE..PAGE_SIZE + 2],
        &6u16.to_le_bytes(),
        "packet type"
    );
    assert_eq!(&bytes[PAGE_SIZE + 16..PAGE_SIZE + 19], b"abc");
    let h2g_base = 2 * PAGE_SIZE;
    assert_eq!(u32_at(h2g_base + 8), 1, "host->guest interrupt_mask");
    assert_eq!(u32_at(h2g_base + 64), 1, "host->guest feature_bits");
}

#[test]
fn hostile_indices_are_reported_not_followed() {
    let ring = new_ring(3 * PAGE_SIZE);
    set_word(&ring, control::WRITE_INDEX, 0x1003);
    let mut reader = RingReader::new(ring.clone()).unwrap();
    let err = reader.begin().err().unwrap();
    assert_eq!(
        err.to_string(),
        "test ring: write_index 0x1003 not 8-aligned"
    );
    set_word(&ring, control::WRITE_INDEX, 0x2000);
    let err = reader.begin().err().unwrap();
    assert_eq!(
        err.to_string(),
        "test ring: write_index 0x2000 is outside the 0x2000-byte data area"
    );

    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    set_word(&ring, control::READ_INDEX, u32::MAX);
    assert!(matches!(
        writer.begin().err().unwrap(),
        RingError::IndexOutOfRange {
            field: "read_index",
            ..
        }
    ));
    assert!(writer.free_space().is_err());
    set_word(&ring, control::WRITE_INDEX, 4);
    assert!(matches!(
        RingWriter::new(ring.clone()).err().unwrap(),
        RingError::IndexMisaligned {
            field: "write_index",
            value: 4,
            ..
        }
    ));
}

#[test]
fn bad_descriptors_are_errors_that_consume_nothing() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut reader = RingReader::new(ring.clone()).unwrap();
    let cases: [(u16, u16, usize, &str); 4] = [
        (1, 4, 64, "offset8 points inside the 16-byte descriptor"),
        (5, 4, 64, "offset8 is past len8"),
        (2, 8, 64, "packet and trailer run past write_index"),
        (2, 7, 56, "packet and trailer run past write_index"),
    ];
    for (offset8, len8, write_index, reason) in cases {
        put_descriptor(&ring, 0, 6, offset8, len8);
        set_word(&ring, control::WRITE_INDEX, write_index as u32);
        let mut batch = reader.begin().unwrap();
        for _ in 0..2 {
            match batch.next() {
                Err(RingError::BadDescriptor { reason: r, .. }) => assert_eq!(r, reason),
                other => panic!("offset8 {offset8} len8 {len8}: {other:?}"),
            }
        }
        assert!(!batch.commit());
        assert_eq!(word(&ring, control::READ_INDEX), 0);
    }
    set_word(&ring, control::WRITE_INDEX, 16);
    let mut batch = reader.begin().unwrap();
    assert!(matches!(
        batch.next(),
        Err(RingError::TruncatedPacket { available: 16, .. })
    ));
}

#[test]
fn wrong_trailer_and_extended_descriptor_are_counted_not_rejected() {
    let ring = new_ring(2 * PAGE_SIZE);
    // offset8 3: 8 bytes of extra header before an 8-byte payload; trailer left garbage.
    put_descriptor(&ring, 0, PACKET_TYPE_COMPLETION, 3, 4);
    ring.write_at(24, b"payload!");
    ring.write_at(32, &[0xEE; 8]);
    set_word(&ring, control::WRITE_INDEX, 40);
    let mut reader = RingReader::new(ring.clone()).unwrap();
    let mut batch = reader.begin().unwrap();
    let packet = batch.next().unwrap().unwrap();
    assert_eq!(packet.packet_type, PACKET_TYPE_COMPLETION);
    assert_eq!(payload_of(&batch, &packet), b"payload!");
    assert!(batch.next().unwrap().is_none());
    batch.commit();
    let stats = reader.stats();
    assert_eq!((stats.bad_trailers, stats.extended_descriptors), (1, 1));
}

#[test]
fn dropping_a_read_batch_leaves_its_packets_in_the_ring() {
    let ring = new_ring(2 * PAGE_SIZE);
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let mut reader = RingReader::new(ring.clone()).unwrap();
    let mut batch = writer.begin().unwrap();
    batch.write(PacketHeader::inband(7), &[b"x"]).unwrap();
    batch.commit();
    {
        let mut batch = reader.begin().unwrap();
        assert_eq!(batch.next().unwrap().unwrap().transaction_id, 7);
    }
    assert_eq!(word(&ring, control::READ_INDEX), 0);
    let mut batch = reader.begin().unwrap();
    assert_eq!(batch.next().unwrap().unwrap().transaction_id, 7);
    batch.commit();
    assert_eq!(word(&ring, control::READ_INDEX), 32);
}

#[test]
fn two_threads_stream_100k_packets_with_checksums() {
    const PACKETS: u64 = 100_000;
    let ring = new_ring(4 * PAGE_SIZE);
    let (mut writer_bell, mut reader_bell) = doorbell_pair().unwrap();
    // A lost wakeup fails the test instead of hanging it.
    writer_bell
        .set_wait_timeout(Duration::from_secs(30))
        .unwrap();
    reader_bell
        .set_wait_timeout(Duration::from_secs(30))
        .unwrap();
    let mut writer = RingWriter::new(ring.clone()).unwrap();
    let mut reader = RingReader::new(ring.clone()).unwrap();

    let len_of = |seq: u64| (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize; // 0..1024
    let checksum = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    };
    let producer = std::thread::spawn(move || {
        let mut waits = 0;
        let mut seq = 0;
        while seq < PACKETS {
            let count = 1 + (seq % 7);
            let bodies: Vec<(u64, Vec<u8>)> = (seq..(seq + count).min(PACKETS))
                .map(|s| {
                    let mut body = pattern(s, len_of(s));
                    let sum = checksum(&body);
                    body.extend_from_slice(&sum.to_le_bytes());
                    (s, body)
                })
                .collect();
            let packets: Vec<(PacketHeader, &[u8])> = bodies
                .iter()
                .map(|(s, b)| (PacketHeader::inband(*s), &b[..]))
                .collect();
            send_blocking(&mut writer, &mut writer_bell, &packets, &mut waits).unwrap();
            seq += bodies.len() as u64;
        }
        (waits, writer_bell.sent)
    });
    let mut next = 0u64;
    let mut waits = 0;
    receive_until(
        &mut reader,
        &mut reader_bell,
        &mut waits,
        |batch, packet| {
            assert_eq!(packet.transaction_id, next, "packets arrive in order");
            let len = len_of(next);
            let bytes = payload_of(batch, packet);
            let body = &bytes[..len];
            let mut sum = [0u8; 8];
            sum.copy_from_slice(&bytes[len..len + 8]);
            assert_eq!(checksum(body), u64::from_le_bytes(sum), "packet {next}");
            assert_eq!(body, &pattern(next, len)[..]);
            next += 1;
            Ok(next < PACKETS)
        },
    )
    .unwrap();
    let (writer_waits, writer_signals) = producer.join().unwrap();
    assert_eq!(next, PACKETS);
    let stats = reader.stats();
    assert_eq!(stats.packets, PACKETS);
    assert_eq!(stats.bad_trailers, 0);
    assert!(stats.wrapped_packets > 0, "some packets wrapped");
    eprintln!(
        "100k packets: reader waits {waits}, writer waits {writer_waits}, copied {}, signals to reader {}, to writer {}",
        stats.wrapped_packets, writer_signals, reader_bell.sent
    );
}

/// Ring sizes from 2 to 16 pages.
fn ring_size() -> impl Strategy<Value = usize> {
    (2usize..=16).prop_map(|pages| pages * PAGE_SIZE)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Packets of random sizes in random batches, from a random start index, arrive
    /// byte-exact, in order, with zero padding and correct trailers; the ring never
    /// reports more free space than it has and never fills completely.
    #[test]
    fn batches_round_trip_byte_exact(
        ring_size in ring_size(),
        start8 in any::<u32>(),
        batches in prop::collection::vec(prop::collection::vec(0usize..3000, 1..40), 1..12),
    ) {
        let ring = new_ring(ring_size);
        let data_len = ring.data_len();
        let start = (start8 as usize * 8) % data_len;
        fill_data(&ring, 0x5A);
        empty_at(&ring, start);
        let mut writer = RingWriter::new(ring.clone()).unwrap();
        let mut reader = RingReader::new(ring.clone()).unwrap();
        let max = writer.max_payload_len();
        let mut sent = 0u64;
        let mut received = 0u64;
        let mut lens = Vec::new();
        for sizes in &batches {
            let mut queue: Vec<usize> = sizes.iter().map(|&s| s.min(max)).collect();
            while !queue.is_empty() {
                let was_empty = reader.read_index() == writer.write_index();
                let mut batch = writer.begin().unwrap();
                let mut written = 0;
                for &len in &queue {
                    let before = batch.free();
                    match batch.write(PacketHeader::inband(sent), &[&pattern(sent, len)]) {
                        Ok(()) => {
                            prop_assert!(packet_len(len) < before);
                            prop_assert!(batch.free() >= 8);
                            lens.push(len);
                            sent += 1;
                            written += 1;
                        }
                        Err(WriteError::Full { needed, free, .. }) => {
                            prop_assert_eq!(needed, packet_len(len));
                            prop_assert!(needed >= free);
                            break;
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                queue.drain(..written);
                let signal = batch.commit();
                prop_assert_eq!(signal, was_empty && written > 0);

                let mut batch = reader.begin().unwrap();
                while let Some(packet) = batch.next().unwrap() {
                    let len = lens[received as usize];
                    prop_assert_eq!(packet.transaction_id, received);
                    let got = payload_of(&batch, &packet);
                    prop_assert_eq!(got.len(), len.next_multiple_of(8));
                    prop_assert_eq!(&got[..len], &pattern(received, len)[..]);
                    prop_assert!(got[len..].iter().all(|&b| b == 0));
                    received += 1;
                }
                batch.commit();
            }
        }
        prop_assert_eq!(received, sent);
        prop_assert_eq!(reader.stats().bad_trailers, 0);
        prop_assert_eq!(reader.read_index(), writer.write_index());
    }
}

/// A control word that is valid for `data_len` half of the time, arbitrary otherwise.
fn index_word(data_len: usize) -> impl Strategy<Value = u32> {
    prop_oneof![(0..data_len / 8).prop_map(|i| (i * 8) as u32), any::<u32>(),]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a hostile peer puts in the control page and the data area (random indices,
    /// descriptors with random offset8/len8 at and after the read index), the reader
    /// returns packets or errors, never panics, and finishes in a bounded number of steps;
    /// every packet it returns lies within what the write index made available.
    #[test]
    fn hostile_ring_yields_errors_never_panics(
        (pages, write_index, read_index) in (2usize..=3).prop_flat_map(|pages| {
            let data_len = (pages - 1) * PAGE_SIZE;
            (Just(pages), index_word(data_len), index_word(data_len))
        }),
        interrupt_mask in any::<u32>(),
        pending_send_sz in prop_oneof![Just(0u32), 0u32..9000, any::<u32>()],
        data in prop::collection::vec(any::<u8>(), 0..8192),
        descriptors in prop::collection::vec((any::<u16>(), 0u16..8, 0u16..600), 0..12),
    ) {
        let ring = new_ring(pages * PAGE_SIZE);
        let data_len = ring.data_len();
        ring.write_at(0, &data[..data.len().min(data_len)]);
        set_word(&ring, control::WRITE_INDEX, write_index);
        set_word(&ring, control::READ_INDEX, read_index);
        set_word(&ring, control::INTERRUPT_MASK, interrupt_mask);
        set_word(&ring, control::PENDING_SEND_SZ, pending_send_sz);
        // Plant descriptors along a plausible packet chain starting at read_index.
        let mut at = read_index as usize % data_len / 8 * 8;
        for &(packet_type, offset8, len8) in &descriptors {
            put_descriptor(&ring, at, packet_type, offset8, len8);
            at = (at + usize::from(len8.max(3)) * 8 + 8) % data_len;
        }

        let Ok(mut reader) = RingReader::new(ring.clone()) else { return Ok(()) };
        let mut steps = 0;
        'outer: for _ in 0..4 {
            let Ok(mut batch) = reader.begin() else { break };
            loop {
                steps += 1;
                prop_assert!(steps <= data_len / 24 + 8, "reader did not terminate");
                match batch.next() {
                    Ok(Some(packet)) => {
                        prop_assert!(packet.payload_len < data_len);
                        prop_assert!(batch.read_payload(&packet, 0, &mut vec![0u8; packet.payload_len]).is_ok());
                    }
                    Ok(None) => break,
                    Err(_) => {
                        batch.commit();
                        break 'outer;
                    }
                }
            }
            let _ = batch.commit();
            let _ = reader.unmask_and_check();
        }

        // The writer facing the same hostile page must not panic either.
        if let Ok(mut writer) = RingWriter::new(ring.clone()) {
            if let Ok(mut batch) = writer.begin() {
                for len in [0usize, 100, 5000] {
                    let _ = batch.write(PacketHeader::inband(0), &[&vec![1u8; len]]);
                }
                let _ = batch.commit();
            }
            let _ = writer.free_space();
        }
    }
}
