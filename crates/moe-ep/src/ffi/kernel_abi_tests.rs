//! The structs and constants of cuda_kernels.rs against moe_ep.h (and moe_ep.cu's SideMode), read
//! from the kernel sources themselves: a field added, moved or retyped on one side only would hand
//! the kernels garbage without any error, so these tests hold the two sides together (no GPU
//! needed).

use super::cuda_kernels as k;
use std::collections::HashMap;
use std::mem::{offset_of, size_of};

fn kernel_source(file: &str) -> String {
    let path = format!(
        "{}/../moe-ep-kernels/cuda/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn header() -> String {
    kernel_source("moe_ep.h")
}

/// The `NAME = <integer>,` lines of the enum `name` in `text`.
fn enum_values(text: &str, name: &str) -> HashMap<String, i64> {
    let start = text
        .find(&format!("enum {name} {{"))
        .unwrap_or_else(|| panic!("enum {name} not found"));
    let body = &text[start..];
    body[..body.find("};").expect("end")]
        .lines()
        .filter_map(|line| {
            let code = line.split("//").next()?.trim().trim_end_matches(',');
            let (key, value) = code.split_once(" = ")?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The header's `#define NAME <integer>` lines.
fn defines(text: &str) -> HashMap<String, i64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("#define ")?.split_whitespace();
            let name = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((name.to_string(), value))
        })
        .collect()
}

/// Each field of `struct name` in the header with its C offset, and the struct's C size. Fields
/// are `uint64_t` or `int`, arrays sized by a number or a define.
fn c_layout(text: &str, name: &str) -> (Vec<(String, usize)>, usize) {
    let defines = defines(text);
    let start = text
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not in moe_ep.h"));
    let body = &text[start..];
    let body = &body[body.find('{').expect("brace") + 1..body.find("};").expect("end")];
    let (mut fields, mut at, mut align_max) = (Vec::new(), 0usize, 1usize);
    for line in body.lines() {
        let code = line.split("//").next().unwrap_or("").trim();
        let Some(decl) = code.strip_suffix(';') else {
            continue;
        };
        let (ty, rest) = decl.split_once(' ').expect("type and name");
        let size = match ty {
            "uint64_t" => 8,
            "int" => 4,
            other => panic!("struct {name}: field type {other} not handled"),
        };
        let (field, count) = match rest.trim().split_once('[') {
            None => (rest.trim(), 1),
            Some((field, dim)) => {
                let dim = dim.trim_end_matches(']');
                let n = dim
                    .parse()
                    .ok()
                    .or_else(|| defines.get(dim).map(|&v| v as usize))
                    .unwrap_or_else(|| panic!("struct {name}: array size {dim}"));
                (field, n)
            }
        };
        at = at.div_ceil(size) * size;
        fields.push((field.to_string(), at));
        at += size * count;
        align_max = align_max.max(size);
    }
    (fields, at.div_ceil(align_max) * align_max)
}

/// The Rust offsets of the listed fields of `$t`, in order, and its size.
macro_rules! rust_layout {
    ($t:ty; $($f:ident),+ $(,)?) => {
        (
            vec![$((stringify!($f).to_string(), offset_of!($t, $f))),+],
            size_of::<$t>(),
        )
    };
}

#[test]
fn parameter_structs_match_the_header() {
    let text = header();
    let cases = [
        (
            "EpPeers",
            rust_layout!(k::EpPeers; signals, inbox, stage_x, stage_scales, stage_meta, back,
                back_side),
        ),
        (
            "EpDims",
            rust_layout!(k::EpDims; rank, world, num_experts, num_local, topk, hidden,
                scale_cols, max_tokens, x_row_bytes, stage_row_bytes, begins_call, reserved,
                epoch_ptr, my_signals, timeout_ns),
        ),
        (
            "EpExpand",
            rust_layout!(k::EpExpand; stage_x, stage_scales, stage_meta, recv_base, group_base,
                offsets, per_expert, exp_rows, out_x, out_scales, out_src, out_local_expert,
                out_weights, row_weights, row_src, out_row_bytes, out_rows, has_weights,
                send_warps),
        ),
        (
            "EpTokenLayout",
            rust_layout!(k::EpTokenLayout; stage_x, stage_scales, stage_meta, recv_base, out_x,
                out_scales, out_topk, out_weights, out_src, row_src, row_slots, out_row_bytes,
                out_rows, payload_only, enabled),
        ),
    ];
    for (name, rust) in cases {
        assert_eq!(
            c_layout(&text, name),
            rust,
            "struct {name}: (fields, size), C then Rust"
        );
    }
}

#[test]
fn constants_match_the_header() {
    let d = defines(&header());
    let rust = [
        ("EP_MAX_WORLD", k::MAX_WORLD as i64),
        ("EP_SIG_DATA2", k::SIG_DATA2 as i64),
        ("EP_NUM_SIGNALS", k::NUM_SIGNALS as i64),
        ("EP_CHUNK_TOKENS", k::CHUNK_TOKENS as i64),
        ("EP_ERR_EXPERT_ID", k::ERR_EXPERT_ID as i64),
        ("EP_ERR_TIMEOUT", k::ERR_TIMEOUT as i64),
        ("EP_ERR_CAPACITY", k::ERR_CAPACITY as i64),
        ("EP_ERR_ROWS", k::ERR_ROWS as i64),
        ("EP_RANK_SHARED_INTS", k::RANK_SHARED_INTS as i64),
    ];
    for (name, value) in rust {
        assert_eq!(d.get(name), Some(&value), "{name}: header, then Rust");
    }
    let sides = enum_values(&kernel_source("moe_ep.cu"), "SideMode");
    let rust = [
        ("SIDE_NONE", k::SIDE_NONE),
        ("SIDE_ROW_K", k::SIDE_ROW_K),
        ("SIDE_ROW_K_OWNED", k::SIDE_ROW_K_OWNED),
        ("SIDE_EXPANDED", k::SIDE_EXPANDED),
    ];
    assert_eq!(sides.len(), rust.len(), "SideMode values: {sides:?}");
    for (name, value) in rust {
        assert_eq!(
            sides.get(name),
            Some(&(value as i64)),
            "{name}: moe_ep.cu, then Rust"
        );
    }
}

#[test]
fn the_layout_parser_reads_arrays_and_padding() {
    let text = "#define N 3\nstruct S {\n    int a;  // one\n    uint64_t b[N];\n    int c;\n};\n";
    let (fields, size) = c_layout(text, "S");
    let expected: Vec<(String, usize)> = [("a", 0), ("b", 8), ("c", 32)]
        .iter()
        .map(|&(f, o)| (f.to_string(), o))
        .collect();
    assert_eq!((fields, size), (expected, 40));
}
