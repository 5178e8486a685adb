// Products with integer weights (the engine's `quant` formats): GEMVs for few activation
// rows that stream the 8-bit or 4-bit weights and dequantize them in registers, and the
// dequantization of a whole matrix to bf16 for cuBLAS (prefill).
//
// Layouts (kernels/src/ops/quant.rs uploads them): every row of `q` holds KP columns, K
// rounded up to a multiple of 32, the padding zeros, so that a row starts on 16 bytes.
// - int8: byte q[n * KP + k] is the signed value; one f32 scale per row, scale[n].
// - int4: byte q[n * KP / 2 + k / 2] holds column k in its low (even k) or high (odd k)
//   nibble as value + 8 (padding nibbles are 8, value 0); scale[n * G + k / group], G =
//   ceil(K / group), group a multiple of 16.
// A weight's value is q * scale, one f32 multiply, as the engine's QuantMatrix computes
// it; the GEMVs multiply-add those values in a fixed order per output row (lane chunks,
// then warp_sum), whatever the number of rows, so each row gets the bits it gets alone
// (row-invariant, as the runtime needs for exact greedy speculation).
//
// Integers become floats by their bit pattern: 0x4B000000 | u is the float 2^23 + u for
// a byte u, so (2^23 + u) - (2^23 + offset) is u - offset exactly, in integer and add
// units rather than the conversion unit.

#define QG_WARPS 4

// Byte i of v as a float, minus `offset` (2^23 + the value's offset).
__device__ __forceinline__ float byte_minus(u32 v, int i, float offset) {
    return __int_as_float(__byte_perm(v, 0x4B000000u, 0x7550u | (u32)i)) - offset;
}

#define Q8_OFFSET 8388736.0f  // 2^23 + 128: bytes are stored flipped to value + 128
#define Q4_OFFSET 8388616.0f  // 2^23 + 8

// Adds the products of `nw` weights w[0..nw) (columns k0..) with the activation rows.
template <int NW>
__device__ __forceinline__ void qg_accumulate(float (&acc)[8], const float (&w)[NW],
                                              const float* __restrict__ x, int R, int K, int k0) {
#pragma unroll
    for (int r = 0; r < 8; r++) {
        if (r < R) {
            const float* xr = x + (size_t)r * K + k0;
            if (k0 + NW <= K && (K & 3) == 0) {
                // 16-byte loads: rows start on 16 bytes when K is a multiple of 4 (the
                // buffers are 256-byte aligned) and k0 is a multiple of 16. The same
                // multiply-adds in the same order as below.
                const float4* x4 = reinterpret_cast<const float4*>(xr);
#pragma unroll
                for (int i = 0; i < NW / 4; i++) {
                    const float4 v = x4[i];
                    acc[r] = fmaf(w[4 * i], v.x, acc[r]);
                    acc[r] = fmaf(w[4 * i + 1], v.y, acc[r]);
                    acc[r] = fmaf(w[4 * i + 2], v.z, acc[r]);
                    acc[r] = fmaf(w[4 * i + 3], v.w, acc[r]);
                }
            } else if (k0 + NW <= K) {
#pragma unroll
                for (int i = 0; i < NW; i++) acc[r] = fmaf(w[i], xr[i], acc[r]);
            } else {
#pragma unroll
                for (int i = 0; i < NW; i++)
                    if (k0 + i < K) acc[r] = fmaf(w[i], xr[i], acc[r]);
            }
        }
    }
}

__device__ __forceinline__ void qg_store(const float (&acc)[8], float* __restrict__ y,
                                         const float* __restrict__ bias, int R, int N, int n,
                                         int has_bias, int epi) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < 8; r++) {
        const float s = warp_sum(acc[r]);
        if (r < R && lane == 0) gemv_store(y, (size_t)r * N + n, s + (has_bias ? bias[n] : 0.0f), epi);
    }
}

// y[r, n] = sum_k x[r, k] * (q[n, k] * scale[n]) (+ bias[n]), stored by `epi`.
// grid ceil(N / QG_WARPS), block 32 * QG_WARPS, R <= 8: one warp per output feature,
// lane l taking the 16-column chunks l, l + 32, ...
extern "C" __global__ void gemv_q8(const float* __restrict__ x, const unsigned char* __restrict__ q,
                                   const float* __restrict__ scale, const float* __restrict__ bias,
                                   float* __restrict__ y, int R, int N, int K, int KP,
                                   int has_bias, int epi) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * QG_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const float s = scale[n];
    const uint4* row = reinterpret_cast<const uint4*>(q + (size_t)n * KP);
    float acc[8];
#pragma unroll
    for (int r = 0; r < 8; r++) acc[r] = 0.0f;
    for (int c = lane; c * 16 < K; c += 32) {
        const uint4 v = ld_stream(row + c);
        const u32 words[4] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u, v.z ^ 0x80808080u,
                              v.w ^ 0x80808080u};
        float w[16];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) w[4 * j + i] = __fmul_rn(byte_minus(words[j], i, Q8_OFFSET), s);
        qg_accumulate<16>(acc, w, x, R, K, c * 16);
    }
    qg_store(acc, y, bias, R, N, n, has_bias, epi);
}

// As gemv_q8 for int4 weights: lane l takes the 32-column chunks l, l + 32, ... (16
// bytes); a chunk's halves each lie in one group (groups are multiples of 16).
extern "C" __global__ void gemv_q4(const float* __restrict__ x, const unsigned char* __restrict__ q,
                                   const float* __restrict__ scale, const float* __restrict__ bias,
                                   float* __restrict__ y, int R, int N, int K, int KP, int group,
                                   int G, int has_bias, int epi) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * QG_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const uint4* row = reinterpret_cast<const uint4*>(q + (size_t)n * (KP / 2));
    const float* srow = scale + (size_t)n * G;
    float acc[8];
#pragma unroll
    for (int r = 0; r < 8; r++) acc[r] = 0.0f;
    for (int c = lane; c * 32 < K; c += 32) {
        const int k0 = c * 32;
        const uint4 v = ld_stream(row + c);
        const float s0 = srow[k0 / group];
        const float s1 = srow[min((k0 + 16) / group, G - 1)];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
        float w[32];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 lo = words[j] & 0x0F0F0F0Fu, hi = (words[j] >> 4) & 0x0F0F0F0Fu;
            const float s = j < 2 ? s0 : s1;  // bytes 0..7 are columns 0..15
#pragma unroll
            for (int i = 0; i < 4; i++) {
                w[8 * j + 2 * i] = __fmul_rn(byte_minus(lo, i, Q4_OFFSET), s);
                w[8 * j + 2 * i + 1] = __fmul_rn(byte_minus(hi, i, Q4_OFFSET), s);
            }
        }
        qg_accumulate<32>(acc, w, x, R, K, k0);
    }
    qg_store(acc, y, bias, R, N, n, has_bias, epi);
}

// out[n, k] = bf16(q[n, k] * scale[n]) over the K real columns (grid-stride).
extern "C" __global__ void dequant_q8_bf16(const unsigned char* __restrict__ q,
                                           const float* __restrict__ scale,
                                           bf16_t* __restrict__ out, int N, int K, int KP) {
    PDL_ENTER();
    const size_t total = (size_t)N * K;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t n = i / K, k = i % K;
        const u32 b = (u32)q[n * KP + k] ^ 0x80u;
        out[i] = f2bf(__fmul_rn(byte_minus(b, 0, Q8_OFFSET), scale[n]));
    }
}

// out[n, k] = bf16(value(n, k) * scale[n * G + k / group]) over the K real columns.
extern "C" __global__ void dequant_q4_bf16(const unsigned char* __restrict__ q,
                                           const float* __restrict__ scale,
                                           bf16_t* __restrict__ out, int N, int K, int KP,
                                           int group, int G) {
    PDL_ENTER();
    const size_t total = (size_t)N * K;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t n = i / K, k = i % K;
        const u32 b = ((u32)q[n * (KP / 2) + k / 2] >> (4 * (k & 1))) & 0xFu;
        out[i] = f2bf(__fmul_rn(byte_minus(b, 0, Q4_OFFSET), scale[n * G + k / group]));
    }
}
