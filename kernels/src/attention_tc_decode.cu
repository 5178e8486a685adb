// Decode attention on tensor cores for many query heads per kv head (MQA / GQA with
// q_per_kv >= 16, e.g. Falcon-7B's 71 heads on one kv head) over long contexts.
//
// The heads of one token are the M rows of the mma tiles (up to 128 heads per block, 16
// per m-tile), the keys the N columns, so a K/V tile in shared memory serves every head
// at once; q and p are rounded to bf16, accumulation is f32 (as attn_tc).
//
// The context is cut into splits of DTC_SPLIT keys (flash-decoding: grid z), the same
// for every step, so that a row gets the same bits whatever its step holds; splits go to
// attn_combine. A block:
// - reads the step's metadata and its split's block ids, and starts copying the whole
//   split (DTC_TILES tiles of TC_BK keys) from the paged cache to shared memory with
//   cp.async, before waiting on the previous kernel (PDL): only keys the step itself
//   wrote wait for it; every tile is in flight before any math;
// - runs its warps as `kg` key groups x m-tiles: key group i takes tiles i, i + kg, ...
//   (its warps load them and meet at a named barrier of their own, so groups never wait
//   for each other), then the groups' softmax states merge in shared memory in group
//   order (kg depends only on the head counts: rows stay step-invariant);
// - reads K and V^T operands with ldmatrix (.trans for V), no transposing stores.
// At a 32k context with Falcon-7B's 71 heads (128 blocks of 10 warps) the kernel takes
// about 14 us a layer on the H200 against 22 us for the register-staged kernel it
// replaced; it is latency-bound (about 1.3 warps per scheduler, 0.25 issues per cycle
// in ncu), not bandwidth-bound: a layer is only 8 MB of KV. Smaller blocks (fewer heads
// each), 20-warp blocks (4 key groups) and clusters merging splits through distributed
// shared memory were all slower.
// grid (rows in list, kv_heads * ceil(q_per_kv / 128), splits), block 32 * m-tiles * kg,
// dynamic shared memory as the launcher computes (DTC_RP rows for the merges).

#define DTC_TILES 4
#define DTC_SPLIT (DTC_TILES * TC_BK)
#define DTC_SUB 32

__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared, asynchronous; `valid` false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most `n` of this thread's copy groups are pending (at most 3 for any
// larger `n`: waiting for more than asked is never wrong).
__device__ __forceinline__ void cp_async_wait_pending(int n) {
    if (n >= 3) {
        asm volatile("cp.async.wait_group 3;" ::: "memory");
    } else if (n == 2) {
        asm volatile("cp.async.wait_group 2;" ::: "memory");
    } else if (n == 1) {
        asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
}

// Barrier `id` (1..15) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Softmax state of one head row of a block: weight of a state with maximum m against
// the merged maximum mx (0 for a state that saw no key).
__device__ __forceinline__ float dtc_weight(float m, float mx) {
    return m == NEG_INF ? 0.0f : expf(m - mx);
}

// Row of a merge area in shared memory: o[HD], then m and l (16-byte aligned rows).
#define DTC_RP(HD) ((HD) + 4)
// Heads of a block (at most) and key groups (at most).
#define DTC_MAX_HEADS 128
#define DTC_MAX_KEY_GROUPS 4

// The block's state per head into `res` (rows [0, nhb)): the kg key groups' states
// merged in group order (group k's state of head h is merge row k * mts * 16 + h of
// `mrg`). Each head's weights exp(m_k - m) go to w_s once, then four output columns per
// thread. Called by the whole block.
template <int HD>
__device__ __forceinline__ void dtc_merge_groups(const float* mrg, float* res, float* w_s,
                                                 int kg, int mts, int nhb) {
    constexpr int RP = DTC_RP(HD);
    constexpr int WP = DTC_MAX_KEY_GROUPS;  // w_s row: a head's weights
    auto state = [&](int k, int h) { return mrg + (k * mts * 16 + h) * RP; };
    for (int h = threadIdx.x; h < nhb; h += blockDim.x) {
        float mx = NEG_INF;
        for (int k = 0; k < kg; k++) mx = fmaxf(mx, state(k, h)[HD]);
        float l = 0.0f;
        for (int k = 0; k < kg; k++) {
            const float w = dtc_weight(state(k, h)[HD], mx);
            w_s[h * WP + k] = w;
            l = fmaf(state(k, h)[HD + 1], w, l);
        }
        res[h * RP + HD] = mx;
        res[h * RP + HD + 1] = l;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nhb * (HD / 4); i += blockDim.x) {
        const int h = i / (HD / 4), d = (i % (HD / 4)) * 4;
        const float* w = w_s + h * WP;
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int k = 0; k < kg; k++) {
            const float4 v = *(const float4*)(state(k, h) + d);
            acc.x = fmaf(v.x, w[k], acc.x);
            acc.y = fmaf(v.y, w[k], acc.y);
            acc.z = fmaf(v.z, w[k], acc.z);
            acc.w = fmaf(v.w, w[k], acc.w);
        }
        *(float4*)(res + h * RP + d) = acc;
    }
}

// Writes a block's per-head states `res` (DTC_RP rows, heads [0, nhb)): as the output
// when one split covers the context, else as the split's partial for attn_combine. A
// lone partial gives the output's bits either way: o * (1 / l).
template <int HD>
__device__ __forceinline__ void dtc_finish(const float* res, int r, int h0, int nhb, int nh,
                                           float* __restrict__ out, float* __restrict__ part_o,
                                           float* __restrict__ part_ml) {
    constexpr int RP = DTC_RP(HD);
    const int nsplit = gridDim.z, split = blockIdx.z;
    for (int i = threadIdx.x; i < nhb * (HD / 4); i += blockDim.x) {
        const int h = i / (HD / 4), d = (i % (HD / 4)) * 4;
        const float4 o = *(const float4*)(res + h * RP + d);
        const float m = res[h * RP + HD], l = res[h * RP + HD + 1];
        const size_t rh = (size_t)r * nh + h0 + h;
        if (nsplit == 1) {
            const float inv = 1.0f / l;
            *(float4*)(out + rh * HD + d) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
        } else {
            const size_t base = rh * nsplit + split;
            *(float4*)(part_o + base * HD + d) = o;
            if (d == 0) {
                part_ml[2 * base] = m;
                part_ml[2 * base + 1] = l;
            }
        }
    }
}

template <int HD, bool ALIBI>
__device__ __forceinline__ void attn_dec_tc(
    const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    u64 layer_off, const u32* __restrict__ row_list, const u32* __restrict__ row_info,
    const u32* __restrict__ seq_info, const u32* __restrict__ block_tables, int block_size,
    const float* __restrict__ slopes, float* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_ml, int nh, int kvh, int kg, float scale, int early) {
    constexpr int P = HD + 8;          // padded row (bf16): conflict-free ldmatrix
    constexpr int TILE = TC_BK * P;    // elements of one K (or V) tile
    constexpr int CPK = HD / 8;        // 16-byte chunks per key
    constexpr int RP = DTC_RP(HD);
    extern __shared__ __align__(16) unsigned char dtc_smem[];
    bf16_t* ks = (bf16_t*)dtc_smem;             // [DTC_TILES][TC_BK][P]
    bf16_t* vs = ks + DTC_TILES * TILE;         // [DTC_TILES][TC_BK][P]
    float* mrg = (float*)dtc_smem;              // after the tiles: [warps][16][RP]
    __shared__ __align__(16) float w_s[DTC_MAX_HEADS * DTC_MAX_KEY_GROUPS];

    __shared__ u32 blk_s[DTC_SPLIT + 1];         // the split's block ids
    // The step's metadata was uploaded before its first kernel, so it is read before
    // waiting for the previous kernel (rope_qkv, which writes this step's keys).
    const int r = row_list[blockIdx.x];
    const int qpg = nh / kvh;
    const int htiles = (qpg + DTC_MAX_HEADS - 1) / DTC_MAX_HEADS;
    const int g = blockIdx.y / htiles, ht = blockIdx.y % htiles;
    const int h0 = g * qpg + ht * DTC_MAX_HEADS;
    const int nhb = min(DTC_MAX_HEADS, qpg - ht * DTC_MAX_HEADS);
    const int seq = row_info[2 * r], pos = row_info[2 * r + 1];
    const u32 bt_off = seq_info[4 * seq + 3];
    // The step's first position of the row's sequence: keys from it on are written by
    // the kernel before this one (rope_qkv), so they are copied only after the wait
    // (without `early`, every key is).
    const int fresh = early ? (int)seq_info[4 * seq + 2] : 0x7fffffff;
    const int k_begin = blockIdx.z * DTC_SPLIT;
    const int k_end = min(pos + 1, k_begin + DTC_SPLIT);
    // Block ids staged once: per-key lookups would put a dependent global load in front
    // of every copy.
    const int b_first = k_begin / block_size;
    const int n_blk = k_begin < k_end ? (k_end - 1) / block_size - b_first + 1 : 0;
    for (int i = threadIdx.x; i < n_blk; i += blockDim.x) blk_s[i] = block_tables[bt_off + b_first + i];
    __syncthreads();

    const int warps = blockDim.x >> 5, mts = warps / kg;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int grp = warp / mts, mt = warp % mts;    // key group, m-tile
    const int gthreads = 32 * mts, gtid = threadIdx.x - grp * gthreads;
    const int hr0 = mt * 16 + gid, hr1 = hr0 + 8;   // head rows within the block
    const bool v0 = hr0 < nhb, v1 = hr1 < nhb;
    const bool active = mt * 16 < nhb;
    const float slope0 = (ALIBI && v0) ? slopes[h0 + hr0] : 0.0f;
    const float slope1 = (ALIBI && v1) ? slopes[h0 + hr1] : 0.0f;

    // Copies of the keys in [lo, hi) of tile t (zeros past the context where `pad`), by
    // the group's threads.
    auto copy_keys = [&](int t, int lo, int hi, bool pad) {
        const int kt = k_begin + t * TC_BK;
        if (!pad && (hi <= kt || lo >= kt + TC_BK)) return;
        for (int i = gtid; i < TC_BK * CPK; i += gthreads) {
            const int j = i / CPK, c = i % CPK;
            const int key = kt + j;
            const bool past = key >= k_end;
            if ((key < lo || key >= hi) && !(pad && past)) continue;
            u64 off = 0;
            if (!past) {
                const u64 slot = (u64)blk_s[key / block_size - b_first] * block_size + key % block_size;
                off = layer_off + (slot * kvh + g) * HD + c * 8;
            }
            cp_async16(smem_u32(ks + t * TILE + j * P + c * 8), kc + off, !past);
            cp_async16(smem_u32(vs + t * TILE + j * P + c * 8), vc + off, !past);
        }
    };
    // The group's tiles, each its own copy group, all in flight before any math, and
    // before the wait for the keys earlier steps wrote: the kernel before this one
    // writes only the step's keys, and the kernels before it are complete (every kernel
    // lets its successor start only after its own wait). The step's own keys follow the
    // wait as one more copy group, committed even when empty.
    if (!early) {
        pdl_wait();
        pdl_trigger();
    }
    int ntiles = 0;
    for (int t = grp; t < DTC_TILES; t += kg) {
        if (k_begin + t * TC_BK >= k_end) break;
        copy_keys(t, k_begin, fresh, true);
        cp_async_commit();
        ntiles++;
    }
    if (early) {
        pdl_wait();
        pdl_trigger();
    }
    for (int i = 0; i < ntiles; i++) copy_keys(grp + i * kg, fresh, k_end, false);
    cp_async_commit();

    u32 qf[HD / 16][4];
    tc_query_fragments<HD>(qf, q + ((size_t)r * nh + h0 + (v0 ? hr0 : 0)) * HD,
                           q + ((size_t)r * nh + h0 + (v1 ? hr1 : 0)) * HD, v0, v1, tig);
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    // ldmatrix row addresses: lane supplies row (lane & 7) of matrix (lane >> 3).
    const int lrow = lane & 7, lmat = lane >> 3;
    for (int i = 0; i < ntiles; i++) {
        const int t = grp + i * kg;
        const int kt = k_begin + t * TC_BK;
        // Tile i's group has ntiles - 1 - i tile groups and the step's keys after it; a
        // tile holding any of the step's keys waits for everything.
        cp_async_wait_pending(kt + TC_BK > fresh ? 0 : ntiles - i);
        named_barrier(1 + grp, gthreads);
        if (!active) continue;
        const u32 kb = smem_u32(ks + t * TILE), vb = smem_u32(vs + t * TILE);
        // The tile in sub-tiles of DTC_SUB keys under a rolled loop: the fully unrolled
        // body of a whole tile ran out of the instruction cache (each block runs it only
        // a few times). Sub-tiles past the context are skipped; the first holds key kt,
        // visible, so the maxima are finite from the first on.
#pragma unroll 1
        for (int sub = 0; sub < TC_BK / DTC_SUB; sub++) {
            const int k0 = kt + sub * DTC_SUB;
            if (k0 >= k_end) break;
            const u32 kr = kb + sub * DTC_SUB * P * 2, vr = vb + sub * DTC_SUB * P * 2;
            // S = Q K^T: n-tile nt is keys nt*8..+7; one ldmatrix.x4 gives the B
            // operands of two 16-dim steps (matrix m: dims 8m..8m+7 of the 32).
            float sc[DTC_SUB / 8][4];
#pragma unroll
            for (int nt = 0; nt < DTC_SUB / 8; nt++) {
                sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
                for (int kp = 0; kp < HD / 32; kp++) {
                    u32 b[4];
                    ldsm_x4(b, kr + ((nt * 8 + lrow) * P + kp * 32 + lmat * 8) * 2);
                    mma_bf16(sc[nt], qf[2 * kp], b[0], b[1]);
                    mma_bf16(sc[nt], qf[2 * kp + 1], b[2], b[3]);
                }
            }
            // Only the context's last sub-tile has keys to mask (a uniform branch).
            const bool full = k0 + DTC_SUB <= k_end;
#pragma unroll
            for (int nt = 0; nt < DTC_SUB / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = k0 + nt * 8 + 2 * tig + (e & 1);
                    float v = sc[nt][e] * scale;
                    if (ALIBI) v += alibi_bias(e < 2 ? slope0 : slope1, key, HD);
                    if (!full && key >= k_end) v = NEG_INF;
                    sc[nt][e] = v;
                }
            }
            tc_online_softmax<HD, DTC_SUB / 8>(sc, m0, m1, l0, l1, o);
            // O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are the A operand of
            // key chunk kk; one ldmatrix.x4.trans gives the B operands of two 8-dim
            // tiles (matrix m: keys 8(m & 1).., dims 8(m >> 1).. of the pair).
#pragma unroll
            for (int kk = 0; kk < DTC_SUB / 16; kk++) {
                u32 a[4];
                tc_p_fragment(a, sc, kk);
#pragma unroll
                for (int dp = 0; dp < HD / 16; dp++) {
                    u32 b[4];
                    ldsm_x4_trans(b, vr + ((kk * 16 + (lmat & 1) * 8 + lrow) * P + (2 * dp + (lmat >> 1)) * 8) * 2);
                    mma_bf16(o[2 * dp], a, b[0], b[1]);
                    mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
                }
            }
        }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);

    // Every warp's state to shared memory (the tiles are consumed). Group k's state of
    // head row h is merge row k * mts * 16 + h, so group 0's rows are the heads'.
    __syncthreads();
    float* mine = mrg + warp * 16 * RP;
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) {
        const int d = dt * 8 + 2 * tig;
        mine[gid * RP + d] = o[dt][0];
        mine[gid * RP + d + 1] = o[dt][1];
        mine[(gid + 8) * RP + d] = o[dt][2];
        mine[(gid + 8) * RP + d + 1] = o[dt][3];
    }
    if (tig == 0) {
        mine[gid * RP + HD] = m0;
        mine[gid * RP + HD + 1] = l0;
        mine[(gid + 8) * RP + HD] = m1;
        mine[(gid + 8) * RP + HD + 1] = l1;
    }
    __syncthreads();
    // The block's state per head (rows [0, nhb) of `res`): the key groups merged in
    // group order.
    float* res = mrg;
    if (kg > 1) {
        res = mrg + warps * 16 * RP;
        dtc_merge_groups<HD>(mrg, res, w_s, kg, mts, nhb);
        __syncthreads();
    }
    dtc_finish<HD>(res, r, h0, nhb, nh, out, part_o, part_ml);
}

// Dynamic shared memory: the split's K and V tiles, or the merge areas of the warps plus
// the block's result rows, whichever is larger (the launcher computes the same). At most
// 12 warps at head size 64 (16 key-group x m-tile pairs would cap registers at 128 and
// spill), 8 at 128.
#define ATTN_DEC_TC_KERNEL(HD, MAXT)                                                            \
    extern "C" __global__ void __launch_bounds__(MAXT) attn_decode_tc##HD(                      \
        const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc, \
        u64 layer_off, const u32* __restrict__ row_list, const u32* __restrict__ row_info,      \
        const u32* __restrict__ seq_info, const u32* __restrict__ block_tables, int block_size,  \
        const float* __restrict__ slopes, int has_alibi, float* __restrict__ out,               \
        float* __restrict__ part_o, float* __restrict__ part_ml, int nh, int kvh, int kg,       \
        float scale, int early) {                                                               \
        if (has_alibi) {                                                                        \
            attn_dec_tc<HD, true>(q, kc, vc, layer_off, row_list, row_info, seq_info,           \
                                  block_tables, block_size, slopes, out, part_o, part_ml, nh,   \
                                  kvh, kg, scale, early);                                       \
        } else {                                                                                \
            attn_dec_tc<HD, false>(q, kc, vc, layer_off, row_list, row_info, seq_info,          \
                                   block_tables, block_size, slopes, out, part_o, part_ml, nh,  \
                                   kvh, kg, scale, early);                                      \
        }                                                                                       \
    }

ATTN_DEC_TC_KERNEL(64, 384)
ATTN_DEC_TC_KERNEL(128, 256)
