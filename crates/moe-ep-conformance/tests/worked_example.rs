//! The oracle reproduces the worked example of docs/semantics.md, table by table.

use moe_ep::{DType, Layout};
use moe_ep_conformance::oracle::{self, Problem, RankInput};

fn problem(layout: Layout) -> Problem {
    Problem {
        world: 2,
        num_experts: 4,
        topk: 2,
        hidden: 2,
        expert_to_rank: vec![0, 0, 1, 1],
        layout,
        dtype: DType::F32,
        combine_dtype: DType::F32,
        scale_columns: 0,
    }
}

fn inputs() -> Vec<RankInput> {
    let topk = [vec![1, 2, 0, 1, 3, -1], vec![2, 3, -1, -1, 0, 3]];
    let w = [
        vec![0.5, 0.5, 0.75, 0.25, 1.0, 0.0],
        vec![0.625, 0.375, 0.0, 0.0, 0.875, 0.125],
    ];
    (0..2)
        .map(|r| {
            let x: Vec<f32> = (0..3)
                .flat_map(|t| {
                    let v = (10 * r + t + 1) as f32;
                    [v, v]
                })
                .collect();
            RankInput {
                num_tokens: 3,
                x: bytemuck::cast_slice(&x).to_vec(),
                topk_idx: topk[r].clone(),
                weights: Some(w[r].clone()),
                scales: None,
            }
        })
        .collect()
}

fn col0(x: &[u8], rows: usize) -> Vec<f32> {
    let v: &[f32] = bytemuck::cast_slice(x);
    (0..rows).map(|r| v[r * 2]).collect()
}

#[test]
fn token_major() {
    let p = problem(Layout::TokenMajor);
    let inp = inputs();
    let d = oracle::dispatch(&p, &inp);
    assert_eq!(d[0].rows, 3);
    assert_eq!(d[0].src, vec![0, 0, 0, 1, 1, 2]);
    assert_eq!(col0(&d[0].x, 3), vec![1.0, 2.0, 13.0]);
    assert_eq!(d[0].topk_idx.as_ref().unwrap(), &vec![1, -1, 0, 1, 0, -1]);
    assert_eq!(
        d[0].topk_weights.as_ref().unwrap(),
        &vec![0.5, 0.0, 0.75, 0.25, 0.875, 0.0]
    );
    assert_eq!(d[1].rows, 4);
    assert_eq!(d[1].src, vec![0, 0, 0, 2, 1, 0, 1, 2]);
    assert_eq!(col0(&d[1].x, 4), vec![1.0, 3.0, 11.0, 13.0]);
    assert_eq!(
        d[1].topk_idx.as_ref().unwrap(),
        &vec![-1, 0, 1, -1, 0, 1, -1, 1]
    );
    assert_eq!(
        d[1].topk_weights.as_ref().unwrap(),
        &vec![0.0, 0.5, 1.0, 0.0, 0.625, 0.375, 0.0, 0.125]
    );
    assert_eq!(d[0].num_recv_per_src, vec![2, 1]);
    assert_eq!(d[0].num_recv_per_local_expert, vec![2, 2]);
    assert_eq!(d[1].num_recv_per_src, vec![2, 2]);
    assert_eq!(d[1].num_recv_per_local_expert, vec![2, 3]);
    let y: Vec<Vec<u8>> = d.iter().map(|e| e.x.clone()).collect();
    let c = oracle::combine(&p, &inp, &y, None);
    assert_eq!(col0(&c[0].x, 3), vec![2.0, 2.0, 3.0]);
    assert_eq!(col0(&c[1].x, 3), vec![11.0, 0.0, 26.0]);
}

#[test]
fn expert_major() {
    let p = problem(Layout::ExpertMajor { align: 2 });
    let inp = inputs();
    let d = oracle::dispatch(&p, &inp);
    assert_eq!(d[0].rows, 4);
    assert_eq!(d[0].src, vec![0, 1, 0, 1, 2, 0, 0, 0, 0, 0, 1, 1]);
    assert_eq!(d[0].local_expert.as_ref().unwrap(), &vec![0, 0, 1, 1]);
    assert_eq!(col0(&d[0].x, 4), vec![2.0, 13.0, 1.0, 2.0]);
    assert_eq!(
        d[0].topk_weights.as_ref().unwrap(),
        &vec![0.75, 0.875, 0.5, 0.25]
    );
    assert_eq!(d[0].expert_offsets.as_ref().unwrap(), &vec![0, 2, 4]);
    assert_eq!(d[1].rows, 6);
    assert_eq!(
        d[1].src,
        vec![0, 0, 1, 1, 0, 0, 0, 2, 0, 1, 0, 1, 1, 2, 1, -1, -1, -1]
    );
    assert_eq!(
        d[1].local_expert.as_ref().unwrap(),
        &vec![0, 0, 1, 1, 1, -1]
    );
    assert_eq!(col0(&d[1].x, 5), vec![1.0, 11.0, 3.0, 11.0, 13.0]);
    assert_eq!(
        d[1].topk_weights.as_ref().unwrap(),
        &vec![0.5, 0.625, 1.0, 0.375, 0.125, 0.0]
    );
    assert_eq!(d[1].padding, vec![false, false, false, false, false, true]);
    assert_eq!(d[1].expert_offsets.as_ref().unwrap(), &vec![0, 2, 6]);
    assert_eq!(d[1].num_recv_per_local_expert, vec![2, 3]);
    let y: Vec<Vec<u8>> = d.iter().map(|e| e.x.clone()).collect();
    let c = oracle::combine(&p, &inp, &y, None);
    assert_eq!(col0(&c[0].x, 3), vec![1.0, 2.0, 3.0]);
    assert_eq!(col0(&c[1].x, 3), vec![11.0, 0.0, 13.0]);
}

#[test]
fn warp_dot_order() {
    // 40 elements: lanes 0..8 take two products, the others one; then the halving fold.
    let a: Vec<f32> = (0..40).map(|i| 1.0 + i as f32 * 1e-3).collect();
    let b: Vec<f32> = (0..40).map(|i| (i as f32).sin()).collect();
    let mut p = [0f32; 32];
    for h in 0..40 {
        p[h % 32] = a[h].mul_add(b[h], p[h % 32]);
    }
    for half in [16, 8, 4, 2, 1] {
        for l in 0..half {
            p[l] += p[l + half];
        }
    }
    let got = oracle::warp_dot(a.iter().copied(), b.iter().copied());
    assert_eq!(got.to_bits(), p[0].to_bits());
}
