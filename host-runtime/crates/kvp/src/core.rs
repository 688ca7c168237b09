//! The one KVP operation core: a request in the daemon protocol's form (the 7432-byte UTF-8
//! `hv_kvp_msg` the kernel hands `hv_kvp_daemon`) is answered by editing it in place, byte for byte
//! as the C daemon does. The kernel transport passes device messages straight through; the VMBus
//! codec ([`crate::vmbus`]) first builds the message as Linux's `hv_kvp.c` would and converts the
//! answer back to UTF-16, so both paths share every decision made here.
//!
//! Where the C daemon crashes or misbehaves, hvisd answers instead (and logs a warning):
//!
//! | request | hv_kvp_daemon | hvisd |
//! |---|---|---|
//! | GET/SET/DELETE/ENUMERATE on pool >= 5 | indexes past its pool array | `HV_INVALIDARG` |
//! | ENUMERATE index >= 2^31 | negative index, reads before its array | `HV_S_CONT` |
//! | `key_size` 0 | `memcmp` of 0 bytes matches record 0: GET/SET/DELETE act on it | `HV_INVALIDARG` |
//! | DELETE `key_size` > 512 | compares past the record's key | `HV_S_CONT` |
//! | SET_IP_INFO address > 45 chars | stack buffer overflow | `HV_INVALIDARG` |
//! | pool file I/O error | exits | `HV_E_FAIL` |
//!
//! A new record's unused bytes are zero (the C daemon leaves whatever its heap held there).

use std::sync::{Arc, Mutex, RwLock};

use hvisd_protocol::ic::status::{HV_E_FAIL, HV_ERROR_DISK_FULL, HV_INVALIDARG, HV_S_CONT};
use hvisd_protocol::kvp::{KvpOperation, MAX_KEY_SIZE, MAX_VALUE_SIZE, Pool};
use hvisd_protocol::kvp_daemon::{self as dm, DaemonMessage, layout};
use tokio::sync::broadcast;

use crate::guest_keys::GuestKeys;
use crate::intrinsic::{self, OsInfo, OsInfoSources};
use crate::ipinfo::{self, NetConfig};
use crate::pool::{Change, PoolStore, Record, StoreError, StoreOptions};
use crate::store::PoolHandle;

/// Everything the KVP service reads its facts from and writes to.
#[derive(Debug, Clone)]
pub struct KvpConfig {
    /// Pool directory, default `/var/lib/hyperv`.
    pub pool_dir: std::path::PathBuf,
    /// Pool write options.
    pub store: StoreOptions,
    /// OS facts.
    pub os: OsInfoSources,
    /// Network facts and SET_IP_INFO output.
    pub net: NetConfig,
}

impl Default for KvpConfig {
    fn default() -> Self {
        KvpConfig {
            pool_dir: "/var/lib/hyperv".into(),
            store: StoreOptions::default(),
            os: OsInfoSources::default(),
            net: NetConfig::default(),
        }
    }
}

/// A key the host changed, for plugins subscribed to host-pushed keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKvpEvent {
    /// The pool (External and AutoExternal are the host-pushed ones).
    pub pool: Pool,
    /// The key.
    pub key: String,
    /// The new value, `None` for a DELETE.
    pub value: Option<String>,
}

/// What one request did, for logs and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvpOutcome {
    /// The operation.
    pub operation: KvpOperation,
    /// The pool byte.
    pub pool: u8,
    /// The status put in the `error` field.
    pub status: u32,
}

/// The KVP service state shared by every transport. Shared as `Arc<KvpCore>`; requests run
/// concurrently: pool operations are serialised by the pool-store thread ([`PoolHandle`]), IP
/// scripts run on blocking threads, and no lock is held across an `await`.
pub struct KvpCore {
    pools: PoolHandle,
    os: OsInfo,
    fqdn: String,
    lic_version: Mutex<Vec<u8>>,
    net: NetConfig,
    guest_keys: RwLock<Option<Arc<GuestKeys>>>,
    events: broadcast::Sender<HostKvpEvent>,
}

impl std::fmt::Debug for KvpCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvpCore")
            .field("os", &self.os)
            .field("fqdn", &self.fqdn)
            .finish()
    }
}

impl KvpCore {
    /// Opens the pools, starts their owner thread and reads the facts the C daemon reads at start
    /// (OS info, FQDN).
    pub fn new(config: KvpConfig) -> Result<KvpCore, StoreError> {
        let store = PoolStore::open(&config.pool_dir, config.store)?;
        let pools = PoolHandle::spawn(store).map_err(|source| StoreError::Io {
            path: config.pool_dir.clone(),
            what: "starting the pool-store thread",
            source,
        })?;
        Ok(KvpCore {
            pools,
            os: OsInfo::read(&config.os),
            fqdn: intrinsic::fully_qualified_domain_name(),
            lic_version: Mutex::new(b"Unknown version".to_vec()),
            net: config.net,
            guest_keys: RwLock::new(None),
            events: broadcast::channel(256).0,
        })
    }

    /// The pool store, shared with the plugins' `kvp-store` import.
    pub fn store(&self) -> PoolHandle {
        self.pools.clone()
    }

    /// Installs the plugin-provided Guest-pool keys (replacing the previous set at once).
    pub fn set_guest_keys(&self, keys: GuestKeys) {
        *self.guest_keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(keys));
    }

    fn guest_keys(&self) -> Option<Arc<GuestKeys>> {
        self.guest_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Host SET/DELETE notifications (every pool; filter on [`HostKvpEvent::pool`]).
    pub fn subscribe(&self) -> broadcast::Receiver<HostKvpEvent> {
        self.events.subscribe()
    }

    /// The `IntegrationServicesVersion` value (the kernel's REGISTER1 answer, `"3.1"` on VMBus).
    pub fn set_integration_services_version(&self, version: &[u8]) {
        *self.lic_version.lock().unwrap_or_else(|p| p.into_inner()) =
            version[..version.len().min(MAX_VALUE_SIZE - 1)].to_vec();
    }

    /// The OS facts reported in the Auto pool.
    pub fn os_info(&self) -> &OsInfo {
        &self.os
    }

    /// Overrides the cached FQDN (tests; the real value is resolved once at start).
    pub fn set_fully_qualified_domain_name(&mut self, fqdn: String) {
        self.fqdn = fqdn;
    }

    /// Answers one request in place (see the module docs). The caller handles REGISTER1.
    pub async fn execute(&self, msg: &mut DaemonMessage) -> KvpOutcome {
        let operation = KvpOperation(msg[layout::OPERATION]);
        let pool_byte = msg[layout::POOL];
        dm::set_error(&mut msg[..], 0);
        let status = self.dispatch(operation, pool_byte, msg).await;
        if status != 0 {
            dm::set_error(&mut msg[..], status);
        }
        tracing::debug!(op = %operation, pool = pool_byte, status = format_args!("{status:#x}"), "KVP request");
        KvpOutcome {
            operation,
            pool: pool_byte,
            status,
        }
    }

    async fn dispatch(&self, op: KvpOperation, pool_byte: u8, msg: &mut DaemonMessage) -> u32 {
        match op {
            KvpOperation::GET_IP_INFO | KvpOperation::SET_IP_INFO => {
                let net = self.net.clone();
                let mut copy = Box::new(*msg);
                let job = tokio::task::spawn_blocking(move || {
                    let s = if op == KvpOperation::GET_IP_INFO {
                        ipinfo::get_ip_info(&net, &mut copy[..])
                    } else {
                        ipinfo::set_ip_info(&net, &mut copy[..])
                    };
                    (s, copy)
                });
                match job.await {
                    Ok((s, copy)) => {
                        *msg = *copy;
                        s
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "KVP {op}: worker failed");
                        HV_E_FAIL
                    }
                }
            }
            KvpOperation::SET
            | KvpOperation::GET
            | KvpOperation::DELETE
            | KvpOperation::ENUMERATE => {
                if op == KvpOperation::ENUMERATE && pool_byte == Pool::Auto as u8 {
                    return self.enumerate_auto(msg);
                }
                let Some(pool) = Pool::from_number(pool_byte) else {
                    hvisd_protocol::throttled!(warn, op = %op, pool = pool_byte, "KVP request for pool {pool_byte}: pools are 0-4; answering HV_INVALIDARG");
                    return HV_INVALIDARG;
                };
                let result = match op {
                    KvpOperation::SET => self.set(pool, msg).await,
                    KvpOperation::GET => self.get(pool, msg).await,
                    KvpOperation::DELETE => self.delete(pool, msg).await,
                    _ => self.enumerate(pool, msg).await,
                };
                result.unwrap_or_else(|e| match e {
                    StoreError::PoolFull { .. } => {
                        hvisd_protocol::throttled!(
                            warn,
                            "KVP {op}: {e}; answering HV_ERROR_DISK_FULL"
                        );
                        HV_ERROR_DISK_FULL
                    }
                    e => {
                        hvisd_protocol::throttled!(
                            error,
                            "KVP {op} on pool {pool}: {e}; answering HV_E_FAIL"
                        );
                        HV_E_FAIL
                    }
                })
            }
            // The C daemon answers any other operation (including a late REGISTER1) with error 0.
            _ => 0,
        }
    }

    fn key_arg(op: KvpOperation, size: u32, limit_status: u32) -> Result<usize, u32> {
        if size == 0 {
            hvisd_protocol::throttled!(warn, "KVP {op}: key_size is 0; answering HV_INVALIDARG");
            return Err(HV_INVALIDARG);
        }
        if size as usize > MAX_KEY_SIZE {
            hvisd_protocol::throttled!(warn, "KVP {op}: key is {size} bytes, limit {MAX_KEY_SIZE}");
            return Err(limit_status);
        }
        Ok(size as usize)
    }

    /// `key_size` and `value_size` of a GET/SET, checked as `kvp_key_add_or_modify` and
    /// `kvp_get_value` check them (past the fields: HV_S_CONT), plus key_size 0.
    fn exchange_sizes(op: KvpOperation, msg: &DaemonMessage) -> Result<(usize, usize), u32> {
        let ks = Self::key_arg(op, dm::msg_u32::<{ layout::SET_KEY_SIZE }>(msg), HV_S_CONT)?;
        let value_size = dm::msg_u32::<{ layout::SET_VALUE_SIZE }>(msg);
        if value_size as usize > MAX_VALUE_SIZE {
            hvisd_protocol::throttled!(
                warn,
                "KVP {op}: value_size {value_size}, limit {MAX_VALUE_SIZE}"
            );
            return Err(HV_S_CONT);
        }
        Ok((ks, value_size as usize))
    }

    async fn set(&self, pool: Pool, msg: &mut DaemonMessage) -> Result<u32, StoreError> {
        let (ks, vs) = match Self::exchange_sizes(KvpOperation::SET, msg) {
            Ok(sizes) => sizes,
            Err(status) => return Ok(status),
        };
        let key = msg[layout::SET_KEY..layout::SET_KEY + ks].to_vec();
        let value = msg[layout::SET_VALUE..layout::SET_VALUE + vs].to_vec();
        let (k, v) = (key.clone(), value.clone());
        self.pools
            .update(pool, move |records| {
                match records.position(|r| r.key_field()[..ks] == k[..]) {
                    // Modify: only the first value_size bytes change, as the C memcpy does.
                    Some(i) => {
                        records[i].value_field_mut()[..vs].copy_from_slice(&v);
                        ((), Change::Modified(i))
                    }
                    None => {
                        let mut r = Record::new(&[], &[]);
                        r.key_field_mut()[..ks].copy_from_slice(&k);
                        r.value_field_mut()[..vs].copy_from_slice(&v);
                        records.push(r);
                        ((), Change::Appended)
                    }
                }
            })
            .await?;
        let _ = self.events.send(HostKvpEvent {
            pool,
            key: String::from_utf8_lossy(dm::cstr(&key)).into_owned(),
            value: Some(String::from_utf8_lossy(dm::cstr(&value)).into_owned()),
        });
        Ok(0)
    }

    async fn get(&self, pool: Pool, msg: &mut DaemonMessage) -> Result<u32, StoreError> {
        let (ks, vs) = match Self::exchange_sizes(KvpOperation::GET, msg) {
            Ok(sizes) => sizes,
            Err(status) => return Ok(status),
        };
        let key = msg[layout::SET_KEY..layout::SET_KEY + ks].to_vec();
        let guest_keys = self.guest_keys().filter(|_| pool == Pool::Guest);
        if let Some(gk) = guest_keys
            && let Some(owned) = gk
                .keys()
                .find(|k| Record::new(k.as_bytes(), b"").key_field()[..ks] == key[..])
        {
            let owned = owned.to_string();
            return Ok(match gk.value(owned.as_bytes()).await {
                Some(v) => {
                    let r = Record::new(owned.as_bytes(), v.as_bytes());
                    msg[layout::SET_VALUE..layout::SET_VALUE + vs]
                        .copy_from_slice(&r.value_field()[..vs]);
                    0
                }
                None => HV_S_CONT,
            });
        }
        let found = self
            .pools
            .read(pool, move |records| {
                records
                    .iter()
                    .find(|r| r.key_field()[..ks] == key[..])
                    .cloned()
            })
            .await?;
        Ok(match found {
            Some(r) => {
                msg[layout::SET_VALUE..layout::SET_VALUE + vs]
                    .copy_from_slice(&r.value_field()[..vs]);
                0
            }
            None => HV_S_CONT,
        })
    }

    async fn delete(&self, pool: Pool, msg: &mut DaemonMessage) -> Result<u32, StoreError> {
        let key_size = dm::msg_u32::<{ layout::DELETE_KEY_SIZE }>(msg);
        let ks = match Self::key_arg(KvpOperation::DELETE, key_size, HV_S_CONT) {
            Ok(k) => k,
            Err(s) => return Ok(s),
        };
        let key = msg[layout::DELETE_KEY..layout::DELETE_KEY + ks].to_vec();
        let k = key.clone();
        let deleted = self
            .pools
            .update(pool, move |records| {
                let Some(i) = records.position(|r| r.key_field()[..ks] == k[..]) else {
                    return (false, Change::None);
                };
                // The C daemon shifts the following records up with strcpy: only the bytes up to
                // each NUL move, the rest of the slot keeps the previous occupant's bytes.
                for j in i..records.len() - 1 {
                    let (k, v) = (
                        records[j + 1].key().to_vec(),
                        records[j + 1].value().to_vec(),
                    );
                    dm::strcpy_field(records[j].key_field_mut(), &k);
                    dm::strcpy_field(records[j].value_field_mut(), &v);
                }
                records.pop();
                (true, Change::Removed(i))
            })
            .await?;
        if !deleted {
            return Ok(HV_S_CONT);
        }
        let _ = self.events.send(HostKvpEvent {
            pool,
            key: String::from_utf8_lossy(dm::cstr(&key)).into_owned(),
            value: None,
        });
        Ok(0)
    }

    async fn enumerate(&self, pool: Pool, msg: &mut DaemonMessage) -> Result<u32, StoreError> {
        let index = dm::msg_u32::<{ layout::ENUM_INDEX }>(msg);
        if index > i32::MAX as u32 {
            hvisd_protocol::throttled!(
                warn,
                index,
                "KVP ENUMERATE: index past 2^31 (the C daemon would read before its array); answering HV_S_CONT"
            );
            return Ok(HV_S_CONT);
        }
        let index = index as usize;
        let guest_keys = if pool == Pool::Guest {
            self.guest_keys()
        } else {
            None
        };
        // Either a file record (or none), or an index into the plugin keys that follow them.
        let found: Result<Option<Record>, (usize, Arc<GuestKeys>)> = self
            .pools
            .read(pool, move |records| match guest_keys {
                None => Ok(records.get(index).cloned()),
                Some(gk) => {
                    let n = records.iter().filter(|r| !gk.owns(r.key())).count();
                    if index < n {
                        Ok(records
                            .iter()
                            .filter(|r| !gk.owns(r.key()))
                            .nth(index)
                            .cloned())
                    } else {
                        Err((index - n, gk))
                    }
                }
            })
            .await?;
        let record = match found {
            Ok(r) => r,
            Err((plugin_index, gk)) => gk
                .snapshot()
                .await
                .get(plugin_index)
                .map(|(k, v)| Record::new(k.as_bytes(), v.as_bytes())),
        };
        Ok(match record {
            Some(r) => {
                msg[layout::ENUM_KEY..layout::ENUM_KEY + MAX_KEY_SIZE]
                    .copy_from_slice(r.key_field());
                msg[layout::ENUM_VALUE..layout::ENUM_VALUE + MAX_VALUE_SIZE]
                    .copy_from_slice(r.value_field());
                0
            }
            None => HV_S_CONT,
        })
    }

    fn enumerate_auto(&self, msg: &mut DaemonMessage) -> u32 {
        let index = dm::msg_u32::<{ layout::ENUM_INDEX }>(msg);
        let Some(&name) = intrinsic::INTRINSIC_KEYS.get(index as usize) else {
            return HV_S_CONT;
        };
        let value_field = &mut msg[layout::ENUM_VALUE..layout::ENUM_VALUE + MAX_VALUE_SIZE];
        let lic_version = self
            .lic_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let text = match index {
            0 => Some(self.fqdn.as_bytes()),
            1 => Some(&lic_version[..]),
            2 | 3 => {
                ipinfo::enumerate_addresses(index == 3, value_field);
                None
            }
            4 => Some(self.os.os_build.as_bytes()),
            5 => Some(self.os.os_name.as_bytes()),
            6 => Some(self.os.os_major.as_bytes()),
            7 => Some(self.os.os_minor.as_bytes()),
            8 => Some(self.os.os_version.as_bytes()),
            _ => Some(self.os.processor_arch.as_bytes()),
        };
        if let Some(text) = text {
            dm::strcpy_field(value_field, text);
        }
        dm::strcpy_field(
            &mut msg[layout::ENUM_KEY..layout::ENUM_KEY + MAX_KEY_SIZE],
            name.as_bytes(),
        );
        0
    }
}
