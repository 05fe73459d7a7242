//! The API example of README.md, kept compiling and running here (`cargo run -p moe-ep-cli
//! --example readme`); keep the two in sync.

use half::bf16;
use moe_ep::{routing, Dispatcher, EpConfig, Group, Layout, TensorRef};

#[rustfmt::skip]
fn main() -> moe_ep::Result<()> {
    let (world, experts, k, t, h) = (4, 32, 2, 16, 256);
    let config = EpConfig::builder()
        .num_experts(experts).topk(k).hidden(h).max_tokens_per_rank(t)
        .layout(Layout::ExpertMajor { align: 8 }) // rows grouped per local expert, for a grouped GEMM
        .build()?;
    std::thread::scope(|s| {
        let ranks: Vec<_> = Group::cpu_world(world)?.into_iter().map(|group| {
            let config = config.clone();
            s.spawn(move || -> moe_ep::Result<()> {
                let mut ep = Dispatcher::new(&group, config)?; // collective: every rank, same order
                let x = vec![bf16::from_f32(group.rank() as f32 + 1.0); t * h];
                let logits: Vec<f32> = (0..t * experts).map(|i| (i * 7919 % 101) as f32 / 10.0).collect();
                let route = routing::topk_softmax(&logits, experts, k, true)?;
                let (x_ref, idx) = (TensorRef::new(&x, &[t, h])?, TensorRef::new(&route.idx, &[t, k])?);
                let w = TensorRef::new(&route.weights, &[t, k])?;
                let (recv, handle) = ep.dispatch(x_ref, idx, Some(w), None)?;
                let mut y = recv.x.clone(); // expert compute (a grouped GEMM over recv.expert_offsets)
                y.as_mut_slice::<bf16>()?.iter_mut().for_each(|v| *v = bf16::from_f32(2.0 * v.to_f32()));
                let out = ep.combine(&handle, y.view(), None)?; // weighted by route.weights: 2 * x
                assert_eq!(out.x.as_slice::<bf16>()?[0].to_f32(), 2.0 * (group.rank() as f32 + 1.0));
                let _again = ep.dispatch_cached(&handle, x_ref, None)?; // same routing, new payload
                let _grad_y = ep.combine_backward(&handle, out.x.view(), None)?.grad_y; // backward
                Ok(())
            })
        }).collect();
        ranks.into_iter().try_for_each(|r| r.join().expect("rank thread panicked"))
    })
}
