//! Example hvsock service: a line protocol for the host side.
//!
//! - `status` answers `ok <n> keys` with the number of guest-pool keys the
//!   plugin may read;
//! - `ask SERVICE TEXT` opens a connection to the host service SERVICE (it must be in the
//!   manifest's `hvsock.connect`), sends `TEXT` as a line and answers `reply LINE` with the
//!   first line the host service sends back (`error ...` if the connect is refused);
//! - `quit` closes the connection;
//! - any other line is echoed back.
//!
//! Manifest:
//!
//! ```toml
//! [[plugin]]
//! name = "status-echo"
//! path = "/usr/lib/hvisd/plugins/status_echo.wasm"
//! worlds = ["hvsock-service"]
//! [plugin.hvsock]
//! listen = ["status"]
//! connect = ["host-time"]
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["*"]
//! ```

use std::io::{BufRead, BufReader, Read, Write};

use hvisd_sdk::{Connection, HvsockService, Pool, hvsock, kvp};

/// Asks the host service `service` one line.
fn ask(service: &str, text: &str) -> String {
    let peer = match hvsock::connect(service) {
        Ok(c) => c,
        Err(e) => return format!("error {e:?}\n"),
    };
    let mut peer = BufReader::new(peer);
    if let Err(e) = peer.get_mut().write_all(format!("{text}\n").as_bytes()) {
        return format!("error {e}\n");
    }
    let mut answer = String::new();
    match (&mut peer).take(MAX_LINE as u64).read_line(&mut answer) {
        Ok(_) => format!("reply {}\n", answer.trim_end()),
        Err(e) => format!("error {e}\n"),
    }
}

/// Longest line accepted; a longer one ends the connection.
const MAX_LINE: usize = 4096;

struct StatusEcho;

impl HvsockService for StatusEcho {
    fn serve(_service: &str, conn: Connection) -> Result<(), String> {
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Ok(());
            }
            if line.len() > MAX_LINE {
                return Err(format!("line of {} bytes, limit {MAX_LINE}", line.len()));
            }
            let reply = match line.trim_end() {
                "quit" => return Ok(()),
                cmd if cmd.starts_with("ask ") => {
                    let mut parts = cmd[4..].splitn(2, ' ');
                    let service = parts.next().unwrap_or("");
                    ask(service, parts.next().unwrap_or(""))
                }
                "status" => match kvp::list(Pool::Guest, "") {
                    Ok(keys) => format!("ok {} keys\n", keys.len()),
                    Err(e) => format!("error {e:?}\n"),
                },
                _ => line.clone(),
            };
            let out = reader.get_mut();
            out.write_all(reply.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
        }
    }
}

hvisd_sdk::export_hvsock_service!(StatusEcho);
