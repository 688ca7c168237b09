//! A deliberately hostile plugin for hvisd's sandbox tests. It implements
//! every world; what it does is chosen by the key, backup id, mount list or
//! service name it is given. Never deploy it.
//!
//! KVP keys (guest pool): `ok` (answers `fine`), `spin` (infinite loop),
//! `alloc` (allocates until memory runs out), `recurse` (unbounded
//! recursion with locals in linear memory), `recurse-native` (unbounded
//! recursion on the engine's stack), `trap` (panics), `read-granted` (reads `/data/hello.txt`),
//! `write-ro` (writes into the read-only `/data`), `dotdot`, `absolute`,
//! `symlink`, `undeclared` (filesystem escape attempts), `env` (environment),
//! `kvp-steal` (sets a key outside its grant), `connect-granted` and
//! `connect-other` (hvsock connects to `upstream` and `forbidden`), `print`
//! (writes to stdout, stderr and the logging import). Escape attempts answer
//! `blocked: <error>` when the sandbox held, `ESCAPED: <content>` when not.
//!
//! Freeze hooks: a backup id (or, when set, the Guest-pool key
//! `misbehave.pre-freeze`) `spin` spins in `pre-freeze` (a backup id `spin`
//! spins in `post-thaw` too), `veto` vetoes, `trap` traps, `sleep-N` sleeps N
//! ms then agrees; `post-thaw`
//! writes `misbehave.thawed` = `<backup id> <outcome> pre-freeze-saw=<the
//! backup id its instance's pre-freeze saw, or nothing>`.
//!
//! Freeze policy: the mounts in reverse order; `/refuse` among them refuses,
//! `/bogus` among them answers a mount it was not offered; the Guest-pool key
//! `misbehave.plan` = `widen` adds `/etc` to the answer, `refuse` refuses.
//!
//! Budgets enforced from outside the engine: `sleep` (parks in a blocking
//! WASI sleep for an hour), `poll-far` (blocks on a pollable that is never
//! ready), `fds` (opens `/data/hello.txt` until that fails and keeps every
//! descriptor), `near-deadline` (busy for 40 ms of wall clock, under a 60 ms
//! deadline), `log-flood` (10 000 log lines), `log-forged` (log and stdout
//! lines with newlines, ANSI sequences and a fake hvisd prefix).
//!
//! `describe` owns the keys above, unless the guest-pool key
//! `misbehave.describe` (readable only if the manifest grants it) is
//! `bad-keys`: then it claims every kind of key hvisd must drop (see
//! [`bad_keys`]); or `alias`: then it returns 100 000 keys that all point at
//! one 4 MiB buffer (see [`aliased_keys`]).

use std::hint::black_box;

use hvisd_sdk::{
    Connection, Error, FreezeContext, FreezeHook, FreezeOutcome, FreezePolicy, HvsockService,
    KvpProvider, Mount, Pool, ProviderInfo, Value, kvp,
};

struct Misbehave;

const KEYS: &[&str] = &[
    "ok",
    "spin",
    "alloc",
    "recurse",
    "recurse-native",
    "trap",
    "read-granted",
    "write-ro",
    "dotdot",
    "absolute",
    "symlink",
    "undeclared",
    "env",
    "kvp-steal",
    "connect-granted",
    "connect-other",
    "print",
    "sleep",
    "poll-far",
    "fds",
    "near-deadline",
    "log-flood",
    "log-forged",
];

/// A forged log line: a newline, then what looks like an hvisd record of
/// another component, with ANSI colour and a carriage return.
const FORGED: &str = "innocent\n2026-12-07T00:00:00.000000Z ERROR hvisd::runtime: \
     \u{1b}[31mforged: the host asked for shutdown\u{1b}[0m plugin=app-version\rover";

/// Descriptors kept open by `fds`, so they stay open after the call.
static HOARD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = black_box(x.wrapping_add(1));
    }
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let pad = black_box([depth; 64]);
    if black_box(depth) == u64::MAX {
        return pad[0];
    }
    recurse(depth + 1).wrapping_add(pad[(depth % 64) as usize])
}

/// Recursion that uses only the engine's native stack (no locals in linear
/// memory): the call goes through a function pointer read from a static, so
/// it can be neither inlined nor turned into a loop.
#[inline(never)]
fn recurse_native(depth: u64) -> u64 {
    // SAFETY: a plain read of an initialised static.
    let next = unsafe { std::ptr::read_volatile(&NATIVE) };
    next(depth + 1).wrapping_mul(3).wrapping_add(depth)
}
static NATIVE: fn(u64) -> u64 = recurse_native;

fn attempt(path: &str) -> Value {
    Value::Text(match std::fs::read_to_string(path) {
        Ok(s) => format!("ESCAPED: {}", s.trim()),
        Err(e) => format!("blocked: {e}"),
    })
}

/// Keys no provider may own, beside a few it may: the empty key, a key with
/// NUL, a 512-byte key (one byte over a pool record's key field), a key
/// outside any grant (with an escape sequence and a non-ASCII letter), a key
/// in a pool without a grant, and more keys than one provider may own. The
/// keys it may own are `bad.ok` (claimed twice), `bad.shared`, a 511-byte key
/// and `bad.many.<n>`, all under `bad.`.
fn bad_keys() -> ProviderInfo {
    let mut keys: Vec<(Pool, String)> = vec![
        (Pool::Guest, String::new()),
        (Pool::Guest, "bad.nul\0key".into()),
        (Pool::Guest, format!("bad.{}", "x".repeat(508))),
        (Pool::Guest, format!("bad.{}", "y".repeat(507))),
        (Pool::Guest, "bad.shared".into()),
        (Pool::Guest, "bad.ok".into()),
        (Pool::Guest, "bad.ok".into()),
        (Pool::Guest, "ungranted\u{1b}[31m\u{e9}".into()),
        (Pool::External, "bad.ok".into()),
    ];
    keys.extend((0..5000).map(|i| (Pool::Guest, format!("bad.many.{i}"))));
    ProviderInfo::owning(keys.iter().map(|(p, k)| (*p, k.as_str())))
}

/// 100 000 owned keys whose strings all alias one leaked 4 MiB buffer: 4 KiB
/// of list in the guest that lifts to 400 GB on the host unless the host
/// bounds what it copies (wasmtime's hostcall fuel). The strings are made to
/// share memory on purpose; if a host ever lifted them all, the guest's
/// post-return would free the buffer many times, which traps in the guest
/// only.
fn aliased_keys() -> ProviderInfo {
    let buffer: &'static mut [u8] = Vec::leak(vec![b'a'; 4 << 20]);
    let (ptr, len) = (buffer.as_mut_ptr(), buffer.len());
    let owned_keys = (0..100_000)
        .map(|_| hvisd_sdk::PoolKey {
            pool: Pool::Guest,
            // SAFETY: not sound in Rust's terms (many owners of one buffer),
            // deliberately: this plugin exists to send aliased strings to the
            // host. The bytes are valid UTF-8 and outlive every owner.
            key: unsafe { String::from_raw_parts(ptr, len, len) },
        })
        .collect();
    ProviderInfo {
        owned_keys,
        subscribe: Vec::new(),
    }
}

impl KvpProvider for Misbehave {
    fn describe() -> ProviderInfo {
        match kvp::get(Pool::Guest, "misbehave.describe") {
            Ok(Some(Value::Text(mode))) if mode == "bad-keys" => bad_keys(),
            Ok(Some(Value::Text(mode))) if mode == "alias" => aliased_keys(),
            _ => ProviderInfo::owning(KEYS.iter().map(|k| (Pool::Guest, *k))),
        }
    }

    fn get(_pool: Pool, key: &str) -> Result<Value, Error> {
        Ok(match key {
            "ok" => Value::Text("fine".into()),
            "spin" => spin(),
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "recurse" => Value::U64(recurse(0)),
            "recurse-native" => Value::U64(recurse_native(0)),
            "trap" => panic!("misbehave: deliberate trap"),
            "read-granted" => attempt("/data/hello.txt"),
            "write-ro" => Value::Text(match std::fs::write("/data/new.txt", b"x") {
                Ok(()) => "ESCAPED: wrote into a read-only dir".into(),
                Err(e) => format!("blocked: {e}"),
            }),
            "dotdot" => attempt("/data/../secret.txt"),
            "absolute" => attempt("/etc/passwd"),
            "symlink" => attempt("/data/link-to-secret"),
            "undeclared" => attempt("/secret.txt"),
            "env" => Value::Text(format!("{:?}", std::env::vars().collect::<Vec<_>>())),
            "kvp-steal" => Value::Text(match kvp::set(Pool::Guest, "stolen", &Value::U32(1)) {
                Ok(()) => "ESCAPED: wrote a key outside the grant".into(),
                Err(e) => format!("blocked: {e:?}"),
            }),
            "connect-granted" => Value::Text(match hvisd_sdk::hvsock::connect("upstream") {
                Ok(mut conn) => {
                    use std::io::Write;
                    conn.write_all(b"ping")
                        .map_err(|e| Error::Failed(e.to_string()))?;
                    let reply = conn
                        .read_some(16)
                        .map_err(|e| Error::Failed(e.to_string()))?;
                    format!("got: {}", String::from_utf8_lossy(&reply))
                }
                Err(e) => format!("blocked: {e:?}"),
            }),
            "print" => {
                println!("to stdout");
                eprintln!("to stderr");
                hvisd_sdk::log::warn("through the logging import");
                Value::Text("printed".into())
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Value::Text("ESCAPED: slept an hour".into())
            }
            "poll-far" => {
                // A monotonic-clock pollable due in 584 years.
                std::thread::sleep(std::time::Duration::MAX);
                Value::Text("ESCAPED: the far pollable became ready".into())
            }
            "fds" => {
                let mut hoard = HOARD.lock().unwrap_or_else(|p| p.into_inner());
                let before = hoard.len();
                let error = loop {
                    match std::fs::File::open("/data/hello.txt") {
                        Ok(f) => hoard.push(f),
                        Err(e) => break e,
                    }
                    if hoard.len() - before >= 1_000_000 {
                        break std::io::Error::other("a million descriptors");
                    }
                };
                Value::Text(format!("opened {} then: {error}", hoard.len() - before))
            }
            "near-deadline" => {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(40) {
                    x = black_box(x.wrapping_add(1));
                }
                Value::U64(x)
            }
            "log-flood" => {
                for i in 0..10_000 {
                    hvisd_sdk::log::info(&format!("flood line {i}"));
                }
                Value::Text("flooded".into())
            }
            "log-forged" => {
                hvisd_sdk::log::error(FORGED);
                println!("{FORGED}");
                eprintln!("{FORGED}");
                Value::Text("forged".into())
            }
            "connect-other" => Value::Text(match hvisd_sdk::hvsock::connect("forbidden") {
                Ok(_) => "ESCAPED: connected to an ungranted service".into(),
                Err(e) => format!("blocked: {e:?}"),
            }),
            _ => return Err(Error::NotFound(key.into())),
        })
    }
}

/// What `pre-freeze` saw, kept in the instance's memory for `post-thaw` of
/// the same backup.
static PRE_FREEZE_SAW: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

impl FreezeHook for Misbehave {
    fn pre_freeze(ctx: &FreezeContext) -> Result<(), String> {
        *PRE_FREEZE_SAW.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.backup_id.clone());
        // The Guest-pool key `misbehave.pre-freeze` (if granted and set) overrides the backup id
        // as the behaviour: a host can choose it with a KVP SET before its backup.
        let mode = match kvp::get(Pool::Guest, "misbehave.pre-freeze") {
            Ok(Some(Value::Text(mode))) => mode,
            _ => ctx.backup_id.clone(),
        };
        if let Some(ms) = mode
            .strip_prefix("sleep-")
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            return Ok(());
        }
        match mode.as_str() {
            "spin" => spin(),
            "veto" => Err("misbehave vetoes".into()),
            "trap" => panic!("misbehave: trap in pre-freeze"),
            _ => Ok(()),
        }
    }
    fn post_thaw(ctx: &FreezeContext, outcome: FreezeOutcome) {
        let remembered = PRE_FREEZE_SAW
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| "nothing".into());
        let _ = kvp::set(
            Pool::Guest,
            "misbehave.thawed",
            &Value::Text(format!(
                "{} {outcome:?} pre-freeze-saw={remembered}",
                ctx.backup_id
            )),
        );
        if ctx.backup_id == "spin" {
            spin();
        }
    }
}

impl FreezePolicy for Misbehave {
    fn plan(mounts: &[Mount]) -> Result<Vec<String>, String> {
        // The Guest-pool key `misbehave.plan` (if granted and set): `widen` asks for a mount it
        // was not offered, `refuse` refuses.
        match kvp::get(Pool::Guest, "misbehave.plan") {
            Ok(Some(Value::Text(mode))) if mode == "widen" => {
                let mut all: Vec<String> = mounts.iter().map(|m| m.path.clone()).collect();
                all.insert(0, "/etc".into());
                return Ok(all);
            }
            Ok(Some(Value::Text(mode))) if mode == "refuse" => {
                return Err("misbehave refuses (misbehave.plan)".into());
            }
            _ => {}
        }
        if mounts.iter().any(|m| m.path == "/refuse") {
            return Err("misbehave refuses".into());
        }
        if mounts.iter().any(|m| m.path == "/bogus") {
            return Ok(vec!["/not-offered".into()]);
        }
        Ok(mounts.iter().rev().map(|m| m.path.clone()).collect())
    }
}

impl HvsockService for Misbehave {
    fn serve(service: &str, mut conn: Connection) -> Result<(), String> {
        use std::io::{Read, Write};
        if service == "spin" {
            spin();
        }
        let mut buf = [0u8; 1024];
        loop {
            let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        }
    }
}

hvisd_sdk::export_full_plugin!(Misbehave);
