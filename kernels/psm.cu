// Patch Selection Module: window scores, greedy selection with suppression, boxes. One block per image.
//
// Computes exactly what scanner/model/psm.py (the reference) computes, for a whole batch in one launch:
//
//   A[i]      = sum_c F[b, c, i]                       float64, channels added in order c = 0, 1, ...
//   score     = (sum of the window's A values, row-major order) / (window * window)    float64
//   picks     = `picks` times: the best cell (tie rule below), then every cell within Chebyshev
//               distance 1 of it (the 3x3 max-pool neighbourhood) is set to -inf
//   rate      = (2*idx + fm - grid + 1) / (2*fm);  centre = (size - side)/2 + side*rate  (side = min(H, W))
//   start     = floor(centre) - patch/2, then clamped to [0, max(size - patch, 0)];  end = min(start + patch, size)
//   box       = [x0, y0, x1, y1] int32, half-open, in original-image pixels; row index -> y (H), column -> x (W)
//
// Tie rule (torch.argmax over the row-major flattened grid, which the reference calls): the FIRST cell
// in row-major order whose score is maximal wins. NaN counts as larger than every number, and the
// first NaN wins. Suppressed cells hold -inf exactly as in the reference (masked_fill), so a live cell
// whose score is itself -inf ties with them and the first such cell in row-major order is taken, as
// torch.argmax does.
//
// Why the boxes are identical to the reference's:
// - Every float64 operation is one IEEE operation with round-to-nearest-even, spelled with __dadd_rn,
//   __dmul_rn and __ddiv_rn so that no compiler option can contract or reorder it (and NVRTC runs with
//   --fmad=false). The window sum is in row-major order and divided by window*window, as ATen's CPU
//   avg_pool2d does; the mapping multiplies side*rate and then adds the offset, as the reference does.
// - The channel sum is sequential in channel order: bit-identical to the plain transcription in
//   tests/test_psm.py. scanner/model/psm.py lets torch choose the order of that sum. Every order gives the
//   same float64 A whenever the sum is exact, i.e. when sum_c |F_c| < 2**53 * u, u the spacing of
//   the finest nonzero value (all partial sums are then representable multiples of u). That always
//   holds for float16 input with C <= 8192 (u >= 2**-24, sum < 2**29), and for float32/bfloat16
//   whose values span less than about 2**53 / C of their own ulps. Otherwise A can differ from
//   torch's in its last bits, and a pick can differ only where two window scores lie within that
//   rounding of each other; there the reference's own answer depends on torch's summation order
//   (CPU or CUDA, vector width, threads), so no implementation can promise more.
//
// Layout: F is (B, C, h, w) with any element strides (NCHW or channels_last), h == w == fm <= 32;
// sizes is (B, 2) int64 (H, W); boxes is (B, n_windows * picks, 4) int32, boxes of the first window
// size first, best pick first. Dynamic shared memory: 8 * (fm*fm + sum_k (fm - window_k + 1)**2) bytes.
//
// The same source compiles as plain C++ (no __CUDACC__): tests/test_kernels.py runs that build on
// CPUs, calling the phase functions below for every thread of every block in turn.

#ifdef __CUDACC__
#define SK_FN __device__ __forceinline__
#define SK_DADD(a, b) __dadd_rn((a), (b))
#define SK_DMUL(a, b) __dmul_rn((a), (b))
#define SK_DDIV(a, b) __ddiv_rn((a), (b))
#define SK_NEG_INF __longlong_as_double(0xfff0000000000000LL)
SK_FN float sk_bits_to_float(unsigned int u) { return __uint_as_float(u); }
#else
#include <cmath>
#include <cstring>
#define SK_FN static inline
#define SK_DADD(a, b) ((a) + (b))
#define SK_DMUL(a, b) ((a) * (b))
#define SK_DDIV(a, b) ((a) / (b))
#define SK_NEG_INF (-HUGE_VAL)
SK_FN float sk_bits_to_float(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif

#define PSM_MAX_WINDOWS 4

// Passed by value; tests/test_kernels.py and kernels/__init__.py mirror it as a ctypes.Structure.
struct PsmConfig {
    long long stride_b, stride_c, stride_h, stride_w;  // F's strides, in elements
    int channels, fm, n_windows, picks;
    int window[PSM_MAX_WINDOWS];
    int patch[PSM_MAX_WINDOWS];
};

// 16-bit storage types: the raw bits, converted exactly (no headers needed under NVRTC).
struct Half { unsigned short bits; };
struct BFloat16 { unsigned short bits; };

SK_FN float sk_half_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    if (exp == 0x1fu) return sk_bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, nan
    if (exp == 0u) {  // zero or subnormal: man * 2**-24, exact in float32
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return sk_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

SK_FN double sk_load(const float* p) { return (double)*p; }
SK_FN double sk_load(const Half* p) { return (double)sk_half_to_float(p->bits); }
SK_FN double sk_load(const BFloat16* p) { return (double)sk_bits_to_float((unsigned int)p->bits << 16); }

SK_FN int sk_grid(const PsmConfig& cfg, int k) { return cfg.fm - cfg.window[k] + 1; }

// Phase 1: activation map A (fm*fm float64) in shared memory; one thread per cell.
template <typename T>
SK_FN void psm_activation(const T* f, const PsmConfig& cfg, double* amap, int tid, int nthreads) {
    const int cells = cfg.fm * cfg.fm;
    for (int cell = tid; cell < cells; cell += nthreads) {
        const T* p = f + (long long)(cell / cfg.fm) * cfg.stride_h + (long long)(cell % cfg.fm) * cfg.stride_w;
        double acc = 0.0;
        for (int c = 0; c < cfg.channels; ++c) acc = SK_DADD(acc, sk_load(p + (long long)c * cfg.stride_c));
        amap[cell] = acc;
    }
}

// Phase 2: window means of every window size, grids stored one after another after A.
SK_FN void psm_scores(const PsmConfig& cfg, const double* amap, double* scores, int tid, int nthreads) {
    int total = 0;
    for (int k = 0; k < cfg.n_windows; ++k) total += sk_grid(cfg, k) * sk_grid(cfg, k);
    for (int i = tid; i < total; i += nthreads) {
        int k = 0, first = 0;
        while (i - first >= sk_grid(cfg, k) * sk_grid(cfg, k)) {
            first += sk_grid(cfg, k) * sk_grid(cfg, k);
            ++k;
        }
        const int g = sk_grid(cfg, k), w = cfg.window[k];
        const int r = (i - first) / g, c = (i - first) % g;
        double sum = 0.0;
        for (int dr = 0; dr < w; ++dr)
            for (int dc = 0; dc < w; ++dc) sum = SK_DADD(sum, amap[(r + dr) * cfg.fm + (c + dc)]);
        scores[i] = SK_DDIV(sum, (double)(w * w));
    }
}

// One axis of a box: grid index -> [start, end) in original pixels.
SK_FN void psm_axis(int idx, int fm, int grid, long long size, long long side, int patch, long long* start,
                    long long* end) {
    const double rate = SK_DDIV((double)(2 * idx + fm - grid + 1), (double)(2 * fm));
    const double centre = SK_DADD((double)((size - side) / 2), SK_DMUL((double)side, rate));
    long long s = (long long)floor(centre) - patch / 2;
    const long long limit = size - patch > 0 ? size - patch : 0;
    s = s < 0 ? 0 : s;
    s = s < limit ? s : limit;
    *start = s;
    *end = s + patch < size ? s + patch : size;
}

// Phase 3: greedy picks and boxes; one thread per window size.
SK_FN void psm_pick(const PsmConfig& cfg, double* scores, const long long* hw, int* boxes, int tid, int nthreads) {
    const long long height = hw[0], width = hw[1];
    const long long side = height < width ? height : width;
    for (int k = tid; k < cfg.n_windows; k += nthreads) {
        int first = 0;
        for (int j = 0; j < k; ++j) first += sk_grid(cfg, j) * sk_grid(cfg, j);
        const int g = sk_grid(cfg, k), n = g * g;
        double* s = scores + first;
        for (int p = 0; p < cfg.picks; ++p) {
            int best = 0;
            double top = s[0];
            for (int i = 1; i < n; ++i) {
                const double v = s[i];
                // Strictly greater (or the first NaN): earlier cells win ties.
                if (top == top && (v != v || v > top)) {
                    top = v;
                    best = i;
                }
            }
            const int r = best / g, c = best % g;
            for (int i = 0; i < n; ++i) {
                const int dr = i / g - r, dc = i % g - c;
                if (dr >= -1 && dr <= 1 && dc >= -1 && dc <= 1) s[i] = SK_NEG_INF;
            }
            long long y0, y1, x0, x1;
            psm_axis(r, cfg.fm, g, height, side, cfg.patch[k], &y0, &y1);
            psm_axis(c, cfg.fm, g, width, side, cfg.patch[k], &x0, &x1);
            int* out = boxes + 4 * (k * cfg.picks + p);
            out[0] = (int)x0;
            out[1] = (int)y0;
            out[2] = (int)x1;
            out[3] = (int)y1;
        }
    }
}

SK_FN int psm_boxes_per_image(const PsmConfig& cfg) { return cfg.n_windows * cfg.picks; }

#ifdef __CUDACC__
template <typename T>
SK_FN void psm_block(const T* f, const long long* sizes, int* boxes, const PsmConfig& cfg) {
    extern __shared__ double smem[];  // A (fm*fm), then the score grids
    const long long b = blockIdx.x;
    double* amap = smem;
    double* scores = smem + cfg.fm * cfg.fm;
    psm_activation(f + b * cfg.stride_b, cfg, amap, threadIdx.x, blockDim.x);
    __syncthreads();
    psm_scores(cfg, amap, scores, threadIdx.x, blockDim.x);
    __syncthreads();
    psm_pick(cfg, scores, sizes + 2 * b, boxes + b * 4 * psm_boxes_per_image(cfg), threadIdx.x, blockDim.x);
}

extern "C" __global__ void psm_f32(const float* f, const long long* sizes, int* boxes, PsmConfig cfg) {
    psm_block(f, sizes, boxes, cfg);
}
extern "C" __global__ void psm_f16(const Half* f, const long long* sizes, int* boxes, PsmConfig cfg) {
    psm_block(f, sizes, boxes, cfg);
}
extern "C" __global__ void psm_bf16(const BFloat16* f, const long long* sizes, int* boxes, PsmConfig cfg) {
    psm_block(f, sizes, boxes, cfg);
}
#endif
