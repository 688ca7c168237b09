//! `hvisd kvp list|get|set|delete [--pool NAME] [--pool-dir DIR] [--json]`: an operator's tool over
//! the pool files, safe while the daemon runs (it takes the same locks, with the same timeout, and
//! writes in place as the daemon does).

use std::io::Write;
use std::path::PathBuf;

use hvisd_protocol::kvp::{MAX_KEY_SIZE, MAX_VALUE_SIZE, Pool};

use crate::pool::{PoolStore, StoreError, StoreOptions, pool_file_name};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum KvpCliCommand {
    /// List one pool, or all pools when no pool is given.
    List,
    /// Print one value.
    Get {
        /// The key.
        key: String,
    },
    /// Create or replace one key.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove one key.
    Delete {
        /// The key.
        key: String,
    },
}

/// `hvisd kvp`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct KvpCliArgs {
    /// The command.
    #[command(subcommand)]
    pub command: KvpCliCommand,
    /// Pool: external, guest, auto, auto-external, auto-internal, or 0-4. Default: every pool for
    /// `list`, guest otherwise.
    #[arg(long, global = true, value_parser = parse_pool)]
    pub pool: Option<Pool>,
    /// Pool directory.
    #[arg(long, global = true, default_value = "/var/lib/hyperv")]
    pub pool_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

fn parse_pool(name: &str) -> Result<Pool, String> {
    Pool::parse(name).ok_or_else(|| {
        format!(
            "unknown pool {name:?}: use external, guest, auto, auto-external, auto-internal or 0-4"
        )
    })
}

/// Why the command failed (the binary prints it and exits non-zero).
#[derive(Debug, thiserror::Error)]
pub enum KvpCliError {
    /// Pool file trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key is not in the pool.
    #[error("key {key:?} is not in the {pool} pool")]
    NotFound {
        /// The key.
        key: String,
        /// The pool.
        pool: Pool,
    },
    /// The key or value does not fit a record.
    #[error("{what} is {len} bytes, limit {limit}")]
    TooLong {
        /// "key" or "value".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The key is empty or contains NUL.
    #[error("the key must be non-empty and contain no NUL byte")]
    BadKey,
    /// The pool directory does not exist.
    #[error("pool directory {} does not exist (is hv_kvp_daemon or hvisd running here? use --pool-dir)", .0.display())]
    NoPoolDir(PathBuf),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

fn exists(args: &KvpCliArgs, pool: Pool) -> bool {
    args.pool_dir.join(pool_file_name(pool)).exists()
}

fn open(args: &KvpCliArgs) -> Result<PoolStore, KvpCliError> {
    Ok(PoolStore::open_existing(
        &args.pool_dir,
        StoreOptions::default(),
    )?)
}

/// Runs one command, writing the table (or JSON) to `out`.
pub fn cli(args: &KvpCliArgs, out: &mut dyn Write) -> Result<(), KvpCliError> {
    // The operator's tool never creates the directory: a typo in --pool-dir is an error, not five
    // new empty pools.
    if !args.pool_dir.is_dir() {
        return Err(KvpCliError::NoPoolDir(args.pool_dir.clone()));
    }
    // Opening the store creates the pool files it lacks (as the daemon does): `list` and `get`
    // read only pools that exist, so they change nothing, and a directory without pools is
    // listed empty.
    let default_pool = args.pool.unwrap_or(Pool::Guest);
    match &args.command {
        KvpCliCommand::List => {
            let pools: Vec<Pool> = args
                .pool
                .map(|p| vec![p])
                .unwrap_or_else(|| Pool::ALL.to_vec());
            let pools: Vec<Pool> = pools.into_iter().filter(|&p| exists(args, p)).collect();
            let mut rows = Vec::new();
            if !pools.is_empty() {
                let mut store = open(args)?;
                for p in pools {
                    for (k, v) in store.list(p)? {
                        rows.push((p, k, v));
                    }
                }
            }
            if args.json {
                let json: Vec<_> = rows
                    .iter()
                    .map(|(p, k, v)| serde_json::json!({"pool": p.name(), "key": k, "value": v}))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(json))?;
            } else {
                let width = |f: &dyn Fn(&(Pool, String, String)) -> usize, min: usize| {
                    rows.iter().map(f).max().unwrap_or(0).max(min)
                };
                let pw = width(&|r| r.0.name().len(), 4);
                let kw = width(&|r| r.1.chars().count(), 3);
                writeln!(out, "{:pw$}  {:kw$}  VALUE", "POOL", "KEY")?;
                for (p, k, v) in &rows {
                    writeln!(out, "{:pw$}  {:kw$}  {}", p.name(), k, v.escape_debug())?;
                }
            }
        }
        KvpCliCommand::Get { key } => {
            let value = if exists(args, default_pool) {
                open(args)?.get(default_pool, key)?
            } else {
                None
            };
            let value = value.ok_or_else(|| KvpCliError::NotFound {
                key: key.clone(),
                pool: default_pool,
            })?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"pool": default_pool.name(), "key": key, "value": value})
                )?;
            } else {
                writeln!(out, "{value}")?;
            }
        }
        KvpCliCommand::Set { key, value } => {
            check(key, value)?;
            open(args)?.set(default_pool, key, value)?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"pool": default_pool.name(), "key": key, "value": value})
                )?;
            }
        }
        KvpCliCommand::Delete { key } => {
            let deleted = open(args)?.delete(default_pool, key)?;
            if !deleted {
                return Err(KvpCliError::NotFound {
                    key: key.clone(),
                    pool: default_pool,
                });
            }
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"pool": default_pool.name(), "key": key, "deleted": true})
                )?;
            }
        }
    }
    Ok(())
}

fn check(key: &str, value: &str) -> Result<(), KvpCliError> {
    if key.is_empty() || key.contains('\0') {
        return Err(KvpCliError::BadKey);
    }
    if key.len() >= MAX_KEY_SIZE {
        return Err(KvpCliError::TooLong {
            what: "key",
            len: key.len(),
            limit: MAX_KEY_SIZE - 1,
        });
    }
    if value.len() >= MAX_VALUE_SIZE {
        return Err(KvpCliError::TooLong {
            what: "value",
            len: value.len(),
            limit: MAX_VALUE_SIZE - 1,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        dir: &std::path::Path,
        command: KvpCliCommand,
        pool: Option<Pool>,
        json: bool,
    ) -> Result<String, KvpCliError> {
        let mut out = Vec::new();
        cli(
            &KvpCliArgs {
                command,
                pool,
                pool_dir: dir.to_path_buf(),
                json,
            },
            &mut out,
        )?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn set_then_list_shows_a_table_and_json() {
        let d = tempfile::tempdir().unwrap();
        run(
            d.path(),
            KvpCliCommand::Set {
                key: "color".into(),
                value: "blue".into(),
            },
            None,
            false,
        )
        .unwrap();
        run(
            d.path(),
            KvpCliCommand::Set {
                key: "k".into(),
                value: "v".into(),
            },
            Some(Pool::External),
            false,
        )
        .unwrap();
        let table = run(d.path(), KvpCliCommand::List, None, false).unwrap();
        assert_eq!(
            table,
            "POOL      KEY    VALUE\nexternal  k      v\nguest     color  blue\n"
        );
        let json = run(d.path(), KvpCliCommand::List, Some(Pool::Guest), true).unwrap();
        assert_eq!(
            json.trim(),
            r#"[{"key":"color","pool":"guest","value":"blue"}]"#
        );
        assert_eq!(
            run(
                d.path(),
                KvpCliCommand::Get {
                    key: "color".into()
                },
                None,
                false
            )
            .unwrap(),
            "blue\n"
        );
    }

    #[test]
    fn get_or_delete_of_a_missing_key_fails_with_the_pool_named() {
        let d = tempfile::tempdir().unwrap();
        let err = run(
            d.path(),
            KvpCliCommand::Delete { key: "x".into() },
            None,
            false,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "key \"x\" is not in the guest pool");
    }

    #[test]
    fn an_oversized_value_is_refused_with_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let err = run(
            d.path(),
            KvpCliCommand::Set {
                key: "k".into(),
                value: "x".repeat(3000),
            },
            None,
            false,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "value is 3000 bytes, limit 2047");
    }
}
