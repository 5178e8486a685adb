// Shared helpers for falconer's kernels. The .cu files are concatenated after this one
// into a single NVRTC program (NVRTC has no file system), so nothing here #includes a
// header: bf16 is handled as raw 16-bit patterns, which also keeps the rounding exactly
// equal to the host's `half::bf16` (round to nearest even).

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Rounds an f32 through bf16 (HF computes ALiBi biases in bf16).
__device__ __forceinline__ float round_bf16(float f) { return bf2f(f2bf(f)); }

// Two floats as one 32-bit register of two bf16 (lower index in the low half), the
// operand format of the bf16 tensor-core instructions.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
}

// pack_bf16x2 in one instruction (cvt.rn.bf16x2.f32, sm_80+): the same round to
// nearest even for every finite value; a NaN becomes the canonical one.
__device__ __forceinline__ u32 cvt_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float lo_bf16(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi_bf16(u32 v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32
// floats; the result is returned to every thread.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nwarps = blockDim.x >> 5;
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// One value of a rotary (rotate-half) pair: `first` (d < head_dim / 2) gives
// val * c - other * s, else val * c + other * s. Rounded the same way wherever it is
// inlined (no contraction left to the compiler), so the rotary in a GEMV epilogue equals
// rope_qkv's bit for bit.
__device__ __forceinline__ float rope_pair(float val, float other, float c, float s, bool first) {
    return fmaf(first ? -other : other, s, __fmul_rn(val, c));
}

// ALiBi bias exactly as engine/src/posenc/alibi.rs `bias()`: the key position and the
// slope * position product are rounded to bf16, then divided by sqrt(head_dim).
__device__ __forceinline__ float alibi_bias(float slope, int key_pos, int head_dim) {
    const float pos = round_bf16((float)key_pos);
    return round_bf16(slope * pos) / sqrtf((float)head_dim);
}

// Weight rows are read exactly once per step: stream them past L1 so that the
// activations they are multiplied with stay cached.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// Programmatic dependent launch (sm_90+): a kernel queued with the PDL launch attribute
// may start while its predecessor on the stream is still finishing; every kernel calls
// pdl_wait() before it touches memory that another kernel writes (a no-op without the
// attribute, and before sm_90), then pdl_trigger() so that its own successor may be
// scheduled early. Before the wait a kernel may read only what no kernel writes: weights,
// and a step's metadata (uploaded by a copy before the step's first kernel); the GEMVs
// load their first weights there, while the kernel before them finishes. Since every
// kernel triggers after its own wait, only the kernel just before may still be running:
// the decode attention also loads the keys of earlier steps there, which that kernel
// (rope_qkv, or the projection that stores the rotary itself) does not write. Work
// forked onto a second stream (gpu/fork.rs: the MLP down projection) may run beside
// them too; it writes only the residual stream, which the attention does not read, and
// is joined before the kernel that adds to it next. (Triggering
// before the wait, so that a chain of kernels is scheduled at once, measured slower on
// an H100.)
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Exact (erf) GELU, as the CPU backend computes it.
__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

#define PDL_ENTER() \
    pdl_wait();     \
    pdl_trigger()

// Cluster plumbing (sm_90+). Before sm_90 a "cluster" is one block: the barrier is the
// block's and every address is the block's own.
__device__ __forceinline__ u32 cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
#else
    return 0;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}
