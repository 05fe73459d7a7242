//! A first end-to-end check of the public API on the CPU backend.

use moe_ep::{Dispatcher, EpConfig, Group, Layout, TensorRef};

fn run(layout: Layout) {
    let config = EpConfig::builder()
        .num_experts(4)
        .topk(2)
        .hidden(3)
        .max_tokens_per_rank(4)
        .dtype(moe_ep::DType::F32)
        .layout(layout)
        .build()
        .unwrap();
    let groups = Group::cpu_world(2).unwrap();
    std::thread::scope(|s| {
        for group in groups {
            let config = config.clone();
            s.spawn(move || {
                let r = group.rank() as f32;
                let mut ep = Dispatcher::new(&group, config).unwrap();
                let x: Vec<f32> = (0..12).map(|i| r * 100.0 + i as f32).collect();
                // token 0 -> experts 0,3 (ranks 0,1); token 1 -> 1,1 (rank 0 twice); token 2 -> none;
                // token 3 -> 2,-1 (rank 1)
                let topk = [0i32, 3, 1, 1, -1, -1, 2, -1];
                let w = [0.5f32, 0.25, 1.0, 2.0, 0.0, 0.0, 4.0, 0.0];
                let (out, handle) = ep
                    .dispatch(
                        TensorRef::new(&x, &[4, 3]).unwrap(),
                        TensorRef::new(&topk, &[4, 2]).unwrap(),
                        Some(TensorRef::new(&w, &[4, 2]).unwrap()),
                        None,
                    )
                    .unwrap();
                let rows = out.valid_rows().unwrap();
                let y = out.x.view_rows(out.x.rows()).unwrap();
                let back = ep.combine(&handle, y, None).unwrap();
                let got = back.x.to_vec::<f32>().unwrap();
                // Token-major: one copy per destination rank; expert-major: sum of weights.
                let factor: [f32; 4] = match layout {
                    Layout::TokenMajor => [2.0, 1.0, 0.0, 1.0],
                    Layout::ExpertMajor { .. } => [0.75, 3.0, 0.0, 4.0],
                };
                for t in 0..4 {
                    for h in 0..3 {
                        assert_eq!(
                            got[t * 3 + h],
                            factor[t] * x[t * 3 + h],
                            "rank {r} token {t} rows {rows}"
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn token_major_round_trip() {
    run(Layout::TokenMajor);
}

#[test]
fn expert_major_round_trip() {
    run(Layout::ExpertMajor { align: 4 });
}

#[test]
fn all_gather_host_gives_every_rank_every_payload() {
    let config = EpConfig::builder()
        .num_experts(3)
        .topk(1)
        .hidden(1)
        .max_tokens_per_rank(1)
        .build()
        .unwrap();
    let groups = Group::cpu_world(3).unwrap();
    std::thread::scope(|s| {
        for group in groups {
            let config = config.clone();
            s.spawn(move || {
                let mut ep = Dispatcher::new(&group, config).unwrap();
                let r = group.rank() as u8;
                let all = ep.all_gather_host(vec![r; r as usize + 1]).unwrap();
                assert_eq!(all, vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
            });
        }
    });
}
