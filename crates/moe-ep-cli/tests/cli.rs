//! End-to-end tests of the `moe-ep` binary.

use std::process::{Command, Output};

fn moe_ep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe-ep"))
        .args(args)
        .output()
        .expect("run moe-ep")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const TINY: &[&str] = &[
    "bench",
    "--world",
    "2",
    "--hidden",
    "64",
    "--num-experts",
    "8",
    "--topk",
    "2",
    "--tokens",
    "0,1,7",
    "--iters",
    "2",
    "--warmup",
    "1",
];

/// The first table printed (latency), as rows of cells, header included.
fn first_table(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("|-"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The latency table's data rows as (T, check) pairs.
fn table_rows(stdout: &str) -> Vec<(String, String)> {
    first_table(stdout)
        .into_iter()
        .skip(1)
        .map(|cells| (cells[0].clone(), cells[cells.len() - 1].clone()))
        .collect()
}

/// `TINY` with the flags of `extra` (`--flag value` pairs, or a lone `--flag`) replacing its own.
fn tiny_with(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = TINY.iter().map(|s| s.to_string()).collect();
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let value = extra.get(i + 1).filter(|v| !v.starts_with("--"));
        i += 1 + usize::from(value.is_some());
        match (args.iter().position(|a| a == flag), value) {
            (Some(at), Some(v)) => args[at + 1] = v.to_string(),
            (_, v) => {
                args.push(flag.to_string());
                args.extend(v.map(|v| v.to_string()));
            }
        }
    }
    args
}

fn tiny_bench_passes(extra: &[&str]) -> String {
    let args = tiny_with(extra);
    let o = moe_ep(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (out, err) = text(&o);
    assert!(o.status.success(), "exit {:?}\n{out}\n{err}", o.status);
    let rows = table_rows(&out);
    let ts: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(ts, ["0", "1", "7"], "{out}");
    for (t, check) in &rows {
        assert_eq!(check, "ok", "T={t}\n{out}");
    }
    out
}

#[test]
fn bench_token_major() {
    let out = tiny_bench_passes(&[]);
    let header = out.lines().next().unwrap();
    for part in [
        "backend cpu",
        "world 2",
        "H 64",
        "E 8",
        "K 2",
        "bf16",
        "token-major",
    ] {
        assert!(header.contains(part), "{part} missing from: {header}");
    }
}

#[test]
fn bench_expert_major() {
    let out = tiny_bench_passes(&["--layout", "expert-major", "--align", "4"]);
    assert!(out.lines().next().unwrap().contains("expert-major"));
}

#[test]
fn bench_starts_held_or_queued() {
    // The CPU backend has no stream to hold: both run and check alike.
    tiny_bench_passes(&["--start", "held"]);
    tiny_bench_passes(&["--start", "queued"]);
    let o = moe_ep(
        &tiny_with(&["--start", "later"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("invalid value 'later' for '--start <START>'"),
        "{err}"
    );
}

#[test]
fn bench_other_dtypes() {
    for dtype in ["f16", "f32", "fp8_e4m3"] {
        tiny_bench_passes(&["--dtype", dtype, "--layout", "expert-major"]);
    }
    tiny_bench_passes(&["--dtype", "fp8", "--backend", "cpu", "--seed", "7"]);
}

#[test]
fn bench_writes_json() {
    let dir = std::env::temp_dir().join(format!("moe-ep-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench.json");
    tiny_bench_passes(&["--json", path.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(v["config"]["world"], 2);
    assert_eq!(v["config"]["dtype"], "bf16");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (r, t) in results.iter().zip([0, 1, 7]) {
        assert_eq!(r["tokens"], t);
        assert_eq!(r["check"], "ok");
        assert_eq!(r["check_ok"], true);
        assert_eq!(r["dispatch"]["samples_us"].as_array().unwrap().len(), 2);
        assert_eq!(r["combine"]["samples_us"].as_array().unwrap().len(), 2);
        let median = r["dispatch"]["median_us"].as_f64().unwrap();
        let (min, max) = (
            r["dispatch"]["min_us"].as_f64().unwrap(),
            r["dispatch"]["max_us"].as_f64().unwrap(),
        );
        assert!(min <= median && median <= max);
        assert!(r["dispatch_bytes_per_rank"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(results[0]["dispatch_bytes_per_rank"], 0.0);
}

#[test]
fn bench_json_keeps_every_new_figure() {
    let dir = std::env::temp_dir().join(format!("moe-ep-cli-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench.json");
    tiny_bench_passes(&["--backend", "cpu", "--json", path.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(v["config"]["timing"], "the host clock");
    assert_eq!(
        v["baselines"]["requested"],
        serde_json::json!(["nccl", "allgather", "ceiling"])
    );
    let skipped = v["baselines"]["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    for s in skipped {
        assert!(s[1].as_str().unwrap().contains("cpu backend"), "{s}");
    }
    for r in v["results"].as_array().unwrap() {
        for op in ["dispatch", "cached_dispatch", "combine", "end_to_end"] {
            assert_eq!(r[op]["samples_us"].as_array().unwrap().len(), 2, "{op}");
        }
        for figure in [
            "remote_rows_per_rank",
            "received_rows_per_rank",
            "dispatch_logical_bytes_per_rank",
            "combine_logical_bytes_per_rank",
            "dispatch_gb_per_s",
            "cached_dispatch_gb_per_s",
            "end_to_end_gb_per_s",
            "dispatch_logical_gb_per_s",
            "combine_logical_gb_per_s",
            "end_to_end_logical_gb_per_s",
        ] {
            assert!(r[figure].as_f64().unwrap() >= 0.0, "{figure}");
        }
        // Own tokens count as received: at least as many rows as the remote ones.
        assert!(
            r["received_rows_per_rank"].as_f64().unwrap()
                >= r["remote_rows_per_rank"].as_f64().unwrap()
        );
        assert_eq!(r["baselines"], serde_json::json!([]));
        assert!(r["ceiling"].is_null());
    }
}

#[test]
fn cpu_bench_has_every_column_and_says_why_baselines_skip() {
    let out = tiny_bench_passes(&["--backend", "cpu"]);
    let header = &first_table(&out)[0];
    for column in [
        "dispatch",
        "cached",
        "combine",
        "end-to-end",
        "nccl dispatch",
        "nccl combine",
        "nccl e2e",
        "allgather dispatch",
        "allgather combine",
        "allgather e2e",
        "ceiling",
        "check",
    ] {
        assert!(
            header.iter().any(|c| c == column),
            "no `{column}` in {header:?}"
        );
    }
    for title in [
        "dispatch remote",
        "dispatch logical",
        "combine logical",
        "ceiling remote",
        "dispatch % ceil",
        "vs nccl e2e",
        "vs allgather dispatch",
        "x nccl e2e",
    ] {
        assert!(out.contains(title), "no `{title}` column:\n{out}");
    }
    let skip = out
        .lines()
        .find(|l| l.starts_with("baselines nccl, allgather, ceiling skipped: "))
        .unwrap_or_else(|| panic!("no skip line:\n{out}"));
    assert!(skip.contains("cpu backend"), "{skip}");
    // The baselines' cells say they did not run.
    for row in first_table(&out).iter().skip(1) {
        assert_eq!(row[5..12], ["-"; 7], "{row:?}");
    }
    assert!(out.lines().any(|l| l == "Summary"), "{out}");

    let none = tiny_bench_passes(&["--baselines", "none"]);
    assert!(
        none.contains("baselines: none (--baselines none)"),
        "{none}"
    );
    assert!(!none.contains("skipped"), "{none}");
    let some = tiny_bench_passes(&["--baselines", "ceiling"]);
    assert!(
        some.lines()
            .any(|l| l.starts_with("baseline ceiling skipped: ")),
        "{some}"
    );
}

#[test]
fn num_sms_reaches_the_config() {
    let out = tiny_bench_passes(&["--num-sms", "8"]);
    assert!(out.lines().next().unwrap().contains(", 8 SMs;"), "{out}");
}

#[test]
fn failed_check_prints_the_table_and_exits_1() {
    let args = tiny_with(&["--inject-mismatch"]);
    let o = moe_ep(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let rows = table_rows(&out);
    assert_eq!(rows.len(), 3, "{out}");
    // T=0 has no output to corrupt; T=1 and T=7 fail on the last rank's combine.
    assert_eq!(rows[0].1, "ok");
    for (t, check) in &rows[1..] {
        assert!(check.starts_with("combine rank 1"), "T={t}: {check}");
    }
    assert!(err.contains("error: check failed for T=1"), "{err}");
}

#[test]
fn info_lists_cpu() {
    let o = moe_ep(&["info"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let cpu = out
        .lines()
        .find(|l| l.starts_with("| cpu"))
        .unwrap_or_else(|| panic!("no cpu row:\n{out}"));
    assert!(cpu.contains("| yes"), "{cpu}");
    assert!(out.lines().any(|l| l.starts_with("| cuda")), "{out}");
    assert!(out.contains("CUDA devices"), "{out}");
}

/// Runs `bench` with `args` replacing the tiny defaults' values, expecting failure with a message
/// naming `flag`.
fn bad(args: &[&str], flag: &str, code: i32) {
    let full = tiny_with(args);
    let o = moe_ep(&full.iter().map(String::as_str).collect::<Vec<_>>());
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}\n{out}\n{err}");
    assert!(
        err.contains(flag),
        "{args:?}: message does not name {flag}:\n{err}"
    );
}

#[test]
fn bad_flags_are_named() {
    // clap-level: exit 2.
    bad(&["--dtype", "f64"], "--dtype", 2);
    bad(&["--dtype", "i32"], "--dtype", 2);
    bad(&["--tokens", "1,,2"], "--tokens", 2);
    bad(&["--tokens", ""], "--tokens", 2);
    bad(&["--tokens", "1,x"], "--tokens", 2);
    bad(&["--tokens", "4294967296"], "--tokens", 2);
    bad(&["--world", "0"], "--world", 2);
    bad(&["--topk", "0"], "--topk", 2);
    bad(&["--layout", "diagonal"], "--layout", 2);
    bad(&["--backend", "tpu"], "--backend", 2);
    bad(&["--baselines", "deepep"], "--baselines", 2);
    bad(&["--num-sms", "0"], "--num-sms", 2);
    bad(&["--frobnicate"], "--frobnicate", 2);
    // Checks across flags and library errors: `error: ...`, exit 1.
    bad(&["--world", "3"], "--num-experts", 1);
    bad(&["--topk", "9"], "--topk", 1);
    bad(&["--topk", "65", "--num-experts", "128"], "--topk", 1);
    bad(&["--align", "4"], "--align", 1);
}

#[test]
fn cuda_backend_is_refused_with_the_reason() {
    let o = moe_ep(&[TINY, &["--backend", "cuda"]].concat());
    // (TINY has no --backend, so appending is enough.)
    let (out, err) = text(&o);
    if o.status.success() {
        // A machine with a working CUDA backend: nothing to check here.
        return;
    }
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.starts_with("error: --backend cuda"), "{err}");
    assert!(
        err.contains("unavailable") || err.contains("cannot run"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
}

#[test]
fn readme_example_is_the_compiled_one() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/readme.rs");
    let body = &example[example.find("use half::bf16;").unwrap()..];
    let body = body.replace("#[rustfmt::skip]\n", "");
    assert!(
        readme.contains(&format!("```rust\n{body}```")),
        "README.md's API example differs from crates/moe-ep-cli/examples/readme.rs"
    );
}

#[test]
fn zipf_routing_runs_and_checks() {
    let args = tiny_with(&["--routing", "zipf", "--zipf-exponent", "1.5"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = moe_ep(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("routing zipf (exponent 1.5)"), "{stdout}");
    for (t, check) in table_rows(&stdout) {
        assert_eq!(check, "ok", "T={t}: {stdout}");
    }
}

/// A routing trace: `rank0` i32 `[5, 2]` and `rank1` i64 `[3, 2]` with dropped slots.
fn write_trace(path: &std::path::Path, rank1_name: &str, k: usize) {
    use safetensors::{serialize_to_file, Dtype, View};
    use std::borrow::Cow;
    struct Ids {
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    }
    impl View for &Ids {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.bytes)
        }
        fn data_len(&self) -> usize {
            self.bytes.len()
        }
    }
    let r0: Vec<i32> = vec![0, 7, 3, 4, -1, 5, 6, 1, 2, -1];
    let r1: Vec<i64> = vec![7, 6, -1, -1, 0, 1];
    let ids = [
        Ids {
            dtype: Dtype::I32,
            shape: vec![r0.len() / k, k],
            bytes: r0.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
        Ids {
            dtype: Dtype::I64,
            shape: vec![r1.len() / k, k],
            bytes: r1.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    ];
    let tensors = [
        ("rank0".to_string(), &ids[0]),
        (rank1_name.to_string(), &ids[1]),
    ];
    serialize_to_file(tensors, None, path).expect("write the trace");
}

/// A world-2 bench of `trace` with `--topk k` (no `--tokens`: the trace fixes T).
fn trace_bench(trace: &std::path::Path, k: &str) -> Output {
    moe_ep(&[
        "bench",
        "--world",
        "2",
        "--hidden",
        "64",
        "--num-experts",
        "8",
        "--topk",
        k,
        "--routing",
        trace.to_str().unwrap(),
    ])
}

#[test]
fn a_routing_trace_replaces_the_synthetic_routing() {
    let dir = std::env::temp_dir().join(format!("moe-ep-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("trace.safetensors");
    write_trace(&good, "rank1", 2);
    let args = tiny_with(&["--routing", good.to_str().unwrap()]);
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--tokens" && *a != "0,1,7")
        .collect();
    let out = moe_ep(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("routing trace"), "{stdout}");
    assert_eq!(
        table_rows(&stdout),
        vec![("5".to_string(), "ok".to_string())],
        "{stdout}"
    );

    // --tokens cannot be combined with a trace, which fixes T.
    let with_tokens = tiny_with(&["--routing", good.to_str().unwrap()]);
    let with_tokens: Vec<&str> = with_tokens.iter().map(String::as_str).collect();
    let out = moe_ep(&with_tokens);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("--tokens: a routing trace fixes"),
        "{}",
        text(&out).1
    );

    // A missing rank and a wrong K are named.
    let missing = dir.join("missing.safetensors");
    write_trace(&missing, "rank7", 2);
    let out = trace_bench(&missing, "2");
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("expected a tensor `rank1`"),
        "{}",
        text(&out).1
    );
    let out = trace_bench(&good, "1");
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("`rank0`: expected shape [T, 1] (--topk), got [5, 2]"),
        "{}",
        text(&out).1
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_routing_values_name_the_flag() {
    for (flag, value) in [
        ("--routing", "skewed"),
        ("--zipf-exponent", "0"),
        ("--zipf-exponent", "-1"),
    ] {
        let out = moe_ep(&["bench", flag, value]);
        assert!(!out.status.success(), "{flag} {value}");
        assert!(
            text(&out).1.contains(flag),
            "{flag} {value}: {}",
            text(&out).1
        );
    }
}

#[test]
fn plot_writes_an_svg_of_the_medians() {
    let path = std::env::temp_dir().join(format!("moe-ep-plot-{}.svg", std::process::id()));
    let args = tiny_with(&["--plot", path.to_str().unwrap()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = moe_ep(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    let svg = std::fs::read_to_string(&path).expect("the plot was written");
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(80)]
    );
    for label in [
        "dispatch",
        "combine",
        "tokens per rank (T)",
        "median time per call (us)",
    ] {
        assert!(svg.contains(label), "the plot has no `{label}`");
    }
    std::fs::remove_file(&path).ok();
}
