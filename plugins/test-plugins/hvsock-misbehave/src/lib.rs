//! Test plugin: an hvsock service that echoes, and one that misbehaves on request.
//!
//! - service `echo` (and any service not named below): every byte read is written back, in
//!   chunks of up to 64 KiB, until the peer's FIN; then the plugin's FIN. The benchmark's and the
//!   concurrency tests' plugin.
//! - service `misbehave`: the first line chooses what to do:
//!   - `ignore-permits`: writes 1 MiB in one `write`, past its write permit (the host refuses
//!     the write; the plugin reports the error as its line and returns);
//!   - `read-max`: asks to read 2^64-1 bytes, answers `got N` with what it was given;
//!   - `trap`: traps;
//!   - `stall`: never reads again and never returns (the connection's deadline ends it);
//!   - `connect SERVICE TEXT`: connects to SERVICE, sends `TEXT\n`, answers `reply LINE`
//!     with the first line that comes back, or `error ...`;
//!   - `fin`: returns at once (the host sees a clean FIN).

use std::io::{BufRead, BufReader, Read, Write};

use hvisd_sdk::{Connection, HvsockService, hvsock};

struct Misbehave;

fn echo(mut conn: Connection) -> Result<(), String> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = conn.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])
            .map_err(|e| format!("write: {e}"))?;
    }
}

fn first_line(conn: &mut Connection) -> Result<String, String> {
    // Byte by byte, so nothing after the line is consumed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match conn.read(&mut byte).map_err(|e| format!("read: {e}"))? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

impl HvsockService for Misbehave {
    fn serve(service: &str, mut conn: Connection) -> Result<(), String> {
        if service != "misbehave" {
            return echo(conn);
        }
        let line = first_line(&mut conn)?;
        let mut words = line.splitn(3, ' ');
        let reply = match words.next().unwrap_or("") {
            "ignore-permits" => {
                let (_, output) = conn.streams();
                let big = vec![b'x'; 1 << 20];
                match output.write(&big) {
                    Ok(()) => "wrote 1 MiB past the permit\n".to_owned(),
                    Err(e) => format!("refused: {e:?}\n"),
                }
            }
            "read-max" => {
                let (input, _) = conn.streams();
                match input.blocking_read(u64::MAX) {
                    Ok(bytes) => format!("got {}\n", bytes.len()),
                    Err(e) => format!("read error: {e:?}\n"),
                }
            }
            "trap" => unreachable!("asked to trap"),
            "stall" => loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            "connect" => {
                let service = words.next().unwrap_or("");
                let text = words.next().unwrap_or("");
                match hvsock::connect(service) {
                    Err(e) => format!("error {e:?}\n"),
                    Ok(mut peer) => {
                        let sent = peer.write_all(format!("{text}\n").as_bytes());
                        let mut reader = BufReader::new(peer);
                        let mut answer = String::new();
                        match sent.and_then(|()| reader.read_line(&mut answer)) {
                            Ok(_) => format!("reply {}\n", answer.trim_end()),
                            Err(e) => format!("error {e}\n"),
                        }
                    }
                }
            }
            "fin" => return Ok(()),
            other => format!("unknown mode {other:?}\n"),
        };
        conn.write_all(reply.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        Ok(())
    }
}

hvisd_sdk::export_hvsock_service!(Misbehave);
