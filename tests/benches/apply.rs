//! Apply and fingerprint speed on a synthetic base of ≥ 1 GiB, next to a plain copy of the
//! base file and raw blake3 over the same bytes, measured in the same run.
//!
//! `cargo bench -p delta-tests --bench apply` (`DELTA_BENCH_LAYERS`, default 6 layers of
//! hidden 2048: 1.1 GiB in f32; the bf16 run uses the same shapes).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use delta_client::apply::{ApplyOptions, LoadedDelta, apply};
use delta_client::tensors::Model;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const HIDDEN: usize = 2048;
const RANK: usize = 16;
const MIB: f64 = (1 << 20) as f64;

fn modules(layers: usize) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for l in 0..layers {
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push((format!("model.layers.{l}.self_attn.{m}"), HIDDEN, HIDDEN));
        }
        out.push((format!("model.layers.{l}.mlp.up_proj"), 4 * HIDDEN, HIDDEN));
        out.push((
            format!("model.layers.{l}.mlp.down_proj"),
            HIDDEN,
            4 * HIDDEN,
        ));
    }
    out
}

fn fill(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

fn write_base(path: &Path, layers: usize, dtype: &str) {
    let dt = if dtype == "BF16" {
        Dtype::BF16
    } else {
        Dtype::F32
    };
    let size = if dtype == "BF16" { 2 } else { 4 };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = modules(layers)
        .into_iter()
        .enumerate()
        .map(|(i, (m, out, inp))| {
            let v = fill(out * inp, i as u32 + 1);
            let mut bytes = vec![0u8; v.len() * size];
            delta_client::numeric::from_f32(dtype, &v, &mut bytes).expect("encode");
            (format!("{m}.weight"), vec![out, inp], bytes)
        })
        .collect();
    let views: Vec<_> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(dt, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write base");
}

fn write_lora(dir: &Path, layers: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut tensors = Vec::new();
    for (i, (m, out, inp)) in modules(layers).into_iter().enumerate() {
        tensors.push((
            format!("{m}.lora_A"),
            vec![RANK, inp],
            delta_client::numeric::f32_bytes(&fill(RANK * inp, 1000 + i as u32)),
        ));
        tensors.push((
            format!("{m}.lora_B"),
            vec![out, RANK],
            delta_client::numeric::f32_bytes(&fill(out * RANK, 2000 + i as u32)),
        ));
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("delta.safetensors"))
        .expect("write lora");
    std::fs::write(
        dir.join("delta.json"),
        format!(r#"{{"method":"lora","config":{{"lora":{{"r":{RANK},"lora_alpha":32}}}}}}"#),
    )
    .expect("write");
}

fn drop_caches_hint() {
    // Page-cache state is left as it is: both sides of every comparison read warm files.
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn main() {
    let layers: usize = std::env::var("DELTA_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let work =
        tempfile::tempdir_in(std::env::var("DELTA_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("tempdir");
    let lora = work.path().join("lora");
    write_lora(&lora, layers);
    println!(
        "| base | size | copy + fsync | apply rank-{RANK} LoRA | apply / copy | raw blake3 (all cores) | fingerprint | fingerprint / blake3 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for dtype in ["F32", "BF16"] {
        let base_path = work.path().join(format!("base-{dtype}.safetensors"));
        write_base(&base_path, layers, dtype);
        let bytes = std::fs::metadata(&base_path).expect("stat").len() as f64;
        drop_caches_hint();

        let copy_path = work.path().join("copy.safetensors");
        let (_, copy) = timed(|| {
            let mut src = std::fs::File::open(&base_path).expect("open");
            let mut dst = std::fs::File::create(&copy_path).expect("create");
            std::io::copy(&mut src, &mut dst).expect("copy");
            dst.flush().expect("flush");
            dst.sync_all().expect("fsync");
        });
        let _ = std::fs::remove_file(&copy_path);

        let (raw, raw_t) = timed(|| {
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&base_path).expect("hash");
            h.finalize()
        });
        std::hint::black_box(raw);
        let model = Model::open(&base_path).expect("open base");
        let (base, fp_t) = timed(|| model.base_record("bench"));
        let fp = base.fingerprint;
        let prepared = delta_client::delta::prepare(&lora, &base).expect("prepare");
        let delta =
            LoadedDelta::open("lora", prepared.manifest.clone(), &prepared.paths).expect("load");
        let out = work.path().join("merged.safetensors");
        let (_, apply_t) = timed(|| {
            apply(
                &model,
                fp,
                std::slice::from_ref(&delta),
                &ApplyOptions {
                    overwrite: true,
                    ..Default::default()
                },
                &out,
            )
            .expect("apply")
        });
        let _ = std::fs::remove_file(&out);
        drop(model);
        let _ = std::fs::remove_file(&base_path);
        println!(
            "| {dtype} | {:.0} MiB | {:.2} s | {:.2} s | {:.2}× | {:.0} MiB/s | {:.0} MiB/s | {:.0}% |",
            bytes / MIB,
            copy.as_secs_f64(),
            apply_t.as_secs_f64(),
            apply_t.as_secs_f64() / copy.as_secs_f64(),
            bytes / MIB / raw_t.as_secs_f64(),
            bytes / MIB / fp_t.as_secs_f64(),
            100.0 * raw_t.as_secs_f64() / fp_t.as_secs_f64(),
        );
    }
}
