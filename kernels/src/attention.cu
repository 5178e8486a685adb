// Causal attention over the paged bf16 KV cache (after rope_qkv has written this step's
// keys and values), for any grouping of query heads over kv heads (MHA, GQA, MQA).
//
// Step metadata (uploaded once per step):
//   row_info    [rows][2]  = (sequence index, position) of each token row
//   seq_info    [seqs][4]  = (first_row, num_rows, start_pos, block table offset)
//   block_tables           = every sequence's block ids, concatenated
//
// attn_decode: one block per (row, kv group x head chunk, key split), CUDA cores, f32
//   math, online softmax; the heads of a chunk share each K/V tile loaded to shared
//   memory. With several splits (flash-decoding over long contexts) partial results go
//   to attn_combine, or the last split's block merges them (merge_splits_if_last). Used for decode/verify rows and for any head_dim.
// attn_prefill_tc<HD>: flash-attention on bf16 tensor cores (mma.m16n8k16) for long
//   chunks of one sequence (prefill), 64 query rows x one head per block.
// attn_decode_tc<HD> (attention_tc_decode.cu, after this file): decode rows over long
//   contexts with many query heads per kv head, on tensor cores.

#define DEC_TK 32
#define DEC_WARPS 8

// With several key splits and `counters` given, the last block of a (row, head chunk)
// to store its split merges all of them into `out` (the other blocks only store), so
// that no attn_combine launch follows the decode kernel. One warp per head: the split
// weights exp(m_z - m), then every output column summed over the splits in four
// accumulators by z % 4 and one fixed tree. Splits without keys (weight 0, zero sums)
// change no bit, so a row gets the same result whatever its step's split count, and
// for a single non-empty split exactly the direct path's acc * (1 / l). `counters`:
// one zeroed u32 per block of the (rows, head chunks) grid; the last block re-zeroes
// its own. Reads the partials through L2: other blocks wrote them.
__device__ __forceinline__ void merge_splits_if_last(u32* __restrict__ counters,
                                                     const float* __restrict__ part_o,
                                                     const float* __restrict__ part_ml,
                                                     float* __restrict__ out, int r, int h0,
                                                     int nhb, int nh, int hd, int nsplit) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* c = counters + (size_t)blockIdx.x * gridDim.y + blockIdx.y;
        last = atomicAdd(c, 1u) == (u32)nsplit - 1;
        if (last) *c = 0u;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int hh = warp; hh < nhb; hh += blockDim.x >> 5) {
        const size_t base = ((size_t)r * nh + h0 + hh) * nsplit;
        float m = NEG_INF;
        for (int z = lane; z < nsplit; z += 32) m = fmaxf(m, __ldcg(part_ml + 2 * (base + z)));
        m = warp_max(m);
        float l = 0.0f;
        for (int z = lane; z < nsplit; z += 32) {
            const float mz = __ldcg(part_ml + 2 * (base + z));
            l += __ldcg(part_ml + 2 * (base + z) + 1) * (mz == NEG_INF ? 0.0f : expf(mz - m));
        }
        const float inv = 1.0f / warp_sum(l);
        for (int d = lane; d < hd; d += 32) {
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int z = 0; z < nsplit; z++) {
                const float mz = __ldcg(part_ml + 2 * (base + z));
                const float w = mz == NEG_INF ? 0.0f : expf(mz - m);
                a[z & 3] = fmaf(__ldcg(part_o + (base + z) * hd + d), w, a[z & 3]);
            }
            out[((size_t)r * nh + h0 + hh) * hd + d] = ((a[0] + a[1]) + (a[2] + a[3])) * inv;
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)
    attn_decode(const float* __restrict__ q, const bf16_t* __restrict__ kc,
                const bf16_t* __restrict__ vc, u64 layer_off, const u32* __restrict__ row_list,
                const u32* __restrict__ row_info, const u32* __restrict__ seq_info,
                const u32* __restrict__ block_tables, int block_size,
                const float* __restrict__ slopes, int has_alibi, float* __restrict__ out,
                float* __restrict__ part_o, float* __restrict__ part_ml, int nh, int kvh, int hd,
                int hb, int keys_per_split, float scale, u32* __restrict__ counters) { PDL_ENTER();
    extern __shared__ float smem[];
    const int r = row_list[blockIdx.x];
    const int qpg = nh / kvh;
    const int chunks = (qpg + hb - 1) / hb;
    const int g = blockIdx.y / chunks, hc = blockIdx.y % chunks;
    const int h0 = g * qpg + hc * hb;
    const int nhb = min(hb, qpg - hc * hb);
    const int seq = row_info[2 * r], pos = row_info[2 * r + 1];
    const u32 bt_off = seq_info[4 * seq + 3];
    const int nsplit = gridDim.z, split = blockIdx.z;
    const int k_begin = split * keys_per_split;
    const int k_end = min(pos + 1, k_begin + keys_per_split);

    float* q_s = smem;                       // [hb][hd]
    float* acc_s = q_s + hb * hd;            // [hb][hd]
    float* k_s = acc_s + hb * hd;            // [DEC_TK][hd + 1] (padded: lane-per-key reads)
    float* v_s = k_s + DEC_TK * (hd + 1);    // [DEC_TK][hd]
    float* m_s = v_s + DEC_TK * hd;          // [hb]
    float* l_s = m_s + hb;                   // [hb]
    float* p_s = l_s + hb;                   // [DEC_WARPS][32]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    for (int i = tid; i < nhb * hd; i += blockDim.x) {
        q_s[i] = q[((size_t)r * nh + h0) * hd + i];
        acc_s[i] = 0.0f;
    }
    for (int i = tid; i < nhb; i += blockDim.x) {
        m_s[i] = NEG_INF;
        l_s[i] = 0.0f;
    }
    for (int t = k_begin; t < k_end; t += DEC_TK) {
        __syncthreads();
        for (int i = tid; i < DEC_TK * hd; i += blockDim.x) {
            const int j = i / hd, d = i - j * hd;
            const int key = t + j;
            float kv = 0.0f, vv = 0.0f;
            if (key < k_end) {
                const u64 slot = (u64)block_tables[bt_off + key / block_size] * block_size + key % block_size;
                const u64 off = layer_off + (slot * kvh + g) * hd + d;
                kv = bf2f(kc[off]);
                vv = bf2f(vc[off]);
            }
            k_s[j * (hd + 1) + d] = kv;
            v_s[j * hd + d] = vv;
        }
        __syncthreads();
        const int key = t + lane;
        const bool valid = key < k_end;
        for (int hh = warp; hh < nhb; hh += DEC_WARPS) {
            float s = NEG_INF;
            if (valid) {
                const float* qh = q_s + hh * hd;
                const float* kr = k_s + lane * (hd + 1);
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot = fmaf(qh[d], kr[d], dot);
                s = dot * scale;
                if (has_alibi) s += alibi_bias(slopes[h0 + hh], key, hd);
            }
            const float m_old = m_s[hh];
            const float m_new = fmaxf(m_old, warp_max(s));
            const float p = valid ? expf(s - m_new) : 0.0f;
            const float psum = warp_sum(p);
            const float corr = expf(m_old - m_new);
            p_s[warp * 32 + lane] = p;
            __syncwarp();
            for (int d = lane; d < hd; d += 32) {
                float a = acc_s[hh * hd + d] * corr;
#pragma unroll 8
                for (int j = 0; j < DEC_TK; j++) a = fmaf(p_s[warp * 32 + j], v_s[j * hd + d], a);
                acc_s[hh * hd + d] = a;
            }
            __syncwarp();
            if (lane == 0) {
                m_s[hh] = m_new;
                l_s[hh] = l_s[hh] * corr + psum;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int i = tid; i < nhb * hd; i += blockDim.x) {
        const int hh = i / hd, d = i - hh * hd;
        const size_t rh = (size_t)r * nh + h0 + hh;
        if (nsplit == 1) {
            out[rh * hd + d] = acc_s[i] * (1.0f / l_s[hh]);
        } else {
            const size_t base = rh * nsplit + split;
            part_o[base * hd + d] = acc_s[i];
            if (d == 0) {
                part_ml[2 * base] = m_s[hh];
                part_ml[2 * base + 1] = l_s[hh];
            }
        }
    }
    if (nsplit > 1 && counters) merge_splits_if_last(counters, part_o, part_ml, out, r, h0, nhb, nh, hd, nsplit);
}

// attn_decode with a compile-time head size (64, 128): the same algorithm with float4
// shared-memory reads, four independent accumulators per dot product, value columns
// owned per lane as vectors, and the next K/V tile prefetched into registers while the
// current one is used (the generic kernel is latency-bound on exactly these).
template <int HD>
__device__ __forceinline__ void attn_decode_fixed(
    const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    u64 layer_off, const u32* __restrict__ row_list, const u32* __restrict__ row_info,
    const u32* __restrict__ seq_info, const u32* __restrict__ block_tables, int block_size,
    const float* __restrict__ slopes, int has_alibi, float* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_ml, int nh, int kvh, int hb,
    int keys_per_split, float scale, u32* __restrict__ counters, int early) {
    constexpr int KS = HD + 4;                                // padded K row, 16-byte aligned
    constexpr int DPL = HD / 32;                              // value columns per lane
    constexpr int CPK = HD / 8;                               // 16-byte chunks per key
    constexpr int CH = DEC_TK * CPK / (32 * DEC_WARPS);       // chunks per thread per tile
    extern __shared__ __align__(16) float smem_fixed[];
    const int r = row_list[blockIdx.x];
    const int qpg = nh / kvh;
    const int chunks = (qpg + hb - 1) / hb;
    const int g = blockIdx.y / chunks, hc = blockIdx.y % chunks;
    const int h0 = g * qpg + hc * hb;
    const int nhb = min(hb, qpg - hc * hb);
    const int seq = row_info[2 * r], pos = row_info[2 * r + 1];
    const u32 bt_off = seq_info[4 * seq + 3];
    // The step's first position of the row's sequence: keys from it on are written by
    // the kernel before this one (rope_qkv), so they are read only after the wait
    // (without `early`, every key is).
    const int fresh = early ? (int)seq_info[4 * seq + 2] : 0x7fffffff;
    const int nsplit = gridDim.z, split = blockIdx.z;
    const int k_begin = split * keys_per_split;
    const int k_end = min(pos + 1, k_begin + keys_per_split);

    float* q_s = smem_fixed;                 // [hb][HD]
    float* acc_s = q_s + hb * HD;            // [hb][HD]
    float* k_s = acc_s + hb * HD;            // [DEC_TK][KS]
    float* v_s = k_s + DEC_TK * KS;          // [DEC_TK][HD]
    float* p_s = v_s + DEC_TK * HD;          // [DEC_WARPS][32]
    float* m_s = p_s + DEC_WARPS * 32;       // [hb]
    float* l_s = m_s + hb;                   // [hb]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    uint4 nk[CH], nv[CH];
    // Loads the keys in [lo, hi) of the tile at key t into nk / nv, first zeroing them
    // where `zero`.
    auto fetch = [&](int t, int lo, int hi, bool zero) {
#pragma unroll
        for (int k = 0; k < CH; k++) {
            const int id = tid + k * 32 * DEC_WARPS;
            const int key = t + id / CPK, c = id % CPK;
            if (zero) {
                nk[k] = make_uint4(0, 0, 0, 0);
                nv[k] = make_uint4(0, 0, 0, 0);
            }
            if (key >= lo && key < hi) {
                const u64 slot = (u64)block_tables[bt_off + key / block_size] * block_size + key % block_size;
                const u64 off = layer_off + (slot * kvh + g) * HD + c * 8;
                nk[k] = *(const uint4*)(kc + off);
                nv[k] = *(const uint4*)(vc + off);
            }
        }
    };
    // The first tile's keys that earlier steps wrote are loaded before the wait: the
    // kernel before this one writes only the step's keys, and the kernels before it are
    // complete (every kernel lets its successor start only after its own wait).
    if (!early) PDL_ENTER();
    fetch(k_begin, k_begin, min(k_end, fresh), true);
    if (early) PDL_ENTER();
    if (fresh < min(k_end, k_begin + DEC_TK)) fetch(k_begin, max(k_begin, fresh), k_end, false);
    for (int i = tid; i < nhb * HD; i += blockDim.x) {
        q_s[i] = q[((size_t)r * nh + h0) * HD + i];
        acc_s[i] = 0.0f;
    }
    for (int i = tid; i < nhb; i += blockDim.x) {
        m_s[i] = NEG_INF;
        l_s[i] = 0.0f;
    }
    for (int t = k_begin; t < k_end; t += DEC_TK) {
        __syncthreads();
#pragma unroll
        for (int k = 0; k < CH; k++) {
            const int id = tid + k * 32 * DEC_WARPS;
            const int j = id / CPK, c = id % CPK;
            float4* kd = (float4*)(k_s + j * KS + c * 8);
            float4* vd = (float4*)(v_s + j * HD + c * 8);
            kd[0] = make_float4(lo_bf16(nk[k].x), hi_bf16(nk[k].x), lo_bf16(nk[k].y), hi_bf16(nk[k].y));
            kd[1] = make_float4(lo_bf16(nk[k].z), hi_bf16(nk[k].z), lo_bf16(nk[k].w), hi_bf16(nk[k].w));
            vd[0] = make_float4(lo_bf16(nv[k].x), hi_bf16(nv[k].x), lo_bf16(nv[k].y), hi_bf16(nv[k].y));
            vd[1] = make_float4(lo_bf16(nv[k].z), hi_bf16(nv[k].z), lo_bf16(nv[k].w), hi_bf16(nv[k].w));
        }
        __syncthreads();
        if (t + DEC_TK < k_end) fetch(t + DEC_TK, t + DEC_TK, k_end, true);
        const int key = t + lane;
        const bool valid = key < k_end;
        for (int hh = warp; hh < nhb; hh += DEC_WARPS) {
            float s = NEG_INF;
            if (valid) {
                const float4* qv = (const float4*)(q_s + hh * HD);
                const float4* kr = (const float4*)(k_s + lane * KS);
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll
                for (int c = 0; c < HD / 4; c++) {
                    const float4 qq = qv[c], kk = kr[c];
                    a0 = fmaf(qq.x, kk.x, a0);
                    a1 = fmaf(qq.y, kk.y, a1);
                    a2 = fmaf(qq.z, kk.z, a2);
                    a3 = fmaf(qq.w, kk.w, a3);
                }
                s = ((a0 + a1) + (a2 + a3)) * scale;
                if (has_alibi) s += alibi_bias(slopes[h0 + hh], key, HD);
            }
            const float m_old = m_s[hh];
            const float m_new = fmaxf(m_old, warp_max(s));
            const float p = valid ? expf(s - m_new) : 0.0f;
            const float psum = warp_sum(p);
            const float corr = expf(m_old - m_new);
            p_s[warp * 32 + lane] = p;
            __syncwarp();
            float* ar = acc_s + hh * HD + lane * DPL;
            float a[DPL], b[DPL];
#pragma unroll
            for (int e = 0; e < DPL; e++) {
                a[e] = ar[e] * corr;
                b[e] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < DEC_TK; j += 4) {
                const float4 pp = *(const float4*)(p_s + warp * 32 + j);
                const float* v0 = v_s + j * HD + lane * DPL;
#pragma unroll
                for (int e = 0; e < DPL; e++) {
                    a[e] = fmaf(pp.x, v0[e], a[e]);
                    b[e] = fmaf(pp.y, v0[HD + e], b[e]);
                    a[e] = fmaf(pp.z, v0[2 * HD + e], a[e]);
                    b[e] = fmaf(pp.w, v0[3 * HD + e], b[e]);
                }
            }
#pragma unroll
            for (int e = 0; e < DPL; e++) ar[e] = a[e] + b[e];
            __syncwarp();
            if (lane == 0) {
                m_s[hh] = m_new;
                l_s[hh] = l_s[hh] * corr + psum;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int i = tid; i < nhb * HD; i += blockDim.x) {
        const int hh = i / HD, d = i - hh * HD;
        const size_t rh = (size_t)r * nh + h0 + hh;
        if (nsplit == 1) {
            out[rh * HD + d] = acc_s[i] * (1.0f / l_s[hh]);
        } else {
            const size_t base = rh * nsplit + split;
            part_o[base * HD + d] = acc_s[i];
            if (d == 0) {
                part_ml[2 * base] = m_s[hh];
                part_ml[2 * base + 1] = l_s[hh];
            }
        }
    }
    if (nsplit > 1 && counters) merge_splits_if_last(counters, part_o, part_ml, out, r, h0, nhb, nh, HD, nsplit);
}

#define ATTN_DECODE_KERNEL(HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS) attn_decode_hd##HD(             \
        const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc, \
        u64 layer_off, const u32* __restrict__ row_list, const u32* __restrict__ row_info,      \
        const u32* __restrict__ seq_info, const u32* __restrict__ block_tables, int block_size,  \
        const float* __restrict__ slopes, int has_alibi, float* __restrict__ out,               \
        float* __restrict__ part_o, float* __restrict__ part_ml, int nh, int kvh, int hd, int hb, \
        int keys_per_split, float scale, u32* __restrict__ counters, int early) {               \
        attn_decode_fixed<HD>(q, kc, vc, layer_off, row_list, row_info, seq_info, block_tables, \
                              block_size, slopes, has_alibi, out, part_o, part_ml, nh, kvh, hb, \
                              keys_per_split, scale, counters, early);                          \
    }

ATTN_DECODE_KERNEL(64)
ATTN_DECODE_KERNEL(128)

// Merges the key splits of attn_decode / attn_decode_tc. grid (rows in list, heads), any
// block size (a multiple of 32, at most COMBINE_THREADS: the result does not depend on
// it), dynamic shared memory (2 * COMBINE_MAX_SPLITS + COMBINE_GROUPS * hd) floats. The split weights exp(m_z - m) are computed once, in parallel, into shared
// memory; then COMBINE_GROUPS groups of threads sum the splits of every output column,
// each load independent of the others, so that a long context's hundred-odd splits
// cost about one memory latency rather than one per split or per batch of them.
#define COMBINE_MAX_SPLITS 1024
#define COMBINE_GROUPS 16
#define COMBINE_THREADS 1024
#define COMBINE_PREFETCH 8
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
    attn_combine(const u32* __restrict__ row_list, const float* __restrict__ part_o,
                 const float* __restrict__ part_ml, float* __restrict__ out, int nh, int hd,
                 int nsplit) {
    PDL_ENTER();
    extern __shared__ float wz[];  // [COMBINE_MAX_SPLITS], then lw and acc
    __shared__ float scratch[32];
    const int r = row_list[blockIdx.x], h = blockIdx.y;
    const size_t base = ((size_t)r * nh + h) * nsplit;
    // The thread's first output column's first COMBINE_PREFETCH partial sums (column i
    // = threadIdx.x below), loaded now so that their latency overlaps the split maxima's
    // instead of following the weights; summed below in the same order as the rest.
    float pre[COMBINE_PREFETCH];
    {
        const int group = threadIdx.x / hd, d = threadIdx.x % hd;
#pragma unroll
        for (int k = 0; k < COMBINE_PREFETCH; k++) {
            const int z = group + k * COMBINE_GROUPS;
            pre[k] = group < COMBINE_GROUPS && z < nsplit ? part_o[(base + z) * hd + d] : 0.0f;
        }
    }
    float m = NEG_INF;
    for (int z = threadIdx.x; z < nsplit; z += blockDim.x) m = fmaxf(m, part_ml[2 * (base + z)]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();
    m = NEG_INF;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, scratch[w]);
    // The weights, and each split's sum times its weight, in parallel; then the sum of
    // those in COMBINE_GROUPS strided runs and one fixed tree, so that l (like the
    // outputs below) does not depend on the block size.
    float* lw = wz + COMBINE_MAX_SPLITS;  // [COMBINE_MAX_SPLITS]
    for (int z = threadIdx.x; z < min(nsplit, COMBINE_MAX_SPLITS); z += blockDim.x) {
        const float mz = part_ml[2 * (base + z)];
        const float w = mz == NEG_INF ? 0.0f : expf(mz - m);
        wz[z] = w;
        lw[z] = part_ml[2 * (base + z) + 1] * w;
    }
    __syncthreads();
    if (threadIdx.x < COMBINE_GROUPS) {
        float a = 0.0f;
        for (int z = threadIdx.x; z < min(nsplit, COMBINE_MAX_SPLITS); z += COMBINE_GROUPS) a += lw[z];
        scratch[threadIdx.x] = a;
    }
    __syncthreads();
    float lg[COMBINE_GROUPS];
#pragma unroll
    for (int k = 0; k < COMBINE_GROUPS; k++) lg[k] = scratch[k];
#pragma unroll
    for (int w = COMBINE_GROUPS / 2; w > 0; w /= 2) {
#pragma unroll
        for (int k = 0; k < w; k++) lg[k] = lg[k] + lg[k + w];
    }
    const float inv = 1.0f / lg[0];
    // Split z always goes to accumulator z % COMBINE_GROUPS, and the accumulators are
    // summed in one fixed tree, so that splits without keys (zero weight) change
    // nothing: a row's output is the same bits whatever the split count of its step,
    // and the same as the decode kernels' direct path for one split.
    float* acc = lw + COMBINE_MAX_SPLITS;  // [COMBINE_GROUPS][hd]
    auto wt = [&](int z) { return z < COMBINE_MAX_SPLITS ? wz[z] : 0.0f; };
    for (int i = threadIdx.x; i < COMBINE_GROUPS * hd; i += blockDim.x) {
        const int group = i / hd, d = i % hd;  // a warp reads consecutive columns
        float a = 0.0f;
        int z = group;
        if (i == (int)threadIdx.x) {
#pragma unroll
            for (int k = 0; k < COMBINE_PREFETCH; k++) {
                if (z >= nsplit) break;
                a = fmaf(pre[k], wt(z), a);
                z += COMBINE_GROUPS;
            }
        }
#pragma unroll 8
        for (; z < nsplit; z += COMBINE_GROUPS) a = fmaf(part_o[(base + z) * hd + d], wt(z), a);
        acc[group * hd + d] = a;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float g[COMBINE_GROUPS];
#pragma unroll
        for (int k = 0; k < COMBINE_GROUPS; k++) g[k] = acc[k * hd + d];
#pragma unroll
        for (int w = COMBINE_GROUPS / 2; w > 0; w /= 2) {
#pragma unroll
            for (int k = 0; k < w; k++) g[k] = g[k] + g[k + w];
        }
        out[((size_t)r * nh + h) * hd + d] = g[0] * inv;
    }
}

// D = A * B + D for one m16n8k16 bf16 tile, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define TC_BQ 64
#define TC_BK 64

// Query fragments (row-major A operand of the m16n8k16 tiles), rounded to bf16 once:
// fragment rows gid and gid + 8 from qa and qb (zeros where v0 / v1 is false).
template <int HD>
__device__ __forceinline__ void tc_query_fragments(u32 (&qf)[HD / 16][4], const float* qa,
                                                   const float* qb, bool v0, bool v1, int tig) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int d = kk * 16 + 2 * tig;
        qf[kk][0] = v0 ? pack_bf16x2(qa[d], qa[d + 1]) : 0u;
        qf[kk][1] = v1 ? pack_bf16x2(qb[d], qb[d + 1]) : 0u;
        qf[kk][2] = v0 ? pack_bf16x2(qa[d + 8], qa[d + 9]) : 0u;
        qf[kk][3] = v1 ? pack_bf16x2(qb[d + 8], qb[d + 9]) : 0u;
    }
}

// Sum over the four threads of a fragment row (lanes 4g .. 4g + 3).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// S = Q K^T for one tile of TC_BK keys (8 n-tiles of 8 keys) from the query fragments
// `qf` and the K tile `ks` (row pitch KP).
template <int HD, int KP>
__device__ __forceinline__ void tc_qk_tile(float (&sc)[TC_BK / 8][4], const u32 (&qf)[HD / 16][4],
                                           const bf16_t* ks, int gid, int tig) {
#pragma unroll
    for (int nt = 0; nt < TC_BK / 8; nt++) {
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
        const bf16_t* kr = ks + (nt * 8 + gid) * KP + 2 * tig;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const u32 b0 = *(const u32*)(kr + kk * 16);
            const u32 b1 = *(const u32*)(kr + kk * 16 + 8);
            mma_bf16(sc[nt], qf[kk], b0, b1);
        }
    }
}

// One tile of online softmax for a warp's two fragment rows (gid and gid + 8): takes
// the scaled, masked scores `sc` and leaves their exponentials there, updates the
// running maxima m and sums l, and rescales the output o. The caller guarantees that
// every row's first tile holds a visible key, so maxima are finite.
template <int HD, int NT>
__device__ __forceinline__ void tc_online_softmax(float (&sc)[NT][4], float& m0, float& m1,
                                                  float& l0, float& l1, float (&o)[HD / 8][4]) {
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    // The hardware exponential (__expf: ex2.approx of x log2 e, a few ulp): the warps
    // of these kernels are bound by instruction issue, and the accurate expf costs
    // several times the instructions of everything else per score.
    const float c0 = __expf(m0 - n0), c1 = __expf(m1 - n1);
    m0 = n0;
    m1 = n1;
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        sc[nt][0] = __expf(sc[nt][0] - n0);
        sc[nt][1] = __expf(sc[nt][1] - n0);
        sc[nt][2] = __expf(sc[nt][2] - n1);
        sc[nt][3] = __expf(sc[nt][3] - n1);
        s0 += sc[nt][0] + sc[nt][1];
        s1 += sc[nt][2] + sc[nt][3];
    }
    l0 = l0 * c0 + s0;
    l1 = l1 * c1 + s1;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        o[i][0] *= c0;
        o[i][1] *= c0;
        o[i][2] *= c1;
        o[i][3] *= c1;
    }
}

// The A operand of key chunk kk (16 keys) of P V from the softmax weights `sc` of a
// tile (the S accumulators of n-tiles 2kk and 2kk + 1), rounded to bf16.
template <int NT>
__device__ __forceinline__ void tc_p_fragment(u32 (&a)[4], const float (&sc)[NT][4], int kk) {
    a[0] = cvt_bf16x2(sc[2 * kk][0], sc[2 * kk][1]);
    a[1] = cvt_bf16x2(sc[2 * kk][2], sc[2 * kk][3]);
    a[2] = cvt_bf16x2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
    a[3] = cvt_bf16x2(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
}

// tc_online_softmax, then O += P V from the transposed V tile `vt` (row pitch VP).
template <int HD, int VP>
__device__ __forceinline__ void tc_softmax_pv_tile(float (&sc)[TC_BK / 8][4], float& m0, float& m1,
                                                   float& l0, float& l1, float (&o)[HD / 8][4],
                                                   const bf16_t* vt, int gid, int tig) {
    tc_online_softmax<HD, TC_BK / 8>(sc, m0, m1, l0, l1, o);
    // O += P V: the S accumulators of n-tiles 2k, 2k+1 are exactly the A fragment of
    // key chunk k.
#pragma unroll
    for (int kk = 0; kk < TC_BK / 16; kk++) {
        u32 a[4];
        tc_p_fragment(a, sc, kk);
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            const bf16_t* vr = vt + (dt * 8 + gid) * VP + kk * 16 + 2 * tig;
            const u32 b0 = *(const u32*)vr;
            const u32 b1 = *(const u32*)(vr + 8);
            mma_bf16(o[dt], a, b0, b1);
        }
    }
}

// tiles[2t] = sequence index, tiles[2t+1] = first query row (within the sequence) of
// block t. grid (tiles, heads), block 128: warp w owns query rows 16w..16w+15.
template <int HD>
__device__ __forceinline__ void attn_tc(const float* __restrict__ q, const bf16_t* __restrict__ kc,
                                        const bf16_t* __restrict__ vc, u64 layer_off,
                                        const u32* __restrict__ tiles, const u32* __restrict__ seq_info,
                                        const u32* __restrict__ block_tables, int block_size,
                                        const float* __restrict__ slopes, int has_alibi,
                                        float* __restrict__ out, int nh, int kvh, float scale) {
    constexpr int KP = HD + 8;     // padded K row: conflict-free fragment reads
    constexpr int VP = TC_BK + 8;  // padded transposed-V row
    __shared__ __align__(16) bf16_t ks[TC_BK * KP];
    __shared__ __align__(16) bf16_t vt[HD * VP];

    const int h = blockIdx.y;
    const int g = h / (nh / kvh);
    const u32 s = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
    const int first_row = seq_info[4 * s], nrows = seq_info[4 * s + 1];
    const int start_pos = seq_info[4 * s + 2];
    const u32 bt_off = seq_info[4 * s + 3];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int qr0 = q0 + warp * 16 + gid, qr1 = qr0 + 8;
    const bool v0 = qr0 < nrows, v1 = qr1 < nrows;
    const int pos0 = start_pos + qr0, pos1 = start_pos + qr1;
    const float slope = has_alibi ? slopes[h] : 0.0f;

    u32 qf[HD / 16][4];
    tc_query_fragments<HD>(qf, q + ((size_t)(first_row + (v0 ? qr0 : 0)) * nh + h) * HD,
                           q + ((size_t)(first_row + (v1 ? qr1 : 0)) * nh + h) * HD, v0, v1, tig);
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    const int n_keys = start_pos + min((int)q0 + TC_BQ, nrows);
    const int warp_last = start_pos + min((int)q0 + warp * 16 + 15, nrows - 1);
    for (int kt = 0; kt < n_keys; kt += TC_BK) {
        __syncthreads();
        // Key j of the tile, 8-element chunk c: consecutive threads take consecutive keys
        // so that the transposed V stores do not collide in shared memory banks.
        for (int i = threadIdx.x; i < TC_BK * (HD / 8); i += blockDim.x) {
            const int j = i % TC_BK, c = i / TC_BK;
            const int key = kt + j;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key < n_keys) {
                const u64 slot = (u64)block_tables[bt_off + key / block_size] * block_size + key % block_size;
                const u64 off = layer_off + (slot * kvh + g) * HD + c * 8;
                kv = *(const uint4*)(kc + off);
                vv = *(const uint4*)(vc + off);
            }
            *(uint4*)(ks + j * KP + c * 8) = kv;
            const u32 w4[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                vt[(c * 8 + 2 * e) * VP + j] = (bf16_t)(w4[e] & 0xffffu);
                vt[(c * 8 + 2 * e + 1) * VP + j] = (bf16_t)(w4[e] >> 16);
            }
        }
        __syncthreads();
        if (kt > warp_last) continue;  // every key of this tile is in this warp's future

        // S = Q K^T for 64 keys: 8 n-tiles of 8 keys.
        float sc[TC_BK / 8][4];
        tc_qk_tile<HD, KP>(sc, qf, ks, gid, tig);
#pragma unroll
        for (int nt = 0; nt < TC_BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kt + nt * 8 + 2 * tig + (e & 1);
                float v = sc[nt][e] * scale;
                if (has_alibi) v += alibi_bias(slope, key, HD);
                if (key > ((e < 2) ? pos0 : pos1)) v = NEG_INF;
                sc[nt][e] = v;
            }
        }
        // Key 0 is visible to every row, so after the first tile the maxima are finite;
        // a later fully masked tile leaves them unchanged.
        tc_softmax_pv_tile<HD, VP>(sc, m0, m1, l0, l1, o, vt, gid, tig);
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) {
        const int d = dt * 8 + 2 * tig;
        if (v0) {
            float* dst = out + ((size_t)(first_row + qr0) * nh + h) * HD + d;
            dst[0] = o[dt][0] * i0;
            dst[1] = o[dt][1] * i0;
        }
        if (v1) {
            float* dst = out + ((size_t)(first_row + qr1) * nh + h) * HD + d;
            dst[0] = o[dt][2] * i1;
            dst[1] = o[dt][3] * i1;
        }
    }
}

#define ATTN_TC_KERNEL(HD)                                                                      \
    extern "C" __global__ void __launch_bounds__(128) attn_prefill_tc##HD(                      \
        const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc, \
        u64 layer_off, const u32* __restrict__ tiles, const u32* __restrict__ seq_info,         \
        const u32* __restrict__ block_tables, int block_size, const float* __restrict__ slopes,  \
        int has_alibi, float* __restrict__ out, int nh, int kvh, float scale) { PDL_ENTER();                 \
        attn_tc<HD>(q, kc, vc, layer_off, tiles, seq_info, block_tables, block_size, slopes,    \
                    has_alibi, out, nh, kvh, scale);                                            \
    }

ATTN_TC_KERNEL(64)
ATTN_TC_KERNEL(128)
