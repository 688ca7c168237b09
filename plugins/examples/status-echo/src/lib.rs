//! Example hvsock service: a line protocol for the host side.
//!
//! - `status` answers `ok <n> keys` with the number of guest-pool keys the
//!   plugin may read;
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
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["*"]
//! ```

use std::io::{BufRead, BufReader, Write};

use hvisd_sdk::{Connection, HvsockService, Pool, kvp};

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
