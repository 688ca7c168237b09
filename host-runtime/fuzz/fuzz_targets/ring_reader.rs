//! Fuzzes the ring reader with a hostile peer's view of one ring: the input is the control
//! page words the peer controls followed by the data area contents. Draining must end in
//! packets or `RingError`s: never a panic, an out-of-bounds access or an endless loop.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use hvisd_ring::{MappedRing, PAGE_SIZE, RingMem, RingReader, RingWriter, SharedMapping, control};
use libfuzzer_sys::fuzz_target;

/// One mapping per ring size, reused across inputs (mmap per input would dominate).
fn ring(pages: usize) -> MappedRing {
    static RINGS: OnceLock<[MappedRing; 2]> = OnceLock::new();
    let rings = RINGS.get_or_init(|| {
        [2, 3].map(|pages| {
            let size = pages * PAGE_SIZE;
            let map = SharedMapping::anonymous(size).expect("anonymous mapping for the fuzzer");
            MappedRing::new(map, 0, size, "fuzzed ring").expect("valid ring size")
        })
    });
    rings[pages - 2].clone()
}

fn word(input: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    for (k, b) in w.iter_mut().enumerate() {
        *b = input.get(1 + i * 4 + k).copied().unwrap_or(0);
    }
    u32::from_le_bytes(w)
}

fuzz_target!(|input: &[u8]| {
    let Some(&selector) = input.first() else {
        return;
    };
    let ring = ring(2 + usize::from(selector & 1));
    let data_len = ring.data_len();
    // Byte 0 picks the size; bit 1 asks for indices folded into the data area so the
    // fuzzer spends most time on descriptors rather than on index validation.
    let fold = selector & 2 != 0;
    let index = |w: u32| {
        if fold {
            (w as usize % data_len) as u32 & !7
        } else {
            w
        }
    };
    let words = [
        index(word(input, 0)),
        index(word(input, 1)),
        word(input, 2),
        word(input, 3),
    ];
    for (i, w) in words.into_iter().enumerate() {
        ring.control()[i].store(w, Ordering::Relaxed);
    }
    let data = input.get(17..).unwrap_or(&[]);
    let mut area = vec![0u8; data_len];
    let n = data.len().min(data_len);
    area[..n].copy_from_slice(&data[..n]);
    ring.write_at(0, &area);

    if let Ok(mut reader) = RingReader::new(ring.clone()) {
        let mut packets = 0usize;
        'drain: for _ in 0..3 {
            let Ok(mut batch) = reader.begin() else { break };
            loop {
                match batch.next() {
                    Ok(Some(packet)) => {
                        assert!(packet.payload_len < data_len);
                        // Every byte of a returned payload can be copied out, and none past it.
                        let mut payload = vec![0u8; packet.payload_len];
                        assert!(batch.read_payload(&packet, 0, &mut payload).is_ok());
                        assert!(batch.read_payload(&packet, 0, &mut vec![0u8; packet.payload_len + 1]).is_err());
                        packets += 1;
                        assert!(
                            packets <= data_len / 24,
                            "more packets than the ring can hold"
                        );
                    }
                    Ok(None) => break,
                    Err(_) => {
                        batch.commit();
                        break 'drain;
                    }
                }
            }
            batch.commit();
            let _ = reader.unmask_and_check();
        }
    }
    // The writer on the same hostile page must not misbehave either.
    ring.control()[control::READ_INDEX].store(words[1], Ordering::Relaxed);
    if let Ok(mut writer) = RingWriter::new(ring.clone())
        && let Ok(mut batch) = writer.begin()
    {
        let _ = batch.write(hvisd_ring::PacketHeader::inband(1), &[&data[..n.min(3000)]]);
        let _ = batch.commit();
    }
});
