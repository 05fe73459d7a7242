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
        }
    }
}
