// bn_silu_kernels.cu: BatchNorm (training mode) and SiLU as one operation, forward and backward.
//
// Where this sits in the flow
// ---------------------------
//   train.py --cuda_graphs --fused_bn_silu -> models.ConvBnAct.forward in training mode:
//       conv -> [THIS FILE, through models.bn_silu_cuda: BN with batch statistics, then SiLU]
//   Everywhere else (CPU, evaluation, SyncBatchNorm, shapes it does not take) the same layer
//   runs as PyTorch's BatchNorm2d followed by nn.SiLU; models.py says when.
//
// Why a kernel of our own
// -----------------------
// In YOLOX-S most of the training step's time outside the convolutions is BatchNorm and SiLU,
// and both only move memory: each reads a whole activation tensor and writes one. PyTorch runs
// them as separate operations, so the tensor between them (the BN output z) is written, read
// back, kept for the backward pass, and read again there. Per element of a layer's output:
//                      PyTorch (BN, then SiLU)                     this file
//   forward   stats: read x; BN: read x, write z;      stats: read x; apply: read x, write y
//             SiLU: read z, write y                    (z lives in registers only)
//   backward  SiLU': read gy, z, write gz;             reduce: read gy, x
//             BN reduce: read gz, x;                   input grad: read gy, x, write gx
//             BN input grad: read gz, x, write gx      (gz recomputed from x, never stored)
//   total     9 reads + 4 writes                       6 reads + 2 writes, and no z kept
// z and gz are recomputed from x with the per-channel mean and 1/std, a few multiply-adds and
// an exp per element, which cost far less than moving the tensor through memory again.
//
// The arithmetic (per channel c, over the M = N * H * W values of that channel)
// ------------------------------------------------------------------------------
//   forward:  mean = sum(x) / M,  var = sum((x - mean)^2) / M  (biased, as BN normalises with)
//             z = (x - mean) / sqrt(var + eps) * w + b = x * scale + shift
//             y = silu(z) = z * sigmoid(z)
//             running_mean += momentum * (mean - running_mean)
//             running_var  += momentum * (var * M / (M - 1) - running_var)   (unbiased, as torch)
//   backward: gz = gy * silu'(z),  silu'(z) = s * (1 + z * (1 - s)),  s = sigmoid(z)
//             xhat = (x - mean) / sqrt(var + eps)
//             grad b = sum(gz),  grad w = sum(gz * xhat)
//             gx = scale * (gz - grad b / M - xhat * grad w / M)
// Sums are taken of x minus the channel's first value (a "shift"), not of x: sum(x^2) / M -
// mean^2 cancels badly in float32 when the mean is large against the spread, and shifting by a
// value of the data keeps both terms the size of the spread. Everything is float32 inside,
// whatever the storage type.
//
// Layout and who owns what
// ------------------------
// The tensors are channels-last (NHWC, as models.build_model makes the network), so a layer's
// output is an [M, C] matrix in memory: row m is one pixel, its C channels side by side. Every
// kernel below uses the same 2D grid:
//   one THREAD  = one 16-byte vector of channels (8 channels of bf16 / fp16, 4 of float32) and
//                 the rows m = blockIdx.y * blockDim.y + threadIdx.y + k * (blockDim.y * gridDim.y)
//                 (a grid-stride loop over rows); neighbouring threads in x hold neighbouring
//                 channel vectors, so a warp reads whole consecutive rows (coalesced, 16-byte
//                 loads).
//   one BLOCK   = 256 threads: blockDim.x vectors across (a power of two, at most 32) times
//                 blockDim.y rows; gridDim.x covers the channels, gridDim.y splits the rows.
// The two reductions (forward statistics, backward sums) add up their rows per thread (several
// rows' loads issued together, so that enough loads are in flight to keep memory busy), then
// over blockDim.y in shared memory, and write one partial sum per (row block, channel); a small
// per-channel kernel adds the gridDim.y partials in a fixed order. No atomics, so a run gives
// the same bits every time.
//
// models.bn_silu_cuda checks what these kernels assume before it launches them: contiguous
// rows with C a multiple of the vector width (so every 16-byte load is aligned), a row stride
// `ld` for the incoming gradient (a channel slice of a concatenation has ld > C), M >= 2.
// The file includes no headers, so NVRTC (cupy.RawModule) and `nvcc -c` both compile it as is.

#define BN_THREADS 256

// ---- storage types: float32, bfloat16, float16, each as a raw value and float conversions ----
struct F32 {
    typedef float raw;
    static const int vec = 4;  // values per 16-byte load
    __device__ static __forceinline__ float load(float v) { return v; }
    __device__ static __forceinline__ float store(float f) { return f; }
};

struct BF16 {  // bfloat16 is the top half of a float32
    typedef unsigned short raw;
    static const int vec = 8;
    __device__ static __forceinline__ float load(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
    __device__ static __forceinline__ unsigned short store(float f) {  // round to nearest even, as torch
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return (unsigned short)(u >> 16);
    }
};

struct F16 {  // IEEE half, converted by the hardware instruction (no cuda_fp16.h needed)
    typedef unsigned short raw;
    static const int vec = 8;
    __device__ static __forceinline__ float load(unsigned short v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    __device__ static __forceinline__ unsigned short store(float f) {
        unsigned short v;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
        return v;
    }
};

// One 16-byte vector of values, loaded and stored in one instruction.
template <typename T>
union Pack {
    uint4 bits;
    typename T::raw v[T::vec];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const typename T::raw* p) {
    Pack<T> pack;
    pack.bits = *reinterpret_cast<const uint4*>(p);
    return pack;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }

// The gradient at the BN output, gz = gy * silu'(z), with z = x * scale + shift recomputed from x.
__device__ __forceinline__ float grad_at_bn_output(float xv, float gyv, float scale, float shift) {
    const float z = xv * scale + shift;
    const float s = sigmoid(z);
    return gyv * s * (1.0f + z * (1.0f - s));
}

// Add a thread's V pairs of sums over the block's rows (threadIdx.y) in shared memory, and write
// the block's pair for each of its channels: out[blockIdx.y * C + c] and out[(G + blockIdx.y) * C + c].
template <int V>
__device__ __forceinline__ void block_sum_rows(float* a, float* b, float* out, int C, int c0, bool active) {
    __shared__ float sa[BN_THREADS * 8];
    __shared__ float sb[BN_THREADS * 8];
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        sa[t * V + k] = a[k];
        sb[t * V + k] = b[k];
    }
    __syncthreads();
    for (int half = blockDim.y / 2; half > 0; half /= 2) {  // blockDim.y is a power of two
        if (threadIdx.y < half) {
            const int other = t + half * blockDim.x;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                sa[t * V + k] += sa[other * V + k];
                sb[t * V + k] += sb[other * V + k];
            }
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && active) {
        const long long G = gridDim.y;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            out[blockIdx.y * (long long)C + c0 + k] = sa[t * V + k];
            out[(G + blockIdx.y) * C + c0 + k] = sb[t * V + k];
        }
    }
}

// One row's vector added into a thread's forward sums: s1 += x - shift, s2 += (x - shift)^2.
template <typename T>
__device__ __forceinline__ void add_stats_row(const Pack<T>& p, const float* shift, float* s1, float* s2) {
#pragma unroll
    for (int k = 0; k < T::vec; ++k) {
        const float d = T::load(p.v[k]) - shift[k];
        s1[k] += d;
        s2[k] += d * d;
    }
}

// One row's vectors (x, gy) added into a thread's backward sums: a += gz, b += gz * xhat.
template <typename T>
__device__ __forceinline__ void add_grad_row(const Pack<T>& px, const Pack<T>& pg, const float* mean,
                                             const float* invstd, const float* scale, const float* shift,
                                             float* a, float* b) {
#pragma unroll
    for (int k = 0; k < T::vec; ++k) {
        const float xv = T::load(px.v[k]);
        const float gz = grad_at_bn_output(xv, T::load(pg.v[k]), scale[k], shift[k]);
        a[k] += gz;
        b[k] += gz * ((xv - mean[k]) * invstd[k]);
    }
}

// ---- forward 1/3: per (row block, channel) sums of (x - shift) and (x - shift)^2 ----
//   x [M, C]; partial [2, G, C] float32; shift [C] float32 (row 0 of x, written by row block 0)
template <typename T>
__device__ void stats(const typename T::raw* __restrict__ x, float* __restrict__ partial,
                      float* __restrict__ shift_out, long long M, int C) {
    const int V = T::vec;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    const bool active = c0 < C;
    float shift[V], s1[V], s2[V];
    if (active) {
        Pack<T> p = load_pack<T>(x + c0);  // row 0
#pragma unroll
        for (int k = 0; k < V; ++k) shift[k] = T::load(p.v[k]);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) s1[k] = s2[k] = 0.0f;
    const long long step = (long long)blockDim.y * gridDim.y;
    long long m = (long long)blockIdx.y * blockDim.y + threadIdx.y;
    // ROWS rows at a time: their loads are all issued before the first is used, so each thread
    // has ROWS loads in flight instead of one (a memory-bound reduction needs many in flight to
    // fill the memory system). The rows are still added in the same order, so the sums are
    // the same bits as one row at a time; the loop after it takes the remaining rows.
    const int ROWS = 4;
    for (; active && m + (ROWS - 1) * step < M; m += ROWS * step) {
        Pack<T> p[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) p[r] = load_pack<T>(x + (m + r * step) * C + c0);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) add_stats_row<T>(p[r], shift, s1, s2);
    }
    for (; active && m < M; m += step) add_stats_row<T>(load_pack<T>(x + m * C + c0), shift, s1, s2);
    if (active && blockIdx.y == 0 && threadIdx.y == 0) {
#pragma unroll
        for (int k = 0; k < V; ++k) shift_out[c0 + k] = shift[k];
    }
    block_sum_rows<V>(s1, s2, partial, C, c0, active);
}

// ---- forward 3/3: y = silu(x * scale + shift), coef [4, C] = mean, invstd, scale, shift ----
template <typename T>
__device__ void apply(const typename T::raw* __restrict__ x, const float* __restrict__ coef,
                      typename T::raw* __restrict__ y, long long M, int C) {
    const int V = T::vec;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c0 >= C) return;
    float scale[V], shift[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        scale[k] = coef[2 * C + c0 + k];
        shift[k] = coef[3 * C + c0 + k];
    }
    const long long step = (long long)blockDim.y * gridDim.y;
    for (long long m = (long long)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += step) {
        Pack<T> p = load_pack<T>(x + m * C + c0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float z = T::load(p.v[k]) * scale[k] + shift[k];
            p.v[k] = T::store(z * sigmoid(z));
        }
        *reinterpret_cast<uint4*>(y + m * C + c0) = p.bits;
    }
}

// ---- backward 1/3: per (row block, channel) sums of gz and gz * xhat ----
//   gy [M, C] with row stride ld; coef as in apply; partial [2, G, C]
template <typename T>
__device__ void grad_sums(const typename T::raw* __restrict__ x, const typename T::raw* __restrict__ gy,
                          const float* __restrict__ coef, float* __restrict__ partial, long long M, int C,
                          long long ld) {
    const int V = T::vec;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    const bool active = c0 < C;
    float mean[V], invstd[V], scale[V], shift[V], a[V], b[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        a[k] = b[k] = 0.0f;
        if (active) {
            mean[k] = coef[c0 + k];
            invstd[k] = coef[C + c0 + k];
            scale[k] = coef[2 * C + c0 + k];
            shift[k] = coef[3 * C + c0 + k];
        }
    }
    const long long step = (long long)blockDim.y * gridDim.y;
    long long m = (long long)blockIdx.y * blockDim.y + threadIdx.y;
    const int ROWS = 2;  // rows whose loads are in flight together, as in stats
    for (; active && m + (ROWS - 1) * step < M; m += ROWS * step) {
        Pack<T> px[ROWS], pg[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            px[r] = load_pack<T>(x + (m + r * step) * C + c0);
            pg[r] = load_pack<T>(gy + (m + r * step) * ld + c0);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) add_grad_row<T>(px[r], pg[r], mean, invstd, scale, shift, a, b);
    }
    for (; active && m < M; m += step) {
        add_grad_row<T>(load_pack<T>(x + m * C + c0), load_pack<T>(gy + m * ld + c0), mean, invstd, scale, shift,
                        a, b);
    }
    block_sum_rows<V>(a, b, partial, C, c0, active);
}

// ---- backward 3/3: gx = scale * gz + kb + kw * xhat, gcoef [2, C] = kb, kw ----
template <typename T>
__device__ void grad_input(const typename T::raw* __restrict__ x, const typename T::raw* __restrict__ gy,
                           const float* __restrict__ coef, const float* __restrict__ gcoef,
                           typename T::raw* __restrict__ gx, long long M, int C, long long ld) {
    const int V = T::vec;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c0 >= C) return;
    float mean[V], invstd[V], scale[V], shift[V], kb[V], kw[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        mean[k] = coef[c0 + k];
        invstd[k] = coef[C + c0 + k];
        scale[k] = coef[2 * C + c0 + k];
        shift[k] = coef[3 * C + c0 + k];
        kb[k] = gcoef[c0 + k];
        kw[k] = gcoef[C + c0 + k];
    }
    const long long step = (long long)blockDim.y * gridDim.y;
    for (long long m = (long long)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += step) {
        Pack<T> px = load_pack<T>(x + m * C + c0);
        Pack<T> pg = load_pack<T>(gy + m * ld + c0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float xv = T::load(px.v[k]);
            const float gz = grad_at_bn_output(xv, T::load(pg.v[k]), scale[k], shift[k]);
            px.v[k] = T::store(scale[k] * gz + kb[k] + kw[k] * ((xv - mean[k]) * invstd[k]));
        }
        *reinterpret_cast<uint4*>(gx + m * C + c0) = px.bits;
    }
}

// ---- the launchable kernels: one per storage type for the four passes over the tensor ----
// __launch_bounds__(threads, blocks per multiprocessor) caps the registers so that many blocks fit at
// once: memory-bound kernels need many loads in flight. The gradient kernels hold six per-channel
// constants per value, so they get 3 blocks (at most 85 registers) rather than 4. With their rows
// loaded 4 (stats) and 2 (grad_sums) at a time, ptxas for sm_90 reports no spills except 4 bytes
// in grad_sums_float16. On an H200 this took fused yolox_s training from 978 to 1,031-1,156 img/s
// (bench.py train; the README has each run's numbers).
#define BN_SILU_KERNELS(T, name)                                                                      \
    extern "C" __global__ void __launch_bounds__(BN_THREADS, 4) bn_silu_stats_##name(                    \
        const T::raw* x, float* partial, float* shift, long long M, int C) {                          \
        stats<T>(x, partial, shift, M, C);                                                            \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(BN_THREADS, 4) bn_silu_apply_##name(                    \
        const T::raw* x, const float* coef, T::raw* y, long long M, int C) {                          \
        apply<T>(x, coef, y, M, C);                                                                   \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(BN_THREADS, 3) bn_silu_grad_sums_##name(                \
        const T::raw* x, const T::raw* gy, const float* coef, float* partial, long long M, int C,     \
        long long ld) {                                                                               \
        grad_sums<T>(x, gy, coef, partial, M, C, ld);                                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(BN_THREADS, 3) bn_silu_grad_input_##name(               \
        const T::raw* x, const T::raw* gy, const float* coef, const float* gcoef, T::raw* gx,         \
        long long M, int C, long long ld) {                                                           \
        grad_input<T>(x, gy, coef, gcoef, gx, M, C, ld);                                              \
    }

BN_SILU_KERNELS(F32, float32)
BN_SILU_KERNELS(BF16, bfloat16)
BN_SILU_KERNELS(F16, float16)

// ---- the per-channel finish: add the G partial sums of each channel ----
// Block (32 channels, FINISH_LANES lanes): lane j adds partials j, j + FINISH_LANES, ... of its
// channel (consecutive channels in a warp: coalesced reads), then the lanes are added in shared
// memory in a fixed order. In double: G partials of up to M / G values each.
#define FINISH_LANES 32

__device__ __forceinline__ bool sum_partials(const float* __restrict__ partial, int G, int C, double* s1,
                                             double* s2) {
    __shared__ double sa[32 * FINISH_LANES];
    __shared__ double sb[32 * FINISH_LANES];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int t = threadIdx.y * 32 + threadIdx.x;
    double a = 0.0, b = 0.0;
    if (c < C) {
        for (int g = threadIdx.y; g < G; g += FINISH_LANES) {
            a += partial[(long long)g * C + c];
            b += partial[(long long)(G + g) * C + c];
        }
    }
    sa[t] = a;
    sb[t] = b;
    __syncthreads();
    for (int half = FINISH_LANES / 2; half > 0; half /= 2) {
        if (threadIdx.y < half) {
            sa[t] += sa[t + half * 32];
            sb[t] += sb[t + half * 32];
        }
        __syncthreads();
    }
    *s1 = sa[threadIdx.x];
    *s2 = sb[threadIdx.x];
    return threadIdx.y == 0 && c < C;
}

// ---- forward 2/3: per channel, the sums -> coef, and the running statistics updated in place ----
//   coef [4, C]: mean, invstd, scale = w * invstd, shift = b - mean * scale (float32 buffers)
extern "C" __global__ void __launch_bounds__(32 * FINISH_LANES) bn_silu_finish_stats(
    const float* __restrict__ partial, const float* __restrict__ shift, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ running_mean, float* __restrict__ running_var,
    float* __restrict__ coef, int G, long long M, int C, float momentum, float eps) {
    double s1, s2;
    if (!sum_partials(partial, G, C, &s1, &s2)) return;
    const int c = blockIdx.x * 32 + threadIdx.x;
    const double d = s1 / (double)M;  // mean of x - shift
    double var = s2 / (double)M - d * d;
    var = var > 0.0 ? var : 0.0;
    const float mean = shift[c] + (float)d;
    const float invstd = rsqrtf((float)var + eps);
    const float scale = w[c] * invstd;
    coef[c] = mean;
    coef[C + c] = invstd;
    coef[2 * C + c] = scale;
    coef[3 * C + c] = b[c] - mean * scale;
    running_mean[c] += momentum * (mean - running_mean[c]);
    running_var[c] += momentum * ((float)(var * (double)M / (double)(M - 1)) - running_var[c]);
}

// ---- backward 2/3: per channel, the weight and bias gradients and gx's two constants ----
//   grad_w [C], grad_b [C] float32; gcoef [2, C]: kb = -scale * grad_b / M, kw = -scale * grad_w / M
extern "C" __global__ void __launch_bounds__(32 * FINISH_LANES) bn_silu_finish_grads(
    const float* __restrict__ partial, const float* __restrict__ coef, float* __restrict__ grad_w,
    float* __restrict__ grad_b, float* __restrict__ gcoef, int G, long long M, int C) {
    double sb, sw;
    if (!sum_partials(partial, G, C, &sb, &sw)) return;
    const int c = blockIdx.x * 32 + threadIdx.x;
    const float scale = coef[2 * C + c];
    grad_b[c] = (float)sb;
    grad_w[c] = (float)sw;
    gcoef[c] = -scale * (float)(sb / (double)M);
    gcoef[C + c] = -scale * (float)(sw / (double)M);
}
