//! A KVP provider that opens a TCP connection, so its component imports
//! `wasi:sockets`, which hvisd never links: hvisd must refuse it at load.

use hvisd_sdk::{Error, KvpProvider, Pool, ProviderInfo, Value};

struct UsesSockets;

impl KvpProvider for UsesSockets {
    fn describe() -> ProviderInfo {
        ProviderInfo::owning([(Pool::Guest, "net")])
    }
    fn get(_pool: Pool, _key: &str) -> Result<Value, Error> {
        match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => Ok(Value::Text("ESCAPED: connected".into())),
            Err(e) => Ok(Value::Text(format!("blocked: {e}"))),
        }
    }
}

hvisd_sdk::export_kvp_provider!(UsesSockets);
