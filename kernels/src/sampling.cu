// Sampling warps on the device: the distribution engine/src/sampling/warp.rs
// `warp_probs` computes (repetition penalty, temperature, top-k, top-p, softmax), one
// cluster of blocks per logit row (sm_90; one block elsewhere), so that a sampled step
// copies probabilities the host only has to draw from, instead of warping a 65k-entry
// row on the host (about 1.4 ms a row). Each block of a cluster owns a strided slice of
// the row; reductions and histograms combine through a zeroed exchange area in global
// memory, in rank order, so that every block reaches the same decisions.
//
// Selections are radix selects over an order-preserving 32-bit key of each logit
// (12 + 12 + 8 bits, one histogram pass each). Top-p needs masses: each token's weight
// is exp((x - max) / t) as a 64-bit fixed-point integer, so that sums are exact and
// independent of the order the atomics land in (a run gives the same bits every time).
// Probabilities differ from the host's f64 ones by f32 rounding only, so a kept set can
// differ only when a top-p boundary falls within that rounding.

#define PROBS_BLOCK 1024
#define PROBS_BINS 4096

// A row's exchange area in global memory, zeroed by the launcher: a histogram per
// radix pass and a slot per block for each cluster reduction. Blocks combine through it
// (L2) rather than through distributed shared memory: 8 blocks reading each other's
// 4096 bins cost 240 us a row that way. Control flow is the same in every block of a
// cluster, so the pass and reduction counters agree.
#define PROBS_PASSES 9
#define PROBS_REDUCTIONS 4
#define PROBS_MAX_CLUSTER 16
#define PROBS_WORK_WORDS (PROBS_PASSES * PROBS_BINS + PROBS_REDUCTIONS * PROBS_MAX_CLUSTER)

struct Exchange {
    u64* base;
    u32 pass, red;
    __device__ __forceinline__ u64* next_hist() { return base + (size_t)(pass++) * PROBS_BINS; }
    __device__ __forceinline__ u64* next_slots() {
        return base + PROBS_PASSES * PROBS_BINS + (size_t)(red++) * PROBS_MAX_CLUSTER;
    }
};

// Per-block values combined over the cluster, in rank order (the same in every block).
__device__ u64 cluster_sum_u64(u64 block_value, Exchange& ex, u32 rank, u32 nblk) {
    u64* slots = ex.next_slots();
    if (threadIdx.x == 0) {
        slots[rank] = block_value;
        __threadfence();
    }
    cluster_sync();
    u64 s = 0;
    for (u32 r = 0; r < nblk; ++r) s += __ldcg(&slots[r]);
    return s;
}

__device__ float cluster_max_f32(float block_value, Exchange& ex, u32 rank, u32 nblk) {
    u64* slots = ex.next_slots();
    if (threadIdx.x == 0) {
        slots[rank] = (u64)__float_as_uint(block_value);
        __threadfence();
    }
    cluster_sync();
    float m = NEG_INF;
    for (u32 r = 0; r < nblk; ++r) m = fmaxf(m, __uint_as_float((u32)__ldcg(&slots[r])));
    return m;
}

// Order-preserving key of a logit: larger value, larger key. NaN maps as -inf (the
// host treats it so) and -0 as +0 (the host compares them equal).
__device__ __forceinline__ u32 order_key(float x) {
    if (isnan(x)) x = NEG_INF;
    if (x == 0.0f) x = 0.0f;
    const u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ bool usable_logit(float x) { return !isnan(x) && x != NEG_INF; }

// The entries of a row a thread owns: i = (rank * PROBS_BLOCK + tid) + k * nblk *
// PROBS_BLOCK for a cluster of nblk blocks.
struct Slice {
    u32 rank, nblk;
    __device__ __forceinline__ bool owns(u32 i) const { return (i / PROBS_BLOCK) % nblk == rank; }
};

// Calls f(i, row[i]) for this thread's entries of a row, eight loads in flight (one at
// a time, each pass over a 65k-entry row waited for 64 memory latencies per thread).
template <class F>
__device__ __forceinline__ void for_row(const float* row, int cols, Slice sl, F f) {
    const int stride = (int)sl.nblk * PROBS_BLOCK;
    for (int c0 = (int)sl.rank * PROBS_BLOCK + threadIdx.x; c0 < cols; c0 += 8 * stride) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int c = c0 + u * stride;
            v[u] = c < cols ? row[c] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int c = c0 + u * stride;
            if (c < cols) f(c, v[u]);
        }
    }
}

// Exclusive prefix sum over the block (PROBS_BLOCK threads), and in `total` the sum of
// all; `scan` holds 33 entries.
__device__ u64 block_excl_scan_u64(u64 v, u64* scan, u64* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    if (lane == 31) scan[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const u64 s = scan[lane];
        u64 si = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u64 n = __shfl_up_sync(0xffffffffu, si, o);
            if (lane >= o) si += n;
        }
        scan[lane] = si - s;
        if (lane == 31) scan[32] = si;
    }
    __syncthreads();
    const u64 r = scan[warp] + inc - v;
    *total = scan[32];
    __syncthreads();
    return r;
}

__device__ u64 block_sum_u64(u64 v, u64* scan) {
    u64 total;
    block_excl_scan_u64(v, scan, &total);
    return total;
}

// Radix select: among the entries `f` accepts (f(i, value, key, weight) -> bool), in
// ascending key order, finds the key at which the inclusive cumulative weight first
// exceeds t = tfn(total weight). Returns that key; `below` gets the weight of accepted
// entries with smaller keys and `total` the total weight. Weight-0 entries never count.
// `ok` is false when the total weight is <= t.
template <class T, class F>
__device__ u32 radix_select(const float* row, int cols, Slice sl, T tfn, F f, u64* hist, u64* scan,
                            Exchange& ex, u64* below, u64* total, bool* ok) {
    __shared__ u64 sel[2];
    u32 prefix = 0;
    u64 under = 0, t = 0;
#pragma unroll 1
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = pass == 0 ? 20 : (pass == 1 ? 8 : 0);
        const int width = pass == 2 ? 8 : 12;
        for (int b = threadIdx.x; b < PROBS_BINS; b += PROBS_BLOCK) hist[b] = 0;
        if (threadIdx.x == 0) {
            sel[0] = ~0ull;
            sel[1] = 0;
        }
        __syncthreads();
        for_row(row, cols, sl, [&](int i, float x) {
            u32 key;
            u64 w;
            if (!f(i, x, key, w) || w == 0) return;
            if (pass > 0 && (key >> (shift + width)) != prefix) return;
            atomicAdd(&hist[(key >> shift) & ((1u << width) - 1u)], w);
        });
        __syncthreads();
        // The cluster's histogram: every block adds its bins, then reads the sums.
        u64* gh = ex.next_hist();
        for (int b = threadIdx.x; b < PROBS_BINS; b += PROBS_BLOCK) {
            if (hist[b] != 0) atomicAdd(&gh[b], hist[b]);
        }
        __threadfence();
        cluster_sync();
        // Thread j owns bins 4j..4j+3.
        const int b0 = threadIdx.x * 4;
        u64 v[4];
        u64 s = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[j] = __ldcg(&gh[b0 + j]);
            s += v[j];
        }
        u64 all;
        u64 c = block_excl_scan_u64(s, scan, &all);
        if (pass == 0) {
            *total = all;
            t = tfn(all);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (c <= t && t < c + v[j]) {
                sel[0] = (u64)(b0 + j);
                sel[1] = c;
            }
            c += v[j];
        }
        __syncthreads();
        const u64 bin = sel[0], cb = sel[1];
        __syncthreads();
        if (bin == ~0ull) {
            *ok = false;
            return 0;
        }
        prefix = (prefix << width) | (u32)bin;
        under += cb;
        t -= cb;
    }
    *below = under;
    *ok = true;
    return prefix;
}

// One row's parameters, 8 u32 words: logit row, top_k (0: off), temperature,
// top_p and repetition penalty (f32 bits), offset and count of its penalised token ids.
#define PROBS_SPEC_WORDS 8

// out row r = the warped distribution of logits row spec[r].row: status[r] = 0. Rows the
// host must finish (no usable logit, or a +inf one) get status 1 and the penalised
// logits in their out row. `scale` = 2^s with cols * 2^s < 2^63 (the weights' fixed
// point). `work`: PROBS_WORK_WORDS zeroed words per row. grid (nblk * rows), clusters of
// nblk <= PROBS_MAX_CLUSTER blocks (1 before sm_90), block PROBS_BLOCK.
extern "C" __global__ void __launch_bounds__(PROBS_BLOCK)
    warp_probs_rows_f32(const float* __restrict__ x, const u32* __restrict__ spec, const u32* __restrict__ ids,
                        float* __restrict__ out, u32* __restrict__ status, u64* __restrict__ work, int cols,
                        float scale, int nblk) {
    PDL_ENTER();
    __shared__ u64 hist[PROBS_BINS];
    __shared__ u64 scan[33];
    __shared__ float redf[32];
    const Slice sl{cluster_rank(), (u32)nblk};
    const u32 r = blockIdx.x / (u32)nblk;
    Exchange ex{work + (size_t)r * PROBS_WORK_WORDS, 0, 0};
    const u32* sp = spec + PROBS_SPEC_WORDS * r;
    const float* src = x + (size_t)sp[0] * cols;
    float* row = out + (size_t)r * cols;
    const u32 top_k = sp[1];
    const float temp = __uint_as_float(sp[2]);
    const float top_p = __uint_as_float(sp[3]);
    const float pen = __uint_as_float(sp[4]);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // The block's slice of the row, penalised (ids are distinct, so each is penalised
    // once, by the block that owns it).
    for_row(src, cols, sl, [&](int i, float v) { row[i] = v; });
    __syncthreads();
    if (pen != 1.0f) {
        for (u32 j = threadIdx.x; j < sp[6]; j += PROBS_BLOCK) {
            const u32 id = ids[sp[5] + j];
            if (id < (u32)cols && sl.owns(id)) {
                const float l = row[id];
                row[id] = l < 0.0f ? l * pen : l / pen;
            }
        }
    }
    __syncthreads();

    // Maximum usable logit; rows without one, or with +inf, go to the host.
    float m = NEG_INF;
    int any = 0, pinf = 0;
    for_row(row, cols, sl, [&](int, float v) {
        if (!usable_logit(v)) return;
        any = 1;
        if (isinf(v)) pinf = 1;
        m = fmaxf(m, v);
    });
    any = __syncthreads_or(any);
    pinf = __syncthreads_or(pinf);
    const u64 flags = cluster_sum_u64((u64)(any ? 1 : 0) | ((u64)(pinf ? 1 : 0) << 32), ex, sl.rank, sl.nblk);
    if ((flags & 0xffffffffull) == 0 || (flags >> 32) != 0) {
        if (sl.rank == 0 && threadIdx.x == 0) status[r] = 1;
        return;
    }
    m = warp_max(m);
    if (lane == 0) redf[warp] = m;
    __syncthreads();
    m = warp_max(redf[lane]);
    m = cluster_max_f32(m, ex, sl.rank, sl.nblk);

    // Top-k: keep keys >= the k-th largest (ties with it survive, as in HF).
    u32 kmin = 0;
    bool ok = true;
    u64 unused = 0, unused_total = 0;
    if (top_k > 0 && top_k < (u32)cols) {
        const u32 inv = radix_select(
            row, cols, sl, [&](u64) { return (u64)(top_k - 1); },
            [&](int, float v, u32& key, u64& w) {
                key = ~order_key(v);
                w = 1;
                return true;
            },
            hist, scan, ex, &unused, &unused_total, &ok);
        kmin = ~inv;
    }

    // exp((x - m) / t) with the difference taken in f64 (as the host's x / t - m / t)
    // and its f32 rounding error carried into the exponential to first order.
    const double inv_t = 1.0 / (double)temp;
    auto expo = [&](float v) {
        const double d = ((double)v - (double)m) * inv_t;
        const float dh = (float)d;
        const float dl = (float)(d - (double)dh);
        const float e = expf(dh);
        return fmaf(e, dl, e);
    };
    auto weight = [&](float v) -> u64 {
        if (!usable_logit(v) || order_key(v) < kmin) return 0;
        return (u64)__float2ull_rn(expo(v) * scale);
    };

    // Top-p: walking keys ascending (ties by index), remove tokens while the cumulative
    // mass stays <= (1 - top_p) of the total. The kept mass follows exactly.
    u32 pkey = 0;
    long long pidx = -1;
    u64 kept_total = 0;
    const bool nucleus = top_p < 1.0f;
    if (ok && nucleus) {
        const double limit = 1.0 - (double)top_p;
        u64 below = 0, total = 0;
        pkey = radix_select(
            row, cols, sl, [&](u64 all) { return __double2ull_rd(limit * (double)all); },
            [&](int, float v, u32& key, u64& w) {
                key = order_key(v);
                w = weight(v);
                return true;
            },
            hist, scan, ex, &below, &total, &ok);
        if (ok) {
            const u64 lim = __double2ull_rd(limit * (double)total);
            // Tokens of the boundary key all weigh the same: the first q by index go.
            const u64 wk = weight(key_value(pkey));
            const u64 q = wk > 0 ? (lim - below) / wk : 0;
            kept_total = total - below - q * wk;
            if (q > 0) {
                const u32 last = radix_select(
                    row, cols, sl, [&](u64) { return q - 1; },
                    [&](int i, float v, u32& key, u64& w) {
                        key = (u32)i;
                        w = 1;
                        return order_key(v) == pkey;
                    },
                    hist, scan, ex, &unused, &unused_total, &ok);
                pidx = (long long)last;
            }
        }
    } else if (ok) {
        u64 part = 0;
        for_row(row, cols, sl, [&](int, float v) { part += weight(v); });
        kept_total = cluster_sum_u64(block_sum_u64(part, scan), ex, sl.rank, sl.nblk);
    }
    if (!ok) {
        if (sl.rank == 0 && threadIdx.x == 0) status[r] = 1;
        return;
    }
    auto kept = [&](int i, float v) {
        if (!usable_logit(v) || order_key(v) < kmin) return false;
        if (!nucleus) return true;
        const u32 k = order_key(v);
        return k > pkey || (k == pkey && (long long)i > pidx);
    };

    // Softmax over the kept tokens: their exponentials over their (fixed-point) sum.
    const double denom = (double)kept_total / (double)scale;
    for_row(row, cols, sl, [&](int i, float v) {
        row[i] = kept(i, v) ? (float)((double)expo(v) / denom) : 0.0f;
    });
    if (sl.rank == 0 && threadIdx.x == 0) status[r] = 0;
}

// The repetition penalty in place on rows (gathered copies of logit rows): row r's
// penalised ids are ids[spec[3r+1] ..][.. spec[3r+2]], distinct, with penalty spec[3r]
// (f32 bits): a negative logit is multiplied by it, a non-negative one divided (HF).
// grid (rows), block 256.
extern "C" __global__ void penalize_rows_f32(float* __restrict__ rows, const u32* __restrict__ spec,
                                             const u32* __restrict__ ids, int cols) {
    PDL_ENTER();
    const u32* sp = spec + 3 * blockIdx.x;
    const float pen = __uint_as_float(sp[0]);
    float* row = rows + (size_t)blockIdx.x * cols;
    for (u32 j = threadIdx.x; j < sp[2]; j += blockDim.x) {
        const u32 id = ids[sp[1] + j];
        if (id < (u32)cols) {
            const float l = row[id];
            row[id] = l < 0.0f ? l * pen : l / pen;
        }
    }
}
