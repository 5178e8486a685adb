//! The CUDA attention kernels against the CPU backend on random data, in every kernel
//! path (tensor-core prefill at head_dim 64/128, split-K decode with the splits merged
//! in the kernel or by `attn_combine`, tensor-core decode, MQA/GQA/MHA, ALiBi, chunked
//! prefill mixed with decode rows, non-contiguous block tables), and a verify pass's
//! rows against one-token steps bit for bit.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use falconer_engine::backend::cuda::kernels::{ATTN_SPLIT_KEYS, ATTN_TC_MIN_CTX};
use falconer_engine::backend::{AttnConfig, Backend, KvLayout, SeqMeta, StepMeta};
use falconer_engine::config::{RopeConfig, RopeScaling};
use falconer_engine::posenc::{alibi, rope::Rope};
use falconer_engine::CpuBackend;

use crate::common::rel_err;
use crate::cuda_golden::{backend, random, report, same_bits, TOL};

/// The step of `rows` tokens at `start` of one sequence whose cache blocks are `table`
/// (blocks of `bs` slots), with rotary tables when `rope` is given.
pub(crate) fn one_sequence_step(
    table: &[u32],
    bs: usize,
    start: usize,
    rows: usize,
    rope: Option<&Rope>,
) -> StepMeta {
    let mut m = StepMeta {
        block_size: bs,
        ..StepMeta::default()
    };
    m.seqs.push(SeqMeta {
        first_row: 0,
        num_rows: rows,
        start_pos: start,
        block_table: table.to_vec(),
    });
    for pos in start..start + rows {
        m.token_ids.push(0);
        m.slots
            .push(table[pos / bs] * bs as u32 + (pos % bs) as u32);
        if let Some(r) = rope {
            r.push_cos_sin(pos, pos + 1, &mut m.rope_cos, &mut m.rope_sin);
        }
    }
    m
}

/// Attention without ALiBi over a one-layer cache of 96 blocks of `bs` slots.
fn geometry(nh: usize, kvh: usize, hd: usize, bs: usize) -> (AttnConfig, KvLayout) {
    let attn = AttnConfig {
        num_heads: nh,
        num_kv_heads: kvh,
        head_dim: hd,
        alibi_slopes: None,
    };
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 96,
        block_size: bs,
        num_kv_heads: kvh,
        head_dim: hd,
    };
    (attn, layout)
}

/// One sequence chunk of an attention step: `rows` new tokens at `start`.
struct Chunk {
    seq: usize,
    start: usize,
    rows: usize,
}

/// Runs a series of attention steps over one layer's cache on `backend`, returning
/// each step's output; step `si`'s qkv rows are random from `seed + si`.
fn run_attention<B: Backend>(
    backend: &B,
    steps: &[Vec<Chunk>],
    tables: &[Vec<u32>],
    attn: &AttnConfig,
    layout: &KvLayout,
    rope: Option<&Rope>,
    seed: u64,
) -> Vec<Vec<f32>> {
    let input = |si: usize, n: usize| random(n, seed + si as u64);
    run_attention_on(backend, steps, tables, attn, layout, rope, input)
}

/// [`run_attention`] with step `si`'s `n` qkv values from `input(si, n)`.
fn run_attention_on<B: Backend>(
    backend: &B,
    steps: &[Vec<Chunk>],
    tables: &[Vec<u32>],
    attn: &AttnConfig,
    layout: &KvLayout,
    rope: Option<&Rope>,
    input: impl Fn(usize, usize) -> Vec<f32>,
) -> Vec<Vec<f32>> {
    let mut kv = backend.alloc_kv(layout).unwrap();
    let width = attn.num_kv_heads * (attn.num_heads / attn.num_kv_heads + 2) * attn.head_dim;
    let bs = layout.block_size;
    let mut outs = Vec::new();
    for (si, chunks) in steps.iter().enumerate() {
        let mut meta = StepMeta {
            block_size: bs,
            ..StepMeta::default()
        };
        for c in chunks {
            let table = &tables[c.seq];
            meta.seqs.push(SeqMeta {
                first_row: meta.token_ids.len(),
                num_rows: c.rows,
                start_pos: c.start,
                block_table: table.clone(),
            });
            for pos in c.start..c.start + c.rows {
                meta.token_ids.push(0);
                meta.slots
                    .push(table[pos / bs] * bs as u32 + (pos % bs) as u32);
                if let Some(r) = rope {
                    r.push_cos_sin(pos, pos + 1, &mut meta.rope_cos, &mut meta.rope_sin);
                }
            }
        }
        let rows = meta.token_ids.len();
        let qkv = input(si, rows * width);
        let step = backend.prepare_step(&meta).unwrap();
        let x = backend.upload_hidden(&qkv, rows, width).unwrap();
        let out = backend.attention(&x, &mut kv, 0, &step, attn).unwrap();
        outs.push(backend.to_host(&out).unwrap());
    }
    outs
}

#[test]
fn cuda_attention_matches_cpu_in_every_kernel_path() {
    let Some(b) = backend() else { return };
    let merge_default = b.gpu().fuse_combine();
    let cpu = CpuBackend::new();
    // (heads, kv heads, head dim, alibi)
    let geometries = [
        (8usize, 2usize, 64usize, false),
        (71, 1, 64, false),
        (32, 1, 128, true),
        (4, 4, 128, true),
        (6, 2, 8, true),
        (6, 3, 16, false),
        // Tensor-core decode: two head tiles (128 + 32), four and two key groups.
        (160, 1, 64, true),
        (64, 2, 64, false),
        (48, 1, 128, false),
    ];
    let bs = 16;
    let num_blocks = 96;
    // Two sequences with scattered, non-contiguous blocks.
    let tables: Vec<Vec<u32>> = vec![
        (0..40).map(|i| (i * 7 + 3) % 96).collect(),
        (0..40).map(|i| (i * 7 + 5) % 96).collect(),
    ];
    let steps = vec![
        // Prefill of 100 rows (tensor cores where the head dim allows).
        vec![Chunk {
            seq: 0,
            start: 0,
            rows: 100,
        }],
        // Chunked prefill continuing it, batched with a short chunk of another sequence.
        vec![
            Chunk {
                seq: 0,
                start: 100,
                rows: 40,
            },
            Chunk {
                seq: 1,
                start: 0,
                rows: 3,
            },
        ],
        // Verify-sized chunk and a one-token decode.
        vec![
            Chunk {
                seq: 1,
                start: 3,
                rows: 5,
            },
            Chunk {
                seq: 0,
                start: 140,
                rows: 1,
            },
        ],
        // Long single-row decode: split-K.
        vec![Chunk {
            seq: 1,
            start: 8,
            rows: 500,
        }],
        vec![Chunk {
            seq: 1,
            start: 508,
            rows: 1,
        }],
    ];
    let mut failures = Vec::new();
    for (nh, kvh, hd, use_alibi) in geometries {
        let attn = AttnConfig {
            num_heads: nh,
            num_kv_heads: kvh,
            head_dim: hd,
            alibi_slopes: use_alibi.then(|| alibi::slopes(nh)),
        };
        let layout = KvLayout {
            num_layers: 1,
            num_blocks,
            block_size: bs,
            num_kv_heads: kvh,
            head_dim: hd,
        };
        let rope_cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let rope = (!use_alibi).then(|| Rope::new(&rope_cfg, hd));
        let want = run_attention(&cpu, &steps, &tables, &attn, &layout, rope.as_ref(), 11);
        // Decode rows on the f32 kernel (short contexts, the default), then on the
        // tensor-core decode kernel wherever the geometry allows (many heads per kv head).
        // Split rows on the f32 kernel merged by attn_combine too, and in longer splits
        // (the 509-key context in two splits of 256 and one of 512).
        for (tc_min_ctx, merge, keys) in [
            (ATTN_TC_MIN_CTX, true, ATTN_SPLIT_KEYS),
            (0, true, ATTN_SPLIT_KEYS),
            (ATTN_TC_MIN_CTX, false, ATTN_SPLIT_KEYS),
            (ATTN_TC_MIN_CTX, false, 256),
            (ATTN_TC_MIN_CTX, true, 512),
        ] {
            b.gpu().set_attn_tc_min_ctx(tc_min_ctx);
            b.gpu().set_fuse_combine(merge);
            b.gpu().set_attn_split_keys(keys).unwrap();
            let got = run_attention(&*b, &steps, &tables, &attn, &layout, rope.as_ref(), 11);
            let errs: Vec<f32> = got.iter().zip(&want).map(|(g, w)| rel_err(g, w)).collect();
            let shown: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
            println!(
                "attention {nh} heads / {kvh} kv x {hd}, alibi {use_alibi}, tc decode from \
                 ctx {tc_min_ctx}, splits merged in the kernel {merge}, {keys} keys a \
                 split: rel err per step {}",
                shown.join(" ")
            );
            if errs.iter().any(|&e| e >= TOL) {
                failures.push(format!(
                    "{nh}/{kvh}x{hd} alibi={use_alibi} tc from {tc_min_ctx} merge {merge} \
                     keys {keys}: {}",
                    shown.join(" ")
                ));
            }
        }
        b.gpu().set_attn_split_keys(ATTN_SPLIT_KEYS).unwrap();
        b.gpu().set_fuse_combine(merge_default);
        b.gpu().set_attn_tc_min_ctx(ATTN_TC_MIN_CTX);
    }
    report("attention vs CPU", &failures);
}

/// A verify pass gives every row of attention exactly the bits a one-token step gives
/// it: contexts that cross a split boundary (64 keys on CUDA cores, 256 on tensor
/// cores) and the tensor-core threshold, for MQA (tensor-core decode) and GQA.
#[test]
fn cuda_attention_rows_are_the_same_bits_in_any_step() {
    let Some(b) = backend() else { return };
    let merge_default = b.gpu().fuse_combine();
    for bad in [0, 32, 100, 8192] {
        assert!(
            b.gpu().set_attn_split_keys(bad).is_err(),
            "{bad} keys a split must be refused"
        );
    }
    assert_eq!(b.gpu().attn_split_keys(), ATTN_SPLIT_KEYS);
    let bs = 16;
    let table: Vec<u32> = (0..96).map(|i| (i * 7 + 3) % 96).collect();
    // (heads, kv heads, head dim, prefix length, tensor-core threshold)
    let cases = [
        (71usize, 1usize, 64usize, 61usize, 1024usize),
        (71, 1, 64, 1278, 1024),
        (71, 1, 64, 1021, 1024),
        (8, 2, 64, 125, 1024),
        (32, 1, 128, 253, 0),
        (64, 2, 64, 509, 0),
        (160, 1, 64, 253, 0),
        (48, 1, 128, 765, 0),
    ];
    // Split rows merged by the CUDA-core decode kernel itself or by attn_combine (the
    // default), in the default splits and in splits of 256 keys.
    let runs = [
        (true, ATTN_SPLIT_KEYS),
        (false, ATTN_SPLIT_KEYS),
        (false, 256),
    ]
    .into_iter()
    .flat_map(|setting| cases.map(|c| (setting, c)));
    for ((merge, keys), (nh, kvh, hd, prefix, tc_from)) in runs {
        b.gpu().set_fuse_combine(merge);
        b.gpu().set_attn_split_keys(keys).unwrap();
        b.gpu().set_attn_tc_min_ctx(tc_from);
        let (attn, layout) = geometry(nh, kvh, hd, bs);
        let width = kvh * (nh / kvh + 2) * hd;
        let meta = |start: usize, rows: usize| one_sequence_step(&table, bs, start, rows, None);
        let attend = |kv: &mut _, start: usize, qkv: &[f32], rows: usize| {
            let step = b.prepare_step(&meta(start, rows)).unwrap();
            let x = b.upload_hidden(qkv, rows, width).unwrap();
            b.to_host(&b.attention(&x, kv, 0, &step, &attn).unwrap())
                .unwrap()
        };
        let pre = random(prefix * width, 5);
        let new = random(5 * width, 6);
        let mut kv1 = b.alloc_kv(&layout).unwrap();
        let mut kv2 = b.alloc_kv(&layout).unwrap();
        attend(&mut kv1, 0, &pre, prefix);
        attend(&mut kv2, 0, &pre, prefix);
        let verify = attend(&mut kv1, prefix, &new, 5);
        let out_w = nh * hd;
        for i in 0..5 {
            let one = attend(&mut kv2, prefix + i, &new[i * width..(i + 1) * width], 1);
            let row = &verify[i * out_w..(i + 1) * out_w];
            assert!(
                same_bits(row, &one),
                "{nh}/{kvh}x{hd}, context {}, splits merged in the kernel {merge}, {keys} \
                 keys a split: the verify row differs from the one-token step",
                prefix + i + 1
            );
        }
    }
    b.gpu().set_attn_split_keys(ATTN_SPLIT_KEYS).unwrap();
    b.gpu().set_fuse_combine(merge_default);
    b.gpu().set_attn_tc_min_ctx(ATTN_TC_MIN_CTX);
}

/// The decode kernels load a context's keys before waiting for the kernel before them
/// (PDL), all but the keys their own step writes: a step that rewrites the slots of a
/// step of huge keys and values sees its own keys, none of the slots' old contents.
/// Verify-sized and one-token steps, across a tile and split boundary, on the
/// tensor-core and CUDA-core decode kernels. (It guards the results, not the race
/// itself: a build that loaded every key before the wait passed it too on an H100, the
/// kernel before writing its few keys well before this one's loads land.)
#[test]
fn cuda_attention_reads_its_steps_keys_not_the_slots_old_contents() {
    let Some(b) = backend() else { return };
    let early_default = b.gpu().early_kv();
    let cpu = CpuBackend::new();
    let bs = 16;
    let tables = vec![(0..96u32).map(|i| (i * 7 + 3) % 96).collect::<Vec<u32>>()];
    let rope_cfg = RopeConfig {
        theta: 10_000.0,
        scaling: RopeScaling::None,
    };
    // (heads, kv heads, head dim, tensor-core threshold): MQA on either decode kernel,
    // GQA on the CUDA-core one.
    let cases = [
        (71usize, 1usize, 64usize, 0usize),
        (71, 1, 64, ATTN_TC_MIN_CTX),
        (8, 2, 128, ATTN_TC_MIN_CTX),
    ];
    // (start, rows) of each step: a prefill, then pairs of steps over the same slots,
    // the first of each pair with keys and values a thousand times larger. Keys 318..323
    // cross a tile boundary (32 and 64 keys) and both kernels' splits end past it.
    let steps = [(0usize, 318usize), (318, 5), (318, 5), (323, 1), (323, 1)];
    let chunks: Vec<Vec<Chunk>> = steps
        .iter()
        .map(|&(start, rows)| {
            vec![Chunk {
                seq: 0,
                start,
                rows,
            }]
        })
        .collect();
    let input = |si: usize, n: usize| -> Vec<f32> {
        let scale = if si % 2 == 1 { 1000.0 } else { 1.0 };
        random(n, 40 + si as u64)
            .into_iter()
            .map(|v| v * scale)
            .collect()
    };
    let mut failures = Vec::new();
    for (nh, kvh, hd, tc_from) in cases {
        b.gpu().set_attn_tc_min_ctx(tc_from);
        let (attn, layout) = geometry(nh, kvh, hd, bs);
        let rope = Some(Rope::new(&rope_cfg, hd));
        let want = run_attention_on(&cpu, &chunks, &tables, &attn, &layout, rope.as_ref(), input);
        // Every key after the wait: the same bits.
        b.gpu().set_early_kv(false);
        let late = run_attention_on(&*b, &chunks, &tables, &attn, &layout, rope.as_ref(), input);
        b.gpu().set_early_kv(early_default);
        for repeat in 0..3 {
            let got = run_attention_on(&*b, &chunks, &tables, &attn, &layout, rope.as_ref(), input);
            if got.iter().zip(&late).any(|(g, l)| !same_bits(g, l)) {
                failures.push(format!(
                    "{nh}/{kvh}x{hd}, tc from {tc_from}, repeat {repeat}: other bits than \
                     with every key loaded after the wait"
                ));
            }
            for i in [2, 4] {
                let e = rel_err(&got[i], &want[i]);
                if e.is_nan() || e >= TOL {
                    failures.push(format!(
                        "{nh}/{kvh}x{hd}, tc from {tc_from}, repeat {repeat}: step of {} rows \
                         at {}: rel err {e:.2e}",
                        steps[i].1, steps[i].0
                    ));
                }
            }
        }
    }
    b.gpu().set_attn_tc_min_ctx(ATTN_TC_MIN_CTX);
    report("attention over rewritten slots", &failures);
}
