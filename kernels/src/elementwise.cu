// Row-wise and element-wise kernels: embedding gather, layer norm, GELU, add, row
// gather, dtype conversion, bias add, KV block copies, rotary + KV write, and seeded
// random fills for benchmarks.

// out[r, :] = table[ids[r], :] (bf16 -> f32). grid (rows), block 256.
extern "C" __global__ void embed_bf16(const bf16_t* __restrict__ table, const u32* __restrict__ ids,
                                      float* __restrict__ out, int cols) { PDL_ENTER();
    const int r = blockIdx.x;
    const bf16_t* src = table + (size_t)ids[r] * cols;
    float* dst = out + (size_t)r * cols;
    // Unrolled so that several loads are in flight (a dependent chain otherwise).
#pragma unroll 8
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = bf2f(src[c]);
}

// Layer norm over each row, f32 in and out, f32 scale/shift. Two passes (mean, then
// centred variance) like the CPU reference, which avoids the cancellation of E[x^2]-m^2.
// grid (rows), block 256.
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ out,
                                          int cols, float eps) { PDL_ENTER();
    __shared__ float scratch[32];
    const float* row = x + (size_t)blockIdx.x * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += row[c];
    const float mean = block_sum(s, scratch) / (float)cols;
    float v = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = row[c] - mean;
        v += d * d;
    }
    const float var = block_sum(v, scratch) / (float)cols;
    const float inv = rsqrtf(var + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = (row[c] - mean) * inv * w[c] + b[c];
}

// Exact (erf) GELU in place.
extern "C" __global__ void gelu_f32(float* __restrict__ x, u64 n) { PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        x[i] = gelu_erf(x[i]);
    }
}

// x += y.
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, u64 n) { PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// out[i, :] = x[rows[i], :]. grid (n_out), block 256.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, const u32* __restrict__ rows,
                                           float* __restrict__ out, int cols) { PDL_ENTER();
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
#pragma unroll 8
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Activations to bf16 for the tensor-core GEMM.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, u64 n) { PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = f2bf(x[i]);
    }
}

// y[r, c] += bias[c] for a [rows, cols] matrix.
extern "C" __global__ void add_bias_rows(float* __restrict__ y, const float* __restrict__ bias,
                                         u64 n, int cols) { PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        y[i] += bias[i % (u64)cols];
    }
}

// Copy-on-write of whole KV blocks: pairs[2p] -> pairs[2p+1] in every layer, K and V.
// grid (n_pairs, num_layers), block 256. Elements are moved as 16-bit words.
extern "C" __global__ void copy_kv_blocks(bf16_t* __restrict__ k, bf16_t* __restrict__ v,
                                          const u32* __restrict__ pairs, u64 layer_elems,
                                          u64 block_elems) { PDL_ENTER();
    const u64 base = (u64)blockIdx.y * layer_elems;
    const u64 src = base + (u64)pairs[2 * blockIdx.x] * block_elems;
    const u64 dst = base + (u64)pairs[2 * blockIdx.x + 1] * block_elems;
    for (u64 i = threadIdx.x; i < block_elems; i += blockDim.x) {
        k[dst + i] = k[src + i];
        v[dst + i] = v[src + i];
    }
}

// A 64-bit mix (splitmix64 finaliser): uniform, seeded, reproducible fills.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// out[i] = uniform(-scale, scale) as bf16.
extern "C" __global__ void fill_uniform_bf16(bf16_t* __restrict__ out, u64 n, u64 seed, float scale) { PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 h = mix64(seed * 0x9e3779b97f4a7c15ull + i);
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = f2bf((2.0f * u - 1.0f) * scale);
    }
}

// out[i] = uniform(-scale, scale) + offset, f32.
extern "C" __global__ void fill_uniform_f32(float* __restrict__ out, u64 n, u64 seed, float scale,
                                            float offset) { PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 h = mix64(seed * 0x9e3779b97f4a7c15ull + i);
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        out[i] = (2.0f * u - 1.0f) * scale + offset;
    }
}

// Splits the fused qkv rows ([kv_heads][q_per_kv + 2][head_dim] per token), applies the
// host-computed rotary cos/sin (NeoX rotate-half) to queries and keys, writes queries to
// `q` ([rows, heads, head_dim], f32) and keys/values into the layer's cache slot (bf16).
// grid (rows, kv_heads, ceil((q_per_kv + 2) * head_dim / 256)), block 256: one element
// per thread, so a decode step (one row) still spreads over many blocks.
extern "C" __global__ void rope_qkv(const float* __restrict__ qkv, float* __restrict__ q,
                                    bf16_t* __restrict__ kc, bf16_t* __restrict__ vc,
                                    const u32* __restrict__ slots, const float* __restrict__ cosv,
                                    const float* __restrict__ sinv, int rotary, int nh, int kvh,
                                    int hd, u64 layer_off) { PDL_ENTER();
    const int r = blockIdx.x, g = blockIdx.y;
    const int qpg = nh / kvh, half = hd / 2;
    const int i = blockIdx.z * blockDim.x + threadIdx.x;
    if (i >= (qpg + 2) * hd) return;
    const float* src = qkv + (size_t)r * kvh * (qpg + 2) * hd + (size_t)g * (qpg + 2) * hd;
    const int head = i / hd, d = i - head * hd;
    float val = src[i];
    if (rotary && head <= qpg) {
        const int j = d < half ? d : d - half;
        const float c = cosv[(size_t)r * half + j], s = sinv[(size_t)r * half + j];
        val = rope_pair(val, d < half ? src[i + half] : src[i - half], c, s, d < half);
    }
    if (head < qpg) {
        q[((size_t)r * nh + (size_t)g * qpg + head) * hd + d] = val;
    } else {
        const u64 cache = layer_off + ((u64)slots[r] * kvh + g) * hd + d;
        if (head == qpg) {
            kc[cache] = f2bf(val);
        } else {
            vc[cache] = f2bf(val);
        }
    }
}

// layer_norm_f32 for rows of at most 8 * blockDim.x values: each thread keeps its (up
// to 8) values in registers, so the row is read from memory once. Same two-pass formula.
// grid (rows), block a multiple of 32 with cols <= 8 * blockDim.x.
extern "C" __global__ void __launch_bounds__(1024)
    layer_norm_f32_reg(const float* __restrict__ x, const float* __restrict__ w,
                       const float* __restrict__ b, float* __restrict__ out, int cols, float eps) {
    // The norm's own weights depend on no earlier kernel: loaded before the wait on
    // the previous one, so that only the activations' latency remains after it.
    float wr[8], br[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        wr[i] = c < cols ? w[c] : 0.0f;
        br[i] = c < cols ? b[c] : 0.0f;
    }
    PDL_ENTER();
    __shared__ float scratch[32];
    const float* row = x + (size_t)blockIdx.x * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    float v[8];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = c < cols ? row[c] : 0.0f;
        s += v[i];
    }
    const float mean = block_sum(s, scratch) / (float)cols;
    float q = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        const float d = c < cols ? v[i] - mean : 0.0f;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / (float)cols;
    const float inv = rsqrtf(var + eps);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < cols) dst[c] = (v[i] - mean) * inv * wr[i] + br[i];
    }
}

// Whether (v, i) beats (bv, bi) for argmax_rows: larger value, then smaller index;
// index 0xffffffff marks "no value yet".
__device__ __forceinline__ bool argmax_beats(float v, u32 i, float bv, u32 bi) {
    if (i == 0xffffffffu) return false;
    if (bi == 0xffffffffu) return true;
    return v > bv || (v == bv && i < bi);
}

// The best (value, index) of a warp, in every lane.
__device__ __forceinline__ void argmax_warp(float& bv, u32& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_beats(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
}

// Index of the largest value of each row, the first one on ties, NaN skipped (exactly
// engine/src/sampling `argmax`), so that greedy tokens need not cross to the host as
// logits; 0xffffffff for a row of nothing but NaN and -inf (no usable logit: the host
// path's greedy acceptance reports those). grid (rows), block 1024.
extern "C" __global__ void argmax_rows_f32(const float* __restrict__ x, u32* __restrict__ out, int cols) {
    PDL_ENTER();
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const float* row = x + (size_t)blockIdx.x * cols;
    float bv = NEG_INF;
    u32 bi = 0xffffffffu;
    // Each thread scans increasing indices: a strictly larger value replaces. Eight
    // loads go out before any is compared (one at a time, a 65k-entry row cost 64
    // memory latencies per thread).
    const int stride = blockDim.x;
    for (int c0 = threadIdx.x; c0 < cols; c0 += 8 * stride) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int c = c0 + u * stride;
            v[u] = c < cols ? row[c] : NEG_INF;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            if (!isnan(v[u]) && v[u] != NEG_INF && (bi == 0xffffffffu || v[u] > bv)) {
                bv = v[u];
                bi = (u32)(c0 + u * stride);
            }
        }
    }
    argmax_warp(bv, bi);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        bv = lane < nwarps ? sv[lane] : NEG_INF;
        bi = lane < nwarps ? si[lane] : 0xffffffffu;
        argmax_warp(bv, bi);
        if (lane == 0) out[blockIdx.x] = bi;
    }
}
