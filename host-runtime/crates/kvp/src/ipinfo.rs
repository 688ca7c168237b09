//! GET_IP_INFO, SET_IP_INFO and the Auto pool's address keys, written against the daemon message
//! buffer exactly as `hv_kvp_daemon` writes it (`strcpy`/`strcat` into fixed fields, the same
//! offsets arithmetic, the same external commands), so the reply bytes match the C daemon's.
//!
//! SET_IP_INFO hands what the host sent to `hv_set_ifconfig`, whose distribution versions source
//! the ifcfg file as shell or feed it to `ifup`/NetworkManager, as root. So nothing the host sent
//! is written unless it is well formed, and the whole request is checked before anything is
//! written or run:
//!
//! * every `ip_addr`, `gate_way` and `dns_addr` entry parses as an IPv4 or IPv6 address
//!   (`std::net`, which like `inet_pton` takes no leading zeros, zones or spaces inside);
//! * every `sub_net` entry is a contiguous dotted IPv4 mask, an IPv6 prefix length (1 to 3 digits,
//!   0 to 128, what the keyfile code's `atoi` reads), or an IPv6 address (which `hv_kvp_daemon`
//!   also accepts there);
//! * the interface name from sysfs is 1 to 15 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`,
//!   without `..`; its MAC address is 6 to 32 hex pairs separated by `:`.
//!
//! A request failing any check is refused with one log line naming the field and showing the
//! value escaped. Where `hv_kvp_daemon` itself refuses (an address that is not one:
//! `HV_INVALIDARG`; an IPv4 address whose subnet is not dotted: `0xffffffff`) hvisd answers the
//! same status; what the C daemon would have written (a netmask that is not a mask, an odd
//! interface name or MAC) is `HV_E_FAIL`. The ifcfg and keyfile are then written atomically (a
//! temporary created with `O_EXCL|O_NOFOLLOW` in the same directory, `fsync`, `rename`), so a
//! symlink planted at either name is replaced, never followed, and `hv_set_ifconfig` runs under
//! [`script::run`]'s deadline. The helpers GET_IP_INFO runs (`ip`, `hv_get_dns_info`,
//! `hv_get_dhcp_info`) have deadlines too; one that fails gives no data, as a `popen` child that
//! prints nothing does for the C daemon.
//!
//! Other differences, where the C code overflows a buffer: strings are cut at their field's end,
//! and a SET_IP_INFO entry of 46 characters or more is refused with `HV_INVALIDARG`. The crate
//! README lists all of them.

use hvisd_protocol::ic::status::{HV_E_FAIL, HV_GUID_NOTFOUND, HV_INVALIDARG};
use hvisd_protocol::kvp::{ADDR_FAMILY_IPV4, ADDR_FAMILY_IPV6};
use hvisd_protocol::kvp_daemon::{self as dm, GATEWAY_FIELD, IP_FIELD, layout};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};

use crate::script::{self, ScriptError, escape_for_log};
use hvisd_sys::net as sys;

/// Where network facts come from and where SET_IP_INFO writes (tests point these at temp dirs).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Interfaces directory, default `/sys/class/net`.
    pub sysfs_net_dir: PathBuf,
    /// Directory for `ifcfg-<if>` and `<if>.nmconnection`, default `/var/lib/hyperv`.
    pub config_dir: PathBuf,
    /// `hv_set_ifconfig`, run with the two file paths; default
    /// `/usr/libexec/hypervkvpd/hv_set_ifconfig`. Must be an absolute path.
    pub set_ifconfig_script: PathBuf,
    /// `hv_get_dns_info`, run without arguments; one server per output line.
    pub get_dns_info_script: PathBuf,
    /// `hv_get_dhcp_info <if>`; output starting with `Enabled` means DHCP.
    pub get_dhcp_info_script: PathBuf,
    /// The `ip` command used for default gateways: an absolute path, or `None` for the first of
    /// [`IP_COMMAND_CANDIDATES`] that exists. Never looked up through `PATH`.
    pub ip_command: Option<PathBuf>,
    /// How long `hv_set_ifconfig` may run before its process group is killed (default 30 s).
    pub set_ifconfig_timeout: Duration,
    /// How long each of `ip`, `hv_get_dns_info` and `hv_get_dhcp_info` may run (default 5 s).
    pub get_info_timeout: Duration,
    /// Bytes of stdout (and of stderr) kept from each helper program; the rest is dropped
    /// (default [`script::DEFAULT_MAX_OUTPUT`], 64 KiB).
    pub max_script_output: usize,
}

/// Where the `ip` command is looked for when [`NetConfig::ip_command`] is `None`, in this order.
pub const IP_COMMAND_CANDIDATES: [&str; 4] = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];

impl Default for NetConfig {
    fn default() -> Self {
        let scripts = Path::new("/usr/libexec/hypervkvpd");
        NetConfig {
            sysfs_net_dir: "/sys/class/net".into(),
            config_dir: "/var/lib/hyperv".into(),
            set_ifconfig_script: scripts.join("hv_set_ifconfig"),
            get_dns_info_script: scripts.join("hv_get_dns_info"),
            get_dhcp_info_script: scripts.join("hv_get_dhcp_info"),
            ip_command: None,
            set_ifconfig_timeout: Duration::from_secs(30),
            get_info_timeout: Duration::from_secs(5),
            max_script_output: script::DEFAULT_MAX_OUTPUT,
        }
    }
}

impl NetConfig {
    /// The `ip` command to run: the configured one, else the first candidate that exists.
    fn ip_command(&self) -> Option<PathBuf> {
        self.ip_command.clone().or_else(|| {
            IP_COMMAND_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
    }
}

const INET_ADDRSTRLEN: usize = 16;
const INET6_ADDRSTRLEN: usize = 46;
const CFG_HEADER: &str = "# Generated by Hyper-V key-value pair daemon. Please do not modify.\n";
/// Mode of the written ifcfg and keyfile: what the C daemon's `fopen("w")` gives under the usual
/// umask 022, here independent of the umask. `hv_set_ifconfig` copies them where they are used
/// (NetworkManager's copy gets 0600 there).
const CONFIG_FILE_MODE: u32 = 0o644;
/// Longest interface name Linux allows (`IFNAMSIZ` - 1).
const MAX_IF_NAME: usize = 15;
/// Escaped values in log lines are cut to this many characters.
const LOG_VALUE_CHARS: usize = 80;

fn strlen(f: &[u8]) -> usize {
    f.iter().position(|&c| c == 0).unwrap_or(f.len())
}

fn strcpy(f: &mut [u8], s: &[u8]) {
    dm::strcpy_field(f, s);
}

fn strcat(f: &mut [u8], s: &[u8]) {
    let at = strlen(f);
    if at < f.len() {
        dm::strcpy_field(&mut f[at..], s);
    }
}

/// `kvp_process_ip_address`: appends `addr` to `buf` (`;`-separated) if `length - offset` leaves
/// room for a maximal address.
fn process_ip_address(
    addr: &str,
    v6: bool,
    buf: &mut [u8],
    length: usize,
    offset: &mut usize,
) -> u32 {
    let addr_length = if v6 {
        INET6_ADDRSTRLEN
    } else {
        INET_ADDRSTRLEN
    };
    if (length as i64 - *offset as i64) < (addr_length + 2) as i64 {
        return HV_E_FAIL;
    }
    if *offset == 0 {
        strcpy(buf, addr.as_bytes());
    } else {
        strcat(buf, b";");
        strcat(buf, addr.as_bytes());
    }
    *offset += addr.len() + 1;
    0
}

/// The Auto-pool `NetworkAddressIPv4`/`IPv6` value: written into the 2048-byte value field as
/// `kvp_get_ip_info(family, NULL, KVP_OP_ENUMERATE, ...)` does (left unchanged if there is none).
pub fn enumerate_addresses(v6: bool, value: &mut [u8]) {
    let addrs = match sys::getifaddrs() {
        Ok(a) => a,
        Err(_) => {
            strcpy(value, b"getifaddrs failed\n");
            return;
        }
    };
    let family = if v6 { sys::AF_INET6 } else { sys::AF_INET };
    let mut offset = 0;
    for a in addrs
        .iter()
        .filter(|a| a.family == family && a.flags & sys::IFF_LOOPBACK == 0)
    {
        if process_ip_address(&a.addr, v6, value, 2048, &mut offset) != 0 {
            break;
        }
    }
}

/// The lines `fgets(buf, 256, ...)` would return.
fn fgets_chunks(out: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    for line in out.split_inclusive(|&c| c == b'\n') {
        lines.extend(line.chunks(255));
    }
    lines
}

/// `kvp_process_ipconfig_file`: appends each line of output and a `;` while room remains.
fn process_ipconfig_output(out: &[u8], buf: &mut [u8], element_size: usize, offset: usize) {
    if offset == 0 {
        buf.fill(0);
    }
    let len = buf.len();
    for line in fgets_chunks(out) {
        if len < strlen(buf) + element_size + 1 {
            break;
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = &line[..strlen(line)];
        strcat(buf, line);
        strcat(buf, b";");
    }
}

/// `awk '/default/ {print $3 }'`.
fn default_gateways(route_output: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(route_output);
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains("default")) {
        out.extend_from_slice(line.split_whitespace().nth(2).unwrap_or("").as_bytes());
        out.push(b'\n');
    }
    out
}

/// What the helper programs print for one interface. The C daemon runs them again for every
/// address of the interface and rewrites the same fields each time; running them once per request
/// and applying the output each time gives the same bytes with a quarter of the processes, and
/// bounds a GET by four deadlines.
struct IpConfigQueries {
    gateways_v4: Vec<u8>,
    gateways_v6: Vec<u8>,
    dns: Vec<u8>,
    dhcp: Vec<u8>,
}

impl IpConfigQueries {
    fn run(cfg: &NetConfig, if_name: &str) -> IpConfigQueries {
        if let Err(why) = check_interface_name(if_name) {
            tracing::warn!(
                interface = %escape_for_log(if_name.as_bytes(), LOG_VALUE_CHARS),
                "KVP GET_IP_INFO: interface name {why}; no gateway, DNS or DHCP data for it"
            );
            return IpConfigQueries {
                gateways_v4: Vec::new(),
                gateways_v6: Vec::new(),
                dns: Vec::new(),
                dhcp: Vec::new(),
            };
        }
        let ip = cfg.ip_command();
        if ip.is_none() {
            tracing::warn!(candidates = ?IP_COMMAND_CANDIDATES, "KVP GET_IP_INFO: no ip command; no gateway data");
        }
        let route = |args: &[&str]| match &ip {
            Some(ip) => default_gateways(&query_output(cfg, ip, args)),
            None => Vec::new(),
        };
        IpConfigQueries {
            gateways_v4: route(&["route", "show", "dev", if_name]),
            gateways_v6: route(&["-f", "inet6", "route", "show", "dev", if_name]),
            dns: query_output(cfg, &cfg.get_dns_info_script, &[]),
            dhcp: query_output(cfg, &cfg.get_dhcp_info_script, &[if_name]),
        }
    }
}

/// A helper's stdout whatever its exit status (as `popen` reads it); nothing if it cannot run or
/// misses its deadline, with a log line.
fn query_output(cfg: &NetConfig, program: &Path, args: &[&str]) -> Vec<u8> {
    match script::run(program, args, cfg.get_info_timeout, cfg.max_script_output) {
        Ok(o) => o.stdout,
        Err(e) => {
            tracing::warn!(error = %e, "KVP GET_IP_INFO: helper gave no data");
            Vec::new()
        }
    }
}

/// `kvp_get_ipconfig_info`: gateways, DNS servers and DHCP state into the message.
fn get_ipconfig_info(q: &IpConfigQueries, msg: &mut [u8]) {
    let gw = layout::IP_GATEWAY..layout::IP_GATEWAY + GATEWAY_FIELD;
    process_ipconfig_output(&q.gateways_v4, &mut msg[gw.clone()], INET_ADDRSTRLEN, 0);
    process_ipconfig_output(&q.gateways_v6, &mut msg[gw], INET6_ADDRSTRLEN, 1);
    process_ipconfig_output(
        &q.dns,
        &mut msg[layout::IP_DNS..layout::IP_DNS + IP_FIELD],
        INET_ADDRSTRLEN,
        0,
    );
    if let Some(first) = fgets_chunks(&q.dhcp).first().filter(|l| !l.is_empty()) {
        msg[layout::IP_DHCP] = u8::from(first.starts_with(b"Enabled"));
    }
}

/// `kvp_get_ip_info(0, if_name, KVP_OP_GET_IP_INFO, ...)`.
fn get_ip_info_for(cfg: &NetConfig, if_name: &str, msg: &mut [u8]) -> u32 {
    let ip = layout::IP_ADDR..layout::IP_ADDR + IP_FIELD;
    let sn = layout::IP_SUBNET..layout::IP_SUBNET + IP_FIELD;
    msg[layout::IP_ADDR_FAMILY] = 0;
    let addrs = match sys::getifaddrs() {
        Ok(a) => a,
        Err(_) => {
            strcpy(&mut msg[ip], b"getifaddrs failed\n");
            return HV_E_FAIL;
        }
    };
    let mut queries: Option<IpConfigQueries> = None;
    let (mut offset, mut sn_offset, mut error) = (0usize, 0usize, 0u32);
    for a in addrs
        .iter()
        .filter(|a| a.name.starts_with(if_name) && a.flags & sys::IFF_LOOPBACK == 0)
    {
        let v6 = a.family == sys::AF_INET6;
        'info: {
            if !v6 {
                msg[layout::IP_ADDR_FAMILY] |= ADDR_FAMILY_IPV4;
                let Some(mask) = &a.netmask_v4 else {
                    break 'info;
                };
                error = process_ip_address(mask, false, &mut msg[sn.clone()], 2048, &mut sn_offset);
                if error != 0 {
                    break 'info;
                }
            } else {
                msg[layout::IP_ADDR_FAMILY] |= ADDR_FAMILY_IPV6;
                let cidr = format!("/{}", a.prefix_v6.unwrap_or(0));
                if 2048 < sn_offset + cidr.len() + 1 {
                    break 'info;
                }
                let field = &mut msg[sn.clone()];
                if sn_offset == 0 {
                    strcpy(field, cidr.as_bytes());
                } else {
                    strcat(field, b";");
                    strcat(field, cidr.as_bytes());
                }
                // The C daemon adds the length of the whole accumulated string here, not of the
                // piece just added; kept, since it decides when the field counts as full.
                sn_offset += strlen(field) + 1;
            }
            let q = queries.get_or_insert_with(|| IpConfigQueries::run(cfg, if_name));
            get_ipconfig_info(q, msg);
        }
        error = process_ip_address(&a.addr, v6, &mut msg[ip.clone()], 2048, &mut offset);
        if error != 0 {
            break;
        }
    }
    error
}

fn first_line(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let first = fgets_chunks(&bytes).first().map(|l| l.to_vec())?;
    Some(
        first
            .strip_suffix(b"\n")
            .map(<[u8]>::to_vec)
            .unwrap_or(first),
    )
}

fn sysfs_entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// GET_IP_INFO (`kvp_mac_to_ip`): finds the interface whose upper-cased sysfs `address` equals
/// `adapter_id` and fills the message's IP fields. Returns the daemon's error value.
pub fn get_ip_info(cfg: &NetConfig, msg: &mut [u8]) -> u32 {
    let mac = dm::cstr(&msg[layout::IP_ADAPTER_ID..layout::IP_ADAPTER_ID + dm::ADAPTER_ID_FIELD])
        .to_vec();
    let mut error = HV_E_FAIL;
    for name in sysfs_entries(&cfg.sysfs_net_dir) {
        let Some(mut addr) = first_line(&cfg.sysfs_net_dir.join(&name).join("address")) else {
            continue;
        };
        addr.make_ascii_uppercase();
        if addr[..strlen(&addr)] != mac[..] {
            continue;
        }
        error = get_ip_info_for(cfg, &name, msg);
        if error == 0 && strlen(&msg[layout::IP_ADDR..layout::IP_ADDR + IP_FIELD]) > 0 {
            break;
        }
    }
    error
}

/// The four list fields of a SET_IP_INFO request, named as in `hv_kvp_ipaddr_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IpField {
    /// `ip_addr`: addresses.
    Address,
    /// `sub_net`: one netmask or prefix length per address.
    Netmask,
    /// `gate_way`: gateways.
    Gateway,
    /// `dns_addr`: DNS servers.
    Dns,
}

impl std::fmt::Display for IpField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpField::Address => "ip_addr",
            IpField::Netmask => "sub_net",
            IpField::Gateway => "gate_way",
            IpField::Dns => "dns_addr",
        })
    }
}

/// Why a SET_IP_INFO request was not carried out; [`SetIpInfoError::status`] is the answer.
#[derive(Debug, thiserror::Error)]
enum SetIpInfoError {
    /// No interface's `device/device_id` is the adapter id.
    #[error("KVP SET_IP_INFO: no interface in {} has device_id \"{adapter}\"", dir.display())]
    NoInterface {
        /// The sysfs directory searched.
        dir: PathBuf,
        /// The adapter id, escaped.
        adapter: String,
    },
    /// The matching interface's name is not one hvisd writes into paths and files.
    #[error("KVP SET_IP_INFO: interface name \"{name}\" (from {}) refused: {why}", dir.display())]
    InterfaceName {
        /// The name, escaped.
        name: String,
        /// The sysfs directory it was listed in.
        dir: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The interface's sysfs `address` cannot be read.
    #[error("KVP SET_IP_INFO: cannot read the MAC address of {if_name} ({})", path.display())]
    NoMac {
        /// The interface.
        if_name: String,
        /// The file read.
        path: PathBuf,
    },
    /// The interface's sysfs `address` is not a MAC address.
    #[error(
        "KVP SET_IP_INFO: MAC address \"{mac}\" of {if_name} refused: not hex pairs separated by ':'"
    )]
    Mac {
        /// The interface.
        if_name: String,
        /// The address, escaped.
        mac: String,
    },
    /// An entry of one of the four list fields is not well formed.
    #[error("KVP SET_IP_INFO from host: {field} entry \"{value}\" refused: {why}")]
    Value {
        /// The field.
        field: IpField,
        /// The entry, escaped and cut.
        value: String,
        /// What is wrong with it.
        why: &'static str,
        /// The answer: the C daemon's where it refuses the same entry, else `HV_E_FAIL`.
        status: u32,
    },
    /// An IPv4 address whose subnet entry is not a dotted mask: `kvp_subnet_to_plen` returns -1,
    /// which the C daemon sends as the status.
    #[error(
        "KVP SET_IP_INFO from host: IPv4 address \"{addr}\" has subnet \"{subnet}\", not a dotted mask (answered 0xffffffff as hv_kvp_daemon does)"
    )]
    SubnetNotDotted {
        /// The address.
        addr: String,
        /// Its subnet entry.
        subnet: String,
    },
    /// Writing a configuration file failed.
    #[error("KVP SET_IP_INFO: cannot write {}: {source}", path.display())]
    Write {
        /// The file (or directory) being written.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `hv_set_ifconfig` could not run, failed or missed its deadline.
    #[error("KVP SET_IP_INFO: {0}")]
    Script(#[from] ScriptError),
}

impl SetIpInfoError {
    /// The status the host is answered with.
    fn status(&self) -> u32 {
        match self {
            SetIpInfoError::NoInterface { .. } => HV_GUID_NOTFOUND,
            SetIpInfoError::Value { status, .. } => *status,
            SetIpInfoError::SubnetNotDotted { .. } => u32::MAX,
            SetIpInfoError::InterfaceName { .. }
            | SetIpInfoError::NoMac { .. }
            | SetIpInfoError::Mac { .. }
            | SetIpInfoError::Write { .. }
            | SetIpInfoError::Script(_) => HV_E_FAIL,
        }
    }

    /// The one log line for this outcome.
    fn log(&self) {
        match self {
            SetIpInfoError::NoInterface { .. } => tracing::info!("{self}"),
            SetIpInfoError::Write { .. } | SetIpInfoError::Script(_) => tracing::error!("{self}"),
            _ => tracing::warn!("{self}"),
        }
    }
}

/// SET_IP_INFO: maps the adapter GUID to an interface (`device/device_id` in sysfs), checks every
/// value (module docs), writes the ifcfg and NetworkManager keyfile into `config_dir` atomically
/// and runs `hv_set_ifconfig` with both paths under its deadline. Returns the daemon's error value
/// (`HV_GUID_NOTFOUND` when no interface matches); every failure is logged once.
pub fn set_ip_info(cfg: &NetConfig, msg: &mut [u8]) -> u32 {
    match set_ip_info_inner(cfg, msg) {
        Ok(()) => 0,
        Err(e) => {
            e.log();
            e.status()
        }
    }
}

fn set_ip_info_inner(cfg: &NetConfig, msg: &mut [u8]) -> Result<(), SetIpInfoError> {
    let guid = dm::cstr(&msg[layout::IP_ADAPTER_ID..layout::IP_ADAPTER_ID + dm::ADAPTER_ID_FIELD])
        .to_vec();
    let if_name = sysfs_entries(&cfg.sysfs_net_dir)
        .into_iter()
        .find(|name| {
            first_line(&cfg.sysfs_net_dir.join(name).join("device/device_id"))
                .is_some_and(|id| id[..strlen(&id)] == guid[..])
        })
        .ok_or_else(|| SetIpInfoError::NoInterface {
            dir: cfg.sysfs_net_dir.clone(),
            adapter: escape_for_log(&guid, LOG_VALUE_CHARS),
        })?;
    check_interface_name(&if_name).map_err(|why| SetIpInfoError::InterfaceName {
        name: escape_for_log(if_name.as_bytes(), LOG_VALUE_CHARS),
        dir: cfg.sysfs_net_dir.clone(),
        why,
    })?;
    let mac_path = cfg.sysfs_net_dir.join(&if_name).join("address");
    let mut mac = first_line(&mac_path).ok_or_else(|| SetIpInfoError::NoMac {
        if_name: if_name.clone(),
        path: mac_path.clone(),
    })?;
    mac.truncate(strlen(&mac));
    mac.make_ascii_uppercase();
    let mac = parse_mac(&mac).ok_or_else(|| SetIpInfoError::Mac {
        if_name: if_name.clone(),
        mac: escape_for_log(&mac, LOG_VALUE_CHARS),
    })?;
    let files = build_config(&if_name, &mac, msg)?;
    let ifcfg_name = format!("ifcfg-{if_name}");
    let nm_name = format!("{if_name}.nmconnection");
    write_files_atomically(
        &cfg.config_dir,
        &[
            (ifcfg_name.as_str(), files.ifcfg.as_bytes()),
            (nm_name.as_str(), files.keyfile.as_bytes()),
        ],
    )?;
    let ifcfg_path = cfg.config_dir.join(&ifcfg_name);
    let nm_path = cfg.config_dir.join(&nm_name);
    let out = script::run(
        &cfg.set_ifconfig_script,
        &[ifcfg_path.as_os_str(), nm_path.as_os_str()],
        cfg.set_ifconfig_timeout,
        cfg.max_script_output,
    )?;
    out.require_success(&cfg.set_ifconfig_script)?;
    Ok(())
}

/// Interface names hvisd puts into file names, file contents and helper arguments: 1 to 15 bytes
/// of ASCII letters, digits, `_`, `.` and `-`, not starting with `.` or `-` and without `..` (so
/// never `.`, `..`, a hidden file or an option). Every name Hyper-V guests use (`eth0`, `enP1234s1`, `enx...`) is
/// one. `Err` says what is wrong.
fn check_interface_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_IF_NAME {
        return Err("not 1 to 15 bytes long");
    }
    if name.starts_with(['.', '-']) || name.contains("..") {
        return Err("starts with '.' or '-', or has '..'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("has a character other than ASCII letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// A MAC address as sysfs prints one (upper-cased here): 6 to 32 pairs of hex digits separated
/// by `:` (Ethernet has 6, InfiniBand 20).
fn parse_mac(mac: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(mac).ok()?;
    let pairs = text.split(':');
    let mut n = 0;
    for pair in pairs {
        if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        n += 1;
    }
    (6..=32).contains(&n).then(|| text.to_owned())
}

/// One entry of a list field, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IpEntry {
    /// An IPv4 address (or, in `sub_net`, a contiguous mask), as the host wrote it.
    V4(String),
    /// An IPv6 address as the host wrote it, and its 8-group expansion for the ifcfg file.
    V6(String, String),
    /// A `sub_net` IPv6 prefix length as the host wrote it.
    Prefix(String),
}

/// `parse_ip_val_buffer`: the next `;`-separated piece, leading spaces dropped. Like the C code it
/// replaces the `;` it stops at by a NUL in the message (visible in the reply bytes), and an empty
/// piece ends the list. A piece of 46 bytes or more (which overflows the C daemon's buffer) is
/// refused with `HV_INVALIDARG`.
fn next_piece(
    field: &mut [u8],
    offset: &mut usize,
    which: IpField,
) -> Result<Option<Vec<u8>>, SetIpInfoError> {
    let Some(start) = field.get_mut(*offset..) else {
        return Ok(None);
    };
    let len = strlen(start);
    let end = match start[..len].iter().position(|&c| c == b';') {
        Some(p) => {
            start[p] = 0;
            p
        }
        None => len,
    };
    if end == 0 {
        return Ok(None);
    }
    let piece = &start[..end];
    let skip = piece.iter().take_while(|&&c| c == b' ').count();
    let text = &piece[skip..];
    if text.len() >= INET6_ADDRSTRLEN {
        return Err(SetIpInfoError::Value {
            field: which,
            value: escape_for_log(text, LOG_VALUE_CHARS),
            why: "46 characters or more (the C daemon's buffer holds 45)",
            status: HV_INVALIDARG,
        });
    }
    *offset += end + 1;
    Ok(Some(text.to_vec()))
}

/// Checks one piece of `which` (module docs).
fn parse_entry(piece: &[u8], which: IpField) -> Result<IpEntry, SetIpInfoError> {
    let refuse = |why, status| SetIpInfoError::Value {
        field: which,
        value: escape_for_log(piece, LOG_VALUE_CHARS),
        why,
        status,
    };
    let text = std::str::from_utf8(piece).ok();
    if let Some(v4) = text.and_then(|t| t.parse::<Ipv4Addr>().ok()) {
        let bits = u32::from(v4);
        if which == IpField::Netmask && bits.leading_ones() + bits.trailing_zeros() != 32 {
            return Err(refuse("not a contiguous netmask", HV_E_FAIL));
        }
        return Ok(IpEntry::V4(text.unwrap_or_default().to_owned()));
    }
    if let Some(v6) = text.and_then(|t| t.parse::<Ipv6Addr>().ok()) {
        let o = v6.octets();
        let expanded = o
            .chunks(2)
            .map(|g| format!("{:02x}{:02x}", g[0], g[1]))
            .collect::<Vec<_>>()
            .join(":");
        return Ok(IpEntry::V6(text.unwrap_or_default().to_owned(), expanded));
    }
    if which == IpField::Netmask {
        return match text {
            Some(t)
                if (1..=3).contains(&t.len())
                    && t.bytes().all(|b| b.is_ascii_digit())
                    && t.parse::<u8>().is_ok_and(|n| n <= 128) =>
            {
                Ok(IpEntry::Prefix(t.to_owned()))
            }
            _ => Err(refuse(
                "neither a dotted IPv4 mask, an IPv6 prefix length (0-128) nor an IPv6 address",
                HV_E_FAIL,
            )),
        };
    }
    // The C daemon refuses this too (`process_ip_string`), with the same status.
    Err(refuse("not an IPv4 or IPv6 address", HV_INVALIDARG))
}

/// `process_ip_string`: the ifcfg lines for one field, every piece checked.
fn process_ip_string(
    field: &mut [u8],
    which: IpField,
    out: &mut String,
) -> Result<(), SetIpInfoError> {
    let (mut i, mut j) = (0u32, 0u32);
    let mut offset = 0;
    while let Some(piece) = next_piece(field, &mut offset, which)? {
        let (v4, value) = match parse_entry(&piece, which)? {
            IpEntry::V4(addr) => (true, addr),
            IpEntry::V6(_, expanded) => (false, expanded),
            // `expand_ipv6` leaves a NETMASK it cannot parse as it is, under the IPv6 name.
            IpEntry::Prefix(prefix) => (false, prefix),
        };
        let name = match (v4, which) {
            (true, IpField::Address) => "IPADDR",
            (true, IpField::Netmask) => "NETMASK",
            (true, IpField::Gateway) => "GATEWAY",
            (false, IpField::Address) => "IPV6ADDR",
            (false, IpField::Netmask) => "IPV6NETMASK",
            (false, IpField::Gateway) => "IPV6_DEFAULTGW",
            (_, IpField::Dns) => "DNS",
        };
        // The C daemon's numbering: DNS1.. across both families; IPv4 from 0 (a first gateway
        // unnumbered); IPv6 unnumbered first, then _1, _2...
        let sub = if which == IpField::Dns {
            i += 1;
            i.to_string()
        } else if v4 {
            i += 1;
            if which == IpField::Gateway && i == 1 {
                String::new()
            } else {
                (i - 1).to_string()
            }
        } else {
            j += 1;
            if j == 1 {
                String::new()
            } else {
                format!("_{}", j - 1)
            }
        };
        out.push_str(&format!("{name}{sub}={value}\n"));
    }
    Ok(())
}

/// C's `atoi`: optional spaces and sign, then digits up to the first non-digit.
fn atoi(s: &str) -> i64 {
    let t = s.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let n: i64 = digits
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0i64, |acc, d| {
            acc.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        });
    if neg { -n } else { n }
}

/// `process_ip_string_nm`: the keyfile `addressN=` lines of one section; returns whether any was
/// written (the C code derives the `method` from it). Runs after [`process_ip_string`] has
/// checked every piece, so each is an address or a subnet entry already.
fn process_ip_string_nm(
    msg: &mut [u8],
    v6_section: bool,
    out: &mut String,
) -> Result<bool, SetIpInfoError> {
    let ip = layout::IP_ADDR..layout::IP_ADDR + IP_FIELD;
    let sn = layout::IP_SUBNET..layout::IP_SUBNET + IP_FIELD;
    let (mut ip_off, mut sn_off, mut n, mut wrote) = (0usize, 0usize, 0u32, false);
    while let Some(addr) = next_piece(&mut msg[ip.clone()], &mut ip_off, IpField::Address)? {
        let Some(subnet) = next_piece(&mut msg[sn.clone()], &mut sn_off, IpField::Netmask)? else {
            break;
        };
        let subnet = String::from_utf8_lossy(&subnet).into_owned();
        let (addr, plen) = match parse_entry(&addr, IpField::Address)? {
            IpEntry::V4(a) if !v6_section => {
                let Ok(mask) = subnet.parse::<Ipv4Addr>() else {
                    return Err(SetIpInfoError::SubnetNotDotted { addr: a, subnet });
                };
                (a, i64::from(u32::from(mask).leading_ones()))
            }
            IpEntry::V6(a, _) if v6_section => (a, atoi(&subnet)),
            _ => continue,
        };
        n += 1;
        out.push_str(&format!("address{n}={addr}/{plen}\n"));
        wrote = true;
    }
    Ok(wrote)
}

/// `process_dns_gateway_nm`: the keyfile `gateway=`/`dns=` line of one section.
fn process_dns_gateway_nm(
    field: &mut [u8],
    which: IpField,
    v6_section: bool,
    out: &mut String,
) -> Result<(), SetIpInfoError> {
    const OUTSTR_BUF_SIZE: usize = (INET6_ADDRSTRLEN + 1) * 64;
    let mut list = String::new();
    let mut offset = 0;
    while let Some(piece) = next_piece(field, &mut offset, which)? {
        let addr = match parse_entry(&piece, which)? {
            IpEntry::V4(a) if !v6_section => a,
            IpEntry::V6(a, _) if v6_section => a,
            _ => continue,
        };
        if OUTSTR_BUF_SIZE - list.len() > addr.len() + 1 {
            list.push_str(&addr);
            list.push(',');
        }
    }
    if !list.is_empty() {
        list.pop();
        let name = if which == IpField::Dns {
            "dns"
        } else {
            "gateway"
        };
        out.push_str(&format!("{name}={list}\n"));
    }
    Ok(())
}

/// The two files SET_IP_INFO writes.
struct ConfigFiles {
    /// `ifcfg-<if>`.
    ifcfg: String,
    /// `<if>.nmconnection`.
    keyfile: String,
}

/// Both files' text, in the C daemon's order (which decides where it stops and so which `;` of
/// the message become NULs). Nothing is written here.
fn build_config(if_name: &str, mac: &str, msg: &mut [u8]) -> Result<ConfigFiles, SetIpInfoError> {
    let mut ifcfg = String::from(CFG_HEADER);
    let mut nm = String::from(CFG_HEADER);
    ifcfg.push_str(&format!("HWADDR={mac}\nDEVICE={if_name}\n"));
    nm.push_str(&format!(
        "\n[connection]\ninterface-name={if_name}\n\n[ethernet]\nmac-address={mac}\n"
    ));
    let dhcp = msg[layout::IP_DHCP] != 0;
    ifcfg.push_str(if dhcp {
        "BOOTPROTO=dhcp\n"
    } else {
        "BOOTPROTO=none\n"
    });
    let fields = [
        (layout::IP_ADDR, IP_FIELD, IpField::Address),
        (layout::IP_SUBNET, IP_FIELD, IpField::Netmask),
        (layout::IP_GATEWAY, GATEWAY_FIELD, IpField::Gateway),
        (layout::IP_DNS, IP_FIELD, IpField::Dns),
    ];
    for (off, len, which) in fields {
        process_ip_string(&mut msg[off..off + len], which, &mut ifcfg)?;
    }
    for v6 in [false, true] {
        nm.push_str(if v6 { "\n[ipv6]\n" } else { "\n[ipv4]\n" });
        let wrote = process_ip_string_nm(msg, v6, &mut nm)?;
        let method = match (v6, dhcp, wrote) {
            (false, true, _) => "auto",
            (false, false, true) | (true, _, true) => "manual",
            (false, false, false) => "disabled",
            (true, _, false) => "auto",
        };
        nm.push_str(&format!("method={method}\n"));
        process_dns_gateway_nm(
            &mut msg[layout::IP_GATEWAY..layout::IP_GATEWAY + GATEWAY_FIELD],
            IpField::Gateway,
            v6,
            &mut nm,
        )?;
        process_dns_gateway_nm(
            &mut msg[layout::IP_DNS..layout::IP_DNS + IP_FIELD],
            IpField::Dns,
            v6,
            &mut nm,
        )?;
    }
    Ok(ConfigFiles { ifcfg, keyfile: nm })
}

/// A temporary file in the configuration directory, removed on drop unless renamed.
struct Temporary<'d> {
    dir: &'d OwnedFd,
    name: String,
    renamed: bool,
}

impl Drop for Temporary<'_> {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = rustix::fs::unlinkat(self.dir, &self.name, rustix::fs::AtFlags::empty());
        }
    }
}

/// Creates `.<name>.hvisd-tmp.<pid>.<random>` with `O_CREAT|O_EXCL|O_NOFOLLOW` (never an existing
/// file, never through a symlink), writes `contents` and `fsync`s it.
fn write_temporary<'d>(
    dir: &'d OwnedFd,
    dir_path: &Path,
    name: &str,
    contents: &[u8],
) -> Result<Temporary<'d>, SetIpInfoError> {
    let mut attempt = 0;
    let (file, tmp) = loop {
        let mut random = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty());
        let tmp = format!(
            ".{name}.hvisd-tmp.{}.{:016x}",
            std::process::id(),
            u64::from_ne_bytes(random).wrapping_add(attempt)
        );
        match rustix::fs::openat(
            dir,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(CONFIG_FILE_MODE),
        ) {
            Ok(fd) => break (std::fs::File::from(fd), tmp),
            Err(rustix::io::Errno::EXIST) if attempt < 16 => attempt += 1,
            Err(e) => {
                return Err(SetIpInfoError::Write {
                    path: dir_path.join(tmp),
                    source: e.into(),
                });
            }
        }
    };
    let guard = Temporary {
        dir,
        name: tmp,
        renamed: false,
    };
    let write = |f: &std::fs::File| -> std::io::Result<()> {
        let mut f = f;
        f.write_all(contents)?;
        // The mode given to open is masked by the umask; set it exactly.
        rustix::fs::fchmod(f, Mode::from_raw_mode(CONFIG_FILE_MODE))?;
        f.sync_all()
    };
    write(&file).map_err(|source| SetIpInfoError::Write {
        path: dir_path.join(&guard.name),
        source,
    })?;
    Ok(guard)
}

/// Writes each `(name, contents)` into `dir`: all temporaries first, then one `rename` each over
/// the final name (a symlink there is replaced, not followed), then an `fsync` of the directory.
/// If any write fails, no final name is touched.
fn write_files_atomically(dir_path: &Path, files: &[(&str, &[u8])]) -> Result<(), SetIpInfoError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustix::io::Errno| SetIpInfoError::Write {
            path,
            source: e.into(),
        }
    };
    let dir = rustix::fs::open(
        dir_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(write_err(dir_path))?;
    let mut temporaries = Vec::with_capacity(files.len());
    for (name, contents) in files {
        temporaries.push(write_temporary(&dir, dir_path, name, contents)?);
    }
    for ((name, _), tmp) in files.iter().zip(temporaries.iter_mut()) {
        rustix::fs::renameat(&dir, &tmp.name, &dir, *name)
            .map_err(write_err(&dir_path.join(name)))?;
        tmp.renamed = true;
    }
    rustix::fs::fsync(&dir).map_err(write_err(dir_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvisd_protocol::kvp_daemon::{
        DAEMON_MSG_SIZE, DaemonIpInfo, DaemonMessage, build_set_ip_info,
    };
    use proptest::prelude::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::Instant;

    const GUID: &[u8] = b"{f8615163-df3e-46c5-913f-f2d2f965ed0e}";

    fn executable(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A sysfs with one interface `if_name` (MAC `mac`, device_id [`GUID`]), an empty config
    /// directory `<root>/cfg`, and an hv_set_ifconfig that records its arguments in
    /// `<root>/script-args` before running `extra`.
    fn fake_system(root: &Path, if_name: &str, mac: &str, extra: &str) -> NetConfig {
        let eth = root.join("net").join(if_name);
        std::fs::create_dir_all(eth.join("device")).unwrap();
        std::fs::write(eth.join("address"), format!("{mac}\n")).unwrap();
        let mut id = GUID.to_vec();
        id.push(b'\n');
        std::fs::write(eth.join("device/device_id"), id).unwrap();
        std::fs::create_dir_all(root.join("cfg")).unwrap();
        let script = root.join("hv_set_ifconfig");
        executable(
            &script,
            &format!("echo \"$@\" > {}/script-args\n{extra}", root.display()),
        );
        NetConfig {
            sysfs_net_dir: root.join("net"),
            config_dir: root.join("cfg"),
            set_ifconfig_script: script,
            ..NetConfig::default()
        }
    }

    fn fake_sysfs(root: &Path) -> NetConfig {
        fake_system(root, "eth9", "00:15:5d:aa:bb:cc", "")
    }

    fn request(ip: &[u8], subnet: &[u8], gateway: &[u8], dns: &[u8]) -> Box<DaemonMessage> {
        build_set_ip_info(&DaemonIpInfo {
            adapter_id: GUID.to_vec(),
            addr_family: 3,
            dhcp_enabled: 0,
            ip_addr: ip.to_vec(),
            sub_net: subnet.to_vec(),
            gate_way: gateway.to_vec(),
            dns_addr: dns.to_vec(),
        })
    }

    fn config_dir_entries(cfg: &NetConfig) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&cfg.config_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn set_ip_info_writes_ifcfg_and_keyfile_and_runs_the_script() {
        let d = tempfile::tempdir().unwrap();
        let cfg = fake_sysfs(d.path());
        let mut msg = request(
            b"10.0.0.5;10.0.0.6;fe80::1",
            b"255.255.255.0;255.255.0.0;64",
            b"10.0.0.1;fe80::fe",
            b"10.0.0.2;10.0.0.3",
        );
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), 0);
        let ifcfg = std::fs::read_to_string(d.path().join("cfg/ifcfg-eth9")).unwrap();
        assert_eq!(
            ifcfg,
            format!(
                "{CFG_HEADER}HWADDR=00:15:5D:AA:BB:CC\nDEVICE=eth9\nBOOTPROTO=none\nIPADDR0=10.0.0.5\nIPADDR1=10.0.0.6\n\
                 IPV6ADDR=fe80:0000:0000:0000:0000:0000:0000:0001\nNETMASK0=255.255.255.0\nNETMASK1=255.255.0.0\n\
                 IPV6NETMASK=64\nGATEWAY=10.0.0.1\nIPV6_DEFAULTGW=fe80:0000:0000:0000:0000:0000:0000:00fe\nDNS1=10.0.0.2\nDNS2=10.0.0.3\n"
            )
        );
        let nm = std::fs::read_to_string(d.path().join("cfg/eth9.nmconnection")).unwrap();
        assert_eq!(
            nm,
            format!(
                "{CFG_HEADER}\n[connection]\ninterface-name=eth9\n\n[ethernet]\nmac-address=00:15:5D:AA:BB:CC\n\n[ipv4]\n\
                 address1=10.0.0.5/24\naddress2=10.0.0.6/16\nmethod=manual\ngateway=10.0.0.1\ndns=10.0.0.2,10.0.0.3\n\n[ipv6]\n\
                 address1=fe80::1/64\nmethod=manual\ngateway=fe80::fe\n"
            )
        );
        let args = std::fs::read_to_string(d.path().join("script-args")).unwrap();
        assert_eq!(
            args.trim_end(),
            format!(
                "{0}/cfg/ifcfg-eth9 {0}/cfg/eth9.nmconnection",
                d.path().display()
            )
        );
        // As the C daemon does, every `;` of the request became a NUL.
        let ip = &msg[layout::IP_ADDR..layout::IP_ADDR + 26];
        assert_eq!(ip, b"10.0.0.5\x0010.0.0.6\x00fe80::1\x00");
    }

    #[test]
    fn valid_ipv6_only_dhcp_request_writes_files_0644_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let cfg = fake_sysfs(d.path());
        let mut msg = request(
            b" 2001:db8::5",
            b"128",
            b"2001:db8::1",
            b"2001:db8::53;9.9.9.9",
        );
        msg[layout::IP_DHCP] = 1;
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), 0);
        assert_eq!(
            config_dir_entries(&cfg),
            ["eth9.nmconnection", "ifcfg-eth9"]
        );
        let ifcfg = std::fs::read_to_string(d.path().join("cfg/ifcfg-eth9")).unwrap();
        assert!(
            ifcfg.ends_with(
                "BOOTPROTO=dhcp\nIPV6ADDR=2001:0db8:0000:0000:0000:0000:0000:0005\nIPV6NETMASK=128\n\
                 IPV6_DEFAULTGW=2001:0db8:0000:0000:0000:0000:0000:0001\nDNS1=2001:0db8:0000:0000:0000:0000:0000:0053\nDNS2=9.9.9.9\n"
            ),
            "{ifcfg}"
        );
        let nm = std::fs::read_to_string(d.path().join("cfg/eth9.nmconnection")).unwrap();
        assert!(
            nm.ends_with(
                "\n[ipv4]\nmethod=auto\ndns=9.9.9.9\n\n[ipv6]\naddress1=2001:db8::5/128\nmethod=manual\n\
                 gateway=2001:db8::1\ndns=2001:db8::53\n"
            ),
            "{nm}"
        );
        for name in ["ifcfg-eth9", "eth9.nmconnection"] {
            let meta = std::fs::metadata(d.path().join("cfg").join(name)).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o644, "{name}");
        }
    }

    #[test]
    fn set_ip_info_for_an_unknown_adapter_is_guid_not_found() {
        let d = tempfile::tempdir().unwrap();
        let cfg = fake_sysfs(d.path());
        let mut msg = build_set_ip_info(&DaemonIpInfo {
            adapter_id: b"{nope}".to_vec(),
            ..Default::default()
        });
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), HV_GUID_NOTFOUND);
    }

    #[test]
    fn set_ip_info_with_a_bad_address_is_invalid_arg_like_the_c_daemon() {
        let d = tempfile::tempdir().unwrap();
        let cfg = fake_sysfs(d.path());
        let mut msg = request(b"not-an-address", b"", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), HV_INVALIDARG);
        let mut msg = request(&[b'1'; 60], b"", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), HV_INVALIDARG);
        assert!(config_dir_entries(&cfg).is_empty());
    }

    /// Each field gets each string while the others stay valid; every request must be refused
    /// with nothing in the config directory and the script not run.
    #[test]
    fn injection_in_every_field_is_refused_and_nothing_is_written_or_run() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("ran");
        let cfg = fake_system(
            d.path(),
            "eth9",
            "00:15:5d:aa:bb:cc",
            &format!("touch {}", marker.display()),
        );
        let x = d.path().join("x");
        let x = x.display();
        let attacks = [
            "10.0.0.5\nIPADDR9=6.6.6.6".to_string(),
            "10.0.0.5\n".to_string(),
            format!("$(touch {x})"),
            format!("10.0.0.5$(touch {x})"),
            format!("`touch {x}`"),
            "10.0.0.5;`id`".to_string(),
            "10.0.0.5 ; reboot".to_string(),
            "10.0.0.5;reboot".to_string(),
            "10.0.0.5 ".to_string(),
            "10.0.0.5 10.0.0.6".to_string(),
            "1".repeat(60),
            format!("{};x", "f".repeat(50)),
            "fe80::1%eth0".to_string(),
            "010.0.0.5".to_string(),
            "10.0.0.5\r".to_string(),
            "\u{e9}".to_string(),
            "64\nX=1".to_string(),
            "255.255.255.0\n".to_string(),
            "24 $(id)".to_string(),
            "129".to_string(),
            "0064".to_string(),
            "-1".to_string(),
            "/64".to_string(),
        ];
        let valid = [
            &b"10.0.0.5"[..],
            &b"255.255.255.0"[..],
            &b"10.0.0.1"[..],
            &b"10.0.0.2"[..],
        ];
        let mut refused = 0;
        for field in 0..4 {
            for attack in &attacks {
                let mut fields = valid;
                fields[field] = attack.as_bytes();
                let mut msg = request(fields[0], fields[1], fields[2], fields[3]);
                let status = set_ip_info(&cfg, &mut msg[..]);
                assert_ne!(status, 0, "field {field}: {attack:?} was accepted");
                assert!(
                    [HV_E_FAIL, HV_INVALIDARG].contains(&status),
                    "field {field}: {attack:?}: {status:#x}"
                );
                assert!(
                    config_dir_entries(&cfg).is_empty(),
                    "field {field}: {attack:?}: {:?}",
                    config_dir_entries(&cfg)
                );
                assert!(!marker.exists(), "field {field}: {attack:?}: script ran");
                assert!(!d.path().join("x").exists());
                refused += 1;
            }
        }
        assert_eq!(refused, 4 * attacks.len());
    }

    #[test]
    fn netmask_refusals_are_hv_e_fail_and_c_refusals_keep_the_c_status() {
        let cases: [(&str, &str, &str, u32); 7] = [
            ("10.0.0.5", "255.0.255.0", "", HV_E_FAIL),
            ("10.0.0.5", "$(id)", "", HV_E_FAIL),
            ("fe80::1", "129", "", HV_E_FAIL),
            ("10.0.0.5", "255.255.255.0", "gw`id`", HV_INVALIDARG),
            ("10.0.0.5", "255.255.255.0", "10.0.0.1;", 0),
            // An IPv4 address with a prefix length: hv_kvp_daemon answers -1.
            ("10.0.0.5", "24", "", u32::MAX),
            // An IPv6 netmask in address form is accepted, as by hv_kvp_daemon.
            ("fe80::1", "ffff:ffff:ffff:ffff::", "", 0),
        ];
        for (ip, subnet, gw, want) in cases {
            let d = tempfile::tempdir().unwrap();
            let cfg = fake_sysfs(d.path());
            let mut msg = request(ip.as_bytes(), subnet.as_bytes(), gw.as_bytes(), b"");
            let got = set_ip_info(&cfg, &mut msg[..]);
            assert_eq!(got, want, "{ip:?} {subnet:?} {gw:?}");
            if want != 0 {
                assert!(config_dir_entries(&cfg).is_empty());
            }
        }
    }

    #[test]
    fn an_odd_interface_name_or_mac_from_sysfs_is_refused() {
        for (name, mac) in [
            ("eth$(id)", "00:15:5d:aa:bb:cc"),
            ("a b", "00:15:5d:aa:bb:cc"),
            ("..x", "00:15:5d:aa:bb:cc"),
            ("a..b", "00:15:5d:aa:bb:cc"),
            ("eth0", "00:15:5d:aa:bb:cc:"),
            ("abcdefghijklmnop", "00:15:5d:aa:bb:cc"),
            ("-eth0", "00:15:5d:aa:bb:cc"),
            ("eth\u{1b}0", "00:15:5d:aa:bb:cc"),
            ("eth9", "00:15:5d:aa:bb:cc IPADDR=1.2.3.4"),
            ("eth9", "00:15:5d:aa:bb"),
            ("eth9", "00:15:5d:aa:bb:c$"),
            ("eth9", ""),
        ] {
            let d = tempfile::tempdir().unwrap();
            let marker = d.path().join("ran");
            let cfg = fake_system(d.path(), name, mac, &format!("touch {}", marker.display()));
            let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
            assert_eq!(
                set_ip_info(&cfg, &mut msg[..]),
                HV_E_FAIL,
                "{name:?} {mac:?}"
            );
            assert!(config_dir_entries(&cfg).is_empty());
            assert!(!marker.exists());
        }
        // A well-formed VF-style name and an InfiniBand-length address are fine.
        let d = tempfile::tempdir().unwrap();
        let ib = ["80"; 20].join(":");
        let cfg = fake_system(d.path(), "enP1234s1.10", &ib, "");
        let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), 0);
    }

    #[test]
    fn a_hung_hv_set_ifconfig_is_killed_at_its_deadline_and_answered_hv_e_fail() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("finished");
        let mut cfg = fake_system(
            d.path(),
            "eth9",
            "00:15:5d:aa:bb:cc",
            &format!("sleep 30\ntouch {}", marker.display()),
        );
        cfg.set_ifconfig_timeout = Duration::from_millis(300);
        let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
        let start = Instant::now();
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), HV_E_FAIL);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(!marker.exists());
        // The files were written (the script is what failed).
        assert_eq!(
            config_dir_entries(&cfg),
            ["eth9.nmconnection", "ifcfg-eth9"]
        );
    }

    #[test]
    fn a_failing_or_missing_hv_set_ifconfig_is_hv_e_fail() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = fake_system(d.path(), "eth9", "00:15:5d:aa:bb:cc", "echo no >&2; exit 1");
        let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), HV_E_FAIL);
        cfg.set_ifconfig_script = d.path().join("missing");
        let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), HV_E_FAIL);
    }

    #[test]
    fn a_chatty_hv_set_ifconfig_is_read_to_the_end_but_kept_bounded() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = fake_system(
            d.path(),
            "eth9",
            "00:15:5d:aa:bb:cc",
            "head -c 4194304 /dev/zero; head -c 4194304 /dev/zero >&2",
        );
        cfg.max_script_output = 1024;
        let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), 0);
    }

    #[test]
    fn a_symlink_planted_at_either_destination_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let cfg = fake_sysfs(d.path());
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        for name in ["ifcfg-eth9", "eth9.nmconnection"] {
            std::os::unix::fs::symlink(&victim, cfg.config_dir.join(name)).unwrap();
        }
        let mut msg = request(b"10.0.0.5", b"255.255.255.0", b"", b"");
        assert_eq!(set_ip_info(&cfg, &mut msg[..]), 0);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        for name in ["ifcfg-eth9", "eth9.nmconnection"] {
            let meta = std::fs::symlink_metadata(cfg.config_dir.join(name)).unwrap();
            assert!(meta.file_type().is_file(), "{name}");
            let text = std::fs::read_to_string(cfg.config_dir.join(name)).unwrap();
            assert!(text.starts_with(CFG_HEADER));
        }
    }

    #[test]
    fn an_existing_temporary_name_is_never_opened() {
        // O_EXCL|O_NOFOLLOW: a symlink at a temporary name fails the open instead of being
        // followed; a fresh random name is then tried.
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let dir =
            rustix::fs::open(d.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let t = write_temporary(&dir, d.path(), "f", b"new").unwrap();
        let name = t.name.clone();
        drop(t);
        assert!(
            !d.path().join(&name).exists(),
            "an unrenamed temporary is removed"
        );
        std::os::unix::fs::symlink(&victim, d.path().join(&name)).unwrap();
        let err = rustix::fs::openat(
            &dir,
            &name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o644),
        )
        .unwrap_err();
        assert_eq!(err, rustix::io::Errno::EXIST);
        write_files_atomically(d.path(), &[("f", b"new")]).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(d.path().join("f")).unwrap(), "new");
    }

    #[test]
    fn get_helpers_run_once_under_their_deadline_and_a_hung_one_gives_no_data() {
        let d = tempfile::tempdir().unwrap();
        let ip = d.path().join("ip");
        executable(&ip, "echo \"default via 10.0.0.1 dev eth0 $*\"");
        let dns = d.path().join("dns");
        executable(&dns, "sleep 30");
        let dhcp = d.path().join("dhcp");
        executable(&dhcp, "echo Enabled $1");
        let cfg = NetConfig {
            ip_command: Some(ip),
            get_dns_info_script: dns,
            get_dhcp_info_script: dhcp,
            // Long enough for a loaded machine to run the quick ones, short for the hung one.
            get_info_timeout: Duration::from_secs(2),
            ..NetConfig::default()
        };
        let start = Instant::now();
        let q = IpConfigQueries::run(&cfg, "eth0");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(q.gateways_v4, b"10.0.0.1\n");
        assert_eq!(q.gateways_v6, b"10.0.0.1\n");
        assert!(q.dns.is_empty());
        assert_eq!(q.dhcp, b"Enabled eth0\n");
        let mut msg = dm::zeroed();
        msg[layout::IP_DNS] = b'x';
        get_ipconfig_info(&q, &mut msg[..]);
        assert_eq!(msg[layout::IP_DHCP], 1);
        assert_eq!(
            msg[layout::IP_DNS],
            0,
            "no output clears the field as popen's does"
        );
        assert_eq!(
            dm::cstr(&msg[layout::IP_GATEWAY..layout::IP_GATEWAY + GATEWAY_FIELD]),
            b"10.0.0.1;10.0.0.1;"
        );
    }

    #[test]
    fn ip_is_never_looked_up_through_path() {
        let cfg = NetConfig {
            ip_command: Some("ip".into()),
            ..NetConfig::default()
        };
        let q = IpConfigQueries::run(&cfg, "eth0");
        assert!(q.gateways_v4.is_empty());
        let default = NetConfig::default().ip_command();
        assert!(default.is_none_or(|p| p.is_absolute()));
        // A bad interface name runs nothing.
        let q = IpConfigQueries::run(&NetConfig::default(), "eth0 $(id)");
        assert!(q.dhcp.is_empty() && q.dns.is_empty());
    }

    #[test]
    fn awk_default_filter_prints_the_third_field() {
        assert_eq!(
            default_gateways(
                b"default via 10.0.0.1 proto dhcp\n10.0.0.0/24 proto kernel\ndefault\n"
            ),
            b"10.0.0.1\n\n".to_vec()
        );
    }

    #[test]
    fn ipconfig_output_is_semicolon_joined_within_room() {
        let mut f = [0xffu8; 30];
        process_ipconfig_output(b"1.1.1.1\n2.2.2.2\n3.3.3.3\n", &mut f, 16, 0);
        assert_eq!(&f[..strlen(&f)], b"1.1.1.1;2.2.2.2;");
    }

    fn field_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            proptest::collection::vec(
                proptest::sample::select(b"0123456789abcdef.:;/ \n$`()%-".to_vec()),
                0..80
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn set_ip_info_never_panics_on_arbitrary_message_bytes(
            bytes in proptest::collection::vec(any::<u8>(), DAEMON_MSG_SIZE..=DAEMON_MSG_SIZE),
            ours in any::<bool>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            let cfg = fake_sysfs(d.path());
            let mut msg = bytes;
            if ours {
                let id = &mut msg[layout::IP_ADAPTER_ID..layout::IP_ADAPTER_ID + dm::ADAPTER_ID_FIELD];
                id.fill(0);
                id[..GUID.len()].copy_from_slice(GUID);
            }
            let _ = set_ip_info(&cfg, &mut msg[..]);
        }

        #[test]
        fn set_ip_info_writes_only_checked_values(
            ip in field_bytes(),
            subnet in field_bytes(),
            gateway in field_bytes(),
            dns in field_bytes(),
            dhcp in any::<u8>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            let cfg = fake_sysfs(d.path());
            let mut msg = request(&ip, &subnet, &gateway, &dns);
            msg[layout::IP_DHCP] = dhcp;
            let status = set_ip_info(&cfg, &mut msg[..]);
            let entries = config_dir_entries(&cfg);
            if status != 0 {
                prop_assert!(entries.is_empty(), "{status:#x} {entries:?}");
            } else {
                let ifcfg = std::fs::read_to_string(cfg.config_dir.join("ifcfg-eth9")).unwrap();
                for line in ifcfg.lines().skip(1) {
                    let (key, value) = line.split_once('=').unwrap();
                    prop_assert!(key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'), "{line}");
                    prop_assert!(value.bytes().all(|b| b.is_ascii_hexdigit() || b":.".contains(&b)) || key == "DEVICE" || key == "BOOTPROTO", "{line}");
                }
            }
        }
    }
}
