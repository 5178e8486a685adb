// y = x @ w^T (+ bias) for few activation rows (decode and verify steps): memory bound,
// so every bf16 weight row is streamed exactly once with 16-byte loads and multiplied
// with all R activation rows (f32) at once. One warp owns ROWS output features; x stays
// in L1/L2, the weights bypass L1. Each 16-byte weight load needs 32 bytes of x per
// activation row from L1, so with more rows a warp takes more output features (ROWS) to
// share those x loads: L1 bandwidth, not HBM, would otherwise limit a verify pass.

#define GEMV_WARPS 4

// What a GEMV stores for each output v = dot + bias (`epi` argument): v itself, GELU(v)
// (the MLP's up projection), or y + v (a residual stream updated in place). The same
// f32 operations as the separate gelu_f32 / add_f32 kernels, so fusing changes no bit.
#define EPI_STORE 0
#define EPI_GELU 1
#define EPI_ACCUMULATE 2

__device__ __forceinline__ void gemv_store(float* __restrict__ y, size_t i, float v, int epi) {
    if (epi == EPI_GELU) {
        v = gelu_erf(v);
    } else if (epi == EPI_ACCUMULATE) {
        v = y[i] + v;
    }
    y[i] = v;
}

__device__ __forceinline__ float dot8(uint4 w, float4 a, float4 b) {
    float s = lo_bf16(w.x) * a.x;
    s = fmaf(hi_bf16(w.x), a.y, s);
    s = fmaf(lo_bf16(w.y), a.z, s);
    s = fmaf(hi_bf16(w.y), a.w, s);
    s = fmaf(lo_bf16(w.z), b.x, s);
    s = fmaf(hi_bf16(w.z), b.y, s);
    s = fmaf(lo_bf16(w.w), b.z, s);
    s = fmaf(hi_bf16(w.w), b.w, s);
    return s;
}

// Volatile weight loads: issued in program order, so that they stay in front of
// pdl_wait() and a tensor-core group's loads are all in flight before its first mma (the
// compiler otherwise moves or interleaves them).
__device__ __forceinline__ uint4 ld_stream_v(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// Requires K % 8 == 0 (16-byte aligned weight rows). grid ceil(N / (GEMV_WARPS *
// GEMV_ROWS)), block 32 * GEMV_WARPS. Calls pdl_wait() and pdl_trigger() itself, after
// loading the first two rounds of weights. With CAT, the product runs over two inputs
// laid end to end: x [R, K] with w [N, K], then x2 [R, K2] with w2 [N, K2] (K2 % 8 == 0),
// summed as one dot product, and bias2 is added after bias.
//
// The warp computes weight rows n0 + i * stride (i < GEMV_ROWS; rows past N repeat row
// N - 1) and hands their dot products to `store(dots)`, on lane 0 (`dots[i][r]`: row i
// with activation row r). Each row's sum runs in the same order whatever the stride and
// GEMV_ROWS, so that how rows are dealt to warps changes no bit.
//
// The warp takes slice `part` of `parts` of the K chunks (contiguous, each a multiple of
// 32 chunks but the last; `parts` 1 is the whole row), so that several warps can share a
// long row: their partial sums are then added by the caller.
//
// With LATE the first input x is one that no kernel still running writes (written before
// the kernel queued last started): the warp multiplies it before pdl_wait(), then waits
// (the whole warp, converged) and multiplies x2, so that the first product streams while
// the kernel before this one still runs. Each lane takes its chunks in the same order
// either way, so LATE changes no bit.
template <int R, int U, int GEMV_ROWS, bool CAT, bool LATE, class Store>
__device__ __forceinline__ void gemv_core(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                          int K, const float* __restrict__ x2,
                                          const bf16_t* __restrict__ w2, int K2, int n0,
                                          int stride, int N, int part, int parts, Store store) {
    static_assert(CAT || !LATE, "LATE needs a second input to wait for");
    const int lane = threadIdx.x & 31;
    if (n0 >= N) return;
    const int K8a = K >> 3;
    const int K8 = K8a + (CAT ? K2 >> 3 : 0);
    const uint4* wp[GEMV_ROWS];
    const uint4* wq[GEMV_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++) {
        const size_t row = (size_t)min(n0 + i * stride, N - 1);
        wp[i] = (const uint4*)(w + row * K);
        wq[i] = CAT ? (const uint4*)(w2 + row * K2) : wp[i];
    }
    // Chunk c (8 values) of weight row i, and of activation row r.
    auto wchunk = [&](int i, int c) { return (CAT && c >= K8a) ? wq[i] + (c - K8a) : wp[i] + c; };
    auto xchunk = [&](int r, int c) {
        return (CAT && c >= K8a) ? (const float4*)(x2 + (size_t)r * K2) + 2 * (c - K8a)
                                 : (const float4*)(x + (size_t)r * K) + 2 * c;
    };
    float acc[GEMV_ROWS][R];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] = 0.0f;

    // This lane's chunks from c up to `end`, in rounds of U chunks, two in flight while
    // one is multiplied: enough bytes to cover HBM latency. The weights depend on no
    // kernel, so the first two rounds are loaded before the wait (when `wait`), while
    // the kernel before this one finishes. Returns the lane's next chunk.
    auto run = [&](int c, int end, bool wait) {
        const int step = 32 * U;
        bool full = c + 32 * (U - 1) < end;
        bool full1 = c + step + 32 * (U - 1) < end;
        uint4 wv[U][GEMV_ROWS], wn[U][GEMV_ROWS];
        if (full) {
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++) wv[u][i] = ld_stream_v(wchunk(i, c + 32 * u));
        }
        if (full1) {
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++) wn[u][i] = ld_stream_v(wchunk(i, c + step + 32 * u));
        }
        if (wait) {
            pdl_wait();
            pdl_trigger();
        }
        while (full) {
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float4* xp = xchunk(r, c + 32 * u);
                    const float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
                    for (int i = 0; i < GEMV_ROWS; i++) acc[i][r] += dot8(wv[u][i], a, b);
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++) wv[u][i] = wn[u][i];
            c += step;
            full = full1;
            full1 = c + step + 32 * (U - 1) < end;
            if (full1) {
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int i = 0; i < GEMV_ROWS; i++) wn[u][i] = ld_stream(wchunk(i, c + step + 32 * u));
            }
        }
        for (; c < end; c += 32) {
            uint4 wt[GEMV_ROWS];
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; i++) wt[i] = ld_stream(wchunk(i, c));
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float4* xp = xchunk(r, c);
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++) acc[i][r] += dot8(wt[i], a, b);
            }
        }
        return c;
    };
    int c0 = 0, c1 = K8;
    if (parts > 1) {
        const int per = ((K8 + parts - 1) / parts + 31) & ~31;
        c0 = min(K8, part * per);
        c1 = min(K8, c0 + per);
    }
    if (LATE) {
        run(run(c0 + lane, max(c0, min(K8a, c1)), false), c1, true);
    } else {
        run(c0 + lane, c1, true);
    }
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] = warp_sum(acc[i][r]);
    if (lane == 0) store(acc);
}

// y = x @ w^T (+ bias) (+ x2 @ w2^T (+ bias2) with CAT) with the epilogue `epi`, for
// GEMV_ROWS consecutive features per group of SPLIT warps: GEMV_WARPS / SPLIT groups a
// block. With SPLIT > 1 the group's warps take one slice of K each (gemv_core) and warp
// 0 of the group adds their sums in slice order, so that long rows (few output features,
// e.g. Falcon's residual sum) spread over more, smaller blocks: a grid of a few large
// blocks per SM leaves some SMs a block more than others. Other rounding than SPLIT 1,
// the same for every launch of one SPLIT.
template <int R, int U, int GEMV_ROWS, bool CAT, bool LATE = false, int SPLIT = 1>
__device__ __forceinline__ void gemv_rows(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                          int K, const float* __restrict__ x2,
                                          const bf16_t* __restrict__ w2, int K2,
                                          const float* __restrict__ bias,
                                          const float* __restrict__ bias2, float* __restrict__ y,
                                          int N, int has_bias, int has_bias2, int epi, int block) {
    static_assert(SPLIT == 1 || SPLIT == 2 || SPLIT == 4, "SPLIT divides GEMV_WARPS");
    const int warp = threadIdx.x >> 5;
    const int n0 = (block * (GEMV_WARPS / SPLIT) + warp / SPLIT) * GEMV_ROWS;
    auto store = [&](const float(&s)[GEMV_ROWS][R]) {
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; i++) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (n0 + i < N) {
                    float v = s[i][r] + (has_bias ? bias[n0 + i] : 0.0f);
                    if (CAT && has_bias2) v += bias2[n0 + i];
                    gemv_store(y, (size_t)r * N + n0 + i, v, epi);
                }
            }
        }
    };
    if (SPLIT == 1) {
        gemv_core<R, U, GEMV_ROWS, CAT, LATE>(x, w, K, x2, w2, K2, n0, 1, N, 0, 1, store);
        return;
    }
    __shared__ float partial[GEMV_WARPS][GEMV_ROWS][R];
    const int part = warp % SPLIT;
    // Every warp reaches the barrier: a group past N computes row N - 1 and stores nothing.
    gemv_core<R, U, GEMV_ROWS, CAT, LATE>(x, w, K, x2, w2, K2, min(n0, N - 1), 1, N, part, SPLIT,
                                          [&](const float(&s)[GEMV_ROWS][R]) {
#pragma unroll
                                              for (int i = 0; i < GEMV_ROWS; i++)
#pragma unroll
                                                  for (int r = 0; r < R; r++) partial[warp][i][r] = s[i][r];
                                          });
    __syncthreads();
    if (part == 0 && (threadIdx.x & 31) == 0 && n0 < N) {
        float s[GEMV_ROWS][R];
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; i++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                float v = partial[warp][i][r];
#pragma unroll
                for (int q = 1; q < SPLIT; q++) v += partial[warp + q][i][r];
                s[i][r] = v;
            }
        store(s);
    }
}

// y = x @ w^T (+ bias) with the epilogue `epi`.
template <int R, int U, int GEMV_ROWS, int SPLIT = 1>
__device__ __forceinline__ void gemv_vec(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                         const float* __restrict__ bias, float* __restrict__ y,
                                         int N, int K, int has_bias, int epi, int block) {
    gemv_rows<R, U, GEMV_ROWS, false, false, SPLIT>(x, w, K, x, w, 0, bias, bias, y, N, has_bias, 0,
                                                    epi, block);
}

// Output features per block: GEMV_WARPS * ROWS (the launcher mirrors this table).
#define GEMV_KERNEL(R, U, ROWS)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                              \
        gemv_bf16_r##R(const float* __restrict__ x, const bf16_t* __restrict__ w,              \
                       const float* __restrict__ bias, float* __restrict__ y, int N, int K,    \
                       int has_bias, int epi) {                                                \
        gemv_vec<R, U, ROWS>(x, w, bias, y, N, K, has_bias, epi, blockIdx.x);                  \
    }

GEMV_KERNEL(1, 4, 2)
GEMV_KERNEL(2, 4, 2)
GEMV_KERNEL(3, 2, 4)
GEMV_KERNEL(4, 2, 4)
GEMV_KERNEL(5, 2, 4)
GEMV_KERNEL(6, 2, 4)
GEMV_KERNEL(7, 2, 4)
GEMV_KERNEL(8, 2, 4)

// gemv_bf16_r1 with each pair of features shared by SPLIT warps, each a slice of K
// (gemv_rows): grid ceil(N / (GEMV_WARPS / SPLIT * 2)).
#define GEMV_SPLIT_KERNEL(SPLIT)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                              \
        gemv_bf16_r1_s##SPLIT(const float* __restrict__ x, const bf16_t* __restrict__ w,       \
                              const float* __restrict__ bias, float* __restrict__ y, int N,    \
                              int K, int has_bias, int epi) {                                  \
        gemv_vec<1, 4, 2, SPLIT>(x, w, bias, y, N, K, has_bias, epi, blockIdx.x);              \
    }

GEMV_SPLIT_KERNEL(2)
GEMV_SPLIT_KERNEL(4)

// Two products of one input in one launch (Falcon's qkv and MLP up projection under a
// shared norm): blocks [0, blocks_a) compute the first exactly as gemv_bf16_r1 (_sN)
// alone, the rest the second; one kernel boundary fewer per layer. One row (decode).
#define GEMV2_KERNEL(NAME, SPLIT)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                              \
        NAME(const float* __restrict__ x, int K, const bf16_t* __restrict__ wa,                \
             const float* __restrict__ ba, float* __restrict__ ya, int Na, int has_ba,         \
             int epi_a, int blocks_a, const bf16_t* __restrict__ wb,                           \
             const float* __restrict__ bb, float* __restrict__ yb, int Nb, int has_bb,         \
             int epi_b) {                                                                      \
        const int b = blockIdx.x;                                                              \
        if (b < blocks_a) {                                                                    \
            gemv_vec<1, 4, 2, SPLIT>(x, wa, ba, ya, Na, K, has_ba, epi_a, b);                  \
        } else {                                                                               \
            gemv_vec<1, 4, 2, SPLIT>(x, wb, bb, yb, Nb, K, has_bb, epi_b, b - blocks_a);       \
        }                                                                                      \
    }

GEMV2_KERNEL(gemv2_bf16_r1, 1)
GEMV2_KERNEL(gemv2_bf16_r1_s2, 2)
GEMV2_KERNEL(gemv2_bf16_r1_s4, 4)

// Where a fused qkv projection stores (gemv2_rope_bf16_r1, gemv2_tcx_rope_r*): queries,
// the KV cache and the step's slots and rotary tables.
struct RopeOut {
    float* q;
    bf16_t* kc;
    bf16_t* vc;
    const u32* slots;
    const float* cosv;
    const float* sinv;
    int rotary, nh, kvh, hd;
    u64 layer_off;
};

// Stores feature pair (d, d + hd / 2) of fused-qkv head `hg` for step row r as rope_qkv
// would: queries rotated into q, keys rotated and values into the cache slot.
__device__ __forceinline__ void rope_store(const RopeOut& ro, int r, int hg, int d, float v0,
                                           float v1) {
    const int qpg = ro.nh / ro.kvh, half = ro.hd >> 1;
    const int g = hg / (qpg + 2), head = hg - g * (qpg + 2);
    if (ro.rotary && head <= qpg) {
        const float c = ro.cosv[(size_t)r * half + d], sn = ro.sinv[(size_t)r * half + d];
        const float r0 = rope_pair(v0, v1, c, sn, true);
        v1 = rope_pair(v1, v0, c, sn, false);
        v0 = r0;
    }
    if (head < qpg) {
        float* dst = ro.q + ((size_t)r * ro.nh + (size_t)g * qpg + head) * ro.hd + d;
        dst[0] = v0;
        dst[half] = v1;
    } else {
        const u64 cache = ro.layer_off + ((u64)ro.slots[r] * ro.kvh + g) * ro.hd + d;
        bf16_t* dst = head == qpg ? ro.kc : ro.vc;
        dst[cache] = f2bf(v0);
        dst[cache + half] = f2bf(v1);
    }
}

// gemv2_bf16_r1 whose first product is the fused qkv projection ([kv_heads][q_per_kv + 2]
// [head_dim] features), stored as rope_qkv would store it: queries through rotary to q
// ([heads, head_dim], f32), keys through rotary and values into the layer's cache slot
// (bf16). Each warp takes the two features a rotary pair mixes (d and d + head_dim / 2
// of one head), so the rotation happens in its epilogue with both sums at hand; the sums
// are those gemv2_bf16_r1 computes, and the rotation is rope_pair, as in rope_qkv, so
// every stored value is bit-identical to the two launches it replaces. Blocks
// [0, blocks_a) cover the kv_heads * (q_per_kv + 2) * head_dim / 2 pairs, four per block.
// One row (decode); head_dim even.
extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)
    gemv2_rope_bf16_r1(const float* __restrict__ x, int K, const bf16_t* __restrict__ wa,
                       const float* __restrict__ ba, int has_ba, int blocks_a,
                       const bf16_t* __restrict__ wb, const float* __restrict__ bb,
                       float* __restrict__ yb, int Nb, int has_bb, int epi_b,
                       float* __restrict__ q, bf16_t* __restrict__ kc, bf16_t* __restrict__ vc,
                       const u32* __restrict__ slots, const float* __restrict__ cosv,
                       const float* __restrict__ sinv, int rotary, int nh, int kvh, int hd,
                       u64 layer_off) {
    const int b = blockIdx.x;
    if (b >= blocks_a) {
        gemv_vec<1, 4, 2>(x, wb, bb, yb, Nb, K, has_bb, epi_b, b - blocks_a);
        return;
    }
    const int qpg = nh / kvh, half = hd >> 1;
    const int na = kvh * (qpg + 2) * hd;
    const int pair = b * GEMV_WARPS + (threadIdx.x >> 5);
    const int hg = pair / half, j = pair - hg * half;
    const int n0 = hg * hd + j;
    const RopeOut ro{q, kc, vc, slots, cosv, sinv, rotary, nh, kvh, hd, layer_off};
    gemv_core<1, 4, 2, false, false>(x, wa, K, x, wa, 0, n0, half, na, 0, 1, [&](const float(&s)[2][1]) {
        rope_store(ro, 0, hg, j, s[0][0] + (has_ba ? ba[n0] : 0.0f),
                   s[1][0] + (has_ba ? ba[n0 + half] : 0.0f));
    });
}

// y += x @ w^T (+ bias) + x2 @ w2^T (+ bias2) for one row, as one dot product over the
// two inputs laid end to end: Falcon's parallel-attention residual (attention output
// projection and MLP down projection) in one launch, which streams both weights where
// two launches would each drain and ramp up the GPU. Other rounding than two
// accumulating launches, so only for steps nothing compares bit for bit (not in
// row-invariant mode). grid ceil(N / (GEMV_WARPS / SPLIT * 2)), block 32 * GEMV_WARPS;
// SPLIT warps share each pair of features (gemv_rows), the kernel name ends in _s2 or _s4
// for SPLIT 2 or 4.
//
// The _late kernels take a first input that is complete before the kernel queued last
// starts (Falcon's MLP activations, computed before the attention): its product streams
// before the PDL wait, while that kernel (the attention) still runs, and only the second
// product waits for it. Same arguments; the sum is rounded as the plain kernel of the
// same SPLIT rounds it with its terms in this order.
#define GEMV_CAT_KERNEL(NAME, LATE, SPLIT)                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                              \
        NAME(const float* __restrict__ x, const bf16_t* __restrict__ w, int K,                 \
             const float* __restrict__ bias, int has_bias, const float* __restrict__ x2,       \
             const bf16_t* __restrict__ w2, int K2, const float* __restrict__ bias2,           \
             int has_bias2, float* __restrict__ y, int N) {                                    \
        gemv_rows<1, 4, 2, true, LATE, SPLIT>(x, w, K, x2, w2, K2, bias, bias2, y, N,          \
                                              has_bias, has_bias2, EPI_ACCUMULATE, blockIdx.x); \
    }

GEMV_CAT_KERNEL(gemv_cat_bf16_r1, false, 1)
GEMV_CAT_KERNEL(gemv_cat_bf16_r1_s2, false, 2)
GEMV_CAT_KERNEL(gemv_cat_bf16_r1_s4, false, 4)
GEMV_CAT_KERNEL(gemv_cat_late_bf16_r1, true, 1)
GEMV_CAT_KERNEL(gemv_cat_late_bf16_r1_s2, true, 2)
GEMV_CAT_KERNEL(gemv_cat_late_bf16_r1_s4, true, 4)

// Any K, any alignment (tiny models): one warp per output feature, scalar loads.
// grid ceil(N / GEMV_WARPS), block 32 * GEMV_WARPS, R <= 8.
extern "C" __global__ void gemv_bf16_scalar(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                            const float* __restrict__ bias, float* __restrict__ y,
                                            int R, int N, int K, int has_bias, int epi) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    float acc[8];
#pragma unroll
    for (int r = 0; r < 8; r++) acc[r] = 0.0f;
    const bf16_t* wr = w + (size_t)n * K;
    for (int k = lane; k < K; k += 32) {
        const float wv = bf2f(wr[k]);
#pragma unroll
        for (int r = 0; r < 8; r++)
            if (r < R) acc[r] += wv * x[(size_t)r * K + k];
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        const float s = warp_sum(acc[r]);
        if (r < R && lane == 0) gemv_store(y, (size_t)r * N + n, s + (has_bias ? bias[n] : 0.0f), epi);
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core GEMV for 1..8 activation rows: y[r, n] = sum_k x[r, k] * w[n, k] (+ bias).
//
// The weights are the A operand of mma.m16n8k16 (16 output features per warp tile), the
// activations the B operand (8 columns: the rows of x). Activations are f32: each is split
// into bf16 hi = truncate(x) and lo = truncate(x - hi), both exact in bf16, so that
// w * hi + w * lo equals w * x to about 2^-16 relative (the tensor cores multiply exactly
// and accumulate in f32): the result matches the f32 CUDA-core kernels above, while the
// instruction count per weight byte is several times lower, so that even 8 rows stream
// the weights at memory speed (a verify pass costs about one decode step).
//
// With R <= 4, hi and lo share one mma: column c < 4 holds row c's hi part, column 4 + c
// its lo part, and y = C[:, c] + C[:, c + 4]. With R > 4, two mmas (hi, lo) accumulate
// into the same C.
//
// Because a dot product may sum its terms in any order, each lane loads a whole 16-byte
// chunk (8 consecutive k) of its weight row and the matching 8 activations: for chunk
// c (32 k) the lane with (gid, tig) = (lane / 4, lane % 4) holds k = 32c + 8 tig .. +8 of
// rows n0 + gid and n0 + gid + 8, and its B column gid; logical k 2tig, 2tig+1 of mma step
// s are the physical k 8tig + 4s + {0, 1}, logical k 2tig+8, 2tig+9 the physical
// 8tig + 4s + {2, 3}.
//
// grid (ceil(N / 16), nsplit), block 32 * TCG_WARPS. Each block covers chunks
// [split * chunks_per_split, +chunks_per_split) of K / 32 for its 16 features; warps take
// groups of TCG_U consecutive chunks in turn. With nsplit > 1 each block writes its
// partial sums to part[split][R][N]; the last block of a tile to finish (counted in
// counters[tile], which it resets to 0) adds them in split order, so the result is
// deterministic. Requires K % 32 == 0.

#define TCG_WARPS 4

__device__ __forceinline__ u32 hi_pair(float a, float b) {
    return __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x7632);
}


__device__ __forceinline__ float4 ld_nc_v(const float4* p) {
    float4 r;
    asm volatile("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float trunc_bf16(float a) {
    return __uint_as_float(__float_as_uint(a) & 0xffff0000u);
}

__device__ __forceinline__ void mma_bf16_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                               u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// With ROPE (the fused qkv projection of gemv2_tcx_rope_r*), tile t holds the rotary
// pairs j0 .. j0 + 7 of head hg = t / (hd / 16), j0 = 8 (t % (hd / 16)): features i < 8
// are hg * hd + j0 + i, features i >= 8 their partners hd / 2 further, so that the
// epilogue has both values of every pair in the block; the sums are those of the plain
// tiles (same K splits and order), stored through rope_store instead of to y.
template <int R, int TCG_U, bool PACK, bool ROPE = false>
__device__ __forceinline__ void gemv_tc(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                        const float* __restrict__ bias, float* __restrict__ y,
                                        float* __restrict__ part, u32* __restrict__ counters,
                                        int N, int K, int has_bias, int chunks_per_split, int epi,
                                        int tile, int split, int nsplit,
                                        const RopeOut* ro = nullptr) {
    constexpr bool PACKED = PACK && R <= 4;
    __shared__ float red[TCG_WARPS][32][4];
    __shared__ float tile_out[16][8];
    __shared__ float rope_v[ROPE ? 16 : 1][8];
    __shared__ int last_block;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int n0 = tile * 16;
    // ROPE: head and first pair of the tile (see above).
    const int tph = ROPE ? ro->hd >> 4 : 1;
    const int hg = ROPE ? tile / tph : 0;
    const int j0 = ROPE ? (tile - hg * tph) * 8 : 0;
    const int half = ROPE ? ro->hd >> 1 : 0;
    auto feature = [&](int i) {
        return ROPE ? hg * ro->hd + j0 + (i & 7) + (i >= 8 ? half : 0) : n0 + i;
    };
    const int ra = min(feature(gid), N - 1), rb = min(feature(gid + 8), N - 1);
    const int nchunks = K >> 5;
    const int c_begin = split * chunks_per_split;
    const int c_end = min(nchunks, c_begin + chunks_per_split);
    // Chunk c of a row is uint4 number 4c + tig of that row.
    const uint4* wa = (const uint4*)(w + (size_t)ra * K) + tig;
    const uint4* wb = (const uint4*)(w + (size_t)rb * K) + tig;
    // This lane's B column: packed, column c < 4 is row c's hi part and 4 + c its lo
    // part; otherwise column c is row c (hi and lo in two mmas).
    const int col = PACKED ? (gid & 3) : gid;
    const bool use_hi = col < R && (!PACKED || gid < 4);
    const bool use_lo = col < R && (!PACKED || gid >= 4);
    const int xr = col < R ? col : 0;
    // Every lane loads activations (lanes without a column read row 0 and drop it), so
    // that the loop has no branches and all loads of a group are in flight together.
    const float4* xp = (const float4*)(x + (size_t)xr * K) + 2 * tig;
    const u32 keep_hi = use_hi ? 0xffffffffu : 0u, keep_lo = use_lo ? 0xffffffffu : 0u;

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    auto consume = [&](const uint4& ua, const uint4& ub, const float4& f0, const float4& f1) {
        const float e[8] = {f0.x, f0.y, f0.z, f0.w, f1.x, f1.y, f1.z, f1.w};
        u32 bh[4], bl[4];
#pragma unroll
        for (int p2 = 0; p2 < 4; p2++) {
            const float a = e[2 * p2], b = e[2 * p2 + 1];
            bh[p2] = hi_pair(a, b) & keep_hi;
            bl[p2] = hi_pair(a - trunc_bf16(a), b - trunc_bf16(b)) & keep_lo;
        }
        if (PACKED) {
            u32 bb[4];
#pragma unroll
            for (int p2 = 0; p2 < 4; p2++) bb[p2] = bh[p2] | bl[p2];
            mma_bf16_16816(acc, ua.x, ub.x, ua.y, ub.y, bb[0], bb[1]);
            mma_bf16_16816(acc, ua.z, ub.z, ua.w, ub.w, bb[2], bb[3]);
        } else {
            mma_bf16_16816(acc, ua.x, ub.x, ua.y, ub.y, bh[0], bh[1]);
            mma_bf16_16816(acc, ua.x, ub.x, ua.y, ub.y, bl[0], bl[1]);
            mma_bf16_16816(acc, ua.z, ub.z, ua.w, ub.w, bh[2], bh[3]);
            mma_bf16_16816(acc, ua.z, ub.z, ua.w, ub.w, bl[2], bl[3]);
        }
    };
    // Whole groups of TCG_U chunks, warps in turn; then the last < TCG_U chunks one each.
    // Each group's weights are loaded while the previous group is multiplied; the
    // weights depend on no kernel, so the first group is loaded before the wait.
    const int full_end = c_begin + (c_end - c_begin) / TCG_U * TCG_U;
    int c0 = c_begin + warp * TCG_U;
    uint4 va[TCG_U], vb[TCG_U];
    if (c0 < full_end) {
#pragma unroll
        for (int u = 0; u < TCG_U; u++) {
            va[u] = ld_stream_v(wa + 4 * (c0 + u));
            vb[u] = ld_stream_v(wb + 4 * (c0 + u));
        }
    }
    pdl_wait();
    pdl_trigger();
    while (c0 < full_end) {
        const int cn = c0 + TCG_WARPS * TCG_U;
        uint4 na[TCG_U], nb[TCG_U];
        if (cn < full_end) {
#pragma unroll
            for (int u = 0; u < TCG_U; u++) {
                na[u] = ld_stream_v(wa + 4 * (cn + u));
                nb[u] = ld_stream_v(wb + 4 * (cn + u));
            }
        }
        float4 x0[TCG_U], x1[TCG_U];
#pragma unroll
        for (int u = 0; u < TCG_U; u++) {
            x0[u] = ld_nc_v(xp + 8 * (c0 + u));
            x1[u] = ld_nc_v(xp + 8 * (c0 + u) + 1);
        }
#pragma unroll
        for (int u = 0; u < TCG_U; u++) consume(va[u], vb[u], x0[u], x1[u]);
#pragma unroll
        for (int u = 0; u < TCG_U; u++) {
            va[u] = na[u];
            vb[u] = nb[u];
        }
        c0 = cn;
    }
    for (int c = full_end + warp; c < c_end; c += TCG_WARPS) {
        const uint4 ua = ld_stream(wa + 4 * c), ub = ld_stream(wb + 4 * c);
        consume(ua, ub, __ldg(xp + 8 * c), __ldg(xp + 8 * c + 1));
    }
#pragma unroll
    for (int i = 0; i < 4; i++) red[warp][lane][i] = acc[i];
    __syncthreads();
    // Thread t < 128 sums C[i][j] (i = t / 8: feature, j = t % 8: column) over the warps.
    const int t = threadIdx.x;
    const int i = t >> 3, j = t & 7;
    if (t < 128) {
        const int src_lane = (i & 7) * 4 + (j >> 1), slot = (i >= 8 ? 2 : 0) + (j & 1);
        float s = 0.0f;
#pragma unroll
        for (int ww = 0; ww < TCG_WARPS; ww++) s += red[ww][src_lane][slot];
        tile_out[i][j] = s;
    }
    __syncthreads();
    const int n = feature(i);
    const bool writer = t < 128 && j < R && n < N;
    // The block's final values: to y, or (ROPE) to shared memory and then in pairs
    // through rope_store (every thread of the block reaches the barrier).
    auto finish = [&](float v) {
        if (!ROPE) {
            if (writer) gemv_store(y, (size_t)j * N + n, v, epi);
            return;
        }
        if (writer) rope_v[i][j] = v;
        __syncthreads();
        if (writer && i < 8) rope_store(*ro, j, hg, j0 + i, rope_v[i][j], rope_v[i + 8][j]);
    };
    float v = 0.0f;
    if (writer) v = PACKED ? tile_out[i][j] + tile_out[i][j + 4] : tile_out[i][j];
    if (nsplit == 1) {
        finish(v + (writer && has_bias ? bias[n] : 0.0f));
        return;
    }
    if (writer) part[((size_t)split * R + j) * N + n] = v;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_block = atomicAdd(&counters[tile], 1u) == (u32)(nsplit - 1);
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    float s = 0.0f;
    if (writer) {
        for (int z = 0; z < nsplit; z++) s += __ldcg(part + ((size_t)z * R + j) * N + n);
    }
    finish(s + (writer && has_bias ? bias[n] : 0.0f));
    if (threadIdx.x == 0) counters[tile] = 0u;
}

#define GEMV_TC_KERNEL(NAME, R, U, PACK)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * TCG_WARPS)                               \
        NAME(const float* __restrict__ x, const bf16_t* __restrict__ w,                        \
             const float* __restrict__ bias, float* __restrict__ y, float* __restrict__ part,  \
             u32* __restrict__ counters, int N, int K, int has_bias, int chunks_per_split,     \
             int epi) {                                                                        \
        gemv_tc<R, U, PACK>(x, w, bias, y, part, counters, N, K, has_bias, chunks_per_split,   \
                            epi, blockIdx.x, blockIdx.y, gridDim.y);                           \
    }

// Two products of one input in one launch (see gemv2_bf16_r1): each with the tiles and
// K splits it would have alone (so the same bits), blocks [0, tiles_a * nsplit_a) the
// first (tile = i % tiles_a, split = i / tiles_a), the rest the second. 1-D grid.
#define GEMV2_TC_KERNEL(NAME, R, U, PACK)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * TCG_WARPS)                               \
        NAME(const float* __restrict__ x, int K, const bf16_t* __restrict__ wa,                \
             const float* __restrict__ ba, float* __restrict__ ya, float* __restrict__ pa,     \
             u32* __restrict__ ca, int Na, int has_ba, int cps_a, int epi_a, int tiles_a,      \
             int nsplit_a, const bf16_t* __restrict__ wb, const float* __restrict__ bb,        \
             float* __restrict__ yb, float* __restrict__ pb, u32* __restrict__ cb, int Nb,     \
             int has_bb, int cps_b, int epi_b, int tiles_b, int nsplit_b) {                    \
        const int i = blockIdx.x, blocks_a = tiles_a * nsplit_a;                               \
        if (i < blocks_a) {                                                                    \
            gemv_tc<R, U, PACK>(x, wa, ba, ya, pa, ca, Na, K, has_ba, cps_a, epi_a,            \
                                i % tiles_a, i / tiles_a, nsplit_a);                           \
        } else {                                                                               \
            const int j = i - blocks_a;                                                        \
            gemv_tc<R, U, PACK>(x, wb, bb, yb, pb, cb, Nb, K, has_bb, cps_b, epi_b,            \
                                j % tiles_b, j / tiles_b, nsplit_b);                           \
        }                                                                                      \
    }

// GEMV2_TC_KERNEL whose first product is the fused qkv projection, stored through
// rotary into q and the KV cache (gemv_tc with ROPE; tiles_a = Na / 16).
#define GEMV2_TC_ROPE_KERNEL(NAME, R, U, PACK)                                                 \
    extern "C" __global__ void __launch_bounds__(32 * TCG_WARPS)                               \
        NAME(const float* __restrict__ x, int K, const bf16_t* __restrict__ wa,                \
             const float* __restrict__ ba, float* __restrict__ ya, float* __restrict__ pa,     \
             u32* __restrict__ ca, int Na, int has_ba, int cps_a, int epi_a, int tiles_a,      \
             int nsplit_a, const bf16_t* __restrict__ wb, const float* __restrict__ bb,        \
             float* __restrict__ yb, float* __restrict__ pb, u32* __restrict__ cb, int Nb,     \
             int has_bb, int cps_b, int epi_b, int tiles_b, int nsplit_b, float* __restrict__ q, \
             bf16_t* __restrict__ kc, bf16_t* __restrict__ vc, const u32* __restrict__ slots,  \
             const float* __restrict__ cosv, const float* __restrict__ sinv, int rotary, int nh, \
             int kvh, int hd, u64 layer_off) {                                                 \
        const int i = blockIdx.x, blocks_a = tiles_a * nsplit_a;                               \
        if (i < blocks_a) {                                                                    \
            const RopeOut ro{q, kc, vc, slots, cosv, sinv, rotary, nh, kvh, hd, layer_off};    \
            gemv_tc<R, U, PACK, true>(x, wa, ba, ya, pa, ca, Na, K, has_ba, cps_a, epi_a,      \
                                      i % tiles_a, i / tiles_a, nsplit_a, &ro);                \
        } else {                                                                               \
            const int j = i - blocks_a;                                                        \
            gemv_tc<R, U, PACK>(x, wb, bb, yb, pb, cb, Nb, K, has_bb, cps_b, epi_b,            \
                                j % tiles_b, j / tiles_b, nsplit_b);                           \
        }                                                                                      \
    }

// TCG_U = 4 chunks per warp per iteration (8 measured slower on the H200).
GEMV_TC_KERNEL(gemv_tc_r1, 1, 4, true)
GEMV_TC_KERNEL(gemv_tc_r2, 2, 4, true)
GEMV_TC_KERNEL(gemv_tc_r3, 3, 4, true)
GEMV_TC_KERNEL(gemv_tc_r4, 4, 4, true)
GEMV_TC_KERNEL(gemv_tc_r5, 5, 4, true)
GEMV_TC_KERNEL(gemv_tc_r6, 6, 4, true)
GEMV_TC_KERNEL(gemv_tc_r7, 7, 4, true)
GEMV_TC_KERNEL(gemv_tc_r8, 8, 4, true)
// Row-invariant variants of 1 to 4 rows: hi and lo parts in two mmas into one column,
// as with 5 to 8 rows, so that a row's result is the same bits in any row count (a
// one-token step and a verify pass; each column of an mma is computed on its own).
GEMV_TC_KERNEL(gemv_tcx_r1, 1, 4, false)
GEMV_TC_KERNEL(gemv_tcx_r2, 2, 4, false)
GEMV_TC_KERNEL(gemv_tcx_r3, 3, 4, false)
GEMV_TC_KERNEL(gemv_tcx_r4, 4, 4, false)

GEMV2_TC_KERNEL(gemv2_tc_r1, 1, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r2, 2, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r3, 3, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r4, 4, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r5, 5, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r6, 6, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r7, 7, 4, true)
GEMV2_TC_KERNEL(gemv2_tc_r8, 8, 4, true)
GEMV2_TC_KERNEL(gemv2_tcx_r1, 1, 4, false)
GEMV2_TC_KERNEL(gemv2_tcx_r2, 2, 4, false)
GEMV2_TC_KERNEL(gemv2_tcx_r3, 3, 4, false)
GEMV2_TC_KERNEL(gemv2_tcx_r4, 4, 4, false)

// The row-invariant pair with the fused qkv projection (the runtime's decode and verify
// steps).
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r1, 1, 4, false)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r2, 2, 4, false)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r3, 3, 4, false)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r4, 4, 4, false)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r5, 5, 4, true)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r6, 6, 4, true)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r7, 7, 4, true)
GEMV2_TC_ROPE_KERNEL(gemv2_tcx_rope_r8, 8, 4, true)
