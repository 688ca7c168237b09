//! Ring throughput figures: a table on stdout, then the JSON report.
//!
//! `cargo run --release -p hvisd-ring --features bench --example ring_bench [ring_size_bytes]`

use hvisd_ring::bench::{RingBenchOptions, run_ring_bench};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut opts = RingBenchOptions::default();
    if let Some(size) = std::env::args().nth(1) {
        opts.ring_size = size.parse()?;
    }
    let report = run_ring_bench(&opts)?;
    report.print_human();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
