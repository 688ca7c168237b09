//! KVP benchmark until `hvisd bench kvp --json` is wired: enumerates a 100-key Guest pool over the
//! kernel protocol (real SOCK_SEQPACKET socketpair) and through the VMBus codec, with 0 and 10
//! plugin-provided keys, and prints one JSON object per case.
//!
//! `cargo run --release -p hvisd-kvp --example kvp_bench [ROUNDS]`

fn main() {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opts = hvisd_kvp::bench::KvpBenchOptions {
        rounds,
        ..Default::default()
    };
    match rt.block_on(hvisd_kvp::bench::run_kvp_bench(&opts)) {
        Ok(cases) => {
            for c in cases {
                println!("{}", serde_json::to_string(&c).expect("serializable"));
            }
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
