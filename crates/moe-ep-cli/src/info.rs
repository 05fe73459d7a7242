//! `moe-ep info`: the backends and CUDA devices the probe sees.

use comfy_table::{presets, Table};
use moe_ep::probe;

pub fn run() {
    let mut table = Table::new();
    table.load_preset(presets::ASCII_MARKDOWN);
    table.set_header(vec!["backend", "available", "detail"]);
    for b in probe::backends() {
        table.add_row(vec![
            b.name.to_string(),
            if b.available { "yes" } else { "no" }.to_string(),
            b.detail,
        ]);
    }
    println!("Backends (best first):");
    println!("{table}");
    println!();
    match probe::cuda_devices() {
        Err(why) => println!("CUDA devices: none: {why}"),
        Ok(devs) if devs.is_empty() => println!("CUDA devices: none (the driver reports 0)"),
        Ok(devs) => {
            let mut table = Table::new();
            table.load_preset(presets::ASCII_MARKDOWN);
            table.set_header(vec![
                "ordinal",
                "name",
                "memory (GiB)",
                "compute capability",
            ]);
            for d in devs {
                table.add_row(vec![
                    d.ordinal.to_string(),
                    d.name,
                    format!("{:.1}", d.total_memory as f64 / (1u64 << 30) as f64),
                    format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
                ]);
            }
            println!("CUDA devices:");
            println!("{table}");
            print_peer_links();
        }
    }
}

/// The peer-access matrix: which GPU can store into which directly, and the driver's rank of the
/// link (0 is the fastest class, NVLink on an NVSwitch/NV18 node).
fn print_peer_links() {
    let links = match probe::cuda_peer_links() {
        Ok(l) => l,
        Err(why) => return println!("Peer access: unknown: {why}"),
    };
    if links.len() < 2 {
        return;
    }
    let mut table = Table::new();
    table.load_preset(presets::ASCII_MARKDOWN);
    let mut header = vec!["from \\ to".to_string()];
    header.extend((0..links.len()).map(|j| format!("cuda:{j}")));
    table.set_header(header);
    for (i, row) in links.iter().enumerate() {
        let mut cells = vec![format!("cuda:{i}")];
        cells.extend(row.iter().map(|l| match l {
            None => "-".to_string(),
            Some(l) if l.access => format!("peer (rank {})", l.perf_rank),
            Some(_) => "no peer access".to_string(),
        }));
        table.add_row(cells);
    }
    println!();
    println!("Peer access (direct stores between GPUs; the CUDA backend needs it between every pair of ranks):");
    println!("{table}");
}
