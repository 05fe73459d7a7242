//! The worked example of docs/semantics.md: 2 ranks, 4 experts, top-2, both layouts.
//! Run with `cargo run -p moe-ep --example worked_example`.

use moe_ep::{DType, Dispatcher, EpConfig, Group, Layout, OutputSizing, TensorRef};

/// Token t of rank r carries the value 10*r + t + 1 in each of its 2 hidden columns.
fn inputs(rank: usize) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
    let x = (0..3)
        .flat_map(|t| [(10 * rank + t + 1) as f32; 2])
        .collect();
    let (topk, w) = if rank == 0 {
        (
            vec![1, 2, 0, 1, 3, -1],
            vec![0.5, 0.5, 0.75, 0.25, 1.0, 0.0],
        )
    } else {
        (
            vec![2, 3, -1, -1, 0, 3],
            vec![0.625, 0.375, 0.0, 0.0, 0.875, 0.125],
        )
    };
    (x, topk, w)
}

fn run(layout: Layout) -> moe_ep::Result<()> {
    println!("== {} ==", layout.name());
    let config = EpConfig::builder()
        .num_experts(4)
        .topk(2)
        .hidden(2)
        .max_tokens_per_rank(3)
        .dtype(DType::F32)
        .layout(layout)
        .output_sizing(OutputSizing::Exact)
        .build()?;
    let groups = Group::cpu_world(2)?;
    let reports: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let config = config.clone();
                s.spawn(move || -> moe_ep::Result<String> {
                    let rank = group.rank();
                    let mut ep = Dispatcher::new(&group, config)?;
                    let (x, topk, w) = inputs(rank);
                    let (out, handle) = ep.dispatch(
                        TensorRef::new(&x, &[3, 2])?,
                        TensorRef::new(&topk, &[3, 2])?,
                        Some(TensorRef::new(&w, &[3, 2])?),
                        None,
                    )?;
                    let mut r = format!("rank {rank} receives:\n");
                    let xs = out.x.to_vec::<f32>()?;
                    let src = out.src.to_vec::<i32>()?;
                    let cols = out.src.dims()[1];
                    for row in 0..out.x.rows() {
                        let origin = &src[row * cols..(row + 1) * cols];
                        r += &format!(
                            "  row {row}: src {origin:?} x {:?}",
                            &xs[row * 2..row * 2 + 2]
                        );
                        if let Some(idx) = &out.topk_idx {
                            r += &format!(
                                " topk_idx {:?}",
                                &idx.to_vec::<i32>()?[row * 2..row * 2 + 2]
                            );
                        }
                        if let Some(g) = &out.local_expert {
                            r += &format!(" local_expert {}", g.to_vec::<i32>()?[row]);
                        }
                        if let Some(w) = &out.topk_weights {
                            let w = w.to_vec::<f32>()?;
                            let per_row = w.len() / out.x.rows().max(1);
                            r += &format!(" weights {:?}", &w[row * per_row..(row + 1) * per_row]);
                        }
                        r += "\n";
                    }
                    r += &format!("  counts {:?}\n", out.host_counts);
                    // Identity experts: y = x, so combine shows how copies are reduced.
                    let back = ep.combine(&handle, out.x.view(), None)?;
                    r += &format!("rank {rank} combine: {:?}\n", back.x.to_vec::<f32>()?);
                    Ok(r)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("rank thread"))
            .collect::<moe_ep::Result<_>>()
    })?;
    for r in reports {
        print!("{r}");
    }
    Ok(())
}

fn main() -> moe_ep::Result<()> {
    run(Layout::TokenMajor)?;
    run(Layout::ExpertMajor { align: 2 })
}
