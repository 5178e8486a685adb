// y = x @ w^T (+ bias) for few activation rows (decode and verify steps): memory bound,
// so every bf16 weight row is streamed exactly once with 16-byte loads and multiplied
// with all R activation rows (f32) at once. One warp owns ROWS output features; x stays
// in L1/L2, the weights bypass L1. Each 16-byte weight load needs 32 bytes of x per
// activation row from L1, so with more rows a warp takes more output features (ROWS) to
// share those x loads: L1 bandwidth, not HBM, would otherwise limit a verify pass.

#define GEMV_WARPS 4

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

// Requires K % 8 == 0 (16-byte aligned weight rows). grid ceil(N / (GEMV_WARPS *
// GEMV_ROWS)), block 32 * GEMV_WARPS.
template <int R, int U, int GEMV_ROWS>
__device__ __forceinline__ void gemv_vec(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                         const float* __restrict__ bias, float* __restrict__ y,
                                         int N, int K, int has_bias) {
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS;
    if (n0 >= N) return;
    const int K8 = K >> 3;
    const uint4* wp[GEMV_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++) wp[i] = (const uint4*)(w + (size_t)min(n0 + i, N - 1) * K);
    float acc[GEMV_ROWS][R];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] = 0.0f;

    int c = lane;
    // U chunks per lane per iteration, loaded before use: enough bytes in flight to
    // cover HBM latency.
    for (; c + 32 * (U - 1) < K8; c += 32 * U) {
        uint4 wv[U][GEMV_ROWS];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; i++) wv[u][i] = ld_stream(wp[i] + c + 32 * u);
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float4* xp = (const float4*)(x + (size_t)r * K) + 2 * (c + 32 * u);
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++) acc[i][r] += dot8(wv[u][i], a, b);
            }
        }
    }
    for (; c < K8; c += 32) {
        uint4 wv[GEMV_ROWS];
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; i++) wv[i] = ld_stream(wp[i] + c);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float4* xp = (const float4*)(x + (size_t)r * K) + 2 * c;
            const float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; i++) acc[i][r] += dot8(wv[i], a, b);
        }
    }
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float s = warp_sum(acc[i][r]);
            if (lane == 0 && n0 + i < N) {
                y[(size_t)r * N + n0 + i] = s + (has_bias ? bias[n0 + i] : 0.0f);
            }
        }
    }
}

// Output features per block: GEMV_WARPS * ROWS (the launcher mirrors this table).
#define GEMV_KERNEL(R, U, ROWS)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                              \
        gemv_bf16_r##R(const float* __restrict__ x, const bf16_t* __restrict__ w,              \
                       const float* __restrict__ bias, float* __restrict__ y, int N, int K,    \
                       int has_bias) {                                                         \
        gemv_vec<R, U, ROWS>(x, w, bias, y, N, K, has_bias);                                   \
    }

GEMV_KERNEL(1, 4, 2)
GEMV_KERNEL(2, 4, 2)
GEMV_KERNEL(3, 2, 4)
GEMV_KERNEL(4, 2, 4)
GEMV_KERNEL(5, 2, 4)
GEMV_KERNEL(6, 2, 4)
GEMV_KERNEL(7, 2, 4)
GEMV_KERNEL(8, 2, 4)

// Any K, any alignment (tiny models): one warp per output feature, scalar loads.
// grid ceil(N / GEMV_WARPS), block 32 * GEMV_WARPS, R <= 8.
extern "C" __global__ void gemv_bf16_scalar(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                            const float* __restrict__ bias, float* __restrict__ y,
                                            int R, int N, int K, int has_bias) {
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
        if (r < R && lane == 0) y[(size_t)r * N + n] = s + (has_bias ? bias[n] : 0.0f);
    }
}
